# The two quick-start commands: `make demo` and `make test`. Both create/reuse .venv and install
# what they need themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-eimis

.PHONY: demo test bench lint clean libmagic catalogs mailsystem

$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3-venv missing: installing it with apt-get"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

# The message catalogs (bridge/i18n.py), compiled after installing and whenever a .po changes.
PO_FILES := $(wildcard bridge/locale/*/LC_MESSAGES/eimis.po)
MO_FILES := $(PO_FILES:.po=.mo)
catalogs: $(MO_FILES)
$(MO_FILES): %.mo: %.po $(STAMP)
	$(PY) -m bridge.devtools.catalogs compile

# libmagic reads files' real types from their content (python-magic loads it).
libmagic:
	@ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1' || { \
	  echo "libmagic missing: installing it with apt-get"; \
	  apt-get update -qq && apt-get install -y -qq libmagic1 >/dev/null; }

# Dovecot (IMAP, LMTP) and Postfix for the local MSSanté-like operator (bridge/devtools/mailsystem.py),
# installed with apt-get when missing; the system's own services are left stopped.
mailsystem: $(STAMP)
	$(PY) -c 'from bridge.devtools.mailsystem import ensure_packages; ensure_packages()'

demo: $(STAMP) libmagic catalogs
	$(VENV)/bin/eimis-bridge demo

test: $(STAMP) libmagic catalogs mailsystem
	$(VENV)/bin/ruff check bridge connectors tests bench
	$(VENV)/bin/lint-imports
	$(PY) -m bridge.devtools.catalogs check
	$(PY) -m pytest -q

bench: $(STAMP) libmagic catalogs
	$(PY) bench/run.py

# ruff, then the layering contracts of pyproject.toml's [tool.importlinter] (import-linter).
lint: $(STAMP)
	$(VENV)/bin/ruff check bridge connectors tests bench
	$(VENV)/bin/lint-imports

clean:
	rm -rf .demo .pytest_cache
