# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# Weight lookups fail at once instead of hanging ~45 s when offline; a local Ray stays on 127.0.0.1.
export HF_HUB_OFFLINE ?= 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

.PHONY: install demo test bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

demo: install
	$(VENV)/bin/refbank demo

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/build_throughput.py
