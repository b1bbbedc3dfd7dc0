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

Connecting and the start-up checks are `trainer.ray_cluster`'s (eval's --ray uses them too). Ray is an
extra (`pip install -e '.[ray]'`): it is imported only inside these functions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from trainer import ray_cluster
from trainer.errors import SweepError
from trainer.ray_cluster import file_digest
from trainer.sweep.folder import DEFINITION_FILE, RUNS_DIR

MAX_RETRIES = 3  # system failures (a worker or node died) per cell; each retry resumes from the latest checkpoint
ATTEMPT_MARK = "sweep cell attempt on Ray node"


def definition_digest(out: str) -> str | None:
    """sha256 of OUT/sweep.json as this node reads it; None when it has none."""
    return file_digest(str(Path(out) / DEFINITION_FILE))


def not_shared_sentence(out: Path, nodes: list[str]) -> str:
    return (f"the sweep folder {out} is not the same folder on Ray node(s) {', '.join(nodes)} (no {DEFINITION_FILE} "
            f"there, or another one): put --out on storage every node mounts at the same path (NFS or a shared disk)")


def check_shared_folder(out: Path, data: Path, heldout: Path) -> None:
    """Every live node reads the same OUT/sweep.json as this driver and has the data and held-out set the runs
    read, or one sentence naming the nodes that do not."""
    out = Path(out).resolve()
    ray_cluster.check_shared_folder(out / DEFINITION_FILE, lambda nodes: not_shared_sentence(out, nodes),
                                    {"--data": Path(data), "--heldout": Path(heldout)})


# What a run's numbers come from besides its sweep.json: slapgen's code (all of it: training, the engine, eval) and
# the libraries' versions. Every node must have the driver's, or its runs' LoRAs and metrics are another code's.
SWEEP_CODE = ("slapgen", "trainer", "prompts")


def node_identity() -> dict:
    """This node's slapgen code and library versions, as a cell compares them with the driver's: public versions
    only (a CPU head driving GPU nodes has torch 2.13.0+cpu where they have +cu128, and the numbers are made on
    the nodes), and not ffmpeg's build (imageio-ffmpeg's version names the one it brings)."""
    from trainer.evaluate.recipes import code_digest, versions

    return {"code": code_digest(SWEEP_CODE),
            "versions": {name: version.split("+")[0] if version else version
                         for name, version in versions().items() if name != "ffmpeg"}}


def identity_mismatch(here: dict, driver: dict) -> str | None:
    """What of this node's `node_identity` differs from the driver's, in words; None when nothing does."""
    if here["code"] != driver["code"]:
        return "slapgen's code differs from the driver's (another checkout or version)"
    differs = [f"{name} {here['versions'].get(name)} (the driver has {version})"
               for name, version in driver["versions"].items() if here["versions"].get(name) != version]
    return f"libraries differ: {', '.join(differs)}" if differs else None


def run_cell(out: str, name: str, device: str, expected_digest: str, driver_identity: dict | None = None) -> dict:
    """One grid cell, inside a Ray task: `execute_run` on the run `name` of the sweep in `out`, in a worker
    process of its own (the task's `max_calls=1`), its output in the run's sweep.log. Returns its metrics.
    `expected_digest`: the driver's sweep.json, which this node must read too; `driver_identity`: the driver's
    `node_identity`, which this node must have (README asks for the same Python, torch and slapgen on every
    node; `slapgen eval --ray` checked it, a sweep did not)."""
    import ray

    from trainer.sweep.execute import execute_run
    from trainer.sweep.folder import read_definition

    ray_cluster.interruptible_task()
    if driver_identity is not None and (differs := identity_mismatch(node_identity(), driver_identity)):
        raise SweepError(f"Ray node {ray.util.get_node_ip_address()} cannot run {name}: {differs}; give every node the "
                         "same slapgen and libraries as the machine running slapgen sweep")
    if definition_digest(out) != expected_digest:  # a node that joined after the start-up check: none, or another
        raise SweepError(not_shared_sentence(Path(out), [ray.util.get_node_ip_address()]))
    ray_cluster.log_attempt(Path(out) / RUNS_DIR / name / "sweep.log", ATTEMPT_MARK)
    definition = read_definition(Path(out))
    result = execute_run(definition, definition.run(name), Path(out), device)
    sys.stdout.flush()
    return result["metrics"]


def run_cells(out: Path, names: list[str], nodes: ray_cluster.NodeWait,
              on_tick: Callable[[list[str]], None] | None = None, interval_s: float = 1.0) -> dict[str, str | None]:
    """Every run of `names` as a Ray task asking for `nodes.demand` (--gpus-per-run GPUs), all submitted at once
    (Ray queues what the cluster cannot place yet); returns {name: None when it finished, else why it failed}.
    `on_tick(names of the runs that have started and not ended)` is called every `interval_s`; ClusterError once
    no live node could run them for --node-wait (`ray_cluster.NodeWait`)."""
    ray = ray_cluster.import_ray()

    out = Path(out).resolve()
    device = "cuda" if nodes.demand.gpus > 0 else "cpu"
    cell = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, max_calls=1)(run_cell)
    logs = {name: out / RUNS_DIR / name / "sweep.log" for name in names}
    log_size_at_start = {name: logs[name].stat().st_size if logs[name].is_file() else 0 for name in names}
    # Before any task starts: a retry is an attempt line written after this.
    retried = ray_cluster.RetryNotice({f"run {name}": logs[name] for name in names}, ATTEMPT_MARK, MAX_RETRIES,
                                      "resuming from its latest checkpoint", nodes.say)
    digest, identity = definition_digest(str(out)), node_identity()
    refs = {cell.options(**nodes.demand.ray_options(), name=f"slapgen-sweep {name}").remote(
        str(out), name, device, digest, identity): name for name in names}

    def tick(waiting: list) -> None:
        if on_tick is not None:
            # Started: its task has written to its log (an attempt line at least) since the sweep began.
            on_tick([refs[ref] for ref in waiting
                     if logs[refs[ref]].is_file() and logs[refs[ref]].stat().st_size > log_size_at_start[refs[ref]]])

    return ray_cluster.wait_for_tasks(refs, MAX_RETRIES, tick, interval_s, nodes, retried)
