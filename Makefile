# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv on first use, installing the package with constraints.txt, which pins the CPU
# build of torch for this machine class (the package itself accepts any recent torch).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-quick test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffalign demo

demo-quick: $(STAMP)
	$(BIN)/diffalign demo --quick --out demo_quick

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/world.py
	$(BIN)/python benchmarks/sampling.py

clean:
	rm -rf $(VENV) demo_out demo_quick .pytest_cache .ruff_cache
