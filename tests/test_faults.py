"""Faults put into a tiny two-task pipeline: each is recorded truthfully in MLflow and on disk."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    NBS,
    TINY_PIPELINE,
    run_nbs,
    runs_of,
    session_leaders,
    start_sleeping_build,
    store,
)

pytestmark = pytest.mark.build  # each test builds its own two-task pipeline

def _statuses(root: Path) -> dict[str, str]:
    return {r.data.tags.get("nbs.task", "pipeline"): r.info.status for r in runs_of(root, "tiny")}


def _cell_statuses(path: Path) -> list:
    nb = json.loads(path.read_text())
    return [c["metadata"].get("papermill", {}).get("status") for c in nb["cells"]]


def test_a_raising_cell_fails_the_task_and_stops_downstream(tiny):
    done = run_nbs("run", "-p", "mode=raise", cwd=tiny)
    assert done.returncode == 1
    assert ("task 'first' (first.ipynb) failed at cell 1 (import os, sys, time; cell 4 of the executed notebook): "
            "ValueError: bad things") in done.stderr
    assert "executed notebook: products/first.ipynb" in done.stderr
    assert _statuses(tiny) == {"pipeline": "FAILED", "first": "FAILED"}
    executed = tiny / "products/first.ipynb"
    assert "An Exception was encountered" in executed.read_text()
    assert _cell_statuses(executed)[-2:] == ["failed", "pending"]
    run = next(r for r in runs_of(tiny, "tiny") if r.data.tags.get("nbs.task") == "first")
    assert [a.path for a in store(tiny).list_artifacts(run.info.run_id, "notebook")] == [
        "notebook/first.html", "notebook/first.ipynb"]


def test_a_cell_past_its_timeout_is_marked_and_fails(tiny):
    started = time.monotonic()
    done = run_nbs("run", "-p", "mode=sleep", "-p", "cell_timeout=3", cwd=tiny)
    assert time.monotonic() - started < 60
    assert done.returncode == 1
    assert "CellTimeoutError" in done.stderr and "at cell 1 (import os, sys, time; cell 4 of the executed notebook)" in done.stderr
    assert _statuses(tiny) == {"pipeline": "FAILED", "first": "FAILED"}
    executed = tiny / "products/first.ipynb"
    assert _cell_statuses(executed)[-2:] == ["failed", "pending"], "papermill says 'completed' here"
    assert json.loads(executed.read_text())["metadata"]["papermill"]["exception"] is True


def test_a_dead_kernel_is_marked_and_fails(tiny):
    done = run_nbs("run", "-p", "mode=dead", cwd=tiny)
    assert done.returncode == 1
    assert "DeadKernelError: the kernel died while this cell ran" in done.stderr
    assert _statuses(tiny) == {"pipeline": "FAILED", "first": "FAILED"}
    assert _cell_statuses(tiny / "products/first.ipynb")[-2:] == ["failed", "pending"]


def test_sys_exit_zero_is_a_failure_not_a_silent_truncation(tiny):
    done = run_nbs("run", "-p", "mode=exit0", cwd=tiny)
    assert done.returncode == 1
    assert "SystemExit: 0 (sys.exit() stopped the notebook before its last cell)" in done.stderr
    assert _statuses(tiny) == {"pipeline": "FAILED", "first": "FAILED"}
    assert not (tiny / "products/first.txt").exists()


def _stop(build: subprocess.Popen, kernels: list[psutil.Process]) -> None:
    for process in [*kernels]:
        if process.is_running():
            process.kill()
    if build.poll() is None:
        os.killpg(build.pid, signal.SIGKILL)
    build.wait(10)


def test_sigterm_mid_build_ends_runs_killed_and_stops_the_kernel(tiny):
    build, kernels = start_sleeping_build(tiny)
    try:
        build.send_signal(signal.SIGTERM)
        assert build.wait(30) == 128 + signal.SIGTERM
        stderr = build.stderr.read()
        assert "stopped by SIGTERM" in stderr
        gone, alive = psutil.wait_procs(kernels, timeout=15)
        assert alive == [], "the kernel outlived the build"
    finally:
        _stop(build, kernels)
    assert _statuses(tiny) == {"pipeline": "KILLED", "first": "KILLED"}


def test_sigterm_mid_parallel_build_kills_every_running_kernel(tiny):
    pipeline = TINY_PIPELINE.split("tasks:")[0] + """  jobs: 2
tasks:
  - source: first.ipynb
    name: first-
    product:
      nb: products/first.ipynb
      data: products/first.txt
    grid:
      mode: [sleep, sleep, sleep]
"""
    (tiny / "pipeline.yaml").write_text(pipeline)
    build, kernels = start_sleeping_build(tiny, "--force")
    try:
        deadline = time.monotonic() + 60
        while len(kernels) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            kernels = session_leaders(build.pid)
        time.sleep(2)  # let the second kernel reach its sleeping cell too
        assert len(kernels) == 2, "two tasks should run at once"
        build.send_signal(signal.SIGTERM)
        assert build.wait(30) == 128 + signal.SIGTERM
        gone, alive = psutil.wait_procs(kernels, timeout=15)
        assert alive == [], "a kernel outlived the build"
    finally:
        _stop(build, kernels)
    assert _statuses(tiny) == {"pipeline": "KILLED", "first-0": "KILLED", "first-1": "KILLED"}


def test_sigkilled_build_is_marked_killed_by_the_next_command(tiny):
    build, kernels = start_sleeping_build(tiny)
    try:
        build.kill()
        build.wait(10)
    finally:
        _stop(build, kernels)
    assert _statuses(tiny) == {"pipeline": "RUNNING", "first": "RUNNING"}
    done = run_nbs("run", cwd=tiny)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("KILLED: the process that ran it is gone") == 2
    killed = [r for r in runs_of(tiny, "tiny") if r.info.status == "KILLED"]
    assert len(killed) == 2
    assert all("ended without closing this run" in r.data.tags["nbs.end_reason"] for r in killed)
    assert "RUNNING" not in [r.info.status for r in runs_of(tiny, "tiny")]


def test_a_product_half_written_by_a_killed_build_is_rebuilt(tiny):
    assert run_nbs("run", "-p", "mode=halfwrite", cwd=tiny).returncode == 0
    product = tiny / "products/first.txt"
    assert product.read_text() == "halfwrite"
    (tiny / "crash.flag").touch()
    build, kernels = start_sleeping_build(tiny, "--force", "-p", "mode=halfwrite")
    try:
        deadline = time.monotonic() + 60
        while product.read_text() != "half" and time.monotonic() < deadline:
            time.sleep(0.2)
        build.kill()
        build.wait(10)
    finally:
        _stop(build, kernels)
    assert product.read_text() == "half", "the crash should leave a half-written product"
    (tiny / "crash.flag").unlink()
    done = run_nbs("run", "-p", "mode=halfwrite", cwd=tiny)
    assert done.returncode == 0, done.stderr
    assert "Ran 2 of 2 tasks" in done.stdout, "a half-written product was trusted as up to date"
    assert product.read_text() == "halfwrite"


def test_a_secret_never_reaches_a_notebook_param_tag_or_artifact(tiny):
    import uuid

    token = f"s3cr3t-{uuid.uuid4().hex}"
    (tiny / ".env").write_text(f"NBS_TEST_TOKEN={token}\n")
    done = run_nbs("run", "-p", "mode=leak", cwd=tiny)
    assert done.returncode == 0, done.stderr
    assert "[secret]" in (tiny / "products/first.ipynb").read_text(), "the notebook did print it"
    run = next(r for r in runs_of(tiny, "tiny") if r.data.tags.get("nbs.task") == "first")
    assert [a.path for a in store(tiny).list_artifacts(run.info.run_id)] == ["connection.log", "notebook", "tables"]
    assert run.data.tags["nbs.connected_with"] == "[secret]" and list(run.data.metrics) == ["latency__secret_"]
    stored = [p for p in tiny.rglob("*") if p.is_file() and p.name != ".env"]
    assert any("mlartifacts" in p.parts for p in stored) and (tiny / "mlflow.db") in stored
    leaks = [p for p in stored if token.encode() in p.read_bytes()]
    assert leaks == [], f"the secret leaked into {leaks}"
    failed = run_nbs("run", "-p", "mode=leakraise", cwd=tiny)
    assert failed.returncode == 1 and "ConnectionError: the server refused [secret]" in failed.stderr, failed.stderr
    assert token not in failed.stdout + failed.stderr, "a failing cell's message printed the secret"
    leaks = [p for p in tiny.rglob("*") if p.is_file() and p.name != ".env" and token.encode() in p.read_bytes()]
    assert leaks == [], f"the secret leaked into {leaks}"
    refused = run_nbs("run", "-p", f"mode={token}", cwd=tiny)
    assert refused.returncode == 2
    assert "holds the value of secret NBS_TEST_TOKEN" in refused.stderr
    assert token not in refused.stderr


def test_one_build_at_a_time_a_second_is_refused_or_queues_and_takes_over_from_a_killed_holder(tiny):
    build, kernels = start_sleeping_build(tiny, "--force", "-p", "mode=sleep")
    try:
        refused = run_nbs("run", "--force", cwd=tiny)
        assert refused.returncode == 75, refused.stderr
        assert f"another build is running in this project: process {build.pid} on " in refused.stderr
        assert "(nbs run --force -p mode=sleep, since " in refused.stderr and "--wait" in refused.stderr
        impatient = run_nbs("run", "--force", "--wait", "0.5", cwd=tiny)
        assert impatient.returncode == 75 and "after waiting 0.5 s" in impatient.stderr, impatient.stderr
        assert "Traceback" not in refused.stderr + impatient.stderr
        queued = subprocess.Popen([str(NBS), "run", "--force", "--wait"], cwd=tiny, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True,
                                  env={**{k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}},
                                       "PLOOMBER_STATS_ENABLED": "false"})
        try:
            said = queued.stderr.readline()
            assert f"nbs: waiting for the build lock: process {build.pid} (nbs run --force -p mode=sleep)" in said, said
            _stop(build, kernels)  # SIGKILL: the holder cleans nothing up
            out, err = queued.communicate(timeout=300)
        finally:
            if queued.poll() is None:
                os.killpg(queued.pid, signal.SIGKILL)
    finally:
        _stop(build, kernels)
    assert queued.returncode == 0, err
    assert f"nbs: took over the build lock of process {build.pid} on " in err and "it is no longer running" in err
    assert "Ran 2 of 2 tasks" in out
    assert (tiny / "products/first.txt").read_text() == "ok"
    assert list((tiny / ".nbs/locks/build.holders").glob("*.json")) == [], "a finished build still names itself holder"


@contextlib.contextmanager
def _read_only(folder: Path):
    "`folder` made read-only for this process, root included (chattr +i; chmod for anyone else)."
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"this file system cannot make a folder read-only for root: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_product_folder_that_cannot_be_written_fails_the_task_in_one_line(tiny):
    assert run_nbs("run", cwd=tiny).returncode == 0
    with _read_only(tiny / "products"):
        done = run_nbs("run", "--force", cwd=tiny)
    assert done.returncode == 1, done.stderr
    assert "task 'first' (first.ipynb) failed: PermissionError:" in done.stderr and "Traceback" not in done.stderr
    newest = _statuses(tiny)  # each task's latest run
    assert (newest["pipeline"], newest["first"]) == ("FAILED", "FAILED"), "a failure, not a kill"
    assert "RUNNING" not in [r.info.status for r in runs_of(tiny, "tiny")]
