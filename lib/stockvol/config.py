"""Pipeline configuration: conf/pipeline.yaml, read once, plus command-line overrides."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import yaml

from stockvol.location import Location, LocationError

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
    """Everything a job needs; paths all derive from ``data_dir`` (local or ``s3a://``)."""

    data_dir: Location
    master: str = "local[*]"
    spark_defaults_file: Path = PROJECT_ROOT / "spark-defaults.conf"
    kaggle_id: str = "jacksoncrow/stock-market-dataset"
    source: str = "auto"
    sample_symbols: int = 60
    sample_seed: int = 42
    storage_format: str = "delta"
    window: int = 30
    median: str = "approx"
    # Replaced table files and versions are deleted this long after they were replaced
    # (stockvol.retention); 168 = Delta's own default, delta.deletedFileRetentionDuration.
    retention_hours: float = 168.0
    model: ModelParams = field(default_factory=ModelParams)

    def __post_init__(self) -> None:
        # A Config built or replaced with a plain path (tests, scripts) gets the same Location.
        object.__setattr__(self, "data_dir", _data_dir(self.data_dir))

    @property
    def raw_dir(self) -> Location:
        return self.data_dir / "raw"

    @property
    def lake_dir(self) -> Location:
        return self.data_dir / "lake"

    @property
    def prices_path(self) -> Location:
        return self.lake_dir / "prices"

    @property
    def rejects_path(self) -> Location:
        return self.lake_dir / "rejects"

    @property
    def features_path(self) -> Location:
        return self.lake_dir / "features"

    @property
    def model_dir(self) -> Location:
        return self.data_dir / "model"

    @property
    def metrics_path(self) -> Location:
        return self.model_dir / "metrics.json"


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_int(name: str, value: object, least: int, most: int | None = None) -> None:
    """An integer (not a bool, not a float) within least..most."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < least:
        raise ConfigError(f"{name} must be at least {least}, got {value}")
    if most is not None and value > most:
        raise ConfigError(f"{name} must be at most {most}, got {value}")


def _check_fraction(name: str, value: object, one_allowed: bool) -> None:
    """A number in (0, 1), or (0, 1] when ``one_allowed``; NaN is none."""
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if not number or not (0.0 < value < 1.0 or (one_allowed and value == 1.0)):
        interval = "(0, 1]" if one_allowed else "(0, 1)"
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}")


def _check_hours(name: str, value: object) -> None:
    """A finite number of hours, 0 or more."""
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if not number or not 0 <= value < float("inf"):
        raise ConfigError(f"{name} must be a number of hours >= 0, got {value!r}")


# MLlib's own limits: a tree deeper than 30 or fewer than 2 bins fails only once Spark runs.
MAX_DEPTH_LIMIT = 30
MIN_BINS = 2


def validate_model(params: ModelParams) -> ModelParams:
    """Raise ConfigError naming the first invalid model setting; return the settings unchanged.
    Every limit MLlib would only report after Spark started is checked here."""
    _check_int("num_trees", params.num_trees, 1)
    _check_int("max_depth", params.max_depth, 0, MAX_DEPTH_LIMIT)
    _check_int("max_bins", params.max_bins, MIN_BINS)
    _check_int("seed", params.seed, -(2**63), 2**63 - 1)
    _check_fraction("train_sample_fraction", params.train_sample_fraction, one_allowed=True)
    if params.train_max_rows is not None:
        _check_int("train_max_rows", params.train_max_rows, 1)
    _check_choice("split", params.split, SPLIT_METHODS)
    _check_choice("target", params.target, TARGETS)
    _check_choice("horizon", params.horizon, HORIZONS)
    _check_int("fit_partitions", params.fit_partitions, 1)
    _check_fraction("test_fraction", params.test_fraction, one_allowed=False)
    if not isinstance(params.tune, bool):
        raise ConfigError(f"tune must be true or false, got {params.tune!r}")
    _check_fraction("tune_sample_fraction", params.tune_sample_fraction, one_allowed=True)
    limits = {
        "tune_num_trees": (1, None),
        "tune_max_depth": (0, MAX_DEPTH_LIMIT),
        "tune_max_bins": (MIN_BINS, None),
    }
    for name, (least, most) in limits.items():
        values = getattr(params, name)
        if not isinstance(values, tuple) or not values:
            raise ConfigError(f"{name} must be a non-empty list of integers, got {values!r}")
        for value in values:
            _check_int(f"each of {name}", value, least, most)
    return params


def validate(config: Config) -> Config:
    """Raise ConfigError naming the first invalid setting; return the config unchanged. Jobs
    call it (through ``load_config``) before Spark starts: a bad setting costs no JVM."""
    _check_choice("storage format", config.storage_format, STORAGE_FORMATS)
    _check_choice("median mode", config.median, MEDIAN_MODES)
    _check_int("window", config.window, 1)
    for name in ("master", "source", "kaggle_id"):
        if not isinstance(getattr(config, name), str) or not getattr(config, name):
            raise ConfigError(f"{name} must be a non-empty text, got {getattr(config, name)!r}")
    _check_int("sample_symbols", config.sample_symbols, 1)
    _check_int("sample_seed", config.sample_seed, 0)
    _check_hours("retention_hours", config.retention_hours)
    validate_model(config.model)
    return config


def _model_params(raw: dict[str, Any]) -> ModelParams:
    if not isinstance(raw, dict):
        raise ConfigError(f"model: must be a mapping of settings, got {raw!r}")
    known = {f.name for f in fields(ModelParams)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown model settings: {', '.join(sorted(unknown))}")
    # YAML lists (the tune grids) as the tuples the settings hold.
    return ModelParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: must be a mapping of settings, got {section!r}")
    return section


def load_config(path: str | Path = DEFAULT_CONFIG, **overrides: Any) -> Config:
    """Read the YAML file and apply overrides (None values are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    spark, dataset, features, storage = (
        _section(raw, name) for name in ("spark", "dataset", "features", "storage")
    )
    for key, value in (("data_dir", raw.get("data_dir", "data")),
                       ("spark.defaults_file", spark.get("defaults_file", ""))):  # fmt: skip
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a path, got {value!r}")
    defaults_file = Path(spark.get("defaults_file", "spark-defaults.conf"))
    config = Config(
        data_dir=_data_dir(raw.get("data_dir", "data")),
        master=spark.get("master", "local[*]"),
        spark_defaults_file=defaults_file
        if defaults_file.is_absolute()
        else PROJECT_ROOT / defaults_file,
        kaggle_id=dataset.get("kaggle_id", Config.kaggle_id),
        source=str(dataset.get("source", "auto")),
        sample_symbols=dataset.get("sample_symbols", 60),
        sample_seed=dataset.get("sample_seed", 42),
        storage_format=storage.get("format", "delta"),
        retention_hours=storage.get("retention_hours", Config.retention_hours),
        window=features.get("window", 30),
        median=features.get("median", "approx"),
        model=_model_params(raw.get("model", {})),
    )
    return validate(apply_overrides(config, **overrides))


def _data_dir(value: str | Path | Location) -> Location:
    try:
        return Location.parse(value)
    except LocationError as err:
        raise ConfigError(f"data_dir: {err}") from None


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
            top_changes[name] = _data_dir(value) if name == "data_dir" else value
        elif name in model_names:
            model_changes[name] = value
        else:
            raise ConfigError(f"unknown setting: {name}")
    if model_changes:
        top_changes["model"] = replace(config.model, **model_changes)
    return validate(replace(config, **top_changes))


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``prog: error: ...``) without the long usage text:
    like every other setting error, exit code 2 and one line saying what is wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(err: Exception) -> str:
    """An error's message on one line (a YAML error spans several)."""
    return " ".join(str(err).split())


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every Spark job accepts."""
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="pipeline YAML file")
    parser.add_argument("--data-dir", help="root of raw/, lake/ and model/ (default: data)")
    parser.add_argument("--format", dest="storage_format", choices=STORAGE_FORMATS)
    parser.add_argument("--median", choices=MEDIAN_MODES, help="rolling median mode")
    parser.add_argument("--master", help="Spark master URL, e.g. local[2] or spark://HOST:7077")
    parser.add_argument(
        "--retention-hours",
        type=float,
        help="delete replaced files this long after their replacement (default: conf, 168)",
    )
    return parser


def config_from_args(args: argparse.Namespace, **extra: Any) -> Config:
    """Load --config and apply the common overrides plus any job-specific ones."""
    return load_config(
        args.config,
        data_dir=args.data_dir,
        storage_format=args.storage_format,
        median=args.median,
        master=args.master,
        retention_hours=args.retention_hours,
        **extra,
    )
