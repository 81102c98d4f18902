"""Slow end-to-end tests run only with SPO_SLOW=1; CI runs the short versions."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SPO_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: set SPO_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
