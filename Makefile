# The README's commands. Each one installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.installed-dev

.PHONY: install run test lint bench clean

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(INSTALLED)

$(DEV_INSTALLED): $(INSTALLED)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(DEV_INSTALLED)

## install: .venv with cachesvc (its command is .venv/bin/cachesvc) and the tools of the
## tests and benchmarks (pytest, ruff, mypy, locust, ...)
install: $(DEV_INSTALLED)

## run: install, then serve the embedded default (one in-process memory tier) on 127.0.0.1:8787
run: $(INSTALLED)
	$(VENV)/bin/cachesvc serve $(ARGS)

## test: install the servers the tests start (Debian packages) and the package, then run every test
test: $(DEV_INSTALLED)
	scripts/install-system-deps.sh
	@# pytest exits 5 when it collected nothing: an empty suite must not pass as green.
	$(VENV)/bin/pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

## lint: formatting, lint and strict typing
lint: $(DEV_INSTALLED)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## bench: the side-by-side benchmark (see bench/README.md)
bench: $(DEV_INSTALLED)
	scripts/install-system-deps.sh
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
