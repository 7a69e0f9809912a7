# One command to run the proxy, one to run the tests; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# checkov (tests/test_kubernetes.py) in a venv of its own inside $(VENV): its pins
# (cachetools<6, packaging<24) would break the proxy's cachetools>=8 and pytest's packaging>=24.
CHECKOV_VENV := $(VENV)/checkov
# Claude Code and Codex for tests/test_coding_agents.py, at the versions its package-lock.json
# pins, in its node_modules; npm ci runs again only when the lock changes.
AGENTS := tests/agents

.PHONY: run test bench bench-litellm clean agents

run: $(VENV)/.installed
	$(BIN)/python wsgi.py

test: $(VENV)/.installed-dev $(CHECKOV_VENV)/.installed agents
	CHECKOV=$(CHECKOV_VENV)/bin/checkov $(BIN)/python -m pytest -q

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench run $(BENCH_ARGS)

$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(CHECKOV_VENV)/.installed: requirements-deploy.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --disable-pip-version-check -r requirements-deploy.txt
	touch $@

# Only where npm is: without it the agents' tests skip (in CI they fail; .ci/run installs npm).
agents:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(AGENTS)/node_modules/.installed; \
	else echo "npm not found: tests/test_coding_agents.py will skip"; fi

$(AGENTS)/node_modules/.installed: $(AGENTS)/package.json $(AGENTS)/package-lock.json
	cd $(AGENTS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# LiteLLM for `python -m bench targets` (issue 20's peer), in a venv of its own: its pins
# (fastapi, pydantic, openai, boto3) are nothing the proxy should carry.
LITELLM_VENV := $(VENV)/litellm
bench-litellm: $(LITELLM_VENV)/.installed

$(LITELLM_VENV)/.installed: bench/litellm/requirements.txt
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q --disable-pip-version-check \
		-r bench/litellm/requirements.txt
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-dev requirements-bench.txt
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $@

clean:
	rm -rf $(VENV)
