"""The userspace relay's packet path and session state, with the binds faked.

No socket is opened: every leg gets two fake transports that keep what the relay
sends, and packets are handed to `MediaRelay._packet` as a bound port would.
"""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any

import pytest

from sbc.media.config import MediaConfig, RealmMediaAddress
from sbc.media.control import MediaError
from sbc.media.kernel import KernelPathUnavailable
from sbc.media.relay import MediaRelay, _Leg
from sbc.media.rtp import RtpHeader
from sbc.media.session import LegOffer, MediaSession, Side, StreamOffer
from sbc.media.srtp import SdesCrypto, SrtpSuite, SrtpTransform
from sbc.media.values import Endpoint

OUTSIDE = IPv4Address("198.51.100.1")
INSIDE = IPv4Address("203.0.113.1")
THIRD = IPv4Address("192.0.2.1")
PEER_A = Endpoint.of("198.51.100.10", 34000)
PEER_B = Endpoint.of("203.0.113.20", 36000)
ATTACKER = Endpoint.of("198.51.100.66", 40000)
RTP = bytes(RtpHeader(0, 1, 160, 0xA)) + b"\xd5" * 160
#: An RR that announces one report block and carries none.
SHORT_RR = struct.pack("!BBHI", 0x81, 201, 1, 0xBAD)
RR = struct.pack("!BBHI", 0x80, 201, 1, 0xA)


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.closed = False

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        self.closed = True


def make_relay(port_max: int = 20999, busy: Sequence[int] = ()) -> MediaRelay:
    relay = MediaRelay(
        MediaConfig(
            realms=(
                RealmMediaAddress("outside", ipv4=OUTSIDE),
                RealmMediaAddress("inside", ipv4=INSIDE),
                RealmMediaAddress("third", ipv4=THIRD),
            ),
            port_min=20000,
            port_max=port_max,
            kernel_path=False,
        )
    )
    relay.descriptor_budget = None
    relay._now = lambda: 100.0  # type: ignore[method-assign]

    async def bind(leg: _Leg) -> None:
        if leg.state.local.port in busy:
            raise OSError(errno.EADDRINUSE, "faked")
        leg.rtp, leg.rtcp = FakeTransport(), FakeTransport()  # type: ignore[assignment]
        relay._sockets += 2

    relay._bind = bind  # type: ignore[method-assign]
    return relay


def leg(relay: MediaRelay, session: MediaSession, side: Side, stream: int = 0) -> _Leg:
    return relay._sessions[session.session_id].streams[stream].legs[side]


def sent(leg: _Leg, rtcp: bool = False) -> list[tuple[bytes, tuple[str, int]]]:
    transport: Any = leg.rtcp if rtcp else leg.rtp
    return list(transport.sent)


def offer(a: LegOffer | None = None, b: LegOffer | None = None) -> tuple[StreamOffer, ...]:
    return (
        StreamOffer(
            a or LegOffer("outside", remote=PEER_A), b or LegOffer("inside", remote=PEER_B)
        ),
    )


def test_malformed_rtcp_neither_latches_nor_counts_as_relayed() -> None:
    relay = make_relay()
    session = asyncio.run(relay.allocate("call", offer()))
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    relay._packet(a, True, SHORT_RR, ATTACKER.sockaddr())
    assert not a.state.rtcp_latch.latched
    assert (a.rtcp_packets, a.dropped_other) == (0, 1)
    relay._packet(a, True, RR, PEER_A.sockaddr())
    assert a.state.rtcp_latch.source == PEER_A
    assert sent(b, rtcp=True) == [(RR, ("203.0.113.20", 36001))]


def test_malformed_rtcp_on_a_muxed_port_does_not_take_the_rtp_latch() -> None:
    relay = make_relay()
    session = asyncio.run(
        relay.allocate("call", offer(a=LegOffer("outside", remote=PEER_A, rtcp_mux=True)))
    )
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    relay._packet(a, False, SHORT_RR, ATTACKER.sockaddr())
    assert not a.state.rtp_latch.latched
    relay._packet(a, False, RTP, PEER_A.sockaddr())
    assert a.state.rtp_latch.source == PEER_A
    assert sent(b) == [(RTP, PEER_B.sockaddr())]


@pytest.mark.parametrize(
    "packet",
    [
        b"\x8f\x00" + b"\x00" * 14,  # 15 CSRCs announced, one there
        b"\x90\x00" + b"\x00" * 10 + b"\xbe\xde\x00\x09",  # extension of 9 words, none there
        b"\xa0\x00" + b"\x00" * 10 + b"\x00" * 3 + b"\x40",  # 64 bytes of padding in 16
        b"\xa0\x00" + b"\x00" * 10 + b"\x01\x02\x03\x00",  # padding count 0
    ],
)
def test_malformed_rtp_is_dropped_before_latching(packet: bytes) -> None:
    relay = make_relay()
    session = asyncio.run(relay.allocate("call", offer()))
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    relay._packet(a, False, packet, ATTACKER.sockaddr())
    assert not a.state.rtp_latch.latched
    assert (a.packets, a.dropped_other, sent(b)) == (0, 1, [])


def test_malformed_rtp_towards_an_srtp_leg_is_dropped_not_raised() -> None:
    relay = make_relay()
    suite = SrtpSuite.AES_CM_128_HMAC_SHA1_80
    srtp_b = LegOffer("inside", remote=PEER_B, srtp=suite, crypto=SdesCrypto.generate(suite))
    session = asyncio.run(relay.allocate("call", offer(b=srtp_b)))
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    relay._packet(a, False, RTP, PEER_A.sockaddr())
    relay._packet(a, False, b"\x8f\x00" + RTP[2:20], PEER_A.sockaddr())
    assert (a.packets, a.dropped_other, len(sent(b))) == (1, 1, 1)


def test_a_new_peer_key_keeps_the_relays_outbound_context() -> None:
    # A fresh outbound context would restart the rollover counter: past 65536
    # packets the peer could no longer authenticate what the relay sends.
    relay = make_relay()
    suite = SrtpSuite.AES_CM_128_HMAC_SHA1_80
    srtp_a = LegOffer("outside", remote=PEER_A, srtp=suite, crypto=SdesCrypto.generate(suite))
    session = asyncio.run(relay.allocate("call", offer(a=srtp_a)))
    a = leg(relay, session, Side.A)
    outbound, inbound = a.outbound, a.inbound
    new_key = SdesCrypto.generate(suite)
    updated = asyncio.run(relay.update(session.session_id, offer(a=evolve_crypto(srtp_a, new_key))))
    assert updated.streams[0].a.remote_crypto == new_key
    assert a.outbound is outbound and a.inbound is not inbound
    assert a.state.local_crypto == session.streams[0].a.local_crypto
    peer = SrtpTransform(new_key, outbound=True)
    relay._packet(a, False, peer.protect(RTP, rtcp=False), PEER_A.sockaddr())
    assert a.packets == 1


def test_the_same_peer_key_under_another_tag_keeps_the_inbound_context() -> None:
    # The B2BUA's answers reuse the peer's tag, and a re-offer may number its
    # a=crypto lines anew: same key, same context (its rollover counter goes on).
    relay = make_relay()
    suite = SrtpSuite.AES_CM_128_HMAC_SHA1_80
    key = SdesCrypto.generate(suite)
    srtp_a = LegOffer("outside", remote=PEER_A, srtp=suite, crypto=key)
    session = asyncio.run(relay.allocate("call", offer(a=srtp_a)))
    a = leg(relay, session, Side.A)
    inbound = a.inbound
    renumbered = SdesCrypto(key.tag + 1, suite, key.key)
    asyncio.run(relay.update(session.session_id, offer(a=evolve_crypto(srtp_a, renumbered))))
    assert a.inbound is inbound


def test_a_leg_kept_ready_for_srtp_gives_it_up_for_a_plain_offer() -> None:
    # A late offer: the B2BUA allocates a key before it knows what the first offer
    # is; the offer is RTP, and the leg relays plain RTP from then on.
    relay = make_relay()
    suite = SrtpSuite.AES_CM_128_HMAC_SHA1_80
    ready = LegOffer("inside", srtp=suite)
    session = asyncio.run(relay.allocate("call", offer(b=ready)))
    assert session.streams[0].b.local_crypto is not None
    updated = asyncio.run(
        relay.update(session.session_id, offer(b=LegOffer("inside", remote=PEER_B)))
    )
    assert updated.streams[0].b.local_crypto is None
    assert updated.streams[0].b.remote_crypto is None
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    assert b.inbound is None and b.outbound is None
    relay._packet(b, False, RTP, PEER_B.sockaddr())
    relay._packet(a, False, RTP, PEER_A.sockaddr())
    assert [data for data, _ in sent(a)] == [RTP] and [data for data, _ in sent(b)] == [RTP]
    # It cannot become SRTP again: the peer has no key of the relay's.
    with pytest.raises(MediaError, match="cannot become SRTP"):
        asyncio.run(relay.update(session.session_id, offer(b=ready)))


@pytest.mark.parametrize("suite", [SrtpSuite.AES_CM_128_HMAC_SHA1_32, SrtpSuite.AEAD_AES_128_GCM])
def test_a_leg_kept_ready_for_srtp_takes_the_key_of_another_suite_it_is_given(
    suite: SrtpSuite,
) -> None:
    # A late offer of another suite only: the key made ready (AES_CM_128_HMAC_SHA1_80)
    # reached no peer; the B2BUA chose one of the offer's suite, and what the relay
    # sends that leg is protected with it.
    relay = make_relay()
    ready = LegOffer("inside", srtp=SrtpSuite.AES_CM_128_HMAC_SHA1_80)
    session = asyncio.run(relay.allocate("call", offer(b=ready)))
    peer_key, chosen = SdesCrypto.generate(suite), SdesCrypto.generate(suite)
    taken = LegOffer("inside", remote=PEER_B, srtp=suite, crypto=peer_key, local_crypto=chosen)
    updated = asyncio.run(relay.update(session.session_id, offer(b=taken)))
    assert updated.streams[0].b.local_crypto == chosen
    a, b = leg(relay, session, Side.A), leg(relay, session, Side.B)
    relay._packet(a, False, RTP, PEER_A.sockaddr())
    ((protected, _),) = sent(b)
    assert SrtpTransform(chosen, outbound=False).unprotect(protected, rtcp=False) == RTP
    from_peer = SrtpTransform(peer_key, outbound=True).protect(RTP, rtcp=False)
    relay._packet(b, False, from_peer, PEER_B.sockaddr())
    assert [data for data, _ in sent(a)] == [RTP]
    # Given again (the B2BUA passes its offers whole), the same key changes nothing.
    outbound = b.outbound
    asyncio.run(relay.update(session.session_id, offer(b=taken)))
    assert b.outbound is outbound


def evolve_crypto(offer: LegOffer, crypto: SdesCrypto) -> LegOffer:
    return LegOffer(offer.realm, remote=offer.remote, srtp=offer.srtp, crypto=crypto)


def test_a_stream_that_cannot_get_both_ports_leaves_no_half_stream() -> None:
    # One pair per address: a second stream gets side a (third realm), not side b.
    relay = make_relay(port_max=20001)
    session = asyncio.run(relay.allocate("call", offer()))
    two = (*offer(), StreamOffer(LegOffer("third"), LegOffer("inside")))
    with pytest.raises(MediaError, match=r"no free RTP port pair on 203\.0\.113\.1"):
        asyncio.run(relay.update(session.session_id, two))
    assert relay._ports.in_use(THIRD) == 0
    assert len(asyncio.run(relay.stats(session.session_id)).streams) == 1
    relay._packet(leg(relay, session, Side.A), False, RTP, PEER_A.sockaddr())
    final = asyncio.run(relay.delete(session.session_id))
    assert len(final.streams) == 1
    assert relay._ports.in_use(OUTSIDE) == relay._ports.in_use(INSIDE) == 0
    assert relay._sockets == 0


def test_a_restore_that_fails_on_side_b_gives_side_a_back() -> None:
    relay = make_relay()
    state = asyncio.run(relay.allocate("call", offer()))
    asyncio.run(relay.delete(state.session_id))
    other = make_relay(busy=(state.streams[0].b.local.port,))
    with pytest.raises(OSError):
        asyncio.run(other.restore(state))
    assert other.sessions() == ()
    assert other._ports.in_use(OUTSIDE) == other._ports.in_use(INSIDE) == 0
    assert other._sockets == 0


def test_packets_after_delete_are_ignored_and_double_delete_is_unknown() -> None:
    relay = make_relay()
    session = asyncio.run(relay.allocate("call", offer()))
    a = leg(relay, session, Side.A)
    asyncio.run(relay.delete(session.session_id))
    relay._packet(a, False, RTP, PEER_A.sockaddr())
    assert a.packets == 0 and not a.state.rtp_latch.latched
    with pytest.raises(MediaError, match="no media session"):
        asyncio.run(relay.delete(session.session_id))


class RefusingBatcher:
    async def remove(self, names: Sequence[str], *, counters: bool = False) -> Any:
        raise KernelPathUnavailable("nft: table gone")


def test_a_re_offer_whose_kernel_rules_cannot_go_still_answers() -> None:
    relay = make_relay()
    session = asyncio.run(relay.allocate("call", offer()))
    relay._sessions[session.session_id].streams[0].kernel = True
    relay._batcher = RefusingBatcher()  # type: ignore[assignment]
    moved = Endpoint.of("198.51.100.11", 34000)
    updated = asyncio.run(
        relay.update(session.session_id, offer(a=LegOffer("outside", remote=moved)))
    )
    assert updated.streams[0].a.remote_hint == moved
    assert not updated.streams[0].a.rtp_latch.latched


def test_a_re_offer_refused_on_side_b_changes_nothing_on_side_a() -> None:
    relay = make_relay()
    session = asyncio.run(relay.allocate("call", offer()))
    a = leg(relay, session, Side.A)
    before = a.state
    moved = LegOffer("outside", remote=Endpoint.of("198.51.100.11", 34002), rtcp_mux=True)
    with pytest.raises(MediaError, match="stream 0 side b: realm/family cannot change"):
        asyncio.run(relay.update(session.session_id, offer(a=moved, b=LegOffer("third"))))
    assert leg(relay, session, Side.A).state == before


def test_the_previous_peer_key_is_let_go_once_the_new_one_authenticates() -> None:
    relay = make_relay()
    suite = SrtpSuite.AES_CM_128_HMAC_SHA1_80
    old_key, new_key = SdesCrypto.generate(suite), SdesCrypto.generate(suite)
    srtp_a = LegOffer("outside", remote=PEER_A, srtp=suite, crypto=old_key)
    session = asyncio.run(relay.allocate("call", offer(a=srtp_a)))
    a = leg(relay, session, Side.A)
    old_peer, new_peer = (
        SrtpTransform(old_key, outbound=True),
        SrtpTransform(new_key, outbound=True),
    )

    def packet(sender: SrtpTransform, seq: int) -> bytes:
        return sender.protect(bytes(RtpHeader(0, seq, seq * 160, 0xA)) + b"\xd5" * 160, rtcp=False)

    asyncio.run(relay.update(session.session_id, offer(a=evolve_crypto(srtp_a, new_key))))
    # Until the answer the peer still sends with its old key: taken.
    relay._packet(a, False, packet(old_peer, 1), PEER_A.sockaddr())
    relay._packet(a, False, packet(new_peer, 2), PEER_A.sockaddr())
    assert (a.packets, a.dropped_auth) == (2, 0)
    # The new key authenticated: the old one no longer does.
    relay._packet(a, False, packet(old_peer, 3), PEER_A.sockaddr())
    assert (a.packets, a.dropped_auth) == (2, 1)
