# Two user-facing targets: `make demo` and `make test` (see README.md).
# Both create the virtualenv, install system packages the tests need (when
# root), build the native extension via `pip install -e .[test]`, then run.

PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test build lint deps clean test-dpdk bench-dpdk bench-lso units-test qemu-test qemu-bench

# `uvmbus` lives in the virtualenv, not on PATH: say where, whether the demo passed or not.
DEMO_ARGS ?=
demo: $(STAMP)
	@$(VENV)/bin/uvmbus demo $(DEMO_ARGS); rc=$$?; \
	echo; \
	echo "uvmbus is installed in the virtualenv $(abspath $(VENV)), not on your PATH:"; \
	echo "  run it as $(abspath $(VENV))/bin/uvmbus ...   or first:   . $(abspath $(VENV))/bin/activate"; \
	exit $$rc

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

# DPDK as an independent guest: the full bring-up matrix (CI runs a subset in `make test`).
test-dpdk: $(STAMP)
	UVMBUS_DPDK_FULL=1 $(VPY) -m pytest tests/dpdk $(PYTEST_ARGS)

# Side-by-side: DPDK's netvsc PMD and uvmbus's driver against one simulator (docs/performance.md).
bench-dpdk: $(STAMP)
	nice -n 10 $(VPY) tests/bench/dpdk_side_by_side.py --rounds 3 $(BENCH_ARGS)

# iperf3 TCP through `uvmbus net bridge` with and without LSO, one run (docs/performance.md; root).
bench-lso: $(STAMP)
	nice -n 10 $(VPY) tests/bench/lso_iperf3.py --seconds 5 --rounds 2 $(BENCH_ARGS)

# The systemd units under a real systemd (Debian's, in systemd-nspawn; root file system cached
# under .cache/units/).  `make test` runs it too; this target shows its progress.
units-test: $(STAMP)
	$(VPY) -m pytest -v -s -p no:cacheprovider tests/test_units_systemd.py $(PYTEST_ARGS)

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
	$(VENV)/bin/ruff check uvmbus tests native fuzz

deps:
	.ci/install-deps

$(VPY): | deps
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) pyproject.toml setup.py $(wildcard native/*.c native/*.h native/*.py native/preload/*.c)
	$(VPY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	flock /tmp/uvmbus-build.lock $(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info uvmbus/_native*.so uvmbus/_native.c

# Integration components: the end-to-end test with the heartbeat answered for minutes
# (a beat every 50 ms, none may be missed); CI runs it for 3 s.
IC_SOAK_SECONDS ?= 300
.PHONY: ic-soak
ic-soak: $(STAMP)
	UVMBUS_IC_HEARTBEAT_SECONDS=$(IC_SOAK_SECONDS) nice -n 10 $(VPY) -m pytest -q -s tests/test_ic_sim.py -k end_to_end

# Every fuzz harness (libFuzzer over native/, atheris over the Python parsers) for
# FUZZ_SECONDS each, under nice; per-harness executions and coverage (docs/reliability.md).
.PHONY: fuzz
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(VPY) fuzz/run.py --seconds $(FUZZ_SECONDS)

# The fault matrix (every simulator fault x netvsc driver, storvsc driver, blk export):
# runs it and writes the table into docs/reliability.md (CI runs it as tests/test_fault_matrix.py).
.PHONY: fault-matrix
fault-matrix: $(STAMP)
	$(VPY) tests/faultmatrix.py --markdown docs/reliability.md

# Long form of the durability and soak tests (CI runs 4 kill rounds and an 8 s soak):
# 40 rounds of kill -9 of the export / the simulator, then a 5-minute soak with RSS/fd samples.
.PHONY: soak
SOAK_SECONDS ?= 300
KILL_ROUNDS ?= 40
soak: $(STAMP)
	UVMBUS_KILL_ROUNDS=$(KILL_ROUNDS) UVMBUS_SOAK_SECONDS=$(SOAK_SECONDS) nice -n 10 \
	  $(VPY) -m pytest -q -s tests/test_reliability_durability.py
