"""Topology hiding: what may cross from one leg to the other, and how it is rewritten.

Pure functions over messages and SDP. Nothing that carries an address of one realm
reaches the other: Via, Route, Record-Route, Contact, Call-ID, tags and branch are
the B2BUA's own on each leg (built by the controller), only the headers on the
receiving realm's keep-list are copied, and SDP ``o=``/``c=``/``m=`` (and ``a=rtcp``)
name the media relay, with ICE attributes (candidates are addresses) dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import ip_address
from typing import Final

from sbc.b2bua.call import CallLeg
from sbc.b2bua.realm import Realm
from sbc.media.session import LegOffer, MediaSession, Side, StreamOffer
from sbc.media.values import Direction, Endpoint
from sbc.sip.message import Message
from sbc.sip.sdp import ICE_ATTRIBUTE_NAMES, Origin, SdpError, SessionDescription
from sbc.sip.uri import format_host
from sbc.transport.base import ListenAddress, Transport

#: Headers the B2BUA always builds itself on each leg: a keep-list cannot let the
#: other leg's copy through (RFC 3261 16 would forward these; a B2BUA never does).
GENERATED_HEADERS: Final = frozenset(
    {
        "via",
        "route",
        "record-route",
        "contact",
        "call-id",
        "from",
        "to",
        "cseq",
        "max-forwards",
        "content-length",
        "content-type",
        "path",
        "service-route",
        "p-asserted-identity",
        "authorization",
        "proxy-authorization",
        "www-authenticate",
        "proxy-authenticate",
    }
)

#: SDP attributes that name the other side: ICE candidates and credentials carry its
#: addresses; RFC 5576 ssrc attributes carry its CNAME (often user@host) and msid.
HIDDEN_SDP_ATTRIBUTES: Final = ICE_ATTRIBUTE_NAMES | frozenset({"ssrc", "ssrc-group", "msid"})

#: SDP username of the B2BUA's own o= line.
SDP_USERNAME: Final = "sbc"

SDP_CONTENT_TYPE: Final = "application/sdp"


def copy_kept_headers(source: Message, target: Message, realm: Realm) -> int:
    """Copy into ``target`` the headers of ``source`` that ``realm`` keeps; the count."""
    copied = 0
    for name, value in source.headers:
        if realm.keeps(name) and name.lower() not in GENERATED_HEADERS:
            target.headers.add(name, value)
            copied += 1
    if copied:
        target.invalidate()
    return copied


def sip_uri_for(listen: ListenAddress, user: str | None = None) -> str:
    """``sip:[user@]host:port[;transport=x]`` of a listener of the SBC."""
    userinfo = f"{user}@" if user else ""
    param = "" if listen.transport is Transport.UDP else f";transport={listen.transport.value}"
    scheme = "sips" if listen.transport is Transport.TLS else "sip"
    return f"{scheme}:{userinfo}{format_host(listen.host)}:{listen.port}{param}"


def contact_for(listen: ListenAddress, user: str | None = None) -> str:
    """The SBC's Contact on a leg: its own listener in that leg's realm."""
    return f"<{sip_uri_for(listen, user)}>"


def via_for(listen: ListenAddress, branch: str) -> str:
    """A Via naming the SBC's listener (rport asked, RFC 3581)."""
    return (
        f"SIP/2.0/{listen.transport.value.upper()} {format_host(listen.host)}:{listen.port}"
        f";branch={branch};rport"
    )


def is_sdp(message: Message) -> bool:
    content_type = message.content_type
    if not message.body or content_type is None:
        return False
    return content_type.essence == SDP_CONTENT_TYPE


def parse_sdp(message: Message) -> SessionDescription | None:
    """The message's SDP body, or None when it has none (SdpError if it is broken)."""
    if not is_sdp(message):
        return None
    return SessionDescription.parse(message.body)


def _media_direction(sdp: SessionDescription, index: int) -> Direction:
    return Direction(sdp.direction(index).value)


def _remote(sdp: SessionDescription, index: int) -> Endpoint | None:
    media = sdp.media[index]
    connection = media.connection or sdp.connection
    if media.is_rejected or connection is None:
        return None
    try:
        return Endpoint(ip_address(connection.host), media.port)
    except ValueError:
        return None


def leg_offers(sdp: SessionDescription, realm: Realm) -> tuple[LegOffer, ...]:
    """What one side's SDP says about each of its streams, for the relay."""
    family = realm.media_address.version
    return tuple(
        LegOffer(
            realm=realm.name,
            family=family,
            remote=_remote(sdp, index),
            rtcp_mux=bool(media.find_attributes("rtcp-mux")),
            direction=_media_direction(sdp, index),
        )
        for index, media in enumerate(sdp.media)
    )


def blank_offers(count: int, realm: Realm) -> tuple[LegOffer, ...]:
    """Offers for a side whose SDP is not known yet."""
    return tuple(
        LegOffer(realm=realm.name, family=realm.media_address.version) for _ in range(count)
    )


def stream_offers(a: Sequence[LegOffer], b: Sequence[LegOffer]) -> tuple[StreamOffer, ...]:
    return tuple(StreamOffer(x, y) for x, y in zip(a, b, strict=False))


def rewrite_sdp(
    sdp: SessionDescription, session: MediaSession, side: Side, leg: CallLeg
) -> tuple[bytes, CallLeg]:
    """The SDP to send on ``leg`` (the relay's ``side``), and the leg after sending it.

    Every c= is the relay's address on that side, every m= port (and a=rtcp) its
    port; media sections the relay has no stream for are rejected (port 0); o= is
    the leg's own origin, its version bumped only when the SDP changed (RFC 3264 8).
    ICE attributes are dropped: the relay is not an ICE agent here and candidates
    would name the other realm's addresses; so are ssrc/msid attributes, whose CNAME
    is often the other side's user@host (RFC 5576).
    """
    if not session.streams:
        raise SdpError("no media stream in the relay session")
    address = session.streams[0].leg(side).local.address
    out = sdp.without_attributes(HIDDEN_SDP_ATTRIBUTES).with_connection_address(address)
    for index, media in enumerate(out.media):
        if index >= len(session.streams):
            out = out.with_media_rejected(index)
            continue
        if media.is_rejected:
            continue
        local = session.streams[index].leg(side)
        rtcp = local.local.port if media.find_attributes("rtcp-mux") else local.local.port + 1
        out = out.with_media_port(
            index, local.local.port, rtcp_port=rtcp, rtcp_address=local.local.address
        )
    placeholder = Origin(SDP_USERNAME, leg.sdp_session, 0, "IN", "IP4", "0.0.0.0").with_address(
        address
    )
    digest = hashlib.sha256(bytes(out.with_origin(placeholder))).hexdigest()[:16]
    version = leg.sdp_version if digest == leg.sdp_digest else leg.sdp_version + 1
    out = out.with_origin(replace(placeholder, sess_version=version))
    return bytes(out), replace(leg, sdp_version=version, sdp_digest=digest)
