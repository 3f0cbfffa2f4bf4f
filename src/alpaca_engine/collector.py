"""The garbage collector's settings for the engine's long-lived processes.

A worker or server holds many runs in flight, each a few hundred live objects (its
conversation, journal, tasks). CPython 3.11's collector examines the young generation
every 700 net allocations and, every 100 of those, walks older ones; with 1,000 runs in
flight that walk is ~10% of the process's CPU (bench/README.md, "Collector"), while the
engine creates few reference cycles. So the processes ``alpaca worker`` and
``alpaca serve`` start collect less often, and leave what exists at start-up (modules,
the app, the workflow) out of every collection. Cycles are still collected; memory held by
garbage waits at most a few thousand allocations longer.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Net allocations between collections of the young generation (CPython's default: 700)."""

OLDER_THRESHOLD = 10
"""Collections of one generation before the next is examined too (CPython's default: 10)."""


def tune_collector() -> None:
    """Collect once, freeze the start-up heap, then use the engine's thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
