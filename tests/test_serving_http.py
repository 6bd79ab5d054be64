"""The real server: gunicorn over loopback, model swap and SIGHUP reload, refusal of a bad model,
serving code that runs without pyspark, and the image's Dockerfile and dependencies."""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from pyspark.sql import SparkSession
from test_serving_parity import spark_model_dirs, spark_predictions

from serving.forest import FEATURES

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).with_name("gunicorn")
VMA, MED = FEATURES
START_TIMEOUT = 120.0  # seconds; generous because the test machine's 2 cores are shared


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def get(self, path: str) -> tuple[int, Any]:
        return request(self.url + path)

    def post(self, path: str, payload: Any) -> tuple[int, Any]:
        return request(self.url + path, json.dumps(payload).encode())


def request(url: str, data: bytes | None = None, method: str | None = None) -> tuple[int, Any]:
    """(status, JSON body) for one request; HTTP errors are answers too."""
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextmanager
def gunicorn(
    model_dir: Path | str, log: Path, workers: int = 2, pidfile: Path | None = None, **settings: str
) -> Iterator[Server]:
    """gunicorn with the project's config on a free loopback port; stopped (SIGTERM) on exit,
    together with any master a USR2 started (found through the pid file). ``settings`` are more
    environment variables (KEEPALIVE, REQUEST_TIMEOUT, ...)."""
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "HOST": "127.0.0.1",
        "PORT": "0",
        "WEB_CONCURRENCY": str(workers),
        "PIDFILE": str(pidfile or ""),
        **settings,
    }
    command = [str(GUNICORN), "--config", "serving/gunicorn.conf.py", "serving.wsgi:app"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        server = Server(process, _wait_for_listener(process, log), log)
        _wait_until_answering(server)
        _wait_for_workers(process, log, workers)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # A USR2 master writes PIDFILE.2, renamed to PIDFILE once the first master has gone.
        for path in (pidfile, Path(f"{pidfile}.2")) if pidfile else ():
            with contextlib.suppress(FileNotFoundError, ValueError):
                _stop_master(int(path.read_text()), process.pid)


def _stop_master(pid: int, started: int) -> None:
    """Stop the master a USR2 started (a grandchild of this test, so not waitable here)."""
    if pid == started:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for_listener(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return found.group(1)
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    raise AssertionError(f"gunicorn did not start:\n{log.read_text()}")


def _wait_for_workers(process: subprocess.Popen, log: Path, workers: int) -> None:
    """Until every worker has booted. (The master loaded the model before it listened, and the
    workers are forks of it: none reads the directory, so a swap after this is not seen.)"""
    deadline = time.monotonic() + START_TIMEOUT
    while log.read_text().count("Booting worker") < workers:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def _wait_until_answering(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            server.get("/health")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError(f"no answer from {server.url}:\n{server.log.read_text()}")


@pytest.fixture(scope="module")
def model_dirs(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return spark_model_dirs(spark, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def probes() -> np.ndarray:
    rng = np.random.default_rng(11)
    return np.column_stack([rng.lognormal(13, 2, 40), rng.lognormal(3.5, 1.5, 40)])


@pytest.fixture(scope="module")
def spark_says(
    spark: SparkSession, model_dirs: dict[int, Path], probes: np.ndarray
) -> dict[int, list[int]]:
    """depth -> Spark's predictions on the probes, rounded as the API rounds (the oracle)."""
    return {
        depth: np.rint(spark_predictions(spark, model_dirs[depth], probes)).astype(int).tolist()
        for depth in (2, 8)
    }


def predict_all(server: Server, probes: np.ndarray) -> list[int]:
    answers = []
    for a, b in probes.tolist():
        status, body = server.get(f"/predict?{VMA}={a!r}&{MED}={b!r}")
        assert status == 200, body
        answers.append(body["predicted_volume"])
    return answers


def test_gunicorn_serves_sparks_predictions_and_json_errors(
    model_dirs: dict[int, Path], probes: np.ndarray, spark_says: dict, tmp_path: Path
) -> None:
    with gunicorn(model_dirs[2], tmp_path / "gunicorn.log") as server:
        assert server.get("/health")[0] == 200
        assert predict_all(server, probes) == spark_says[2]
        instances = [{VMA: a, MED: b} for a, b in probes.tolist()]
        assert server.post("/predict", {"instances": instances}) == (
            200,
            {"predicted_volume": spark_says[2], "count": len(probes)},
        )
        status, body = server.get(f"/predict?{VMA}=-1&{MED}=1")
        assert (status, body["parameter"]) == (400, VMA)
        status, body = server.get(f"/predict?{VMA}=1&{MED}={'9' * 1000}")
        assert (status, body["parameter"]) == (400, MED)
        # A query string over MAX_QUERY_LENGTH (4096 bytes): the app's JSON 414.
        status, body = server.get(f"/predict?{VMA}={'9' * 5000}&{MED}=1")
        assert (status, body["status"]) == (414, 414)
        assert server.get("/nowhere")[0] == 404
        assert request(server.url + "/predict", method="DELETE")[0] == 405
        assert server.get("/model")[1]["forest"]["num_trees"] == 100


def swap(link: Path, target: Path) -> None:
    """Point the model symlink at target atomically, as the train job does."""
    staged = link.with_name(f".{link.name}.new")
    staged.symlink_to(target)
    os.replace(staged, link)


def wait_for_model(server: Server, model_dir: Path, streak: int = 10) -> None:
    """Until /health names model_dir on `streak` answers in a row (every worker has it). Every
    request must be answered: a HUP or a USR2 swap drops none (docs/serving.md)."""
    expected, seen = model_dir.resolve().name, 0
    deadline = time.monotonic() + START_TIMEOUT
    while seen < streak:
        assert time.monotonic() < deadline, server.log.read_text()
        seen = seen + 1 if server.get("/health")[1].get("version") == expected else 0
        time.sleep(0.05)


@contextmanager
def hammering(server: Server, point: list[float]) -> Iterator[list[tuple[Any, Any]]]:
    """A client thread sending GET /predict for one point until the block ends."""
    outcomes: list[tuple[Any, Any]] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                status, body = server.get(f"/predict?{VMA}={point[0]!r}&{MED}={point[1]!r}")
                outcomes.append((status, body.get("predicted_volume")))
            except (urllib.error.URLError, ConnectionError) as err:
                outcomes.append((repr(err), None))

    client = threading.Thread(target=run)
    client.start()
    try:
        yield outcomes
    finally:
        stop.set()
        client.join()


def test_a_swapped_model_is_served_after_hup_and_after_usr2_without_failures(
    model_dirs: dict[int, Path], probes: np.ndarray, spark_says: dict, tmp_path: Path
) -> None:
    """Running workers keep the model they loaded; HUP or USR2 (zero-downtime) picks up a swap."""
    old, new = model_dirs[2], model_dirs[8]
    assert spark_says[2] != spark_says[8]
    link = tmp_path / "model"
    link.symlink_to(old)
    pidfile = tmp_path / "gunicorn.pid"
    with gunicorn(link, tmp_path / "gunicorn.log", pidfile=pidfile) as server:
        assert predict_all(server, probes) == spark_says[2]
        swap(link, new)
        assert predict_all(server, probes) == spark_says[2]  # loaded once, at start-up

        server.process.send_signal(signal.SIGHUP)
        wait_for_model(server, new)
        assert predict_all(server, probes) == spark_says[8]

        # The zero-downtime swap: a second master (USR2) on the same socket, then TERM the first.
        swap(link, old)
        with hammering(server, probes[0].tolist()) as outcomes:
            server.process.send_signal(signal.SIGUSR2)
            wait_for_model(server, old, streak=1)  # a worker of the new master answers
            new_master = int(Path(f"{pidfile}.2").read_text())
            server.process.terminate()
            server.process.wait(timeout=START_TIMEOUT)
            wait_for_model(server, old)
        assert psutil.pid_exists(new_master) and new_master != server.process.pid
        assert outcomes, "no request was made during the swap"
        failures = [outcome for outcome in outcomes if outcome[0] != 200]
        assert not failures, f"{len(failures)} of {len(outcomes)} failed: {failures[:3]}"
        assert {volume for _, volume in outcomes} <= {spark_says[2][0], spark_says[8][0]}
        assert predict_all(server, probes) == spark_says[2]


def test_gunicorn_refuses_to_start_on_an_invalid_model(
    model_dirs: dict[int, Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(model_dirs[2], model_dir)
    (stage,) = (model_dir / "stages").glob("1_*")
    (part,) = (stage / "metadata").glob("part-*")
    metadata = json.loads(part.read_text())
    metadata["class"] = "org.apache.spark.ml.regression.GBTRegressionModel"
    part.write_text(json.dumps(metadata))
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(GUNICORN), "--config", "serving/gunicorn.conf.py", "serving.wsgi:app"],
            cwd=ROOT,
            env={**os.environ, "MODEL_DIR": str(model_dir), "HOST": "127.0.0.1", "PORT": "0"},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        returncode = process.wait(timeout=START_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert returncode != 0
    assert "expected a org.apache.spark.ml.regression.RandomForestRegressionModel" in output
    assert "GBTRegressionModel" in output


def test_gunicorn_without_a_model_answers_503_until_a_hup_once_there_is_one(
    model_dirs: dict[int, Path], probes: np.ndarray, spark_says: dict, tmp_path: Path
) -> None:
    link = tmp_path / "model"
    with gunicorn(link, tmp_path / "gunicorn.log", workers=1) as server:
        status, body = server.get("/health")
        assert (status, body["status"]) == (503, "unavailable")
        assert server.get(f"/predict?{VMA}=1&{MED}=1")[0] == 503
        swap(link, model_dirs[2])  # the first training publishes its model
        assert server.get("/health")[0] == 503  # read once: nothing changes without a reload
        server.process.send_signal(signal.SIGHUP)
        wait_for_model(server, model_dirs[2])
        assert predict_all(server, probes) == spark_says[2]


# Stands in for the image's site-packages: flask, gunicorn, numpy, pyarrow and nothing else.
WITHOUT_SPARK = """
import importlib.abc, json, sys
BLOCKED = {"pyspark", "py4j", "delta", "stockvol", "pandas", "yaml", "sklearn"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed in the serving image")
sys.meta_path.insert(0, Blocker())
import serving.wsgi
client = serving.wsgi.app.test_client()
response = client.get("/predict?vol_moving_avg=1000000&adj_close_rolling_med=20")
print(json.dumps({"status": response.status_code, "body": response.get_json(),
                  "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)}))
"""


def assert_served_without_spark(model_dir: str) -> None:
    """``WITHOUT_SPARK`` in a fresh interpreter: a prediction with pyspark and stockvol unloaded."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_SPARK],
        cwd=ROOT,
        env={**os.environ, "MODEL_DIR": model_dir},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["status"] == 200 and outcome["loaded"] == []
    assert isinstance(outcome["body"]["predicted_volume"], int)


def test_serving_runs_without_pyspark_or_the_pipeline_package(model_dirs: dict[int, Path]) -> None:
    assert_served_without_spark(str(model_dirs[5]))


def test_no_serving_module_imports_pyspark_or_the_pipeline() -> None:
    imports = re.compile(r"^\s*(?:from|import)\s+(pyspark|py4j|delta|stockvol)\b", re.MULTILINE)
    for source in (ROOT / "serving").glob("*.py"):
        assert not imports.search(source.read_text()), source


def test_dockerfile_passes_hadolint_and_runs_gunicorn_as_non_root() -> None:
    dockerfile = ROOT / "serving" / "Dockerfile"
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run(
        [str(hadolint), str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:[\w.]+-slim", text, re.MULTILINE)
    (user,) = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.MULTILINE)
    assert re.search(r'^CMD \["gunicorn".*"serving\.wsgi:app"\]', text, re.MULTILINE)
    instructions = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert not re.search(r"java|jdk|jre|spark", instructions.lower())


def test_image_requirements_are_the_serving_extra() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extra = {line.strip() for line in setup["options.extras_require"]["serving"].split("\n")}
    requirements = (ROOT / "serving" / "requirements.txt").read_text().splitlines()
    pinned = {line.strip() for line in requirements if line.strip() and not line.startswith("#")}
    assert pinned == extra - {""}
    assert not any(name.startswith(("pyspark", "delta", "pandas")) for name in pinned)


def test_make_serve_runs_gunicorn_on_port_8000() -> None:
    result = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "gunicorn --config serving/gunicorn.conf.py serving.wsgi:app" in result.stdout
    assert "MODEL_DIR=${MODEL_DIR:-data/model}" in result.stdout
    conf = (ROOT / "serving" / "gunicorn.conf.py").read_text()
    assert "os.environ.get('PORT', '8000')" in conf


def gunicorn_settings(**env: str) -> dict[str, Any]:
    """serving/gunicorn.conf.py evaluated in a fresh process with this environment."""
    script = "import json, runpy; conf = runpy.run_path('serving/gunicorn.conf.py'); "
    script += "print(json.dumps({k: v for k, v in conf.items() if k in ('workers', 'bind')}))"
    environment = {k: v for k, v in os.environ.items() if k != "WEB_CONCURRENCY"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**environment, **env},
        # Pinned to one CPU, as `docker run --cpuset-cpus 0` pins the container.
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_workers_follow_the_cpus_the_container_may_use_not_the_hosts(tmp_path: Path) -> None:
    assert gunicorn_settings()["workers"] == 1  # os.cpu_count() would count the host's CPUs
    assert gunicorn_settings(WEB_CONCURRENCY="3")["workers"] == 3
    cpu_limit = runpy.run_path(str(ROOT / "serving" / "gunicorn.conf.py"))["cpu_limit"]
    cpus = len(os.sched_getaffinity(0))
    for cpu_max, expected in (
        ("max 100000\n", cpus),  # no quota: the affinity mask
        ("50000 100000\n", 1),  # half a CPU: one worker, never zero
        ("150000 100000\n", min(cpus, 2)),  # 1.5 CPUs: two, if the mask allows
        ("6400000 100000\n", cpus),  # a quota above the mask: the mask
    ):
        (tmp_path / "cpu.max").write_text(cpu_max)
        assert cpu_limit(tmp_path) == expected, cpu_max
    (tmp_path / "cpu.max").unlink()
    assert cpu_limit(tmp_path) == cpus  # cgroup v1 or no cgroup: the affinity mask
