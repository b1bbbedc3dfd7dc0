"""The tests' server helper stops a whole server, not only its CLI (tests/harness.py: stop_server)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from tests.conftest import SERVER_MARK, ServerProcess, stop_server

# A stand-in for `bentoml serve` built as BentoML's is: a CLI that passes SIGTERM on to its worker and exits at
# once, and a worker in a session of its own (circus calls setsid) that takes `worker_delay_s` to end after
# SIGTERM (below 0: ignores it) and may have started a compiler (`compiler_s` long, as inductor's g++) that
# outlives it.
_WORKER = textwrap.dedent("""
    import signal, subprocess, sys, time
    from pathlib import Path
    ready, delay, compiler_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    if compiler_s:
        subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({compiler_s})"])
    def on_term(*_):
        Path(ready + ".sigterm").write_text("")
        time.sleep(delay)
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if delay < 0 else on_term)
    Path(ready).write_text("ready")
    while True:
        time.sleep(1)
""")
_CLI = textwrap.dedent("""
    import signal, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True)
    def on_term(*_):
        worker.send_signal(signal.SIGTERM)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    while True:
        time.sleep(1)
""")


def _start(tmp_path: Path, worker_delay_s: float, compiler_s: float = 0) -> ServerProcess:
    ready, mark = tmp_path / "worker-ready", uuid.uuid4().hex
    process = subprocess.Popen([sys.executable, "-c", _CLI, _WORKER, str(ready), str(worker_delay_s), str(compiler_s)],
                               start_new_session=True, env={**os.environ, SERVER_MARK: mark})
    server = ServerProcess(process, "http://127.0.0.1:0", tmp_path / "unused.log", mark)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and process.poll() is None, "the stand-in server did not start"
        time.sleep(0.05)
    assert len(server.live_processes()) == (3 if compiler_s else 2)
    return server


def test_stop_server_returns_once_the_workers_have_ended_not_only_the_cli(tmp_path):
    """Guards the CI failure of 2026-12-05: stop_server returned once the CLI had exited, while a BentoML worker
    (in a session of its own) was still ending, and test_a_start_past_its_time_limit... found it alive. The
    worker here takes 1.5 s after SIGTERM; stop_server must wait for it."""
    server = _start(tmp_path, worker_delay_s=1.5)
    stop_server(server)
    assert server.process.returncode is not None
    assert server.live_processes() == []


def test_a_compiler_that_outlives_its_worker_is_waited_for(tmp_path):
    """Guards the same failure's other half: a g++ that inductor started in a worker runs on, an orphan, after
    the worker ends (seen: `g++ -x c++-header ...` left behind). stop_server finds it by the server's mark in
    its environment and returns only once it has ended."""
    server = _start(tmp_path, worker_delay_s=0, compiler_s=2)
    stop_server(server)
    assert server.live_processes() == []


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    """Guards a server whose worker ignores SIGTERM outliving the test (or the GPU run's start) that stopped it:
    SIGKILL after `grace_s`, and stop_server returns with nothing of the server left."""
    grace_s = 1.0
    server = _start(tmp_path, worker_delay_s=-1)
    started = time.monotonic()
    stop_server(server, grace_s=grace_s)
    assert time.monotonic() - started >= grace_s
    assert server.live_processes() == []


def test_the_workers_of_a_cli_that_was_killed_get_sigterm(tmp_path):
    """Guards the workers of a CLI that had already ended (killed, as test_replicas kills a replica) waiting out
    the grace period for a SIGKILL, or the CLI's group id, free again once it was reaped, being signalled (it
    may be another process's group by then): they are found by the mark and get SIGTERM."""
    import signal

    server = _start(tmp_path, worker_delay_s=0)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    stop_server(server, grace_s=60)
    assert (tmp_path / "worker-ready.sigterm").exists() and server.live_processes() == []
