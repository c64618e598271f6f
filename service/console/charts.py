"""The overview's daily spend, drawn on the server: bars in an SVG and labels in HTML, so the
chart is on the page's first paint, without script (the usage explorer's chart, which a
person works with, is uPlot's). Geometry is floats; every figure printed is exact."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from pricing.invoice import BillingPeriod
from service.console.service import DayPoint
from service.schemas import fixed_point

# Every how many days a day is named under the axis.
LABEL_EVERY = 5
# A bar's share of its day's width (the rest is the gap to the next).
BAR_WIDTH = 0.72


@dataclass(frozen=True, slots=True)
class Bar:
    x: float  # its left edge, in days
    height: float  # its share of the tallest bar, in percent
    title: str  # what a pointer over it says: the day, its exact spend and its requests


@dataclass(frozen=True, slots=True)
class DailyChart:
    days: int  # the days drawn: the month's so far
    width: int  # the days the axis spans: the whole month, so a bar keeps its width
    nonzero: int
    top: Decimal  # the axis's top (the month's largest day)
    bars: list[Bar]
    labels: list[str]  # one per day of the axis


def daily_chart(points: list[DayPoint], period: BillingPeriod) -> DailyChart:
    top = max((p.cost_usd for p in points), default=Decimal(0))
    width = (period.end - period.start).days
    first = period.start.date()
    labels = [
        f"{day.day} {day:%b}" if i % LABEL_EVERY == 0 else ""
        for i, day in ((i, first + timedelta(days=i)) for i in range(width))
    ]
    bars = []
    for i, p in enumerate(points):
        share = float(p.cost_usd / top * 100) if top > 0 and p.cost_usd > 0 else 0.0
        bars.append(
            Bar(
                x=i + (1 - BAR_WIDTH) / 2,
                height=share,
                title=f"{p.day.isoformat()}: ${fixed_point(p.cost_usd)} · {p.requests:,} requests",
            )
        )
    nonzero = sum(1 for p in points if p.cost_usd > 0)
    return DailyChart(len(points), max(width, len(points)), nonzero, top, bars, labels)
