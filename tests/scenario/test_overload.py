"""Overload: offered far more calls than it can set up, `sbc run` refuses the excess.

A SIPp caller offers 500 calls/s for 4 s (about twice what the SBC carries on the
CI's two cores under that load, four times on a VM that runs Python at a third of
the speed) to a SIPp callee through `sbc run` on loopback. (At 1,000 calls/s that
slower VM spent seconds reading the flood of INVITEs before the calls it took,
p95 2.4-4.4 s, with or without the SBC's changes of the day.) Each call
waits for its media ports in the SBC's set-up queue; once
``calls.max_setup_backlog`` (100) commands wait there, new calls get 503 with
Retry-After at once (admission scope ``node``). Read from the SBC's CDRs: calls
were refused that way, the calls it took were set up in well under the seconds an
unbounded queue grows to (before the limit: p95 11.9 s here, 2.9-3.4 s mean at 800
calls/s pinned to one CPU with 7,000-8,000 commands queued), the refusals were
logged in a line per burst, and it serves normally afterwards.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sbc.config.b2bua import CallsConfig
from tests.scenario.sbcproc import (
    SIPP,
    SbcProcess,
    free_port,
    sipp_popen,
    start_routed,
    wait_until,
)

RATE = 500
SECONDS = 4
USER = "1001"

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) not installed")


@pytest.fixture
def sbc(tmp_path: Path) -> Iterator[tuple[SbcProcess, int, int]]:
    callee = free_port(also_udp=True)
    process, outside = start_routed(tmp_path, {USER: callee})
    try:
        yield process, outside, callee
    finally:
        process.stop()


def _sipp(
    workdir: Path, scenario: str, name: str, port: int, *extra: str
) -> subprocess.Popen[bytes]:
    media = "31000" if "uac" in scenario else "31500"
    return sipp_popen(
        workdir, scenario, name, "-p", str(port), "-mp", media, "-timeout", "90s", *extra
    )


def _rows(workdir: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{workdir / 'state' / 'cdr.sqlite'}?mode=ro", uri=True) as db:
        return db.execute(query).fetchall()


def test_excess_calls_get_503_at_once_and_the_rest_set_up_quickly(
    sbc: tuple[SbcProcess, int, int], tmp_path: Path
) -> None:
    process, outside, callee_port = sbc
    calls = RATE * SECONDS
    callee = _sipp(tmp_path, "uas_basic.xml", "uas", callee_port)
    time.sleep(0.5)
    caller = _sipp(
        tmp_path, "uac_overload.xml", "uac", free_port(also_udp=True),
        "-s", USER, "-r", str(RATE), "-m", str(calls), "-l", str(calls),
        f"127.0.0.1:{outside}",
    )  # fmt: skip
    backlog = 0
    try:
        deadline = time.monotonic() + 120
        while caller.poll() is None and time.monotonic() < deadline:
            backlog = max(backlog, int(str(process.health()[1].get("media_backlog") or 0)))
            time.sleep(0.1)
    finally:
        for proc in (caller, callee):
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
    assert wait_until(lambda: process.health()[1].get("calls") == 0, 30), process.health()

    def count(where: str) -> int:
        return int(str(_rows(tmp_path, f"SELECT count(*) FROM cdr WHERE {where}")[0][0]))

    assert wait_until(lambda: count("1") >= calls * 0.9, 15), count("1")
    refused = count("end_reason = 'admission' AND final_status = 503")
    answered = count("disposition = 'answered'")
    setups = sorted(
        float(str(t))
        for (t,) in _rows(tmp_path, "SELECT setup_time FROM cdr WHERE disposition = 'answered'")
    )
    p95 = setups[int(len(setups) * 0.95)] if setups else None
    figures = (
        f"{calls} offered, {refused} refused with 503, {answered} answered, "
        f"set-up p95 {p95} s, peak media backlog seen {backlog}"
    )
    print(figures)
    assert refused > 0 and answered > 0, figures
    assert p95 is not None and p95 < 2.0, figures
    # Queued before each refusal: at most the limit and what was already in flight.
    assert backlog < CallsConfig().max_setup_backlog * 3, figures
    log = process.log()
    busy_lines = log.count("x sbc busy (media set-up backlog)")
    assert 1 <= busy_lines <= SECONDS, (busy_lines, log[-2000:])
    assert "Traceback" not in log

    # Afterwards: an ordinary call goes through.
    callee = _sipp(tmp_path, "uas_basic.xml", "uas-after", callee_port, "-m", "1")
    time.sleep(0.5)
    caller = _sipp(
        tmp_path, "uac_basic.xml", "uac-after", free_port(also_udp=True),
        "-s", USER, "-m", "1", f"127.0.0.1:{outside}",
    )  # fmt: skip
    _, err = caller.communicate(timeout=30)
    callee.communicate(timeout=30)
    assert caller.returncode == 0, err.decode()[-1000:] + process.log()[-2000:]
