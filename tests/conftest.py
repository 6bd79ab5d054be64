"""Shared fixtures: one SparkSession for the whole test run (local[2], Delta configured)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from stockvol.config import Config, load_config
from stockvol.spark import build_session

FIXTURES = Path(__file__).parent / "fixtures"


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


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The project's configuration with every path under this test's own tmp_path."""
    return load_config(data_dir=tmp_path / "data")
