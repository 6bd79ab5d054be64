"""Shared fixtures: one SparkSession for the whole test run (local[2], Delta configured), and a
real S3 server (s3proxy on loopback) for the tests that use object storage."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from stockvol.config import Config, load_config
from stockvol.spark import build_session
from tests.s3server import SPARK_TEST_CONF, S3Server, free_port, server_environment

S3_PORT = pytest.StashKey[int]()
SPARK_SCRATCH = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Point the standard AWS variables at the test S3 server's port before any JVM starts.

    Spark (S3A) and pyarrow, in this process and in every subprocess, get the endpoint and the
    test credentials the way a user's would: from the environment. Set whatever the shell had, so
    no test can reach a real bucket. The server itself starts only when a test asks for it.
    """
    port = free_port()
    config.stash[S3_PORT] = port
    os.environ.update(server_environment(port))
    # Spark's scratch space (every application copies the --packages jars there, 700 MB with the
    # AWS SDK bundle) in one directory per test run, deleted at its end, for this process and
    # every spark-submit, master and worker it starts: a SIGKILLed job never deletes its own,
    # and leftovers of the kill tests had filled this machine's disk (61 GB in /tmp/spark-*).
    scratch = tempfile.mkdtemp(prefix="stockvol-tests-spark-")
    config.stash[SPARK_SCRATCH] = scratch
    os.environ["SPARK_LOCAL_DIRS"] = scratch


def pytest_unconfigure(config: pytest.Config) -> None:
    scratch = config.stash.get(SPARK_SCRATCH, None)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    """A real local Spark with Delta, built as the jobs build it, with few shuffle partitions."""
    config = load_config()
    session = build_session(
        config,
        "stockvol-tests",
        master="local[2]",
        extra_conf={
            "spark.sql.shuffle.partitions": "2",
            "spark.default.parallelism": "2",
            "spark.databricks.delta.snapshotPartitions": "2",
            **SPARK_TEST_CONF,
        },
    )
    yield session
    session.stop()


@pytest.fixture(scope="module", autouse=True)
def report_figures(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a module's tests, print its ``FIGURES`` counter (if it has one) as one line,
    ``[reliability] FIGURES_TITLE: key=value, ...``, past pytest's output capture."""
    yield
    figures = getattr(request.module, "FIGURES", None)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if figures and reporter is not None and capture is not None:
        line = ", ".join(f"{k}={v}" for k, v in sorted(figures.items()))
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n[reliability] {request.module.FIGURES_TITLE}: {line}")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The project's configuration with every path under this test's own tmp_path."""
    return load_config(data_dir=tmp_path / "data")


@pytest.fixture(scope="session")
def s3_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Server]:
    """s3proxy on the port AWS_ENDPOINT_URL names, started on first use (about 3 s)."""
    server = S3Server(request.config.stash[S3_PORT], tmp_path_factory.mktemp("s3proxy"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A new empty bucket on the test S3 server, as ``s3a://NAME`` (read it with pyarrow as
    ``s3://NAME``), deleted after the test: the server holds objects in memory."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    yield f"s3a://{name}"
    s3_server.delete_bucket(name)
