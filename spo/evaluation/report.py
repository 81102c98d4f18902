"""The comparison report: `report.md` and a self-contained `report.html` (tables, image grid
and plots embedded as base64 PNGs, no external links), plus the plots as PNG files."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from spo.config import CompareConfig
from spo.evaluation.stats import format_ci
from spo.runs import atomic_write_bytes


def score_table(results: dict, models: list[str], scorers: list[str]) -> list[list[str]]:
    """Rows: header, then one per model: mean [95% CI] per scorer."""
    rows = [["model", *scorers]]
    for m in models:
        rows.append([m, *(format_ci(results["scores"][m][s]) for s in scorers)])
    return rows


def win_table(results: dict, models: list[str], scorer: str) -> list[list[str]]:
    """Rows: header, then row A / column B = how often A beats B (ties 0.5)."""
    rates = results["win_rates"][scorer]
    rows = [["A \\ B", *models]]
    for a in models:
        cells = ("—" if a == b else format_ci(rates[f"{a} vs {b}"], "rate") for b in models)
        rows.append([a, *cells])
    return rows


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def means_plot(results: dict, models: list[str], scorer: str) -> bytes:
    """A bar per model: the mean score with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [results["scores"][m][scorer]["mean"] for m in models]
    cis = np.array([results["scores"][m][scorer]["ci95"] for m in models])
    err = np.abs(cis.T - np.array(means))
    fig, ax = plt.subplots(figsize=(1.2 * len(models) + 2, 3))
    ax.bar(models, means, yerr=err, capsize=4, color="#4C72B0")
    ax.set_title(f"{scorer}: mean with 95% CI")
    lo = float(cis.min())
    hi = float(cis.max())
    pad = 0.2 * (hi - lo) + 1e-6
    ax.set_ylim(lo - pad, hi + pad)
    data = _png_bytes(fig)
    plt.close(fig)
    return data


def image_grid(out: Path, models: list[str], prompts: list[str], n_prompts: int) -> bytes:
    """One row per prompt, one column per model, the first seed of each prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n_prompts, len(prompts))
    fig, axes = plt.subplots(
        n, len(models), figsize=(1.8 * len(models) + 2, 1.8 * n), squeeze=False
    )
    for i in range(n):
        for c, m in enumerate(models):
            ax = axes[i][c]
            ax.imshow(Image.open(out / "images" / m / f"p{i:05d}_s0.png"))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(m, fontsize=9)
            if c == 0:
                label = textwrap.fill(prompts[i], 22, max_lines=4, placeholder=" ...")
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    data = _png_bytes(fig)
    plt.close(fig)
    return data


def write_report(cfg: CompareConfig, prompts, scores: dict, results: dict) -> None:
    """report.md, report.html and the plot PNGs in cfg.out."""
    out = Path(cfg.out)
    models = [m.name for m in cfg.models]
    scorers = list(scores)
    figures = {f"means_{i}.png": means_plot(results, models, s) for i, s in enumerate(scorers)}
    figures["grid.png"] = image_grid(out, models, prompts.texts, cfg.grid_prompts)
    for name, data in figures.items():
        atomic_write_bytes(out / name, data)

    s = results["settings"]
    intro = (
        f"{s['prompts']} prompts x {s['images_per_prompt']} images per model, the same seed per "
        f"(prompt, image) for every model; DDIM {s['num_inference_steps']} steps, CFG "
        f"{s['guidance_scale']}. Means with 95% bootstrap intervals (prompts resampled); win "
        "rate of A over B on the same (prompt, seed), ties 0.5."
    )
    md = [
        "# Comparison",
        "",
        intro,
        "",
        "## Mean scores",
        "",
        _markdown(score_table(results, models, scorers)),
    ]
    for i, scorer in enumerate(scorers):
        md += ["", f"## Win rates: {scorer}", "", _markdown(win_table(results, models, scorer))]
        md += ["", f"![{scorer}](means_{i}.png)"]
    for cat, by_model in results.get("by_category", {}).items():
        rows = [["model", *scorers]] + [
            [m, *(format_ci(by_model[m][sc]) for sc in scorers)] for m in models
        ]
        md += ["", f"## Category: {cat}", "", _markdown(rows)]
    md += ["", "## Samples (first seed of each prompt)", "", "![grid](grid.png)", ""]
    atomic_write_bytes(out / "report.md", "\n".join(md).encode())

    def img(name: str) -> str:
        data = base64.b64encode(figures[name]).decode()
        return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>spo compare</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;font-size:14px}"
        "th{background:#eee}img{max-width:100%}",
        "</style></head><body><h1>Comparison</h1>",
        f"<p>{html.escape(intro)}</p><h2>Mean scores</h2>",
        _html_table(score_table(results, models, scorers)),
    ]
    for i, scorer in enumerate(scorers):
        parts += [f"<h2>Win rates: {html.escape(scorer)}</h2>"]
        parts += [_html_table(win_table(results, models, scorer)), img(f"means_{i}.png")]
    for cat, by_model in results.get("by_category", {}).items():
        rows = [["model", *scorers]] + [
            [m, *(format_ci(by_model[m][sc]) for sc in scorers)] for m in models
        ]
        parts += [f"<h2>Category: {html.escape(cat)}</h2>", _html_table(rows)]
    parts += ["<h2>Samples (first seed of each prompt)</h2>", img("grid.png"), "</body></html>"]
    atomic_write_bytes(out / "report.html", "\n".join(parts).encode())
