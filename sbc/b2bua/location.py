"""Location conveyance (RFC 6442) on emergency calls.

An emergency call carries where the caller is: a PIDF-LO document (RFC 4119, 5491)
in a multipart body beside the SDP, pointed at by a ``Geolocation: <cid:...>``
header (location by value), or a URI the emergency service dereferences
(``Geolocation: <https://lis.example/...>``, location by reference), with
``Geolocation-Routing`` saying whether it may route on it. The PSAP needs it to
send help; many jurisdictions require the dispatchable location to arrive with the
call.

The B2BUA rebuilds every body it relays (the SDP names the relay), and by default
carries the SDP alone: location is personal data, and the multipart body's other
parts and headers could name the other realm. On an emergency route it carries
the location too:

* each PIDF-LO part crosses as it came (its XML is the caller's location, not the
  network's shape; its ``entity``, the caller's presentity URI, goes with it),
  under a Content-ID of the SBC's own: a cid names its author's host (RFC 2392),
  which is of the other realm;
* the ``Geolocation`` values that point at such a part are rewritten to the new
  Content-ID; those by reference cross as they are (the service must be able to
  fetch them); ``cid:`` values naming no part are dropped;
* ``Geolocation-Routing`` crosses as it is (``yes`` or ``no``).

The body that goes out is ``multipart/mixed``: the rewritten SDP first, then the
location parts (RFC 6442 4.1, 5.1).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sbc.b2bua.topology import multipart_parts
from sbc.sip.errors import ParseError
from sbc.sip.headers import Address, MediaType, split_list
from sbc.sip.message import Message

#: The media types of a location object by value (RFC 4119, 5491).
LOCATION_TYPES: Final = frozenset({"application/pidf+xml"})
#: At most this many location parts cross, and this many Geolocation values (RFC
#: 6442 allows one location per value; dozens are an attack, not a caller).
MAX_PARTS: Final = 4

_PART_HEADER = re.compile(rb"^([A-Za-z0-9!#$%&'*+.^_`|~-]+)[ \t]*:[ \t]*(.*?)[ \t]*\r?$", re.M)


@dataclass(frozen=True, slots=True)
class LocationPart:
    """One location object of the caller's body: its type, Content-ID and content."""

    content_type: str
    content_id: str | None
    content: bytes


@dataclass(frozen=True, slots=True)
class Conveyed:
    """What a relayed request carries of the caller's location."""

    parts: tuple[LocationPart, ...]
    #: The Geolocation values, cids rewritten to the parts' new Content-IDs.
    geolocation: tuple[str, ...]
    routing: str | None

    def body(self, sdp: bytes, sdp_type: str) -> tuple[bytes, str]:
        """``sdp`` and the location parts as one multipart/mixed body, and its type;
        ``sdp`` alone when nothing is carried by value."""
        if not self.parts:
            return sdp, sdp_type
        boundary = f"sbc-{secrets.token_hex(8)}"
        chunks: list[bytes] = []
        if sdp:  # (none in an INVITE without an offer)
            chunks += [f"--{boundary}\r\nContent-Type: {sdp_type}\r\n\r\n".encode(), sdp, b"\r\n"]
        for part in self.parts:
            head = f"--{boundary}\r\nContent-Type: {part.content_type}\r\n"
            if part.content_id is not None:
                head += f"Content-ID: <{part.content_id}>\r\n"
            chunks += [f"{head}\r\n".encode(), part.content, b"\r\n"]
        chunks.append(f"--{boundary}--\r\n".encode())
        return b"".join(chunks), f"multipart/mixed;boundary={boundary}"

    def headers(self) -> list[tuple[str, str]]:
        fields = [("Geolocation", value) for value in self.geolocation]
        if fields and self.routing is not None:
            fields.append(("Geolocation-Routing", self.routing))
        return fields


def conveyed(message: Message, host: str) -> Conveyed | None:
    """The location ``message`` conveys, as it is to cross (new Content-IDs at
    ``host``, the SBC's own), or None when it conveys none."""
    values = [v for f in message.headers.fields("Geolocation") for v in split_list(f)]
    if not values:
        return None
    by_cid = {part.content_id: part for part in _location_parts(message) if part.content_id}
    parts: list[LocationPart] = []
    geolocation: list[str] = []
    for value in values:
        if len(geolocation) >= MAX_PARTS:
            break
        try:
            address = Address.parse(value, "Geolocation")
        except ParseError:
            continue
        uri = str(address.uri)
        if not uri.lower().startswith("cid:"):
            if uri.lower().startswith(("http:", "https:", "sip:", "sips:", "pres:")):
                geolocation.append(f"<{uri}>")
            continue
        part = by_cid.get(_unescape_cid(uri[4:]))
        if part is None:
            continue  # a reference to nothing the SBC carries
        new_id = f"{secrets.token_hex(8)}@{host}"
        parts.append(LocationPart(part.content_type, new_id, part.content))
        geolocation.append(f"<cid:{new_id}>")
    if not geolocation:
        return None
    routing = message.headers.get("Geolocation-Routing")
    routing = routing.strip().lower() if routing is not None else None
    return Conveyed(tuple(parts), tuple(geolocation), routing if routing in ("yes", "no") else None)


def _location_parts(message: Message) -> Sequence[LocationPart]:
    """The location objects of a multipart body (RFC 2046 5.1.1), in order."""
    if not message.body or message.content_type is None:
        return ()
    media_type = message.content_type
    if not media_type.essence.startswith("multipart/"):
        return ()
    boundary = media_type.param("boundary")
    if not boundary:
        return ()
    out = []
    for head, content in multipart_parts(message.body, boundary):
        fields = {m.group(1).lower(): m.group(2) for m in _PART_HEADER.finditer(head)}
        raw_type = fields.get(b"content-type", b"").decode("ascii", "replace")
        try:
            essence = MediaType.parse(raw_type).essence
        except ParseError:
            continue
        if essence not in LOCATION_TYPES:
            continue
        raw_id = fields.get(b"content-id", b"").decode("ascii", "replace").strip()
        content_id = raw_id[1:-1] if raw_id.startswith("<") and raw_id.endswith(">") else None
        out.append(LocationPart(essence, content_id or None, content))
    return out


def _unescape_cid(text: str) -> str:
    """A cid URL's Content-ID (RFC 2392: %-escaped)."""
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)
