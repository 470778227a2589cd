# Every target bootstraps .venv from requirements.lock when it is missing or stale.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# uv installs requirements.lock in 30 s where pip takes 2.5 min (parallel downloads, unpacking
# and bytecode compiling): a fresh clone's `make bench` or `make test` starts that much sooner
UV_VERSION := 0.13.8
UI_PORT ?= 5000
LAB_PORT ?= 8888
PORT ?= 8000
# The browser tests drive Debian's chromium (Playwright's own browser download is not allowed here)
CHROMIUM := /usr/bin/chromium
# Apache Airflow runs exported DAGs from a virtual environment of its own: its pins fight ours
AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed
# nbs server and the tests start Debian's PostgreSQL from the project's own folder
POSTGRES_CTL = $(firstword $(wildcard /usr/lib/postgresql/*/bin/pg_ctl))
AS_ROOT := $(if $(filter 0,$(shell id -u)),,sudo)

export PLOOMBER_STATS_ENABLED := false
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

.PHONY: help lab run test test-fast export docs clean-nbs lint check nbdev-test pytest ui lock clean bench serve loop sample check-change deliver cd server postgresql airflow

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): requirements.lock setup.py settings.ini pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "nbs needs Python 3.11: requirements.lock is resolved for it. Try: make PYTHON=python3.11 ...")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps --compile-bytecode -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# an editable install is not compiled: where PYTHONDONTWRITEBYTECODE is set, each nbs process would compile nbs_lib anew
	$(BIN)/python -m compileall -q nbs_lib
	$(BIN)/pip check
	@touch $(STAMP)

run: $(STAMP) export ## run the whole pipeline on the default data, tracked in ./mlflow.db
	$(BIN)/nbs run

$(CHROMIUM):
	@echo "Installing Debian's chromium for the browser tests (apt-get)"
	$(AS_ROOT) apt-get install -y -qq --no-install-recommends chromium || \
	  { $(AS_ROOT) apt-get update -qq && $(AS_ROOT) apt-get install -y -qq --no-install-recommends chromium; }

postgresql: ## install Debian's PostgreSQL when it is missing (nbs server runs it from .nbs-server/)
	@test -n "$(POSTGRES_CTL)" || { echo "Installing Debian's postgresql (apt-get)"; \
	  $(AS_ROOT) apt-get install -y -qq --no-install-recommends postgresql || \
	  { $(AS_ROOT) apt-get update -qq && $(AS_ROOT) apt-get install -y -qq --no-install-recommends postgresql; }; }

$(AIRFLOW_STAMP): requirements-airflow.lock
	@test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	@# compiled as .venv is: where PYTHONDONTWRITEBYTECODE is set, each Airflow process (API server, scheduler, DAG
	@# processor, task runners) compiled Airflow and its dependencies from source at every start (importing Airflow's
	@# models and task SDK: 3.2 s of CPU without bytecode, 1.4 s with it; compiling all of it once: about 10 s of CPU)
	$(AIRFLOW_VENV)/bin/uv pip install --quiet --python $(AIRFLOW_VENV)/bin/python --no-deps --compile-bytecode -r requirements-airflow.lock
	$(AIRFLOW_VENV)/bin/pip check
	@touch $(AIRFLOW_STAMP)

airflow: $(AIRFLOW_STAMP) ## Apache Airflow in .venv-airflow, to run the DAG `nbs export airflow` writes

server: $(STAMP) postgresql ## the team's MLflow server (PostgreSQL, basic auth) on 127.0.0.1:5001; needs MLFLOW_AUTH_ADMIN_PASSWORD
	$(BIN)/nbs server

# pytest on three workers for two cores: much of a test's time is a kernel or a server starting, a process
# importing or a request waiting, so a third worker fills the cores (a fresh clone's pytest: 17.5, 19 and 23 minutes
# in three runs, against 20 to 21 with two on earlier days; the machines are noisy). A fourth does not help: 29.7
# minutes against 25.6 with three on 2026-12-03, the modules' test times 1.25 to 1.86x longer (all but one): the
# cores are what the suite waits for. --dist loadfile keeps each module on one worker, so a module's fixtures (the
# team server, the serving registry, the own-data builds) are made once, and the session's shared build is made
# once for all workers. (Not loadgroup: pytest 9 ignores the nodeid suffix that xdist 3.8 groups by, so
# xdist_group marks group nothing; checked with -v, where grouped tests ran on both workers.)
# --no-loadscope-reorder: modules are handed out in collection order, which tests/conftest.py makes
# longest first (xdist's own order, most tests first, left the one-test benchmark module to the end).
PYTEST_PARALLEL := -n 3 --dist loadfile --no-loadscope-reorder

test: $(STAMP) $(CHROMIUM) postgresql $(AIRFLOW_STAMP) ## everything CI checks: hygiene, lint, nbdev_test, pytest (browser, PostgreSQL, MLflow server and Airflow included)
	$(BIN)/nbs check
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/pytest $(PYTEST_PARALLEL)

test-fast: $(STAMP) $(CHROMIUM) ## the inner loop (a few minutes): hygiene, lint, nbdev_test and the tests that build no pipeline
	$(BIN)/nbs check
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/pytest $(PYTEST_PARALLEL) -m "not build"

export: $(STAMP) ## regenerate nbs_lib/ and README.md from notebooks/ (README.md: from notebooks/index.ipynb)
	$(BIN)/nbdev_export
	$(BIN)/python -c 'from nbs_lib.dev.hygiene import write_readme; write_readme(".")'

docs: $(STAMP) export ## the documentation site from the notebooks in _docs/ (open _docs/index.html); fails on a broken link
	$(BIN)/nbs docs

clean-nbs: $(STAMP) ## strip outputs and metadata from every notebook (before committing)
	$(BIN)/nbdev_clean
	find notebooks -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' -print0 | xargs -0 $(BIN)/nbstripout --keep-id

lab: $(STAMP) export ## JupyterLab on 127.0.0.1 (port 8888, or LAB_PORT=...): task notebooks open with their upstream injected
	@echo "JupyterLab: the URL with its token is printed below (Ctrl-C stops it)"
	$(BIN)/jupyter lab --no-browser --ip 127.0.0.1 --port $(LAB_PORT) $(if $(filter 0,$(shell id -u)),--allow-root)

ui: $(STAMP) ## MLflow UI on 127.0.0.1 (port 5000, or UI_PORT=...) over ./mlflow.db
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)  (Ctrl-C stops it)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(UI_PORT) --workers 1

serve: $(STAMP) ## serve the champion of env.yaml's model_name on http://127.0.0.1:8000 (PORT=...)
	$(BIN)/nbs serve --port $(PORT)

loop: $(STAMP) export ## the MLOps loop on the default data: serve, traffic with drift, monitor, retrain, reload
	scripts/loop.sh

sample: $(STAMP) export ## the pipeline on a 150-row sample, in experiment and model nbs-sample (products/sample)
	$(BIN)/python scripts/sample_data.py products/sample/data.csv
	$(BIN)/nbs run -p data_path=products/sample/data.csv -p products=products/sample -p experiment=nbs-sample \
	  -p model_name=nbs-sample -p tune_trials=3 -p cv_folds=3

check-change: test sample ## CI on every change (.github/workflows/ci.yml): the tests, then the pipeline on a sample

deliver: $(STAMP) export ## CD on main: the full pipeline and the promotion gate (the only automatic way to champion)
	$(BIN)/nbs run

cd: check-change deliver ## the whole CI/CD workflow, locally: tests, sample pipeline, full pipeline and gate

bench: $(STAMP) ## the benchmark suite (15 to 25 minutes): every figure against its baseline, written to BENCHMARKS.md
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lock: ## re-resolve settings.ini's requirements into requirements.lock and env.yml
	scripts/lock.sh

clean: ## remove products, the embedded MLflow store and the prediction log (keeps .venv and .nbs-server)
	rm -rf products mlflow.db mlflow.db.lock mlartifacts predictions.db predictions.db-wal predictions.db-shm alerts.jsonl
