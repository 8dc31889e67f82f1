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

Identities (``entity``, ``<identity>``) are addresses of record, but their host
is the other realm's (a PBX's name, say): given the SBC's host in the realm the
body enters, a SIP or pres URI there keeps its user and takes that host, as the
From the SBC writes does (so a busy lamp's entity is the URI the phone
subscribed to). The documents keep every other byte as written
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


#: The host part of a ``sip:``, ``sips:`` or ``pres:`` URI as written in a document
#: (an attribute value or element text): what follows the userinfo, up to a port,
#: parameter or header.
_URI_HOST: Final = re.compile(
    rb"^(\s*(?:sips?|pres):(?:[^@<>\s]*@)?)(\[[^\]]*\]|[^:;?>\s<]+)(?::[0-9]*)?", re.I
)


def names_identities(content_type: str | None) -> bool:
    """Whether a body of ``content_type`` names identities ``screen_event_body``
    rehosts (so a caller looks the host up only then)."""
    if content_type is None:
        return False
    return content_type.split(";", 1)[0].strip().lower() in (DIALOG_INFO, PIDF)


def screen_event_body(
    content_type: str | None, body: bytes, host: str | None = None
) -> tuple[bytes, str | None]:
    """``body`` and its Content-Type as they cross to the other realm (b"" and None
    when nothing may cross); ``host``: the SBC's host in that realm, which the
    identities' URIs take (None: they keep theirs)."""
    if not body or content_type is None:
        return body, content_type
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == MESSAGE_SUMMARY:
        return _MESSAGE_ACCOUNT.sub(b"", body), content_type
    if kind in (DIALOG_INFO, PIDF):
        screened = _screen_xml(body, None if host is None else _xml_text(host))
        return (b"", None) if screened is None else (screened, content_type)
    return body, content_type


def _xml_text(host: str) -> bytes:
    """``host`` as written into a URI in a document (escaped, though hosts have
    nothing to escape)."""
    return host.replace("&", "&amp;").replace("<", "&lt;").encode()


def _rehost(uri: bytes, host: bytes) -> bytes:
    """``uri`` (as written) with ``host`` for its host and port; unchanged when it is
    no SIP or pres URI (a tel: URI names no host)."""
    match = _URI_HOST.match(uri)
    if match is None:
        return uri
    return match.group(1) + host + uri[match.end() :]


class _Cuts:
    """What to cut from a document: byte ranges out, replacements in."""

    def __init__(self, body: bytes, host: bytes | None = None) -> None:
        self.body = body
        self.host = host
        self.edits: list[tuple[int, int, bytes]] = []
        #: Where the text of an ``<identity>`` being read starts.
        self.identity: int | None = None
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
        elif self.host is None:
            return
        elif (namespace, local) in ((_DIALOG_NS, "dialog-info"), (_PIDF_NS, "presence")):
            self._entity(offset)
        elif (namespace, local) == (_DIALOG_NS, "identity"):
            tag = self._tag(offset)
            self.identity = None if tag.group(1) else tag.end()

    def end(self, name: str, offset: int) -> None:
        if self.identity is not None and self.host is not None:
            # RFC 4235 4.1.6.1: <identity>'s text is the party's URI. The parser
            # stands on the end tag's "<": the raw text is between.
            start, self.identity = self.identity, None
            text = self.body[start:offset]
            if b"<" not in text:  # no comment or CDATA section to misread
                self.edits.append((start, offset, _rehost(text, self.host)))
            return
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

    def _entity(self, offset: int) -> None:
        """The document's ``entity`` attribute (RFC 4235 4.1, RFC 3863 4.1.1) rehosted."""
        assert self.host is not None
        tag = self._tag(offset)
        for attribute in _ATTRIBUTE.finditer(self.body, offset, tag.end()):
            if attribute.group(1) == b"entity":
                start, end = attribute.span(2)
                value = attribute.group(2)
                self.edits.append((start + 1, end - 1, _rehost(value[1:-1], self.host)))

    def apply(self) -> bytes:
        out, last = [], 0
        for start, stop, replacement in sorted(self.edits):
            out += [self.body[last:start], replacement]
            last = stop
        out.append(self.body[last:])
        return b"".join(out)


def _screen_xml(body: bytes, host: bytes | None) -> bytes | None:
    """``body`` without the dialog ids, targets and contacts, its identities on
    ``host`` when given; None if not XML."""
    cuts = _Cuts(body, host)
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartElementHandler = lambda name, _: cuts.start(name, parser.CurrentByteIndex)
    parser.EndElementHandler = lambda name: cuts.end(name, parser.CurrentByteIndex)
    try:
        parser.Parse(body, True)
    except (expat.ExpatError, ValueError):
        return None
    return cuts.apply()
