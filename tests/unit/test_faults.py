"""faults.py: every storage/coordination fault becomes one typed line; anything else is left
alone. Driver exceptions here are real ones (SQLite raises them itself) or the drivers' own
classes; the end-to-end checks against real servers and files live in tests/e2e and
tests/api."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import PoolTimeout
from pymongo import errors as mongo_errors
from redis import exceptions as redis_errors

from alpaca_engine.config import Settings
from alpaca_engine.engine import Engine
from alpaca_engine.errors import ErrorCode
from alpaca_engine.faults import (
    CoordinationUnavailable,
    Fault,
    FaultWatch,
    MalformedUrl,
    StoreUnavailable,
    check_database_url,
    coordination_fault,
    mask_url,
    store_fault,
)
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.records import StepStatus
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.tools.decorator import tool
from tests.helpers import workflow

PG = "postgresql://app:pw@db.example:5432/app"
REDIS = "redis://:pw@cache.example:6379/0"


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql://app:s3cret@db:5432/x", "postgresql://app:***@db:5432/x"),
    ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
    ("mongodb://u:p%40ss@h1,h2/db?replicaSet=rs0", "mongodb://u:***@h1,h2/db?replicaSet=rs0"),
    ("postgresql://db/x?user=a&password=s3cret&sslmode=require",
     "postgresql://db/x?user=a&password=***&sslmode=require"),
    ("postgresql://app@db/x", "postgresql://app@db/x"),
    ("sqlite:///./alpaca.db", "sqlite:///./alpaca.db"),
])
def test_mask_url_hides_passwords_only(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(("url", "scheme"), [
    ("sqlite:///./alpaca.db", "sqlite"), ("sqlite:////abs/a.db", "sqlite"),
    (":memory:", "sqlite"), ("sqlite://", "sqlite"), ("postgresql://u@h/db", "postgresql"),
    ("sqlite:///a.db?synchronous=full", "sqlite"), ("sqlite:///a.db?synchronous=NORMAL", "sqlite"),
    ("postgres://h/db", "postgresql"), ("mongodb://h/db", "mongodb"),
    ("mongodb+srv://c.example/db", "mongodb+srv"),
])
def test_usable_urls(url: str, scheme: str) -> None:
    assert check_database_url(url) == scheme


@pytest.mark.parametrize(("url", "says"), [
    ("garbage", "not a database URL"), ("", "not a database URL"),
    ("mysql://h/db", "unsupported database URL scheme 'mysql'"),
    ("sqlite:/x.db", "not a SQLite URL"), ("sqlite://x.db", "three slashes"),
    ("sqlite:///", "names no file"), ("sqlite:///a.db?journal=off", "unknown SQLite URL option"),
    ("sqlite:///a.db?synchronous=off", "synchronous='off' is not a choice"),
    ("postgresql://[oops/db", "not a valid PostgreSQL URL"),
])
def test_malformed_urls_are_one_line_naming_the_forms(url: str, says: str) -> None:
    with pytest.raises(MalformedUrl) as e:
        check_database_url(url)
    message = str(e.value)
    assert says in message and "\n" not in message and "ALPACA_DATABASE_URL" in message
    assert e.value.code == ErrorCode.STORE_UNAVAILABLE and e.value.fault == Fault.MALFORMED_URL
    assert isinstance(e.value, ValueError)  # callers that caught ValueError still do


def test_sqlite_errors_raised_by_sqlite_itself(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(sqlite3.DatabaseError) as e:
        sqlite3.connect(bad).execute("SELECT 1 FROM sqlite_master")
    fault = store_fault(e.value, f"sqlite:///{bad}")
    assert fault is not None and fault.fault == Fault.NOT_A_DATABASE
    assert str(bad) in str(fault) and "backup" in str(fault)

    full = tmp_path / "full.db"
    db = sqlite3.connect(full)
    db.execute("CREATE TABLE t(x)")
    db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.OperationalError) as e:
        db.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))
    fault = store_fault(e.value, f"sqlite:///{full}")
    assert fault is not None and fault.fault == Fault.DISK_FULL and fault.transient
    assert "alpaca runs resume" in str(fault)

    db.execute("PRAGMA max_page_count=1000000")
    with pytest.raises(sqlite3.IntegrityError) as e:
        db.execute("CREATE UNIQUE INDEX u ON t(x)")
        db.execute("INSERT INTO t VALUES (1)")
        db.execute("INSERT INTO t VALUES (1)")
    assert store_fault(e.value, f"sqlite:///{full}") is None  # a constraint is no fault

    ro = sqlite3.connect(f"file:{full}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as e:
        ro.execute("INSERT INTO t VALUES (2)")
    fault = store_fault(e.value, f"sqlite:///{full}")
    assert fault is not None and fault.fault == Fault.READ_ONLY_FILE


async def test_a_sqlite_store_at_a_directory_is_one_line(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}")
    with pytest.raises(StoreUnavailable) as e:
        await store.open()
    assert e.value.fault == Fault.IS_DIRECTORY
    assert str(e.value) == (f"database sqlite:///{tmp_path}: {tmp_path} is a directory, not a "
                            f"database file. Point ALPACA_DATABASE_URL at a file (e.g. "
                            f"sqlite:///{tmp_path}/alpaca.db)")
    assert isinstance(e.value.__cause__, sqlite3.OperationalError)


def test_postgresql_faults() -> None:
    full = store_fault(psycopg.errors.DiskFull("could not extend file \"base/1/2\": No space "
                                               "left on device"), PG)
    assert full is not None and full.fault == Fault.DISK_FULL
    assert "postgresql://app:***@db.example:5432/app" in str(full) and "pw" not in str(full)
    assert full.public == "the database is not usable: its disk is full; retry later"
    pool = store_fault(PoolTimeout("couldn't get a connection after 1.00 sec"), PG, 1.0)
    assert pool is not None and pool.fault == Fault.TIMEOUT and "within 1 s" in str(pool)
    refused = store_fault(psycopg.OperationalError(
        'connection failed: connection to server at "10.0.0.1", port 5432 failed: Connection '
        "refused\n\tIs the server running on that host and accepting TCP/IP connections?"), PG)
    assert refused is not None and refused.fault == Fault.UNREACHABLE
    assert "connection refused" in str(refused) and "\n" not in str(refused)
    auth = store_fault(psycopg.OperationalError(
        'connection failed: connection to server at "h", port 5432 failed: FATAL:  password '
        'authentication failed for user "app"'), PG)
    assert auth is not None and auth.fault == Fault.AUTH
    gone = store_fault(psycopg.errors.AdminShutdown("terminating connection"), PG)
    assert gone is not None and gone.fault == Fault.UNREACHABLE
    for not_a_fault in (psycopg.errors.UniqueViolation("dup"), psycopg.DataError(
            "PostgreSQL text fields cannot contain NUL (0x00) bytes"),
            psycopg.errors.SyntaxError("oops")):
        assert store_fault(not_a_fault, PG) is None


def test_mongodb_faults() -> None:
    url = "mongodb://u:pw@m1:27017/app"
    down = store_fault(mongo_errors.ServerSelectionTimeoutError(
        "m1:27017: [Errno 111] Connection refused (configured timeouts: connectTimeoutMS: "
        "1000.0ms), Timeout: 1.0s, Topology Description: <...>"), url, 1.0)
    assert down is not None and down.fault == Fault.UNREACHABLE
    assert "Topology" not in str(down) and "within 1 s" in str(down)
    auth = store_fault(mongo_errors.OperationFailure("Authentication failed.", code=18), url)
    assert auth is not None and auth.fault == Fault.AUTH
    full = store_fault(mongo_errors.OperationFailure("out of disk space", code=14031), url)
    assert full is not None and full.fault == Fault.DISK_FULL
    assert store_fault(mongo_errors.DuplicateKeyError("E11000"), url) is None


def test_redis_faults() -> None:
    for exc, kind in [
        (redis_errors.ConnectionError("Error 111 connecting to cache:6379. Connection "
                                      "refused."), Fault.UNREACHABLE),
        (redis_errors.TimeoutError("Timeout reading from socket"), Fault.TIMEOUT),
        (redis_errors.AuthenticationError("invalid password"), Fault.AUTH),
        (redis_errors.ResponseError("MISCONF Redis is configured to save RDB snapshots, but "
                                    "it's currently unable to persist to disk"),
         Fault.DISK_FULL),
        (TimeoutError(), Fault.TIMEOUT),
    ]:
        fault = coordination_fault(exc, REDIS, 1.0)
        assert isinstance(fault, CoordinationUnavailable), exc
        assert fault.fault == kind and fault.code == ErrorCode.COORDINATION_UNAVAILABLE
        assert str(fault).startswith("Redis redis://:***@cache.example:6379/0: ")
    assert coordination_fault(redis_errors.ResponseError("WRONGTYPE"), REDIS) is None


def test_the_fault_watch_forgets_after_its_hold() -> None:
    now = [100.0]
    watch = FaultWatch(hold=10, clock=lambda: now[0])
    assert watch.recent() is None
    fault = StoreUnavailable("sqlite:///a.db", Fault.DISK_FULL, "full", "free space")
    watch.saw(fault)
    now[0] += 4
    assert watch.recent() == (4.0, fault)
    now[0] += 7
    assert watch.recent() is None


def test_the_connect_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().connect_timeout == 5.0
    monkeypatch.setenv("ALPACA_CONNECT_TIMEOUT", "1.5")
    assert Settings().connect_timeout == 1.5


async def test_a_full_store_mid_run_leaves_a_resumable_journal(tmp_path: Path) -> None:
    """No root needed: SQLite's max_page_count makes the store 'full' between two steps.
    The runner writes no terminal state (that write would fail too), the journal keeps the
    step in flight as `started`, and the run finishes after room returns."""
    calls: list[str] = []
    store = SQLiteStore(f"sqlite:///{tmp_path}/r.db")
    await store.open()

    @tool
    def grow(label: str) -> str:
        """Make the next journal write need a new page, on a store with no page left."""
        calls.append(label)
        if calls == ["a", "fill"]:  # only the first time
            pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
            store._conn.execute(f"PRAGMA max_page_count={pages}")
        return label * 20_000

    wf = workflow([{"tool": "grow", "args": {"label": "a"}},
                   {"tool": "grow", "args": {"label": "fill"}}, "done"], [grow])
    engine = Engine(store, lambda ref: wf, lease_seconds=5)
    run = await engine.submit(wf, "agent", "go")
    with pytest.raises(StoreUnavailable) as e:
        await engine.run_tree(run.id)
    assert e.value.fault == Fault.DISK_FULL
    interrupted = await store.get_run(run.id)
    assert interrupted.state == RunState.RUNNING and interrupted.error_code is None
    steps = await store.list_steps(run.id)
    assert [s.status for s in steps] == [StepStatus.COMPLETED] * 3 + [StepStatus.STARTED]
    store._conn.execute("PRAGMA max_page_count=1073741823")
    final = await engine.resume(run.id, force=True)
    assert final.state == RunState.SUCCEEDED and final.output == "done"
    assert calls == ["a", "fill", "fill"]  # the completed call was not made again
    await store.close()
