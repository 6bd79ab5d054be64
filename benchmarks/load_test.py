"""Bounded load test of the prediction API: gunicorn on 127.0.0.1, many concurrent connections.

    .venv/bin/python benchmarks/load_test.py --model-dir data/model                # 60 s, 64 conns
    .venv/bin/python benchmarks/load_test.py --duration 12 --tiny-model-if-missing  # make test-load

Starts gunicorn (``serving/gunicorn.conf.py``, ``serving.wsgi:app``) on a free loopback port over
MODEL_DIR, learns the answer to each request of a fixed mix (GET one row, POST small batches), then
fires that mix from ``--connections`` concurrent connections for ``--duration`` seconds or
``--max-requests`` requests, whichever ends first. Every response is checked: status 200 and the
exact body learned before (so a wrong or partial answer is an error too). Connection failures and
requests slower than ``--timeout`` are errors. Prints throughput and latency percentiles, writes
them as JSON, and exits 1 on any error. With ``--client wrk`` (needs ``wrk`` on PATH) the load
comes from wrk instead, which spends less CPU than Python on a small machine; wrk checks statuses
only. A script, not a test: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
from common import machine_info, now_iso, percentile, write_json

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).parent / "gunicorn"
FEATURES = ("vol_moving_avg", "adj_close_rolling_med")


# --- the server ----------------------------------------------------------------------------------


@contextlib.contextmanager
def gunicorn(model_dir: Path, workers: int, log: Path) -> Iterator[int]:
    """gunicorn over ``model_dir`` on 127.0.0.1; yields its port once /health answers 200."""
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "SERVING_MODEL_REQUIRED": "true",
        "HOST": "127.0.0.1",
        "PORT": "0",
        "WEB_CONCURRENCY": str(workers),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(GUNICORN), "-c", "serving/gunicorn.conf.py", "serving.wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn did not start:\n{log.read_text()}")
            time.sleep(0.05)
        port = int(found.group(1))
        while log.read_text().count("Booting worker") < workers or _status(port) != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn is not healthy:\n{log.read_text()}")
            time.sleep(0.1)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _status(port: int) -> int:
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return -1


def tiny_model(model_dir: Path) -> None:
    """Fit and export a small real forest (Spark, a few seconds after the JVM starts)."""
    import pandas as pd

    from stockvol.config import ModelParams, load_config
    from stockvol.spark import build_session
    from stockvol.train import export_model, fit_pipeline

    print(f"no model at {model_dir}: fitting a small one with Spark (20 trees, depth 5)")
    spark = build_session(load_config(), "load-test-model", master="local[2]")
    try:
        rng = np.random.default_rng(0)
        vma, med = rng.lognormal(13, 1.2, 2000), rng.lognormal(3.5, 1.0, 2000)
        frame = pd.DataFrame(
            {FEATURES[0]: vma, FEATURES[1]: med, "Volume": vma * rng.lognormal(0, 0.3, 2000)}
        )
        params = ModelParams(num_trees=20, max_depth=5, seed=1)
        model = fit_pipeline(spark.createDataFrame(frame), params)
        export_model(model, {"note": "load-test model"}, b"", model_dir)
    finally:
        spark.stop()


# --- the requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    raw: bytes  # the whole HTTP/1.1 request
    expected: bytes = b""  # the exact response body, learned before the load


def request_mix(seed: int, count: int) -> list[Request]:
    """GET one row (3 in 4) and POST batches of 2-20 rows (1 in 4), over typical feature values."""
    rng = np.random.default_rng(seed)
    mix = []
    for i in range(count):
        if i % 4:
            a, b = rng.lognormal(13, 1.2), rng.lognormal(3.5, 1.0)
            target = f"/predict?{urlencode({FEATURES[0]: repr(a), FEATURES[1]: repr(b)})}"
            raw = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        else:
            n = int(rng.integers(2, 21))
            vma, med = rng.lognormal(13, 1.2, n).tolist(), rng.lognormal(3.5, 1.0, n).tolist()
            rows = zip(vma, med, strict=True)
            payload = {"instances": [{FEATURES[0]: a, FEATURES[1]: b} for a, b in rows]}
            body = json.dumps(payload).encode()
            raw = (
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        mix.append(Request(raw))
    return mix


async def exchange(port: int, raw: bytes) -> tuple[int, bytes]:
    """Send one request on a fresh connection (gunicorn's sync workers close it after each)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = await reader.read()
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def learn(port: int, mix: list[Request]) -> list[Request]:
    learned = []
    for item in mix:
        status, body = await exchange(port, item.raw)
        if status != 200:
            raise SystemExit(f"warm-up request failed with {status}: {body[:200]!r}")
        learned.append(Request(item.raw, body))
    return learned


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: Counter[str] = field(default_factory=Counter)
    started: float = 0.0
    finished: float = 0.0


async def load(
    port: int, mix: list[Request], connections: int, duration: float, limit: int, timeout: float
) -> Tally:
    tally = Tally(started=time.perf_counter())
    deadline = tally.started + duration
    issued = 0

    async def one_connection(offset: int) -> None:
        nonlocal issued
        i = offset
        while time.perf_counter() < deadline and issued < limit:
            issued += 1
            item = mix[i % len(mix)]
            i += connections
            began = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(exchange(port, item.raw), timeout)
            except asyncio.TimeoutError:
                tally.errors["timeout"] += 1
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                tally.errors[type(err).__name__] += 1
                continue
            if status != 200:
                tally.errors[f"status {status}"] += 1
            elif body != item.expected:
                tally.errors["wrong body"] += 1
            else:
                tally.latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(one_connection(k) for k in range(connections)))
    tally.finished = time.perf_counter()
    return tally


def python_client(port: int, args: argparse.Namespace) -> dict[str, Any]:
    mix = request_mix(args.seed, 400)

    async def main() -> Tally:
        learned = await learn(port, mix)
        return await load(
            port, learned, args.connections, args.duration, args.max_requests, args.timeout
        )

    tally = asyncio.run(main())
    seconds = tally.finished - tally.started
    ok = len(tally.latencies)
    ms = [x * 1000 for x in tally.latencies] or [float("nan")]
    return {
        "client": "python-asyncio",
        "requests": ok + sum(tally.errors.values()),
        "ok": ok,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "seconds": round(seconds, 2),
        "throughput_rps": round(ok / seconds, 1) if seconds else 0.0,
        "latency_ms": {
            "p50": round(percentile(ms, 50), 2),
            "p90": round(percentile(ms, 90), 2),
            "p99": round(percentile(ms, 99), 2),
            "max": round(max(ms), 2),
        },
    }


WRK_SCRIPT = """
local paths = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1])
end
"""


def wrk_client(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same GET requests from wrk (statuses checked, bodies not)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("--client wrk: wrk is not installed (apt-get install wrk)")
    targets = [
        item.raw.split(b" ")[1].decode()
        for item in request_mix(args.seed, 400)
        if item.raw[:3] == b"GET"
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % ", ".join(json.dumps(t) for t in targets))
    command = [
        wrk,
        "--threads",
        "2",
        "--connections",
        str(args.connections),
        "--duration",
        f"{int(args.duration)}s",
        "--timeout",
        f"{int(args.timeout)}s",
        "--latency",
        "--script",
        script.name,
        f"http://127.0.0.1:{port}",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    os.unlink(script.name)
    print(out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = (sum(int(x) for x in socket.groups()) if socket else 0) + (
        int(non_2xx.group(1)) if non_2xx else 0
    )
    latency = dict(re.findall(r"^\s+(50|90|99)%\s+([\d.]+\w+)", out, re.M))
    return {
        "client": "wrk",
        "requests": requests,
        "errors": errors,
        "error_kinds": {
            "socket": socket.groups() if socket else None,
            "non_2xx": non_2xx and non_2xx.group(1),
        },
        "throughput_rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "latency": {f"p{k}": v for k, v in latency.items()},
    }


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "data" / "model")
    parser.add_argument(
        "--tiny-model-if-missing",
        action="store_true",
        help="fit a small model (Spark) into a scratch dir when --model-dir has none",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="stop after this many")
    parser.add_argument("--timeout", type=float, default=10.0, help="a slower request is an error")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="gunicorn workers")
    parser.add_argument("--client", choices=("python", "wrk"), default="python")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "load.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="stockvol-load-"))
    try:
        model_dir = args.model_dir
        if not model_dir.is_dir():
            if not args.tiny_model_if_missing:
                print(f"no model at {model_dir}: run `make run`, or pass --tiny-model-if-missing")
                return 2
            model_dir = scratch / "model"
            tiny_model(model_dir)
        with gunicorn(model_dir, args.workers, scratch / "gunicorn.log") as port:
            client = wrk_client if args.client == "wrk" else python_client
            result = client(port, args)
        log = (scratch / "gunicorn.log").read_text(errors="replace")
        result.update(
            {
                "target": "gunicorn serving.wsgi:app on 127.0.0.1",
                "gunicorn_workers": args.workers,
                "connections": args.connections,
                "duration_requested_s": args.duration,
                "server_tracebacks": log.count("Traceback"),
                "model_dir": str(model_dir),
                "finished_at": now_iso(),
                "machine": machine_info(),
            }
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_json(args.out, result)
    latency = result.get("latency_ms") or result.get("latency")
    print(
        f"[load] client={result['client']} connections={args.connections} "
        f"workers={args.workers} requests={result['requests']} errors={result['errors']} "
        f"throughput={result['throughput_rps']} req/s latency={latency} -> {args.out}"
    )
    failed = result["errors"] or not result["requests"] or result["server_tracebacks"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
