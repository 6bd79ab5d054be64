# The two commands a fresh machine needs: `make run` and `make test`. Everything else builds on `setup`.
SHELL := /bin/bash
VENV := .venv
PY := $(abspath $(VENV))/bin/python
DATA ?= data
SOURCE ?= auto
# Python workers and the driver run the venv's interpreter, whoever starts Spark.
export PYSPARK_PYTHON := $(PY)
export PYSPARK_DRIVER_PYTHON := $(PY)
SPARK_SUBMIT := $(VENV)/bin/spark-submit --properties-file spark-defaults.conf

.PHONY: setup run download pipeline ingest features train serve test lint format clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed  ## create .venv with the package and its dev extras (idempotent)

run: setup download pipeline  ## acquire the data (Kaggle, or the embedded sample) and run every stage
	@echo "outputs: $(DATA)/raw  $(DATA)/lake/{prices,rejects,features}  $(DATA)/model (metrics.json)"

download: setup
	$(PY) jobs/download.py --source $(SOURCE) --data-dir $(DATA)

pipeline: setup
	$(SPARK_SUBMIT) jobs/pipeline.py --data-dir $(DATA)

ingest features train: setup
	$(SPARK_SUBMIT) jobs/$@.py --data-dir $(DATA)

test: setup  ## lint, then the whole test suite (real Spark, Delta, MLlib, HTTP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(DATA) spark-warehouse metastore_db derby.log .pytest_cache
