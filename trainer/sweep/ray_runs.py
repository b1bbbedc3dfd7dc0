"""`slapgen sweep --ray ADDRESS`: every grid cell a Ray task, on any node of a Ray cluster.

A cell's task runs `execute.execute_run`, the per-run entry of the one-machine paths, so it trains
from wherever the run stopped (its latest checkpoint, bit-exact), evaluates, and writes
`sweep_result.json` last. The sweep folder is on storage every node mounts at the same path: the
checkpoints, metrics and results of a cell land where every node and the driver read them.

- A node lost mid-run (its raylet or the task's worker killed): Ray retries the task (`MAX_RETRIES`
  system failures; an error of the run itself is not retried, it fails the run as a child's exit
  status does in `pool`), on any node that has the resources, and the retry resumes the run from its
  latest checkpoint: the sweep ends with the results of an uninterrupted one.
- Progress: the driver reads each run's metrics.jsonl from the shared folder each tick, as it does
  for `pool`'s children; no actor to report to, so nothing is lost with a node.
- One worker process per cell (`max_calls=1`): a run's model and GPU memory leave with it. Its
  stdout and stderr go to `runs/NAME/sweep.log`, one line per attempt saying on which node and pid.

Ray is an extra (`pip install -e '.[ray]'`): it is imported only inside these functions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from slapgen.errors import SlapgenError
from trainer.errors import SweepError
from trainer.sweep.folder import DEFINITION_FILE, RUNS_DIR

AUTO, LOCAL = "auto", "local"
MAX_RETRIES = 3  # system failures (a worker or node died) per cell; each retry resumes from the latest checkpoint
SHARED_CHECK_TIMEOUT_S = 300  # a node's first task starts a Python worker: seconds on an idle node, more under load
ATTEMPT_MARK = "sweep cell attempt on Ray node"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError("--ray needs Ray, which is not installed here: pip install -e '.[ray]' (or pip install ray)") from None
    return ray


@contextmanager
def connect(address: str) -> Iterator[None]:
    """Connected to the cluster `address` names (`auto`, `local` or HOST:PORT / ray://...) for the block;
    `local` starts a cluster of this machine for the block and stops it after. One sentence when none answers."""
    ray = _import_ray()
    temp = None
    if address == LOCAL:
        # Short and private: Ray's unix sockets live under it (a 107-byte path limit), and the cluster is this sweep's.
        temp = tempfile.mkdtemp(prefix="slapgen-ray-")
        # Errors only: Ray's warnings about a cluster that lives and dies with this sweep (its token authentication,
        # on by default) are not the user's business.
        ray.init(address="local", _temp_dir=temp, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as error:
            if address == AUTO and os.environ.get("RAY_ADDRESS"):
                raise SweepError(f"--ray auto: no Ray cluster answers at RAY_ADDRESS={os.environ['RAY_ADDRESS']} "
                                 f"({error})") from None
            if address == AUTO:
                raise SweepError("--ray auto found no Ray cluster: RAY_ADDRESS is not set and none runs on this "
                                 "machine; start one with `ray start --head` (and `ray start --address HEAD_IP:6379` "
                                 "on every other node), or use --ray local for one of this machine") from None
            raise SweepError(f"--ray {address}: no Ray cluster answers at that address ({error})") from None
    try:
        yield
    finally:
        ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def check_gpus(gpus_per_run: float, address: str) -> str | None:
    """Whether a live node has the GPUs a run asks for. None when one has; otherwise an error for `local` (the
    cluster is this machine: its runs would wait forever), and for another cluster the line to show (an
    autoscaler may still add such a node, and the runs wait for it)."""
    ray = _import_ray()
    most = max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if gpus_per_run <= most:
        return None
    problem = (f"no node of the Ray cluster has {gpus_per_run:g} GPU(s) for a run (the most a node has is {most:g})"
               + ("; use --gpus-per-run 0 on a machine without GPUs" if address == LOCAL else
                  "; the runs wait until such a node joins (use --gpus-per-run 0 on a CPU-only cluster)"))
    if address == LOCAL:
        raise SweepError(problem)
    return problem


def definition_digest(out: str) -> str | None:
    """sha256 of OUT/sweep.json as this node reads it; None when it has none."""
    try:
        return hashlib.sha256((Path(out) / DEFINITION_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def not_shared_sentence(out: Path, nodes: list[str]) -> str:
    return (f"the sweep folder {out} is not the same folder on Ray node(s) {', '.join(nodes)} (no {DEFINITION_FILE} "
            f"there, or another one): put --out on storage every node mounts at the same path (NFS or a shared disk)")


def check_shared_folder(out: Path) -> None:
    """Every live node reads the same OUT/sweep.json as this driver, or one sentence naming those that do not.
    A task pinned to each node (no CPU asked, so a busy node answers too) reads it there."""
    ray = _import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    out = Path(out).resolve()
    expected = definition_digest(str(out))
    read = ray.remote(num_cpus=0, max_retries=0)(definition_digest)
    asked = {}
    for node in ray.nodes():
        if node.get("Alive"):
            strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            name = f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]})"
            asked[name] = read.options(scheduling_strategy=strategy).remote(str(out))
    ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=SHARED_CHECK_TIMEOUT_S)
    silent = [node for node, ref in asked.items() if ref not in ready]
    if silent:
        raise SweepError(f"Ray node(s) {', '.join(silent)} did not run a task within {SHARED_CHECK_TIMEOUT_S} s "
                         f"(reading {DEFINITION_FILE} there); check them with `ray status`")
    missing = [node for node, ref in asked.items() if ray.get(ref) != expected]
    if missing:
        raise SweepError(not_shared_sentence(out, missing))


def run_cell(out: str, name: str, device: str) -> dict:
    """One grid cell, inside a Ray task: `execute_run` on the run `name` of the sweep in `out`, in a worker
    process of its own (the task's `max_calls=1`), its output in the run's sweep.log. Returns its metrics."""
    import ray

    from trainer.cli import quiet_libraries
    from trainer.sweep.execute import execute_run
    from trainer.sweep.folder import read_definition

    if definition_digest(out) is None:  # a node that joined after the start-up check
        raise SweepError(not_shared_sentence(Path(out), [ray.util.get_node_ip_address()]))
    log_path = Path(out) / RUNS_DIR / name / "sweep.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:  # file descriptors, not only sys.stdout: C libraries and tqdm write there too
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    print(f"{ATTEMPT_MARK} {ray.get_runtime_context().get_node_id()} ({ray.util.get_node_ip_address()}), "
          f"pid {os.getpid()}", flush=True)
    quiet_libraries()
    definition = read_definition(Path(out))
    result = execute_run(definition, definition.run(name), Path(out), device)
    sys.stdout.flush()
    return result["metrics"]


def _failure(error: Exception) -> str:
    """What a failed cell's error says, without Ray's wrapping when the run itself raised."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, SlapgenError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(error).__name__} after {MAX_RETRIES} retries: {str(error).splitlines()[0] if str(error) else ''}"


def run_cells(out: Path, names: list[str], gpus_per_run: float, on_tick: Callable[[list[str]], None] | None = None,
              interval_s: float = 1.0) -> dict[str, str | None]:
    """Every run of `names` as a Ray task asking for `gpus_per_run` GPUs, all submitted at once (Ray queues what
    the cluster cannot place yet); returns {name: None when it finished, else why it failed}.
    `on_tick(names of the runs that have started and not ended)` is called every `interval_s`."""
    ray = _import_ray()

    out = Path(out).resolve()
    device = "cuda" if gpus_per_run > 0 else "cpu"
    cell = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, max_calls=1)(run_cell)
    logs = {name: out / RUNS_DIR / name / "sweep.log" for name in names}
    log_size_at_start = {name: logs[name].stat().st_size if logs[name].is_file() else 0 for name in names}
    refs = {cell.options(num_gpus=gpus_per_run, name=f"slapgen-sweep {name}").remote(str(out), name, device): name
            for name in names}
    outcome: dict[str, str | None] = {}
    waiting = list(refs)
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=interval_s)
            for ref in ready:
                try:
                    ray.get(ref)
                    outcome[refs[ref]] = None
                except ray.exceptions.RayError as error:
                    outcome[refs[ref]] = _failure(error)
            if on_tick is not None:
                # Started: its task has written to its log (an attempt line at least) since the sweep began.
                on_tick([refs[ref] for ref in waiting
                         if logs[refs[ref]].is_file() and logs[refs[ref]].stat().st_size > log_size_at_start[refs[ref]]])
    finally:
        for ref in waiting:  # interrupted (Ctrl-C): stop the cells still running; their checkpoints stay
            ray.cancel(ref, force=True)
    return outcome
