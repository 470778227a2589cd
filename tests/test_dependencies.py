"""settings.ini is the one list of dependencies: the lock satisfies it, and its runtime part alone runs the library."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from configparser import ConfigParser
from importlib.metadata import PackageNotFoundError, distribution, distributions
from pathlib import Path

from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def _declared() -> tuple[list[str], dict[str, list[str]]]:
    config = ConfigParser(delimiters=["="])
    config.read(ROOT / "settings.ini", encoding="utf-8")
    settings = config["DEFAULT"]
    extras = {name: settings[f"extras_{name}"].split() for name in settings["locked_extras"].split()}
    return settings["requirements"].split(), extras


def _locked(path) -> dict[str, Version]:
    pins = (line.split("==") for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {canonicalize_name(name): Version(version) for name, version in pins}


def test_every_declared_requirement_is_locked_at_a_version_it_allows():
    runtime, extras = _declared()
    airflow = [line.split("#")[0].strip() for line in (ROOT / "requirements-airflow.in").read_text().splitlines()]
    for lock, wanted in [("requirements.lock", runtime + sum(extras.values(), [])),
                         ("requirements-airflow.lock", [line for line in airflow if line])]:
        locked = _locked(ROOT / lock)
        for text in wanted:
            requirement = Requirement(text)
            version = locked.get(canonicalize_name(requirement.name))
            assert version is not None and requirement.specifier.contains(version, prereleases=True), (lock, text, version)
    assert {"jupyterlab", "papermill", "nbdev", "ploomber", "scikit-learn", "mlflow", "pandas",
            "pytest"} <= set(_locked(ROOT / "requirements.lock"))


def _closure(requirements: list[str]) -> set[str]:
    "The installed distributions `requirements` need, following each one's own requirements (markers evaluated)."
    followed, pending = set(), [(Requirement(text), "") for text in requirements]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional dependency this environment does not have: nothing of it can be imported either
        for chosen in {"", *requirement.extras}:
            if (name, chosen) not in followed:
                followed.add((name, chosen))
                pending += [(Requirement(text), chosen) for text in dist.requires or []]
    needed = {name for name, _ in followed}
    return needed


# Imports every nbs_lib module and asks every command for its help with only the runtime closure on the path;
# then the feature store and the team server must name their extras instead of failing with an ImportError.
_ONLY_RUNTIME = """
import contextlib, importlib, importlib.util, io, json, pkgutil, sys

for extra_only in ["feast", "psycopg", "flask_wtf", "pytest", "jupyterlab"]:
    assert importlib.util.find_spec(extra_only) is None, extra_only
missing = [name for name in json.loads(sys.argv[1]) if importlib.util.find_spec(name) is None]
assert not missing, f"nbs_lib imports {missing}, which no runtime requirement installs"
import nbs_lib
for module in pkgutil.walk_packages(nbs_lib.__path__, "nbs_lib."):
    importlib.import_module(module.name)

import click

from nbs_lib.cli import main, nbs

commands = [[]]
for name in nbs.list_commands(None):
    found = nbs.get_command(None, name)
    commands += [[name, sub] for sub in found.commands] if isinstance(found, click.Group) else [[name]]
for command in commands:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*command, "--help"])
        except SystemExit as done:
            assert done.code == 0, command
print(len(commands), "commands")

from nbs_lib.core.errors import MissingExtra
from nbs_lib.ml.feature_store import open_feature_store
from nbs_lib.team.server import start_server

for call, extra in [(lambda: open_feature_store("."), "feature_store"),
                    (lambda: start_server(__import__("pathlib").Path("."), admin_password="a-long-enough-password-Z9"), "team")]:
    try:
        call()
    except MissingExtra as missing:
        assert missing.extra == extra, missing
        print(missing)
    else:
        raise AssertionError(f"expected the {extra} extra to be named")
"""


def _imported_by_the_library() -> list[str]:
    "Top-level names of the modules nbs_lib imports by statement, at import time or in a function (extras: by name)."
    names = set()
    for path in (ROOT / "nbs_lib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module.partition(".")[0])
    return sorted(names - {"nbs_lib", "__future__"})


def _site_of(needed: set[str], site: Path) -> Path:
    "A folder holding (as links) only the top-level packages, modules and metadata of the distributions `needed`."
    site.mkdir()
    for dist in distributions():
        if canonicalize_name(dist.metadata["Name"]) in needed:
            for top in {file.parts[0] for file in dist.files or [] if file.parts[0] != ".."}:
                source, link = Path(dist.locate_file(top)), site / top
                if source.exists() and not link.exists():
                    link.symlink_to(source)
    return site


def test_the_runtime_requirements_alone_import_the_library_and_run_the_cli(tmp_path):
    runtime, extras = _declared()
    needed = _closure(runtime)
    assert {"feast", "psycopg", "flask-wtf", "pytest", "jupyterlab"} <= _closure(sum(extras.values(), [])) - needed
    # python -S: no site-packages, only the runtime closure's packages (and nbs_lib from the checkout)
    site = _site_of(needed, tmp_path / "site-packages")
    imported = _imported_by_the_library()
    assert {"apscheduler", "mlflow", "nbdev"} <= set(imported)
    done = subprocess.run([sys.executable, "-S", "-c", _ONLY_RUNTIME, json.dumps(imported)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the feature store needs feast, which is not installed" in done.stdout
    assert "the team server needs flask_wtf, which is not installed" in done.stdout
    assert "pip install 'nbs_lib[team]'" in done.stdout
