"""Features: per-symbol rolling mean of Volume and rolling median of Adj Close, exact, fast.

Spark's sliding-frame aggregates re-evaluate the whole frame for every row and need a shuffle by
symbol. Here the rows of each partition are sorted by (Symbol, Date) and handed to numpy in Arrow
batches: a window's Volume sum is a difference of int64 prefix sums (exact), its median a
``np.partition`` of the window's values (exact). A batch carries its last ``window - 1`` rows
into the next, so windows span batch boundaries. Symbols whose rows all sit in one input
partition (ingest writes each CSV file's rows together) are not shuffled; the others are shuffled
by symbol first. Both paths run the same kernel, so the result is identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.lib.stride_tricks import sliding_window_view
from pyspark.errors import PythonException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, StructField, StructType

from stockvol.cli import PipelineError
from stockvol.config import MEDIAN_MODES, Config
from stockvol.schema import (
    ADJ_CLOSE,
    DATE,
    FEATURE_COLUMNS,
    PRICES_SCHEMA,
    SYMBOL,
    VOLUME,
)
from stockvol.storage import delta_version, read_table, write_table
from stockvol.summary import StageSummary

FEATURES_STRUCT = StructType([StructField(name, DoubleType()) for name in FEATURE_COLUMNS])
_STRUCT = "_features"
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
    first_position: int = 0,
    skip: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rolling mean of ``volume`` and median of ``adj_close`` over runs of rows, vectorised.

    ``new_run[i]`` is True where row ``i`` starts a new symbol (row 0 always starts a run, at
    position ``first_position`` of its symbol). The first ``skip`` rows only give history (rows
    carried over from the previous batch). Returns ``(valid, mean, med)`` for the other rows:
    ``valid`` marks rows with ``window`` rows of their symbol ending there; ``mean`` and ``med``
    hold one value per valid row, in row order.
    """
    n = len(volume)
    index = np.arange(n)
    run_start = np.maximum.accumulate(np.where(new_run, index, 0))
    position = index - run_start + np.where(run_start == 0, first_position, 0)
    valid = position[skip:] >= window - 1
    ends = np.flatnonzero(valid) + skip
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
    values = np.partition(sliding_window_view(adj_close, window)[starts], ranks, axis=1)
    med = (
        values[:, ranks[0]] if len(ranks) == 1 else (values[:, ranks[0]] + values[:, ranks[1]]) / 2
    )
    return valid, mean, med


@dataclass
class _Carry:
    """The last ``window - 1`` rows of the partition so far, and the position of the first one."""

    symbol: pa.Array
    date: pa.Array
    volume: np.ndarray
    adj_close: np.ndarray
    first_position: int = 0


def _fail(message: str) -> None:
    raise ValueError(_BAD_INPUT + message)


def _check_keys(symbol: pa.Array, date: pa.Array, volume: pa.Array, adj_close: pa.Array) -> None:
    for name, column in ((SYMBOL, symbol), (DATE, date), (VOLUME, volume), (ADJ_CLOSE, adj_close)):
        if column.null_count:
            _fail(f"{column.null_count} null {name} value(s); ingest must reject such rows")
    if pc.any(pc.is_nan(adj_close)).as_py():
        _fail(f"NaN {ADJ_CLOSE} value(s); ingest must reject such rows")


class RollingFeatures:
    """The kernel over a partition: (Symbol, Date, Volume, Adj Close) batches in, features out.

    Called once per partition; the rows of one symbol must be contiguous and in date order there.
    """

    def __init__(self, window: int, median: str) -> None:
        median_ranks(window, median)  # validate early, on the driver
        self.window = window
        self.median = median

    def __call__(self, batches: Iterator[tuple[pa.Array, ...]]) -> Iterator[pa.StructArray]:
        """One struct array (vol_moving_avg, adj_close_rolling_med) per batch, same length."""
        carry: _Carry | None = None
        for symbol, date, volume, adj_close in batches:
            n = len(volume)
            valid = np.zeros(n, dtype=bool)
            mean_column = np.zeros(n)
            med_column = np.zeros(n)
            if n:
                _check_keys(symbol, date, volume, adj_close)
                carry, valid, mean, med = self._step(carry, symbol, date, volume, adj_close)
                mean_column[valid] = mean
                med_column[valid] = med
            yield pa.StructArray.from_arrays(
                [pa.array(mean_column, mask=~valid), pa.array(med_column, mask=~valid)],
                names=list(FEATURE_COLUMNS),
            )

    def _step(
        self,
        carry: _Carry | None,
        symbol: pa.Array,
        date: pa.Array,
        volume: pa.Array,
        adj: pa.Array,
    ) -> tuple[_Carry, np.ndarray, np.ndarray, np.ndarray]:
        """Features of one batch, given the rows carried over; returns the next carry too."""
        kept = 0
        first_position = 0
        volume_np = volume.to_numpy()
        adj_np = adj.to_numpy()
        if carry is not None:
            kept = len(carry.volume)
            first_position = carry.first_position
            symbol = pa.concat_arrays([carry.symbol, symbol])
            date = pa.concat_arrays([carry.date, date])
            volume_np = np.concatenate([carry.volume, volume_np])
            adj_np = np.concatenate([carry.adj_close, adj_np])
        same = pc.equal(symbol[1:], symbol[:-1]).to_numpy(zero_copy_only=False)
        later = pc.greater(date[1:], date[:-1]).to_numpy(zero_copy_only=False)
        if (same & ~later).any():
            bad = int(np.flatnonzero(same & ~later)[0]) + 1
            _fail(
                f"{SYMBOL} {symbol[bad].as_py()!r} has {DATE} {date[bad].as_py()} more than once; "
                "ingest must reject duplicate dates"
            )
        new_run = np.concatenate(([True], ~same))
        valid, mean, med = window_features(
            new_run, volume_np, adj_np, self.window, self.median, first_position, skip=kept
        )
        keep = max(len(volume_np) - (self.window - 1), 0)
        position_of_keep = _position_at(new_run, keep, first_position)
        next_carry = _Carry(
            symbol[keep:], date[keep:], volume_np[keep:], adj_np[keep:], position_of_keep
        )
        return next_carry, valid, mean, med


def _position_at(new_run: np.ndarray, row: int, first_position: int) -> int:
    """The position of ``row`` within its symbol (0 for its first row); past the end gives 0."""
    if row >= len(new_run):
        return 0
    starts = np.flatnonzero(new_run[: row + 1])
    start = int(starts[-1])
    return row - start + (first_position if start == 0 else 0)


def rolling_udf(window: int, median: str) -> Callable[..., Column]:
    """An Arrow iterator UDF over (Symbol, Date, Volume, Adj Close) returning the features struct.

    Only those four columns travel to Python and only the two features come back; Spark keeps the
    other columns and zips the result onto them. The UDF keeps state from one batch to the next, so
    it is declared nondeterministic: the optimizer must not move it away from the sort below it.
    """
    kernel = RollingFeatures(window, median)

    def rolling(
        batches: Iterator[tuple[pa.Array, pa.Array, pa.Array, pa.Array]],
    ) -> Iterator[pa.Array]:
        return kernel(batches)

    return F.arrow_udf(rolling, FEATURES_STRUCT).asNondeterministic()


def add_rolling_features(
    prices: DataFrame, window: int, median: str, shuffle: bool = True
) -> DataFrame:
    """``prices`` plus ``vol_moving_avg`` and ``adj_close_rolling_med`` over ``window`` rows each.

    With ``shuffle=False`` the caller guarantees every symbol's rows are in one partition.
    """
    rows = prices.select(*(F.col(f.name).cast(f.dataType) for f in PRICES_SCHEMA))
    if shuffle:
        rows = rows.repartition(SYMBOL)
    features = rolling_udf(window, median)(SYMBOL, DATE, VOLUME, ADJ_CLOSE)
    return (
        rows.sortWithinPartitions(SYMBOL, DATE)
        .withColumn(_STRUCT, features)
        .select(
            *PRICES_SCHEMA.names,
            *(F.col(f"{_STRUCT}.{name}").alias(name) for name in FEATURE_COLUMNS),
        )
    )


def partition_spread(prices: DataFrame) -> tuple[list[str], int]:
    """Symbols whose rows are spread over more than one partition of ``prices``, and the number of
    symbols (one cheap pass over the Symbol column; partial aggregation keeps the shuffle tiny)."""
    spread = (
        prices.select(SYMBOL, F.spark_partition_id().alias("partition"))
        .groupBy(SYMBOL)
        .agg(F.min("partition").alias("first"), F.max("partition").alias("last"))
        .collect()
    )
    return sorted(row[SYMBOL] for row in spread if row["first"] != row["last"]), len(spread)


def compute_features(prices: DataFrame, window: int, median: str) -> tuple[DataFrame, dict]:
    """Features of ``prices``, shuffling only the symbols split across partitions; and how.

    ``prices`` must be one fixed snapshot (a pinned Delta version): the partition check and the
    computation read the same files with the same partitioning.
    """
    split, symbols = partition_spread(prices)
    how = {"symbols": symbols, "symbols_shuffled": len(split)}
    if not split:
        return add_rolling_features(prices, window, median, shuffle=False), how
    if len(split) == symbols:
        return add_rolling_features(prices, window, median, shuffle=True), how
    # The in-place part reads every row (no filter below it, so its partitions are exactly those the
    # check saw) and keeps the whole symbols; the split ones are shuffled together by symbol.
    in_place = add_rolling_features(prices, window, median, shuffle=False).where(
        ~F.col(SYMBOL).isin(split)
    )
    shuffled = add_rolling_features(
        prices.where(F.col(SYMBOL).isin(split)), window, median, shuffle=True
    )
    return in_place.unionByName(shuffled), how


def read_prices(spark: SparkSession, config: Config) -> DataFrame:
    """The prices table, pinned to its current version when Delta (a concurrent ingest cannot
    change the files between the partition check and the computation)."""
    prices = read_table(spark, config.prices_path, config.storage_format)
    if config.storage_format != "delta":
        return prices
    version = delta_version(spark, config.prices_path)
    return spark.read.format("delta").option("versionAsOf", version).load(str(config.prices_path))


def run(spark: SparkSession, config: Config) -> StageSummary:
    """Read ``prices``, add both features, replace the ``features`` table; one summary."""
    started = time.perf_counter()
    prices = read_prices(spark, config)
    rows_in = prices.count()
    features, how = compute_features(prices, config.window, config.median)
    try:
        write_table(features, config.features_path, config.storage_format)
    except PythonException as err:
        message = str(err)
        if _BAD_INPUT in message:
            detail = message.split(_BAD_INPUT, 1)[1].splitlines()[0]
            raise FeaturesInputError(f"prices table {config.prices_path}: {detail}") from None
        raise
    rows_out = read_table(spark, config.features_path, config.storage_format).count()
    return StageSummary(
        "features",
        rows_in=rows_in,
        rows_out=rows_out,
        seconds=time.perf_counter() - started,
        details={"window": config.window, "median": config.median, **how},
    )
