# shellcheck shell=bash
# Shared by the scripts in docker/: where the project, Python and Spark are. Sourced, not run.
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PROJECT_ROOT

# Driver and executors must run the interpreter that has stockvol and its dependencies installed:
# the image sets PYSPARK_PYTHON; natively the project's .venv is the default.
if [[ -z "${PYSPARK_PYTHON:-}" ]]; then
  if [[ -x "$PROJECT_ROOT/.venv/bin/python" ]]; then
    PYSPARK_PYTHON="$PROJECT_ROOT/.venv/bin/python"
  else
    PYSPARK_PYTHON="$(command -v python3)"
  fi
fi
export PYSPARK_PYTHON
export PYSPARK_DRIVER_PYTHON="${PYSPARK_DRIVER_PYTHON:-$PYSPARK_PYTHON}"

# In the image SPARK_HOME is the official distribution (/opt/spark); natively it is the pip-installed
# pyspark package, which ships the same bin/ and jars/.
if [[ -z "${SPARK_HOME:-}" ]]; then
  if ! SPARK_HOME="$("$PYSPARK_PYTHON" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' 2>/dev/null)"; then
    echo "error: $PYSPARK_PYTHON cannot import pyspark: run 'make setup', or set PYSPARK_PYTHON" \
      "to the project's Python, or SPARK_HOME to a Spark distribution" >&2
    exit 1
  fi
fi
export SPARK_HOME

# A daemon whose port is taken must fail with "Address already in use", not quietly bind the next
# port: the compose file, the health checks and the native cluster all expect the configured ports.
# The REST submission server (port 6066) is not used: off, so it cannot clash with another master.
# The web UIs' kill links are off: the master has no authentication, so anyone who can load its UI
# could otherwise kill applications and drivers with one click.
export SPARK_DAEMON_JAVA_OPTS="${SPARK_DAEMON_JAVA_OPTS:-} -Dspark.port.maxRetries=0 -Dspark.master.rest.enabled=false -Dspark.ui.killEnabled=false"

# The first address of this host: what other containers (or, natively, other processes) can reach.
primary_address() {
  hostname -i | awk '{print $1}'
}
