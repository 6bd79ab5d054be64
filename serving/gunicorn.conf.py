"""gunicorn settings for the prediction API; every one can be overridden from the environment."""

from __future__ import annotations

import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
# Prediction is CPU-bound and takes microseconds: one process per core, no threads.
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 2))
worker_class = "sync"
# Not preloaded: each worker loads the model itself, so SIGHUP (new workers) picks up a new model.
preload_app = False
timeout = 30
graceful_timeout = 20
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
# With a pid file, `kill -USR2 $(cat PIDFILE)` starts a second master (and workers) on the same
# socket, for the zero-downtime model swap in docs/serving.md.
pidfile = os.environ.get("PIDFILE") or None
