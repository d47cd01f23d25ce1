# Development tasks. `make demo` and `make test` bootstrap everything from a fresh clone:
# a .venv with the package and its test extra, and the Node tools in tests/node.

PYTHON ?= python3
VENV := .venv
NODE_DIR := tests/node
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
SOAK_ARGS ?=

VENV_STAMP := $(VENV)/.installed
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

.PHONY: demo test bench soak lint clean

# A throwaway JupyterHub on loopback with the proxy in front; Ctrl-C stops it and cleans up.
demo: $(VENV_STAMP) $(NODE_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$(CURDIR)/$(NODE_DIR)/node_modules/.bin:$$PATH" \
		$(VENV)/bin/jupyter-dev-server demo $(DEMO_ARGS)

test: $(VENV_STAMP) $(NODE_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$(CURDIR)/$(NODE_DIR)/node_modules/.bin:$$PATH" \
		$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Proxy performance against a local TLS jupyter_server, direct vs through the proxy (and through
# configurable-http-proxy if `make test` installed it); about 4 minutes. See benchmarks/README.md.
# BENCH_ARGS=--quick for a one-minute smoke run. The WAN workload's far end is configurable-http-proxy.
bench: $(VENV_STAMP) $(NODE_STAMP)
	$(VENV)/bin/python -m benchmarks.run $(BENCH_ARGS)

# 1,000 cycles of HTTP requests and kernel WebSockets through the proxy against a real hub, one in ten
# aborted (client resets, hub side cut); fails unless the proxy's open files and RSS come back to
# where they started. About a minute. SOAK_ARGS=--help for the knobs.
soak: $(VENV_STAMP) $(NODE_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$(CURDIR)/$(NODE_DIR)/node_modules/.bin:$$PATH" \
		$(VENV)/bin/python -m benchmarks.soak $(SOAK_ARGS)

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check jds tests twisted

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules build *.egg-info .pytest_cache .ruff_cache \
		.hypothesis _trial_temp
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f twisted/plugins/dropin.cache

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the package metadata changes; then refresh twistd's plugin cache.
$(VENV_STAMP): setup.cfg setup.py | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -e '.[test]'
	$(VENV)/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $@

# `npm ci` installs exactly the lock file; `npm install` writes one on the first run.
$(NODE_STAMP): $(NODE_DIR)/package.json $(wildcard $(NODE_DIR)/package-lock.json)
	cd $(NODE_DIR) && if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; \
		else npm install --no-audit --no-fund; fi
	touch $@
