"""Bans and pinholes applied off the event loop, in rounds (sbc.firewall.rounds).

A gated fake kernel holds a round on the worker thread, so the tests see what
queues up behind it and what the round after carries.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import pytest

from sbc import app
from sbc.app import SbcNode
from sbc.b2bua.controller import AuthFailure, Step
from sbc.config.loader import load_config_text
from sbc.firewall.config import FirewallConfig
from sbc.firewall.detectors import AuthFailed
from sbc.firewall.firewall import Firewall
from sbc.firewall.nft import CounterValue, NftError
from sbc.firewall.rounds import FirewallRounds
from sbc.media.config import MediaConfig, RealmMediaAddress
from sbc.media.relay import MediaRelay
from sbc.media.session import LegOffer, StreamOffer
from sbc.sip.parser import parse_message
from sbc.sip.transaction import Outgoing, Output
from sbc.transport.base import Flow
from sbc.transport.resolver import Transport

GUESSER = ip_address("198.51.100.7")
GUESSER_V6 = ip_address("2001:db8:1:2::7")


class GatedKernel:
    """Records nft texts; while `gate` is clear, a run waits for it (on the thread)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.runs: list[str] = []
        self.fail: NftError | None = None

    def run(self, text: str, *, check: bool = False) -> None:
        self.entered.set()
        assert self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        self.runs.append(text)

    def list_table(self) -> dict[str, Any] | None:
        return None

    def list_set(self, name: str) -> list[dict[str, Any]] | None:
        return []

    def counters(self) -> dict[str, CounterValue]:
        return {}

    def table_present(self) -> bool:
        return True


def firewall(tmp_path: Path, kernel: GatedKernel) -> Firewall:
    return Firewall(FirewallConfig(state_file=tmp_path / "bans.json"), kernel)


def guess(fw: Firewall, source: Any, times: int) -> list[Any]:
    bans = []
    for _ in range(times):
        bans += fw.decide(AuthFailed(source, "alice"))
    return bans


async def wait_entered(kernel: GatedKernel) -> None:
    await asyncio.get_running_loop().run_in_executor(None, kernel.entered.wait, 5)


def test_decide_records_without_the_kernel_observe_applies(tmp_path: Path) -> None:
    kernel = GatedKernel()
    fw = firewall(tmp_path, kernel)
    (ban,) = guess(fw, GUESSER, 5)
    assert str(ban.target) == "198.51.100.7/32"
    assert kernel.runs == []
    fw.flush()
    assert "198.51.100.7/32" in (tmp_path / "bans.json").read_text()
    # observe() is decide() plus the kernel, in one transaction.
    (other,) = [b for _ in range(5) for b in fw.observe(AuthFailed(GUESSER_V6, "bob"))]
    (text,) = kernel.runs
    add, delete, replace = text.splitlines()
    assert add == "add element inet sbc blacklist_v6 { 2001:db8:1:2:: }"
    assert delete == "delete element inet sbc blacklist_v6 { 2001:db8:1:2:: }"
    assert replace.startswith("add element inet sbc blacklist_v6 { 2001:db8:1:2:: timeout 300s ")
    assert str(other.target) == "2001:db8:1:2::/64"


def test_waiting_bans_and_pinholes_share_the_next_round(tmp_path: Path) -> None:
    async def main() -> None:
        kernel = GatedKernel()
        rounds = FirewallRounds()
        rounds.firewall = firewall(tmp_path, kernel)
        kernel.gate.clear()
        first = asyncio.ensure_future(rounds.hold("s1", {20000, 20001}))
        await wait_entered(kernel)  # round 1 is on the thread, held by the gate
        bans = guess(rounds.firewall, GUESSER, 5) + guess(rounds.firewall, GUESSER_V6, 5)
        assert len(bans) == 2
        banned = rounds.ban(bans)
        closing = asyncio.ensure_future(rounds.release("s1"))
        opening = asyncio.ensure_future(rounds.hold("s2", {20002}))
        await asyncio.sleep(0.01)
        # Decided, not yet in the kernel: the source and its whole /64 are banning.
        assert rounds.banning_any
        assert rounds.banning(GUESSER) and rounds.banning(ip_address("2001:db8:1:2:ffff::1"))
        assert not rounds.banning(ip_address("198.51.100.8"))
        assert not banned.done() and not first.done()
        kernel.gate.set()
        await asyncio.gather(first, banned, closing, opening)
        assert not rounds.banning_any and not rounds.banning(GUESSER)
        assert rounds.rounds == 2
        assert kernel.runs[0] == "add element inet sbc fw_media_pinholes { 20000, 20001 }"
        ban_text, pinholes = kernel.runs[1:]
        # One transaction: both replaced (add, delete), then both added with timeouts.
        lines = ban_text.splitlines()
        assert [line.split()[0] for line in lines] == [
            "add",
            "delete",
            "add",
            "delete",
            "add",
            "add",
        ]
        assert "blacklist_v4 { 198.51.100.7 timeout 300s " in lines[4]
        assert "blacklist_v6 { 2001:db8:1:2:: timeout 300s " in lines[5]
        assert pinholes.splitlines() == [
            "add element inet sbc fw_media_pinholes { 20000, 20001 }",
            "delete element inet sbc fw_media_pinholes { 20000, 20001 }",
            "add element inet sbc fw_media_pinholes { 20002 }",
        ]
        rounds.close()

    asyncio.run(main())


def test_a_port_number_held_by_two_sessions_closes_with_the_last(tmp_path: Path) -> None:
    """Each relay address (one per realm) has its own ports: port 20000 on one and
    on the other can be two live sessions' at once, and one pinhole serves both."""

    async def main() -> None:
        kernel = GatedKernel()
        rounds = FirewallRounds()
        rounds.firewall = firewall(tmp_path, kernel)
        await rounds.hold("s1", {20000, 20001})
        await rounds.hold("s2", {20000, 20002})
        await rounds.hold("s2", {20000, 20002})  # the same offer again: no change
        await rounds.hold("s2", {20000, 20003})  # a re-offer moved a port
        await rounds.release("s1")
        await rounds.release("s2")
        await rounds.release("s3")  # never held anything: nothing to do
        assert kernel.runs == [
            "add element inet sbc fw_media_pinholes { 20000, 20001 }",
            "add element inet sbc fw_media_pinholes { 20002 }",
            "add element inet sbc fw_media_pinholes { 20002 }\n"
            "delete element inet sbc fw_media_pinholes { 20002 }\n"
            "add element inet sbc fw_media_pinholes { 20003 }",
            "add element inet sbc fw_media_pinholes { 20001 }\n"
            "delete element inet sbc fw_media_pinholes { 20001 }",
            "add element inet sbc fw_media_pinholes { 20000, 20003 }\n"
            "delete element inet sbc fw_media_pinholes { 20000, 20003 }",
        ]
        assert rounds.rounds == 5
        rounds.close()

    asyncio.run(main())


def test_failed_rounds_release_their_waiters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        kernel = GatedKernel()
        rounds = FirewallRounds()
        rounds.firewall = firewall(tmp_path, kernel)
        kernel.fail = NftError("apply", "Error: Could not process rule: Device or resource busy")
        await rounds.ban(guess(rounds.firewall, GUESSER, 5))
        assert rounds.banning(GUESSER)  # refused: the next round carries it
        await rounds.hold("s1", {20000})
        assert rounds.banning(GUESSER)
        # Not installed: the bans stay in the state file (a start restores them).
        kernel.fail = NftError("apply", "Error: Could not process rule: No such file or directory")
        await rounds.ban(guess(rounds.firewall, GUESSER_V6, 5))
        assert rounds.rounds == 3 and kernel.runs == []
        assert not rounds.banning_any
        rounds.close()

    with caplog.at_level(logging.WARNING, logger="sbc.firewall"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 bans not in the kernel, retried in 5 s" in m and "busy" in m for m in messages)
    assert any(m.startswith("x firewall pinholes not changed (1 ports)") for m in messages)
    assert "x 2 bans in the state file only: table not installed" in messages


def test_a_refused_ban_is_applied_by_a_later_round_unless_lifted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel refused a ban: the source stays `banning` (the SBC drops what it
    sends) and a retry puts the ban in; a ban lifted meanwhile is not retried."""
    monkeypatch.setattr("sbc.firewall.rounds.RETRY", 0.05)

    async def until(condition: Any) -> None:
        deadline = time.monotonic() + 10.0
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in 10 s")
            await asyncio.sleep(0.01)

    async def main() -> None:
        kernel = GatedKernel()
        rounds = FirewallRounds()
        fw = rounds.firewall = firewall(tmp_path, kernel)
        busy = NftError("apply", "Error: Could not process rule: Device or resource busy")
        kernel.fail = busy
        await rounds.ban(guess(fw, GUESSER, 5))
        assert rounds.banning(GUESSER) and kernel.runs == []
        kernel.fail = None
        await until(lambda: not rounds.banning_any)
        (text,) = kernel.runs
        assert "add element inet sbc blacklist_v4 { 198.51.100.7 timeout 300s" in text
        # Refused again, and lifted by the operator before the retry: not retried.
        kernel.fail = busy
        (ban,) = guess(fw, GUESSER_V6, 5)
        await rounds.ban([ban])
        assert rounds.banning(GUESSER_V6)
        kernel.fail = None
        assert fw.blacklist.remove(ban.target)
        # The retry drops the lifted ban before its round runs on the thread: wait
        # for that round too, or it is counted during the check below (it was, once,
        # on a loaded machine).
        await until(lambda: not rounds.banning_any and rounds.idle)
        assert not any("blacklist_v6 { 2001:db8:1:2:: timeout" in t for t in kernel.runs)
        # Nothing left to retry: no more rounds.
        done = rounds.rounds
        await asyncio.sleep(0.2)
        assert rounds.rounds == done
        # Refused, then the firewall stops: the source is no longer `banning`.
        kernel.fail = busy
        await rounds.ban(guess(fw, ip_address("198.51.100.8"), 5))
        assert rounds.banning_any
        rounds.firewall = None
        rounds.forget()
        assert not rounds.banning_any
        rounds.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_failed_pinhole_change_is_done_again_by_a_later_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel did not take a change: the next round carries it again, and
    with nothing else to start one, a retry does."""
    monkeypatch.setattr("sbc.firewall.rounds.RETRY", 0.05)

    async def main() -> None:
        kernel = GatedKernel()
        rounds = FirewallRounds()
        rounds.firewall = firewall(tmp_path, kernel)
        kernel.fail = NftError("apply", "Error: Could not process rule: Device or resource busy")
        await rounds.hold("s1", {20000, 20001})
        assert rounds.pinholes == frozenset()
        kernel.fail = None
        # s2's round opens s1's ports too: they were not in the kernel.
        await rounds.hold("s2", {20002})
        assert kernel.runs == ["add element inet sbc fw_media_pinholes { 20000, 20001, 20002 }"]
        assert rounds.pinholes == {20000, 20001, 20002}
        # A close that failed: nothing else happens, the retry closes them.
        kernel.fail = NftError("apply", "Error: Could not process rule: Device or resource busy")
        await rounds.release("s1")
        assert rounds.pinholes == {20000, 20001, 20002}
        kernel.fail = None
        for _ in range(100):
            if rounds.pinholes == {20002}:
                break
            await asyncio.sleep(0.01)
        assert kernel.runs[1:] == [
            "add element inet sbc fw_media_pinholes { 20000, 20001 }\n"
            "delete element inet sbc fw_media_pinholes { 20000, 20001 }"
        ]
        assert rounds.pinholes == {20002}
        # Nothing left to retry: no more rounds.
        done = rounds.rounds
        await asyncio.sleep(0.2)
        assert rounds.rounds == done
        rounds.close()

    asyncio.run(main())


def test_a_new_firewall_opens_the_live_sessions_ports(tmp_path: Path) -> None:
    """Firewall stopped and started again (a reload turned it off and on): the
    holds are forgotten with it, and the new one opens what the live sessions
    hold then (the relay tells)."""

    async def main() -> None:
        kernel = GatedKernel()
        rounds = FirewallRounds()
        rounds.firewall = firewall(tmp_path, kernel)
        await rounds.hold("s1", {20000, 20001})
        rounds.firewall = None
        rounds.forget()
        assert rounds.pinholes == frozenset()
        await rounds.hold("s2", {20002})  # no firewall: nothing noted, nothing runs
        assert not rounds._holders
        assert len(kernel.runs) == 1
        fresh = GatedKernel()
        rounds.firewall = firewall(tmp_path, fresh)
        rounds.restart({"s1": {20000, 20001}, "s3": {20004, 20005}})
        while rounds.pinholes != {20000, 20001, 20004, 20005}:
            await asyncio.sleep(0.01)
        assert fresh.runs == [
            "add element inet sbc fw_media_pinholes { 20000, 20001, 20004, 20005 }"
        ]
        await rounds.release("s1")
        assert fresh.runs[-1].endswith("delete element inet sbc fw_media_pinholes { 20000, 20001 }")
        rounds.close()

    asyncio.run(asyncio.wait_for(main(), 5))


def test_exclusive_work_runs_between_rounds_and_none_without_a_firewall(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        kernel = GatedKernel()
        rounds = FirewallRounds()
        fw = firewall(tmp_path, kernel)
        rounds.firewall = fw
        kernel.gate.clear()
        # A reload's ruleset on the rounds' thread: the detectors go on meanwhile.
        reload = asyncio.ensure_future(rounds.exclusive(kernel.run, "the new ruleset"))
        await wait_entered(kernel)
        banned = rounds.ban(guess(fw, GUESSER, 5))
        await asyncio.sleep(0.2)
        assert not banned.done() and rounds.banning(GUESSER)
        kernel.gate.set()
        await asyncio.wait_for(asyncio.gather(reload, banned), 5)
        assert kernel.runs[0] == "the new ruleset" and "blacklist_v4" in kernel.runs[1]
        rounds.firewall = None  # stopped: queued work is released, nothing runs
        await rounds.hold("s1", {20000})
        assert len(kernel.runs) == 2
        # A firewall stopped while a round is on the thread waits for it.
        rounds.firewall = fw
        kernel.gate.clear()
        kernel.entered.clear()
        pinholes = asyncio.ensure_future(rounds.hold("s2", {20002}))
        await asyncio.get_running_loop().run_in_executor(None, kernel.entered.wait, 5)
        rounds.firewall = None
        stop = asyncio.ensure_future(rounds.exclusive(kernel.run, "the teardown"))
        await asyncio.sleep(0.1)
        assert not stop.done()
        kernel.gate.set()
        await asyncio.wait_for(asyncio.gather(pinholes, stop), 5)
        assert kernel.runs[2:] == [
            # s1 was held with no firewall: not noted (a firewall set again by
            # the node gets the live sessions' ports through `restart`).
            "add element inet sbc fw_media_pinholes { 20002 }",
            "the teardown",
        ]
        rounds.close()
        # Shut down (the SBC's stop): exclusive work still runs, on another thread.
        await asyncio.wait_for(rounds.exclusive(kernel.run, "the last teardown"), 5)
        assert kernel.runs[-1] == "the last teardown"

    asyncio.run(main())


class SentResponses:
    """Stands in for the transport layer: records the responses the node sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []

    def send_response_nowait(self, response: Any, flow: Flow, on_failure: Any = None) -> None:
        self.sent.append((response.status, flow.remote_host))


class Received:
    def __init__(self) -> None:
        self.count = 0

    def receive(self, *args: Any, **kwargs: Any) -> Output:
        self.count += 1
        return Output()


def challenge(flow: Flow) -> Outgoing:
    text = (
        "SIP/2.0 401 Unauthorized\r\n"
        f"Via: SIP/2.0/UDP {flow.remote_host}:{flow.remote_port};branch=z9hG4bK1\r\n"
        "From: <sip:alice@sbc.invalid>;tag=1\r\nTo: <sip:alice@sbc.invalid>;tag=2\r\n"
        "Call-ID: c1\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    return Outgoing(parse_message(text), text, flow)


def test_the_answer_that_earns_a_ban_leaves_once_the_kernel_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 5th wrong password's 401 waits for its ban's round, so that the guesser's
    next request meets the kernel's drop; meanwhile the node drops what the guesser
    sends, and answers others at once."""
    kernel = GatedKernel()
    monkeypatch.setattr(app, "_started_firewall", lambda section: firewall(tmp_path, kernel))
    guesser = Flow(Transport.UDP, "203.0.113.1", 5060, str(GUESSER), 5060)
    phone = Flow(Transport.UDP, "203.0.113.1", 5060, "198.51.100.20", 5060)
    failure = AuthFailure(str(GUESSER), "alice")

    async def main() -> None:
        node = SbcNode(load_config_text("firewall: {enabled: true}\n", "sbc.yaml", tmp_path))
        await node._start_firewall(node.config)
        sent = SentResponses()
        node.transport = sent  # type: ignore[assignment]
        received = Received()
        monkeypatch.setattr(node.transactions, "receive", received.receive)
        for _ in range(4):
            node._execute(Step(Output((challenge(guesser),)), auth_failures=(failure,)), 0.0)
        assert sent.sent == [(401, str(GUESSER))] * 4 and kernel.runs == []
        kernel.gate.clear()
        both = Output((challenge(guesser), challenge(phone)))
        node._execute(Step(both, auth_failures=(failure,)), 0.0)
        await wait_entered(kernel)
        assert sent.sent[4:] == [(401, "198.51.100.20")]
        assert node._firewall_bans == 1
        request = parse_message(
            b"REGISTER sip:sbc.invalid SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK2\r\n"
            b"From: <sip:alice@sbc.invalid>;tag=1\r\nTo: <sip:alice@sbc.invalid>\r\n"
            b"Call-ID: c2\r\nCSeq: 2 REGISTER\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        node._on_message(request, guesser)
        assert received.count == 0  # dropped: its ban is on the way
        node._on_message(request, phone)
        assert received.count == 1
        kernel.gate.set()
        for _ in range(100):
            if len(sent.sent) == 6:
                break
            await asyncio.sleep(0.01)
        assert sent.sent[5] == (401, str(GUESSER))
        (ban_text,) = kernel.runs
        assert "blacklist_v4 { 198.51.100.7 timeout 300s " in ban_text
        assert not node._nft_rounds.banning(GUESSER)
        node.transport = None
        await node._stop_firewall()
        node._nft_rounds.close()

    asyncio.run(main())


def test_a_reload_turning_the_firewall_off_and_on_reopens_live_pinholes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the node, with a real relay on loopback: calls set up while the
    firewall was off get their ports opened when a reload turns it on, the one
    that ended meanwhile does not."""
    kernels = [GatedKernel(), GatedKernel()]
    made = iter(kernels)
    monkeypatch.setattr(app, "_started_firewall", lambda section: firewall(tmp_path, next(made)))
    on = load_config_text("firewall: {enabled: true}\n", "sbc.yaml", tmp_path)
    off = load_config_text("firewall: {enabled: false}\n", "sbc.yaml", tmp_path)
    loopback = IPv4Address("127.0.0.1")
    offer = (StreamOffer(LegOffer("outside", 4), LegOffer("inside", 4)),)

    async def main() -> None:
        node = SbcNode(on)
        relay = MediaRelay(
            MediaConfig(
                realms=(
                    RealmMediaAddress("outside", ipv4=loopback),
                    RealmMediaAddress("inside", ipv4=loopback),
                ),
                kernel_path=False,
            )
        )
        await relay.start()
        node.media = relay
        try:
            await node._start_firewall(node.config)
            rounds = node._nft_rounds
            first = await relay.allocate("c1", offer)
            await node._pinholes(first, open_=True)
            assert kernels[0].runs == [
                f"add element inet sbc fw_media_pinholes {{ {_ports(first)} }}"
            ]
            await node._reload_firewall(off)
            assert node.firewall is None and rounds.pinholes == frozenset()
            second = await relay.allocate("c2", offer)
            await node._pinholes(second, open_=True)  # no firewall: nothing to do
            ended = await relay.allocate("c3", offer)
            await relay.delete(ended.session_id)
            await node._reload_firewall(on)
            for _ in range(100):
                if rounds.pinholes:
                    break
                await asyncio.sleep(0.01)
            both = sorted(first.relay_ports() | second.relay_ports())
            assert kernels[1].runs == [
                f"add element inet sbc fw_media_pinholes {{ {', '.join(map(str, both))} }}"
            ]
            await node._stop_firewall()
        finally:
            await relay.close()
            node._nft_rounds.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def _ports(session: Any) -> str:
    return ", ".join(str(p) for p in sorted(session.relay_ports()))


def test_a_kernel_that_keeps_refusing_is_logged_once_an_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        kernel = GatedKernel()
        rounds = FirewallRounds()
        fw = rounds.firewall = firewall(tmp_path, kernel)
        kernel.fail = NftError("apply", "Error: Could not process rule: Device or resource busy")
        for i in range(3):
            await rounds.hold(f"s{i}", {20000 + 2 * i})
            await rounds.ban(guess(fw, ip_address(f"198.51.100.{20 + i}"), 5))
        assert rounds.rounds == 6
        rounds.close()

    with caplog.at_level(logging.WARNING, logger="sbc.firewall.rounds"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "sbc.firewall.rounds"]
    assert len([m for m in messages if "pinholes not changed" in m]) == 1, messages
    assert len([m for m in messages if "bans not in the kernel" in m]) == 1, messages
