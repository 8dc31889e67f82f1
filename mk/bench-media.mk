# Media relay benchmark: sbc kernel path, sbc userspace path and rtpengine side by side
# (tests/bench/media_bench.py). Needs root (network namespaces, nftables), gcc and
# rtpengine-daemon (userspace forwarding only; its kernel module is never loaded).
# `make bench-media` < 5 min; `make bench-media-quick` < 60 s.

BENCH_MEDIA_APT := gcc nftables libnftables1 iproute2 rtpengine-daemon

.PHONY: bench-media bench-media-quick bench-media-deps

bench-media-deps: deps
	@$(SHELL) mk/apt-install $(BENCH_MEDIA_APT)

bench-media: bench-media-deps
	$(BIN)/python tests/bench/media_bench.py --json build/bench-media/runs.json

bench-media-quick: bench-media-deps
	$(BIN)/python tests/bench/media_bench.py --quick

# How the kernel path's nftables work scales with the calls in it: batched rounds
# against one libnftables call per stream (root, a namespace of its own, < 1 min).
.PHONY: bench-kernel-scale
bench-kernel-scale: deps
	$(BIN)/python tests/bench/kernel_batch_bench.py --forwards 10000 --calls 200
