"""The `spo` command: one subcommand per recipe, one contract for all of them.

    spo <command> [--config FILE] [--out DIR] [--use-existing-out] [--print-config] [key=value ...]

The config is the command's dataclass defaults (its toy experiment), then the YAML file (a path,
or a shipped config by name: `toy/dpo`), then the dotted overrides, then `--out`;
`--print-config` prints it with every key's comment instead of running. An `--out` that holds
another command's run, lies inside a run folder, or is a non-empty folder no command made (unless
`--use-existing-out`) is refused. Every problem found before the work starts is printed as one
line, `spo: error: ...`, with exit code 2, and nothing is created.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from spo import __version__
from spo.config import (
    COMMAND_CONFIGS,
    TOY_CONFIGS,
    command_config,
    commented_yaml,
    shipped_configs,
)
from spo.errors import INPUT_ERRORS

EXIT_USAGE = 2  # bad config, bad input, bad command line, or a stopped run


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help, the module (in spo/commands/) that runs it, an
    override its help shows as the example, and what its `--out` names."""

    help: str
    module: str
    example: str
    out: str = "run folder"


COMMANDS: dict[str, Command] = {
    "toy-world": Command(
        "build the toy world: preference pairs, prompts and base-model sample grids",
        "spo.commands.toy_world",
        "train_pairs=100",
    ),
    "train-preference-model": Command(
        "train a step-aware preference model (SPM)",
        "spo.commands.train_preference_model",
        "max_steps=100",
    ),
    "train-dpo": Command(
        "fine-tune a diffusion model with the Diffusion-DPO baseline",
        "spo.commands.train_dpo",
        "optim.lr=5e-4",
    ),
    "train-spo": Command(
        "fine-tune a diffusion model with SPO, scored by an SPM",
        "spo.commands.train_spo",
        "sampler.k=2",
    ),
    "compare": Command(
        "generate with several models, score them, and write a report",
        "spo.commands.compare",
        "images_per_prompt=1",
    ),
    "demo": Command(
        "the whole story end to end on the toy world, on CPU",
        "spo.commands.demo",
        "budget_minutes=1",
    ),
    "benchmark": Command(
        "time SPO's and DPO's pieces on random models of a real architecture",
        "spo.commands.benchmark",
        "repeats=5",
    ),
    "prepare-prompts": Command(
        "draw unique training prompts from a dataset's captions (the SPO prompt file)",
        "spo.commands.prepare_prompts",
        "num_prompts=500",
        out="the prompt file to write",
    ),
}


def run_command(name: str, cfg: Any) -> int:
    """Import the command's module (torch and friends: only once its config is known good)
    and run it."""
    return importlib.import_module(COMMANDS[name].module).run(cfg)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _error(message: object) -> int:
    print(f"spo: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other `spo` error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"spo: error: {_one_line(message)} (see '{self.prog} --help')\n")


def config_keys(name: str) -> list[str]:
    """The top-level config keys of a command; a section (nested keys) as `section.*`."""
    defaults = COMMAND_CONFIGS[name]()
    return [
        f.name + (".*" if dataclasses.is_dataclass(getattr(defaults, f.name)) else "")
        for f in dataclasses.fields(defaults)
    ]


def _epilog(name: str) -> str:
    """The subcommand help's tail: its config keys and where to see their values."""
    head = f"config keys (`spo {name} --print-config` shows each with its value and comment):"
    keys = ", ".join(config_keys(name))
    return (
        textwrap.fill(head, 78)
        + "\n"
        + textwrap.fill(keys, 78, initial_indent="  ", subsequent_indent="  ")
    )


def _config_help(name: str) -> str:
    """The --config help: the shipped configs of the command, and what no config means."""
    names = shipped_configs(name)
    if not names:
        return "a YAML file (default: the built-in defaults)"
    return (
        f"a YAML file, or a shipped config by name: {', '.join(names)} (default: the built-in "
        f"defaults, which are {TOY_CONFIGS[name]})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="spo",
        description="Step-aware preference optimisation (SPO) for diffusion models.",
        epilog="Every command: spo <command> [--config FILE] [--out DIR] [--print-config] "
        "[key=value ...]; `spo <command> --help` lists its config keys.",
    )
    parser.add_argument("--version", action="version", version=f"spo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_ArgumentParser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", metavar="FILE", default=None, help=_config_help(name))
        metavar = "DIR" if command.out == "run folder" else "FILE"
        p.add_argument(
            "--out", metavar=metavar, default=None, help=f"{command.out} (overrides `out`)"
        )
        if command.out == "run folder":
            p.add_argument(
                "--use-existing-out",
                action="store_true",
                help="write into an --out folder that exists, is not empty and was not made by "
                "a spo command (a run folder of another command is refused all the same)",
            )
        p.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved config (defaults, then --config, then key=value, then "
            "--out) as YAML with each key's comment, and exit without running anything",
        )
        if name == "demo":
            p.add_argument(
                "--quick", action="store_true", help="a smoke run of every stage (minutes)"
            )
        if name == "benchmark":
            p.add_argument(
                "--preset",
                help="tiny | sd15 | sdxl | tiny_flow | sd35m | flux (the config key `preset`)",
            )
            p.add_argument("--baseline", help="none | released (the config key `baseline`)")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help=f"dotted config overrides, applied after --config (e.g. {command.example})",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spo` console script; returns the process exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE

    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # argparse fills a '*' positional only once: `a=1 --out X b=2` leaves `b=2` over. Keep it.
    args.overrides += [a for a in extra if not a.startswith("-")]
    if getattr(args, "quick", False):
        args.overrides.append("quick=true")
    for key in ("preset", "baseline"):
        if getattr(args, key, None) is not None:
            args.overrides.append(f"{key}={getattr(args, key)}")
    extra = [a for a in extra if a.startswith("-")]
    if extra:
        hint = f"(see 'spo {args.command} --help')"
        return _error(f"unrecognized arguments: {' '.join(extra)} {hint}")

    try:
        cfg = command_config(args.command, args.config, args.overrides, args.out)
        if args.print_config:
            doc = (inspect.getdoc(type(cfg)) or "").split("\n")[0]
            print(f"# {doc}\n# resolved: defaults <- --config <- key=value <- --out\n")
            print(commented_yaml(cfg), end="")
            return 0
        from spo.runs import check_out

        check_out(args.command, cfg.out, existing_ok=getattr(args, "use_existing_out", False))
        return run_command(args.command, cfg)
    except INPUT_ERRORS as e:
        return _error(e)
    except KeyboardInterrupt:
        print("spo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
