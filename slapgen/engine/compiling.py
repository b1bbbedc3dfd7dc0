"""`torch.compile` of the transformer, counting how often it compiles after warm-up, and the compile cache.

`SLAP_COMPILE_SCOPE` says what is compiled. `blocks` (the default) is regional compilation (PyTorch's
"Reducing torch.compile cold start compilation time with regional compilation" recipe; diffusers'
`compile_repeated_blocks` does the same for the models that list their block class): each of the family's
repeated blocks (`ModelFamily.transformer_blocks`) is compiled in place, and since torch inlines a module's
parameters as graph inputs, every block runs the one compiled code: without a step cache each family compiles
1 graph however deep it is (a step cache's hooks add a few, also the same at any depth); the embeddings and the
output layers stay eager. A block's tensor arguments are copied to row-major strides before its compiled call,
outside the compiled code (`_with_row_major_tensors`): CogVideoX's first block gets strided slices of the
concatenated text and video tokens, and dynamo, which guards on strides, compiled a second graph for it alone (a
second dynamo trace and inductor compile on a cold start, a second trace and cache load on a warm one). The copy
is a read and a write of the first block's tokens at each transformer call; the later blocks get their
predecessor's fresh output, passed as it is. `transformer` compiles the whole module: one graph per model, whose
compile time (and, warm, whose tracing) grows with the number of blocks: minutes for CogVideoX-5B's 42
(bench/README.md).

Compilation goes through inductor behind a thin backend that counts graphs. Every graph compiled
after `mark_warm()` is a recompilation: a request that made dynamo's guards fail (a new shape, a
changed attribute). Hot-swapping adapters must keep this at zero; `GET /info` reports it.

The backend compiles with ATen's matrix-multiply kernels only (`gemm_backends`). inductor lowers
`torch._scaled_mm`, fp8's matmul, to Triton templates it autotunes even outside max-autotune
(`use_triton_template(..., check_max_autotune=False)` in torch/_inductor/kernel/mm.py; int8's `_int_mm` too):
every fp8 GEMM shape compiles and benchmarks a set of Triton kernels before the first step. On an H200
(torch 2.11, torchao 0.18) one fp8 CogVideoX-5B block's graph took about 210 s to compile where bf16's two
graphs for 14 blocks (before the row-major copy above) took 19.6 s. `mm` and `addmm` (CogVideoX's and Wan's
compiled blocks hold `addmm` only) use Triton templates only under max-autotune, which slapgen never turns on,
and a CPU has no Triton templates, so for them nothing changes; `bmm` / `baddbmm`, autotuned like `_scaled_mm`,
would lose it too. The setting is part of inductor's cache key, so a compile-cache folder filled before it misses
once.

`SLAP_COMPILE_CACHE_DIR` (`CompileCache`) becomes inductor's own on-disk cache folder
(`TORCHINDUCTOR_CACHE_DIR`): the AOTAutograd and FX graph caches, the compiled C++ / Triton kernels and
autotuning results, keyed by the graph, the shapes, the inductor config, the device and torch's version,
so another model or another torch simply misses. torch writes every entry to a hidden file and renames it
into place (and builds each C++ kernel library under a file lock in the folder), so replicas that start at
once can share it; each of them compiles what it does not find yet. The backend still sees every graph (a
cache hit is found inside `compile_fx`), so the count above holds with a warm cache. What torch does not
survive is a damaged kernel library in the folder (it loads the file as it finds it): any failure of the
warm-up with the shared folder falls back to compiling in a private folder, said in one log line.

What a warm start still spends (tiny model, 2-core CPU, profiled in one process, the whole transformer
compiled): about 5 s of dynamo tracing the transformer again and 5 s of loading the cached module, then the
warm-up generation itself; `bentoml serve`'s two Python processes importing torch, diffusers and bentoml cost more than all of it.
torch 2.13 has no cache for dynamo's tracing of a module compiled with graph breaks allowed:
`torch.compiler.save_cache_artifacts` holds the same inductor / AOTAutograd entries as this folder (a
blob for a database instead of a volume), and `torch._dynamo.config.caching_precompile` (experimental)
did not reuse its entries with this counting backend (a warm start traced again, and AOTAutograd missed),
and it drops dynamo's identity guards (ID_MATCH), which nothing here has shown a hot swap can do without.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from slapgen.engine.params import CompileScope
from slapgen.models.family import family_of_transformer

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)  # the compile cache's one line belongs in a server's start-up log (BentoML's root: WARNING)
# torch's loggers that report a cache entry they could not unpickle (a warning with a traceback each).
CACHE_LOGGERS = ("torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache")


class _UnreadableEntries(logging.Filter):
    """Counts torch's 'unable to load' warnings and keeps their tracebacks out of the log: the compile
    cache's own line says how many entries were skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "unable to load" in str(record.msg):
            self.count += 1
            return False
        return True


class CompileCache:
    """`SLAP_COMPILE_CACHE_DIR` as inductor's cache folder, and what the warm-up found in it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.from_cache = 0  # graphs whose compiled code came from the folder
        self.compiled = 0  # graphs compiled here (and stored in the folder)
        self.unreadable = 0  # entries torch could not read (skipped, compiled again)
        self.fell_back: str | None = None  # why the folder was abandoned for a private one

    def use(self) -> None:
        self._point_inductor_at(self.folder)

    @staticmethod
    def _point_inductor_at(folder: Path) -> None:
        from torch._inductor import utils

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        # inductor memoises paths under the folder (the lock folder, the C++ prefix header); older torch (the GPU
        # machine's 2.11) may only have the function's former name.
        (getattr(utils, "clear_caches", None) or utils.clear_inductor_caches)()

    def abandon(self, error: BaseException) -> None:
        """Compile in a private folder from now on (the shared one made the compile fail)."""
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        self.fell_back = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
        private = Path(tempfile.mkdtemp(prefix="slapgen-inductor-"))
        # A full inductor cache per fallback start would pile up in a container's /tmp: removed at exit.
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        self._point_inductor_at(private)
        log.warning("compile cache %s cannot be used (%s); compiling without it. Empty the folder to rebuild it.",
                    self.folder, self.fell_back)

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Adds the FX graph cache's hits and misses during the block (inductor's own counters)."""
        from torch._dynamo.utils import counters

        before = dict(counters["inductor"])
        unreadable = _UnreadableEntries()
        loggers = [logging.getLogger(name) for name in CACHE_LOGGERS]
        for logger in loggers:
            logger.addFilter(unreadable)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(unreadable)
            after = counters["inductor"]
            self.from_cache += after["fxgraph_cache_hit"] - before.get("fxgraph_cache_hit", 0)
            self.compiled += sum(after[k] - before.get(k, 0) for k in ("fxgraph_cache_miss", "fxgraph_cache_bypass"))
            self.unreadable += unreadable.count

    def summary(self) -> str:
        """The one log line of a start-up: what came from the folder, what was compiled."""
        total = self.from_cache + self.compiled
        where = f"compile cache {self.folder}"
        if self.fell_back:
            return f"{where} was not used ({self.fell_back}); {_graphs(self.compiled)} compiled in a private folder"
        skipped = f"{self.unreadable} unreadable {'entry' if self.unreadable == 1 else 'entries'} skipped"
        if self.compiled == 0:
            return f"{where}: {'the' if total == 1 else 'all'} {_graphs(total)} loaded from it, nothing compiled" + (
                f"; {skipped}" if self.unreadable else "")
        # why they were compiled: entries torch could not read, and for the rest none (the usual misses)
        why = "a new model, settings or torch version, or an empty folder"
        if self.unreadable:
            why = skipped if self.compiled <= self.unreadable else f"{skipped}; the others: {why}"
        return f"{where}: {self.from_cache} of {_graphs(total)} loaded from it, {self.compiled} compiled and stored ({why})"

    def info(self) -> dict:
        return {"dir": str(self.folder), "graphs_from_cache": self.from_cache, "graphs_compiled": self.compiled,
                "unreadable_entries": self.unreadable, "fell_back": self.fell_back}


def _graphs(count: int) -> str:
    return f"{count} graph" if count == 1 else f"{count} graphs"


def gemm_backends() -> str:
    """inductor's `max_autotune_gemm_backends` for slapgen's compiles: ATen only (cuBLAS / CUTLASS, no start-up
    autotuning; see above), unless TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS asks for others (`ATEN,TRITON` lets
    inductor autotune fp8 GEMMs again: Triton kernels compiled and timed for each new shape, for whatever step
    time the tuning finds)."""
    return os.environ.get("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS") or "ATEN"


class CompiledTransformer:
    def __init__(self, cache_dir: Path | None = None, *, scope: CompileScope) -> None:
        self.graphs = 0
        self.scope = scope
        self.cache = CompileCache(cache_dir) if cache_dir is not None else None
        self._warm_at: int | None = None
        self._lock = threading.Lock()
        self._eager = None

    def _backend(self, graph_module, example_inputs):
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        with self._lock:
            self.graphs += 1
        with inductor_config.patch(max_autotune_gemm_backends=gemm_backends()):
            return compile_fx(graph_module, example_inputs)

    def compile(self, pipeline) -> None:
        if self.cache is not None:
            self.cache.use()
        self._eager = pipeline.transformer
        self._wrap(pipeline)

    def _wrap(self, pipeline) -> None:
        if self.scope == "transformer":
            pipeline.transformer = torch.compile(self._eager, backend=self._backend, fullgraph=False)
            return
        # `nn.Module.compile` compiles in place (again after a fallback's reset): the transformer, its hooks and
        # its LoRA slot stay the same objects, only the blocks' calls go through dynamo.
        for block in family_of_transformer(self._eager).transformer_blocks(self._eager):
            block.compile(backend=self._backend, fullgraph=False)
            # `Module.compile` keeps the compiled call where `__call__` finds it; the copy goes in front, eager.
            block._compiled_call_impl = functools.partial(_with_row_major_tensors, block._compiled_call_impl)

    def warm_up(self, pipeline, run: Callable[[], object]) -> None:
        """`run()` (the warm-up generations, which compile); with a compile cache, counted, and on any failure
        with the shared folder run again compiling in a private one (`CompileCache.abandon`)."""
        # The compile is silent and a cold one takes minutes on 5B: say what start-up is waiting for.
        log.info("compiling the transformer (SLAP_COMPILE_SCOPE=%s) in the warm-up generations%s: seconds on the tiny "
                 "models, minutes for a full-size model on a GPU when nothing is cached", self.scope,
                 ", or loading its graphs from SLAP_COMPILE_CACHE_DIR" if self.cache is not None else "")
        if self.cache is None:
            run()
            return
        try:
            with self.cache.counting():
                run()
        except Exception as error:  # a damaged cache entry fails in many ways (a C++ or import error, a bad ELF)
            self.cache.abandon(error)
            torch._dynamo.reset()  # forget the graphs and guards built on the shared folder's code
            self._wrap(pipeline)
            with self.cache.counting():
                run()
        log.info(self.cache.summary())

    def mark_warm(self) -> None:
        self._warm_at = self.graphs

    @property
    def recompilations(self) -> int:
        return 0 if self._warm_at is None else self.graphs - self._warm_at


def row_major_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a freshly allocated tensor of `shape` (C order)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _row_major(value):
    """A tensor at row-major strides (a copy only if it is not there); anything else as it is. Not `contiguous()`:
    with a batch of 1 (no classifier-free guidance) a slice of the tokens counts as contiguous, its batch stride
    being ignored, yet dynamo guards on that stride too."""
    if isinstance(value, torch.Tensor) and value.stride() != row_major_strides(value.shape):
        return value.clone(memory_format=torch.contiguous_format)
    return value


def _with_row_major_tensors(compiled_call, /, *args, **kwargs):
    """`compiled_call` with its tensor arguments at row-major strides, so every block's call meets the same
    strides."""
    return compiled_call(*map(_row_major, args), **{name: _row_major(value) for name, value in kwargs.items()})
