"""What every spark-submit entry point shares: flags, config, session, summary lines, exit code."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

from pyspark.sql import SparkSession

from stockvol.config import (
    ArgumentParser,
    Config,
    ConfigError,
    add_common_arguments,
    config_from_args,
    one_line,
)
from stockvol.spark import build_session
from stockvol.summary import StageSummary

log = logging.getLogger("stockvol")

Stage = Callable[[SparkSession, Config], StageSummary]


class PipelineError(RuntimeError):
    """A failure the user can act on; its message says what to do. Printed without a traceback."""


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )


def run_stages(
    description: str,
    stages: Sequence[Stage],
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    overrides: Callable[[argparse.Namespace], dict] | None = None,
) -> int:
    """Parse flags, build one SparkSession, run the stages in order, log a line each; exit code."""
    configure_logging()
    parser = add_common_arguments(ArgumentParser(description=description))
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, **(overrides(args) if overrides else {}))
    except ConfigError as err:  # before Spark starts: a bad setting costs no JVM
        log.error("configuration error: %s", one_line(err))
        return 2
    started = time.perf_counter()
    spark = build_session(config, f"stockvol-{description.split()[0].lower()}", master=args.master)
    try:
        for stage in stages:
            summary = stage(spark, config)
            log.info(summary.line())
    except (PipelineError, FileNotFoundError, ConfigError) as err:
        log.error("%s", err)
        return 1
    finally:
        spark.stop()
    if len(stages) > 1:
        log.info("[pipeline] stages=%d seconds=%.1f", len(stages), time.perf_counter() - started)
    return 0
