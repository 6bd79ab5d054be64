"""Ingest -> features -> train -> retention in one Spark application, one summary line per stage.

    spark-submit --properties-file spark-defaults.conf jobs/pipeline.py --data-dir data [--tune]
    docker/submit.sh jobs/pipeline.py --data-dir /data      # on a standalone cluster

Takes the common flags and train's model flags; each stage also runs alone (jobs/<stage>.py).
"""

from __future__ import annotations

import sys

from stockvol import features, ingest, retention, train
from stockvol.cli import run_stages

if __name__ == "__main__":
    sys.exit(
        run_stages(
            "Pipeline (ingest -> features -> train) in one Spark application",
            [ingest.run, features.run, train.run, retention.stage(*retention.TARGETS)],
            add_arguments=train.add_arguments,
            overrides=train.overrides,
        )
    )
