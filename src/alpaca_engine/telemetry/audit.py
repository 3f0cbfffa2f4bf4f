"""Tamper-evident audit chain (DESIGN §7), as pure logic.

Every run has an append-only list of records ``{seq, time, run_id, actor, kind, data,
prev_hash, hash}``. ``hash`` is SHA-256 (or HMAC-SHA256 with the server key from
``ALPACA_AUDIT_KEY``) over the canonical JSON of the record without ``hash``, and each record
names the previous record's hash, so editing, removing, reordering or inserting a record breaks
the chain at a place ``verify_chain`` can name. Nothing here does I/O: the stores read the run's
head ``(seq, hash)`` from the run row inside their transaction, call ``next_record`` (through
``AuditChain``) and persist the records and the new head in that same transaction.

Without a key anyone with write access can rebuild the chain from the edit onwards; the key (or
anchoring the head hash elsewhere) is what makes rewriting detectable. Dropping records from the
*end* of a chain is detectable against the head the run row carries (``verify_chain(head=…)``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from json.encoder import encode_basestring
from typing import Any, TypeVar, cast

__all__ = [
    "AUDIT_KEY_ENV",
    "GENESIS",
    "REDACTED",
    "AuditChain",
    "AuditError",
    "AuditRecord",
    "VerifyResult",
    "canonical_json",
    "compute_hash",
    "is_secret_key",
    "iso_utc",
    "load_audit_key",
    "next_record",
    "redact",
    "verify_chain",
]

GENESIS = "0" * 64
"""``prev_hash`` of a run's first record: a fixed value, so the chain has a known start."""

AUDIT_KEY_ENV = "ALPACA_AUDIT_KEY"
REDACTED = "***"

_HASH_FIELDS = ("seq", "time", "run_id", "actor", "kind", "data", "prev_hash")
_TEXT_FIELDS = ("time", "run_id", "actor", "kind", "prev_hash", "hash")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_new_record = object.__new__

# Normalised (lower case, '-' -> '_') key names whose values are always secret; a key also
# counts when it ends with "_" + one of these (access_token, client_secret, openai_api_key).
_SECRET_KEYS = frozenset(
    {
        "authorization",
        "api_key",
        "apikey",
        "token",
        "secret",
        "password",
        "passwd",
        "webhook_url",
        "x_api_key",
        "private_key",
        "cookie",
    }
)

_T = TypeVar("_T")


class AuditError(ValueError):
    """Data that cannot enter the audit chain; a ValueError so generic handlers still catch it."""


# --------------------------------------------------------------------------- canonical JSON


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` to one byte string only: the hash must not depend on dict order.

    Sorted keys, no whitespace, UTF-8 without escaping. Only JSON types are accepted (dict with
    string keys, list/tuple, str, int, finite float, bool, None): NaN/Infinity are not JSON and
    datetimes have no single text form, so audit times travel as ISO-8601 UTC strings.
    """
    _check_json(obj, "$")
    try:
        return _CANONICAL.encode(obj).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AuditError(f"canonical_json: a string is not valid Unicode text ({exc})") from exc


# What ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
# allow_nan=False)`` builds on every call; the encoder keeps no state between calls.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_LEAF_TYPES = frozenset({str, int, bool, type(None)})
_PLAIN_DEPTH = 64


def _plain_encoder() -> Callable[[Any, int], Iterable[str]]:
    """The C encoder ``_CANONICAL.encode`` builds on every call, built once.

    Only for values ``_plain_json`` accepted: those have no cycles (their depth is bounded),
    so it skips the cycle check (``markers=None``); the text is the same. Without the C
    accelerator, ``_CANONICAL.encode`` itself.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return lambda value, _level: (_CANONICAL.encode(value),)
    encoder: Callable[[Any, int], Iterable[str]] = make(
        None, _CANONICAL.default, encode_basestring, _CANONICAL.indent,
        _CANONICAL.key_separator, _CANONICAL.item_separator, _CANONICAL.sort_keys,
        _CANONICAL.skipkeys, _CANONICAL.allow_nan,
    )
    return encoder


_PLAIN_CHUNKS = _plain_encoder()
# ``json.loads`` without its per-call checks: the canonical text has no BOM, no whitespace.
_DECODER = json.JSONDecoder()


def _plain_json(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is built only of the exact JSON types, finite floats, str keys.

    The fast path of ``next_record``: such a value passes ``_check_json`` and survives a
    canonical dump/load round trip unchanged, so its canonical text can be reused in the hash
    payload. Anything else (a subclass, a NaN, a datetime, deep nesting) answers False and
    takes the original path, which raises or hashes exactly as it always did.
    """
    kind = type(value)
    if kind in _LEAF_TYPES:
        return True
    if kind is float:
        return math.isfinite(value)
    if depth >= _PLAIN_DEPTH:
        return False
    if kind is dict:
        for key in value:
            if type(key) is not str:
                return False
        items = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return False
    for item in items:
        item_kind = type(item)  # scalars inline: most items are, and a call costs more
        if item_kind in _LEAF_TYPES:
            continue
        if item_kind is float:
            if not math.isfinite(item):
                return False
        elif not _plain_json(item, depth + 1):
            return False
    return True


def _check_json(value: Any, path: str) -> None:
    """Reject what json.dumps would coerce silently or emit as non-JSON, naming where it is."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(
                f"canonical_json: {path} is {value!r}; NaN and Infinity are not valid JSON"
            )
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(
                    f"canonical_json: {path} has non-string key {key!r}; JSON keys are strings"
                )
            _check_json(item, f"{path}.{key}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]")
        return
    if isinstance(value, date):
        raise AuditError(
            f"canonical_json: {path} is a {type(value).__name__}; "
            "put times in audit data as ISO-8601 UTC strings (see iso_utc)"
        )
    raise AuditError(f"canonical_json: {path} has unsupported type {type(value).__name__}")


# --------------------------------------------------------------------------- time


def iso_utc(when: datetime | float | None = None) -> str:
    """Format a time the one way the audit log writes it: ``2026-11-26T15:10:54.123456Z``.

    ``when`` is an aware datetime, an epoch in seconds (``Clock.now()``) or None for now.
    """
    kind = type(when)
    if kind is float or kind is int:
        return _epoch_text(cast(float, when))
    if when is None:
        moment = datetime.now(UTC)
    elif isinstance(when, datetime):
        if when.tzinfo is None or when.utcoffset() is None:
            raise AuditError("iso_utc: naive datetime; pass an aware datetime")
        moment = when.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(when, UTC)
    return moment.strftime(_ISO_FORMAT)


_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_last_second: tuple[int, int, str] = (0, -1, "")
"""(floor of an epoch, the second of its datetime, that datetime's text up to the second)."""


def _epoch_text(when: float) -> str:
    """``datetime.fromtimestamp(when, UTC).strftime(_ISO_FORMAT)``, the text up to the second
    reused while the second does not change (strftime costs several times the rest).

    The datetime is at second ``floor(when)``, or the next one when the microseconds round up
    to it; those two differ in ``moment.second``, so the pair names the second exactly.
    """
    global _last_second
    moment = datetime.fromtimestamp(when, UTC)
    whole = math.floor(when)
    cached_whole, cached_second, prefix = _last_second
    if cached_whole != whole or cached_second != moment.second:
        prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (whole, moment.second, prefix)
    return f"{prefix}.{moment.microsecond:06d}Z"


def _check_time(value: object) -> str:
    """Accept only ISO-8601 times in UTC, so records from different hosts compare as text."""
    if type(value) is str:
        _check_utc_text(value)  # the same few stamps come back: a batch shares one
        return value
    if not isinstance(value, str):
        raise AuditError(f"time must be an ISO-8601 UTC string, got {type(value).__name__}")
    _parse_utc_text(value)
    return value


def _parse_utc_text(value: str) -> None:
    """The parse of ``_check_time``: raises AuditError for a time that is not ISO-8601 UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise AuditError(f"time {value!r} is not ISO-8601") from exc
    if parsed.utcoffset() != timedelta(0):
        raise AuditError(f"time {value!r} is not UTC (use a 'Z' or '+00:00' suffix)")


_check_utc_text = functools.lru_cache(maxsize=256)(_parse_utc_text)
"""Cached for exact ``str`` (an error raises again each time: exceptions are not cached)."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class AuditRecord:
    """One link of a run's chain; ``hash`` covers every other field."""

    seq: int
    time: str
    run_id: str
    actor: str
    kind: str
    data: dict[str, Any]
    prev_hash: str
    hash: str

    def __post_init__(self) -> None:
        """Check types up front so a malformed stored row fails verification, not with a crash."""
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 1:
            raise AuditError(f"seq must be a positive integer, got {self.seq!r}")
        for name in _TEXT_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise AuditError(
                    f"{name} must be a string, got {type(getattr(self, name)).__name__}"
                )
        if not isinstance(self.data, dict):
            raise AuditError(f"data must be a JSON object, got {type(self.data).__name__}")

    @functools.cached_property
    def data_json(self) -> str:
        """``data`` as canonical JSON text (``canonical_json(data)``), for a store to write.

        Not a field: it takes no part in equality, repr, ``to_dict`` or the hash. A record
        from ``next_record`` carries the text the hash was built from; one from ``from_dict``
        (or ``dataclasses.replace``) computes it on first use, raising AuditError for data
        that has no canonical form.
        """
        return canonical_json(self.data).decode("utf-8")

    def hash_fields(self) -> dict[str, Any]:
        """The fields the hash covers (everything but ``hash``)."""
        return {name: getattr(self, name) for name in _HASH_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready copy for the stores (data is deep-copied: records stay frozen)."""
        out = self.hash_fields()
        out["data"] = copy.deepcopy(self.data)
        out["hash"] = self.hash
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AuditRecord:
        """Rebuild a record from a stored row; extra columns (e.g. a row id) are ignored."""
        missing = [name for name in (*_HASH_FIELDS, "hash") if name not in raw]
        if missing:
            raise AuditError(f"audit record is missing {', '.join(missing)}")
        data = raw["data"]
        return cls(
            seq=raw["seq"],
            time=raw["time"],
            run_id=raw["run_id"],
            actor=raw["actor"],
            kind=raw["kind"],
            data=copy.deepcopy(data) if isinstance(data, dict) else data,
            prev_hash=raw["prev_hash"],
            hash=raw["hash"],
        )


def compute_hash(fields: Mapping[str, Any], key: bytes | None = None) -> str:
    """Hex digest of the canonical JSON of ``fields`` (a record without ``hash``).

    With ``key`` it is HMAC-SHA256, so only the server holding the key can forge a chain.
    """
    if "hash" in fields:
        raise AuditError("compute_hash: pass the record fields without 'hash'")
    return _digest(canonical_json(dict(fields)), key)


def _digest(payload: bytes, key: bytes | None) -> str:
    if key is None:
        return hashlib.sha256(payload).hexdigest()
    if not key:
        raise AuditError("compute_hash: the audit key is empty")
    if type(key) is bytes:
        mac = _keyed(key).copy()  # the key's pads hashed once, not for every record
        mac.update(payload)
        return mac.hexdigest()
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


@functools.lru_cache(maxsize=8)
def _keyed(key: bytes) -> hmac.HMAC:
    """An HMAC-SHA256 of ``key`` over nothing yet, to copy (a process has one key or two)."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _require_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise AuditError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _check_head(last_seq: object, last_hash: object) -> None:
    """Catch a store passing a head that cannot be a chain's last record."""
    if isinstance(last_seq, bool) or not isinstance(last_seq, int) or last_seq < 0:
        raise AuditError(f"last_seq must be an integer >= 0, got {last_seq!r}")
    if not isinstance(last_hash, str) or not _HEX64.fullmatch(last_hash):
        raise AuditError(f"last_hash must be 64 lower-case hex digits, got {last_hash!r}")
    if last_seq == 0 and last_hash != GENESIS:
        raise AuditError("last_seq is 0 (empty chain) but last_hash is not GENESIS")
    if last_seq > 0 and last_hash == GENESIS:
        raise AuditError(f"last_seq is {last_seq} but last_hash is GENESIS")


def next_record(
    run_id: str,
    last_seq: int,
    last_hash: str,
    kind: str,
    data: Mapping[str, Any],
    actor: str,
    key: bytes | None = None,
    time: str | None = None,
    *,
    _head_checked: bool = False,
) -> AuditRecord:
    """Build the record after ``(last_seq, last_hash)``; the store persists it in the same txn.

    ``data`` is normalised through canonical JSON, so the stored record re-verifies exactly after
    a JSON round trip (tuples become lists). Redact secrets before calling (see ``redact``).
    ``_head_checked``: the head is one ``AuditChain`` checked or made (not checked again).
    """
    _require_text("run_id", run_id)
    _require_text("kind", kind)
    _require_text("actor", actor)
    if not _head_checked:
        _check_head(last_seq, last_hash)
    if type(data) is not dict and not isinstance(data, Mapping):
        raise AuditError(f"data must be a mapping, got {type(data).__name__}")
    stamp = iso_utc() if time is None else _check_time(time)
    plain = data if type(data) is dict else dict(data)  # only read: no copy needed
    seq = last_seq + 1
    if type(seq) is int and _plain_json(plain):
        # One check and one dump of the data: the hash payload is spliced from its canonical
        # text, byte for byte what canonical_json(fields) gives (keys in sorted order).
        text = "".join(_PLAIN_CHUNKS(plain, 0))
        enc = encode_basestring  # what _CANONICAL.encode does with a str
        try:
            payload = (
                f'{{"actor":{enc(actor)},"data":{text},"kind":{enc(kind)},'
                f'"prev_hash":{enc(last_hash)},"run_id":{enc(run_id)},'
                f'"seq":{int.__repr__(seq)},"time":{enc(stamp)}}}'
            ).encode()
        except UnicodeEncodeError:
            pass  # a lone surrogate: the original path below raises the usual AuditError
        else:
            # Every field is already checked (texts above, seq an int >= 1, the digest
            # hex): the record is filled in directly, without __init__ checking it again.
            record = _new_record(AuditRecord)
            slots = record.__dict__
            slots["seq"] = seq
            slots["time"] = stamp
            slots["run_id"] = run_id
            slots["actor"] = actor
            slots["kind"] = kind
            slots["data"] = _DECODER.raw_decode(text)[0]  # json.loads(text), a fresh copy
            slots["prev_hash"] = last_hash
            slots["hash"] = _digest(payload, key)
            slots["data_json"] = text  # fills the cached_property
            return record
    fields: dict[str, Any] = {
        "seq": seq,
        "time": stamp,
        "run_id": run_id,
        "actor": actor,
        "kind": kind,
        "data": json.loads(canonical_json(plain)),
        "prev_hash": last_hash,
    }
    return AuditRecord(**fields, hash=compute_hash(fields, key))


class AuditChain:
    """Appends to one run's chain in memory, remembering the head between appends."""

    def __init__(
        self,
        run_id: str,
        key: bytes | None = None,
        last_seq: int = 0,
        last_hash: str = GENESIS,
    ) -> None:
        self.run_id = _require_text("run_id", run_id)
        _check_head(last_seq, last_hash)
        self._key = key
        self.last_seq = last_seq
        self.last_hash = last_hash
        self._checked: tuple[object, object] = (last_seq, last_hash)
        """The head objects known good (checked, or made by ``append``): not checked again."""

    def __repr__(self) -> str:
        """Never show the key."""
        keyed = "keyed" if self._key is not None else "unkeyed"
        return f"AuditChain(run_id={self.run_id!r}, {keyed}, last_seq={self.last_seq})"

    @property
    def keyed(self) -> bool:
        return self._key is not None

    def append(
        self, kind: str, data: Mapping[str, Any], actor: str, time: str | None = None
    ) -> AuditRecord:
        """Produce the next record and advance the head."""
        last_seq, last_hash = self.last_seq, self.last_hash
        checked_seq, checked_hash = self._checked
        known = last_seq is checked_seq and last_hash is checked_hash  # else set from outside
        record = next_record(self.run_id, last_seq, last_hash, kind, data, actor, self._key,
                             time, _head_checked=known)
        self.last_seq, self.last_hash = record.seq, record.hash
        self._checked = (record.seq, record.hash)
        return record

    def verify(self, records: Iterable[AuditRecord | Mapping[str, Any]]) -> VerifyResult:
        """Verify ``records`` as this run's chain with this chain's key."""
        return verify_chain(records, key=self._key, run_id=self.run_id)


# --------------------------------------------------------------------------- verification


@dataclass
class VerifyResult:
    """Outcome of ``verify_chain``; ``count`` is how many records verified before any failure."""

    ok: bool
    count: int
    first_bad_seq: int | None = None
    reason: str | None = None


def _raw_seq(item: object) -> object:
    if isinstance(item, AuditRecord):
        return item.seq
    if isinstance(item, Mapping):
        return item.get("seq")
    return None


def verify_chain(
    records: Iterable[AuditRecord | Mapping[str, Any]],
    key: bytes | None = None,
    run_id: str | None = None,
    *,
    head: tuple[int, str] | None = None,
    terminal_state: str | None = None,
) -> VerifyResult:
    """Recompute the chain in the given (stored) order and name the first bad record.

    ``first_bad_seq`` is the seq the chain should have at the failing position (for a removed
    record, the missing seq). ``run_id`` defaults to the first record's. Checks per record, in
    order: well-formed, own hash (edited), run_id, seq (removed/reordered/inserted), link to the
    previous record.

    Loss is tampering too: ``head`` is the ``(seq, hash)`` the run row says its chain ends at
    (written with every append), so records deleted from the end, or the whole chain, are named
    by the first missing seq. Records after the head are accepted for a live run (appended
    after its row was read); ``terminal_state`` (the state of a finished run) requires the
    chain to end at the head with the ``state.changed`` record into that state. Without a head
    an empty chain verifies and truncation at the end cannot be seen.
    """
    items = list(records)
    result = _verify_links(items, key, run_id)
    if result.ok and (head is not None or terminal_state is not None):
        parsed = [r if isinstance(r, AuditRecord) else AuditRecord.from_dict(r) for r in items]
        return _verify_end(parsed, head, terminal_state)
    return result


def _verify_end(
    items: list[AuditRecord], head: tuple[int, str] | None, terminal_state: str | None
) -> VerifyResult:
    """The end-of-chain checks of ``verify_chain`` on a chain whose links verified."""
    count = len(items)

    def bad(seq: int, reason: str) -> VerifyResult:
        return VerifyResult(ok=False, count=min(count, seq - 1), first_bad_seq=seq, reason=reason)

    if head is not None:
        head_seq, head_hash = head
        if count == 0 and head_seq > 0:
            return bad(1, f"audit chain missing: the run's head is seq {head_seq}, "
                          "no records are stored (records deleted)")
        if count < head_seq:
            return bad(count + 1, f"chain ends at seq {count} but the run's head is seq "
                                  f"{head_seq} (records {count + 1}..{head_seq} deleted)")
        if head_seq > 0 and not hmac.compare_digest(
            items[head_seq - 1].hash.encode("utf-8", "surrogatepass"),
            head_hash.encode("utf-8", "surrogatepass"),
        ):
            return bad(head_seq, f"record {head_seq} is not the run's head record "
                                 "(chain rewritten)")
        if terminal_state is not None and count > head_seq:
            return bad(head_seq + 1, f"records after the head (seq {head_seq}) of a finished "
                                     "run (records appended)")
    if terminal_state is not None:
        last = items[-1] if items else None
        if last is None or last.kind != "state.changed" or last.data.get("to") != terminal_state:
            return bad(count + 1, f"the run is {terminal_state} but its chain does not end with "
                                  f"the state change to {terminal_state} (records deleted)")
    return VerifyResult(ok=True, count=count)


def _verify_links(
    items: list[AuditRecord | Mapping[str, Any]], key: bytes | None, run_id: str | None
) -> VerifyResult:
    """The per-record checks of ``verify_chain``."""
    expected_run = run_id
    prev_hash = GENESIS
    for index, item in enumerate(items):
        expected_seq = index + 1

        def bad(reason: str, seq: int = expected_seq, count: int = index) -> VerifyResult:
            return VerifyResult(ok=False, count=count, first_bad_seq=seq, reason=reason)

        try:
            if isinstance(item, AuditRecord):
                record = item
            elif isinstance(item, Mapping):
                record = AuditRecord.from_dict(item)
            else:
                return bad(f"malformed record: not a record or mapping ({type(item).__name__})")
            recomputed = compute_hash(record.hash_fields(), key)
        except AuditError as exc:
            return bad(f"malformed record: {exc}")

        if not hmac.compare_digest(
            recomputed.encode(), record.hash.encode("utf-8", "surrogatepass")
        ):
            if index == 0:
                hint = "wrong audit key" if key is not None else "chain is keyed and no key given"
                return bad(f"hash mismatch (record edited, or {hint})")
            return bad("hash mismatch (record edited)")

        if expected_run is None:
            expected_run = record.run_id
        if record.run_id != expected_run:
            return bad(f"run_id mismatch: expected {expected_run!r}, found {record.run_id!r}")

        if record.seq > expected_seq:
            later = {_raw_seq(other) for other in items[index + 1 :]}
            if expected_seq in later:
                return bad(
                    f"seq out of order: expected {expected_seq}, found {record.seq} "
                    "(records reordered)"
                )
            return bad(f"seq gap: expected {expected_seq}, found {record.seq} (record removed)")
        if record.seq < expected_seq:
            return bad(
                f"seq out of order: expected {expected_seq}, found {record.seq} "
                "(record inserted, duplicated or reordered)"
            )

        if record.prev_hash != prev_hash:
            if index == 0:
                return bad("prev_hash of the first record is not GENESIS")
            return bad("prev_hash does not match previous record")
        prev_hash = record.hash
    return VerifyResult(ok=True, count=len(items))


# --------------------------------------------------------------------------- redaction


@functools.lru_cache(maxsize=4096)
def is_secret_key(name: str) -> bool:
    """Whether a key names a secret (``Authorization``, ``x-api-key``, ``access_token``...).

    Cached: the same few keys are asked about on every audit record of the hot path."""
    norm = name.strip().lower().replace("-", "_")
    return norm in _SECRET_KEYS or any(norm.endswith("_" + word) for word in _SECRET_KEYS)


def redact(data: _T, secret_values: Iterable[str] = ()) -> _T:
    """Return a copy of ``data`` that carries no secret: the audit log is kept and shared.

    Values under secret-looking keys become ``"***"``; every occurrence of a known secret
    value inside any string (values and keys) becomes ``"***"``. Overlapping occurrences are
    masked together, so no fragment of a secret survives. Empty secrets are ignored.
    """
    secrets = sorted({value for value in secret_values if value}, key=len, reverse=True)
    return cast(_T, _redact(data, secrets))


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return _scrub(value, secrets)
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(key, str):
                out[_scrub(key, secrets)] = (
                    REDACTED if is_secret_key(key) else _redact(item, secrets)
                )
            else:
                out[key] = _redact(item, secrets)
        return out
    if isinstance(value, list):
        return [_redact(item, secrets) for item in value]
    if isinstance(value, tuple):
        return tuple(_redact(item, secrets) for item in value)
    return value


def _scrub(text: str, secrets: list[str]) -> str:
    """Mask every character covered by an occurrence of any secret, one ``***`` per run."""
    if not any(secret in text for secret in secrets):
        return text
    covered = [False] * len(text)
    for secret in secrets:
        start = text.find(secret)
        while start != -1:
            covered[start : start + len(secret)] = [True] * len(secret)
            start = text.find(secret, start + 1)
    parts: list[str] = []
    index = 0
    while index < len(text):
        end = index
        while end < len(text) and covered[end] == covered[index]:
            end += 1
        parts.append(REDACTED if covered[index] else text[index:end])
        index = end
    return "".join(parts)


# --------------------------------------------------------------------------- key


def load_audit_key(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The HMAC key from ``ALPACA_AUDIT_KEY`` (UTF-8 bytes), or None when unset or blank.

    Surrounding whitespace is stripped: keys copied from files often carry a newline, and a
    key that differs by one newline between processes would fail every verification.
    """
    env = os.environ if environ is None else environ
    raw = env.get(AUDIT_KEY_ENV, "").strip()
    return raw.encode("utf-8") if raw else None
