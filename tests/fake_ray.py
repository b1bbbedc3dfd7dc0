"""A stand-in for the few `ray` calls the cluster paths make (`ray.init`, `ray.shutdown`, `ray.nodes`,
`ray.remote(...)(f).options(...).remote(...)`, `ray.wait`, `ray.get`, `ray.cancel`), for unit tests of what the
driver plans and how it waits, where a real cluster would be too slow or cannot be put in the state (a node that
never joins, the only GPU node dead). Nothing runs: a test says, per tick, which nodes are alive and when the
submitted tasks end. The real cluster paths are tested end to end in test_sweep_ray.py and test_eval_ray.py."""

from __future__ import annotations

import types
from collections.abc import Callable


class FakeRay:
    def __init__(self, nodes: list[dict], on_wait: Callable[[FakeRay], bool] | None = None,
                 interval_s: float = 1.0) -> None:
        """`nodes`: what `ray.nodes()` answers (the test may change it); `on_wait(self)` is called at each
        `ray.wait` and says whether every task has ended by then (default: at once). Each wait advances `now`
        (the fake clock) by `interval_s`."""
        self._nodes = nodes
        self.on_wait = on_wait or (lambda ray: True)
        self.interval_s = interval_s
        self.now = 0.0
        self.waits = 0
        self.submitted: list[tuple[dict, tuple]] = []  # (the task's options, its arguments), in submission order
        self.canceled: list[object] = []
        self.exceptions = types.SimpleNamespace(RayError=RuntimeError)

    def init(self, **_options) -> None:  # `ray_cluster.connect`: nothing to start
        pass

    def shutdown(self) -> None:
        pass

    def nodes(self) -> list[dict]:
        return self._nodes

    def clock(self) -> float:
        return self.now

    def remote(self, **_decorator_options):
        fake = self

        class Task:
            def options(self, **options):
                class Call:
                    def remote(self, *args):
                        fake.submitted.append((options, args))
                        return f"ref {len(fake.submitted) - 1}"
                return Call()
        return lambda function: Task()

    def wait(self, refs: list, num_returns: int, timeout: float):
        self.waits += 1
        self.now += self.interval_s
        return (list(refs), []) if self.on_wait(self) else ([], list(refs))

    def get(self, ref):
        return 0

    def cancel(self, ref, force: bool = False) -> None:
        self.canceled.append(ref)


def node(cpus: float, gpus: float = 0, memory_gib: float = 64, alive: bool = True) -> dict:
    """One entry of `ray.nodes()`."""
    resources = {"CPU": cpus, "memory": memory_gib * 1024 ** 3}
    if gpus:
        resources["GPU"] = gpus
    return {"Alive": alive, "Resources": resources, "NodeID": "f" * 56, "NodeManagerAddress": "10.0.0.1"}
