"""Retention alone: delete replaced files of every table and the model, once older than the setting.

spark-submit --properties-file spark-defaults.conf jobs/retention.py --data-dir DIR \
    [--retention-hours H]

Delta tables get Delta's own VACUUM; Parquet tables and the model lose the versions replaced more
than H hours ago (default: storage.retention_hours, 168). The jobs that replace something run the
same after they succeed; docs/reliability.md, "Retention", says what is kept.
"""

from __future__ import annotations

import sys

from stockvol import retention
from stockvol.cli import run_stages

if __name__ == "__main__":
    sys.exit(run_stages("Retention of replaced files", [retention.stage(*retention.TARGETS)]))
