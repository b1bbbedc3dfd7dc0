"""`trainer.read_ahead`: the latent cache's next clips decoded while one is encoded."""

from __future__ import annotations

import threading
import time
from contextlib import closing

import pytest

from trainer.read_ahead import read_ahead, reading_threads


class Reads:
    """A read that notes which items it started, and waits for `release` (an item's decoding under way)."""

    def __init__(self):
        self.started: list[int] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, item: int) -> str:
        with self.lock:
            self.started.append(item)
        assert self.release.wait(timeout=10)
        if item == 3:
            raise ValueError("item 3 cannot be read")
        return f"frames of {item}"

    def wait_for(self, item: int) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.lock:
                if item in self.started:
                    return True
            time.sleep(0.005)
        return False


def test_the_next_item_is_read_while_one_is_used_and_each_comes_back_in_order_with_its_own_result():
    """Guards the encoding loop's wait: a clip was decoded only once the clip before it was encoded, so the VAE
    waited for every decoding. When item 0 is handed out, item 1's read has started (before item 0's result is
    even asked for); items come back in order, an item not to be read with None, and each read's error is raised
    by that item's Future alone."""
    reads = Reads()
    wanted = {0: True, 1: True, 2: False, 3: True, 4: True}
    seen = []
    with closing(read_ahead(iter(wanted.items()), reads, threads=1)) as steps:
        for item, future in steps:
            if item == 0:
                assert reads.wait_for(1), reads.started
            if future is None:
                seen.append((item, None))
                continue
            try:
                seen.append((item, future.result(timeout=10)))
            except ValueError as error:
                seen.append((item, str(error)))
    assert seen == [(0, "frames of 0"), (1, "frames of 1"), (2, None), (3, "item 3 cannot be read"),
                    (4, "frames of 4")]
    assert sorted(reads.started) == [0, 1, 3, 4]


def test_reads_ahead_by_at_most_the_threads_and_a_stop_cancels_the_rest():
    """Guards the memory a read-ahead holds (each read is a decoded clip: 200 MB at 49x480x720): with `threads`
    reads, no more than that many items past the one handed out are read; and a consumer that stops (an error,
    Ctrl-C) leaves no read to start afterwards, and no reading thread alive."""
    reads = Reads()
    reads.release.clear()  # every read stays under way until released
    steps = read_ahead(((k, True) for k in range(20)), reads, threads=2)
    item, _ = next(steps)
    assert item == 0 and reads.wait_for(1)
    time.sleep(0.2)
    assert sorted(reads.started) == [0, 1]  # 2 threads: item 0's read and item 1's; item 2 waits for a thread
    reads.release.set()
    item, future = next(steps)
    assert item == 1 and future.result(timeout=10) == "frames of 1"
    assert reads.wait_for(3)
    assert max(reads.started) == 3  # item 1 handed out: items 2 and 3 are read ahead, no further
    steps.close()
    started = len(reads.started)
    time.sleep(0.2)
    assert len(reads.started) == started
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("read-ahead")]


def test_an_error_of_the_items_comes_at_its_turn_after_the_items_before_it():
    """Guards an error in deciding the items (a clip file that cannot be hashed) ending the loop before the items
    ahead of it were used: they would then be encoded on the next run only. It is raised where its item would
    have come."""

    def items():
        yield 0, True
        yield 1, False
        raise OSError("clip_002.mp4 cannot be read")

    handed = []
    with pytest.raises(OSError, match="clip_002"):
        for item, future in read_ahead(items(), lambda item: item, threads=2):
            handed.append(item)
    assert handed == [0, 1]


def test_a_cpu_reads_in_turn_and_a_gpu_beside_up_to_four_readers(monkeypatch):
    """The reading threads: none on a CPU (the VAE takes every core there); beside a GPU a quarter of the cores this
    process may use (joblib's count: its affinity, capped by a container's CPU limit; test_curate checks a real
    affinity), shared among the launch's processes on the machine (8 GPU processes on 64 cores ran 4 decoders each,
    not 4 x 8 of the machine's `cpu_count` share), at least 1 and at most 4."""
    from trainer import read_ahead

    assert reading_threads("cpu") == 0
    for cores, local_processes, threads in [(2, None, 1), (8, None, 2), (16, "1", 4), (64, None, 4), (64, "8", 2),
                                            (32, "8", 1)]:
        monkeypatch.setattr(read_ahead, "cpu_count", lambda cores=cores: cores)
        if local_processes is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
        assert reading_threads("cuda:0") == threads, (cores, local_processes)


def test_a_stop_cancels_the_reads_not_started():
    """Guards a stop (an error, Ctrl-C) that still decoded every clip queued for reading before the command ended:
    with one thread busy on item 0 and item 1 queued, closing the loop runs item 0's read to its end and never
    starts item 1's."""
    reads = Reads()
    reads.release.clear()
    steps = read_ahead(((k, True) for k in range(5)), reads, threads=1)
    item, _ = next(steps)  # item 0 under way, item 1 queued behind it
    assert item == 0 and reads.wait_for(0)
    threading.Timer(0.3, reads.release.set).start()  # item 0's read ends after the close began
    steps.close()
    time.sleep(0.2)
    assert reads.started == [0]


def test_items_not_read_are_decided_a_bounded_way_ahead():
    """Guards a bar frozen while thousands of cached clips ahead were decided (each hashed again when the index
    lost it) before the next clip to read was found: items are decided at most AHEAD_ITEMS ahead of the one handed
    out."""
    from trainer.read_ahead import AHEAD_ITEMS

    decided = []

    def items():
        for k in range(1000):
            decided.append(k)
            yield k, k == 999  # only the last one is read

    steps = read_ahead(items(), lambda item: item, threads=2)
    assert next(steps) == (0, None)
    assert len(decided) <= AHEAD_ITEMS + 1
    assert [item for item, _ in steps][-1] == 999


def test_with_no_thread_each_item_is_read_when_handed_out_in_this_thread():
    """`threads` 0 (a CPU's): the loop as it was, each item read at its turn in the consumer's thread, its error
    raised by its Future."""
    reads, handed = [], []

    def read(item):
        reads.append((item, threading.current_thread() is threading.main_thread()))
        if item == 1:
            raise ValueError("item 1 cannot be read")
        return item * 10

    for item, future in read_ahead([(0, True), (1, True), (2, False), (3, True)], read, threads=0):
        assert [k for k, _ in reads] == [k for k in range(item + 1) if k != 2]  # nothing read ahead
        if future is None:
            handed.append((item, None))
        else:
            handed.append((item, future.exception().args[0] if future.exception() else future.result()))
    assert handed == [(0, 0), (1, "item 1 cannot be read"), (2, None), (3, 30)]
    assert all(in_main for _, in_main in reads)
