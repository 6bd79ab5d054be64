"""Reading and atomically replacing lake tables, in Delta (default) or Parquet."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import StructType

from stockvol.config import STORAGE_FORMATS
from stockvol.schema import DATE, SYMBOL

# The columns Delta keeps file statistics on, for data skipping (when the table has them).
STATS_COLUMNS = (SYMBOL, DATE)


class TableNotFoundError(FileNotFoundError):
    """A lake table the job needs has not been written yet."""


def _check_format(storage_format: str) -> None:
    if storage_format not in STORAGE_FORMATS:
        raise ValueError(f"storage format must be one of {STORAGE_FORMATS}, got {storage_format!r}")


def _versions_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.versions"


def write_table(df: DataFrame, path: Path, storage_format: str) -> None:
    """Replace the table at ``path`` so that a reader sees the old table or the new one, never half.

    Delta: an overwrite commit (column mapping on, so names with spaces are allowed; statistics
    on ``STATS_COLUMNS`` only); the previous version stays in the log. Parquet: the
    data goes to a fresh directory and ``path`` is a symlink swapped with one atomic rename, so a
    job killed at any moment leaves the previous table readable.
    """
    _check_format(storage_format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if storage_format == "delta":
        if path.is_symlink():  # the table was Parquet: its versions go once Delta has committed
            path.unlink()
        properties = {"delta.columnMapping.mode": "name", **_stats_property(df)}
        if table_exists(path, "delta"):
            _set_properties(df.sparkSession, path, properties)
        writer = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
        writer.options(**properties).save(str(path))
        shutil.rmtree(_versions_dir(path), ignore_errors=True)  # Parquet versions, staged files
        return
    new_version = new_staging_dir(path)
    df.write.parquet(str(new_version))
    _swap_in(new_version, path)


def new_staging_dir(path: Path) -> Path:
    """A fresh directory name (not created) for a new version of the table at ``path``: it
    becomes the table itself for Parquet; for Delta it holds files staged for the next write."""
    return _versions_dir(Path(path)) / uuid.uuid4().hex


def publish_staged(
    spark: SparkSession,
    staging: Path,
    files: list[str],
    schema: StructType,
    path: Path,
    storage_format: str,
) -> None:
    """Make the Parquet ``files`` a job wrote into ``staging`` (from ``new_staging_dir``) the
    table at ``path``, as atomically as ``write_table``. Other files there (left by failed task
    attempts) are dropped. Parquet: the directory becomes the table, nothing is copied. Delta:
    Spark copies the rows into the table in one commit; the staged files are then removed."""
    _check_format(storage_format)
    path = Path(path)
    staging.mkdir(parents=True, exist_ok=True)
    listed = {Path(f).name for f in files}
    for entry in staging.iterdir():
        if entry.name not in listed:
            entry.unlink()
    if storage_format == "delta":
        rows = (
            spark.read.schema(schema).parquet(*files)
            if files
            else spark.createDataFrame([], schema)
        )
        write_table(rows, path, "delta")
        return
    if not files:  # an empty table still has its schema
        pq.write_table(to_arrow_schema(schema).empty_table(), staging / "part-empty.parquet")
    _swap_in(staging, path)


def _swap_in(version: Path, path: Path) -> None:
    """Point the symlink ``path`` at ``version`` with one atomic rename; drop older versions."""
    if path.exists() and not path.is_symlink():  # the table was Delta before: switch format
        shutil.rmtree(path)
    link = path.parent / f".{path.name}.link-{uuid.uuid4().hex}"
    os.symlink(version.relative_to(path.parent), link)
    os.replace(link, path)
    _remove_stale_versions(_versions_dir(path), keep=version)


def _stats_property(df: DataFrame) -> dict[str, str]:
    """Delta keeps min/max/null statistics of the first 32 columns by default; on these tables
    that doubled the JVM's CPU per written row (docs/benchmarks.md), and only the keys are ever
    filtered on."""
    keys = [name for name in STATS_COLUMNS if name in df.columns]
    if not keys:
        return {}
    return {"delta.dataSkippingStatsColumns": ",".join(f"`{name}`" for name in keys)}


def _set_properties(spark: SparkSession, path: Path, properties: dict[str, str]) -> None:
    """Give an existing table these properties (a write's options only set them on creation);
    a table that has them already gets no extra commit."""
    from delta.tables import DeltaTable

    current = DeltaTable.forPath(spark, str(path)).detail().first()["properties"]
    changed = {k: v for k, v in properties.items() if current.get(k) != v}
    if changed:
        assignments = ", ".join(f"'{k}' = '{v}'" for k, v in changed.items())
        spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({assignments})")


def _remove_stale_versions(versions: Path, keep: Path) -> None:
    """Delete versions no reader can reach any more (older ones and leftovers of killed runs)."""
    for entry in versions.iterdir():
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)


def table_exists(path: Path, storage_format: str) -> bool:
    """True when a complete table of that format is at ``path``."""
    _check_format(storage_format)
    path = Path(path)
    if storage_format == "delta":
        return (path / "_delta_log").is_dir() and not path.is_symlink()
    return path.is_symlink() and path.exists()


def read_table(spark: SparkSession, path: Path, storage_format: str) -> DataFrame:
    """Read a lake table, or raise TableNotFoundError saying which job writes it."""
    path = Path(path)
    if not table_exists(path, storage_format):
        raise TableNotFoundError(
            f"no {storage_format} table at {path}: run the job that writes it first "
            f"(ingest writes prices and rejects, features writes features)"
        )
    return spark.read.format(storage_format).load(str(path))


def delta_version(spark: SparkSession, path: Path) -> int | None:
    """The latest Delta version of the table at ``path`` (None for Parquet or no table)."""
    if not table_exists(path, "delta"):
        return None
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, str(path)).history(1).collect()[0]["version"]
