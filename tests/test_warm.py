"""The warm worker (`nbs warm`, NBS_WARM=1) under real commands on the tiny two-task pipeline: a build through it
says, exits and records what a cold one does, two callers at once each get their own answer, SIGTERM to a caller stops
its build as it stops a cold one, a caller killed outright takes its build and kernel with it, a worker older than the
library gives way to a new one, and a folder others can enter is one line. Each test's workers live in a TMPDIR of its
own and are stopped by the test."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import NBS, ROOT, nbs_env, run_nbs, runs_of, start_sleeping_build

pytestmark = pytest.mark.build  # each test builds the tiny pipeline


def _statuses(root: Path) -> list[tuple[str, str]]:
    return sorted((r.data.tags.get("nbs.task", "pipeline"), r.info.status) for r in runs_of(root, "tiny"))


def _stop_workers(folder: Path) -> None:
    "Stop every worker that has a lock in `folder` (its pid is written in it) and wait for its end."
    for lock in folder.glob("nbs-warm-*/*.lock"):
        with contextlib.suppress(ValueError, psutil.NoSuchProcess):
            worker = psutil.Process(int(lock.read_text()))
            if "nbs_lib.cli.warm" in " ".join(worker.cmdline()):
                worker.terminate()
                worker.wait(60)


@pytest.fixture
def warm(tiny: Path):
    "The environment of commands that start from a worker of this test's own, started here (its pid too)."
    folder = Path(tempfile.mkdtemp(prefix="nbs-warm-test-"))  # short: a socket's path has 107 bytes at most
    env = {"TMPDIR": str(folder), "NBS_WARM": "1"}
    try:
        started = run_nbs("warm", "start", "--idle-timeout", "600", cwd=tiny, env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"env": env, "pid": int(started.stdout.split("pid ")[1].split(")")[0]), "folder": folder}
    finally:
        _stop_workers(folder)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_build_through_the_warm_worker_says_exits_and_records_what_a_cold_one_does(tiny, warm):
    cold = run_nbs("run", "-p", "mode=raise", cwd=tiny, env={**warm["env"], "NBS_WARM": "0"})
    hot = run_nbs("run", "-p", "mode=raise", cwd=tiny, env=warm["env"])
    failure = "task 'first' (first.ipynb) failed at cell 1 (import os, sys, time; cell 4 of the executed notebook)"
    assert hot.returncode == cold.returncode == 1 and failure in hot.stderr and failure in cold.stderr, hot.stderr
    assert [line for line in hot.stderr.splitlines() if line.startswith("nbs: error")] == \
        [line for line in cold.stderr.splitlines() if line.startswith("nbs: error")]

    built = run_nbs("run", cwd=tiny, env=warm["env"])
    assert built.returncode == 0, built.stderr
    assert (tiny / "products" / "second.txt").read_text() == "ok"
    assert _statuses(tiny) == sorted([("pipeline", "FAILED"), ("first", "FAILED")] * 2 +
                                     [("pipeline", "FINISHED"), ("first", "FINISHED"), ("second", "FINISHED")])

    env = nbs_env(warm["env"])
    callers = [subprocess.Popen([str(NBS), "runs", "-n", "5"], cwd=tiny, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]  # at once
    answers = [caller.communicate(timeout=120) for caller in callers]
    alone = run_nbs("runs", "-n", "5", cwd=tiny, env={**warm["env"], "NBS_WARM": "0"})
    assert [caller.returncode for caller in callers] == [0, 0]
    assert answers[0][0] == answers[1][0] == alone.stdout and "FINISHED" in alone.stdout
    status = run_nbs("warm", "status", cwd=tiny, env=warm["env"]).stdout
    assert f"warm worker pid {warm['pid']}," in status and "4 commands served, 0 running" in status, status


def test_a_worker_told_to_stop_ends_after_the_commands_it_runs(tiny, warm):
    env = nbs_env(warm["env"])
    build = subprocess.Popen([str(NBS), "run"], cwd=tiny, env=env, stderr=subprocess.PIPE, text=True)
    for line in build.stderr:
        if "running  first" in line:
            break
    worker = psutil.Process(warm["pid"])
    worker.terminate()  # as `nbs warm stop` or a shutdown asks it
    said = build.stderr.read()
    assert build.wait(120) == 0, said
    assert (tiny / "products" / "second.txt").read_text() == "ok"
    worker.wait(60)


def test_sigterm_to_the_caller_stops_the_build_and_its_kernel_as_a_cold_build_stops(tiny, warm):
    build, kernels = start_sleeping_build(tiny, env=warm["env"], kernels_of=warm["pid"])
    try:
        build.send_signal(signal.SIGTERM)
        assert build.wait(30) == 128 + signal.SIGTERM
        assert "nbs: stopped by SIGTERM" in build.stderr.read()
        _, alive = psutil.wait_procs(kernels, timeout=15)
        assert alive == [], "the kernel outlived the build"
    finally:
        for kernel in kernels:
            with contextlib.suppress(psutil.NoSuchProcess):
                kernel.kill()
        if build.poll() is None:
            build.kill()
    assert _statuses(tiny) == [("first", "KILLED"), ("pipeline", "KILLED")]


def test_a_caller_killed_outright_takes_its_build_and_kernel_with_it(tiny, warm):
    build, kernels = start_sleeping_build(tiny, env=warm["env"], kernels_of=warm["pid"])
    try:
        build.kill()  # SIGKILL: the caller cannot pass anything on; the worker sees its connection close
        build.wait(30)
        _, alive = psutil.wait_procs(kernels, timeout=30)
        assert alive == [], "the kernel outlived its caller"
        deadline = time.monotonic() + 30
        while _statuses(tiny) != [("first", "KILLED"), ("pipeline", "KILLED")]:  # the command marks them as it ends
            assert time.monotonic() < deadline, _statuses(tiny)
            time.sleep(0.2)
    finally:
        for kernel in kernels:
            with contextlib.suppress(psutil.NoSuchProcess):
                kernel.kill()
    assert "0 running" in run_nbs("warm", "status", cwd=tiny, env=warm["env"]).stdout


def test_a_worker_older_than_the_library_gives_way_to_a_new_one(tiny):
    shutil.copytree(ROOT / "nbs_lib", tiny / "nbs_lib", ignore=shutil.ignore_patterns("__pycache__"))  # its own copy
    folder = Path(tempfile.mkdtemp(prefix="nbs-warm-test-"))
    env = {"TMPDIR": str(folder), "NBS_WARM": "1"}
    try:
        started = run_nbs("warm", "start", cwd=tiny, env=env)
        assert started.returncode == 0, started.stderr
        old = psutil.Process(int(started.stdout.split("pid ")[1].split(")")[0]))
        edited = tiny / "nbs_lib" / "core" / "errors.py"
        edited.write_text(edited.read_text() + "\n")  # as nbdev_export does after an edit: the worker's imports are old
        built = run_nbs("run", cwd=tiny, env=env)
        assert built.returncode == 0, built.stderr  # run without the worker
        old.wait(60)  # it ended, having no command left
        deadline = time.monotonic() + 180
        while not (said := run_nbs("warm", "status", cwd=tiny, env=env).stdout).startswith("warm worker pid"):
            assert time.monotonic() < deadline, said  # the one that command started for the next
            time.sleep(0.5)
        assert f"pid {old.pid}," not in said and "0 commands served" in said
        again = run_nbs("run", "--force", cwd=tiny, env=env)
        assert again.returncode == 0 and "1 commands served" in run_nbs("warm", "status", cwd=tiny, env=env).stdout
    finally:
        _stop_workers(folder)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_worker_folder_that_others_can_enter_is_one_line_and_commands_still_run(tiny):
    folder = Path(tempfile.mkdtemp(prefix="nbs-warm-test-"))
    try:
        shared = folder / f"nbs-warm-{os.getuid()}"
        shared.mkdir()
        shared.chmod(0o755)
        refused = run_nbs("warm", "start", cwd=tiny, env={"TMPDIR": str(folder)})
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.splitlines() == [
            f"nbs: error: warm worker: {shared} is not a folder that only this user can enter",
            "  hint: remove it, or set TMPDIR to a folder of your own"]
        done = run_nbs("run", cwd=tiny, env={"TMPDIR": str(folder), "NBS_WARM": "1"})
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines()[0] == (f"nbs: warning: warm worker: {shared} is not a folder that only this "
                                               "user can enter; running without the warm worker")
        assert list(shared.iterdir()) == []  # no worker started there
    finally:
        shutil.rmtree(folder, ignore_errors=True)
