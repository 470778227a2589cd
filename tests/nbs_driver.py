"""Run `nbs` (its `main`, as the console script does) on many argument lists in one process, so that a test of
dozens of refusals pays Python's, MLflow's and Ploomber's imports once instead of once a command.

    python nbs_driver.py < cases.json > outcomes.json

cases.json is a list of argument lists; outcomes.json a list of {"code", "stdout", "stderr"}. Each command runs
from the current folder with the environment and signal handlers the driver started with, its file descriptors
1 and 2 captured (what its child processes print too); an exception that escapes `main` is written to its stderr
as the interpreter would write it, traceback and all.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import traceback


def run_one(argv: list[str], start: dict) -> dict:
    "One `nbs ARGV` in the state `start` recorded; its exit code and what it wrote."
    from nbs_lib.cli import main

    os.chdir(start["cwd"])
    os.environ.clear()
    os.environ.update(start["env"])
    for sig, handler in start["handlers"].items():
        signal.signal(sig, handler)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile(mode="w+") for fd in (1, 2)}
    try:
        for fd, file in files.items():
            os.dup2(file.fileno(), fd)
        try:
            code = main(argv)
        except SystemExit as e:  # main returns its code; an exit from deeper down is one too
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
    said = {}
    for fd, file in files.items():
        file.seek(0)
        said[fd] = file.read()
        file.close()
    return {"code": code, "stdout": said[1], "stderr": said[2]}


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    start = {"cwd": os.getcwd(), "env": dict(os.environ),
             "handlers": {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}}
    outcomes = [run_one(argv, start) for argv in cases]
    os.chdir(start["cwd"])
    print(json.dumps(outcomes))
