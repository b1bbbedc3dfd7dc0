"""`trainer.ray_cluster` without a cluster (`tests.fake_ray`): tasks that no live node can run are said once and
stop the command after --node-wait seconds (one code path for sweep and eval); how many tasks a node runs at
once when they ask for memory; the sentences of --node-wait's and --workers' misuses."""

from __future__ import annotations

import os
import re

import pytest

from tests.conftest import cli_stderr
from tests.fake_ray import FakeRay, node
from trainer import ray_cluster
from trainer.errors import ClusterError
from trainer.ray_cluster import GIB, NodeWait, TaskDemand, wait_for_tasks

GPU_WAIT = ("no node of the Ray cluster has 1 GPU(s) for a run (the most a node has is 0); the runs wait until such a "
            "node joins (at most 10 s, --node-wait; use --gpus-per-run 0 on a CPU-only cluster)")


def test_runs_no_live_node_can_run_are_said_once_and_stop_after_node_wait(monkeypatch):
    """Guards issue 21's silent stall: the only GPU node dead (Ray queues its task's retry forever) or none joined
    yet, and the bar stopped without a word, for ever. Two runs waiting with only a CPU node alive (the GPU node
    dead): the sentence is said once, not each tick; once --node-wait (10 s on the fake clock, 1 s per tick) has
    passed since it was said, one sentence stops the wait and the runs left are canceled."""
    fake = FakeRay([node(cpus=4), node(cpus=8, gpus=1, alive=False)], on_wait=lambda ray: False, interval_s=1.0)
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: fake)
    said, ticks = [], []
    nodes = NodeWait(TaskDemand(1), "auto", "a run", 10, said.append, clock=fake.clock)
    with pytest.raises(ClusterError) as error:
        wait_for_tasks({"ref a": "lr-1", "ref b": "lr-2"}, 3, ticks.append, 1.0, nodes)
    assert said == [GPU_WAIT]
    assert str(error.value) == ("stopped after 10 s (--node-wait) without a live node that can run the runs: no node "
                                "of the Ray cluster has 1 GPU(s) for a run (the most a node has is 0); rerun once such "
                                "a node has joined (use --gpus-per-run 0 on a CPU-only cluster)")
    assert fake.now == 10 and len(ticks) == 10  # said at 0 s, stopped at the first check at 10 s, not before
    assert sorted(fake.canceled) == ["ref a", "ref b"]


def test_a_node_that_joins_in_time_or_a_busy_node_is_no_stall(monkeypatch):
    """Guards the bounded wait stopping a healthy command: tasks queued behind busy nodes that have the GPUs are
    never a stall, however long they wait; a node that joins before --node-wait ends the wait (said once, no
    error), and a second stall later is said again and timed from its own start."""
    busy = FakeRay([node(cpus=8, gpus=1)], on_wait=lambda ray: ray.waits == 30)
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: busy)
    said = []
    outcome = wait_for_tasks({"ref": "lr-1"}, 3, lambda waiting: None, 1.0,
                             NodeWait(TaskDemand(1), "auto", "a run", 10, said.append, clock=busy.clock))
    assert outcome == {"lr-1": None} and busy.now == 30 and said == []

    def cluster(ray: FakeRay) -> bool:  # joins after 8 s; dies at 12 s; another joins at 21 s; done at 25 s
        ray._nodes[:] = [node(cpus=0)] + ([node(cpus=8, gpus=1)] if 8 <= ray.now < 12 or ray.now >= 21 else [])
        return ray.now >= 25

    starting = FakeRay([node(cpus=0)], on_wait=cluster)
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: starting)
    outcome = wait_for_tasks({"ref": "lr-1"}, 3, lambda waiting: None, 1.0,
                             NodeWait(TaskDemand(1), "auto", "a run", 10, said.append, clock=starting.clock))
    assert outcome == {"lr-1": None} and said == [GPU_WAIT, GPU_WAIT]  # 0-8 s and 12-21 s: each under 10 s


def test_on_a_cluster_of_this_machine_no_node_is_an_error_at_once(monkeypatch):
    """Guards `--ray local` (nothing ever joins it) waiting --node-wait for nothing: CPU workers asking for more
    memory than this machine offers Ray stop the command at the first check, before any wait."""
    fake = FakeRay([node(cpus=16, memory_gib=12)], on_wait=lambda ray: False)
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: fake)
    nodes = NodeWait(TaskDemand(0, memory=20 * GIB), "local", "a worker", 1800, print, clock=fake.clock)
    with pytest.raises(ClusterError) as error:
        wait_for_tasks({"ref": 0}, 3, lambda waiting: None, 1.0, nodes)
    assert str(error.value) == ("no node of the Ray cluster has 20.0 GiB of memory for a worker (the most a node offers "
                                "Ray is 12.0 GiB); use a GPU (--gpus-per-run 1) or a machine with more memory")
    assert fake.waits == 0 and fake.canceled == ["ref"]


def test_tasks_that_ask_for_memory_run_as_many_at_once_as_a_node_holds(monkeypatch):
    """Guards one CPU-only worker per CPU whatever its memory (a 64-CPU node loading 64 pipelines: Ray's OOM
    killer, retries exhausted): with memory asked, a node runs its memory over a task's (floor), or its CPUs
    when fewer; a KubeRay head without CPUs runs none, and is named when no node has a CPU."""
    fake = FakeRay([node(cpus=64, memory_gib=100), node(cpus=2, memory_gib=100), node(cpus=0, memory_gib=100)])
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: fake)
    assert ray_cluster.task_slots(TaskDemand(0, memory=30 * GIB)) == 3 + 2 + 0
    assert ray_cluster.task_slots(TaskDemand(0)) == 64 + 2 + 0
    assert ray_cluster.placement_problem(TaskDemand(0, memory=30 * GIB), "auto", "a worker") is None
    fake._nodes[:] = [node(cpus=0)]
    assert ray_cluster.placement_problem(TaskDemand(0), "auto", "a run") == (
        "no node of the Ray cluster has a CPU along with the rest a run asks for", "`ray start --num-cpus` sets it")


def test_a_task_retried_after_its_node_was_lost_is_said_once_in_words(monkeypatch, tmp_path):
    """Guards a node lost mid-sweep told only in Ray's words (its raylet's log dump and "Task run_cell failed"),
    never naming the run: a second attempt line in a task's log, written by the retry `log_attempt` starts, is
    said once (which task, the lost node, the new one, the retry count, what it keeps). An attempt line from an
    earlier session (the log is appended to), a task's first attempt and a line still being written say nothing."""
    from trainer.sweep.ray_runs import ATTEMPT_MARK

    log = tmp_path / "runs" / "01" / "sweep.log"
    log.parent.mkdir(parents=True)
    log.write_text(f"{ATTEMPT_MARK} {'a' * 56} (10.0.0.9), pid 1\ntraining...\n")  # an earlier sweep's attempt

    def attempt(node_id: str, ip: str, pid: int, end: str = "\n") -> None:
        with log.open("a") as handle:
            handle.write(f"{ATTEMPT_MARK} {node_id} ({ip}), pid {pid}{end}")

    steps = {1: lambda: attempt("63bc40af" + "0" * 48, "10.0.0.2", 22278),
             3: lambda: attempt("eab5173b" + "1" * 48, "10.0.0.1", 2307, end=""),  # half a line, finished at 4
             4: lambda: log.open("a").write("5\n")}
    fake = FakeRay([node(cpus=4)], on_wait=lambda ray: (steps.get(ray.waits, lambda: None)(), ray.waits == 6)[1])
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: fake)
    said = []
    retried = ray_cluster.RetryNotice({"run 01": log, "run 02": tmp_path / "runs" / "02" / "sweep.log"}, ATTEMPT_MARK,
                                      3, "resuming from its latest checkpoint", said.append)
    seen_at = {}
    outcome = wait_for_tasks({"ref": "run 01"}, 3, lambda waiting: seen_at.setdefault(len(said), fake.waits), 1.0,
                             NodeWait(TaskDemand(0), "auto", "a run", 10, said.append, clock=fake.clock), retried)
    assert outcome == {"run 01": None}
    assert said == ["run 01: its Ray node 63bc40af (10.0.0.2) was lost (killed or gone); Ray runs it again on node "
                    "eab5173b (10.0.0.1) (retry 1 of 3), resuming from its latest checkpoint"]
    assert seen_at[1] == 4  # said at the tick its line was whole, not while it was half written


@pytest.mark.parametrize(("command", "extra", "message"), [
    ("sweep", ["--node-wait", "60"], "--node-wait applies to --ray only: without it the sweep runs one run per GPU of "
                                     "this machine"),
    ("sweep", ["--ray", "local", "--node-wait", "0"], "--node-wait must be more than 0 seconds, not 0"),
    ("eval", ["--node-wait", "60"], "--node-wait applies to --ray only: without it eval generates every video in this "
                                    "process"),
    ("eval", ["--workers", "4"], "--workers applies to --ray only: without it eval generates every video in this "
                                 "process"),
    ("eval", ["--ray", "local", "--workers", "0"], "--workers must be at least 1, not 0"),
])
def test_node_wait_and_workers_misuse_is_one_sentence(command, extra, message, tmp_path, capsys):
    """Guards --node-wait / --workers silently ignored without --ray, and a wait of 0 s or no worker at all
    reaching the cluster path; nothing is written."""
    from trainer.cli import main

    base = {"sweep": ["sweep", "--config", "tiny-smoke", "--grid", "lora.rank=4", "--data", str(tmp_path)],
            "eval": ["eval", "--model", "tiny"]}[command]
    assert main([*base, "--heldout", str(tmp_path), "--out", str(tmp_path / "out"), *extra]) == 2
    assert cli_stderr(capsys.readouterr().err) == f"slapgen {command}: {message}"
    assert not (tmp_path / "out").exists()


def test_memory_is_written_in_the_unit_people_read():
    """Guards a tiny model's worker told it needs "0.0 GiB" of memory: below a GiB the sentence says MiB."""
    from trainer.ray_cluster import memory_text

    assert memory_text(20 * 2 ** 30) == "20.0 GiB"
    assert memory_text(3.25 * 2 ** 20) == "3.2 MiB"
    assert memory_text(2 ** 30 - 1) == "1024.0 MiB"


@pytest.mark.parametrize("address,said", [
    ("garbage", "--ray garbage: not the address of a Ray cluster; give HOST:PORT of its head"),
    ("http://127.0.0.1:8265", "--ray http://127.0.0.1:8265: not the address of a Ray cluster (http://HOST:8265 is the "
                              "dashboard's, which `ray job submit` takes); give HOST:PORT"),
    ("head:port", "--ray head:port: not the address of a Ray cluster; give HOST:PORT"),
    ("ray://127.0.0.1:10001", "--ray ray://127.0.0.1:10001: Ray Client (ray://) addresses are not supported"),
])
def test_an_address_slapgen_cannot_use_is_one_sentence(monkeypatch, address, said):
    """Guards a walk-through's finds: `--ray garbage` and the dashboard's `http://HOST:8265` (what `ray job submit`
    takes) ended in Ray's ValueError and a traceback; `ray://` (Ray Client) was taken, and its gRPC forks wrote into
    the video decoder's output, dropping a good clip as corrupt in 2 of 7 sweeps. Each is one sentence, before
    ray.init."""
    import ray

    def never(**kwargs):
        raise AssertionError("ray.init reached")

    monkeypatch.setattr(ray, "init", never)
    with pytest.raises(ClusterError) as error:
        with ray_cluster.connect(address):
            pass
    assert str(error.value).startswith(said) and "\n" not in str(error.value), str(error.value)


def test_a_cluster_address_where_nothing_listens_is_one_sentence_at_once(monkeypatch, tmp_path):
    """Guards a silent 14-minute hang: ray.init retries an address where nothing listens 20 times (~40 s each)
    before it raises. `--ray HOST:PORT` with no cluster there, and `--ray auto` when the cluster `ray start` last
    recorded on this machine has died without `ray stop` (its address still in RAY_TMPDIR), are one sentence each
    within seconds, and ray.init is never reached."""
    import time

    import ray
    from ray._private import services

    from tests.conftest import free_port

    def never(**kwargs):
        raise AssertionError("ray.init reached")

    monkeypatch.setattr(ray, "init", never)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ClusterError) as error:
        with ray_cluster.connect(f"127.0.0.1:{port}"):
            pass
    # Named as typed: Ray resolves 127.0.0.1 to this machine's address, which alone read as a typo of the user's.
    assert re.match(rf"--ray 127\.0\.0\.1:{port}: no Ray cluster answers at that address \(nothing answers at "
                    rf"127\.0\.0\.1:{port}(?: \(which Ray resolves to \S+:{port}\))?: ", str(error.value)), str(error.value)
    assert "Connection refused" in str(error.value)

    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")  # what `ray start --head` records
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])  # no other cluster running on this machine
    with pytest.raises(ClusterError) as error:
        with ray_cluster.connect("auto"):
            pass
    resolved = services.canonicalize_bootstrap_address(f"127.0.0.1:{port}")  # Ray names this machine by its IP
    assert str(error.value) == (f"--ray auto: the cluster last started on this machine, at {resolved}, does not answer "
                                "([Errno 111] Connection refused): it stopped without `ray stop` or its head died; "
                                "start one with `ray get-auth-token --generate` and `RAY_AUTH_MODE=token ray start "
                                "--head` (and `RAY_AUTH_MODE=token ray start --address HEAD_IP:6379` on every other "
                                "node, the head's ~/.ray/auth_token copied to it), or use --ray local for one of this "
                                "machine")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(("command", "advice"), [
    ("sweep", "rerun the same command: finished runs are kept, the others resume from their latest checkpoint"),
    ("train", "rerun the same command: the clips encoded so far are kept"),  # no checkpoint: no --resume
])
def test_ctrl_c_says_how_to_continue_with_an_option_the_command_has(command, advice, monkeypatch, demo_dataset, tmp_path,
                                                                    capsys):
    """Guards a Ctrl-C of `slapgen sweep --ray` (or of any sweep) advising `--resume latest`, an option only
    `slapgen train` has (a sweep given it stops on an unknown option): each command's own way to continue."""
    import trainer.sweep.sweep
    import trainer.train
    from trainer.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.sweep.sweep, "run_sweep", interrupted)
    monkeypatch.setattr(trainer.train, "train", interrupted)
    argv = {"sweep": ["sweep", "--config", "tiny-smoke", "--grid", "lora.rank=4", "--heldout", str(demo_dataset)],
            "train": ["train", "--config", "tiny-smoke"]}[command]  # a dataset: the sweep's check reads it first
    assert main([*argv, "--data", str(demo_dataset), "--out", str(tmp_path / "out")]) == 130
    assert cli_stderr(capsys.readouterr().err) == f"slapgen {command}: interrupted; finished work is kept ({advice})"


def test_the_cluster_a_command_joined_is_named_with_what_its_live_nodes_offer(monkeypatch):
    """Guards `--ray auto` joining a cluster without saying which: it takes RAY_ADDRESS, the cluster last started
    here, or any running on this machine (another user's too), and the sweep said only "2 runs as Ray tasks". The
    line names the live nodes' addresses and sums their CPUs and GPUs (a dead node counts for nothing)."""
    head = node(cpus=0)
    worker = dict(node(cpus=8, gpus=2), NodeManagerAddress="10.0.0.2")
    dead = dict(node(cpus=8, gpus=1, alive=False), NodeManagerAddress="10.0.0.3")
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: FakeRay([head, worker, dead]))
    assert ray_cluster.cluster_line() == "Ray cluster of 2 live node(s) at 10.0.0.1, 10.0.0.2: 8 CPUs, 2 GPUs"


def test_ray_local_leaves_no_token_in_home_for_later_ray_start(monkeypatch, tmp_path):
    """Guards `--ray local` breaking README's `ray start` recipe afterwards: Ray 2.60's ray.init wrote a token to
    ~/.ray/auth_token for the cluster it started, the next `ray start --head` on the machine found it and turned
    token authentication on, and `ray start --address` (which sends none) never joined; a driver given HOST:PORT
    was refused after 25 s as "no Ray cluster answers". ray.init now runs with a token of the command's own in its
    environment (what Ray reads first, so it writes no file), removed afterwards; a token of the user's is left
    to Ray."""
    import ray

    seen = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.append(os.environ.get("RAY_AUTH_TOKEN")))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    with ray_cluster.connect("local"):
        assert os.environ["RAY_AUTH_TOKEN"] == seen[0]
    assert len(seen[0]) == 64 and int(seen[0], 16) >= 0  # 256 bits in hex, as Ray's generator makes them
    assert "RAY_AUTH_TOKEN" not in os.environ and not (tmp_path / ".ray").exists()

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("the user's")
    with ray_cluster.connect("local"):
        pass
    assert seen[1] is None and "RAY_AUTH_TOKEN" not in os.environ


def test_joining_a_cluster_tries_its_gcs_for_seconds_not_twenty_unless_told(monkeypatch):
    """Guards a cluster that refuses this driver (token authentication, no token sent) being said only after Ray's 20
    one-second tries at its GCS, meant for a GCS still starting (the port answered already): the join sets Ray's
    own RAY_gcs_server_port_wait_time_s to JOIN_TRIES for ray.init and removes it after; a value the user set is
    left as it is."""
    from trainer.ray_cluster import GCS_WAIT_SETTING, JOIN_TRIES, _gcs_join_tries

    monkeypatch.delenv(GCS_WAIT_SETTING, raising=False)
    with _gcs_join_tries(JOIN_TRIES):
        assert os.environ[GCS_WAIT_SETTING] == str(JOIN_TRIES) and JOIN_TRIES < 20
    assert GCS_WAIT_SETTING not in os.environ
    monkeypatch.setenv(GCS_WAIT_SETTING, "60")
    with _gcs_join_tries(JOIN_TRIES):
        assert os.environ[GCS_WAIT_SETTING] == "60"
    assert os.environ[GCS_WAIT_SETTING] == "60"


def test_a_cluster_address_is_named_as_typed_with_rays_resolution_beside_it():
    """Guards a sentence naming only the address Ray resolved (it turns 127.0.0.1 into this machine's address), which
    a walk-through read as a typo of its own: the address as typed, then Ray's; `auto` is named by what it found."""
    assert ray_cluster._as_given("127.0.0.1:6399", "192.0.2.2:6399") == "127.0.0.1:6399 (which Ray resolves to 192.0.2.2:6399)"
    assert ray_cluster._as_given("10.0.0.4:6379", "10.0.0.4:6379") == "10.0.0.4:6379"
    assert ray_cluster._as_given("auto", "10.0.0.4:6379") == "10.0.0.4:6379"
    assert ray_cluster._as_given("ray://head:10001", None) == "ray://head:10001"


def test_a_ray_task_takes_sigint_back_from_a_node_started_ignoring_it():
    """Guards Ray's cancel without force (a stopped driver's request to each task, delivered as a SIGINT) doing
    nothing in the worker of a node started in the background by a script (`ray start ... &`, SIGINT ignored and
    inherited), so the driver waited for the whole run: a task sets SIGINT back to Python's default, and leaves a
    handler of its own."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray_cluster.interruptible_task()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        def own(signum, frame):
            pass

        signal.signal(signal.SIGINT, own)
        ray_cluster.interruptible_task()
        assert signal.getsignal(signal.SIGINT) is own
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_failed_tasks_error_says_what_happened_to_it():
    """Guards a Ray task cancelled from outside the command (`ray.cancel`, its job stopped) reported as
    "TaskCancelledError after 3 retries: " (Ray never runs a cancelled task again, and its message is empty): it
    says it was cancelled; a worker that died is said with the retries Ray made; a task whose own work raised is
    said by that error, without Ray's wrapping."""
    import ray.exceptions

    from slapgen.errors import SlapgenError

    cancelled = ray_cluster.task_failure(ray.exceptions.TaskCancelledError(), retries=3)
    assert cancelled == ("TaskCancelledError: its Ray task was cancelled from outside this command (Ray runs again "
                         "only a task whose worker or node was lost)")
    crashed = ray_cluster.task_failure(ray.exceptions.WorkerCrashedError(), retries=3)
    assert crashed == f"WorkerCrashedError after 3 retries: {str(ray.exceptions.WorkerCrashedError())}"
    assert ray_cluster.task_failure(ray.exceptions.RayTaskError("run_cell", "trace", ValueError("bad lr")), 3) == \
        "ValueError: bad lr"
    assert ray_cluster.task_failure(ray.exceptions.RayTaskError("run_cell", "trace", SlapgenError("no clips")), 3) == \
        "no clips"
