"""One module per `spo` command, named after it, each with `run(cfg) -> exit code`."""

from __future__ import annotations

import json


def report(result: dict, message: str) -> int:
    """A command's closing words: its result as JSON, then where it was written (not for a run
    that had nothing to do: it said so, and wrote nothing); exit code 0."""
    print(json.dumps(result, indent=2))
    if not result.get("already_finished"):
        print(message)
    return 0
