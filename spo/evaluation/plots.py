"""The report's figures: values with their intervals as dot plots, validation scores against
training time and chain KL (proxy against gold), and a judge's accuracy at each timestep.

Why dot plots and not bars: a bar's length reads as the value, so a bar axis must start at 0,
which squeezes differences of a few percent out of sight; a dot with its interval reads right on
any axis. Each figure is rendered twice: SVG for report.html (inline, sharp at any zoom, its text
drawn as paths so no font is needed) and PNG, the file report.md shows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Figure:
    svg: bytes
    png: bytes


@dataclass(frozen=True)
class Panel:
    """One panel of a dot plot: a value and its interval (None: none) per row."""

    title: str
    values: list[float]
    intervals: list[list[float] | None]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _render(fig) -> Figure:
    svg, png = io.BytesIO(), io.BytesIO()
    with _pyplot().rc_context({"svg.fonttype": "path"}):  # text as paths: no font needed
        fig.savefig(svg, format="svg", bbox_inches="tight", metadata={"Date": None})
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return Figure(svg.getvalue(), png.getvalue())


def interval_dots(
    labels: list[str],
    panels: list[Panel],
    *,
    xlabel: str,
    reference: float | None = None,
    reference_label: str | None = None,
    limits: tuple[float, float] | None = None,
) -> Figure:
    """A panel per scorer, a row per model (the first on top): a dot at the value and a line
    over its 95% interval; `reference` (0.5 for win rates, 0 for differences) dashed, with
    `reference_label` in the legend; `limits` fixes the value axis (0..1 for rates)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(0.6 + 3.1 * len(panels), 0.9 + 0.42 * len(labels)),
        squeeze=False,
        sharey=True,
    )
    rows = np.arange(len(labels))[::-1]
    for ax, panel in zip(axes[0], panels, strict=True):
        if reference is not None:
            ax.axvline(reference, color="0.45", ls="--", lw=1, label=reference_label)
        for y, value, interval in zip(rows, panel.values, panel.intervals, strict=True):
            if interval is not None:
                ax.plot(interval, [y, y], color="#4C72B0", lw=2.2, solid_capstyle="butt")
            ax.plot([value], [y], "o", color="#4C72B0", ms=6)
        if limits is not None:  # a little room, so that a dot at a limit is not on the frame
            pad = 0.02 * (limits[1] - limits[0])
            ax.set_xlim(limits[0] - pad, limits[1] + pad)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(rows, labels)
    axes[0][0].set_ylim(-0.6, len(labels) - 0.4)
    if reference_label is not None:
        axes[0][0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _render(fig)


GOLD = "oracle"  # the toy world's ground truth: drawn and labelled as such, never a proxy


def proxy_against_gold(runs: dict[str, dict]) -> Figure:
    """A column per validation scorer, a line per run: the mean score of the fixed-seed
    validation images against the training seconds (top) and against the KL of the policy's
    sampling chain from the reference's (bottom), the best validation (by the run's
    `select_by`) ringed. `runs`: {label: {"validations": [...], "best_step": int | None}}
    (`spo.evaluation.provenance.validation_rows`)."""
    plt = _pyplot()
    names = list(
        dict.fromkeys(n for r in runs.values() for v in r["validations"] for n in v["scores"])
    )
    names.sort(key=lambda n: n == GOLD)  # the ground truth last
    fig, axes = plt.subplots(2, len(names), figsize=(4.6 * len(names), 6.4), squeeze=False)
    for col, name in enumerate(names):
        for i, (label, run) in enumerate(runs.items()):
            rows = [v for v in run["validations"] if v["scores"].get(name) is not None]
            x_axes = (
                [v["seconds"] for v in rows],
                [v["chain_kl"] for v in rows],
            )
            ys = [v["scores"][name] for v in rows]
            best = [j for j, v in enumerate(rows) if v["step"] == run.get("best_step")]
            for ax, xs in zip(axes[:, col], x_axes, strict=True):
                shown = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None]
                if not shown:
                    continue
                ax.plot(*zip(*shown, strict=True), marker="o", ms=3, color=f"C{i}", label=label)
                for j in best:
                    if xs[j] is not None:
                        ax.plot(xs[j], ys[j], marker="o", ms=11, mfc="none", color=f"C{i}")
        title = f"{name} (ground truth)" if name == GOLD else name
        axes[0][col].set_xlabel("training wall-clock (s; validation excluded)", fontsize=9)
        axes[1][col].set_xlabel("KL of the sampling chain from the reference", fontsize=9)
        for ax in axes[:, col]:
            ax.set_ylabel(f"{title}, validation mean", fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
    axes[0][0].legend(fontsize=8, title="ringed: best/", title_fontsize=8)
    fig.tight_layout()
    return _render(fig)


@dataclass(frozen=True)
class JudgeCurve:
    """A judge's accuracy at each timestep with its intervals, and the oracle's ceiling."""

    label: str
    used_by: str
    timesteps: list[int]
    accuracy: list[float]
    intervals: list[list[float]] | None
    ceiling: float | None


def judge_accuracy(judges: list[JudgeCurve]) -> Figure:
    """Accuracy on the validation pairs against the timestep, on a 0..1 axis with chance (0.5)
    dashed and each judge's oracle ceiling dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    ax.axhline(0.5, color="0.45", ls="--", lw=1, label="chance (0.5)")
    for i, judge in enumerate(judges):
        color = f"C{i}"
        yerr = None
        if judge.intervals is not None:
            yerr = [
                [a - lo for a, (lo, _) in zip(judge.accuracy, judge.intervals, strict=True)],
                [hi - a for a, (_, hi) in zip(judge.accuracy, judge.intervals, strict=True)],
            ]
        ax.errorbar(
            judge.timesteps,
            judge.accuracy,
            yerr=yerr,
            color=color,
            marker="o",
            ms=4,
            capsize=3,
            label=f"{judge.label}: {judge.used_by}",
        )
        if judge.ceiling is not None:
            label = f"oracle ceiling of {judge.label}"
            ax.axhline(judge.ceiling, color=color, ls=":", lw=1.2, label=label)
    ax.set_ylim(0, 1)
    ax.set_xlabel("timestep t of the noisy image judged", fontsize=9)
    ax.set_ylabel("accuracy on validation pairs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _render(fig)
