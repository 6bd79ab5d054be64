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


# Tuning measured in local mode only (the JIT flags, few shuffle partitions), kept out of the
# portable spark-defaults.conf and applied on top of it when the master is local.
LOCAL_SETTINGS = PROJECT_ROOT / "conf" / "spark-local.conf"


def is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def session_settings(config: Config, master: str) -> dict[str, str]:
    """What a job's session gets from files: spark-defaults.conf, then, with a local master,
    conf/spark-local.conf (a cluster gets the portable defaults only)."""
    settings = read_spark_defaults(config.spark_defaults_file)
    if is_local(master):
        settings.update(read_spark_defaults(LOCAL_SETTINGS))
    return {key: _absolute_log_config(key, value) for key, value in settings.items()}


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
    explicit ``master`` overrides them; with a local master the SQL settings of the local tuning
    that spark-submit was not given are set (the driver's JVM flags cannot be: it runs already).
    From plain Python (pytest, ``python jobs/x.py``) the config's master and ``session_settings``
    are applied here, so both ways run the same settings.
    """
    # Python workers must run the interpreter that has our package and its dependencies.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if not launched_by_spark_submit():
        master = master or config.master
        for key, value in session_settings(config, master).items():
            builder = builder.config(key, value)
        builder = builder.master(master)
    elif master:
        builder = builder.master(master)
    for key, value in (extra_conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if launched_by_spark_submit() and is_local(spark.sparkContext.master):
        # The SQL settings of the local tuning that spark-submit was not given (--conf wins).
        given = spark.sparkContext.getConf()
        for key, value in read_spark_defaults(LOCAL_SETTINGS).items():
            if key.startswith("spark.sql.") and not given.contains(key):
                spark.conf.set(key, value)
    return spark


def _absolute_log_config(key: str, value: str) -> str:
    """Point the relative log4j2 path at the project so logs stay quiet whatever the cwd."""
    if key.endswith("extraJavaOptions") and "=conf/" in value:
        return value.replace("=conf/", f"={PROJECT_ROOT}/conf/")
    return value
