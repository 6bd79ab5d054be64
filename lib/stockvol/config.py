"""Pipeline configuration: conf/pipeline.yaml, read once, plus command-line overrides."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = PROJECT_ROOT / "conf" / "pipeline.yaml"

STORAGE_FORMATS = ("delta", "parquet")
MEDIAN_MODES = ("approx", "exact")
SPLIT_METHODS = ("time", "random")
# What the forest learns (docs/model.md): the day's volume relative to its moving average, on a log
# scale (default) or as a plain ratio, or the raw volume (kept to reproduce the comparison).
TARGETS = ("log_ratio", "ratio", "volume")
# Which day's volume a features row predicts: the next trading day's (an honest forecast) or its
# own (the moving average then already holds 1/30 of the label).
HORIZONS = ("next_day", "same_day")


class ConfigError(ValueError):
    """The configuration file or an override is invalid."""


@dataclass(frozen=True)
class ModelParams:
    """RandomForestRegressor parameters and the train/test split."""

    num_trees: int = 100
    max_depth: int = 5
    max_bins: int = 32
    seed: int = 42
    target: str = "log_ratio"
    horizon: str = "next_day"
    # The forest's bootstrap follows the partitioning of its input: a fixed partition count (rows
    # hashed by Symbol, sorted by Symbol and Date) gives the same model on any layout or cluster.
    fit_partitions: int = 8
    train_sample_fraction: float = 1.0
    # Upper bound on the rows the forest is fitted on (None = no cap); see docs/model.md.
    train_max_rows: int | None = None
    split: str = "time"
    test_fraction: float = 0.2
    tune: bool = False
    tune_sample_fraction: float = 0.1
    # The --tune grid: every combination is one TrainValidationSplit candidate.
    tune_num_trees: tuple[int, ...] = (20, 100)
    tune_max_depth: tuple[int, ...] = (5, 8)
    tune_max_bins: tuple[int, ...] = (32, 64)


@dataclass(frozen=True)
class Config:
    """Everything a job needs; paths all derive from ``data_dir``."""

    data_dir: Path
    master: str = "local[*]"
    spark_defaults_file: Path = PROJECT_ROOT / "spark-defaults.conf"
    kaggle_id: str = "jacksoncrow/stock-market-dataset"
    source: str = "auto"
    sample_symbols: int = 60
    sample_seed: int = 42
    storage_format: str = "delta"
    window: int = 30
    median: str = "approx"
    model: ModelParams = field(default_factory=ModelParams)

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def lake_dir(self) -> Path:
        return self.data_dir / "lake"

    @property
    def prices_path(self) -> Path:
        return self.lake_dir / "prices"

    @property
    def rejects_path(self) -> Path:
        return self.lake_dir / "rejects"

    @property
    def features_path(self) -> Path:
        return self.lake_dir / "features"

    @property
    def model_dir(self) -> Path:
        return self.data_dir / "model"

    @property
    def metrics_path(self) -> Path:
        return self.model_dir / "metrics.json"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def validate(config: Config) -> Config:
    """Raise ConfigError naming the first invalid setting; return the config unchanged."""
    _check_choice("storage format", config.storage_format, STORAGE_FORMATS)
    _check_choice("median mode", config.median, MEDIAN_MODES)
    _check_choice("split", config.model.split, SPLIT_METHODS)
    _check_choice("target", config.model.target, TARGETS)
    _check_choice("horizon", config.model.horizon, HORIZONS)
    if config.model.fit_partitions < 1:
        raise ConfigError(f"fit_partitions must be at least 1, got {config.model.fit_partitions}")
    if config.window < 1:
        raise ConfigError(f"window must be at least 1, got {config.window}")
    if not 0.0 < config.model.test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {config.model.test_fraction}")
    for name in ("train_sample_fraction", "tune_sample_fraction"):
        value = getattr(config.model, name)
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{name} must be in (0, 1], got {value}")
    if config.model.num_trees < 1 or config.model.max_depth < 0:
        raise ConfigError("num_trees must be >= 1 and max_depth >= 0")
    return config


def _model_params(raw: dict[str, Any]) -> ModelParams:
    known = {f.name for f in fields(ModelParams)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown model settings: {', '.join(sorted(unknown))}")
    return ModelParams(**raw)


def load_config(path: str | Path = DEFAULT_CONFIG, **overrides: Any) -> Config:
    """Read the YAML file and apply overrides (None values are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    spark = raw.get("spark", {})
    dataset = raw.get("dataset", {})
    features = raw.get("features", {})
    defaults_file = Path(spark.get("defaults_file", "spark-defaults.conf"))
    config = Config(
        data_dir=Path(raw.get("data_dir", "data")),
        master=spark.get("master", "local[*]"),
        spark_defaults_file=defaults_file
        if defaults_file.is_absolute()
        else PROJECT_ROOT / defaults_file,
        kaggle_id=dataset.get("kaggle_id", Config.kaggle_id),
        source=str(dataset.get("source", "auto")),
        sample_symbols=int(dataset.get("sample_symbols", 60)),
        sample_seed=int(dataset.get("sample_seed", 42)),
        storage_format=raw.get("storage", {}).get("format", "delta"),
        window=int(features.get("window", 30)),
        median=features.get("median", "approx"),
        model=_model_params(raw.get("model", {})),
    )
    return validate(apply_overrides(config, **overrides))


def apply_overrides(config: Config, **overrides: Any) -> Config:
    """Return a copy with the given top-level or model settings replaced (None = keep)."""
    top = {f.name for f in fields(Config)}
    model_names = {f.name for f in fields(ModelParams)}
    top_changes: dict[str, Any] = {}
    model_changes: dict[str, Any] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name in top:
            top_changes[name] = Path(value) if name == "data_dir" else value
        elif name in model_names:
            model_changes[name] = value
        else:
            raise ConfigError(f"unknown setting: {name}")
    if model_changes:
        top_changes["model"] = replace(config.model, **model_changes)
    return validate(replace(config, **top_changes))


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every Spark job accepts."""
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="pipeline YAML file")
    parser.add_argument("--data-dir", help="root of raw/, lake/ and model/ (default: data)")
    parser.add_argument("--format", dest="storage_format", choices=STORAGE_FORMATS)
    parser.add_argument("--median", choices=MEDIAN_MODES, help="rolling median mode")
    parser.add_argument("--master", help="Spark master URL, e.g. local[2] or spark://HOST:7077")
    return parser


def config_from_args(args: argparse.Namespace, **extra: Any) -> Config:
    """Load --config and apply the common overrides plus any job-specific ones."""
    return load_config(
        args.config,
        data_dir=args.data_dir,
        storage_format=args.storage_format,
        median=args.median,
        master=args.master,
        **extra,
    )
