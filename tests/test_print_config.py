"""`--print-config`: comments read from the schema source, and YAML that loads back equal."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import pytest

from spo.config import COMMAND_CONFIGS, commented_yaml, load_config, shipped_configs
from spo.config.commented import Comment, field_comments
from spo.config.shipped import CONFIG_COMMANDS, resolve_config


@dataclass
class Inner:
    """An inner section."""

    rate: float = 0.5  # the rate


@dataclass
class Commented:
    """A schema with every kind of comment."""

    plain: int = 1
    # above, line one
    # above, line two
    both: str = "no"  # and at the end
    inner: Inner = field(default_factory=Inner)
    named: Inner = field(default_factory=Inner)  # a named section
    items: list[str] = field(
        default_factory=lambda: ["yes", "a b"]
    )  # a comment after a field over several lines
    # not a field's comment: a blank line follows

    maybe: str | None = None


def test_field_comments_reads_above_and_end_comments():
    comments = field_comments(Commented)
    assert comments["plain"] == Comment()
    assert comments["both"] == Comment(("above, line one", "above, line two"), "and at the end")
    assert comments["items"] == Comment((), "a comment after a field over several lines")
    assert comments["maybe"] == Comment()
    assert field_comments(Inner) == {"rate": Comment((), "the rate")}


def test_commented_yaml_layout_and_round_trip(tmp_path):
    text = commented_yaml(Commented(maybe="off"))
    assert text == (
        "plain: 1\n"
        "# above, line one\n"
        "# above, line two\n"
        "both: 'no'  # and at the end\n"
        "inner:  # An inner section.\n"
        "  rate: 0.5  # the rate\n"
        "named:  # a named section\n"
        "  rate: 0.5  # the rate\n"
        "items: ['yes', a b]  # a comment after a field over several lines\n"
        "maybe: 'off'\n"
    )
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(Commented, tmp_path / "c.yaml") == Commented(maybe="off")


def test_without_source_the_values_still_print(monkeypatch):
    field_comments.cache_clear()

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    try:
        assert commented_yaml(Inner()) == "rate: 0.5\n"
    finally:
        field_comments.cache_clear()


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_prints_and_loads_back_equal(tmp_path, name):
    schema = COMMAND_CONFIGS[CONFIG_COMMANDS[name.split("/")[1]]]
    cfg = load_config(schema, resolve_config(name, ""))
    (tmp_path / "printed.yaml").write_text(commented_yaml(cfg))
    assert load_config(schema, tmp_path / "printed.yaml") == cfg


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_every_command_default_prints_with_comments(tmp_path, command):
    schema = COMMAND_CONFIGS[command]
    text = commented_yaml(schema())
    assert text.count("# ") >= 3  # the schema's comments came along
    (tmp_path / "printed.yaml").write_text(text)
    assert load_config(schema, tmp_path / "printed.yaml") == schema()
