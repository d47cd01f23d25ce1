# Development tasks. `make demo` and `make test` bootstrap everything from a fresh clone:
# a .venv with the package and its test extra, and the Node tools in tests/node.

PYTHON ?= python3
VENV := .venv
NODE_DIR := tests/node
PYTEST_ARGS ?=
# pytest-xdist workers for make test (0: one process); each takes whole test files, so a module's hub is shared
PYTEST_WORKERS ?= 2
DEMO_ARGS ?=
BENCH_ARGS ?=
SOAK_ARGS ?=
# make test-compat: the JupyterHub releases the hub-facing tests run against, one venv each, built
# from .ci/compat/hub-<version>.txt (COMPAT_HUBS=6 for one); COMPAT_PYTEST_ARGS narrows the tests.
COMPAT_HUBS ?= 3.1 4.1 5 6
COMPAT_DIR := .compat
COMPAT_PYTEST_ARGS ?=
# COMPAT_LEAN=1 (what CI runs, see .ci/run): 3.1 runs every hub test, the other hubs leave out the
# tests of the proxy's own local port and hub link (security, faults, reconnect, the vias, its log and
# HTTP/1.1 persistence), which make test runs.
COMPAT_LEAN ?=
COMPAT_LEAN_ARGS := --ignore=tests/test_security_hub.py --ignore=tests/test_faults_hub.py \
	--ignore=tests/test_reconnect_hub.py --ignore=tests/test_via_hub.py --ignore=tests/test_via_ssh_hub.py \
	--ignore=tests/test_daemon_log_hub.py --ignore=tests/test_http_hub.py
OLDEST := $(COMPAT_DIR)/oldest

VENV_STAMP := $(VENV)/.installed
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

.PHONY: demo test test-compat test-oldest constraints-oldest bench soak lint clean

# A throwaway JupyterHub on loopback with the proxy in front; Ctrl-C stops it and cleans up.
demo: $(VENV_STAMP) $(NODE_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$(CURDIR)/$(NODE_DIR)/node_modules/.bin:$$PATH" \
		$(VENV)/bin/jupyter-dev-server demo $(DEMO_ARGS)

test: $(VENV_STAMP) $(NODE_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$(CURDIR)/$(NODE_DIR)/node_modules/.bin:$$PATH" \
		$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The hub-facing tests (pytest marker `hub`) against each of COMPAT_HUBS: pytest and the proxy run from
# .venv, the hub and its single-user servers from .compat/hub-<version>. Ends with one line per hub.
test-compat: $(VENV_STAMP) $(NODE_STAMP) $(foreach hub,$(COMPAT_HUBS),$(COMPAT_DIR)/hub-$(hub)/.installed)
	PATH="$(CURDIR)/$(VENV)/bin:$(CURDIR)/$(NODE_DIR)/node_modules/.bin:$$PATH" \
		$(VENV)/bin/python .ci/test_compat.py --pytest-args "-n $(PYTEST_WORKERS) --dist loadfile $(COMPAT_PYTEST_ARGS)" \
		$(if $(COMPAT_LEAN),--lean-args "$(COMPAT_LEAN_ARGS)" --full 3.1) \
		$(foreach hub,$(COMPAT_HUBS),$(COMPAT_DIR)/hub-$(hub))

# The whole suite with the oldest Twisted, pyOpenSSL, service-identity and autobahn setup.cfg allows.
test-oldest: $(OLDEST)/.installed $(NODE_STAMP)
	PATH="$(CURDIR)/$(OLDEST)/bin:$(CURDIR)/$(NODE_DIR)/node_modules/.bin:$$PATH" \
		$(OLDEST)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -p no:cacheprovider \
		--basetemp=$(OLDEST)/tmp $(PYTEST_ARGS)

# Pins of install_requires to the oldest releases they allow, for test-oldest.
constraints-oldest: $(COMPAT_DIR)/oldest-constraints.txt
	cat $<

# Proxy performance against a local TLS jupyter_server, direct vs through the proxy (and through
# configurable-http-proxy if `make test` installed it); about 6-7 minutes. See benchmarks/README.md.
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
	rm -rf $(VENV) $(COMPAT_DIR) $(NODE_DIR)/node_modules build *.egg-info .pytest_cache .ruff_cache \
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

# One venv per hub release, holding only the hub and single-user side (no jupyter-dev-server);
# versions.txt records what pip resolved.
$(COMPAT_DIR)/hub-%/.installed: .ci/compat/hub-%.txt
	rm -rf $(COMPAT_DIR)/hub-$*
	$(PYTHON) -m venv $(COMPAT_DIR)/hub-$*
	$(COMPAT_DIR)/hub-$*/bin/python -m pip install -q -r $<
	$(COMPAT_DIR)/hub-$*/bin/python -m pip freeze > $(COMPAT_DIR)/hub-$*/versions.txt
	touch $@

$(COMPAT_DIR)/oldest-constraints.txt: setup.cfg .ci/oldest_constraints.py | $(VENV_STAMP)
	mkdir -p $(COMPAT_DIR)
	$(VENV)/bin/python .ci/oldest_constraints.py setup.cfg > $@.tmp
	mv $@.tmp $@

$(OLDEST)/.installed: $(COMPAT_DIR)/oldest-constraints.txt setup.cfg setup.py
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q -c $< -e '.[test]'
	$(OLDEST)/bin/python -m pip freeze > $(OLDEST)/versions.txt
	$(OLDEST)/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $@
