"""Asserted identity (RFC 3325) and privacy (RFC 3323) across realms.

A realm is inside the SBC's trust domain when its ``trust_identity`` is set (a
carrier interconnect, an IMS core, a PBX the operator runs): the identity its
requests assert in P-Asserted-Identity is believed, and the identity the SBC
asserts is given to it even when the user asked for privacy. Every other realm is
untrusted: a P-Asserted-Identity it sends is never believed (anybody can write
one), and its requests assert an identity only when the SBC authenticated them
(digest, ``authenticate``): the authenticated user's.

What a new request (INVITE, SUBSCRIBE, MESSAGE ...) carries into the target realm:

- the asserted identity as P-Asserted-Identity: a SIP identity as the user at the
  SBC's own address there (or the realm's ``from_host``), like the From, so no host
  of the other realm crosses; a tel URI's number, without its parameters (a
  phone-context names a domain). At most one of each (RFC 3325 9.1);
- nothing when the user asked for ``Privacy: id`` and the target realm is
  untrusted (RFC 3325 5, RFC 3323 4.2); into a trusted realm the Privacy header
  goes with the identity, so the next hop keeps it private in its turn.

A trusted callee's assertion in its 18x or 2xx (the connected party) reaches the
caller by the same rules. A phone the call reached through its registration (a
``registered`` route) is asserted as the user it registered under: its REGISTER
proved that, while its own P-Asserted-Identity, in an untrusted realm, proves
nothing.

An authenticated user may withhold its identity from the callee with an anonymous
From (RFC 3323 4.1.1.3: a URI at ``anonymous.invalid``): the call goes out with that
From, and the identity is asserted only as the rules above allow. ``Privacy: user``
asks the SBC, as a privacy service (RFC 3323 5.3), to do that for the user: the
From it sends is the anonymous one.

Pure functions over parsed headers; `sbc.b2bua.controller` calls them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sbc.sip.errors import ParseError
from sbc.sip.headers import Address, quote_string, split_list
from sbc.sip.message import Message, Request
from sbc.sip.uri import SipUri, TelUri

#: The host of an anonymous URI (RFC 3261 8.1.1.3, RFC 3323 4.1.1.3).
ANONYMOUS_HOST: Final = "anonymous.invalid"

#: The From of a request whose caller withholds its identity.
ANONYMOUS_URI: Final = "sip:anonymous@anonymous.invalid"
ANONYMOUS_DISPLAY: Final = "Anonymous"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is from, as the SBC asserts it: a SIP user (written at the SBC's
    own address on each leg), a tel URI, or both; a display name for either."""

    display: str | None = None
    user: str | None = None
    tel: str | None = None


def privacy_of(message: Message) -> frozenset[str]:
    """The privacy values a request (or response) asks for (RFC 3323 4.2), lower-case."""
    values: set[str] = set()
    for field in message.headers.fields("Privacy"):
        for part in field.replace(",", ";").split(";"):
            token = part.strip().lower()
            if token:
                values.add(token)
    return frozenset(values)


def withholds_user(request: Request) -> bool:
    """Whether the From the SBC sends must be anonymous: the caller's is, or it asks
    for user-level privacy (RFC 3323 4.2 ``user``)."""
    return is_anonymous(request) or "user" in privacy_of(request)


def is_anonymous(request: Request) -> bool:
    """Whether the From withholds the caller's identity (an ``anonymous.invalid`` URI)."""
    try:
        uri = request.from_.uri
    except ParseError:
        return False
    return isinstance(uri, SipUri) and uri.host.lower() == ANONYMOUS_HOST


def asserted_by_peer(message: Message) -> Identity | None:
    """The identity a trusted peer asserts in P-Asserted-Identity (of a request, or of
    a response: the connected party): its first SIP or SIPS URI's user and its first
    tel URI (RFC 3325 9.1); None when it asserts none the SBC can carry."""
    display: str | None = None
    user: str | None = None
    tel: str | None = None
    values = [v for f in message.headers.fields("P-Asserted-Identity") for v in split_list(f)]
    for value in values:
        try:
            address = Address.parse(value, "P-Asserted-Identity")
        except ParseError:
            continue
        uri = address.uri
        if isinstance(uri, SipUri) and user is None and uri.user:
            user = uri.user_unescaped
        elif isinstance(uri, TelUri) and tel is None:
            # The number alone: a phone-context names a domain of the other realm.
            tel = f"tel:{uri.number}"
        else:
            continue
        display = display or address.display_name or None
    if user is None and tel is None:
        return None
    return Identity(display, user, tel)


def authenticated(request: Request, user: str) -> Identity:
    """The identity of a request the SBC authenticated as ``user``; the From's display
    name goes with it unless the From is anonymous."""
    display = None if is_anonymous(request) else request.from_.display_name
    return Identity(display or None, user)


def identity_headers(
    identity: Identity | None,
    privacy: frozenset[str],
    *,
    trusted: bool,
    sip_uri: Callable[[str], str],
    privacy_header: str | None,
) -> list[tuple[str, str]]:
    """The P-Asserted-Identity (and Privacy) fields of a new request into a realm
    (``trusted``: inside the trust domain); ``sip_uri`` writes a user's URI there."""
    if identity is None or ("id" in privacy and not trusted):
        return []
    display = f"{quote_string(identity.display)} " if identity.display else ""
    fields = []
    if identity.user is not None:
        fields.append(("P-Asserted-Identity", f"{display}<{sip_uri(identity.user)}>"))
    if identity.tel is not None:
        fields.append(("P-Asserted-Identity", f"{display}<{identity.tel}>"))
    if fields and trusted and privacy_header is not None and privacy - {"none"}:
        fields.append(("Privacy", privacy_header))
    return fields
