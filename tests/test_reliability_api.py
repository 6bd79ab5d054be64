"""The prediction API under stress, against real servers: model swaps under traffic, models that
cannot be served, and fuzzed requests (Flask test client and gunicorn on 127.0.0.1).

The models are real MLlib forests written by the train stage's own ``export_model`` (the atomic
symlink swap); the expected answers come from Spark's ``PipelineModel.transform`` on the same
inputs, never from the serving code. Servers are real gunicorn processes (``serving.wsgi:app`` with
``serving/gunicorn.conf.py``) bound to 127.0.0.1 on a port the kernel picks.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlencode

import numpy as np
import pandas as pd
import psutil
import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyspark.ml import PipelineModel
from pyspark.sql import SparkSession
from werkzeug.serving import make_server

from serving.app import DEFAULTS, create_app
from serving.forest import FEATURES
from stockvol.config import ModelParams
from stockvol.train import export_model, fit_pipeline

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).parent / "gunicorn"
VMA, MED = FEATURES
MAX_BATCH = int(DEFAULTS["MAX_BATCH"])
MAX_BODY = int(DEFAULTS["MAX_CONTENT_LENGTH"])
MAX_QUERY = int(DEFAULTS["MAX_QUERY_LENGTH"])  # the app's JSON 414 beyond
# limit_request_line in serving/gunicorn.conf.py: gunicorn itself answers a longer request line
# (HTML 414) before the app sees it. Everything else must come from the app, as JSON.
GUNICORN_REQUEST_LINE_LIMIT = 8190
CLOSED_EARLY = 0  # http_request: the server closed the connection before the request was sent
HTTP_TIMEOUT = 20.0  # seconds: a request that takes longer is a hang


# --- models --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """A fitted PipelineModel and Spark's own predictions for the probe points."""

    pipeline: PipelineModel
    predictions: np.ndarray  # float64, Spark's transform() of PROBES, the oracle


def training_frame(seed: int, n: int = 600) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    vma = rng.lognormal(13, 1.2, n)
    med = rng.lognormal(3.5, 1.0, n)
    volume = vma * rng.lognormal(0, 0.3, n) + 2000 * med
    return pd.DataFrame({VMA: vma, MED: med, "Volume": volume})


def spark_predict(spark: SparkSession, model: PipelineModel, x: np.ndarray) -> np.ndarray:
    """Spark's prediction for each row of ``x``, in row order."""
    frame = pd.DataFrame({"i": np.arange(len(x)), VMA: x[:, 0], MED: x[:, 1]})
    rows = model.transform(spark.createDataFrame(frame)).select("i", "prediction").toPandas()
    return rows.sort_values("i")["prediction"].to_numpy(dtype=np.float64)


@pytest.fixture(scope="module")
def probes() -> np.ndarray:
    rng = np.random.default_rng(99)
    return np.column_stack([rng.lognormal(13, 1.2, 400), rng.lognormal(3.5, 1.0, 400)])


@pytest.fixture(scope="module")
def models(spark: SparkSession, probes: np.ndarray) -> dict[str, Model]:
    """Two different real forests ("old" and "new") with Spark's answers for every probe."""
    result = {}
    for name, seed, trees in (("old", 1, 6), ("new", 2, 11)):
        params = ModelParams(num_trees=trees, max_depth=5, seed=seed)
        fitted = fit_pipeline(spark.createDataFrame(training_frame(seed)), params)
        result[name] = Model(fitted, spark_predict(spark, fitted, probes))
    return result


@pytest.fixture(scope="module")
def distinct(models: dict[str, Model], probes: np.ndarray) -> np.ndarray:
    """Indexes of the probes whose rounded answers differ between the two models."""
    old = np.rint(models["old"].predictions)
    new = np.rint(models["new"].predictions)
    index = np.flatnonzero(old != new)
    assert index.size >= 100, "the two test models should disagree on most probes"
    return index


def publish(model: Model, model_dir: Path) -> Path:
    """Write ``model`` into ``model_dir`` exactly as the train job does; the new version dir."""
    return export_model(model.pipeline, {"test": {"rmse": 1.0}}, b"", model_dir)


# --- gunicorn ------------------------------------------------------------------------------------


def http_request(
    port: int,
    method: str,
    target: str,
    body: bytes | Iterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request to 127.0.0.1:port on a fresh connection.

    A server may answer and close before it has read an oversized request; the client then
    gets a broken pipe while still sending. Its answer is read if it arrived, else the status
    is CLOSED_EARLY.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(method, target, body=body, headers=headers or {})
        try:
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        except (ConnectionResetError, http.client.RemoteDisconnected):
            return CLOSED_EARLY, "", b""
    finally:
        conn.close()


@dataclass
class Server:
    """A running gunicorn master bound to 127.0.0.1:port."""

    process: subprocess.Popen
    port: int
    log: Path

    def request(
        self,
        method: str,
        target: str,
        body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str, bytes]:
        return http_request(self.port, method, target, body, headers)

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_gunicorn(
    model_dir: Path, log: Path, workers: int = 2, **env: str
) -> tuple[subprocess.Popen, Path]:
    environment = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "HOST": "127.0.0.1",
        "PORT": "0",  # the kernel picks a free port; gunicorn logs it
        "WEB_CONCURRENCY": str(workers),
        **env,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(GUNICORN), "-c", "serving/gunicorn.conf.py", "serving.wsgi:app"],
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (graceful), SIGKILL it if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def gunicorn(model_dir: Path, log: Path, workers: int = 2, **env: str) -> Iterator[Server]:
    """gunicorn serving ``model_dir``, once every worker answers /health."""
    process, log = start_gunicorn(model_dir, log, workers, **env)
    try:
        deadline = time.monotonic() + 90
        port = None
        while port is None:
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log.read_text())
            port = int(found.group(1)) if found else None
            assert process.poll() is None, f"gunicorn exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"gunicorn did not start:\n{log.read_text()}"
            time.sleep(0.05)
        server = Server(process, port, log)
        while server.output().count("Booting worker") < workers or not _healthy(server):
            assert process.poll() is None, f"gunicorn exited:\n{server.output()}"
            assert time.monotonic() < deadline, f"gunicorn not healthy:\n{server.output()}"
            time.sleep(0.1)
        yield server
    finally:
        stop(process)


def _healthy(server: Server) -> bool:
    try:
        return server.request("GET", "/health")[0] == 200
    except OSError:
        return False


def wait_for_new_workers(server: Server, old: set[int], count: int, timeout: float = 90) -> None:
    """Until ``count`` workers run, none of them one of ``old``, each logged as booted: the end
    of a SIGHUP (old workers gone) or of a killed worker's replacement."""
    deadline = time.monotonic() + timeout
    while True:
        current = {p.pid for p in server.workers() if p.status() != psutil.STATUS_ZOMBIE}
        booted = all(f"Booting worker with pid: {pid}" in server.output() for pid in current)
        if len(current) == count and not current & old and booted:
            return
        assert server.process.poll() is None, server.output()[-2000:]
        assert time.monotonic() < deadline, (current, old, server.output()[-2000:])
        time.sleep(0.05)


# --- traffic -------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Requests fired from several threads; every answer classified as old, new or a failure."""

    send: Callable[[str, str, bytes | None, dict[str, str]], tuple[int, str, bytes]]
    probes: np.ndarray
    expected: dict[str, np.ndarray]  # "old"/"new" -> rounded Spark predictions per probe
    index: np.ndarray  # which probes to ask for
    answers: list[tuple[float, str]] = field(default_factory=list)  # (monotonic sent, old|new)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _which(self, indexes: np.ndarray, got: list[int]) -> str | None:
        for name, expected in self.expected.items():
            if got == [int(v) for v in expected[indexes]]:
                return name
        return None

    def _one(self, rng: np.random.Generator) -> None:
        # An answer is dated when its request was sent: a request sent after every old worker
        # has exited can only have been answered by a new one.
        sent = time.monotonic()
        if rng.random() < 0.5:
            i = rng.choice(self.index, 1)
            a, b = self.probes[i[0]].tolist()
            status, kind, body = self.send(
                "GET", f"/predict?{urlencode({VMA: repr(a), MED: repr(b)})}", None, {}
            )
            got = [json.loads(body)["predicted_volume"]] if status == 200 else None
        else:
            i = rng.choice(self.index, int(rng.integers(2, 40)))
            payload = {"instances": [{VMA: a, MED: b} for a, b in self.probes[i].tolist()]}
            status, kind, body = self.send(
                "POST",
                "/predict",
                json.dumps(payload).encode(),
                {"Content-Type": "application/json"},
            )
            got = json.loads(body)["predicted_volume"] if status == 200 else None
        which = self._which(i, got) if got is not None else None
        with self._lock:
            if which is None:
                self.failures.append(f"{status} {kind} {body[:200]!r} for probes {i.tolist()}")
            else:
                self.answers.append((sent, which))

    def _loop(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            try:
                self._one(rng)
            except Exception as err:  # a refused or reset connection, a timeout: all failures
                with self._lock:
                    self.failures.append(f"{type(err).__name__}: {err}")

    @contextlib.contextmanager
    def running(self, threads: int = 4) -> Iterator[Traffic]:
        workers = [
            threading.Thread(target=self._loop, args=(seed,), daemon=True)
            for seed in range(threads)
        ]
        for worker in workers:
            worker.start()
        try:
            yield self
        finally:
            self._stop.set()
            for worker in workers:
                worker.join(timeout=HTTP_TIMEOUT + 5)

    def since(self, moment: float) -> Counter[str]:
        """The old/new tally of the requests sent at or after ``moment``."""
        with self._lock:
            return Counter(which for when, which in self.answers if when >= moment)

    def wait_for(self, count: int, moment: float, timeout: float = 60) -> Counter[str]:
        """Block until ``count`` answers arrived after ``moment``; their old/new tally."""
        deadline = time.monotonic() + timeout
        while sum(self.since(moment).values()) < count:
            assert time.monotonic() < deadline, f"only {self.since(moment)} answers in {timeout}s"
            assert not self.failures, self.failures[:5]
            time.sleep(0.05)
        return self.since(moment)


def expected_answers(models: dict[str, Model]) -> dict[str, np.ndarray]:
    # The API rounds to the nearest integer, ties to even (Python round / np.rint).
    return {name: np.rint(model.predictions).astype(np.int64) for name, model in models.items()}


# --- model swap under traffic --------------------------------------------------------------------


@pytest.mark.slow
def test_model_swap_under_traffic_loses_no_request(
    models: dict[str, Model], probes: np.ndarray, distinct: np.ndarray, tmp_path: Path
) -> None:
    """Old model serving; the train code swaps a new one in; gunicorn reloads (SIGHUP). Not one
    request fails across the reload (docs/serving.md): the old workers stop accepting and finish
    what they hold while the new ones take the listening socket's queue."""
    model_dir = tmp_path / "model"
    old_version = publish(models["old"], model_dir)
    with gunicorn(model_dir, tmp_path / "gunicorn.log") as server:
        traffic = Traffic(server.request, probes, expected_answers(models), distinct)
        with traffic.running():
            assert set(traffic.wait_for(50, time.monotonic())) == {"old"}

            new_version = publish(models["new"], model_dir)  # the train job's atomic swap
            swapped = time.monotonic()
            assert model_dir.resolve() == Path(new_version) != Path(old_version)
            # A running worker keeps the model it loaded: still only old answers.
            kept = traffic.wait_for(100, swapped)
            assert set(kept) == {"old"}, kept

            # The documented reload: new workers get the new model, old ones finish gracefully.
            old_workers = {worker.pid for worker in server.workers()}
            reloaded = time.monotonic()
            os.kill(server.process.pid, signal.SIGHUP)
            wait_for_new_workers(server, old_workers, count=2)
            # Every request sent once the old workers are gone is answered by the new model.
            after = traffic.wait_for(100, time.monotonic())
            assert set(after) == {"new"}, after
            during = traffic.since(reloaded)
        assert not traffic.failures, traffic.failures[:5]
        assert traffic.answers and during["new"] > 0
        health = json.loads(server.request("GET", "/health")[2])
        assert health["version"] == new_version.name
    assert "Traceback" not in server.output(), server.output()


def test_a_running_server_keeps_its_model_when_the_directory_breaks(
    models: dict[str, Model], probes: np.ndarray, distinct: np.ndarray, tmp_path: Path
) -> None:
    """A real threaded HTTP server (werkzeug) in this process: the model lives in memory."""
    model_dir = tmp_path / "model"
    old_version = publish(models["old"], model_dir)
    server = make_server("127.0.0.1", 0, create_app({"MODEL_DIR": str(model_dir)}), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        send = functools.partial(http_request, server.server_port)
        traffic = Traffic(send, probes, expected_answers(models), distinct)
        with traffic.running():
            traffic.wait_for(30, time.monotonic())
            # Break it every way at once: the link now names junk, the old files are gone.
            junk = tmp_path / "junk"
            (junk / "metadata").mkdir(parents=True)
            (junk / "metadata" / "part-00000").write_text("{not json")
            link = tmp_path / "link.tmp"
            link.symlink_to(junk)
            os.replace(link, model_dir)
            shutil.rmtree(old_version)
            broken = time.monotonic()
            tally = traffic.wait_for(100, broken)
        assert not traffic.failures, traffic.failures[:5]
        assert set(tally) == {"old"}, tally
        assert send("GET", "/health")[0] == 200
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.mark.parametrize("how", ["sighup", "worker-killed"])
def test_gunicorn_keeps_serving_when_a_worker_restarts_on_a_broken_model_dir(
    models: dict[str, Model], probes: np.ndarray, tmp_path: Path, how: str
) -> None:
    """New workers (SIGHUP, or one replacing a killed worker) serve the model the master holds."""
    model_dir = tmp_path / "model"
    publish(models["old"], model_dir)
    expected = int(np.rint(models["old"].predictions[0]))
    a, b = probes[0].tolist()  # Python floats: repr() of a numpy float is "np.float64(...)"
    query = f"/predict?{urlencode({VMA: repr(a), MED: repr(b)})}"
    # One worker: once it is replaced, every answer below comes from the new one.
    with gunicorn(model_dir, tmp_path / "gunicorn.log", workers=1) as server:
        junk = tmp_path / "junk"
        junk.mkdir()
        link = tmp_path / "link.tmp"
        link.symlink_to(junk)
        os.replace(link, model_dir)
        old_workers = {worker.pid for worker in server.workers()}
        if how == "sighup":
            os.kill(server.process.pid, signal.SIGHUP)
        else:
            server.workers()[0].kill()
        wait_for_new_workers(server, old_workers, count=1)
        answers = []
        for _ in range(20):
            try:
                status, _, body = server.request("GET", query)
                answers.append(json.loads(body)["predicted_volume"] if status == 200 else status)
            except OSError as err:
                answers.append(type(err).__name__)
        assert answers == [expected] * 20, (answers, server.output()[-2000:])
        if how == "sighup":  # the refused reload is logged with its reason
            assert f"ModelFormatError: no metadata/part-* file in {junk}" in server.output()


def half_written_model(source: Path, target: Path) -> None:
    """What a kill in the middle of a model save leaves: metadata, but no tree data."""
    shutil.copytree(source, target)
    for data in target.glob("stages/*RandomForest*/data"):
        shutil.rmtree(data)


def truncated_trees(source: Path, target: Path) -> None:
    shutil.copytree(source, target)
    for part in target.glob("stages/*RandomForest*/data/*.parquet"):
        part.write_bytes(part.read_bytes()[:100])


BROKEN_MODELS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "empty-directory": (lambda source, target: target.mkdir(), "no metadata/part-* file"),
    "half-written": (half_written_model, "missing"),
    "truncated-parquet": (truncated_trees, "Parquet"),
    "not-a-pipeline": (
        lambda source, target: shutil.copytree(next(source.glob("stages/0_*")), target),
        "expected a org.apache.spark.ml.PipelineModel",
    ),
}


@pytest.fixture(scope="module")
def old_model_dir(models: dict[str, Model], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The old model, published once for the tests that only read it."""
    model_dir = tmp_path_factory.mktemp("published") / "model"
    publish(models["old"], model_dir)
    return model_dir


@pytest.mark.parametrize("kind", list(BROKEN_MODELS))
def test_gunicorn_refuses_to_start_on_a_directory_that_is_not_a_model(
    old_model_dir: Path, tmp_path: Path, kind: str
) -> None:
    make, reason = BROKEN_MODELS[kind]
    bad = tmp_path / "bad-model"
    make(old_model_dir.resolve(), bad)
    process, log = start_gunicorn(bad, tmp_path / "gunicorn.log", workers=1)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        stop(process)
        pytest.fail(f"gunicorn started on a broken model:\n{log.read_text()}")
    output = log.read_text()
    assert process.returncode != 0
    assert "ModelFormatError" in output and str(bad) in output and reason in output, output


# --- limits on the real server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(old_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("served") / "gunicorn.log"
    with gunicorn(old_model_dir, log) as running:
        yield running


def batch(n: int) -> bytes:
    return json.dumps({"instances": [{VMA: 1.5e6, MED: 42.0}] * n}).encode()


def chunked(body: bytes, size: int = 65536) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def json_error(kind: str, body: bytes) -> dict[str, Any]:
    assert kind.startswith("application/json"), (kind, body[:200])
    document = json.loads(body)
    assert isinstance(document["error"], str) and document["error"]
    return document


JSON_HEADERS = {"Content-Type": "application/json"}


def test_size_limits_hold_on_the_real_server(server: Server) -> None:
    # Largest allowed batch: answered; one more instance: 400 naming the field.
    status, kind, body = server.request("POST", "/predict", batch(MAX_BATCH), JSON_HEADERS)
    assert status == 200 and json.loads(body)["count"] == MAX_BATCH
    status, kind, body = server.request("POST", "/predict", batch(MAX_BATCH + 1), JSON_HEADERS)
    assert status == 400 and json_error(kind, body)["parameter"] == "instances"
    # A body over MAX_CONTENT_LENGTH with its Content-Length: 413, JSON.
    oversized = batch(MAX_BODY // 40)
    assert len(oversized) > MAX_BODY
    status, kind, body = server.request("POST", "/predict", oversized, JSON_HEADERS)
    assert status == 413, body[:200]
    json_error(kind, body)
    status, kind, body = server.request("POST", "/predict", chunked(oversized), JSON_HEADERS)
    assert status in (400, 413)  # never a 200 (see the chunked test below), never a 5xx
    json_error(kind, body)
    # A number longer than MAX_NUMBER_LENGTH: 400 naming the parameter.
    status, kind, body = server.request("GET", f"/predict?{VMA}={'9' * 65}&{MED}=1")
    assert status == 400 and json_error(kind, body)["parameter"] == VMA
    # Nesting deep enough to exhaust a recursive parser: 400.
    deep = b"[" * 200_000 + b"]" * 200_000
    status, kind, body = server.request("POST", "/predict", deep, JSON_HEADERS)
    assert status == 400
    json_error(kind, body)
    # A request line over gunicorn's limit, and oversized headers: refused by gunicorn itself.
    status, _, _ = server.request("GET", f"/predict?{VMA}={'1' * GUNICORN_REQUEST_LINE_LIMIT}")
    assert status == 414
    status, _, _ = server.request("GET", "/health", headers={"X-Big": "v" * 9000})
    assert status == 431
    assert server.request("GET", "/health")[0] == 200  # and the server is fine


def test_a_chunked_body_over_the_limit_is_a_413(server: Server) -> None:
    """A chunked body has no Content-Length: the app counts what arrives."""
    prefix = batch(3)[:-2]  # '{"instances": [ ... ' without the closing ']}'
    head = prefix + b"]}" + b" " * (MAX_BODY - len(prefix) - 2)
    assert len(head) == MAX_BODY
    status, kind, body = server.request("POST", "/predict", chunked(head), JSON_HEADERS)
    assert status == 200 and json.loads(body)["count"] == 3  # exactly the limit: accepted
    status, kind, body = server.request(
        "POST", "/predict", chunked(head + b"this is not JSON"), JSON_HEADERS
    )
    assert status == 413, (status, body[:200])
    json_error(kind, body)


def test_an_oversized_query_string_is_a_json_414(server: Server) -> None:
    status, kind, body = server.request("GET", f"/predict?{VMA}={'1' * 5000}&{MED}=1")
    assert status == 414
    json_error(kind, body)
    # The longest request line gunicorn lets through still reaches the app, as JSON.
    line = f"GET /predict?{VMA}= HTTP/1.1"
    status, kind, body = server.request(
        "GET", f"/predict?{VMA}={'1' * (GUNICORN_REQUEST_LINE_LIMIT - len(line))}"
    )
    assert status == 414
    json_error(kind, body)


# --- fuzz ----------------------------------------------------------------------------------------

FIGURES: Counter[str] = Counter()  # printed by conftest.report_figures
FIGURES_TITLE = "/predict fuzz cases run"
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/JSON",
        "application/vnd.api+json",
        "application/json; charset=latin-1",
        "text/plain",
        "text/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "",
    ]
) | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40)
NUMBERS = st.sampled_from(
    ["1e400", "-1e400", "99999999999999999999", "1" * 400, "NaN", "Infinity", "-0", "1e-400"]
)
JUNK_JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


def _instance_text(a: str, b: str) -> str:
    return f'{{"{VMA}": {a}, "{MED}": {b}}}'


BODIES = st.one_of(
    st.binary(max_size=3000),
    JUNK_JSON.map(lambda v: json.dumps(v).encode()),
    st.lists(st.tuples(NUMBERS | st.floats().map(repr), NUMBERS), min_size=1, max_size=5).map(
        lambda rows: (
            ('{"instances": [' + ",".join(_instance_text(a, b) for a, b in rows) + "]}")
            .replace("nan", "NaN")
            .replace("inf", "Infinity")
            .encode()
        )
    ),
    st.sampled_from([MAX_BATCH - 1, MAX_BATCH, MAX_BATCH + 1, 5 * MAX_BATCH]).map(batch),
    st.integers(1, 64).map(lambda k: b'{"instances": [' + b" " * (MAX_BODY + k) + b"]}"),
    st.integers(1, 5000).map(lambda depth: b"[" * depth * 50 + b"]" * depth * 50),
)
QUERIES = st.one_of(
    st.binary(max_size=600).map(lambda raw: quote_from_bytes(raw, safe="=&")),
    st.lists(
        st.tuples(st.sampled_from([VMA, MED, "x", ""]), NUMBERS | st.text(max_size=30)),
        max_size=4,
    ).map(urlencode),
    st.integers(60, 20_000).map(lambda n: f"{VMA}={'7' * n}&{MED}=1"),
    st.integers(1, 3000).map(lambda n: "&".join([f"{VMA}=1"] * n)),
)


@dataclass(frozen=True)
class Fuzzed:
    method: str
    query: str
    content_type: str
    body: bytes


REQUESTS = st.one_of(
    st.builds(Fuzzed, st.just("GET"), QUERIES, st.just(""), st.just(b"")),
    st.builds(Fuzzed, st.just("POST"), QUERIES | st.just(""), CONTENT_TYPES, BODIES),
)


def test_fuzzed_requests_to_the_real_server_never_5xx_or_hang_and_it_stays_healthy(
    server: Server,
) -> None:
    """The fuzz, then the server's health and log checked in the same test (not in a later test
    that passes just as well when run alone)."""
    before = FIGURES["gunicorn_GET"] + FIGURES["gunicorn_POST"]
    fuzz_the_real_server(server)
    assert FIGURES["gunicorn_GET"] + FIGURES["gunicorn_POST"] > before
    assert server.request("GET", "/health")[0] == 200
    assert "Traceback" not in server.output(), server.output()[-3000:]


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request_=REQUESTS)
def fuzz_the_real_server(server: Server, request_: Fuzzed) -> None:
    headers = {"Content-Type": request_.content_type} if request_.content_type else {}
    target = f"/predict?{request_.query}" if request_.query else "/predict"
    body = request_.body if request_.method == "POST" else None
    started = time.monotonic()
    status, kind, data = server.request(request_.method, target, body, headers)
    FIGURES[f"gunicorn_{request_.method}"] += 1
    assert time.monotonic() - started < HTTP_TIMEOUT
    assert status < 500, (status, data[:300])
    request_line = len(f"{request_.method} {target} HTTP/1.1")
    line_too_long = request_line > GUNICORN_REQUEST_LINE_LIMIT
    query_too_long = len(request_.query) > MAX_QUERY
    if status == CLOSED_EARLY:  # refused before it was read: only an oversized request may be
        body_unread = len(body or b"") > MAX_BODY or (query_too_long and bool(body))
        assert line_too_long or body_unread, request_
        return
    if kind.startswith("text/html"):  # gunicorn's own refusal of an oversized request line
        assert status == 414 and line_too_long, (status, data[:300])
        return
    assert not line_too_long, (status, kind, data[:300])
    assert status in (200, 400, 413, 414, 415), (status, data[:300])
    assert (status == 414) == query_too_long, (status, data[:300])
    document = json.loads(data)
    if status != 200:
        assert document["error"]


@pytest.fixture(scope="module")
def app(old_model_dir: Path) -> Flask:
    return create_app({"MODEL_DIR": str(old_model_dir), "TESTING": True})


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request_=REQUESTS)
def test_fuzzed_requests_to_the_test_client_never_5xx(app: Flask, request_: Fuzzed) -> None:
    client = app.test_client()
    kwargs: dict[str, Any] = {"query_string": request_.query}
    if request_.method == "POST":
        kwargs.update(data=request_.body, content_type=request_.content_type or None)
    response = client.open("/predict", method=request_.method, **kwargs)
    FIGURES[f"test_client_{request_.method}"] += 1
    assert response.status_code in (200, 400, 413, 414, 415), response.get_data()[:300]
    assert (response.status_code == 414) == (len(request_.query) > MAX_QUERY)
    assert response.mimetype == "application/json"
    document = response.get_json()
    if response.status_code != 200:
        assert document["error"]
