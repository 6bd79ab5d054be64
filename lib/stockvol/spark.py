"""The one place a SparkSession is built: spark-defaults.conf plus the pipeline config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from stockvol.config import PROJECT_ROOT, Config


def read_spark_defaults(path: Path) -> dict[str, str]:
    """Parse a spark-defaults.conf file (``key  value`` lines, ``#`` comments) like spark-submit."""
    settings: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        settings[key] = value.strip()
    return settings


def launched_by_spark_submit() -> bool:
    """True when spark-submit started this Python process (it hands over a gateway port)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def build_session(
    config: Config,
    app_name: str,
    master: str | None = None,
    extra_conf: dict[str, str] | None = None,
) -> SparkSession:
    """Build (or reuse) the SparkSession for a job or a test.

    Under spark-submit, spark-submit's own master and ``--properties-file`` win and only an
    explicit ``master`` overrides them. From plain Python (pytest, ``python jobs/x.py``) the
    config's master and spark-defaults.conf are applied here, so both ways run the same settings.
    """
    # Python workers must run the interpreter that has our package and its dependencies.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if not launched_by_spark_submit():
        for key, value in read_spark_defaults(config.spark_defaults_file).items():
            builder = builder.config(key, _absolute_log_config(key, value))
        builder = builder.master(master or config.master)
    elif master:
        builder = builder.master(master)
    for key, value in (extra_conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _absolute_log_config(key: str, value: str) -> str:
    """Point the relative log4j2 path at the project so logs stay quiet whatever the cwd."""
    if key.endswith("extraJavaOptions") and "=conf/" in value:
        return value.replace("=conf/", f"={PROJECT_ROOT}/conf/")
    return value
