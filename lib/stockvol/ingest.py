"""Ingest: every per-symbol CSV in one Spark scan into the typed ``prices`` table, plus ``rejects``.

One Spark file scan (``binaryFile``) lists every file of ``raw/stocks`` and ``raw/etfs`` and
spreads them over tasks; a ``mapInArrow`` task reads each of its files and hands the bytes to
``stockvol.raw_csv``, which parses and classifies the lines with Arrow's C++ CSV reader (Spark's
CSV reader and casts spent several times the CPU per row here, docs/ingest.md). Spark then
rejects dates repeated across files (only symbols with a file in both folders need that
shuffle), writes both tables, and checks that every data line of every file landed in exactly
one of them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema
from pyspark.sql.types import LongType, StringType, StructField, StructType

from stockvol.cli import PipelineError
from stockvol.config import Config
from stockvol.raw_csv import (
    BAD_HEADER,
    DUPLICATE_DATE,
    LINE,
    PARSED_SCHEMA,
    RAW_LINE,
    REASON,
    REASONS,
    SOURCE_FILE,
    padded_table,
    parse_file,
    symbol_of,
    typed,
)
from stockvol.schema import (
    CSV_COLUMNS,
    DATE,
    PRICE_COLUMNS,
    PRICES_SCHEMA,
    SECURITY_NAME,
    SYMBOL,
    VOLUME,
)
from stockvol.storage import read_table, write_table
from stockvol.summary import StageSummary

FOLDERS = ("stocks", "etfs")  # also the duplicate rule: a date in stocks/ wins over etfs/
META_FILE = "symbols_valid_meta.csv"
ROWS = "rows"  # how many lines of its file a row of the accounting pass stands for
KEPT_SCHEMA = pa.schema(
    [PARSED_SCHEMA.field(n) for n in (SOURCE_FILE, SYMBOL, LINE, REASON, DATE)]
    + [PARSED_SCHEMA.field(typed(n)) for n in (*PRICE_COLUMNS, VOLUME)]
)
ACCOUNTING_SCHEMA = PARSED_SCHEMA.append(pa.field(ROWS, pa.int64()))
KEPT_SPARK_SCHEMA = from_arrow_schema(KEPT_SCHEMA)
ACCOUNTING_SPARK_SCHEMA = from_arrow_schema(ACCOUNTING_SCHEMA)
REJECTS_SCHEMA = StructType(
    [
        StructField(SOURCE_FILE, StringType(), nullable=False),
        StructField(SYMBOL, StringType(), nullable=False),
        StructField(LINE, LongType(), nullable=False),
        *(StructField(name, StringType()) for name in CSV_COLUMNS),
        StructField(RAW_LINE, StringType()),
        StructField(REASON, StringType(), nullable=False),
    ]
)


class IngestInputError(PipelineError):
    """The raw folder or the metadata file is missing: nothing to ingest."""


class ConservationError(PipelineError):
    """Rows read differ from rows kept plus rows rejected: a row would be lost."""


@dataclass
class RawFiles:
    """What a listing of the raw folder finds before Spark reads it."""

    csv_files: list[str]  # paths relative to raw/, stocks/ first, each folder sorted
    empty: list[str] = field(default_factory=list)  # 0 bytes: not even a header

    def symbols_in_several_files(self) -> list[str]:
        """Symbols with a file in both folders: only their dates can repeat across files."""
        symbols = Counter(symbol_of(f) for f in self.csv_files)
        return sorted(symbol for symbol, files in symbols.items() if files > 1)


def list_raw_files(raw_dir: Path) -> RawFiles:
    """List the CSVs (no file is opened); a clear error when there is nothing to ingest."""
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
        for path in sorted((raw_dir / folder).glob("*.csv")) if (raw_dir / folder).is_dir() else []:
            relative = f"{folder}/{path.name}"
            found.csv_files.append(relative)
            if path.stat().st_size == 0:
                found.empty.append(relative)
    if not found.csv_files:
        raise IngestInputError(f"no CSV files under {raw_dir}/stocks or {raw_dir}/etfs")
    return found


def kept_rows(table: pa.Table) -> pa.Table:
    """The prices pass: a file's good rows, in the lean ``KEPT_SCHEMA``."""
    return table.filter(pc.is_null(table.column(REASON))).select(KEPT_SCHEMA.names)


def accounting_rows(table: pa.Table, whole: bool) -> pa.Table:
    """The accounting pass: a file's rejected rows, each counting 1, and one row counting its good
    rows; ``whole`` files (rows a later step may still reject) give every row."""
    if whole or not len(table):
        return table.append_column(ROWS, pa.array(np.ones(len(table), np.int64)))
    good = pc.is_null(table.column(REASON))
    rejected = table.filter(pc.invert(good))
    rejected = rejected.append_column(ROWS, pa.array(np.ones(len(rejected), np.int64)))
    summary = {
        SOURCE_FILE: table.column(SOURCE_FILE)[:1],
        SYMBOL: table.column(SYMBOL)[:1],
        ROWS: pa.array([pc.sum(good.cast(pa.int64())).as_py()], pa.int64()),
    }
    return pa.concat_tables([rejected, padded_table(summary, 1, ACCOUNTING_SCHEMA)])


def file_parser(
    keep_text: frozenset[str], accounting: bool
) -> Callable[[Iterator[pa.RecordBatch]], Iterator]:
    """The mapInArrow body: paths of whole files in, their classified lines out, as the prices
    pass or the accounting pass wants them. ``keep_text`` files keep the raw text of good rows
    too and give every row to both passes (see ``mark_duplicates``)."""

    def parse_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for path in batch.column("path").to_pylist():
                source_file = "/".join(path.rsplit("/", 2)[-2:])  # stocks/X.csv, as on disk
                whole = source_file in keep_text
                table = parse_file(read_bytes(path), source_file, keep_text=whole)
                out = accounting_rows(table, whole) if accounting else kept_rows(table)
                yield from out.to_batches()

    return parse_batches


def read_bytes(path: str) -> bytes:
    """A file's bytes, from the path Spark's file listing gives (``file:/...``, ``s3a://...``)."""
    if path.startswith("file:"):
        return Path(path.removeprefix("file:")).read_bytes()
    filesystem, inner = pafs.FileSystem.from_uri(path.replace("s3a://", "s3://", 1))
    with filesystem.open_input_stream(inner) as stream:
        return stream.read()


def read_raw(
    spark: SparkSession,
    raw_dir: Path,
    accounting: bool,
    keep_text: frozenset[str] = frozenset(),
) -> DataFrame:
    """Every CSV of raw/stocks and raw/etfs, listed and spread over tasks by one Spark file scan
    (binaryFile, content not selected, so the JVM does not read it); each task reads its files
    with pyarrow and parses them, which is far cheaper than shipping their bytes to Python.
    The prices pass gives the good rows; the accounting pass the rejected rows and counts."""
    paths = [str(raw_dir / folder) for folder in FOLDERS if (raw_dir / folder).is_dir()]
    files = spark.read.format("binaryFile").option("pathGlobFilter", "*.csv").load(paths)
    schema = ACCOUNTING_SPARK_SCHEMA if accounting else KEPT_SPARK_SCHEMA
    return files.select("path").mapInArrow(file_parser(keep_text, accounting), schema)


def mark_duplicates(rows: DataFrame, symbols: list[str]) -> DataFrame:
    """Reject all but one good row per (Symbol, Date) of ``symbols`` (those in several files):
    stocks/ before etfs/, then file name, then line. Repeats within one file are already marked
    by the parser; only these symbols' rows are shuffled."""
    if not symbols:
        return rows
    several = F.col(SYMBOL).isin(symbols)
    folder_rank = F.when(F.col(SOURCE_FILE).startswith("stocks/"), 0).otherwise(1)
    rank = F.row_number().over(
        Window.partitionBy(SYMBOL, DATE).orderBy(folder_rank, F.col(SOURCE_FILE), F.col(LINE))
    )
    good = rows.filter(several & F.col(REASON).isNull())
    marked = good.withColumn(REASON, F.when(rank > 1, F.lit(DUPLICATE_DATE)))
    return rows.filter(~several | F.col(REASON).isNotNull()).unionByName(marked)


def security_names(meta: pd.DataFrame) -> pd.DataFrame:
    """``NASDAQ Symbol`` -> trimmed ``Security Name``, the key the Kaggle file names come from."""
    names = meta[["NASDAQ Symbol", "Security Name"]].dropna(subset=["NASDAQ Symbol"])
    names = names.assign(**{"Security Name": names["Security Name"].str.strip()})
    return names.drop_duplicates("NASDAQ Symbol").rename(columns={"NASDAQ Symbol": SYMBOL})


def to_prices(rows: DataFrame, names: DataFrame) -> DataFrame:
    """The kept rows in the prices contract: exact columns, names, types and order."""
    kept = rows.filter(F.col(REASON).isNull()).select(
        SYMBOL, DATE, *(F.col(typed(name)).alias(name) for name in (*PRICE_COLUMNS, VOLUME))
    )
    joined = kept.join(F.broadcast(names), on=SYMBOL, how="left")
    return joined.select(
        *(F.col(f.name).cast(f.dataType).alias(f.name) for f in PRICES_SCHEMA.fields)
    )


def to_rejects(rows: DataFrame) -> DataFrame:
    """The rejected rows with their source file, line number, raw values and reason."""
    return rows.filter(F.col(REASON).isNotNull()).select(*REJECTS_SCHEMA.names)


def file_counts(accounting: DataFrame) -> pd.DataFrame:
    """Per file: lines read, kept, and rejected by reason (one aggregation of the accounting
    pass, whose rows each stand for ``rows`` lines)."""
    lines = F.col(ROWS)
    counts = accounting.groupBy(SOURCE_FILE).agg(
        F.sum(lines).alias("read"),
        F.sum(F.when(F.col(REASON).isNull(), lines).otherwise(0)).alias("kept"),
        *(F.sum(F.when(F.col(REASON) == r, lines).otherwise(0)).alias(r) for r in REASONS),
    )
    return counts.toPandas().set_index(SOURCE_FILE).sort_index()


def run(spark: SparkSession, config: Config) -> StageSummary:
    """Read raw/, write prices and rejects, check that every line is accounted for."""
    started = time.perf_counter()
    raw_dir = config.raw_dir
    found = list_raw_files(raw_dir)
    meta = pd.read_csv(raw_dir / META_FILE, dtype=str, keep_default_na=False)
    name_rows = security_names(meta)
    names = spark.createDataFrame(
        name_rows,
        StructType([StructField(SYMBOL, StringType()), StructField(SECURITY_NAME, StringType())]),
    )
    several = found.symbols_in_several_files()
    keep_text = frozenset(f for f in found.csv_files if symbol_of(f) in several)
    # Two passes over the files, both classifying every line with the same code. The prices pass
    # streams the good rows into the table; the accounting pass keeps only the rejected rows and
    # one count per file, small enough to persist. Parsing twice costs less than caching 28
    # million rows in the JVM (docs/ingest.md), and the passes check each other below.
    kept = mark_duplicates(read_raw(spark, raw_dir, False, keep_text), several)
    write_table(to_prices(kept, names), config.prices_path, config.storage_format)
    accounting = mark_duplicates(read_raw(spark, raw_dir, True, keep_text), several)
    accounting = accounting.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = file_counts(accounting)
        write_table(to_rejects(accounting), config.rejects_path, config.storage_format)
    finally:
        accounting.unpersist()
    _check_conservation(counts)
    for path, expected in ((config.prices_path, "kept"), (config.rejects_path, None)):
        written = read_table(spark, path, config.storage_format).count()
        want = int(counts[expected].sum()) if expected else int(counts[list(REASONS)].sum().sum())
        if written != want:
            raise ConservationError(f"{path}: {written} rows written, {want} expected")
    files_with_rows = set(counts.index)
    header_only = [f for f in found.csv_files if f not in files_with_rows and f not in found.empty]
    symbols = {symbol_of(f) for f in found.csv_files}
    no_meta = sorted(symbols - set(name_rows[SYMBOL]))
    rejected = {r: int(counts[r].sum()) for r in REASONS if counts[r].sum()}
    return StageSummary(
        stage="ingest",
        rows_in=int(counts["read"].sum()),
        rows_out=int(counts["kept"].sum()),
        rows_rejected=sum(rejected.values()),
        seconds=time.perf_counter() - started,
        details={
            "files": len(found.csv_files),
            "rejected_by_reason": rejected,
            "header_only_files": header_only,
            "empty_files": found.empty,
            "bad_header_files": sorted(counts.index[counts[BAD_HEADER] > 0]),
            "symbols_without_metadata": no_meta,
            "format": config.storage_format,
        },
    )


def _check_conservation(counts: pd.DataFrame) -> None:
    accounted = counts["kept"] + counts[list(REASONS)].sum(axis=1)
    lost = counts[accounted != counts["read"]]
    if not lost.empty:
        raise ConservationError(f"rows read != kept + rejected for: {list(lost.index)[:10]}")
