"""The audit chain must catch every edit, removal, reordering and insertion (DESIGN §7)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alpaca_engine.telemetry.audit import (
    AUDIT_KEY_ENV,
    GENESIS,
    AuditChain,
    AuditError,
    AuditRecord,
    VerifyResult,
    canonical_json,
    compute_hash,
    is_secret_key,
    iso_utc,
    load_audit_key,
    next_record,
    redact,
    verify_chain,
)

T0 = "2026-11-26T15:10:54.123456Z"
KEY = b"server-secret"


def build(n: int = 10, key: bytes | None = None, run_id: str = "run-1") -> list[AuditRecord]:
    chain = AuditChain(run_id, key=key)
    return [
        chain.append("step", {"i": i, "msg": f"event {i}", "nested": {"l": [i, "x"]}}, "engine", T0)
        for i in range(1, n + 1)
    ]


def edited(record: AuditRecord, **data: Any) -> AuditRecord:
    return replace(record, data={**record.data, **data})


# --------------------------------------------------------------------------- happy path


def test_chain_of_ten_verifies() -> None:
    records = build()
    result = verify_chain(records)
    assert result == VerifyResult(ok=True, count=10, first_bad_seq=None, reason=None)
    assert [r.seq for r in records] == list(range(1, 11))
    assert records[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    assert records[0].hash == compute_hash(records[0].hash_fields(), None)


def test_chain_verifies_after_json_round_trip_of_dicts() -> None:
    """The stores persist dicts as JSON; what comes back must still verify."""
    chain = AuditChain("run-1", key=KEY)
    records = [
        chain.append("t", {"tuple": (1, 2), "f": 0.1, "u": "héllo ✓"}, "user:alice", T0),
        chain.append("t", {}, "worker:host:42", T0),
    ]
    assert records[0].data["tuple"] == [1, 2]  # normalised before hashing
    rows = [json.loads(json.dumps(r.to_dict())) for r in records]
    rows[0]["id"] = 17  # extra store columns are ignored
    assert verify_chain(rows, key=KEY, run_id="run-1").ok
    assert [AuditRecord.from_dict(row) for row in rows] == records


def test_store_style_continuation_with_next_record() -> None:
    """Stores read the head in their txn and call next_record; that equals appending."""
    whole = build(5)
    head = whole[2]
    rest = [
        next_record("run-1", head.seq, head.hash, "step", r.data, "engine", None, T0)
        for r in whole[3:4]
    ]
    assert rest[0] == whole[3]
    resumed = AuditChain("run-1", last_seq=whole[3].seq, last_hash=whole[3].hash)
    assert resumed.append("step", whole[4].data, "engine", T0) == whole[4]


def test_empty_chain_verifies() -> None:
    assert verify_chain([]) == VerifyResult(ok=True, count=0)


def test_record_time_defaults_to_now_in_utc() -> None:
    record = AuditChain("r").append("k", {}, "engine")
    parsed = datetime.fromisoformat(record.time)
    assert record.time.endswith("Z")
    assert abs(datetime.now(UTC) - parsed) < timedelta(minutes=1)


# --------------------------------------------------------------------------- tampering


def test_edited_data_is_caught_at_that_record() -> None:
    records = build()
    records[3] = edited(records[3], msg="forged")
    result = verify_chain(records)
    assert not result.ok
    assert result.first_bad_seq == 4
    assert result.count == 3
    assert result.reason == "hash mismatch (record edited)"


def test_edited_and_rehashed_record_breaks_the_next_link() -> None:
    """Unkeyed: a forger can fix the record's own hash, but then the next prev_hash breaks."""
    records = build()
    forged = edited(records[3], msg="forged")
    records[3] = replace(forged, hash=compute_hash(forged.hash_fields(), None))
    result = verify_chain(records)
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert result.reason == "prev_hash does not match previous record"


def test_removed_record_is_reported_at_the_gap() -> None:
    records = build()
    del records[3]
    result = verify_chain(records)
    assert not result.ok
    assert result.first_bad_seq == 4
    assert result.reason == "seq gap: expected 4, found 5 (record removed)"


def test_removed_first_record_is_reported() -> None:
    records = build()
    result = verify_chain(records[1:])
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert result.reason is not None and "expected 1, found 2" in result.reason


def test_swapped_records_are_detected() -> None:
    records = build()
    records[2], records[3] = records[3], records[2]
    result = verify_chain(records)
    assert not result.ok
    assert result.first_bad_seq in (3, 4)
    assert result.reason == "seq out of order: expected 3, found 4 (records reordered)"


def test_swapped_stored_rows_are_detected() -> None:
    rows = [r.to_dict() for r in build()]
    rows[6], rows[7] = rows[7], rows[6]
    result = verify_chain([*rows, "junk"])  # type: ignore[list-item]
    assert (result.ok, result.first_bad_seq) == (False, 7)
    assert result.reason == "seq out of order: expected 7, found 8 (records reordered)"


def test_swapped_renumbered_and_rehashed_records_break_the_next_link() -> None:
    """Unkeyed: even a forger who renumbers and rehashes both is caught at the next record."""
    records = build()
    a, b = records[2], records[3]
    new_3 = replace(b, seq=3, prev_hash=a.prev_hash)
    new_3 = replace(new_3, hash=compute_hash(new_3.hash_fields(), None))
    new_4 = replace(a, seq=4, prev_hash=new_3.hash)
    new_4 = replace(new_4, hash=compute_hash(new_4.hash_fields(), None))
    records[2:4] = [new_3, new_4]
    result = verify_chain(records)
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert result.reason == "prev_hash does not match previous record"


def test_inserted_record_is_detected() -> None:
    records = build()
    forged = next_record("run-1", 3, records[2].hash, "step", {"msg": "forged"}, "engine", None, T0)
    records.insert(3, forged)
    result = verify_chain(records)
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert result.reason is not None and "inserted" in result.reason


def test_inserted_record_is_caught_by_the_key() -> None:
    records = build(key=KEY)
    forged = next_record("run-1", 3, records[2].hash, "step", {"msg": "x"}, "engine", b"guess", T0)
    records.insert(3, forged)
    result = verify_chain(records, key=KEY)
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert result.reason == "hash mismatch (record edited)"


def test_duplicated_record_is_detected() -> None:
    records = build()
    records.insert(4, records[3])
    result = verify_chain(records)
    assert (result.ok, result.first_bad_seq) == (False, 5)


def test_run_id_mismatch() -> None:
    mine, other = build(3), build(3, run_id="run-2")
    assert verify_chain(mine, run_id="run-2").reason == (
        "run_id mismatch: expected 'run-2', found 'run-1'"
    )
    mixed = [*mine[:2], other[2]]
    result = verify_chain(mixed)
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert result.reason == "run_id mismatch: expected 'run-1', found 'run-2'"


def test_first_record_must_start_at_genesis() -> None:
    first = next_record("run-1", 0, GENESIS, "k", {}, "engine", None, T0)
    moved = replace(first, prev_hash="1" * 64)
    moved = replace(moved, hash=compute_hash(moved.hash_fields(), None))
    result = verify_chain([moved])
    assert result.reason == "prev_hash of the first record is not GENESIS"


def test_malformed_rows_fail_verification_without_crashing() -> None:
    rows = [r.to_dict() for r in build(3)]
    missing = [*rows[:1], {k: v for k, v in rows[1].items() if k != "hash"}]
    assert verify_chain(missing).reason == "malformed record: audit record is missing hash"
    bad_seq = [*rows[:1], {**rows[1], "seq": "2"}]
    result = verify_chain(bad_seq)
    assert (result.ok, result.first_bad_seq) == (False, 2)
    assert result.reason is not None and result.reason.startswith("malformed record: seq")
    bad_run = [{**rows[0], "run_id": 1}]
    assert verify_chain(bad_run).reason == "malformed record: run_id must be a string, got int"
    bad_data = [{**rows[0], "data": "{}"}]
    assert "data must be a JSON object" in (verify_chain(bad_data).reason or "")
    nan_data = [{**rows[0], "data": {"x": math.nan}}]
    assert "NaN" in (verify_chain(nan_data).reason or "")
    assert "not a record" in (verify_chain([42]).reason or "")  # type: ignore[list-item]
    odd_hash = [{**rows[0], "hash": "\udcff" * 64}]
    assert verify_chain(odd_hash).reason is not None


# --------------------------------------------------------------------------- keys


def test_keyed_chain_needs_the_right_key() -> None:
    records = build(key=KEY)
    assert verify_chain(records, key=KEY).ok
    wrong = verify_chain(records, key=b"other")
    assert (wrong.ok, wrong.first_bad_seq) == (False, 1)
    assert wrong.reason == "hash mismatch (record edited, or wrong audit key)"
    none = verify_chain(records)
    assert (none.ok, none.first_bad_seq) == (False, 1)
    assert none.reason == "hash mismatch (record edited, or chain is keyed and no key given)"
    # and an unkeyed chain does not pass as keyed
    assert not verify_chain(build(), key=KEY).ok


def test_keyed_hash_is_hmac() -> None:
    import hashlib
    import hmac

    fields = build(1, key=KEY)[0].hash_fields()
    expected = hmac.new(KEY, canonical_json(fields), hashlib.sha256).hexdigest()
    assert compute_hash(fields, KEY) == expected
    assert compute_hash(fields, None) == hashlib.sha256(canonical_json(fields)).hexdigest()


def test_chain_verify_helper_uses_its_key_and_run() -> None:
    chain = AuditChain("run-1", key=KEY)
    records = [chain.append("k", {"i": i}, "engine", T0) for i in range(3)]
    assert chain.verify(records).ok
    assert chain.keyed
    assert "server-secret" not in repr(chain)
    assert "keyed" in repr(chain)
    assert not AuditChain("run-2", key=KEY).verify(records).ok
    assert "unkeyed" in repr(AuditChain("r"))


def test_empty_key_is_rejected() -> None:
    with pytest.raises(AuditError, match="empty"):
        compute_hash({"a": 1}, b"")


def test_load_audit_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_audit_key({}) is None
    assert load_audit_key({AUDIT_KEY_ENV: "  \n"}) is None
    assert load_audit_key({AUDIT_KEY_ENV: "s3cret\n"}) == b"s3cret"
    assert load_audit_key({AUDIT_KEY_ENV: "clé"}) == "clé".encode()
    monkeypatch.setenv(AUDIT_KEY_ENV, "from-env")
    assert load_audit_key() == b"from-env"
    monkeypatch.delenv(AUDIT_KEY_ENV)
    assert load_audit_key() is None


# --------------------------------------------------------------------------- canonical JSON


def test_canonical_json_ignores_insertion_order() -> None:
    a = {"b": 1, "a": {"y": [1, {"q": 2, "p": 3}], "x": "é"}}
    b = {"a": {"x": "é", "y": [1, {"p": 3, "q": 2}]}, "b": 1}
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == '{"a":{"x":"é","y":[1,{"p":3,"q":2}]},"b":1}'.encode()


def test_canonical_json_rejects_non_json() -> None:
    with pytest.raises(AuditError, match=r"\$\.x is nan; NaN and Infinity"):
        canonical_json({"x": math.nan})
    with pytest.raises(AuditError, match="Infinity"):
        canonical_json([math.inf])
    with pytest.raises(AuditError, match=r"\$\.when is a datetime.*ISO-8601"):
        canonical_json({"when": datetime.now(UTC)})
    with pytest.raises(AuditError, match="non-string key 1"):
        canonical_json({1: "a"})
    with pytest.raises(AuditError, match="unsupported type set"):
        canonical_json({"s": {1}})
    with pytest.raises(AuditError, match="not valid Unicode"):
        canonical_json("\ud800")
    assert isinstance(AuditError("x"), ValueError)


def test_compute_hash_refuses_fields_with_hash() -> None:
    with pytest.raises(AuditError, match="without 'hash'"):
        compute_hash(build(1)[0].to_dict(), None)


# --------------------------------------------------------------------------- inputs


def test_next_record_validates_inputs() -> None:
    ok: dict[str, Any] = {
        "run_id": "r",
        "last_seq": 0,
        "last_hash": GENESIS,
        "kind": "k",
        "data": {},
        "actor": "engine",
        "time": T0,
    }
    next_record(**ok)
    next_record(**{**ok, "time": "2026-11-26T15:10:54+00:00"})
    cases: list[tuple[dict[str, Any], str]] = [
        ({"run_id": ""}, "run_id"),
        ({"actor": 3}, "actor"),
        ({"last_seq": -1}, "last_seq"),
        ({"last_seq": True}, "last_seq"),
        ({"last_hash": "abc"}, "last_hash"),
        ({"last_hash": "a" * 64}, "not GENESIS"),
        ({"last_seq": 3}, "last_hash is GENESIS"),
        ({"data": [1]}, "mapping"),
        ({"data": {"x": math.nan}}, "NaN"),
        ({"time": "yesterday"}, "ISO-8601"),
        ({"time": "2026-11-26T15:10:54"}, "not UTC"),
        ({"time": "2026-11-26T15:10:54+02:00"}, "not UTC"),
        ({"time": 1.5}, "ISO-8601 UTC string"),
    ]
    for change, message in cases:
        with pytest.raises(AuditError, match=message):
            next_record(**{**ok, **change})
    with pytest.raises(AuditError, match="last_hash"):
        AuditChain("r", last_seq=0, last_hash="x")


def test_next_record_copies_data() -> None:
    data: dict[str, Any] = {"l": [1]}
    record = next_record("r", 0, GENESIS, "k", data, "engine", None, T0)
    data["l"].append(2)
    assert record.data == {"l": [1]}
    out = record.to_dict()
    out["data"]["l"].append(3)
    assert verify_chain([record]).ok


def test_iso_utc() -> None:
    assert iso_utc(datetime(2026, 11, 26, 15, 10, 54, 123456, tzinfo=UTC)) == T0
    plus2 = timezone(timedelta(hours=2))
    assert iso_utc(datetime(2026, 11, 26, 17, 10, 54, 123456, tzinfo=plus2)) == T0
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000000Z"
    with pytest.raises(AuditError, match="naive"):
        iso_utc(datetime(2026, 1, 1))
    assert iso_utc().endswith("Z")


# --------------------------------------------------------------------------- redaction


def test_redact_nested_dicts_and_lists() -> None:
    data = {
        "url": "https://api.example.com/?key=sk-123",
        "headers": {"Authorization": "Bearer sk-123", "X-Api-Key": "k", "Accept": "json"},
        "calls": [{"args": ["sk-123", "fine"], "password": {"nested": 1}}, ("sk-123x", 3)],
        "access_token": "t",
        "OpenAI_API_KEY": None,
        "max_tokens": 100,
        "prompt_tokens": 5,
        "note sk-123": "key in a key",
        7: "sk-123",
    }
    out = redact(data, ["sk-123", ""])
    assert out == {
        "url": "https://api.example.com/?key=***",
        "headers": {"Authorization": "***", "X-Api-Key": "***", "Accept": "json"},
        "calls": [{"args": ["***", "fine"], "password": "***"}, ("***x", 3)],
        "access_token": "***",
        "OpenAI_API_KEY": "***",
        "max_tokens": 100,
        "prompt_tokens": 5,
        "note ***": "key in a key",
        7: "***",
    }
    assert data["url"] == "https://api.example.com/?key=sk-123"  # input untouched


def test_redact_secret_keys_case_insensitive() -> None:
    for name in [
        "authorization",
        "API_KEY",
        "apikey",
        "Token",
        "SECRET",
        "Password",
        "webhook_url",
        "x-api-key",
        "client_secret",
        "slack-webhook-url",
    ]:
        assert is_secret_key(name), name
    for name in ["max_tokens", "tokens", "secretary", "kind", "url"]:
        assert not is_secret_key(name), name


def test_redact_overlapping_secrets_leave_no_fragment() -> None:
    assert redact("xxabcdefyy", ["abcd", "cdef"]) == "xx***yy"
    assert redact("abcabc", ["abc"]) == "***"
    assert redact("nothing here", ["abc"]) == "nothing here"
    assert redact(42, ["abc"]) == 42
    assert redact("abc", []) == "abc"


# --------------------------------------------------------------------------- properties

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.text(max_size=12)
    | (st.floats(allow_nan=False, allow_infinity=False))
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
data_dict = st.builds(
    lambda msg, extra: {**extra, "msg": msg},
    st.text(min_size=1, max_size=20),
    st.dictionaries(st.text(max_size=6), json_value, max_size=4),
)


def string_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, str):
        return [path] if value else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in string_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in string_paths(v, (*path, i))]
    return []


def set_path(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: set_path(value[head], rest, new)}
    out = list(value)
    out[head] = set_path(value[head], rest, new)
    return out


def get_path(value: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        value = value[part]
    return value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    datas=st.lists(data_dict, min_size=1, max_size=8),
    keyed=st.booleans(),
    choice=st.data(),
)
def test_property_fresh_chain_verifies_and_any_char_edit_is_caught(
    datas: list[dict[str, Any]], keyed: bool, choice: st.DataObject
) -> None:
    key = KEY if keyed else None
    chain = AuditChain("run-p", key=key)
    records = [chain.append("step", d, "engine", T0) for d in datas]
    assert verify_chain(records, key=key, run_id="run-p") == VerifyResult(True, len(records))
    rows = [json.loads(json.dumps(r.to_dict())) for r in records]
    assert verify_chain(rows, key=key).ok

    victim = choice.draw(st.integers(0, len(records) - 1), label="record")
    paths = string_paths(records[victim].data)
    path = choice.draw(st.sampled_from(paths), label="path")
    text: str = get_path(records[victim].data, path)
    pos = choice.draw(st.integers(0, len(text) - 1), label="pos")
    char = choice.draw(st.characters(codec="utf-8").filter(lambda c: c != text[pos]))
    mutated = text[:pos] + char + text[pos + 1 :]
    tampered = list(records)
    tampered[victim] = replace(records[victim], data=set_path(records[victim].data, path, mutated))
    result = verify_chain(tampered, key=key)
    assert not result.ok
    assert result.first_bad_seq == victim + 1
    assert result.reason is not None and result.reason.startswith("hash mismatch")


# --------------------------------------------------------------------------- the chain head


def _finished(n: int = 5, key: bytes | None = None) -> list[AuditRecord]:
    chain = AuditChain("run-1", key=key)
    records = [chain.append("step", {"i": i}, "engine", T0) for i in range(1, n)]
    records.append(chain.append("state.changed", {"from": "running", "to": "failed"},
                                "engine", T0))
    return records


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
def test_head_catches_records_deleted_from_the_end(key: bytes | None) -> None:
    records = build(10, key)
    head = (10, records[-1].hash)
    assert verify_chain(records, key=key, head=head).ok
    result = verify_chain(records[:7], key=key, head=head)
    assert not result.ok and result.first_bad_seq == 8 and result.count == 7
    assert result.reason == "chain ends at seq 7 but the run's head is seq 10 " \
                            "(records 8..10 deleted)"


def test_head_catches_a_missing_chain() -> None:
    records = build(3)
    result = verify_chain([], head=(3, records[-1].hash))
    assert not result.ok and result.first_bad_seq == 1 and "missing" in (result.reason or "")
    assert verify_chain([], head=(0, GENESIS)).ok  # a run that never audited anything


def test_head_catches_a_rewritten_tail() -> None:
    records = build(5)
    forged = AuditChain("run-1", last_seq=4, last_hash=records[3].hash).append(
        "step", {"i": "forged"}, "engine", T0)
    result = verify_chain([*records[:4], forged], head=(5, records[-1].hash))
    assert not result.ok and result.first_bad_seq == 5 and "rewritten" in (result.reason or "")


def test_records_after_the_head_are_accepted_only_for_a_live_run() -> None:
    records = build(6)
    assert verify_chain(records, head=(4, records[3].hash)).ok  # appended after the row read
    result = verify_chain(records, head=(4, records[3].hash), terminal_state="failed")
    assert not result.ok and result.first_bad_seq == 5


def test_a_finished_run_must_end_with_its_terminal_record() -> None:
    records = _finished()
    assert verify_chain(records, head=(5, records[-1].hash), terminal_state="failed").ok
    assert not verify_chain(records, head=(5, records[-1].hash), terminal_state="cancelled").ok
    # the terminal record deleted and the head moved back with it: still caught
    result = verify_chain(records[:4], head=(4, records[3].hash), terminal_state="failed")
    assert not result.ok and result.first_bad_seq == 5
    assert "does not end with the state change to failed" in (result.reason or "")
    result = verify_chain([], terminal_state="failed")
    assert not result.ok and result.first_bad_seq == 1


def test_link_errors_are_reported_before_the_head_checks() -> None:
    records = build(5)
    broken = [records[0], edited(records[1], i=99), *records[2:]]
    result = verify_chain(broken, head=(9, records[-1].hash))
    assert result.first_bad_seq == 2 and "edited" in (result.reason or "")
