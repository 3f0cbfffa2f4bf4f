"""A thread's history: what turn N sends the model of turns 1 .. N-1 (DESIGN §10), pure.

The earlier turns are rebuilt from their journals (journal.replayed_messages), never from a
second copy, so a turn resumed after a crash sends exactly what it sent before. Each
succeeded turn contributes its user message, the assistant turns with their tool calls, the
tool results as the model saw them, and the final answer. A turn that did not succeed
(failed, cancelled, timed out) contributes nothing: it has no answer, and its last tool calls
may have no result, which providers refuse; it is named in the ``history.truncated`` audit
record instead. The agent's :class:`~.agents.HistoryPolicy` then keeps the newest whole
turns that fit ``max_turns`` and ``max_tokens``; everything older is left out, audited too.
The choice depends only on the journal and the policy, so a resume chooses the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .agents import HistoryPolicy
from .journal import estimate_tokens, message_chars, replayed_messages
from .lifecycle import RunState
from .models.base import Message
from .store.records import RunRecord, StepRecord


@dataclass(frozen=True)
class PastTurn:
    """An earlier turn as the model would see it again."""

    turn: int
    run_id: str
    state: RunState
    messages: tuple[Message, ...]
    """The user message, then the turn's exchange; empty for a turn that did not succeed."""

    @property
    def tokens(self) -> int:
        return estimate_tokens(sum(message_chars(m) for m in self.messages),
                               len(self.messages))


def past_turn(run: RunRecord, steps: Sequence[StepRecord]) -> PastTurn:
    """A turn's contribution, from its run record (the user message) and its journal."""
    messages: tuple[Message, ...] = ()
    if run.state == RunState.SUCCEEDED:
        messages = (Message(role="user", content=run.input), *replayed_messages(steps))
    return PastTurn(turn=run.turn or 0, run_id=run.id, state=run.state, messages=messages)


@dataclass(frozen=True)
class LeftOut:
    turn: int
    run_id: str
    reason: str
    """The turn's state (``failed`` …), or the bound that left it out: ``max_turns`` or
    ``max_tokens``."""
    tokens: int = 0


@dataclass
class History:
    messages: list[Message] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    """The turns sent, oldest first."""
    left_out: list[LeftOut] = field(default_factory=list)
    tokens: int = 0
    """Estimated tokens of the turns sent."""

    def audit_data(self, policy: HistoryPolicy) -> dict[str, Any]:
        """The ``history.truncated`` record: what was left out, and why."""
        return {"sent_turns": self.turns, "sent_tokens": self.tokens,
                "max_turns": policy.max_turns, "max_tokens": policy.max_tokens,
                "dropped": [{"turn": x.turn, "run_id": x.run_id, "reason": x.reason,
                             "tokens": x.tokens} for x in self.left_out]}


def build(turns: Sequence[PastTurn], policy: HistoryPolicy) -> History:
    """Choose the newest whole turns within the policy; ``turns`` in turn order."""
    history = History()
    kept: list[PastTurn] = []
    full: str | None = None
    for t in sorted(turns, key=lambda t: t.turn, reverse=True):
        if t.state != RunState.SUCCEEDED:
            history.left_out.append(LeftOut(t.turn, t.run_id, str(t.state)))
            continue
        if full is None and policy.max_turns is not None and len(kept) >= policy.max_turns:
            full = "max_turns"
        elif full is None and policy.max_tokens is not None and \
                history.tokens + t.tokens > policy.max_tokens:
            full = "max_tokens"
        if full is not None:
            history.left_out.append(LeftOut(t.turn, t.run_id, full, t.tokens))
            continue
        kept.append(t)
        history.tokens += t.tokens
    for t in reversed(kept):
        history.turns.append(t.turn)
        history.messages += t.messages
    history.left_out.sort(key=lambda x: x.turn)
    return history
