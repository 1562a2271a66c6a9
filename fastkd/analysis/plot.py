"""The study's PNG charts, drawn with matplotlib (the `study` extra): line charts with ±std bands and bar charts with
error whiskers, side by side in one figure. Each chart names its axes (with units) and, where it summarises seeds,
how many."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


@dataclass
class Line:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    spread: Optional[Sequence[float]] = None  # half-width of a shaded band around ys (e.g. the std over seeds)


@dataclass
class LineChart:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line]


@dataclass
class BarChart:
    title: str
    ylabel: str
    labels: list[str]
    values: list[float]
    errors: list[float]  # whisker half-lengths (e.g. the std over seeds)


def save_figure(path: Path, charts: list) -> None:
    """Draw `charts` (LineChart or BarChart) side by side and write them to one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the study's charts need matplotlib: pip install -e \".[study]\"") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(charts), figsize=(5.6 * len(charts), 4.0), squeeze=False)
    for ax, chart in zip(axes[0], charts):
        if isinstance(chart, LineChart):
            for line in chart.lines:
                (drawn,) = ax.plot(line.xs, line.ys, marker="o", markersize=3, label=line.label)
                if line.spread is not None:
                    low = [y - s for y, s in zip(line.ys, line.spread)]
                    high = [y + s for y, s in zip(line.ys, line.spread)]
                    ax.fill_between(line.xs, low, high, color=drawn.get_color(), alpha=0.2, linewidth=0)
            ax.set_xlabel(chart.xlabel)
            ax.legend(fontsize="small")
        else:
            ax.bar(chart.labels, chart.values, yerr=chart.errors, capsize=4,
                   color=[f"C{i}" for i in range(len(chart.labels))])
            ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_title(chart.title, fontsize="medium")
        ax.set_ylabel(chart.ylabel)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
