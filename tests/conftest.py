"""Shared fixtures: one SparkSession for the whole test run (local[2], Delta configured)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from stockvol.config import Config, load_config
from stockvol.spark import build_session


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
