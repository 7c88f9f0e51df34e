# Set-up and the two entry points. `make demo` and `make test` each create the virtualenv on first use.
# PADKD_VENV=/path/to/venv reuses an existing environment instead of building a new one (~6 GB).
VENV ?= $(if $(PADKD_VENV),$(PADKD_VENV),.venv)
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch/torchvision builds that install on our CPU machines (see ENV notes); users may use any >= 2.12 / 0.27.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-fast lint clean

$(VENV)/.padkd-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.padkd-installed
	@# a reused venv may hold another checkout's editable install: point it at this one (seconds)
	@$(PY) -c "import padkd, pathlib, sys; sys.exit(pathlib.Path(padkd.__file__).resolve().is_relative_to(pathlib.Path('src').resolve()) == False)" \
		|| $(PY) -m pip install --quiet --no-deps -e .

demo: venv
	$(VENV)/bin/padkd demo --overwrite

test: venv
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow"

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf runs .pytest_cache
