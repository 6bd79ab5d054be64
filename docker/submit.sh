#!/usr/bin/env bash
# spark-submit a Python application of this project to SPARK_MASTER_URL in client mode:
#   docker/submit.sh jobs/pipeline.py --data-dir /data
# The pipeline container and the native cluster test submit through this script, with the same flags.
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${SPARK_MASTER_URL:?set SPARK_MASTER_URL, e.g. spark://spark-master:7077}"
if [[ $# -lt 1 ]]; then
  echo "usage: $0 APPLICATION.py [ARGS...]" >&2
  exit 2
fi
app="$1"
shift
log_config="-Dlog4j.configurationFile=$PROJECT_ROOT/conf/log4j2.properties"

# Executors connect back to the driver on spark.driver.host, so it must be an address they can reach.
# The log4j path is made absolute: executors run in the worker's work directory, not in the project.
cd "$PROJECT_ROOT"
exec "$SPARK_HOME/bin/spark-submit" \
  --master "$SPARK_MASTER_URL" \
  --deploy-mode client \
  --properties-file "$PROJECT_ROOT/spark-defaults.conf" \
  --conf "spark.driver.host=${SPARK_DRIVER_HOST:-$(primary_address)}" \
  --conf "spark.executor.memory=${SPARK_EXECUTOR_MEMORY:-1g}" \
  --conf "spark.driver.extraJavaOptions=$log_config" \
  --conf "spark.executor.extraJavaOptions=$log_config" \
  "$app" "$@"
