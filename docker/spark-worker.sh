#!/usr/bin/env bash
# Run a Spark standalone worker in the foreground and register it with SPARK_MASTER_URL.
# Used by the spark-worker container (scale it with `docker compose up --scale spark-worker=N`) and by
# the native cluster, with the same flags.
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${SPARK_MASTER_URL:?set SPARK_MASTER_URL, e.g. spark://spark-master:7077}"
work_dir="${SPARK_WORKER_DIR:-${TMPDIR:-/tmp}/spark-worker}"
mkdir -p "$work_dir"

# The host the master and the driver reach this worker on: an address, because a container's own
# hostname is not resolvable from the other containers.
exec "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.worker.Worker \
  --host "${SPARK_WORKER_HOST:-$(primary_address)}" \
  --port "${SPARK_WORKER_PORT:-0}" \
  --webui-port "${SPARK_WORKER_WEBUI_PORT:-8081}" \
  --cores "${SPARK_WORKER_CORES:-2}" \
  --memory "${SPARK_WORKER_MEMORY:-2g}" \
  --work-dir "$work_dir" \
  "$SPARK_MASTER_URL"
