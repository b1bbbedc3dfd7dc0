"""SLAP_COMPILE_CACHE_DIR: replicas load the compiled transformer from a shared folder instead of compiling it,
swaps still never recompile, and a damaged or foreign folder never stops a start-up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from slapgen.errors import SettingsError
from slapgen.serving.settings import load_settings
from tests.conftest import REPO_ROOT, offline_env, start_server, stop_server

CACHE_LINE = "compile cache "  # the start of the one line the engine logs about the folder


def test_the_compile_cache_setting_is_a_writable_folder(monkeypatch, tmp_path):
    """Guards SLAP_COMPILE_CACHE_DIR being ignored, or a path that cannot hold the cache failing later inside
    torch's compile: a missing folder is made and reaches the engine's options; a file is one sentence."""
    monkeypatch.setenv("SLAP_DEVICE", "cpu")
    monkeypatch.setenv("SLAP_COMPILE", "1")
    monkeypatch.setenv("SLAP_COMPILE_CACHE_DIR", str(tmp_path / "volume" / "compile-cache"))
    settings = load_settings()
    assert settings.engine_options().compile_cache_dir == tmp_path / "volume" / "compile-cache"
    assert (tmp_path / "volume" / "compile-cache").is_dir()
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("SLAP_COMPILE_CACHE_DIR", str(tmp_path / "a-file"))
    with pytest.raises(SettingsError) as refused:
        load_settings()
    # not mkdir's "(File exists)", which a walk-through found confusing for a file
    assert str(refused.value) == f"invalid settings: SLAP_COMPILE_CACHE_DIR: {tmp_path / 'a-file'} is a file, not a folder."
    monkeypatch.delenv("SLAP_COMPILE_CACHE_DIR")
    assert load_settings().engine_options().compile_cache_dir is None  # unset: torch's own default folder


def test_reading_settings_without_compile_leaves_the_compile_cache_folder_alone(monkeypatch, tmp_path):
    """Guards reading the settings changing state: SLAP_COMPILE_CACHE_DIR was made (and a file written
    into it) by every load_settings(), also `slapgen campaign create` and servers that do not compile.
    With SLAP_COMPILE off a missing folder is not made, and nothing is written under tmp_path."""
    monkeypatch.setenv("SLAP_DEVICE", "cpu")
    monkeypatch.delenv("SLAP_COMPILE", raising=False)
    monkeypatch.setenv("SLAP_COMPILE_CACHE_DIR", str(tmp_path / "volume" / "compile-cache"))
    settings = load_settings()
    assert settings.compile_cache_dir == tmp_path / "volume" / "compile-cache"
    assert list(tmp_path.iterdir()) == []
    # ... and start-up says so (the fuzz's finding: a cache volume nothing writes looked like one that works).
    assert settings.ineffective() == [f"SLAP_COMPILE_CACHE_DIR={tmp_path / 'volume' / 'compile-cache'} is not used: "
                                      "nothing is compiled without SLAP_COMPILE=1"]
    monkeypatch.setenv("SLAP_COMPILE", "1")
    assert load_settings().ineffective() == []


# --- The fallback, on a small module compiled in fresh processes (seconds, not a whole model's compile) ---------

COMPILE_A_MODULE = r"""
import json, logging, sys
from pathlib import Path
import torch
from slapgen.engine.compiling import CompiledTransformer

if sys.argv[2] == "other-torch":  # what another torch version changes in every cache key: torch's own hash
    import torch._inductor.codecache as codecache
    codecache.torch_key = lambda: b"another torch build"
logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(name)s %(message)s")
holder = type("Holder", (), {})()
holder.transformer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
torch.manual_seed(0)
x = torch.randn(3, 8)
compiled = CompiledTransformer(Path(sys.argv[1]), scope="transformer")  # a plain module: no family, no blocks
compiled.compile(holder)
outputs = []
compiled.warm_up(holder, lambda: outputs.append(holder.transformer(x)))
compiled.mark_warm()
print(json.dumps({**compiled.cache.info(), "graphs": compiled.graphs,
                  "output_ok": torch.allclose(outputs[-1], holder.transformer._orig_mod(x), rtol=1e-4, atol=1e-5)}))
"""


# What every warm-up logs first, here of a plain module compiled whole
COMPILING_A_MODULE = ("LOG INFO slapgen.engine.compiling compiling the transformer (SLAP_COMPILE_SCOPE=transformer) in the "
                      "warm-up generations, or loading its graphs from SLAP_COMPILE_CACHE_DIR: seconds on the tiny models, "
                      "minutes for a full-size model on a GPU when nothing is cached")


def _start_script(script: str, tmp_path: Path, *args: str) -> subprocess.Popen:
    # TMPDIR stays the session's (tests/conftest.py): a fallback's private folder goes there, and so do inductor's
    # precompiled C++ headers, built once for the session instead of once per process (7 s each on 2 cores).
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT, env=offline_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _script_ended(started: subprocess.Popen) -> tuple[dict, str]:
    """The JSON a script printed last, and its stderr, once it ended well."""
    stdout, stderr = started.communicate(timeout=600)
    assert started.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def _start_compiling_a_module(cache_dir: Path, tmp_path: Path, mode: str = "plain") -> subprocess.Popen:
    return _start_script(COMPILE_A_MODULE, tmp_path, str(cache_dir), mode)


def _compiled_a_module(started: subprocess.Popen) -> tuple[dict, list[str]]:
    printed, stderr = _script_ended(started)
    lines = [line for line in stderr.splitlines() if line.startswith("LOG ")]
    assert lines[:1] == [COMPILING_A_MODULE], lines
    return printed, lines[1:]


def _compile_a_module(cache_dir: Path, tmp_path: Path, mode: str = "plain") -> tuple[dict, list[str]]:
    return _compiled_a_module(_start_compiling_a_module(cache_dir, tmp_path, mode))


# The tiny model's pipeline with its blocks compiled (regional compilation, the default scope) on a cache folder
COMPILE_THE_BLOCKS = r"""
import json, logging, sys
from pathlib import Path
import numpy as np, torch
from slapgen.engine.compiling import CompiledTransformer
from slapgen.engine.params import GenerationParams
from slapgen.models.family import family_of
from slapgen.models.loading import load_pipeline, resolve_model

logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(name)s %(message)s")
resolved = resolve_model("tiny", Path(sys.argv[2]))
pipeline = load_pipeline(resolved)
pipeline.set_progress_bar_config(disable=True)
params = GenerationParams.defaults_for(resolved.spec, num_inference_steps=2, seed=5)
generate = lambda: pipeline(**params.pipeline_arguments(), generator=torch.Generator().manual_seed(5),
                            output_type="np").frames[0]
eager = generate()
compiled = CompiledTransformer(Path(sys.argv[1]), scope="blocks")
compiled.compile(pipeline)
frames = []
compiled.warm_up(pipeline, lambda: frames.append(generate()))
compiled.mark_warm()
blocks = family_of(resolved.spec).transformer_blocks(pipeline.transformer)
print(json.dumps({**compiled.cache.info(), "graphs": compiled.graphs,
                  "compiled_blocks": sum(block._compiled_call_impl is not None for block in blocks),
                  "output_ok": bool(np.allclose(frames[-1], eager, atol=1e-4))}))
"""


def _start_compiling_the_blocks(cache_dir: Path, tiny_cache_dir: Path, tmp_path: Path) -> subprocess.Popen:
    return _start_script(COMPILE_THE_BLOCKS, tmp_path, str(cache_dir), str(tiny_cache_dir))


def _compiled_the_blocks(started: subprocess.Popen) -> dict:
    return _script_ended(started)[0]


def _garbled(paths) -> list[Path]:
    """The files `paths` names, each overwritten with garbage."""
    garbled = list(paths)
    for path in garbled:
        path.write_bytes(b"garbage")
    return garbled


def _end(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_a_damaged_or_foreign_cache_falls_back_to_compiling_in_one_log_line(tiny_cache_dir, tmp_path):
    """Guards a start-up that dies on a damaged compile cache: torch loads a cached kernel library as it finds it
    (garbage .so files made bentoml serve exit with C++ errors before the fallback). Every start here succeeds with
    the right output: the first fills the folder (one graph compiled), the second loads it, one with every kernel
    library overwritten falls back to a private folder, one with the FX graph entry overwritten compiles again
    (counted in the line instead of torch's traceback), and one as another torch build (a foreign cache: every key
    differs) compiles; each says so in one log line (two for the fallback).

    Also guards the fallback under regional compilation (the tiny pipeline, its blocks compiled): after
    `torch._dynamo.reset()` the blocks must be compiled again in place (a fallback that compiled the transformer
    whole, or left the blocks calling code built on the damaged folder, would crash or lose the scope). A start
    fills a folder; with every kernel library in it overwritten, the next falls back to a private folder, compiles
    the one graph again with every block compiled (and each block's row-major copy back in front: without it the
    first block's graph is compiled apart), and makes the uncompiled pipeline's frames.

    Starts on separate folders are independent, so they run at once (on 2 cores, one process's imports and
    tracing overlap another's compile)."""
    folder, blocks_folder = tmp_path / "compile-cache", tmp_path / "blocks-compile-cache"
    blocks_first = _start_compiling_the_blocks(blocks_folder, tiny_cache_dir, tmp_path)
    started = [blocks_first]
    try:
        first, first_log = _compile_a_module(folder, tmp_path)
        blocks = _compiled_the_blocks(blocks_first)

        # Copies of the first's folder, damaged or read as another torch's, taken before anything else reads it
        damaged = tmp_path / "damaged"
        shutil.copytree(folder, damaged)
        libraries = _garbled(damaged.rglob("*.so"))
        assert libraries
        unreadable = tmp_path / "unreadable"
        shutil.copytree(folder, unreadable)
        assert len(_garbled(path for path in (unreadable / "fxgraph").rglob("*") if path.is_file())) == 1
        foreign_folder = tmp_path / "foreign"
        shutil.copytree(folder, foreign_folder)
        assert _garbled(blocks_folder.rglob("*.so"))

        started = [_start_compiling_a_module(folder, tmp_path), _start_compiling_a_module(damaged, tmp_path),
                   _start_compiling_a_module(unreadable, tmp_path),
                   _start_compiling_a_module(foreign_folder, tmp_path, "other-torch"),
                   _start_compiling_the_blocks(blocks_folder, tiny_cache_dir, tmp_path)]
        (second, second_log), (third, third_log), (fourth, fourth_log), (foreign, foreign_log) = map(
            _compiled_a_module, started[:4])
        blocks_damaged = _compiled_the_blocks(started[4])
    finally:
        _end(started)

    assert (first["graphs_compiled"], first["graphs_from_cache"], first["fell_back"], first["output_ok"]) == (1, 0, None, True)
    assert first_log == [f"LOG INFO slapgen.engine.compiling compile cache {folder}: 0 of 1 graph loaded from it, 1 "
                         "compiled and stored (a new model, settings or torch version, or an empty folder)"]
    assert (second["graphs_compiled"], second["graphs_from_cache"], second["output_ok"]) == (0, 1, True)
    assert second["graphs"] == 1  # a graph loaded from the cache still goes through the counting backend
    assert second_log == [f"LOG INFO slapgen.engine.compiling compile cache {folder}: the 1 graph loaded from it, "
                          "nothing compiled"]

    assert third["output_ok"] is True and third["graphs_compiled"] >= 1 and third["fell_back"]
    assert len(third_log) == 2, third_log
    assert third_log[0].startswith(f"LOG WARNING slapgen.engine.compiling compile cache {damaged} cannot be used (")
    assert third_log[0].endswith("); compiling without it. Empty the folder to rebuild it.")
    assert third_log[1].startswith(f"LOG INFO slapgen.engine.compiling compile cache {damaged} was not used (")
    assert all(path.read_bytes() == b"garbage" for path in libraries)  # the private folder took the new code

    assert (fourth["graphs_compiled"], fourth["fell_back"], fourth["output_ok"]) == (1, None, True)
    # the line names the unreadable entry as the reason, not a new model or settings (a walk-through was misled)
    assert fourth_log == [f"LOG INFO slapgen.engine.compiling compile cache {unreadable}: 0 of 1 graph loaded from it, "
                          "1 compiled and stored (1 unreadable entry skipped)"]

    assert (foreign["graphs_compiled"], foreign["graphs_from_cache"], foreign["fell_back"], foreign["output_ok"]) == (
        1, 0, None, True)
    assert foreign_log == [line.replace(str(folder), str(foreign_folder)) for line in first_log]

    # regional compilation: the blocks' first start, then its fallback from the damaged folder
    assert (blocks["graphs_compiled"], blocks["fell_back"], blocks["compiled_blocks"], blocks["output_ok"]) == (1, None, 2, True)
    assert blocks_damaged["fell_back"] and blocks_damaged["graphs_compiled"] == 1 and blocks_damaged["compiled_blocks"] == 2
    assert blocks_damaged["output_ok"] is True


# --- The real service, started twice on one folder -------------------------------------------------------------

def _generate(server, adapter: str | None) -> np.ndarray:
    from slapgen.video import read_mp4

    body = {"prompt": "Power slap: the striker winds up and the palm strikes the cheek.", "seed": 3}
    if adapter:
        body["adapter"] = adapter
    response = httpx.post(f"{server.url}/generate", json=body, timeout=600)
    assert response.status_code == 200, response.text
    path = server.log_path.with_name(f"{adapter or 'base'}-{server.url.rsplit(':', 1)[1]}.mp4")
    path.write_bytes(response.content)
    return read_mp4(path)[0]


def _cache_lines(server) -> list[str]:
    return [line[line.index(CACHE_LINE):] for line in server.log_path.read_text(errors="replace").splitlines()
            if CACHE_LINE in line]


COMPILING_LINE = ("compiling the transformer (SLAP_COMPILE_SCOPE=blocks) in the warm-up generations, or loading its graphs "
                  "from SLAP_COMPILE_CACHE_DIR: seconds on the tiny models, minutes for a full-size model on a GPU when "
                  "nothing is cached")


def _said_before_the_cache_line(server) -> bool:
    """Whether the log says, before the compile (silent, minutes on 5B), what start-up is waiting for."""
    lines = server.log_path.read_text(errors="replace").splitlines()
    said = [index for index, line in enumerate(lines) if line.endswith(COMPILING_LINE)]
    cache = [index for index, line in enumerate(lines) if CACHE_LINE in line]
    return len(said) == 1 and len(cache) == 1 and said[0] < cache[0]


@pytest.mark.slow
def test_a_second_replica_loads_the_compiled_transformer_from_the_shared_cache(tiny_cache_dir, adapter_files, tmp_path):
    """Guards SLAP_COMPILE_CACHE_DIR not reaching torch (a replica compiling from scratch on a warm volume) and a
    cached graph that escapes the recompilation count: two `bentoml serve` with SLAP_COMPILE=1 on one folder; the
    first compiles every graph and stores it, the second loads all of them and compiles none (inductor's FX graph
    cache counters, in /info and one log line, after one that says a compile is under way: a cold start was silent
    for its whole compile), still counts them as graphs, and swapping adapters on it
    recompiles nothing and changes the video as on the first."""
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name in ("a", "b"):
        shutil.copy(adapter_files[name], adapters / f"{name}.safetensors")
    compile_cache = tmp_path / "shared-volume" / "compile-cache"
    infos, frames = [], []
    for replica in ("first", "second"):
        folder = tmp_path / replica
        folder.mkdir()
        server = start_server(folder, startup_timeout_s=1200, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir),
                              SLAP_DEVICE="cpu", SLAP_QUANT="none", SLAP_COMPILE="1", SLAP_MAX_LORA_RANK="8",
                              SLAP_ADAPTERS_DIR=str(adapters), SLAP_COMPILE_CACHE_DIR=str(compile_cache))
        try:
            frames.append({adapter: _generate(server, adapter) for adapter in ("a", "b", None, "a")})
            infos.append(httpx.get(f"{server.url}/info", timeout=30).json())
            lines = _cache_lines(server)
            assert _said_before_the_cache_line(server), server.log_tail()
        finally:
            stop_server(server)
        cache = infos[-1]["compile_cache"]
        if replica == "first":
            compiled = cache["graphs_compiled"]
            assert compiled >= 1 and cache["graphs_from_cache"] == 0 and cache["fell_back"] is None
            graphs = f"{compiled} graph" if compiled == 1 else f"{compiled} graphs"  # 1 with regional compilation
            assert lines == [f"compile cache {compile_cache}: 0 of {graphs} loaded from it, {compiled} compiled "
                             "and stored (a new model, settings or torch version, or an empty folder)"]
            assert any((compile_cache / "fxgraph").iterdir())  # what the second replica reads
        else:
            assert (cache["graphs_from_cache"], cache["graphs_compiled"], cache["fell_back"]) == (compiled, 0, None)
            assert lines == [f"compile cache {compile_cache}: {'the' if compiled == 1 else 'all'} {graphs} loaded from "
                             "it, nothing compiled"]
        info = infos[-1]
        assert info["compiled"] is True and info["recompilations"] == 0 and info["adapter_swaps"] == 3
    for first, second in zip(frames[0].values(), frames[1].values()):
        assert np.array_equal(first, second)  # the cached code computes what the compiled code computed
    assert not np.array_equal(frames[1]["a"], frames[1]["b"]) and not np.array_equal(frames[1]["a"], frames[1][None])
