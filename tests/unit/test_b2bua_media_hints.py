"""The media address in a peer's SDP is a hint the relay sends to before latching:
one naming the SBC itself, a group, another family, or a loopback or link-local
host outside such a realm is not taken (the relay waits for the peer's packets)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from sbc.b2bua.controller import AllocateMedia
from sbc.b2bua.realm import Realm, RealmTable
from sbc.b2bua.topology import leg_offers
from sbc.media.values import Endpoint
from sbc.sip.sdp import SessionDescription
from tests.unit.test_b2bua_flows import CALLER, controller, invite_text, receive, sdp

OUTSIDE = Realm.build("outside", [], "198.51.100.1")
INSIDE = Realm.build("inside", [], "203.0.113.1")
OWN = RealmTable([OUTSIDE, INSIDE]).media_addresses


def hint(address: str, realm: Realm = OUTSIDE) -> Endpoint | None:
    kind = "IP6" if ":" in address else "IP4"
    text = sdp("a", "198.51.100.9", 40000).replace(
        "c=IN IP4 198.51.100.9", f"c=IN {kind} {address}"
    )
    (offer,) = leg_offers(SessionDescription.parse(text.encode()), realm, OWN)
    return offer.remote


def test_a_peer_s_unicast_address_is_taken() -> None:
    assert hint("198.51.100.9") == Endpoint.of("198.51.100.9", 40000)
    assert hint("192.0.2.77") == Endpoint.of("192.0.2.77", 40000)


@pytest.mark.parametrize(
    "address",
    [
        "203.0.113.1",  # the relay's own address in another realm: another call's port
        "198.51.100.1",  # ... or in this one
        "224.0.0.1",
        "239.1.2.3",
        "255.255.255.255",
        "127.0.0.1",  # the SBC's own services
        "127.0.0.53",
        "169.254.169.254",  # link-local: a cloud metadata service, not a peer
        "2001:db8::9",  # IPv6 in an IPv4 realm
        "ff02::1",
    ],
)
def test_addresses_no_peer_has_are_not_sent_to(address: str) -> None:
    assert hint(address) is None


def test_a_loopback_realm_takes_loopback_peers() -> None:
    lab = Realm.build("lab", [], "127.0.0.1")
    assert hint("127.0.0.2", lab) == Endpoint.of("127.0.0.2", 40000)


def test_the_controller_gives_the_relay_no_hint_for_its_own_address() -> None:
    c = controller()
    offer = sdp("a", "203.0.113.1", 21000)  # the inside relay port of some call
    step = receive(c, invite_text(body=offer), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    assert allocate.streams[0].a.remote is None
    assert ip_address("203.0.113.1") in c.realms.media_addresses
