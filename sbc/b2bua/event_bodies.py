"""Event bodies (NOTIFY, PUBLISH) as they cross from one realm to the other.

Three event packages carry the other side's topology in their bodies:

* a message summary (RFC 3842, MWI): ``Message-Account`` names the voicemail
  account's URI, a host of the realm the body comes from. The line is dropped.
* a dialog-info document (RFC 4235, busy lamps): each ``<dialog>`` names the
  inside dialog by its ``call-id``, ``local-tag`` and ``remote-tag``, and its
  ``<target>`` elements are the parties' Contact URIs, addresses of their realm.
  The three attributes and the targets are dropped (all optional in RFC 4235
  4.1); the ``id`` a subscriber tracks a dialog by is replaced by a digest of it,
  the same for every NOTIFY of that dialog, since ids are often built from the
  Call-ID.
* a presence document (PIDF, RFC 3863): a tuple's ``<contact>`` is commonly the
  publisher's registered Contact. It is dropped (optional, RFC 3863 4.1.4).

Identities (``entity``, ``<identity>``) stay: they are addresses of record, as
the From and To that cross. The documents keep every other byte as written
(phones parse these with little tolerance for re-serialised XML): elements and
attributes are cut out at the offsets the XML parser reports. A document that is
not well-formed XML is dropped whole, so nothing the parser could not see crosses.
Anything else crosses unchanged.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final
from xml.parsers import expat

MESSAGE_SUMMARY: Final = "application/simple-message-summary"
DIALOG_INFO: Final = "application/dialog-info+xml"
PIDF: Final = "application/pidf+xml"

_DIALOG_NS: Final = "urn:ietf:params:xml:ns:dialog-info"
_PIDF_NS: Final = "urn:ietf:params:xml:ns:pidf"
#: RFC 4235 4.1.1: the attributes that name the dialog in its SIP messages.
_DIALOG_IDS: Final = frozenset({b"call-id", b"local-tag", b"remote-tag"})

#: RFC 3842 5.2: the voicemail account's URI in a message summary.
_MESSAGE_ACCOUNT: Final = re.compile(rb"^Message-Account[ \t]*:[^\n]*\n?", re.I | re.M)
#: A start tag (or an empty-element tag) from its ``<``: its attributes one by one,
#: a quoted value may hold ``>``. Only used on tags the XML parser accepted.
_TAG: Final = re.compile(rb"<[^\s/>]+(?:\s+[^\s=/>]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*\s*(/?)>")
_ATTRIBUTE: Final = re.compile(rb"\s+([^\s=/>]+)\s*=\s*(\"[^\"]*\"|'[^']*')")


def screen_event_body(content_type: str | None, body: bytes) -> tuple[bytes, str | None]:
    """``body`` and its Content-Type as they cross to the other realm (b"" and None
    when nothing may cross)."""
    if not body or content_type is None:
        return body, content_type
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == MESSAGE_SUMMARY:
        return _MESSAGE_ACCOUNT.sub(b"", body), content_type
    if kind in (DIALOG_INFO, PIDF):
        screened = _screen_xml(body)
        return (b"", None) if screened is None else (screened, content_type)
    return body, content_type


class _Cuts:
    """What to cut from a document: byte ranges out, replacements in."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.edits: list[tuple[int, int, bytes]] = []
        #: The start of an element being dropped, how deep in it the parser is, and
        #: where it ends if it is an empty-element tag.
        self.dropping: int | None = None
        self.depth = 0
        self.empty_end: int | None = None

    def start(self, name: str, offset: int) -> None:
        if self.dropping is not None:
            self.depth += 1
            return
        namespace, _, local = name.rpartition(" ")
        if (namespace, local) in (
            (_DIALOG_NS, "target"),
            (_PIDF_NS, "contact"),
        ):
            tag = self._tag(offset)
            self.dropping, self.depth = offset, 0
            self.empty_end = tag.end() if tag.group(1) else None
        elif (namespace, local) == (_DIALOG_NS, "dialog"):
            self._dialog_tag(offset)

    def end(self, name: str, offset: int) -> None:
        if self.dropping is None:
            return
        if self.depth:
            self.depth -= 1
            return
        # <target .../> ends with its own tag; </target> has no attributes.
        stop = self.empty_end or self.body.index(b">", offset) + 1
        self.edits.append((self.dropping, stop, b""))
        self.dropping = None

    def _tag(self, offset: int) -> re.Match[bytes]:
        tag = _TAG.match(self.body, offset)
        if tag is None:  # not the tag the parser saw: cut nothing rather than guess
            raise ValueError(f"no start tag at byte {offset}")
        return tag

    def _dialog_tag(self, offset: int) -> None:
        tag = self._tag(offset)
        for attribute in _ATTRIBUTE.finditer(self.body, offset, tag.end()):
            name = attribute.group(1).lower()
            if name in _DIALOG_IDS:
                self.edits.append((attribute.start(), attribute.end(), b""))
            elif name == b"id":
                value = attribute.group(2)
                digest = hashlib.sha256(value[1:-1]).hexdigest()[:20].encode()
                start, end = attribute.span(2)
                self.edits.append((start, end, value[:1] + digest + value[-1:]))

    def apply(self) -> bytes:
        out, last = [], 0
        for start, stop, replacement in sorted(self.edits):
            out += [self.body[last:start], replacement]
            last = stop
        out.append(self.body[last:])
        return b"".join(out)


def _screen_xml(body: bytes) -> bytes | None:
    """``body`` without the dialog ids, targets and contacts; None if not XML."""
    cuts = _Cuts(body)
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartElementHandler = lambda name, _: cuts.start(name, parser.CurrentByteIndex)
    parser.EndElementHandler = lambda name: cuts.end(name, parser.CurrentByteIndex)
    try:
        parser.Parse(body, True)
    except (expat.ExpatError, ValueError):
        return None
    return cuts.apply()
