"""Every shell snippet of README.md that a reader is meant to run does run, as written, in order, in a copy of the
built project. A block that cannot run here (a server that runs until Ctrl-C, a path that stands for the reader's
own file, the team server) is marked by an HTML comment right above it, `<!-- not run by tests/test_readme.py:
WHY -->`, and must say why.

The copy's pipeline is the 7-task chain (trim_pipeline): the README's builds on new data take half the time, and the
commands are the same."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from conftest import ROOT, commit, copy_build, trim_pipeline

SKIP = re.compile(r"<!-- not run by tests/test_readme\.py: (?P<why>.+?) -->\s*$")


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


def test_the_readme_marks_each_block_it_does_not_run_with_a_reason():
    blocks = shell_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 15, "the parser found the README's shell blocks"
    skipped = [b for b in blocks if b["why"] is not None]
    assert all(len(b["why"]) > 20 for b in skipped), [b["line"] for b in skipped]
    stray = [i for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1)
             if "not run by tests/test_readme.py" in line and not SKIP.match(line)]
    assert not stray, f"a not-run mark this test cannot read, at lines {stray}"


def test_every_runnable_shell_snippet_runs_as_written(shared_build, tmp_path):
    project = copy_build(shared_build, tmp_path / "project")
    trim_pipeline(project)
    commit(project, "the chain to a registered version")
    (project / ".venv").symlink_to(ROOT / ".venv")  # the snippets call .venv/bin/nbs and .venv/bin/python
    env = {**{k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}},
           "PYTHONPATH": str(project), "PLOOMBER_STATS_ENABLED": "false"}
    ran = []
    for block in shell_blocks((ROOT / "README.md").read_text()):
        if block["why"] is not None:
            continue
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]], cwd=project, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (f"README.md line {block['line']}:\n{block['code']}\n"
                                      f"{done.stdout[-2000:]}{done.stderr[-3000:]}")
        ran.append(block["line"])
    assert len(ran) >= 7
    # what the walk-through says it makes
    assert (project / "products/wine-scored.csv").read_text().splitlines()[0].endswith(
        "prediction,proba_0,proba_1,proba_2,model_name,model_version")
    assert "proba_" not in (project / "products/diabetes-scored.csv").read_text().splitlines()[0]
    summary = Path(project / "products/diabetes-summary.json").read_text()
    assert '"task": "regression"' in summary and '"champion": 1' in summary
