"""What `bentoml serve` checks before anything is loaded, each failing with one sentence.

- The port. BentoML binds it only after the service's deployment hook ran (and after it has wiped its
  task store, below), and a port in use then ends start-up with a traceback.
- BentoML's task store. Every `bentoml serve` deletes and recreates `$BENTOML_HOME/task_result.db` at
  start-up, so a second server sharing one BENTOML_HOME (the default `~/bentoml`) erases the jobs of the
  first, whose task routes then fail. A server holds an exclusive lock beside that file for as long as
  it runs (the kernel drops it when the process ends, even by kill -9), and a second one stops.
- slapgen's own database (SLAP_DATABASE_URL, or SQLite files: the job board under SLAP_CACHE_DIR, the
  ratings under SLAP_DATA_DIR): a folder that cannot be written, a file there that is not an SQLite
  database, or a PostgreSQL that cannot be reached, is one sentence too. The stores are opened (and their
  schemas migrated) by the server's deployment hook and by each worker, never by importing the service:
  `bentoml build` imports it too, and with SLAP_DATABASE_URL in the shell it migrated that database (a
  production one, ahead of the replicas still running the old version) or wrote SQLite files under HOME
  (`StoreOnFirstUse`).
"""

from __future__ import annotations

import errno
import fcntl
import socket
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Generic, TypeVar

from slapgen.errors import StartupError

T = TypeVar("T")
R = TypeVar("R")
_held_locks: list[IO] = []  # open for the life of the process: closing a file drops its lock


def listen_address() -> tuple[str, int]:
    """The host and port this `bentoml serve` will listen on: its --host / --port options (or their
    BENTOML_HOST / BENTOML_PORT variables, which click has read into them), else BentoML's configuration."""
    import click
    from bentoml._internal.configuration.containers import BentoMLContainer

    context = click.get_current_context(silent=True)
    params = context.params if context is not None else {}
    host = params.get("host") or BentoMLContainer.http.host.get()
    port = params.get("port")
    return host, int(port if port is not None else BentoMLContainer.http.port.get())


def served_with_tls() -> bool:
    """Whether this `bentoml serve` serves HTTPS: its --ssl-certfile (or BentoML's configuration of one)."""
    import click
    from bentoml._internal.configuration.containers import BentoMLContainer

    context = click.get_current_context(silent=True)
    params = context.params if context is not None else {}
    return bool(params.get("ssl_certfile") or BentoMLContainer.ssl.certfile.get())


def browser_address(host: str, port: int, tls: bool = False) -> str | None:
    """SCHEME://HOST:PORT as a browser on this machine reaches a server listening on `host` (all addresses:
    localhost); None for port 0 (the system picks one, known only once it listens)."""
    if port == 0:
        return None
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    scheme = "https" if tls else "http"
    return f"{scheme}://[{shown}]:{port}" if ":" in shown else f"{scheme}://{shown}:{port}"


def check_port_free(host: str, port: int) -> None:
    """StartupError unless `host:port` can be bound now (port 0, any free port, always can)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the server's own socket does: a port whose old connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} is in use (something already listens on {host}:{port}); "
                                    f"stop it or choose another port with --port") from None
            raise StartupError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def claim_task_store(result_file: str) -> None:
    """Lock `result_file` (BentoML's task store) for this process, or StartupError naming BENTOML_HOME
    when another live server holds it."""
    if result_file == ":memory:":
        return
    lock_path = Path(f"{result_file}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a")
    except OSError as error:
        raise StartupError(f"cannot write BentoML's task store lock {lock_path} ({error.strerror}: {error.filename}); "
                           f"BENTOML_HOME must be a writable folder") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StartupError(
            f"another bentoml serve is running with BENTOML_HOME={lock_path.parent}, and starting would erase "
            f"its jobs (BentoML recreates {Path(result_file).name} at start-up); give each service its own "
            f"folder: BENTOML_HOME=/path/to/another/folder bentoml serve") from None
    _held_locks.append(handle)


def with_store(what: str, where: Path | str, variable: str, use: Callable[[Path | str], T]) -> T:
    """`use(where)` (opening or reading one of slapgen's stores: an SQLite file's path, or the URL of
    SLAP_DATABASE_URL), or StartupError naming the file (or database) and the setting when the folder
    cannot be written, the file is not a usable SQLite database, or the database cannot be used."""
    from slapgen.database import shown_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return use(where)
    except OSError as error:
        reason = f"{error.strerror}: {error.filename}" if error.strerror and error.filename else str(error)
    except sqlite3.Error as error:
        reason = str(error)
    except SQLAlchemyError as error:
        reason = " ".join(str(getattr(error, "orig", None) or error).split())
    if isinstance(where, str):  # a URL: its password never reaches a log
        shown = shown_url(where)
        raise StartupError(f"cannot use {what} in {shown} ({reason}); SLAP_DATABASE_URL must name a database "
                           f"this server can reach and write")
    raise StartupError(f"cannot use {what} {where} ({reason}); {variable} must be a writable folder, and a file "
                       f"there that is not an SQLite database slapgen wrote must be moved away")


class StoreOnFirstUse(Generic[T]):
    """One of slapgen's stores, opened by `with_store(what, where, variable, use)` (one sentence when it cannot be)
    the first time it is used: `open()`, `use(action)`, or any attribute, which is the opened store's. What the service's routes
    and middlewares hold from its import on; the deployment hook and each worker open it before serving."""

    def __init__(self, what: str, where: Path | str, variable: str, use: Callable[[Path | str], T]):
        self._arguments = (what, where, variable, use)
        self._store: T | None = None
        self._lock = threading.Lock()

    def open(self) -> T:
        if (store := self._store) is not None:  # every job step reads the board: no lock once open
            return store
        with self._lock:
            if self._store is None:
                self._store = with_store(*self._arguments)
            return self._store

    def use(self, action: Callable[[T], R]) -> R:
        """`action(store)`, a database that fails it said in `with_store`'s one sentence (as opening it is)."""
        what, where, variable, _ = self._arguments
        return with_store(what, where, variable, lambda _where: action(self.open()))

    def __getattr__(self, name: str):
        # Not for private or special names: `copy` and `pickle` look those up on an instance without __init__'s
        # attributes (this would recurse), and `hasattr` would open the database.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.open(), name)

