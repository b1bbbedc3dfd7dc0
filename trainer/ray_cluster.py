"""The Ray cluster a command runs its tasks on (`slapgen sweep --ray`, `slapgen eval --ray`): connecting to it,
the checks before any task runs (a node with the GPUs a task asks for; the output folder the same on
every node), and waiting for the tasks (stopped with one sentence once no live node could run them for
`--node-wait` seconds). One sentence (`ClusterError`) for each way it can fail.

Ray is an extra (`pip install -e '.[ray]'`): it is imported only inside these functions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from slapgen.errors import SlapgenError
from trainer.errors import ClusterError
from trainer.interrupt import SigtermStops

AUTO, LOCAL = "auto", "local"
# README's recipe: a token first, and RAY_AUTH_MODE=token for every Ray command on every node (a worker started
# without it cannot join a head that has a token; a plain `ray status` on that head fails too).
START_A_CLUSTER = ("start one with `ray get-auth-token --generate` and `RAY_AUTH_MODE=token ray start --head` (and "
                   "`RAY_AUTH_MODE=token ray start --address HEAD_IP:6379` on every other node, the head's "
                   "~/.ray/auth_token copied to it), or use --ray local for one of this machine")
CONNECT_TIMEOUT_S = 10  # a cluster's head answers a TCP connect at once; a dropped packet is waited for this long
SHARED_CHECK_TIMEOUT_S = 300  # a node's first task starts a Python worker: seconds on an idle node, more under load
# --node-wait's default: longer than a cloud provider takes to bring up a GPU node and pull a multi-GB image (the
# KubeRay example's workers), short enough that a cluster whose only GPU node died does not hold a command for hours.
DEFAULT_NODE_WAIT_S = 1800.0
GIB = 1024 ** 3


@dataclass(frozen=True)
class TaskDemand:
    """What one task asks Ray for: `gpus` (--gpus-per-run), one CPU (Ray's default for a task), and `memory` bytes
    of Ray's `memory` resource (0: none asked; a node offers Ray about 70% of its free memory by default)."""
    gpus: float
    memory: int = 0

    def ray_options(self) -> dict:
        return {"num_gpus": self.gpus, **({"memory": self.memory} if self.memory else {})}

    def per_node(self, resources: dict) -> int:
        """How many such tasks at once a node with `resources` (as `ray.nodes()` gives them) runs."""
        counts = [_fits(resources.get("CPU", 0), 1)]
        if self.gpus > 0:
            counts.append(_fits(resources.get("GPU", 0), self.gpus))
        if self.memory > 0:
            counts.append(_fits(resources.get("memory", 0), self.memory))
        return min(counts)


def _fits(offered: float, asked: float) -> int:
    return int(offered / asked + 1e-9)  # 0.3 / 0.1 is 2.999...: Ray itself counts resources to 1e-4


def cluster_line() -> str:
    """Which cluster the command joined, in words: its live nodes' addresses and what they offer (`--ray auto` takes
    RAY_ADDRESS, the cluster last started here or any running on this machine, which may be another user's)."""
    nodes = [node for node in import_ray().nodes() if node.get("Alive")]
    addresses = sorted({node["NodeManagerAddress"] for node in nodes})
    total = {kind: sum(node["Resources"].get(kind, 0) for node in nodes) for kind in ("CPU", "GPU")}
    return (f"Ray cluster of {len(nodes)} live node(s) at {', '.join(addresses) or 'none'}: {total['CPU']:g} CPUs, "
            f"{total['GPU']:g} GPUs")


def live_resources() -> list[dict]:
    return [node["Resources"] for node in import_ray().nodes() if node.get("Alive")]


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


@dataclass
class RetryNotice:
    """A task's new attempt (a second `log_attempt` line in its log, after its node or worker was lost), said once
    in words (`say`): which task, the node that was lost, where Ray runs it again and what the retry keeps (`keeps`),
    where otherwise the user reads only Ray's own messages. `logs`: each task's name -> its log; only what a log
    gains after this is made counts (an earlier session's attempts are not this one's retries)."""
    logs: dict[str, Path]
    mark: str
    retries: int
    keeps: str  # what a retry keeps, in words: "from its latest checkpoint"
    say: Callable[[str], None]
    read: dict[str, int] = field(default_factory=dict, init=False)  # bytes of each log read so far
    attempts: dict[str, list[str]] = field(default_factory=dict, init=False)  # "node ID8 (IP)" of each attempt seen

    def __post_init__(self) -> None:
        self.read = {name: log.stat().st_size if log.is_file() else 0 for name, log in self.logs.items()}

    def check(self) -> None:
        for name, log in self.logs.items():
            try:
                with log.open("rb") as handle:
                    handle.seek(self.read[name])
                    gained = handle.read()
            except OSError:  # not written yet
                continue
            complete = gained[:gained.rfind(b"\n") + 1]  # a line still being written is read next time
            self.read[name] += len(complete)
            for line in complete.decode("utf-8", "replace").splitlines():
                if line.startswith(self.mark + " "):
                    self._attempt(name, line[len(self.mark) + 1:])

    def _attempt(self, name: str, where: str) -> None:
        node_id, _, rest = where.partition(" ")
        node = f"node {node_id[:8]} {rest.split(',')[0]}"
        seen = self.attempts.setdefault(name, [])
        seen.append(node)
        if len(seen) > 1:
            self.say(f"{name}: its Ray {seen[-2]} was lost (killed or gone); Ray runs it again on {node} "
                     f"(retry {len(seen) - 1} of {self.retries}), {self.keeps}")


def wait_for_tasks(refs: dict, retries: int, on_tick: Callable[[list], None], interval_s: float,
                   nodes: NodeWait, retried: RetryNotice | None = None) -> dict[str, str | None]:
    """Every task of `refs` (object ref -> name) to its end: {name: None when it finished, else why it failed
    (`task_failure`)}. `on_tick(the refs still running)` every `interval_s`, and `nodes.check()` while any is
    left (its ClusterError: no live node could run them for --node-wait); `retried.check()` each tick says a task
    Ray runs again after its node was lost. Stopped (Ctrl-C; SIGTERM, a scheduler's stop, raises `StopRequested`),
    each task still running is asked to stop as a Ctrl-C asks it (Ray's `cancel` without force raises it in the
    task: a training run ends its step and checkpoints it, `trainer.interrupt`) and waited for; a second Ctrl-C, or
    that error, cancels them at once (forced: they lose their steps since their last checkpoint, as every task did
    before). What they wrote to the shared folder (checkpoints, mp4s) stays."""
    ray = import_ray()
    outcome: dict[str, str | None] = {}
    waiting = list(refs)
    # SIGTERM is ours while the tasks are waited for, over any handler: `connect`'s, or where a caller did not
    # connect through it, ray.init's (which exits at once, and Ray then kills the tasks with the driver).
    with SigtermStops(replaces=lambda handler: True) as sigterm:
        try:
            while waiting:
                nodes.check()
                ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=interval_s)
                for ref in ready:
                    try:
                        ray.get(ref)
                        outcome[refs[ref]] = None
                    except ray.exceptions.RayError as error:
                        outcome[refs[ref]] = task_failure(error, retries)
                if retried is not None:
                    retried.check()
                on_tick(waiting)
        except KeyboardInterrupt as interrupt:
            sigterm.ignore_more()  # whoever sent a SIGTERM kills the driver after its grace, and then Ray the tasks
            for ref in waiting:
                ray.cancel(ref, force=False)
            try:
                while waiting:
                    _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=interval_s)
            except KeyboardInterrupt:
                pass  # a second Ctrl-C: those left are cancelled at once (below)
            if (stop := sigterm.stop_of(interrupt)) is interrupt:
                raise
            raise stop from None
        finally:
            for ref in waiting:
                ray.cancel(ref, force=True)
    return outcome


def interruptible_task() -> None:
    """Called first in a Ray task: SIGINT at Python's default, so that Ray's cancel without force (which
    `wait_for_tasks` sends when the driver is stopped, delivered as a SIGINT) reaches it. A worker of a node started
    in the background by a script (`ray start ... &`) inherits SIGINT ignored, and the cancel did nothing: the
    driver waited for the whole run."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def check_only_with_ray(flag: str, value, ray: str | None, without_ray: str) -> None:
    """An option of the cluster path (`flag`, given when `value` is not None) used without --ray: one sentence
    saying what the command does then (`without_ray`)."""
    if value is not None and ray is None:
        raise ClusterError(f"{flag} applies to --ray only: without it {without_ray}")


def check_gpus_option(gpus_per_run: float | None, ray: str | None, without_ray: str) -> float:
    """--gpus-per-run as a command gets it: only with --ray (`without_ray`: what the command does then, said in
    the error), 0 or more; its default 1."""
    check_only_with_ray("--gpus-per-run", gpus_per_run, ray, without_ray)
    gpus_per_run = 1 if gpus_per_run is None else gpus_per_run
    if gpus_per_run < 0:
        raise ClusterError(f"--gpus-per-run must be 0 (a CPU-only cluster) or more, not {gpus_per_run:g}")
    return gpus_per_run


def check_node_wait_option(node_wait: float | None, ray: str | None, without_ray: str) -> float:
    """--node-wait as a command gets it: only with --ray, more than 0 seconds; its default `DEFAULT_NODE_WAIT_S`."""
    check_only_with_ray("--node-wait", node_wait, ray, without_ray)
    if node_wait is None:
        return DEFAULT_NODE_WAIT_S
    if not node_wait > 0:
        raise ClusterError(f"--node-wait must be more than 0 seconds, not {node_wait:g}")
    return node_wait


@contextmanager
def connect(address: str) -> Iterator[None]:
    """Connected to the cluster `address` names (`auto`, `local` or HOST:PORT) for the block;
    `local` starts a cluster of this machine for the block and stops it after. One sentence when none answers.
    Within the block SIGTERM raises `StopRequested(SIGTERM)`, as Ctrl-C raises KeyboardInterrupt."""
    ray = import_ray()
    temp = None
    own_token = False
    if address == LOCAL:
        # Short and private: Ray's unix sockets live under it (a 107-byte path limit), and the cluster is this command's.
        if parent := os.environ.get("RAY_TMPDIR"):  # Ray makes it when missing: so does this
            os.makedirs(parent, exist_ok=True)
        temp = tempfile.mkdtemp(prefix="slapgen-ray-", dir=parent or None)
        own_token = _token_of_this_command()
        # Errors only: Ray's warnings about a cluster that lives and dies with this command (its token
        # authentication, on by default) are not the user's business.
        ray.init(address="local", _temp_dir=temp, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    else:
        check_address(address)
        try:
            where = _check_answers(address)
        except ConnectionError as error:
            if address == AUTO and os.environ.get("RAY_ADDRESS"):
                raise ClusterError(f"--ray auto: no Ray cluster answers at RAY_ADDRESS={os.environ['RAY_ADDRESS']} "
                                   f"({error})") from None
            if address == AUTO and str(error).startswith("the cluster last started"):
                raise ClusterError(f"--ray auto: {error}{START_A_CLUSTER}") from None
            if address == AUTO:
                raise ClusterError("--ray auto found no Ray cluster: RAY_ADDRESS is not set and none runs on this "
                                   f"machine; {START_A_CLUSTER}") from None
            raise ClusterError(f"--ray {address}: no Ray cluster answers at that address ({error})") from None
        try:
            with _gcs_join_tries(JOIN_TRIES):
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as error:
            # Something listens there (the check above connected): most often a cluster with token authentication
            # (Ray 2.60) this command sends no token to; Ray says so only in a log line above its error.
            raise ClusterError(f"--ray {address}: something answers at {_as_given(address, where)} but Ray could "
                               f"not join it ({error}); if it is a cluster with token authentication (its head was "
                               "started with RAY_AUTH_MODE=token, or without it `ray start --head` said `Token "
                               "authentication is enabled`), run with RAY_AUTH_MODE=token and the head's "
                               "~/.ray/auth_token in this machine's ~/.ray/ (README: Sweeps on a Ray cluster)") from None
    # SIGTERM (a scheduler's stop) stops the command as Ctrl-C does for the whole block, over ray.init's handler:
    # it exited at once without a word (15), or aborted the driver inside a Ray call (-6). Ignored once the block
    # ends, while Ray shuts down.
    with SigtermStops(replaces=lambda handler: True) as sigterm:
        try:
            yield
        except KeyboardInterrupt as interrupt:
            if (stop := sigterm.stop_of(interrupt)) is interrupt:
                raise
            raise stop from None
        finally:
            sigterm.ignore_more()
            try:
                ray.shutdown()
            finally:
                if own_token:
                    os.environ.pop(RAY_AUTH_TOKEN, None)
                if temp is not None:
                    shutil.rmtree(temp, ignore_errors=True)


RAY_AUTH_TOKEN = "RAY_AUTH_TOKEN"  # Ray reads a cluster's token from here before ~/.ray/auth_token


def _token_of_this_command() -> bool:
    """A token for the cluster `--ray local` starts, in this process's environment (its raylet and workers inherit
    it); True when set here. Ray 2.60 protects a cluster ray.init starts with a token, and with none anywhere it
    writes one to ~/.ray/auth_token, where every later `ray start --head` on this machine finds it and turns token
    authentication on, which `ray start --address` and a driver given HOST:PORT do not send: README's recipe then
    fails (the second node never joins). A token of its own protects this cluster as well and writes nothing."""
    import secrets

    if os.environ.get(RAY_AUTH_TOKEN) or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        return False  # the user's own token: Ray uses it and writes nothing
    os.environ[RAY_AUTH_TOKEN] = secrets.token_hex(32)  # as Ray's own generator makes them
    return True


# Ray tries its first call to a cluster's GCS once a second, 20 times (`RAY_NUM_REDIS_GET_RETRIES`), for a GCS still
# starting. Here the port has answered already (`_check_answers`), so a refusal is final: a cluster with token
# authentication and no token sent was said after 20 s of Ray's log lines; 8 tries say it sooner. Ray's own setting
# for it, `RAY_gcs_server_port_wait_time_s`, wins when the user sets it.
JOIN_TRIES = 8
GCS_WAIT_SETTING = "RAY_gcs_server_port_wait_time_s"


@contextmanager
def _gcs_join_tries(tries: int) -> Iterator[None]:
    if GCS_WAIT_SETTING in os.environ:
        yield
        return
    os.environ[GCS_WAIT_SETTING] = str(tries)
    try:
        yield
    finally:
        os.environ.pop(GCS_WAIT_SETTING, None)


def check_address(address: str) -> None:
    """ClusterError, in one sentence, for an address slapgen cannot use: a Ray Client address (ray://: its gRPC
    forks wrote into the video decoder's output, and a walk-through's sweep dropped a good clip as corrupt in 2 of
    7 runs; Ray points long workloads at Jobs anyway), or one that is not HOST:PORT (Ray raised a ValueError with
    a traceback, for instance for the dashboard's http://HOST:8265 that `ray job submit` takes)."""
    if address in (AUTO, LOCAL):
        return
    if address.startswith("ray://"):
        raise ClusterError(f"--ray {address}: Ray Client (ray://) addresses are not supported: give the head's "
                           "HOST:PORT (6379 unless `ray start --head --port` said otherwise) from a machine of the "
                           "cluster, or run slapgen there with `ray job submit` (README: Sweeps on a Ray cluster)")
    host, colon, port = address.rpartition(":")
    if "://" in address or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        dashboard = " (http://HOST:8265 is the dashboard's, which `ray job submit` takes)" if "://" in address else ""
        raise ClusterError(f"--ray {address}: not the address of a Ray cluster{dashboard}; give HOST:PORT of its head "
                           f"(6379 unless `ray start --head --port` said otherwise), {AUTO} or {LOCAL}")


def _check_answers(address: str) -> str | None:
    """The address `address` resolves to, once something listens there (None for a Ray Client address);
    ConnectionError at once when nothing listens at the cluster address `address` resolves to (Ray's own
    resolution: RAY_ADDRESS, the cluster `ray start` last recorded on this machine, one running here). ray.init
    itself retries a silent address for about 14 minutes (20 attempts of ~40 s) before saying anything: a
    mistyped HOST:PORT, a head not up yet, or a cluster that died without `ray stop` (its address still recorded).
    (`check_address` has refused a Ray Client address and any that is not HOST:PORT.)"""
    from ray._private.services import canonicalize_bootstrap_address  # what ray.init calls on `address`

    resolved = canonicalize_bootstrap_address(address)  # ConnectionError with auto and no cluster anywhere
    if resolved is None:
        return None
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as error:
        recorded = "" if address != AUTO or os.environ.get("RAY_ADDRESS") else (
            f"the cluster last started on this machine, at {resolved}, does not answer ({error}): it stopped without "
            "`ray stop` or its head died; ")
        raise ConnectionError(recorded or f"nothing answers at {_as_given(address, resolved)}: {error}") from None
    return resolved


def _as_given(address: str, resolved: str | None) -> str:
    """The cluster's address as the user gave it, with Ray's resolution beside it when that differs (Ray turns
    127.0.0.1 into this machine's address): a sentence naming only the resolved one read as a typo of the user's."""
    if resolved is None or address == AUTO or resolved == address:
        return resolved or address
    return f"{address} (which Ray resolves to {resolved})"


def placement_problem(demand: TaskDemand, address: str, task: str) -> tuple[str, str] | None:
    """None when a live node offers everything one task asks for (`demand`), whether or not it is busy; otherwise
    (what is missing, as a sentence; advice for the user, or ""). `task`: what one task is, in words."""
    nodes = live_resources()
    if any(demand.per_node(resources) >= 1 for resources in nodes):
        return None
    most_gpus = max((resources.get("GPU", 0) for resources in nodes), default=0)
    if demand.gpus > most_gpus:
        return (f"no node of the Ray cluster has {demand.gpus:g} GPU(s) for {task} (the most a node has is "
                f"{most_gpus:g})", "use --gpus-per-run 0 on a machine without GPUs" if address == LOCAL else
                "use --gpus-per-run 0 on a CPU-only cluster")
    with_gpus = [resources for resources in nodes if demand.gpus == 0 or _fits(resources.get("GPU", 0), demand.gpus)]
    most_memory = max((resources.get("memory", 0) for resources in with_gpus), default=0)
    if demand.memory > most_memory:
        return (f"no node of the Ray cluster has {memory_text(demand.memory)} of memory for {task} (the most a node "
                f"offers Ray is {memory_text(most_memory)})", "use a GPU (--gpus-per-run 1) or a machine with more "
                "memory" if address == LOCAL else "`ray start --memory` sets what a node offers")
    return f"no node of the Ray cluster has a CPU along with the rest {task} asks for", "`ray start --num-cpus` sets it"


def memory_text(size: float) -> str:
    """Bytes as people read them: "20.0 GiB", "3.2 MiB" (a tiny model's worker is not "0.0 GiB")."""
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / 1024 ** 2:.1f} MiB"


def _plural(task: str) -> str:
    return task.split(" ", 1)[1] + "s"


def check_placeable(demand: TaskDemand, address: str, task: str = "a run") -> None:
    """Before anything is read or written: on `local` (the cluster is this machine, nothing joins it), a node with
    everything a task asks for (`demand`: its GPUs, a CPU, its memory; the same demand its tasks are submitted
    with), or one sentence, `NodeWait`'s. Another cluster may still gain such a node (an autoscaler, pods still
    starting): its tasks wait for it, and `NodeWait` says so once they are submitted."""
    if address != LOCAL:
        return
    if (missing := placement_problem(demand, address, task)) is not None:
        raise ClusterError("; ".join(missing))


def task_slots(demand: TaskDemand) -> int:
    """How many tasks asking for `demand` the cluster's live nodes run at once: per node, its GPUs over the GPUs a
    task asks for, its CPUs (one per task) and its memory over the task's, whichever allows fewest."""
    return sum(demand.per_node(resources) for resources in live_resources())


@dataclass
class NodeWait:
    """Tasks waiting while no live node offers what one asks for (none has joined yet, or the only such node
    died and Ray queues its task's retry): said once (`say`) when it begins, a ClusterError after `limit_s`
    seconds of it; at once on `local` (nothing joins this machine's cluster). `check` runs every tick."""
    demand: TaskDemand
    address: str
    task: str  # what one task is, in words: "a run", "a worker"
    limit_s: float
    say: Callable[[str], None]
    clock: Callable[[], float] = time.monotonic
    since: float | None = field(default=None, init=False)

    def check(self) -> None:
        missing = placement_problem(self.demand, self.address, self.task)
        if missing is None:
            self.since = None  # a later stall is said again
            return
        problem, advice = missing
        if self.address == LOCAL:
            raise ClusterError(f"{problem}; {advice}")
        if self.since is None:
            self.since = self.clock()
            self.say(f"{problem}; the {_plural(self.task)} wait until such a node joins (at most {self.limit_s:g} s, "
                     f"--node-wait; {advice})")
        elif self.clock() - self.since >= self.limit_s:
            raise ClusterError(f"stopped after {self.limit_s:g} s (--node-wait) without a live node that can run "
                               f"the {_plural(self.task)}: {problem}; rerun once such a node has joined ({advice})")


def file_digest(path: str) -> str | None:
    """sha256 of the file at `path` as this node reads it; None when it has none."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def node_view(marker: str, needed: list[str]) -> tuple[str | None, list[str]]:
    """What this node reads: `marker`'s digest (`file_digest`), and those of the `needed` paths it has not."""
    return file_digest(marker), [path for path in needed if not Path(path).exists()]


def check_shared_folder(marker: Path, not_shared: Callable[[list[str]], str],
                        needed: Mapping[str, Path] | None = None) -> None:
    """Every live node reads the same `marker` file (one the driver wrote into the output folder) as this driver,
    or `not_shared(nodes that do not)`'s sentence; and has every path of `needed` (what the tasks read besides the
    output folder, by the option that named it: `{"--data": path}`), or one sentence naming what each node lacks.
    A task pinned to each node (no CPU asked, so a busy node answers too) looks there."""
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = Path(marker).resolve()
    expected = file_digest(str(marker))
    options_of: dict[str, list[str]] = {}  # a path given by several options (--data and --heldout alike) is one
    for option, path in (needed or {}).items():
        options_of.setdefault(str(Path(path).resolve()), []).append(option)
    look = ray.remote(num_cpus=0, max_retries=0)(node_view)
    asked = {}
    for node in ray.nodes():
        if node.get("Alive"):
            strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            name = f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]})"
            asked[name] = look.options(scheduling_strategy=strategy).remote(str(marker), list(options_of))
    ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=SHARED_CHECK_TIMEOUT_S)
    silent = [node for node, ref in asked.items() if ref not in ready]
    if silent:
        raise ClusterError(f"Ray node(s) {', '.join(silent)} did not run a task within {SHARED_CHECK_TIMEOUT_S} s "
                           f"(reading {marker.name} there); check them with `ray status`")
    views = {node: ray.get(ref) for node, ref in asked.items()}
    missing = [node for node, (digest, _) in views.items() if digest != expected]
    lacking = {node: lacked for node, (_, lacked) in views.items() if lacked}
    # a folder one node lacks failed only once a task there read it, as "dataset ... does not exist"
    named = {path: f"{' and '.join(options)} {path}" for path, options in options_of.items()}
    said = "; ".join(f"{node} has no {', '.join(named[path] for path in lacked)}" for node, lacked in lacking.items())
    if missing:
        # All of it in one sentence: naming the output folder alone sent a walk-through back for a second try.
        raise ClusterError(not_shared(missing) + (f"; nor does every node see what the tasks read: {said}" if lacking else ""))
    if lacking:
        raise ClusterError(f"not every Ray node sees what the tasks read: {said}; put it on storage every node mounts "
                           "at the same path, as the output folder")


def task_failure(error: Exception, retries: int) -> str:
    """What a failed task's error says, without Ray's wrapping when the task's own work raised."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, SlapgenError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    if isinstance(error, getattr(import_ray().exceptions, "TaskCancelledError", ())):  # it read "after 3 retries"
        return "TaskCancelledError: its Ray task was cancelled from outside this command (Ray runs again only a task " \
               "whose worker or node was lost)"
    return f"{type(error).__name__} after {retries} retries: {str(error).splitlines()[0] if str(error) else ''}"
