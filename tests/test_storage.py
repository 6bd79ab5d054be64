"""Delta and Parquet tables: round trip, overwrite, names with spaces, atomic replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import SparkSession
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

from stockvol.storage import TableNotFoundError, delta_version, read_table, write_table

SCHEMA = StructType(
    [
        StructField("Symbol", StringType()),
        StructField("Adj Close", DoubleType()),
        StructField("Volume", LongType()),
    ]
)


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_round_trip_keeps_names_with_spaces_and_types(
    spark: SparkSession, tmp_path: Path, storage_format: str
) -> None:
    df = spark.createDataFrame([("A", 1.5, 10), ("B", 2.25, 20)], SCHEMA)
    write_table(df, tmp_path / "t", storage_format)
    assert_df_equality(read_table(spark, tmp_path / "t", storage_format), df, ignore_row_order=True)


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_overwrite_replaces_the_whole_table(
    spark: SparkSession, tmp_path: Path, storage_format: str
) -> None:
    first = spark.createDataFrame([("A", 1.0, 1), ("B", 2.0, 2)], SCHEMA)
    second = spark.createDataFrame([("C", 3.0, 3)], SCHEMA)
    write_table(first, tmp_path / "t", storage_format)
    write_table(second, tmp_path / "t", storage_format)
    assert_df_equality(read_table(spark, tmp_path / "t", storage_format), second)


def test_delta_overwrite_keeps_the_previous_version_in_the_log(
    spark: SparkSession, tmp_path: Path
) -> None:
    path = tmp_path / "t"
    write_table(spark.createDataFrame([("A", 1.0, 1)], SCHEMA), path, "delta")
    write_table(spark.createDataFrame([("B", 2.0, 2)], SCHEMA), path, "delta")
    assert delta_version(spark, path) == 1
    old = spark.read.format("delta").option("versionAsOf", 0).load(str(path))
    assert [r["Symbol"] for r in old.collect()] == ["A"]


def test_parquet_overwrite_leaves_no_stale_copies(spark: SparkSession, tmp_path: Path) -> None:
    path = tmp_path / "t"
    for symbol in ("A", "B", "C"):
        write_table(spark.createDataFrame([(symbol, 1.0, 1)], SCHEMA), path, "parquet")
    assert len(list((tmp_path / ".t.versions").iterdir())) == 1


def test_reading_a_missing_table_names_the_job_to_run(spark: SparkSession, tmp_path: Path) -> None:
    with pytest.raises(TableNotFoundError, match="run the job that writes it"):
        read_table(spark, tmp_path / "nothing", "delta")


def test_delta_keeps_statistics_on_the_key_columns_only(
    spark: SparkSession, tmp_path: Path
) -> None:
    """A table written before (statistics on every column) gets the property once; each replace
    then keeps statistics on Symbol alone (this table has no Date)."""
    path = tmp_path / "t"
    old = spark.createDataFrame([("A", 1.0, 1)], SCHEMA).coalesce(1).write.format("delta")
    old.option("delta.columnMapping.mode", "name").save(str(path))
    for symbol in ("B", "C"):
        write_table(spark.createDataFrame([(symbol, 1.0, 1)], SCHEMA).coalesce(1), path, "delta")
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()
    assert detail["properties"]["delta.dataSkippingStatsColumns"] == "`Symbol`"
    log = sorted((path / "_delta_log").glob("*.json"))
    assert len(log) == 4  # the old write, the property, two replaces: no commit per replace
    stats = [json.loads(a["add"]["stats"]) for a in json_lines(log[-1]) if "add" in a]
    assert len(stats) == 1 and len(stats[0]["minValues"]) == 1, stats
    first = [json.loads(a["add"]["stats"]) for a in json_lines(log[0]) if "add" in a]
    assert len(first[0]["minValues"]) == 3  # what the property saves


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]
