"""One call detail record (CDR) per call attempt, as a plain frozen value.

The B2BUA builds a :class:`CdrRecord` when a call attempt ends (answered or not) and
hands it to a :class:`~sbc.cdr.store.CdrSink`. Nothing here does I/O or reads the
clock: every time is an argument (wall-clock epoch seconds, since CDRs are read by
people and billing systems, not by timers).

:func:`disposition_for` classifies an attempt from the final status the caller got
(RFC 3261 21: 486 Busy Here and 600 Busy Everywhere, 408 Request Timeout and 480
Temporarily Unavailable, 487 Request Terminated after a CANCEL, RFC 3261 9.2) and why
it ended. ``to_dict``/``from_dict`` give a versioned JSON-able form, as
:mod:`sbc.b2bua.call` does for calls.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

#: Version of the ``to_dict`` layout, checked by ``from_dict``.
CDR_DICT_VERSION: Final = 1

#: Statuses that mean the callee was busy (RFC 3261 21.4.24 and 21.6.1).
BUSY_STATUSES: Final = frozenset({486, 600})
#: Statuses that mean nobody answered (RFC 3261 21.4.11 and 21.4.18).
NO_ANSWER_STATUSES: Final = frozenset({408, 480})


class CdrError(ValueError):
    """A CDR that is inconsistent or a dict that cannot be read back; names the field."""


class Disposition(enum.StrEnum):
    """How the attempt turned out, as a person reading a call log would put it."""

    #: The callee answered (2xx): the call was connected.
    ANSWERED = "answered"
    #: The callee was busy: 486 or 600.
    BUSY = "busy"
    #: Nobody answered: 408/480 from the far end, or the SBC's no-answer timer.
    NO_ANSWER = "no_answer"
    #: The caller gave up before an answer (CANCEL, RFC 3261 9).
    CANCELLED = "cancelled"
    #: The far end or a policy refused the call with another 3xx, 4xx or 6xx.
    REJECTED = "rejected"
    #: Something broke: a 5xx, the SBC's own timeouts, transport errors, shutdown.
    FAILED = "failed"


class HangupSide(enum.StrEnum):
    """Who ended an answered call."""

    #: The caller (A leg) sent BYE.
    CALLER = "caller"
    #: The callee (B leg) sent BYE.
    CALLEE = "callee"
    #: The SBC itself ended it (timers, shutdown, errors).
    SBC = "sbc"


class MediaEncryption(enum.StrEnum):
    """How the media of a leg was protected (columns ``a_encryption``, ``b_encryption``)."""

    #: Plain RTP between the peer and the relay.
    RTP = "rtp"
    #: SDES-SRTP terminated by the relay (its own key towards the peer).
    SRTP = "srtp"
    #: SRTP of the peers' own keys passed through (a call between passthrough realms,
    #: or DTLS-SRTP there): the relay never saw the media in the clear.
    SRTP_PASSTHROUGH = "srtp-passthrough"


class EndReason(enum.StrEnum):
    """Why the attempt ended."""

    #: A BYE from either side ended an answered call (RFC 3261 15.1).
    BYE = "bye"
    #: The caller sent CANCEL before an answer (RFC 3261 9).
    CANCEL = "cancel"
    #: The far end answered the INVITE with a final non-2xx response.
    REJECTED = "rejected"
    #: The SBC's ring (no-answer) timer expired and it cancelled the B leg.
    NO_ANSWER_TIMEOUT = "no_answer_timeout"
    #: No RTP/RTCP from a side for too long; the SBC hung up.
    MEDIA_TIMEOUT = "media_timeout"
    #: The media worker holding the call's ports died; the SBC ended the call.
    MEDIA_LOST = "media_lost"
    #: The call reached the configured maximum duration; the SBC hung up.
    MAX_DURATION = "max_duration"
    #: A session refresh did not happen in time (RFC 4028 10).
    SESSION_TIMER = "session_timer"
    #: The SBC was shutting down and ended the call.
    SHUTDOWN = "shutdown"
    #: A request could not be delivered or its transaction timed out (RFC 3261 17.1.1.2
    #: Timer B, 17.1.2.2 Timer F, 8.1.3.1 transport errors).
    TRANSPORT_ERROR = "transport_error"
    #: Call admission control refused the call (limits, rate, capacity).
    ADMISSION = "admission"
    #: No routing rule matched the Request-URI.
    NO_ROUTE = "no_route"
    #: The 2xx to the caller was never ACKed (RFC 3261 13.3.1.4); the SBC hung up.
    ACK_TIMEOUT = "ack_timeout"
    #: A request relayed in the answered call got 408 or 481, or no answer (RFC 3261
    #: 12.2.1.2): that side's dialog was gone, and the SBC hung up the other side.
    DIALOG_GONE = "dialog_gone"


#: Reasons the SBC ended an unanswered attempt on its own account: failures, whatever
#: status the caller was then given (e.g. 408 after Timer B, 503 at shutdown).
_SBC_FAILURE_REASONS: Final = frozenset(
    {
        EndReason.TRANSPORT_ERROR,
        EndReason.SHUTDOWN,
        EndReason.ACK_TIMEOUT,
        EndReason.MEDIA_TIMEOUT,
        EndReason.MEDIA_LOST,
        EndReason.MAX_DURATION,
        EndReason.SESSION_TIMER,
        EndReason.DIALOG_GONE,
    }
)


def disposition_for(final_status: int, answered: bool, end_reason: EndReason) -> Disposition:
    """Classify an attempt from the caller's final status, whether it was answered, and why
    it ended.

    In order: answered -> ANSWERED; the SBC's no-answer timer -> NO_ANSWER; a CANCEL
    (the caller gets 487, RFC 3261 9.2) -> CANCELLED; the SBC's own failures (transport
    errors and transaction timeouts, even when the caller got 408; shutdown; ACK,
    media and session timers) -> FAILED; then by status: 486/600 -> BUSY, 408/480 ->
    NO_ANSWER, 5xx -> FAILED, other 3xx/4xx/6xx -> REJECTED. No final status (0) or
    anything else -> FAILED.
    """
    if answered:
        return Disposition.ANSWERED
    if end_reason is EndReason.NO_ANSWER_TIMEOUT:
        return Disposition.NO_ANSWER
    if end_reason is EndReason.CANCEL:
        return Disposition.CANCELLED
    if end_reason in _SBC_FAILURE_REASONS:
        return Disposition.FAILED
    if final_status in BUSY_STATUSES:
        return Disposition.BUSY
    if final_status in NO_ANSWER_STATUSES:
        return Disposition.NO_ANSWER
    if 500 <= final_status <= 599:
        return Disposition.FAILED
    if 300 <= final_status <= 699:
        return Disposition.REJECTED
    return Disposition.FAILED


#: Fields that must be finite numbers when set (JSON has no NaN or infinity).
_FLOAT_FIELDS: Final = (
    "start_time",
    "end_time",
    "answer_time",
    "setup_time",
    "a_loss",
    "b_loss",
    "a_jitter_ms",
    "b_jitter_ms",
    "rtt_ms",
)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class CdrRecord:
    """One call attempt, from the A-leg INVITE to the end of the call.

    Times are epoch seconds (wall clock). ``duration`` is derived: seconds from the
    answer to the end, 0 when unanswered. Media counters are what the relay forwarded
    in each direction; the quality fields are what RTCP reports said (RFC 3550 6.4:
    fraction lost, interarrival jitter, round-trip time), None when unknown.
    """

    call_ref: str
    route: str
    a_realm: str
    b_realm: str
    #: From URI of the A-leg INVITE.
    caller: str
    #: Request-URI of the A-leg INVITE.
    callee: str
    #: The caller's address as seen by the SBC, ``ip:port`` (``[v6]:port``).
    source: str
    #: Where the B leg went, ``ip:port``; empty when no B leg was tried.
    destination: str
    start_time: float
    end_time: float
    disposition: Disposition
    #: SIP status the caller was finally given; 0 when it got none.
    final_status: int
    end_reason: EndReason
    answer_time: float | None = None
    #: Seconds from the INVITE to the first final response; None when there was none.
    setup_time: float | None = None
    #: Who ended an answered call; None when never answered.
    hangup_side: HangupSide | None = None
    #: Codecs negotiated on each leg, e.g. ``PCMU/8000,telephone-event/8000``.
    a_codecs: str = ""
    b_codecs: str = ""
    a_to_b_packets: int = 0
    a_to_b_bytes: int = 0
    b_to_a_packets: int = 0
    b_to_a_bytes: int = 0
    #: Fraction of packets lost (0..1) on the stream received from each side.
    a_loss: float | None = None
    b_loss: float | None = None
    #: Interarrival jitter in milliseconds on the stream received from each side.
    a_jitter_ms: float | None = None
    b_jitter_ms: float | None = None
    rtt_ms: float | None = None
    #: How each leg's media was protected (:class:`MediaEncryption`); empty when the
    #: call had no media session.
    a_encryption: str = ""
    b_encryption: str = ""
    #: The trunk the B leg went to, and the gateway of its last attempt as
    #: configured (``udp:host:port``, the gateway's key); empty when it went elsewhere.
    trunk: str = ""
    gateway: str = ""

    def __post_init__(self) -> None:
        if self.final_status != 0 and not 100 <= self.final_status <= 699:
            raise CdrError(f"final_status {self.final_status} is not 0 or 100..699")
        answered = self.answer_time is not None
        if (self.disposition is Disposition.ANSWERED) != answered:
            raise CdrError(
                f"disposition {self.disposition.value} disagrees with answer_time "
                f"{self.answer_time!r}"
            )
        if self.hangup_side is not None and not answered:
            raise CdrError("hangup_side is set but the call was never answered")
        for name in ("a_to_b_packets", "a_to_b_bytes", "b_to_a_packets", "b_to_a_bytes"):
            if getattr(self, name) < 0:
                raise CdrError(f"{name} is negative: {getattr(self, name)}")
        for name in ("a_loss", "b_loss"):
            loss = getattr(self, name)
            if loss is not None and not 0.0 <= loss <= 1.0:
                raise CdrError(f"{name} {loss!r} is not a fraction 0..1")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise CdrError(f"{name} is not finite: {value!r}")

    @property
    def duration(self) -> float:
        """Seconds the call was answered: end minus answer; 0 when unanswered.

        Never negative, even if the wall clock stepped back during the call.
        """
        if self.answer_time is None:
            return 0.0
        return max(0.0, self.end_time - self.answer_time)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; ``duration`` is included for readers and ignored on the way back."""
        return {
            "version": CDR_DICT_VERSION,
            "call_ref": self.call_ref,
            "route": self.route,
            "a_realm": self.a_realm,
            "b_realm": self.b_realm,
            "caller": self.caller,
            "callee": self.callee,
            "source": self.source,
            "destination": self.destination,
            "start_time": self.start_time,
            "answer_time": self.answer_time,
            "end_time": self.end_time,
            "duration": self.duration,
            "setup_time": self.setup_time,
            "disposition": self.disposition.value,
            "final_status": self.final_status,
            "hangup_side": None if self.hangup_side is None else self.hangup_side.value,
            "end_reason": self.end_reason.value,
            "a_codecs": self.a_codecs,
            "b_codecs": self.b_codecs,
            "a_to_b_packets": self.a_to_b_packets,
            "a_to_b_bytes": self.a_to_b_bytes,
            "b_to_a_packets": self.b_to_a_packets,
            "b_to_a_bytes": self.b_to_a_bytes,
            "a_loss": self.a_loss,
            "b_loss": self.b_loss,
            "a_jitter_ms": self.a_jitter_ms,
            "b_jitter_ms": self.b_jitter_ms,
            "rtt_ms": self.rtt_ms,
            "a_encryption": self.a_encryption,
            "b_encryption": self.b_encryption,
            "trunk": self.trunk,
            "gateway": self.gateway,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CdrRecord:
        """Read back a ``to_dict`` result; :class:`CdrError` names what is wrong."""
        if data.get("version") != CDR_DICT_VERSION:
            raise CdrError(f"unsupported cdr dict version: {data.get('version')!r}")
        try:
            hangup_side = data.get("hangup_side")
            return cls(
                call_ref=str(data["call_ref"]),
                route=str(data["route"]),
                a_realm=str(data["a_realm"]),
                b_realm=str(data["b_realm"]),
                caller=str(data["caller"]),
                callee=str(data["callee"]),
                source=str(data["source"]),
                destination=str(data["destination"]),
                start_time=float(data["start_time"]),
                answer_time=_optional_float(data.get("answer_time")),
                end_time=float(data["end_time"]),
                setup_time=_optional_float(data.get("setup_time")),
                disposition=Disposition(data["disposition"]),
                final_status=int(data["final_status"]),
                hangup_side=None if hangup_side is None else HangupSide(hangup_side),
                end_reason=EndReason(data["end_reason"]),
                a_codecs=str(data.get("a_codecs", "")),
                b_codecs=str(data.get("b_codecs", "")),
                a_to_b_packets=int(data.get("a_to_b_packets", 0)),
                a_to_b_bytes=int(data.get("a_to_b_bytes", 0)),
                b_to_a_packets=int(data.get("b_to_a_packets", 0)),
                b_to_a_bytes=int(data.get("b_to_a_bytes", 0)),
                a_loss=_optional_float(data.get("a_loss")),
                b_loss=_optional_float(data.get("b_loss")),
                a_jitter_ms=_optional_float(data.get("a_jitter_ms")),
                b_jitter_ms=_optional_float(data.get("b_jitter_ms")),
                rtt_ms=_optional_float(data.get("rtt_ms")),
                a_encryption=str(data.get("a_encryption") or ""),
                b_encryption=str(data.get("b_encryption") or ""),
                trunk=str(data.get("trunk") or ""),
                gateway=str(data.get("gateway") or ""),
            )
        except CdrError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CdrError(f"bad cdr: {exc!r}") from exc
