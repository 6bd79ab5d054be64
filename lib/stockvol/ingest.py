"""Ingest: every per-symbol CSV in one Spark scan into the typed ``prices`` table, plus ``rejects``.

Every data line of every file lands in exactly one of the two tables; the job counts both per file
and fails if a single line is unaccounted for. See docs/ingest.md for the reasons a row is rejected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from stockvol.cli import PipelineError
from stockvol.config import Config
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
FIRST_DATE = "1900-01-01"
HEADER = ",".join(CSV_COLUMNS)
CORRUPT = "_corrupt_record"

# Reject reasons, in the order they are checked: a row gets the first that applies.
MALFORMED_LINE = "malformed_line"  # wrong number of fields
BAD_HEADER = "bad_header"  # the file does not start with the Kaggle header
MISSING_VALUES = "missing_values"  # a Date with some or all values empty
BAD_DATE = "bad_date"  # not a real calendar date written YYYY-MM-DD, or outside 1900..today
BAD_NUMBER = "bad_number"  # a price that is not a finite number, a Volume that is not whole
NEGATIVE_VOLUME = "negative_volume"
DUPLICATE_DATE = "duplicate_date"  # the (Symbol, Date) was already kept from another row
REASONS = (
    MALFORMED_LINE,
    BAD_HEADER,
    MISSING_VALUES,
    BAD_DATE,
    BAD_NUMBER,
    NEGATIVE_VOLUME,
    DUPLICATE_DATE,
)

RAW_SCHEMA = StructType(
    [StructField(name, StringType()) for name in CSV_COLUMNS] + [StructField(CORRUPT, StringType())]
)
REJECTS_SCHEMA = StructType(
    [
        StructField("source_file", StringType(), nullable=False),
        StructField(SYMBOL, StringType(), nullable=False),
        *(StructField(name, StringType()) for name in CSV_COLUMNS),
        StructField("raw_line", StringType()),
        StructField("reason", StringType(), nullable=False),
    ]
)


class IngestInputError(PipelineError):
    """The raw folder or the metadata file is missing: nothing to ingest."""


class ConservationError(PipelineError):
    """Rows read differ from rows kept plus rows rejected: a row would be lost."""


@dataclass
class RawFiles:
    """What a cheap look at the raw folder finds before Spark reads it."""

    csv_files: list[str]  # paths relative to raw/, stocks/ first, each folder sorted
    empty: list[str] = field(default_factory=list)  # 0 bytes: not even a header
    bad_header: dict[str, str] = field(default_factory=dict)  # file -> its first line


def list_raw_files(raw_dir: Path) -> RawFiles:
    """List the CSVs and check each header line (one small read per file, no Spark)."""
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
            with path.open("rb") as handle:
                first = handle.readline()
            if not first:
                found.empty.append(relative)
                continue
            header = first.decode("utf-8-sig", errors="replace").rstrip("\r\n")
            if header != HEADER:
                found.bad_header[relative] = header
    if not found.csv_files:
        raise IngestInputError(f"no CSV files under {raw_dir}/stocks or {raw_dir}/etfs")
    return found


def read_raw(spark: SparkSession, raw_dir: Path) -> DataFrame:
    """All CSVs in one scan, every field a string, plus the file each line came from."""
    paths = [str(raw_dir / folder) for folder in FOLDERS if (raw_dir / folder).is_dir()]
    df = (
        spark.read.schema(RAW_SCHEMA)
        .option("header", True)
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT)
        .option("pathGlobFilter", "*.csv")
        .csv(paths)
    )
    # _metadata.file_name is URL-encoded (CARR#.csv arrives as CARR%23.csv).
    folder = F.element_at(F.split(F.col("_metadata.file_path"), "/"), -2)
    # url_decode is form decoding ('+' means space), so a literal '+' is protected first.
    name = F.url_decode(F.regexp_replace(F.col("_metadata.file_name"), r"\+", "%2B"))
    return df.select(
        F.concat_ws("/", folder, name).alias("source_file"),
        F.regexp_replace(name, r"\.csv$", "").alias(SYMBOL),
        # Increasing in line order within a file: the tie-break for a date repeated in one file.
        F.monotonically_increasing_id().alias("line_order"),
        *CSV_COLUMNS,
        CORRUPT,
    )


def _number(name: str) -> Column:
    return F.expr(f"try_cast(`{name}` AS DOUBLE)")


def _finite(value: Column) -> Column:
    return value.isNotNull() & ~F.isnan(value) & (F.abs(value) < float("inf"))


def classify(raw: DataFrame, bad_header_files: list[str]) -> DataFrame:
    """Add typed values and ``reason`` (null for a good row); pure, no duplicate check yet."""
    values = [*PRICE_COLUMNS, VOLUME]
    date_text = F.col(DATE)
    parsed_date = F.expr(f"try_to_date(`{DATE}`, 'yyyy-MM-dd')")
    real_date = (
        date_text.rlike(r"^\d{4}-\d{2}-\d{2}$")
        & parsed_date.isNotNull()
        & (F.date_format(parsed_date, "yyyy-MM-dd") == date_text)
        # A daily price is dated between the first exchanges' records and today.
        & parsed_date.between(F.lit(FIRST_DATE).cast("date"), F.current_date())
    )
    volume = F.expr(
        r"try_cast(nullif(regexp_extract(Volume, '^(-?[0-9]+)(\\.0*)?$', 1), '') AS BIGINT)"
    )
    missing = F.lit(False)
    for name in values:
        missing = missing | F.col(name).isNull() | (F.trim(F.col(name)) == "")
    prices_ok = F.lit(True)
    for name in PRICE_COLUMNS:
        prices_ok = prices_ok & _finite(_number(name))
    reason = (
        F.when(F.col(CORRUPT).isNotNull(), MALFORMED_LINE)
        .when(F.col("source_file").isin(bad_header_files), BAD_HEADER)
        .when(date_text.isNull() | missing, MISSING_VALUES)
        .when(~real_date, BAD_DATE)
        .when(~prices_ok | volume.isNull(), BAD_NUMBER)
        .when(volume < 0, NEGATIVE_VOLUME)
    )
    return raw.select(
        "*",
        reason.alias("reason"),
        *(_number(name).alias(f"_{name}") for name in PRICE_COLUMNS),
        volume.alias(f"_{VOLUME}"),
    )


def mark_duplicates(classified: DataFrame) -> DataFrame:
    """Reject all but one good row per (Symbol, Date): stocks/ before etfs/, then line order."""
    folder_rank = F.when(F.col("source_file").startswith("stocks/"), 0).otherwise(1)
    rank = F.row_number().over(
        Window.partitionBy(SYMBOL, DATE).orderBy(
            folder_rank, F.col("source_file"), F.col("line_order")
        )
    )
    # Partitioning by Symbol alone also satisfies the window's (Symbol, Date) clustering, and
    # leaves each symbol's rows together and date-sorted: features then needs no shuffle.
    good = (
        classified.filter(F.col("reason").isNull())
        .repartition(SYMBOL)
        .withColumn("reason", F.when(rank > 1, F.lit(DUPLICATE_DATE)))
    )
    return good.unionByName(classified.filter(F.col("reason").isNotNull()))


def security_names(meta: pd.DataFrame) -> pd.DataFrame:
    """``NASDAQ Symbol`` -> trimmed ``Security Name``, the key the Kaggle file names come from."""
    names = meta[["NASDAQ Symbol", "Security Name"]].dropna(subset=["NASDAQ Symbol"])
    names = names.assign(**{"Security Name": names["Security Name"].str.strip()})
    return names.drop_duplicates("NASDAQ Symbol").rename(columns={"NASDAQ Symbol": SYMBOL})


def to_prices(rows: DataFrame, names: DataFrame) -> DataFrame:
    """The kept rows in the prices contract: exact columns, names, types and order."""
    kept = rows.filter(F.col("reason").isNull()).select(
        SYMBOL,
        DATE,
        *(F.col(f"_{name}").alias(name) for name in PRICE_COLUMNS),
        F.col(f"_{VOLUME}").alias(VOLUME),
    )
    joined = kept.join(F.broadcast(names), on=SYMBOL, how="left")
    return joined.select(
        *(F.col(f.name).cast(f.dataType).alias(f.name) for f in PRICES_SCHEMA.fields)
    )


def to_rejects(rows: DataFrame) -> DataFrame:
    """The rejected rows with their source file, raw values and reason."""
    rejected = rows.filter(F.col("reason").isNotNull())
    return rejected.select(
        "source_file", SYMBOL, *CSV_COLUMNS, F.col(CORRUPT).alias("raw_line"), "reason"
    )


def header_line_rejects(spark: SparkSession, found: RawFiles) -> DataFrame:
    """A wrong first line was skipped by Spark as a header: keep it as a reject, not lose it."""
    rows = [
        (file, Path(file).name.removesuffix(".csv"), *([None] * len(CSV_COLUMNS)), line, BAD_HEADER)
        for file, line in sorted(found.bad_header.items())
    ]
    return spark.createDataFrame(rows, REJECTS_SCHEMA)


def file_counts(rows: DataFrame) -> pd.DataFrame:
    """Per file: lines read, kept, and rejected by reason (one aggregation)."""
    counts = rows.groupBy("source_file").agg(
        F.count(F.lit(1)).alias("read"),
        F.count(F.when(F.col("reason").isNull(), 1)).alias("kept"),
        *(F.count(F.when(F.col("reason") == r, 1)).alias(r) for r in REASONS),
    )
    return counts.toPandas().set_index("source_file").sort_index()


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
    rows = mark_duplicates(classify(read_raw(spark, raw_dir), sorted(found.bad_header)))
    # Classified once, read three times (prices, rejects, counts): no second CSV scan.
    rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = file_counts(rows)
        extra = header_line_rejects(spark, found)
        write_table(to_prices(rows, names), config.prices_path, config.storage_format)
        write_table(to_rejects(rows).unionByName(extra), config.rejects_path, config.storage_format)
    finally:
        rows.unpersist()
    for file in found.bad_header:  # the first line, which Spark skipped as a header
        if file not in counts.index:
            counts.loc[file] = 0
        counts.loc[file, ["read", BAD_HEADER]] += 1
    _check_conservation(counts)
    written = sum(
        read_table(spark, path, config.storage_format).count()
        for path in (config.prices_path, config.rejects_path)
    )
    if written != counts["read"].sum():
        raise ConservationError(f"{counts['read'].sum()} rows read but {written} rows written")
    files_with_rows = set(counts.index)
    header_only = [f for f in found.csv_files if f not in files_with_rows and f not in found.empty]
    symbols = {Path(f).name.removesuffix(".csv") for f in found.csv_files}
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
            "bad_header_files": sorted(found.bad_header),
            "symbols_without_metadata": no_meta,
            "format": config.storage_format,
        },
    )


def _check_conservation(counts: pd.DataFrame) -> None:
    accounted = counts["kept"] + counts[list(REASONS)].sum(axis=1)
    lost = counts[accounted != counts["read"]]
    if not lost.empty:
        raise ConservationError(f"rows read != kept + rejected for: {list(lost.index)[:10]}")
