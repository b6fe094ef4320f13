# Two commands do all set-up on a fresh clone (Python 3.11+ with venv and pip):
#   make run    # creates .venv, installs CryoSphere, runs the notebook series (quick profile)
#   make test   # creates .venv, installs CryoSphere, runs lint, format check, unit tests, notebooks
# Both reuse the virtual environment once it is installed. An extra, not a set-up step:
#   make lab    # JupyterLab on notebooks/ with the .venv kernel (the notebooks share runs/default)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cryosphere-installed
PROFILE ?= quick
STRUCTURE ?= 1ubi
NAME ?= $(STRUCTURE)-$(PROFILE)

.PHONY: install run lab test lint docs docs-serve clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,notebooks,export,bench,docs]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/cryosphere run --profile $(PROFILE) --structure $(STRUCTURE) --name $(NAME)

lab: $(STAMP)
	$(BIN)/python -m cryosphere.runs.lab $(LAB_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cryosphere tests benchmarks notebooks
	$(BIN)/ruff format --check cryosphere tests benchmarks notebooks

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

test: lint docs
	$(BIN)/python -m pytest tests notebooks --nbval-lax -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
