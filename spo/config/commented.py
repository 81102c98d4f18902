"""`spo <command> --print-config`: a resolved config as YAML, each key with its comment.

Why: the comments next to each dataclass field in spo/config/schemas.py are the documentation
of every key. Printing them with the values shows which keys a command has and what a run will
do, without reading the source; the output loads back with `--config`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
from typing import Any

import yaml

__all__ = ["commented_yaml", "field_comments"]

_W = 1 << 30  # YAML line width: never fold a value


@dataclasses.dataclass(frozen=True)
class Comment:
    """A field's comment in its class source: the `#` lines right above it, and the one at
    the end of its line(s)."""

    above: tuple[str, ...] = ()
    end: str = ""


def _text(comment: str) -> str:
    return comment.strip().removeprefix("#").strip()


@functools.cache
def field_comments(cls: type) -> dict[str, Comment]:
    """Field name -> its Comment, read from the source of the dataclass `cls` and of the
    dataclasses it extends (a field's own class wins)."""
    comments: dict[str, Comment] = {}
    for base in reversed(cls.__mro__):
        if base is not cls and dataclasses.is_dataclass(base):
            comments |= field_comments(base)
    return comments | _own_comments(cls)


def _own_comments(cls: type) -> dict[str, Comment]:
    """The comments of the fields defined in the source of `cls` itself."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped (e.g. a frozen app): values only
        return {}
    lines = source.splitlines()
    ends = {
        tok.start[0]: _text(tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][: tok.start[1]].strip()
    }
    comments = {}
    (body,) = ast.parse(source).body
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        i = node.lineno - 2  # the line above, 0-based
        while i >= 0 and lines[i].lstrip().startswith("#"):
            above.insert(0, _text(lines[i]))
            i -= 1
        end = [
            ends[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in ends
        ]
        comments[node.target.id] = Comment(tuple(above), " ".join(end))
    return comments


def _lines(cfg: Any, indent: str) -> list[str]:
    out = []
    comments = field_comments(type(cfg))
    plain = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        value, comment = getattr(cfg, f.name), comments.get(f.name, Comment())
        out += [f"{indent}# {line}".rstrip() for line in comment.above]
        end = comment.end
        if dataclasses.is_dataclass(value):
            if not (end or comment.above):  # a section: say what it is
                end = (inspect.getdoc(type(value)) or "").split("\n")[0]
            out.append(f"{indent}{f.name}:" + (f"  # {end}" if end else ""))
            out += _lines(value, indent + "  ")
            continue
        tail = f"  # {end}" if end else ""
        if isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value):
            items = yaml.safe_dump(
                plain[f.name], default_flow_style=None, sort_keys=False, width=_W
            )
            out.append(f"{indent}{f.name}:{tail}")
            out += [f"{indent}  {line}" for line in items.splitlines()]
        else:  # a scalar or a list of scalars, on one line: dump [value], drop the brackets
            text = yaml.safe_dump([plain[f.name]], default_flow_style=True, width=_W).strip()
            out.append(f"{indent}{f.name}: {text[1:-1]}{tail}")
    return out


def commented_yaml(cfg: Any) -> str:
    """The YAML of the config dataclass instance `cfg`, every key with its source comment."""
    return "\n".join(_lines(cfg, "")) + "\n"
