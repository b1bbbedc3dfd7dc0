"""Where the service's state lives: one SQLAlchemy engine per database URL, and its schema migrations.

The job board, the studio's ratings and the rating campaigns are tables in one database when
`SLAP_DATABASE_URL` names one (`postgresql://...` for several replicas, or `sqlite:///...`); unset,
each keeps its own SQLite file as before (`SLAP_CACHE_DIR/jobs.sqlite`, `SLAP_DATA_DIR/ratings.sqlite`,
`SLAP_DATA_DIR/campaigns.sqlite`). Every statement the stores run is SQLAlchemy Core, so one code path
serves both databases; what differs (WAL and the busy timeout on SQLite, `INSERT ... ON CONFLICT DO
NOTHING`'s spelling, reading the database's clock: `epoch_now`) is decided here or by the dialect.

Schemas are alembic migrations (`slapgen/migrations`), one independent branch per store (`jobs`,
`ratings`, `campaigns`), so a store's own SQLite file carries only its tables and one shared database
carries all three. `open_store` brings its store's branch to its head before the store's first
statement: in the service that happens in `bentoml serve`'s own process when it imports the service,
before any worker starts; in `slapgen campaign create`, before it writes. Two processes migrating at
once (two replicas starting together) take turns: a PostgreSQL advisory lock, or a lock file beside
the SQLite file, and the second finds the schema already at its head.
"""

from __future__ import annotations

import fcntl
import functools
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Double, Engine, Table, cast, create_engine, event, extract, false, func, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.sql.functions import FunctionElement

from slapgen.errors import SettingsError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
STORES = ("jobs", "ratings", "campaigns")  # alembic branch labels
# Any constant: the key of the advisory lock PostgreSQL holds while one process migrates.
_MIGRATION_LOCK_KEY = 0x51A9_6E4
_SQLITE_BUSY_TIMEOUT_S = 30
MEMORY = "sqlite://"  # an in-memory database, one per store (tests)


def database_url(value: str) -> str:
    """The SQLAlchemy URL of a `SLAP_DATABASE_URL` value: `sqlite:///PATH` or `postgresql://...` (driven
    by psycopg 3); anything else raises ValueError with one sentence."""
    try:
        url = make_url(value)
    except Exception:
        raise ValueError("must be a URL: sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE") from None
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        if not url.database:
            raise ValueError("a postgresql:// URL must name its database: postgresql://USER@HOST:PORT/DATABASE")
        return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if url.drivername == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ValueError("a sqlite:/// URL must name a file: sqlite:////absolute/path/slapgen.sqlite")
        # Absolute (from the working folder), as `store_url` makes a folder's file: SQLAlchemy reads a relative
        # file from the working folder of each engine's creation.
        return absolute_sqlite_url(value, Path.cwd())
    raise ValueError(f"the {url.drivername} database is not supported; use sqlite:///PATH or postgresql://...")


def absolute_sqlite_url(value: str, base: Path) -> str | None:
    """A `sqlite:///FILE` URL with its file made absolute, a relative one read from `base`, its query (`?timeout=`)
    kept; None for any other value (PostgreSQL, memory, not a URL: `database_url` says what is wrong)."""
    try:
        url = make_url(value)
    except Exception:  # noqa: BLE001 - SQLAlchemy's parse errors vary: database_url words them
        return None
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return url.set(database=str(Path(base).absolute() / Path(url.database).expanduser())).render_as_string(
        hide_password=False)


def shown_url(value: str) -> str:
    """A database URL as a log line or an error may show it: its password hidden, in the user part and in the
    query (`?password=`, `?sslpassword=`, which SQLAlchemy's own hiding leaves)."""
    url = make_url(value)
    secret = {key: "hidden" for key in url.query if key.lower() in ("password", "sslpassword")}
    return url.update_query_dict(secret).render_as_string(hide_password=True)


def sqlite_file_url(path: Path | str) -> str:
    return URL.create("sqlite", database=str(Path(path))).render_as_string()


def store_url(where: Path | str | None) -> str:
    """A store's database from what its constructor got: None (in memory), a URL, or an SQLite file's path."""
    if where is None:
        return MEMORY
    if isinstance(where, str) and "://" in where:
        return database_url(where)
    # Absolute: engines are kept per URL, and SQLAlchemy fixes a relative file to the working folder of the
    # engine's creation; the same relative SLAP_DATA_DIR from another folder would reopen the first one's file.
    return sqlite_file_url(Path(where).absolute())


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (None for PostgreSQL or memory)."""
    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


def open_store(where: Path | str | None, store: str) -> Engine:
    """The engine of a store's database with the store's schema at its head."""
    url = store_url(where)
    if url == MEMORY:
        engine = _memory_engine()
    else:
        if (path := sqlite_path(url)) is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = _shared_engine(url, os.getpid())  # keyed by pid: a pool never crosses a fork
    migrate(engine, store)
    return engine


def _memory_engine() -> Engine:
    # One connection for every thread: a second one would open a second, empty, database.
    return create_engine(MEMORY, poolclass=StaticPool, connect_args={"check_same_thread": False})


@functools.lru_cache(maxsize=None)
def _shared_engine(url: str, pid: int) -> Engine:
    if make_url(url).get_backend_name() != "sqlite":
        # pool_pre_ping: a replica keeps working after PostgreSQL restarts (a stale connection is replaced).
        return create_engine(url, pool_pre_ping=True)
    # A connection per transaction, as before SQLAlchemy: opening an SQLite file costs microseconds, and a
    # pooled connection would keep reading a file replaced under the server from its cache.
    engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _wal(dbapi_connection, _record):
        # Readers never block the writer (a worker writing its steps, a rater submitting).
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    return engine


def upsert_ignoring(engine_or_connection, table):
    """`INSERT ... ON CONFLICT DO NOTHING` in the database's dialect (both spell it alike, from different modules)."""
    if engine_or_connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing()


# PostgreSQL's SQLSTATE classes of errors that pass: connection exception, insufficient resources (too many
# connections), operator intervention (a shutdown, a server starting), transaction rollback (a deadlock, a
# serialization failure). https://www.postgresql.org/docs/current/errcodes-appendix.html
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40")
# SQLite's: another process holds the lock past the busy timeout, or the file's folder is not there (a volume not
# mounted yet). "no such table", a read-only file or a disk I/O error do not pass by waiting.
_TRANSIENT_SQLITE_WORDS = ("database is locked", "database is busy", "unable to open database file")


def database_unreachable(error: BaseException) -> bool:
    """Whether `error` says the database does not answer just now (a failover, a restart, a full pool or lock),
    which waiting may mend, rather than a query or schema that will fail again: the one rule for the job board's
    retries and best-effort writes and for the service's 503."""
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(error, PoolTimeout):
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    original = error.orig
    if type(original).__module__.startswith("psycopg"):
        state = getattr(original, "sqlstate", None)  # None: no server answered (refused, unknown host, timeout)
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES if state else type(original).__name__ == "OperationalError"
    text = str(original).lower()
    return any(words in text for words in _TRANSIENT_SQLITE_WORDS)


def lock_for_writing(connection, table: Table) -> None:
    """Make this transaction the only one writing `table` until it ends, so that a check before an insert (has
    this rater rated these videos already?) holds when the insert runs, across workers and replicas. Readers go on.
    PostgreSQL: `LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE`, which conflicts with itself and with any INSERT.
    SQLite: an UPDATE that changes nothing, which takes the database's write lock (waiting up to the busy
    timeout) before the check reads, so the check reads the newest rows."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"LOCK TABLE {table.name} IN SHARE ROW EXCLUSIVE MODE")
    else:
        key = next(iter(table.primary_key.columns))
        connection.execute(update(table).where(false()).values({key: key}))


class epoch_now(FunctionElement):
    """The database's clock, in seconds since the epoch (a float), for timestamps that processes on several
    machines write and compare: every one reads the same clock, so a replica whose own clock is off judges
    no live job stale. PostgreSQL: the server's `clock_timestamp()`; SQLite: its `julianday('now')`, the
    clock of the machine whose processes share the file."""

    type = Double()
    inherit_cache = True


@compiles(epoch_now, "postgresql")
def _postgresql_epoch_now(element, compiler, **kw):
    return compiler.process(cast(extract("epoch", func.clock_timestamp()), Double), **kw)


@compiles(epoch_now, "sqlite")
def _sqlite_epoch_now(element, compiler, **kw):
    # unixepoch('subsec') needs SQLite 3.42; julianday counts days from -4713-11-24 12:00 (2440587.5 is 1970).
    return compiler.process((func.julianday("now") - 2440587.5) * 86400.0, **kw)


_process_migration_lock = threading.Lock()


@contextmanager
def _migration_turn(engine: Engine, connection):
    """Held while one process migrates: PostgreSQL's advisory lock (released at commit), or an exclusive
    lock on a file beside the SQLite file (its locking is per machine, as SQLite itself is)."""
    with _process_migration_lock:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
            yield
            return
        path = sqlite_path(str(engine.url))
        if path is None:
            yield
            return
        with open(f"{path}.migrate-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def alembic_config(connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine, store: str) -> None:
    """Bring `store`'s tables to their newest schema, keeping every row (a database from before alembic
    is adopted by the branch's first revision)."""
    from alembic import command
    from alembic.util import CommandError

    if store not in STORES:
        raise SettingsError(f"unknown store {store!r}; one of {', '.join(STORES)}")
    try:
        with engine.begin() as connection, _migration_turn(engine, connection):
            command.upgrade(alembic_config(connection), f"{store}@head")
    except CommandError as error:
        # A revision this slapgen does not know: a newer slapgen migrated the database (an older replica
        # starting during a rolling upgrade, or a downgrade); changing nothing is the only safe answer.
        revision = _unknown_revisions(engine)
        # One alembic_version table for every store: another store's unknown revision stops this one too, so the
        # schema named is the revision's own (revisions are STORE_NNNN).
        newer = sorted({name.split("_")[0] for name in revision.split(", ")} & set(STORES)) or [store]
        raise SettingsError(
            f"the database's {', '.join(newer)} schema (revision {revision}) is newer than this slapgen's; upgrade "
            "slapgen to "
            f"the version that migrated it, or give this one another database") from error


def _unknown_revisions(engine: Engine) -> str:
    """The revisions alembic_version holds that this slapgen does not know, for the sentence of a database
    migrated by a newer slapgen."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    try:
        with engine.connect() as connection:
            stamped = [row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))]
    except Exception:  # unreadable: the sentence says so, and alembic's own error is chained as the cause
        return "unknown"
    unknown = sorted(set(stamped) - known)
    return ", ".join(unknown) or "unknown"
