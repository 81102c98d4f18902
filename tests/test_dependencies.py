"""pyproject.toml's dependencies: every third-party module that spo/ and preference_model/ import
is declared, nothing declared goes unused, and every floor is met by the installed versions (a
floor above what the tests run with is a floor nobody tested; one below needs a reason in
pyproject.toml)."""

from __future__ import annotations

import ast
import functools
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).parents[1]
FIRST_PARTY = {"spo", "preference_model"}
# Declared but never imported by our code, and why.
USED_WITHOUT_IMPORT = {"tensorboard": "accelerate loads it as the tracker (tracker=tensorboard)"}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (`Pillow` == `pillow`, `a_b` == `a-b`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared(extras: bool) -> dict[str, Requirement]:
    """Distribution -> requirement, of the dependencies (and of the non-dev extras)."""
    reqs = [Requirement(r) for r in project()["dependencies"]]
    if extras:
        groups = project()["optional-dependencies"]
        reqs += [Requirement(r) for g, rs in groups.items() if g != "dev" for r in rs]
    return {normalize(r.name): r for r in reqs}


def imported_modules() -> dict[str, set[str]]:
    """Top-level third-party module -> the files importing it (imports in functions too)."""
    found: dict[str, set[str]] = {}
    for package in sorted(FIRST_PARTY):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names}:
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions providing it (a slow scan: once)."""
    return metadata.packages_distributions()


def distribution_of(module: str) -> str:
    """The distribution that installs `module` (PIL -> pillow); for a module not installed
    here (an optional one), its own name."""
    dists = installed_modules().get(module, [module])
    return normalize(dists[0])


def test_import_names_map_to_their_distributions():
    assert distribution_of("PIL") == "pillow"
    assert distribution_of("yaml") == "pyyaml"
    assert distribution_of("open_clip") == "open-clip-torch"
    assert distribution_of("not_installed_here") == "not-installed-here"


def test_the_import_scan_finds_the_known_imports():
    modules = imported_modules()
    assert {"torch", "diffusers", "PIL", "yaml", "pyarrow", "huggingface_hub"} <= set(modules)
    assert "spo/commands/toy_world.py" in modules["pyarrow"]
    assert not {"os", "json", "__future__", "spo"} & set(modules)


def test_every_third_party_import_is_declared():
    wanted = declared(extras=True)
    missing = {
        f"{module} ({distribution_of(module)}), imported by {sorted(files)[0]}"
        for module, files in imported_modules().items()
        if distribution_of(module) not in wanted
    }
    assert not missing, "declare in pyproject.toml: " + "; ".join(sorted(missing))


def test_every_declared_dependency_is_imported():
    used = {distribution_of(m) for m in imported_modules()}
    unused = set(declared(extras=True)) - used
    assert unused == set(USED_WITHOUT_IMPORT), unused


def test_every_dependency_has_a_floor_the_installed_version_meets():
    for name, req in declared(extras=True).items():
        assert any(s.operator == ">=" for s in req.specifier), f"{req}: no floor"
        try:
            installed = Version(metadata.version(req.name))
        except metadata.PackageNotFoundError:
            assert name not in declared(extras=False), f"{req.name} is required but not installed"
            continue  # an optional extra not installed here
        assert req.specifier.contains(installed, prereleases=True), f"{req} but {installed}"
