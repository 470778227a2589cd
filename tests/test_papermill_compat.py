"""papermill's command lines on papermill-style notebooks, run through `papermill` and through `nbs execute`: the
same executed notebook and exit status, except where nbs is stricter on purpose (README: "From papermill").

Each case runs in a folder of its own under two roots, `pm/` and `nbs/`, with the same relative paths, so even
the paths papermill records in the notebook's metadata must match. papermill runs as its command; `nbs` runs
every case in one process (tests/nbs_driver.py), which pays its imports once.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import NBS, drive, free_port, runs_of, s3_client, store

PAPERMILL = Path(sys.executable).with_name("papermill")
SAYS = "import os\nprint(msg, type(msg).__name__, rate, type(rate).__name__, when, label, items, conf, flag)"
COMPLEX = "msg = None\nrate = 0.5  # per second\nwhen = None\nlabel = 'x'\nitems = [1]\nconf = {'a': 1}\nflag = len('ab')"


@dataclass
class Case:
    "A notebook, the arguments after `INPUT OUTPUT`, and the exit status each command must give."

    cells: list[str]
    parameters: str | None = None
    args: list[str] = field(default_factory=list)
    papermill: int = 0
    nbs: int = 0
    kernel: bool = True
    why: str = ""  # why the exit statuses differ: the README's table says the same


CASES = {
    "a raising cell": Case(["print('start')", "raise ValueError('broken')", "print('never')"], papermill=1, nbs=1),
    "sys.exit(0)": Case(["print('start')", "import sys; sys.exit(0)", "print('never')"], papermill=0, nbs=1,
                        why="the cells after it never ran"),
    "sys.exit(3)": Case(["import sys; sys.exit(3)", "print('never')"], papermill=1, nbs=1),
    "raise SystemExit": Case(["print('start')", "raise SystemExit", "print('never')"], papermill=0, nbs=1,
                             why="the cells after it never ran"),
    "no parameters cell": Case(["print('plain')"]),
    "complex parameters": Case([SAYS], COMPLEX, [
        "-p", "msg", "yes", "-p", "rate", "1e3", "-p", "when", "2024-01-31", "-r", "label", "007",
        "-y", "items: [2, 3]\nconf: {b: 2}", "-b", base64.b64encode(b"flag: off").decode()]),
    "papermill's value rules": Case([SAYS], COMPLEX, [
        "-p", "msg", "None", "-p", "when", "#1", "-p", "flag", "True", "-p", "label", "a: b"]),
    "a parameters file": Case([SAYS], COMPLEX, ["-f", "{case}/values.yaml", "-p", "msg", "late"]),
    "a string default": Case(["print(repr(label))"], "label = 'x'", ["-p", "label", "007"],
                             why="a string default takes the string as typed"),
    "report mode": Case(["print(x)"], "x = 1", ["--report-mode", "-p", "x", "2"]),
    "cwd": Case(["import os\nprint(os.path.basename(os.getcwd()))"], args=["--cwd", "{case}/work"]),
    "a kernel chosen, none named": Case(["print('chosen')"], args=["-k", "python3"], kernel=False),
    "prepare only": Case(["print(x)"], "x = 1", ["--prepare-only", "-p", "x", "5"]),
    "injected paths": Case(["print(PAPERMILL_INPUT_PATH, PAPERMILL_OUTPUT_PATH)"], args=["--inject-paths"]),
    "output files": Case(["print('to stdout')\nimport sys; print('to stderr', file=sys.stderr)"],
                         args=["--stdout-file", "{case}/out.txt", "--stderr-file", "{case}/err.txt"]),
    "an unknown parameter": Case(["print(x)"], "x = 1", ["-p", "y", "2"], papermill=0, nbs=2,
                                 why="papermill warns and injects it, where no cell reads it"),
    "a cell timeout": Case(["import time; time.sleep(30)", "print('never')"], args=["--execution-timeout", "2"],
                           papermill=1, nbs=3, why="exit 3: stuck, not failed; papermill prints nbclient's traceback"),
    "a dead kernel": Case(["import os; os._exit(1)", "print('never')"], papermill=138, nbs=3,
                          why="exit 3 for any execution that did not finish"),
}


def _write_notebook(path: Path, case: Case) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A report"), *(nbformat.v4.new_code_cell(c) for c in case.cells)]
    if case.parameters is not None:
        nb.cells.insert(1, nbformat.v4.new_code_cell(case.parameters, metadata={"tags": ["parameters"]}))
    if case.kernel:
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def _argv(name: str, case: Case) -> list[str]:
    folder = name.replace(" ", "-").replace("'", "")
    return [f"{folder}/in.ipynb", f"{folder}/out.ipynb", *(a.replace("{case}", folder) for a in case.args)]


def _lay_out(root: Path) -> None:
    for name, case in CASES.items():
        folder = root / name.replace(" ", "-").replace("'", "")
        _write_notebook(folder / "in.ipynb", case)
        (folder / "work").mkdir()
        (folder / "values.yaml").write_text("msg: early\nwhen: 2024-02-29\nitems: []\n")


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> tuple[Path, dict[str, tuple]]:
    "Every case through papermill and through nbs: the folder of both, and name -> (papermill's run, its notebook, nbs's run, its notebook)."
    base = tmp_path_factory.mktemp("compat")
    for side in ("pm", "nbs"):
        _lay_out(base / side)
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}

    def through_papermill() -> dict[str, subprocess.CompletedProcess]:
        return {name: subprocess.run([str(PAPERMILL), *_argv(name, case), "--no-progress-bar"], cwd=base / "pm",
                                     env=env, capture_output=True, text=True, timeout=120)
                for name, case in CASES.items()}

    # the two sides share nothing (each its own folder, kernels and store): papermill's 18 processes run while nbs
    # runs the same cases, rather than before it (the fixture took 3 minutes of the suite, one side after the other)
    with ThreadPoolExecutor(max_workers=1) as side:
        papermill_side = side.submit(through_papermill)
        nbs = dict(zip(CASES, drive(base / "nbs", [["execute", *_argv(name, case)] for name, case in CASES.items()]),
                       strict=True))
        papermill = papermill_side.result()

    def executed(side: str, name: str) -> dict | None:
        path = base / side / _argv(name, CASES[name])[1]
        return json.loads(path.read_text()) if path.is_file() else None

    return base, {name: (papermill[name], executed("pm", name), nbs[name], executed("nbs", name)) for name in CASES}


def _shape(nb: dict) -> dict:
    "What both commands must agree on in an executed notebook: papermill's metadata and each cell's role and result."
    meta = nb["metadata"]["papermill"]
    cells = [(c["cell_type"], c["metadata"].get("tags", []), c["metadata"].get("papermill", {}).get("status"),
              c["metadata"].get("jupyter", {}), "".join(c["source"]) if "injected-parameters" in c["metadata"].get(
                  "tags", []) else None,
              [("".join(o.get("text", "")), o.get("ename")) for o in c.get("outputs", [])]) for c in nb["cells"]]
    return {"parameters": meta["parameters"], "input_path": meta["input_path"],
            "output_path": meta["output_path"], "exception": meta.get("exception"), "cells": cells}


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_notebook_and_exit_status_as_papermill(both, name):
    case = CASES[name]
    papermill, by_papermill, nbs, by_nbs = both[1][name]
    assert (papermill.returncode, nbs.returncode) == (case.papermill, case.nbs), (papermill.stderr[-1500:],
                                                                                  nbs.stderr[-1500:])
    assert "Traceback" not in nbs.stderr, nbs.stderr
    if case.nbs == 2:  # refused before anything ran: no notebook, one line
        assert by_nbs is None and nbs.stderr.count("nbs: error:") == 1
        return
    if case.nbs == 3:  # papermill's weak spot: its notebook does not say which cell never finished
        statuses = [c["metadata"].get("papermill", {}).get("status") for c in by_nbs["cells"]]
        assert statuses[-2:] == ["failed", "pending"], statuses
        theirs = [c["metadata"].get("papermill", {}).get("status") for c in by_papermill["cells"]]
        assert set(theirs) == {"completed"}, "the README's table says papermill claims every cell completed"
        return
    if name == "a string default":  # papermill reads 007 as the int 7 whatever the default
        assert by_papermill["metadata"]["papermill"]["parameters"] == {"label": 7}
        assert by_nbs["metadata"]["papermill"]["parameters"] == {"label": "007"}
        return
    if name in ("sys.exit(0)", "raise SystemExit"):  # the same notebook, but nbs marks it failed where it stopped
        exits = [o for c in by_nbs["cells"] for o in c.get("outputs", []) if o.get("ename") == "SystemExit"]
        assert "stopped the notebook before its last cell" in exits[0]["evalue"]
        assert by_nbs["metadata"]["papermill"]["exception"] is True
        by_nbs["cells"] = [c for c in by_nbs["cells"] if "papermill-error-cell-tag" not in c["metadata"].get("tags", [])]
        by_nbs["metadata"]["papermill"]["exception"] = by_papermill["metadata"]["papermill"]["exception"]
        for nb in (by_nbs, by_papermill):
            for c in nb["cells"]:
                for o in c.get("outputs", []):
                    o.pop("evalue", None)
                c["metadata"].get("papermill", {}).pop("status", None)  # failed where papermill says completed
    assert _shape(by_nbs) == _shape(by_papermill)


def test_the_cells_output_goes_to_the_files_papermill_writes(both):
    base, _ = both
    for name, said in (("out.txt", "to stdout"), ("err.txt", "to stderr")):
        ours, theirs = ((base / side / "output-files" / name).read_text() for side in ("nbs", "pm"))
        assert ours == theirs and said in ours, (name, ours, theirs)


def test_values_are_read_by_papermills_rules_where_the_default_says_nothing(both):
    *_, by_nbs = both[1]["complex parameters"]
    assert by_nbs["metadata"]["papermill"]["parameters"] == {
        "msg": "yes", "rate": 1000.0, "when": "2024-01-31", "label": "007", "items": [2, 3], "conf": {"b": 2},
        "flag": False}
    *_, by_nbs = both[1]["papermill's value rules"]
    assert by_nbs["metadata"]["papermill"]["parameters"] == {"msg": None, "when": "#1", "flag": True, "label": "a: b"}


def test_a_failure_names_its_cell_as_the_user_sees_it_and_tags_the_run(both):
    base, cases = both
    *_, nbs, by_nbs = cases["a raising cell"]
    # the input's cell 2 (after a markdown cell and a print), below papermill's two markers in the output
    assert "failed at cell 2 (raise ValueError('broken'); cell 4 of the executed notebook): ValueError: broken" in nbs.stderr
    assert "".join(by_nbs["cells"][4]["source"]) == "raise ValueError('broken')"
    tagged = [r for r in runs_of(base / "nbs") if r.data.tags.get("nbs.error.type") == "ValueError"]
    assert sorted(r.data.tags["nbs.kind"] for r in tagged) == ["execution", "task"]
    assert {(r.data.tags["nbs.error.message"], r.data.tags["nbs.error.cell"], r.data.tags["nbs.error.executed_cell"],
             r.data.tags["nbs.error.cell_source"]) for r in tagged} == {("broken", "2", "4", "raise ValueError('broken')")}
    *_, nbs, _ = cases["raise SystemExit"]
    assert "SystemExit: raise SystemExit stopped the notebook before its last cell" in nbs.stderr


def test_standard_input_to_standard_output_as_papermill_pipes_it(tmp_path):
    case = Case(["print(x * 2)"], "x = 1")
    _write_notebook(tmp_path / "in.ipynb", case)
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}
    source = (tmp_path / "in.ipynb").read_text()
    outputs = {}
    for command in ([str(PAPERMILL)], [str(NBS), "execute"]):
        done = subprocess.run([*command, "-", "-", "-p", "x", "21"], input=source, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        outputs[command[-1]] = json.loads(done.stdout)  # standard output holds the notebook and nothing else
    assert _shape(outputs["execute"]) == _shape(outputs[str(PAPERMILL)])
    assert outputs["execute"]["metadata"]["papermill"]["input_path"] == "-"
    (attempt,) = [r for r in runs_of(tmp_path) if r.data.tags["nbs.kind"] == "task"]
    assert attempt.info.status == "FINISHED" and attempt.data.params == {"x": "21"}


def test_a_bash_kernel_gets_its_parameters_from_papermills_translator(tmp_path):
    import nbformat

    subprocess.run([sys.executable, "-m", "bash_kernel.install", "--prefix", str(tmp_path / "k")], check=True,
                   capture_output=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "bash", "display_name": "Bash", "language": "bash"}
    nb.cells = [nbformat.v4.new_code_cell("greeting=hello\ncount=1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell('echo "$greeting x$count"'), nbformat.v4.new_code_cell("no_such_command_here")]
    nbformat.write(nb, tmp_path / "greet.ipynb")
    jupyter = {"JUPYTER_PATH": str(tmp_path / "k" / "share" / "jupyter")}
    done, = drive(tmp_path, [["execute", "greet.ipynb", "out.ipynb", "-p", "greeting", "hi there", "-p", "count", "3"]],
                  env=jupyter)
    assert done.returncode == 1, done.stderr
    assert "the parameters cell of greet.ipynb is in bash: nbs checks the names of its parameters" in done.stderr
    assert "failed at cell 2 (no_such_command_here; cell 5 of the executed notebook): the kernel reported an error: 127" \
        in done.stderr
    executed = json.loads((tmp_path / "out.ipynb").read_text())
    assert "".join(executed["cells"][2]["source"]) == "# Parameters\ngreeting='hi there'\ncount=3\n"
    assert executed["cells"][3]["outputs"][0]["text"] == ["hi there x3\n"]
    (attempt,) = [r for r in runs_of(tmp_path) if r.data.tags["nbs.kind"] == "task"]
    assert attempt.info.status == "FAILED" and attempt.data.tags["nbs.error.cell"] == "2"


def test_s3_notebooks_both_ways_through_papermills_handler(tmp_path, s3):
    _write_notebook(tmp_path / "in.ipynb", Case(["print(x * 2)"], "x = 1"))
    client = s3_client(s3)
    client.upload_file(str(tmp_path / "in.ipynb"), "reports", "weekly.ipynb")
    done, = drive(tmp_path, [["execute", "s3://reports/weekly.ipynb", "s3://reports/out/{x}.ipynb", "-p", "x", "21"]],
                  env=s3)
    assert done.returncode == 0, done.stderr
    assert "Executed s3://reports/weekly.ipynb in 1 attempt: s3://reports/out/21.ipynb" in done.stdout
    executed = json.loads(client.get_object(Bucket="reports", Key="out/21.ipynb")["Body"].read())
    assert executed["metadata"]["papermill"]["input_path"] == "s3://reports/weekly.ipynb"
    assert executed["metadata"]["papermill"]["output_path"] == "s3://reports/out/21.ipynb"
    assert executed["cells"][-1]["outputs"][0]["text"] == ["42\n"]
    papermill = subprocess.run([str(PAPERMILL), "s3://reports/weekly.ipynb", "s3://reports/pm/{x}.ipynb", "-p", "x", "21",
                                "--no-progress-bar"], cwd=tmp_path, env={**os.environ, **s3}, capture_output=True,
                               text=True, timeout=120)
    assert papermill.returncode == 0, papermill.stderr
    by_papermill = json.loads(client.get_object(Bucket="reports", Key="pm/21.ipynb")["Body"].read())
    by_papermill["metadata"]["papermill"]["output_path"] = "s3://reports/out/21.ipynb"
    assert _shape(executed) == _shape(by_papermill)
    (attempt,) = [r for r in runs_of(tmp_path) if r.data.tags["nbs.kind"] == "task"]
    logged = store(tmp_path).download_artifacts(attempt.info.run_id, "notebook/weekly.ipynb", str(tmp_path / "dl"))
    assert json.loads(Path(logged).read_text())["cells"][-1]["outputs"][0]["text"] == ["42\n"]
    missing, = drive(tmp_path, [["execute", "s3://reports/nowhere.ipynb"]], env=s3)
    assert missing.returncode == 2 and "s3://reports/nowhere.ipynb: cannot be read" in missing.stderr
    assert len(runs_of(tmp_path)) == 2, "a notebook that cannot be read creates no run"


def test_a_remote_location_nbs_cannot_reach_is_refused_before_any_run(tmp_path):
    _write_notebook(tmp_path / "in.ipynb", Case(["print(1)"]))
    refused = drive(tmp_path, [["execute", "in.ipynb", "abfs://container/out.ipynb"],
                               ["execute", "in.ipynb", "gs://bucket/out.ipynb"],
                               ["execute", "in.ipynb", "out.ipynb", "--cwd", "no-such-folder"],
                               ["execute", "in.ipynb", "out.ipynb", "-k", "no-such-kernel"]])
    says = ["abfs:// URL, which papermill has no I/O handler for", "needs the gcsfs client library",
            "no-such-folder: is not a folder the kernel can work in", "needs the kernel 'no-such-kernel'"]
    for done, said in zip(refused, says, strict=True):
        assert done.returncode == 2 and said in done.stderr and done.stderr.count("\n") <= 2, done.stderr
    assert runs_of(tmp_path) == [] and not (tmp_path / "abfs:").exists()


def test_help_notebook_lists_the_parameters_as_papermill_does(tmp_path):
    _write_notebook(tmp_path / "in.ipynb", Case([SAYS], COMPLEX))
    done, = drive(tmp_path, [["execute", "in.ipynb", "--help-notebook"]])
    assert done.returncode == 0 and "rate: Unknown type (default 0.5)  per second" in done.stdout, done.stdout
    papermill = subprocess.run([str(PAPERMILL), "in.ipynb", "--help-notebook"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60)
    assert "rate: Unknown type (default 0.5)" in papermill.stdout


def test_a_password_in_a_notebook_url_is_never_printed_or_stored(tmp_path):
    import http.server
    import threading

    _write_notebook(tmp_path / "served" / "weekly.ipynb", Case(["print('read over http')"]))
    token = "tok-9f8e7d6c"

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "served"), **kwargs)

        def log_message(self, *args):  # the test's output stays the commands'
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        url = f"http://ana:{token}@127.0.0.1:{server.server_address[1]}"
        done, missing = drive(tmp_path, [["execute", f"{url}/weekly.ipynb", "out.ipynb", "--inject-input-path"],
                                         ["execute", f"{url}/nowhere.ipynb", "x.ipynb"]])
    finally:
        server.shutdown()
        serving.join(10)
    assert done.returncode == 0, done.stderr
    assert f"Executed http://ana:[secret]@127.0.0.1:{server.server_address[1]}/weekly.ipynb" in done.stdout
    assert missing.returncode == 2 and "ana:[secret]@" in missing.stderr
    said = done.stdout + done.stderr + missing.stdout + missing.stderr + (tmp_path / "out.ipynb").read_text()
    runs = runs_of(tmp_path)
    stored = json.dumps([(r.data.params, r.data.tags) for r in runs])
    assert token not in said and token not in stored and "[secret]" in stored



def test_log_output_names_the_input_notebook_as_papermill_does(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('logged')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "job.ipynb")
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}
    said = {}
    for name, command in (("papermill", [str(PAPERMILL), "job.ipynb", "pm.ipynb", "--no-progress-bar"]),
                          ("nbs", [str(NBS), "execute", "job.ipynb", "nbs.ipynb"])):
        done = subprocess.run([*command, "--log-output"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        said[name] = done.stderr.splitlines()
    for line in ("Input Notebook:  job.ipynb", "logged"):  # nbs hands papermill the notebook it read, not its path
        assert line in said["papermill"] and line in said["nbs"], said
