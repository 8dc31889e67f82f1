"""Topology hiding: what may cross from one leg to the other, and how it is rewritten.

Pure functions over messages and SDP. Nothing that carries an address of one realm
reaches the other: Via, Route, Record-Route, Contact, Call-ID, tags and branch are
the B2BUA's own on each leg (built by the controller), only the headers on the
receiving realm's keep-list are copied, and SDP ``o=``/``c=``/``m=`` (and ``a=rtcp``)
name the media relay, with ICE attributes (candidates are addresses) and the
``i= u= e= p= k=`` lines dropped. Kept headers that name other things of the other
leg are cut down as they cross: URIs naming hosts in Alert-Info, Call-Info and
Error-Info, and their parameters that name one; warn-agents in Warning; and the
dialog references (Join, Target-Dialog, In-Reply-To) not at all.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from sbc.b2bua.call import CallLeg
from sbc.b2bua.realm import Realm
from sbc.b2bua.srtp import crypto_attribute, plain_proto, secure_proto
from sbc.evolve import evolve
from sbc.media.session import LegOffer, MediaSession, Side, StreamOffer
from sbc.media.values import Direction, Endpoint, ip_address
from sbc.sip.errors import ParseError
from sbc.sip.headers import MediaType, header_key, split_list
from sbc.sip.message import Message
from sbc.sip.sdp import (
    ICE_ATTRIBUTE_NAMES,
    Attribute,
    Connection,
    Field,
    MediaDescription,
    Origin,
    RtcpAttribute,
    SdpError,
    SdpLine,
    SessionDescription,
)
from sbc.sip.sdp import Direction as SdpDirection
from sbc.sip.uri import escape_user, format_host
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
        "refer-to",
        "replaces",
    }
)

#: Headers the B2BUA runs on each leg besides the generated ones: session timers
#: (RFC 4028), reliable provisionals (RFC 3262), option tags, the body's encoding and
#: subscriptions (RFC 6665, 4488), which it sets or copies itself where a method
#: needs them. A keep-list cannot copy them either (a second, conflicting copy);
#: header rules may not touch them (`sbc.b2bua.manipulation.OWNED_HEADERS` says why).
PER_LEG_HEADERS: Final = frozenset(
    {
        "session-expires",
        "min-se",
        "require",
        "supported",
        "unsupported",
        "rseq",
        "rack",
        "content-encoding",
        "event",
        "subscription-state",
        "refer-sub",
    }
)

#: What a keep-list never lets across.
NEVER_KEPT: Final = GENERATED_HEADERS | PER_LEG_HEADERS

#: Headers that name a dialog or call of the other leg by its Call-ID and tags
#: (Target-Dialog, RFC 4538; Join, RFC 3911; In-Reply-To, RFC 3261 20.21): on this
#: leg they name nothing the peer knows, and they are the other leg's identifiers.
#: A keep-list does not copy them (header rules may still add or strip them).
DIALOG_REFERENCE_HEADERS: Final = frozenset({"target-dialog", "join", "in-reply-to"})

#: Kept headers whose values are lists of ``<URI>;params`` (RFC 3261 20.4, 20.9,
#: 20.18): only the elements whose URI names no host, or a loopback one, cross
#: (RFC 7462 ``urn:alert:`` URNs, the ``http://127.0.0.1/Bellcore-dr2`` hints PBXs
#: send); one naming a host names a server of the other realm.
URI_LIST_HEADERS: Final = frozenset({"alert-info", "call-info", "error-info"})

#: The warn-agent of every copied Warning (RFC 3261 20.43: a hostport, or a
#: pseudonym): the other realm's host never crosses in it.
WARN_AGENT: Final = "-"

#: SDP attributes that name the other side: ICE candidates and credentials carry its
#: addresses; RFC 5576 ssrc attributes carry its CNAME (often user@host) and msid;
#: RFC 4570 source-filter lists its source addresses; RFC 4975 path is the
#: msrp://host:port of its endpoint; a=tool (RFC 8866 6.3) names its software and
#: version (what a scanner looks for), a=msid-semantic goes with the msid dropped.
#: Lower case: names are matched case-insensitively (RFC 5234 2.3, the quoted names
#: of their grammars).
HIDDEN_SDP_ATTRIBUTES: Final = (
    ICE_ATTRIBUTE_NAMES
    | frozenset(
        {"ssrc", "ssrc-group", "msid", "msid-semantic", "source-filter", "path", "tool", "altc"}
    )
    | frozenset(
        # SDP capability negotiation (RFC 5939, 6871, 7006): a=acap carries any attribute
        # of the other side (its a=crypto key, candidates), a=ccap its addresses; the
        # configurations refer to them, and the relay negotiates none.
        {"acap", "tcap", "pcfg", "acfg", "csup", "creq", "ccap"}
        | {"rmcap", "omcap", "mfcap", "mscap", "lcfg", "sescap"}
    )
)

#: Attribute names of experiments and vendors (``a=x-nat``, ``a=X-relay-addr``): one
#: vendor's words, often its NAT and relay addresses, that the relay cannot vouch for.
VENDOR_SDP_PREFIX: Final = "x-"

#: SDP attributes that carry a side's media keys: SDES (RFC 4568) and MIKEY (RFC
#: 4567). They cross only between two passthrough realms; otherwise each leg gets
#: the relay's own key (`sbc.b2bua.srtp`) or none.
KEY_ATTRIBUTES: Final = frozenset({"crypto", "key-mgmt"})

#: Lines kept as text that may cross (RFC 8866 5): v=, r= and z=; s= crosses as
#: :data:`SESSION_NAME`. i=, u=, e= and p= are the other side's words, URI,
#: user@host and phone number; k= is obsolete and MUST be discarded (5.12); any
#: other letter is unknown or out of place (an o= after an m=, which the parser
#: keeps as text). Media sections keep none.
CROSSING_FIELDS: Final = frozenset("vrz")

#: The s= line of every SDP the B2BUA sends (RFC 8866 5.3: "-" when a session has
#: no name): the other side's often names its software (s=Asterisk PBX 18.2).
SESSION_NAME: Final = Field("s", "-")

#: RFC 3264 8.4: the RFC 2543 hold, "send me nothing". It crosses as it is: it names
#: no one, and the relay's address in its place would ask the other side for media.
LEGACY_HOLD: Final = Connection("IN", "IP4", "0.0.0.0")

#: SDP username of the B2BUA's own o= line.
SDP_USERNAME: Final = "sbc"

SDP_CONTENT_TYPE: Final = "application/sdp"

logger = logging.getLogger(__name__)


def copy_kept_headers(source: Message, target: Message, realm: Realm) -> int:
    """Copy into ``target`` the headers of ``source`` that ``realm`` keeps; the count.

    Names are compared by lookup key, so the compact form of a generated header
    (``v``, ``f``, ``m`` ...) never crosses either. None of the copied headers is one
    a parsed view of ``target`` is computed from (those are all generated). The
    :data:`DIALOG_REFERENCE_HEADERS` never cross; :data:`URI_LIST_HEADERS` cross
    without their URIs naming hosts, Warning with :data:`WARN_AGENT` for its agents
    (a header left with nothing is not copied).
    """
    keep = realm.keep_headers
    if not keep:
        return 0
    copied = 0
    for name, value in source.headers:
        key = header_key(name)
        if key not in keep or key in NEVER_KEPT or key in DIALOG_REFERENCE_HEADERS:
            continue
        if key in URI_LIST_HEADERS:
            value = _without_hosts(value)
        elif key == "warning":
            value = _warnings_of_nobody(value)
        if value:
            target.headers.add(name, value)
            copied += 1
    return copied


#: URI schemes whose text after the colon is ``[user@]host`` (RFC 3261 19.1.1).
_HOST_SCHEMES: Final = frozenset({"sip", "sips"})


def _uri_host(uri: str) -> str | None:
    """The host a URI names (lower case, no port or brackets), None when it names
    none (``urn:``, ``tel:``, ``cid:``, a bare token)."""
    scheme, colon, rest = uri.partition(":")
    if not colon:
        return uri.lower() if "." in uri else None  # a bare name with dots: a host
    if rest.startswith("//"):
        authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    else:
        authority = re.split(r"[;?#]", rest, maxsplit=1)[0]
        if "@" not in authority and scheme.lower() not in _HOST_SCHEMES:
            return None
    host = authority.rpartition("@")[2]
    if host.startswith("["):
        return host[1:].partition("]")[0].lower()
    return host.partition(":")[0].lower()


def _names_no_host(uri: str) -> bool:
    host = _uri_host(uri)
    if host is None or host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


#: One ``;name[=value]`` parameter after a URI-list element's ``<URI>``; a quoted
#: value may hold ``;``.
_ELEMENT_PARAM: Final = re.compile(
    r';[ \t]*([^;=" \t]*)[ \t]*(?:=[ \t]*("(?:[^"\\]|\\.)*"|[^;]*))?'
)


def _names_nothing(value: str) -> bool:
    """A parameter value that names no host or URI: no ``@``, ``:`` or ``<`` and no
    dotted name (a number with a fraction is fine)."""
    text = value.strip().strip('"')
    if any(c in text for c in "@:<"):
        return False
    if "." in text:
        try:
            float(text)
        except ValueError:
            return False
    return True


def _element_without_hosts(element: str) -> str | None:
    """A URI-list element as it may cross (None: not at all): ``<URI>`` naming no
    host, with only the parameters that name nothing either (Call-Info's
    ``appearance-uri`` of shared line appearances, RFC 7463, names a party's URI)."""
    if not element.startswith("<"):
        # Not the grammar's, but phones send ``info=alert-autoanswer`` so.
        return element if ":" not in element and "@" not in element else None
    end = element.find(">")
    if end < 0 or not _names_no_host(element[1:end].strip()):
        return None
    params = [
        match[0]
        for match in _ELEMENT_PARAM.finditer(element, end + 1)
        if match[2] is None or _names_nothing(match[2])
    ]
    return element[: end + 1] + "".join(param.rstrip() for param in params)


def _without_hosts(value: str) -> str:
    """A URI-list value (Alert-Info, Call-Info, Error-Info) without the elements whose
    URI names a host, and without the parameters that name one."""
    elements = [e for e in split_list(value) if e]
    kept = [
        crossing
        for crossing in (_element_without_hosts(element) for element in elements)
        if crossing is not None
    ]
    if len(kept) < len(elements):
        logger.debug(
            "- %d of %d URIs naming a host not copied", len(elements) - len(kept), len(elements)
        )
    return ", ".join(kept)


#: RFC 3261 20.43: warn-code SP warn-agent SP warn-text (a quoted string).
_WARNING: Final = re.compile(r'([0-9]{3})[ \t]+\S+[ \t]+("(?:[^"\\]|\\.)*")')


def _warnings_of_nobody(value: str) -> str:
    """A Warning value with :data:`WARN_AGENT` for each warn-agent; malformed
    elements dropped (their agent cannot be told from their text)."""
    out = []
    for element in [e for e in split_list(value) if e]:
        match = _WARNING.fullmatch(element)
        if match is not None:
            out.append(f"{match[1]} {WARN_AGENT} {match[2]}")
    return ", ".join(out)


def sip_uri_for(listen: ListenAddress, user: str | None = None, *, params: bool = True) -> str:
    """``sip:[user@]host:port[;transport=x]`` of a listener of the SBC (without the
    transport parameter when ``params`` is false, as a From or To URI)."""
    userinfo = f"{escape_user(user)}@" if user else ""
    param = (
        ""
        if listen.transport is Transport.UDP or not params
        else f";transport={listen.transport.value}"
    )
    scheme = "sips" if listen.transport is Transport.TLS else "sip"
    return f"{scheme}:{userinfo}{format_host(listen.host)}:{listen.port}{param}"


#: Contacts of the SBC's own listeners (no user part): one string per listener,
#: shared by every dialog that names it.
_CONTACTS: dict[ListenAddress, str] = {}


def contact_for(listen: ListenAddress, user: str | None = None) -> str:
    """The SBC's Contact on a leg: its own listener in that leg's realm."""
    if user:
        return f"<{sip_uri_for(listen, user)}>"
    contact = _CONTACTS.get(listen)
    if contact is None:
        contact = f"<{sip_uri_for(listen)}>"
        if len(_CONTACTS) < 1024:
            _CONTACTS[listen] = contact
    return contact


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


#: The headers of a multipart body's part (RFC 2046 5.1) that is SDP.
_SDP_PART: Final = re.compile(rb"^content-type[ \t]*:[ \t]*application/sdp", re.I | re.M)


def _sdp_of(body: bytes, content_type: str) -> SessionDescription | None:
    # A body that is not SDP here is relayed as it is: one that may be is either
    # read (the SDP part of a multipart body, as SIP-I trunks and RFC 6442 location
    # send: the rest is dropped, and the SDP crosses alone) or refused (unlabelled).
    if not body:
        return None
    if not content_type:
        raise SdpError("body without Content-Type (RFC 3261 20.15)", 400)
    try:
        media_type = MediaType.parse(content_type)
    except ParseError as exc:
        raise SdpError(str(exc), exc.status) from None
    essence = media_type.essence
    if essence != SDP_CONTENT_TYPE:
        if not essence.startswith("multipart/") or not _SDP_PART.search(body):
            return None
        body = _sdp_part(body, media_type.param("boundary"))
    sdp = SessionDescription.parse(body)
    for media in sdp.media:
        for line in media.lines:
            # a=rtcp is rewritten to the relay's port (``rewrite_sdp``): a malformed
            # one is refused here, where every caller handles SdpError, not half-way
            # there.
            if isinstance(line, Attribute) and line.name.lower() == "rtcp":
                RtcpAttribute.parse(line.value or "")
    return sdp


def parse_sdp(message: Message) -> SessionDescription | None:
    """The message's SDP body, or None when it has none (SdpError if it is broken).

    Parsed once per body: a call reads the offer and the answer at several steps.
    """
    if not message.body:
        return None
    return message.body_view("sdp", _sdp_of)


#: The relay's direction of each SDP direction attribute (same names, RFC 3264 5.1).
_DIRECTIONS: Final = {d: Direction(d.value) for d in SdpDirection}


def multipart_parts(body: bytes, boundary: str) -> Iterator[tuple[bytes, bytes]]:
    """The (headers, content) of each part of a multipart body (RFC 2046 5.1.1:
    parts after each ``--boundary`` line, their headers, an empty line, then the
    content up to the line break before the next delimiter, which is the
    delimiter's); a part without the empty line is skipped."""
    delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            return  # the close delimiter
        head, blank, content = part.partition(b"\r\n\r\n")
        if not blank:
            head, blank, content = part.partition(b"\n\n")
        if blank:
            yield head, content.removesuffix(b"\n").removesuffix(b"\r")


def _sdp_part(body: bytes, boundary: str | None) -> bytes:
    """The content of the first application/sdp part of a multipart body; SdpError
    if none."""
    if not boundary:
        raise SdpError("multipart body without boundary (RFC 2046 5.1.1)", 400)
    for head, content in multipart_parts(body, boundary):
        if _SDP_PART.search(head):
            return content
    raise SdpError("multipart body with a malformed SDP part", 400)


#: m= protos of UDP media that is not RTP: the relay passes their datagrams as they are
#: (T.38 fax over UDPTL, ITU-T T.38 Annex D and RFC 3362; plain ``UDP``, RFC 8866 5.14).
_OPAQUE_PROTOS: Final = frozenset({"udptl", "udp"})


#: The limited broadcast address: no peer's media address.
_BROADCAST: Final = ip_address("255.255.255.255")


def _remote(
    media: MediaDescription,
    session: Connection | None,
    realm: Realm,
    own: frozenset[IPv4Address | IPv6Address],
) -> Endpoint | None:
    """Where the peer's SDP asks for media, when the relay may send there before it
    learns the real source (latching); None when it may not.

    The address is the peer's word, so it is not taken for the SBC's own media
    addresses (media sent to a relay port of another call would latch there, or
    loop), multicast or broadcast (one call's media to a whole segment), another
    family than the realm's, or loopback and link-local addresses outside a realm
    of such addresses (the SBC's own services, or a host beside it that is no peer).
    """
    connection = media.connection or session
    if media.is_rejected or connection is None:
        return None
    try:
        address = ip_address(connection.host)
    except ValueError:
        return None
    if address.is_unspecified:
        # RFC 3264 8.4: 0.0.0.0 is hold, not a destination; sent to, it is this host.
        return None
    local = realm.media_address
    if (
        address in own
        or address.is_multicast
        or address == _BROADCAST
        or address.version != local.version
        or (address.is_loopback and not local.is_loopback)
        or (address.is_link_local and not local.is_link_local)
    ):
        logger.debug(
            "- realm %s: SDP media address %s not used before latching", realm.name, address
        )
        return None
    return Endpoint(address, media.port)


def leg_offers(
    sdp: SessionDescription,
    realm: Realm,
    own: frozenset[IPv4Address | IPv6Address] = frozenset(),
) -> tuple[LegOffer, ...]:
    """What one side's SDP says about each of its streams, for the relay (``own``:
    the SBC's media addresses, never taken from a peer's SDP)."""
    family = realm.media_address.version
    connection = sdp.connection
    # RFC 3264 5.1: a media-level direction overrides the session's; neither: sendrecv.
    default = sdp.session_direction or SdpDirection.SENDRECV
    return tuple(
        LegOffer(
            realm=realm.name,
            family=family,
            remote=_remote(media, connection, realm, own),
            rtcp_mux=bool(media.find_attributes("rtcp-mux")),
            direction=_DIRECTIONS[media.direction or default],
            rtp=media.proto.lower() not in _OPAQUE_PROTOS,
            # SRTP passed through as it is, unless `sbc.b2bua.srtp` terminates it.
            encrypted="SAVP" in media.proto.upper(),
        )
        for media in sdp.media
    )


def blank_offers(count: int, realm: Realm) -> tuple[LegOffer, ...]:
    """Offers for a side whose SDP is not known yet."""
    return tuple(
        LegOffer(realm=realm.name, family=realm.media_address.version) for _ in range(count)
    )


def stream_offers(a: Sequence[LegOffer], b: Sequence[LegOffer]) -> tuple[StreamOffer, ...]:
    return tuple(StreamOffer(x, y) for x, y in zip(a, b, strict=False))


def rewrite_sdp(
    sdp: SessionDescription,
    session: MediaSession,
    side: Side,
    leg: CallLeg,
    peer: Sequence[LegOffer] | None = None,
    *,
    passthrough: bool = False,
    opportunistic: frozenset[int] = frozenset(),
) -> tuple[bytes, CallLeg]:
    """The SDP to send on ``leg`` (the relay's ``side``), and the leg after sending it.

    Every c= is the relay's address on that side, every m= port (and a=rtcp) its
    port; media sections the relay has no stream for are rejected (port 0); o= is
    the leg's own origin, its version bumped only when the SDP changed (RFC 3264 8).
    ICE attributes are dropped: the relay is not an ICE agent here and candidates
    would name the other realm's addresses; so are ssrc/msid attributes, whose CNAME
    is often the other side's user@host (RFC 5576), the other
    :data:`HIDDEN_SDP_ATTRIBUTES`, and the lines kept as text but those of
    :data:`CROSSING_FIELDS`. A c= of 0.0.0.0 (RFC 2543 hold) stays 0.0.0.0.

    SRTP (`sbc.b2bua.srtp`): the other side's a=crypto never crosses. A stream whose
    relay leg on ``side`` speaks SRTP gets the SRTP profile and one a=crypto with the
    relay's key, under the tag of the peer's own a=crypto (``peer``: the offers the
    B2BUA last read from this side, whose ``srtp`` None says a leg gave its key up);
    one of plain RTP gets the RTP profile. With
    ``passthrough`` (a call between two passthrough realms) both cross as they are.
    ``opportunistic``: the streams the leg's peer last sent as SRTP in the RTP
    profile (RFC 8643): their a=crypto goes with RTP/AVP[F].

    One pass over the lines (the edits of ``SessionDescription`` in a row copy the
    whole description at each step; this runs for every offer and answer).
    """
    streams = session.streams
    if not streams:
        raise SdpError("no media stream in the relay session")
    address = streams[0].leg(side).local.address
    connection = Connection.for_address(address)
    lines: list[SdpLine] = []
    for line in sdp.lines:
        if isinstance(line, Attribute):
            name = line.name.lower()
            # A session-level a=crypto (RFC 4568 defines none, some endpoints send
            # one) is that side's key as much as a media-level one; a session-level
            # a=rtcp (RFC 3605 defines none either) its RTCP address, which no relay
            # port stands for.
            if _hidden(name) or (name in KEY_ATTRIBUTES and not passthrough) or name == "rtcp":
                continue
        elif isinstance(line, Connection):
            line = LEGACY_HOLD if line.host == "0.0.0.0" else connection
        elif isinstance(line, Field) and line.type not in CROSSING_FIELDS:
            if line.type != "s":
                continue
            line = SESSION_NAME
        lines.append(line)
    media: list[MediaDescription] = []
    every_media_has_c = True
    for index, section in enumerate(sdp.media):
        kept: list[SdpLine] = []
        has_c = mux_only = False
        for line in section.lines:
            if isinstance(line, Attribute):
                name = line.name.lower()
                if _hidden(name) or (name in KEY_ATTRIBUTES and not passthrough):
                    continue
                if name == "rtcp" and line.name != "rtcp":
                    line = Attribute("rtcp", line.value)
                mux_only = mux_only or name == "rtcp-mux-only"
            elif isinstance(line, Connection):
                line = LEGACY_HOLD if line.host == "0.0.0.0" else connection
                has_c = True
            elif isinstance(line, Field):
                continue
            kept.append(line)
        every_media_has_c = every_media_has_c and has_c
        proto = section.proto
        crypto: Attribute | None = None
        if not passthrough and index < len(streams) and section.is_rtp:
            key = streams[index].leg(side).local_crypto
            if (
                key is not None
                and peer is not None
                and index < len(peer)
                and peer[index].srtp is None
            ):
                key = None  # a key made ready for a late offer, given up for RTP
            if key is None:
                proto = plain_proto(proto)
            else:
                proto = plain_proto(proto) if index in opportunistic else secure_proto(proto)
                known = peer[index].crypto if peer is not None and index < len(peer) else None
                crypto = crypto_attribute(key, known)
        if index >= len(streams) or section.proto.upper().startswith("TCP"):
            # RFC 3264 6: no relay stream for it, so it is rejected. The relay is UDP:
            # a stream over TCP (MSRP, BFCP, RFC 4571 RTP) cannot go through it.
            port, count = 0, None
        elif section.is_rejected:
            port, count = section.port, section.port_count
        else:
            # One RTP/RTCP port pair a stream: a port count (49170/2) would name relay
            # ports of another call.
            local = streams[index].leg(side).local
            port, count = local.port, None
            # RFC 5761 5.1.3: an answerer without rtcp-mux sends RTCP to a=rtcp, and
            # the relay takes it on its RTCP port (on its RTP port it would pass for
            # RTP, unfiltered). Only an rtcp-mux-only offer (RFC 8858) has none.
            rtcp = local.port if mux_only else local.port + 1
            kept = [
                _relay_rtcp(line, rtcp, local.address)
                if isinstance(line, Attribute) and line.name == "rtcp"
                else line
                for line in kept
            ]
            if crypto is not None:
                kept.append(crypto)
        if port == 0:
            # RFC 3605: a=rtcp names the other side's RTCP port and address, and no
            # relay port stands for them on a stream sent with port zero.
            kept = [ln for ln in kept if not (isinstance(ln, Attribute) and ln.name == "rtcp")]
        media.append(
            MediaDescription(section.media, port, proto, section.formats, count, tuple(kept))
        )
    if not any(isinstance(line, Connection) for line in lines) and (
        not media or not every_media_has_c
    ):
        # RFC 8866 5.7: a c= at session level when a media section has none.
        lines.insert(_after_last(lines, "vosiuep"), connection)
    placeholder = Origin(
        SDP_USERNAME, leg.sdp_session, 0, "IN", connection.addrtype, connection.address
    )
    origin_at = next((i for i, line in enumerate(lines) if isinstance(line, Origin)), None)
    if origin_at is None:
        origin_at = _after_last(lines, "v")
        lines.insert(origin_at, placeholder)
    else:
        lines[origin_at] = placeholder
    out = SessionDescription(tuple(lines), tuple(media), sdp.line_ending)
    encoded = out.encoded_lines()
    digest = hashlib.sha256(out.encode(encoded)).hexdigest()[:16]
    version = leg.sdp_version if digest == leg.sdp_digest else leg.sdp_version + 1
    encoded[origin_at] = f"o={evolve(placeholder, sess_version=version)}"
    body = out.encode(encoded)
    if version == leg.sdp_version and digest == leg.sdp_digest:
        return body, leg
    return body, evolve(leg, sdp_version=version, sdp_digest=digest)


def _hidden(name: str) -> bool:
    """Whether an SDP attribute (its lower-case name) never crosses to the other side."""
    return name in HIDDEN_SDP_ATTRIBUTES or name.startswith(VENDOR_SDP_PREFIX)


def _after_last(lines: list[SdpLine], types: str) -> int:
    """Where a line goes after the last line whose type is in ``types`` (RFC 8866 5
    grammar order), as ``SessionDescription`` edits insert."""
    position = 0
    for index, line in enumerate(lines):
        if line.type in types:
            position = index + 1
    return position


def _relay_rtcp(line: Attribute, port: int, address: IPv4Address | IPv6Address) -> Attribute:
    """``a=rtcp`` naming the relay's RTCP port and address (RFC 3605); SdpError
    when the peer's is malformed."""
    RtcpAttribute.parse(line.value or "")
    addrtype = "IP4" if address.version == 4 else "IP6"
    return Attribute("rtcp", str(RtcpAttribute(port, "IN", addrtype, str(address))))
