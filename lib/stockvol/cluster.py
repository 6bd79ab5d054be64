"""A Spark standalone master and worker on this machine, run by the same scripts as the containers.

``docker/spark-master.sh`` and ``docker/spark-worker.sh`` are what the compose services run; here
they are started as background processes, each in its own process group (so one signal stops the
script, ``spark-class`` and the JVM together), with every log, work and scratch directory under one
base directory. Used by tests/test_cluster.py and by ``make cluster-up`` / ``make cluster-down``::

    python -m stockvol.cluster up --base-dir .cluster      # prints the master URL
    python -m stockvol.cluster status --base-dir .cluster
    python -m stockvol.cluster down --base-dir .cluster
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stockvol.config import PROJECT_ROOT

DOCKER_DIR = PROJECT_ROOT / "docker"
STATE_FILE = "cluster.json"
# What each daemon's JVM command line contains: checked before a PID from a state file is signalled,
# so a PID the system has since given to another process is never killed.
DAEMON_CLASSES = {
    "master": "org.apache.spark.deploy.master.Master",
    "worker": "org.apache.spark.deploy.worker.Worker",
}


class ClusterError(RuntimeError):
    """The cluster did not start, or is not in the state the command needs."""


def spark_home() -> Path:
    """SPARK_HOME if set, else the pip-installed pyspark package (it ships bin/ and jars/)."""
    if os.environ.get("SPARK_HOME"):
        return Path(os.environ["SPARK_HOME"])
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class StandaloneCluster:
    """One master and one worker on ``host``; every file they write stays under ``base_dir``."""

    base_dir: Path
    host: str = "127.0.0.1"
    master_port: int = 7077
    master_webui_port: int = 8080
    worker_webui_port: int = 8081
    worker_cores: int = 2
    worker_memory: str = "2g"
    python: str = sys.executable
    pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def on_free_ports(cls, base_dir: Path, **settings: Any) -> StandaloneCluster:
        """A cluster whose ports are all free now, so it cannot clash with another one (or 7077)."""
        host = settings.pop("host", "127.0.0.1")
        return cls(
            base_dir=base_dir,
            host=host,
            master_port=free_port(host),
            master_webui_port=free_port(host),
            worker_webui_port=free_port(host),
            **settings,
        )

    @property
    def master_url(self) -> str:
        return f"spark://{self.host}:{self.master_port}"

    @property
    def master_webui_url(self) -> str:
        return f"http://{self.host}:{self.master_webui_port}"

    @property
    def worker_webui_url(self) -> str:
        return f"http://{self.host}:{self.worker_webui_port}"

    @property
    def master_json_url(self) -> str:
        return f"{self.master_webui_url}/json/"

    def log_path(self, daemon: str) -> Path:
        return self.base_dir / "logs" / f"{daemon}.log"

    def environment(self) -> dict[str, str]:
        """What the docker/ scripts read, plus the directories Spark would otherwise put in cwd."""
        env = dict(os.environ)
        env.update(
            SPARK_HOME=str(spark_home()),
            SPARK_LOCAL_IP=self.host,
            SPARK_MASTER_HOST=self.host,
            SPARK_MASTER_PORT=str(self.master_port),
            SPARK_MASTER_WEBUI_PORT=str(self.master_webui_port),
            SPARK_MASTER_URL=self.master_url,
            SPARK_WORKER_HOST=self.host,
            SPARK_WORKER_WEBUI_PORT=str(self.worker_webui_port),
            SPARK_WORKER_CORES=str(self.worker_cores),
            SPARK_WORKER_MEMORY=self.worker_memory,
            SPARK_WORKER_DIR=str(self.base_dir / "work"),
            SPARK_LOCAL_DIRS=str(self.base_dir / "local"),
            SPARK_LOG_DIR=str(self.base_dir / "logs"),
            SPARK_DRIVER_HOST=self.host,
            PYSPARK_PYTHON=self.python,
            PYSPARK_DRIVER_PYTHON=self.python,
        )
        return env

    def start(self, timeout: float = 180.0) -> None:
        """Start the master, then the worker; return once the master lists the worker ALIVE.

        Readiness is the compose health check's own test (:func:`health`). On any failure both
        daemons are stopped and ClusterError carries the tail of the failing daemon's log.
        """
        for name in ("logs", "work", "local"):
            (self.base_dir / name).mkdir(parents=True, exist_ok=True)
        try:
            self._launch("master", "spark-master.sh")
            self._wait("master", lambda: health(self.master_webui_url, timeout=2.0), timeout)
            self._launch("worker", "spark-worker.sh")
            self._wait(
                "worker",
                lambda: health(self.master_webui_url, self.worker_webui_url, timeout=2.0),
                timeout,
            )
        except BaseException:
            self.stop()
            raise
        self.save()

    def _launch(self, daemon: str, script: str) -> None:
        with open(self.log_path(daemon), "ab") as log:
            process = subprocess.Popen(  # noqa: S603 - our own script, fixed arguments
                [str(DOCKER_DIR / script)],
                env=self.environment(),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals all of it
            )
        self.pids[daemon] = process.pid

    def _wait(self, daemon: str, problem: Callable[[], str | None], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "not checked yet"
        while time.monotonic() < deadline:
            if not _running(self.pids[daemon]):
                raise ClusterError(f"the {daemon} exited at start-up:\n{self.log_tail(daemon)}")
            last = problem()
            if last is None:
                return
            time.sleep(0.5)
        raise ClusterError(
            f"the {daemon} was not ready after {timeout:.0f} s ({last}):\n{self.log_tail(daemon)}"
        )

    def master_state(self, timeout: float = 5.0) -> dict[str, Any]:
        """The master's own JSON status page: its status, workers, running and completed apps."""
        return fetch_json(self.master_json_url, timeout)

    def log_tail(self, daemon: str, lines: int = 40) -> str:
        path = self.log_path(daemon)
        if not path.exists():
            return f"(no log at {path})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 20.0) -> None:
        """Stop the worker, then the master: SIGTERM each process group, SIGKILL after ``grace``."""
        for daemon in ("worker", "master"):
            pid = self.pids.pop(daemon, None)
            if pid is not None:
                stop_process_group(pid, grace)
        with contextlib.suppress(FileNotFoundError):
            (self.base_dir / STATE_FILE).unlink()

    def save(self) -> None:
        """Record ports and PIDs so that another process (``down``, ``status``) can find them."""
        state = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        (self.base_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, base_dir: Path) -> StandaloneCluster:
        path = base_dir / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"no cluster recorded in {base_dir}: start one with `up` first")
        state = json.loads(path.read_text())
        state["base_dir"] = Path(state["base_dir"])
        return cls(**state)

    def __enter__(self) -> StandaloneCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fetch_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET a daemon's JSON status page (``<web UI>/json/``)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http only
        return json.load(response)


def alive_workers(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The workers the master lists as ALIVE."""
    return [worker for worker in state.get("workers", []) if worker.get("state") == "ALIVE"]


def health(master_webui: str, worker_webui: str | None = None, timeout: float = 5.0) -> str | None:
    """None when the master is ALIVE (and, given a worker, the master lists it ALIVE); else why not.

    The compose health checks run this (``python -m stockvol.cluster health ...``): a worker is
    healthy once the master it serves counts it, not merely when its own web page answers.
    """
    try:
        state = fetch_json(f"{master_webui.rstrip('/')}/json/", timeout)
        if state.get("status") != "ALIVE":
            return f"master status is {state.get('status')}"
        if worker_webui is None:
            return None
        worker_id = fetch_json(f"{worker_webui.rstrip('/')}/json/", timeout)["id"]
    except (OSError, ValueError, KeyError) as err:
        return f"no status: {err}"
    if worker_id not in {worker["id"] for worker in alive_workers(state)}:
        return f"worker {worker_id} is not ALIVE at the master"
    return None


def _running(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie child has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    return True


def _is_spark_daemon(pid: int) -> bool:
    """True when ``pid`` still runs one of our daemon scripts or JVMs, not a recycled PID."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return any(
        name in cmdline for name in (*DAEMON_CLASSES.values(), "spark-master.sh", "spark-worker.sh")
    )


def stop_process_group(pid: int, grace: float = 20.0) -> None:
    """SIGTERM the process group led by ``pid``, wait up to ``grace`` seconds, then SIGKILL it."""
    if not _running(pid) or not _is_spark_daemon(pid):
        _kill_group(pid, signal.SIGKILL)  # stray children of a leader that already exited
        return
    _kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.2)
    _kill_group(pid, signal.SIGKILL)
    while _running(pid):
        time.sleep(0.1)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def processes_in_group(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid`` (from /proc): empty once a daemon is fully stopped."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may contain spaces: fields after its closing ')' are fixed.
            fields_after_name = stat.read_text().rsplit(")", 1)[1].split()
            if fields_after_name[0] != "Z" and int(fields_after_name[2]) == pgid:
                members.append(int(stat.parent.name))
    return members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A native Spark standalone master and worker.")
    parser.add_argument("command", choices=("up", "down", "status", "health"))
    parser.add_argument("--base-dir", type=Path, default=PROJECT_ROOT / ".cluster")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7077, help="master port")
    parser.add_argument("--webui-port", type=int, default=8080, help="master web UI port")
    parser.add_argument("--worker-webui-port", type=int, default=8081)
    parser.add_argument("--cores", type=int, default=2, help="worker cores")
    parser.add_argument("--memory", default="2g", help="worker memory for executors")
    parser.add_argument("--master-ui", help="health: the master's web UI, e.g. http://HOST:8080")
    parser.add_argument("--worker-ui", help="health: also check this worker (its web UI URL)")
    args = parser.parse_args(argv)
    if args.command == "health":
        if not args.master_ui:
            parser.error("health needs --master-ui")
        problem = health(args.master_ui, args.worker_ui)
        if problem:
            print(f"unhealthy: {problem}", file=sys.stderr)
            return 1
        return 0
    base_dir = args.base_dir.resolve()
    try:
        if args.command == "up":
            if (base_dir / STATE_FILE).exists():
                raise ClusterError(f"a cluster is already recorded in {base_dir}: run `down` first")
            cluster = StandaloneCluster(
                base_dir=base_dir,
                host=args.host,
                master_port=args.port,
                master_webui_port=args.webui_port,
                worker_webui_port=args.worker_webui_port,
                worker_cores=args.cores,
                worker_memory=args.memory,
            )
            cluster.start()
            print(f"master {cluster.master_url}  web UI http://{args.host}:{args.webui_port}")
            print(f"logs {base_dir / 'logs'}; submit with SPARK_MASTER_URL={cluster.master_url}")
        elif args.command == "down":
            StandaloneCluster.load(base_dir).stop()
            print("stopped")
        else:
            cluster = StandaloneCluster.load(base_dir)
            state = cluster.master_state()
            workers = alive_workers(state)
            print(
                f"master {cluster.master_url} {state.get('status')}; alive workers {len(workers)}; "
                f"cores {sum(w.get('cores', 0) for w in workers)}"
            )
    except (ClusterError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
