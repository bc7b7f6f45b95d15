# Two commands: `make demo` (offline demo) and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test bench clean chromium

$(VENV)/.deps: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps requirements-test.txt
	$(PIP) -r requirements-test.txt
	touch $@

# The browser test drives Debian's chromium through playwright (never `playwright install`).
CHROMIUM_APT := apt-get install -y --no-install-recommends chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || $(SUDO) $(CHROMIUM_APT) >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) $(CHROMIUM_APT) >/dev/null)

demo: $(VENV)/.deps
	$(PY) -m dreampeft.demo

# Two pytest-xdist workers of one thread each (tests/conftest.py), a test file per worker at a time
# (module fixtures are built once), the longest files first (conftest.LONGEST_FIRST).
test: $(VENV)/.test-deps chromium
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

bench: $(VENV)/.test-deps
	$(PY) bench/adapters.py

clean:
	rm -rf $(VENV) demo_out dreampeft-app
