"""Every shell snippet of the documentation that a reader is meant to run does run, as written, in order, in a copy
of the built project: README.md, then the prose of the notebooks (in their order), then benchmarks/README.md. A block that cannot run here (a server that runs until Ctrl-C, a path that stands for the reader's
own file, the team server) is marked by an HTML comment right above it, `<!-- not run by tests/test_readme.py:
WHY -->`, and must say why.

The copy's pipeline is the 7-task chain (trim_pipeline): the README's builds on new data take half the time, and the
commands are the same."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import nbformat
from conftest import ROOT, commit, copy_build, trim_pipeline

SKIP = re.compile(r"<!-- not run by tests/test_readme\.py: (?P<why>.+?) -->\s*$")


def documents() -> list[tuple[str, str]]:
    "Each document a reader runs snippets from, by name, with its text (a notebook's: its markdown cells)."
    notebooks = sorted(path for path in (ROOT / "notebooks").glob("*.ipynb") if path.name != "index.ipynb")  # README.md's source
    return [("README.md", (ROOT / "README.md").read_text()),
            *((path.name, "\n\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells
                                       if cell.cell_type == "markdown")) for path in notebooks),
            ("benchmarks/README.md", (ROOT / "benchmarks/README.md").read_text())]


def shell_blocks(text: str) -> list[dict]:
    "Each ```bash block of `text`: its first line number, its code, and why it is not run (None: it is)."
    blocks, lines = [], text.splitlines()
    for number, line in enumerate(lines):
        if line.strip() != "```bash":
            continue
        end = next(i for i in range(number + 1, len(lines)) if lines[i].strip() == "```")
        above = lines[number - 1] if number else ""
        marked = SKIP.match(above)
        blocks.append({"line": number + 1, "code": "\n".join(lines[number + 1:end]),
                       "why": marked.group("why") if marked else None})
    return blocks


def test_the_docs_mark_each_block_they_do_not_run_with_a_reason():
    found = 0
    for name, text in documents():
        blocks = shell_blocks(text)
        found += len(blocks)
        skipped = [b for b in blocks if b["why"] is not None]
        assert all(len(b["why"]) > 20 for b in skipped), (name, [b["line"] for b in skipped])
        stray = [i for i, line in enumerate(text.splitlines(), 1)
                 if "not run by tests/test_readme.py" in line and not SKIP.match(line)]
        assert not stray, f"{name}: a not-run mark this test cannot read, at lines {stray}"
    assert found >= 15, "the parser found the documents' shell blocks"


def test_every_runnable_shell_snippet_runs_as_written(shared_build, tmp_path):
    project = copy_build(shared_build, tmp_path / "project")
    trim_pipeline(project)
    commit(project, "the chain to a registered version")
    (project / ".venv").symlink_to(ROOT / ".venv")  # the snippets call .venv/bin/nbs and .venv/bin/python
    env = {**{k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}},
           "PYTHONPATH": str(project), "PLOOMBER_STATS_ENABLED": "false"}
    ran = []
    for name, text in documents():
        for block in shell_blocks(text):
            if block["why"] is not None:
                continue
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]], cwd=project, env=env,
                                  capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, (f"{name} (markdown) line {block['line']}:\n{block['code']}\n"
                                          f"{done.stdout[-2000:]}{done.stderr[-3000:]}")
            ran.append((name, block["line"]))
    assert len(ran) >= 7
    # what the walk-through says it makes
    assert (project / "products/wine-scored.csv").read_text().splitlines()[0].endswith(
        "prediction,proba_0,proba_1,proba_2,model_name,model_version")
    assert "proba_" not in (project / "products/diabetes-scored.csv").read_text().splitlines()[0]
    summary = Path(project / "products/diabetes-summary.json").read_text()
    assert '"task": "regression"' in summary and '"champion": 1' in summary
