# The two commands a fresh machine needs: `make run` and `make test`. Everything else builds on `setup`.
SHELL := /bin/bash
VENV := .venv
PY := $(abspath $(VENV))/bin/python
DATA ?= data
SOURCE ?= auto
# Python workers and the driver run the venv's interpreter, whoever starts Spark.
export PYSPARK_PYTHON := $(PY)
export PYSPARK_DRIVER_PYTHON := $(PY)
# Local runs: the portable spark-defaults.conf (read from SPARK_CONF_DIR) plus the tuning measured
# in local mode, conf/spark-local.conf, whose settings win (docs/cluster.md, "Settings").
SPARK_SUBMIT := SPARK_CONF_DIR=$(CURDIR) $(VENV)/bin/spark-submit --load-spark-defaults \
	--properties-file conf/spark-local.conf

.PHONY: setup run download pipeline ingest features train retention serve test lint format clean
.PHONY: test-cluster cluster-up cluster-down cluster-pipeline bench bench-sweep bench-serving
.PHONY: test-load test-all test-s3 test-faults s3proxy

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

setup: $(VENV)/.installed  ## create .venv with the package and its dev extras (idempotent)

run: setup download pipeline  ## acquire the data (Kaggle, or the real files shipped here) and run every stage
	@echo "outputs: $(DATA)/raw  $(DATA)/lake/{prices,rejects,features}  $(DATA)/model (metrics.json)"

download: setup
	$(PY) jobs/download.py --source $(SOURCE) --data-dir $(DATA)

pipeline: setup
	$(SPARK_SUBMIT) jobs/pipeline.py --data-dir $(DATA)

# retention: delete replaced files older than storage.retention_hours (the jobs do it after a run).
ingest features train retention: setup
	$(SPARK_SUBMIT) jobs/$@.py --data-dir $(DATA)

# A real S3-compatible server for the tests (tests/s3server.py): s3proxy from Maven Central, its
# classpath resolved once by mvn into .s3proxy/classpath.txt (jars in ~/.m2). Resolved again when
# the version changes or a jar is gone from the local repository.
S3PROXY_VERSION := 2.6.0
S3PROXY_CP := .s3proxy/classpath.txt
s3proxy:  ## resolve the test S3 server's classpath with mvn (idempotent)
	@if [ -s $(S3PROXY_CP) ] && grep -q '/s3proxy-$(S3PROXY_VERSION).jar' $(S3PROXY_CP) \
		&& ls $$(tr ':' ' ' < $(S3PROXY_CP)) > /dev/null 2>&1; then \
		echo "s3proxy $(S3PROXY_VERSION): $(S3PROXY_CP) is up to date"; \
	else \
		mkdir -p .s3proxy && printf '%s\n' \
			'<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>' \
			'<groupId>local</groupId><artifactId>s3proxy-classpath</artifactId><version>1</version>' \
			'<dependencies><dependency><groupId>org.gaul</groupId><artifactId>s3proxy</artifactId>' \
			'<version>$(S3PROXY_VERSION)</version></dependency></dependencies></project>' \
			> .s3proxy/pom.xml \
		&& mvn -q -B -Dstyle.color=never -f .s3proxy/pom.xml dependency:build-classpath \
			-Dmdep.outputFile=classpath.txt \
		&& echo "s3proxy $(S3PROXY_VERSION): resolved into $(S3PROXY_CP)"; \
	fi

# The README's test command. The standalone-cluster test starts a master, a worker and a driver of
# its own and takes minutes: it is a separate target; test-all (what CI runs) runs every one.
test: setup s3proxy  ## lint, then the test suite (real Spark, Delta, MLlib, HTTP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -m "not cluster and not object_store and not faults"

test-all: test test-faults test-s3 test-cluster test-load  ## everything CI runs

# SIGKILL in the middle of each stage's write on local disk (docs/reliability.md): seven real
# spark-submit jobs killed and rerun, about 6.5 min, kept out of `make test` to hold it near 8 min.
test-faults: setup s3proxy  ## SIGKILL mid-write of ingest, features and train; the previous version survives
	$(PY) -m pytest -m "faults and not cluster and not object_store"

# The whole pipeline on a real S3 server (s3proxy on loopback) against the same run on disk, and
# SIGKILL in the middle of each publish there: minutes of end-to-end runs, kept out of `make test`
# for time like the cluster test. The fast S3 tests (settings, Spark and pyarrow on the server,
# the server reading its model from a bucket, retention there) are in `make test`.
test-s3: setup s3proxy  ## the pipeline and its SIGKILL faults with --data-dir s3a:// (s3proxy)
	$(PY) -m pytest -m "object_store and not cluster"

# Bounded load on gunicorn over 127.0.0.1 (docs/reliability.md); fails on any error. LOAD_ARGS to change.
test-load: setup  ## 12 s at 64 connections against gunicorn; any failed or wrong answer fails
	$(PY) benchmarks/load_test.py --duration 12 --connections 64 --tiny-model-if-missing \
		--model-dir $${MODEL_DIR:-$(DATA)/model} --out bench-results/load-ci.json $(LOAD_ARGS)

# A native Spark standalone master + worker (docs/cluster.md); the test starts its own on free ports.
MASTER ?= spark://127.0.0.1:7077
test-cluster: setup s3proxy  ## the standalone-cluster test and the compose/Dockerfile checks only
	$(PY) -m pytest -m "cluster" tests/test_cluster.py

cluster-up: setup  ## master on 127.0.0.1:7077 (web UI :8080) and one worker, in the background
	$(PY) -m stockvol.cluster up

cluster-down:
	$(PY) -m stockvol.cluster down

cluster-pipeline: setup  ## run the pipeline on $(MASTER) (start one with `make cluster-up`)
	SPARK_MASTER_URL=$(MASTER) docker/submit.sh jobs/pipeline.py --data-dir $(abspath $(DATA))

# Benchmarks (docs/benchmarks.md): BENCH_ARGS='--scales 0.25,0.5,1,2' for the scaling sweep.
BENCH_ARGS ?=
bench: setup  ## every stage at full size: wall s, rows/s, peak memory (bench-results/*.json)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

bench-sweep: setup  ## 0.25x, 0.5x, 1x, 2x size, then the plot docs/benchmarks-scaling.png
	$(PY) benchmarks/run.py --scales 0.25,0.5,1,2 --out bench-results/sweep.json $(BENCH_ARGS)
	$(PY) benchmarks/plot.py bench-results/sweep.json --out docs/benchmarks-scaling.png

# The prediction API (docs/serving.md): gunicorn on port 8000 over MODEL_DIR (default $(DATA)/model).
serve: setup  ## gunicorn serving.wsgi:app on :8000; reload a new model with kill -HUP <master pid>
	MODEL_DIR=$${MODEL_DIR:-$(DATA)/model} $(VENV)/bin/gunicorn --config serving/gunicorn.conf.py serving.wsgi:app

bench-serving: setup  ## in-process and through-gunicorn latency and throughput, keep-alive and not; held connections
	$(PY) benchmarks/serving.py --model-dir $${MODEL_DIR:-$(DATA)/model} $(SERVING_BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(DATA) spark-warehouse metastore_db derby.log .pytest_cache .s3proxy
