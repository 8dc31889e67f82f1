# Media relay benchmark: sbc kernel path, sbc userspace path and rtpengine side by side
# (tests/bench/media_bench.py). Needs root (network namespaces, nftables), gcc and
# rtpengine-daemon (userspace forwarding only; its kernel module is never loaded).
# `make bench-media` < 5 min; `make bench-media-quick` < 60 s.

BENCH_MEDIA_APT := gcc nftables libnftables1 iproute2 rtpengine-daemon

.PHONY: bench-media bench-media-quick bench-media-deps

bench-media-deps: deps
	@missing=""; for p in $(BENCH_MEDIA_APT); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "- installing apt packages:$$missing"; \
	  $(APT_GET) update && $(APT_GET) install --no-install-recommends $$missing; \
	fi

bench-media: bench-media-deps
	$(BIN)/python tests/bench/media_bench.py --json build/bench-media/runs.json

bench-media-quick: bench-media-deps
	$(BIN)/python tests/bench/media_bench.py --quick
