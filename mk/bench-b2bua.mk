# B2BUA signalling benchmark: the SBC, sippy's B2BUA and Kamailio (tm, dialog, topoh)
# side by side under the same SIPp load (tests/bench/b2bua_bench.py): highest call
# rate with < 0.1 % failed calls, REGISTER rate, concurrent calls and memory per call.
# Each system pinned to one CPU, SIPp to another; everything on loopback (127.0.0.1-3).
# Needs sip-tester (SIPp), kamailio and the venv's sippy (extra [bench]). The bench
# runs its own Kamailio on ephemeral ports; the package's service is disabled.
# `make bench-b2bua` ~12-15 min; `make bench-b2bua-quick` ~2 min.

BENCH_B2BUA_APT := sip-tester kamailio util-linux

.PHONY: bench-b2bua bench-b2bua-quick bench-b2bua-deps

bench-b2bua-deps: deps
	@$(SHELL) mk/apt-install $(BENCH_B2BUA_APT)

bench-b2bua: bench-b2bua-deps
	$(BIN)/python tests/bench/b2bua_bench.py --json build/bench-b2bua/runs.json

bench-b2bua-quick: bench-b2bua-deps
	$(BIN)/python tests/bench/b2bua_bench.py --quick
