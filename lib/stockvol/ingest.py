"""Ingest: every per-symbol CSV in one Spark scan into the typed ``prices`` table, plus ``rejects``.

One Spark file scan (``binaryFile``, content not selected) lists every file of ``raw/stocks``
and ``raw/etfs``; the paths (not the data) are split by ranges of file names over tasks, so the
files of a symbol that is in both folders meet in one task. Each ``mapInArrow`` task reads its
files, classifies every line with ``stockvol.raw_csv`` (Arrow's C++ CSV reader), rejects dates a
symbol's earlier file already kept, and writes its good rows and its rejects as Parquet files
with pyarrow into the tables' staging directories. Only one count row per file and reason, a row
per file with its lines counted from its bytes apart from the classification, and one row per
staged file go back to Spark. The driver checks that every line landed in exactly
one of the two tables and publishes rejects, then prices, which name the rejects version they
pair with: that commit is the pair's one commit point, and ``read_ingest_pair`` reads a pair
from the same run (docs/ingest.md says why the rows never cross into the JVM: that cost several
times the parsing).
"""

from __future__ import annotations

import io
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

from stockvol.cli import PipelineError
from stockvol.config import Config
from stockvol.location import Location, resolve
from stockvol.raw_csv import (
    BAD_HEADER,
    LINE,
    REASON,
    REASONS,
    SOURCE_FILE,
    constant,
    count_lines,
    good_files,
    padded_table,
    parse_file,
    reject_repeated_dates,
    symbol_of,
    typed,
)
from stockvol.schema import (
    DATE,
    PRICE_COLUMNS,
    PRICES_SCHEMA,
    REJECTS_SCHEMA,
    SECURITY_NAME,
    SYMBOL,
    VOLUME,
)
from stockvol.storage import (
    FileWriter,
    TableWrite,
    VersionGoneError,
    commit_metadata,
    current_table_version,
    open_path,
    prepare_write,
    publish,
    read_table_version,
)
from stockvol.summary import StageSummary

log = logging.getLogger("stockvol")

FOLDERS = ("stocks", "etfs")  # also the duplicate rule: a date in stocks/ wins over etfs/
META_FILE = "symbols_valid_meta.csv"
PRICES_ARROW = to_arrow_schema(PRICES_SCHEMA)
REJECTS_ARROW = to_arrow_schema(REJECTS_SCHEMA)
# A task parses the files of single-file symbols this many bytes at a time: their checks run
# once per batch (raw_csv.good_files), and a batch's rows stay a small part of a row group.
BATCH_BYTES = 16 << 20
# The key of prices' commit metadata naming the rejects version they pair with (read_ingest_pair).
PAIRED_REJECTS = "rejects_version"
# Tasks per core: enough to even out files of different sizes, few enough to write large files.
TASKS_PER_CORE = 4

# What a task returns: per file, a row per reason found (``reason`` null for the kept rows) with
# how many rows, and a row with the lines the file holds (``count_lines``); per staged Parquet
# file, its table (prices or rejects), path and rows.
TABLE, STAGED_FILE, ROWS, LINES = "table", "staged_file", "rows", "lines"
RESULT_ARROW = pa.schema(
    [
        (SOURCE_FILE, pa.string()),
        (REASON, pa.string()),
        (TABLE, pa.string()),
        (STAGED_FILE, pa.string()),
        (ROWS, pa.int64()),
        (LINES, pa.int64()),
    ]
)


class IngestInputError(PipelineError):
    """The raw folder or the metadata file is missing: nothing to ingest."""


class ConservationError(PipelineError):
    """Rows read differ from rows kept plus rows rejected: a row would be lost."""


class PairGoneError(PipelineError):
    """The rejects version that the current prices pair with has been deleted."""


@dataclass
class RawFiles:
    """What a listing of the raw folder finds before Spark reads it."""

    csv_files: list[str]  # paths relative to raw/, stocks/ first, each folder sorted
    empty: list[str] = field(default_factory=list)  # 0 bytes: not even a header


def list_raw_files(raw_dir: Location | Path) -> RawFiles:
    """List the CSVs of the resolved raw folder (no file is opened); a clear error when there is
    nothing to ingest."""
    raw_dir = Location.parse(raw_dir)
    if not raw_dir.is_dir():
        raise IngestInputError(
            f"raw data folder not found: {raw_dir}; "
            "run `python jobs/download.py --data-dir DIR` first"
        )
    if not (raw_dir / META_FILE).is_file():
        raise IngestInputError(
            f"{raw_dir / META_FILE} not found: the Kaggle layout has it beside stocks/ and etfs/"
        )
    found = RawFiles(csv_files=[])
    for folder in FOLDERS:
        for entry in (raw_dir / folder).children():
            if entry.type != pafs.FileType.File or not entry.base_name.endswith(".csv"):
                continue
            relative = f"{folder}/{entry.base_name}"
            found.csv_files.append(relative)
            if entry.size == 0:
                found.empty.append(relative)
    if not found.csv_files:
        raise IngestInputError(f"no CSV files under {raw_dir}/stocks or {raw_dir}/etfs")
    return found


def security_names(meta: pd.DataFrame) -> dict[str, str]:
    """``NASDAQ Symbol`` -> trimmed ``Security Name``, the key the Kaggle file names come from."""
    names = meta[["NASDAQ Symbol", "Security Name"]].dropna(subset=["NASDAQ Symbol"])
    names = names.drop_duplicates("NASDAQ Symbol")
    return dict(zip(names["NASDAQ Symbol"], names["Security Name"].str.strip(), strict=True))


def all_kept(table: pa.Table) -> bool:
    """True when no row of a parsed file is rejected."""
    return table.column(REASON).null_count == len(table)


def price_rows(table: pa.Table, security_name: str | None) -> pa.Table:
    """A parsed file's good rows in the prices contract: exact columns, names, types, order."""
    good = table if all_kept(table) else table.filter(pc.is_null(table.column(REASON)))
    n = len(good)
    columns = {
        SYMBOL: good.column(SYMBOL),
        SECURITY_NAME: constant(security_name, n),
        DATE: good.column(DATE),
        **{name: good.column(typed(name)) for name in (*PRICE_COLUMNS, VOLUME)},
    }
    return pa.table([columns[f.name] for f in PRICES_ARROW], schema=PRICES_ARROW)


def good_price_rows(
    rows: pa.Table, symbols: list[str], sizes: list[int], names: dict[str, str]
) -> pa.Table:
    """Typed rows of whole files, all good (``raw_csv.good_files``), in the prices contract:
    ``sizes[i]`` rows of ``symbols[i]`` after one another."""
    which = np.repeat(np.arange(len(symbols)), sizes)
    columns = {
        SYMBOL: pa.array(symbols, pa.string()).take(which),
        SECURITY_NAME: pa.array([names.get(s) for s in symbols], pa.string()).take(which),
        **{name: rows.column(name) for name in (DATE, *PRICE_COLUMNS, VOLUME)},
    }
    return pa.table([columns[f.name] for f in PRICES_ARROW], schema=PRICES_ARROW)


def reject_rows(table: pa.Table) -> pa.Table:
    """A parsed file's rejected rows with their file, line, raw values and reason."""
    return (
        table.filter(pc.is_valid(table.column(REASON)))
        .select(REJECTS_ARROW.names)
        .cast(REJECTS_ARROW)
    )


def file_counts(table: pa.Table, source_file: str) -> pa.Table:
    """One row per reason found in a parsed file (null: kept), with how many rows."""
    if len(table) and all_kept(table):  # the usual file: no grouping needed
        reasons, rows = pa.nulls(1, pa.string()), pa.array([len(table)], pa.int64())
    else:
        counts = table.group_by(REASON).aggregate([(LINE, "count")])
        reasons, rows = counts.column(REASON), counts.column(f"{LINE}_count").cast(pa.int64())
    n = len(reasons)
    columns = {SOURCE_FILE: constant(source_file, n), REASON: reasons, ROWS: rows}
    return padded_table(columns, n, RESULT_ARROW)


def lines_row(source_file: str, content: bytes) -> pa.Table:
    """The result row saying how many lines a file holds, counted apart from its parsing."""
    columns = {
        SOURCE_FILE: pa.array([source_file], pa.string()),
        LINES: pa.array([count_lines(content)], pa.int64()),
    }
    return padded_table(columns, 1, RESULT_ARROW)


def staged_rows(name: str, writer: FileWriter) -> pa.Table:
    """One result row per file a task's writer wrote for table ``name``."""
    files = writer.close()
    n = len(files)
    columns = {
        TABLE: pa.array([name] * n, pa.string()),
        STAGED_FILE: pa.array([path for path, _ in files], pa.string()),
        ROWS: pa.array([rows for _, rows in files], pa.int64()),
    }
    return padded_table(columns, n, RESULT_ARROW)


@dataclass(frozen=True)
class IngestTask:
    """The mapInArrow body: the paths of whole files in (all files of each of its symbols),
    count rows and staged file names out."""

    prices: TableWrite
    rejects: TableWrite
    names: dict[str, str]
    today: date  # the last valid Date: one value for every task, whatever its clock or zone
    max_rows_per_file: int = 0  # 0: no limit

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        by_symbol: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for batch in batches:
            for path in batch.column("path").to_pylist():
                source_file = "/".join(path.rsplit("/", 2)[-2:])  # stocks/X.csv
                by_symbol[symbol_of(source_file)].append((source_file, path))
        prices = FileWriter(self.prices, self.max_rows_per_file)
        rejects = FileWriter(self.rejects, self.max_rows_per_file)
        today = self.today
        single: list[tuple[str, bytes]] = []  # symbols in one file, in order, read not parsed
        single_bytes = 0
        for _, files in sorted(by_symbol.items()):
            if len(files) == 1:
                source_file, path = files[0]
                single.append((source_file, read_bytes(path)))
                single_bytes += len(single[-1][1])
                yield from lines_row(*single[-1]).to_batches()
                if single_bytes >= BATCH_BYTES:
                    yield from self._single_files(single, prices, rejects, today)
                    single, single_bytes = [], 0
                continue
            yield from self._single_files(single, prices, rejects, today)
            single, single_bytes = [], 0
            # A symbol in several files: a later file may repeat a date, and that row's reject
            # must keep the text the file had.
            files.sort(key=lambda file: (FOLDERS.index(file[0].split("/")[0]), file[0]))
            tables = []
            for source_file, path in files:
                content = read_bytes(path)
                yield from lines_row(source_file, content).to_batches()
                tables.append(parse_file(content, source_file, today, keep_text=True))
            for (source_file, _), table in zip(files, reject_repeated_dates(tables), strict=True):
                yield from self._parsed(source_file, table, prices, rejects)
        yield from self._single_files(single, prices, rejects, today)
        for name, writer in (("prices", prices), ("rejects", rejects)):
            yield from staged_rows(name, writer).to_batches()

    def _single_files(
        self,
        files: list[tuple[str, bytes]],
        prices: FileWriter,
        rejects: FileWriter,
        today: date,
    ) -> Iterator[pa.RecordBatch]:
        """Files of symbols that have no other file, in order: runs of all-good files go to
        prices together, any other file is classified line by line."""
        good = good_files([content for _, content in files], today)
        run: list[tuple[str, pa.Table]] = []
        for (source_file, content), rows in zip(files, good, strict=True):
            if rows is not None:
                run.append((source_file, rows))
                continue
            yield from self._good_run(run, prices)
            run = []
            yield from self._parsed(
                source_file, parse_file(content, source_file, today), prices, rejects
            )
        yield from self._good_run(run, prices)

    def _good_run(
        self, run: list[tuple[str, pa.Table]], prices: FileWriter
    ) -> Iterator[pa.RecordBatch]:
        """All-good files: their rows to prices at once, a count row per file."""
        if not run:
            return
        source_files = [source_file for source_file, _ in run]
        sizes = [rows.num_rows for _, rows in run]
        symbols = [symbol_of(source_file) for source_file in source_files]
        prices.add(
            good_price_rows(pa.concat_tables([rows for _, rows in run]), symbols, sizes, self.names)
        )
        n = len(run)
        columns = {
            SOURCE_FILE: pa.array(source_files, pa.string()),
            ROWS: pa.array(sizes, pa.int64()),
        }
        yield from padded_table(columns, n, RESULT_ARROW).to_batches()

    def _parsed(
        self, source_file: str, table: pa.Table, prices: FileWriter, rejects: FileWriter
    ) -> Iterator[pa.RecordBatch]:
        """A file classified line by line: good rows to prices, the others to rejects."""
        prices.add(price_rows(table, self.names.get(symbol_of(source_file))))
        rejects.add(reject_rows(table))
        yield from file_counts(table, source_file).to_batches()


def today_utc() -> date:
    """Today's date in UTC, taken once on the driver: executors on other hosts, in other time
    zones, or running past midnight would otherwise disagree on whether a date is in the future."""
    return datetime.now(timezone.utc).date()


def read_bytes(path: str) -> bytes:
    """A file's bytes, from the path Spark's file listing gives (``file:/...``, ``s3a://...``)."""
    filesystem, inner = open_path(path)
    with filesystem.open_input_stream(inner) as stream:
        return stream.read()


def ingest_files(
    spark: SparkSession, raw_dir: Location | Path, task: Callable[[Iterator], Iterator]
) -> pd.DataFrame:
    """Every CSV of raw/stocks and raw/etfs, listed by one Spark file scan and handed out to
    tasks by ranges of file names (the same name in both folders is the same symbol); the tasks'
    result rows, collected (one action: the tasks write files, they must run once)."""
    raw_dir = Location.parse(raw_dir)
    paths = [str(raw_dir / folder) for folder in FOLDERS if (raw_dir / folder).is_dir()]
    files = spark.read.format("binaryFile").option("pathGlobFilter", "*.csv").load(paths)
    tasks = TASKS_PER_CORE * spark.sparkContext.defaultParallelism
    # A range of file names per task: the files a task writes then hold symbols no other file
    # holds, which the features job sees from their Symbol statistics without reading them.
    name = F.regexp_extract("path", r"[^/]*$", 0)
    by_name = files.select("path").repartitionByRange(tasks, name)
    result = by_name.mapInArrow(task, from_arrow_schema(RESULT_ARROW))
    return result.toPandas()


def count_table(result: pd.DataFrame) -> pd.DataFrame:
    """Per file: lines read (counted from its bytes; -1 if never counted), kept, and rejected
    by reason. A reason that is none of ``REASONS`` gets a column of its own, so that
    ``_check_conservation`` sees its rows as unaccounted for instead of dropping them."""
    files = result[result[SOURCE_FILE].notna()]
    read = files[files[LINES].notna()].groupby(SOURCE_FILE)[LINES].sum()
    counts = files[files[LINES].isna()]
    reasons = counts[REASON].fillna("kept")
    table = counts.pivot_table(index=SOURCE_FILE, columns=reasons, values=ROWS, aggfunc="sum")
    table = table.reindex(index=read.index.union(table.index))
    columns = ["kept", *REASONS, *sorted(set(table.columns) - {"kept", *REASONS})]
    table = table.reindex(columns=columns).fillna(0).astype("int64")
    table.insert(0, "read", read.reindex(table.index).fillna(-1).astype("int64"))
    return table.sort_index()


def staged_files(result: pd.DataFrame, table: str) -> tuple[list[str], int]:
    """The files a table's tasks staged, and their rows."""
    staged = result[result[TABLE] == table]
    return sorted(staged[STAGED_FILE]), int(staged[ROWS].sum())


def run(spark: SparkSession, config: Config) -> StageSummary:
    """Read raw/, write prices and rejects, check that every line is accounted for."""
    started = time.perf_counter()
    raw_dir = resolve(config.raw_dir)  # once: acquire may publish a new raw/ meanwhile
    found = list_raw_files(raw_dir)
    meta = pd.read_csv(
        io.BytesIO((raw_dir / META_FILE).read_bytes()), dtype=str, keep_default_na=False
    )
    names = security_names(meta)
    fmt = config.storage_format
    prices = prepare_write(spark, config.prices_path, PRICES_SCHEMA, fmt)
    rejects = prepare_write(spark, config.rejects_path, REJECTS_SCHEMA, fmt)
    max_rows = int(spark.conf.get("spark.sql.files.maxRecordsPerFile", "0"))
    task = IngestTask(prices, rejects, names, today_utc(), max_rows)
    result = ingest_files(spark, raw_dir, task)
    counts = count_table(result)
    _check_conservation(counts)
    if uncounted := sorted(set(found.csv_files) - set(found.empty) - set(counts.index)):
        raise ConservationError(f"files listed but never read: {uncounted[:10]}")
    kept = int(counts["kept"].sum())
    rejected = {r: int(counts[r].sum()) for r in REASONS if counts[r].sum()}
    rejected_rows = sum(rejected.values())
    rejects_files = checked_staged_files(result, "rejects", rejected_rows)
    prices_files = checked_staged_files(result, "prices", kept)
    # Rejects first, then prices, which name the rejects they pair with: the prices commit is
    # the pair's one commit point (Delta has no transaction over two tables), and a run killed
    # between the two leaves the previous pair readable (read_ingest_pair).
    _publish(spark, rejects, rejects_files, rejected_rows)
    pair = {PAIRED_REJECTS: current_table_version(spark, config.rejects_path, fmt)}
    _publish(spark, prices, prices_files, kept, pair)
    header_only = [f for f in found.csv_files if f not in found.empty and not counts.loc[f, "read"]]
    symbols = {symbol_of(f) for f in found.csv_files}
    return StageSummary(
        stage="ingest",
        rows_in=int(counts["read"].sum()),
        rows_out=kept,
        rows_rejected=rejected_rows,
        seconds=time.perf_counter() - started,
        details={
            "files": len(found.csv_files),
            "rejected_by_reason": rejected,
            "header_only_files": header_only,
            "empty_files": found.empty,
            "bad_header_files": sorted(counts.index[counts[BAD_HEADER] > 0]),
            "symbols_without_metadata": sorted(symbols - set(names)),
            "format": config.storage_format,
        },
    )


def checked_staged_files(result: pd.DataFrame, table: str, want: int) -> list[str]:
    """The files the tasks staged for ``table``; a ConservationError unless they hold ``want``
    rows."""
    files, rows = staged_files(result, table)
    if rows != want:
        raise ConservationError(f"{table}: {rows} rows staged, {want} counted")
    return files


def _publish(
    spark: SparkSession,
    target: TableWrite,
    files: list[str],
    want: int,
    metadata: dict | None = None,
) -> None:
    """Publish a table's staged files; a ConservationError unless it then holds ``want`` rows."""
    written = publish(spark, target, files, metadata)
    if written != want:
        raise ConservationError(f"{target.path}: {written} rows written, {want} expected")


def read_ingest_pair(spark: SparkSession, config: Config) -> tuple[DataFrame, DataFrame]:
    """Prices and rejects from the same ingest run: prices' current version and the rejects
    version it names. A plain read of each table sees that table whole, but not necessarily
    from the same run as the other (ingest killed between its two commits)."""
    fmt = config.storage_format
    version = current_table_version(spark, config.prices_path, fmt)
    prices = read_table_version(spark, config.prices_path, fmt, version)
    rejects_version = (commit_metadata(spark, config.prices_path, fmt, version) or {}).get(
        PAIRED_REJECTS
    )
    if rejects_version is None:
        rejects_version = current_table_version(spark, config.rejects_path, fmt)
        log.warning(
            "%s (version %s) names no rejects version: written before ingest recorded one; "
            "reading the latest rejects (%s), which may come from another run",
            config.prices_path,
            version,
            rejects_version,
        )
    try:
        rejects = read_table_version(spark, config.rejects_path, fmt, rejects_version)
    except VersionGoneError:
        raise PairGoneError(
            f"{config.rejects_path}: version {rejects_version}, the rejects of the current "
            "prices, has been deleted (retention); rerun ingest to write a new pair"
        ) from None
    return prices, rejects


def _check_conservation(counts: pd.DataFrame) -> None:
    """Every line of every file (``read``, from its bytes) is kept or rejected for one of
    ``REASONS``."""
    accounted = counts["kept"] + counts[list(REASONS)].sum(axis=1)
    lost = counts[accounted != counts["read"]]
    if not lost.empty:
        details = "; ".join(
            f"{name}: {read} read, {accounted[name]} kept or rejected"
            for name, read in lost["read"].head(10).items()
        )
        raise ConservationError(f"rows read != kept + rejected for {details}")
