"""The budget ledger of a run tree (DESIGN §5), as pure logic the stores apply atomically.

One ledger per root run, optionally one more per child given a sub-limit; a step reserves on
every ledger of its chain before it runs and settles with actual usage after. A reservation
that does not fit is refused and marks the ledger exhausted, so the whole tree stops.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .errors import AlpacaError, ErrorCode

RESOURCES = ("steps", "tool_calls", "tokens", "cost")
LIMIT_KEYS = {f"max_{r}": r for r in RESOURCES}

# USD per million tokens (input, output). Override per workflow with defaults.prices.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "o4-mini": (1.10, 4.40),
}


def limits_from_budget(budget: Mapping[str, object]) -> dict[str, float]:
    """``{max_steps: 10, max_cost: 0.5}`` -> ``{steps: 10, cost: 0.5}`` (other keys ignored)."""
    out = {}
    for key, resource in LIMIT_KEYS.items():
        value = budget.get(key)
        if value is not None:
            out[resource] = float(value)  # type: ignore[arg-type]
    return out


def price_of(model: str, input_tokens: int, output_tokens: int,
             prices: Mapping[str, tuple[float, float]] | None = None) -> float:
    table = {**DEFAULT_PRICES, **(prices or {})}
    name = model.split(":", 1)[-1]
    per_in, per_out = table.get(name, (0.0, 0.0))
    return (input_tokens * per_in + output_tokens * per_out) / 1_000_000


@dataclass
class LedgerState:
    id: str
    limits: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    exhausted: str | None = None

    def remaining(self, resource: str) -> float | None:
        limit = self.limits.get(resource)
        return None if limit is None else limit - self.used.get(resource, 0.0)


class BudgetExceeded(AlpacaError):
    def __init__(self, ledger_id: str, resource: str, limit: float, used: float,
                 wanted: float, message: str | None = None) -> None:
        super().__init__(
            ErrorCode.BUDGET_EXCEEDED,
            message or f"budget exhausted: {resource} limit {limit:g} (used {used:g}, step "
            f"needs {wanted:g})", ledger=ledger_id, resource=resource, limit=limit, used=used)
        self.ledger_id = ledger_id
        self.resource = resource


def overspent(ledgers: Iterable[LedgerState],
              amounts: Mapping[str, float]) -> BudgetExceeded | None:
    """After a settlement: the first limit that actual usage pushed past, if any.

    A provider that ignores the output cap (or a price above the estimate) can report more
    than the step reserved; the usage is real and stays recorded, and the ledger is then
    exhausted so the whole tree stops instead of finishing as if nothing happened."""
    for ledger in ledgers:
        for resource, amount in amounts.items():
            cap = ledger.limits.get(resource)
            used = ledger.used.get(resource, 0.0)
            if cap is not None and amount > 0 and used > cap + 1e-12:
                return BudgetExceeded(
                    ledger.id, resource, cap, used, amount,
                    f"budget exceeded: {resource} used {used:g} of {cap:g} (a step reported "
                    f"{amount:g} more than it reserved)")
    return None


def check_reserve(ledgers: Iterable[LedgerState], amounts: Mapping[str, float]) -> None:
    """Raise BudgetExceeded unless ``amounts`` fit every ledger; mutate nothing."""
    for ledger in ledgers:
        if ledger.exhausted:
            limit = ledger.limits.get(ledger.exhausted, 0.0)
            raise BudgetExceeded(ledger.id, ledger.exhausted, limit,
                                 ledger.used.get(ledger.exhausted, 0.0),
                                 amounts.get(ledger.exhausted, 0.0))
        for resource, amount in amounts.items():
            cap = ledger.limits.get(resource)
            used = ledger.used.get(resource, 0.0)
            if cap is not None and amount > 0 and used + amount > cap + 1e-12:
                raise BudgetExceeded(ledger.id, resource, cap, used, amount)


def apply(ledger: LedgerState, amounts: Mapping[str, float]) -> None:
    for resource, amount in amounts.items():
        if amount:
            ledger.used[resource] = round(ledger.used.get(resource, 0.0) + amount, 9)


def sub_limits(parent: LedgerState, wanted: Mapping[str, float]) -> dict[str, float]:
    """A child's limits: what it asks for, never more than what its parent has left."""
    out = {}
    for resource, value in wanted.items():
        remaining = parent.remaining(resource)
        out[resource] = float(value) if remaining is None else max(0.0, min(value, remaining))
    return out
