"""`nbs check` (the first step of `make test`) fails when the repository is out of step."""

from __future__ import annotations

import json
import re

from conftest import run_nbs


def test_clean_copy_passes(project):
    done = run_nbs("check", cwd=project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == 4


def test_notebook_with_outputs_fails(project):
    path = project / "notebooks" / "01_data.ipynb"
    nb = json.loads(path.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["execution_count"] = 1
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    path.write_text(json.dumps(nb, indent=1))
    done = run_nbs("check", cwd=project)
    assert done.returncode == 1
    assert "FAIL  notebooks carry no outputs" in done.stdout
    assert "notebooks/01_data.ipynb: outputs in cells" in done.stdout


def test_stray_cell_metadata_fails_but_parameters_tag_is_kept(project):
    path = project / "notebooks" / "pipeline" / "10_ingest.ipynb"
    nb = json.loads(path.read_text())
    tagged = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    tagged["metadata"]["scrolled"] = True
    path.write_text(json.dumps(nb, indent=1))
    done = run_nbs("check", cwd=project)
    assert done.returncode == 1
    assert "notebooks/pipeline/10_ingest.ipynb: metadata to strip" in done.stdout


def test_hand_edit_in_nbs_lib_fails(project):
    with open(project / "nbs_lib" / "core" / "data.py", "a") as f:
        f.write("\ndef sneaky() -> int:\n    return 1\n")
    done = run_nbs("check", cwd=project)
    assert done.returncode == 1
    assert "nbs_lib/core/data.py: differs from what its notebook exports" in done.stdout


def test_notebook_edit_not_exported_fails(project):
    path = project / "notebooks" / "01_data.ipynb"
    path.write_text(path.read_text().replace("569 rows, 30 numeric features", "569 rows"))
    done = run_nbs("check", cwd=project)
    assert done.returncode == 1
    assert "nbs_lib/core/data.py: differs" in done.stdout


def test_env_yml_out_of_step_with_lock_fails(project):
    env = project / "env.yml"
    text, count = re.subn(r"- pandas==[\w.]+", "- pandas==2.2.0", env.read_text())
    assert count == 1
    env.write_text(text)
    done = run_nbs("check", cwd=project)
    assert done.returncode == 1
    assert re.search(r"pandas: [\w.]+ in requirements.lock, 2.2.0 in env.yml", done.stdout)
