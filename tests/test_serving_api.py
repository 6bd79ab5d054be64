"""The Flask API through its test client: predictions against Spark, every validation case, JSON
errors, health with and without a model, /model, the OpenAPI document, and no 5xx on any input."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pyspark.ml import Pipeline
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.regression import RandomForestRegressor
from pyspark.sql import SparkSession
from test_serving_parity import spark_model_dirs, spark_predictions
from werkzeug.test import TestResponse

from serving.app import create_app, reload_model
from serving.forest import FEATURES, ModelFormatError, ModelNotFoundError
from stockvol.schema import VOLUME

VMA, MED = FEATURES
# Valid spellings and the values they mean: each is predicted by Spark too.
VALID = {
    "1250000.5": 1250000.5,
    "0": 0.0,
    "-0": 0.0,
    "+5": 5.0,
    ".5": 0.5,
    "5.": 5.0,
    "0001": 1.0,
    "1E3": 1000.0,
    "1e308": 1e308,
    "2.5e-320": 2.5e-320,
}


@pytest.fixture(scope="module")
def model_dirs(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return spark_model_dirs(spark, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def model_dir(model_dirs: dict[int, Path]) -> Path:
    return model_dirs[5]


@pytest.fixture(scope="module")
def points() -> np.ndarray:
    """Query points: every VALID value against a typical other feature, plus random rows."""
    rng = np.random.default_rng(3)
    valid = np.array(list(VALID.values()))
    return np.vstack(
        [
            np.column_stack([valid, np.full(valid.size, 42.25)]),
            np.column_stack([np.full(valid.size, 1250000.5), valid]),
            np.column_stack([rng.lognormal(13, 2, 300), rng.lognormal(3.5, 1.5, 300)]),
        ]
    )


@pytest.fixture(scope="module")
def spark_says(spark: SparkSession, model_dir: Path, points: np.ndarray) -> dict[tuple, float]:
    """(vol_moving_avg, adj_close_rolling_med) -> Spark's prediction: the oracle."""
    predictions = spark_predictions(spark, model_dir, points)
    return {(a, b): p for (a, b), p in zip(points.tolist(), predictions.tolist(), strict=True)}


@pytest.fixture(scope="module")
def app(model_dir: Path) -> Flask:
    return create_app({"MODEL_DIR": str(model_dir), "TESTING": True})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def no_model_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    return create_app({"MODEL_DIR": str(tmp_path_factory.mktemp("empty") / "model")})


def documented(app: Flask, response: TestResponse, path: str, method: str) -> Any:
    """Check the response against the OpenAPI document's schema for it; return the JSON body."""
    document = app.extensions["stockvol.openapi"]
    responses = document["paths"][path][method.lower()]["responses"]
    assert str(response.status_code) in responses, f"{response.status_code} not documented"
    schema = responses[str(response.status_code)]["content"]["application/json"]["schema"]
    body = response.get_json()
    Draft202012Validator({**schema, "components": document["components"]}).validate(body)
    return body


def expect_error(app: Flask, response: TestResponse, status: int, parameter: str | None) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["status"] == status
    assert body.get("parameter") == parameter
    return body["error"]


# --- GET /predict -----------------------------------------------------------------------------


def test_get_predicts_what_spark_predicts(
    app: Flask, client: FlaskClient, points: np.ndarray, spark_says: dict
) -> None:
    for a, b in points[-300:].tolist():
        response = client.get("/predict", query_string={VMA: repr(a), MED: repr(b)})
        body = documented(app, response, "/predict", "GET")
        expected = spark_says[(a, b)]
        assert body == {"predicted_volume": int(np.rint(expected)), VMA: a, MED: b}
        assert abs(body["predicted_volume"] - expected) <= 0.5


@pytest.mark.parametrize("text", VALID)
def test_every_valid_spelling_is_parsed_to_its_value(
    app: Flask, client: FlaskClient, spark_says: dict, text: str
) -> None:
    for query, point in (
        ({VMA: text, MED: "42.25"}, (VALID[text], 42.25)),
        ({VMA: "1250000.5", MED: text}, (1250000.5, VALID[text])),
    ):
        body = documented(app, client.get("/predict", query_string=query), "/predict", "GET")
        assert (body[VMA], body[MED]) == point
        assert body["predicted_volume"] == int(np.rint(spark_says[point]))


INVALID_GETS = [
    (f"{MED}=1", VMA, "missing"),
    (f"{VMA}=1", MED, "missing"),
    ("", VMA, "missing"),
    (f"{VMA}=1&{VMA}=2&{MED}=1", VMA, "2 times"),
    (f"{VMA}=1&{MED}=1&{MED}=1", MED, "2 times"),
    (f"{VMA}=&{MED}=1", VMA, "empty"),
    (f"{VMA}&{MED}=1", VMA, "empty"),
    (f"{VMA}=1&{MED}=", MED, "empty"),
    *(
        (f"{VMA}={value}&{MED}=1", VMA, "finite decimal number")
        for value in [
            "abc",
            "1%2C5",
            "0x1A",
            "1_000",
            "%201",
            "1%20",
            "%D9%A1",
            "1e",
            "--1",
            "1.2.3",
            "true",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "Infinity",
            "%2Binf",
        ]
    ),
    (f"{VMA}=1&{MED}=nan", MED, "finite decimal number"),
    (f"{VMA}=1e999&{MED}=1", VMA, "out of range"),
    (f"{VMA}=1&{MED}=-1e999", MED, "out of range"),
    (f"{VMA}=-1&{MED}=1", VMA, ">= 0"),
    (f"{VMA}=1&{MED}=-1e-300", MED, ">= 0"),
    (f"{VMA}={'1' * 65}&{MED}=1", VMA, "too long"),
    (f"{VMA}=1&{MED}={'9' * 4000}", MED, "too long"),  # a longer query string is a 414
    (f"{VMA}=1&{MED}=1&extra=2", "extra", "unknown parameter"),
    (f"Vol_Moving_Avg=1&{MED}=1", "Vol_Moving_Avg", "unknown parameter"),
]


@pytest.mark.parametrize(("query", "parameter", "message"), INVALID_GETS)
def test_invalid_query_is_a_400_naming_the_parameter(
    app: Flask, client: FlaskClient, query: str, parameter: str, message: str
) -> None:
    response = client.get(f"/predict?{query}")
    assert message in expect_error(app, response, 400, parameter)
    documented(app, response, "/predict", "GET")


def test_the_number_length_limit_is_configurable(model_dir: Path) -> None:
    client = create_app({"MODEL_DIR": str(model_dir), "MAX_NUMBER_LENGTH": 3}).test_client()
    assert client.get(f"/predict?{VMA}=123&{MED}=1").status_code == 200
    assert client.get(f"/predict?{VMA}=1234&{MED}=1").status_code == 400


# --- POST /predict ----------------------------------------------------------------------------


def instances(rows: np.ndarray | list) -> dict[str, Any]:
    return {"instances": [{VMA: a, MED: b} for a, b in np.asarray(rows).tolist()]}


def test_batch_predicts_what_spark_predicts(
    app: Flask, client: FlaskClient, points: np.ndarray, spark_says: dict
) -> None:
    response = client.post("/predict", json=instances(points))
    body = documented(app, response, "/predict", "POST")
    expected = [int(np.rint(spark_says[(a, b)])) for a, b in points.tolist()]
    assert body == {"predicted_volume": expected, "count": len(points)}


def test_batch_accepts_integers_and_negative_zero(
    app: Flask, client: FlaskClient, spark_says: dict
) -> None:
    payload = {"instances": [{VMA: 1000, MED: 42.25}, {VMA: -0.0, MED: 42.25}]}
    body = documented(app, client.post("/predict", json=payload), "/predict", "POST")
    assert body["predicted_volume"] == [
        int(np.rint(spark_says[(1000.0, 42.25)])),
        int(np.rint(spark_says[(0.0, 42.25)])),
    ]


def test_batch_size_is_bounded(model_dir: Path) -> None:
    app = create_app({"MODEL_DIR": str(model_dir), "MAX_BATCH": 5})
    client = app.test_client()
    rows = np.full((6, 2), 10.0)
    assert client.post("/predict", json=instances(rows[:5])).get_json()["count"] == 5
    response = client.post("/predict", json=instances(rows))
    assert "at most 5" in expect_error(app, response, 400, "instances")
    assert (
        app.extensions["stockvol.openapi"]["components"]["schemas"]["BatchRequest"]["properties"][
            "instances"
        ]["maxItems"]
        == 5
    )


GOOD = f'{{"{VMA}": 1.5, "{MED}": 2}}'
INVALID_BODIES = [
    ("not json", "body", "not valid JSON"),
    ("[" * 100_000, "body", "not valid JSON"),
    ('{"instances": [1]', "body", "not valid JSON"),
    ("[]", "instances", "JSON object"),
    ("null", "instances", "JSON object"),
    ('"instances"', "instances", "JSON object"),
    ("{}", "instances", "JSON object"),
    ('{"instances": []}', "instances", "non-empty list"),
    ('{"instances": {}}', "instances", "non-empty list"),
    ('{"instances": null}', "instances", "non-empty list"),
    (f'{{"instances": [{GOOD}], "extra": 1}}', "extra", "unknown field"),
    ('{"instances": [1]}', "instances[0]", "must be an object"),
    ('{"instances": [[1, 2]]}', "instances[0]", "must be an object"),
    (f'{{"instances": [{{"{VMA}": 1}}]}}', "instances[0]", f"lacks {MED}"),
    (f'{{"instances": [{GOOD}, {{"{MED}": 1}}]}}', "instances[1]", f"lacks {VMA}"),
    (f'{{"instances": [{{"{VMA}": 1, "{MED}": 2, "x": 3}}]}}', "instances[0]", "unknown field"),
    *(
        (f'{{"instances": [{GOOD}, {{"{VMA}": {value}, "{MED}": 2}}]}}', f"instances[1].{VMA}", msg)
        for value, msg in [
            ('"1"', "JSON number"),
            ("true", "JSON number"),
            ("null", "JSON number"),
            ("[1]", "JSON number"),
            ('{"a": 1}', "JSON number"),
            ("NaN", "finite"),
            ("Infinity", "finite"),
            ("-Infinity", "finite"),
            ("1e999", "finite"),
            ("1" + "0" * 400, "out of range"),
            ("-1", ">= 0"),
            ("-5e-324", ">= 0"),
        ]
    ),
    (f'{{"instances": [{{"{VMA}": 1, "{MED}": -2.5}}]}}', f"instances[0].{MED}", ">= 0"),
]


@pytest.mark.parametrize(("body", "parameter", "message"), INVALID_BODIES)
def test_invalid_batch_is_a_400_naming_the_field(
    app: Flask, client: FlaskClient, body: str, parameter: str, message: str
) -> None:
    response = client.post("/predict", data=body, content_type="application/json")
    assert message in expect_error(app, response, 400, parameter)
    documented(app, response, "/predict", "POST")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_batch_must_be_sent_as_json(
    app: Flask, client: FlaskClient, content_type: str | None
) -> None:
    response = client.post(
        "/predict", data=json.dumps(instances([[1, 2]])), content_type=content_type
    )
    assert "application/json" in expect_error(app, response, 415, None)
    documented(app, response, "/predict", "POST")


def test_request_body_size_is_limited(model_dir: Path) -> None:
    app = create_app({"MODEL_DIR": str(model_dir), "MAX_CONTENT_LENGTH": 1000})
    client = app.test_client()
    assert client.post("/predict", json=instances(np.ones((10, 2)))).status_code == 200
    response = client.post("/predict", json=instances(np.ones((100, 2))))
    expect_error(app, response, 413, None)
    documented(app, response, "/predict", "POST")


def test_a_chunked_body_is_limited_too(model_dir: Path) -> None:
    """No Content-Length: the app counts the bytes; exactly the limit passes, one more is a 413."""
    app = create_app({"MODEL_DIR": str(model_dir), "MAX_CONTENT_LENGTH": 1000})
    payload = json.dumps(instances(np.ones((10, 2)))).encode()
    for size, status in ((1000, 200), (1001, 413)):
        response = app.test_client().post(
            "/predict",
            input_stream=io.BytesIO(payload + b" " * (size - len(payload))),
            content_type="application/json",
            # What gunicorn gives the app for a chunked body: no length, a stream it ends.
            headers={"Transfer-Encoding": "chunked"},
            environ_overrides={"wsgi.input_terminated": True},
        )
        assert response.status_code == status, response.get_data(as_text=True)
        documented(app, response, "/predict", "POST")


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/predict"), ("POST", "/predict"), ("GET", "/health")]
)
def test_a_query_string_over_the_limit_is_a_json_414(
    app: Flask, client: FlaskClient, method: str, path: str
) -> None:
    limit = app.config["MAX_QUERY_LENGTH"]
    response = client.open(path, method=method, query_string="x" * limit)
    assert response.status_code != 414
    response = client.open(path, method=method, query_string="x" * (limit + 1))
    assert f"at most {limit}" in expect_error(app, response, 414, None)
    documented(app, response, path, method)


# --- errors, health, model, OpenAPI ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/nope", "/predict/1", "/predict.json", "/Health"])
def test_unknown_routes_are_json_404(app: Flask, client: FlaskClient, path: str) -> None:
    expect_error(app, client.get(path), 404, None)


@pytest.mark.parametrize(
    ("method", "path"),
    [("put", "/predict"), ("delete", "/predict"), ("post", "/health"), ("patch", "/model")],
)
def test_wrong_methods_are_json_405_with_allow(
    app: Flask, client: FlaskClient, method: str, path: str
) -> None:
    response = getattr(client, method)(path)
    expect_error(app, response, 405, None)
    assert "GET" in response.headers["Allow"]


def test_unexpected_errors_are_a_json_500_without_details(model_dir: Path) -> None:
    app = create_app({"MODEL_DIR": str(model_dir)})

    def boom() -> str:
        raise RuntimeError("secret internals")

    app.add_url_rule("/boom", view_func=boom)
    response = app.test_client().get("/boom")
    assert expect_error(app, response, 500, None) == "internal server error"
    assert b"secret" not in response.data


def test_health_is_200_with_a_model(app: Flask, client: FlaskClient, model_dir: Path) -> None:
    body = documented(app, client.get("/health"), "/health", "GET")
    assert body["status"] == "ok"
    assert body["version"] == model_dir.resolve().name
    assert client.head("/health").status_code == 200


def test_without_a_model_health_and_predictions_are_503(no_model_app: Flask) -> None:
    client = no_model_app.test_client()
    response = client.get("/health")
    body = documented(no_model_app, response, "/health", "GET")
    assert response.status_code == 503
    assert "no model directory" in body["error"] and "make train" in body["error"]
    for response, method in (
        (client.get(f"/predict?{VMA}=1&{MED}=1"), "GET"),
        (client.post("/predict", json=instances([[1, 1]])), "POST"),
    ):
        assert "no model loaded" in expect_error(no_model_app, response, 503, None)
        documented(no_model_app, response, "/predict", method)
    expect_error(no_model_app, client.get("/model"), 503, None)
    assert client.get("/openapi.json").status_code == 200


def test_health_goes_from_503_to_200_once_a_model_is_there(model_dir: Path, tmp_path: Path) -> None:
    """Loaded once at start-up: a model appearing later is served after a reload or restart."""
    target = tmp_path / "model"
    before = create_app({"MODEL_DIR": str(target)})
    shutil.copytree(model_dir, target)
    assert before.test_client().get("/health").status_code == 503
    assert create_app({"MODEL_DIR": str(target)}).test_client().get("/health").status_code == 200


def test_a_reload_swaps_a_valid_model_in_and_keeps_the_model_otherwise(
    model_dirs: dict[int, Path], tmp_path: Path
) -> None:
    """What gunicorn's master does on SIGHUP (serving/gunicorn.conf.py)."""
    link = tmp_path / "model"
    link.symlink_to(model_dirs[2])
    app = create_app({"MODEL_DIR": str(link)})

    def served() -> str:
        return documented(app, app.test_client().get("/health"), "/health", "GET")["version"]

    def point_to(target: Path) -> None:
        staged = tmp_path / "model.new"
        staged.symlink_to(target)
        os.replace(staged, link)

    (tmp_path / "empty").mkdir()
    for broken in (tmp_path / "empty", tmp_path / "absent"):
        point_to(broken)
        assert reload_model(app) is False
        assert served() == model_dirs[2].resolve().name
    point_to(model_dirs[8])
    assert reload_model(app) is True
    assert served() == model_dirs[8].resolve().name


def test_model_required_refuses_to_start_without_one(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        create_app({"MODEL_DIR": str(tmp_path / "absent"), "MODEL_REQUIRED": True})


def test_an_invalid_model_directory_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "model" / "metadata").mkdir(parents=True)
    with pytest.raises(ModelFormatError, match="metadata"):
        create_app({"MODEL_DIR": str(tmp_path / "model")})


def test_environment_configures_the_app(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    monkeypatch.setenv("SERVING_MAX_BATCH", "7")
    app = create_app()
    assert app.config["MAX_BATCH"] == 7
    assert app.test_client().get("/health").get_json()["version"] == model_dir.resolve().name


def test_model_reports_stages_metrics_and_lineage_but_no_host_detail(
    model_dir: Path, tmp_path: Path
) -> None:
    """/model and /health are public: the version's name, not the paths of this host or of the
    training host, and not the Spark master's address."""
    versions = tmp_path / ".model.versions" / "v1"
    shutil.copytree(model_dir, versions)
    metrics = {
        "test": {"rmse": 12.5, "r2": 0.5},
        "lineage": {
            "features_path": "/home/alice/stockvol/data/lake/features",
            "format": "delta",
            "delta_version": 3,
            "parquet_version": "s3a://bucket/prefix/lake/.features.versions/v7",
            "spark_master": "spark://10.1.2.3:7077",
        },
        "finished_at": "2026-01-02T03:04:05+00:00",
    }
    (versions / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "model").symlink_to(versions)
    app = create_app({"MODEL_DIR": str(tmp_path / "model")})
    response = app.test_client().get("/model")
    body = documented(app, response, "/model", "GET")
    assert body["metrics"] == {
        **metrics,
        "lineage": {
            "features_path": "features",
            "format": "delta",
            "delta_version": 3,
            "parquet_version": "v7",
        },
    }
    assert body["metrics_error"] is None
    assert body["training_data"]["delta_version"] == 3
    assert body["training_data"]["features_path"] == "features"
    assert body["training_data"]["finished_at"] == metrics["finished_at"]
    assert body["version"] == "v1"
    health = app.test_client().get("/health")
    for text in (response.get_data(as_text=True), health.get_data(as_text=True)):
        for detail in (str(tmp_path), "/home/alice", "s3a://", "10.1.2.3", "spark://"):
            assert detail not in text
    assert [stage["class"].rsplit(".", 1)[1] for stage in body["stages"]] == [
        "VectorAssembler",
        "RandomForestRegressionModel",
    ]
    params = body["stages"][1]["params"]
    assert (params["numTrees"], params["maxDepth"], params["labelCol"]) == (100, 5, "Volume")
    assert body["forest"]["num_trees"] == 100 and body["forest"]["evaluator"] == "grid"
    assert body["trained_at"].startswith("20")


def test_model_without_or_with_broken_metrics_says_why(
    app: Flask, client: FlaskClient, model_dir: Path, tmp_path: Path
) -> None:
    body = documented(app, client.get("/model"), "/model", "GET")
    assert body["metrics"] is None and "not found" in body["metrics_error"]
    assert str(model_dir.resolve()) not in body["metrics_error"]
    shutil.copytree(model_dir, tmp_path / "model")
    (tmp_path / "model" / "metrics.json").write_text("{half")
    broken = create_app({"MODEL_DIR": str(tmp_path / "model")}).test_client().get("/model")
    assert "not readable JSON" in broken.get_json()["metrics_error"]


def test_openapi_documents_exactly_the_routes(app: Flask, client: FlaskClient) -> None:
    document = documented(app, client.get("/openapi.json"), "/openapi.json", "GET")
    assert document["openapi"].startswith("3.1")
    routes = {
        (rule.rule, method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    paths = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert routes == paths
    for schema in document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


# --- properties ---------------------------------------------------------------------------------

KEYS = st.sampled_from([VMA, MED, "", "x", f"{VMA}[]", VMA.upper()]) | st.text(max_size=12)
VALUES = (
    st.text(max_size=40)
    | st.floats().map(repr)
    | st.integers().map(str)
    | st.sampled_from(["nan", "-0", "1e999", "-1", "0x10", "١", "1e-400", "+.5e-3", ""])
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEYS, VALUES), max_size=6))
def test_no_query_string_yields_a_5xx(app: Flask, pairs: list[tuple[str, str]]) -> None:
    response = app.test_client().get(f"/predict?{urlencode(pairs)}")
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    documented(app, response, "/predict", "GET")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=60))
def test_no_raw_query_string_yields_a_5xx(app: Flask, raw: str) -> None:
    response = app.test_client().get("/predict", query_string=raw.replace("#", "%23"))
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    assert response.mimetype == "application/json"


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
INSTANCE = st.fixed_dictionaries({VMA: JSON, MED: JSON}) | JSON


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON, st.fixed_dictionaries({"instances": st.lists(INSTANCE, max_size=4) | JSON})))
def test_no_json_body_yields_a_5xx(app: Flask, payload: Any) -> None:
    body = json.dumps(payload)
    response = app.test_client().post("/predict", data=body, content_type="application/json")
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    documented(app, response, "/predict", "POST")


# Leaves of exactly k + 0.5: the API's rounding meets a tie on every one.
TIES = (0.5, 1.5, 2.5, 3.5)


def test_ties_round_to_even_alike_for_one_row_and_a_batch(
    spark: SparkSession, tmp_path: Path
) -> None:
    """A real forest whose every leaf is k + 0.5 (one label per vol_moving_avg band, splits on
    every feature allowed, so each leaf is pure): GET (Python's round) and POST (numpy's rint)
    must both round ties to even, as the docs say. int(x + 0.5) would give 1, 2, 3, 4."""
    rng = np.random.default_rng(8)
    bands = np.repeat(np.arange(len(TIES)), 200)
    vma = 1000.0 + 2000.0 * bands + rng.uniform(0, 1000, bands.size)  # gaps between the bands
    frame = pd.DataFrame(
        {VMA: vma, MED: rng.uniform(1, 100, bands.size), VOLUME: np.take(TIES, bands)}
    )
    forest = RandomForestRegressor(
        labelCol=VOLUME, numTrees=5, maxDepth=3, featureSubsetStrategy="all", seed=3
    )
    assembler = VectorAssembler(inputCols=list(FEATURES), outputCol="features")
    Pipeline(stages=[assembler, forest]).fit(spark.createDataFrame(frame)).write().save(
        str(tmp_path / "model")
    )
    points = np.column_stack([1500.0 + 2000.0 * np.arange(len(TIES)), np.full(len(TIES), 50.0)])
    assert spark_predictions(spark, tmp_path / "model", points).tolist() == list(TIES)

    client = create_app({"MODEL_DIR": str(tmp_path / "model")}).test_client()
    one_row = [
        client.get("/predict", query_string={VMA: repr(a), MED: repr(b)}).get_json()
        for a, b in points.tolist()
    ]
    batch = client.post(
        "/predict", json={"instances": [{VMA: a, MED: b} for a, b in points.tolist()]}
    ).get_json()
    assert [body["predicted_volume"] for body in one_row] == [0, 2, 2, 4]
    assert batch["predicted_volume"] == [0, 2, 2, 4]


@settings(max_examples=200, deadline=None)
@given(
    st.floats(min_value=0, max_value=1e300, allow_nan=False),
    st.floats(min_value=0, max_value=1e300, allow_nan=False),
)
def test_one_row_and_batch_paths_agree(app: Flask, a: float, b: float) -> None:
    client = app.test_client()
    one = client.get("/predict", query_string={VMA: repr(a), MED: repr(b)}).get_json()
    batch = client.post("/predict", json={"instances": [{VMA: a, MED: b}]}).get_json()
    assert [one["predicted_volume"]] == batch["predicted_volume"]
