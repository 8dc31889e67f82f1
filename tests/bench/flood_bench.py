"""Flood benchmark against the real `sbc run`: the CPU left to the signalling process.

    .venv/bin/python tests/bench/flood_bench.py [--rates=-1,50000,100000,200000,0]
        [--seconds 10] [--defaults] [--json OUT]

Runs as root. Each step is a fresh two-namespace lab (tests/scenario/sbc_flood.py):
`sbc run` with the firewall enabled, SIPp placing calls at 100/s from the trusted trunk
through the B2BUA to a SIPp UAS, and the C flooder sending INVITE/REGISTER/garbage
from 444 spoofed sources at the step's rate (0: as fast as the sender goes; -1: a
baseline without flood) for --seconds. For each step: the achieved flood
rate, kernel drops (nft counters), UDP datagrams that reached sockets in the SBC's
namespace, legitimate call completion, the CPU of the `sbc run` process over the
flood (/proc/PID/stat utime+stime, % of one core) and the machine's idle CPU
(/proc/stat, % of all cores). Prints the highest rate at which >= 99.9 % of calls
completed. Every step is bounded (flood packets and seconds, SIPp -timeout); the
namespaces and processes go away after each step, failure included.

--defaults uses the firewall's default meter and detectors (100 packets/s per source,
60 requests in 2 s) instead of the test's (10/s, 20 in 2 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.scenario import fw_lab, sbc_flood

COLUMNS = (
    ("target", "flood_pps_target"),
    ("flood pps", "flood_pps"),
    ("sent", "flood_packets"),
    ("kernel drops", "kernel_dropped"),
    ("drop %", "kernel_dropped_pct"),
    ("to sockets", "udp_delivered_in_sbc_ns"),
    ("rcvbuf err", "udp_rcvbuf_errors"),
    ("banned", "sources_banned"),
    ("calls ok", "calls_ok"),
    ("calls %", "calls_ok_pct"),
    ("UAC retrans", "uac_retransmissions"),
    ("mean setup", "uac_setup_time_mean"),
    ("sbc CPU %", "sbc_cpu_pct"),
    ("idle %", "cpu_idle_pct"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="-1,50000,100000,200000,0")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--call-rate", type=int, default=100)
    parser.add_argument("--defaults", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    why = sbc_flood.missing()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    rates = [int(r) for r in args.rates.split(",")]
    calls = int(args.call_rate * args.seconds)
    extra = "" if args.defaults else sbc_flood.TIGHT
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="flood-bench-") as tmp:
        flooder = fw_lab.build_flooder(Path(tmp))
        assert flooder is not None
        for i, rate in enumerate(rates):
            step = sbc_flood.run_step(
                Path(tmp) / f"step{i}",
                flooder,
                flood_pps=rate,
                flood_seconds=args.seconds,
                calls=calls,
                call_rate=args.call_rate,
                firewall_extra=extra,
            )
            step.pop("uac_stderr", None)
            results.append(step)
            print(json.dumps(step), file=sys.stderr, flush=True)
    print(" | ".join(name for name, _ in COLUMNS))
    print(" | ".join("---" for _ in COLUMNS))
    for step in results:
        print(" | ".join(str(step[key]) for _, key in COLUMNS))
    good = [s["flood_pps"] for s in results if s["calls_ok_pct"] >= 99.9]
    print(
        f"\nhighest flood rate with >= 99.9 % calls completed: {max(good) if good else 'none'}"
        f" packets/s  ({'test' if not args.defaults else 'default'} firewall settings,"
        f" {calls} calls at {args.call_rate}/s per step, {time.monotonic() - started:.0f} s)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
