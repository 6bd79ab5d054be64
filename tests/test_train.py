"""Train stage: split, fit, honest metrics against numpy, atomic export, tuning, bad input."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from chispa import assert_df_equality
from pyspark.ml import PipelineModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StringType, StructField, StructType

from stockvol import train as train_module
from stockvol.cli import PipelineError
from stockvol.config import (
    Config,
    ConfigError,
    add_common_arguments,
    config_from_args,
    load_config,
)
from stockvol.location import versions_dir
from stockvol.schema import FEATURES_SCHEMA
from stockvol.storage import TableNotFoundError, write_table
from stockvol.summary import StageSummary
from stockvol.train import (
    METRICS_FILE,
    PLOT_FILE,
    add_arguments,
    export_model,
    overrides,
    random_split,
    run,
    time_split,
    time_split_date,
    train,
)

WINDOW = 30
COLUMNS = [f.name for f in FEATURES_SCHEMA.fields]


def business_days(start: date, count: int) -> list[str]:
    days: list[str] = []
    day = start
    while len(days) < count:
        if day.weekday() < 5:
            days.append(day.isoformat())
        day += timedelta(days=1)
    return days


def features_rows(seed: int = 1) -> pd.DataFrame:
    """A features-shaped table with a learnable relation the baseline misses: each day's Volume is
    about 1.5 x the previous row's vol_moving_avg (what the default next_day horizon sees).

    Four symbols with staggered histories; the first 29 rows of each have null features, as the
    features job writes them; one row lacks Volume and one has a NaN feature (both unusable).
    """
    rng = np.random.default_rng(seed)
    frames = []
    for symbol, offset, count in (("AAA", 0, 90), ("BBB", 7, 80), ("CCC", 15, 85), ("DDD", 3, 70)):
        dates = business_days(date(2019, 1, 1) + timedelta(days=offset), count)
        vma = np.exp(rng.uniform(10, 14, count))
        med = rng.uniform(10, 200, count)
        previous_vma = np.concatenate([vma[:1], vma[:-1]])
        volume = np.round(1.5 * previous_vma * np.exp(rng.normal(0, 0.05, count))).astype("int64")
        frame = pd.DataFrame(
            {
                "Symbol": symbol,
                "Security Name": f"{symbol} Inc.",
                "Date": dates,
                "Open": med,
                "High": med,
                "Low": med,
                "Close": med,
                "Adj Close": med,
                "Volume": pd.array(volume, dtype="Int64"),
                # object columns: None (null) and NaN stay distinct, as in the Delta table
                "vol_moving_avg": pd.Series(vma, dtype=object),
                "adj_close_rolling_med": pd.Series(med, dtype=object),
            }
        )
        frame.loc[: WINDOW - 2, ["vol_moving_avg", "adj_close_rolling_med"]] = None
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    rows.loc[60, "Volume"] = pd.NA
    rows.loc[150, "vol_moving_avg"] = float("nan")
    return rows


def to_spark(spark: SparkSession, rows: pd.DataFrame) -> DataFrame:
    """Exact nulls and NaNs (None is null, float NaN stays NaN): built from Python tuples."""
    records = [
        tuple(
            None if value is None or value is pd.NA else int(value) if name == "Volume" else value
            for name, value in zip(COLUMNS, record, strict=True)
        )
        for record in rows[COLUMNS].itertuples(index=False)
    ]
    return spark.createDataFrame(records, FEATURES_SCHEMA)


def forecast_pandas(rows: pd.DataFrame, horizon: str = "next_day") -> pd.DataFrame:
    """The oracle of train.forecast_rows: next_day moves each symbol's features one row later."""
    rows = rows.sort_values(["Symbol", "Date"]).reset_index(drop=True)
    if horizon == "next_day":
        for name in ("vol_moving_avg", "adj_close_rolling_med"):
            rows[name] = rows.groupby("Symbol")[name].shift(1).astype(object)
            rows[name] = rows[name].where(rows[name].notna(), None)
    return rows


def model_rows(table: DataFrame, metrics: dict) -> DataFrame:
    """The model's input rows rebuilt from a features table with the SQL metrics.json records."""
    inputs = [f"{sql} AS `{name}`" for name, sql in metrics["model"]["feature_sql"].items()]
    return table.selectExpr("`Symbol`", "`Date`", "`Volume`", *inputs)


def usable_pandas(rows: pd.DataFrame, horizon: str = "next_day") -> pd.DataFrame:
    rows = forecast_pandas(rows, horizon)
    keep = rows["Volume"].notna()
    for name in ("vol_moving_avg", "adj_close_rolling_med"):
        keep &= rows[name].notna() & np.isfinite(rows[name].astype(float))
    return rows[keep]


def latest_rows_date(profile: pd.Series, num: int, den: int) -> str:
    """The time split's first test date, computed independently of train.py: one entry per row,
    latest first; the row that completes num/den of them (exact integers) names the date; one
    date is kept on each side."""
    rows = np.repeat(profile.index.to_numpy(), profile.to_numpy())
    latest_first = np.sort(rows)[::-1]
    needed = -(-num * len(rows) // den)  # ceil(num / den * rows) without floats
    dates = sorted(profile[profile > 0].index)
    return max(str(latest_first[needed - 1]), dates[1])


def numpy_metrics(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    err = predicted - actual
    mse = float(np.mean(err**2))
    positive = actual > 0
    ape = np.sort(np.abs(err[positive]) / actual[positive])
    return {
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(err))),
        "mse": mse,
        "r2": 1.0 - float(np.sum(err**2)) / float(np.sum((actual - actual.mean()) ** 2)),
        # The lower median: the ceil(n/2)-th smallest.
        "median_ape": float(ape[math.ceil(len(ape) / 2) - 1]),
        "ape_rows": int(positive.sum()),
    }


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return features_rows()


@pytest.fixture(scope="module")
def trained(
    spark: SparkSession, rows: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Config, StageSummary]:
    """One run with the real defaults (100 trees, depth 5, time split) on a small Delta table."""
    config = load_config(data_dir=tmp_path_factory.mktemp("train") / "data")
    assert (config.model.num_trees, config.model.max_depth) == (100, 5)
    write_table(to_spark(spark, rows), Path(config.features_path), "delta")
    return config, run(spark, config)


@pytest.fixture(scope="module")
def fitted_model(trained: tuple[Config, StageSummary]) -> PipelineModel:
    return PipelineModel.load(str(trained[0].model_dir))


@pytest.fixture(scope="module")
def metrics(trained: tuple[Config, StageSummary]) -> dict[str, Any]:
    return json.loads((trained[0].model_dir / METRICS_FILE).read_text())


def test_model_directory_loads_and_predicts_finite_values(
    spark: SparkSession, trained: tuple[Config, StageSummary], rows: pd.DataFrame
) -> None:
    config, _ = trained
    model = PipelineModel.load(str(config.model_dir))
    usable = usable_pandas(rows)
    predictions = model.transform(to_spark(spark, usable)).select("prediction").toPandas()
    assert len(predictions) == len(usable)
    assert np.isfinite(predictions["prediction"]).all()
    assert {"metadata", "stages", METRICS_FILE, PLOT_FILE} <= {
        p.name for p in Path(config.model_dir).iterdir()
    }


def test_metrics_equal_numpy_on_the_test_predictions(
    spark: SparkSession, trained: tuple[Config, StageSummary], metrics: dict, rows: pd.DataFrame
) -> None:
    config, _ = trained
    usable = usable_pandas(rows)
    test = usable[usable["Date"] >= metrics["split"]["first_test_date"]]
    predicted = (
        PipelineModel.load(str(config.model_dir))
        .transform(to_spark(spark, test))
        .select("Volume", "prediction", "vol_moving_avg")
        .toPandas()
    )
    actual = predicted["Volume"].to_numpy(dtype=float)
    # Size classes by decade of vol_moving_avg, computed independently of train.SIZE_CLASSES.
    decade = np.clip(np.floor(np.log10(predicted["vol_moving_avg"].astype(float))), 3, 7)
    for name, column in (("test", "prediction"), ("baseline", "vol_moving_avg")):
        expected = numpy_metrics(actual, predicted[column].to_numpy(dtype=float))
        for key, value in expected.items():
            assert metrics[name][key] == pytest.approx(value, rel=1e-9), (name, key)
        assert metrics[name]["rows"] == len(test)
        classes = {c["size_class"]: c[name] for c in metrics["by_size_class"]}
        assert sum(c["rows"] for c in classes.values()) == len(test)
        for exponent in np.unique(decade):
            in_class = (decade == exponent).to_numpy()
            label = {3: "< 10k", 4: "10k-100k", 5: "100k-1M", 6: "1M-10M", 7: ">= 10M"}[exponent]
            in_class_metrics = numpy_metrics(
                actual[in_class], predicted[column].to_numpy(dtype=float)[in_class]
            )
            for key in ("mae", "median_ape", "ape_rows"):
                assert classes[label][key] == pytest.approx(in_class_metrics[key], rel=1e-9)
            assert classes[label]["rows"] == in_class.sum()


def test_model_beats_the_baseline_on_a_learnable_relation(
    metrics: dict, trained: tuple[Config, StageSummary]
) -> None:
    # Volume is 1.5 x the previous vol_moving_avg: the forest learns the factor, the baseline
    # cannot, and the summary says so in words.
    assert metrics["test"]["r2"] > 0.8
    assert metrics["test"]["r2"] > metrics["baseline"]["r2"] + 0.1
    assert metrics["test"]["median_ape"] < 0.1 < metrics["baseline"]["median_ape"]
    assert metrics["beats_baseline"] is True
    assert trained[1].details["beats_baseline"] is True
    assert train_module.verdict(metrics).startswith("the model beats the baseline: MAE -")


def test_metrics_json_has_every_field_with_sane_values(
    spark: SparkSession, trained: tuple[Config, StageSummary], metrics: dict, rows: pd.DataFrame
) -> None:
    config, summary = trained
    usable = usable_pandas(rows)
    first = metrics["split"]["first_test_date"]
    train_rows, test_rows = (usable["Date"] < first).sum(), (usable["Date"] >= first).sum()
    assert metrics["rows"] == {
        "input": len(rows),
        "dropped_nulls": len(rows) - len(usable),
        "usable": len(usable),
        "train": train_rows,
        "train_fitted": train_rows,
        "test": test_rows,
    }
    assert metrics["split"]["method"] == "time"
    assert metrics["split"]["seed"] == 42
    assert first == latest_rows_date(usable.groupby("Date").size(), 1, 5)
    assert metrics["split"]["last_train_date"] == usable.loc[usable["Date"] < first, "Date"].max()
    assert metrics["split"]["test_row_fraction"] == pytest.approx(test_rows / len(usable))
    for name in ("test", "baseline"):
        m = metrics[name]
        assert 0 <= m["mae"] <= m["rmse"]
        assert m["mse"] == pytest.approx(m["rmse"] ** 2)
        assert m["r2"] <= 1
    assert metrics["params"]["num_trees"] == 100 and metrics["params"]["max_depth"] == 5
    assert (metrics["params"]["target"], metrics["params"]["horizon"]) == ("log_ratio", "next_day")
    assert metrics["model"]["target"] == "log_ratio"
    assert metrics["model"]["prediction_column"] == "prediction"
    assert metrics["train_sample"]["partitions"] == 8
    assert metrics["estimator_params"]["numTrees"] == 100
    assert metrics["estimator_params"]["maxDepth"] == 5
    assert metrics["estimator_params"]["seed"] == 42
    importances = metrics["model"]["feature_importances"]
    assert set(importances) == {"vol_moving_avg", "adj_close_rolling_med"}
    assert sum(importances.values()) == pytest.approx(1.0)
    assert min(importances.values()) >= 0
    assert metrics["lineage"] == {
        "features_path": str(config.features_path),
        "format": "delta",
        "delta_version": 0,
        "parquet_version": None,
        "spark_version": spark.version,
        "python_version": metrics["lineage"]["python_version"],
        "spark_master": spark.sparkContext.master,
    }
    started = datetime.fromisoformat(metrics["started_at"])
    assert started <= datetime.fromisoformat(metrics["finished_at"])
    durations = metrics["durations_seconds"]
    assert {"read", "split", "sample", "fit", "evaluate", "plot", "total"} <= set(durations)
    assert all(v >= 0 for v in durations.values())
    assert durations["total"] >= durations["fit"]
    assert metrics["tuning"] is None
    assert (summary.rows_in, summary.rows_rejected) == (len(rows), len(rows) - len(usable))
    png = (Path(config.model_dir) / PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_recorded_predicates_rebuild_the_test_set(
    spark: SparkSession, trained: tuple[Config, StageSummary], metrics: dict
) -> None:
    config, _ = trained
    table = spark.read.format("delta").load(str(config.features_path))
    usable = model_rows(table, metrics).where(metrics["split"]["usable_predicate"])
    assert usable.where(metrics["split"]["test_predicate"]).count() == metrics["rows"]["test"]
    assert usable.where(metrics["split"]["train_predicate"]).count() == metrics["rows"]["train"]


def test_time_split_never_puts_a_test_date_before_a_training_date(
    spark: SparkSession, rows: pd.DataFrame
) -> None:
    usable = usable_pandas(rows)
    per_date = usable.groupby("Date").size()
    split = time_split(time_split_date(per_date.to_dict(), 0.2), 0.2, seed=1)
    df = to_spark(spark, usable)
    train_dates = [r.Date for r in df.where(split.train_predicate).select("Date").collect()]
    test_dates = [r.Date for r in df.where(split.test_predicate).select("Date").collect()]
    assert max(train_dates) < min(test_dates)
    assert set(train_dates) | set(test_dates) == set(per_date.index)
    # The test set holds about 20% of the rows: off by less than its first date's rows.
    assert 0 <= len(test_dates) - 0.2 * len(usable) < per_date[min(test_dates)]


def skewed_profile(days: int, seed: int) -> pd.Series:
    """Rows per date growing from about 1 to about 500 (some early dates have none), like the
    real set's history thickening; dates given out of order."""
    rng = np.random.default_rng(seed)
    dates = business_days(date(1990, 1, 1), days)
    counts = rng.poisson(np.geomspace(1, 500, days))
    return pd.Series(counts, index=dates).sample(frac=1.0, random_state=seed)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(("num", "den"), [(1, 5), (1, 100), (1, 2), (7, 10), (99, 100)])
def test_time_split_date_holds_the_latest_fraction_of_rows(seed: int, num: int, den: int) -> None:
    profile = skewed_profile(300, seed)
    first = time_split_date(profile.to_dict(), num / den)
    assert first == latest_rows_date(profile, num, den)
    test_rows, total = int(profile[profile.index >= first].sum()), int(profile.sum())
    # Whole dates: at least the fraction, and less than one date's rows more.
    assert 0 <= test_rows - num / den * total < profile[first]
    if num == 1 and den == 5:  # the skew: 20% of the rows are far fewer than 20% of the dates
        assert (profile.index >= first).sum() < 0.05 * len(profile)


@pytest.mark.parametrize(
    ("profile", "fraction", "expected"),
    [
        # 10 dates of 10 rows: 20% is exactly the last 2 dates; 25% needs a third.
        ({f"2020-01-{d:02d}": 10 for d in range(1, 11)}, 0.2, "2020-01-09"),
        ({f"2020-01-{d:02d}": 10 for d in range(1, 11)}, 0.25, "2020-01-08"),
        ({f"2020-01-{d:02d}": 10 for d in range(1, 11)}, 0.7, "2020-01-04"),  # not 0.7*100 > 70
        ({"2020-01-01": 1, "2020-01-02": 1}, 0.2, "2020-01-02"),
        ({"2020-01-01": 1, "2020-01-02": 1}, 0.99, "2020-01-02"),  # one date must train
        ({"2020-01-01": 100, "2020-01-02": 1}, 0.5, "2020-01-02"),
        ({"2020-01-01": 1, "2020-01-02": 1, "2020-01-03": 1}, 0.5, "2020-01-02"),
        ({"2020-01-01": 0, "2020-01-02": 3, "2020-01-03": 1}, 0.9, "2020-01-03"),  # empty date
        ({"2020-01-03": 5, "2020-01-01": 5, "2020-01-02": 5}, 0.01, "2020-01-03"),
    ],
)
def test_time_split_date_ties_and_tiny_profiles(
    profile: dict[str, int], fraction: float, expected: str
) -> None:
    assert time_split_date(profile, fraction) == expected
    num, den = round(fraction * 100), 100
    assert latest_rows_date(pd.Series(profile), num, den) == expected


def test_time_split_date_needs_two_dates_with_rows() -> None:
    with pytest.raises(PipelineError, match="at least 2 distinct dates"):
        time_split_date({"2020-01-01": 5}, 0.2)
    with pytest.raises(PipelineError, match="found 1"):
        time_split_date({"2020-01-01": 5, "2020-01-02": 0}, 0.2)


def test_random_split_is_reproducible_with_a_seed_whatever_the_partitioning(
    spark: SparkSession,
) -> None:
    keys = [(f"S{i % 7}", f"2020-{1 + i % 12:02d}-{1 + i % 28:02d}-{i}") for i in range(600)]
    schema = StructType([StructField("Symbol", StringType()), StructField("Date", StringType())])
    df = spark.createDataFrame(keys, schema)

    def test_keys(frame: DataFrame, seed: int) -> set[tuple[str, str]]:
        rows = frame.where(random_split(0.25, seed).test_predicate).collect()
        return {(r.Symbol, r.Date) for r in rows}

    first = test_keys(df.repartition(1), seed=7)
    assert test_keys(df.repartition(5), seed=7) == first
    assert test_keys(df, seed=8) != first
    assert 100 < len(first) < 200  # 25% of 600, well within binomial noise


def test_failed_export_leaves_the_previous_model_unchanged(
    fitted_model: PipelineModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fitted_model
    model_dir = tmp_path / "model"
    export_model(model, {"run": 1}, b"png", model_dir)
    before, target = tree_digest(model_dir), model_dir.resolve()

    real_save = train_module._save_pipeline

    def save_then_crash(fitted: PipelineModel, path: Path) -> None:
        real_save(fitted, path)  # a complete PipelineModel is on disk; metrics.json is not
        raise OSError("disk full")

    monkeypatch.setattr(train_module, "_save_pipeline", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, {"run": 2}, b"png", model_dir)

    assert model_dir.resolve() == target
    assert tree_digest(model_dir) == before
    assert json.loads((model_dir / METRICS_FILE).read_text()) == {"run": 1}
    assert list(versions_dir(model_dir).iterdir()) == [target]  # no half-written leftovers
    reloaded = PipelineModel.load(str(model_dir))
    assert reloaded.stages[1].getNumTrees == model.stages[1].getNumTrees


def test_export_publishes_each_version_and_leaves_old_ones_to_retention(
    fitted_model: PipelineModel, tmp_path: Path
) -> None:
    model = fitted_model
    model_dir = tmp_path / "model"
    model_dir.mkdir()  # a plain directory from before models were versioned
    (model_dir / METRICS_FILE).write_text('{"run": 0}')
    newest = Path(export_model(model, {"run": 1}, b"png", model_dir))
    assert model_dir.is_symlink() and model_dir.resolve() == newest
    legacy = set(versions_dir(model_dir).iterdir()) - {newest}
    assert [json.loads((p / METRICS_FILE).read_text()) for p in legacy] == [{"run": 0}]
    for run_number in (2, 3):
        previous = model_dir.resolve()
        newest = Path(export_model(model, {"run": run_number}, b"png", model_dir))
        assert model_dir.is_symlink() and model_dir.resolve() == newest
        assert json.loads((model_dir / METRICS_FILE).read_text()) == {"run": run_number}
        assert {newest, previous} <= set(versions_dir(model_dir).iterdir())
    assert len(list(versions_dir(model_dir).iterdir())) == 4  # the legacy directory and 3 runs


def test_tuning_picks_the_best_candidate_and_trains_with_it(
    spark: SparkSession, rows: pd.DataFrame, tmp_path: Path
) -> None:
    config = load_config(
        data_dir=tmp_path / "data",
        storage_format="parquet",
        split="random",
        seed=3,
        tune=True,
        tune_sample_fraction=1.0,
        tune_num_trees=(2, 3),
        tune_max_depth=(2,),
        tune_max_bins=(4,),
        train_max_rows=80,
    )
    write_table(to_spark(spark, rows), Path(config.features_path), "parquet")
    run(spark, config)
    metrics = json.loads(config.metrics_path.read_text())

    candidates = metrics["tuning"]["candidates"]
    grid = {(c["num_trees"], c["max_depth"], c["max_bins"]) for c in candidates}
    assert grid == {(2, 2, 4), (3, 2, 4)}
    assert all(math.isfinite(c["validation_rmse"]) for c in candidates)
    best = min(candidates, key=lambda c: c["validation_rmse"])
    assert metrics["tuning"]["best"] == best
    forest = PipelineModel.load(str(config.model_dir)).stages[1]
    assert (forest.getNumTrees, forest.getMaxDepth(), forest.getMaxBins()) == (
        best["num_trees"],
        best["max_depth"],
        best["max_bins"],
    )
    assert metrics["params"]["num_trees"] == best["num_trees"]
    assert metrics["lineage"]["format"] == "parquet"
    assert metrics["lineage"]["delta_version"] is None
    assert metrics["split"]["method"] == "random" and metrics["split"]["first_test_date"] is None
    assert metrics["split"]["test_row_fraction"] == pytest.approx(
        metrics["rows"]["test"] / metrics["rows"]["usable"]
    )
    # The row cap: the forest saw a reproducible sample of about 80 of the training rows.
    sample = metrics["train_sample"]
    assert sample["fraction"] == pytest.approx(80 / metrics["rows"]["train"])
    assert 40 < metrics["rows"]["train_fitted"] < metrics["rows"]["train"]
    table = spark.read.parquet(str(config.features_path))
    fitted = (
        model_rows(table, metrics)
        .where(metrics["split"]["usable_predicate"])
        .where(metrics["split"]["train_predicate"])
        .where(sample["predicate"])
    )
    assert fitted.count() == metrics["rows"]["train_fitted"]


def test_no_usable_rows_is_a_clear_error(spark: SparkSession, rows: pd.DataFrame) -> None:
    short = rows.groupby("Symbol").head(WINDOW)  # no symbol has a row after a full window
    with pytest.raises(PipelineError, match="no row with Volume and both features"):
        train(to_spark(spark, short), load_config().model)


def test_missing_table_and_missing_columns_are_clear_errors(
    spark: SparkSession, rows: pd.DataFrame, config: Config
) -> None:
    with pytest.raises(TableNotFoundError, match="run the job that writes it"):
        run(spark, config)
    parquet = load_config(data_dir=Path(config.data_dir), storage_format="parquet")
    write_table(
        to_spark(spark, rows).drop("adj_close_rolling_med"), parquet.features_path, "parquet"
    )
    with pytest.raises(PipelineError, match=r"lacks columns \['adj_close_rolling_med'\]"):
        run(spark, parquet)
    assert not parquet.model_dir.exists()


def test_flags_override_the_model_settings() -> None:
    parser = add_common_arguments(argparse.ArgumentParser())
    add_arguments(parser)
    args = parser.parse_args(
        ["--num-trees", "7", "--split", "random", "--tune", "--tune-max-bins", "8,16"]
        + ["--train-max-rows", "1000", "--seed", "5"]
    )
    model = config_from_args(args, **overrides(args)).model
    assert (model.num_trees, model.split, model.tune, model.seed) == (7, "random", True, 5)
    assert (model.tune_max_bins, model.train_max_rows) == ((8, 16), 1000)
    assert model.max_depth == load_config().model.max_depth  # unset flags keep the config
    with pytest.raises(SystemExit):
        parser.parse_args(["--tune-max-bins", "0,8"])


def test_next_day_rows_carry_the_previous_rows_features(spark: SparkSession) -> None:
    schema = "Symbol string, Date string, Volume bigint, vol_moving_avg double, " + (
        "adj_close_rolling_med double"
    )
    features = spark.createDataFrame(
        [
            ("B", "2020-01-03", 30, 3.0, 30.0),
            ("A", "2020-01-02", 20, 2.0, 20.0),
            ("B", "2020-01-02", 10, None, None),
            ("A", "2020-01-01", 10, 1.0, 10.0),
            ("A", "2020-01-06", 40, float("nan"), 40.0),
            ("A", "2020-01-07", 50, 5.0, 50.0),
        ],
        schema,
    ).repartition(3)
    expected = spark.createDataFrame(
        [
            ("A", "2020-01-01", 10, None, None),
            ("A", "2020-01-02", 20, 1.0, 10.0),
            ("A", "2020-01-06", 40, 2.0, 20.0),
            ("A", "2020-01-07", 50, float("nan"), 40.0),
            ("B", "2020-01-02", 10, None, None),
            ("B", "2020-01-03", 30, None, None),
        ],
        schema,
    )
    actual = train_module.forecast_rows(features, "next_day").orderBy("Symbol", "Date")
    assert_df_equality(actual, expected, ignore_nullable=True, allow_nan_equality=True)
    same_day = train_module.forecast_rows(features, "same_day").orderBy("Symbol", "Date")
    assert_df_equality(
        same_day, features.orderBy("Symbol", "Date"), ignore_nullable=True, allow_nan_equality=True
    )


@pytest.mark.parametrize("target", ["log_ratio", "ratio", "volume"])
def test_each_target_form_fits_its_label_and_the_model_outputs_a_volume(
    spark: SparkSession, target: str
) -> None:
    rng = np.random.default_rng(5)
    n = 400
    vma = np.concatenate([[0.0, 0.0], rng.lognormal(11, 2, n - 2)])
    volume = np.rint(vma * rng.lognormal(-0.1, 0.4, n)).astype(np.int64)
    volume[:2] = [0, 7]
    rows = pd.DataFrame(
        {
            "Symbol": [f"S{i % 5}" for i in range(n)],
            "Date": [f"2020-{1 + i % 12:02d}-{1 + i // 12:02d}" for i in range(n)],
            "Volume": volume,
            "vol_moving_avg": vma,
            "adj_close_rolling_med": rng.uniform(1, 100, n),
        }
    )
    params = replace(load_config().model, target=target, num_trees=5, max_depth=3)
    frame = train_module.fit_frame(spark.createDataFrame(rows), params)
    fitted = frame.toPandas().sort_values(["vol_moving_avg", "Volume"]).reset_index(drop=True)
    # The label each form fits, computed with numpy; the log ratio leaves out the days without a
    # trade, the ratio the rows averaging 0.
    oracle = rows.sort_values(["vol_moving_avg", "Volume"]).reset_index(drop=True)
    v, a = oracle["Volume"].to_numpy(float), oracle["vol_moving_avg"].to_numpy()
    if target == "log_ratio":  # days that traded
        keep = v > 0
        label = np.log1p(v[keep]) - np.log1p(a[keep])
        oracle = oracle[keep].reset_index(drop=True)
    elif target == "ratio":
        keep = a > 0
        label, oracle = v[keep] / a[keep], oracle[keep].reset_index(drop=True)
    else:
        label = v
    assert len(fitted) == len(oracle)
    np.testing.assert_allclose(fitted["target"], label, rtol=1e-12, atol=1e-12)

    model = train_module.build_pipeline(params).fit(frame)
    frame.unpersist()
    scored = model.transform(spark.createDataFrame(rows)).toPandas()
    f, a = scored["forest_prediction"].to_numpy(), scored["vol_moving_avg"].to_numpy()
    with np.errstate(over="ignore"):  # the volume form's exp is computed but not used
        raw = {"log_ratio": (a + 1) * np.exp(f) - 1, "ratio": a * f, "volume": f}[target]
    np.testing.assert_allclose(scored["prediction"], np.clip(raw, 0, 2.0**53), rtol=1e-14)
    assert (scored["prediction"] >= 0).all() and np.isfinite(scored["prediction"]).all()
    stage = model.stages[-1]
    assert stage.getStatement() == train_module.volume_statement(target)


def test_the_same_rows_and_seed_give_the_same_model_whatever_the_file_layout(
    spark: SparkSession, rows: pd.DataFrame, tmp_path: Path
) -> None:
    """MLlib bootstraps per partition: the fit's input is laid out by its rows alone."""
    # same_day: no window shuffle before the fit, so only fit_frame can make the layout irrelevant.
    params = replace(
        load_config().model, num_trees=10, max_depth=4, split="random", horizon="same_day"
    )
    table = to_spark(spark, rows)
    layouts = {
        "one file": table.coalesce(1),
        "seven shuffled files": table.repartition(7, "Date").sortWithinPartitions("Volume"),
    }
    results = {}
    for name, frame in layouts.items():
        path = tmp_path / name.replace(" ", "-")
        write_table(frame, path, "parquet")
        result = train(spark.read.parquet(str(path)), params)
        trees = result.model.stages[1].toDebugString.split("\n", 1)[1]  # after the uid line
        results[name] = (trees, result.metrics["test"])
    (first_trees, first_metrics), (second_trees, second_metrics) = results.values()
    assert first_trees == second_trees
    # The evaluation sums in the test rows' order: equal up to rounding.
    assert second_metrics == pytest.approx(first_metrics, rel=1e-12)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("target", "log", "target must be one of log_ratio, ratio, volume"),
        ("horizon", "tomorrow", "horizon must be one of next_day, same_day"),
        ("fit_partitions", 0, "fit_partitions must be at least 1"),
    ],
)
def test_unknown_target_horizon_or_partitions_are_config_errors(
    setting: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(**{setting: value})
