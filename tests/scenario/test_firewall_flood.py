"""A spoofed flood of INVITE/REGISTER/garbage while SIPp calls from a trusted trunk.

The flood (>= 50,000 packets/s from ~440 spoofed sources, bounded to 1.5 M packets
and 10 s) must be dropped in the kernel (meters, then the blacklist once the rate
detector has banned each source) while >= 99.9 % of SIPp's calls complete.
The SIP side is the lab's stand-in responder (the SBC process is not wired to the
firewall yet).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.scenario import fw_lab

pytestmark = [pytest.mark.root]

FLOOD_PPS = 80_000
FLOOD_SECONDS = 10.0
FLOOD_PACKETS = int(FLOOD_PPS * FLOOD_SECONDS)
CALLS = 1000
CALL_RATE = 100
#: Spoofed sources: 203.0.113.1-254 and 198.51.100.64-253.
SOURCES = 254 + 190


@pytest.fixture
def reason() -> None:
    why = fw_lab.available()
    if why:
        pytest.skip(why)
    if shutil.which("sipp") is None:
        pytest.skip("SIPp (Debian sip-tester) not installed")
    if shutil.which("gcc") is None:
        pytest.skip("gcc needed for the flood sender")


def _sipp_stats(path: Path) -> tuple[int, int]:
    rows = list(csv.reader(path.open(), delimiter=";"))
    header, last = rows[0], rows[-1]
    return (
        int(last[header.index("SuccessfulCall(C)")]),
        int(last[header.index("FailedCall(C)")]),
    )


@pytest.mark.timeout(90)
def test_flood_dropped_in_kernel_while_trusted_calls_complete(
    reason: None, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    flooder = fw_lab.build_flooder(tmp_path)
    assert flooder is not None
    started = time.monotonic()
    with fw_lab.lab() as lab:
        status = tmp_path / "status.json"
        node = fw_lab.start_node(
            lab,
            {
                "trusted": [f"{fw_lab.TRUNK_V4}/32"],
                "udp": [10, 20],
                "rate": [2.0, 20],
                "malformed": [10.0, 5],
                "durations": [60],
                "state_file": str(tmp_path / "bl.json"),
            },
            status,
        )
        stat_file = tmp_path / "sipp.csv"
        sipp = lab.spawn(
            lab.ext,
            "timeout",
            "40",
            "sipp",
            "-sn",
            "uac",
            f"{fw_lab.SBC_V4}:5060",
            "-i",
            fw_lab.TRUNK_V4,
            "-p",
            "5070",
            "-r",
            str(CALL_RATE),
            "-m",
            str(CALLS),
            "-d",
            "200",
            "-nostdin",
            "-trace_stat",
            "-stf",
            str(stat_file),
            "-fd",
            "1",
            "-timeout",
            "35s",
            "-timeout_error",
            "-trace_err",
            "-error_file",
            str(tmp_path / "sipp-err.log"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        time.sleep(0.5)  # calls already flowing when the flood starts
        flood = subprocess.run(
            lab.ns(
                lab.ext,
                str(flooder),
                fw_lab.SBC_V4,
                "5060",
                str(FLOOD_PACKETS),
                str(FLOOD_SECONDS),
                str(FLOOD_PPS),
                "203.0.113.1",
                "254",
                "198.51.100.64",
                "190",
            ),
            capture_output=True,
            text=True,
            timeout=FLOOD_SECONDS + 10,
            check=True,
        )
        sent, seconds = int(flood.stdout.split()[1]), float(flood.stdout.split()[3])
        sipp.wait(timeout=45)
        counters = lab.counters()
        banned = lab.set_elements("blacklist_v4")
        node_status = fw_lab.read_status(status)
        node_log = fw_lab.stop_node(node)
    problems = [
        line for line in node_log.splitlines() if "Traceback" in line or " x handling" in line
    ]
    assert not problems, node_log[-3000:]
    ok, failed = _sipp_stats(stat_file)
    flood_rate = sent / seconds
    kernel_dropped = (
        counters["fw_drop_rate_udp_v4"]
        + counters["fw_drop_blacklist_v4"]
        + counters.get("fw_drop_total_udp", 0)
    )
    reached_userspace = sum(
        n for src, n in node_status["requests"].items() if src != fw_lab.TRUNK_V4
    ) + sum(node_status["malformed"].values())
    figures = {
        "flood_packets": sent,
        "flood_seconds": round(seconds, 2),
        "flood_pps": round(flood_rate),
        "drop_rate_udp_v4": counters["fw_drop_rate_udp_v4"],
        "drop_blacklist_v4": counters["fw_drop_blacklist_v4"],
        "drop_total_udp": counters.get("fw_drop_total_udp", 0),
        "accept_trusted_v4": counters["fw_accept_trusted_v4"],
        "flood_reaching_userspace": reached_userspace,
        "sources_banned": len(banned),
        "calls_ok": ok,
        "calls_failed": failed,
        "test_seconds": round(time.monotonic() - started, 1),
    }
    for key, value in figures.items():
        record_property(key, value)
    print(figures, sipp.stderr.read() if sipp.stderr else "")
    assert flood_rate >= 50_000, figures
    assert ok + failed == CALLS, figures
    assert ok / CALLS >= 0.999, figures
    # Most of the flood never left the kernel: what the kernel counted as dropped
    # plus what reached the responder accounts for it, and userspace saw under 5 %
    # (what the meters let through before each source was banned).
    assert reached_userspace < 0.05 * sent, figures
    assert kernel_dropped > 0.9 * sent, figures
    # The rate detector bans a source once enough of its packets got past the kernel
    # meters; with the total UDP cap shared by 444 sources some need more than the
    # 10 s to get there on a loaded 2-core machine (384 seen in CI), hence 3/4.
    assert len(banned) >= 0.75 * SOURCES, figures
    assert fw_lab.TRUNK_V4 not in banned
