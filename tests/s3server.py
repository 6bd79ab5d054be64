"""A real S3-compatible server for the tests: s3proxy (Maven Central) on a 127.0.0.1 port.

``make s3proxy`` resolves its classpath once into ``.s3proxy/classpath.txt``; this module only
starts the JVM with it, storing objects as files under a test's tmp dir, and stops it again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from pyarrow.fs import S3FileSystem

ROOT = Path(__file__).resolve().parent.parent
CLASSPATH_FILE = ROOT / ".s3proxy" / "classpath.txt"
# Test-only credentials of the loopback server: nothing real, never used against AWS.
ACCESS_KEY = "stockvol-test-access-key"
SECRET_KEY = "stockvol-test-secret-key"
REGION = "us-east-1"


class S3ServerError(RuntimeError):
    """s3proxy could not be started (classpath not resolved, port taken, JVM died)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_environment(port: int) -> dict[str, str]:
    """The standard AWS variables that point both S3A and pyarrow at the server on ``port``.

    The two checksum variables are for s3proxy only: with the AWS SDKs' newer default checksums
    its uploads fail with ``XAmzContentSHA256Mismatch``. Real S3 needs neither.
    """
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
    }


# S3A settings this server needs and real S3 does not: s3proxy answers the bulk DeleteObjects
# request with 501 Not Implemented, so S3A must delete one object at a time.
SPARK_TEST_CONF = {"spark.hadoop.fs.s3a.multiobjectdelete.enable": "false"}


def spark_submit_conf() -> list[str]:
    """The ``--conf`` arguments a spark-submit subprocess needs against this server
    (its endpoint and credentials come from the inherited environment)."""
    return [arg for key, value in SPARK_TEST_CONF.items() for arg in ("--conf", f"{key}={value}")]


def pyspark_submit_args() -> str:
    """``PYSPARK_SUBMIT_ARGS`` for a plain-Python subprocess (``python jobs/x.py``), whose
    ``build_session`` starts the JVM itself: the same settings as ``spark_submit_conf``."""
    return " ".join([*spark_submit_conf(), "pyspark-shell"])


class S3Server:
    """s3proxy on ``127.0.0.1:port``: ``start``, ``create_bucket``, ``stop``.

    Objects are files under ``workdir/blobs`` (jclouds' ``filesystem`` provider) rather than in
    the server's heap, so a full-size lake fits as well as a test's few rows.
    """

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.log = workdir / "s3proxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the JVM in its own process group and wait until it answers HTTP."""
        if not CLASSPATH_FILE.exists():
            raise S3ServerError(f"{CLASSPATH_FILE} is missing: run `make s3proxy` first")
        (self.workdir / "blobs").mkdir(parents=True, exist_ok=True)
        properties = self.workdir / "s3proxy.properties"
        properties.write_text(
            f"s3proxy.endpoint={self.endpoint}\n"
            "s3proxy.authorization=aws-v2-or-v4\n"
            f"s3proxy.identity={ACCESS_KEY}\n"
            f"s3proxy.credential={SECRET_KEY}\n"
            "jclouds.provider=filesystem\n"
            f"jclouds.filesystem.basedir={self.workdir / 'blobs'}\n"
            f"jclouds.identity={ACCESS_KEY}\n"
            f"jclouds.credential={SECRET_KEY}\n"
        )
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    "java",
                    "-Xmx1g",
                    "-cp",
                    CLASSPATH_FILE.read_text().strip(),
                    "org.gaul.s3proxy.Main",
                    "--properties",
                    str(properties),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise S3ServerError(f"s3proxy did not start on {self.endpoint}: see {self.log}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        """True once the server answers HTTP at all (an anonymous request gets a 403)."""
        try:
            urllib.request.urlopen(self.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def filesystem(self) -> S3FileSystem:
        """A pyarrow client with this server's credentials that may create and delete buckets."""
        return S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            endpoint_override=self.endpoint,
            scheme="http",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def create_bucket(self, name: str) -> None:
        """Create an empty bucket ``name``."""
        self.filesystem().create_dir(name)

    def stop(self) -> None:
        """Stop the JVM (its whole process group) and check that it is gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            self.process = None
            return
        raise S3ServerError(f"s3proxy's process group {self.process.pid} is still alive")
