#!/usr/bin/env bash
# Acquire the data, then run ingest -> features -> train on the cluster at SPARK_MASTER_URL:
#   STOCKVOL_DATA_DIR=/data STOCKVOL_SOURCE=auto docker/pipeline.sh [JOB FLAGS...]
# The compose `pipeline` service runs this; so does the native cluster test. Extra arguments go to
# jobs/pipeline.py (e.g. --config FILE, --format parquet).
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

data_dir="${STOCKVOL_DATA_DIR:-$PROJECT_ROOT/data}"
config="${STOCKVOL_CONFIG:-$PROJECT_ROOT/conf/pipeline.yaml}"

"$PYSPARK_DRIVER_PYTHON" "$PROJECT_ROOT/jobs/download.py" \
  --config "$config" --source "${STOCKVOL_SOURCE:-auto}" --data-dir "$data_dir"
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" "$PROJECT_ROOT/jobs/pipeline.py" \
  --config "$config" --data-dir "$data_dir" "$@"
