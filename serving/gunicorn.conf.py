"""gunicorn settings for the prediction API; every one can be overridden from the environment."""

from __future__ import annotations

import contextlib
import math
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.http.message import Request
    from gunicorn.http.wsgi import Response
    from gunicorn.workers.base import Worker


def cpu_limit(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 quota (cpu.max).

    os.cpu_count() is the host's count: a container limited to 1 CPU on a 64-core host would
    start 64 workers that share one CPU's time and the memory of 64 processes.
    """
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return cpus  # no cgroup v2 limit readable: the affinity mask is the limit
    if quota == "max":
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
# One process per CPU this container may use: a prediction is CPU-bound and takes microseconds.
workers = int(os.environ.get("WEB_CONCURRENCY") or cpu_limit())
# gevent, measured against sync and gthread (docs/serving.md, "Slow and idle clients"): a sync
# worker serves one connection at a time and waits for its headers, so two clients that send half
# a request stop the API; a gthread worker gives each connection a thread that blocks the same
# way once it has sent one byte (64 such clients stopped 2 workers x 16 threads). A gevent worker
# reads every connection in its own greenlet: a held connection costs a greenlet and a socket, not
# the worker, and throughput is at least that of sync (keep-alive included).
worker_class = "gevent"
# Connections one worker holds at once (open, in a request or kept alive). Beyond it the worker
# stops accepting; further connections wait in the kernel's listen queue (`backlog`, 2048) until
# a held one ends, which the deadlines below bound.
worker_connections = 1000
# Header deadline and keep-alive: a connection must deliver a request's line and headers within
# this many seconds of opening (or of the previous response), else the worker closes it. This is
# gevent's whole-read timeout around gunicorn's parser, so it drops a silent connection and one
# that trickles its headers byte by byte alike. Also how long an idle kept-alive connection stays.
keepalive = int(os.environ.get("KEEPALIVE", "5"))
# Body and answer deadline (seconds from the end of the headers): a request whose body does not
# arrive, or whose answer the client does not read, within it is cut off and its connection
# closed (pre_request/post_request below). 2 MB at 150 kB/s fits; a prediction takes microseconds.
request_timeout = float(os.environ.get("REQUEST_TIMEOUT", "15"))
preload_app = True
# The master loads the app, and so the model, before it forks any worker. A worker therefore
# never reads MODEL_DIR: one restarted after a crash or a timeout kill serves the model the master
# holds, whatever the directory holds by then. (If each worker loaded the model itself, a worker
# restarted while MODEL_DIR is broken would fail to boot, and gunicorn halts the whole server on a
# worker that fails to boot.) A broken model at first start fails the master: gunicorn exits with
# the reason. The workers share the model's memory, too. gevent patches the standard library in
# each worker after the fork; the app holds no socket or thread created before it.
# A worker whose event loop is blocked this long (no heartbeat) is killed and replaced.
timeout = 30
# SIGTERM/SIGHUP: a stopping worker stops accepting, finishes its requests (a kept-alive
# connection's next one is answered with Connection: close), and is killed after this.
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


def post_fork(server: Arbiter, worker: Worker) -> None:
    """Give a gevent worker the request deadline (a setting gunicorn does not know)."""
    if type(worker).__module__ == "gunicorn.workers.ggevent":
        worker.stockvol_request_timeout = request_timeout


def pre_request(worker: Worker, req: Request) -> None:
    """Arm the request deadline. gevent raises GreenletExit in the request's greenlet when it
    expires, wherever it waits (reading the body, writing the answer), and gunicorn's gevent worker
    ends the request there. (Not armed for another worker class given on the command line.)"""
    seconds = getattr(worker, "stockvol_request_timeout", None)
    if seconds is None:
        return
    import gevent

    req.stockvol_deadline = gevent.Timeout(seconds, gevent.GreenletExit)
    req.stockvol_deadline.start()


def post_request(worker: Worker, req: Request, environ: dict[str, Any], resp: Response) -> None:
    """Disarm the deadline; if it expired, log it and close the connection at once."""
    deadline = getattr(req, "stockvol_deadline", None)
    if deadline is None:
        return
    expired = not deadline.pending
    deadline.close()
    if expired:
        worker.log.warning(
            "closed the connection from %s: %s %s took over %g s (its body or its reader stalled)",
            environ.get("REMOTE_ADDR"),
            req.method,
            req.path,
            worker.stockvol_request_timeout,
        )
        if resp is not None:
            # The body was not read to its end: the connection cannot carry another request.
            with contextlib.suppress(OSError):
                resp.sock.shutdown(socket.SHUT_RDWR)
