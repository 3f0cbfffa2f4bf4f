"""An unusable database or Redis is one line on stderr and exit 1, for every command.

Each test runs the real ``alpaca`` command against a real fault: a malformed URL, a corrupt,
truncated, read-only or misplaced SQLite file, a read-only directory, a closed port, a server
that accepts and never answers, a MongoDB without a replica set. Nothing is asserted about
speed except that an unreachable server is reported within a bound derived from
``ALPACA_CONNECT_TIMEOUT`` (1 s here: well under 20 s even on a loaded machine).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.faultkit import SilentServer, StandaloneMongo, read_only_file, remount, tmpfs
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

WORKFLOW = str(Path(__file__).parent / "faultwf" / "workflow.yaml")
UNREACHABLE_MARGIN = 15.0  # seconds beyond a healthy command's start-up, for a 1 s timeout

EVERY_COMMAND: dict[str, Sequence[str]] = {
    "runs list": ("runs", "list"),
    "runs show": ("runs", "show", "run_x"),
    "runs resume": ("runs", "resume", "run_x"),
    "runs cancel": ("runs", "cancel", "run_x"),
    "run": ("run", WORKFLOW, "--agent", "echo", "--input", "hi"),
    "run --submit-only": ("run", WORKFLOW, "--agent", "echo", "--input", "hi",
                          "--submit-only"),
    "demo": ("demo", "--yes"),
    "worker": ("worker", "--until-idle"),
    "doctor": ("doctor",),
    "db upgrade": ("db", "upgrade"),
    "approvals list": ("approvals", "list"),
    "audit verify": ("audit", "verify", "run_x"),
    "keys create": ("keys", "create", "--tenant", "acme"),
    "serve": ("serve", "--port", "0"),
}


def alpaca(args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alpaca_engine", *args], env=env,
                          capture_output=True, text=True, timeout=90)


def pick(*names: str) -> dict[str, Sequence[str]]:
    return {name: EVERY_COMMAND[name] for name in names}


def alpaca_all(commands: dict[str, Sequence[str]], env: dict[str, str]
               ) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every command at once (they only start, fail and exit): one wait instead of many."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "alpaca_engine", *args], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def fault_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALPACA_")}
    return {**env, "ALPACA_DATABASE_URL": database_url, "ALPACA_CONNECT_TIMEOUT": "1",
            "COLUMNS": "80", **extra}


def one_line(done: subprocess.CompletedProcess[str], *parts: str) -> str:
    """Exit 1, exactly one line on stderr (no traceback, no log line before it), naming
    every part."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines[0]
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def good_database(path: Path) -> Path:
    """A real store file with a few runs in it (checkpointed: no WAL beside it)."""
    env = fault_env(f"sqlite:///{path}")
    for _ in range(3):
        done = alpaca(("run", WORKFLOW, "--agent", "echo", "--input", "hi"), env)
        assert done.returncode == 0, done.stderr
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return good_database(tmp_path_factory.mktemp("good") / "alpaca.db")


# ----------------------------------------------------------------- malformed URLs


def test_a_garbage_database_url_is_one_line_for_every_command() -> None:
    results = alpaca_all(EVERY_COMMAND, fault_env("garbage"))
    for command, done in results.items():
        line = one_line(done, "garbage", "not a database URL")
        assert line == ("error: database garbage: not a database URL. Set ALPACA_DATABASE_URL "
                        "to sqlite:///path/to/file.db, postgresql://user@host:5432/db or "
                        "mongodb://host:27017/db"), command


@pytest.mark.parametrize(("url", "says"), [
    ("oracle://db.example/x", "unsupported database URL scheme 'oracle'"),
    ("sqlite:/relative.db", "not a SQLite URL"),
    ("sqlite://relative.db", "three slashes"),
    ("sqlite:///relative.db?synchronous=off", "synchronous='off' is not a choice"),
    ("postgresql://[bad/x", "not a valid PostgreSQL URL"),
    ("postgresql://u:pw@127.0.0.1:99999/x", "invalid port"),
])
def test_other_malformed_urls_name_the_cause(url: str, says: str) -> None:
    one_line(alpaca(("runs", "list"), fault_env(url)), says)


def test_a_bad_connect_timeout_is_one_line(tmp_path: Path) -> None:
    env = fault_env(f"sqlite:///{tmp_path}/a.db", ALPACA_CONNECT_TIMEOUT="soon")
    one_line(alpaca(EVERY_COMMAND["runs list"], env), "ALPACA_CONNECT_TIMEOUT", "'soon'")


# ----------------------------------------------------------------- SQLite files


def test_a_file_with_a_bad_header(tmp_path: Path, populated: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is no database!" + populated.read_bytes()[20:])
    for done in alpaca_all(pick("runs list", "run", "serve"),
                           fault_env(f"sqlite:///{bad}")).values():
        one_line(done, str(bad), "not a SQLite database (bad header)", "backup")


def test_a_truncated_file(tmp_path: Path, populated: Path) -> None:
    cut = tmp_path / "cut.db"
    data = populated.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for done in alpaca_all(pick("runs list", "worker"), fault_env(f"sqlite:///{cut}")).values():
        one_line(done, str(cut), "truncated", "backup")


def test_a_file_damaged_inside_is_corrupt_at_the_first_read(tmp_path: Path,
                                                            populated: Path) -> None:
    """The header is intact and the length is right: SQLite finds the damage itself."""
    broken = tmp_path / "broken.db"
    data = bytearray(populated.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    for offset in range(page, len(data)):  # every page after the first: garbage
        data[offset] = 0xA5
    broken.write_bytes(bytes(data))
    one_line(alpaca(EVERY_COMMAND["runs list"], fault_env(f"sqlite:///{broken}")),
             str(broken), "corrupt")


def test_a_directory_at_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "alpaca.db"
    folder.mkdir()
    for done in alpaca_all(pick("runs list", "demo"),
                           fault_env(f"sqlite:///{folder}")).values():
        one_line(done, f"{folder} is a directory", f"sqlite:///{folder}/alpaca.db")


def test_a_parent_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    one_line(alpaca(EVERY_COMMAND["runs list"],
                    fault_env(f"sqlite:///{tmp_path}/plain/alpaca.db")), "not a directory")


def test_a_read_only_file(tmp_path: Path, populated: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        db = disk / "alpaca.db"
        db.write_bytes(populated.read_bytes())
        with read_only_file(db):
            for done in alpaca_all(pick("runs list", "run", "db upgrade"),
                                   fault_env(f"sqlite:///{db}")).values():
                one_line(done, f"{db} is read-only", "writable")


def test_a_read_only_directory(tmp_path: Path, populated: Path) -> None:
    """WAL mode must create alpaca.db-wal and -shm beside the file: a read-only directory
    (here a read-only filesystem) refuses that even though the file itself is fine."""
    with tmpfs(tmp_path / "disk") as disk:
        db = disk / "alpaca.db"
        db.write_bytes(populated.read_bytes())
        remount(disk, read_only=True)
        for done in alpaca_all(pick("runs list", "worker", "serve"),
                               fault_env(f"sqlite:///{db}")).values():
            one_line(done, f"the directory {disk} is read-only", "alpaca.db-wal")
        new = disk / "new.db"
        one_line(alpaca(EVERY_COMMAND["runs list"], fault_env(f"sqlite:///{new}")),
                 f"the directory {disk} is read-only")


def test_a_full_disk_before_the_store_exists(tmp_path: Path) -> None:
    from tests.faultkit import fill

    with tmpfs(tmp_path / "disk", size="1m") as disk:
        fill(disk)
        one_line(alpaca(EVERY_COMMAND["run"], fault_env(f"sqlite:///{disk}/alpaca.db")),
                 "disk", "full", "Free space")


# ----------------------------------------------------------------- servers


def reported_in_time(command: str, env: dict[str, str], *parts: str
                     ) -> subprocess.CompletedProcess[str]:
    """An unreachable server: the one line, within what the 1 s timeout allows beyond the
    time the same machine, as loaded as it is now, takes to run a healthy command (a hang
    would be the driver's own 30 s and more)."""
    with tempfile.TemporaryDirectory() as spare:
        started = time.monotonic()
        healthy = alpaca(EVERY_COMMAND["runs list"], fault_env(f"sqlite:///{spare}/ok.db"))
        baseline = time.monotonic() - started
    assert healthy.returncode == 0, healthy.stderr
    started = time.monotonic()
    done = alpaca(EVERY_COMMAND[command], env)
    took = time.monotonic() - started
    line = one_line(done, *parts)
    assert took < baseline + UNREACHABLE_MARGIN, (took, baseline, line)
    return done


def test_postgresql_on_a_closed_port() -> None:
    url = f"postgresql://alpaca:s3cret-pw@127.0.0.1:{free_port()}/alpaca"
    parts = ("postgresql://alpaca:***@127.0.0.1", "connection refused", "ALPACA_DATABASE_URL",
             "ALPACA_CONNECT_TIMEOUT")
    for command in ("runs list", "worker"):
        done = reported_in_time(command, fault_env(url), *parts)
        assert "s3cret-pw" not in done.stderr + done.stdout
    for done in alpaca_all(pick("run", "doctor", "db upgrade", "serve", "demo"),
                           fault_env(url)).values():
        one_line(done, *parts)
        assert "s3cret-pw" not in done.stderr + done.stdout


def test_postgresql_that_never_answers_is_reported_after_the_connect_timeout() -> None:
    with SilentServer() as silent:
        url = f"postgresql://postgres@127.0.0.1:{silent.port}/test"
        for command in ("runs list", "serve"):
            reported_in_time(command, fault_env(url), "no answer within 1 s",
                             "ALPACA_CONNECT_TIMEOUT")


def test_a_missing_postgresql_database_says_how_to_create_it() -> None:
    url = "postgresql://postgres@127.0.0.1:5432/alpaca_no_such_db"
    done = alpaca(EVERY_COMMAND["runs list"], fault_env(url))
    if "connection refused" in done.stderr:
        from tests.conftest import service_unavailable

        service_unavailable("PostgreSQL", done.stderr.strip())
    one_line(done, 'database "alpaca_no_such_db" does not exist',
             "createdb alpaca_no_such_db")


def test_mongodb_on_a_closed_port() -> None:
    url = f"mongodb://127.0.0.1:{free_port()}/alpaca"
    for command in ("runs list", "worker"):
        reported_in_time(command, fault_env(url), "no MongoDB server answered within 1 s",
                         "ALPACA_CONNECT_TIMEOUT")


def test_mongodb_that_never_answers() -> None:
    with SilentServer() as silent:
        reported_in_time("runs list", fault_env(f"mongodb://127.0.0.1:{silent.port}/alpaca"),
                         "no MongoDB server answered within 1 s")


def test_a_standalone_mongodb_is_refused_with_the_replica_set_fix() -> None:
    with StandaloneMongo() as mongo:
        url = f"mongodb://127.0.0.1:{mongo.port}/alpaca?directConnection=true"
        for done in alpaca_all(pick("runs list", "serve"), fault_env(url)).values():
            one_line(done, "standalone server", "transactions", "--replSet rs0", "rs.initiate()")


def test_redis_on_a_closed_port(tmp_path: Path) -> None:
    env = fault_env(f"sqlite:///{tmp_path}/a.db",
                    ALPACA_REDIS_URL=f"redis://:hunter2-pw@127.0.0.1:{free_port()}/0")
    parts = ("Redis redis://:***@127.0.0.1", "connection refused", "ALPACA_REDIS_URL")
    timed = reported_in_time("worker", env, *parts)
    results = alpaca_all(pick("serve", "run --submit-only"), env)
    for done in [timed, *results.values()]:
        one_line(done, *parts)
        assert "hunter2-pw" not in done.stderr + done.stdout


def test_redis_that_never_answers(tmp_path: Path) -> None:
    with SilentServer() as silent:
        env = fault_env(f"sqlite:///{tmp_path}/a.db",
                        ALPACA_REDIS_URL=f"redis://127.0.0.1:{silent.port}/0")
        reported_in_time("worker", env, "no answer within 1 s", "ALPACA_CONNECT_TIMEOUT")


def test_a_malformed_redis_url(tmp_path: Path) -> None:
    env = fault_env(f"sqlite:///{tmp_path}/a.db", ALPACA_REDIS_URL="localhost:6379")
    one_line(alpaca(EVERY_COMMAND["worker"], env), "not a Redis URL", "redis://host:6379/0")
