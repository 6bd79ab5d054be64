"""Reading the lake without Spark (docs/data.md): the documented examples run as written and equal
Spark's read; the readers documented as failing still fail the way the docs say.

The examples are taken from docs/data.md itself (not from a helper in lib/): what a user copies is
what runs here, and they need no stockvol installed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pandas as pd
import polars as pl
import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession

from stockvol import features, ingest
from stockvol.config import Config, load_config
from stockvol.storage import read_table, write_table
from tests.real_files import quirk_sample

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"
KEYS = ["Symbol", "Date"]


def docs_example(name: str) -> str:
    """The ``python`` code block that follows ``<!-- example: NAME ... -->`` in docs/data.md."""
    pattern = rf"<!-- example: {name}\b[^>]*-->\n```python\n(.*?)```"
    match = re.search(pattern, DOCS.read_text(), re.DOTALL)
    assert match, f"no example {name!r} in {DOCS}"
    return match.group(1)


def run_example(name: str, cwd: Path) -> dict:
    """Run a docs example in ``cwd`` (its paths are relative: ``data/lake/...``); its names."""
    namespace: dict = {}
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(docs_example(name), f"{DOCS}:{name}", "exec"), namespace)  # noqa: S102
    finally:
        os.chdir(previous)
    return namespace


def by_keys(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEYS, ignore_index=True)


@pytest.fixture(scope="module")
def lake(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The real quirk files through ingest twice (so the tables hold removed files of an older
    version) and features, in Delta as the jobs write them; ``data/`` below the returned root."""
    root = tmp_path_factory.mktemp("lake")
    config = load_config(data_dir=root / "data")
    shutil.copytree(quirk_sample(), Path(str(config.raw_dir)))
    ingest.run(spark, config)
    ingest.run(spark, config)
    features.run(spark, config)
    return config


@pytest.fixture(scope="module")
def documented(lake: Config) -> dict:
    """What the docs' Delta example gives on that lake: ``prices``, ``features``, ``read_delta``."""
    return run_example("delta", Path(str(lake.data_dir)).parent)


def spark_frame(spark: SparkSession, table: object, storage_format: str) -> pd.DataFrame:
    return by_keys(read_table(spark, table, storage_format).toPandas())


def test_the_delta_example_reads_prices_and_features_exactly_as_spark(
    spark: SparkSession, lake: Config, documented: dict
) -> None:
    for name, table in (("prices", lake.prices_path), ("features", lake.features_path)):
        expected = spark_frame(spark, table, "delta")
        pd.testing.assert_frame_equal(by_keys(documented[name]), expected, check_exact=True)


def test_the_parquet_example_reads_the_current_version_exactly_as_spark(
    spark: SparkSession, lake: Config, tmp_path: Path
) -> None:
    """A Parquet-format prices table replaced once: the example reads the current version."""
    config = load_config(data_dir=tmp_path / "data", storage_format="parquet")
    prices = read_table(spark, lake.prices_path, "delta")
    write_table(prices.limit(10), config.prices_path, "parquet")
    write_table(prices, config.prices_path, "parquet")

    names = run_example("parquet", tmp_path)

    expected = spark_frame(spark, config.prices_path, "parquet")
    pd.testing.assert_frame_equal(by_keys(names["prices"]), expected, check_exact=True)


# --- the readers docs/data.md says fail, failing as it says ---------------------------------


def test_deltalake_to_pandas_and_to_pyarrow_give_only_nulls(lake: Config, documented: dict) -> None:
    table = DeltaTable(str(lake.prices_path))
    rows = len(documented["prices"])
    frame = table.to_pandas()
    arrow = table.to_pyarrow_table()
    assert list(frame.columns) == list(documented["prices"].columns)
    assert len(frame) == rows and frame.isna().all().all()
    assert arrow.num_rows == rows and all(c.null_count == rows for c in arrow.columns)


@pytest.mark.parametrize("read", [pl.read_delta, lambda uri: pl.scan_delta(uri).collect()])
def test_polars_refuses_a_column_mapped_table(lake: Config, read: object) -> None:
    with pytest.raises(Exception, match="column mapping"):
        read(str(lake.features_path))


def test_plain_parquet_on_the_directory_reads_removed_files_under_physical_names(
    lake: Config, documented: dict
) -> None:
    rows = len(documented["prices"])
    frame = pd.read_parquet(str(lake.prices_path))
    assert len(frame) == 2 * rows  # two ingests, nothing vacuumed yet
    assert all(name.startswith("col-") for name in frame.columns)
