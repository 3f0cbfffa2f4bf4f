"""Audit hashes are byte-for-byte what they always were (stored chains keep verifying).

``next_record`` builds the hash payload from the data's canonical text instead of
canonicalising the data twice; these tests hold it to the original construction, kept here as
a reference: canonical JSON of the data, loaded back, then canonical JSON of all the fields.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from collections import OrderedDict
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alpaca_engine.telemetry.audit import (
    GENESIS,
    AuditChain,
    AuditError,
    AuditRecord,
    _check_json,
    canonical_json,
    next_record,
    verify_chain,
)

T0 = "2026-11-26T15:10:54.123456Z"
KEY = b"server-secret"
HEAD = "ab" * 32


# --------------------------------------------------------------------------- reference


def reference_canonical(obj: Any) -> bytes:
    """canonical_json as it was: check, then one json.dumps with the canonical options."""
    _check_json(obj, "$")
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AuditError(f"canonical_json: a string is not valid Unicode text ({exc})") from exc


def reference_record(
    data: Any,
    *,
    key: bytes | None = None,
    run_id: str = "run-1",
    actor: str = "engine",
    kind: str = "step.finished",
    last_seq: int = 0,
    last_hash: str = GENESIS,
    time: str = T0,
) -> AuditRecord:
    """next_record as it was: data through canonical JSON and back, then hash all fields."""
    fields: dict[str, Any] = {
        "seq": last_seq + 1,
        "time": time,
        "run_id": run_id,
        "actor": actor,
        "kind": kind,
        "data": json.loads(reference_canonical(dict(data))),
        "prev_hash": last_hash,
    }
    payload = reference_canonical(fields)
    digest = (
        hashlib.sha256(payload).hexdigest()
        if key is None
        else hmac.new(key, payload, hashlib.sha256).hexdigest()
    )
    return AuditRecord(**fields, hash=digest)


def record(data: Any, **kw: Any) -> AuditRecord:
    """The record next_record builds today, with reference_record's defaults."""
    return next_record(
        kw.get("run_id", "run-1"), kw.get("last_seq", 0), kw.get("last_hash", GENESIS),
        kw.get("kind", "step.finished"), data, kw.get("actor", "engine"), kw.get("key"),
        kw.get("time", T0),
    )


def assert_same(data: Any, **kw: Any) -> AuditRecord:
    new, old = record(data, **kw), reference_record(data, **kw)
    assert new.hash == old.hash
    assert new == old
    assert json.dumps(new.data) == json.dumps(old.data)  # same types and key order too
    assert new.data_json == canonical_json(new.data).decode("utf-8")
    return new


# --------------------------------------------------------------------------- same hashes


def test_known_hashes_are_unchanged() -> None:
    """Hashes written by the engine before this change (fixed vectors)."""
    chain = AuditChain("run-gold")
    first = chain.append("step.finished", {"step": 3, "tool": "noop", "attempts": 1},
                         "engine", T0)
    second = chain.append("model.output", {
        "content": 'héllo \u2603 \U0001f600 "q" \\ \n', "cost": 1e-07, "big": 10**20,
        "neg": -0.0, "e": 1e16, "l": [(1, 2), {}, []], "none": None, "ok": True,
    }, "engine", "2026-11-26T15:10:55Z")
    keyed = AuditChain("run-gold", key=KEY).append("step.finished", {"step": 3}, "engine", T0)
    assert first.hash == "2106a9c3cb00113a4434213103aec9b6af975968c32afcedcda2cbd8ed43d970"
    assert second.hash == "347c80a3fad783f4f19464e73b1fa46fca0c0c88b3f1d6bfc06ad1835e3c6977"
    assert keyed.hash == "a0a74a0ce697fdde55cfa36414d8ffe19ddce9aae39054e21130afac02af5651"


EDGE_VALUES: list[Any] = [
    {},
    {"step": 3, "tool": "noop", "attempts": 1},
    {"f": [1e-7, 1e16, -0.0, 0.0, 0.1, 5e-324, 1.7976931348623157e308, -1e-300, 123.456]},
    {"i": [0, -1, 2**63, -(2**64), 10**300]},
    {"t": (1, (2, 3), ()), "e": [[], {}, [{}]], "b": [True, False, None]},
    {"ü": "héllo", "☃": "\U0001f600", "esc": '"\\\n\t\r\b\f\x00\x1f\x7f\u2028\u2029'},
    {"z": 1, "a": {"y": 2, "b": {"x": 3, "c": [{"w": 4, "d": 5}]}}},
    {"": "", " ": " ", "key with spaces": "v"},
    {"deep": [[[[[[[[[[{"k": [1.5]}]]]]]]]]]]},
]


@pytest.mark.parametrize("data", EDGE_VALUES, ids=range(len(EDGE_VALUES)))
@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_edge_values_hash_as_before(data: Any, key: bytes | None) -> None:
    assert_same(data, key=key)


class Level(enum.IntEnum):
    LOW = 1


class Tag(str):
    pass


class Ratio(float):
    pass


class Bag(dict[str, Any]):
    pass


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": [value]}
    return value


@pytest.mark.parametrize("data", [
    {"level": Level.LOW, "n": [Level.LOW]},
    {Tag("k"): Tag("v"), "n": {"m": Tag("w")}},
    {"r": Ratio(0.5)},
    {"bag": Bag(b=1, a=2)},
    OrderedDict([("b", 1), ("a", 2)]),
    _nested(70),
], ids=["int-enum", "str-subclass", "float-subclass", "dict-subclass", "ordered", "deep"])
def test_unusual_but_valid_data_hashes_as_before(data: Any) -> None:
    """Subclasses of the JSON types and deep nesting are accepted exactly as before."""
    assert_same(data)
    assert_same(data, key=KEY)


def test_other_fields_hash_as_before() -> None:
    assert_same({"x": 1}, run_id="rün-☃", actor="usér:😀", kind='k"ind\\', last_seq=41,
                last_hash=HEAD, time="2026-11-26T15:10:54+00:00")
    assert_same({"x": 1}, run_id=Tag("run-t"), actor=Tag("a"), kind=Tag("k"))


json_leaves = (
    st.none() | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e-7, 1e16, -0.0, 5e-324, 1e308, 0.1 + 0.2])
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(st.text(max_size=8), json_values, max_size=6),
       keyed=st.booleans(), seq=st.integers(min_value=0, max_value=10**6))
def test_generated_data_hashes_as_before(data: dict[str, Any], keyed: bool, seq: int) -> None:
    assert_same(data, key=KEY if keyed else None, last_seq=seq,
                last_hash=HEAD if seq else GENESIS)


def test_chain_stored_as_json_still_verifies() -> None:
    chain = AuditChain("run-1", key=KEY)
    records = [chain.append("step", data, "engine", T0) for data in EDGE_VALUES]
    stored = [json.loads(json.dumps(r.to_dict())) for r in records]
    assert verify_chain(stored, key=KEY).ok
    via_text = [{**r.to_dict(), "data": json.loads(r.data_json)} for r in records]
    assert verify_chain(via_text, key=KEY).ok


# --------------------------------------------------------------------------- errors unchanged


@pytest.mark.parametrize("data", [
    {"x": float("nan")},
    {"a": {"b": [1, float("inf")]}},
    {1: "non-string key"},
    {"a": {None: 1}},
    {"when": datetime(2026, 1, 1, tzinfo=UTC)},
    {"day": [date(2026, 1, 1)]},
    {"s": {1, 2}},
    {"b": b"bytes"},
    {"text": "lone \ud800 surrogate"},
    {"key \udfff": 1},
    {"a": [Ratio("nan")]},
], ids=["nan", "nested-inf", "int-key", "none-key", "datetime", "date", "set", "bytes",
        "surrogate-value", "surrogate-key", "nan-subclass"])
def test_invalid_data_fails_with_the_same_message(data: Any) -> None:
    with pytest.raises(AuditError) as old:
        reference_record(data)
    with pytest.raises(AuditError) as new:
        record(data)
    assert str(new.value) == str(old.value)
    assert type(new.value.__cause__) is type(old.value.__cause__)


def test_surrogate_outside_data_fails_with_the_same_message() -> None:
    for field in ("run_id", "actor", "kind"):
        with pytest.raises(AuditError) as old:
            reference_record({"x": 1}, **{field: "bad \udc80"})
        with pytest.raises(AuditError) as new:
            record({"x": 1}, **{field: "bad \udc80"})
        assert str(new.value) == str(old.value)
        assert "not valid Unicode text" in str(new.value)


# --------------------------------------------------------------------------- data_json


def test_data_json_is_the_canonical_text_and_not_a_field() -> None:
    rec = record({"b": [1, (2, 3)], "a": "é"})
    assert rec.data_json == '{"a":"é","b":[1,[2,3]]}'
    assert rec.data_json == canonical_json(rec.data).decode("utf-8")
    assert "data_json" not in rec.to_dict()
    assert "data_json" not in repr(rec)
    rebuilt = AuditRecord.from_dict(rec.to_dict())
    assert rebuilt == rec
    assert rebuilt.data_json == rec.data_json
    changed = replace(rec, data={"c": 1})
    assert changed.data_json == '{"c":1}'


def test_data_json_of_a_malformed_stored_record_raises_audit_error() -> None:
    rec = AuditRecord.from_dict({**record({"x": 1}).to_dict(), "data": {"x": float("nan")}})
    with pytest.raises(AuditError, match="NaN and Infinity"):
        _ = rec.data_json


# --------------------------------------------------------------------------- the fast path


def test_a_record_built_directly_is_the_record_init_builds() -> None:
    """The fast path fills the frozen record without __init__: same fields, same order, the
    same frozen, comparable, copyable object."""
    import copy
    import dataclasses
    import pickle

    new = record({"b": [1, (2, 3)], "a": {"y": None, "x": 1.5}}, last_seq=4, last_hash=HEAD)
    old = reference_record({"b": [1, (2, 3)], "a": {"y": None, "x": 1.5}}, last_seq=4,
                           last_hash=HEAD)
    assert type(new) is AuditRecord
    assert list(vars(new))[:8] == [f.name for f in dataclasses.fields(AuditRecord)]
    assert {k: v for k, v in vars(new).items() if k != "data_json"} == vars(old)
    assert repr(new) == repr(old)
    assert dataclasses.asdict(new) == dataclasses.asdict(old)
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.seq = 9  # type: ignore[misc]
    for clone in (copy.deepcopy(new), pickle.loads(pickle.dumps(new)), replace(new)):
        assert clone == new and clone.data_json == new.data_json
    assert list(new.data) == ["a", "b"] and list(new.data["a"]) == ["x", "y"]  # sorted keys


def test_record_data_is_a_fresh_copy() -> None:
    data: dict[str, Any] = {"l": [1, {"m": [2]}], "t": (3,)}
    rec = record(data)
    data["l"][1]["m"].append(9)
    data["l"].append(8)
    assert rec.data == {"l": [1, {"m": [2]}], "t": [3]}
    again = record(data)
    assert again.data is not data and again.data["l"] is not data["l"]


@pytest.mark.parametrize("key", [KEY, bytearray(KEY), b"k" * 200], ids=["bytes", "bytearray",
                                                                       "long"])
def test_keyed_hashes_as_before_for_every_key_type(key: Any) -> None:
    for seq, data in enumerate(EDGE_VALUES):
        assert_same(data, key=key, last_seq=seq, last_hash=HEAD if seq else GENESIS)
    chain = AuditChain("run-k", key=key)
    for data in EDGE_VALUES:
        rec = chain.append("k", data, "engine", T0)
        assert rec.hash == reference_record(data, key=bytes(key), run_id="run-k", kind="k",
                                            last_seq=rec.seq - 1,
                                            last_hash=rec.prev_hash).hash


def test_an_empty_key_fails_as_before() -> None:
    for key in (b"", bytearray()):
        with pytest.raises(AuditError, match="the audit key is empty"):
            record({"x": 1}, key=key)


def test_chain_appends_hash_as_next_record_and_recheck_an_outside_head() -> None:
    """AuditChain skips the head check for the head it made; a head set from outside is
    checked again, with the same errors as next_record."""
    chain = AuditChain("run-1", key=KEY)
    for index, data in enumerate(EDGE_VALUES):
        before = (chain.last_seq, chain.last_hash)
        rec = chain.append("step", data, "engine", T0)
        assert rec == next_record("run-1", *before, "step", data, "engine", KEY, T0)
        assert (chain.last_seq, chain.last_hash) == (index + 1, rec.hash)
    for seq, head, message in [
        (-1, HEAD, "last_seq must be an integer >= 0"),
        (True, HEAD, "last_seq must be an integer >= 0"),
        (3, "AB" * 32, "last_hash must be 64 lower-case hex digits"),
        (3, GENESIS, "last_seq is 3 but last_hash is GENESIS"),
        (0, HEAD, "last_seq is 0 (empty chain) but last_hash is not GENESIS"),
    ]:
        bad = AuditChain("run-1")
        bad.last_seq, bad.last_hash = seq, head
        with pytest.raises(AuditError) as new:
            bad.append("step", {"x": 1}, "engine", T0)
        with pytest.raises(AuditError) as old:
            next_record("run-1", seq, head, "step", {"x": 1}, "engine", None, T0)
        assert str(new.value) == str(old.value)
        assert message in str(new.value)
    rebuilt = AuditChain("run-1")
    rebuilt.last_seq, rebuilt.last_hash = 41, HEAD  # a valid head set from outside
    assert rebuilt.append("k", {"x": 1}, "engine", T0) == reference_record(
        {"x": 1}, kind="k", last_seq=41, last_hash=HEAD)


def test_field_errors_come_in_the_same_order() -> None:
    """A bad run_id is named before a bad head, a bad head before bad data or time."""
    with pytest.raises(AuditError, match="run_id must be"):
        next_record("", -1, "x", "k", [], "engine", None, "noon")  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="last_seq must be"):
        next_record("r", -1, "x", "k", [], "engine", None, "noon")  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="data must be a mapping, got list"):
        next_record("r", 0, GENESIS, "k", [], "engine", None, "noon")  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="is not ISO-8601"):
        next_record("r", 0, GENESIS, "k", {}, "engine", None, "noon")
    chain = AuditChain("r")
    with pytest.raises(AuditError, match="kind must be"):
        chain.append("", {}, "engine", "noon")


@pytest.mark.parametrize("stamp, message", [
    ("noon", "time 'noon' is not ISO-8601"),
    ("2026-11-26T15:10:54+02:00", "is not UTC"),
    ("2026-11-26T15:10:54", "is not UTC"),
    (Tag("2026-11-26T15:10:54+01:00"), "is not UTC"),
    (Tag("not a time"), "is not ISO-8601"),
    (1234.5, "time must be an ISO-8601 UTC string, got float"),
    (b"2026-11-26T15:10:54Z", "time must be an ISO-8601 UTC string, got bytes"),
])
def test_bad_times_fail_the_same_way_every_time(stamp: Any, message: str) -> None:
    for _ in range(3):  # the check is cached for good times only
        with pytest.raises(AuditError, match=message):
            record({"x": 1}, time=stamp)


def test_good_times_are_kept_as_given() -> None:
    for stamp in (T0, "2026-11-26T15:10:54+00:00", Tag(T0), "2026-11-26 15:10:54.5Z"):
        for _ in range(2):
            rec = assert_same({"x": 1}, time=stamp)
            assert rec.time is stamp


def reference_iso(ts: float) -> str:
    """iso_utc(float) as it was (strftime)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


ISO_EDGES = [
    0.0, 0, 1, -1, -0.5, 0.5, 1e-6, 4e-7, 6e-7, 0.9999995, 0.9999994, 0.99999951,
    59.9999996, 1780000000.123456, 1780000000.9999996, 1780000000.9999994, 1780000059.9999997,
    1780000000, 1779999999.9999999, -62135596800.0, 253402300799.999999 - 1, 1e9 + 0.5e-6,
    1e9 + 1.5e-6, 2.5e-6, -1.0000005, 951782400.0, 4102444799.9999995,
]


@pytest.mark.parametrize("order", ["as-listed", "each-twice", "reversed"])
def test_timestamps_format_as_strftime_did(order: str) -> None:
    from alpaca_engine.telemetry.audit import iso_utc

    values = {"as-listed": ISO_EDGES, "each-twice": [v for v in ISO_EDGES for _ in (0, 1)],
              "reversed": ISO_EDGES[::-1]}[order]
    for ts in values:
        assert iso_utc(ts) == reference_iso(ts), ts


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(
    st.floats(min_value=-62135596800.0, max_value=253402300000.0),
    st.integers(min_value=-62135596800, max_value=253402300000),
    st.integers(min_value=1779999990, max_value=1780000010).flatmap(
        lambda s: st.floats(min_value=s - 1e-6, max_value=s + 1e-6)),
), min_size=1, max_size=20))
def test_generated_timestamps_format_as_strftime_did(stamps: list[float]) -> None:
    from alpaca_engine.telemetry.audit import iso_utc

    for ts in stamps:
        assert iso_utc(ts) == reference_iso(ts)


def test_other_times_format_as_before() -> None:
    from alpaca_engine.telemetry.audit import iso_utc

    class Seconds(float):
        pass

    for when in (True, Seconds(1780000000.25), Level.LOW):
        assert iso_utc(when) == reference_iso(when)  # type: ignore[arg-type]
    for bad in (float("nan"), float("inf"), 1e20, "0"):
        with pytest.raises(Exception) as old:
            reference_iso(bad)  # type: ignore[arg-type]
        with pytest.raises(Exception) as new:
            iso_utc(bad)  # type: ignore[arg-type]
        assert type(new.value) is type(old.value) and str(new.value) == str(old.value)
