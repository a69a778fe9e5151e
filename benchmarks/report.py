"""Benchmark results for people: a Markdown table and PNG bar plots beside the JSON.

Each figure is a ``Spread``: the median of the repeated runs and their min and max, so
that a table cell reads ``0.41 (0.26-0.41)`` and a bar carries its range as error bars.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    return bar_panels(path, title, {"": (ylabel, bars)})


def bar_panels(path: Path, title: str, panels: Mapping[str, tuple[str, Mapping[str, Spread]]]) -> Path:
    """Side by side, one panel per figure (``{panel title: (y label, {label: spread})}``),
    each drawn as ``bar_plot`` draws its bars (figures of different scales, e.g. TTFT and
    TPOT, each on its own axis); a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    widest = max((len(bars) for _, bars in panels.values()), default=1)
    figure, axes_row = pyplot.subplots(1, len(panels), figsize=((1.6 + 1.4 * widest) * len(panels), 3.6), dpi=100,
                                       squeeze=False)  # fmt: skip
    for axes, (panel, (ylabel, bars)) in zip(axes_row[0], panels.items()):
        _draw_bars(axes, bars)
        axes.set_title(panel or title)
        axes.set_ylabel(ylabel)
    if len(panels) > 1:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)
    return path


def _draw_bars(axes: Any, bars: Mapping[str, Spread]) -> None:
    labels = list(bars)
    medians = [bars[label].median for label in labels]
    below = [bars[label].median - bars[label].low for label in labels]
    above = [bars[label].high - bars[label].median for label in labels]
    axes.bar(labels, medians, yerr=[below, above], capsize=5, color="#4c72b0")
    axes.tick_params(axis="x", labelrotation=15)
