"""The Ray cluster a command runs its tasks on (`slapgen sweep --ray`, `slapgen eval --ray`): connecting to it,
and the checks before any task runs (a node with the GPUs a task asks for; the output folder the same on
every node). One sentence (`ClusterError`) for each way it can fail.

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
from trainer.errors import ClusterError

AUTO, LOCAL = "auto", "local"
SHARED_CHECK_TIMEOUT_S = 300  # a node's first task starts a Python worker: seconds on an idle node, more under load


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray, which is not installed here: pip install -e '.[ray]' (or pip install ray)") from None
    return ray


def log_attempt(log_path: Path, mark: str) -> None:
    """Inside a task (a sweep's cell, an eval's shard): this worker's output appended to `log_path` (file
    descriptors, not only sys.stdout: C libraries and tqdm write there too), then one line, `mark` first,
    naming the attempt's node and pid (a retry after a lost node is a second line), and libraries quieted."""
    import ray

    from trainer.cli import quiet_libraries

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    print(f"{mark} {ray.get_runtime_context().get_node_id()} ({ray.util.get_node_ip_address()}), pid {os.getpid()}",
          flush=True)
    quiet_libraries()


def wait_for_tasks(refs: dict, retries: int, on_tick: Callable[[list], None],
                   interval_s: float) -> dict[str, str | None]:
    """Every task of `refs` (object ref -> name) to its end: {name: None when it finished, else why it failed
    (`task_failure`)}. `on_tick(the refs still running)` every `interval_s`. Interrupted (Ctrl-C), the tasks
    still running are canceled; what they wrote to the shared folder (checkpoints, mp4s) stays."""
    ray = import_ray()
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
                    outcome[refs[ref]] = task_failure(error, retries)
            on_tick(waiting)
    finally:
        for ref in waiting:
            ray.cancel(ref, force=True)
    return outcome


def check_gpus_option(gpus_per_run: float | None, ray: str | None, without_ray: str) -> float:
    """--gpus-per-run as a command gets it: only with --ray (`without_ray`: what the command does then, said in
    the error), 0 or more; its default 1."""
    if gpus_per_run is not None and ray is None:
        raise ClusterError(f"--gpus-per-run applies to --ray only: without it {without_ray}")
    gpus_per_run = 1 if gpus_per_run is None else gpus_per_run
    if gpus_per_run < 0:
        raise ClusterError(f"--gpus-per-run must be 0 (a CPU-only cluster) or more, not {gpus_per_run:g}")
    return gpus_per_run


@contextmanager
def connect(address: str) -> Iterator[None]:
    """Connected to the cluster `address` names (`auto`, `local` or HOST:PORT / ray://...) for the block;
    `local` starts a cluster of this machine for the block and stops it after. One sentence when none answers."""
    ray = import_ray()
    temp = None
    if address == LOCAL:
        # Short and private: Ray's unix sockets live under it (a 107-byte path limit), and the cluster is this command's.
        temp = tempfile.mkdtemp(prefix="slapgen-ray-")
        # Errors only: Ray's warnings about a cluster that lives and dies with this command (its token
        # authentication, on by default) are not the user's business.
        ray.init(address="local", _temp_dir=temp, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as error:
            if address == AUTO and os.environ.get("RAY_ADDRESS"):
                raise ClusterError(f"--ray auto: no Ray cluster answers at RAY_ADDRESS={os.environ['RAY_ADDRESS']} "
                                   f"({error})") from None
            if address == AUTO:
                raise ClusterError("--ray auto found no Ray cluster: RAY_ADDRESS is not set and none runs on this "
                                   "machine; start one with `ray start --head` (and `ray start --address HEAD_IP:6379` "
                                   "on every other node), or use --ray local for one of this machine") from None
            raise ClusterError(f"--ray {address}: no Ray cluster answers at that address ({error})") from None
    try:
        yield
    finally:
        ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def check_gpus(gpus_per_run: float, address: str, task: str = "a run") -> str | None:
    """Whether a live node has the GPUs a task asks for. None when one has; otherwise an error for `local` (the
    cluster is this machine: its tasks would wait forever), and for another cluster the line to show (an
    autoscaler may still add such a node, and the tasks wait for it). `task`: what one task is, in words."""
    ray = import_ray()
    most = max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if gpus_per_run <= most:
        return None
    plural = task.split(" ", 1)[1] + "s"
    problem = (f"no node of the Ray cluster has {gpus_per_run:g} GPU(s) for {task} (the most a node has is {most:g})"
               + ("; use --gpus-per-run 0 on a machine without GPUs" if address == LOCAL else
                  f"; the {plural} wait until such a node joins (use --gpus-per-run 0 on a CPU-only cluster)"))
    if address == LOCAL:
        raise ClusterError(problem)
    return problem


def task_slots(gpus_per_task: float) -> int:
    """How many tasks asking for `gpus_per_task` GPUs and one CPU (Ray's default) the cluster's live nodes run
    at once: per node, its GPUs over `gpus_per_task` and its CPUs, whichever allows fewer; its CPUs alone when
    the tasks ask for no GPU (a CPU-only cluster)."""
    ray = import_ray()
    slots = 0
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node["Resources"]
            by_cpu = int(resources.get("CPU", 0))
            slots += by_cpu if gpus_per_task == 0 else min(by_cpu, int(resources.get("GPU", 0) // gpus_per_task))
    return slots


def file_digest(path: str) -> str | None:
    """sha256 of the file at `path` as this node reads it; None when it has none."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def check_shared_folder(marker: Path, not_shared: Callable[[list[str]], str]) -> None:
    """Every live node reads the same `marker` file (one the driver wrote into the output folder) as this driver,
    or `not_shared(nodes that do not)`'s sentence. A task pinned to each node (no CPU asked, so a busy node
    answers too) reads it there."""
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = Path(marker).resolve()
    expected = file_digest(str(marker))
    read = ray.remote(num_cpus=0, max_retries=0)(file_digest)
    asked = {}
    for node in ray.nodes():
        if node.get("Alive"):
            strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            name = f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]})"
            asked[name] = read.options(scheduling_strategy=strategy).remote(str(marker))
    ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=SHARED_CHECK_TIMEOUT_S)
    silent = [node for node, ref in asked.items() if ref not in ready]
    if silent:
        raise ClusterError(f"Ray node(s) {', '.join(silent)} did not run a task within {SHARED_CHECK_TIMEOUT_S} s "
                           f"(reading {marker.name} there); check them with `ray status`")
    missing = [node for node, ref in asked.items() if ray.get(ref) != expected]
    if missing:
        raise ClusterError(not_shared(missing))


def task_failure(error: Exception, retries: int) -> str:
    """What a failed task's error says, without Ray's wrapping when the task's own work raised."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, SlapgenError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(error).__name__} after {retries} retries: {str(error).splitlines()[0] if str(error) else ''}"
