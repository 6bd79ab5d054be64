"""Where the server reads the model from: MODEL_DIR resolved once per load, as a directory, a
symlink or a pointer file (``.<name>.versions/<id>``, what the train job writes on object storage,
read here from local disk through the same pyarrow code path), and the refusals: a bad pointer, a
pointer to a missing version, an unsupported or credential-carrying URI, an unreachable store.

The real object-store tests (an S3 server on loopback) are in test_serving_s3.py.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from pyspark.sql import SparkSession
from test_serving_parity import spark_model_dirs

from serving.app import create_app, reload_model
from serving.forest import (
    ModelFormatError,
    ModelLocationError,
    ModelNotFoundError,
    ModelStoreError,
    display_location,
    load_model,
    main,
)

X = np.array([[1e6, 30.0], [5e4, 2.0], [3e7, 150.0], [0.0, 0.0]])


@pytest.fixture(scope="module")
def model_dirs(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return spark_model_dirs(spark, tmp_path_factory.getbasetemp())


def publish(parent: Path, model_dir: Path, version: str, name: str = "model") -> Path:
    """The object-store layout on local disk: a version directory, then the pointer file."""
    target = parent / f".{name}.versions" / version
    if not target.exists():
        shutil.copytree(model_dir, target)
    (parent / name).write_text(f".{name}.versions/{version}\n", encoding="utf-8")
    return target


def served_version(app: Flask) -> str:
    response = app.test_client().get("/health")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["version"]


def test_a_pointer_file_is_resolved_to_its_version(
    model_dirs: dict[int, Path], tmp_path: Path
) -> None:
    version = publish(tmp_path, model_dirs[2], "20261204T101010Z-0123abcd")
    model = load_model(tmp_path / "model")
    assert model.info["resolved_dir"] == str(version)
    assert model.info["model_dir"] == str(tmp_path / "model")
    np.testing.assert_array_equal(model.predict(X), load_model(model_dirs[2]).predict(X))


def test_a_reload_follows_the_pointer_and_keeps_the_model_when_it_is_broken(
    model_dirs: dict[int, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What gunicorn's master does on SIGHUP, with the object-store layout."""
    publish(tmp_path, model_dirs[2], "v1")
    app = create_app({"MODEL_DIR": str(tmp_path / "model")})
    assert served_version(app) == "v1"

    publish(tmp_path, model_dirs[8], "v2")
    assert served_version(app) == "v1"  # read once: nothing changes without a reload
    assert reload_model(app) is True
    assert served_version(app) == "v2"

    (tmp_path / "model").write_text(".model.versions/v3\n")  # a version that is not there
    with caplog.at_level(logging.ERROR, logger="serving"):
        assert reload_model(app) is False
    assert served_version(app) == "v2"
    assert "names .model.versions/v3, which is not at" in caplog.text
    assert "still serving" in caplog.text

    (tmp_path / "model").write_text("../elsewhere\n")
    assert reload_model(app) is False
    assert served_version(app) == "v2"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"../elsewhere\n",
        b".model.versions/../../etc\n",
        b".model.versions/..\n",
        b".model.versions/\n",
        b".model.versions/a/b\n",
        b".other.versions/v1\n",
        b"/abs/.model.versions/v1\n",
        b".model.versions/v1\nsecond line\n",
        b"\xff\xfe.model.versions/v1",
        b"x" * 5000,
    ],
    ids=lambda content: repr(content[:30]),
)
def test_a_bad_pointer_is_refused_naming_the_file(
    model_dirs: dict[int, Path], tmp_path: Path, content: bytes
) -> None:
    shutil.copytree(model_dirs[2], tmp_path / ".model.versions" / "v1")
    (tmp_path / "model").write_bytes(content)
    with pytest.raises(ModelFormatError, match="pointer") as refused:
        load_model(tmp_path / "model")
    assert str(tmp_path / "model") in str(refused.value)
    with pytest.raises(ModelFormatError):  # a server never starts on it
        create_app({"MODEL_DIR": str(tmp_path / "model")})


def test_a_pointer_to_a_missing_version_is_model_not_found(tmp_path: Path) -> None:
    (tmp_path / "model").write_text(".model.versions/20261204T101010Z-0123abcd\n")
    with pytest.raises(ModelNotFoundError, match="removed, or not published completely"):
        load_model(tmp_path / "model")
    response = create_app({"MODEL_DIR": str(tmp_path / "model")}).test_client().get("/health")
    assert response.status_code == 503
    assert ".model.versions/20261204T101010Z-0123abcd" in response.get_json()["error"]


def test_file_uris_and_the_check_command_take_a_pointer(
    model_dirs: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = publish(tmp_path, model_dirs[5], "v1")
    model = load_model(f"file://{tmp_path}/model")
    assert model.info["resolved_dir"] == str(version)
    assert main([f"file:{tmp_path}/model"]) == 0
    assert capsys.readouterr().out.count(str(version)) == 1
    (tmp_path / "model").write_text("nonsense\n")
    assert main([str(tmp_path / "model")]) == 1
    assert "ModelFormatError" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("gs://bucket/model", "unsupported scheme 'gs'"),
        ("hdfs://namenode/model", "unsupported scheme 'hdfs'"),
        ("s3a://AKIDEXAMPLE:wJalrXUtnFEMIK7MDENG@bucket/model", "credentials and options"),
        ("s3://bucket/model?secret_key=wJalrXUtnFEMIK7MDENG", "credentials and options"),
        ("s3a:///model", "no bucket"),
        ("file://otherhost/model", "local path only"),
    ],
)
def test_a_location_the_server_cannot_read_is_refused_without_its_credentials(
    location: str, reason: str
) -> None:
    with pytest.raises(ModelLocationError, match=reason) as refused:
        create_app({"MODEL_DIR": location})
    assert "wJalrXUtnFEMIK7MDENG" not in str(refused.value)
    assert "wJalrXUtnFEMIK7MDENG" not in display_location(location)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_store_is_a_503_at_start_and_keeps_the_model_on_reload(
    model_dirs: dict[int, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real S3 client against a closed loopback port: refused connections, bounded retries."""
    secret = "unreachable-store-secret-0d9f"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "serving-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    location = "s3a://models/prod/model"

    started = time.monotonic()
    with pytest.raises(ModelStoreError, match="cannot read s3a://models/prod/model") as refused:
        create_app({"MODEL_DIR": location, "MODEL_REQUIRED": True})
    assert time.monotonic() - started < 60  # the S3 client's retries are bounded (about 6 s)
    assert "AWS_ENDPOINT_URL" in str(refused.value) and secret not in str(refused.value)

    response = create_app({"MODEL_DIR": location}).test_client().get("/health")
    assert response.status_code == 503  # up and visibly unhealthy, as without a model
    assert "cannot read s3a://models/prod/model" in response.get_json()["error"]

    publish(tmp_path, model_dirs[2], "v1")
    app = create_app({"MODEL_DIR": str(tmp_path / "model")})
    app.config["MODEL_DIR"] = location  # as if the server had been pointed at the store
    with caplog.at_level(logging.INFO, logger="serving"):
        assert reload_model(app) is False
    assert served_version(app) == "v1"
    assert "model reload from s3a://models/prod/model failed, still serving" in caplog.text
    assert "ModelStoreError" in caplog.text
    assert secret not in caplog.text
