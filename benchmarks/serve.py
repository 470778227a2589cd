"""Benchmark: `nbs serve` against `mlflow models serve`, same model, same machine, same load, one run.

A logistic-regression model trained on the default data is registered in a scratch store;
two servers answer the same requests in turn: `nbs serve` with its prediction log (as it runs
by default) and `mlflow models serve` (the baseline, one uvicorn worker like ours). Each load
is sent by CONCURRENCY client threads over kept-alive connections; the servers take turns round
after round, so drift in the machine's speed falls on both alike. Reported: median throughput
over rounds, p50 and p99 latency over all requests, and ratios against the baseline.

Part of `make bench` (benchmarks/run.py).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import BIN, Figure

NAME = "bench-classifier"


def register(root: Path) -> list[dict]:
    "Train and register the model in ROOT/mlflow.db; records of the holdout table to send."
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    os.chdir(root)
    from nbs_lib.core.data import load_builtin
    from nbs_lib.core.tracking import open_store
    from nbs_lib.ml.features import split_holdout
    from nbs_lib.ml.train import train_model
    from nbs_lib.registry.versions import register_model

    open_store(os.environ["MLFLOW_TRACKING_URI"])
    train, test = split_holdout(load_builtin(), "target", 0.2, 42)
    register_model(train_model(train, "target"), NAME, train.drop(columns=["target"]), experiment="bench")
    return test.drop(columns=["target"]).to_dict(orient="records")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], ready_path: str, port: int, root: Path) -> subprocess.Popen:
    "Start a server in its own process group and wait until `ready_path` answers 200."
    # mlflow models serve runs `uvicorn` from PATH: the venv's, as `make bench` would find it
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[:3]} exited: {process.stderr.read().decode()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", ready_path)
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.3)
    stop(process)
    raise SystemExit(f"{command[:3]} was not ready after 120 s")


def stop(process: subprocess.Popen) -> None:
    "SIGTERM to the server's process group, SIGKILL if it lingers."
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def load(port: int, path: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    "Send every body once from `concurrency` threads (kept-alive connections); requests per second and latencies (ms)."
    latencies: list[float] = []
    failures: list[str] = []
    share = [bodies[i::concurrency] for i in range(concurrency)]

    def client(mine: list[bytes]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.connect()
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        headers = {"Content-Type": "application/json"}
        for body in mine:
            started = time.perf_counter()
            connection.request("POST", path, body, headers)
            answer = connection.getresponse()
            answer.read()
            latencies.append((time.perf_counter() - started) * 1000)
            if answer.status != 200:
                failures.append(f"{answer.status}")
        connection.close()

    threads = [threading.Thread(target=client, args=(mine,)) for mine in share]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} requests failed on port {port}: {failures[:5]}")
    return len(bodies) / elapsed, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measure(rounds: int = 3, requests: int = 1500, concurrency: int = 4) -> list[Figure]:
    "Throughput and latency of both servers, alternating, on both loads; figures against mlflow's server."
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    here = Path.cwd()
    records = register(root)
    os.chdir(here)
    uri = f"models:/{NAME}/1"
    ports = {name: free_port() for name in ("nbs serve", "mlflow models serve")}
    commands = {
        "nbs serve": ([str(BIN / "nbs"), "serve", "--model", uri, "--port", str(ports["nbs serve"]),
                       "--prediction-log", str(root / "predictions.db"), "--root", str(root)], "/ready", "/predict"),
        "mlflow models serve": ([str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(ports["mlflow models serve"]), "-w", "1"], "/ping", "/invocations"),
    }
    loads = {"1 record per request": 1, "100 records per request": 100}
    processes = {}
    try:
        for name, (command, ready, _) in commands.items():
            processes[name] = start(command, ready, ports[name], root)
        results = {(load_name, name): {"throughput": [], "latencies": []} for load_name in loads for name in commands}
        for load_name, size in loads.items():
            count = requests if size == 1 else max(requests // 10, 50)
            bodies = [json.dumps({"dataframe_records": [records[(i * size + j) % len(records)] for j in range(size)]}).encode()
                      for i in range(count)]
            for name in commands:  # warm-up
                load(ports[name], commands[name][2], bodies[:50], concurrency)
            for round_number in range(rounds):
                order = list(commands) if round_number % 2 == 0 else list(reversed(commands))
                for name in order:
                    throughput, latencies = load(ports[name], commands[name][2], bodies, concurrency)
                    results[(load_name, name)]["throughput"].append(throughput)
                    results[(load_name, name)]["latencies"].extend(latencies)
    finally:
        for process in processes.values():
            stop(process)
        shutil.rmtree(root, ignore_errors=True)
    figures = []
    for load_name in loads:
        base, mine = results[(load_name, "mlflow models serve")], results[(load_name, "nbs serve")]
        figure = Figure(f"serving throughput, {load_name}", "nbs serve (req/s)", "mlflow models serve (req/s)",
                        mine["throughput"], base["throughput"], unit="req/s", target=">= 1.0x",
                        higher_is_better=True)
        p50, p99 = percentile(mine["latencies"], 50), percentile(mine["latencies"], 99)
        base_p99 = percentile(base["latencies"], 99)
        figure.notes.append(f"nbs serve: p50 {p50:.1f} ms, p99 {p99:.1f} ms; mlflow: p50 "
                            f"{percentile(base['latencies'], 50):.1f} ms, p99 {base_p99:.1f} ms "
                            f"(p99 {p99 / base_p99:.2f}x{', no worse' if p99 <= base_p99 else ', WORSE'}); "
                            f"{concurrency} client threads, {rounds} rounds")
        figures.append(figure)
    return figures
