"""SIGKILL in the middle of a write: the previous tables and model survive, a rerun recovers.

Each test runs a real job with spark-submit (its own JVM, Python workers and all), watches its
output directory until the new data is half written, and kills the whole process group with
SIGKILL: no handler, no cleanup, as an OOM kill or a lost machine would. Then:

* the debris of the interrupted write is there (proof the kill landed mid-write);
* the previous table (Delta and Parquet) or model reads back exactly as before, through Spark and
  through an independent reader (pyarrow; the JVM-free model reader);
* a rerun of the stage gives exactly what an uninterrupted run gives;
* killed between ingest's two publishes, the pair reader still gives the previous run's prices
  and rejects together.

A write of a few thousand rows takes well under a second; the killed job runs with
``spark.sql.files.maxRecordsPerFile`` small so that the same write spans thousands of files and
lasts seconds, long enough to be caught in the middle. The job's code is unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from pandas.testing import assert_frame_equal
from pyspark.ml import PipelineModel
from pyspark.sql import DataFrame, SparkSession

from serving.forest import load_model
from stockvol import features, ingest, retention, train
from stockvol.config import Config, load_config
from stockvol.location import Location
from stockvol.sample import generate_sample
from stockvol.schema import (
    ADJ_CLOSE,
    DATE,
    FEATURES_SCHEMA,
    PRICE_COLUMNS,
    PRICES_SCHEMA,
    SYMBOL,
    VOLUME,
)
from stockvol.storage import delta_version, read_table, write_table

ROOT = Path(__file__).resolve().parents[1]
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"
FORMATS = ("delta", "parquet")
RECORDS_PER_FILE = 2  # the killed job writes this many rows per file: a long, many-file write
NEW_FILES_BEFORE_KILL = 8  # files of the new version that must exist when the kill comes
JOB_TIMEOUT = 600.0  # seconds; generous because the test machine's cores are shared
FIGURES: Counter[str] = Counter()  # printed by conftest.report_figures
FIGURES_TITLE = "SIGKILL faults injected and survived"

pytestmark = pytest.mark.faults


# --- killing a job mid-write ---------------------------------------------------------------------


@dataclass(frozen=True)
class Killed:
    output: str
    seconds: float  # from start to SIGKILL


def _group_alive(pgid: int) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and process.info["status"] != "zombie":
                alive.append(process)
    return alive


def kill_mid_write(
    job: str,
    config: Config,
    writing: Callable[[], bool],
    *args: str,
    records_per_file: int = RECORDS_PER_FILE,
    conf: Sequence[str] = (),
) -> Killed:
    """Run ``jobs/<job>.py`` under spark-submit (``conf``: more of its flags); SIGKILL its
    process group once ``writing()``."""
    logs = Path(config.data_dir).parent if config.data_dir.is_local else Path(tempfile.mkdtemp())
    log = logs / f"{job}-killed.log"
    command = [
        str(SPARK_SUBMIT),
        "--properties-file",
        "spark-defaults.conf",
        "--conf",
        f"spark.sql.files.maxRecordsPerFile={records_per_file}",
        "--conf",
        "spark.sql.shuffle.partitions=2",
        *conf,
        str(ROOT / "jobs" / f"{job}.py"),
        "--data-dir",
        str(config.data_dir),
        "--format",
        config.storage_format,
        "--master",
        "local[2]",
        *args,
    ]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    started = time.monotonic()
    FIGURES["injected"] += 1
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while not writing():
            if process.poll() is not None:
                pytest.fail(
                    f"{job} ended (exit {process.returncode}) before the kill:\n{log.read_text()}"
                )
            if time.monotonic() - started > JOB_TIMEOUT:
                pytest.fail(f"{job} never started writing:\n{log.read_text()}")
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
        seconds = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _group_alive(process.pid):  # the JVM and Python workers too, not just the launcher
        assert time.monotonic() < deadline, _group_alive(process.pid)
        time.sleep(0.1)
    assert process.returncode == -signal.SIGKILL
    return Killed(log.read_text(errors="replace"), seconds)


def data_files(path: Path | Location) -> set[Path]:
    """The Parquet files under a table directory (Delta: its data files; not the log)."""
    path = Path(path)  # a Location from the config, or a Path
    return {p for p in path.rglob("*.parquet") if "_delta_log" not in p.parts}


def delta_writing(path: Path | Location) -> Callable[[], bool]:
    """True once the new version's data files are landing but the commit is not written yet."""
    path = Path(path)  # a Location from the config, or a Path
    before = data_files(path)
    log_before = set((path / "_delta_log").glob("*.json"))

    def writing() -> bool:
        assert set((path / "_delta_log").glob("*.json")) == log_before, "committed before the kill"
        return len(data_files(path) - before) >= NEW_FILES_BEFORE_KILL

    return writing


def versions_dir(path: Path | Location) -> Path:
    """Where storage.write_table (Parquet) and train.export_model keep versions."""
    path = Path(path)  # a Location from the config, or a Path
    return path.parent / f".{path.name}.versions"


def new_version_files(path: Path | Location) -> list[Path]:
    """Files under version directories other than the one ``path`` links to."""
    path = Path(path)  # a Location from the config, or a Path
    current = path.resolve() if path.is_symlink() else None
    versions = versions_dir(path)
    if not versions.is_dir():
        return []
    # os.walk skips directories that vanish while it lists them (Hadoop's _temporary task
    # directories are renamed away during the write); Path.rglob raises instead.
    return [
        Path(root, name)
        for entry in versions.iterdir()
        if entry.resolve() != current
        for root, _, names in os.walk(entry)
        for name in names
    ]


def version_writing(path: Path | Location, pattern: str = "*.parquet") -> Callable[[], bool]:
    """True once a new version beside the one ``path`` links to holds enough ``pattern`` files."""
    path = Path(path)  # a Location from the config, or a Path
    target = path.resolve()

    def writing() -> bool:
        assert path.resolve() == target, "swapped before the kill"
        return sum(f.match(pattern) for f in new_version_files(path)) >= NEW_FILES_BEFORE_KILL

    return writing


def any_writing(*detectors: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: any(detector() for detector in detectors)


# --- what a table or model holds ------------------------------------------------------------------


def ordered_rows(df: DataFrame) -> pd.DataFrame:
    """A DataFrame's rows in a fixed order."""
    return df.orderBy(*df.columns).toPandas()


def table_rows(spark: SparkSession, path: Path, storage_format: str) -> pd.DataFrame:
    """The whole table through the stage's own reader, in a fixed order."""
    return ordered_rows(read_table(spark, path, storage_format))


def arrow_rows(path: Path | Location) -> pd.DataFrame:
    """A Parquet table read without Spark (pyarrow follows the symlink), in a fixed order."""
    path = Path(path)  # a Location from the config, or a Path
    frame = pq.read_table(path.resolve()).to_pandas()
    return frame.sort_values(list(frame.columns), na_position="first").reset_index(drop=True)


def assert_table_unchanged(
    spark: SparkSession,
    path: Path | Location,
    storage_format: str,
    before: pd.DataFrame,
    version: int | None,
) -> None:
    assert_frame_equal(table_rows(spark, path, storage_format), before)
    if storage_format == "delta":
        assert delta_version(spark, path) == version
    else:
        expected = before.sort_values(list(before.columns), na_position="first")
        assert_frame_equal(arrow_rows(path), expected.reset_index(drop=True), check_dtype=False)


def debris(path: Path | Location, storage_format: str, committed: set[Path]) -> int:
    """Files the killed write left behind: proof it was killed mid-write."""
    path = Path(path)  # a Location from the config, or a Path
    if storage_format == "delta":
        return len(data_files(path) - committed)
    return len(new_version_files(path))


# --- inputs -------------------------------------------------------------------------------------


def prices_frame(symbols: int = 4, rows: int = 400, seed: int = 5) -> pd.DataFrame:
    """A valid prices table: a random walk per symbol on consecutive business days."""
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(symbols):
        dates = pd.bdate_range("2015-01-01", periods=rows).strftime("%Y-%m-%d")
        close = 50 * np.exp(np.cumsum(rng.normal(0, 0.02, rows)))
        part = pd.DataFrame({SYMBOL: f"S{i}", "Security Name": f"Company {i}", DATE: dates})
        for column in PRICE_COLUMNS:
            part[column] = close * rng.uniform(0.98, 1.02, rows)
        part[ADJ_CLOSE] = close
        part[VOLUME] = rng.integers(10_000, 5_000_000, rows)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def features_frame() -> pd.DataFrame:
    """prices_frame() plus the two features, computed with pandas (train needs only a table)."""
    frame = prices_frame().sort_values([SYMBOL, DATE]).reset_index(drop=True)
    by_symbol = frame.groupby(SYMBOL, sort=False)
    frame["vol_moving_avg"] = by_symbol[VOLUME].transform(lambda v: v.rolling(30).mean())
    frame["adj_close_rolling_med"] = by_symbol[ADJ_CLOSE].transform(
        lambda v: v.rolling(30).median()
    )
    return frame


def with_features(spark: SparkSession, config: Config) -> Config:
    frame = spark.createDataFrame(features_frame(), FEATURES_SCHEMA)
    write_table(frame, config.features_path, config.storage_format)
    return config


def with_prices(spark: SparkSession, config: Config) -> Config:
    frame = spark.createDataFrame(prices_frame(), PRICES_SCHEMA)
    write_table(frame, config.prices_path, config.storage_format)
    return config


def fresh_config(base: Path, storage_format: str, **overrides: object) -> Config:
    return load_config(data_dir=base / "data", storage_format=storage_format, **overrides)


def copy_data(config: Config, target: Path) -> Config:
    """The same data directory elsewhere (symlinks kept: they are relative)."""
    shutil.copytree(config.data_dir, target / "data", symlinks=True)
    return replace(config, data_dir=target / "data")


# --- ingest -----------------------------------------------------------------------------------


def sample_raw(config: Config, seed: int) -> Config:
    """A generated sample in the Kaggle layout (6 symbols: one file is in both folders)."""
    shutil.rmtree(config.raw_dir, ignore_errors=True)
    generate_sample(config.raw_dir, symbols=6, seed=seed, rows_multiplier=0.02, workers=1)
    return config


def ingest_tables(spark: SparkSession, config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (
        table_rows(spark, Path(config.prices_path), config.storage_format),
        table_rows(spark, Path(config.rejects_path), config.storage_format),
    )


@dataclass(frozen=True)
class IngestCase:
    """An ingest data dir whose tables are from seed 1, raw/ now seed 2, and seed 2's tables."""

    config: Config
    before: tuple[pd.DataFrame, pd.DataFrame]
    versions: tuple[int | None, int | None]
    committed: tuple[set[Path], set[Path]]
    expected: tuple[pd.DataFrame, pd.DataFrame]


def ingest_case(spark: SparkSession, base: Path, storage_format: str) -> IngestCase:
    config = sample_raw(fresh_config(base / "run", storage_format), seed=1)
    ingest.run(spark, config)
    before = ingest_tables(spark, config)
    paths = (config.prices_path, Path(config.rejects_path))
    versions = tuple(delta_version(spark, path) for path in paths)
    committed = tuple(data_files(path) for path in paths)
    sample_raw(config, seed=2)  # new raw data: what the next ingest replaces the tables with
    reference = copy_data(config, base / "reference")
    shutil.rmtree(reference.lake_dir)
    ingest.run(spark, reference)
    expected = ingest_tables(spark, reference)
    assert not before[0].equals(expected[0]) and not before[1].equals(expected[1])
    return IngestCase(config, before, versions, committed, expected)  # type: ignore[arg-type]


@pytest.mark.parametrize("storage_format", FORMATS)
def test_killing_ingest_mid_write_keeps_the_previous_tables(
    spark: SparkSession, tmp_path: Path, storage_format: str
) -> None:
    case = ingest_case(spark, tmp_path, storage_format)
    config = case.config
    paths = (config.prices_path, Path(config.rejects_path))
    watch = delta_writing if storage_format == "delta" else version_writing
    kill_mid_write("ingest", config, any_writing(*(watch(path) for path in paths)))

    assert sum(debris(p, storage_format, c) for p, c in zip(paths, case.committed, strict=True))
    for path, before, version in zip(paths, case.before, case.versions, strict=True):
        assert_table_unchanged(spark, path, storage_format, before, version)
    ingest.run(spark, config)  # the rerun
    for got, expected in zip(ingest_tables(spark, config), case.expected, strict=True):
        assert_frame_equal(got, expected)
    FIGURES[f"ingest_{storage_format}"] += 1
    FIGURES["survived"] += 1


def published(path: Path | Location, storage_format: str) -> Callable[[], object]:
    """What changes when a table publishes a new version: its Delta commits, or the version its
    link names (Parquet)."""
    path = Path(path)  # a Location from the config, or a Path
    if storage_format == "delta":
        return lambda: set((path / "_delta_log").glob("*.json"))
    return path.resolve


def one_published_not_the_other(
    paths: Sequence[Path | Location], storage_format: str
) -> Callable[[], bool]:
    """True once exactly one of the two tables has published a new version."""
    states = [published(path, storage_format) for path in paths]
    before = [state() for state in states]

    def between() -> bool:
        changed = [state() != old for state, old in zip(states, before, strict=True)]
        assert not all(changed), "both tables published before the kill"
        return any(changed)

    return between


def pair_rows(spark: SparkSession, config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prices and rejects through the pair reader, each in a fixed order."""
    prices, rejects = ingest.read_ingest_pair(spark, config)
    return ordered_rows(prices), ordered_rows(rejects)


@pytest.mark.parametrize("storage_format", FORMATS)
def test_killing_ingest_between_its_two_tables_leaves_a_consistent_pair(
    spark: SparkSession, tmp_path: Path, storage_format: str
) -> None:
    """Ingest publishes rejects, then prices, which name their rejects: killed between the two,
    it leaves new rejects that no prices name, and the pair reader gives the previous run's
    pair, whose rows account for the previous raw files; a rerun gives the new pair."""
    case = ingest_case(spark, tmp_path, storage_format)
    config = case.config
    paths = (config.prices_path, config.rejects_path)
    # Many small files (the default records_per_file) make prices' publish last long enough
    # for the kill to land before it ends.
    kill_mid_write("ingest", config, one_published_not_the_other(paths, storage_format))

    for got, before in zip(pair_rows(spark, config), case.before, strict=True):
        assert_frame_equal(got, before)
    prices, rejects = ingest_tables(spark, config)  # the plain readers: proof of the timing
    assert prices.equals(case.before[0]) and rejects.equals(case.expected[1])
    ingest.run(spark, config)  # the rerun
    for got, expected in zip(pair_rows(spark, config), case.expected, strict=True):
        assert_frame_equal(got, expected)
    FIGURES[f"ingest_pair_{storage_format}"] += 1
    FIGURES["survived"] += 1


# --- features ----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage_format", FORMATS)
def test_killing_features_mid_write_keeps_the_previous_table(
    spark: SparkSession, tmp_path: Path, storage_format: str
) -> None:
    config = with_prices(spark, fresh_config(tmp_path / "run", storage_format))
    features.run(spark, config)  # the previous table: window 30
    before = table_rows(spark, Path(config.features_path), storage_format)
    version = delta_version(spark, Path(config.features_path))
    committed = data_files(Path(config.features_path))
    # What the interrupted job would have written (window 20), computed uninterrupted elsewhere.
    reference = replace(copy_data(config, tmp_path / "reference"), window=20)
    features.run(spark, reference)
    expected = table_rows(spark, reference.features_path, storage_format)
    assert not before.equals(expected)

    path = Path(config.features_path)
    writing = delta_writing(path) if storage_format == "delta" else version_writing(path)
    kill_mid_write("features", config, writing, "--window", "20")

    assert debris(path, storage_format, committed) > 0
    assert_table_unchanged(spark, path, storage_format, before, version)
    features.run(spark, replace(config, window=20))  # the rerun
    assert_frame_equal(table_rows(spark, path, storage_format), expected)
    FIGURES[f"features_{storage_format}"] += 1
    FIGURES["survived"] += 1


# --- train --------------------------------------------------------------------------------------


def probe_features(spark: SparkSession) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(11)
    x = np.column_stack([rng.uniform(1e4, 5e6, 200), rng.uniform(20, 200, 200)])
    frame = pd.DataFrame({"vol_moving_avg": x[:, 0], "adj_close_rolling_med": x[:, 1]})
    return frame, x


def spark_model_predictions(spark: SparkSession, model_dir: Path, frame: pd.DataFrame) -> list:
    model = PipelineModel.load(str(model_dir))
    rows = model.transform(spark.createDataFrame(frame)).select("prediction").collect()
    return [row["prediction"] for row in rows]


@dataclass(frozen=True)
class ModelSnapshot:
    resolved: Path
    metrics: bytes
    spark_predictions: list[float]
    served_predictions: list[float]


def snapshot_model(spark: SparkSession, model_dir: Path) -> ModelSnapshot:
    frame, x = probe_features(spark)
    return ModelSnapshot(
        Path(model_dir).resolve(),
        (model_dir / "metrics.json").read_bytes(),
        spark_model_predictions(spark, model_dir, frame),
        load_model(model_dir).predict(x).tolist(),
    )


def test_killing_train_mid_export_keeps_the_previous_model(
    spark: SparkSession, tmp_path: Path
) -> None:
    small = {"num_trees": 4, "max_depth": 3}
    config = with_features(spark, fresh_config(tmp_path / "run", "delta", **small))
    train.run(spark, config)  # the previous model
    before = snapshot_model(spark, Path(config.model_dir))
    new_params = {"num_trees": 40, "max_depth": 5, "seed": 7}
    reference = copy_data(config, tmp_path / "reference")
    reference = load_config(data_dir=reference.data_dir, storage_format="delta", **new_params)
    train.run(spark, reference)
    expected = snapshot_model(spark, reference.model_dir)
    assert expected.spark_predictions != before.spark_predictions

    args = ("--num-trees", "40", "--max-depth", "5", "--seed", "7")
    kill_mid_write("train", config, version_writing(Path(config.model_dir)), *args)

    assert new_version_files(Path(config.model_dir)), "no half-written model version left behind"
    assert snapshot_model(spark, Path(config.model_dir)) == before
    rerun = load_config(data_dir=Path(config.data_dir), storage_format="delta", **new_params)
    train.run(spark, rerun)
    after = snapshot_model(spark, Path(config.model_dir))
    assert after.spark_predictions == expected.spark_predictions
    assert after.served_predictions == expected.served_predictions
    # The killed run's debris and the replaced model stay until retention; at 0 hours only the
    # current version remains.
    retention.apply(spark, [("model", config.model_dir)], hours=0)
    assert list(versions_dir(Path(config.model_dir)).iterdir()) == [
        Path(config.model_dir).resolve()
    ]
    FIGURES["train_model"] += 1
    FIGURES["survived"] += 1
