"""Retention: delete what replaced tables and models leave behind, once no reader needs it.

Every write keeps the files it replaced: Delta keeps removed data files until ``VACUUM`` (about
1 GB per full-size ingest), and a Parquet table or the model keeps its older version directories
(``<parent>/.<name>.versions/<YYYYmmddTHHMMSSZ>-<hex>``, ``stockvol.location``). What is kept
(docs/reliability.md, "Retention"):

* the current version, always: a Delta table's latest snapshot, the version a link points to;
* anything newer than the current version (a run may be writing it);
* a replaced version until ``hours`` after the version that replaced it started (its name holds
  that start time: the bound is early by the replacing run's own duration, minutes);
* leftovers of killed runs (version and ``.tasks`` directories older than the current version)
  likewise, and Delta staged copies in ``.<table>.versions/`` until ``hours`` after they started.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pyarrow.fs as pafs
from pyspark.sql import SparkSession

from stockvol.config import Config
from stockvol.location import Location, current_version, version_time, versions_dir
from stockvol.spark import session_conf
from stockvol.storage import TASKS_SUFFIX
from stockvol.summary import StageSummary

log = logging.getLogger("stockvol")

# Delta's own default of delta.deletedFileRetentionDuration: VACUUM refuses less unless told.
DELTA_DEFAULT_HOURS = 168.0
_RETENTION_PROPERTY = "delta.deletedFileRetentionDuration"
_LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"

# What each stage replaces: the names ``apply`` takes. ``raw`` has versions on object storage only
# (acquire uploads a new version there; on local disk it renames a folder into place).
TARGETS = ("raw", "prices", "rejects", "features", "model")


@dataclass(frozen=True)
class Removed:
    """What retention deleted below one table or model."""

    target: str
    entries: int  # Delta data files, or version / tasks / staged directories
    bytes: int

    def __add__(self, other: Removed) -> Removed:
        return Removed(self.target, self.entries + other.entries, self.bytes + other.bytes)


def _tree_files(location: Location, skip_hidden: bool = False) -> list[pafs.FileInfo]:
    """The files below a directory (``skip_hidden``: leave out ``_delta_log`` and other names
    Delta treats as hidden); none for one that does not exist."""
    filesystem, path = location.arrow
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=True)
    files = []
    for entry in filesystem.get_file_info(selector):
        if entry.type != pafs.FileType.File:
            continue
        parts = entry.path[len(path) :].strip("/").split("/")
        if skip_hidden and any(part.startswith(("_", ".")) for part in parts):
            continue
        files.append(entry)
    return files


def _tree_bytes(location: Location, skip_hidden: bool = False) -> tuple[int, int]:
    """Files and bytes below a directory, as ``_tree_files`` finds them."""
    files = _tree_files(location, skip_hidden)
    return len(files), sum(entry.size or 0 for entry in files)


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def is_delta_table(table: Location) -> bool:
    """A Delta table's directory (a Parquet table's link or pointer has no ``_delta_log``)."""
    return (table / "_delta_log").is_dir()


def _retention_property(spark: SparkSession, table: Location) -> str | None:
    rows = spark.sql(f"SHOW TBLPROPERTIES delta.`{table}` ('{_RETENTION_PROPERTY}')").collect()
    value = rows[0]["value"] if rows else None
    return None if value is None or "does not have" in value else value


def vacuum_delta(spark: SparkSession, table: Location, hours: float) -> Removed:
    """Delta's own ``VACUUM`` of the table's files removed more than ``hours`` ago; the data
    files and bytes it deleted (counted by listing the table before and after).

    VACUUM only deletes data files last modified more than ``hours`` ago, so when the listing
    finds none (every run of the first week at 168 h) it is skipped: it costs 3-5 s per table
    even when it deletes nothing, and writes two commits (VACUUM START/END) to the table's log.

    Delta 4.4 ignores VACUUM's retention argument unless it is 0 and takes the table property
    ``delta.deletedFileRetentionDuration`` instead (default 168 h), so that property is set to
    ``hours`` first (one metadata commit, only when it differs). VACUUM's listing runs with as
    many tasks as the session has cores: Spark's default, 10000, took 70-100 s on a tiny table
    in local mode, 8 s with 2."""
    from delta.tables import DeltaTable

    files = _tree_files(table, skip_hidden=True)
    bound = datetime.now(timezone.utc) - timedelta(hours=hours)
    if not any(entry.mtime is None or _as_utc(entry.mtime) < bound for entry in files):
        log.info("%s: no data file older than %.4g h, nothing to VACUUM", table, hours)
        return Removed(table.name, 0, 0)
    wanted = f"interval {round(hours * 3600)} seconds"
    current = _retention_property(spark, table)
    if current != wanted and not (current is None and hours == DELTA_DEFAULT_HOURS):
        log.info("%s: %s = '%s' (was %s)", table, _RETENTION_PROPERTY, wanted, current)
        spark.sql(
            f"ALTER TABLE delta.`{table}` SET TBLPROPERTIES ('{_RETENTION_PROPERTY}' = '{wanted}')"
        )
    if hours < DELTA_DEFAULT_HOURS:
        log.info(
            "%s: retention %.4g h is below Delta's default of %.0f h: a reader of a replaced "
            "version, or a run still writing, can lose files older than that",
            table,
            hours,
            DELTA_DEFAULT_HOURS,
        )
    listing = {_LISTING_PARALLELISM: str(max(1, spark.sparkContext.defaultParallelism))}
    with session_conf(spark, listing):
        DeltaTable.forPath(spark, str(table)).vacuum()
    files_after, bytes_after = _tree_bytes(table, skip_hidden=True)
    return Removed(
        table.name, len(files) - files_after, sum(f.size or 0 for f in files) - bytes_after
    )


def _started(entry: pafs.FileInfo, location: Location) -> datetime | None:
    """When a version (or its ``.tasks`` directory) was started: from its name, else (a name
    not ours, local disk only) its modification time; None when neither is known."""
    base = Location(location.uri.removesuffix(TASKS_SUFFIX))
    started = version_time(base)
    if started is None and entry.mtime is not None and location.is_local:
        started = _as_utc(entry.mtime)
    return started


def expired_versions(link: Location, hours: float, now: datetime) -> list[Location]:
    """The entries of ``versions_dir(link)`` that retention deletes (see the module's rules).

    The current version is read once: a version published meanwhile is newer than it, so kept."""
    current = current_version(link)
    directory = versions_dir(link)
    entries = []  # (started, version name, location)
    for entry in directory.children():
        location = directory / entry.base_name
        base = entry.base_name.removesuffix(TASKS_SUFFIX)
        entries.append((_started(entry, location), base, location))
    bound = now - timedelta(hours=hours)
    dated = sorted((item for item in entries if item[0] is not None), key=lambda item: item[:2])
    unknown = [location for started, _, location in entries if started is None]
    if unknown:
        log.info("%s: kept %d entries of unknown age: %s", directory, len(unknown), unknown[:3])
    if current is None:  # no version is current (a Delta table, or nothing): staged copies
        return [location for started, _, location in dated if started < bound]
    current_key = (version_time(current), current.name)
    if current_key[0] is None:  # a current version not named by new_version: keep everything
        log.info("%s: current version %s has no start time in its name: none expire", link, current)
        return []
    expired = []
    starts = sorted({(started, base) for started, base, _ in dated})
    for started, base, location in dated:
        if base == current.name:
            if location.name.endswith(TASKS_SUFFIX) and started < bound:
                expired.append(location)  # late task attempts' files: not part of the table
            continue
        if (started, base) > current_key:
            continue  # newer than the current version: a run may be writing it
        replacing = next(
            (start for start, name in starts if (start, name) > (started, base)), current_key[0]
        )
        if replacing < bound:
            expired.append(location)
    return expired


def expire_versions(link: Location, hours: float, now: datetime | None = None) -> Removed:
    """Delete the expired entries of ``versions_dir(link)``; what was deleted."""
    now = now or datetime.now(timezone.utc)
    removed = Removed(link.name, 0, 0)
    for location in expired_versions(link, hours, now):
        _, size = _tree_bytes(location)
        location.delete()
        removed += Removed(link.name, 1, size)
    return removed


def apply(
    spark: SparkSession, targets: Iterable[tuple[str, Location]], hours: float
) -> list[Removed]:
    """Retention for each (name, table or model location): VACUUM for a Delta table, then the
    expired versions, staged copies and leftovers in its ``.versions`` directory."""
    if not (hours >= 0 and math.isfinite(hours)):
        raise ValueError(f"retention hours must be a finite number >= 0, got {hours!r}")
    removed = []
    for name, location in targets:
        done = Removed(name, 0, 0)
        if is_delta_table(location):
            done += vacuum_delta(spark, location, hours)
        done += expire_versions(location, hours)
        removed.append(Removed(name, done.entries, done.bytes))
    return removed


def _target_locations(config: Config, names: Iterable[str]) -> list[tuple[str, Location]]:
    paths = {
        "raw": config.raw_dir,
        "prices": config.prices_path,
        "rejects": config.rejects_path,
        "features": config.features_path,
        "model": config.model_dir,
    }
    return [(name, Location.parse(paths[name])) for name in names]


def stage(*names: str) -> Callable[[SparkSession, Config], StageSummary]:
    """A job stage applying ``config.retention_hours`` to the named targets (``TARGETS``): the
    jobs run it after the stages that replaced them, so only after those succeeded."""
    unknown = set(names) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown retention targets {sorted(unknown)}; known: {TARGETS}")

    def run(spark: SparkSession, config: Config) -> StageSummary:
        started = time.perf_counter()
        removed = apply(spark, _target_locations(config, names), config.retention_hours)
        return StageSummary(
            stage="retention",
            rows_in=0,
            rows_out=0,
            seconds=time.perf_counter() - started,
            details={
                "hours": config.retention_hours,
                "deleted": {r.target: r.entries for r in removed},
                "bytes_freed": sum(r.bytes for r in removed),
            },
        )

    return run
