"""Features: rolling mean and median per symbol, checked against pandas/numpy on the same rows."""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from chispa import assert_df_equality
from hypothesis import given, settings
from hypothesis import strategies as st
from pyspark import cloudpickle
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from stockvol import features, ingest
from stockvol.config import MEDIAN_MODES, Config, apply_overrides
from stockvol.features import (
    FeaturesInputError,
    FileFeaturesTask,
    add_rolling_features,
    features_table,
    run,
)
from stockvol.ingest import ConservationError
from stockvol.schema import (
    ADJ_CLOSE,
    ADJ_CLOSE_ROLLING_MED,
    DATE,
    FEATURES_SCHEMA,
    PRICES_SCHEMA,
    SECURITY_NAME,
    SYMBOL,
    VOL_MOVING_AVG,
    VOLUME,
)
from stockvol.storage import TableNotFoundError, read_parquet, read_table, write_table
from tests.real_files import quirk_sample

FIXTURES = quirk_sample()
PRICE_NAMES = [f.name for f in PRICES_SCHEMA]
FEATURE_NAMES = [f.name for f in FEATURES_SCHEMA]


# ------------------------------------------------------------- the oracle (pandas and numpy only)


def oracle(prices: pd.DataFrame, window: int, median: str) -> pd.DataFrame:
    """Both features from the definition, per symbol in date order, independently of lib code.

    Mean: the exact integer sum of the window's Volumes (Python ints) divided once, so correctly
    rounded; ``pandas_mean`` is pandas' own rolling mean. Median: ``approx`` is the
    ``ceil(window / 2)``-th smallest (Spark's percentile rank; the 15th of 30), ``exact`` is pandas'
    ``rolling().median()``.
    """
    out = prices.sort_values([SYMBOL, DATE]).reset_index(drop=True)
    groups = out.groupby(SYMBOL, sort=False)
    position = groups.cumcount().to_numpy()
    volume = [int(v) for v in out[VOLUME]]
    out["mean"] = [
        sum(volume[i - window + 1 : i + 1]) / window if position[i] >= window - 1 else np.nan
        for i in range(len(out))
    ]
    out["pandas_mean"] = groups[VOLUME].transform(lambda s: s.astype(float).rolling(window).mean())
    if median == "exact":
        out["median"] = groups[ADJ_CLOSE].transform(lambda s: s.rolling(window).median())
    else:
        rank = math.ceil(window / 2) - 1
        out["median"] = groups[ADJ_CLOSE].transform(
            lambda s: s.rolling(window).apply(lambda a: np.sort(a)[rank], raw=True)
        )
    return out


def assert_matches_oracle(features: DataFrame | pd.DataFrame, prices: pd.DataFrame, window: int,
                          median: str) -> None:  # fmt: skip
    """Same rows, the median and the exact mean bit for bit, pandas' mean to 1e-9 relative."""
    got = features.toPandas() if isinstance(features, DataFrame) else features
    got = got.sort_values([SYMBOL, DATE]).reset_index(drop=True)
    expected = oracle(prices, window, median)
    assert len(got) == len(expected)
    assert got[[SYMBOL, DATE, VOLUME]].equals(expected[[SYMBOL, DATE, VOLUME]])
    assert np.array_equal(got[ADJ_CLOSE_ROLLING_MED], expected["median"], equal_nan=True)
    assert np.array_equal(got[VOL_MOVING_AVG], expected["mean"], equal_nan=True)
    assert np.allclose(
        got[VOL_MOVING_AVG], expected["pandas_mean"], rtol=1e-9, atol=0, equal_nan=True
    )


# ---------------------------------------------------------------- data


def business_days(count: int, start: date = date(2015, 1, 2)) -> list[str]:
    days, day = [], start
    while len(days) < count:
        if day.weekday() < 5:
            days.append(day.isoformat())
        day += timedelta(days=1)
    return days


def generated_prices(lengths: dict[str, int], seed: int) -> pd.DataFrame:
    """Random prices with ties (values on a coarse grid), zeros, and volumes up to 10**11."""
    rng = np.random.default_rng(seed)
    frames = []
    for symbol, n in lengths.items():
        adj = np.round(rng.uniform(0, 5, n), 1)  # few distinct values: many ties
        adj[rng.random(n) < 0.1] = 0.0
        volume = rng.integers(0, 10**11, n) // rng.choice([1, 10**6], n)
        volume[rng.random(n) < 0.1] = 0
        frames.append(
            pd.DataFrame(
                {
                    SYMBOL: symbol,
                    SECURITY_NAME: f"{symbol} Inc.",
                    DATE: business_days(n, date(2010, 1, 4) + timedelta(days=int(rng.integers(9)))),
                    "Open": adj + 1,
                    "High": adj + 2,
                    "Low": adj,
                    "Close": adj + 0.5,  # fmt: skip
                    ADJ_CLOSE: adj,
                    VOLUME: volume.astype(np.int64),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def real_sample_prices() -> pd.DataFrame:
    """The real Kaggle fixture files as prices rows, without the incomplete rows ingest rejects."""
    meta = pd.read_csv(FIXTURES / "symbols_valid_meta.csv").set_index("NASDAQ Symbol")
    frames = []
    for path in sorted(FIXTURES.glob("*/*.csv")):
        if path.name == "symbols_valid_meta.csv":
            continue
        # round_trip: correctly rounded parsing, as Spark's (Java's); pandas' default fast parser
        # is off by one unit in the last place for thousands of these values.
        raw = pd.read_csv(path, dtype={DATE: str}, float_precision="round_trip").dropna()
        raw[VOLUME] = raw[VOLUME].astype(np.int64)
        raw.insert(0, SYMBOL, path.stem)
        raw.insert(1, SECURITY_NAME, meta.loc[path.stem, "Security Name"].strip())
        frames.append(raw)
    return pd.concat(frames, ignore_index=True)[PRICE_NAMES]


def prices_frame(spark: SparkSession, prices: pd.DataFrame, partitions: int = 2) -> DataFrame:
    """``prices`` in Spark, split into ``partitions`` slices in the given row order."""
    rows = [tuple(r) for r in prices[PRICE_NAMES].itertuples(index=False)]
    rows = [(*r[:-1], int(r[-1])) for r in rows]
    return spark.createDataFrame(spark.sparkContext.parallelize(rows, partitions), PRICES_SCHEMA)


def shuffled(prices: pd.DataFrame, seed: int) -> pd.DataFrame:
    return prices.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture
def small_batches(spark: SparkSession) -> Iterator[None]:
    """Arrow batches of 7 rows, so windows cross batch boundaries many times."""
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key)
    spark.conf.set(key, "7")
    yield
    spark.conf.set(key, before)


def with_window(config: Config, window: int, median: str = "approx", fmt: str = "delta") -> Config:
    return apply_overrides(config, window=window, median=median, storage_format=fmt)


# ---------------------------------------------------------------- hand-computed cases (chispa)

# Two symbols, interleaved and unsorted; AAA has calendar gaps (a window counts rows, not days),
# ties and zeros. Columns: Symbol, Date, Adj Close, Volume.
HAND_ROWS = [
    ("BBB", "2020-01-08", 4.0, 3),
    ("AAA", "2020-02-10", 0.0, 9),
    ("AAA", "2020-01-02", 5.0, 0),
    ("BBB", "2020-01-03", 2.0, 7),
    ("AAA", "2020-02-11", 9.0, 6),
    ("AAA", "2020-01-07", 1.0, 0),
    ("BBB", "2020-01-06", 2.0, 0),
    ("AAA", "2020-01-03", 5.0, 3),
    ("BBB", "2020-01-07", 2.0, 2),
]

# (Symbol, Date) -> (mean, median) worked out by hand; absent = both null.
HAND_WINDOW_3 = {
    ("AAA", "2020-01-07"): ((0 + 3 + 0) / 3, 5.0),  # [5, 5, 1] -> 5
    ("AAA", "2020-02-10"): ((3 + 0 + 9) / 3, 1.0),  # [5, 1, 0] -> 1
    ("AAA", "2020-02-11"): ((0 + 9 + 6) / 3, 1.0),  # [1, 0, 9] -> 1
    ("BBB", "2020-01-07"): ((7 + 0 + 2) / 3, 2.0),  # [2, 2, 2] -> 2
    ("BBB", "2020-01-08"): ((0 + 2 + 3) / 3, 2.0),  # [2, 2, 4] -> 2
}
# Window 4: approx takes the 2nd smallest of 4, exact the mean of the 2nd and 3rd.
HAND_WINDOW_4 = {
    "approx": {
        ("AAA", "2020-02-10"): (3.0, 1.0),  # [0, 1, 5, 5]
        ("AAA", "2020-02-11"): (4.5, 1.0),  # [0, 1, 5, 9]
        ("BBB", "2020-01-08"): (3.0, 2.0),  # [2, 2, 2, 4]
    },
    "exact": {
        ("AAA", "2020-02-10"): (3.0, 3.0),
        ("AAA", "2020-02-11"): (4.5, 3.0),
        ("BBB", "2020-01-08"): (3.0, 2.0),
    },
}


def hand_prices(spark: SparkSession) -> DataFrame:
    rows = [(s, f"{s} Corp", d, adj, adj, adj, adj, adj, v) for s, d, adj, v in HAND_ROWS]
    return spark.createDataFrame(rows, PRICES_SCHEMA)


def hand_expected(
    spark: SparkSession, values: dict[tuple[str, str], tuple[float, float]]
) -> DataFrame:
    rows = [
        (s, f"{s} Corp", d, adj, adj, adj, adj, adj, v, *values.get((s, d), (None, None)))
        for s, d, adj, v in HAND_ROWS
    ]
    return spark.createDataFrame(rows, FEATURES_SCHEMA)


def test_run_uses_window_from_config_over_rows_not_days(
    spark: SparkSession, config: Config
) -> None:
    config = with_window(config, 3)
    write_table(hand_prices(spark), Path(config.prices_path), "delta")
    summary = run(spark, config)
    got = read_table(spark, Path(config.features_path), "delta")
    assert_df_equality(got, hand_expected(spark, HAND_WINDOW_3), ignore_row_order=True,
                       ignore_nullable=True)  # fmt: skip
    assert (summary.rows_in, summary.rows_out) == (9, 9)


@pytest.mark.parametrize("median", MEDIAN_MODES)
def test_even_window_medians_per_mode(spark: SparkSession, median: str) -> None:
    got = add_rolling_features(hand_prices(spark), 4, median)
    assert_df_equality(got, hand_expected(spark, HAND_WINDOW_4[median]), ignore_row_order=True,
                       ignore_nullable=True)  # fmt: skip


def test_first_window_minus_one_rows_of_each_symbol_are_null(spark: SparkSession) -> None:
    prices = shuffled(generated_prices({"AAA": 31, "BBB": 29, "CCC": 30}, seed=3), seed=4)
    got = add_rolling_features(prices_frame(spark, prices, 3), 30, "approx")
    nulls = got.groupBy(SYMBOL).agg(
        F.count(F.when(F.col(VOL_MOVING_AVG).isNull(), 1)).alias("null_mean"),
        F.count(F.when(F.col(ADJ_CLOSE_ROLLING_MED).isNull(), 1)).alias("null_median"),
        F.min(F.when(F.col(VOL_MOVING_AVG).isNotNull(), F.col(DATE))).alias("first_date"),
    )
    expected = spark.createDataFrame(
        [
            ("AAA", 29, 29, sorted(prices[prices[SYMBOL] == "AAA"][DATE])[29]),
            ("BBB", 29, 29, None),
            ("CCC", 29, 29, sorted(prices[prices[SYMBOL] == "CCC"][DATE])[29]),
        ],
        "Symbol string, null_mean bigint, null_median bigint, first_date string",
    )
    assert_df_equality(nulls, expected, ignore_row_order=True, ignore_nullable=True)


# ---------------------------------------------------------- the oracle on generated and real data


@pytest.mark.parametrize(("median", "fmt"), [("approx", "delta"), ("exact", "parquet")])
def test_generated_data_equals_oracle_from_files_and_shuffled(
    spark: SparkSession, config: Config, median: str, fmt: str
) -> None:
    lengths = {"A": 1, "B": 29, "C": 30, "D": 31, "E": 200, "F": 75, "G": 64}
    prices = generated_prices(lengths, seed=11)
    # A table of two files: whole symbols in each (read from the file), except G, whose rows are
    # in both (shuffled through Spark); rows in shuffled order within each file.
    clustered = prices[prices[SYMBOL] != "G"]
    spread = shuffled(prices[prices[SYMBOL] == "G"], seed=5)
    half = len(spread) // 2
    first = shuffled(pd.concat([clustered[clustered[SYMBOL] <= "C"], spread[:half]]), seed=6)
    second = shuffled(pd.concat([clustered[clustered[SYMBOL] > "C"], spread[half:]]), seed=7)
    config = with_window(config, 30, median, fmt)
    rows = prices_frame(spark, first, 1).union(prices_frame(spark, second, 1))
    write_table(rows, Path(config.prices_path), fmt)
    summary = run(spark, config)
    assert (summary.details["files"], summary.details["symbols_shuffled"]) == (2, 1)
    assert summary.details["split_symbols_found_by"] == "reading Symbol"
    assert_matches_oracle(read_table(spark, Path(config.features_path), fmt), prices, 30, median)


@pytest.mark.parametrize(
    ("first_symbols", "found_by"),
    [("ABC", "file statistics"), ("ACE", "reading Symbol")],
)
def test_files_whose_symbol_ranges_overlap_are_read_to_find_split_symbols(
    spark: SparkSession, config: Config, first_symbols: str, found_by: str
) -> None:
    """No symbol is in both files. When the files' Symbol ranges (footer statistics) are
    disjoint that is known without reading them; when they overlap (A-E and B-F) each file's
    Symbol column is read. Either way nothing is shuffled and the result is the oracle's."""
    prices = generated_prices(dict.fromkeys("ABCDEF", 40), seed=13)
    in_first = prices[SYMBOL].isin(list(first_symbols))
    config = with_window(config, 30, "approx", "parquet")
    rows = prices_frame(spark, prices[in_first], 1).union(prices_frame(spark, prices[~in_first], 1))
    write_table(rows, Path(config.prices_path), "parquet")
    summary = run(spark, config)
    assert summary.details["split_symbols_found_by"] == found_by
    assert (summary.details["files"], summary.details["symbols_shuffled"]) == (2, 0)
    assert_matches_oracle(
        read_table(spark, Path(config.features_path), "parquet"), prices, 30, "approx"
    )


def test_a_symbol_split_across_two_files_touching_ranges_is_shuffled(
    spark: SparkSession, config: Config
) -> None:
    """Spark's ``maxRecordsPerFile`` cuts a symbol's rows over two files whose Symbol ranges
    touch (A-C and C-E): equal bounds are no proof the files hold different symbols, so C is
    found by reading Symbol and shuffled, and its windows run over all its rows."""
    prices = generated_prices(dict.fromkeys("ABCDEF", 40), seed=17)
    config = with_window(config, 30, "approx", "parquet")
    key = "spark.sql.files.maxRecordsPerFile"
    spark.conf.set(key, "100")  # 240 rows in order: A B C[:20] | C[20:] D E | F
    try:
        write_table(prices_frame(spark, prices, 1), Path(config.prices_path), "parquet")
    finally:
        spark.conf.unset(key)
    summary = run(spark, config)
    assert summary.details["split_symbols_found_by"] == "reading Symbol"
    assert (summary.details["files"], summary.details["symbols_shuffled"]) == (3, 1)
    assert_matches_oracle(
        read_table(spark, Path(config.features_path), "parquet"), prices, 30, "approx"
    )


def test_the_dataframe_function_equals_oracle(spark: SparkSession, small_batches: None) -> None:
    """``add_rolling_features`` on rows that are in no file (7-row Arrow batches)."""
    prices = generated_prices({"A": 31, "B": 64, "C": 2}, seed=12)
    got = add_rolling_features(prices_frame(spark, shuffled(prices, seed=1), 3), 30, "exact")
    assert_matches_oracle(got, prices, 30, "exact")


def test_real_sample_through_ingest_equals_oracle_in_both_modes(
    spark: SparkSession, config: Config
) -> None:
    """The real Kaggle files through ingest (which rejects the Date-only rows of HBAN and KO, so
    they are in no window) and features; pandas reads the same files for the oracle."""
    shutil.copytree(FIXTURES, Path(config.raw_dir))
    ingest.run(spark, config)
    prices = real_sample_prices()
    for median in MEDIAN_MODES:
        mode = with_window(config, 30, median)
        summary = run(spark, mode)
        # Ingest gives each task a range of symbols: no file needs reading to know none is split.
        assert summary.details["split_symbols_found_by"] == "file statistics"
        assert_matches_oracle(read_table(spark, mode.features_path, "delta"), prices, 30, median)


@pytest.mark.parametrize("window", [30, 4, 3])
def test_approx_mode_is_spark_percentile_approx(spark: SparkSession, window: int) -> None:
    """The claim behind ``approx``: Spark's percentile_approx(x, 0.5) over n values is the
    ceil(n/2)-th smallest, so our exact kernel reproduces it, ties and zeros included."""
    prices = generated_prices({"AAA": 90, "BBB": 45}, seed=21)
    rows = prices_frame(spark, prices)
    frame = Window.partitionBy(SYMBOL).orderBy(DATE).rowsBetween(-(window - 1), 0)
    spark_median = (
        rows.withColumn("n", F.count("*").over(frame))
        .withColumn("spark", F.percentile_approx(ADJ_CLOSE, 0.5).over(frame))
        .where(F.col("n") == window)
        .select(SYMBOL, DATE, F.col("spark").alias(ADJ_CLOSE_ROLLING_MED))
    )
    ours = add_rolling_features(rows, window, "approx").where(
        F.col(ADJ_CLOSE_ROLLING_MED).isNotNull()
    )
    assert_df_equality(ours.select(SYMBOL, DATE, ADJ_CLOSE_ROLLING_MED), spark_median,
                       ignore_row_order=True, ignore_nullable=True)  # fmt: skip


# ---------------------------------------------------------------- the kernel alone, any row order


@settings(max_examples=60, deadline=None)
@given(
    window=st.sampled_from([1, 2, 3, 4, 5, 30]),
    median=st.sampled_from(MEDIAN_MODES),
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    sort=st.booleans(),
)
def test_kernel_equals_oracle_whatever_the_row_order(
    window: int, median: str, lengths: list[int], seed: int, sort: bool
) -> None:
    prices = generated_prices({f"S{i}": n for i, n in enumerate(lengths)}, seed)
    rows = prices.sort_values([SYMBOL, DATE]) if sort else shuffled(prices, seed)
    table = pa.Table.from_pandas(rows[PRICE_NAMES], preserve_index=False)
    out = features_table(table, window, median).to_pandas()
    assert out[[SYMBOL, DATE]].equals(
        prices.sort_values([SYMBOL, DATE])[[SYMBOL, DATE]].reset_index(drop=True)
    )
    assert_matches_oracle(out, prices, window, median)


# ---------------------------------------------------------------- bad input, formats, the job


BAD_PRICES = {
    "has Date 2010-": lambda p: pd.concat([p, p.iloc[[40]]]),  # a duplicate date
    "null Volume": lambda p: p.assign(**{VOLUME: p[VOLUME].astype("Int64").mask(p.index == 3)}),
    "NaN Adj Close": lambda p: p.assign(**{ADJ_CLOSE: p[ADJ_CLOSE].mask(p.index == 3, np.nan)}),
}


def test_bad_prices_fail_clearly_and_keep_the_previous_features(
    spark: SparkSession, config: Config
) -> None:
    config = with_window(config, 30, fmt="parquet")
    prices = generated_prices({"AAA": 60}, seed=2)
    write_table(prices_frame(spark, prices), Path(config.prices_path), "parquet")
    run(spark, config)
    for message, change in BAD_PRICES.items():
        rows = [
            (*r[:-1], None if pd.isna(r[-1]) else int(r[-1]))
            for r in change(prices)[PRICE_NAMES].itertuples(index=False)
        ]
        write_table(spark.createDataFrame(rows, PRICES_SCHEMA), Path(config.prices_path), "parquet")
        with pytest.raises(FeaturesInputError, match=message):
            run(spark, config)
        assert_matches_oracle(
            read_table(spark, Path(config.features_path), "parquet"), prices, 30, "approx"
        )


class DropsARow(FileFeaturesTask):
    """A features task with a bug: the first row of each file it reads vanishes."""

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        files = [file for batch in batches for file in batch.column("file").to_pylist()]
        tables = (
            features_table(read_parquet(file, self.source.columns), self.window, self.median)
            for file in files
        )
        yield features._written(self.target, 0, (table.slice(1) for table in tables))


def test_a_row_lost_by_a_task_is_a_conservation_error(
    spark: SparkSession, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows the tasks wrote are checked against the rows read before anything is published:
    the previous features table stays."""
    config = with_window(config, 30, fmt="parquet")
    prices = generated_prices(dict.fromkeys("ABC", 40), seed=3)
    write_table(prices_frame(spark, prices, 3), Path(config.prices_path), "parquet")
    run(spark, config)
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the executors cannot import this module
    monkeypatch.setattr(features, "FileFeaturesTask", DropsARow)
    try:
        with pytest.raises(ConservationError, match="117 rows written, 120 read"):
            run(spark, config)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert_matches_oracle(
        read_table(spark, Path(config.features_path), "parquet"), prices, 30, "approx"
    )


def test_missing_prices_table_names_the_job_to_run(spark: SparkSession, config: Config) -> None:
    with pytest.raises(TableNotFoundError, match="ingest writes prices"):
        run(spark, config)


def test_parquet_output_has_the_features_schema(spark: SparkSession, config: Config) -> None:
    config = with_window(config, 30, median="exact", fmt="parquet")
    prices = generated_prices({"AAA": 40, "BBB": 35}, seed=8)
    write_table(prices_frame(spark, prices), Path(config.prices_path), "parquet")
    run(spark, config)
    got = read_table(spark, Path(config.features_path), "parquet")
    assert got.columns == FEATURE_NAMES
    assert [f.dataType for f in got.schema] == [f.dataType for f in FEATURES_SCHEMA]
    assert_matches_oracle(got, prices, 30, "exact")
