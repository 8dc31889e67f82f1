"""Issue 5's flood test against the real `sbc run` (firewall enabled, B2BUA relaying).

SIPp places 500 calls at 50/s from the trusted trunk through the SBC (realm
outside -> route -> realm inside -> SIPp UAS) while the C flooder of `fw_lab` sends
800,000 INVITE/REGISTER/garbage packets (80,000/s for 10 s) from 444 spoofed
sources. >= 99.9 % of the calls must complete, the kernel's drop counters must
account for the flood, and the sockets of the SBC's namespace must have seen only a
small fraction of it. The topology and the measurements are in `sbc_flood`; the
benchmark stepping the flood rate is tests/bench/flood_bench.py.

(1000 calls at 100/s until 2026-11-29: on a VM running Python at a third of the
speed of the CI's, those calls alone took most of a core, and 5-21 % of them failed
under the flood with the tree of the day before as well. Issue 5 asks for a steady
rate, not this one; the flood is unchanged.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.scenario import fw_lab, sbc_flood

pytestmark = [pytest.mark.root]

FLOOD_PPS = 80_000
FLOOD_SECONDS = 10.0
CALLS = 500
CALL_RATE = 50


@pytest.fixture
def reason() -> None:
    why = sbc_flood.missing()
    if why:
        pytest.skip(why)


@pytest.mark.timeout(90)
def test_real_sbc_drops_flood_in_kernel_while_calls_complete(
    reason: None, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    flooder = fw_lab.build_flooder(tmp_path)
    assert flooder is not None
    started = time.monotonic()
    figures = sbc_flood.run_step(
        tmp_path / "step",
        flooder,
        flood_pps=FLOOD_PPS,
        flood_seconds=FLOOD_SECONDS,
        calls=CALLS,
        call_rate=CALL_RATE,
    )
    figures["test_seconds"] = round(time.monotonic() - started, 1)
    for key, value in figures.items():
        record_property(key, value)
    print(figures)
    sent = figures["flood_packets"]
    assert figures["sbc_exit"] == 0, (tmp_path / "step" / "sbc.log").read_text()[-3000:]
    assert figures["sbc_tracebacks"] == 0, (tmp_path / "step" / "sbc.log").read_text()[-3000:]
    assert figures["flood_pps"] >= 50_000, figures
    assert figures["calls_ok"] + figures["calls_failed"] == CALLS, figures
    assert figures["calls_ok"] / CALLS >= 0.999, figures
    # The kernel dropped the flood (per-source meters, then the blacklist once the
    # detectors in `sbc run` banned each source); every UDP datagram delivered to a
    # socket in the SBC's namespace (the flood's leak plus both call legs) is a
    # small fraction of it.
    # The meter alone lets at most 444 x (20 + 10/s x 10 s) = 53k through; the calls
    # add ~9k datagrams (both legs, on lo too). Bans cut the leak further.
    assert figures["kernel_dropped"] > 0.9 * sent, figures
    assert figures["udp_delivered_in_sbc_ns"] < 0.08 * sent, figures
    # The detectors of `sbc run` ban flood sources and the kernel then drops them.
    # How many depends on the CPU the SBC gets: on an idle machine all 444, under
    # other load ~150 (a starved SBC loses datagrams in its socket buffer before the
    # detectors see them; the meter still caps those sources).
    assert figures["sources_banned"] >= 50, figures
    assert figures["drop_blacklist_v4"] > 0, figures
    assert (figures["health_bans"] or 0) >= 50, figures  # /healthz sees them too
    assert not figures["trunk_banned"], figures
    # Each call opened its media ports in the firewall and closed them again.
    assert figures["pinholes_peak"] >= 4, figures
    # Those of calls still up in the SBC (see sbc_flood) stay open: 4 ports a call,
    # fewer pinholes when two share a number (one on each of the two media
    # addresses), or when such a call ends while the pinholes are counted.
    left, sessions = figures["pinholes_left"], figures["media_sessions_left"]
    assert left <= 4 * sessions and (left == 0) == (sessions == 0), figures
    assert figures["pinhole_errors"] == 0, figures
    assert figures["test_seconds"] < 60, figures
