"""The comparison report: `report.md` and one self-contained `report.html`, from the same blocks.

report.html stands alone: plots are inline SVG data URIs, samples inline PNG / JPEG data URIs,
the style sheet is in the page; nothing is fetched (no links, scripts or fonts). Tables name
models and scorers by short labels (the full names and paths are in the legend above them) and
print every number of a column with the same number of decimals (`column_decimals`).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from spo.config import CompareConfig
from spo.evaluation.plots import (
    GOLD,
    Figure,
    JudgeCurve,
    Panel,
    interval_dots,
    judge_accuracy,
    proxy_against_gold,
)
from spo.evaluation.stats import wilson_ci
from spo.runs import atomic_write_bytes

LABEL_WIDTH = 12  # model names up to this long label the columns as they are; longer: A, B, ...
SAMPLE_PX = 128  # display width of a sample in report.html
THUMB_PX = 256  # samples larger than this are embedded downscaled (JPEG) to keep the page small

PLOTS = ("means", "differences", "win_rates", "proxy_vs_gold", "judge_accuracy")
SOURCE = "_source"  # images/<SOURCE>/: an editing comparison's sources, shown beside the edits
Table = list[list[str]]


def letters(i: int) -> str:
    """A, B, ..., Z, AA, AB, ...: the i-th (from 0) short label."""
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = chr(ord("A") + r) + out
    return out


def model_labels(names: list[str]) -> list[str]:
    """The models' column labels: their names when every one is short, else A, B, C, ..."""
    if all(len(n) <= LABEL_WIDTH for n in names):
        return list(names)
    return [letters(i) for i in range(len(names))]


def scorer_labels(specs: list[str]) -> list[str]:
    """A scorer's label is its registry name (`spm`, not `spm:/long/path`), numbered when two
    scorers share one (`clip 1`, `clip 2`)."""
    names = [s.partition(":")[0] for s in specs]
    return [
        f"{n} {names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)
    ]


def column_decimals(entries: list[dict], key: str = "mean", digits: int = 2) -> int:
    """Decimals for every number of a column of {key, "ci95"} entries: enough to show the
    narrowest interval's width with `digits` significant digits; with no interval wider than
    0, the largest value with `digits` + 1. At most 6."""
    widths = [e["ci95"][1] - e["ci95"][0] for e in entries if e["ci95"] is not None]
    widths = [w for w in widths if w > 0]
    if widths:
        scale, shown = min(widths), digits
    else:
        values = [abs(e[key]) for e in entries if e[key]]
        if not values:
            return 0
        scale, shown = max(values), digits + 1
    return min(max(shown - 1 - math.floor(math.log10(scale)), 0), 6)


def number(value: float, decimals: int, signed: bool = False) -> str:
    """`value` with `decimals` decimals; `signed`: with + or - unless it rounds to 0."""
    rounded = round(value, decimals) + 0.0  # -0.0 + 0.0 is 0.0
    return f"{rounded:{'+' if signed and rounded else ''}.{decimals}f}"


def cell(entry: dict, key: str, decimals: int, signed: bool = False) -> str:
    """ "value [low, high]" of a stats entry; "value (no interval)" when it has none."""
    value = number(entry[key], decimals, signed)
    if entry["ci95"] is None:
        return f"{value} (no interval)"
    low, high = (number(x, decimals, signed) for x in entry["ci95"])
    return f"{value} [{low}, {high}]"


def interval_columns(
    row_labels: list[str], columns: list[str], entries: list[list[dict]], signed: bool = False
) -> Table:
    """A table of the means of `entries[row][column]`, each column with its own precision."""
    decimals = [column_decimals([row[c] for row in entries]) for c in range(len(columns))]
    rows = [["model", *columns]]
    for label, row in zip(row_labels, entries, strict=True):
        cells = (cell(e, "mean", d, signed) for e, d in zip(row, decimals, strict=True))
        rows.append([label, *cells])
    return rows


def win_table(results: dict, models: list[str], labels: list[str], scorer: str) -> Table:
    """Row A, column B: how often A beats B on the same (prompt, seed), ties 0.5; one
    precision for the whole table (every column is the same quantity)."""
    rates = results["win_rates"][scorer]
    decimals = column_decimals(list(rates.values()), "rate")
    rows = [["row beats column", *labels]]
    for a, label in zip(models, labels, strict=True):
        cells = ("—" if a == b else cell(rates[f"{a} vs {b}"], "rate", decimals) for b in models)
        rows.append([label, *cells])
    return rows


# ------------------------------------------------------------------------------ blocks


@dataclass
class Heading:
    text: str
    level: int = 2

    def md(self) -> str:
        return "#" * self.level + " " + self.text

    def html(self, figures: dict[str, Figure]) -> str:
        return f"<h{self.level}>{html.escape(self.text)}</h{self.level}>"


@dataclass
class Para:
    text: str
    note: bool = False  # a "no data" note: set apart in the page

    def md(self) -> str:
        return f"*{self.text}*" if self.note else self.text

    def html(self, figures: dict[str, Figure]) -> str:
        return f"<p{' class=note' if self.note else ''}>{html.escape(self.text)}</p>"


@dataclass
class TableBlock:
    rows: Table
    numeric: bool = True  # right-align every column after the first
    code: tuple[int, ...] = ()  # columns shown as code (paths, hashes)

    def md(self) -> str:
        def row(r: list[str], code: tuple[int, ...]) -> str:
            cells = [f"`{c}`" if i in code and c else c for i, c in enumerate(r)]
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        lines = [row(self.rows[0], ()), "|" + " --- |" * len(self.rows[0])]
        return "\n".join(lines + [row(r, self.code) for r in self.rows[1:]])

    def html(self, figures: dict[str, Figure]) -> str:
        def td(i: int, c: str) -> str:
            text = html.escape(c)
            if i in self.code:
                return f"<td><code>{text}</code></td>"
            return f"<td class=num>{text}</td>" if self.numeric and i else f"<td>{text}</td>"

        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.rows[0])
        body = "".join(
            "<tr>" + "".join(td(i, c) for i, c in enumerate(r)) + "</tr>" for r in self.rows[1:]
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Plot:
    name: str
    alt: str

    def md(self) -> str:
        return f"![{self.alt}]({self.name}.png)"

    def html(self, figures: dict[str, Figure]) -> str:
        data = base64.b64encode(figures[self.name].svg).decode()
        return (
            f'<img class=plot alt="{html.escape(self.alt)}" src="data:image/svg+xml;base64,{data}">'
        )


@dataclass
class Samples:
    """Every image of the first prompts: per prompt a row per model, a column per image."""

    out: Path
    prompts: list[str]
    models: list[str]
    labels: list[str]
    per_prompt: int

    def path(self, model: str, i: int, j: int) -> Path:
        return Path("images") / model / f"p{i:05d}_s{j}.png"

    def md(self) -> str:
        n = self.per_prompt
        rows = [["prompt", "model", *(f"image {j}" for j in range(n))]]
        for i, prompt in enumerate(self.prompts):
            for m, (model, label) in enumerate(zip(self.models, self.labels, strict=True)):
                images = [f"![](<{self.path(model, i, j).as_posix()}>)" for j in range(n)]
                rows.append([prompt if m == 0 else "", label, *images])
        return TableBlock(rows, numeric=False).md()

    def html(self, figures: dict[str, Figure]) -> str:
        head = "".join(f"<th>image {j}</th>" for j in range(self.per_prompt))
        parts = [f"<table class=samples><thead><tr><th></th>{head}</tr></thead><tbody>"]
        for i, prompt in enumerate(self.prompts):
            span = self.per_prompt + 1
            parts.append(f"<tr><th colspan={span} class=prompt>{html.escape(prompt)}</th></tr>")
            for model, label in zip(self.models, self.labels, strict=True):
                images = "".join(
                    f"<td>{sample_img(self.out / self.path(model, i, j))}</td>"
                    for j in range(self.per_prompt)
                )
                parts.append(f"<tr><th>{html.escape(label)}</th>{images}</tr>")
        return "".join(parts) + "</tbody></table>"


@dataclass
class Code:
    title: str
    text: str

    def md(self) -> str:
        return f"<details><summary>{self.title}</summary>\n\n```yaml\n{self.text}```\n</details>"

    def html(self, figures: dict[str, Figure]) -> str:
        return (
            f"<details><summary>{html.escape(self.title)}</summary>"
            f"<pre>{html.escape(self.text)}</pre></details>"
        )


Block = Heading | Para | TableBlock | Plot | Samples | Code


def sample_img(path: Path) -> str:
    """An <img> of one sample as a data URI: the PNG itself, or a JPEG thumbnail of a large one;
    a small one is scaled up pixelated (its pixels shown, not blurred)."""
    image = Image.open(path)
    if max(image.size) <= THUMB_PX:
        data, mime = path.read_bytes(), "image/png"
    else:
        image = image.convert("RGB")
        image.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=88)
        data, mime = buf.getvalue(), "image/jpeg"
    pixelated = " class=px" if image.size[0] < SAMPLE_PX else ""
    encoded = base64.b64encode(data).decode()
    return f'<img{pixelated} alt="" src="data:{mime};base64,{encoded}">'


STYLE = (
    "body{font-family:sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.6em 0 1.2em}"
    "td,th{border:1px solid #bbb;padding:3px 8px;font-size:14px;text-align:left}"
    "th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums;"
    "white-space:nowrap}code{font-size:12px;word-break:break-all}"
    "img.plot{max-width:100%;display:block;margin:.5em 0 1em}"
    f".samples img{{width:{SAMPLE_PX}px;display:block}}.samples img.px{{image-rendering:pixelated}}"
    ".samples td{padding:2px}.samples th.prompt{background:#f6f6f6;font-weight:normal;"
    "font-style:italic}p.note{color:#8a4b00}pre{background:#f6f6f6;padding:.6em;font-size:12px;"
    "overflow-x:auto}details{margin:.4em 0}"
)


def page(blocks: list[Block], figures: dict[str, Figure], title: str = "Comparison") -> str:
    """report.html: the blocks, the style sheet inline, nothing fetched."""
    body = "\n".join(b.html(figures) for b in blocks)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>spo compare</title>"
        f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n"
        "</body></html>\n"
    )


# ------------------------------------------------------------------------------ sections


def _intro(cfg: CompareConfig, results: dict, base_label: str, n_models: int) -> Para:
    s = results["settings"]
    if s.get("task") == "edit":
        text = (
            f"Editing (SDEdit): {s['prompts']} source images from {s['sources']}, each noised to "
            f"strength {s['strength']} and denoised with its edit prompt, {s['images_per_prompt']} "
            f"edits per source and model; edit j of source i has the same seed for every model "
            f"({s['num_inference_steps']} steps at full strength, CFG {s['guidance_scale']}). "
            f"`fidelity`: 1 - the mean absolute difference of the edit's and the source's colours "
            f"averaged over {s['fidelity_blocks']} x {s['fidelity_blocks']} blocks (the layout "
            "kept, 1 at best). "
        )
    else:
        text = (
            f"{s['prompts']} prompts x {s['images_per_prompt']} images per model; image j of "
            f"prompt i has the same seed for every model (DDIM {s['num_inference_steps']} steps, "
            f"CFG {s['guidance_scale']}). "
        )
    text += (
        f"Means: 95% bootstrap intervals over prompts ({cfg.bootstrap} resamples, the images of "
        "a prompt together)."
    )
    if n_models > 1:
        text += (
            f" Differences and win rates are against {base_label}, the base (config key `base`; "
            "default the first model), on the same (prompt, seed). Differences: mean of model "
            "minus base, 95% paired t-interval over prompts. Win rates: share of (prompt, seed) "
            "where one model scores higher, ties 0.5, 95% bootstrap interval over prompts."
        )
    return Para(text)


def _legend(
    cfg: CompareConfig, labels: list[str], specs: list[str], s_labels: list[str], training: dict
) -> list[Block]:
    base = cfg.base_model
    rows = [["label", "model", "role", "pipeline", "LoRA or UNet", "trained in"]]
    for spec, label in zip(cfg.models, labels, strict=True):
        run = training["runs"].get(spec.name, {}).get("folder", "")
        role = "base" if spec.name == base else ""
        rows.append([label, spec.name, role, spec.pipeline, spec.lora or spec.unet or "", run])
    scorers = [["label", "scorer"]] + [[lab, s] for lab, s in zip(s_labels, specs, strict=True)]
    return [
        Heading("Models and scorers"),
        TableBlock(rows, numeric=False, code=(3, 4, 5)),
        TableBlock(scorers, numeric=False, code=(1,)),
    ]


def _training(training: dict, labels: dict[str, str]) -> tuple[list[Block], dict[str, Figure]]:
    """The reward against training time and the judges' accuracy, or a note of what is
    missing."""
    blocks: list[Block] = [Heading("Training")]
    figures: dict[str, Figure] = {}
    blocks.append(Heading("Proxy against gold", 3))
    runs = _runs_by_folder(training["runs"], labels)
    if any(run["validations"] for run in runs.values()):
        figures["proxy_vs_gold"] = proxy_against_gold(runs)
        blocks += [
            Para(
                "Mean score of each run's fixed-seed validation images (the first point: the "
                "untrained policy) against its training wall-clock seconds and against the KL "
                "of its sampling chain from the reference's (how far the policy has moved), "
                f"from the run folders' metrics.jsonl; ringed: the validation best/ holds. "
                f"{GOLD} is the toy world's ground truth; a scorer the run was trained on "
                "rising while it falls is over-optimisation. Each run on its own machine: "
                "compare times of runs made on the same hardware."
            ),
            Plot("proxy_vs_gold", "validation scores against training time and chain KL"),
            TableBlock(_proxy_table(runs), numeric=False),
        ]
    else:
        blocks.append(
            Para(
                "No curve: no compared model's LoRA or UNet is in the final/ or best/ folder of "
                "a training run whose metrics.jsonl holds scored validation images.",
                note=True,
            )
        )
    blocks.append(Heading("Judge accuracy by timestep", 3))
    measured = [j for j in training["judges"] if j["accuracy"] is not None]
    for judge in training["judges"]:
        if judge["accuracy"] is None:
            blocks.append(
                Para(
                    f"Judge {judge['path']} ({', '.join(judge['used_by'])}): no eval.json in its"
                    " run folder (spo train-preference-model writes one).",
                    note=True,
                )
            )
    if not training["judges"]:
        blocks.append(
            Para(
                "No judge: no compared model was trained by SPO (a run whose config.yaml names "
                "an spm) and no scorer is spm:<folder>.",
                note=True,
            )
        )
    if measured:
        judge_blocks, figures["judge_accuracy"] = _judges(measured)
        blocks += judge_blocks
    return blocks, figures


def _runs_by_folder(runs: dict, labels: dict[str, str]) -> dict[str, dict]:
    """One entry per run folder (best/ and final/ of one run are one run), labelled by the
    models that came out of it: {"spo (final), spo_best (best)": {"validations", "best_step",
    "select_by"}}."""
    folders: dict[str, dict] = {}
    for model, run in runs.items():
        entry = folders.setdefault(run["folder"], {"models": [], **run})
        entry["models"].append(f"{labels[model]} ({run['result']})")
    return {
        ", ".join(run["models"]): {
            "validations": run["validations"],
            "best_step": (run["best"] or {}).get("step"),
            "select_by": (run["best"] or {}).get("select_by"),
        }
        for run in folders.values()
    }


def _proxy_table(runs: dict[str, dict]) -> Table:
    """Per run and scorer: the score at best/ (chosen by its select_by), at the last
    validation, and the scorer's own peak along the run with its step."""
    rows = [["run", "scorer", "at best/ (step)", "at the end (step)", "its own peak (step)"]]
    for label, run in runs.items():
        validations = [v for v in run["validations"] if v["scores"]]
        if not validations:
            continue
        names = list(dict.fromkeys(n for v in validations for n in v["scores"]))
        best = [v for v in validations if v["step"] == run["best_step"]]
        for name in names:
            scored = [v for v in validations if name in v["scores"]]
            peak = max(scored, key=lambda v: v["scores"][name])
            last = scored[-1]
            at_best = (
                f"{best[0]['scores'][name]:.4f} ({best[0]['step']})"
                if best and name in best[0]["scores"]
                else "—"
            )
            shown = f"{name} (ground truth)" if name == GOLD else name
            if name == run["select_by"]:
                shown += ", selects best/"
            rows.append(
                [
                    label,
                    shown,
                    at_best,
                    f"{last['scores'][name]:.4f} ({last['step']})",
                    f"{peak['scores'][name]:.4f} ({peak['step']})",
                ]
            )
    return rows


def _judges(judges: list[dict]) -> tuple[list[Block], Figure]:
    """The judges' accuracy on their validation pairs at each timestep: a plot and a table,
    each value with a 95% Wilson interval over the pairs."""
    curves, entries = [], []
    labels = [f"J{i + 1}" for i in range(len(judges))]
    timesteps = sorted({t for j in judges for t in j["accuracy"]["accuracy_by_timestep"]})
    for label, judge in zip(labels, judges, strict=True):
        acc = judge["accuracy"]
        by_t, pairs = acc["accuracy_by_timestep"], acc["pairs"]
        row = {
            t: {"mean": a, "ci95": wilson_ci(a, pairs) if pairs else None} for t, a in by_t.items()
        }
        entries.append(row)
        curves.append(
            JudgeCurve(
                label=label,
                used_by=", ".join(judge["used_by"]),
                timesteps=list(by_t),
                accuracy=list(by_t.values()),
                intervals=[row[t]["ci95"] for t in by_t] if pairs else None,
                ceiling=acc["oracle_ceiling"],
            )
        )
    ceilings = [j["accuracy"]["oracle_ceiling"] for j in judges]
    ceiling_decimals = column_decimals([{"mean": c, "ci95": None} for c in ceilings if c])
    legend = [["label", "judge", "used by", "run folder", "validation pairs", "oracle ceiling"]]
    for label, judge, ceiling in zip(labels, judges, ceilings, strict=True):
        acc = judge["accuracy"]
        shown = "" if ceiling is None else number(ceiling, ceiling_decimals)
        legend.append(
            [
                label,
                judge["path"],
                ", ".join(judge["used_by"]),
                acc["run"],
                str(acc["pairs"]),
                shown,
            ]
        )
    missing = {"mean": math.nan, "ci95": None}
    columns = [[row.get(t, missing) for row in entries] for t in timesteps]
    decimals = [column_decimals([e for e in col if e is not missing]) for col in columns]
    table = [["judge", *(f"t = {t}" for t in timesteps)]]
    for i, label in enumerate(labels):
        cells = [
            "" if col[i] is missing else cell(col[i], "mean", d)
            for col, d in zip(columns, decimals, strict=True)
        ]
        table.append([label, *cells])
    text = (
        "Pairwise accuracy of each judge on its validation pairs (ties left out) at each "
        "timestep, measured by spo train-preference-model (its eval.json), with 95% Wilson "
        "intervals over the pairs; chance is 0.5."
    )
    if any(c is not None for c in ceilings):
        text += (
            " The oracle ceiling (toy world) is how often the true reward agrees with the "
            "annotators' labels: no judge of these labels can do better on average."
        )
    blocks: list[Block] = [
        Para(text),
        Plot("judge_accuracy", "judge accuracy by timestep"),
        TableBlock(table),
        TableBlock(legend, numeric=False, code=(1, 3)),
    ]
    return blocks, judge_accuracy(curves)


def _provenance(provenance: dict, labels: dict[str, str]) -> list[Block]:
    """When and with what the comparison ran, the weights it compared and the configs."""
    facts = [
        ["", "comparison run"],
        ["date (UTC)", provenance["date"]],
        ["git commit", provenance["git_commit"] or "not a git checkout"],
        ["device", provenance["device"]],
        *([name, v] for name, v in provenance["packages"].items()),
    ]
    weights = [["model", "part", "path", "weights files", "bytes", "sha256"]]
    for row in provenance["weights"]:
        digest = row["digest"]
        revision = row.get("revision")
        weights.append(
            [
                labels[row["model"]],
                row["part"],
                row["source"] + (f" (hub revision {revision})" if revision else ""),
                str(len(digest["files"])) if digest else "",
                f"{digest['bytes']:,}" if digest else "",
                digest["sha256"] if digest else "not on this machine: not hashed",
            ]
        )
    blocks: list[Block] = [
        Heading("Provenance"),
        TableBlock(facts, numeric=False),
        Para(
            "Weights: the sha256 of a weights file (as sha256sum prints it); of a folder, the "
            "sha256 of its weights files' sha256sum lines (.safetensors, .bin, .ckpt, .pt, "
            ".pth; sorted by path). Every file's hash is in provenance.json."
        ),
        TableBlock(weights, numeric=False, code=(2, 5)),
        Code("comparison config (config.yaml)", provenance["config"]),
    ]
    for model, text in provenance["run_configs"].items():
        named = model if labels[model] == model else f"{labels[model]} ({model})"
        blocks.append(Code(f"training config of {named} (its run's config.yaml)", text))
    return blocks


def _panels(titles: list[str], entries: list[list[dict]], key: str) -> list[Panel]:
    """A dot-plot panel per column (scorer) of `entries[row][column]`."""
    columns = zip(*entries, strict=True)
    return [
        Panel(title, [e[key] for e in col], [e["ci95"] for e in col])
        for title, col in zip(titles, columns, strict=True)
    ]


def write_report(cfg: CompareConfig, prompts: list[str], results: dict, provenance: dict) -> None:
    """report.md, report.html and the plots as PNG files in cfg.out."""
    out = Path(cfg.out)
    models = [m.name for m in cfg.models]
    labels = model_labels(models)
    label_of = dict(zip(models, labels, strict=True))
    specs = list(results["settings"]["scorers"])
    s_labels = scorer_labels(specs)
    base = cfg.base_model
    others = [m for m in models if m != base]
    figures: dict[str, Figure] = {}
    editing = results["settings"].get("task") == "edit"

    blocks: list[Block] = [_intro(cfg, results, label_of[base], len(models))]
    blocks += _legend(cfg, labels, specs, s_labels, provenance["training"])

    means = [[results["scores"][m][s] for s in specs] for m in models]
    figures["means"] = interval_dots(
        labels,
        _panels(s_labels, means, "mean"),
        xlabel="mean score, 95% interval",
    )
    blocks += [
        Heading("Mean scores"),
        TableBlock(interval_columns(labels, s_labels, means)),
        Plot("means", "mean scores with 95% intervals"),
    ]

    if others:
        other_labels = [label_of[m] for m in others]
        diffs = [[results["paired_differences"][s][m] for s in specs] for m in others]
        figures["differences"] = interval_dots(
            other_labels,
            _panels(s_labels, diffs, "mean"),
            xlabel=f"model minus {label_of[base]}, 95% interval",
            reference=0.0,
            reference_label="no difference",
        )
        wins = [[results["win_rates"][s][f"{m} vs {base}"] for s in specs] for m in others]
        figures["win_rates"] = interval_dots(
            other_labels,
            _panels(s_labels, wins, "rate"),
            xlabel=f"win rate against {label_of[base]}",
            reference=0.5,
            reference_label="0.5: as often better as worse",
            limits=(0.0, 1.0),
        )
        blocks += [
            Heading(f"Paired differences: model minus {label_of[base]}"),
            Para(
                f"Mean of (model - {label_of[base]}) over the same (prompt, seed): an interval "
                "that excludes 0 is a difference the prompts support."
            ),
            TableBlock(interval_columns(other_labels, s_labels, diffs, signed=True)),
            Plot("differences", "paired differences against the base"),
            Heading("Win rates"),
            Para(
                f"Win rate of each model against {label_of[base]}, on a 0 to 1 axis (dashed: 0.5, "
                "as often better as worse); below, every pair."
            ),
            Plot("win_rates", "win rates against the base"),
        ]
        for spec, s_label in zip(specs, s_labels, strict=True):
            table = win_table(results, models, labels, spec)
            blocks += [Heading(f"Win rates: {s_label}", 3), TableBlock(table)]

    for cat, by_model in results.get("by_category", {}).items():
        rows = [[by_model[m][s] for s in specs] for m in models]
        table = interval_columns(labels, s_labels, rows)
        blocks += [Heading(f"Category: {cat}"), TableBlock(table)]

    training_blocks, training_figures = _training(provenance["training"], label_of)
    blocks += training_blocks
    figures |= training_figures

    shown = prompts[: cfg.grid_prompts]
    per = results["settings"]["images_per_prompt"]
    if editing:
        blocks += [
            Heading("Edits"),
            Para(
                f"The first {len(shown)} sources: the source, then a row per model, edit j made "
                "from the same seed for every model."
            ),
            Samples(out, shown, [SOURCE, *models], ["source", *labels], per),
        ]
    else:
        blocks += [
            Heading("Samples"),
            Para(
                f"Every image of the first {len(shown)} prompts: a row per model, image j made "
                "from the same seed for every model."
            ),
            Samples(out, shown, models, labels, per),
        ]
    blocks += _provenance(provenance, label_of)

    for name in PLOTS:  # a plot an earlier report drew but this one has no data for goes
        if name in figures:
            atomic_write_bytes(out / f"{name}.png", figures[name].png)
        else:
            (out / f"{name}.png").unlink(missing_ok=True)
    title = "Comparison: editing (SDEdit)" if editing else "Comparison"
    markdown = f"# {title}\n\n" + "\n\n".join(b.md() for b in blocks) + "\n"
    atomic_write_bytes(out / "report.md", markdown.encode())
    atomic_write_bytes(out / "report.html", page(blocks, figures, title).encode())
