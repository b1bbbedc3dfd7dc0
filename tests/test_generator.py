"""The generator's queue: first come first served, and adapters never change mid-generation."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from slapgen.engine.generator import FifoLock, VideoGenerator
from slapgen.models.loading import resolve_model
from slapgen.engine.params import EngineOptions, GenerationParams


def test_fifo_lock_serves_in_arrival_order():
    lock, order = FifoLock(), []
    lock.__enter__()  # held, so every thread below queues

    def worker(index):
        with lock:
            order.append(index)

    threads = []
    for index in range(6):
        threads.append(threading.Thread(target=worker, args=(index,)))
        threads[-1].start()
        while lock.waiting < index + 1:  # the thread took its ticket
            time.sleep(0.001)
    assert lock.waiting == 6
    lock.__exit__(None, None, None)
    for thread in threads:
        thread.join(timeout=10)
    assert order == list(range(6)) and lock.waiting == 0


def test_concurrent_requests_for_different_adapters_match_serial_results(tiny_cache_dir, adapter_files, tmp_path):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name in ("a", "b"):
        shutil.copy(adapter_files[name], adapters / f"{name}.safetensors")
    generator = VideoGenerator.load(resolve_model("tiny", tiny_cache_dir), EngineOptions(adapters_dir=adapters, max_lora_rank=8))
    params = GenerationParams.defaults_for(generator.spec, seed=5)
    serial = {name: generator.generate_frames(params.replace(adapter=name)) for name in ("a", "b", None)}
    swaps_before = generator.slot.swaps
    requests = ["a", "b", None, "a", "a", "b", None, "b"]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(lambda name: generator.generate_frames(params.replace(adapter=name)), requests))
    for name, frames in zip(requests, results):
        assert np.array_equal(frames, serial[name]), name
    assert generator.slot.swaps - swaps_before <= len(requests)  # at most one swap per request
    assert generator.queue_length == 0


def test_a_bad_file_in_the_adapter_folder_is_an_adapter_error_not_a_crash(tiny_cache_dir, tmp_path):
    import pytest

    from slapgen.errors import AdapterError

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "broken.safetensors").write_bytes(b"copied by hand, half-written")
    generator = VideoGenerator.load(resolve_model("tiny", tiny_cache_dir), EngineOptions(adapters_dir=adapters))
    [described] = generator.adapters.describe()
    assert described["name"] == "broken" and "not a readable safetensors" in described["error"]
    with pytest.raises(AdapterError) as error:
        generator.generate_frames(GenerationParams.defaults_for(generator.spec, adapter="broken"))
    assert error.value.field == "adapter" and "not a readable safetensors" in str(error.value)
    assert generator.generate_frames(GenerationParams.defaults_for(generator.spec)).shape[0] == generator.spec.default_num_frames
