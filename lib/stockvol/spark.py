"""The one place a SparkSession is built: spark-defaults.conf plus the pipeline config."""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pyspark import SparkConf, SparkContext
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


def s3a_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The S3A settings implied by the AWS SDKs' standard variables: endpoint and region only.

    ``AWS_ENDPOINT_URL`` names an S3-compatible store (MinIO, s3proxy, ...), which then also
    means path-style requests (``http://host/bucket/key``): such stores rarely serve a bucket as
    a host name. Credentials are deliberately not copied: S3A's default provider chain reads
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` from each JVM's own
    environment, so no secret lands in the Spark conf, its UI or its logs.
    """
    settings: dict[str, str] = {}
    endpoint = env.get("AWS_ENDPOINT_URL")
    if endpoint:
        settings["spark.hadoop.fs.s3a.endpoint"] = endpoint
        settings["spark.hadoop.fs.s3a.path.style.access"] = "true"
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        settings["spark.hadoop.fs.s3a.endpoint.region"] = region
    return settings


# The non-secret AWS variables that executors' Python tasks need for pyarrow's S3 client (and
# their S3A for its checksums) as the driver has them. Credentials are never forwarded: each host
# supplies its own (environment or instance role), as docker-compose.yaml does for the workers.
FORWARDED_AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


def environment_settings(env: Mapping[str, str]) -> dict[str, str]:
    """Spark settings from the standard AWS variables: ``s3a_settings`` plus the non-secret
    variables forwarded to the executors' environment (``spark.executorEnv.*``)."""
    forwarded = {
        f"spark.executorEnv.{name}": env[name] for name in FORWARDED_AWS_VARIABLES if env.get(name)
    }
    return {**s3a_settings(env), **forwarded}


def settings_not_given(settings: Mapping[str, str], given: Collection[str]) -> dict[str, str]:
    """``settings`` less the keys already ``given`` (spark-submit's ``--conf``, the properties
    files, a caller's ``extra_conf``): what is set explicitly wins over the environment."""
    return {key: value for key, value in settings.items() if key not in given}


def submitted_settings() -> set[str]:
    """Under spark-submit: the keys its ``--conf`` and properties files set.

    spark-submit's JVM runs already and holds them as system properties, which a new SparkConf
    loads; they must be known before the session is built, or a builder setting would replace
    them.
    """
    SparkContext._ensure_initialized()
    return {key for key, _ in SparkConf().getAll()}


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
    are applied here, so both ways run the same settings. Either way the S3 endpoint and region
    of the standard AWS variables (``environment_settings``) fill in what was not set otherwise.
    """
    # Python workers must run the interpreter that has our package and its dependencies.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if launched_by_spark_submit():
        settings: dict[str, str] = {}
        given = submitted_settings()
        if master:
            builder = builder.master(master)
    else:
        master = master or config.master
        settings = session_settings(config, master)
        given = set(settings)
        builder = builder.master(master)
    settings.update(extra_conf or {})
    given.update(extra_conf or {})
    # In the SparkConf, not only the driver's Hadoop conf: spark.hadoop.* and spark.executorEnv.*
    # reach the executors on every host too.
    settings.update(settings_not_given(environment_settings(os.environ), given))
    for key, value in settings.items():
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


@contextmanager
def session_conf(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """Spark SQL settings for the duration of one call, then back to what they were."""
    previous = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
