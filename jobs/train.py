"""Train the volume model: DIR/lake/features -> DIR/model (PipelineModel + metrics.json + plot).

spark-submit --properties-file spark-defaults.conf jobs/train.py --data-dir data [--tune]
"""

from __future__ import annotations

import sys

from stockvol import retention
from stockvol.cli import run_stages
from stockvol.train import add_arguments, overrides, run

if __name__ == "__main__":
    sys.exit(
        run_stages(
            "Train a random forest on the features table and export the model",
            [run, retention.stage("model")],
            add_arguments=add_arguments,
            overrides=overrides,
        )
    )
