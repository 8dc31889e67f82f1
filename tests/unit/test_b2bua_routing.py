"""Routing rules: first match wins; realm, user prefix and domain must all agree."""

from __future__ import annotations

import pytest

from sbc.b2bua.routing import RejectRoute, RouteAction, Router, RouteRule, TrunkRoute
from sbc.sip.uri import parse_uri
from sbc.transport.base import Destination, Transport

CORE = Destination(Transport.UDP, "203.0.113.5", 5060)
CARRIER = Destination(Transport.TCP, "198.51.100.7", 5080)

ROUTER = Router(
    [
        RouteRule("busy", RouteAction.REJECT, from_realm="outside", user_prefix="900", status=486),
        RouteRule("intl", RouteAction.TRUNK, from_realm="inside", user_prefix="00",
                  realm="outside", destination=CARRIER),
        RouteRule("core", RouteAction.TRUNK, from_realm="outside", domain="sbc.example.org",
                  realm="inside", destination=CORE),
    ]
)  # fmt: skip


def test_first_matching_rule_wins() -> None:
    decision = ROUTER.route("outside", parse_uri("sip:9001@sbc.example.org"))
    assert decision == RejectRoute("busy", 486)


def test_domain_and_realm_select_the_trunk() -> None:
    decision = ROUTER.route("outside", parse_uri("sip:1000@SBC.example.org;user=phone"))
    assert decision == TrunkRoute("core", "inside", CORE)


def test_user_prefix_matches_tel_uris_too() -> None:
    assert ROUTER.route("inside", parse_uri("tel:0049301234")) == TrunkRoute(
        "intl", "outside", CARRIER
    )


@pytest.mark.parametrize(
    ("realm", "uri"),
    [
        ("inside", "sip:1000@sbc.example.org"),  # core only matches from outside
        ("outside", "sip:1000@other.example.org"),  # wrong domain
        (None, "sip:9001@sbc.example.org"),  # a realm-less listener matches no realm rule
    ],
)
def test_no_rule_matches(realm: str | None, uri: str) -> None:
    assert ROUTER.route(realm, parse_uri(uri)) is None


def test_a_trunk_needs_a_realm_and_a_destination() -> None:
    with pytest.raises(ValueError, match="route x: a trunk needs a trunk, or a realm and a peer"):
        RouteRule("x", RouteAction.TRUNK, realm="inside")
