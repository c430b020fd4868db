# Two commands for a fresh machine: `make run` (the main job) and `make test` (the suite).
# Both create the virtual environment on first use (pip + venv: the local torch wheel is only
# visible to pip).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast browser bench-tools pipeline prefect-server deployment repro rollback validate monitor compare serve \
	bench bench-small bench-quality bench-quality-small bench-photos tune docs lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
PREFECT_PORT ?= 4200

# The main job: the Wikipedia stages dropped one by one into data/incoming, each processed by the
# pipeline flow (validate, train, export, monitor, version, promote) on Prefect's temporary server.
run: $(STAMP)
	$(BIN)/python -m flows.main_job

# One pipeline run over whatever is in data/incoming now
pipeline: $(STAMP)
	$(BIN)/python -m flows.pipeline

# A real Prefect server on loopback (UI at http://127.0.0.1:$(PREFECT_PORT)); keep it running
prefect-server: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# The deployment of prefect.yaml on that server: work pool, prefect deploy, a worker, the arrival watcher
deployment: $(STAMP)
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python -m flows.deployment

# dvc.yaml: the whole stage sequence from the raw data (lhash run + lhash export)
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Make an earlier pipeline version current and served again: make rollback VERSION=v0002
rollback: $(STAMP)
	$(BIN)/lhash rollback "$(VERSION)"

# Check a batch before it is trained on: make validate BATCH=path/to/batch.npz
validate: $(STAMP)
	$(BIN)/lhash validate "$(BATCH)" --state runs/pipeline/state

# Evidently report of the latest increment of the main run, added to reports/workspace
monitor: $(STAMP)
	$(BIN)/lhash monitor --state runs/pipeline/state

compare: $(STAMP)
	$(BIN)/lhash compare

# The retrieval service on the pipeline's promoted version (make run first)
serve: $(STAMP)
	$(BIN)/lhash serve --models runs/pipeline/models

# Headless Chromium + ChromeDriver from Debian for the report-rendering test (root or sudo).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver \
	  || { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; }; }

# wrk (Debian), the compiled load generator of bench/serve_load.py; py-spy comes with the dev extras.
bench-tools:
	command -v wrk >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y --no-install-recommends wrk \
	  || { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends wrk; }; }

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-fast: $(STAMP)  # the unit tier, for the inner loop (tiers: pyproject.toml, markers)
	$(BIN)/pytest -q -m unit

bench: $(STAMP)
	$(BIN)/python bench/lifelong_scaling.py
	$(BIN)/python bench/search_speed.py
	$(BIN)/python bench/eval_speed.py
	$(BIN)/python bench/memory.py

bench-small: $(STAMP)
	$(BIN)/python bench/lifelong_scaling.py --small --no-wikipedia
	$(BIN)/python bench/search_speed.py --small
	$(BIN)/python bench/eval_speed.py --small
	$(BIN)/python bench/memory.py --small

# The benchmark that decides the default method (bench/results/quality.json, tables, figures)
bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py --jobs 2

# The settings sweep behind params.yaml, on a validation split with tuning seeds (docs/methods.md)
tune: $(STAMP)
	$(BIN)/python bench/tune.py --jobs 2

bench-quality-small: $(STAMP)
	$(BIN)/python bench/quality.py --small

# Photos in (docs/images.md): make bench-photos PHOTOS=dir/with/mirflickr25k/photos (default: the 300 in data/)
PHOTOS ?= data/mirflickr25k/photos
bench-photos: $(STAMP)
	$(BIN)/python bench/photos.py --photos "$(PHOTOS)"

docs: $(STAMP)  # the benchmark tables of docs/benchmarks.md and README.md, from bench/results/*.json
	$(BIN)/python bench/report.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs models reports .pytest_cache .ruff_cache
