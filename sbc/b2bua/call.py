"""Calls as plain values: two legs, each a dialog in its own realm.

``Call`` and ``CallLeg`` are frozen and serialise to JSON-able dicts, so a standby
node can rebuild them (a later issue replicates them). Transactions in flight are
not part of this state: they live with the controller and die with the node, as
RFC 3261 transactions do.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sbc.evolve import evolve
from sbc.sip.dialog import Dialog
from sbc.transport.base import Destination, ListenAddress, Transport

#: Version of the ``to_dict`` layout, checked by ``from_dict``.
CALL_DICT_VERSION: Final = 2


class CallError(ValueError):
    """A call dict that cannot be read back; the message names the field."""


class CallState(enum.Enum):
    """Where a call is; it only moves forward."""

    __hash__ = object.__hash__  # members are singletons; Enum's hash is Python code

    #: The A-leg INVITE arrived; the relay is allocating media ports.
    ALLOCATING = "allocating"
    #: The B-leg INVITE is out; no dialog on it yet.
    CALLING = "calling"
    #: A provisional with a To tag made the B leg an early dialog.
    EARLY = "early"
    #: The B leg answered 2xx; both dialogs are confirmed.
    CONFIRMED = "confirmed"
    #: The caller cancelled; waiting for the B leg to end.
    CANCELLING = "cancelling"
    #: Over: BYE, rejection, cancellation or timeout.
    TERMINATED = "terminated"


class EndReason(enum.Enum):
    """Why a call (attempt) ended; CDRs record it."""

    BYE = "bye"
    CANCEL = "cancel"
    REJECTED = "rejected"
    NO_ANSWER_TIMEOUT = "no-answer-timeout"
    MEDIA_TIMEOUT = "media-timeout"
    #: The media session was lost with the media worker that held it.
    MEDIA_LOST = "media-lost"
    MAX_DURATION = "max-duration"
    SESSION_TIMER = "session-timer"
    SHUTDOWN = "shutdown"
    TRANSPORT_ERROR = "transport-error"
    ADMISSION = "admission"
    NO_ROUTE = "no-route"
    ACK_TIMEOUT = "ack-timeout"
    #: A request relayed in the call got 408 or 481 (or no answer): the far side's
    #: dialog is gone (RFC 3261 12.2.1.2, 14.1), and the requester's is ended with it.
    DIALOG_GONE = "dialog-gone"


class LegSide(enum.Enum):
    """A is the leg the call came in on, B the one the B2BUA created."""

    __hash__ = object.__hash__  # members are singletons; Enum's hash is Python code

    A = "a"
    B = "b"

    @property
    def other(self) -> LegSide:
        return LegSide.B if self is LegSide.A else LegSide.A


def _listen_to_dict(listen: ListenAddress) -> dict[str, Any]:
    return {"transport": listen.transport.value, "host": listen.host, "port": listen.port}


def _listen_from_dict(data: Mapping[str, Any]) -> ListenAddress:
    return ListenAddress(Transport(data["transport"]), str(data["host"]), int(data["port"]))


def _destination_to_dict(destination: Destination) -> dict[str, Any]:
    out: dict[str, Any] = {
        "transport": destination.transport.value,
        "host": destination.host,
        "port": destination.port,
    }
    if destination.tls_name is not None:
        # Only when set: dicts of other legs stay as they were.
        out["tls_name"] = destination.tls_name
    return out


def _destination_from_dict(data: Mapping[str, Any]) -> Destination:
    # Older dicts have no tls_name: their peer is verified by address, as it was.
    tls_name = data.get("tls_name")
    return Destination(
        Transport(data["transport"]),
        str(data["host"]),
        int(data["port"]),
        None if tls_name is None else str(tls_name),
    )


@dataclass(frozen=True, slots=True)
class CallLeg:
    """One leg: its realm, the SBC's own identity there, its peer and dialog.

    ``call_id`` and ``local_tag`` are the SBC's on this leg (A: the caller's Call-ID
    and the tag the SBC answers with; B: both generated). ``peer`` is where the
    SBC's requests on this leg go (A: the source of the INVITE, so NATed callers
    are reached; B: the trunk) and ``local`` the realm listener they leave from.
    ``sdp_session``/``sdp_version`` are the SBC's own ``o=`` on this leg
    (RFC 3264 8: the same session id, the version bumped for each new SDP).
    """

    realm: str
    call_id: str
    local_tag: str
    local: ListenAddress
    peer: Destination
    dialog: Dialog | None = None
    sdp_session: str = "0"
    sdp_version: int = 0
    #: Digest of the last SDP sent on this leg without its o= line: unchanged SDP
    #: keeps its version (RFC 3264 8).
    sdp_digest: str = ""
    #: Requests in the dialog go where RFC 3261 12.2.1.1 says (the first route, else
    #: the remote target) when that is a plain address like ``peer``'s: B legs to a
    #: trunk. False: always to ``peer`` (the caller's flow, through its NAT; a
    #: registered phone's registration).
    follow_route: bool = False

    def with_dialog(self, dialog: Dialog | None) -> CallLeg:
        return evolve(self, dialog=dialog)

    def to_dict(self) -> dict[str, Any]:
        return {
            "realm": self.realm,
            "call_id": self.call_id,
            "local_tag": self.local_tag,
            "local": _listen_to_dict(self.local),
            "peer": _destination_to_dict(self.peer),
            "dialog": None if self.dialog is None else self.dialog.to_dict(),
            "sdp_session": self.sdp_session,
            "sdp_version": self.sdp_version,
            "sdp_digest": self.sdp_digest,
            "follow_route": self.follow_route,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CallLeg:
        try:
            dialog = data.get("dialog")
            return cls(
                realm=str(data["realm"]),
                call_id=str(data["call_id"]),
                local_tag=str(data["local_tag"]),
                local=_listen_from_dict(data["local"]),
                peer=_destination_from_dict(data["peer"]),
                dialog=None if dialog is None else Dialog.from_dict(dialog),
                sdp_session=str(data.get("sdp_session", "0")),
                sdp_version=int(data.get("sdp_version", 0)),
                sdp_digest=str(data.get("sdp_digest", "")),
                follow_route=bool(data.get("follow_route", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CallError(f"bad call leg: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class Call:
    """A call: the A leg (where it came in), the B leg (where it went), media, state."""

    call_ref: str
    state: CallState
    a: CallLeg
    b: CallLeg
    route: str
    created: float
    media_session: str | None = None
    #: The status the call ended with, for CDRs (0 while it lasts).
    end_status: int = 0
    #: The caller's From URI and the Request-URI it asked for (CDRs).
    caller: str = ""
    callee: str = ""
    #: Monotonic time of the answer (None: not answered) and of the end (0: going on).
    answered_at: float | None = None
    ended_at: float = 0.0
    end_reason: EndReason | None = None
    #: Who hung up: a side, or None for the SBC (timers, shutdown) or no answer.
    hangup: LegSide | None = None
    #: Codecs offered by A and answered by B ("PCMU/8000,telephone-event/8000").
    a_codecs: str = ""
    b_codecs: str = ""
    #: The trunk and gateway of the B leg, when it went to a trunk.
    trunk: str | None = None
    gateway: str | None = None

    def leg(self, side: LegSide) -> CallLeg:
        return self.a if side is LegSide.A else self.b

    def with_leg(self, side: LegSide, leg: CallLeg) -> Call:
        return evolve(self, a=leg) if side is LegSide.A else evolve(self, b=leg)

    def with_state(self, state: CallState) -> Call:
        return evolve(self, state=state)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CALL_DICT_VERSION,
            "call_ref": self.call_ref,
            "state": self.state.value,
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "route": self.route,
            "created": self.created,
            "media_session": self.media_session,
            "end_status": self.end_status,
            "caller": self.caller,
            "callee": self.callee,
            "answered_at": self.answered_at,
            "ended_at": self.ended_at,
            "end_reason": None if self.end_reason is None else self.end_reason.value,
            "hangup": None if self.hangup is None else self.hangup.value,
            "a_codecs": self.a_codecs,
            "b_codecs": self.b_codecs,
            "trunk": self.trunk,
            "gateway": self.gateway,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Call:
        if data.get("version") != CALL_DICT_VERSION:
            raise CallError(f"unsupported call dict version: {data.get('version')!r}")
        try:
            return cls(
                call_ref=str(data["call_ref"]),
                state=CallState(data["state"]),
                a=CallLeg.from_dict(data["a"]),
                b=CallLeg.from_dict(data["b"]),
                route=str(data["route"]),
                created=float(data["created"]),
                media_session=data.get("media_session"),
                end_status=int(data.get("end_status", 0)),
                caller=str(data.get("caller", "")),
                callee=str(data.get("callee", "")),
                answered_at=None if data.get("answered_at") is None else float(data["answered_at"]),
                ended_at=float(data.get("ended_at", 0.0)),
                end_reason=None
                if data.get("end_reason") is None
                else EndReason(data["end_reason"]),
                hangup=None if data.get("hangup") is None else LegSide(data["hangup"]),
                a_codecs=str(data.get("a_codecs", "")),
                b_codecs=str(data.get("b_codecs", "")),
                trunk=data.get("trunk"),
                gateway=data.get("gateway"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CallError(f"bad call: {exc!r}") from exc
