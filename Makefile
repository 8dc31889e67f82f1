# Entry points of the SBC appliance. `make run` and `make test` work on a fresh
# Debian 12 machine: they install their own apt packages and venv first.

SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
BIN := $(VENV)/bin
# Scenario tests use real peers and kernel features: nftables (media fast path,
# firewall), SIPp, sipvicious and baresip as SIP peers, Kamailio as the inside
# registrar, iproute2 for network namespaces.
APT_PACKAGES := python3-venv python3-dev gcc make openssl ca-certificates procps \
	iproute2 nftables libnftables1 sip-tester sipvicious baresip-core kamailio
STAMP := $(VENV)/.installed
FUZZ_SECONDS ?= 300

.PHONY: all deps apt-deps venv run test test-fast test-slow soak lint fuzz bench clean

all: test

# Install only what is missing (mk/apt-install), so a second run does no network I/O.
apt-deps:
	@$(SHELL) mk/apt-install $(APT_PACKAGES)

$(STAMP): pyproject.toml | apt-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench,fast]'
	@touch $@

deps: apt-deps $(STAMP)

venv: deps

run: deps
	$(BIN)/sbc run $(if $(CONFIG),--config $(CONFIG))

# Fast unit tests first, then scenario tests, then (in CI, or with TEST_IMAGE=1) the
# appliance image: build, QEMU boot to a SIP answer, hardening checks (~25-30 min).
TEST_IMAGE ?= $(if $(CI),1,0)
test: deps
	$(BIN)/python -m pytest -q -m "not slow and not image" tests/unit tests/image
	$(BIN)/python -m pytest -q -m "not slow" tests/scenario
	@if [ "$(TEST_IMAGE)" = 1 ]; then $(MAKE) --no-print-directory test-image-slow; \
	else echo "- image build and boot tests skipped here (CI runs them): make test-image"; fi

test-fast: deps
	$(BIN)/python -m pytest -q -m "not slow and not image" tests/unit tests/image

test-slow: deps
	$(BIN)/python -m pytest -q -m slow tests

# Only the call soak (UDP, then TCP): SOAK_SECONDS a round, SOAK_RATE calls/s a flow.
SOAK_SECONDS ?= 30
SOAK_RATE ?= 20
soak: deps
	SBC_SOAK_SECONDS=$(SOAK_SECONDS) SBC_SOAK_RATE=$(SOAK_RATE) \
	  $(BIN)/python -m pytest -q -m slow tests/scenario/test_soak_calls.py

lint: deps
	$(BIN)/ruff check sbc tests
	$(BIN)/ruff format --check sbc
	$(BIN)/mypy

fuzz: deps
	SBC_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q tests/unit/test_fuzz.py tests/unit/test_controller_fuzz.py --timeout=0

# Parser throughput vs sippy (seconds), then the B2BUA call/REGISTER rates and memory
# per call vs sippy's B2BUA and Kamailio (mk/bench-b2bua.mk, ~2 min quick mode).
bench: deps bench-b2bua-deps
	$(BIN)/python tests/bench/sip_parse.py
	$(BIN)/python tests/bench/b2bua_bench.py --quick --json build/bench-b2bua/quick.json

include mk/image.mk
include mk/bench-media.mk
include mk/bench-b2bua.mk

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
