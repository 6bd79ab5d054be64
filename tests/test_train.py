"""Train stage: split, fit, honest metrics against numpy, atomic export, tuning, bad input."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pyspark.ml import PipelineModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StringType, StructField, StructType

from stockvol import train as train_module
from stockvol.cli import PipelineError
from stockvol.config import Config, add_common_arguments, config_from_args, load_config
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
    versions_dir,
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
    """A features-shaped table with a learnable relation the baseline misses: Volume ~ 1.5 x vma.

    Four symbols with staggered histories; the first 29 rows of each have null features, as the
    features job writes them; one row lacks Volume and one has a NaN feature (both unusable).
    """
    rng = np.random.default_rng(seed)
    frames = []
    for symbol, offset, count in (("AAA", 0, 90), ("BBB", 7, 80), ("CCC", 15, 85), ("DDD", 3, 70)):
        dates = business_days(date(2019, 1, 1) + timedelta(days=offset), count)
        vma = np.exp(rng.uniform(10, 14, count))
        med = rng.uniform(10, 200, count)
        volume = np.round(1.5 * vma * np.exp(rng.normal(0, 0.05, count))).astype("int64")
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


def usable_pandas(rows: pd.DataFrame) -> pd.DataFrame:
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
    return {
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(err))),
        "mse": mse,
        "r2": 1.0 - float(np.sum(err**2)) / float(np.sum((actual - actual.mean()) ** 2)),
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
    write_table(to_spark(spark, rows), config.features_path, "delta")
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
        p.name for p in config.model_dir.iterdir()
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
    for name, column in (("test", "prediction"), ("baseline", "vol_moving_avg")):
        expected = numpy_metrics(actual, predicted[column].to_numpy(dtype=float))
        for key, value in expected.items():
            assert metrics[name][key] == pytest.approx(value, rel=1e-9), (name, key)
        assert metrics[name]["rows"] == len(test)


def test_model_beats_the_baseline_on_a_learnable_relation(metrics: dict) -> None:
    # Volume is 1.5 x vol_moving_avg: the forest learns the factor, the baseline cannot.
    assert metrics["test"]["r2"] > 0.8
    assert metrics["test"]["r2"] > metrics["baseline"]["r2"] + 0.1


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
    assert metrics["estimator_params"]["numTrees"] == 100
    assert metrics["estimator_params"]["maxDepth"] == 5
    assert metrics["estimator_params"]["seed"] == 42
    importances = metrics["model"]["feature_importances"]
    assert set(importances) == {"vol_moving_avg", "adj_close_rolling_med"}
    assert sum(importances.values()) == pytest.approx(1.0)
    assert importances["vol_moving_avg"] > 0.9  # the only informative feature
    assert metrics["lineage"] == {
        "features_path": str(config.features_path.resolve()),
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
    png = (config.model_dir / PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_recorded_predicates_rebuild_the_test_set(
    spark: SparkSession, trained: tuple[Config, StageSummary], metrics: dict
) -> None:
    config, _ = trained
    table = spark.read.format("delta").load(str(config.features_path))
    usable = table.where(metrics["split"]["usable_predicate"])
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
    assert reloaded.stages[-1].getNumTrees == model.stages[-1].getNumTrees


def test_export_swaps_versions_and_keeps_only_the_previous_one(
    fitted_model: PipelineModel, tmp_path: Path
) -> None:
    model = fitted_model
    model_dir = tmp_path / "model"
    model_dir.mkdir()  # a plain directory from before models were versioned
    (model_dir / METRICS_FILE).write_text('{"run": 0}')
    newest = export_model(model, {"run": 1}, b"png", model_dir)
    assert model_dir.is_symlink() and model_dir.resolve() == newest
    legacy = set(versions_dir(model_dir).iterdir()) - {newest}
    assert [json.loads((p / METRICS_FILE).read_text()) for p in legacy] == [{"run": 0}]
    for run_number in (2, 3):
        previous = model_dir.resolve()
        newest = export_model(model, {"run": run_number}, b"png", model_dir)
        assert model_dir.is_symlink() and model_dir.resolve() == newest
        assert json.loads((model_dir / METRICS_FILE).read_text()) == {"run": run_number}
        assert set(versions_dir(model_dir).iterdir()) == {newest, previous}


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
    write_table(to_spark(spark, rows), config.features_path, "parquet")
    run(spark, config)
    metrics = json.loads(config.metrics_path.read_text())

    candidates = metrics["tuning"]["candidates"]
    grid = {(c["num_trees"], c["max_depth"], c["max_bins"]) for c in candidates}
    assert grid == {(2, 2, 4), (3, 2, 4)}
    assert all(math.isfinite(c["validation_rmse"]) for c in candidates)
    best = min(candidates, key=lambda c: c["validation_rmse"])
    assert metrics["tuning"]["best"] == best
    forest = PipelineModel.load(str(config.model_dir)).stages[-1]
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
        table.where(metrics["split"]["usable_predicate"])
        .where(metrics["split"]["train_predicate"])
        .where(sample["predicate"])
    )
    assert fitted.count() == metrics["rows"]["train_fitted"]


def test_no_usable_rows_is_a_clear_error(spark: SparkSession, rows: pd.DataFrame) -> None:
    short = rows.groupby("Symbol").head(WINDOW - 1)  # no symbol reaches a full window
    with pytest.raises(PipelineError, match="no row with Volume and both features"):
        train(to_spark(spark, short), load_config().model)


def test_missing_table_and_missing_columns_are_clear_errors(
    spark: SparkSession, rows: pd.DataFrame, config: Config
) -> None:
    with pytest.raises(TableNotFoundError, match="run the job that writes it"):
        run(spark, config)
    parquet = load_config(data_dir=config.data_dir, storage_format="parquet")
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
