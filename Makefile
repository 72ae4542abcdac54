# make demo / make test create .venv once (reused afterwards) and install the project into it.
# pip's own output goes to .venv/install.log (shown only if the install fails), so a first `make demo` prints the
# demo: progress, the side-by-side table and where to look in MLflow.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOG := $(VENV)/install.log
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: demo test test-all lint install clean-runs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	@echo "metacore: installing into $(VENV) (first run only, a few minutes; pip's log: $(LOG))"
	@( $(PIP) --upgrade pip && $(PIP) torch==2.14.1 torchvision==0.29.1 && $(PIP) -e ".[dev,ray]" ) > $(LOG) 2>&1 \
		|| { tail -n 30 $(LOG); echo "metacore: install failed; full log in $(LOG)"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@echo "metacore demo: digits (scikit-learn's handwritten digits), hypergrad beside a static baseline"
	@HF_HUB_OFFLINE=1 $(BIN)/metacore run --task digits --controller hypergrad --preset small

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check metacore tests benchmarks

clean-runs:
	rm -rf mlflow_runs/mlflow.db mlflow_runs/artifacts mlflow_runs/checkpoints
