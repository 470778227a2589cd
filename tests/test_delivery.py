"""The CI/CD workflow committed for users: each step a make target that exists, delivery only from main."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import yaml
from conftest import ROOT


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def test_workflow_runs_make_targets_and_delivers_only_from_main():
    workflow = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    jobs = workflow["jobs"]
    steps = {name: [s["run"] for s in job["steps"] if "run" in s] for name, job in jobs.items()}
    assert steps == {"change": ["make check-change"], "deliver": ["make deliver"]}
    assert {"check-change", "deliver", "cd", "sample", "test"} <= make_targets()
    assert jobs["deliver"]["needs"] == "change"
    assert jobs["deliver"]["if"] == "github.ref == 'refs/heads/main' && github.event_name == 'push'"
    assert "if" not in jobs["change"], "every change is checked"
    # `make cd` is the same steps, in the same order
    dry = subprocess.run(["make", "-n", "cd"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    order = [dry.index(step) for step in ["bin/pytest", "scripts/sample_data.py", "bin/nbs run\n"]]
    assert order == sorted(order), dry


def test_sample_keeps_the_class_balance(tmp_path):
    out = tmp_path / "sample.csv"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/sample_data.py"), str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    sample = pd.read_csv(out)
    assert 145 <= len(sample) <= 155
    assert abs(sample["target"].mean() - 357 / 569) < 0.02
