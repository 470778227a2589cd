"""`nbs schedule`: real scheduler processes, real kernels, a real store, and real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import nbformat
import psutil
from conftest import NBS, ROOT, run_nbs, runs_of


def test_list_and_crontab_show_the_projects_jobs(tmp_path):
    (tmp_path / "pipeline.yaml").write_text((ROOT / "pipeline.yaml").read_text())
    (tmp_path / "schedules.yaml").write_text((ROOT / "schedules.yaml").read_text())
    listed = run_nbs("schedule", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, nightly = listed.stdout.splitlines()
    assert nightly.split()[:5] == ["nightly", "0", "2", "*", "*"] and "the pipeline" in nightly
    assert nightly.count(" 02:00:00") == 3, "three next fires, each at 02:00"
    crontab = run_nbs("schedule", "crontab", cwd=tmp_path)
    assert crontab.returncode == 0, crontab.stderr
    assert f"0 2 * * * cd {tmp_path} && mkdir -p .nbs/logs && {NBS} schedule fire nightly" in crontab.stdout


def test_a_bad_schedules_file_is_refused(tmp_path):
    (tmp_path / "schedules.yaml").write_text("jobs:\n  broken: {cron: '0 25 * * *', pipeline: true}\n")
    done = run_nbs("schedule", "run", cwd=tmp_path)
    assert done.returncode == 2
    assert "job 'broken': cron '0 25 * * *'" in done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def _start_scheduler(root: Path, log: Path) -> subprocess.Popen:
    "`nbs schedule run` in `root`, its output (and its jobs') in `log`: a pipe nobody reads would fill and block it."
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "NBS_RUN_ID"}}
    env["PLOOMBER_STATS_ENABLED"] = "false"
    with open(log, "w") as out:
        return subprocess.Popen([str(NBS), "schedule", "run"], cwd=root, env=env, stderr=out, stdout=out,
                                text=True, start_new_session=True)


def test_two_schedulers_fire_a_one_second_job_never_twice_at_once_and_stop_on_sigterm(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import time\ntime.sleep(2)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "tick.ipynb")
    (tmp_path / "schedules.yaml").write_text(
        "jobs:\n  tick: {cron: '* * * * * *', notebook: tick.ipynb, overlap: skip}\n")
    logs = [tmp_path / "scheduler-1.log", tmp_path / "scheduler-2.log"]
    schedulers = [_start_scheduler(tmp_path, log) for log in logs]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until two fires have finished
            fires = [r for r in runs_of(tmp_path) if r.data.tags.get("nbs.kind") == "schedule"]
            if sum(r.data.tags["nbs.schedule.outcome"] == "finished" for r in fires) >= 2:
                break
            time.sleep(1)
        descendants = [p for s in schedulers for p in psutil.Process(s.pid).children(recursive=True)]
        for scheduler in schedulers:
            scheduler.send_signal(signal.SIGTERM)
        assert [s.wait(60) for s in schedulers] == [128 + signal.SIGTERM] * 2
        gone, alive = psutil.wait_procs(descendants, timeout=15)
        assert alive == [], "a job or kernel outlived its scheduler"
    finally:
        for scheduler in schedulers:
            if scheduler.poll() is None:
                os.killpg(scheduler.pid, signal.SIGKILL)
                scheduler.wait(10)
    runs = runs_of(tmp_path)
    assert "RUNNING" not in {r.info.status for r in runs}
    fires = [r for r in runs if r.data.tags["nbs.kind"] == "schedule"]
    outcomes = [r.data.tags["nbs.schedule.outcome"] for r in fires]
    assert outcomes.count("finished") >= 2 and outcomes.count("skipped") >= 1, outcomes
    assert set(outcomes) <= {"finished", "skipped", "killed"}, (outcomes, [log.read_text()[-3000:] for log in logs])
    assert all("still running" in r.data.tags["nbs.schedule.reason"] for r in fires
               if r.data.tags["nbs.schedule.outcome"] == "skipped")
    executions = sorted((r.info.start_time, r.info.end_time) for r in runs if r.data.tags["nbs.kind"] == "execution")
    # a fire killed while its `nbs execute` was still starting has no execution run yet
    assert outcomes.count("finished") <= len(executions) <= outcomes.count("finished") + outcomes.count("killed")
    assert all(executions[i][1] <= executions[i + 1][0] for i in range(len(executions) - 1)), \
        "two executions of one job overlapped"
