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
import shutil
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
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.regression import RandomForestRegressionModel, RandomForestRegressor
from pyspark.ml.tuning import ParamGridBuilder, TrainValidationSplit
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from stockvol.cli import PipelineError
from stockvol.config import SPLIT_METHODS, Config, ModelParams, validate_model
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
FEATURES_VECTOR = "features"
PREDICTION = "prediction"
BASELINE = VOL_MOVING_AVG
METRICS_FILE = "metrics.json"
PLOT_FILE = "evaluation.png"
PLOT_POINTS = 4000
METRICS_SCHEMA_VERSION = 1
REQUIRED_COLUMNS = (SYMBOL, DATE, LABEL, *FEATURE_COLUMNS)

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
    """VectorAssembler over the two features, then the random forest predicting Volume."""
    assembler = VectorAssembler(
        inputCols=list(FEATURE_COLUMNS), outputCol=FEATURES_VECTOR, handleInvalid="error"
    )
    forest = RandomForestRegressor(
        featuresCol=FEATURES_VECTOR,
        labelCol=LABEL,
        predictionCol=PREDICTION,
        numTrees=params.num_trees,
        maxDepth=params.max_depth,
        maxBins=params.max_bins,
        seed=params.seed,
    )
    return Pipeline(stages=[assembler, forest])


def regression_metrics(
    df: DataFrame,
    label: str,
    predictions: Mapping[str, str],
    sample_where: str | None = None,
) -> tuple[dict[str, dict[str, float | None]], pd.DataFrame]:
    """RMSE, MAE, MSE and R² of each prediction column against ``label``, in one pass over ``df``.

    R² is 1 - MSE / Var(label) (population variance), the definition of MLlib's RegressionEvaluator
    and scikit-learn; None when the label is constant. The same pass also collects the rows that
    match ``sample_where`` (label and predictions; keep it to a few thousand), returned as pandas.
    """
    y = F.col(label).cast("double")
    aggs: list[Column] = [F.count(F.lit(1)).alias("n"), F.var_pop(y).alias("var")]
    for i, column in enumerate(predictions.values()):
        err = F.col(column).cast("double") - y
        aggs += [F.avg(err * err).alias(f"mse{i}"), F.avg(F.abs(err)).alias(f"mae{i}")]
    kept = [label, *predictions.values()]
    if sample_where is not None:
        # collect_list skips nulls: only the rows that match end up in the list.
        row_struct = F.struct(*(F.col(c).cast("double").alias(c) for c in kept))
        aggs.append(F.collect_list(F.when(F.expr(sample_where), row_struct)).alias("sample"))
    row = df.agg(*aggs).first()
    if row is None or not row["n"]:
        raise PipelineError("no rows to evaluate the model on")
    sample = pd.DataFrame(
        [tuple(r) for r in row["sample"]] if sample_where is not None else [], columns=kept
    )
    result: dict[str, dict[str, float | None]] = {}
    for i, name in enumerate(predictions):
        mse = float(row[f"mse{i}"])
        variance = float(row["var"])
        result[name] = {
            "rmse": math.sqrt(mse),
            "mae": float(row[f"mae{i}"]),
            "mse": mse,
            "r2": 1.0 - mse / variance if variance > 0 else None,
            "rows": int(row["n"]),
        }
    return result, sample


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


def check_params(params: ModelParams) -> ModelParams:
    """Raise ConfigError naming the first invalid model setting (``config.validate_model``, which
    every job also runs before Spark starts), for callers that build ModelParams themselves."""
    return validate_model(params)


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


def _model_frame(df: DataFrame) -> DataFrame:
    """Only what the pipeline reads, cached: the forest scans its input several times."""
    return df.select(*FEATURE_COLUMNS, LABEL).persist(StorageLevel.MEMORY_AND_DISK)


def tune(
    train_rows: DataFrame, params: ModelParams, seed: int
) -> tuple[ModelParams, dict[str, Any]]:
    """TrainValidationSplit over the grid on a sample of the training rows; the best params."""
    pipeline = build_pipeline(params)
    forest: RandomForestRegressor = pipeline.getStages()[-1]  # type: ignore[assignment]
    grid = (
        ParamGridBuilder()
        .addGrid(forest.numTrees, list(params.tune_num_trees))
        .addGrid(forest.maxDepth, list(params.tune_max_depth))
        .addGrid(forest.maxBins, list(params.tune_max_bins))
        .build()
    )
    sample = _model_frame(
        train_rows.where(hash_predicate(seed, "tune", params.tune_sample_fraction))
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
    check_params(params)
    durations: dict[str, float] = {}
    clock = time.perf_counter()

    profile = _profile(features, params)
    split, train_rows, test_rows = _choose_split(profile, params)
    input_rows = int(profile["rows"].sum())
    usable_count = int(profile["usable"].sum())
    usable = usable_rows(features)
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
    fit_frame = _model_frame(train_df.where(sample_predicate))
    try:
        fitted_rows = fit_frame.count()
        if fitted_rows == 0:
            raise PipelineError(
                f"sampling {fraction:g} of {train_rows} training rows left none; raise "
                "--train-sample-fraction or --train-max-rows"
            )
        durations["sample"] = time.perf_counter() - clock
        clock = time.perf_counter()
        model = build_pipeline(fit_params).fit(fit_frame)
        durations["fit"] = time.perf_counter() - clock
    finally:
        fit_frame.unpersist()

    clock = time.perf_counter()
    # One pass over the test set: the metrics of model and baseline, and the plot's points.
    evaluation, plot_sample = regression_metrics(
        model.transform(test_df),
        LABEL,
        {"test": PREDICTION, "baseline": BASELINE},
        sample_where=hash_predicate(params.seed, "plot", min(1.0, PLOT_POINTS / test_rows)),
    )
    durations["evaluate"] = time.perf_counter() - clock

    forest: RandomForestRegressionModel = model.stages[-1]  # type: ignore[assignment]
    importances = forest.featureImportances.toArray().tolist()
    metrics: dict[str, Any] = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "model": {
            "type": "RandomForestRegressor",
            "label": LABEL,
            "features": list(FEATURE_COLUMNS),
            "feature_importances": dict(zip(FEATURE_COLUMNS, importances, strict=True)),
            "total_num_nodes": forest.totalNumNodes,
        },
        "test": evaluation["test"],
        "baseline": {
            "prediction": f"{BASELINE} (the moving average itself)",
            **evaluation["baseline"],
        },
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
    """PNG: predicted vs actual volume on a test sample (log axes) and the feature importances."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(11, 4.8), layout="constrained")
    scatter, bars = fig.subplots(1, 2, width_ratios=[3, 2])
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
        f"test set sample ({len(shown):,} of {test['rows']:,} rows): "
        f"R² {_fmt(test['r2'])} (baseline {_fmt(baseline['r2'])})",
        fontsize=10,
    )
    scatter.legend(loc="upper left", fontsize=8, markerscale=3)
    importances = metrics["model"]["feature_importances"]
    bars.barh(list(importances), list(importances.values()))
    bars.set(xlim=(0, 1), xlabel="importance (sums to 1)", title="feature importances")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def versions_dir(model_dir: Path) -> Path:
    """Where the model versions live; ``model_dir`` is a symlink to one of them."""
    return model_dir.parent / f".{model_dir.name}.versions"


def _save_pipeline(model: PipelineModel, path: Path) -> None:
    model.write().save(str(path))


def _write_extras(path: Path, metrics: Mapping[str, Any], plot_png: bytes) -> None:
    (path / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    (path / PLOT_FILE).write_bytes(plot_png)


def export_model(
    model: PipelineModel, metrics: Mapping[str, Any], plot_png: bytes, model_dir: Path
) -> Path:
    """Write model, metrics.json and the plot to a new version directory, then swap it in.

    ``model_dir`` is a symlink into ``.model.versions/``; ``os.replace`` of the link is atomic, so
    a reader finds the previous complete model or the new one, never a mix or a missing path. A
    failure before the swap removes the new version and leaves the link untouched. The previous
    version is kept (a reader that resolved the link just before the swap can finish reading it);
    older ones are deleted. Returns the new version's directory.
    """
    model_dir = Path(model_dir)
    versions = versions_dir(model_dir)
    versions.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    new_version = versions / f"{stamp}-{uuid.uuid4().hex[:8]}"
    try:
        _save_pipeline(model, new_version)
        _write_extras(new_version, metrics, plot_png)
    except BaseException:
        shutil.rmtree(new_version, ignore_errors=True)
        raise
    previous = model_dir.resolve() if model_dir.is_symlink() else None
    if model_dir.exists() and not model_dir.is_symlink():
        # A plain directory (older layout) is moved aside: model_dir is missing for an instant.
        previous = versions / f"legacy-{uuid.uuid4().hex[:8]}"
        os.rename(model_dir, previous)
    link = model_dir.parent / f".{model_dir.name}.link-{uuid.uuid4().hex}"
    os.symlink(new_version.relative_to(model_dir.parent), link)
    os.replace(link, model_dir)
    for entry in versions.iterdir():
        if entry not in (new_version, previous):
            shutil.rmtree(entry, ignore_errors=True)
    return new_version


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


def summary_text(metrics: Mapping[str, Any], model_dir: Path) -> str:
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
            f"{params['max_bins']} bins, fitted on {rows['train_fitted']:,} of "
            f"{rows['train']:,} training rows in {metrics['durations_seconds']['fit']:.1f} s",
            f"test ({rows['test']:,} rows, {split['test_row_fraction']:.1%}, {where}): "
            f"R² {_fmt(test['r2'])}  "
            f"RMSE {test['rmse']:,.0f}  MAE {test['mae']:,.0f}",
            f"baseline vol_moving_avg:  R² {_fmt(base['r2'])}  "
            f"RMSE {base['rmse']:,.0f}  MAE {base['mae']:,.0f}",
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
        "features_path": str(config.features_path.resolve()),
        "format": config.storage_format,
        "delta_version": version,
        "parquet_version": os.path.realpath(config.features_path)
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
