"""The Flask application factory: configuration, the model (loaded once), JSON errors everywhere."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from serving.api import STATE_KEY, ModelState, api, error_response
from serving.forest import (
    DEFAULT_MAX_GRID_CELLS,
    ModelError,
    ModelNotFoundError,
    ServingModel,
    display_location,
    load_model,
)

log = logging.getLogger("serving")

DEFAULTS: dict[str, Any] = {
    # The Spark PipelineModel directory: a local path (the train job makes it a symlink to the
    # current version) or an s3:// / s3a:// URI (a pointer object naming the current version).
    "MODEL_DIR": "data/model",
    # True: refuse to start without a model. False: start, answer 503 until restarted with one.
    "MODEL_REQUIRED": False,
    # Most instances one POST /predict may carry, and the largest request body (bytes): 10,000
    # instances of two 20-digit numbers take about 800 KB of JSON.
    "MAX_BATCH": 10_000,
    "MAX_CONTENT_LENGTH": 2 * 1024 * 1024,
    # Longest accepted text for one number in a query string.
    "MAX_NUMBER_LENGTH": 64,
    # Longest query string (bytes, as sent) on any route: 414 beyond. A valid one is under 200.
    # gunicorn.conf.py lets request lines of up to 8190 bytes through so that the app, not
    # gunicorn, refuses these with the API's JSON error; keep this well under that.
    "MAX_QUERY_LENGTH": 4096,
    "MAX_GRID_CELLS": DEFAULT_MAX_GRID_CELLS,
}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. Settings: DEFAULTS < environment (MODEL_DIR, SERVING_<NAME>) < ``config``.

    The model is read once, here (and again only by ``reload_model``). A missing model directory,
    or an object store that cannot be reached, leaves the app up with ``/health`` and ``/predict``
    answering 503 (unless MODEL_REQUIRED); a directory that is not a model this server understands
    raises ``ModelFormatError`` (a MODEL_DIR it cannot read at all, ``ModelLocationError``), so a
    server never starts on a bad model.
    """
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    if "MODEL_DIR" in os.environ:
        app.config["MODEL_DIR"] = os.environ["MODEL_DIR"]
    app.config.from_prefixed_env("SERVING")
    if config:
        app.config.from_mapping(config)

    app.extensions[STATE_KEY] = _load(app)
    app.extensions["stockvol.openapi"] = _openapi(app)
    app.before_request(_refuse_long_query)
    app.register_blueprint(api)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def _load(app: Flask) -> ModelState:
    try:
        model = _read_model(app)
    except ModelNotFoundError as err:
        if app.config["MODEL_REQUIRED"]:
            raise
        log.warning("serving without a model: %s", err)
        return ModelState(None, str(err))
    return ModelState(model)


def _read_model(app: Flask) -> ServingModel:
    model = load_model(app.config["MODEL_DIR"], max_grid_cells=int(app.config["MAX_GRID_CELLS"]))
    forest = model.info["forest"]
    log.info(
        "model loaded from %s: %d trees, depth %d, %s evaluator",
        model.info["resolved_dir"],
        forest["num_trees"],
        forest["depth"],
        model.evaluator,
    )
    return model


def reload_model(app: Flask) -> bool:
    """Read MODEL_DIR again and serve it; if it is not a valid model, keep the one being served.

    MODEL_DIR is resolved again (its symlink or pointer object), so a newly published version is
    picked up; an unreachable object store or a pointer to a missing version keeps the old model.

    gunicorn's master calls this on SIGHUP (``on_reload`` in serving/gunicorn.conf.py) before it
    forks the new workers, which inherit whatever model this leaves. Returns whether it swapped.
    """
    current: ModelState = app.extensions[STATE_KEY]
    kept = current.model.info["resolved_dir"] if current.model else "no model"
    try:
        model = _read_model(app)
    except Exception as err:
        # Any failure, not only ModelFormatError: an exception escaping a gunicorn hook stops
        # the master, and with it the workers that serve the loaded model. A traceback only
        # for the unexpected ones: a ModelError's message names the file and the problem.
        log.error(
            "model reload from %s failed, still serving %s: %s: %s",
            display_location(app.config["MODEL_DIR"]),
            kept,
            type(err).__name__,
            err,
            exc_info=not isinstance(err, ModelError),
        )
        return False
    app.extensions[STATE_KEY] = ModelState(model)
    return True


def _openapi(app: Flask) -> dict[str, Any]:
    """The OpenAPI document, with the limits this app was configured with."""
    document = json.loads(resources.files("serving").joinpath("openapi.json").read_text("utf-8"))
    schemas = document["components"]["schemas"]
    schemas["BatchRequest"]["properties"]["instances"]["maxItems"] = int(app.config["MAX_BATCH"])
    for parameter in document["components"]["parameters"].values():
        parameter["schema"]["maxLength"] = int(app.config["MAX_NUMBER_LENGTH"])
    return document


def _refuse_long_query() -> Response | None:
    """414 for a query string over MAX_QUERY_LENGTH, before anything parses it."""
    length, limit = len(request.query_string), int(current_app.config["MAX_QUERY_LENGTH"])
    if length > limit:
        return error_response(414, f"the query string is {length} bytes long, at most {limit}")
    return None


def _http_error(err: HTTPException) -> Response:
    # Start from werkzeug's own response so headers such as Allow (405) survive.
    response = err.get_response()
    response.set_data(json.dumps({"error": err.description, "status": err.code}))
    response.mimetype = "application/json"
    return response


def _unexpected_error(err: Exception) -> Response:
    # Last resort: log the traceback, answer JSON rather than Flask's HTML page.
    log.exception("unhandled error", exc_info=err)
    return error_response(500, "internal server error")
