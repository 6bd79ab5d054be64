"""The model on object storage: a real S3 server on loopback (the ``s3_bucket`` fixture), models
fitted by Spark, uploaded in the train job's layout (a version directory, then the pointer object
written by ``stockvol.location.publish_version``), served by gunicorn and the app with
``MODEL_DIR=s3a://...``; Spark's ``transform`` on the local copy is the oracle.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from flask import Flask
from test_serving_http import (  # noqa: F401 (model_dirs, probes, spark_says: its fixtures)
    ROOT,
    START_TIMEOUT,
    WITHOUT_SPARK,
    Server,
    assert_served_without_spark,
    gunicorn,
    model_dirs,
    predict_all,
    probes,
    spark_says,
)

import serving.forest
from serving.app import create_app, reload_model
from serving.forest import FEATURES, ModelStoreError, load_model
from stockvol.location import Location, new_version, publish_version

VMA, MED = FEATURES


def upload(model_dir: Path, target: Location) -> None:
    """Copy a saved model directory to object storage, file by file."""
    filesystem, path = target.arrow
    pafs.copy_files(
        str(model_dir),
        path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=filesystem,
    )


def publish(link: Location, model_dir: Path) -> Location:
    """What the train job does on object storage: a new version directory, then the pointer."""
    version = new_version(link)
    upload(model_dir, version)
    publish_version(link, version)
    return version


def wait_for_version(server: Server, version: str, streak: int = 10) -> None:
    """Until /health names ``version`` on ``streak`` answers in a row (every worker has it)."""
    seen, deadline = 0, time.monotonic() + START_TIMEOUT
    while seen < streak:
        assert time.monotonic() < deadline, server.log.read_text()
        seen = seen + 1 if server.get("/health")[1].get("version") == version else 0
        time.sleep(0.05)


def wait_for_log(server: Server, text: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while text not in server.log.read_text():
        assert time.monotonic() < deadline and server.process.poll() is None, server.log.read_text()
        time.sleep(0.1)
    return server.log.read_text()


def local_app_says(model_dir: Path, probes: np.ndarray) -> list[int]:
    """The answers of the app serving the same model from local disk."""
    client = create_app({"MODEL_DIR": str(model_dir)}).test_client()
    instances = [{VMA: a, MED: b} for a, b in probes.tolist()]
    return client.post("/predict", json={"instances": instances}).get_json()["predicted_volume"]


def test_gunicorn_serves_a_model_from_s3_and_a_hup_follows_the_pointer(
    s3_bucket: str,
    model_dirs: dict[int, Path],
    probes: np.ndarray,
    spark_says: dict[int, list[int]],
    tmp_path: Path,
) -> None:
    link = Location.parse(f"{s3_bucket}/prod/model")
    first = publish(link, model_dirs[2])
    with gunicorn(str(link), tmp_path / "gunicorn.log") as server:
        assert server.get("/health")[1]["version"] == first.name
        assert predict_all(server, probes) == spark_says[2] == local_app_says(model_dirs[2], probes)
        instances = [{VMA: a, MED: b} for a, b in probes.tolist()]
        assert (
            server.post("/predict", {"instances": instances})[1]["predicted_volume"]
            == (spark_says[2])
        )
        assert f"model loaded from {first}" in server.log.read_text()

        second = publish(link, model_dirs[8])
        assert predict_all(server, probes) == spark_says[2]  # loaded once, at start-up
        server.process.send_signal(signal.SIGHUP)
        wait_for_version(server, second.name)
        assert predict_all(server, probes) == spark_says[8] == local_app_says(model_dirs[8], probes)

        # A pointer to a version that is not there: the reload is refused, the model kept.
        link.write_text(".model.versions/20261204T000000Z-deadbeef\n")
        server.process.send_signal(signal.SIGHUP)
        log = wait_for_log(server, f"model reload from {link} failed, still serving {second}")
        assert "ModelNotFoundError: the pointer" in log
        wait_for_version(server, second.name)
        assert predict_all(server, probes) == spark_says[8]
        assert server.process.poll() is None


def served_version(app: Flask) -> str:
    response = app.test_client().get("/health")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["version"]


def test_the_app_reads_a_copied_prefix_or_a_pointer_and_keeps_its_model_on_refusals(
    s3_bucket: str,
    model_dirs: dict[int, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A model copied by hand to a prefix (no pointer): read as it is, with s3:// or s3a://.
    copied = Location.parse(f"{s3_bucket}/copied/model")
    upload(model_dirs[5], copied)
    for uri in (str(copied), str(copied).replace("s3a://", "s3://", 1)):
        app = create_app({"MODEL_DIR": uri})
        assert served_version(app) == "model"
        body = app.test_client().get("/model").get_json()
        assert body["forest"]["depth"] == 5 and s3_bucket.split("://")[1] not in json.dumps(body)
    x = np.array([[1e6, 30.0], [5e4, 2.0], [3e7, 150.0]])
    np.testing.assert_array_equal(
        load_model(str(copied)).predict(x), load_model(model_dirs[5]).predict(x)
    )

    # Nothing at the prefix: up and unhealthy, as without a local model.
    absent = create_app({"MODEL_DIR": f"{s3_bucket}/absent/model"})
    error = absent.test_client().get("/health").get_json()["error"]
    assert f"no model directory at {s3_bucket}/absent/model" in error

    link = Location.parse(f"{s3_bucket}/prod/model")
    first = publish(link, model_dirs[2])
    app = create_app({"MODEL_DIR": str(link)})
    assert served_version(app) == first.name
    assert app.extensions["stockvol.model"].model.info["resolved_dir"] == str(first)

    # Credentials the store refuses: the reload fails, the model stays, the secret is not logged.
    second = publish(link, model_dirs[8])
    secret = "wrong-secret-7c1e0b5f"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with caplog.at_level(logging.INFO, logger="serving"):
        assert reload_model(app) is False
    assert served_version(app) == first.name
    assert f"model reload from {link} failed, still serving {first}: ModelStoreError" in (
        caplog.text
    )
    assert secret not in caplog.text
    with pytest.raises(ModelStoreError, match="AWS_ACCESS_KEY_ID"):
        load_model(str(link))

    monkeypatch.undo()  # the right credentials again: the new version is served
    assert reload_model(app) is True
    assert served_version(app) == second.name


def test_a_pointer_rewritten_during_a_load_still_yields_one_whole_version(
    s3_bucket: str, model_dirs: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The train job may publish while the server reads: every file comes from the version the
    pointer named when the load began (the previous version stays for such readers)."""
    link = Location.parse(f"{s3_bucket}/prod/model")
    old = publish(link, model_dirs[2])
    new = new_version(link)
    upload(model_dirs[8], new)
    read_metadata = serving.forest._read_metadata

    def publish_after_first_read(store: serving.forest.ModelStore, directory: str) -> dict:
        metadata = read_metadata(store, directory)
        if link.read_text().strip().endswith(old.name):
            publish_version(link, new)
        return metadata

    monkeypatch.setattr(serving.forest, "_read_metadata", publish_after_first_read)
    model = load_model(str(link))
    assert link.read_text() == f".model.versions/{new.name}\n"  # the publish did happen mid-load
    assert model.info["resolved_dir"] == str(old)
    x = np.array([[1e6, 30.0], [5e4, 2.0], [3e7, 150.0]])
    np.testing.assert_array_equal(model.predict(x), load_model(model_dirs[2]).predict(x))


def test_serving_reads_object_storage_without_pyspark_or_the_pipeline_package(
    s3_bucket: str, model_dirs: dict[int, Path]
) -> None:
    link = Location.parse(f"{s3_bucket}/prod/model")
    publish(link, model_dirs[5])
    assert_served_without_spark(str(link))
