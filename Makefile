# Two commands for a fresh machine: `make run` (the main job) and `make test` (the suite).
# Both create the virtual environment on first use (pip + venv: the local torch wheel is only
# visible to pip).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test browser validate monitor compare serve bench bench-small lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/lhash run

# Check a batch before it is trained on: make validate BATCH=path/to/batch.npz
validate: $(STAMP)
	$(BIN)/lhash validate "$(BATCH)" --state runs/wikipedia/state

# Evidently report of the latest increment of the main run, added to reports/workspace
monitor: $(STAMP)
	$(BIN)/lhash monitor --state runs/wikipedia/state

compare: $(STAMP)
	$(BIN)/lhash compare

serve: $(STAMP)
	test -f runs/wikipedia/state/state.json || $(BIN)/lhash run
	$(BIN)/lhash export --state runs/wikipedia/state --promote
	$(BIN)/lhash serve

# Headless Chromium + ChromeDriver from Debian for the report-rendering test (root or sudo).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver \
	  || { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; }; }

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/pytest -q

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

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs models reports .pytest_cache .ruff_cache
