"""The generator's queue: first come first served, and adapters never change mid-generation."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from slapgen.engine.generator import VideoGenerator
from slapgen.engine.queue import GenerationQueue
from slapgen.errors import QueueFullError
from slapgen.models.loading import resolve_model
from slapgen.engine.params import EngineOptions, GenerationParams


def test_the_queue_serves_in_arrival_order():
    queue, order = GenerationQueue(), []
    first = queue.admit()
    holding = queue.turn(first)
    holding.__enter__()  # held, so every thread below waits

    def worker(index):
        admission = queue.admit()
        with queue.turn(admission):
            order.append(index)
        admission.release()

    threads = []
    for index in range(6):
        threads.append(threading.Thread(target=worker, args=(index,)))
        threads[-1].start()
        while len(queue._waiting) < index + 1:  # the thread is in line
            time.sleep(0.001)
    assert queue.waiting == 6
    holding.__exit__(None, None, None)
    first.release()
    for thread in threads:
        thread.join(timeout=10)
    assert order == list(range(6)) and queue.waiting == 0 and queue.admitted == 0


def test_the_queue_reports_every_change_of_the_places_taken():
    """Guards the load gauge a deployment scales on (slapgen_generations_in_flight) lagging the queue or drifting:
    the watcher hears the count when it starts watching and after each admission and release, a refused
    admission and a second release of one place report nothing, and the last number heard is the places taken."""
    queue, heard = GenerationQueue(limit=2), []
    early = queue.admit()  # taken before anyone watches: the first report counts it
    queue.watch(heard.append)
    late = queue.admit()
    with pytest.raises(QueueFullError):
        queue.admit()
    with queue.turn(late):  # taking the model is not a change of places
        pass
    late.release()
    late.release()
    early.release()
    assert heard == [1, 2, 1, 0]
    assert heard[-1] == queue.admitted


def test_a_watcher_that_fails_costs_no_place(caplog):
    """Guards the load gauge breaking the queue: a watcher that raises (a full metrics disk) made `admit` raise
    after taking the place, which then leaked for good (the caller never got the admission to release), and a
    release raise in the `finally` that ends a generation, hiding why it ended. The queue logs and goes on."""
    queue = GenerationQueue(limit=1)

    def failing(count: int) -> None:
        raise OSError("No space left on device")

    queue.watch(failing)
    admission = queue.admit()
    assert queue.admitted == 1
    admission.release()
    assert queue.admitted == 0
    queue.admit().release()  # the one place came back
    assert "reporting the generation queue's length failed" in caplog.text


def test_one_client_holds_at_most_its_share_of_the_queue():
    """Guards one client taking every place (a script submitting jobs in a loop) so that every other client got a
    429: with `per_client` 2 of 4 places, a client's third admission is refused with the sentence why, other
    clients and unnamed callers (the CLI's) are admitted, a released place (a double release counts once) is the
    client's again, and a client that holds nothing is forgotten."""
    queue = GenerationQueue(limit=4, per_client=2)
    first, second = queue.admit(client="a"), queue.admit(client="a")
    with pytest.raises(QueueFullError) as refused:
        queue.admit(retry_after=7, client="a")
    assert str(refused.value) == ("this client already holds 2 generations running or waiting, the most one client "
                                  "may hold here; try again when one ends")
    assert refused.value.retry_after == 7 and queue.admitted == 2  # the refusal took no place
    other, unnamed = queue.admit(client="b"), queue.admit()
    assert queue.admitted == 4
    with pytest.raises(QueueFullError, match="4 generations are running or waiting"):  # the whole queue first
        queue.admit(client="c")
    second.release()
    second.release()
    again = queue.admit(client="a")
    unnamed.release()  # a place free: what refuses a now is its share
    with pytest.raises(QueueFullError, match="already holds 2"):
        queue.admit(client="a")
    for admission in (first, again, other):
        admission.release()
    assert queue.admitted == 0 and not queue._held_by
    without = GenerationQueue(limit=3)  # no per-client limit: one client may take every place
    assert [without.admit(client="a") for _ in range(3)] and without.admitted == 3


def test_a_submit_cancelled_while_its_place_is_taken_gives_the_place_back():
    """Guards a place lost for good: a submit cancelled (its client gone, a timeout) while a worker thread takes its
    queue place left the thread's admission to nobody, so the queue had one place fewer until a restart, and with
    SLAP_MAX_QUEUE_PER_CLIENT its client one of its own: after `per_client` such losses it got 429 for good."""
    import asyncio

    from starlette.concurrency import run_in_threadpool

    from slapgen.serving.job_routes import _taken_even_if_cancelled

    queue, taking, taken = GenerationQueue(limit=2, per_client=1), threading.Event(), threading.Event()

    def slow_admit():
        taking.wait(10)  # the thread takes the place only once the submit has been cancelled
        admission = queue.admit(client="a")
        taken.set()
        return admission

    async def submit_cancelled():
        submit = asyncio.ensure_future(_taken_even_if_cancelled(run_in_threadpool(slow_admit)))
        await asyncio.sleep(0.05)
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
        taking.set()
        # The place is taken first (before, the queue read empty and this returned before the thread took it)...
        assert await asyncio.to_thread(taken.wait, 30)
        for _ in range(3000):  # ... then released, once the loop hears the thread is done
            if queue.admitted == 0 and not queue._held_by:
                return
            await asyncio.sleep(0.01)

    asyncio.run(submit_cancelled())
    assert queue.admitted == 0 and not queue._held_by
    queue.admit(client="a").release()  # the client's one place is its own again


def test_the_per_client_settings_reach_the_engine_and_unused_ones_are_said(monkeypatch):
    """Guards SLAP_MAX_QUEUE_PER_CLIENT not reaching the engine, a header name no request could carry accepted, and
    settings that change nothing passing silently: a share not below SLAP_MAX_QUEUE, a header without a share."""
    from slapgen.errors import SettingsError
    from slapgen.serving.settings import load_settings

    monkeypatch.setenv("SLAP_DEVICE", "cpu")
    monkeypatch.setenv("SLAP_MAX_QUEUE", "8")
    monkeypatch.setenv("SLAP_MAX_QUEUE_PER_CLIENT", "2")
    monkeypatch.setenv("SLAP_CLIENT_HEADER", "X-Real-IP")
    settings = load_settings()
    assert (settings.engine_options().max_queue, settings.engine_options().max_queue_per_client) == (8, 2)
    assert settings.ineffective() == []
    monkeypatch.setenv("SLAP_MAX_QUEUE_PER_CLIENT", "8")
    assert load_settings().ineffective() == ["SLAP_MAX_QUEUE_PER_CLIENT=8 is not used: it is not below "
                                             "SLAP_MAX_QUEUE=8, which every client shares"]
    monkeypatch.delenv("SLAP_MAX_QUEUE_PER_CLIENT")
    assert load_settings().ineffective() == ["SLAP_CLIENT_HEADER=X-Real-IP is not used: it tells clients apart for "
                                             "SLAP_MAX_QUEUE_PER_CLIENT, which is unset"]
    assert load_settings().engine_options().max_queue_per_client is None
    monkeypatch.setenv("SLAP_CLIENT_HEADER", "X Real IP")
    with pytest.raises(SettingsError, match="SLAP_CLIENT_HEADER"):
        load_settings()


@pytest.mark.parametrize("header, headers, peer, client", [
    (None, {}, ("10.0.0.5", 4000), "address:10.0.0.5"),
    (None, {"X-Real-IP": "1.2.3.4"}, ("10.0.0.5", 4000), "address:10.0.0.5"),  # a header nobody named counts for nothing
    ("X-Real-IP", {"X-Real-IP": " 1.2.3.4 "}, ("10.0.0.5", 4000), "x-real-ip:1.2.3.4"),
    ("X-Forwarded-For", {"X-Forwarded-For": "6.6.6.6, 1.2.3.4"}, ("10.0.0.5", 4000), "x-forwarded-for:1.2.3.4"),
    ("X-Forwarded-For", {"X-Forwarded-For": "1.2.3.4,"}, ("10.0.0.5", 4000), "address:10.0.0.5"),
    # the client's own line first, then the one its proxy added (HAProxy's `option forwardfor`): the proxy's counts
    ("X-Forwarded-For", [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "1.2.3.4")], None, "x-forwarded-for:1.2.3.4"),
    ("X-Real-IP", {}, ("10.0.0.5", 4000), "address:10.0.0.5"),
    ("X-Real-IP", {}, None, "unknown"),
    ("X-Client", {"X-Client": "x" * 5000}, None, "x-client:" + "x" * 200),
])
def test_a_client_is_named_by_the_proxys_header_else_its_address(header, headers, peer, client):
    """Guards the per-client share being evaded or misapplied: behind a proxy every request has the proxy's address,
    so SLAP_CLIENT_HEADER names the client; of a list (X-Forwarded-For), in one line or several, only the last entry,
    the one the proxy added, counts (the entries before it are the client's to forge); without the header, the address; a huge value is cut,
    never a key of any size; a header's value never equals an address's."""
    from slapgen.serving.clients import client_of

    lines = headers.items() if isinstance(headers, dict) else headers
    scope = {"type": "http", "headers": [(key.lower().encode(), value.encode()) for key, value in lines], "client": peer}
    assert client_of(scope, header) == client


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


def test_the_engine_has_no_adapters_folder_of_its_own():
    """Guards EngineOptions' relative default `Path("adapters")`: an engine built without a folder (test_cancel's)
    made an `adapters/` folder wherever the process ran, the repository's root under pytest. The folder is a
    required option; the service passes SLAP_ADAPTERS_DIR (default SLAP_CACHE_DIR/adapters)."""
    import pytest

    with pytest.raises(TypeError, match="adapters_dir"):
        EngineOptions(max_lora_rank=8)


def test_start_up_phases_are_timed_each_under_its_own_name(tiny_cache_dir, tmp_path, monkeypatch):
    """Guards `GET /info`'s `startup_s`, which says where a replica's slow start went: a phase timed under another's
    name, or left out. Every phase is made slower by its own known sleep; each must report at least its own (two
    labels swapped give the longer sleep's label the shorter one), and all of them together no more than the
    whole load took (the phases do not overlap)."""
    from slapgen.engine import generator as generator_module

    def slower(function, seconds):
        def wrapped(*args, **kwargs):
            time.sleep(seconds)
            return function(*args, **kwargs)
        return wrapped

    sleeps = {"load_pipeline": 0.1, "lora_slot": 0.25, "to_device": 0.2, "quantize": 0.3, "attention_and_cache": 0.15}
    for called, phase in [("load_pipeline", "load_pipeline"), ("LoraSlot", "lora_slot"), ("place_pipeline", "to_device"),
                          ("quantize_transformer", "quantize"), ("apply_attention", "attention_and_cache")]:
        monkeypatch.setattr(generator_module, called, slower(getattr(generator_module, called), sleeps[phase]))
    started = time.perf_counter()
    generator = VideoGenerator.load(resolve_model("tiny", tiny_cache_dir),
                                    EngineOptions(adapters_dir=tmp_path / "adapters", max_lora_rank=4))
    whole = time.perf_counter() - started
    phases = generator.info()["startup_s"]
    # no compile, so no warm-up (tests/test_regional_compile.py sees `compile_and_warm_up` after them)
    assert list(phases) == list(sleeps)
    assert all(phases[phase] >= sleep for phase, sleep in sleeps.items()), phases
    assert sum(phases.values()) <= whole + 0.005  # each rounded to the millisecond


def test_the_warm_up_times_its_decodes_from_the_end_of_the_last_denoising_step(tiny_cache_dir, tmp_path):
    """Guards `startup_s`'s `warm_up_decode` (what the warm-up spends in the VAE after denoising, reported apart
    from the compile): timed from the generation's start, or from the end of a step before the last, it would hold
    denoising too. Each denoising step is made 1.5 s slower and each VAE decode 0.3 s: the decode seconds must hold
    every decode's time and none of a step's (the tiny VAE's own decode took 0.14-0.2 s on 2 cores, 1.5 s on a loaded
    machine: the bound is the decodes' measured time, not a constant)."""
    generator = VideoGenerator.load(resolve_model("tiny", tiny_cache_dir),
                                    EngineOptions(adapters_dir=tmp_path / "adapters", max_lora_rank=4))
    pipeline = generator.pipeline
    generations = generator.step_cache.warm_up_steps(generator.spec.default_num_inference_steps)
    decode, step = pipeline.vae.decode, pipeline.scheduler.step
    decoding = []  # each decode's whole time, its sleep included: on a loaded machine the VAE alone took 1.5 s

    def slow_decode(*args, **kwargs):
        began = time.perf_counter()
        time.sleep(0.3)
        try:
            return decode(*args, **kwargs)
        finally:
            decoding.append(time.perf_counter() - began)

    def slow_step(*args, **kwargs):
        time.sleep(1.5)
        return step(*args, **kwargs)

    pipeline.vae.decode, pipeline.scheduler.step = slow_decode, slow_step
    started = time.perf_counter()
    decode_s = generator.warm_up()
    whole = time.perf_counter() - started
    assert generations == [2]  # no step cache: one short generation
    assert len(decoding) == 1 and sum(decoding) <= decode_s < sum(decoding) + 1.5, (decode_s, decoding)  # no step's
    assert whole >= decode_s + 2 * 1.5
