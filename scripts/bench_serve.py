"""Benchmark: `nbs serve` against `mlflow models serve`, same model, same machine, same load, one run.

A logistic-regression pipeline trained on the default data is registered in a scratch store;
three servers answer the same requests in turn: `nbs serve` with its prediction log (as it
runs by default), `nbs serve --no-prediction-log` (what the log costs) and `mlflow models serve`
(the baseline, one uvicorn worker like ours). Each load is sent by CONCURRENCY client threads
over kept-alive connections; servers take turns round after round, so drift in the machine's
speed falls on all of them alike. Reported: median throughput over rounds, p50 and p99 latency
over all requests, and ratios against the baseline.

    .venv/bin/python scripts/bench_serve.py [--rounds 3] [--requests 1500] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
NAME = "bench-classifier"


def register(root: Path) -> list[dict]:
    "Train and register the model in ROOT/mlflow.db; records of the holdout table to send."
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    os.chdir(root)
    from nbs_lib.data import load_builtin
    from nbs_lib.features import split_holdout
    from nbs_lib.registry import register_model
    from nbs_lib.tracking import open_store
    from nbs_lib.train import train_model

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1500, help="requests per server per round and load")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    records = register(root)
    uri = f"models:/{NAME}/1"
    ports = {name: free_port() for name in ("nbs serve", "nbs serve, no log", "mlflow models serve")}
    commands = {
        "nbs serve": ([str(BIN / "nbs"), "serve", "--model", uri, "--port", str(ports["nbs serve"]),
                       "--prediction-log", str(root / "predictions.db"), "--root", str(root)], "/ready", "/predict"),
        "nbs serve, no log": ([str(BIN / "nbs"), "serve", "--model", uri, "--port", str(ports["nbs serve, no log"]),
                               "--no-prediction-log", "--root", str(root)], "/ready", "/predict"),
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
            count = args.requests if size == 1 else max(args.requests // 10, 50)
            bodies = [json.dumps({"dataframe_records": [records[(i * size + j) % len(records)] for j in range(size)]}).encode()
                      for i in range(count)]
            for name in commands:  # warm-up
                load(ports[name], commands[name][2], bodies[:50], args.concurrency)
            for round_number in range(args.rounds):
                order = list(commands) if round_number % 2 == 0 else list(reversed(commands))
                for name in order:
                    throughput, latencies = load(ports[name], commands[name][2], bodies, args.concurrency)
                    results[(load_name, name)]["throughput"].append(throughput)
                    results[(load_name, name)]["latencies"].extend(latencies)
    finally:
        for process in processes.values():
            stop(process)
    import platform
    from importlib.metadata import version

    print(f"\n## nbs serve vs mlflow models serve ({time.strftime('%Y-%m-%d')})\n")
    print(f"Command: `.venv/bin/python scripts/bench_serve.py --rounds {args.rounds} --requests {args.requests} "
          f"--concurrency {args.concurrency}`  ")
    print(f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, mlflow {version('mlflow')}, "
          f"uvicorn {version('uvicorn')}, fastapi {version('fastapi')}, scikit-learn {version('scikit-learn')}. "
          f"{args.concurrency} client threads on the same machine, one server process each.\n")
    print("| load | server | req/s (median of rounds) | spread | p50 ms | p99 ms | throughput vs mlflow | p99 vs mlflow |")
    print("|---|---|---|---|---|---|---|---|")
    for load_name in loads:
        base = results[(load_name, "mlflow models serve")]
        base_tp, base_p99 = statistics.median(base["throughput"]), percentile(base["latencies"], 99)
        for name in commands:
            r = results[(load_name, name)]
            tp = statistics.median(r["throughput"])
            spread = f"{min(r['throughput']):.0f}-{max(r['throughput']):.0f}"
            p50, p99 = percentile(r["latencies"], 50), percentile(r["latencies"], 99)
            print(f"| {load_name} | {name} | {tp:.0f} | {spread} | {p50:.1f} | {p99:.1f} | "
                  f"{tp / base_tp:.2f}x | {p99 / base_p99:.2f}x |")


if __name__ == "__main__":
    main()
