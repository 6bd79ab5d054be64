"""Serving benchmark: in-process prediction figures, then gunicorn against a no-model Flask app.

    .venv/bin/python benchmarks/serving.py --model-dir data/model       # make bench-serving
    .venv/bin/python benchmarks/serving.py --train-if-missing --out bench-results/serving.json

In-process (this process only; p50/p99 of individually timed calls):
  * one row: ``ServingModel.predict_one`` (the threshold grid, what GET /predict uses), the numpy
    tree walk on one row, a plain Python walk of the trees (the issue's 44 us reference), and a
    whole GET /predict through Flask's test client (routing, validation, JSON; no socket);
  * batches: rows/s of ``ServingModel.predict`` on 1M rows, of the numpy tree walk, and of
    POST /predict with MAX_BATCH instances through the test client (JSON parsing included).

Through gunicorn (loopback, wrk): a trivial Flask app whose GET /predict returns a constant, under
plain gunicorn (its defaults: sync workers, no config file), and ``serving.wsgi:app`` on the model
under ``serving/gunicorn.conf.py`` as is (``--worker-classes config``) and with other worker classes
(``sync``, ``gthread`` with ``--threads``, ``gevent``); all up at once, ``--workers`` each. Short
wrk runs alternate between them ``--rounds`` times, each with keep-alive (wrk's default) and with
``Connection: close`` (a new connection per request), bounded by ``--duration`` and
``--max-requests``. Prints requests/s, p50/p99 latency, the servers' CPU per request and errors.
Then, per server and per count in ``--slow-clients``, holds that many connections that sent half a
request's headers and times a fresh GET /health (5 s timeout: "down" beyond). wrk, the workers and
the masters share the machine's cores, so the absolute figures understate a real server.

A script, not a test: the figures depend on the machine and on what else runs on it (the load
average is printed before and after).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from common import machine_info, now_iso, percentile, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # serving/ lives at the project root, outside the installed package

from serving.app import create_app  # noqa: E402
from serving.forest import FEATURES, Forest, ServingModel, load_model  # noqa: E402

GUNICORN = Path(sys.executable).with_name("gunicorn")
VMA, MED = FEATURES

# The no-model baseline: the same Flask and gunicorn, a constant answer.
NOOP_APP = """
from flask import Flask

app = Flask(__name__)


@app.get("/predict")
def predict():
    return {"predicted_volume": 0}
"""

# wrk picks a random path from the list for each request and stops after max_requests answers.
WRK_SCRIPT = """
local paths = {%s}
local headers = %s
local answered, max_requests = 0, %d
request = function()
  return wrk.format("GET", paths[math.random(#paths)], headers)
end
response = function(status, headers, body)
  answered = answered + 1
  if answered >= max_requests then wrk.thread:stop() end
end
"""


def sample_inputs(n: int, seed: int = 1) -> np.ndarray:
    """Feature rows spread like the real ones (log-normal volumes and prices)."""
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.lognormal(13.0, 2.0, n), rng.lognormal(3.5, 1.5, n)])


def call_times(fn: Callable[..., Any], calls: Sequence[tuple]) -> list[float]:
    """Seconds per call, each call timed on its own."""
    clock = time.perf_counter_ns
    times = []
    for args in calls:
        start = clock()
        fn(*args)
        times.append((clock() - start) / 1e9)
    return times


def latency_row(name: str, times: Sequence[float]) -> dict[str, Any]:
    return {
        "name": name,
        "calls": len(times),
        "p50_us": percentile(times, 50) * 1e6,
        "p99_us": percentile(times, 99) * 1e6,
        "mean_us": statistics.fmean(times) * 1e6,
    }


def python_walk(forest: Forest) -> Callable[[float, float], float]:
    """A plain Python walk of every tree (the reference the issue measured at 44 us)."""
    feature, threshold = forest.feature.tolist(), forest.threshold.tolist()
    left, right, value = forest.left.tolist(), forest.right.tolist(), forest.value.tolist()
    roots, n = forest.roots.tolist(), forest.num_trees

    def predict(x0: float, x1: float) -> float:
        x = (x0, x1)
        total = 0.0
        for node in roots:
            while left[node] != node:
                node = left[node] if x[feature[node]] <= threshold[node] else right[node]
            total += value[node]
        return total / n

    return predict


def in_process(model: ServingModel, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    calls = [tuple(row) for row in sample_inputs(args.calls).tolist()]
    walk_one = model.forest.walk
    app = create_app({"MODEL_DIR": str(model_dir)})
    client = app.test_client()
    urls = [f"/predict?{VMA}={a!r}&{MED}={b!r}" for a, b in calls[: args.calls // 10]]

    call_times(model.predict_one, calls[:1000])  # warm-up
    one_row = [
        latency_row("timer overhead (empty call)", call_times(lambda *_: None, calls)),
        latency_row("predict_one: threshold grid", call_times(model.predict_one, calls)),
        latency_row(
            "numpy tree walk, one row",
            call_times(lambda a, b: walk_one(np.array([[a, b]])), calls[: args.calls // 20]),
        ),
        latency_row("plain Python tree walk", call_times(python_walk(model.forest), calls)),
        latency_row(
            "GET /predict via Flask test client", call_times(client.get, [(u,) for u in urls])
        ),
    ]

    batch = sample_inputs(args.batch_rows, seed=2)
    walk_rows = batch[: max(1, args.batch_rows // 20)]
    max_batch = app.config["MAX_BATCH"]
    body = json.dumps(
        {"instances": [{VMA: a, MED: b} for a, b in batch[:max_batch].tolist()]}
    ).encode()

    def post() -> None:
        response = client.post("/predict", data=body, content_type="application/json")
        assert response.status_code == 200, response.get_data(as_text=True)

    batches = [
        rows_per_second("predict: threshold grid", lambda: model.predict(batch), len(batch)),
        rows_per_second("numpy tree walk", lambda: model.forest.walk(walk_rows), len(walk_rows)),
        rows_per_second(f"POST /predict, {max_batch} instances, test client", post, max_batch),
    ]
    return {"one_row": one_row, "batches": batches}


def rows_per_second(name: str, run: Callable[[], Any], rows: int, repeats: int = 5) -> dict:
    run()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    best, median = min(seconds), statistics.median(seconds)
    return {"name": name, "rows": rows, "rows_per_s": rows / median, "best_rows_per_s": rows / best}


# --- through gunicorn ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """One server to measure: a gunicorn command line and its environment."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]


def server_specs(model_dir: Path, args: argparse.Namespace, work: Path) -> list[ServerSpec]:
    """The no-model Flask app under plain gunicorn (its defaults: sync workers, no config file),
    then serving.wsgi:app under serving/gunicorn.conf.py once per worker class asked for."""
    specs = [
        ServerSpec(
            "no-model Flask app, plain gunicorn (sync)",
            ("--workers", str(args.workers), "--pythonpath", str(work), "noop_app:app"),
            {},
        )
    ]
    for worker_class in args.worker_classes.split(","):
        extra = ("--threads", str(args.threads)) if worker_class == "gthread" else ()
        if worker_class == "config":
            name, flags = "serving.wsgi:app, gunicorn.conf.py", ()
        else:
            name, flags = f"serving.wsgi:app, -k {worker_class}", ("-k", worker_class, *extra)
        specs.append(
            ServerSpec(
                name,
                ("--config", "serving/gunicorn.conf.py", *flags, "serving.wsgi:app"),
                {"MODEL_DIR": str(model_dir), "WEB_CONCURRENCY": str(args.workers)},
            )
        )
    return specs


@contextlib.contextmanager
def gunicorn(spec: ServerSpec, log: Path) -> Iterator[tuple[str, int]]:
    """gunicorn on a free loopback port; yields (URL, master pid)."""
    env = {**os.environ, **spec.env, "HOST": "127.0.0.1", "PORT": "0"}
    command = [str(GUNICORN), "--bind", "127.0.0.1:0", *spec.argv]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        pattern = re.compile(r"Listening at: (http://127\.0\.0\.1:\d+)")
        while not (found := pattern.search(log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn did not start:\n{log.read_text()}")
            time.sleep(0.1)
        url = found.group(1)
        while log.read_text().count("Booting worker") < 1 or not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn is not ready:\n{log.read_text()}")
            time.sleep(0.2)
        time.sleep(1.0)  # let every worker finish importing before the clock starts
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/predict?{VMA}=1&{MED}=1", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _milliseconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(url: str, script: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        shutil.which("wrk") or "wrk",
        "--threads",
        "1",
        "--connections",
        str(args.connections),
        "--duration",
        f"{args.duration}s",
        "--timeout",
        "5s",
        "--latency",
        "--script",
        str(script),
        url,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+(?:us|ms|s))$", out, re.MULTILINE))
    return {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _milliseconds(latency["50"]),
        "p99_ms": _milliseconds(latency["99"]),
        # With Connection: close, wrk counts the server's close after each answer as a read error.
        "socket_errors": sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


def server_cpu_seconds(master_pid: int) -> float:
    """User + system CPU seconds used so far by a gunicorn master and its workers."""
    master = psutil.Process(master_pid)
    return sum(sum(p.cpu_times()[:2]) for p in [master, *master.children(recursive=True)])


def slow_clients(url: str, count: int, timeout: float = 5.0) -> float | None:
    """Hold ``count`` connections that sent half a request's headers, then time a fresh
    GET /health; its seconds, or None if it got no answer within ``timeout`` (the API is down)."""
    host, port = url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(count):
            sock = socket.create_connection((host, int(port)), timeout=timeout)
            held.append(sock)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.5)  # let the workers take them
        started = time.monotonic()
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request("GET", "/health")
            conn.getresponse().read()
            return time.monotonic() - started
        except OSError:
            return None
        finally:
            conn.close()
    finally:
        for sock in held:
            sock.close()
        time.sleep(1.0)  # let the server notice the closes before the next measurement


def through_gunicorn(model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every server up at once; short wrk runs alternate between them (with keep-alive and with
    Connection: close), so drifts in the machine's load hit all alike. Besides requests/s, the
    servers' CPU seconds per request are counted: on a shared machine that is the steadier figure.
    Then each server's answer to held-open connections (``--slow-clients``)."""
    if shutil.which("wrk") is None:
        return {"skipped": "wrk is not installed (apt-get install wrk)"}
    (work / "noop_app.py").write_text(NOOP_APP)
    paths = [f"/predict?{VMA}={a!r}&{MED}={b!r}" for a, b in sample_inputs(1000, 3).tolist()]
    scripts = {}
    for mode, headers in (("keep-alive", "{}"), ("close", '{["Connection"] = "close"}')):
        scripts[mode] = work / f"{mode}.lua"
        scripts[mode].write_text(
            WRK_SCRIPT % (", ".join(json.dumps(p) for p in paths), headers, args.max_requests)
        )
    specs = server_specs(model_dir, args, work)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {
        (spec.name, mode): [] for spec in specs for mode in scripts
    }
    held: dict[str, dict[int, float | None]] = {spec.name: {} for spec in specs}
    with contextlib.ExitStack() as stack:
        servers = {
            spec.name: stack.enter_context(gunicorn(spec, work / f"{i}.log"))
            for i, spec in enumerate(specs)
        }
        for _ in range(args.rounds):
            for (name, mode), results in runs.items():
                url, pid = servers[name]
                cpu = server_cpu_seconds(pid)
                result = run_wrk(url, scripts[mode], args)
                result["server_cpu_us_per_request"] = (
                    (server_cpu_seconds(pid) - cpu) / max(result["requests"], 1) * 1e6
                )
                results.append(result)
        counts = [int(n) for n in args.slow_clients.split(",") if n]
        for name, (url, _) in servers.items():
            for count in counts:
                held[name][count] = slow_clients(url, count)
    rows = [
        {
            "server": name,
            "mode": mode,
            "requests_per_s": statistics.median(r["requests_per_s"] for r in results),
            "p50_ms": statistics.median(r["p50_ms"] for r in results),
            "p99_ms": statistics.median(r["p99_ms"] for r in results),
            "cpu_us_per_request": statistics.median(
                r["server_cpu_us_per_request"] for r in results
            ),
            "non_2xx": sum(r["non_2xx"] for r in results),
            "socket_errors": sum(r["socket_errors"] for r in results),
            "requests": sum(r["requests"] for r in results),
            "runs": results,
        }
        for (name, mode), results in runs.items()
    ]
    return {"rows": rows, "slow_clients": held}


# --- report ---------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    print(f"\n{results['started_at']}  load average before {results['load_before']}")
    print(f"model: {results['model']}")
    print("\nin-process, one row                        p50 us    p99 us   mean us     calls")
    for row in results["in_process"]["one_row"]:
        print(
            f"  {row['name']:<40}{row['p50_us']:>8.2f}{row['p99_us']:>10.2f}"
            f"{row['mean_us']:>10.2f}{row['calls']:>10}"
        )
    print(
        "\nin-process, batches                          rows/s (median)   rows/s (best)      rows"
    )
    for row in results["in_process"]["batches"]:
        print(
            f"  {row['name']:<44}{row['rows_per_s']:>14,.0f}{row['best_rows_per_s']:>16,.0f}"
            f"{row['rows']:>10,}"
        )
    http = results["through_gunicorn"]
    if "skipped" in http:
        print(f"\nthrough gunicorn: skipped, {http['skipped']}")
    else:
        a = results["args"]
        print(
            f"\nthrough gunicorn ({a['workers']} workers each, wrk 1 thread {a['connections']}"
            f" connections, {a['duration']} s x {a['rounds']} alternated rounds, same cores)"
        )
        print(
            f"  {'server':<44}{'mode':<12}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
            f"{'CPU us/req':>11}{'non-2xx':>8}{'sock err':>9}{'requests':>10}"
        )
        for row in http["rows"]:
            print(
                f"  {row['server']:<44}{row['mode']:<12}{row['requests_per_s']:>8,.0f}"
                f"{row['p50_ms']:>8.2f}{row['p99_ms']:>8.2f}{row['cpu_us_per_request']:>11,.0f}"
                f"{row['non_2xx']:>8}{row['socket_errors']:>9}{row['requests']:>10,}"
            )
        print("\n  held connections (half a request each): a fresh GET /health answered in")
        for name, held in http["slow_clients"].items():
            cells = "  ".join(
                f"{count}: {'down' if s is None else f'{s * 1000:.0f} ms'}"
                for count, s in held.items()
            )
            print(f"  {name:<44}{cells}")
    print(f"\nload average after {results['load_after']}")


def ensure_model(model_dir: Path, train: bool) -> None:
    if model_dir.exists():
        return
    if not train:
        raise SystemExit(f"no model at {model_dir}: run `make run`, or pass --train-if-missing")
    import pandas as pd

    from stockvol.config import ModelParams, load_config
    from stockvol.spark import build_session
    from stockvol.train import export_model, fit_pipeline

    print(f"no model at {model_dir}: fitting 100 trees of depth 5 on 20,000 sample rows")
    spark = build_session(load_config(), "bench-serving-model", master="local[2]")
    try:
        x = sample_inputs(20_000, seed=4)
        volume = x[:, 0] * np.random.default_rng(5).lognormal(0.0, 0.3, len(x))
        frame = pd.DataFrame({VMA: x[:, 0], MED: x[:, 1], "Volume": volume})
        model = fit_pipeline(
            spark.createDataFrame(frame), ModelParams(num_trees=100, max_depth=5, seed=42)
        )
        export_model(model, {"note": "benchmark model on generated rows"}, b"", model_dir)
    finally:
        spark.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "data" / "model")
    parser.add_argument("--train-if-missing", action="store_true", help="fit one with Spark")
    parser.add_argument("--calls", type=int, default=200_000, help="one-row calls timed")
    parser.add_argument("--batch-rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument(
        "--worker-classes",
        default="config",
        help="comma-separated: config (serving/gunicorn.conf.py as is), sync, gthread, gevent",
    )
    parser.add_argument("--threads", type=int, default=16, help="per gthread worker")
    parser.add_argument(
        "--slow-clients", default="2,64,256,900", help="held connections to try, comma-separated"
    )
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--max-requests", type=int, default=500_000, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="baseline/model alternations")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_model(args.model_dir, args.train_if_missing)
    model = load_model(args.model_dir)
    results: dict[str, Any] = {
        "started_at": now_iso(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"dir": model.info["resolved_dir"], **model.info["forest"]},
    }
    results["in_process"] = in_process(model, args.model_dir, args)
    with tempfile.TemporaryDirectory() as work:
        results["through_gunicorn"] = (
            {"skipped": "--skip-http"}
            if args.skip_http
            else through_gunicorn(args.model_dir, args, Path(work))
        )
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report(results)
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
