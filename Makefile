# The two quick-start commands: `make demo` and `make test`. Both create/reuse .venv and install
# what they need themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-eimis

.PHONY: demo test bench lint clean libmagic

$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3-venv missing: installing it with apt-get"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

# libmagic reads files' real types from their content (python-magic loads it).
libmagic:
	@ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1' || { \
	  echo "libmagic missing: installing it with apt-get"; \
	  apt-get update -qq && apt-get install -y -qq libmagic1 >/dev/null; }

demo: $(STAMP) libmagic
	$(VENV)/bin/eimis-bridge demo

test: $(STAMP) libmagic
	$(VENV)/bin/ruff check bridge connectors tests bench
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: $(STAMP) libmagic
	$(PY) bench/run.py

# ruff, then the layering contracts of pyproject.toml's [tool.importlinter] (import-linter).
lint: $(STAMP)
	$(VENV)/bin/ruff check bridge connectors tests bench
	$(VENV)/bin/lint-imports

clean:
	rm -rf .demo .pytest_cache
