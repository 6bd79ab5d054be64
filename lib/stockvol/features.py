"""Features: per-symbol rolling mean of Volume and rolling median of Adj Close, exact, fast.

Spark's sliding-frame aggregates re-evaluate the whole frame for every row and need a shuffle by
symbol. Here each partition's rows go to numpy in one Arrow table (``mapInArrow``), sorted by
(Symbol, Date) unless they already are: a window's Volume sum is a difference of int64 prefix
sums (exact), its median a ``np.partition`` of the window's values (exact). Symbols whose rows
all sit in one input partition (ingest writes each CSV file's rows together) are not shuffled;
the others are shuffled by symbol first. Both paths run the same kernel, so the result is
identical. The job's tasks write the features table's files themselves (``storage.FileWriter``)
and only file names return to Spark.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.lib.stride_tricks import sliding_window_view
from pyspark.errors import PythonException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import LongType, StringType, StructField, StructType

from stockvol.cli import PipelineError
from stockvol.config import MEDIAN_MODES, Config
from stockvol.ingest import ConservationError
from stockvol.schema import (
    ADJ_CLOSE,
    DATE,
    FEATURE_COLUMNS,
    FEATURES_SCHEMA,
    PRICES_SCHEMA,
    SYMBOL,
    VOLUME,
)
from stockvol.storage import (
    FileWriter,
    TableFiles,
    TableWrite,
    column_range,
    delta_version,
    prepare_write,
    publish,
    read_parquet,
    read_table,
    table_files,
)
from stockvol.summary import StageSummary

FEATURES_ARROW = to_arrow_schema(FEATURES_SCHEMA)
_INPUT_ARROW = to_arrow_schema(PRICES_SCHEMA)
# What a writing task returns: one row per Parquet file it wrote.
WRITTEN_SCHEMA = StructType([StructField("file", StringType()), StructField("rows", LongType())])
WRITTEN_ARROW = to_arrow_schema(WRITTEN_SCHEMA)
_FILE_SYMBOLS_ARROW = pa.schema([("file", pa.string()), (SYMBOL, pa.string())])
MEDIAN_ROWS_PER_STEP = 1 << 16
# Raised inside a Python worker; run() finds this marker in Spark's error and re-raises it plainly.
_BAD_INPUT = "features input error: "


class FeaturesInputError(PipelineError):
    """The prices table breaks the features contract (null key values, duplicate dates)."""


def median_ranks(window: int, median: str) -> tuple[int, ...]:
    """0-based ranks of the sorted window whose mean is the median in this mode.

    ``approx`` is what Spark's ``percentile_approx(x, 0.5)`` returns over ``window`` values: the
    ``ceil(window / 2)``-th smallest (the 15th of 30). ``exact`` is the textbook median that pandas'
    ``rolling().median()`` gives: the middle value, or the mean of the two middle values.
    """
    if median not in MEDIAN_MODES:
        raise ValueError(f"median mode must be one of {MEDIAN_MODES}, got {median!r}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if median == "approx" or window % 2:
        return ((window - 1) // 2,)
    return (window // 2 - 1, window // 2)


def window_features(
    new_run: np.ndarray,
    volume: np.ndarray,
    adj_close: np.ndarray,
    window: int,
    median: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rolling mean of ``volume`` and median of ``adj_close`` over runs of rows, vectorised.

    ``new_run[i]`` is True where row ``i`` starts a new symbol (row 0 always does). Returns
    ``(valid, mean, med)``: ``valid`` marks rows with ``window`` rows of their symbol ending
    there; ``mean`` and ``med`` hold one value per valid row, in row order.
    """
    index = np.arange(len(volume))
    run_start = np.maximum.accumulate(np.where(new_run, index, 0))
    valid = index - run_start >= window - 1
    ends = np.flatnonzero(valid)
    if not len(ends):  # also: fewer rows than a window, which sliding_window_view refuses
        return valid, np.empty(0), np.empty(0)
    starts = ends - (window - 1)
    # Prefix sums in int64: a window's sum is a difference of two of them, exact even if the
    # running total wraps around (modular arithmetic), as long as one window's sum fits in int64.
    prefix = np.concatenate(([0], np.cumsum(volume, dtype=np.int64)))
    sums = prefix[ends + 1] - prefix[starts]
    # One rounding: int64 -> float64 is exact below 2**53, then a correctly rounded division.
    mean = sums.astype(np.float64) / window
    ranks = median_ranks(window, median)
    windows = sliding_window_view(adj_close, window)  # a view: no copy
    med = np.empty(len(ends))
    # Selecting windows copies them (window values per row): a slice of rows at a time keeps that
    # copy small (a whole 3.5M-row file at once took 1.7 GB). The copy is partitioned in place
    # (np.partition would copy it again: a quarter of the median's time).
    for lo in range(0, len(starts), MEDIAN_ROWS_PER_STEP):
        values = windows[starts[lo : lo + MEDIAN_ROWS_PER_STEP]]
        values.partition(ranks, axis=1)
        step = values[:, ranks[0]]
        if len(ranks) == 2:
            step = (step + values[:, ranks[1]]) / 2
        med[lo : lo + len(step)] = step
    return valid, mean, med


def _fail(message: str) -> None:
    raise ValueError(_BAD_INPUT + message)


def _check_keys(prices: pa.Table) -> None:
    for name in (SYMBOL, DATE, VOLUME, ADJ_CLOSE):
        if count := prices.column(name).null_count:
            _fail(f"{count} null {name} value(s); ingest must reject such rows")
    if pc.any(pc.is_nan(prices.column(ADJ_CLOSE))).as_py():
        _fail(f"NaN {ADJ_CLOSE} value(s); ingest must reject such rows")


def _in_order(symbol: pa.Array, date: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per row after the first: same symbol as the row before, and in (Symbol, Date) order."""
    same = pc.equal(symbol[1:], symbol[:-1]).to_numpy(zero_copy_only=False)
    later = pc.greater(date[1:], date[:-1]).to_numpy(zero_copy_only=False)
    after = pc.greater(symbol[1:], symbol[:-1]).to_numpy(zero_copy_only=False)
    return same, after | (same & later)


def features_table(prices: pa.Table, window: int, median: str) -> pa.Table:
    """Whole symbols' prices rows, in any order, with both features: sorted by (Symbol, Date).

    Every row of a symbol must be in ``prices`` (the windows run over them all). Fails with a
    clear message on rows ingest should have rejected (null keys, NaN, a date repeated).
    """
    prices = prices.select(FEATURES_ARROW.names[: -len(FEATURE_COLUMNS)])
    _check_keys(prices)
    same, ordered = _in_order(prices.column(SYMBOL), prices.column(DATE))
    if not ordered.all():  # ingest writes each file in date order: usually no sort is needed
        prices = prices.take(pc.sort_indices(prices, [(SYMBOL, "ascending"), (DATE, "ascending")]))
        same, ordered = _in_order(prices.column(SYMBOL), prices.column(DATE))
    if not ordered.all():
        bad = int(np.flatnonzero(~ordered)[0]) + 1
        symbol, date = prices.column(SYMBOL)[bad].as_py(), prices.column(DATE)[bad].as_py()
        _fail(
            f"{SYMBOL} {symbol!r} has {DATE} {date} more than once; ingest must reject duplicates"
        )
    n = prices.num_rows
    valid, mean, med = window_features(
        np.concatenate(([True], ~same)) if n else np.zeros(0, dtype=bool),
        prices.column(VOLUME).to_numpy(),
        prices.column(ADJ_CLOSE).to_numpy(),
        window,
        median,
    )
    features = []
    for values in (mean, med):
        column = np.zeros(n)
        column[valid] = values
        features.append(pa.array(column, mask=~valid))
    return pa.Table.from_arrays([*prices.columns, *features], schema=FEATURES_ARROW)


def _without(prices: pa.Table, skip: frozenset[str]) -> pa.Table:
    if not skip:
        return prices
    return prices.filter(pc.invert(pc.is_in(prices.column(SYMBOL), pa.array(sorted(skip)))))


def _written(target: TableWrite, max_rows: int, tables: Iterator[pa.Table]) -> pa.RecordBatch:
    """Write the features ``tables`` as Parquet files for ``target``: one row per file."""
    writer = FileWriter(target, max_rows)
    for table in tables:
        writer.add(table)
    files = writer.close()
    columns = {"file": [f for f, _ in files], "rows": [rows for _, rows in files]}
    return pa.RecordBatch.from_pydict(columns, WRITTEN_ARROW)


@dataclass(frozen=True)
class FeaturesTask:
    """The mapInArrow body over prices rows: all rows of each of the partition's symbols in,
    features out; or, given a ``target``, the features written there as Parquet files and one
    row per file out (name and rows), so the rows never return to Spark."""

    window: int
    median: str
    target: TableWrite | None = None
    max_rows_per_file: int = 0  # 0: no limit

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        batches = list(batches)
        prices = pa.Table.from_batches(batches) if batches else _INPUT_ARROW.empty_table()
        features = features_table(prices, self.window, self.median)
        if self.target is None:
            yield from features.to_batches()
        else:
            yield _written(self.target, self.max_rows_per_file, iter([features]))


@dataclass(frozen=True)
class FileFeaturesTask:
    """The mapInArrow body over the paths of the prices table's Parquet files: each file read
    with pyarrow (the rows never pass through the JVM), its symbols but those in ``skip`` (they
    have rows in other files) computed, the features written for ``target``; a row per
    written file out."""

    source: TableFiles
    window: int
    median: str
    target: TableWrite
    skip: frozenset[str] = frozenset()
    max_rows_per_file: int = 0

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        files = [file for batch in batches for file in batch.column("file").to_pylist()]
        tables = (
            features_table(
                _without(read_parquet(file, self.source.columns), self.skip),
                self.window,
                self.median,
            )
            for file in files
        )
        yield _written(self.target, self.max_rows_per_file, tables)


def add_rolling_features(
    prices: DataFrame,
    window: int,
    median: str,
    target: TableWrite | None = None,
    max_rows_per_file: int = 0,
) -> DataFrame:
    """``prices`` plus ``vol_moving_avg`` and ``adj_close_rolling_med`` over ``window`` rows each,
    in any order (or, with ``target``, the files they were written to: see ``FeaturesTask``).
    Rows are shuffled by symbol, so each symbol's rows meet in one task."""
    rows = prices.select(*(F.col(f.name).cast(f.dataType) for f in PRICES_SCHEMA))
    task = FeaturesTask(window, median, target, max_rows_per_file)
    return rows.repartition(SYMBOL).mapInArrow(
        task, FEATURES_SCHEMA if target is None else WRITTEN_SCHEMA
    )


@dataclass(frozen=True)
class FileSymbols:
    """The mapInArrow body over file paths: the distinct symbols of each file (only the Symbol
    column is read, with pyarrow)."""

    source: TableFiles

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        column = {SYMBOL: self.source.columns[SYMBOL]}
        for batch in batches:
            for file in batch.column("file").to_pylist():
                symbols = pc.unique(read_parquet(file, column).column(SYMBOL).combine_chunks())
                yield pa.RecordBatch.from_pydict(
                    {"file": [file] * len(symbols), SYMBOL: symbols}, _FILE_SYMBOLS_ARROW
                )


def file_spread(files: DataFrame, source: TableFiles) -> list[str]:
    """Symbols with rows in more than one of the table's files (a task reads each file's
    Symbol column)."""
    symbols = files.mapInArrow(FileSymbols(source), from_arrow_schema(_FILE_SYMBOLS_ARROW))
    files_per_symbol = symbols.toPandas().groupby(SYMBOL)["file"].nunique()
    return sorted(files_per_symbol.index[files_per_symbol > 1])


def symbol_ranges_disjoint(source: TableFiles) -> bool:
    """True when the files' Symbol ranges (footer statistics) do not overlap: then no symbol
    has rows in two files, and no file needs reading to know it. Ingest writes its files so
    (each task takes a range of symbols, in order); a table written otherwise may not be."""
    ranges = [column_range(file, source.columns[SYMBOL]) for file in source.files]
    if any(bounds is None for bounds in ranges):
        return False
    ranges.sort()
    return all(high < low for (_, high), (low, _) in pairwise(ranges))


def write_features(
    prices: DataFrame, source: TableFiles | None, config: Config, target: TableWrite
) -> tuple[DataFrame, dict]:
    """The tasks that write the features of ``prices`` for ``target`` (a row per written file),
    and how the rows get there.

    When the table's files hold its rows as they are (``source``), each symbol whose rows are in
    one file is computed from that file read with pyarrow, one file per task; the other symbols
    (and all of them without ``source``) go through Spark, shuffled by symbol.
    """
    spark = prices.sparkSession
    max_rows = int(spark.conf.get("spark.sql.files.maxRecordsPerFile", "0"))
    if source is None:
        how = {"symbols_shuffled": "all"}
        return add_rolling_features(prices, config.window, config.median, target, max_rows), how
    paths = spark.createDataFrame([(f,) for f in source.files], "file string")
    paths = paths.repartition(max(len(source.files), 1))  # a file per task
    disjoint = symbol_ranges_disjoint(source)
    split = [] if disjoint else file_spread(paths, source)
    how = {
        "files": len(source.files),
        "split_symbols_found_by": "file statistics" if disjoint else "reading Symbol",
        "symbols_shuffled": len(split),
    }
    task = FileFeaturesTask(
        source, config.window, config.median, target, frozenset(split), max_rows
    )
    written = paths.mapInArrow(task, WRITTEN_SCHEMA)
    if split:
        rest = prices.where(F.col(SYMBOL).isin(split))
        written = written.unionByName(
            add_rolling_features(rest, config.window, config.median, target, max_rows)
        )
    return written, how


def read_prices(spark: SparkSession, config: Config, version: int | None) -> DataFrame:
    """The prices table, pinned to ``version`` when Delta (a concurrent ingest cannot change the
    files between the spread check and the computation)."""
    prices = read_table(spark, config.prices_path, config.storage_format)
    if version is None:
        return prices
    return spark.read.format("delta").option("versionAsOf", version).load(str(config.prices_path))


def run(spark: SparkSession, config: Config) -> StageSummary:
    """Read ``prices``, add both features, replace the ``features`` table; one summary."""
    started = time.perf_counter()
    version = delta_version(spark, config.prices_path)  # None for Parquet
    prices = read_prices(spark, config, version)
    rows_in = prices.count()
    source = table_files(spark, config.prices_path, config.storage_format, version)
    target = prepare_write(spark, config.features_path, FEATURES_SCHEMA, config.storage_format)
    written, how = write_features(prices, source, config, target)
    try:
        files = written.toPandas()  # one action: the tasks write files, they must run once
    except PythonException as err:
        message = str(err)
        if _BAD_INPUT in message:
            detail = message.split(_BAD_INPUT, 1)[1].splitlines()[0]
            raise FeaturesInputError(f"prices table {config.prices_path}: {detail}") from None
        raise
    if int(files["rows"].sum()) != rows_in:
        raise ConservationError(f"features: {files['rows'].sum()} rows written, {rows_in} read")
    rows_out = publish(spark, target, sorted(files["file"]))
    if rows_out != rows_in:
        raise ConservationError(
            f"{config.features_path}: {rows_out} rows published, {rows_in} read"
        )
    return StageSummary(
        "features",
        rows_in=rows_in,
        rows_out=rows_out,
        seconds=time.perf_counter() - started,
        details={"window": config.window, "median": config.median, **how},
    )
