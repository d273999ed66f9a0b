# Two user-facing targets: `make demo` and `make test` (see README.md).
# Both create the virtualenv, install system packages the tests need (when
# root), build the native extension via `pip install -e .[test]`, then run.

PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test build lint deps clean qemu-test qemu-bench

demo: $(STAMP)
	$(VENV)/bin/uvmbus demo

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

# Developer rebuild of the extension in place (serialised: several shells may build).
build: $(STAMP)
	flock /tmp/uvmbus-build.lock $(VPY) native/build.py

# Userspace NVMe driver on Debian's kernel under QEMU: the round trip alone, and the
# kernel-nvme+fio vs uvmbus benchmark (docs/performance.md; several minutes under TCG).
qemu-test: $(STAMP)
	$(VPY) -m pytest -m qemu $(PYTEST_ARGS)

qemu-bench: $(STAMP)
	nice -n 10 $(VPY) tests/qemuvm/bench.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check uvmbus tests native

deps:
	.ci/install-deps

$(VPY): | deps
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) pyproject.toml setup.py $(wildcard native/*.c native/*.h native/*.py)
	$(VPY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	flock /tmp/uvmbus-build.lock $(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info uvmbus/_native*.so uvmbus/_native.c
