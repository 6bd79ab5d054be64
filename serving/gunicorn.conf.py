"""gunicorn settings for the prediction API; every one can be overridden from the environment."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
# Prediction is CPU-bound and takes microseconds: one process per core, no threads.
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 2))
worker_class = "sync"
# The master loads the app, and so the model, before it forks any worker. A worker therefore
# never reads MODEL_DIR: one restarted after a crash or a timeout kill serves the model the master
# holds, whatever the directory holds by then. (If each worker loaded the model itself, a worker
# restarted while MODEL_DIR is broken would fail to boot, and gunicorn halts the whole server on a
# worker that fails to boot.) A broken model at first start fails the master: gunicorn exits with
# the reason. The workers share the model's memory, too.
preload_app = True
timeout = 30
graceful_timeout = 20
# gunicorn's largest bounded request line (its default is 4094; 0 would mean unbounded). Query
# strings up to it reach the app, which refuses those over MAX_QUERY_LENGTH (4096) with the API's
# JSON 414; gunicorn answers longer lines itself, with its own HTML 414.
limit_request_line = 8190
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
# With a pid file, `kill -USR2 $(cat PIDFILE)` starts a second master (and workers) on the same
# socket, for the zero-downtime model swap in docs/serving.md.
pidfile = os.environ.get("PIDFILE") or None


def on_reload(server: Arbiter) -> None:
    """SIGHUP: read MODEL_DIR again in the master, before gunicorn forks the new workers.

    With preload_app, gunicorn's SIGHUP does not reload the app (the new workers are forks of the
    master's app), so the model is reloaded here. A directory that is not a valid model is logged
    and the model being served is kept: the new workers serve it, the server stays up.
    """
    from serving.app import reload_model  # the master imported it already (preload_app)

    reload_model(server.app.wsgi())
