"""Benchmark results for people: a Markdown table and PNG bar plots beside the JSON.

Each figure is a ``Spread``: the median of the repeated runs and their min and max, so
that a table cell reads ``0.41 (0.26-0.41)`` and a bar carries its range as error bars.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @staticmethod
    def of(values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        return Spread(statistics.median(values), min(values), max(values))

    def cell(self, digits: int) -> str:
        if self.low == self.high:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table; every row has the header's width."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)} has {len(row)} cells, the header {len(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bar_plot(path: Path, title: str, ylabel: str, bars: dict[str, Spread]) -> Path:
    """One bar per label at its median, the min-max range as an error bar; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    labels = list(bars)
    medians = [bars[label].median for label in labels]
    below = [bars[label].median - bars[label].low for label in labels]
    above = [bars[label].high - bars[label].median for label in labels]
    figure, axes = pyplot.subplots(figsize=(1.6 + 1.4 * len(labels), 3.6), dpi=100)
    axes.bar(labels, medians, yerr=[below, above], capsize=5, color="#4c72b0")
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.tick_params(axis="x", labelrotation=15)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)
    return path
