"""Media relayed by worker processes (``media.workers``), proved with real phones.

Two baresip phones (A 440 Hz, B 1000 Hz) call through `sbc run` whose relay runs in
two worker processes, kernel path off. Three calls in a row:

1. an ordinary call: both tones cross, the session sits in one worker (a child of
   the SBC), the call's CDR is ``answered`` / ``bye``;
2. the worker holding the second call is killed mid-call (SIGKILL): both phones get
   a BYE, the CDR says ``media_lost``, /healthz counts the lost call, and the worker
   comes back on its own;
3. a call after that: both tones cross again.

Then SIGTERM: the SBC stops and no worker is left behind. Needs baresip (Debian
``baresip-core``): skipped without it, failed under CI.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.scenario.baresip_peer import BaresipPeer, PeerConfig, wait_until
from tests.scenario.sbcproc import Ports, SbcProcess, free_port
from tests.scenario.test_baresip import (
    A_ADDRESS,
    A_RTP,
    A_TONE,
    B_ADDRESS,
    B_RTP,
    B_TONE,
    assert_heard,
    read_cdrs,
    relay_config,
    require_baresip,
)

TALK_SECONDS = 3.0
WORKERS = 2


def config_text(workdir: Path, plain: int, lan: int, mgmt: int, b_port: int) -> str:
    """test_baresip's relay lab (realm "lan", every call to phone B), its relay in
    worker processes."""
    media = f"media:\n  workers: {WORKERS}\n  kernel_path: false\n"
    return relay_config(workdir, plain, lan, mgmt, b_port) + media


def workers_of(health: dict[str, object]) -> list[dict[str, object]]:
    workers = health.get("media_workers")
    assert isinstance(workers, list), health
    return workers


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie its parent has yet to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@dataclass
class Calls:
    sbc_pid: int
    log: str = ""
    #: /healthz during the first call, and right after the kill.
    in_call: dict[str, object] = field(default_factory=dict)
    after_kill: dict[str, object] = field(default_factory=dict)
    #: /healthz once the killed worker is back.
    restarted: dict[str, object] = field(default_factory=dict)
    killed_pid: int = 0
    heard: dict[str, tuple[array.array[int], array.array[int]]] = field(default_factory=dict)
    cdrs: list[dict[str, object]] = field(default_factory=list)
    worker_pids: list[int] = field(default_factory=list)
    #: The parent process of each worker, read at the start.
    parents: list[int] = field(default_factory=list)
    exit_code: int | None = None


def talk(a: BaresipPeer, b: BaresipPeer, lan: int) -> None:
    a.dial(f"sip:b@127.0.0.1:{lan}")
    b.wait_established()
    a.pump_for(TALK_SECONDS)


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Calls]:
    require_baresip()
    workdir = tmp_path_factory.mktemp("media-workers")
    plain, lan = free_port(also_udp=True), free_port(also_udp=True)
    mgmt = free_port()
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(BaresipPeer(workdir, PeerConfig("b", B_ADDRESS, B_TONE, B_RTP)))
        b.start()
        config = workdir / "sbc.yaml"
        config.write_text(config_text(workdir, plain, lan, mgmt, b.sip_port))
        sbc = SbcProcess(workdir, config, Ports(plain, 0, mgmt)).start()
        stack.callback(sbc.stop)
        a = stack.enter_context(BaresipPeer(workdir, PeerConfig("a", A_ADDRESS, A_TONE, A_RTP)))
        a.start()
        result = Calls(sbc.pid)
        result.worker_pids = [int(str(w["pid"])) for w in workers_of(sbc.health()[1])]
        result.parents = [parent_of(pid) for pid in result.worker_pids]

        # 1. An ordinary call.
        talk(a, b, lan)
        result.in_call = sbc.health()[1]
        a.hangup()
        b.wait_closed()
        result.heard["first"] = (a.recording(), b.recording())
        wait_until(lambda: sbc.health()[1].get("calls") == 0, 5)

        # 2. The worker holding the call dies mid-call.
        talk(a, b, lan)
        holder = next(w for w in workers_of(sbc.health()[1]) if w["sessions"] == 1)
        result.killed_pid = int(str(holder["pid"]))
        os.kill(result.killed_pid, signal.SIGKILL)
        b.wait_closed(10)
        a.wait_closed(10)
        result.after_kill = sbc.health()[1]
        # Back once its ports have rested (media port quarantine, 10 s).
        wait_until(lambda: all(w["ready"] for w in workers_of(sbc.health()[1])), 30)
        result.restarted = sbc.health()[1]

        # 3. A call after the restart.
        talk(a, b, lan)
        a.hangup()
        b.wait_closed()
        result.heard["third"] = (a.recording(), b.recording())
        wait_until(lambda: sbc.health()[1].get("calls") == 0, 5)

        result.worker_pids += [int(str(w["pid"])) for w in workers_of(sbc.health()[1])]
        result.exit_code = sbc.stop()
        result.log = sbc.log()
        result.cdrs = read_cdrs(workdir / "state" / "cdr.sqlite")
        yield result


def test_the_media_of_a_call_crosses_a_worker_both_ways(calls: Calls) -> None:
    heard_by_a, heard_by_b = calls.heard["first"]
    assert_heard(heard_by_b, A_TONE, B_TONE, "b")
    assert_heard(heard_by_a, B_TONE, A_TONE, "a")
    workers = workers_of(calls.in_call)
    assert sorted(int(str(w["sessions"])) for w in workers) == [0, 1], workers
    assert calls.in_call["media_sessions"] == 1
    assert calls.parents == [calls.sbc_pid] * 2, calls.parents
    assert [w["ports"] for w in workers] == ["20000-24999", "25000-29999"]
    first = calls.cdrs[0]
    assert (first["disposition"], first["end_reason"]) == ("answered", "bye"), first
    assert isinstance(first["a_to_b_packets"], int) and first["a_to_b_packets"] > 0, first


def test_a_killed_worker_ends_its_call_and_comes_back(calls: Calls) -> None:
    lost = calls.cdrs[1]
    assert (lost["disposition"], lost["end_reason"]) == ("answered", "media_lost"), lost
    assert calls.after_kill["calls"] == 0, calls.after_kill
    restarted = workers_of(calls.restarted)
    again = [w for w in restarted if w["starts"] == 2]
    assert len(again) == 1 and again[0]["lost_calls"] == 1, restarted
    assert again[0]["pid"] != calls.killed_pid
    assert "media worker" in calls.log and "exit code -9" in calls.log
    assert "Traceback" not in calls.log, calls.log[-3000:]
    heard_by_a, heard_by_b = calls.heard["third"]
    assert_heard(heard_by_b, A_TONE, B_TONE, "b")
    assert_heard(heard_by_a, B_TONE, A_TONE, "a")
    assert [c["end_reason"] for c in calls.cdrs] == ["bye", "media_lost", "bye"]


def test_no_worker_outlives_the_sbc(calls: Calls) -> None:
    assert calls.exit_code == 0, calls.log[-3000:]
    deadline = time.monotonic() + 5
    while not all(gone(pid) for pid in calls.worker_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in calls.worker_pids), calls.worker_pids
