# Set-up is part of every target: a fresh machine needs only `make test` or `make demo`.
# They install exactly requirements/lock.txt (hashed) plus torch pinned in requirements/torch.txt;
# pyproject.toml keeps the tested ranges for `pip install lorakit`. `make lock` regenerates the lock.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed-stamp
LOCK := requirements/lock.txt
UV_VERSION := 0.13.9

.PHONY: install lock test lint format demo bench clean

# torch after the lock, so its pure-Python dependencies are already the locked ones; pip's local
# CPU wheel satisfies torch==2.13.0 here, and a GPU machine gets PyPI's build with its CUDA libraries.
$(STAMP): pyproject.toml $(LOCK) requirements/torch.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PIP) install --quiet -r requirements/torch.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PIP) check
	$(PY) requirements/lock.py verify
	touch $(STAMP)

install: $(STAMP)

# uv resolves; it lives in a throwaway venv and is never part of lorakit's install.
lock:
	test -x build/uv/bin/uv || (python3 -m venv build/uv && build/uv/bin/pip install --quiet "uv==$(UV_VERSION)")
	build/uv/bin/python requirements/lock.py compile build/uv/bin/uv

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# Settings in pyproject.toml: [tool.ruff] (rules, line length) and [tool.mypy] (strict public API).
# All three run even when one fails, so one pass shows every problem; any failure fails the target.
lint: $(STAMP)
	status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	$(VENV)/bin/mypy || status=1; \
	exit $$status

# Applies what ruff can fix by itself (import order, syntax upgrades) and the formatting.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(VENV)/bin/lorakit demo

clean:
	rm -rf $(VENV) build *.egg-info
