"""Rolled-up breakdowns held in memory, so a dashboard reloaded reads only the ledger's tail.

What `usage_daily` holds for a range changes only when the rollup job folds more rows in,
and each fold moves the watermark in the same transaction. So the rollup's totals read at
watermark W, plus the ledger rows recorded after W (read at any later time: the ledger is
append-only, and every row recorded up to W was committed before the fold), are the
range's exact totals — whether or not folds have run since. An entry therefore never
goes stale; it is only replaced, once the rollup has moved past it and the tail read
beside it has grown long enough to cost more than reading the rollup again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from service.usage.repository import Breakdowns

# Entries kept (least recently used out first): a few per account that opens a dashboard.
ENTRIES = 256
# Ledger rows read beside an entry past which, once the rollup has moved on, the entry is
# read again: the tail of a minute or two between folds is cheaper than the rollup.
TAIL_ROWS = 20_000


class BreakdownCache:
    """Rollup breakdowns by (filter, groupings) (`service.usage.service.usage_breakdowns`);
    filters come scoped to their caller (`scoped_filter`), so an entry is one caller's view."""

    def __init__(self, entries: int = ENTRIES, tail_rows: int = TAIL_ROWS) -> None:
        self._entries: OrderedDict[Hashable, Breakdowns] = OrderedDict()
        self._size = entries
        self.tail_rows = tail_rows

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Breakdowns | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: Hashable, rolled_up: Breakdowns) -> None:
        self._entries[key] = rolled_up
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def drop(self, key: Hashable) -> None:
        self._entries.pop(key, None)
