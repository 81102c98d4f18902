"""Group preferences: the pairs (or prompts) of selected annotators.

Why its own module: the judge, DPO and SPO trainers select alike, and each must know before any
model loads how many rows a selection keeps (an id that selects nothing is a typo, not a run).
The count reads the annotator column alone (`spo.data.load_columns`: one parquet column, not
the images), so it is cheap for a streamed hub dataset too; the rows themselves are then kept
by a predicate on that column, which works the same on a table read whole and on a stream.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo.config.schemas import AnnotatorsConfig
from spo.data import load_columns
from spo.errors import ConfigError
from spo.runs import made_by
from spo.sources import read_text


def selected_ids(sel: AnnotatorsConfig) -> frozenset[str] | None:
    """The ids a selection keeps (as text), None when it keeps every row."""
    if sel.ids is not None:
        return frozenset(str(i).strip() for i in sel.ids)
    if sel.file is None:
        return None
    if not Path(sel.file).is_file():
        raise ConfigError(f"annotator id file not found: {sel.file}")
    ids = frozenset(line.strip() for line in read_text(sel.file, "annotator id file").splitlines())
    ids -= {""}
    if not ids:
        raise ConfigError(f"annotator id file {sel.file}: no ids")
    return ids


def keeps(sel: AnnotatorsConfig) -> Callable[[dict[str, Any]], bool] | None:
    """The row predicate of a selection (None: every row): the row's annotator, as text, is
    one of the ids."""
    ids = selected_ids(sel)
    if ids is None:
        return None
    column = sel.column
    return lambda row: _text(row.get(column)) in ids


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


@dataclass(frozen=True)
class Selection:
    """What a selection keeps of one split: the row mask's count, the split's size and the
    number of distinct annotators it holds."""

    kept: int
    total: int
    annotators: int

    def line(self, sel: AnnotatorsConfig, what: str) -> str:
        return (
            f"{what}: {self.kept} of {self.total} pairs kept by {sel.column} in "
            f"{_describe(sel)} ({self.annotators} annotators in the split)"
        )


def _describe(sel: AnnotatorsConfig) -> str:
    if sel.file is not None:
        return f"the ids of {sel.file}"
    ids = [str(i) for i in sel.ids or []]
    shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} ids)" if len(ids) > 5 else "")
    return f"[{shown}]"


def count(sel: AnnotatorsConfig, values: list, source: str, what: str = "pairs") -> Selection:
    """Count what `sel` keeps of a split whose annotator column holds `values`; nothing kept is
    one line naming the ids and what the split holds."""
    ids = selected_ids(sel)
    texts = [_text(v) for v in values]
    kept = len(texts) if ids is None else sum(t in ids for t in texts)
    result = Selection(kept, len(texts), len(set(texts)))
    if kept == 0:
        sample = ", ".join(sorted(set(texts))[:5])
        raise ConfigError(
            f"{source}: {sel.column} in {_describe(sel)} selects none of its {len(texts)} "
            f"{what} (its {sel.column} values include {sample or 'nothing'})"
        )
    return result


def check_selection(
    sel: AnnotatorsConfig, source: str, split: str, what: str = "pairs"
) -> Selection | None:
    """Before any model loads: what `sel` keeps of one split, its annotator column read alone
    (a missing column, an id file that is not there or ids that select nothing: one line);
    None when the selection keeps every row."""
    if not sel.active:
        return None
    ids = selected_ids(sel)  # a missing id file fails before the data is read
    assert ids is not None
    values = load_columns(source, [sel.column], split, made_by(source), what)[sel.column]
    return count(sel, values, source, what)


def announce(selection: Selection | None, sel: AnnotatorsConfig, what: str) -> None:
    """Print what a selection keeps, once (the first process of a launch)."""
    if selection is not None and os.environ.get("RANK", "0") == "0":
        print(selection.line(sel, what), flush=True)


def selected_prompts(sel: AnnotatorsConfig, source: str, column: str, split: str) -> list[str]:
    """The prompts of the selected annotators' pairs, each once, in their first pair's order
    (SPO's prompts for a group): `column` and the annotator column of a pair table (parquet,
    a saved or hub dataset); the count printed first."""
    if Path(source).suffix in (".txt", ".json", ".jsonl"):
        raise ConfigError(
            f"prompts {source}: an annotator selection needs a table of pairs (parquet or a "
            f"dataset) with a {sel.column!r} column, not a prompt file"
        )
    rows = load_columns(source, [column, sel.column], split, made_by(source), "prompts")
    announce(count(sel, rows[sel.column], source), sel, f"prompts {source}")
    ids = selected_ids(sel)
    chosen = (p for p, a in zip(rows[column], rows[sel.column], strict=True) if _text(a) in ids)
    prompts = list(dict.fromkeys(str(p).strip() for p in chosen if p and str(p).strip()))
    if not prompts:
        raise ConfigError(f"{source}: the selected annotators' pairs have no prompts")
    return prompts
