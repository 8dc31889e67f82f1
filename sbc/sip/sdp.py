"""SDP (RFC 8866, formerly RFC 4566) and the RFC 3264 offer/answer edits an SBC makes.

The model keeps every line in the order it was received, so that
``bytes(SessionDescription.parse(x)) == x`` for well-formed input. Lines the SBC reasons
about (``o=``, ``c=``, ``b=``, ``t=``, ``a=`` and ``m=``) are parsed once into small frozen
values; every other line (``v=``, ``s=``, ``i=``, ``u=``, ``e=``, ``p=``, ``r=``, ``z=``,
``k=`` and unknown types) is kept as a :class:`Field` holding its exact text. The typed
views (``origin``, ``connection``, ``attributes``, ``codecs()``, ...) are computed from
those lines on access; for a body of a few dozen lines that is a short tuple scan.

Everything is immutable: the edits return a new :class:`SessionDescription` or
:class:`MediaDescription`, so a parsed offer can be kept for the other leg while its
rewritten copy is sent on.

Leniency, because real phones are sloppy:

* bare LF line endings are accepted and kept (``line_ending`` records which one was
  seen on the first line, and serialization uses it for every line);
* a missing final line ending is accepted; serialization always writes one;
* blank lines at the end of the body are ignored;
* trailing spaces and tabs on the structured lines (``o c b t a m``) are ignored, and
  runs of whitespace between their fields are accepted; both are normalised on output.
  Free-text lines keep their exact value, because ``s= `` (a single space) is what
  RFC 8866 section 5.3 recommends for a session without a name.

Strictness, where the SBC depends on the value: ``v=0`` must be the first line, ``o=``
must be present once and have six fields, ``c=`` must have three fields, ``m=`` must have
a numeric port and a proto, ``b=`` and ``t=`` must be numeric.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import ClassVar, TypeAlias

__all__ = [
    "DTLS_ATTRIBUTE_NAMES",
    "ICE_ATTRIBUTE_NAMES",
    "MAX_MEDIA_SECTIONS",
    "MAX_NUMBER_DIGITS",
    "MAX_SDP_LINES",
    "SDES_ATTRIBUTE_NAMES",
    "STATIC_PAYLOAD_TYPES",
    "Attribute",
    "AttributeFilter",
    "Bandwidth",
    "Codec",
    "Connection",
    "Direction",
    "Field",
    "MediaDescription",
    "Origin",
    "RtcpAttribute",
    "SdpError",
    "SdpLine",
    "SessionDescription",
    "Timing",
]

# A body with more lines than this is refused with 413 Request Entity Too Large
# (RFC 3261 21.4.11). A Chrome offer with audio, video, ICE candidates and simulcast is
# a few hundred lines; the cap bounds the parse work a hostile peer can ask for. Blank
# lines count.
MAX_SDP_LINES = 2000

# An offer with more m= sections than this is refused with 488 Not Acceptable Here
# (RFC 3261 21.4.26): the SBC allocates relay ports per m= section, so the count is what
# a peer could use to exhaust the port pool.
MAX_MEDIA_SECTIONS = 32

# RFC 8445 section 15 / RFC 8839 section 5: ICE attributes. An SBC that terminates media
# drops them, since the candidates name addresses the far side cannot reach.
ICE_ATTRIBUTE_NAMES = frozenset(
    {
        "candidate",
        "remote-candidates",
        "ice-ufrag",
        "ice-pwd",
        "ice-options",
        "ice-lite",
        "ice-mismatch",
        "ice-pacing",
        "end-of-candidates",
    }
)

# RFC 8122 (fingerprint), RFC 4145 (setup, connection): DTLS-SRTP keying, RFC 5763.
DTLS_ATTRIBUTE_NAMES = frozenset({"fingerprint", "setup", "connection", "tls-id"})

# RFC 4568: SDES keying. The keys are in clear text in the SDP.
SDES_ATTRIBUTE_NAMES = frozenset({"crypto"})


class SdpError(ValueError):
    """A session description that cannot be parsed or a value that cannot be written.

    ``status`` is the SIP response a server should answer a request carrying this body
    with: 400 for a malformed body (RFC 3261 21.4.1), 413 for one over
    :data:`MAX_SDP_LINES`, 488 for one over :data:`MAX_MEDIA_SECTIONS`.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Direction(enum.Enum):
    """The media direction attributes of RFC 8866 section 6.7 / RFC 3264 section 5.1."""

    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"


_DIRECTIONS = {d.value: d for d in Direction}


# The most digits a number of an SDP body may have: RFC 3264 section 5 keeps the o=
# numbers within a 64-bit signed integer, and ports, times and rates are shorter. A
# longer one is a 400 (it is malformed), never a bare ValueError from int(), which
# refuses more than 4300 digits and spends ~75 us on that many.
MAX_NUMBER_DIGITS = 20


def _uint(text: str) -> int | None:
    """Return ``text`` as a non-negative integer if it is plain ASCII digits."""
    if len(text) <= MAX_NUMBER_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


def _check_text(line_type: str, *values: str) -> None:
    # An edited value with CR or LF in it would inject lines into the body.
    for value in values:
        if "\r" in value or "\n" in value:
            raise SdpError(f"{line_type}= line: CR or LF in value")


#: Fields joined by single spaces: each one not empty, with no whitespace in it
#: (the regex's whitespace is exactly what ``str.isspace`` calls whitespace).
_TOKENS = re.compile(r"\S+(?: \S+)*")


def _check_tokens(line_type: str, *values: str) -> None:
    # Fields of space-separated lines: a space inside one would shift the others.
    # One match for the line (a space inside a field adds a space to it); the loop
    # only names the bad field.
    line = " ".join(values)
    if _TOKENS.fullmatch(line) is None or line.count(" ") != len(values) - 1:
        for value in values:
            if not value or any(c.isspace() for c in value):
                raise SdpError(f"{line_type}= line: bad field {value!r}")


def _ip_literal(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[str, str]:
    """Return ``(addrtype, address)`` for an IP address, IPv6 without brackets."""
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            raise SdpError(f"not an IP address: {address!r}") from None
    return ("IP4" if address.version == 4 else "IP6", str(address))


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise SdpError(f"port out of range: {port}")


@dataclass(frozen=True, slots=True)
class Field:
    """A line kept as text: ``v s i u e p r z k`` and any type this module does not know."""

    type: str
    value: str

    def __post_init__(self) -> None:
        if len(self.type) != 1 or not self.type.isascii() or not self.type.isalpha():
            raise SdpError(f"bad line type {self.type!r}")
        _check_text(self.type, self.value)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Origin:
    """``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <unicast-address>``.

    RFC 8866 section 5.2. ``sess_id`` is kept as text: it is an identifier, and keeping
    it verbatim keeps the round trip exact.
    """

    type: ClassVar[str] = "o"

    username: str
    sess_id: str
    sess_version: int
    nettype: str
    addrtype: str
    address: str

    def __post_init__(self) -> None:
        _check_tokens("o", self.username, self.sess_id, self.nettype, self.addrtype, self.address)
        if self.sess_version < 0:
            raise SdpError(f"o= line: bad sess-version {str(self.sess_version)!r}")

    @classmethod
    def parse(cls, value: str) -> Origin:
        """Parse the text after ``o=``."""
        parts = value.split()
        if len(parts) != 6:
            raise SdpError(f"o= line: expected 6 fields, got {len(parts)}")
        version = _uint(parts[2])
        if version is None:
            raise SdpError(f"o= line: bad sess-version {parts[2]!r}")
        return cls(parts[0], parts[1], version, parts[3], parts[4], parts[5])

    def __str__(self) -> str:
        return (
            f"{self.username} {self.sess_id} {self.sess_version} "
            f"{self.nettype} {self.addrtype} {self.address}"
        )

    def next_version(self) -> Origin:
        """This origin with ``sess-version`` one higher.

        RFC 3264 section 8: an offer that modifies the session keeps the ``o=`` line of
        the previous SDP except that the version increments by one.
        """
        return replace(self, sess_version=self.sess_version + 1)

    def with_address(self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> Origin:
        """This origin with ``address``; ``nettype`` becomes IN, ``addrtype`` follows it."""
        addrtype, text = _ip_literal(address)
        return replace(self, nettype="IN", addrtype=addrtype, address=text)


@dataclass(frozen=True, slots=True)
class Connection:
    """``c=<nettype> <addrtype> <connection-address>`` (RFC 8866 section 5.7).

    ``address`` is the whole third field, including any multicast ``/ttl/count`` suffix;
    :attr:`host` is the address alone.
    """

    type: ClassVar[str] = "c"

    nettype: str
    addrtype: str
    address: str

    def __post_init__(self) -> None:
        _check_tokens("c", self.nettype, self.addrtype, self.address)

    @classmethod
    def parse(cls, value: str) -> Connection:
        """Parse the text after ``c=``."""
        parts = value.split()
        if len(parts) != 3:
            raise SdpError(f"c= line: expected 3 fields, got {len(parts)}")
        return cls(parts[0], parts[1], parts[2])

    @classmethod
    def for_address(
        cls, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> Connection:
        """``IN IP4 <address>`` or ``IN IP6 <address>``, chosen from the address."""
        addrtype, text = _ip_literal(address)
        return cls("IN", addrtype, text)

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"

    @property
    def host(self) -> str:
        """The address without a multicast ``/ttl`` or ``/count`` suffix."""
        return self.address.split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """``b=<bwtype>:<bandwidth>`` (RFC 8866 section 5.8)."""

    type: ClassVar[str] = "b"

    bwtype: str
    bandwidth: int

    def __post_init__(self) -> None:
        _check_tokens("b", self.bwtype)
        if ":" in self.bwtype or self.bandwidth < 0:
            raise SdpError("b= line: expected '<bwtype>:<bandwidth>'")

    @classmethod
    def parse(cls, value: str) -> Bandwidth:
        """Parse the text after ``b=``."""
        bwtype, sep, amount = value.partition(":")
        if not sep or not bwtype:
            raise SdpError("b= line: expected '<bwtype>:<bandwidth>'")
        bandwidth = _uint(amount)
        if bandwidth is None:
            raise SdpError(f"b= line: bad bandwidth {amount!r}")
        return cls(bwtype, bandwidth)

    def __str__(self) -> str:
        return f"{self.bwtype}:{self.bandwidth}"


@dataclass(frozen=True, slots=True)
class Timing:
    """``t=<start-time> <stop-time>`` (RFC 8866 section 5.9); ``0 0`` is unbounded."""

    type: ClassVar[str] = "t"

    start: int
    stop: int

    @classmethod
    def parse(cls, value: str) -> Timing:
        """Parse the text after ``t=``."""
        parts = value.split()
        if len(parts) != 2:
            raise SdpError("t= line: expected '<start-time> <stop-time>'")
        start, stop = _uint(parts[0]), _uint(parts[1])
        if start is None:
            raise SdpError(f"t= line: bad time {parts[0]!r}")
        if stop is None:
            raise SdpError(f"t= line: bad time {parts[1]!r}")
        return cls(start, stop)

    def __str__(self) -> str:
        return f"{self.start} {self.stop}"


@dataclass(frozen=True, slots=True)
class Attribute:
    """``a=<name>`` (a property attribute, ``value`` None) or ``a=<name>:<value>``.

    RFC 8866 section 5.13. ``a=name:`` gives an empty-string value, kept distinct from
    None so it round-trips.
    """

    type: ClassVar[str] = "a"

    name: str
    value: str | None = None

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise SdpError(f"a= line: bad attribute name {self.name!r}")
        _check_text("a", self.name, self.value or "")

    @classmethod
    def parse(cls, value: str) -> Attribute:
        """Parse the text after ``a=``."""
        name, sep, rest = value.partition(":")
        if not name:
            raise SdpError("a= line: empty attribute name")
        return cls(name, rest if sep else None)

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value}"


@dataclass(frozen=True, slots=True)
class RtcpAttribute:
    """The value of ``a=rtcp:<port> [<nettype> <addrtype> <address>]`` (RFC 3605 section 2.1)."""

    port: int
    nettype: str | None = None
    addrtype: str | None = None
    address: str | None = None

    @classmethod
    def parse(cls, value: str) -> RtcpAttribute:
        """Parse the value of an ``a=rtcp`` attribute."""
        parts = value.split()
        if len(parts) not in (1, 4):
            raise SdpError("a=rtcp: expected '<port> [<nettype> <addrtype> <address>]'")
        port = _uint(parts[0])
        if port is None or port > 65535:
            raise SdpError(f"a=rtcp: bad port {parts[0]!r}")
        if len(parts) == 1:
            return cls(port)
        return cls(port, parts[1], parts[2], parts[3])

    def __str__(self) -> str:
        if self.address is None:
            return str(self.port)
        return f"{self.port} {self.nettype} {self.addrtype} {self.address}"


@dataclass(frozen=True, slots=True)
class Codec:
    """One RTP payload format of an m= section, from ``a=rtpmap``/``a=fmtp`` or RFC 3551.

    ``channels`` is None when the rtpmap gives no channel count (RFC 8866 section 6.6:
    one channel). ``parameters`` is the text after the payload type in ``a=fmtp``.
    """

    payload_type: int
    encoding_name: str
    clock_rate: int
    channels: int | None = None
    parameters: str | None = None


# RFC 3551 tables 4 and 5: payload types usable without an a=rtpmap line.
# (encoding name, clock rate, channels)
STATIC_PAYLOAD_TYPES: dict[int, tuple[str, int, int | None]] = {
    0: ("PCMU", 8000, 1),
    3: ("GSM", 8000, 1),
    4: ("G723", 8000, 1),
    5: ("DVI4", 8000, 1),
    6: ("DVI4", 16000, 1),
    7: ("LPC", 8000, 1),
    8: ("PCMA", 8000, 1),
    # RFC 3551 section 4.5.2: G.722 samples at 16 kHz but is signalled as 8000.
    9: ("G722", 8000, 1),
    10: ("L16", 44100, 2),
    11: ("L16", 44100, 1),
    12: ("QCELP", 8000, 1),
    13: ("CN", 8000, 1),
    14: ("MPA", 90000, None),
    15: ("G728", 8000, 1),
    16: ("DVI4", 11025, 1),
    17: ("DVI4", 22050, 1),
    18: ("G729", 8000, 1),
    25: ("CelB", 90000, None),
    26: ("JPEG", 90000, None),
    28: ("nv", 90000, None),
    31: ("H261", 90000, None),
    32: ("MPV", 90000, None),
    33: ("MP2T", 90000, None),
    34: ("H263", 90000, None),
}

SdpLine: TypeAlias = Field | Origin | Connection | Bandwidth | Timing | Attribute

# Attributes whose value starts with a payload type (RFC 8866 6.6, 6.15; RFC 4585 4.2).
_PER_FORMAT_ATTRIBUTES = frozenset({"rtpmap", "fmtp", "rtcp-fb"})

AttributeFilter: TypeAlias = Callable[[Attribute], bool] | Collection[str]


def _drop_predicate(drop: AttributeFilter) -> Callable[[Attribute], bool]:
    if isinstance(drop, str):
        names: Collection[str] = frozenset({drop})
    elif callable(drop):
        return drop
    else:
        names = frozenset(drop)
    return lambda attribute: attribute.name in names


def _direction_of(lines: Iterable[SdpLine]) -> Direction | None:
    for line in lines:
        if isinstance(line, Attribute) and line.value is None and line.name in _DIRECTIONS:
            return _DIRECTIONS[line.name]
    return None


def _set_direction(lines: tuple[SdpLine, ...], direction: Direction) -> tuple[SdpLine, ...]:
    # Replace the first direction attribute where it stands and drop any others, so the
    # result states exactly one direction (RFC 3264 section 5.1).
    out: list[SdpLine] = []
    placed = False
    for line in lines:
        if isinstance(line, Attribute) and line.value is None and line.name in _DIRECTIONS:
            if not placed:
                out.append(Attribute(direction.value))
                placed = True
            continue
        out.append(line)
    if not placed:
        out.append(Attribute(direction.value))
    return tuple(out)


def _insert_after(lines: tuple[SdpLine, ...], types: str, line: SdpLine) -> tuple[SdpLine, ...]:
    """Insert ``line`` after the last line whose type is in ``types`` (grammar order)."""
    position = 0
    for index, existing in enumerate(lines):
        if existing.type in types:
            position = index + 1
    return (*lines[:position], line, *lines[position:])


def _without_rtp_formats(lines: tuple[SdpLine, ...], kept: set[str]) -> tuple[SdpLine, ...]:
    out: list[SdpLine] = []
    for line in lines:
        if isinstance(line, Attribute) and line.name in _PER_FORMAT_ATTRIBUTES and line.value:
            payload_type = line.value.split(maxsplit=1)[0]
            # rtcp-fb:* applies to every format (RFC 4585 section 4.2) and stays.
            if payload_type != "*" and payload_type not in kept:
                continue
        out.append(line)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class MediaDescription:
    """One m= section: ``m=<media> <port>[/<count>] <proto> <fmt> ...`` and its lines.

    RFC 8866 section 5.14. ``lines`` are the lines after the m= line (``i c b k a`` and
    anything unknown), in order.
    """

    media: str
    port: int
    proto: str
    formats: tuple[str, ...] = ()
    port_count: int | None = None
    lines: tuple[SdpLine, ...] = ()

    def __post_init__(self) -> None:
        _check_tokens("m", self.media, self.proto, *self.formats)
        _check_port(self.port)

    @classmethod
    def parse_media_line(cls, value: str, lines: tuple[SdpLine, ...] = ()) -> MediaDescription:
        """Parse the text after ``m=`` into a section with ``lines`` (none by default)."""
        parts = value.split()
        if len(parts) < 3:
            raise SdpError("m= line: expected '<media> <port> <proto> <fmt> ...'")
        port_text, sep, count_text = parts[1].partition("/")
        port = _uint(port_text)
        if port is None or port > 65535:
            raise SdpError(f"m= line: bad port {port_text!r}")
        port_count = None
        if sep:
            port_count = _uint(count_text)
            if port_count is None:
                raise SdpError(f"m= line: bad port count {count_text!r}")
        return cls(parts[0], port, parts[2], tuple(parts[3:]), port_count, lines)

    def __str__(self) -> str:
        """The text after ``m=``."""
        port = self.port if self.port_count is None else f"{self.port}/{self.port_count}"
        formats = "".join(f" {fmt}" for fmt in self.formats)
        return f"{self.media} {port} {self.proto}{formats}"

    # -- views -------------------------------------------------------------------------

    @property
    def is_rejected(self) -> bool:
        """Port zero: the stream is rejected or disabled (RFC 3264 sections 6 and 8.2)."""
        return self.port == 0

    @property
    def is_rtp(self) -> bool:
        """True when the formats are RTP payload types (RTP/AVP, RTP/SAVPF, ...)."""
        return "RTP/" in self.proto

    @property
    def connection(self) -> Connection | None:
        """The first media-level ``c=`` line, or None to use the session's."""
        return next((line for line in self.lines if isinstance(line, Connection)), None)

    @property
    def bandwidths(self) -> tuple[Bandwidth, ...]:
        """The media-level ``b=`` lines."""
        return tuple(line for line in self.lines if isinstance(line, Bandwidth))

    @property
    def attributes(self) -> tuple[Attribute, ...]:
        """The media-level attributes, in order."""
        return tuple(line for line in self.lines if isinstance(line, Attribute))

    def find_attributes(self, name: str) -> tuple[Attribute, ...]:
        """The media-level attributes called ``name``, in order."""
        return tuple(a for a in self.lines if isinstance(a, Attribute) and a.name == name)

    @property
    def direction(self) -> Direction | None:
        """The media-level direction attribute, or None if there is none."""
        return _direction_of(self.lines)

    @property
    def rtcp(self) -> RtcpAttribute | None:
        """The parsed ``a=rtcp`` attribute (RFC 3605), or None if absent."""
        for attribute in self.find_attributes("rtcp"):
            return RtcpAttribute.parse(attribute.value or "")
        return None

    def codecs(self) -> tuple[Codec, ...]:
        """The RTP payload formats in ``m=`` order (the offerer's preference, RFC 3264 5.1).

        A format is listed from its ``a=rtpmap``, or from :data:`STATIC_PAYLOAD_TYPES`
        when it has none. Formats that are neither, and malformed rtpmap lines, are
        skipped. Returns ``()`` for a non-RTP proto (``udptl``, ``TCP/MRCPv2``, ...).
        """
        if not self.is_rtp:
            return ()
        rtpmaps: dict[str, str] = {}
        fmtps: dict[str, str] = {}
        for attribute in self.lines:
            if not isinstance(attribute, Attribute) or attribute.value is None:
                continue
            if attribute.name in ("rtpmap", "fmtp"):
                key, _, rest = attribute.value.partition(" ")
                table = rtpmaps if attribute.name == "rtpmap" else fmtps
                table.setdefault(key, rest.strip())
        codecs: list[Codec] = []
        for fmt in self.formats:
            payload_type = _uint(fmt)
            if payload_type is None:
                continue
            if fmt in rtpmaps:
                # RFC 8866 section 6.6: <encoding name>/<clock rate>[/<parameters>]
                pieces = rtpmaps[fmt].split("/")
                rate = _uint(pieces[1]) if len(pieces) >= 2 else None
                channels = _uint(pieces[2]) if len(pieces) == 3 else None
                if rate is None or not pieces[0] or (len(pieces) == 3 and channels is None):
                    continue
                name = pieces[0]
            elif payload_type in STATIC_PAYLOAD_TYPES:
                name, rate, channels = STATIC_PAYLOAD_TYPES[payload_type]
            else:
                continue
            codecs.append(Codec(payload_type, name, rate, channels, fmtps.get(fmt)))
        return tuple(codecs)

    def codec(self, payload_type: int) -> Codec | None:
        """The codec for ``payload_type`` if it is one of this section's formats."""
        return next((c for c in self.codecs() if c.payload_type == payload_type), None)

    def telephone_event_payload_type(self, clock_rate: int | None = None) -> int | None:
        """The payload type of RFC 4733 ``telephone-event``, or None.

        With ``clock_rate``, only an entry with that rate matches (a wideband offer may
        list telephone-event at 8000 and at 48000).
        """
        for codec in self.codecs():
            if codec.encoding_name.lower() == "telephone-event" and (
                clock_rate is None or codec.clock_rate == clock_rate
            ):
                return codec.payload_type
        return None

    # -- edits -------------------------------------------------------------------------

    def with_port(
        self,
        port: int,
        *,
        rtcp_port: int | None = None,
        rtcp_address: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
    ) -> MediaDescription:
        """This section with the m= ``port``; ``a=rtcp`` rewritten if present.

        RFC 3605: ``a=rtcp`` names the RTCP port (and optionally address) when it is not
        the RTP port plus one. It is only rewritten when it is present: ``rtcp_port``
        replaces its port and ``rtcp_address`` its address (adding the
        ``IN IP4|IP6 <address>`` part if the attribute had none). A relay that moves the
        RTP port must pass ``rtcp_port`` too, or the peer's original RTCP port leaks.
        """
        _check_port(port)
        if rtcp_port is not None:
            _check_port(rtcp_port)
        lines = self.lines
        if rtcp_port is not None or rtcp_address is not None:
            rewritten: list[SdpLine] = []
            for line in lines:
                if isinstance(line, Attribute) and line.name == "rtcp":
                    rtcp = RtcpAttribute.parse(line.value or "")
                    if rtcp_port is not None:
                        rtcp = replace(rtcp, port=rtcp_port)
                    if rtcp_address is not None:
                        addrtype, text = _ip_literal(rtcp_address)
                        rtcp = replace(rtcp, nettype="IN", addrtype=addrtype, address=text)
                    line = Attribute("rtcp", str(rtcp))
                rewritten.append(line)
            lines = tuple(rewritten)
        return replace(self, port=port, lines=lines)

    def with_connection_address(
        self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> MediaDescription:
        """This section with its ``c=`` set to ``address`` (IP4/IP6 from the address).

        Every media-level ``c=`` is replaced; if there is none, one is added after the
        ``i=`` line (RFC 8866 section 5 order: m, i, c, b, k, a).
        """
        connection = Connection.for_address(address)
        if self.connection is None:
            return replace(self, lines=_insert_after(self.lines, "i", connection))
        lines = tuple(connection if isinstance(ln, Connection) else ln for ln in self.lines)
        return replace(self, lines=lines)

    def with_direction(self, direction: Direction) -> MediaDescription:
        """This section with exactly one media-level direction attribute."""
        return replace(self, lines=_set_direction(self.lines, direction))

    def without_attributes(self, drop: AttributeFilter) -> MediaDescription:
        """This section without the attributes ``drop`` selects.

        ``drop`` is a set of attribute names (e.g. :data:`ICE_ATTRIBUTE_NAMES`), a single
        name, or a predicate on :class:`Attribute`. Names match case-sensitively.
        """
        predicate = _drop_predicate(drop)
        lines = tuple(ln for ln in self.lines if not (isinstance(ln, Attribute) and predicate(ln)))
        return replace(self, lines=lines)

    def with_formats(self, formats: Iterable[str]) -> MediaDescription:
        """This section listing only ``formats``, in that order.

        For RTP, ``a=rtpmap``, ``a=fmtp`` and ``a=rtcp-fb`` lines of formats no longer
        listed are dropped with them (``a=rtcp-fb:*`` stays).
        """
        new_formats = tuple(formats)
        lines = self.lines
        if self.is_rtp:
            lines = _without_rtp_formats(lines, set(new_formats))
        return replace(self, formats=new_formats, lines=lines)

    def rejected(self) -> MediaDescription:
        """This section with port zero, the way an answer rejects a stream.

        RFC 3264 section 6: the answer keeps the m= line with port zero; its formats are
        ignored but at least one stays listed, so they are kept. A port count has no
        meaning on a rejected stream and is removed.
        """
        return replace(self, port=0, port_count=None)


def _encode_lines(media: MediaDescription) -> Iterator[str]:
    yield f"m={media}"
    for line in media.lines:
        yield f"{line.type}={line}"


_SESSION_PARSERS: dict[str, Callable[[str], SdpLine]] = {
    "o": Origin.parse,
    "c": Connection.parse,
    "b": Bandwidth.parse,
    "t": Timing.parse,
    "a": Attribute.parse,
}
# RFC 8866 section 5: a media section has i, c, b, k and a lines. o= or t= after an m=
# line is out of place; it is kept as text where it stands.
_MEDIA_PARSERS = {t: _SESSION_PARSERS[t] for t in "cba"}


def _bad_line(number: int) -> SdpError:
    return SdpError(f"line {number}: expected '<type>=<value>'")


@dataclass(frozen=True, slots=True)
class SessionDescription:
    """A whole SDP body: the session-level lines, then the media sections.

    ``lines`` holds the session-level lines in order, starting with ``v=``.
    ``line_ending`` is ``"\\r\\n"`` (RFC 8866 section 5) or ``"\\n"`` when the body came
    with bare LF; serialization uses it for every line.
    """

    lines: tuple[SdpLine, ...]
    media: tuple[MediaDescription, ...] = ()
    line_ending: str = "\r\n"

    def __post_init__(self) -> None:
        if self.line_ending not in ("\r\n", "\n"):
            raise SdpError(f"bad line ending {self.line_ending!r}")

    @classmethod
    def parse(cls, data: bytes) -> SessionDescription:
        """Parse an SDP body. Raises :class:`SdpError`."""
        # Free-text fields are UTF-8 by default (RFC 8866 section 5.3, a=charset);
        # surrogateescape keeps any other byte so the round trip is exact.
        text = data.decode("utf-8", "surrogateescape")
        raw = text.split("\n", MAX_SDP_LINES + 1)
        if len(raw) > MAX_SDP_LINES + 1 or (len(raw) == MAX_SDP_LINES + 1 and raw[-1]):
            raise SdpError(f"too many lines: more than {MAX_SDP_LINES}", 413)
        line_ending = "\r\n" if len(raw) > 1 and raw[0].endswith("\r") else "\n"
        rows = [row.removesuffix("\r") for row in raw]
        while rows and not rows[-1]:
            rows.pop()
        if not rows:
            raise SdpError("empty SDP body")

        session: list[SdpLine] = []
        # Each m= line's text and the lines of its section, built once at the end.
        pending: list[tuple[str, list[SdpLine]]] = []
        current: list[SdpLine] = session
        parsers = _SESSION_PARSERS
        for number, row in enumerate(rows, start=1):
            if len(row) < 2 or row[1] != "=" or not row[0].isascii() or not row[0].isalpha():
                raise _bad_line(number)
            line_type, value = row[0], row[2:]
            # RFC 8866 section 5.1: the body starts with v=0.
            if number == 1 and (line_type != "v" or value.rstrip(" \t") != "0"):
                raise SdpError("line 1: expected 'v=0'")
            if line_type == "m":
                if len(pending) == MAX_MEDIA_SECTIONS:
                    raise SdpError(f"too many media sections: more than {MAX_MEDIA_SECTIONS}", 488)
                current = []
                pending.append((value.rstrip(" \t"), current))
                parsers = _MEDIA_PARSERS
                continue
            parser = parsers.get(line_type)
            if parser is None:
                current.append(Field(line_type, value))
            else:
                current.append(parser(value.rstrip(" \t")))
        sections = [
            MediaDescription.parse_media_line(text, tuple(lines)) for text, lines in pending
        ]

        origins = sum(1 for line in session if isinstance(line, Origin))
        if origins == 0:
            raise SdpError("missing o= line")
        if origins > 1:
            raise SdpError("duplicate o= line")
        return cls(tuple(session), tuple(sections), line_ending)

    def __bytes__(self) -> bytes:
        return self.encode(self.encoded_lines())

    def encoded_lines(self) -> list[str]:
        """Every line as text (``type=value``), session-level lines first: a caller
        may swap one (its index is the line's in ``lines``) before ``encode``."""
        encoded = [f"{line.type}={line}" for line in self.lines]
        for media in self.media:
            encoded.extend(_encode_lines(media))
        return encoded

    def encode(self, encoded: list[str]) -> bytes:
        """The body of ``encoded_lines()``, with this description's line ending."""
        body = self.line_ending.join(encoded) + self.line_ending
        return body.encode("utf-8", "surrogateescape")

    # -- session-level views -----------------------------------------------------------

    def _field(self, line_type: str) -> str | None:
        return next(
            (ln.value for ln in self.lines if isinstance(ln, Field) and ln.type == line_type),
            None,
        )

    def _fields(self, line_type: str) -> tuple[str, ...]:
        return tuple(
            ln.value for ln in self.lines if isinstance(ln, Field) and ln.type == line_type
        )

    @property
    def version(self) -> str | None:
        """The ``v=`` value (``"0"``)."""
        return self._field("v")

    @property
    def origin(self) -> Origin:
        """The ``o=`` line. Raises :class:`SdpError` on a model built without one."""
        for line in self.lines:
            if isinstance(line, Origin):
                return line
        raise SdpError("missing o= line")

    @property
    def session_name(self) -> str | None:
        """The ``s=`` value, exactly as sent (``" "`` for an unnamed session)."""
        return self._field("s")

    @property
    def information(self) -> str | None:
        """The session-level ``i=`` value."""
        return self._field("i")

    @property
    def uri(self) -> str | None:
        """The ``u=`` value."""
        return self._field("u")

    @property
    def emails(self) -> tuple[str, ...]:
        """The ``e=`` values."""
        return self._fields("e")

    @property
    def phones(self) -> tuple[str, ...]:
        """The ``p=`` values."""
        return self._fields("p")

    @property
    def connection(self) -> Connection | None:
        """The session-level ``c=`` line, or None."""
        return next((ln for ln in self.lines if isinstance(ln, Connection)), None)

    @property
    def bandwidths(self) -> tuple[Bandwidth, ...]:
        """The session-level ``b=`` lines."""
        return tuple(ln for ln in self.lines if isinstance(ln, Bandwidth))

    @property
    def timings(self) -> tuple[Timing, ...]:
        """The ``t=`` lines."""
        return tuple(ln for ln in self.lines if isinstance(ln, Timing))

    @property
    def repeat_times(self) -> tuple[str, ...]:
        """The ``r=`` values, as text."""
        return self._fields("r")

    @property
    def time_zones(self) -> str | None:
        """The ``z=`` value, as text."""
        return self._field("z")

    @property
    def encryption_key(self) -> str | None:
        """The session-level ``k=`` value (obsolete since RFC 8866 section 5.12)."""
        return self._field("k")

    @property
    def attributes(self) -> tuple[Attribute, ...]:
        """The session-level attributes, in order."""
        return tuple(ln for ln in self.lines if isinstance(ln, Attribute))

    def find_attributes(self, name: str) -> tuple[Attribute, ...]:
        """The session-level attributes called ``name``, in order."""
        return tuple(a for a in self.lines if isinstance(a, Attribute) and a.name == name)

    @property
    def session_direction(self) -> Direction | None:
        """The session-level direction attribute, or None."""
        return _direction_of(self.lines)

    def direction(self, index: int) -> Direction:
        """The direction in effect for media section ``index``.

        RFC 8866 section 6.7 / RFC 3264 section 5.1: a media-level attribute overrides
        the session-level one, and with neither the stream is sendrecv.
        """
        return self.media[index].direction or self.session_direction or Direction.SENDRECV

    def media_connection(self, index: int) -> Connection | None:
        """The ``c=`` in effect for media section ``index`` (its own, else the session's)."""
        return self.media[index].connection or self.connection

    def is_media_on_hold(self, index: int) -> bool:
        """Whether media section ``index`` is put on hold by this description.

        RFC 3264 section 8.4: hold is a sendonly (or, from recvonly, inactive) stream.
        The RFC 2543 form, ``c=`` 0.0.0.0, is still sent by old phones and counts too.
        A rejected stream (port zero) is not on hold.
        """
        media = self.media[index]
        if media.is_rejected:
            return False
        if self.direction(index) in (Direction.SENDONLY, Direction.INACTIVE):
            return True
        connection = self.media_connection(index)
        return connection is not None and connection.host == "0.0.0.0"

    def is_on_hold(self) -> bool:
        """True when at least one stream is active and every active stream is on hold."""
        active = [i for i, media in enumerate(self.media) if not media.is_rejected]
        return bool(active) and all(self.is_media_on_hold(i) for i in active)

    # -- edits -------------------------------------------------------------------------

    def with_media(self, index: int, media: MediaDescription) -> SessionDescription:
        """This description with media section ``index`` replaced."""
        sections = list(self.media)
        sections[index] = media
        return replace(self, media=tuple(sections))

    def with_origin(self, origin: Origin) -> SessionDescription:
        """This description with the ``o=`` line replaced by ``origin``.

        A B2BUA keeps its own origin per leg (RFC 3264 section 8: the o= line stays the
        same across the offers of a session, apart from the version), so it swaps the
        peer's o= for the leg's.
        """
        if not any(isinstance(ln, Origin) for ln in self.lines):
            return replace(self, lines=_insert_after(self.lines, "v", origin))
        lines = tuple(origin if isinstance(ln, Origin) else ln for ln in self.lines)
        return replace(self, lines=lines)

    def with_bumped_version(self) -> SessionDescription:
        """This description with ``sess-version`` incremented (RFC 3264 section 8)."""
        return self.with_origin(self.origin.next_version())

    def with_origin_address(
        self,
        address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
        *,
        bump_version: bool = True,
    ) -> SessionDescription:
        """This description with the o= address replaced, and by default the version bumped."""
        origin = self.origin.with_address(address)
        if bump_version:
            origin = origin.next_version()
        return self.with_origin(origin)

    def with_connection_address(
        self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> SessionDescription:
        """This description with every ``c=`` line, session and media, set to ``address``.

        ``IN IP4`` or ``IN IP6`` is chosen from the address. RFC 8866 section 5.7 wants a
        c= at session level or in every media section: if a media section has none and
        neither does the session, one is added at session level after v/o/s/i/u/e/p.
        """
        connection = Connection.for_address(address)
        lines = tuple(connection if isinstance(ln, Connection) else ln for ln in self.lines)
        media = tuple(
            m.with_connection_address(address) if m.connection is not None else m
            for m in self.media
        )
        if self.connection is None and (not media or any(m.connection is None for m in media)):
            lines = _insert_after(lines, "vosiuep", connection)
        return replace(self, lines=lines, media=media)

    def with_media_port(
        self,
        index: int,
        port: int,
        *,
        rtcp_port: int | None = None,
        rtcp_address: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
    ) -> SessionDescription:
        """This description with media section ``index`` on ``port``.

        See :meth:`MediaDescription.with_port` for ``a=rtcp`` (RFC 3605).
        """
        media = self.media[index].with_port(port, rtcp_port=rtcp_port, rtcp_address=rtcp_address)
        return self.with_media(index, media)

    def with_media_rejected(self, index: int) -> SessionDescription:
        """This description with media section ``index`` rejected (RFC 3264 section 6)."""
        return self.with_media(index, self.media[index].rejected())

    def with_direction(self, direction: Direction, index: int | None = None) -> SessionDescription:
        """This description with ``direction`` set.

        With ``index``, only that media section gets a media-level attribute, which
        overrides the session-level one (RFC 3264 section 5.1). Without, the session-level
        direction attribute is removed and every media section gets ``direction``, so no
        older value is left to disagree with it.
        """
        if index is not None:
            return self.with_media(index, self.media[index].with_direction(direction))
        lines = tuple(
            ln
            for ln in self.lines
            if not (isinstance(ln, Attribute) and ln.value is None and ln.name in _DIRECTIONS)
        )
        media = tuple(m.with_direction(direction) for m in self.media)
        return replace(self, lines=lines, media=media)

    def without_attributes(
        self, drop: AttributeFilter, *, session: bool = True, media: bool = True
    ) -> SessionDescription:
        """This description without the attributes ``drop`` selects.

        ``drop`` is a set of names (e.g. ``ICE_ATTRIBUTE_NAMES | DTLS_ATTRIBUTE_NAMES``),
        a single name, or a predicate on :class:`Attribute`; ``session`` and ``media``
        choose the levels it applies to.
        """
        predicate = _drop_predicate(drop)
        lines = self.lines
        if session:
            lines = tuple(ln for ln in lines if not (isinstance(ln, Attribute) and predicate(ln)))
        sections = self.media
        if media:
            sections = tuple(m.without_attributes(predicate) for m in sections)
        return replace(self, lines=lines, media=sections)
