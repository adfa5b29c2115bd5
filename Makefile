# Two entry points (README quick start): `make reproduce` and `make test`.
# Both create .venv, install system packages the pipeline needs (ngspice) and the package with extras.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= tiny
CORES  ?= all
# CPU wheel on machines without a GPU; on a GPU machine the same pin pulls the CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: readme-results setup system reproduce test ci-pipeline report lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[all]"
	touch $@

system:
	@if ! command -v ngspice >/dev/null 2>&1 || ! ls /usr/lib/*/libngspice.so* >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ngspice libngspice0-dev; \
	  else echo "gaincell: install ngspice and libngspice0 (e.g. apt-get install ngspice libngspice0-dev)" >&2; exit 1; fi; \
	fi

setup: system $(VENV)/.installed

reproduce: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/snakemake --cores $(CORES) --config profile=$(PROFILE)

# the README's results section, regenerated from the last run of $(PROFILE)
readme-results: setup
	$(BIN)/python -m gaincell.figures.readme results/$(PROFILE) README.md

report: setup
	$(BIN)/snakemake --config profile=$(PROFILE) --report results/$(PROFILE)/report.html

test: setup
	WANDB_MODE=disabled $(BIN)/python -m pytest -n 2 --timeout 900 tests

ci-pipeline: setup
	WANDB_MODE=disabled $(BIN)/snakemake --cores all --config profile=ci

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/snakemake --lint --config profile=$(PROFILE)

clean:
	rm -rf results/tiny results/ci .snakemake
