"""Hostile and lazy clients against the real server (gunicorn on 127.0.0.1): connections that
hold half a request, send nothing or stall their body must not stop the API, and the server must
drop them after its deadlines; clients that reuse a connection (keep-alive) get correct answers.

Every test opens a bounded number of sockets, closes them itself, and ends within seconds.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import SparkSession
from test_serving_http import MED, VMA, Server, gunicorn
from test_serving_parity import spark_model_dirs, spark_predictions

# Shorter than the defaults (5 s, 15 s) so the tests that wait for the drop stay short.
KEEPALIVE, REQUEST_TIMEOUT = 2, 3
HELD = 600  # unfinished connections held at once (the issue asks for at least 500)
ANSWER_WITHIN = 2.0  # seconds: what a fresh client must get /health and /predict in
# Ways to hold a connection: half a request's headers (slowloris), nothing at all (idle), and
# complete headers announcing a body that never comes.
HALF_HEADERS = f"GET /predict?{VMA}=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode()
STALLED_BODY = (
    b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 1000\r\n\r\n{"instances": ['
)
STARTS = (HALF_HEADERS, b"", STALLED_BODY)


@pytest.fixture(scope="module")
def model_dir(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return spark_model_dirs(spark, tmp_path_factory.getbasetemp())[2]


@pytest.fixture(scope="module")
def point_and_answer(spark: SparkSession, model_dir: Path) -> tuple[tuple[float, float], int]:
    """A query point and Spark's prediction for it, rounded as the API rounds (the oracle)."""
    point = (1_250_000.5, 42.25)
    return point, int(np.rint(spark_predictions(spark, model_dir, np.array([point]))[0]))


@contextmanager
def held_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections, each sent the start of a request (cycling through STARTS) and
    then left hanging; all closed on exit."""
    held: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(sock)
            if STARTS[i % len(STARTS)]:
                sock.sendall(STARTS[i % len(STARTS)])
        yield held
    finally:
        for sock in held:
            sock.close()


def still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed this connection (nothing to read, no EOF, no reset)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def timed_get(server: Server, path: str) -> tuple[float, int, dict]:
    """(seconds, status, JSON body) of one GET on a fresh connection."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server_port(server), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    return time.monotonic() - started, response.status, body


def server_port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def wait_until_closed(held: list[socket.socket], seconds: float) -> int:
    """Poll until the server has closed every held connection or ``seconds`` pass; how many
    are still open."""
    deadline = time.monotonic() + seconds
    while (left := sum(still_open(sock) for sock in held)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def test_held_connections_neither_stop_the_api_nor_stay_forever(
    model_dir: Path, point_and_answer: tuple[tuple[float, float], int], tmp_path: Path
) -> None:
    (a, b), expected = point_and_answer
    settings = {"KEEPALIVE": str(KEEPALIVE), "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT)}
    with gunicorn(model_dir, tmp_path / "gunicorn.log", **settings) as server:
        port = server_port(server)
        with held_connections(port, HELD) as held:
            answers = [
                timed_get(server, path)
                for _ in range(3)
                for path in ("/health", f"/predict?{VMA}={a!r}&{MED}={b!r}")
            ]
            # The held connections were really held while the fresh clients were answered.
            assert sum(still_open(sock) for sock in held) == HELD
            for seconds, status, body in answers:
                assert status == 200, body
                assert seconds < ANSWER_WITHIN, answers
            assert [body["predicted_volume"] for _, _, body in answers[1::2]] == [expected] * 3
            # The deadlines: silent and trickling headers after KEEPALIVE, a stalled body after
            # REQUEST_TIMEOUT. (Bounded wait; generous for a shared machine.)
            assert wait_until_closed(held, REQUEST_TIMEOUT + 10) == 0
        assert server.get("/health")[0] == 200
        log = server.log.read_text()
    stalled = log.count("took over 3 s (its body or its reader stalled)")
    assert stalled == HELD // len(STARTS), log[-2000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_kept_alive_connection_serves_many_requests_then_idles_out(
    model_dir: Path, point_and_answer: tuple[tuple[float, float], int], tmp_path: Path
) -> None:
    """What every HTTP library does: one connection, many requests, then an idle pause."""
    (a, b), expected = point_and_answer
    with gunicorn(model_dir, tmp_path / "gunicorn.log", KEEPALIVE=str(KEEPALIVE)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server_port(server), timeout=10)
        try:
            conn.connect()
            sock = conn.sock
            for i in range(50):
                if i % 2:
                    conn.request("GET", f"/predict?{VMA}={a!r}&{MED}={b!r}")
                else:
                    body = json.dumps({"instances": [{VMA: a, MED: b}] * 3})
                    conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read())
                assert response.status == 200, payload
                assert response.getheader("Connection", "").lower() != "close"
                got = payload["predicted_volume"]
                assert got == (expected if i % 2 else [expected] * 3)
            assert conn.sock is sock  # the same connection all along
            assert wait_until_closed([sock], KEEPALIVE + 10) == 0  # idle: closed by the server
        finally:
            conn.close()
