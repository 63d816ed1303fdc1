"""The report's figures, as PNG bytes (matplotlib's object API on the Agg canvas).

No pyplot: it keeps global figure state and picks a GUI backend when one is around; a
server that writes a report after every run must do neither. Figures are small (about
30-60 KB each) because the HTML report embeds them as data URIs.
"""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

SIZE = (6.4, 3.7)
DPI = 100
LEGEND_MAX = 10  # beyond this many series a legend hides the plot: lines stay, names go


def _figure(title: str, xlabel: str, ylabel: str, rounds: int | None = None, first: int = 0):
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds is not None:
        ax.set_xlim(first - 0.25, max(rounds, first + 1) + 0.25)
    return fig, ax


def _png(fig: Figure) -> bytes:
    """Legend below the axes, where it hides no line; none when there are too many series to name."""
    handles, labels = [], []
    for ax in fig.axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if 0 < len(labels) <= LEGEND_MAX:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def palette(names) -> dict[str, str]:
    """One colour per site, the same in every figure of a report: sites in sorted order over matplotlib's
    default cycle (tab10), so a site keeps its colour whichever figures it appears in."""
    cycle = [f"C{i}" for i in range(10)]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(sorted(names))}


def _grouped(series: dict[str, list], colours: dict[str, str]) -> list[tuple[str, str | None, list]]:
    """(label, colour, points): clients with identical curves share one line and one label (drawn apart, all but
    the last would be hidden), in the first one's colour."""
    groups: dict[tuple, list[str]] = {}
    for name, points in series.items():
        groups.setdefault(tuple(points), []).append(name)
    return [(", ".join(names) + (" (identical)" if len(names) > 1 else ""), colours.get(names[0]), list(points))
            for points, names in groups.items()]


def epsilon_plot(series: dict[str, list[tuple[int, float]]], budgets: dict[str, float], rounds: int,
                 user_level: list[tuple[int, float]] | None = None, xlabel: str = "round",
                 colours: dict[str, str] | None = None) -> bytes:
    """Cumulative epsilon per client (solid) with each distinct budget as a dashed line; x from 0 to ``rounds``."""
    fig, ax = _figure("Privacy spent: cumulative epsilon (PRV)", xlabel, "epsilon", rounds)
    for name, colour, points in _grouped(series, colours or palette(series)):
        finite = [(x, y) for x, y in points if math.isfinite(y)]
        if finite:
            ax.plot(*zip(*finite), marker="o", label=name, color=colour)
    for budget in sorted({b for b in budgets.values() if b is not None and math.isfinite(b)}):
        owners = [n for n, b in budgets.items() if b == budget]
        label = f"budget {budget:g}" + ("" if len(owners) == len(budgets) else f" ({', '.join(owners)})")
        ax.axhline(budget, color="crimson", linestyle="--", linewidth=1.2, label=label)
    if user_level:
        ax.plot(*zip(*user_level), color="black", linestyle=":", marker="s", label="user-level (whole client)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # room above a budget line the last point sits on
    return _png(fig)


def noise_plot(series: dict[str, list[tuple[int, float]]], refused: dict[str, list[int]], rounds: int,
               colours: dict[str, str] | None = None) -> bytes:
    """Noise multiplier sigma each client trained with; x marks a refused round."""
    fig, ax = _figure("Noise multiplier per round", "round", "sigma (noise std / clip norm)", rounds, first=1)
    colours = colours or palette(set(series) | set(refused))
    for name, colour, points in _grouped(series, colours):
        if points:
            ax.plot(*zip(*points), marker="o", label=name, color=colour)
    for name, colour, refused_in in _grouped(refused, colours):
        if refused_in:
            ax.plot(refused_in, [0] * len(refused_in), linestyle="none", marker="x", markersize=9, clip_on=False,
                    label=f"{name}: refused", color=colour)
    ax.set_ylim(0, max(ax.get_ylim()[1], 1.0))
    return _png(fig)


def utility_plot(evaluated: list[int], loss: list[float], per_client: dict[str, list[tuple[int, float]]],
                 accuracy: dict[str, list[tuple[int, float]]], rounds: int,
                 colours: dict[str, str] | None = None) -> bytes:
    """Federated eval loss (bold) and each client's (thin); accuracies on a right-hand axis."""
    fig, ax = _figure("Utility on held-out records (lower loss is better)", "round", "eval loss", rounds)
    colours = colours or palette(per_client)
    for name, points in per_client.items():
        ax.plot(*zip(*points), linewidth=0.9, alpha=0.7, label=name, color=colours.get(name))
    ax.plot(evaluated, loss, color="black", linewidth=2.2, marker="o", label="federated (token-weighted)")
    if accuracy:
        right = ax.twinx()
        right.set_ylabel("accuracy")
        for key, points in accuracy.items():
            right.plot(*zip(*points), linestyle="--", marker="^", label=key.replace("_", " "))
    return _png(fig)


def privacy_utility_plot(points: list[tuple[float, float, int]]) -> bytes:
    """This run's path in the (epsilon, eval loss) plane: one point per round, the last one highlighted.

    x is the largest cumulative sample-level epsilon of any client after that round: the
    weakest guarantee the federation gives after that round.
    """
    fig, ax = _figure("Privacy-utility of this run", "largest client epsilon (PRV)", "eval loss")
    xs, ys, labels = zip(*points)
    ax.plot(xs, ys, color="grey", linewidth=1, marker="o", markersize=4, label="after each round")
    for x, y, label in points:
        ax.annotate(f"r{label}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([xs[-1]], [ys[-1]], marker="*", markersize=16, color="crimson", linestyle="none",
            label=f"this run: eps {xs[-1]:.2f}, loss {ys[-1]:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator())
    ax.margins(0.1)
    return _png(fig)
