"""`torch.compile` of the transformer, counting how often it compiles after warm-up.

Compilation goes through inductor behind a thin backend that counts graphs. Every graph compiled
after `mark_warm()` is a recompilation: a request that made dynamo's guards fail (a new shape, a
changed attribute). Hot-swapping adapters must keep this at zero; `GET /info` reports it.
"""

from __future__ import annotations

import threading

import torch


class CompiledTransformer:
    def __init__(self) -> None:
        self.graphs = 0
        self._warm_at: int | None = None
        self._lock = threading.Lock()

    def _backend(self, graph_module, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        with self._lock:
            self.graphs += 1
        return compile_fx(graph_module, example_inputs)

    def compile(self, pipeline) -> None:
        pipeline.transformer = torch.compile(pipeline.transformer, backend=self._backend, fullgraph=False)

    def mark_warm(self) -> None:
        self._warm_at = self.graphs

    @property
    def recompilations(self) -> int:
        return 0 if self._warm_at is None else self.graphs - self._warm_at
