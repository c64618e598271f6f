"""Prepaid credit: which grant pays which usage, and what is left of each, exactly.

A grant pays usage that occurs while it is active: from its `created_at` (included) until
it ends, at its `expires_at` or when it is voided, whichever comes first (excluded); what
it still holds then is lost at that instant ("expired credit stops counting at
`expires_at`, exactly"). Usage is drawn from the active grants in consumption order: the
lowest `priority` first, then the earliest expiry (never expiring last), then the oldest,
then by id so the order is total. Usage that no active grant can pay is `uncovered`: it is
billed as a postpaid account's would be, and no later grant pays it.

Between two consecutive instants at which a grant starts or ends, the set of active grants
and their order do not change, so the usage of such a span can be drawn as one sum: drawing
greedily in a fixed order is additive. The caller therefore sums usage per span of
`bounds(...)` (finer bounds, such as day boundaries, change nothing) and `allocate` walks
the spans in order. Amounts are exact `Decimal`s; nothing is rounded here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Credit:
    """One grant as the allocation needs it."""

    id: uuid.UUID
    amount: Decimal
    created_at: datetime
    expires_at: datetime | None = None
    voided_at: datetime | None = None
    priority: int = 1
    purchased: bool = False

    @property
    def ends_at(self) -> datetime | None:
        """When it stops paying: its expiry or its void, the earlier."""
        ends = [t for t in (self.expires_at, self.voided_at) if t is not None]
        return min(ends) if ends else None

    def active(self, at: datetime) -> bool:
        ends = self.ends_at
        return self.created_at <= at and (ends is None or at < ends)


def consumption_order(credits: Iterable[Credit]) -> list[Credit]:
    """Priority, then earliest expiry (none last), then oldest, then id."""
    return sorted(
        credits,
        key=lambda c: (
            c.priority,
            c.expires_at is None,
            c.expires_at or c.created_at,
            c.created_at,
            c.id,
        ),
    )


def bounds(
    credits: Sequence[Credit], until: datetime, extra: Iterable[datetime] = ()
) -> list[datetime]:
    """The instants that cut usage into spans of constant active grants, up to `until`
    (included as the last bound): every start and end of a grant, and `extra` ones."""
    instants = {until}
    for credit in credits:
        for at in (credit.created_at, credit.ends_at):
            if at is not None and at < until:
                instants.add(at)
    instants.update(at for at in extra if at < until)
    first = min((c.created_at for c in credits), default=until)
    return sorted(at for at in instants if at >= first)


class Movement(StrEnum):
    DRAWDOWN = "drawdown"  # usage paid by the grant
    EXPIRY = "expiry"  # what it held when it expired
    VOID = "void"  # what it held when it was voided


@dataclass(frozen=True, slots=True)
class CreditMovement:
    """What left a grant: usage of one span drawn from it, or what it held when it ended."""

    credit_id: uuid.UUID
    kind: Movement
    amount: Decimal
    start: datetime  # the span's start (an ending: its instant)
    end: datetime


@dataclass(slots=True)
class Allocation:
    remaining: dict[uuid.UUID, Decimal]  # what each grant holds at the last bound (0 if ended)
    consumed: dict[uuid.UUID, Decimal]
    lapsed: dict[uuid.UUID, Decimal]  # lost when it expired or was voided
    movements: list[CreditMovement] = field(default_factory=list)
    usage: Decimal = _ZERO  # every span's usage, paid or not
    uncovered: Decimal = _ZERO
    covered_by_span: list[Decimal] = field(default_factory=list)

    def available(self, credits: Iterable[Credit], at: datetime) -> Decimal:
        """What the grants active at `at` still hold, as far as this allocation knows."""
        return sum((self.remaining.get(c.id, _ZERO) for c in credits if c.active(at)), _ZERO)


def allocate(
    credits: Sequence[Credit], cuts: Sequence[datetime], usage: Sequence[Decimal]
) -> Allocation:
    """Draw `usage[i]` (the usage in `[cuts[i], cuts[i + 1])`) from the grants, in order.

    `cuts` must include every start and end of a grant before its last instant (see
    `bounds`): a span with a grant starting or ending inside it cannot be drawn as one sum.
    """
    if len(usage) != max(len(cuts) - 1, 0):
        raise ValueError("one usage amount per span between consecutive cuts")
    ordered = consumption_order(credits)
    remaining = {c.id: c.amount for c in ordered}
    allocation = Allocation(remaining, {c.id: _ZERO for c in ordered}, {})
    ended: set[uuid.UUID] = set()

    def lapse(at: datetime) -> None:
        for credit in ordered:
            ends = credit.ends_at
            if credit.id in ended or ends is None or ends > at:
                continue
            ended.add(credit.id)
            left = remaining[credit.id]
            remaining[credit.id] = _ZERO
            allocation.lapsed[credit.id] = left
            if left > 0:
                voided = credit.voided_at is not None and credit.voided_at == ends
                kind = Movement.VOID if voided else Movement.EXPIRY
                allocation.movements.append(CreditMovement(credit.id, kind, left, ends, ends))

    for index, amount in enumerate(usage):
        start, end = cuts[index], cuts[index + 1]
        lapse(start)
        allocation.usage += amount
        due = amount
        for credit in ordered:
            if due <= 0:
                break
            if not credit.active(start):
                continue
            drawn = min(due, remaining[credit.id])
            if drawn <= 0:
                continue
            remaining[credit.id] -= drawn
            allocation.consumed[credit.id] += drawn
            due -= drawn
            allocation.movements.append(
                CreditMovement(credit.id, Movement.DRAWDOWN, drawn, start, end)
            )
        # Negative usage (a correction) pays no grant back: it lowers what is uncovered.
        allocation.covered_by_span.append(amount - due)
        allocation.uncovered += due
    if cuts:
        lapse(cuts[-1])
    return allocation
