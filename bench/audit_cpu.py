"""CPU per call of the bookkeeping every journaled step does: audit records, redaction,
timestamps, observers and metrics.

The audit data are those of a tool step and a model step of ``step_overhead.py`` (what the
runner writes); each case runs its loop many times and reports the median and minimum CPU
time per call over the repetitions (process time: less disturbed by other load than wall
time on a shared machine).

Run::

    uv run python bench/audit_cpu.py
    uv run python bench/audit_cpu.py append redact_value --repeat 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from alpaca_engine.store import observers
from alpaca_engine.store.records import AuditEvent
from alpaca_engine.telemetry.audit import AuditChain, iso_utc
from alpaca_engine.telemetry.logging import redact_text, redact_value
from alpaca_engine.telemetry.metrics import Metrics

EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("budget.reserved", {"step": 3, "steps": 1.0, "tool_calls": 1.0}),
    ("gate.permission_allowed", {"step": 3, "tool": "noop", "rule": "allowlist"}),
    ("tool.result", {"step": 3, "tool": "noop", "attempts": 1}),
    ("model.output", {"step": 4, "model": "scripted", "content": None,
                      "tool_calls": [{"id": "call_4", "name": "noop", "arguments": '{"x": 3}'}],
                      "usage": {"input_tokens": 120, "output_tokens": 12}, "cost": 0.0}),
]
STAMP = "2026-11-26T15:10:54.123456Z"
BUILT = [AuditEvent(kind=kind, data=data) for kind, data in EVENTS]
METRICS = Metrics()


def append(key: bytes | None = None) -> int:
    chain = AuditChain("run-abcdef0123456789", key=key)
    for _ in range(50):
        for kind, data in EVENTS:
            chain.append(kind, data, "engine", STAMP)
    return 50 * len(EVENTS)


def redact_values() -> int:
    for _ in range(50):
        for _, data in EVENTS:
            redact_value(data)
    return 50 * len(EVENTS)


def audit_events() -> int:
    for _ in range(50):
        for kind, data in EVENTS:
            AuditEvent(kind=kind, data=data)
    return 50 * len(EVENTS)


def redact_texts() -> int:
    for _ in range(200):
        redact_text("allowlist")
        redact_text('{"x": 3}')
    return 400


def timestamps() -> int:
    start = 1780000000.123456
    for index in range(200):
        iso_utc(start + index * 1e-4)
    return 200


def transactions() -> int:
    """One transaction reporting a step's two appends to the (metrics) observers."""
    for _ in range(100):
        with observers.transaction():
            observers.written("run-1", BUILT[:2])
    return 100


def committed() -> int:
    for _ in range(100):
        METRICS.committed("run-1", BUILT)
    return 100


CASES: dict[str, tuple[Callable[[], int], str]] = {
    "append": (append, "AuditChain.append, one record"),
    "append_keyed": (lambda: append(b"server-secret"), "the same, HMAC-keyed"),
    "redact_value": (redact_values, "redact_value of one event's data"),
    "audit_event": (audit_events, "AuditEvent(kind, data): redacted on construction"),
    "redact_text": (redact_texts, "redact_text of a short clean string"),
    "iso": (timestamps, "iso_utc(epoch)"),
    "transaction": (transactions, "observers.transaction + written + delivery"),
    "committed": (committed, "Metrics.committed of the four events"),
}


def measure(fn: Callable[[], int], repeat: int) -> tuple[float, float]:
    for _ in range(10):
        fn()
    per_call = []
    for _ in range(repeat):
        start, calls = time.process_time(), 0
        for _ in range(10):
            calls += fn()
        per_call.append((time.process_time() - start) / calls * 1e6)
    return statistics.median(per_call), min(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"of {', '.join(CASES)} (default: all)")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}")
    print(f"{'case':14s} {'cpu us/call med':>15s} {'min':>7s}  what")
    for name in args.cases or CASES:
        fn, what = CASES[name]
        median, least = measure(fn, args.repeat)
        print(f"{name:14s} {median:15.3f} {least:7.3f}  {what}")


if __name__ == "__main__":
    main()
