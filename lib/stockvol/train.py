"""Train stage: split the features, fit the MLlib random forest, measure it, export atomically.

The pure parts (``usable_rows``, ``time_split_date``, ``time_split``, ``build_pipeline``,
``regression_metrics``, ``train``) take DataFrames and parameters; ``run`` reads the features table,
calls them and writes ``DIR/model`` with ``export_model``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import platform
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark import StorageLevel
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import RegressionEvaluator
from pyspark.ml.feature import SQLTransformer, VectorAssembler
from pyspark.ml.regression import RandomForestRegressionModel, RandomForestRegressor
from pyspark.ml.tuning import ParamGridBuilder, TrainValidationSplit
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from stockvol.cli import PipelineError
from stockvol.config import HORIZONS, SPLIT_METHODS, TARGETS, Config, ModelParams, validate_model
from stockvol.location import (
    Location,
    current_version,
    new_version,
    publish_version,
    resolve,
    versions_dir,
)
from stockvol.schema import (
    DATE,
    FEATURE_COLUMNS,
    SYMBOL,
    VOL_MOVING_AVG,
    VOLUME,
)
from stockvol.storage import delta_version, read_table
from stockvol.summary import StageSummary

log = logging.getLogger("stockvol.train")

LABEL = VOLUME
TARGET = "target"  # the forest's label: Volume in the configured target form (TARGET_SQL)
FOREST_PREDICTION = "forest_prediction"  # the forest's output, in the target form
FEATURES_VECTOR = "features"
PREDICTION = "prediction"  # the predicted Volume: the last stage's output
BASELINE = VOL_MOVING_AVG
METRICS_FILE = "metrics.json"
PLOT_FILE = "evaluation.png"
PLOT_POINTS = 4000
METRICS_SCHEMA_VERSION = 2
REQUIRED_COLUMNS = (SYMBOL, DATE, LABEL, *FEATURE_COLUMNS)
# 2^53, the largest integer a double (and any JSON client) holds exactly: the predicted volume is
# clipped to [0, 2^53], so it is never negative, infinite or NaN for finite, non-negative features.
MAX_PREDICTED_VOLUME = "9007199254740992.0D"
# Rank accuracy of the median absolute percentage error (percentile_approx): exact below this many
# test rows, within rows / accuracy ranks above it (±0.01 % of the rows: ±550 of 5.5 M at full
# size).
MEDIAN_ACCURACY = 10_000

# The label each target form fits (Volume >= 0, vol_moving_avg >= 0); rows where it is null are
# left out of the fit, not of the test set. The log ratio skips days without a trade: their
# -log1p(average), about -10, would drag the forest's mean for thin symbols far below any day
# that trades (median error on symbols under 10k shares a day: 45% instead of 30%, full-size
# generated data). The ratio is undefined where the average is 0.
TARGET_SQL = {
    "log_ratio": (f"CASE WHEN `{LABEL}` > 0 THEN log1p(`{LABEL}`) - log1p(`{VOL_MOVING_AVG}`) END"),
    "ratio": f"CASE WHEN `{VOL_MOVING_AVG}` > 0 THEN `{LABEL}` / `{VOL_MOVING_AVG}` END",
    "volume": f"CAST(`{LABEL}` AS DOUBLE)",
}
# The forest's output turned back into a volume: the inverse of TARGET_SQL. (v + 1) * exp(f) - 1
# rather than expm1(log1p(v) + f): one transcendental function, so the JVM-free reader in serving/
# can reproduce Spark's StrictMath result bit for bit. serving/forest.py knows exactly these.
VOLUME_SQL = {
    "log_ratio": f"(`{VOL_MOVING_AVG}` + 1.0D) * exp(`{FOREST_PREDICTION}`) - 1.0D",
    "ratio": f"`{VOL_MOVING_AVG}` * `{FOREST_PREDICTION}`",
    "volume": f"`{FOREST_PREDICTION}`",
}
# Volume size classes for the metrics: decades of vol_moving_avg (the one scale the model sees).
SIZE_CLASSES = (
    ("< 10k", 1e4),
    ("10k-100k", 1e5),
    ("100k-1M", 1e6),
    ("1M-10M", 1e7),
    (">= 10M", math.inf),
)
SIZE_CLASS = "size_class"


def volume_statement(target: str) -> str:
    """The SQLTransformer statement after the forest: the predicted volume, clipped to [0, 2^53]."""
    volume = VOLUME_SQL[target]
    return (
        f"SELECT *, greatest(0.0D, least({MAX_PREDICTED_VOLUME}, {volume})) AS `{PREDICTION}` "
        "FROM __THIS__"
    )


def feature_sql(horizon: str) -> dict[str, str]:
    """The SQL of each model input per row: for next_day, the symbol's previous row's features."""
    if horizon == "same_day":
        return {name: f"`{name}`" for name in FEATURE_COLUMNS}
    return {
        name: f"lag(`{name}`) OVER (PARTITION BY `{SYMBOL}` ORDER BY `{DATE}`)"
        for name in FEATURE_COLUMNS
    }


def forecast_rows(features: DataFrame, horizon: str) -> DataFrame:
    """Keys, the Volume to predict and the features known before it (``feature_sql``).

    ``next_day``: a row's Volume is predicted from the features of the symbol's previous row, so no
    input includes the day being predicted (``vol_moving_avg`` on a row averages that row's own
    Volume). ``same_day`` keeps each row's own features, as the features table has them.
    """
    inputs = [F.expr(sql).alias(name) for name, sql in feature_sql(horizon).items()]
    return features.select(F.col(SYMBOL), F.col(DATE), F.col(LABEL), *inputs)


# xxhash64 >>> 11 is uniform on [0, 2^53): comparing it with fraction * 2^53 keeps a row with
# probability `fraction`, decided by the row's key alone (not by partitioning or row order).
_HASH_RANGE = 2**53


# ---------------------------------------------------------------------------------------------
# Row selection: usable rows, split, samples. All expressed as SQL predicates so metrics.json can
# record the exact text and anyone can rebuild the test set with DataFrame.where(predicate).
# ---------------------------------------------------------------------------------------------


def usable_predicate() -> str:
    """Rows with a label and both features present and finite (not the first 29 of a symbol)."""
    parts = [f"`{LABEL}` IS NOT NULL"]
    for name in FEATURE_COLUMNS:
        parts.append(
            f"`{name}` IS NOT NULL AND NOT isnan(`{name}`) AND abs(`{name}`) < double('Infinity')"
        )
    return " AND ".join(parts)


def hash_predicate(seed: int, salt: str, fraction: float) -> str:
    """Keep a row with probability ``fraction``, reproducibly from (seed, salt, Symbol, Date)."""
    if fraction >= 1.0:
        return "true"
    threshold = int(fraction * _HASH_RANGE)
    return (
        f"shiftrightunsigned(xxhash64({int(seed)}, '{salt}', `{SYMBOL}`, `{DATE}`), 11) "
        f"< {threshold}"
    )


def usable_rows(features: DataFrame) -> DataFrame:
    """The rows a model can learn from, label and features only plus the keys."""
    return features.where(usable_predicate()).select(*REQUIRED_COLUMNS)


def time_split_date(rows_per_date: Mapping[str, int], test_fraction: float) -> str:
    """First test date: the latest date d such that the rows dated on or after d are at least
    ``test_fraction`` of all rows, i.e. the date of the ceil(test_fraction x rows)-th latest row.

    Dates are never cut, so the test share exceeds ``test_fraction`` by less than one date's rows.
    At least one date stays on each side; dates with no rows do not count.
    """
    counts = sorted((day, int(rows)) for day, rows in rows_per_date.items() if rows > 0)
    if len(counts) < 2:
        raise PipelineError(
            f"the time split needs at least 2 distinct dates with features, found {len(counts)}; "
            "ingest more history or use --split random"
        )
    total = sum(rows for _, rows in counts)
    # Exact: in floats 0.7 * 10 is 7.000000000000001, which would ask for 8 test rows, not 7.
    needed = math.ceil(Fraction(str(test_fraction)) * total)
    held = 0
    for day, rows in reversed(counts[1:]):  # latest first; the earliest date always trains
        held += rows
        if held >= needed:
            return day
    return counts[1][0]


@dataclass(frozen=True)
class Split:
    """How rows are divided: the SQL predicate that selects the test rows, and its description."""

    method: str
    test_predicate: str
    test_fraction: float
    seed: int
    first_test_date: str | None = None
    last_train_date: str | None = None

    @property
    def train_predicate(self) -> str:
        return f"NOT ({self.test_predicate})"


def time_split(first_test_date: str, test_fraction: float, seed: int) -> Split:
    """Rows dated on or after ``first_test_date`` are test rows: no future row trains the model."""
    return Split("time", f"`{DATE}` >= '{first_test_date}'", test_fraction, seed, first_test_date)


def random_split(test_fraction: float, seed: int) -> Split:
    """A seeded split on the row key: the same seed gives the same test set on any cluster."""
    return Split("random", hash_predicate(seed, "test", test_fraction), test_fraction, seed)


# ---------------------------------------------------------------------------------------------
# Model and metrics
# ---------------------------------------------------------------------------------------------


def build_pipeline(params: ModelParams) -> Pipeline:
    """VectorAssembler over the two features, the forest on the target, its output as a volume.

    Fitting needs a ``target`` column (``TARGET_SQL``); the fitted model needs only the two feature
    columns and writes the predicted Volume to ``prediction``.
    """
    assembler = VectorAssembler(
        inputCols=list(FEATURE_COLUMNS), outputCol=FEATURES_VECTOR, handleInvalid="error"
    )
    forest = RandomForestRegressor(
        featuresCol=FEATURES_VECTOR,
        labelCol=TARGET,
        predictionCol=FOREST_PREDICTION,
        numTrees=params.num_trees,
        maxDepth=params.max_depth,
        maxBins=params.max_bins,
        seed=params.seed,
    )
    to_volume = SQLTransformer(statement=volume_statement(params.target))
    return Pipeline(stages=[assembler, forest, to_volume])


def size_class(column: str = BASELINE) -> Column:
    """The SIZE_CLASSES name of each row's ``column`` (vol_moving_avg)."""
    value = F.col(column)
    expr = F.when(value < SIZE_CLASSES[0][1], SIZE_CLASSES[0][0])
    for name, upper in SIZE_CLASSES[1:-1]:
        expr = expr.when(value < upper, name)
    return expr.otherwise(SIZE_CLASSES[-1][0])


def regression_metrics(
    df: DataFrame,
    label: str,
    predictions: Mapping[str, str],
    sample_where: str | None = None,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], pd.DataFrame]:
    """Metrics of each prediction column against ``label``, overall and by size class, one pass.

    RMSE, MAE, MSE, R² (1 - MSE / Var(label), population variance: MLlib's RegressionEvaluator and
    scikit-learn; None when the label is constant) and the median absolute percentage error
    |p - y| / y over the rows with y > 0 (the lower median, the ceil(n/2)-th smallest, within
    n / MEDIAN_ACCURACY ranks). The same pass collects the rows matching ``sample_where`` (label,
    predictions; keep it to a few thousand), returned as pandas.
    """
    y = F.col(label).cast("double")
    aggs: list[Column] = [F.count(F.lit(1)).alias("n"), F.var_pop(y).alias("var")]
    aggs.append(F.count(F.when(y > 0, True)).alias("ape_n"))
    for i, column in enumerate(predictions.values()):
        err = F.col(column).cast("double") - y
        ape = F.when(y > 0, F.abs(err) / y)
        aggs += [
            F.avg(err * err).alias(f"mse{i}"),
            F.avg(F.abs(err)).alias(f"mae{i}"),
            F.percentile_approx(ape, 0.5, MEDIAN_ACCURACY).alias(f"mdape{i}"),
        ]
    kept = [label, *predictions.values()]
    if sample_where is not None:
        # collect_list skips nulls: only the rows that match end up in the list.
        row_struct = F.struct(*(F.col(c).cast("double").alias(c) for c in kept))
        aggs.append(F.collect_list(F.when(F.expr(sample_where), row_struct)).alias("sample"))
    # rollup: one row per size class plus the overall row (size class null).
    grouped = df.withColumn(SIZE_CLASS, size_class()).rollup(SIZE_CLASS).agg(*aggs).collect()
    overall = next((row for row in grouped if row[SIZE_CLASS] is None), None)
    if overall is None or not overall["n"]:
        raise PipelineError("no rows to evaluate the model on")

    def summarise(row: Any) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = {}
        variance = float(row["var"])
        for i, name in enumerate(predictions):
            mse = float(row[f"mse{i}"])
            mdape = row[f"mdape{i}"]
            result[name] = {
                "rmse": math.sqrt(mse),
                "mae": float(row[f"mae{i}"]),
                "mse": mse,
                "r2": 1.0 - mse / variance if variance > 0 else None,
                "median_ape": None if mdape is None else float(mdape),
                "rows": int(row["n"]),
                "ape_rows": int(row["ape_n"]),
            }
        return result

    by_name = {row[SIZE_CLASS]: row for row in grouped if row[SIZE_CLASS] is not None}
    by_class = [
        {SIZE_CLASS: name, "vol_moving_avg_below": None if math.isinf(upper) else upper}
        | summarise(by_name[name])
        for name, upper in SIZE_CLASSES
        if name in by_name
    ]
    sample = pd.DataFrame(
        [tuple(r) for r in overall["sample"]] if sample_where is not None else [], columns=kept
    )
    return summarise(overall), by_class, sample


def beats_baseline(model: Mapping[str, Any], baseline: Mapping[str, Any]) -> bool:
    """The design's rule: lower MAE and lower median absolute percentage error than the baseline."""
    if model["median_ape"] is None or baseline["median_ape"] is None:
        return model["mae"] < baseline["mae"]
    return model["mae"] < baseline["mae"] and model["median_ape"] < baseline["median_ape"]


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def forest_params(forest: RandomForestRegressionModel) -> dict[str, Any]:
    """Every parameter of the fitted forest, by MLlib name (numTrees, subsamplingRate...)."""
    return {p.name: _json_value(v) for p, v in sorted(forest.extractParamMap().items(), key=str)}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """A fitted model with everything metrics.json and the plot need."""

    model: PipelineModel
    metrics: dict[str, Any]
    plot_sample: pd.DataFrame
    durations: dict[str, float] = field(default_factory=dict)


def _profile(features: DataFrame, params: ModelParams) -> pd.DataFrame:
    """Rows, usable rows and (for the random split) usable test rows per date: one pass."""
    usable = F.expr(usable_predicate())
    # The time split needs no per-row hash: reading Symbol and hashing 28M rows costs seconds.
    random_test = (
        F.expr(random_split(params.test_fraction, params.seed).test_predicate)
        if params.split == "random"
        else F.lit(False)
    )
    return (
        features.groupBy(DATE)
        .agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum(usable.cast("long")).alias("usable"),
            F.sum((usable & random_test).cast("long")).alias("random_test"),
        )
        .toPandas()
    )


def _choose_split(profile: pd.DataFrame, params: ModelParams) -> tuple[Split, int, int]:
    """The split and its exact train and test row counts, from the per-date profile."""
    usable = profile[profile["usable"] > 0]
    if usable.empty:
        raise PipelineError(
            "the features table has no row with Volume and both features present: each symbol "
            "needs at least a full window of rows; rerun ingest and features on more data"
        )
    if params.split == "time":
        rows_per_date = usable.set_index(DATE)["usable"].to_dict()
        first = time_split_date(rows_per_date, params.test_fraction)
        last_train = usable.loc[usable[DATE] < first, DATE].max()
        split = replace(
            time_split(first, params.test_fraction, params.seed), last_train_date=last_train
        )
        test_rows = int(usable.loc[usable[DATE] >= first, "usable"].sum())
    else:
        split = random_split(params.test_fraction, params.seed)
        test_rows = int(usable["random_test"].sum())
    train_rows = int(usable["usable"].sum()) - test_rows
    if train_rows == 0 or test_rows == 0:
        raise PipelineError(
            f"the {params.split} split left {train_rows} training and {test_rows} test rows; "
            "use more data or another --test-fraction"
        )
    return split, train_rows, test_rows


def effective_sample_fraction(params: ModelParams, train_rows: int) -> float:
    """The fraction of training rows to fit on: the configured one, lowered to meet the row cap."""
    fraction = params.train_sample_fraction
    if params.train_max_rows is not None and train_rows > 0:
        fraction = min(fraction, params.train_max_rows / train_rows)
    return fraction


def with_target(rows: DataFrame, target: str) -> DataFrame:
    """``rows`` (Volume and both features) with the forest's label in ``target`` form, keeping
    only the rows where it is defined (``TARGET_SQL``)."""
    return rows.withColumn(TARGET, F.expr(TARGET_SQL[target])).where(F.col(TARGET).isNotNull())


def fit_pipeline(rows: DataFrame, params: ModelParams) -> PipelineModel:
    """``build_pipeline`` fitted on ``rows`` as they are (tests, benchmarks; the job uses
    ``fit_frame`` for a layout-independent, cached input)."""
    return build_pipeline(params).fit(with_target(rows, params.target))


def fit_frame(train_rows: DataFrame, params: ModelParams) -> DataFrame:
    """What the pipeline fits on, cached, in a layout that depends on the rows alone.

    MLlib's bootstrap and its split-candidate sample follow the partitions and the row order, so
    the rows are hashed by Symbol into ``fit_partitions`` partitions and sorted by (Symbol, Date):
    the same rows and seed give the same forest whatever the features table's file layout. Rows
    whose target is undefined (the ratio where the average is 0) are left out. Cached: the forest
    reads its input several times.
    """
    return (
        with_target(train_rows, params.target)
        .repartition(params.fit_partitions, SYMBOL)
        .sortWithinPartitions(SYMBOL, DATE)
        .select(*FEATURE_COLUMNS, TARGET, LABEL)
        .persist(StorageLevel.MEMORY_AND_DISK)
    )


def tune(
    train_rows: DataFrame, params: ModelParams, seed: int
) -> tuple[ModelParams, dict[str, Any]]:
    """TrainValidationSplit over the grid on a sample of the training rows; the best params."""
    pipeline = build_pipeline(params)
    forest: RandomForestRegressor = pipeline.getStages()[1]  # type: ignore[assignment]
    grid = (
        ParamGridBuilder()
        .addGrid(forest.numTrees, list(params.tune_num_trees))
        .addGrid(forest.maxDepth, list(params.tune_max_depth))
        .addGrid(forest.maxBins, list(params.tune_max_bins))
        .build()
    )
    sample = fit_frame(
        train_rows.where(hash_predicate(seed, "tune", params.tune_sample_fraction)), params
    )
    try:
        rows = sample.count()
        if rows < 2:
            raise PipelineError(f"the tuning sample has {rows} rows; raise --tune-sample-fraction")
        validator = TrainValidationSplit(
            estimator=pipeline,
            estimatorParamMaps=grid,
            evaluator=RegressionEvaluator(
                labelCol=LABEL, predictionCol=PREDICTION, metricName="rmse"
            ),
            trainRatio=0.8,
            seed=seed,
        )
        fitted = validator.fit(sample)
    finally:
        sample.unpersist()
    candidates = [
        {
            "num_trees": param_map[forest.numTrees],
            "max_depth": param_map[forest.maxDepth],
            "max_bins": param_map[forest.maxBins],
            "validation_rmse": rmse,
        }
        for param_map, rmse in zip(grid, fitted.validationMetrics, strict=True)
    ]
    best = min(candidates, key=lambda c: c["validation_rmse"])
    best_params = replace(
        params,
        num_trees=best["num_trees"],
        max_depth=best["max_depth"],
        max_bins=best["max_bins"],
    )
    report = {
        "method": "TrainValidationSplit",
        "metric": "rmse",
        "train_ratio": 0.8,
        "sample_fraction": params.tune_sample_fraction,
        "sample_predicate": hash_predicate(seed, "tune", params.tune_sample_fraction),
        "rows": rows,
        "candidates": candidates,
        "best": {k: best[k] for k in ("num_trees", "max_depth", "max_bins", "validation_rmse")},
    }
    return best_params, report


def train(features: DataFrame, params: ModelParams) -> TrainResult:
    """Split, sample, optionally tune, fit, and evaluate on the whole test set and the baseline."""
    validate_model(params)  # jobs ran it before Spark started; callers may build params directly
    durations: dict[str, float] = {}
    clock = time.perf_counter()

    rows = forecast_rows(features, params.horizon)
    if params.horizon == "next_day":
        # The previous-row features come from a window (a shuffle by Symbol): computed once, not
        # once for the profile, once for the fit and once for the evaluation.
        rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        return _train(rows, params, durations, clock)
    finally:
        rows.unpersist()


def _train(
    rows: DataFrame, params: ModelParams, durations: dict[str, float], clock: float
) -> TrainResult:
    profile = _profile(rows, params)
    split, train_rows, test_rows = _choose_split(profile, params)
    input_rows = int(profile["rows"].sum())
    usable_count = int(profile["usable"].sum())
    usable = usable_rows(rows)
    train_df = usable.where(split.train_predicate)
    test_df = usable.where(split.test_predicate)
    durations["split"] = time.perf_counter() - clock

    tuning: dict[str, Any] | None = None
    fit_params = params
    if params.tune:
        clock = time.perf_counter()
        fit_params, tuning = tune(train_df, params, params.seed)
        durations["tune"] = time.perf_counter() - clock

    clock = time.perf_counter()
    fraction = effective_sample_fraction(params, train_rows)
    sample_predicate = hash_predicate(params.seed, "sample", fraction)
    fitted = fit_frame(train_df.where(sample_predicate), params)
    try:
        fitted_rows = fitted.count()
        if fitted_rows == 0:
            raise PipelineError(
                f"sampling {fraction:g} of {train_rows} training rows left none with a "
                f"{params.target} target; raise --train-sample-fraction or --train-max-rows"
            )
        durations["sample"] = time.perf_counter() - clock
        clock = time.perf_counter()
        model = build_pipeline(fit_params).fit(fitted)
        durations["fit"] = time.perf_counter() - clock
    finally:
        fitted.unpersist()

    clock = time.perf_counter()
    # One pass over the test set: the metrics of model and baseline, and the plot's points.
    evaluation, by_class, plot_sample = regression_metrics(
        model.transform(test_df),
        LABEL,
        {"test": PREDICTION, "baseline": BASELINE},
        sample_where=hash_predicate(params.seed, "plot", min(1.0, PLOT_POINTS / test_rows)),
    )
    durations["evaluate"] = time.perf_counter() - clock

    forest: RandomForestRegressionModel = model.stages[1]  # type: ignore[assignment]
    importances = forest.featureImportances.toArray().tolist()
    metrics: dict[str, Any] = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "model": {
            "type": "RandomForestRegressor",
            "label": LABEL,
            "target": params.target,
            "target_sql": TARGET_SQL[params.target],
            "horizon": params.horizon,
            "features": list(FEATURE_COLUMNS),
            "feature_sql": feature_sql(params.horizon),
            "prediction_column": PREDICTION,
            "volume_statement": volume_statement(params.target),
            "feature_importances": dict(zip(FEATURE_COLUMNS, importances, strict=True)),
            "total_num_nodes": forest.totalNumNodes,
        },
        "test": evaluation["test"],
        "baseline": {
            "prediction": f"{BASELINE} (the moving average the model is given)",
            **evaluation["baseline"],
        },
        "beats_baseline": beats_baseline(evaluation["test"], evaluation["baseline"]),
        "by_size_class": by_class,
        "rows": {
            "input": input_rows,
            "dropped_nulls": input_rows - usable_count,
            "usable": usable_count,
            "train": train_rows,
            "train_fitted": fitted_rows,
            "test": test_rows,
        },
        "split": {
            "method": split.method,
            "seed": split.seed,
            "test_fraction": split.test_fraction,
            "test_row_fraction": test_rows / usable_count,
            "first_test_date": split.first_test_date,
            "last_train_date": split.last_train_date,
            "usable_predicate": usable_predicate(),
            "test_predicate": split.test_predicate,
            "train_predicate": split.train_predicate,
        },
        "train_sample": {
            "fraction": fraction,
            "configured_fraction": params.train_sample_fraction,
            "max_rows": params.train_max_rows,
            "predicate": sample_predicate,
            "rows": fitted_rows,
            "partitions": params.fit_partitions,
        },
        "params": _params_dict(fit_params),
        "estimator_params": forest_params(forest),
        "tuning": tuning,
    }
    if evaluation["test"]["rows"] != test_rows:  # the profile and the evaluation saw other data
        raise PipelineError(
            f"the features table changed during training ({test_rows} test rows counted, "
            f"{evaluation['test']['rows']} evaluated); rerun train"
        )
    return TrainResult(model, metrics, plot_sample, durations)


def _params_dict(params: ModelParams) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in asdict(params).items()}


# ---------------------------------------------------------------------------------------------
# Plot and export
# ---------------------------------------------------------------------------------------------


def render_plot(sample: pd.DataFrame, metrics: Mapping[str, Any]) -> bytes:
    """PNG: predicted vs actual volume on a test sample (log axes), median error by size class,
    and the feature importances."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(15, 4.8), layout="constrained")
    scatter, classes, bars = fig.subplots(1, 3, width_ratios=[3, 2, 1.4])
    # Log axes cannot show zero volumes; they are left out of the picture, not of the metrics.
    shown = sample[(sample[LABEL] > 0) & (sample[PREDICTION] > 0) & (sample[BASELINE] > 0)]
    scatter.scatter(shown[LABEL], shown[BASELINE], s=4, alpha=0.25, color="0.6", label="baseline")
    scatter.scatter(shown[LABEL], shown[PREDICTION], s=4, alpha=0.4, label="random forest")
    if not shown.empty:
        low = float(min(shown[LABEL].min(), shown[PREDICTION].min()))
        high = float(max(shown[LABEL].max(), shown[PREDICTION].max()))
        scatter.plot(
            [low, high], [low, high], color="black", linewidth=1, label="predicted = actual"
        )
    scatter.set(xscale="log", yscale="log", xlabel="actual Volume", ylabel="predicted Volume")
    test, baseline = metrics["test"], metrics["baseline"]
    scatter.set_title(
        f"test sample ({len(shown):,} of {test['rows']:,} rows): median error "
        f"{_pct(test['median_ape'])} (baseline {_pct(baseline['median_ape'])}), "
        f"R² {_fmt(test['r2'])} ({_fmt(baseline['r2'])})",
        fontsize=10,
    )
    scatter.legend(loc="upper left", fontsize=8, markerscale=3)

    names = [c[SIZE_CLASS] for c in metrics["by_size_class"]]
    positions = range(len(names))
    for offset, key, color in ((-0.2, "test", None), (0.2, "baseline", "0.6")):
        values = [100 * (c[key]["median_ape"] or 0.0) for c in metrics["by_size_class"]]
        label = "random forest" if key == "test" else "baseline"
        classes.bar([p + offset for p in positions], values, width=0.4, color=color, label=label)
    classes.set_xticks(list(positions), names, fontsize=8)
    classes.set(xlabel="vol_moving_avg", ylabel="median absolute % error")
    classes.set_title("median error by size class", fontsize=10)
    classes.legend(fontsize=8)

    importances = metrics["model"]["feature_importances"]
    bars.barh(list(importances), list(importances.values()))
    bars.set(xlim=(0, 1), xlabel="importance (sums to 1)", title="feature importances")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _save_pipeline(model: PipelineModel, path: Location) -> None:
    model.write().save(str(path))


def _write_extras(path: Location, metrics: Mapping[str, Any], plot_png: bytes) -> None:
    (path / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    (path / PLOT_FILE).write_bytes(plot_png)


def export_model(
    model: PipelineModel,
    metrics: Mapping[str, Any],
    plot_png: bytes,
    model_dir: Location | Path | str,
) -> Location:
    """Write model, metrics.json and the plot to a new version directory, then publish it.

    The version goes to ``.model.versions/`` beside ``model_dir``, which then names it: a symlink
    renamed into place on local disk, a pointer object written with one PUT on object storage
    (``location.publish_version``), so a reader finds the previous complete model or the new one,
    never a mix. A failure before that removes the new version and leaves ``model_dir`` as it
    was. Replaced versions stay for readers that resolved ``model_dir`` just before, until the
    retention setting removes them. Returns the new version's directory.
    """
    model_dir = Location.parse(model_dir)
    version = new_version(model_dir)
    try:
        _save_pipeline(model, version)
        _write_extras(version, metrics, plot_png)
    except BaseException:
        version.delete()
        raise
    if model_dir.is_local and current_version(model_dir) is None and model_dir.is_dir():
        # A plain directory (older layout) is kept as a version: missing for an instant.
        os.rename(model_dir.uri, (versions_dir(model_dir) / f"legacy-{uuid.uuid4().hex[:8]}").uri)
    publish_version(model_dir, version)
    return version


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def read_features(spark: SparkSession, config: Config) -> tuple[DataFrame, int | None]:
    """The features table pinned to one Delta version, so lineage names exactly what was read."""
    features = read_table(spark, config.features_path, config.storage_format)
    version = None
    if config.storage_format == "delta":
        version = delta_version(spark, config.features_path)
        features = (
            spark.read.format("delta")
            .option("versionAsOf", version)
            .load(str(config.features_path))
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in features.columns]
    if missing:
        raise PipelineError(
            f"the features table at {config.features_path} lacks columns {missing}; "
            "rerun jobs/features.py"
        )
    return features, version


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def verdict(metrics: Mapping[str, Any]) -> str:
    """One sentence: does the model beat "predict vol_moving_avg" (lower MAE and median error)?"""
    test, base = metrics["test"], metrics["baseline"]
    mae_change = test["mae"] / base["mae"] - 1.0 if base["mae"] else 0.0
    detail = (
        f"MAE {mae_change:+.1%} against the baseline, median error "
        f"{_pct(test['median_ape'])} against {_pct(base['median_ape'])}"
    )
    if metrics["beats_baseline"]:
        return f"the model beats the baseline: {detail}"
    return f"the model does NOT beat the baseline: {detail}"


def summary_text(metrics: Mapping[str, Any], model_dir: Location) -> str:
    """A few lines for a person: what was fitted, how well, compared with the baseline."""
    params, rows, test, base = (
        metrics["params"],
        metrics["rows"],
        metrics["test"],
        metrics["baseline"],
    )
    split = metrics["split"]
    where = f"from {split['first_test_date']}" if split["method"] == "time" else "random"
    return "\n".join(
        [
            f"model: {params['num_trees']} trees, depth {params['max_depth']}, "
            f"{params['max_bins']} bins, target {params['target']}, horizon {params['horizon']}, "
            f"fitted on {rows['train_fitted']:,} of {rows['train']:,} training rows in "
            f"{metrics['durations_seconds']['fit']:.1f} s",
            f"test ({rows['test']:,} rows, {split['test_row_fraction']:.1%}, {where}): "
            f"R² {_fmt(test['r2'])}  RMSE {test['rmse']:,.0f}  MAE {test['mae']:,.0f}  "
            f"median error {_pct(test['median_ape'])}",
            f"baseline vol_moving_avg:  R² {_fmt(base['r2'])}  "
            f"RMSE {base['rmse']:,.0f}  MAE {base['mae']:,.0f}  "
            f"median error {_pct(base['median_ape'])}",
            verdict(metrics),
            f"written: {model_dir} ({METRICS_FILE}, {PLOT_FILE})",
        ]
    )


def run(spark: SparkSession, config: Config) -> StageSummary:
    """Read DIR/lake/features, train and evaluate, export DIR/model atomically."""
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    features, version = read_features(spark, config)
    read_seconds = time.perf_counter() - started
    result = train(features, config.model)

    clock = time.perf_counter()
    metrics = result.metrics
    metrics["lineage"] = {
        "features_path": str(config.features_path),
        "format": config.storage_format,
        "delta_version": version,
        "parquet_version": str(resolve(config.features_path))
        if config.storage_format == "parquet"
        else None,
        "spark_version": spark.version,
        "python_version": platform.python_version(),
        "spark_master": spark.sparkContext.master,
    }
    metrics["started_at"] = started_at.isoformat(timespec="seconds")
    durations = {"read": read_seconds, **result.durations}
    plot_png = render_plot(result.plot_sample, metrics)
    durations["plot"] = time.perf_counter() - clock
    # "total" is everything up to writing the model directory, which metrics.json is part of.
    durations["total"] = time.perf_counter() - started
    metrics["durations_seconds"] = {k: round(v, 3) for k, v in durations.items()}
    metrics["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    clock = time.perf_counter()
    export_model(result.model, metrics, plot_png, config.model_dir)
    export_seconds = time.perf_counter() - clock
    log.info("\n%s", summary_text(metrics, config.model_dir))

    rows = metrics["rows"]
    return StageSummary(
        stage="train",
        rows_in=rows["input"],
        rows_out=rows["usable"],
        rows_rejected=rows["dropped_nulls"],
        seconds=time.perf_counter() - started,
        details={
            "train_fitted": rows["train_fitted"],
            "test": rows["test"],
            "r2": metrics["test"]["r2"],
            "baseline_r2": metrics["baseline"]["r2"],
            "mae": metrics["test"]["mae"],
            "baseline_mae": metrics["baseline"]["mae"],
            "median_ape": metrics["test"]["median_ape"],
            "baseline_median_ape": metrics["baseline"]["median_ape"],
            "beats_baseline": metrics["beats_baseline"],
            "model_dir": str(config.model_dir),
            "export_seconds": round(export_seconds, 3),
        },
    )


# ---------------------------------------------------------------------------------------------
# Command-line flags (jobs/train.py and jobs/pipeline.py)
# ---------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train flags; each overrides the matching `model:` setting of conf/pipeline.yaml."""
    group = parser.add_argument_group("model (defaults: conf/pipeline.yaml, model:)")
    group.add_argument("--num-trees", type=int)
    group.add_argument("--max-depth", type=int)
    group.add_argument("--max-bins", type=int)
    group.add_argument("--seed", type=int, help="forest, random split and sampling seed")
    group.add_argument("--target", choices=TARGETS, help="what the forest learns (docs/model.md)")
    group.add_argument("--horizon", choices=HORIZONS, help="which day's Volume a row predicts")
    group.add_argument(
        "--fit-partitions", type=int, help="partitions the fitted rows are hashed to"
    )
    group.add_argument("--split", choices=SPLIT_METHODS)
    group.add_argument("--test-fraction", type=float)
    group.add_argument(
        "--train-sample-fraction", type=float, help="fit on this fraction of the training rows"
    )
    group.add_argument("--train-max-rows", type=int, help="fit on at most about this many rows")
    group.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pick trees/depth/bins with TrainValidationSplit first",
    )
    group.add_argument("--tune-sample-fraction", type=float)
    group.add_argument("--tune-num-trees", type=_int_list, metavar="N,N,...")
    group.add_argument("--tune-max-depth", type=_int_list, metavar="N,N,...")
    group.add_argument("--tune-max-bins", type=_int_list, metavar="N,N,...")


MODEL_FLAGS = (
    "num_trees",
    "max_depth",
    "max_bins",
    "seed",
    "target",
    "horizon",
    "fit_partitions",
    "split",
    "test_fraction",
    "train_sample_fraction",
    "train_max_rows",
    "tune",
    "tune_sample_fraction",
    "tune_num_trees",
    "tune_max_depth",
    "tune_max_bins",
)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags as config overrides (None = keep the configured value)."""
    return {name: getattr(args, name, None) for name in MODEL_FLAGS}
