"""Retention: Delta's VACUUM on our tables, and expiry of Parquet and model version directories."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import SparkSession

from stockvol import retention
from stockvol.config import Config, apply_overrides
from stockvol.location import Location, current_version, publish_version, versions_dir
from stockvol.schema import PRICES_SCHEMA
from stockvol.storage import write_table

RETENTION = "delta.deletedFileRetentionDuration"
NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def prices_rows(symbol: str, days: int) -> list[tuple]:
    return [
        (symbol, f"{symbol} Inc.", f"2020-01-{day:02d}", 1.0, 2.0, 0.5, 1.5, 1.25, 100 * day)
        for day in range(1, days + 1)
    ]


def data_files(table: Path) -> set[str]:
    """The data files below a Delta table, as Delta sees them (hidden names left out)."""
    return {
        str(Path(root, name).relative_to(table))
        for root, dirs, names in os.walk(table)
        if not any(part.startswith(("_", ".")) for part in Path(root).relative_to(table).parts)
        for name in names
        if not name.startswith(("_", "."))
    }


def overwritten_three_times(spark: SparkSession, table: Path) -> list[tuple]:
    """A Delta prices table (column mapping on, as the jobs write it) replaced three times;
    the rows of the last write."""
    for symbol, days in (("A", 5), ("B", 7), ("C", 3)):
        rows = prices_rows(symbol, days)
        write_table(spark.createDataFrame(rows, PRICES_SCHEMA), table, "delta")
    return rows


def as_sorted_pandas(rows: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=PRICES_SCHEMA.names)
    return frame.sort_values(["Symbol", "Date"], ignore_index=True)


def test_vacuum_at_zero_hours_keeps_exactly_the_current_files_and_rows(
    spark: SparkSession, tmp_path: Path
) -> None:
    table = tmp_path / "prices"
    expected = as_sorted_pandas(overwritten_three_times(spark, table))
    before = data_files(table)

    removed = retention.vacuum_delta(spark, Location.parse(table), 0)

    current = spark.read.format("delta").load(str(table))
    live = {
        Path(f.removeprefix("file:")).relative_to(table).as_posix() for f in current.inputFiles()
    }
    assert data_files(table) == live
    assert removed.entries == len(before) - len(live) > 0
    got = current.toPandas().sort_values(["Symbol", "Date"], ignore_index=True)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def age_data_files(table: Path, hours: float) -> None:
    """Set every data file's modification time ``hours`` back, as if written that long ago."""
    moment = time.time() - hours * 3600
    for name in data_files(table):
        os.utime(table / name, (moment, moment))


def vacuum_commits(spark: SparkSession, table: Path) -> int:
    history = spark.sql(f"DESCRIBE HISTORY delta.`{table}`")
    return history.where(history.operation.startswith("VACUUM")).count()


def test_vacuum_honours_hours_other_than_zero_through_the_table_property(
    spark: SparkSession, tmp_path: Path
) -> None:
    """Delta 4.4 ignores VACUUM's own hours unless 0: the table property must carry them. Files
    removed about 2 s ago (and written 2 h ago, so that VACUUM runs at 1 h) stay at 168 h and at
    1 h, and go at 1 s."""
    table = tmp_path / "prices"
    overwritten_three_times(spark, table)
    before = data_files(table)
    age_data_files(table, 2)
    time.sleep(2)

    kept_168 = retention.vacuum_delta(spark, Location.parse(table), 168)
    kept_1h = retention.vacuum_delta(spark, Location.parse(table), 1)
    assert (kept_168.entries, kept_1h.entries, data_files(table)) == (0, 0, before)
    assert vacuum_commits(spark, table) == 2  # the 1 h one ran: START and END
    gone = retention.vacuum_delta(spark, Location.parse(table), 1 / 3600)

    assert gone.entries == len(before) - len(
        spark.read.format("delta").load(str(table)).inputFiles()
    )
    assert gone.entries > 0
    properties = spark.sql(f"SHOW TBLPROPERTIES delta.`{table}`").collect()
    assert {"key": RETENTION, "value": "interval 1 seconds"} in [p.asDict() for p in properties]


def test_vacuum_is_skipped_while_no_data_file_is_older_than_the_setting(
    spark: SparkSession, tmp_path: Path
) -> None:
    """VACUUM deletes no file modified within the retention period, so it is not run then: no
    VACUUM commits, no table property. Once the files are older, it runs (and still keeps the
    files removed within the period)."""
    table = tmp_path / "prices"
    overwritten_three_times(spark, table)
    before = data_files(table)
    version = spark.sql(f"DESCRIBE HISTORY delta.`{table}`").count()

    skipped = retention.vacuum_delta(spark, Location.parse(table), 168)

    assert (skipped.entries, data_files(table)) == (0, before)
    assert spark.sql(f"DESCRIBE HISTORY delta.`{table}`").count() == version
    age_data_files(table, 200)
    ran = retention.vacuum_delta(spark, Location.parse(table), 168)
    assert (ran.entries, data_files(table), vacuum_commits(spark, table)) == (0, before, 2)


# --- version directories (Parquet tables, the model) ---------------------------------------------


def version_at(link: Location, hours_ago: float, tasks: bool = False) -> Location:
    """A version directory of ``link`` named as started ``hours_ago`` before NOW, holding a file."""
    stamp = (NOW - timedelta(hours=hours_ago)).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stamp}-{abs(hash((link.uri, hours_ago))) % 16**8:08x}"
    version = versions_dir(link) / (name + (".tasks" if tasks else ""))
    (version / "part-0.parquet").write_bytes(b"x" * 100)
    return version


def layout(link: Location) -> dict[str, Location]:
    """Versions started 300, 200 and 100 hours ago, the last one current; a killed run's tasks
    directory of the 200 h one, the current one's late tasks, and a version newer than the
    current one (a run writing it now, or killed)."""
    versions = {
        "v300": version_at(link, 300),
        "v200": version_at(link, 200),
        "v200.tasks": version_at(link, 200, tasks=True),
        "v100": version_at(link, 100),
        "v100.tasks": version_at(link, 100, tasks=True),
        "v10": version_at(link, 10),
    }
    publish_version(link, versions["v100"])
    return versions


@pytest.mark.parametrize(
    ("hours", "kept"),
    [
        # v300 was replaced when v200 started (200 h ago), v200 when v100 started (100 h ago).
        (1000, {"v300", "v200", "v200.tasks", "v100", "v100.tasks", "v10"}),
        (150, {"v200", "v200.tasks", "v100", "v100.tasks", "v10"}),
        # The current version's tasks directory (late attempts) goes by its own age.
        (50, {"v100", "v10"}),
        (0, {"v100", "v10"}),
    ],
)
def test_versions_replaced_longer_ago_than_the_setting_go_the_current_and_newer_stay(
    tmp_path: Path, hours: float, kept: set[str]
) -> None:
    link = Location.parse(tmp_path / "prices")
    versions = layout(link)

    removed = retention.expire_versions(link, hours, now=NOW)

    assert {name for name, version in versions.items() if version.exists()} == kept
    assert removed.entries == len(versions) - len(kept)
    assert removed.bytes == 100 * removed.entries
    assert current_version(link).name == versions["v100"].name
    assert (link / "part-0.parquet").read_bytes() == b"x" * 100


def test_staged_copies_of_a_delta_table_go_once_older_than_the_setting(tmp_path: Path) -> None:
    """No link points into ``.prices.versions/`` (the table is Delta): staged copies by age."""
    link = Location.parse(tmp_path / "prices")
    old, recent = version_at(link, 30), version_at(link, 2)

    retention.expire_versions(link, 24, now=NOW)

    assert (old.exists(), recent.exists()) == (False, True)


def test_the_stage_vacuums_delta_tables_and_expires_model_versions(
    spark: SparkSession, config: Config
) -> None:
    """What the jobs run after a successful stage: every target at the configured hours."""
    overwritten_three_times(spark, Path(config.prices_path))
    model = Location.parse(config.model_dir)
    versions = layout(model)
    before = data_files(Path(config.prices_path))

    summary = retention.stage(*retention.TARGETS)(spark, apply_overrides(config, retention_hours=0))

    live = spark.read.format("delta").load(str(config.prices_path)).inputFiles()
    deleted = summary.details["deleted"]
    expected = {"raw": 0, "prices": len(before) - len(live), "rejects": 0, "features": 0}
    assert deleted == {**expected, "model": 4}
    assert {name for name, version in versions.items() if version.exists()} == {"v100", "v10"}
    assert summary.details["bytes_freed"] > 400
