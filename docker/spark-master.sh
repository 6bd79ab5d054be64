#!/usr/bin/env bash
# Run a Spark standalone master in the foreground. The spark-master container and the native cluster
# (lib/stockvol/cluster.py, used by tests/test_cluster.py and `make cluster-up`) both run this script.
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

exec "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master \
  --host "${SPARK_MASTER_HOST:-$(primary_address)}" \
  --port "${SPARK_MASTER_PORT:-7077}" \
  --webui-port "${SPARK_MASTER_WEBUI_PORT:-8080}"
