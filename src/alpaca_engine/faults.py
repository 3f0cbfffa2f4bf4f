"""One error path for a database or Redis the engine cannot use.

Every storage and coordination failure a user can fix (a malformed URL, a corrupt, read-only
or full SQLite file, an unreachable server, a MongoDB without a replica set) becomes one
typed error whose message is a single line: the service and its URL (password masked), the
cause, and the fix. The command line prints that line and exits 1; the API answers 503; the
runner leaves the run for a later resume instead of writing a terminal state that would fail
too. Driver exceptions that are not such a fault (a constraint, a bug) are left alone.

Drivers are imported lazily, by the module the exception comes from, so SQLite users never
load psycopg, pymongo or redis.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from .errors import AlpacaError, ErrorCode
from .sqlite_url import MEMORY, BadSqliteUrl, parse_sqlite_url

DEFAULT_CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a database or Redis server before saying it is unreachable."""

class Fault(StrEnum):
    """What is wrong, so callers (and tests) can branch without parsing the message."""

    MALFORMED_URL = "malformed_url"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    AUTH = "auth"
    MISSING_DATABASE = "missing_database"
    NOT_A_DATABASE = "not_a_database"
    CORRUPT = "corrupt"
    IS_DIRECTORY = "is_directory"
    READ_ONLY_FILE = "read_only_file"
    READ_ONLY_DIRECTORY = "read_only_directory"
    DISK_FULL = "disk_full"
    NO_TRANSACTIONS = "no_transactions"
    LOCKED = "locked"
    IO_ERROR = "io_error"


_PUBLIC = {
    Fault.MALFORMED_URL: "it is misconfigured", Fault.UNREACHABLE: "it is unreachable",
    Fault.TIMEOUT: "it does not answer", Fault.AUTH: "it refuses the server's credentials",
    Fault.MISSING_DATABASE: "it does not exist", Fault.NOT_A_DATABASE: "its file is damaged",
    Fault.CORRUPT: "its file is damaged", Fault.IS_DIRECTORY: "it is misconfigured",
    Fault.READ_ONLY_FILE: "it is read-only", Fault.READ_ONLY_DIRECTORY: "it is read-only",
    Fault.DISK_FULL: "its disk is full", Fault.NO_TRANSACTIONS: "it is misconfigured",
    Fault.LOCKED: "it is locked by another process", Fault.IO_ERROR: "its disk fails",
}

TRANSIENT = frozenset({Fault.UNREACHABLE, Fault.TIMEOUT, Fault.DISK_FULL, Fault.LOCKED,
                       Fault.IO_ERROR})
"""Faults that may clear by themselves (a server restarts, space is freed): retry later."""


class Unavailable(AlpacaError):
    """A service the engine needs cannot be used; ``str()`` is the one line to show."""

    service = "service"
    public_name = "a service"
    error_code = ErrorCode.INTERNAL_ERROR

    def __init__(self, url: str, fault: Fault, cause: str, fix: str) -> None:
        self.url = mask_url(url)
        self.fault = fault
        self.cause = _one_line(cause)
        self.fix = _one_line(fix)
        super().__init__(self.error_code, f"{self.service} {self.url}: {self.cause}. {self.fix}",
                         fault=str(fault))

    @property
    def transient(self) -> bool:
        return self.fault in TRANSIENT

    @property
    def public(self) -> str:
        """What an API client may read: the kind of fault, not URLs, hosts or paths (the
        server's log has the whole line)."""
        then = ("retry later" if self.transient
                else "an operator must fix it (the server's log says how)")
        return f"{self.public_name} is not usable: {_PUBLIC[self.fault]}; {then}"


class StoreUnavailable(Unavailable):
    """The database (``ALPACA_DATABASE_URL``) cannot be used."""

    service = "database"
    public_name = "the database"
    error_code = ErrorCode.STORE_UNAVAILABLE


class MalformedUrl(StoreUnavailable, ValueError):
    """``ALPACA_DATABASE_URL`` is not a URL the engine can open (also a ValueError)."""


class CoordinationUnavailable(Unavailable):
    """Redis (``ALPACA_REDIS_URL``) cannot be used."""

    service = "Redis"
    public_name = "Redis"
    error_code = ErrorCode.COORDINATION_UNAVAILABLE


# -------------------------------------------------------------------------------- URLs


_USERINFO = re.compile(r"(?<=://)([^:/@?#]*):[^@/?#]*@")
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:password|pass)=)[^&#]*")


def mask_url(url: str) -> str:
    """The URL without its password (``user:***@``, ``?password=***``), for printing."""
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO.sub(r"\1:***@", url))


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


DATABASE_URL_FORMS = ("sqlite:///path/to/file.db, postgresql://user@host:5432/db or "
                      "mongodb://host:27017/db")


def check_database_url(url: str) -> str:
    """The URL's scheme when the engine can open it; :class:`MalformedUrl` otherwise."""
    if url == ":memory:":
        return "sqlite"
    scheme, sep, _ = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        if url.startswith("sqlite:"):
            raise MalformedUrl(url, Fault.MALFORMED_URL, "not a SQLite URL",
                               "Write sqlite:///relative/path.db or sqlite:////absolute/path.db "
                               "in ALPACA_DATABASE_URL")
        raise MalformedUrl(url, Fault.MALFORMED_URL, "not a database URL",
                           f"Set ALPACA_DATABASE_URL to {DATABASE_URL_FORMS}")
    scheme = scheme.lower()
    if scheme == "sqlite":
        try:
            parse_sqlite_url(url)
        except BadSqliteUrl as exc:
            raise MalformedUrl(url, Fault.MALFORMED_URL, exc.cause, exc.fix) from None
        return scheme
    if scheme in ("postgresql", "postgres"):
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(url)
        except Exception as exc:
            raise MalformedUrl(url, Fault.MALFORMED_URL,
                               f"not a valid PostgreSQL URL ({_one_line(str(exc))})",
                               "Fix ALPACA_DATABASE_URL (postgresql://user:password@host:5432/"
                               "db)") from None
        return "postgresql"
    if scheme in ("mongodb", "mongodb+srv"):
        return scheme
    raise MalformedUrl(url, Fault.MALFORMED_URL,
                       f"unsupported database URL scheme {scheme!r} (supported: sqlite, "
                       "postgresql, mongodb)", f"Set ALPACA_DATABASE_URL to {DATABASE_URL_FORMS}")


# ----------------------------------------------------------------------- classification


def store_fault(exc: BaseException, url: str, timeout: float | None = None
                ) -> StoreUnavailable | None:
    """The user-fixable fault behind a store exception, or ``None`` (a bug, a constraint)."""
    if isinstance(exc, StoreUnavailable):
        return exc
    module = type(exc).__module__
    if isinstance(exc, sqlite3.Error):
        return _sqlite_fault(exc, url)
    if isinstance(exc, OSError) and url.startswith("sqlite:"):
        return _os_fault(exc, url)
    if module.startswith("psycopg"):
        return _postgres_fault(exc, url, timeout)
    if module.startswith(("pymongo", "bson")) or type(exc).__name__ == "TransactionsUnsupported":
        return _mongo_fault(exc, url, timeout)
    if isinstance(exc, TimeoutError):
        return StoreUnavailable(url, Fault.TIMEOUT, _no_answer(timeout), _check_server(url))
    return None


def coordination_fault(exc: BaseException, url: str, timeout: float | None = None
                       ) -> CoordinationUnavailable | None:
    """The user-fixable fault behind a Redis exception, or ``None``."""
    if isinstance(exc, CoordinationUnavailable):
        return exc
    if not type(exc).__module__.startswith("redis"):
        if isinstance(exc, TimeoutError | ConnectionError):
            return CoordinationUnavailable(url, Fault.TIMEOUT, _no_answer(timeout),
                                           _check_redis(url))
        return None
    from redis import exceptions as rx

    text = _one_line(str(exc))
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError) or text.startswith(
            ("NOAUTH", "WRONGPASS")):
        return CoordinationUnavailable(url, Fault.AUTH, f"authentication failed ({text})",
                                       "Check the user and password in ALPACA_REDIS_URL")
    if isinstance(exc, rx.BusyLoadingError):
        return CoordinationUnavailable(url, Fault.UNREACHABLE, "Redis is loading its data set",
                                       "Retry in a moment")
    if isinstance(exc, rx.TimeoutError):
        return CoordinationUnavailable(url, Fault.TIMEOUT, _no_answer(timeout),
                                       _check_redis(url))
    if isinstance(exc, rx.ConnectionError):
        return CoordinationUnavailable(url, Fault.UNREACHABLE,
                                       f"cannot connect ({_short_cause(text)})",
                                       _check_redis(url))
    if isinstance(exc, rx.ResponseError) and text.startswith("MISCONF"):
        return CoordinationUnavailable(url, Fault.DISK_FULL,
                                       "Redis refuses writes because it cannot save to disk",
                                       "Free space on the Redis server's disk (or fix its "
                                       "persistence settings)")
    if isinstance(exc, rx.ResponseError) and text.startswith("READONLY"):
        return CoordinationUnavailable(url, Fault.UNREACHABLE, "this Redis is a read-only replica",
                                       "Point ALPACA_REDIS_URL at the primary")
    return None


def fault_of(exc: BaseException, database_url: str | None = None, redis_url: str | None = None,
             timeout: float | None = None) -> Unavailable | None:
    """Either kind of fault, for a caller that sees both (the API, the worker loop)."""
    if isinstance(exc, Unavailable):
        return exc
    if type(exc).__module__.startswith("redis"):
        return coordination_fault(exc, redis_url or "redis://", timeout)
    if database_url is not None:
        return store_fault(exc, database_url, timeout)
    return None


def _no_answer(timeout: float | None) -> str:
    if timeout is None:
        return "the server did not answer in time"
    return f"no answer within {timeout:g} s"


def _check_server(url: str) -> str:
    return (f"Is the server running and reachable at {_host_port(url)}? Start it, fix "
            "ALPACA_DATABASE_URL, or raise ALPACA_CONNECT_TIMEOUT (seconds)")


def _check_redis(url: str) -> str:
    return (f"Is Redis running and reachable at {_host_port(url)}? Start it, fix "
            "ALPACA_REDIS_URL (or unset it to run in one process), or raise "
            "ALPACA_CONNECT_TIMEOUT (seconds)")


def _host_port(url: str) -> str:
    rest = url.partition("://")[2]
    hosts = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    return hosts or "its host"


def _short_cause(text: str) -> str:
    """The useful tail of a driver's connection message (they nest 'failed:' prefixes)."""
    text = re.sub(r"\s*Is the server running on that host and accepting TCP/IP connections\??",
                  "", text)
    if "Connect call failed" in text or "Connection refused" in text:
        return "connection refused"
    tail = text.rsplit("failed: ", 1)[-1]
    tail = re.sub(r"^(FATAL|ERROR):\s+", "", tail)
    return tail.strip().rstrip(".") or text


# -- SQLite ------------------------------------------------------------------------------


def sqlite_file(url: str) -> Path | None:
    try:
        path = parse_sqlite_url(url).path
    except BadSqliteUrl:
        return None
    return None if path == MEMORY else Path(path)


def _writable(directory: Path) -> bool:
    try:
        return os.access(directory, os.W_OK)
    except OSError:
        return False


def _sqlite_fault(exc: sqlite3.Error, url: str) -> StoreUnavailable | None:
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    primary = code & 0xFF if isinstance(code, int) else None
    path = sqlite_file(url)
    where = str(path.resolve()) if path else "the database"
    if primary == sqlite3.SQLITE_FULL:
        return _disk_full(url, where, name)
    if primary == sqlite3.SQLITE_NOTADB:
        return StoreUnavailable(url, Fault.NOT_A_DATABASE,
                                f"{where} is not a SQLite database (bad header)",
                                "Restore it from a backup, or point ALPACA_DATABASE_URL at "
                                "another file")
    if primary == sqlite3.SQLITE_CORRUPT:
        return StoreUnavailable(url, Fault.CORRUPT,
                                f"{where} is corrupt (truncated or damaged: {exc})",
                                f"Restore it from a backup (`sqlite3 {where} .recover` may "
                                "salvage rows), or point ALPACA_DATABASE_URL at another file")
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreUnavailable(url, Fault.LOCKED, f"{where} stays locked by another "
                                "process", "Retry when its writer has finished, or stop the "
                                "process holding the lock")
    if path is None or primary not in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN,
                                       sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PERM):
        return None
    diagnosed = _diagnose_path(url, path)
    if diagnosed is not None:
        return diagnosed
    if primary == sqlite3.SQLITE_READONLY:
        return StoreUnavailable(url, Fault.READ_ONLY_FILE, f"{where} is read-only ({name})",
                                "Make the file writable for this user, or point "
                                "ALPACA_DATABASE_URL at a writable file")
    if primary == sqlite3.SQLITE_IOERR:
        return StoreUnavailable(url, Fault.IO_ERROR, f"disk I/O error on {where} ({name})",
                                "Check the disk and the filesystem holding it")
    return StoreUnavailable(url, Fault.IO_ERROR, f"cannot open {where} ({exc})",
                            "Check that the path and its directory are usable by this user")


def _diagnose_path(url: str, path: Path) -> StoreUnavailable | None:
    """Why a SQLite path cannot be opened or written, from the filesystem itself."""
    where = str(path.resolve())
    directory = path.resolve().parent
    if path.is_dir():
        return StoreUnavailable(url, Fault.IS_DIRECTORY, f"{where} is a directory, not a "
                                "database file", "Point ALPACA_DATABASE_URL at a file "
                                f"(e.g. sqlite:///{path / 'alpaca.db'})")
    if directory.is_dir() and not _writable(directory):
        return StoreUnavailable(url, Fault.READ_ONLY_DIRECTORY,
                                f"the directory {directory} is read-only (SQLite's WAL mode "
                                f"must create {path.name}-wal and {path.name}-shm beside the "
                                "file)", "Make the directory writable, or move the database to "
                                         "a writable place")
    if path.exists() and not os.access(path, os.W_OK):
        return StoreUnavailable(url, Fault.READ_ONLY_FILE, f"{where} is read-only",
                                "Make the file writable for this user, or point "
                                "ALPACA_DATABASE_URL at a writable file")
    if directory.is_dir() and shutil.disk_usage(directory).free == 0:
        return _disk_full(url, where, "no space left on device")
    return None


def _disk_full(url: str, where: str, detail: str) -> StoreUnavailable:
    return StoreUnavailable(url, Fault.DISK_FULL, f"the disk holding {where} is full ({detail})",
                            "Free space on that disk, then resume interrupted runs with "
                            "`alpaca runs resume RUN_ID` (a worker resumes them by itself)")


def _os_fault(exc: OSError, url: str) -> StoreUnavailable | None:
    path = sqlite_file(url)
    if path is None:
        return None
    where = str(path.resolve())
    if exc.errno == errno.ENOSPC:
        return _disk_full(url, where, exc.strerror or "no space left on device")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreUnavailable(url, Fault.READ_ONLY_DIRECTORY,
                                f"cannot create {exc.filename or path.parent} "
                                f"({exc.strerror})", "Make the directory writable, or point "
                                "ALPACA_DATABASE_URL at a writable place")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return StoreUnavailable(url, Fault.IS_DIRECTORY,
                                f"{exc.filename or path.parent} is not a directory",
                                "Point ALPACA_DATABASE_URL at a file in a directory")
    return None


# -- PostgreSQL ----------------------------------------------------------------------------


def _postgres_fault(exc: BaseException, url: str, timeout: float | None
                    ) -> StoreUnavailable | None:
    import psycopg
    from psycopg_pool import PoolTimeout

    if isinstance(exc, PoolTimeout):
        return StoreUnavailable(url, Fault.TIMEOUT,
                                f"no connection to the server {_within(timeout)} (it is down, "
                                "or every connection is busy)", _check_server(url))
    if not isinstance(exc, psycopg.OperationalError):
        return None
    sqlstate = getattr(exc, "sqlstate", None) or ""
    text = _one_line(str(exc))
    if sqlstate == "53100":
        return StoreUnavailable(url, Fault.DISK_FULL, f"the PostgreSQL server's disk is full "
                                f"({_short_cause(text)})", "Free space on the database "
                                "server, then resume interrupted runs with `alpaca runs resume "
                                "RUN_ID` (a worker resumes them by itself)")
    if sqlstate == "53300":
        return StoreUnavailable(url, Fault.UNREACHABLE, "the server has no free connection "
                                "slot", "Lower ALPACA_WORKER_CONCURRENCY or the number of "
                                "processes, or raise max_connections on the server")
    if sqlstate and not sqlstate.startswith(("08", "57P", "53")):
        return None
    cause = _short_cause(text)
    lower = cause.lower()
    if "timeout expired" in lower or "timed out" in lower:
        return StoreUnavailable(url, Fault.TIMEOUT, _no_answer(timeout), _check_server(url))
    missing = re.search(r'database "(.*)" does not exist', cause)
    if missing:
        return StoreUnavailable(url, Fault.MISSING_DATABASE, cause,
                                f"Create it (createdb {missing.group(1)}) or fix the database "
                                "name in ALPACA_DATABASE_URL")
    if "password authentication failed" in lower or re.search(r'role ".*" does not exist',
                                                              cause) or "no password" in lower:
        return StoreUnavailable(url, Fault.AUTH, f"authentication failed ({cause})",
                                "Check the user and password in ALPACA_DATABASE_URL")
    if "invalid" in lower and ("port" in lower or "connection option" in lower):
        return StoreUnavailable(url, Fault.MALFORMED_URL, cause, "Fix ALPACA_DATABASE_URL "
                                "(postgresql://user:password@host:5432/db)")
    return StoreUnavailable(url, Fault.UNREACHABLE, f"cannot connect ({cause})",
                            _check_server(url))


def _within(timeout: float | None) -> str:
    return "in time" if timeout is None else f"within {timeout:g} s"


# -- MongoDB -------------------------------------------------------------------------------


def _mongo_fault(exc: BaseException, url: str, timeout: float | None) -> StoreUnavailable | None:
    if type(exc).__name__ == "TransactionsUnsupported":
        return StoreUnavailable(url, Fault.NO_TRANSACTIONS,
                                "this MongoDB is a standalone server, and the engine needs "
                                "multi-document transactions (a replica set or a sharded "
                                "cluster)", "Start it as a single-node replica set "
                                "(`mongod --replSet rs0`, then `rs.initiate()` once)")
    from pymongo import errors as mx

    text = _one_line(str(exc))
    if isinstance(exc, mx.ServerSelectionTimeoutError):
        reason = _short_cause(text.split(", Timeout:", 1)[0].split(" (configured timeouts", 1)[0])
        return StoreUnavailable(url, Fault.UNREACHABLE,
                                f"no MongoDB server answered {_within(timeout)} ({reason})",
                                _check_server(url))
    if isinstance(exc, mx.ConfigurationError):  # InvalidURI too
        return StoreUnavailable(url, Fault.MALFORMED_URL, f"not a valid MongoDB URL ({text})",
                                "Fix ALPACA_DATABASE_URL (mongodb://host:27017/db?"
                                "replicaSet=rs0)")
    if isinstance(exc, mx.ConnectionFailure):  # AutoReconnect, NetworkTimeout
        return StoreUnavailable(url, Fault.UNREACHABLE, f"lost the connection ({text})",
                                _check_server(url))
    if isinstance(exc, mx.OperationFailure):
        if exc.code in (13, 18):
            return StoreUnavailable(url, Fault.AUTH, f"authentication failed ({text})",
                                    "Check the user and password in ALPACA_DATABASE_URL")
        if exc.code == 14031 or "no space left" in text.lower():
            return StoreUnavailable(url, Fault.DISK_FULL, f"the MongoDB server's disk is full "
                                    f"({text})", "Free space on the database server, then "
                                    "resume interrupted runs with `alpaca runs resume RUN_ID`")
    return None


# ------------------------------------------------------------------------------ watch


class FaultWatch:
    """The last store fault a request hit, for ``hold`` seconds: a full disk still answers
    reads, so a read probe alone would call the service ready while every write fails."""

    def __init__(self, hold: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold = hold
        self._clock = clock
        self._last: tuple[float, Unavailable] | None = None

    def saw(self, fault: Unavailable) -> None:
        self._last = (self._clock(), fault)

    def recent(self) -> tuple[float, Unavailable] | None:
        """``(seconds ago, fault)`` while it is recent, else ``None``."""
        if self._last is None:
            return None
        ago = self._clock() - self._last[0]
        return (ago, self._last[1]) if ago <= self.hold else None


# ------------------------------------------------------------------------- store classes

_C = TypeVar("_C", bound=type)


def translating_faults(cls: _C) -> _C:
    """Wrap a store class's public methods so each raises :class:`StoreUnavailable` for a
    fault (naming ``self.url``) instead of the driver's exception. Methods added later are
    covered too; private helpers are not wrapped (their callers are)."""
    for name, member in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        setattr(cls, name, _translated(member))
    return cls


def _translated(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def call_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(self, *args, **kwargs)
            except Exception as exc:
                _reraise(self, exc)
                raise

        return call_async

    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:
            _reraise(self, exc)
            raise

    return call


def _reraise(store: Any, exc: Exception) -> None:
    if isinstance(exc, Unavailable):
        return
    fault = store_fault(exc, getattr(store, "url", "?"), getattr(store, "connect_timeout", None))
    if fault is not None:
        raise fault from exc
