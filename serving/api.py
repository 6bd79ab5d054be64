"""The routes: /predict (GET one row, POST a batch), /health, /model, /openapi.json."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge, UnsupportedMediaType

from serving.forest import FEATURES, ServingModel

api = Blueprint("api", __name__)
STATE_KEY = "stockvol.model"

_FEATURE_SET = frozenset(FEATURES)
_EXPECTED = " and ".join(FEATURES)
# Plain decimal notation only: no nan/inf spellings, hex, underscores, spaces or non-ASCII digits,
# all of which Python's float() would accept.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class ModelState:
    """What the routes serve: the loaded model, or why there is none."""

    model: ServingModel | None
    error: str | None = None


def error_response(status: int, message: str, parameter: str | None = None) -> Response:
    """The JSON body of every error: ``{"error": ..., "status": ..., ["parameter": ...]}``."""
    body: dict[str, Any] = {"error": message, "status": status}
    if parameter is not None:
        body["parameter"] = parameter
    return Response(json.dumps(body), status=status, mimetype="application/json")


class InvalidInput(ValueError):
    """A request parameter is unusable; ``parameter`` names it. Answered with 400."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


class NoModel(RuntimeError):
    """No model is loaded. Answered with 503."""


@api.errorhandler(InvalidInput)
def _invalid_input(err: InvalidInput) -> Response:
    return error_response(400, str(err), err.parameter)


@api.errorhandler(NoModel)
def _no_model(err: NoModel) -> Response:
    return error_response(503, str(err))


def _state() -> ModelState:
    return current_app.extensions[STATE_KEY]


def _model() -> ServingModel:
    state = _state()
    if state.model is None:
        raise NoModel(f"no model loaded: {state.error}")
    return state.model


def _checked(name: str, value: float) -> float:
    """A finite, non-negative value; -0.0 becomes 0.0."""
    if not math.isfinite(value):
        raise InvalidInput(name, f"{name} is out of range: it must be a finite number")
    if value < 0:
        raise InvalidInput(name, f"{name} must be >= 0, got {value!r}")
    return value + 0.0


def parse_number(name: str, text: str, max_length: int) -> float:
    """One query-string value as a float, or ``InvalidInput`` saying what is wrong with it."""
    if not text:
        raise InvalidInput(name, f"{name} is empty: give a number")
    if len(text) > max_length:
        raise InvalidInput(
            name, f"{name} is too long: {len(text)} characters, at most {max_length}"
        )
    if not _NUMBER.fullmatch(text):
        raise InvalidInput(name, f"{name} must be a finite decimal number, got {text!r}")
    return _checked(name, float(text))


@api.get("/predict")
def predict_one() -> dict[str, Any]:
    """``?vol_moving_avg=<number>&adj_close_rolling_med=<number>`` -> one predicted volume."""
    model = _model()
    args = request.args
    for name in args:
        if name not in _FEATURE_SET:
            shown = name[: current_app.config["MAX_NUMBER_LENGTH"]]
            raise InvalidInput(shown, f"unknown parameter {shown!r}: expected {_EXPECTED}")
    max_length = current_app.config["MAX_NUMBER_LENGTH"]
    values = []
    for name in FEATURES:
        given = args.getlist(name)
        if not given:
            raise InvalidInput(name, f"{name} is missing: expected {_EXPECTED}")
        if len(given) > 1:
            raise InvalidInput(name, f"{name} is given {len(given)} times: give it once")
        values.append(parse_number(name, given[0], max_length))
    prediction = model.predict_one(values[0], values[1])
    # round(): nearest integer, ties to even, as np.rint does for batches.
    return {"predicted_volume": round(prediction), FEATURES[0]: values[0], FEATURES[1]: values[1]}


@api.post("/predict")
def predict_batch() -> dict[str, Any]:
    """``{"instances": [{"vol_moving_avg": .., "adj_close_rolling_med": ..}, ...]}`` -> volumes."""
    model = _model()
    x = _instances(_json_body())
    predictions = model.predict(x)
    return {"predicted_volume": np.rint(predictions).astype(np.int64).tolist(), "count": len(x)}


def _json_body() -> Any:
    if not request.is_json:
        raise UnsupportedMediaType("send the instances as JSON (Content-Type: application/json)")
    # json.loads is called here rather than through request.get_json() so that deeply nested
    # input (RecursionError) is a 400 too.
    body = _body()
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:
        message = str(err) if isinstance(err, ValueError) else "nested too deeply"
        raise InvalidInput("body", f"the request body is not valid JSON: {message}") from None


def _body() -> bytes:
    """The request body; 413 when it is longer than MAX_CONTENT_LENGTH."""
    limit = request.max_content_length
    unsized = request.content_length is None and request.environ.get("wsgi.input_terminated")
    if limit is None or not unsized:
        # werkzeug refuses a Content-Length over the limit before reading anything (and reads
        # nothing when there is neither a length nor a server that ends the stream).
        return request.get_data(cache=False)
    # A chunked body (no Content-Length): werkzeug's stream stops at the limit without an error,
    # and the cut-off prefix would be parsed. So read the server's stream (gunicorn ends it with
    # the body) up to one byte past the limit: that byte, if it comes, makes it a 413.
    stream = request.environ["wsgi.input"]
    body = bytearray()
    while len(body) <= limit:
        chunk = stream.read(min(65536, limit + 1 - len(body)))
        if not chunk:
            return bytes(body)
        body += chunk
    raise RequestEntityTooLarge(f"the request body is longer than {limit} bytes")


def _instances(payload: Any) -> np.ndarray:
    """Validate the batch and return it as an (n, 2) float64 array in FEATURES order."""
    if not isinstance(payload, dict) or "instances" not in payload:
        raise InvalidInput("instances", 'the body must be a JSON object {"instances": [...]}')
    extra = sorted(set(payload) - {"instances"})
    if extra:
        shown = extra[0][:64]
        raise InvalidInput(shown, f"unknown field {shown!r}: the body holds only instances")
    instances = payload["instances"]
    max_batch = current_app.config["MAX_BATCH"]
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("instances", "instances must be a non-empty list of objects")
    if len(instances) > max_batch:
        raise InvalidInput(
            "instances", f"instances holds {len(instances)} items, at most {max_batch} per request"
        )
    x = np.empty((len(instances), len(FEATURES)), dtype=np.float64)
    for i, instance in enumerate(instances):
        if type(instance) is not dict or instance.keys() != _FEATURE_SET:
            raise InvalidInput(f"instances[{i}]", _instance_problem(i, instance))
        for j, name in enumerate(FEATURES):
            value = instance[name]
            # type() rather than isinstance(): True and False are ints to isinstance.
            if type(value) not in (int, float):
                raise InvalidInput(
                    f"instances[{i}].{name}", f"instances[{i}].{name} must be a JSON number"
                )
            try:
                x[i, j] = value
            except OverflowError:
                raise InvalidInput(
                    f"instances[{i}].{name}", f"instances[{i}].{name} is out of range"
                ) from None
    bad = ~np.isfinite(x) | (x < 0)
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        _checked(f"instances[{i}].{FEATURES[j]}", float(x[i, j]))
    return x + 0.0


def _instance_problem(i: int, instance: Any) -> str:
    if type(instance) is not dict:
        return f"instances[{i}] must be an object with {_EXPECTED}"
    missing = [name for name in FEATURES if name not in instance]
    if missing:
        return f"instances[{i}] lacks {missing[0]}"
    unknown = sorted(key[:64] for key in instance if key not in _FEATURE_SET)
    return f"instances[{i}] has an unknown field {unknown[0]!r}: expected {_EXPECTED}"


@api.get("/health")
def health() -> tuple[dict[str, Any], int]:
    """200 when a model is loaded, 503 (with the reason) otherwise."""
    state = _state()
    if state.model is None:
        return {"status": "unavailable", "error": f"no model loaded: {state.error}"}, 503
    info = state.model.info
    return {
        "status": "ok",
        "version": model_version(info),
        "loaded_at": info["loaded_at"],
        "trained_at": info["trained_at"],
    }, 200


@api.get("/model")
def model_info() -> dict[str, Any]:
    """Stage parameters, metrics.json, when and on which table version the model was trained."""
    return public_info(_model().info)


# Keys of metrics.json that describe the training host, not the model.
_PRIVATE_KEYS = frozenset({"spark_master"})


def model_version(info: dict[str, Any]) -> str:
    """The served version's directory name (``20261204T044824Z-fed85c57``), not its path."""
    return PurePosixPath(info["resolved_dir"]).name


def public_info(info: dict[str, Any]) -> dict[str, Any]:
    """The model's metadata as the public API shows it: no path or URL of the serving or the
    training host (the server's port is public; the logs have the full paths)."""
    public = {k: _scrubbed(v) for k, v in info.items() if k not in ("model_dir", "resolved_dir")}
    public["version"] = model_version(info)
    if isinstance(info.get("metrics_error"), str):
        public["metrics_error"] = info["metrics_error"].replace(
            info["resolved_dir"], public["version"]
        )
    return public


def _scrubbed(value: Any) -> Any:
    """``value`` with host details removed: the keys in _PRIVATE_KEYS dropped, and an absolute
    path or a URL (``/data/lake/features``, ``s3a://bucket/lake/features``) cut to its last part."""
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items() if k not in _PRIVATE_KEYS}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, str) and (value.startswith("/") or "://" in value):
        return PurePosixPath(urlsplit(value).path).name
    return value


@api.get("/openapi.json")
def openapi() -> dict[str, Any]:
    return current_app.extensions["stockvol.openapi"]
