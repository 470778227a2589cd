"""`nbs reproduce`: a registered version rebuilt from its recorded commit, parameters and data, on real builds."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import commit, copy_build, copy_project, run_nbs, runs_of, store, trim_pipeline
from sklearn.datasets import load_breast_cancer

from nbs_lib.core.lineage import file_digest

URI = "models:/nbs-classifier/1"
pytestmark = pytest.mark.build


@pytest.fixture(scope="module")
def build_on_a_csv(tmp_path_factory):
    """A project built once on a CSV data file, data.csv, next to pipeline.yaml (not committed). Its pipeline is
    the 7-task chain from data to a registered version: what reproduce rebuilds does not depend on the task count."""
    root = copy_project(tmp_path_factory.mktemp("reproduce") / "project")
    trim_pipeline(root)
    commit(root, "the chain from data to a registered version")
    load_breast_cancer(as_frame=True).frame.to_csv(root / "data.csv", index=False)
    done = run_nbs("run", "-p", "data_path=data.csv", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


@pytest.fixture
def built(build_on_a_csv, tmp_path):
    "A copy of that build, for one test to change."
    return copy_build(build_on_a_csv, tmp_path / "project")


def worktrees(root: Path) -> list[str]:
    listed = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=root, capture_output=True, text=True)
    return [line for line in listed.stdout.splitlines() if line.startswith("worktree ")]


def test_changed_data_file_is_refused_before_anything_runs(built):
    original = (built / "data.csv").read_bytes()
    lines = original.decode().splitlines()
    lines[5] = "0" + lines[5]  # one value of one row, as an in-place edit would
    (built / "data.csv").write_text("\n".join(lines) + "\n")
    try:
        done = run_nbs("reproduce", URI, cwd=built)
        status = run_nbs("status", "-p", "data_path=data.csv", cwd=built).stdout.splitlines()
    finally:
        (built / "data.csv").write_bytes(original)
    # Ploomber alone would call ingest up to date: the path did not change, the content did
    assert " ".join(status[0].split()) == "ingest would run its data file changed", status
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"cannot reproduce {URI}: the data file" in done.stderr and "changed since its build" in done.stderr
    assert "--data PATH to a copy with SHA-256" in done.stderr
    assert runs_of(built, "nbs-reproduce") == [] and len(worktrees(built)) == 1
    ingest = next(r for r in runs_of(built) if r.data.tags.get("nbs.task") == "ingest")
    assert ingest.data.tags["nbs.data.file_sha256"] == file_digest(built / "data.csv")
    assert ingest.data.params == {"data_path": "data.csv", "target": "target"}


def test_unchanged_build_is_reproduced_identically_from_a_moved_data_file(built, tmp_path):
    moved = tmp_path / "moved.csv"
    shutil.move(built / "data.csv", moved)
    gone = run_nbs("reproduce", URI, cwd=built)
    assert gone.returncode == 2 and "it was trained on is gone" in gone.stderr, gone.stderr

    done = run_nbs("reproduce", URI, "--data", str(moved), "--json", cwd=built, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["identical"] is True
    differing = [row for row in report["facts"] if not row["same"]]
    assert differing == [], differing
    shown = {row["what"]: row for row in report["facts"]}
    assert shown["holdout accuracy"]["recorded"] == shown["holdout accuracy"]["rebuilt"]
    assert shown["data file sha256"]["rebuilt"] is not None and shown["commit"]["rebuilt"] is not None
    assert report["predictions"] == {"rows": 114, "same_predictions": 114, "max_probability_difference": 0.0}
    assert report["parameters"]["data_path"] == str(moved) and report["parameters"]["seed"] == 42

    client = store(built)
    assert [str(v.version) for v in client.search_model_versions("name = 'nbs-classifier'")] == ["1"]
    assert str(client.get_registered_model("nbs-classifier").aliases["champion"]) == "1"
    assert client.get_model_version("nbs-classifier", "1").tags["nbs.reproduced"].startswith("identical (run ")
    run, = runs_of(built, "nbs-reproduce")
    assert run.info.status == "FINISHED" and run.data.tags["nbs.reproduces"] == URI
    assert len(worktrees(built)) == 1, "the worktree of the rebuild is removed"
