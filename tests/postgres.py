"""A real PostgreSQL for the tests: Debian's server binaries (`apt-get install postgresql`; .ci/run installs
them when missing) run from a temporary folder, one server for the whole session (start-up costs seconds),
a fresh database for each test. The server is pytest's child and ends with it, however pytest ends.

`initdb` and `postgres` refuse to run as root: as root they run as the `postgres` user (Debian's package
makes it) in a folder that user owns. Without the binaries the tests that need the server are skipped
with one reason, unless SLAP_REQUIRE_POSTGRES is set (CI), where they fail instead.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

NOT_FOUND = ("PostgreSQL's server binaries are not installed (no /usr/lib/postgresql/*/bin/initdb): "
             "apt-get install postgresql")
_names = itertools.count()


def server_binaries() -> Path | None:
    """The bin folder of the newest PostgreSQL Debian installed, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, binaries: Path, folder: Path, port: int, user: str | None):
        self.binaries, self.folder, self.port, self.user = binaries, folder, port, user
        self.process: subprocess.Popen | None = None

    def start(self, ready_within_s: float = 60) -> None:
        """The server as a child of this process that the kernel ends when this process ends (`pg_ctl start` made
        it a daemon: a test run killed before its teardown left it running, with its folder), once it answers."""
        import psycopg

        from slapgen.lifetime import parent_death_call

        command = [str(self.binaries / "postgres"), "-D", str(self.folder / "data"), "-p", str(self.port), "-k",
                   str(self.folder), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
        with open(self.folder / "server.log", "ab") as log:  # the child keeps its own descriptor
            # `user`: set before `preexec_fn` runs, so the death signal asked there outlives the change of user
            self.process = subprocess.Popen(command, user=self.user, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=parent_death_call())
        deadline = time.monotonic() + ready_within_s
        while True:
            if self.process.poll() is not None:
                log_tail = (self.folder / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited with {self.process.returncode} at start-up: {log_tail}")
            try:
                psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def run(self, tool: str, *args: str) -> None:
        command = [str(self.binaries / tool), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)

    def url(self, database: str) -> str:
        """A `SLAP_DATABASE_URL` (trust authentication: no password)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"slapgen_test_{os.getpid()}_{next(_names)}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # a test's pooled connections end here

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as db:
            db.execute(statement)

    def stop(self) -> None:
        """PostgreSQL's immediate shutdown (SIGQUIT to the postmaster), then a kill if it outlasts 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_postgres() -> PostgresServer:
    """initdb in a fresh folder and the server started on a free port; raises pytest's skip (or fails) without
    the binaries."""
    from tests.conftest import free_port

    binaries = server_binaries()
    if binaries is None:
        if os.environ.get("SLAP_REQUIRE_POSTGRES"):
            pytest.fail(NOT_FOUND)
        pytest.skip(NOT_FOUND)
    user = None
    folder = Path(tempfile.mkdtemp(prefix="slapgen-postgres-"))
    folder.chmod(0o755)
    if os.geteuid() == 0:  # initdb refuses root: the package's own user runs the server
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(binaries, folder, free_port(), user)
    try:
        server.run("initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        server.start()
    except BaseException:
        # A failed start leaves nothing behind: a server started but not seen ready is stopped, and the folder
        # removed.
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server():
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's server, dropped after the test."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def database_url(request, tmp_path) -> str:
    """The store tests' database, as SLAP_DATABASE_URL would name it: one SQLite file, or a fresh
    PostgreSQL database. Every store of a test shares it, as the service's stores do."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'slapgen.sqlite'}"
    return request.getfixturevalue("postgres_url")
