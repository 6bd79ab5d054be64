"""The whole pipeline with ``--data-dir s3a://...`` on a real S3 server (s3proxy on loopback):
the same raw files, the same ``prices``, ``rejects`` and ``features`` rows and the same model as
the same run on local disk, in both table formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pandas.testing import assert_frame_equal
from pyspark.ml import PipelineModel
from pyspark.sql import SparkSession

from stockvol import features, ingest, train
from stockvol.acquire import acquire, read_marker
from stockvol.config import Config, load_config
from stockvol.location import Location, current_version, resolve
from stockvol.storage import read_table
from tests.real_files import quirk_sample

ROOT = Path(__file__).resolve().parents[1]
# Fewer trees than the default: the comparison needs a model, not a good one.
MODEL = {"num_trees": 10, "max_depth": 4}
# What differs between two runs of the same data by design: where, when, how long.
RUN_SPECIFIC = ("lineage", "started_at", "finished_at", "durations_seconds")

pytestmark = pytest.mark.object_store


def run_pipeline(spark: SparkSession, data_dir: str | Path, storage_format: str) -> Config:
    config = load_config(data_dir=data_dir, storage_format=storage_format, **MODEL)
    acquire(config, source=str(quirk_sample()))
    for stage in (ingest.run, features.run, train.run):
        stage(spark, config)
    return config


def table(spark: SparkSession, config: Config, name: str) -> pd.DataFrame:
    path = {"prices": config.prices_path, "rejects": config.rejects_path}.get(
        name, config.features_path
    )
    frame = read_table(spark, path, config.storage_format)
    return frame.orderBy(*frame.columns).toPandas()


def pair(spark: SparkSession, config: Config) -> list[pd.DataFrame]:
    """Prices and rejects through the pair reader, each in a fixed order."""
    return [df.orderBy(*df.columns).toPandas() for df in ingest.read_ingest_pair(spark, config)]


def metrics(config: Config) -> dict:
    found = json.loads((resolve(config.model_dir) / "metrics.json").read_text())
    return {key: value for key, value in found.items() if key not in RUN_SPECIFIC}


def predictions(spark: SparkSession, config: Config) -> list[float]:
    model = PipelineModel.load(str(resolve(config.model_dir)))
    features = read_table(spark, config.features_path, config.storage_format).dropna()
    probe = features.orderBy("Symbol", "Date").limit(500)
    return [row.prediction for row in model.transform(probe).select("prediction").collect()]


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_the_pipeline_on_s3_equals_the_pipeline_on_local_disk(
    spark: SparkSession, s3_bucket: str, tmp_path: Path, storage_format: str
) -> None:
    local = run_pipeline(spark, tmp_path / "data", storage_format)
    remote = run_pipeline(spark, f"{s3_bucket}/run1", storage_format)

    assert not remote.data_dir.is_local
    assert read_marker(resolve(remote.raw_dir))["files"] == read_marker(local.raw_dir)["files"]
    for name in ("prices", "rejects", "features"):
        expected = table(spark, local, name)
        assert len(expected) > 0 or name == "rejects"
        assert_frame_equal(table(spark, remote, name), expected, check_exact=True)
    for got, expected in zip(pair(spark, remote), pair(spark, local), strict=True):
        assert_frame_equal(got, expected, check_exact=True)
    assert metrics(remote) == metrics(local)
    assert predictions(spark, remote) == predictions(spark, local)
    # Nothing local stands in for the bucket: the model and (Parquet) tables are pointer objects.
    assert current_version(remote.model_dir) is not None
    if storage_format == "parquet":
        assert current_version(remote.features_path).parent.name == ".features.versions"


def test_a_second_acquire_on_s3_skips_and_force_publishes_a_new_raw_version(
    s3_bucket: str,
) -> None:
    config = load_config(data_dir=f"{s3_bucket}/acquire")
    acquire(config, source=str(quirk_sample()))
    first = current_version(config.raw_dir)
    assert first is not None and (first / "symbols_valid_meta.csv").is_file()
    skipped = acquire(config, source=str(quirk_sample()))
    assert skipped.details["skipped"] and current_version(config.raw_dir) == first
    acquire(config, source=str(quirk_sample()), force=True)
    second = current_version(config.raw_dir)
    assert second != first
    assert (second / "stocks" / "KO.csv").read_bytes() == (first / "stocks" / "KO.csv").read_bytes()


def test_the_download_job_writes_to_the_bucket_not_a_local_folder_named_s3a(
    s3_bucket: str, tmp_path: Path
) -> None:
    data_dir = f"{s3_bucket}/cli"
    command = [sys.executable, str(ROOT / "jobs" / "download.py"), "--data-dir", data_dir]
    done = subprocess.run(
        [*command, "--source", "real"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.listdir(tmp_path) == []
    raw = resolve(Location.parse(data_dir) / "raw")
    assert len((raw / "stocks").child_names()) + len((raw / "etfs").child_names()) == 52


def test_a_missing_bucket_is_one_clear_line(s3_bucket: str, tmp_path: Path) -> None:
    missing = s3_bucket.replace("s3a://", "s3a://no-such-") + "/run"
    command = [sys.executable, str(ROOT / "jobs" / "download.py"), "--data-dir", missing]
    done = subprocess.run(
        [*command, "--source", "real"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert f"cannot write {missing}/raw" in done.stdout
