# Set-up and entry points. `make demo` and `make test` each do all set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Jobs run `python -m unicom.<stage>`: the venv's python must come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
# The demo and the tests never reach a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo ablations protocols report test lint clean

setup: $(VENV)/.installed

# torch is pinned to the release the constraints were tested with; everything else is
# pinned by requirements/constraints.txt so a fresh machine gets the tested versions.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[demo,test,docs]'
	touch $@

# The offline demo, end to end through Snakemake, then its HTML report.
demo: setup
	$(BIN)/snakemake --profile profiles/local
	$(BIN)/snakemake --profile profiles/local --report results/report.html

# The demo's ablation grid (config/ablations.yaml: 8 variants + baseline x 3 seeds) on top of
# the demo run, which it reuses; not part of `make demo` or the tests (docs/ablations.md gives its time).
ablations: setup
	$(BIN)/snakemake ablations --profile profiles/local --configfile config/config.yaml config/ablations.yaml
	$(BIN)/snakemake all ablations --profile profiles/local --report results/report.html \
		--configfile config/config.yaml config/ablations.yaml

# The paper's three protocols (zero-shot, linear probe, fine-tuned retrieval) for base vs trained
# on the demo's data (config/protocols.yaml); reuses a finished demo run.
protocols: setup
	$(BIN)/snakemake all --profile profiles/local --configfile config/config.yaml config/protocols.yaml
	$(BIN)/snakemake all --profile profiles/local --report results/report.html \
		--configfile config/config.yaml config/protocols.yaml

# Two workers, a file each at a time: the SLURM tests' waiting overlaps with the other files.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check workflow bench tests
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint --cores 1
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf results .snakemake site
