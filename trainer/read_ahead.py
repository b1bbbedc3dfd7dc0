"""Read the next clips while this one is encoded: a latent cache's encoding loop decoded a clip, then encoded it,
so the VAE (a GPU's) waited for every clip's decoding (2.5 s for a 1080p clip on 2 cores: ffmpeg, then the frames
to floats and resized) and the decoder for every encoding.

`read_ahead` hands the items back in order, each with the `Future` of its reading (None for an item not to be
read), reading up to `threads` items ahead in that many threads: ffmpeg decodes in its own process and torch's
resize lets go of the GIL, so threads suffice and no clip is pickled. What an item's reading raised is raised by
its `Future` at its turn, and an error of `items` itself (a file that cannot be hashed) where that item would
have come, so the clips before it are encoded as they were one by one. When the consumer stops (an error, Ctrl-C),
the readings not started are cancelled and those under way waited for (a clip's decoding, seconds).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")


def reading_threads(device: str) -> int:
    """Clips decoded at once beside the encoding. On a CPU, one: the VAE takes every core, and a second decoder
    slowed it (1.07x faster than one by one with one reader, 1.02x with two: 6 1080p clips, tiny model, 2 cores);
    beside a GPU, a quarter of the cores, up to 4 (a GPU may encode a clip in less time than a core decodes one)."""
    if device == "cpu":
        return 1
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def read_ahead(items: Iterable[tuple[Item, bool]], read: Callable[[Item], object],
               threads: int) -> Iterator[tuple[Item, Future | None]]:
    """`items`: (item, whether to read it). Yields (item, the Future of `read(item)` or None), in order."""
    source = iter(items)
    waiting: deque[tuple[Item, Future | None] | BaseException] = deque()
    reading = 0  # Futures in `waiting`: each holds a clip's frames once read, so they bound the memory held
    with ThreadPoolExecutor(threads, thread_name_prefix="read-ahead") as pool:

        def fill() -> bool:
            nonlocal reading
            while reading < threads:
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
