# `make repro` and `make test` set everything up on a fresh machine, then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DVC runs each stage's `python` through the shell: put the venv first on PATH so that it
# is the project's interpreter however make was started.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
LOCAL_ARCHIVE := $(abspath ../cifar-10-python.tar.gz)

.PHONY: setup repro test bench local-data

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

repro: setup
	dvc repro

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.precision
	$(PY) -m bench.run
	$(PY) -m bench.time_to_accuracy

# Offline: rebuild the archive from ../shared/data and point params.yaml at it.
local-data: setup
	test -f $(LOCAL_ARCHIVE) || $(PY) ../shared/tools/make_cifar_tarball.py --out $(LOCAL_ARCHIVE)
	md5=$$(md5sum $(LOCAL_ARCHIVE) | cut -d' ' -f1) && \
	sed -i -e "s|^  url: .*|  url: file://$(LOCAL_ARCHIVE)|" -e "s|^  md5: .*|  md5: $$md5|" params.yaml
	grep -E '^  (url|md5):' params.yaml
