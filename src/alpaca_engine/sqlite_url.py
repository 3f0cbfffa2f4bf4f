"""What a ``sqlite:///`` URL names: the file, and how hard each commit is made durable.

``?synchronous=full`` makes SQLite sync the WAL to disk at every commit, as PostgreSQL does
with ``synchronous_commit=on``: a commit then survives a power cut or an OS crash, not only a
crash of the process. The default, ``normal``, syncs at checkpoints only (SQLite's advice for
WAL mode): a killed process loses nothing, a power cut may lose the last commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

MEMORY = ":memory:"
SYNCHRONOUS = ("normal", "full")


class BadSqliteUrl(ValueError):
    """A ``sqlite:`` URL the store cannot open: ``cause`` and ``fix``, one line each."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause}. {fix}")
        self.cause = cause
        self.fix = fix


@dataclass(frozen=True)
class SqliteUrl:
    path: str
    """The file (``:memory:`` for an in-memory database)."""
    synchronous: str = "normal"
    """SQLite's ``PRAGMA synchronous`` for every connection: ``normal`` or ``full``."""


def parse_sqlite_url(url: str) -> SqliteUrl:
    """The file and options of ``url``; :class:`BadSqliteUrl` for a URL that is not one."""
    if url in ("sqlite://", "sqlite:///:memory:", MEMORY):
        return SqliteUrl(MEMORY)
    if not url.startswith("sqlite:///"):
        raise BadSqliteUrl("a SQLite URL needs three slashes",
                           "Write sqlite:///relative/path.db or sqlite:////absolute/path.db "
                           "in ALPACA_DATABASE_URL")
    path, _, query = url[len("sqlite:///"):].partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    unknown = sorted(set(options) - {"synchronous"})
    if unknown:
        raise BadSqliteUrl(f"unknown SQLite URL option {unknown[0]!r}",
                           "Remove it from ALPACA_DATABASE_URL (the one option is "
                           "?synchronous=normal|full)")
    synchronous = options.get("synchronous", "normal").lower()
    if synchronous not in SYNCHRONOUS:
        raise BadSqliteUrl(f"synchronous={options['synchronous']!r} is not a choice",
                           "Write ?synchronous=normal (the default) or ?synchronous=full "
                           "in ALPACA_DATABASE_URL")
    if not path:
        raise BadSqliteUrl("the SQLite URL names no file",
                           "Write sqlite:///relative/path.db or sqlite:////absolute/path.db "
                           "in ALPACA_DATABASE_URL")
    return SqliteUrl(path, synchronous)
