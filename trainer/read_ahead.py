"""Read the next clips while this one is encoded: a latent cache's encoding loop decoded a clip, then encoded it,
so the VAE (a GPU's) waited for every clip's decoding (2.5 s for a 1080p clip on 2 cores: ffmpeg, then the frames
to floats and resized) and the decoder for every encoding.

`read_ahead` hands the items back in order, each with the `Future` of its reading (None for an item not to be
read), reading up to `threads` items ahead in that many threads: ffmpeg decodes in its own process and torch's
resize lets go of the GIL, so threads suffice and no clip is pickled. What an item's reading raised is raised by
its `Future` at its turn, and an error of `items` itself (a file that cannot be hashed) where that item would
have come, so the clips before it are encoded as they were one by one. When the consumer stops (an error, Ctrl-C),
the readings not started are cancelled and those under way waited for (a clip's decoding, seconds). With no
thread (a CPU's way: `reading_threads`), each item is read when it is handed out, as the loop did.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from joblib import cpu_count

Item = TypeVar("Item")


AHEAD_ITEMS = 32  # items decided ahead at most: deciding a cached clip hashes it when the index lost it


def reading_threads(device: str) -> int:
    """Clips decoded at once beside the encoding. On a CPU, none (each clip read at its turn): the VAE's encoding
    takes every core there, and a decoder beside it only competed for them (bench/precompute.py on 2 cores: 0.96x
    to 1.07x of one by one, run to run); beside a GPU, a quarter of this process's cores (those it may run on, and no
    more than its container's CPU limit, shared with the launch's other processes on this machine), from 1 to 4: a GPU
    may encode a clip in less time than a core decodes one."""
    if device == "cpu":
        return 0
    cores = cpu_count()  # joblib's: the affinity, capped by a cgroup's CPU quota (a pod's limit on a large node)
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))  # torchrun's, for this machine
    return max(1, min(4, cores // 4 // processes))


def read_ahead(items: Iterable[tuple[Item, bool]], read: Callable[[Item], object],
               threads: int) -> Iterator[tuple[Item, Future | None]]:
    """`items`: (item, whether to read it). Yields (item, the Future of `read(item)` or None), in order; with
    `threads` 0, each item is read when it is handed out, in this thread."""
    if threads == 0:
        yield from _read_in_turn(items, read)
        return
    source = iter(items)
    waiting: deque[tuple[Item, Future | None] | BaseException] = deque()
    reading = 0  # Futures in `waiting`: each holds a clip's frames once read, so they bound the memory held
    with ThreadPoolExecutor(threads, thread_name_prefix="read-ahead") as pool:

        def fill() -> bool:
            nonlocal reading
            while reading < threads and len(waiting) < AHEAD_ITEMS:
                try:
                    item, wanted = next(source)
                except StopIteration:
                    return True
                except Exception as error:  # raised at its turn, after the items before it
                    waiting.append(error)
                    return True
                waiting.append((item, pool.submit(read, item) if wanted else None))
                reading += wanted
            return False

        try:
            ended = fill()
            while waiting:
                head = waiting.popleft()
                if isinstance(head, BaseException):
                    raise head
                reading -= head[1] is not None
                if not ended:
                    ended = fill()  # before the item is used: the next clips decode while it is encoded
                yield head
        finally:
            for entry in waiting:
                if not isinstance(entry, BaseException) and entry[1] is not None:
                    entry[1].cancel()


def _read_in_turn(items: Iterable[tuple[Item, bool]], read: Callable[[Item], object]) -> Iterator[tuple[Item, Future | None]]:
    for item, wanted in items:
        if not wanted:
            yield item, None
            continue
        future: Future = Future()
        try:
            future.set_result(read(item))
        except Exception as error:  # raised by the Future, at its turn, as a reading thread's would be
            future.set_exception(error)
        yield item, future
