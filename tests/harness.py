"""What the tests share with the bench scripts (bench/coldstart.py, bench/serve.py, the GPU run's checks): real
`bentoml serve` processes, started on a free port, waited for until /readyz answers, and stopped with every
process they started; LoRA adapters in the trainer's format. Needs no pytest: the bench scripts run where only
the service is installed (tests/conftest.py re-exports all of it for the tests)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


_HANDED_OUT_PORTS: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, below the kernel's ephemeral range, and not handed out before in this run.

    Below the range because a port from it (what binding port 0 gives) is also a source port the kernel
    picks for outgoing connections: a client retrying `connect(127.0.0.1:P)` before its server listens on P
    (rank 1 of a two-machine `accelerate launch` waiting for rank 0's TCPStore) can get P as its own source
    port and connect to itself. It then waits for itself forever, and the server cannot bind P: the
    two-machine test hung this way for 600 s now and then on a loaded machine."""
    low, _high = (int(bound) for bound in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    # Above Ray's default worker ports (10002-19999, which a `ray start` reserves whole) and never torch's
    # default rendezvous port.
    candidates = [port for port in range(20000, low) if port != 29500] if low > 21000 else []
    # Each pytest-xdist worker picks from its own share: a port is bound long after it is picked (a server's imports
    # come first), and the other worker's check would find it free meanwhile.
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker and workers:
        candidates = candidates[int(worker.removeprefix("gw"))::int(workers)]
    random.shuffle(candidates)
    for port in candidates:
        if port in _HANDED_OUT_PORTS:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT_PORTS.add(port)
        return port
    while True:  # a kernel whose ephemeral range starts low: what it gives, never twice
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT_PORTS:
            _HANDED_OUT_PORTS.add(port)
            return port


def offline_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """Environment for a child process that can never reach the hub."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),
        BENTOML_HOME=str(tmp_path / "bentoml-home"),
        BENTOML_DO_NOT_TRACK="True",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def process_environments() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, its environment's `NAME=value` entries) of every process this user can read (/proc): how a test finds
    the processes it started, however detached (their own sessions, Ray's workers), to clean them up or to show
    none is left."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "environ").read_bytes().split(b"\0")
            except OSError:  # ended meanwhile, or not ours
                pass


def bentoml_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bentoml", *args]


# Set in every test server's environment, with a value of its own: every process the server starts inherits it,
# however detached (BentoML's workers run in sessions of their own; a compiler inductor started may outlive its
# worker), so stop_server finds them all by it.
SERVER_MARK = "SLAPGEN_TEST_SERVER"


class ServerProcess:
    def __init__(self, process: subprocess.Popen, url: str, log_path: Path, mark: str):
        self.process = process
        self.url = url
        self.log_path = log_path
        self.mark = mark  # SERVER_MARK's value in its processes' environments

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def live_processes(self) -> list[int]:
        """Every process of this server still running: the CLI, BentoML's workers, what they started. A zombie
        (ended, not yet reaped) has no environment left, so it is not one."""
        entry = f"{SERVER_MARK}={self.mark}".encode()
        return [pid for pid, environment in process_environments() if entry in environment]

    def signal_if_ours(self, pid: int, sig: int) -> None:
        """`sig` to `pid` if it is still one of this server's processes: by a pidfd opened first, then the mark
        checked, so a pid that ended and was reused meanwhile (pid_max is 32768 here) is never signalled."""
        try:
            descriptor = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            if f"{SERVER_MARK}={self.mark}".encode() in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                signal.pidfd_send_signal(descriptor, sig)
        except (OSError, ProcessLookupError):  # ended meanwhile
            pass
        finally:
            os.close(descriptor)


def start_server(tmp_path: Path, startup_timeout_s: float = 180, port: int | None = None, cwd: Path | None = None,
                 **env_overrides: str) -> ServerProcess:
    """`bentoml serve` of this repository, once it answers /readyz (stopped, and RuntimeError, if it exits or is
    not ready within `startup_timeout_s`). `cwd`: typed elsewhere, as `bentoml serve REPOSITORY` (None: in it)."""
    server = launch_server(tmp_path, port, cwd, **env_overrides)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            stop_server(server)  # its workers may outlive it
            raise RuntimeError(f"bentoml serve exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"bentoml serve not ready after {startup_timeout_s}s:\n{server.log_tail()}")


def launch_server(tmp_path: Path, port: int | None = None, cwd: Path | None = None,
                  **env_overrides: str) -> ServerProcess:
    """`bentoml serve` of this repository, started (its log in `tmp_path`), not waited for; `cwd` as start_server's."""
    port = port or free_port()
    log_path = tmp_path / f"server-{port}.log"
    log_file = log_path.open("wb")
    mark = uuid.uuid4().hex
    process = subprocess.Popen(
        bentoml_command("serve", *([str(REPO_ROOT)] if cwd is not None else []), "--host", "127.0.0.1", "--port", str(port)),
        cwd=cwd or REPO_ROOT,
        env=offline_env(tmp_path, **env_overrides, **{SERVER_MARK: mark}),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return ServerProcess(process, f"http://127.0.0.1:{port}", log_path, mark)


def start_servers(folders: list[Path], startup_timeout_s: float, envs: list[dict[str, str]]) -> list[ServerProcess]:
    """Several servers (replicas) started at once, each in its folder (its own BENTOML_HOME) with its env, on
    ports chosen together so they differ (two free_port() calls may return one port twice); if one fails
    to start, the others are stopped before the error goes on."""
    from concurrent.futures import ThreadPoolExecutor

    ports = distinct_free_ports(len(folders))
    with ThreadPoolExecutor(len(folders)) as pool:
        started = [pool.submit(start_server, folder, startup_timeout_s, port, **env)
                   for folder, port, env in zip(folders, ports, envs, strict=True)]
        servers = []
        try:
            for future in started:
                servers.append(future.result())
        except BaseException:
            for future in started:
                if future.exception() is None:
                    stop_server(future.result())
            raise
    return servers


def distinct_free_ports(count: int) -> list[int]:
    """`count` ports free now, all different (`free_port` never hands out a port twice in a run)."""
    return [free_port() for _ in range(count)]


def stop_server(server: ServerProcess, grace_s: float = 20) -> None:
    """SIGTERM to the server's CLI (its process group), which stops BentoML's workers, then wait until every
    process of the server has ended (ServerProcess.live_processes), not only the CLI: the CLI can exit while
    a worker, or a compiler the worker started, still runs, and whatever comes next (a test that checks
    nothing is left, the GPU run's next start on the same GPU) would find it. SIGKILL to every process left
    after `grace_s`."""
    if server.process.poll() is None:  # never after: a reaped CLI's pid, and its group's id, may be another's now
        os.killpg(server.process.pid, signal.SIGTERM)  # start_new_session: the CLI leads its own group
    else:
        for pid in server.live_processes():  # what an ended CLI left
            server.signal_if_ours(pid, signal.SIGTERM)
    for wait_s in (grace_s, 10):  # after SIGKILL: the kernel's time to end them
        deadline = time.monotonic() + wait_s
        while (left := server.live_processes()) and time.monotonic() < deadline:
            server.process.poll()  # reaps the CLI, our child, once it exits
            time.sleep(0.1)
        for pid in left:
            server.signal_if_ours(pid, signal.SIGKILL)
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # only a process stuck in the kernel outlives SIGKILL this long
        raise RuntimeError(f"server process {server.process.pid} did not end after SIGKILL") from None


def write_test_adapter(folder: Path, tiny_cache_dir: Path, rank: int, seed: int, alpha: float | None = None,
                       base_model: str | None = None, ticft_layout: str | None = None, model: str = "tiny") -> Path:
    """A LoRA adapter for a tiny model (`tiny`, or `tiny-wan`) in exactly the trainer's format
    (trainer.lora.save_lora, the family's LoRA targets), with seeded random weights so two adapters change
    the output differently; `base_model` (default: `model`) is the name its metadata records;
    `ticft_layout` makes it a TIC-FT adapter of that layout."""
    import torch

    from slapgen.models.family import family_of
    from slapgen.models.loading import resolve_model
    from trainer.config import load_config
    from trainer.lora import add_lora, save_lora

    overrides = [f"model={model}", f"model_cache_dir={tiny_cache_dir}", f"lora.rank={rank}", f"lora.alpha={alpha or rank}"]
    if ticft_layout is not None:
        from slapgen.models.ticft import TicftLayout

        overrides += [f"ticft.layout={ticft_layout}", f"data.num_frames={TicftLayout.parse(ticft_layout).pixel_frames}"]
    config = load_config("tiny-smoke", overrides)
    resolved = resolve_model(model, tiny_cache_dir)
    transformer = family_of(resolved.spec).load_transformer(resolved.folder, torch.float32)
    add_lora(transformer, config.lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return save_lora(transformer, folder, config, base_model or model, steps=seed)
