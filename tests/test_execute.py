"""`nbs execute` on notebooks it did not write: real kernels, a real MLflow store, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from conftest import NBS, drive, run_nbs, runs_of, store


def _notebook(path: Path, *cells: str, parameters: str | None = None, kernel: bool = True) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    if parameters is not None:
        nb.cells.insert(0, nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    if kernel:
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _job_on_kernel(folder: Path, name: str, argv: list[str]) -> Path:
    "job.ipynb in `folder`, naming the kernel `name` that starts with `argv`, installed under folder/jupyter (JUPYTER_PATH)."
    spec = folder / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))
    path = _notebook(folder / "job.ipynb", "print('ran')")
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": name, "display_name": name, "language": "python"}
    nbformat.write(nb, path)
    return path


def _by_kind(root: Path) -> dict[str, list]:
    found: dict[str, list] = {}
    for run in runs_of(root):
        found.setdefault(run.data.tags["nbs.kind"], []).append(run)
    return found


REPORT = """\
from nbs_lib.core.tracking import log_metrics, log_table
log_metrics({"total": rows * factor})
log_table({"row": list(range(rows))}, "rows")
print("label:", label)"""


def test_a_notebook_without_parameters_cell_or_kernel_name(tmp_path):
    _notebook(tmp_path / "plain.ipynb", "print('hello')\nfrom nbs_lib.core.tracking import log_metrics\n"
              "log_metrics({'answer': 42})", kernel=False)
    done = run_nbs("execute", "plain.ipynb", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Executed plain.ipynb in 1 attempt: products/executed/plain.ipynb" in done.stdout
    runs = _by_kind(tmp_path)
    (parent,), (attempt,) = runs["execution"], runs["task"]
    assert (parent.info.status, attempt.info.status) == ("FINISHED", "FINISHED")
    assert attempt.data.metrics == {"answer": 42.0} and parent.data.metrics == {"plain.answer": 42.0}
    assert attempt.data.tags["nbs.notebook.sha256"] and attempt.data.tags["nbs.lib.sha256"]
    assert [a.path for a in store(tmp_path).list_artifacts(attempt.info.run_id, "notebook")] == [
        "notebook/plain.html", "notebook/plain.ipynb"]
    assert [a.path for a in store(tmp_path).list_artifacts(parent.info.run_id)] == ["environment"]
    assert "hello" in (tmp_path / "products/executed/plain.ipynb").read_text()
    refused = run_nbs("execute", "plain.ipynb", "-p", "rows=3", cwd=tmp_path)
    assert refused.returncode == 2
    assert "plain.ipynb has no cell tagged 'parameters'" in refused.stderr


def test_a_papermill_style_notebook_with_parameters(tmp_path):
    _notebook(tmp_path / "report.ipynb", REPORT,
              parameters="rows = 3  # how many rows\nfactor = 0.5\nlabel = 'weekly'")
    done = run_nbs("execute", "report.ipynb", "-p", "rows=4", "-p", "label=daily run", "-o", "out/r.ipynb",
                   "--experiment", "reports", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    executed = json.loads((tmp_path / "out/r.ipynb").read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert "rows = 4" in "".join(injected[0]["source"])
    client = store(tmp_path)
    attempt = next(r for r in runs_of(tmp_path, "reports") if r.data.tags["nbs.kind"] == "task")
    assert attempt.data.params == {"rows": "4", "label": "daily run"}
    assert attempt.data.metrics == {"total": 2.0}
    table = client.download_artifacts(attempt.info.run_id, "tables/rows.json", str(tmp_path / "dl"))
    assert json.loads(Path(table).read_text())["data"] == [[0], [1], [2], [3]]


@pytest.mark.parametrize("body, code, ename", [
    ("raise ValueError('broken report')", 1, "ValueError"),
    ("import sys; sys.exit(0)", 1, "SystemExit"),
    ("import time; time.sleep(60)", 3, "CellTimeoutError"),
    ("import os; os._exit(1)", 3, "DeadKernelError"),
])
def test_each_failure_kind_has_its_exit_code_and_a_failed_run(tmp_path, body, code, ename):
    _notebook(tmp_path / "job.ipynb", "print('start')", body, "print('never')")
    done = run_nbs("execute", "job.ipynb", "--timeout", "3", cwd=tmp_path)
    assert done.returncode == code, done.stderr
    assert "task 'job' (job.ipynb) failed at cell 1" in done.stderr and ename in done.stderr
    assert {r.info.status for r in runs_of(tmp_path)} == {"FAILED"}
    cells = json.loads((tmp_path / "products/executed/job.ipynb").read_text())["cells"]
    assert [c["metadata"].get("papermill", {}).get("status") for c in cells][-2:] == ["failed", "pending"]


def test_bad_input_is_refused_before_any_run(tmp_path):
    _notebook(tmp_path / "report.ipynb", REPORT, parameters="rows = 3\nfactor = 0.5\nlabel = 'x'")
    for args, says in [
        (["missing.ipynb"], "missing.ipynb: no such notebook"),
        (["report.ipynb", "-p", "rows=many"], "parameter 'rows' expects int (default 3), got 'many'"),
        (["report.ipynb", "-p", "colums=3"], "parameter 'colums' is not declared in the parameters cell of report.ipynb"),
        (["report.ipynb", "-p", "os.system('x')=1"], "is not a name a parameter can have"),
        (["report.ipynb", "--retries", "-1"], "parameter 'retries' is -1; it must be 0 or more"),
        (["report.ipynb", "-o", "report.ipynb"], "is the notebook itself"),
    ]:
        done = run_nbs("execute", *args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr, (args, done.stderr)
    assert runs_of(tmp_path) == [], "refused executions must not create runs"


def test_a_secret_cannot_be_a_parameter_and_is_scrubbed(tmp_path):
    _notebook(tmp_path / "job.ipynb", "from nbs_lib.core.credentials import secret\nprint('using', secret('JOB_TOKEN'))",
              parameters="url = ''")
    env_token = "tok-9f8e7d6c"
    (tmp_path / ".env").write_text(f"JOB_TOKEN={env_token}\n")
    refused = run_nbs("execute", "job.ipynb", "--secret", "JOB_TOKEN", "-p", f"url=https://x:{env_token}@h",
                      cwd=tmp_path)
    assert refused.returncode == 2 and "holds the value of secret JOB_TOKEN" in refused.stderr
    done = run_nbs("execute", "job.ipynb", "--secret", "JOB_TOKEN", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert env_token not in (tmp_path / "products/executed/job.ipynb").read_text()
    attempt = next(r for r in runs_of(tmp_path) if r.data.tags["nbs.kind"] == "task")
    for artifact in ("notebook/job.ipynb", "notebook/job.html"):
        path = store(tmp_path).download_artifacts(attempt.info.run_id, artifact, str(tmp_path / "dl"))
        assert env_token not in Path(path).read_text() and "[secret]" in Path(path).read_text()


def test_a_retry_that_succeeds_records_both_attempts(tmp_path):
    _notebook(tmp_path / "flaky.ipynb", "from pathlib import Path\nmark = Path('tried.mark')",
              "if not mark.exists():\n    mark.touch()\n    raise ConnectionError('the source was down')")
    done = run_nbs("execute", "flaky.ipynb", "--retries", "2", "--backoff", "0.5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "retrying flaky in 0.5 s (attempt 2 of 3)" in done.stderr
    assert "Executed flaky.ipynb in 2 attempts" in done.stdout
    runs = _by_kind(tmp_path)
    assert runs["execution"][0].info.status == "FINISHED"
    assert runs["execution"][0].data.tags["nbs.attempts"] == "2"
    assert [(r.data.tags["nbs.attempt"], r.info.status) for r in runs["task"]] == [
        ("1", "FAILED"), ("2", "FINISHED")]
    first_notebook = store(tmp_path).download_artifacts(runs["task"][0].info.run_id, "notebook/flaky.ipynb",
                                                        str(tmp_path / "dl"))
    assert "the source was down" in Path(first_notebook).read_text()


def test_quiet_drops_progress_lines_and_keeps_the_answer(tmp_path):
    _notebook(tmp_path / "flaky.ipynb", "from pathlib import Path\nmark = Path('tried.mark')",
              "if not mark.exists():\n    mark.touch()\n    raise ConnectionError('the source was down')")
    quiet = run_nbs("execute", "flaky.ipynb", "--retries", "1", "--backoff", "0", "-q", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "running" not in quiet.stderr and "retrying" not in quiet.stderr and "MLflow execution run" not in quiet.stderr
    assert "Executed flaky.ipynb in 2 attempts" in quiet.stdout, "what the command answers is no progress line"
    (tmp_path / "tried.mark").unlink()
    shown = run_nbs("execute", "flaky.ipynb", "--retries", "1", "--backoff", "0", cwd=tmp_path)
    assert "  running  flaky.ipynb (attempt 1) ..." in shown.stderr and "retrying flaky in 0 s" in shown.stderr
    both = run_nbs("execute", "flaky.ipynb", "-q", "-v", cwd=tmp_path)
    assert both.returncode == 2 and "-q/--quiet and -v/--verbose contradict each other" in both.stderr


def test_eight_concurrent_executions_on_one_new_store(tmp_path):
    _notebook(tmp_path / "report.ipynb", REPORT, parameters="rows = 3\nfactor = 1.0\nlabel = 'x'")
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}
    started = [subprocess.Popen([str(NBS), "execute", "report.ipynb", "-p", f"rows={n}", "-o", f"out/{n}.ipynb"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for n in range(1, 9)]
    outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in started]
    assert [code for code, _ in outcomes] == [0] * 8, [err[-500:] for code, err in outcomes if code]
    assert not any("database is locked" in err for _, err in outcomes)
    runs = _by_kind(tmp_path)
    assert len(runs["execution"]) == 8 and len(runs["task"]) == 8
    assert {r.info.status for r in runs["execution"] + runs["task"]} == {"FINISHED"}
    assert sorted(r.data.metrics["total"] for r in runs["task"]) == [float(n) for n in range(1, 9)]
    assert sorted(r.data.params["rows"] for r in runs["task"]) == [str(n) for n in range(1, 9)]


def _cell_running(executed: Path) -> bool:
    "Whether the executed notebook being written says a cell is running."
    try:
        cells = json.loads(executed.read_text())["cells"]
    except (OSError, ValueError):  # not written yet
        return False
    return any(c["metadata"].get("papermill", {}).get("status") == "running" for c in cells)


@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-process", "to-its-group"])
def test_sigterm_ends_the_runs_killed_and_stops_the_kernel(tmp_path, to_group):
    # an orchestrator or a terminal may signal the whole group: the process recording the runs outlives the signal
    _notebook(tmp_path / "slow.ipynb", "import time\ntime.sleep(120)")
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}
    build = subprocess.Popen([str(NBS), "execute", "slow.ipynb"], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        executed, deadline = tmp_path / "products" / "executed" / "slow.ipynb", time.monotonic() + 60
        while not _cell_running(executed) and time.monotonic() < deadline:  # the kernel is in the sleeping cell
            time.sleep(0.2)
        helpers = psutil.Process(build.pid).children(recursive=True)  # the kernel, the recording process
        assert len(helpers) >= 2, helpers
        os.killpg(build.pid, signal.SIGTERM) if to_group else build.send_signal(signal.SIGTERM)
        assert build.wait(30) == 128 + signal.SIGTERM
        gone, alive = psutil.wait_procs(helpers, timeout=15)
        assert alive == [], "a kernel or helper outlived the execution"
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
            build.wait(10)
    assert {r.info.status for r in runs_of(tmp_path)} == {"KILLED"}


def test_a_store_that_cannot_be_opened_is_one_line_and_leaves_nothing_behind(tmp_path):
    _notebook(tmp_path / "job.ipynb", "print('ran')")
    (tmp_path / "broken.db").write_text("not a database, whatever its name says\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'broken.db'}"}
    with open(tmp_path / "said.txt", "w") as said:  # a file, not a pipe: a kernel left behind would hold a pipe open
        build = subprocess.Popen([str(NBS), "execute", "job.ipynb", "out.ipynb"], cwd=tmp_path, env=env,
                                 stdout=said, stderr=said)
        assert build.wait(120) == 1
    left = [p for p in psutil.process_iter(["cwd"]) if p.info["cwd"] == str(tmp_path)]  # the kernel started ahead
    for process in left:
        process.kill()
    assert left == [], "a kernel outlived the execution"
    lines = (tmp_path / "said.txt").read_text().splitlines()
    assert lines[0] == (f"nbs: error: the tracking store failed: {tmp_path / 'broken.db'} cannot be opened as "
                        "MLflow's store: file is not a database"), lines
    assert len(lines) == 2 and lines[1].startswith("  hint: ") and not (tmp_path / "out.ipynb").exists()


FIRST_START_FAILS = ("import os, sys; marker = sys.argv.pop(1)\n"
                     "if not os.path.exists(marker): open(marker, 'w').close(); os._exit(1)\n"
                     "from ipykernel import kernelapp; kernelapp.launch_new_instance()")


def test_a_kernel_that_dies_before_it_answers_is_started_once_more_and_the_run_says_so(tmp_path):
    import sys

    # exits at its first start, as a lost port race does
    _job_on_kernel(tmp_path, "flaky", [sys.executable, "-c", FIRST_START_FAILS, str(tmp_path / "started-once"),
                                       "-f", "{connection_file}"])
    done = run_nbs("execute", "job.ipynb", cwd=tmp_path, env={"JUPYTER_PATH": str(tmp_path / "jupyter")})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "started-once").is_file(), "the first start did not happen: this test would prove nothing"
    (attempt,) = _by_kind(tmp_path)["task"]
    assert attempt.info.status == "FINISHED" and attempt.data.tags["nbs.kernel_restarts"] == "1"


def test_a_kernel_that_never_starts_fails_the_run_and_no_cell_claims_to_have_run(tmp_path):
    import sys

    spec = tmp_path / "jupyter" / "kernels" / "dead"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [sys.executable, "-c", "import os; os._exit(1)", "-f",
                                                            "{connection_file}"], "display_name": "dead", "language": "python"}))
    path = _notebook(tmp_path / "job.ipynb", "print('ran')", "print('again')")
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": "dead", "display_name": "dead", "language": "python"}
    nbformat.write(nb, path)
    done = run_nbs("execute", "job.ipynb", cwd=tmp_path, env={"JUPYTER_PATH": str(tmp_path / "jupyter")})
    assert done.returncode == 1 and "Kernel died before replying to kernel_info" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert {r.info.status for r in runs_of(tmp_path)} == {"FAILED"}
    cells = json.loads((tmp_path / "products/executed/job.ipynb").read_text())["cells"]
    assert [c["metadata"]["papermill"]["status"] for c in cells] == ["failed", "pending"]
    assert cells[0]["outputs"][0]["evalue"].startswith("the kernel did not start, no cell ran")


TEXT_NOTEBOOKS = {  # jupytext's text formats, as Ploomber's script tasks are kept; none names a kernel
    "percent.py": '# %% tags=["parameters"]\nrows = 1\n\n# %%\nprint("rows", rows)\n',
    "light.py": '# + tags=["parameters"]\nrows = 1\n# -\n\nprint("rows", rows)\n',
    "notes.md": '# Notes\n\n```python tags=["parameters"]\nrows = 1\n```\n\n```python\nprint("rows", rows)\n```\n',
}


def test_a_text_notebook_runs_as_jupytext_reads_it_into_an_ipynb(tmp_path):
    for name, text in TEXT_NOTEBOOKS.items():
        (tmp_path / name).write_text(text)
    done = drive(tmp_path, [["execute", name, "-p", "rows", "3"] for name in TEXT_NOTEBOOKS]
                 + [["execute", "percent.py", "out.py"]])
    for name, ran in zip(TEXT_NOTEBOOKS, done, strict=False):
        assert ran.returncode == 0, (name, ran.stderr)
        assert f"{name} names no kernel: it runs on python3" in ran.stderr, ran.stderr
        executed = json.loads((tmp_path / "products" / "executed" / f"{Path(name).stem}.ipynb").read_text())
        printed = ["".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", [])]
        assert "rows 3\n" in printed and executed["metadata"]["papermill"]["parameters"] == {"rows": 3}, printed
    refused = done[-1]
    assert refused.returncode == 2 and "name OUTPUT out.ipynb" in refused.stderr, refused.stderr
    assert not (tmp_path / "out.py").exists()


def test_a_kernel_whose_program_is_missing_is_one_line_and_a_failed_run(tmp_path):
    _job_on_kernel(tmp_path, "gone", [str(tmp_path / "no-such-python"), "-f", "{connection_file}"])
    scratch = tmp_path / "tmp"  # the temporary folder of nbs and its kernels: what is left in it is left on the machine
    scratch.mkdir()
    done = run_nbs("execute", "job.ipynb", cwd=tmp_path, env={"JUPYTER_PATH": str(tmp_path / "jupyter"),
                                                             "TMPDIR": str(scratch)})
    assert done.returncode == 1 and "FileNotFoundError" in done.stderr and "no-such-python" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "without saying how it went" not in done.stderr
    assert {r.info.status for r in runs_of(tmp_path)} == {"FAILED"}
    # each start wrote a connection file, ports and signing key, for a kernel that never launched
    assert [p.name for p in scratch.rglob("*") if p.is_file() and '"key"' in p.read_text(errors="replace")] == []


def test_a_cell_tagged_metrics_records_the_numbers_it_assigns_without_an_import(tmp_path):
    path = _notebook(tmp_path / "scored.ipynb", "import numpy as np\nscores = np.array([0.75, 0.25])",
                     "accuracy = scores.mean()\nn_rows: int = 40\nlabel = 'holdout'\nbest, worst = scores\nflag = True")
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].metadata["tags"] = ["metrics"]
    nbformat.write(nb, path)
    done = run_nbs("execute", "scored.ipynb", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runs = _by_kind(tmp_path)
    (attempt,) = runs["task"]
    # numbers only: the text and the boolean are left out; numpy's too, as floats
    assert attempt.data.metrics == {"accuracy": 0.5, "n_rows": 40.0, "best": 0.75, "worst": 0.25}
    assert runs["execution"][0].data.metrics["scored.accuracy"] == 0.5
    executed = nbformat.read(tmp_path / "products" / "executed" / "scored.ipynb", as_version=4)
    assert [c.execution_count for c in executed.cells if c.cell_type == "code"][-2:] == [1, 2], "the reading ran no cell"
