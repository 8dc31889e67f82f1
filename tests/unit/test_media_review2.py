"""Second media review: SRTP source drops before decryption, the RTCP report block
about the forwarded media, kernel tasks of the packet path kept and awaited, and
RTCP quality and latched SSRCs read back from replicated state.

The binds are faked as in test_media_relay: packets are handed to
`MediaRelay._packet` as a bound port would.
"""

from __future__ import annotations

import asyncio
import gc
import json
import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from sbc.media.control import KernelPathEngaged
from sbc.media.kernel import KernelForward, MediaTeardown
from sbc.media.latching import Latch, LatchPolicy, LatchState
from sbc.media.relay import MediaRelay, _Leg
from sbc.media.rtcp import (
    ReceiverReport,
    ReportBlock,
    RtcpMonitor,
    RtcpQuality,
    SenderReport,
)
from sbc.media.rtp import RtpHeader
from sbc.media.session import LegOffer, MediaSession, Side
from sbc.media.srtp import SdesCrypto, SrtpSuite, SrtpTransform
from sbc.media.values import Endpoint
from tests.unit.test_media_relay import (
    ATTACKER,
    PEER_A,
    PEER_B,
    leg,
    make_relay,
    offer,
    sent,
)

SUITE = SrtpSuite.AES_CM_128_HMAC_SHA1_80


def rtp(sequence: int, ssrc: int) -> bytes:
    return bytes(RtpHeader(0, sequence, 160 * sequence, ssrc)) + b"\xd5" * 160


def rr(ssrc: int) -> bytes:
    """An RR with no report block (enough to latch and pass the SRTCP checks)."""
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


# -- 1. SRTP: a stranger's packet the source check refuses is never decrypted --------


class CountingInbound:
    """Wraps a leg's inbound transform and counts the decryptions asked of it."""

    def __init__(self, inner: SrtpTransform) -> None:
        self.inner = inner
        self.calls = 0

    def unprotect(self, packet: bytes, rtcp: bool) -> bytes:
        self.calls += 1
        return self.inner.unprotect(packet, rtcp)


def srtp_call(
    policy: LatchPolicy | None = None,
) -> tuple[MediaRelay, _Leg, _Leg, SrtpTransform, CountingInbound]:
    """Side a is SRTP (the peer's key known), side b plain RTP; ``peer`` protects
    what side a's peer sends."""
    relay = make_relay()
    relay._policy = policy or LatchPolicy()
    key = SdesCrypto.generate(SUITE)
    srtp_a = LegOffer("outside", remote=PEER_A, srtp=SUITE, crypto=key)
    session = asyncio.run(relay.allocate("call", offer(a=srtp_a)))
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    assert a.inbound is not None
    counting = CountingInbound(a.inbound)
    a.inbound = counting  # type: ignore[assignment]
    return relay, a, b, SrtpTransform(key, outbound=True), counting


def forged(packet: bytes) -> bytes:
    """A packet protected with a key nobody signalled: fails authentication."""
    return SrtpTransform(SdesCrypto.generate(SUITE), outbound=True).protect(packet, rtcp=False)


def test_a_strangers_srtp_on_a_strict_latched_leg_is_dropped_before_decryption() -> None:
    relay, a, b, peer, counting = srtp_call()
    relay._packet(a, False, peer.protect(rtp(1, 0xA), rtcp=False), PEER_A.sockaddr())
    assert (a.state.rtp_latch.source, counting.calls) == (PEER_A, 1)
    # A flood of forgeries from elsewhere: same SSRC, new SSRC, and a packet the
    # peer's key does authenticate (a NAT rebinding is no re-latch under strict).
    relay._packet(a, False, forged(rtp(2, 0xA)), ATTACKER.sockaddr())
    relay._packet(a, False, forged(rtp(3, 0xBAD)), ATTACKER.sockaddr())
    relay._packet(a, False, peer.protect(rtp(4, 0xA), rtcp=False), ATTACKER.sockaddr())
    assert counting.calls == 1
    assert (a.dropped_source, a.dropped_auth, a.packets) == (3, 0, 1)
    assert len(sent(b)) == 1
    assert a.state.rtp_latch.source == PEER_A
    # The peer itself goes on, its replay window untouched by the dropped ones.
    relay._packet(a, False, peer.protect(rtp(5, 0xA), rtcp=False), PEER_A.sockaddr())
    assert (a.packets, counting.calls) == (2, 2)


def test_a_strangers_srtcp_on_a_latched_rtcp_port_is_dropped_before_decryption() -> None:
    relay, a, b, peer, counting = srtp_call()
    relay._packet(a, True, peer.protect(rr(0xA), rtcp=True), PEER_A.sockaddr())
    assert (a.state.rtcp_latch.source, a.rtcp_packets, counting.calls) == (PEER_A, 1, 1)
    stranger = SrtpTransform(SdesCrypto.generate(SUITE), outbound=True)
    relay._packet(a, True, stranger.protect(rr(0xA), rtcp=True), ATTACKER.sockaddr())
    assert (a.dropped_source, a.dropped_auth, counting.calls) == (1, 0, 1)
    assert len(sent(b, rtcp=True)) == 1


def test_relatching_on_a_new_ssrc_still_needs_an_authenticated_packet() -> None:
    relay, a, _, peer, counting = srtp_call(LatchPolicy(relatch_on_new_ssrc=True))
    relay._packet(a, False, peer.protect(rtp(1, 0xA), rtcp=False), PEER_A.sockaddr())
    # The latched SSRC from elsewhere can never re-latch: refused undecrypted.
    relay._packet(a, False, forged(rtp(2, 0xA)), ATTACKER.sockaddr())
    assert (a.dropped_source, a.dropped_auth, counting.calls) == (1, 0, 1)
    # A new SSRC might: it is authenticated first, and a forgery does not win.
    relay._packet(a, False, forged(rtp(3, 0xB)), ATTACKER.sockaddr())
    assert (a.dropped_source, a.dropped_auth, counting.calls) == (1, 1, 2)
    assert a.state.rtp_latch.source == PEER_A
    moved = Endpoint.of("198.51.100.11", 34000)
    relay._packet(a, False, peer.protect(rtp(4, 0xB), rtcp=False), moved.sockaddr())
    assert (a.state.rtp_latch.source, a.state.rtp_latch.ssrc) == (moved, 0xB)
    assert (a.packets, counting.calls) == (2, 3)


def test_a_relatch_after_silence_still_needs_authenticated_packets() -> None:
    relay, a, _, peer, counting = srtp_call(LatchPolicy(relatch_after_silence=2.0))
    relay._relatch_wait = 2.0
    clock = [100.0]
    relay._now = lambda: clock[0]  # type: ignore[method-assign]
    relay._packet(a, False, peer.protect(rtp(1, 0xA), rtcp=False), PEER_A.sockaddr())
    clock[0] = 103.0  # the latched source is silent for 3 s
    moved = Endpoint.of("198.51.100.11", 34002)
    # Forgeries from a new place are authenticated, fail, and count for nothing.
    for seq in (2, 3, 4):
        relay._packet(a, False, forged(rtp(seq, 0xA)), moved.sockaddr())
    assert (a.dropped_auth, a.state.rtp_latch.source) == (3, PEER_A)
    # The peer's own packets from there (its NAT moved): the third in a row relatches.
    for seq in (5, 6, 7):
        relay._packet(a, False, peer.protect(rtp(seq, 0xA), rtcp=False), moved.sockaddr())
    assert a.state.rtp_latch.source == moved
    assert (a.packets, a.dropped_source, counting.calls) == (2, 2, 7)


def test_without_strict_source_a_strangers_srtp_is_still_authenticated() -> None:
    relay, a, _, peer, counting = srtp_call(LatchPolicy(strict_source=False))
    relay._packet(a, False, peer.protect(rtp(1, 0xA), rtcp=False), PEER_A.sockaddr())
    relay._packet(a, False, forged(rtp(2, 0xA)), ATTACKER.sockaddr())
    relay._packet(a, False, peer.protect(rtp(3, 0xA), rtcp=False), ATTACKER.sockaddr())
    assert (a.dropped_source, a.dropped_auth, a.packets, counting.calls) == (0, 1, 2, 3)
    assert a.state.rtp_latch.source == PEER_A


def test_an_unlatched_srtp_leg_authenticates_before_latching() -> None:
    relay, a, _, _, counting = srtp_call()
    relay._packet(a, False, forged(rtp(1, 0xA)), ATTACKER.sockaddr())
    assert (a.dropped_auth, counting.calls) == (1, 1)
    assert not a.state.rtp_latch.latched


# -- 2. RTCP quality from the report block about the forwarded media -----------------


def block(ssrc: int, fraction: int, jitter: int, lsr: int = 0, dlsr: int = 0) -> ReportBlock:
    return ReportBlock(ssrc, fraction, fraction, 1000, jitter, lsr, dlsr)


def test_quality_is_taken_from_the_block_about_the_forwarded_media() -> None:
    monitor = RtcpMonitor()
    report = ReceiverReport(0xA, (block(0xC, 200, 999), block(0xB, 64, 40)))
    quality = monitor.received((report,), now=1.0, media_ssrc=0xB)
    assert (quality.reports, quality.fraction_lost, quality.jitter) == (1, 0.25, 40)


def test_a_report_about_no_forwarded_source_leaves_the_quality_alone() -> None:
    monitor = RtcpMonitor()
    report = ReceiverReport(0xA, (block(0xC, 200, 999),))
    assert monitor.received((report,), now=1.0, media_ssrc=0xB) == RtcpQuality()
    assert monitor.received((report,), now=1.0) == RtcpQuality()


def test_a_forwarded_sender_report_names_the_source_too() -> None:
    # In the kernel path the relay no longer sees the other side's RTP (its SSRC
    # may change unseen); the SRs of that side still pass through user space.
    monitor = RtcpMonitor()
    sr = SenderReport(0xD, 0xE8A1B2C3, 0x80000000, 0, 10, 1600)
    monitor.sender_report_forwarded((sr,), now=10.0)
    report = ReceiverReport(0xA, (block(0xC, 200, 999), block(0xD, 64, 40, sr.ntp_middle, 0)))
    quality = monitor.received((report,), now=10.25, media_ssrc=0xB)
    assert (quality.fraction_lost, quality.jitter) == (0.25, 40)
    assert quality.rtt == pytest.approx(0.25)


def test_the_relay_reports_quality_of_the_media_it_forwards_to_a_leg() -> None:
    relay = make_relay()
    session = asyncio.run(relay.allocate("call", offer()))
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    relay._packet(b, False, rtp(1, 0xB), PEER_B.sockaddr())
    stray = ReceiverReport(0xA, (block(0xC, 200, 999),))
    relay._packet(a, True, bytes(stray), PEER_A.sockaddr())
    assert asyncio.run(relay.stats(session.session_id)).streams[0].a.quality == RtcpQuality()
    report = ReceiverReport(0xA, (block(0xC, 200, 999), block(0xB, 64, 40)))
    relay._packet(a, True, bytes(report), PEER_A.sockaddr())
    quality = asyncio.run(relay.stats(session.session_id)).streams[0].a.quality
    assert (quality.reports, quality.fraction_lost, quality.jitter) == (1, 0.25, 40)
    assert a.rtcp_packets == 2  # both relayed all the same


# -- 3. Kernel tasks of the packet path: kept referenced, awaited on close -----------


class FakeKernel:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def teardown(self) -> MediaTeardown:
        self.log.append("teardown")
        return MediaTeardown(removed=0, kept=0, table_deleted=True)


class FakeBatcher:
    """Installs wait for ``hold()`` (a future only the waiting task refers to)."""

    def __init__(self, log: list[str], hold: Callable[[], Any]) -> None:
        self.log = log
        self.hold = hold

    async def install(self, forwards: Sequence[KernelForward]) -> None:
        await self.hold()
        self.log.append("install " + " ".join(f.name for f in forwards))

    async def remove(self, names: Sequence[str], *, counters: bool = False) -> Any:
        self.log.append("remove " + " ".join(names))
        return {}

    async def counters(self) -> dict[str, Any]:
        return {}

    async def drain(self) -> None:
        pass


def kernel_relay(log: list[str], hold: Callable[[], Any]) -> MediaRelay:
    relay = make_relay()
    relay._kernel = FakeKernel(log)  # type: ignore[assignment]
    relay._batcher = FakeBatcher(log, hold)  # type: ignore[assignment]

    async def nft(call: Callable[..., Any], *args: Any) -> Any:
        return call(*args)

    relay._nft = nft  # type: ignore[method-assign]
    return relay


def latch_both(relay: MediaRelay, session: MediaSession) -> None:
    relay._packet(leg(relay, session, Side.A), False, rtp(1, 0xA), PEER_A.sockaddr())
    relay._packet(leg(relay, session, Side.B), False, rtp(1, 0xB), PEER_B.sockaddr())


def test_a_kernel_install_from_the_packet_path_is_not_garbage_collected() -> None:
    log: list[str] = []
    waiting: list[weakref.ref[asyncio.Future[None]]] = []

    def hold() -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        waiting.append(weakref.ref(future))
        return future

    async def scenario() -> None:
        relay = kernel_relay(log, hold)
        session = await relay.allocate("call", offer())
        latch_both(relay, session)
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        future = waiting[0]()
        assert future is not None, "the engaging task was collected mid-flight"
        future.set_result(None)
        while not isinstance(await relay.next_event(1.0), KernelPathEngaged):
            pass
        assert relay._sessions[session.session_id].streams[0].kernel
        await relay.close()
        assert log[-1] == "teardown"

    asyncio.run(scenario())


def test_close_waits_for_kernel_tasks_of_the_packet_path() -> None:
    log: list[str] = []

    async def scenario() -> None:
        relay = kernel_relay(log, lambda: asyncio.sleep(0))
        session = await relay.allocate("call", offer())
        latch_both(relay, session)
        await relay.close()
        # The install in flight finished, saw its session gone and took its rules
        # out again, all before the kernel path was torn down.
        name = f"media_{session.session_id}_0"
        assert log == [
            f"install {name}_a {name}_b",
            f"remove {name}_a {name}_b",
            "teardown",
        ]

    asyncio.run(scenario())


# -- 4. RtcpQuality read back from replicated state ----------------------------------

QUALITY = RtcpQuality(3, 0.25, 7, 80, 0.12)


def test_quality_comes_back_from_json_and_redis_with_its_types() -> None:
    assert RtcpQuality.from_dict(json.loads(json.dumps(QUALITY.to_dict()))) == QUALITY
    # A Redis hash gives every value back as a string.
    text = {k: None if v is None else str(v) for k, v in QUALITY.to_dict().items()}
    restored = RtcpQuality.from_dict(text)
    assert restored == QUALITY
    assert isinstance(restored.rtt, float)
    assert RtcpQuality.from_dict({**text, "rtt": None}).rtt is None


@pytest.mark.parametrize("garbage", ["n/a", None, [], {}, "", "nan", True, 10**400])
@pytest.mark.parametrize(
    ("name", "default"),
    [("reports", 0), ("fraction_lost", 0.0), ("cumulative_lost", 0), ("jitter", 0), ("rtt", None)],
)
def test_a_garbage_quality_field_falls_back_to_its_default(
    name: str, default: object, garbage: object
) -> None:
    restored = RtcpQuality.from_dict({**QUALITY.to_dict(), name: garbage})
    assert getattr(restored, name) == default
    assert restored.to_dict() == {**QUALITY.to_dict(), name: default}


@pytest.mark.parametrize("garbage", [None, "n/a", 7])
def test_a_garbage_quality_does_not_stop_the_call_from_being_restored(garbage: object) -> None:
    relay = make_relay()
    state = asyncio.run(relay.allocate("call", offer()))
    asyncio.run(relay.delete(state.session_id))
    data = json.loads(json.dumps(state.to_dict()))
    data["streams"][0]["a"]["quality"] = garbage
    data["streams"][0]["b"]["quality"] = {"reports": "x", "rtt": "slow", "jitter": None}
    restored = asyncio.run(make_relay().restore(MediaSession.from_dict(data)))
    assert restored.session_id == state.session_id
    assert restored.streams[0].a.quality == restored.streams[0].b.quality == RtcpQuality()


def test_a_latched_ssrc_comes_back_from_redis_as_a_number() -> None:
    # A string SSRC never equals the packets' and the quality's block SSRC: the
    # latch would see a "new SSRC" in every packet of its own source.
    latch = Latch(LatchState.LATCHED, PEER_A, 0xA)
    text = {**latch.to_dict(), "ssrc": str(0xA)}
    assert Latch.from_dict(text) == latch
    assert Latch.from_dict({**text, "ssrc": None}).ssrc is None
    assert Latch.from_dict({**text, "ssrc": "n/a"}).ssrc is None
