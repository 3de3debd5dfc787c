# deltaxfer: every target installs what it needs (apt as root, pip into .venv) and is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := gcc make pkg-config liblz4-dev libxxhash-dev iproute2 util-linux rsync
CORE_SOURCES := $(wildcard ext/*.pyx ext/*.pxd ext/*.pxi ext/c/*.c ext/c/*.h ext/hook/*.c) setup.py
PYTEST_ARGS ?=

.PHONY: all deps criu runc programs venv build test demo bench bench-compare bench-migrate bench-deps fuzz clean distclean

all: build

# Debian packages, installed only when one is missing (apt-get update only then).
deps: .local/.deps-ok
.local/.deps-ok: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "deps: installing $$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "deps: run as root to install: $$missing" >&2; exit 1; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p .local && touch $@

# A criu that passes `criu check` (system one if it does, else Debian 13's in .local/criu).
criu: deps
	@bash scripts/install-criu.sh

# runc containers (src/deltaxfer/runc.py, tests/test_runc.py, docs/CONTAINERS.md): Debian's
# runc, a static busybox for the test containers' rootfs, iptables (runc's CRIU restore of
# a container with its own network namespace runs iptables-restore). runc is pointed at the
# project's criu with its global --criu option (deltaxfer.runc), not through PATH.
RUNC_APT_PACKAGES := runc busybox-static iptables
runc: .local/.runc-ok
.local/.runc-ok: Makefile .local/.deps-ok
	@missing=$$(for p in $(RUNC_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "runc: installing $$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "runc: run as root to install: $$missing" >&2; exit 1; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@runc --version >/dev/null
	@touch $@

# Real programs from Debian migrated by tests/test_real_programs.py (memcached on a unix
# socket, nginx on a unix socket); numpy comes from PyPI through the test extra. No
# service is started by the install (policy-rc.d, as bench-deps does).
PROGRAMS_APT_PACKAGES := memcached nginx
programs: .local/.programs-ok
.local/.programs-ok: Makefile .local/.deps-ok
	@missing=$$(for p in $(PROGRAMS_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "programs: installing $$missing (no service is started: policy-rc.d)"; \
		if [ "$$(id -u)" != 0 ]; then echo "programs: run as root to install: $$missing" >&2; exit 1; fi; \
		own=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own=1; }; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; rc=$$?; \
		[ -z "$$own" ] || rm -f /usr/sbin/policy-rc.d; [ $$rc = 0 ] || exit $$rc; \
	fi
	@memcached -h >/dev/null && nginx -v 2>/dev/null
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml .local/.deps-ok
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "deltaxfer needs Python >= 3.11" or 0)'
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip 'setuptools>=77' wheel 'cython>=3.0'
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[test]'
	@touch $@

# Rebuild the compiled core in place when its sources change.
build: $(VENV)/.core-built
	@# bytecode for every module, as an installer writes it: each deltaxfer process
	@# (migrate, serve, the lazy-pages server) otherwise compiles its modules at start
	@# where PYTHONDONTWRITEBYTECODE is set (~0.07 s of CPU per start here)
	$(PY) -m compileall -q src/deltaxfer
$(VENV)/.core-built: $(VENV)/.installed $(CORE_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

test: deps criu runc programs build
	$(VENV)/bin/pytest -p no:cacheprovider --benchmark-disable $(PYTEST_ARGS)

demo: deps criu build
	$(PY) scripts/demo.py

bench: deps criu build
	$(VENV)/bin/pytest -p no:cacheprovider bench --benchmark-only --benchmark-autosave $(PYTEST_ARGS)

bench-compare: deps criu build
	$(VENV)/bin/pytest -p no:cacheprovider bench --benchmark-only --benchmark-compare --benchmark-compare-fail=mean:25% $(PYTEST_ARGS)

# The migration matrix (bench/bench_migrate.py): deltaxfer against rsync, criu page-server
# and tar|lz4, written to docs/RESULTS.md, docs/results/ and the README's results table.
# MATRIX=default|smoke|full|CELLS (bench/migration_matrix.py), REPS=N to override.
BENCH_APT_PACKAGES := redis-server redis-tools lz4
MATRIX ?= default
bench-deps: .local/.bench-deps-ok
.local/.bench-deps-ok: Makefile .local/.deps-ok
	@missing=$$(for p in $(BENCH_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "bench-deps: installing $$missing (no service is started: policy-rc.d)"; \
		if [ "$$(id -u)" != 0 ]; then echo "bench-deps: run as root to install: $$missing" >&2; exit 1; fi; \
		own=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own=1; }; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; rc=$$?; \
		[ -z "$$own" ] || rm -f /usr/sbin/policy-rc.d; [ $$rc = 0 ] || exit $$rc; \
	fi
	@touch $@

bench-migrate: deps criu build bench-deps
	DX_MATRIX=$(MATRIX) DX_MATRIX_OUT=docs $(if $(REPS),DX_MATRIX_REPS=$(REPS)) \
		$(VENV)/bin/pytest -p no:cacheprovider bench/bench_migrate.py --benchmark-only -s $(PYTEST_ARGS)

# The soak (scripts/soak.py): one memwork moved back and forth SOAK_N times between two
# network namespaces joined by a veth (a serve --restore in each), its memory checked at
# every hop; downtime p50/p90/p99/max and the failures. Not part of `make test`.
SOAK_N ?= 50
SOAK_MIB ?= 32
.PHONY: soak
soak: deps criu build
	$(PY) scripts/soak.py --n $(SOAK_N) --mib $(SOAK_MIB)

# Coverage-guided fuzzing (atheris) of the protocol decoder and the image parsers, from
# the seed corpus in tests/fuzz_corpus/; not part of `make test` (see docs/SECURITY.md).
FUZZ_RUNS ?= 600000
fuzz: deps build
	$(PY) -m pip install -q --disable-pip-version-check atheris
	$(PY) fuzz/run.py --runs $(FUZZ_RUNS)

clean:
	rm -rf build src/deltaxfer/_core*.so ext/_core.c $(VENV)/.core-built

distclean: clean
	rm -rf $(VENV) .local
