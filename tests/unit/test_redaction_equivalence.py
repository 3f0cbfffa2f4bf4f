"""redact_value and redact_text give exactly what they always gave, for every input.

The fast paths (exact types dispatched first, scalar items done in place, the redaction of
mapping keys remembered per set of registered secrets) are held to a copy of the original
implementation kept here, on generated values of every shape the engine meets and worse.
"""

from __future__ import annotations

import enum
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alpaca_engine.telemetry import logging as redaction
from alpaca_engine.telemetry.audit import REDACTED, is_secret_key, redact
from alpaca_engine.telemetry.logging import (
    MAX_REDACT_DEPTH,
    TOO_DEEP,
    clear_secrets,
    redact_text,
    redact_value,
    register_secret,
    registered_secrets,
)

# --------------------------------------------------------------------------- reference

_SK_PATTERN = re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{8,}")
_BEARER_PATTERN = re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
_SURROGATES = re.compile("[\ud800-\udfff]")


# The original redact_text, step by step: each rewrite runs when its cheap test says so.
_OLD_STEPS: list[tuple[Callable[[str], bool], Callable[[str], str]]] = [
    (lambda text: "sk-" in text, lambda text: _SK_PATTERN.sub(REDACTED, text)),
    (lambda text: "bearer" in text.lower(),
     lambda text: _BEARER_PATTERN.sub(r"\1 " + REDACTED, text)),
    (lambda text: not text.isascii(), lambda text: _SURROGATES.sub("\ufffd", text)),
    (lambda text: "\x00" in text, lambda text: text.replace("\x00", "\ufffd")),
]


def old_redact_text(text: str) -> str:
    secrets = registered_secrets()
    if secrets and any(secret in text for secret in secrets):
        text = redact(text, secrets)
    for applies, rewrite in _OLD_STEPS:
        if applies(text):
            text = rewrite(text)
    return text


_OLD_SCALARS = bool | int | float
_OLD_CONTAINERS = Mapping | list | tuple | set | frozenset


def old_redact_value(value: Any, _depth: int = 0, *, mask_keys: bool = True) -> Any:
    """The original redact_value (its unions named here; the same isinstance tests)."""
    if value is None or isinstance(value, _OLD_SCALARS):
        return value
    if isinstance(value, str):
        return old_redact_text(value)
    if _depth >= MAX_REDACT_DEPTH and isinstance(value, _OLD_CONTAINERS):
        return TOO_DEEP
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = old_redact_text(str(key))
            out[name] = (REDACTED if mask_keys and is_secret_key(str(key))
                         else old_redact_value(item, _depth + 1, mask_keys=mask_keys))
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [old_redact_value(item, _depth + 1, mask_keys=mask_keys) for item in value]
    return old_redact_text(str(value))


def same(new: Any, old: Any) -> bool:
    """Equal, of the same types, dict keys in the same order; NaN is NaN; shared leaves
    (a value returned as it is) are the very same object."""
    if type(new) is not type(old):
        return False
    if isinstance(old, dict):
        return list(new) == list(old) and all(same(new[k], old[k]) for k in old)
    if isinstance(old, list):
        return len(new) == len(old) and all(same(a, b) for a, b in zip(new, old, strict=True))
    if isinstance(old, float) and math.isnan(old):
        return math.isnan(new)
    if not isinstance(old, str):
        return new is old  # scalars (and their subclasses) pass through untouched
    return bool(new == old)


def check(value: Any) -> None:
    for mask_keys in (True, False):
        new = redact_value(value, mask_keys=mask_keys)
        old = old_redact_value(value, mask_keys=mask_keys)
        assert same(new, old), (value, mask_keys, new, old)


# --------------------------------------------------------------------------- values

SECRET = "whsec-9f8e7d6c5b4a"
OTHER_SECRET = "tok-0123456789"


@pytest.fixture(autouse=True)
def _secrets() -> Iterator[None]:
    clear_secrets()
    try:
        yield
    finally:
        clear_secrets()


class Level(enum.IntEnum):
    LOW = 1


class Mode(enum.StrEnum):
    FAST = "fast"


class Tag(str):
    pass


class Ratio(float):
    pass


class Bag(dict[Any, Any]):
    pass


class Items(list[Any]):
    pass


class Shown:
    def __str__(self) -> str:
        return f"shown sk-{'a' * 10} Bearer abcdefghijk {SECRET}"


class Key:
    """A key whose text changes every time it is asked for (str() is called twice)."""

    def __init__(self) -> None:
        self.calls = 0

    def __str__(self) -> str:
        self.calls += 1
        return "api_key" if self.calls % 2 else "plain"

    def __hash__(self) -> int:
        return id(self)


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for index in range(depth):
        value = {"n": [value]} if index % 2 else [value]
    return value


TEXTS = [
    "", "noop", "plain words", "task-12345678 and risk-assessment", "use sk-abcdefgh now",
    "sk-short", "Authorization: bearer eyJhbGciOi.J9", "BEARER  abcdefghij", "bEaReR x",
    "lone \ud800 surrogate", "nul \x00 here", "héllo ☃ \U0001f600", SECRET, f"x{SECRET}y",
    f"{SECRET}{OTHER_SECRET}", "İstanbul bearer 12345678", "\udfff", "K bearer abcdefgh",
]
KEYS = [
    "step", "tool", "api_key", "API-KEY", "x-api-key", "Authorization", "access_token",
    "next_token", "token", "secrets", "password_hint", "my_password", " token ", "cookie",
    "sk-abcdefgh12", SECRET, f"k_{SECRET}", "bearer abcdefghij", "nul\x00key", "\ud800key",
    "", "ünïcode", "webhook-url",
]

EDGES: list[Any] = [
    None, True, False, 0, -1, 10**30, 0.5, -0.0, float("nan"), float("inf"), Level.LOW,
    Mode.FAST, Tag("tag sk-abcdefgh1"), Ratio(0.25), b"bytes sk-abcdefgh1", bytearray(b"x"),
    Shown(), 1 + 2j, {1, 2}, frozenset({"a"}), (1, "sk-abcdefghij"), [], {}, (),
    *TEXTS,
    {key: "v" for key in KEYS},
    {key: {"inner": key, key: [key, 1]} for key in KEYS},
    {2: "int key", None: "none key", True: "bool key", 1.5: "float", (1, 2): "tuple key",
     Level.LOW: "enum key", Tag("api_key"): "tag key", Tag("plain"): Tag("x")},
    Bag({"api_key": "s", "b": Bag(x=1)}), OrderedDict([("b", 1), ("a", {"token": 2})]),
    Items([1, "sk-abcdefgh12"]), [[[]]], {"l": [{"t": (1, {"api_key": 2})}]},
    {"sk-aaaaaaaa1": 1, "sk-bbbbbbbb2": 2, "c": 3},  # two keys redact to one name
    {"x": Shown(), "y": [Shown()], "z": {Shown(): 1}},
    _nested(MAX_REDACT_DEPTH - 1, "sk-abcdefgh12"), _nested(MAX_REDACT_DEPTH, {"a": 1}),
    _nested(MAX_REDACT_DEPTH + 1, "leaf"), _nested(MAX_REDACT_DEPTH + 5, [1]),
    _nested(MAX_REDACT_DEPTH, "leaf"), _nested(2 * MAX_REDACT_DEPTH, {"k": "v"}),
    {"step": 4, "model": "scripted", "content": None,
     "tool_calls": [{"id": "call_4", "name": "noop", "arguments": '{"x": 3}'}],
     "usage": {"input_tokens": 120, "output_tokens": 12}, "cost": 0.0},
]


@pytest.mark.parametrize("value", EDGES, ids=range(len(EDGES)))
@pytest.mark.parametrize("secrets", [(), (SECRET,), (SECRET, OTHER_SECRET, "step")],
                         ids=["none", "one", "three"])
def test_edge_values_redact_as_before(value: Any, secrets: tuple[str, ...]) -> None:
    for secret in secrets:
        register_secret(secret)
    check(value)
    check(value)  # again, with the keys remembered


def test_a_key_whose_text_changes_is_asked_for_as_before() -> None:
    new_key, old_key = Key(), Key()
    new = redact_value({new_key: "v"})
    old = old_redact_value({old_key: "v"})
    assert new == old and new_key.calls == old_key.calls


def test_a_secret_registered_later_masks_a_remembered_key() -> None:
    data = {SECRET: 1, "step": 2, f"a{OTHER_SECRET}": {"nested": OTHER_SECRET}}
    check(data)
    assert SECRET in redact_value(data)
    register_secret(SECRET)
    check(data)
    assert SECRET not in str(redact_value(data))
    register_secret(OTHER_SECRET)
    check(data)
    assert OTHER_SECRET not in str(redact_value(data))
    clear_secrets()
    check(data)
    assert SECRET in redact_value(data)


def test_many_unique_keys_redact_as_before() -> None:
    data = {f"key-{i}": i for i in range(5000)} | {f"sk-{i:010d}": i for i in range(50)}
    check(data)
    check({f"api_key_{i}": "s" for i in range(3000)})
    assert len(redaction._key_memo[1]) <= redaction._KEY_MEMO_SIZE


@pytest.mark.parametrize("text", TEXTS + KEYS)
def test_texts_redact_as_before(text: str) -> None:
    assert redact_text(text) == old_redact_text(text)
    register_secret(SECRET)
    assert redact_text(text) == old_redact_text(text)


# --------------------------------------------------------------------------- generated

texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(TEXTS + KEYS),
    st.builds(lambda a, b, c: a + b + c, st.text(max_size=4), st.sampled_from(TEXTS + KEYS),
              st.text(max_size=4)),
)
keys = st.one_of(texts, st.sampled_from(KEYS), st.integers(-3, 3), st.none(), st.booleans(),
                 st.floats(allow_nan=False), st.builds(Tag, texts),
                 st.sampled_from([Level.LOW, Mode.FAST]))
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), texts, st.builds(Tag, texts),
    st.builds(Ratio, st.floats()), st.sampled_from([Level.LOW, Mode.FAST, b"sk-abcdefgh12",
                                                    1j, Shown()]),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.lists(inner, max_size=3).map(Items),
        st.frozensets(st.integers() | texts, max_size=3),
        st.dictionaries(keys, inner, max_size=4),
        st.dictionaries(texts, inner, max_size=4).map(Bag),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=values, secrets=st.lists(st.sampled_from([SECRET, OTHER_SECRET, "noop", "step",
                                                       "tool"]), max_size=2))
def test_generated_values_redact_as_before(value: Any, secrets: list[str]) -> None:
    clear_secrets()
    for secret in secrets:
        register_secret(secret)
    check(value)
    check(value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=values, depth=st.integers(min_value=MAX_REDACT_DEPTH - 3,
                                       max_value=MAX_REDACT_DEPTH + 3))
def test_generated_values_at_the_depth_limit_redact_as_before(value: Any, depth: int) -> None:
    check(_nested(depth, value))
    check({"d": _nested(depth, value)})


@pytest.mark.parametrize("container", ["plain", "subclasses"])
def test_a_deep_value_needs_no_more_stack_than_before(container: str) -> None:
    """Where the old implementation fit under the recursion limit, the new one fits too."""
    import inspect
    import sys

    value: Any = f"sk-{'a' * 10}"
    for index in range(MAX_REDACT_DEPTH + 5):
        if container == "plain":
            value = {"n": value} if index % 2 else [value]
        else:
            value = Bag(n=value) if index % 2 else Items([value])
    limit, base = sys.getrecursionlimit(), len(inspect.stack(0))
    try:
        for extra in range(MAX_REDACT_DEPTH, 4 * MAX_REDACT_DEPTH):
            sys.setrecursionlimit(base + extra)
            try:
                old = old_redact_value(value)
            except RecursionError:
                continue
            new = redact_value(value)  # at the least stack the old one needed
            break
        else:
            pytest.fail("the old implementation never fit")
    finally:
        sys.setrecursionlimit(limit)
    assert same(new, old)
