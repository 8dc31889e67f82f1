"""Codec policy: the encodings a realm's offers may carry (config ``realms[].codecs``).

A carrier trunk that takes G.711 only, a realm where G.729 is not licensed, video
kept off a trunk: an operator names the encodings allowed in a realm, and every
offer that crosses into or out of it lists only those. The relay does not
transcode, so what an offer leaves out can appear in no answer either: the policy
is applied to offers only, and an answer, a subset of the offer it answers, needs
none. An offer between two realms takes both realms' lists.

Names are RTP encoding names (``a=rtpmap``, or RFC 3551's static payload types:
``PCMU``, ``PCMA``, ``G722``, ``G729``, ``telephone-event``, ``opus``, ``H264`` ...),
compared case-insensitively. Streams that are not RTP (T.38 fax over UDPTL) are not
touched. A stream left with none of its formats, or with only auxiliary ones
(telephone-event, comfort noise, redundancy, retransmission, FEC), is rejected
(port 0); an offer left with no stream at all cannot go, and is refused with 488.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from sbc.sip.sdp import MediaDescription, SdpError, SessionDescription

#: Formats that carry no media of their own: a stream of only these is no stream.
AUXILIARY: Final = frozenset({"telephone-event", "cn", "red", "rtx", "ulpfec", "flexfec"})


class CodecPolicyError(SdpError):
    """An offer the realms' codec policies leave no stream of (488)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 488)


def allowed_codecs(*lists: Iterable[str]) -> frozenset[str] | None:
    """The encodings an offer may carry between realms with these ``lists`` (an empty
    list allows any): their intersection, lower-case; None when none restricts."""
    allowed: frozenset[str] | None = None
    for names in lists:
        wanted = frozenset(name.lower() for name in names)
        if wanted:
            allowed = wanted if allowed is None else allowed & wanted
    return allowed


def restrict_codecs(sdp: SessionDescription, allowed: frozenset[str] | None) -> SessionDescription:
    """``sdp`` (an offer) listing only ``allowed`` encodings in its RTP streams.

    A stream left with no format, or only :data:`AUXILIARY` ones, is rejected (port 0).
    CodecPolicyError (an SdpError, 488) when no stream of the offer is left (one its
    offerer rejected already does not count).
    """
    if allowed is None:
        return sdp
    out = sdp
    live = rejected = 0
    for index, media in enumerate(sdp.media):
        if media.is_rejected:
            continue
        if not media.is_rtp:
            live += 1
            continue
        kept = _kept_formats(media, allowed)
        if not any(name not in AUXILIARY for _, name in kept):
            out = out.with_media(index, media.rejected())
            rejected += 1
            continue
        live += 1
        if len(kept) != len(media.formats):
            out = out.with_media(index, media.with_formats(fmt for fmt, _ in kept))
    if rejected and not live:
        raise CodecPolicyError("no stream with a codec the realms' policies allow")
    return out


def _kept_formats(media: MediaDescription, allowed: frozenset[str]) -> list[tuple[str, str]]:
    """The formats of ``media`` whose encoding ``allowed`` names, in order, with it."""
    names = {codec.payload_type: codec.encoding_name.lower() for codec in media.codecs()}
    kept = []
    for fmt in media.formats:
        name = names.get(int(fmt)) if fmt.isdigit() else None
        if name is not None and name in allowed:
            kept.append((fmt, name))
    return kept
