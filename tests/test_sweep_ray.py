"""`slapgen sweep --ray` on real Ray clusters of this machine: a 2 x 1 sweep on a cluster of a head and a
second node (each `ray start` in its own session), the second node SIGKILLed while it trains a cell past
its first checkpoint; the sweep ends with the results.csv and the bit-identical LoRAs of the same sweep
uninterrupted (`--ray local`: a cluster of its own). And the sentences of the options' misuses.

Every cluster here is this test's: its own RAY_TMPDIR, free ports, and it is ended by killing its
processes (each node's session, then anything left carrying the test's mark), never with `ray stop`,
which would stop every Ray cluster of this user on the machine."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, cli_stderr, free_port, offline_env, process_environments, tiny_train_overrides
from trainer.lora import LORA_FILENAME
from trainer.sweep.ray_runs import ATTEMPT_MARK

STEPS = 24  # long enough that the poll below (every 50 ms) sees a cell between checkpoints and its LoRA
# Small and fast: 32x32, one frame; a checkpoint every 2 steps, so a cell is killed with steps left to resume.
FIXED = ("data.height=32", "data.width=32", "data.num_frames=1", "data.max_clips=2", f"train.max_train_steps={STEPS}",
         "checkpoint.every_steps=2", "checkpoint.keep_last=20", "train.gradient_checkpointing=false")
RAY = str(Path(sys.executable).parent / "ray")
MARK = "SLAPGEN_TEST_RAY_CLUSTER"


def sweep_command(tiny_cache_dir: Path, data: Path, heldout: Path, out: Path, ray: str) -> list[str]:
    command = [sys.executable, "-m", "trainer", "sweep", "--config", "tiny-smoke", "--grid", "optim.learning_rate=1e-3,1e-2",
               "--grid", "lora.rank=4", "--data", str(data), "--heldout", str(heldout), "--out", str(out),
               "--ray", ray, "--gpus-per-run", "0"]
    for item in tiny_train_overrides(tiny_cache_dir, *FIXED):
        command += ["--set", item]
    return command


def _marked_pids(mark: str) -> list[int]:
    return [pid for pid, environment in process_environments() if f"{MARK}={mark}".encode() in environment]


def _start_node(env: dict, *args: str, wrap: tuple[str, ...] = (), cpus: int = 1) -> int:
    """`ray start ARGS` of a node of `cpus` CPUs (run by `wrap`, when given) in a session of its own; returns that
    session's process group, which every daemon of the node (raylet, agents; GCS on the head) stays in after
    `ray start` returns."""
    # Workers' ports chosen at random (0 and 0), not lowest-first in 10002-19999, which another pytest process's
    # cluster hands out too
    starting = subprocess.Popen([*wrap, RAY, "start", "--num-cpus", str(cpus), "--disable-usage-stats",
                                 "--dashboard-agent-listen-port", str(free_port()), "--min-worker-port", "0",
                                 "--max-worker-port", "0", *args],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, _ = starting.communicate(timeout=300)
    assert starting.returncode == 0, output[-3000:]
    return starting.pid  # start_new_session: the session's (and its process group's) id is the pid of `ray start`


@contextmanager
def two_node_cluster(root_env: dict, worker_wrap: tuple[str, ...] = (), head_cpus: int = 1, second_node: bool = True):
    """A head of `head_cpus` CPUs and (unless not `second_node`) a second node of one CPU (its `ray start` run by
    `worker_wrap`); yields (address, env for drivers, process group of each node)."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths live under it
    env = {**root_env, "RAY_TMPDIR": temp, MARK: temp}
    port = free_port()
    groups = {}
    try:
        groups["head"] = _start_node(env, "--head", "--port", str(port), "--include-dashboard", "false",
                                     "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()),
                                     cpus=head_cpus)
        if second_node:
            groups["worker"] = _start_node(env, "--address", f"127.0.0.1:{port}", wrap=worker_wrap)
        yield f"127.0.0.1:{port}", env, groups
    finally:
        for group in groups.values():
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in _marked_pids(temp):  # task workers: their own sessions, ended with their raylet; anything left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def attempts(run: Path) -> list[tuple[str, int]]:
    """(node id, pid) of each attempt at a cell, from its sweep.log."""
    log = run / "sweep.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [(node, int(pid)) for node, pid in re.findall(rf"{ATTEMPT_MARK} (\w+) \(\S+\), pid (\d+)", text)]


def _on_node(pid: int, group: int) -> bool:
    """Whether the task worker `pid` was started by the raylet of the node whose daemons are in `group`."""
    import psutil

    try:
        return os.getpgid(psutil.Process(pid).ppid()) == group
    except (psutil.Error, ProcessLookupError):
        return False


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(json.loads(path.read_text())["step"] for path in run.glob("checkpoints/*/trainer_state.json"))


@pytest.mark.slow
def test_a_node_killed_mid_run_leaves_the_results_of_an_uninterrupted_sweep(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards the cluster path: a cell whose node dies not retried (the sweep fails or hangs), a retry that
    trains from step 0 instead of the cell's latest checkpoint or lands on the dead node, and a sweep whose
    results.csv or LoRAs differ from those of the same sweep without the kill (compared tensor by tensor,
    exactly); and a driver without one bar for the whole sweep with its ETA."""
    from trainer.demo_data import write_demo_dataset

    heldout = tmp_path / "heldout"
    write_demo_dataset(heldout, clips=1, seed=7)
    env = offline_env(tmp_path, HOME=str(tmp_path / "home"))  # its own ~/.ray (see test_eval_ray)
    reference_out = tmp_path / "reference"
    # The uninterrupted sweep, meanwhile, on a cluster of its own that the sweep starts and stops (--ray local).
    reference = subprocess.Popen(sweep_command(tiny_cache_dir, demo_dataset, heldout, reference_out, "local"), cwd=REPO_ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with two_node_cluster(env) as (address, cluster_env, groups):
            out = tmp_path / "killed"
            # every redraw of the bar as a line (a file otherwise gets one per 30 s): the test reads a mid-run state
            driver_env = {**cluster_env, "RAY_ADDRESS": address, "TQDM_MININTERVAL": "0"}
            with (tmp_path / "driver.out").open("w") as stdout, (tmp_path / "driver.err").open("w") as stderr:
                driver = subprocess.Popen(sweep_command(tiny_cache_dir, demo_dataset, heldout, out, "auto"), cwd=REPO_ROOT,
                                          env=driver_env, stdout=stdout, stderr=stderr, text=True)
                victim = None
                deadline = time.monotonic() + 600
                while victim is None and driver.poll() is None and time.monotonic() < deadline:
                    for run in sorted((out / "runs").glob("*")):
                        tried = attempts(run)
                        if (len(tried) == 1 and _on_node(tried[0][1], groups["worker"]) and _checkpoint_steps(run)
                                and not (run / LORA_FILENAME).exists()):
                            os.killpg(groups["worker"], signal.SIGKILL)  # the node: its raylet and agents
                            os.kill(tried[0][1], signal.SIGKILL)  # and its task's worker, at once, as a dead machine
                            victim = run
                            break
                    time.sleep(0.05)
                assert victim is not None, (tmp_path / "driver.err").read_text()[-3000:]
                at_kill = {"checkpoints": _checkpoint_steps(victim), "lora": (victim / LORA_FILENAME).exists()}
                driver.wait(timeout=600)
            assert driver.returncode == 0, (tmp_path / "driver.err").read_text()[-3000:]
        reference_output, _ = reference.communicate(timeout=600)
        assert reference.returncode == 0, reference_output[-3000:]
    finally:
        if reference.poll() is None:  # Ctrl-C: the sweep stops the cluster it started and removes its folder
            reference.send_signal(signal.SIGINT)
            try:
                reference.wait(timeout=60)
            except subprocess.TimeoutExpired:
                reference.kill()

    assert at_kill["checkpoints"] and max(at_kill["checkpoints"]) < STEPS and not at_kill["lora"]
    (first_node, _), (second_node, _) = attempts(victim)  # exactly two attempts: the killed one and its retry
    assert second_node != first_node  # the retry ran on the head, not on the dead node
    log = (victim / "sweep.log").read_text()
    # Where each run logs, as a path from where the driver ran (its --out), so it can be copied.
    assert f"each run logs to {out / 'runs' / 'NAME' / 'sweep.log'}" in (tmp_path / "driver.out").read_text() + \
        (tmp_path / "driver.err").read_text()
    resumed = re.search(r"resumed from \S*/checkpoints/checkpoint-(\d+) at step (\d+)", log)
    assert resumed, log[-3000:]
    assert int(resumed.group(2)) >= max(at_kill["checkpoints"])  # from its latest checkpoint, not from step 0
    assert [json.loads(line)["step"] for line in (victim / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, STEPS + 1))

    assert (out / "results.csv").read_text() == (reference_out / "results.csv").read_text()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["optim.learning_rate"] for row in rows] == ["0.001", "0.01"]
    for run in sorted((reference_out / "runs").iterdir()):
        expected, got = load_file(run / LORA_FILENAME), load_file(out / "runs" / run.name / LORA_FILENAME)
        assert expected.keys() == got.keys() and expected
        assert all(torch.equal(expected[key], got[key]) for key in expected), run.name

    progress = (tmp_path / "driver.err").read_text().replace("\r", "\n")
    assert re.search(rf"ETA \d\d:\d\d\] \| (?:run [12]/2 \S+|2 runs training: .*) step \d+/{STEPS}", progress), \
        progress[-2000:]
    # The README's command continues each sweep where its runs ran (without --ray, the rest of a cluster sweep
    # would train one run after another on the machine that runs it).
    for folder, ray in ((reference_out, "local"), (out, "auto")):
        command = re.search(r"```bash\n(.*)\n```", (folder / "README.md").read_text()).group(1)
        assert shlex.split(command)[-4:] == ["--ray", ray, "--gpus-per-run", "0"], command


@pytest.mark.slow
def test_a_sweep_on_ray_stopped_by_sigterm_lets_each_run_checkpoint_the_step_it_ended(tiny_cache_dir, demo_dataset,
                                                                                        tmp_path):
    """Guards Ctrl-C or SIGTERM to a Ray sweep's driver cancelling its runs' tasks by force, which lost each run's
    steps since its last periodic checkpoint (the sweep without Ray lets each run save its step): the driver of a
    sweep on its own Ray cluster (`--ray local`), sent SIGTERM once both runs have logged steps between periodic
    checkpoints (none is due), asks each task to stop as a Ctrl-C asks training, waits for it and exits 143; each
    run's one checkpoint is the last step it logged."""
    from trainer.demo_data import write_demo_dataset

    if (os.cpu_count() or 1) < 2:
        pytest.skip("both runs train at once on a cluster of this machine's CPUs, one each")
    heldout = tmp_path / "heldout"
    write_demo_dataset(heldout, clips=1, seed=7)
    out = tmp_path / "sweep"
    command = [*sweep_command(tiny_cache_dir, demo_dataset, heldout, out, "local"), "--set", "train.max_train_steps=5000",
               "--set", "checkpoint.every_steps=5000", "--set", "logging.every_steps=1"]
    env = offline_env(tmp_path, HOME=str(tmp_path / "home"))  # its own ~/.ray (see test_eval_ray)
    driver = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def logged(run: Path) -> list[int]:
        metrics = run / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return [json.loads(line)["step"] for line in lines if line.endswith("}")]

    try:
        deadline = time.monotonic() + 600
        while not (len(runs := sorted((out / "runs").glob("*"))) == 2 and all(len(logged(run)) >= 3 for run in runs)):
            if driver.poll() is not None or time.monotonic() > deadline:
                driver.kill()
                pytest.fail(driver.communicate()[1][-3000:])
            time.sleep(0.1)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGINT)  # a second stop: the tasks at once, the cluster it started stopped
            try:
                driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                driver.kill()
    assert driver.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM; finished work is kept" in cli_stderr(err), err[-3000:]
    for run in runs:
        steps = logged(run)
        assert _checkpoint_steps(run) == [steps[-1]] and 3 <= steps[-1] < 5000, (run.name, steps[-3:],
                                                                                  (run / "sweep.log").read_text()[-2000:])


# A driver connected to a cluster of its own, in a Ray call (not the tasks' wait) when it is sent SIGTERM
DRIVER_IN_A_RAY_CALL = r"""
import time
import ray
from trainer.interrupt import StopRequested
from trainer.ray_cluster import connect

def sleep(seconds):
    time.sleep(seconds)

try:
    with connect("local"):
        ref = ray.remote(num_cpus=0)(sleep).remote(300)
        print("in ray.get", flush=True)
        ray.get(ref)
except StopRequested as stop:
    print(f"stopped by {stop.signum}", flush=True)
"""


def test_a_sigterm_to_a_ray_driver_outside_its_tasks_wait_stops_it_as_ctrl_c_does(tmp_path):
    """Guards SIGTERM (a scheduler's stop) to a Ray driver anywhere but its tasks' wait (the sweep's encoding, eval's
    held-out losses, a Ray call in between) meeting ray.init's own handler: the driver exited at once without a
    word, or aborted inside a Ray call (-6). While connected, SIGTERM raises `StopRequested(SIGTERM)` (what the
    command reports as "stopped by SIGTERM" and exits 143 for: `slapgen`'s stop tests), here out of `ray.get`, and
    the driver then ends on its own (the cluster it started stopped)."""
    import selectors

    env = offline_env(tmp_path, HOME=str(tmp_path / "home"))  # its own ~/.ray (see test_eval_ray)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER_IN_A_RAY_CALL], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as ready:
            ready.register(driver.stdout, selectors.EVENT_READ)
            assert ready.select(timeout=300), "the driver did not reach ray.get within 300 s"
        assert driver.stdout.readline() == "in ray.get\n", driver.communicate()[1][-3000:]
        time.sleep(1)
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGINT)  # a stop Ray's driver handles: the cluster it started stopped
            try:
                driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()
    assert (driver.returncode, out) == (0, f"stopped by {int(signal.SIGTERM)}\n"), err[-3000:]


@pytest.mark.slow
def test_a_node_that_does_not_see_the_sweep_folder_stops_the_sweep_with_one_sentence(tiny_cache_dir, demo_dataset,
                                                                                       tmp_path):
    """Guards a cluster whose second node has its own, empty folder where the driver's sweep folder is (a local
    disk instead of the shared one): without the start-up check its runs would train into a folder nobody reads
    and the sweep would report from nothing. The node is given a mount namespace of its own (`unshare -m`) in
    which an empty folder is bind-mounted over the folder that holds --out; the sweep stops before any run with
    one sentence naming that node, and what else it lacks (the held-out set: a walk-through was told of the
    folder alone, and learnt of the rest on its second try). Likewise for the held-out set alone (the second
    sweep, on the same cluster at once): a walk-through's runs on such a node failed one by one, after the cache
    was encoded, as "dataset ... does not exist (... `slapgen demo-data` makes a small one)"."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m (a mount namespace of its own for the second node) is not permitted here")
    from trainer.demo_data import write_demo_dataset

    shared, empty = tmp_path / "shared", tmp_path / "empty"
    shared.mkdir()
    empty.mkdir()
    heldout = shared / "heldout"  # with --out hidden too: all a node lacks is said at once
    write_demo_dataset(heldout, clips=1, seed=7)
    local_disk = ("unshare", "-m", "--propagation", "private", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"',
                  "sh", str(empty), str(shared))
    outs = {"out": shared / "sweep", "heldout": tmp_path / "sweep"}
    data = {"out": demo_dataset, "heldout": heldout}  # heldout: one folder for both options, named by both, once
    with two_node_cluster(offline_env(tmp_path, HOME=str(tmp_path / "home")), worker_wrap=local_disk) as (address, cluster_env, groups):
        sweeps = {hidden: subprocess.Popen(sweep_command(tiny_cache_dir, data[hidden], heldout, outs[hidden], "auto"),
                                           cwd=REPO_ROOT, env={**cluster_env, "RAY_ADDRESS": address},
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for hidden in ("out", "heldout")}
        try:
            stderrs = {hidden: sweep.communicate(timeout=600)[1] for hidden, sweep in sweeps.items()}
        finally:
            for sweep in sweeps.values():
                if sweep.poll() is None:
                    sweep.kill()
                    sweep.wait()
    said = {"out": (rf"the sweep folder {re.escape(str(outs['out']))} is not the same folder on Ray node\(s\) \S+ "
                    r"\(node \w{8}\) \(no sweep.json there, or another one\): put --out on storage every node mounts at "
                    r"the same path \(NFS or a shared disk\); nor does every node see what the tasks read: \S+ "
                    rf"\(node \w{{8}}\) has no --heldout {re.escape(str(heldout))}"),
            "heldout": (rf"not every Ray node sees what the tasks read: \S+ \(node \w{{8}}\) has no --data and --heldout "
                        rf"{re.escape(str(heldout))}; put it on storage every node mounts at the same path, as the "
                        "output folder")}
    for hidden, sweep in sweeps.items():
        assert sweep.returncode == 2, stderrs[hidden][-3000:]
        assert re.fullmatch(f"slapgen sweep: {said[hidden]}", cli_stderr(stderrs[hidden])), stderrs[hidden][-3000:]
        out = outs[hidden]
        assert not (out / "runs").exists() and not (out / "latent-cache").exists()  # stopped before any encoding or run


@pytest.mark.slow
def test_a_cluster_with_token_authentication_says_how_to_send_the_token(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards a walk-through's "--ray HOST:PORT: no Ray cluster answers at that address (Failed to connect ...)" from
    a head that did answer but requires a token (Ray 2.60's token authentication; the real reason only in a Ray log
    line above): a head started with a token, a driver without one, and the sentence says what to set."""
    import secrets

    head_env = offline_env(tmp_path, HOME=str(tmp_path / "home"), RAY_AUTH_MODE="token",
                           RAY_AUTH_TOKEN=secrets.token_hex(32))
    with two_node_cluster(head_env, second_node=False) as (address, cluster_env, _):
        driver_env = {name: value for name, value in cluster_env.items() if not name.startswith("RAY_AUTH_")}
        done = subprocess.run(sweep_command(tiny_cache_dir, demo_dataset, demo_dataset, tmp_path / "sweep", address),
                              cwd=REPO_ROOT, env=driver_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "InvalidAuthToken" in done.stderr  # the cluster did refuse the token, as Ray logs it
    last = done.stderr.strip().splitlines()[-1]
    # The address as typed first (Ray resolves 127.0.0.1 to this machine's address, which read as a typo alone).
    assert re.fullmatch(rf"slapgen sweep: --ray {re.escape(address)}: something answers at {re.escape(address)} "
                        rf"(?:\(which Ray resolves to \S+:{address.rsplit(':')[1]}\) )?but Ray could not join it \(.+\); "
                        r"if it is a cluster with token authentication \(its head was started with RAY_AUTH_MODE=token, "
                        r"or without it `ray start --head` said `Token authentication is enabled`\), run with "
                        r"RAY_AUTH_MODE=token and the head's ~/.ray/auth_token in this machine's ~/.ray/ \(README: "
                        r"Sweeps on a Ray cluster\)", last), done.stderr[-3000:]
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_runs_no_node_can_run_stop_the_sweep_after_node_wait(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards issue 21's silent stall on a real cluster: a head that runs no tasks (`--num-cpus 0`, as the KubeRay
    example's) and no worker node (not joined yet, or dead): Ray queues the runs forever and the sweep's bar stood
    still without a word. The sweep says once that the runs wait for such a node, then stops after --node-wait
    (2 s) with one sentence, before any run started."""
    from trainer.demo_data import write_demo_dataset

    heldout = tmp_path / "heldout"
    write_demo_dataset(heldout, clips=1, seed=7)
    out = tmp_path / "sweep"
    with two_node_cluster(offline_env(tmp_path, HOME=str(tmp_path / "home")), head_cpus=0,
                          second_node=False) as (address, cluster_env, _):
        done = subprocess.run([*sweep_command(tiny_cache_dir, demo_dataset, heldout, out, "auto"), "--node-wait", "2"],
                              cwd=REPO_ROOT, env={**cluster_env, "RAY_ADDRESS": address}, capture_output=True,
                              text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    said = "no node of the Ray cluster has a CPU along with the rest a run asks for"
    assert done.stderr.strip().splitlines()[-1] == (f"slapgen sweep: stopped after 2 s (--node-wait) without a live node that can "
                                       f"run the runs: {said}; rerun once such a node has joined (`ray start "
                                       f"--num-cpus` sets it)")
    assert (done.stdout + done.stderr).count(f"{said}; the runs wait until such a node joins (at most 2 s") == 1
    assert not list((out / "runs").glob("*/sweep.log"))  # no run started


@pytest.mark.slow
def test_ray_local_without_the_gpus_a_run_asks_for_is_one_sentence(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards `--ray local` on a machine without GPUs and the default --gpus-per-run 1: Ray would queue every run
    forever for a GPU no node has. Stops with one sentence before the folder is written."""
    out = tmp_path / "sweep"
    command = sweep_command(tiny_cache_dir, demo_dataset, demo_dataset, out, "local")
    del command[command.index("--gpus-per-run"):command.index("--gpus-per-run") + 2]
    done = subprocess.run(command, cwd=REPO_ROOT, env=offline_env(tmp_path, CUDA_VISIBLE_DEVICES="", HOME=str(tmp_path / "home")),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert cli_stderr(done.stderr) == ("slapgen sweep: no node of the Ray cluster has 1 GPU(s) for a run (the most a "
                                       "node has is 0); use --gpus-per-run 0 on a machine without GPUs")
    assert not out.exists()


@pytest.mark.parametrize("ray, gpus, node_wait", [(None, 1.0, 1800.0), ("auto", 1.0, 1800.0), ("local", 0.0, 1800.0),
                                                  ("10.0.0.5:6379", 0.3333333, 1234567.0)])
def test_the_readme_command_runs_the_rest_of_the_sweep_where_it_ran(ray, gpus, node_wait):
    """Guards the sweep README's command (which "continues the sweep") dropping --ray and --gpus-per-run: run as
    written, the rest of a cluster sweep would train one run after another on the machine that runs it. The words
    it adds, parsed by slapgen's own command line, give back where the sweep ran; nothing for a sweep here."""
    from trainer.cli import build_parser
    from trainer.ray_cluster import check_gpus_option, check_node_wait_option
    from trainer.sweep.report import execution_words

    words = execution_words(ray, gpus, node_wait)
    args = build_parser().parse_args(["sweep", "--config", "c", "--grid", "lora.rank=4", "--data", "d", "--heldout", "h",
                                      "--out", ".", *words])
    assert args.ray == ray
    assert check_gpus_option(args.gpus_per_run, args.ray, "") == gpus
    assert check_node_wait_option(args.node_wait, args.ray, "") == node_wait
    assert ("--node-wait" in words) == (node_wait != 1800.0)
    assert ray is None or words[words.index("--gpus-per-run") + 1] in ("0", "1", "0.3333333")  # exact, no 1.0 / 0.333333


def test_gpus_per_run_without_ray_and_a_negative_count_are_one_sentence(tmp_path, capsys):
    """Guards --gpus-per-run silently ignored without --ray (the sweep would run on this machine's GPUs as if
    it had not been given) and a negative GPU count reaching Ray."""
    from trainer.cli import main

    base = ["sweep", "--config", "tiny-smoke", "--grid", "lora.rank=4", "--data", str(tmp_path), "--heldout",
            str(tmp_path), "--out", str(tmp_path / "out")]
    assert main([*base, "--gpus-per-run", "1"]) == 2
    assert cli_stderr(capsys.readouterr().err) == ("slapgen sweep: --gpus-per-run applies to --ray only: without it the "
                                                   "sweep runs one run per GPU of this machine")
    assert main([*base, "--ray", "local", "--gpus-per-run", "-1"]) == 2
    assert cli_stderr(capsys.readouterr().err) == "slapgen sweep: --gpus-per-run must be 0 (a CPU-only cluster) or more, not -1"
    assert not (tmp_path / "out").exists()


def test_ray_auto_without_a_cluster_and_ray_missing_are_one_sentence(monkeypatch, tmp_path):
    """Guards Ray's own ConnectionError (or an ImportError) reaching the user as a traceback: --ray auto with no
    cluster says so and how to start one; --ray without Ray installed says how to install it. No cluster is here
    for Ray to find: another test's, running meanwhile in another pytest process, would answer `auto`."""
    import ray
    from ray._private import services

    from trainer.errors import ClusterError
    from trainer.ray_cluster import connect

    def no_cluster(**kwargs):  # what ray.init(address="auto") raises with no RAY_ADDRESS and no cluster here
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no cluster recorded as started here
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])  # none running on this machine
    with pytest.raises(ClusterError, match=r"^--ray auto found no Ray cluster: RAY_ADDRESS is not set and none runs on "
                                         r"this machine; start one with `ray get-auth-token --generate` and `RAY_AUTH_MODE=token ray start --head`"):
        with connect("auto"):
            pass
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ClusterError, match=r"^--ray needs Ray, which is not installed here: pip install -e '\.\[ray\]'"):
        with connect("auto"):
            pass


def test_a_node_with_other_code_or_libraries_refuses_its_cell():
    """Guards a walk-through's finding: a sweep on Ray compared only sweep.json between the driver and the nodes
    (`slapgen eval --ray` compared code and libraries), so a node with another checkout or another diffusers would
    train its runs with other code, silently. A cell whose node's slapgen code or library versions differ from the
    driver's refuses to run, naming what differs; the same identity is no difference, and local version labels
    (+cpu against +cu128: a CPU head drives GPU nodes) are not in it."""
    from trainer.errors import SweepError
    from trainer.sweep.ray_runs import identity_mismatch, node_identity, run_cell

    here = node_identity()
    assert identity_mismatch(here, here) is None
    assert "+" not in here["versions"]["torch"] and "ffmpeg" not in here["versions"]
    other_code = {**here, "code": "0" * 64}
    with pytest.raises(SweepError, match=r"cannot run 00-a: slapgen's code differs from the driver's"):
        run_cell("/nonexistent-sweep", "00-a", "cpu", "digest", other_code)
    other_diffusers = {**here, "versions": {**here["versions"], "diffusers": "0.1.0"}}
    with pytest.raises(SweepError, match=rf"libraries differ: diffusers {here['versions']['diffusers']} \(the driver "
                                         r"has 0\.1\.0\); give every node the same slapgen and libraries"):
        run_cell("/nonexistent-sweep", "00-a", "cpu", "digest", other_diffusers)
