# metacli developer commands. `make train` and `make test` install on their own.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# Optional extras installed for development and tests (mlflow and ray: by hand).
EXTRAS ?= dev,plot,joblib,submitit,optuna,tensorboard,wandb,qpth,sklearn
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install train test test-full lint bench clean

install: $(STAMP)

# Torch goes in first, from an explicit spec, so the package's loose `torch`
# requirement is already satisfied and pip never reaches for a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/metacli train $(ARGS)

# The tests run in JOBS processes (pytest-xdist), one torch thread each: most tests are
# many small operations, so two processes on two cores beat one process with two threads
# (measured: 329 s against 594 s for `make test`).
JOBS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(JOBS)

test: $(STAMP)
	$(PYTEST) -m "not slow" $(ARGS)

test-full: $(STAMP)
	$(PYTEST) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
