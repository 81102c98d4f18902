"""The `spo` command: one subcommand per recipe, one contract for all of them.

    spo <command> [--config FILE] [--out DIR] [key=value ...]

The config is the command's dataclass defaults, then the YAML file, then the dotted overrides,
then `--out`. Every problem found before the work starts is printed as one line,
`spo: error: ...`, with exit code 2, and nothing is created.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from spo import __version__
from spo.config import (
    COMMAND_CONFIGS,
    CompareConfig,
    ConfigError,
    DemoConfig,
    DPOTrainConfig,
    SPMTrainConfig,
    SPOTrainConfig,
    ToyWorldConfig,
    load_config,
)
from spo.runs import prepare_run_dir

EXIT_USAGE = 2  # bad config, bad input, bad command line, or not implemented


def _run_toy_world(cfg: ToyWorldConfig) -> int:
    run = prepare_run_dir(cfg.out, cfg)
    from spo.toy.world import build_world  # heavy (torch); only once the config is known good

    build_world(cfg, run)
    return 0


def _run_train_spm(cfg: SPMTrainConfig) -> int:
    from preference_model.train import train_preference_model  # heavy: torch, diffusers

    result = train_preference_model(cfg)
    print(json.dumps(result, indent=2))
    print(f"SPM written to {cfg.out}/final (evaluation: {cfg.out}/eval.json)")
    return 0


def _run_train_dpo(cfg: DPOTrainConfig) -> int:
    from spo.dpo import train_dpo  # heavy: torch, diffusers, peft

    summary = train_dpo(cfg)
    print(json.dumps(summary, indent=2))
    print(f"Diffusion-DPO result written to {cfg.out}/final")
    return 0


def _run_train_spo(cfg: SPOTrainConfig) -> int:
    from spo.spo import train_spo  # heavy: torch, diffusers, peft

    summary = train_spo(cfg)
    print(json.dumps(summary, indent=2))
    print(f"SPO result written to {cfg.out}/final")
    return 0


def _run_compare(cfg: CompareConfig) -> int:
    from spo.evaluation.compare import run_compare  # heavy: torch, diffusers
    from spo.evaluation.stats import format_ci

    results = run_compare(cfg)
    for model, by_scorer in results["scores"].items():
        cells = ", ".join(f"{s} {format_ci(v)}" for s, v in by_scorer.items())
        print(f"{model}: {cells}")
    print(f"report: {cfg.out}/report.html (and report.md, results.json)")
    return 0


def _run_demo(cfg: DemoConfig) -> int:
    from spo.demo import run_demo  # heavy: torch, diffusers

    report = run_demo(cfg)
    table = report["headline"]
    print("\n| " + " | ".join(table[0]) + " |\n|" + " --- |" * len(table[0]))
    for row in table[1:]:
        print("| " + " | ".join(row) + " |")
    seconds = ", ".join(
        f"{s} {v['seconds']} s" + (" (done before)" if v["skipped"] else "")
        for s, v in report["stages"].items()
    )
    print(f"\nstages: {seconds}")
    print(
        f"report: {cfg.out}/compare/report.html; reward vs compute: "
        f"{cfg.out}/compare/reward_vs_compute.png"
    )
    return 0


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help, and either a runner or the issue that will add it."""

    help: str
    run: Callable[[Any], int] | None = None
    issue: int | None = None


COMMANDS: dict[str, Command] = {
    "toy-world": Command(
        "build the toy world: preference pairs, prompts and base-model sample grids",
        run=_run_toy_world,
    ),
    "train-preference-model": Command(
        "train a step-aware preference model (SPM)", run=_run_train_spm
    ),
    "train-dpo": Command(
        "fine-tune a diffusion model with the Diffusion-DPO baseline", run=_run_train_dpo
    ),
    "train-spo": Command(
        "fine-tune a diffusion model with SPO, scored by an SPM", run=_run_train_spo
    ),
    "compare": Command(
        "generate with several models, score them, and write a report", run=_run_compare
    ),
    "demo": Command("the whole story end to end on the toy world, on CPU", run=_run_demo),
}


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input or a stopped run: printed as one line, exit code 2. Imported
    lazily so that `spo --help` does not pay for torch."""
    errors: list[type[Exception]] = []
    if "preference_model.model" in sys.modules:
        errors.append(sys.modules["preference_model.model"].CheckpointError)
    if "spo.training" in sys.modules:
        errors.append(sys.modules["spo.training"].TrainingError)
    return tuple(errors)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _error(message: object) -> int:
    print(f"spo: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other `spo` error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"spo: error: {_one_line(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="spo",
        description="Step-aware preference optimisation (SPO) for diffusion models.",
        epilog="Every command: spo <command> [--config FILE] [--out DIR] [key=value ...]",
    )
    parser.add_argument("--version", action="version", version=f"spo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_ArgumentParser)
    for name, command in COMMANDS.items():
        help_text = command.help
        if command.run is None:
            help_text += f" (not implemented yet, issue #{command.issue})"
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config",
            metavar="FILE",
            default=None,
            help="YAML config; keys not in it keep their defaults (default: built-in defaults)",
        )
        p.add_argument("--out", metavar="DIR", default=None, help="run folder (overrides `out`)")
        if name == "demo":
            p.add_argument(
                "--quick", action="store_true", help="a smoke run of every stage (minutes)"
            )
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted config overrides, applied after --config (e.g. train_pairs=100)",
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
    command = COMMANDS[args.command]
    if command.run is None:
        # Reserved: refuse clearly rather than pretend (and ignore whatever arguments came).
        print(
            f"spo: '{args.command}' is not implemented yet in this version "
            f"(see issue #{command.issue})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # argparse fills a '*' positional only once: `a=1 --out X b=2` leaves `b=2` over. Keep it.
    args.overrides += [a for a in extra if not a.startswith("-")]
    if getattr(args, "quick", False):
        args.overrides.append("quick=true")
    extra = [a for a in extra if a.startswith("-")]
    if extra:
        hint = f"(see 'spo {args.command} --help')"
        return _error(f"unrecognized arguments: {' '.join(extra)} {hint}")

    try:
        cfg = load_config(COMMAND_CONFIGS[args.command], args.config, args.overrides, args.out)
        validate = getattr(cfg, "validate", None)
        if callable(validate):
            validate()
        return command.run(cfg)
    except (ConfigError, FileNotFoundError, *_input_errors()) as e:
        return _error(e)
    except KeyboardInterrupt:
        print("spo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
