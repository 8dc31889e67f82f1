"""A CDR from an ended call and its media session's final counters.

The B2BUA keeps monotonic times (timers must not jump with the wall clock); a CDR
wants wall-clock times, so the caller passes ``wall_offset`` = wall - monotonic,
read at the moment the call ended.
"""

from __future__ import annotations

from dataclasses import replace

from sbc.b2bua.call import Call, LegSide
from sbc.b2bua.call import EndReason as CallEndReason
from sbc.cdr.record import CdrRecord, EndReason, HangupSide, MediaEncryption, disposition_for
from sbc.media.session import MediaSession, Side
from sbc.sip.errors import ParseError
from sbc.sip.uri import SipUri, parse_uri
from sbc.transport.base import format_hostport

#: RTP clock of the codecs whose jitter we report (G.711 and most narrowband ones).
DEFAULT_CLOCK_RATE = 8000


#: End reasons of an unanswered attempt that no final response ended (setup_time None).
_NO_FINAL_RESPONSE = frozenset(
    {
        EndReason.CANCEL,
        EndReason.SHUTDOWN,
        EndReason.MEDIA_LOST,
        EndReason.NO_ANSWER_TIMEOUT,
        EndReason.TRANSPORT_ERROR,
    }
)


def _clock_rate(codecs: str) -> int:
    """The RTP clock rate of the first codec of ``PCMU/8000,...`` (RFC 4566 rtpmap:
    ``name/rate[/channels]``, so ``opus/48000/2`` is 48000)."""
    fields = codecs.split(",", 1)[0].split("/")
    rate = fields[1].strip() if len(fields) > 1 else ""
    return int(rate) if rate.isdigit() and int(rate) > 0 else DEFAULT_CLOCK_RATE


def _without_password(text: str) -> str:
    """A SIP URI without the password RFC 3261 19.1.1 lets its userinfo carry.

    CDRs are read by people and billing systems: no secret of the caller goes there.
    Text that does not parse as a URI keeps only what precedes a password-like
    ``user:...@``.
    """
    if "@" not in text:
        return text
    try:
        uri = parse_uri(text)
    except ParseError:
        scheme, colon, rest = text.partition(":")
        # The last "@" ends the userinfo: a password with a raw "@" in it (not
        # valid, but it comes from the wire) must not leave its tail behind.
        userinfo, at, host = rest.rpartition("@")
        if not colon or not at:
            return text
        return f"{scheme}:{userinfo.split(':', 1)[0]}@{host}"
    if not isinstance(uri, SipUri) or uri.password is None:
        return text
    return str(replace(uri, password=None))


def _encryption(session: MediaSession | None, side: Side) -> str:
    """The protection of a leg's media: ``srtp`` when a stream of the leg had a key
    of the relay's (a T.38 stream of such a call crosses in the clear, the leg keeps
    its key; in a realm that requires SRTP a fax-only call's leg has one made ready
    for audio), ``srtp-passthrough`` when one carried the peers' own SRTP, else
    ``rtp``; empty without media."""
    if session is None or not session.streams:
        return ""
    for stream in session.streams:
        leg = stream.leg(side)
        if leg.srtp:
            return MediaEncryption.SRTP.value
        if leg.encrypted:
            return MediaEncryption.SRTP_PASSTHROUGH.value
    return MediaEncryption.RTP.value


def cdr_record(call: Call, session: MediaSession | None, wall_offset: float) -> CdrRecord:
    """The CDR of ``call`` (ended), with media counters and RTCP quality of ``session``."""
    answered = call.answered_at is not None
    reason = EndReason[(call.end_reason or CallEndReason.REJECTED).name]
    hangup = None
    if answered:
        hangup = {LegSide.A: HangupSide.CALLER, LegSide.B: HangupSide.CALLEE, None: HangupSide.SBC}[
            call.hangup
        ]
    a_to_b = b_to_a = (0, 0)
    quality: dict[str, float | None] = {}
    if session is not None:
        a_packets = a_bytes = b_packets = b_bytes = 0
        for stream in session.streams:
            # Counters are of packets received from each leg's peer: A's are A->B.
            a, b = stream.leg(Side.A).counters, stream.leg(Side.B).counters
            a_packets += a.packets + a.kernel_packets
            a_bytes += a.bytes + a.kernel_bytes
            b_packets += b.packets + b.kernel_packets
            b_bytes += b.bytes + b.kernel_bytes
        a_to_b, b_to_a = (a_packets, a_bytes), (b_packets, b_bytes)
        if session.streams:
            stream = session.streams[0]
            # Each side's RTCP reports the media it receives, in the codec agreed
            # on its own leg: jitter is in that codec's RTP clock units.
            for side, prefix, codecs in (
                (Side.A, "a", call.a_codecs),
                (Side.B, "b", call.b_codecs),
            ):
                rate = _clock_rate(codecs)
                q = stream.leg(side).quality
                if q.reports:
                    quality[f"{prefix}_loss"] = q.fraction_lost
                    quality[f"{prefix}_jitter_ms"] = q.jitter_seconds(rate) * 1000
                    if q.rtt is not None:
                        quality["rtt_ms"] = q.rtt * 1000
    end = call.ended_at or call.created
    # Seconds from the INVITE to the first final answer: the 2xx, or the rejection
    # that ended the attempt. None when no final response arrived: the caller gave
    # up, the SBC's ring timer expired, nobody could be reached (the 408/503 the
    # caller then gets is the SBC's own), or the SBC stopped.
    setup_end = call.answered_at
    if setup_end is None and reason not in _NO_FINAL_RESPONSE:
        setup_end = end
    setup_time = None if setup_end is None else max(0.0, setup_end - call.created)
    return CdrRecord(
        call_ref=call.call_ref,
        route=call.route,
        a_realm=call.a.realm,
        b_realm=call.b.realm,
        caller=_without_password(call.caller),
        callee=_without_password(call.callee),
        source=format_hostport(call.a.peer.host, call.a.peer.port),
        destination=(format_hostport(call.b.peer.host, call.b.peer.port) if call.b.realm else ""),
        start_time=call.created + wall_offset,
        answer_time=None if call.answered_at is None else call.answered_at + wall_offset,
        end_time=end + wall_offset,
        setup_time=setup_time,
        disposition=disposition_for(call.end_status, answered, reason),
        # The final answer the caller got: 200 for an answered call, however it ended.
        final_status=200 if answered else (call.end_status if 100 <= call.end_status <= 699 else 0),
        end_reason=reason,
        hangup_side=hangup,
        a_codecs=call.a_codecs,
        b_codecs=call.b_codecs,
        a_to_b_packets=a_to_b[0],
        a_to_b_bytes=a_to_b[1],
        b_to_a_packets=b_to_a[0],
        b_to_a_bytes=b_to_a[1],
        a_loss=quality.get("a_loss"),
        b_loss=quality.get("b_loss"),
        a_jitter_ms=quality.get("a_jitter_ms"),
        b_jitter_ms=quality.get("b_jitter_ms"),
        rtt_ms=quality.get("rtt_ms"),
        a_encryption=_encryption(session, Side.A),
        b_encryption=_encryption(session, Side.B),
        trunk=call.trunk or "",
        gateway=call.gateway or "",
    )
