"""Dialogs (RFC 3261 12), as a B2BUA keeps them: one per call leg.

A ``Dialog`` is a frozen value holding exactly the dialog state RFC 3261 12.1
lists (Call-ID, tags, local and remote URI, sequence numbers, remote target, route
set, secure flag) plus the state (early, confirmed, terminated). Every operation
returns a new value, so a dialog can be compared, logged, and replicated to the
standby node with ``to_dict`` / ``from_dict`` (JSON-able primitives only).

The dialog never sends anything: it builds requests (12.2.1.1, 13.2.2.4), checks
requests that arrive (12.2.2) and learns from responses sent and received (12.2,
12.3). A ``DialogSet`` follows one dialog-creating request a UAC sent, which
forking may answer with several early dialogs and several 2xx (12.1.2, 13.2.2.4).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeVar

from sbc.evolve import evolve
from sbc.sip.errors import ParseError, SipError
from sbc.sip.headers import MAX_CSEQ, Address, Via, get_param, remove_param
from sbc.sip.message import Headers, Request, Response, new_branch
from sbc.sip.uas import Rejection
from sbc.sip.uri import SipUri, Uri, parse_uri

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_E = TypeVar("_E", bound=Enum)

#: RFC 3261 8.1.1.6: the Max-Forwards a UAC puts in a request.
MAX_FORWARDS: Final = 70

#: RFC 3261 12.2.1.1 / 8.1.1.5: the local sequence number a dialog created on the
#: UAS side starts from (any value below 2**31 will do).
INITIAL_LOCAL_SEQ: Final = 1

#: Requests that refresh the remote target when they succeed: INVITE (RFC 3261
#: 12.2), UPDATE (RFC 3311 5.1), SUBSCRIBE and NOTIFY (RFC 6665).
TARGET_REFRESH_METHODS: Final = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "NOTIFY"})

#: RFC 5057 5 (simplified): these responses to a request sent in a dialog end
#: the dialog (the request's target is gone, or unreachable).
DIALOG_ENDING_STATUSES: Final = frozenset({408, 481})

#: Version of the ``to_dict`` layout, checked by ``from_dict``.
DICT_VERSION: Final = 1


class DialogError(SipError):
    """A dialog cannot be created or used the way it was asked to."""


class DialogState(Enum):
    """RFC 3261 12: early until a 2xx, then confirmed; terminated at the end."""

    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


class DialogRole(Enum):
    """Which side of the dialog-creating request we were (RFC 3261 12.1.1 / 12.1.2)."""

    UAC = "uac"
    UAS = "uas"


@dataclass(frozen=True, slots=True)
class DialogKey:
    """The dialog ID (RFC 3261 12): Call-ID, local tag, remote tag.

    Call-ID and tags are compared exactly, as RFC 3261 12.2.2 matching does.
    """

    call_id: str
    local_tag: str
    remote_tag: str

    @classmethod
    def for_request(cls, request: Request) -> DialogKey | None:
        """The key of a request we received: local tag = To tag, remote = From tag.

        None for a request outside any dialog (no To tag, RFC 3261 12.2.2) or one
        whose headers do not parse.
        """
        try:
            local = request.to.tag
            remote = request.from_.tag or ""
            call_id = request.call_id
        except ParseError:
            return None
        return None if local is None else cls(call_id, local, remote)

    @classmethod
    def for_response(cls, response: Response) -> DialogKey | None:
        """The key of a response to our request: local = From tag, remote = To tag."""
        try:
            local = response.from_.tag
            remote = response.to.tag
            call_id = response.call_id
        except ParseError:
            return None
        if local is None or remote is None:
            return None
        return cls(call_id, local, remote)

    def __str__(self) -> str:
        return f"{self.call_id};local={self.local_tag};remote={self.remote_tag}"


@dataclass(frozen=True, slots=True)
class Dialog:
    """The state of one dialog (RFC 3261 12.1); a plain value.

    ``local_address`` and ``remote_address`` are the From and To of the requests
    we send, as header text without the tag (they carry the local and remote URI
    of 12.1, display names kept). ``remote_target`` and each ``route_set`` entry
    are URIs as text. ``local_seq`` and ``remote_seq`` are None while empty.
    ``local_contact`` is the Contact value we put in target refresh requests,
    ``local_invite_seq`` the CSeq number of the last INVITE we sent (what an ACK
    for its 2xx carries, 13.2.2.4).
    """

    call_id: str
    local_tag: str
    remote_tag: str
    local_address: str
    remote_address: str
    remote_target: str
    route_set: tuple[str, ...]
    local_seq: int | None
    remote_seq: int | None
    secure: bool
    state: DialogState
    role: DialogRole
    local_contact: str | None = None
    local_invite_seq: int | None = None

    # -- creation ---------------------------------------------------------------------

    @classmethod
    def from_uac_response(
        cls, request: Request, response: Response, *, secure: bool | None = None
    ) -> Dialog:
        """The dialog a response to our ``request`` creates (RFC 3261 12.1.2).

        ``response`` is a 101-199 or 2xx with a To tag. Route set: Record-Route
        reversed; remote target: the response's Contact; early for a provisional,
        confirmed for a 2xx. ``secure`` defaults to whether the Request-URI is SIPS
        (12.1.2 also asks for TLS, which only the caller knows).
        """
        origin = DialogSet.for_request(request, secure=secure)
        return origin.dialog_from(response)

    @classmethod
    def from_uas_response(
        cls, request: Request, response: Response, *, secure: bool | None = None
    ) -> Dialog:
        """The dialog our ``response`` to ``request`` creates (RFC 3261 12.1.1).

        ``response`` is a 101-199 or 2xx we send, whose To tag becomes the local tag.
        Route set: the request's Record-Route in order; remote target: the request's
        Contact; remote sequence number: the request's CSeq; local one empty.
        """
        status = response.status
        if not 101 <= status <= 299:
            raise DialogError(f"a {status} response does not create a dialog (RFC 3261 12.1)")
        local_tag = response.to.tag
        if local_tag is None:
            raise DialogError("response has no To tag (RFC 3261 12.1.1)")
        if request.to.tag is not None:
            raise DialogError("request is already inside a dialog (it has a To tag)")
        if response.call_id != request.call_id:
            raise DialogError("response Call-ID differs from the request's")
        contacts = request.contacts
        if not contacts:
            raise DialogError("request has no Contact (RFC 3261 8.1.1.8)")
        response_contacts = response.contacts
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            # RFC 3261 12.1.1: an RFC 2543 peer may send no From tag; it is then null.
            remote_tag=request.from_.tag or "",
            local_address=_without_tag(request.to),
            remote_address=_without_tag(request.from_),
            remote_target=str(contacts[0].uri),
            route_set=tuple(str(a.uri) for a in request.addresses("Record-Route")),
            local_seq=None,
            remote_seq=request.cseq.seq,
            secure=_is_sips(request.uri) if secure is None else secure,
            state=DialogState.EARLY if status < 200 else DialogState.CONFIRMED,
            role=DialogRole.UAS,
            local_contact=str(response_contacts[0]) if response_contacts else None,
        )

    # -- identity ---------------------------------------------------------------------

    @property
    def key(self) -> DialogKey:
        return DialogKey(self.call_id, self.local_tag, self.remote_tag)

    def terminate(self) -> Dialog:
        """This dialog, terminated (the TU gave up on it, or a timeout)."""
        return evolve(self, state=DialogState.TERMINATED)

    # -- requests we send (RFC 3261 12.2.1) ---------------------------------------------

    def create_request(
        self,
        method: str,
        *,
        transport: str,
        host: str,
        port: int | None = None,
        contact: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str | None = None,
    ) -> tuple[Dialog, Request]:
        """A new request in this dialog and the dialog after it (RFC 3261 12.2.1.1).

        The local sequence number goes up by one (an empty one starts at
        ``INITIAL_LOCAL_SEQ``). ``transport``, ``host`` and ``port`` fill the Via
        placeholder, which gets a fresh branch. Target refresh requests carry
        ``contact`` (default: ``local_contact``). A BYE terminates the dialog as
        soon as it is built (15.1.1). ACK for a 2xx is ``create_ack``; CANCEL
        belongs to the INVITE's client transaction (9.1).
        """
        method = method.upper()
        if method in ("ACK", "CANCEL"):
            raise DialogError(f"{method} is not built with create_request (RFC 3261 13.2.2.4, 9.1)")
        if self.state is DialogState.TERMINATED:
            raise DialogError(f"dialog {self.key} is terminated")
        if method == "BYE" and self.role is DialogRole.UAS and self.state is DialogState.EARLY:
            # RFC 3261 15: the callee MUST NOT send a BYE on an early dialog.
            raise DialogError("the UAS cannot send BYE in an early dialog (RFC 3261 15)")
        seq = INITIAL_LOCAL_SEQ if self.local_seq is None else self.local_seq + 1
        if seq > MAX_CSEQ:
            raise DialogError("local CSeq number would exceed 2**32-1 (RFC 3261 8.1.1.5)")
        if contact is None and method in TARGET_REFRESH_METHODS:
            contact = self.local_contact
        request = self._build(method, seq, transport, host, port, contact, headers)
        _set_body(request, body, content_type)
        dialog = evolve(
            self,
            local_seq=seq,
            local_invite_seq=seq if method == "INVITE" else self.local_invite_seq,
            # RFC 3261 15.1.1: the session ends as soon as the BYE is sent.
            state=DialogState.TERMINATED if method == "BYE" else self.state,
        )
        logger.debug("> %s %s cseq=%d", self.key, method, seq)
        return dialog, request

    def create_ack(
        self,
        *,
        transport: str,
        host: str,
        port: int | None = None,
        invite_seq: int | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str | None = None,
    ) -> Request:
        """The ACK for a 2xx to an INVITE of this dialog (RFC 3261 13.2.2.4).

        Built like any request in the dialog, with the INVITE's CSeq number
        (default: the last INVITE we sent) and method ACK; the dialog's state does
        not change, and an ACK may be built even after the dialog ended (a 2xx
        retransmission still needs one). Credentials the INVITE carried go in
        ``headers``.
        """
        seq = self.local_invite_seq if invite_seq is None else invite_seq
        if seq is None:
            raise DialogError("no INVITE was sent in this dialog; give invite_seq")
        request = self._build("ACK", seq, transport, host, port, None, headers)
        _set_body(request, body, content_type)
        return request

    def _build(
        self,
        method: str,
        seq: int,
        transport: str,
        host: str,
        port: int | None,
        contact: str | None,
        extra: Iterable[tuple[str, str]],
    ) -> Request:
        request_uri, routes = self.request_target()
        out = Headers()
        via = Via(transport.upper(), host, port, (("branch", new_branch()),))
        out.add("Via", str(via))
        out.add("Max-Forwards", str(MAX_FORWARDS))
        if routes:
            out.add("Route", ", ".join(f"<{uri}>" for uri in routes))
        out.add("From", _with_tag(self.local_address, self.local_tag))
        out.add("To", _with_tag(self.remote_address, self.remote_tag))
        out.add("Call-ID", self.call_id)
        out.add("CSeq", f"{seq} {method}")
        if contact is not None:
            out.add("Contact", contact)
        for name, value in extra:
            out.add(name, value)
        return Request(method, request_uri, out)

    def request_target(self) -> tuple[Uri, tuple[str, ...]]:
        """Request-URI and Route URIs for a request in this dialog (RFC 3261 12.2.1.1).

        Loose routing (empty route set, or ``lr`` on the first route): the remote
        target, and the route set as Route. Strict routing: the first route's URI,
        and the rest of the route set followed by the remote target as Route.
        """
        target = _request_uri(self.remote_target)
        if not self.route_set:
            return target, ()
        first = parse_uri(self.route_set[0])
        if isinstance(first, SipUri) and first.lr:
            return target, self.route_set
        # 12.2.1.1: strict router; the remote target goes last, as a Route.
        return _request_uri(self.route_set[0]), (*self.route_set[1:], self.remote_target)

    @property
    def next_hop(self) -> Uri:
        """Where requests in this dialog go: the first route, else the remote target.

        RFC 3261 8.1.2 (with 12.2.1.1: a strict router is also the Request-URI).
        """
        return parse_uri(self.route_set[0] if self.route_set else self.remote_target)

    # -- requests we receive (RFC 3261 12.2.2) ------------------------------------------

    def receive_request(self, request: Request) -> Dialog | Rejection:
        """Check a request that arrived in this dialog; the dialog after it.

        A Rejection is the response to send instead of processing the request:
        481 when it does not belong to this (live) dialog, 500 when its CSeq number
        is lower than the remote sequence number (12.2.2). An ACK is never answered;
        drop it when a Rejection comes back. A BYE terminates the dialog (15.1.2).
        The remote target is refreshed only when the TU accepts a target refresh
        request: see ``response_sent``.
        """
        if DialogKey.for_request(request) != self.key or self.state is DialogState.TERMINATED:
            return Rejection(481, "Call/Transaction Does Not Exist")
        method = request.method
        changes: dict[str, object] = {}
        if method not in ("ACK", "CANCEL"):
            seq = request.cseq.seq
            if self.remote_seq is not None and seq < self.remote_seq:
                logger.debug("x %s %s cseq %d < %d", self.key, method, seq, self.remote_seq)
                return Rejection(500, "Server Internal Error")
            # 12.2.2: an empty remote sequence number takes the request's.
            changes["remote_seq"] = seq
        if method == "BYE":
            changes["state"] = DialogState.TERMINATED
        logger.debug("< %s %s", self.key, method)
        return evolve(self, **changes) if changes else self

    def response_sent(self, request: Request, response: Response) -> Dialog:
        """The dialog after we answered ``request`` (received in it) with ``response``.

        A 2xx to the INVITE of an early dialog confirms it, a non-2xx final one
        terminates it (12.3); a 2xx to a target refresh request replaces the remote
        target with the request's Contact (12.2), and the local Contact with the
        response's. The route set never changes after creation (12.2).
        """
        status = response.status
        if status < 200 or self.state is DialogState.TERMINATED:
            return self
        method = request.method
        initial = (
            method == "INVITE" and self.role is DialogRole.UAS and self.state is DialogState.EARLY
        )
        if status >= 300:
            return self.terminate() if initial else self
        changes: dict[str, object] = {}
        if initial:
            changes["state"] = DialogState.CONFIRMED
        if method in TARGET_REFRESH_METHODS:
            contacts = request.contacts
            if contacts:
                changes["remote_target"] = str(contacts[0].uri)
            ours = response.contacts
            if ours:
                changes["local_contact"] = str(ours[0])
        return evolve(self, **changes) if changes else self

    # -- responses we receive ---------------------------------------------------------

    def receive_response(self, response: Response) -> Dialog:
        """The dialog after a response to a request we sent in it.

        On the UAC side a 2xx to the INVITE of an early dialog confirms it and
        recomputes the route set from the 2xx (13.2.2.4); a 2xx to any target
        refresh request replaces the remote target with its Contact (12.2.1.2). A
        non-2xx final to the initial INVITE terminates an early dialog (12.3); a
        481 or 408 to any request terminates the dialog (RFC 5057, simplified).
        """
        key = DialogKey.for_response(response)
        if key is not None and key != self.key:
            raise DialogError(f"response for dialog {key} given to dialog {self.key}")
        status = response.status
        if status < 200 or self.state is DialogState.TERMINATED:
            return self
        cseq = response.cseq
        initial = (
            cseq.method == "INVITE"
            and self.role is DialogRole.UAC
            and self.state is DialogState.EARLY
        )
        if status >= 300:
            if initial or status in DIALOG_ENDING_STATUSES:
                logger.debug("- %s terminated by %d to %s", self.key, status, cseq.method)
                return self.terminate()
            return self
        changes: dict[str, object] = {}
        if initial:
            # 13.2.2.4: confirmed, and the route set recomputed from the 2xx.
            changes["state"] = DialogState.CONFIRMED
            changes["route_set"] = _uac_route_set(response)
            logger.debug("- %s confirmed", self.key)
        if cseq.method in TARGET_REFRESH_METHODS:
            contacts = response.contacts
            if contacts:
                changes["remote_target"] = str(contacts[0].uri)
        return evolve(self, **changes) if changes else self

    # -- replication ------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """The dialog as JSON-able primitives (for the standby node)."""
        return {
            "version": DICT_VERSION,
            "call_id": self.call_id,
            "local_tag": self.local_tag,
            "remote_tag": self.remote_tag,
            "local_address": self.local_address,
            "remote_address": self.remote_address,
            "remote_target": self.remote_target,
            "route_set": list(self.route_set),
            "local_seq": self.local_seq,
            "remote_seq": self.remote_seq,
            "secure": self.secure,
            "state": self.state.value,
            "role": self.role.value,
            "local_contact": self.local_contact,
            "local_invite_seq": self.local_invite_seq,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Dialog:
        """The inverse of ``to_dict``; DialogError names the first bad field."""
        if data.get("version") != DICT_VERSION:
            raise DialogError(f"unsupported dialog dict version: {data.get('version')!r}")
        route_set = data.get("route_set")
        if not isinstance(route_set, list) or not all(isinstance(r, str) for r in route_set):
            raise DialogError("dialog field 'route_set' must be a list of strings")
        return cls(
            call_id=_field(data, "call_id", str),
            local_tag=_field(data, "local_tag", str),
            remote_tag=_field(data, "remote_tag", str),
            local_address=_field(data, "local_address", str),
            remote_address=_field(data, "remote_address", str),
            remote_target=_field(data, "remote_target", str),
            route_set=tuple(route_set),
            local_seq=_optional(data, "local_seq", int),
            remote_seq=_optional(data, "remote_seq", int),
            secure=_field(data, "secure", bool),
            state=_enum(DialogState, _field(data, "state", str), "state"),
            role=_enum(DialogRole, _field(data, "role", str), "role"),
            local_contact=_optional(data, "local_contact", str),
            local_invite_seq=_optional(data, "local_invite_seq", int),
        )


# -- forking (RFC 3261 12.1.2, 13.2.2.4) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class EarlyDialog:
    """A provisional response with a To tag created (or repeated) an early dialog."""

    dialog: Dialog
    created: bool


@dataclass(frozen=True, slots=True)
class DialogAnswered:
    """The first 2xx: ``dialog`` is confirmed.

    ``unconfirmed`` are the request's other early dialogs. They stay early in the
    set until the TU terminates them, at the latest when the INVITE transaction
    completes (``DialogSet.terminate_early``, RFC 3261 13.2.2.4).
    """

    dialog: Dialog
    unconfirmed: tuple[Dialog, ...]


@dataclass(frozen=True, slots=True)
class ExtraForkAnswered:
    """A 2xx from another fork after the first: ACK it, then BYE it (13.2.2.4)."""

    dialog: Dialog


@dataclass(frozen=True, slots=True)
class AnswerRetransmitted:
    """A 2xx again for a dialog already answered: send its ACK again (13.2.2.4)."""

    dialog: Dialog


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """A non-2xx final response: every early dialog of the request ended (12.3)."""

    status: int
    terminated: tuple[Dialog, ...]


DialogSetEvent = (
    EarlyDialog | DialogAnswered | ExtraForkAnswered | AnswerRetransmitted | RequestFailed
)


@dataclass(frozen=True, slots=True)
class DialogSet:
    """The dialogs one dialog-creating request we sent has created, one per To tag.

    Built from the request with ``for_request``; fed every response to it with
    ``receive_response``. ``answered_tags`` lists the remote tags that sent a 2xx,
    the first one being the dialog the call goes on with.
    """

    call_id: str
    local_tag: str
    local_address: str
    remote_address: str
    request_uri: str
    local_seq: int
    method: str
    secure: bool
    local_contact: str | None = None
    dialogs: tuple[Dialog, ...] = ()
    answered_tags: tuple[str, ...] = ()

    @classmethod
    def for_request(cls, request: Request, *, secure: bool | None = None) -> DialogSet:
        """An empty set for ``request`` (INVITE, SUBSCRIBE, REFER ...) we send."""
        local_tag = request.from_.tag
        if local_tag is None:
            raise DialogError("request has no From tag (RFC 3261 8.1.1.3)")
        if request.to.tag is not None:
            raise DialogError("request is already inside a dialog (it has a To tag)")
        contacts = request.contacts
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            local_address=_without_tag(request.from_),
            remote_address=_without_tag(request.to),
            request_uri=request.raw_uri,
            local_seq=request.cseq.seq,
            method=request.method,
            secure=_is_sips(request.uri) if secure is None else secure,
            local_contact=str(contacts[0]) if contacts else None,
        )

    # -- views ------------------------------------------------------------------------

    def get(self, remote_tag: str) -> Dialog | None:
        for dialog in self.dialogs:
            if dialog.remote_tag == remote_tag:
                return dialog
        return None

    @property
    def answered(self) -> Dialog | None:
        """The dialog of the first 2xx, if any."""
        return self.get(self.answered_tags[0]) if self.answered_tags else None

    @property
    def early(self) -> tuple[Dialog, ...]:
        return tuple(d for d in self.dialogs if d.state is DialogState.EARLY)

    @property
    def extra(self) -> tuple[Dialog, ...]:
        """Dialogs of 2xx that came after the first one: the TU ACKs and BYEs them."""
        return tuple(d for t in self.answered_tags[1:] if (d := self.get(t)) is not None)

    # -- changes ----------------------------------------------------------------------

    def with_dialog(self, dialog: Dialog) -> DialogSet:
        """The set with ``dialog`` stored (replacing the one with its remote tag)."""
        if dialog.call_id != self.call_id or dialog.local_tag != self.local_tag:
            raise DialogError(f"dialog {dialog.key} does not belong to this set")
        others = tuple(d for d in self.dialogs if d.remote_tag != dialog.remote_tag)
        return evolve(self, dialogs=(*others, dialog))

    def terminate_early(self) -> tuple[DialogSet, tuple[Dialog, ...]]:
        """End every dialog still early (13.2.2.4: the INVITE transaction completed)."""
        ended = tuple(d.terminate() for d in self.early)
        dialog_set = self
        for dialog in ended:
            dialog_set = dialog_set.with_dialog(dialog)
        return dialog_set, ended

    def dialog_from(self, response: Response) -> Dialog:
        """The dialog ``response`` creates for this set's request (RFC 3261 12.1.2)."""
        status = response.status
        if not 101 <= status <= 299:
            raise DialogError(f"a {status} response does not create a dialog (RFC 3261 12.1)")
        remote_tag = response.to.tag
        if remote_tag is None:
            raise DialogError("response has no To tag (RFC 3261 12.1.2)")
        if response.call_id != self.call_id or response.from_.tag != self.local_tag:
            raise DialogError("response does not match the request's Call-ID and From tag")
        contacts = response.contacts
        if contacts:
            target = str(contacts[0].uri)
        else:
            # A Contact is mandatory here (12.1.1); without one the best guess is
            # where the request went.
            logger.debug("x %s %d without Contact", self.call_id, status)
            target = self.request_uri
        return Dialog(
            call_id=self.call_id,
            local_tag=self.local_tag,
            remote_tag=remote_tag,
            local_address=self.local_address,
            remote_address=self.remote_address,
            remote_target=target,
            route_set=_uac_route_set(response),
            local_seq=self.local_seq,
            remote_seq=None,
            secure=self.secure,
            state=DialogState.EARLY if status < 200 else DialogState.CONFIRMED,
            role=DialogRole.UAC,
            local_contact=self.local_contact,
            local_invite_seq=self.local_seq if self.method == "INVITE" else None,
        )

    def receive_response(self, response: Response) -> tuple[DialogSet, DialogSetEvent | None]:
        """The set after a response to its request, and what the TU must know.

        None means nothing dialog-related happened (a 100, a provisional without To
        tag, a response for another request or dialog that ended, a non-2xx final
        after a 2xx).
        """
        status = response.status
        try:
            cseq = response.cseq
            call_id = response.call_id
            local_tag = response.from_.tag
            remote_tag = response.to.tag
        except ParseError:
            return self, None
        if (
            call_id != self.call_id
            or local_tag != self.local_tag
            or cseq.seq != self.local_seq
            or cseq.method != self.method
        ):
            logger.debug("x %s response %d does not match the request", self.call_id, status)
            return self, None
        if status >= 300:
            if self.answered_tags:
                return self, None
            dialog_set, ended = self.terminate_early()
            return dialog_set, RequestFailed(status, ended)
        if status == 100 or remote_tag is None:
            return self, None
        existing = self.get(remote_tag)
        if status < 200:
            if existing is None:
                dialog = self.dialog_from(response)
                return self.with_dialog(dialog), EarlyDialog(dialog, created=True)
            if existing.state is DialogState.EARLY:
                return self, EarlyDialog(existing, created=False)
            return self, None
        if remote_tag in self.answered_tags and existing is not None:
            return self, AnswerRetransmitted(existing)
        if existing is not None and existing.state is DialogState.EARLY:
            dialog = existing.receive_response(response)
        else:
            dialog = self.dialog_from(response)
        dialog_set = evolve(
            self,
            dialogs=(*(d for d in self.dialogs if d.remote_tag != remote_tag), dialog),
            answered_tags=(*self.answered_tags, remote_tag),
        )
        if self.answered_tags:
            logger.debug("- %s extra 2xx from fork %s", self.call_id, remote_tag)
            return dialog_set, ExtraForkAnswered(dialog)
        others = tuple(d for d in dialog_set.early if d.remote_tag != remote_tag)
        return dialog_set, DialogAnswered(dialog, others)

    # -- replication ------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        return {
            "version": DICT_VERSION,
            "call_id": self.call_id,
            "local_tag": self.local_tag,
            "local_address": self.local_address,
            "remote_address": self.remote_address,
            "request_uri": self.request_uri,
            "local_seq": self.local_seq,
            "method": self.method,
            "secure": self.secure,
            "local_contact": self.local_contact,
            "dialogs": [d.to_dict() for d in self.dialogs],
            "answered_tags": list(self.answered_tags),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DialogSet:
        if data.get("version") != DICT_VERSION:
            raise DialogError(f"unsupported dialog set dict version: {data.get('version')!r}")
        dialogs = data.get("dialogs")
        if not isinstance(dialogs, list) or not all(isinstance(d, Mapping) for d in dialogs):
            raise DialogError("dialog set field 'dialogs' must be a list of objects")
        tags = data.get("answered_tags")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DialogError("dialog set field 'answered_tags' must be a list of strings")
        return cls(
            call_id=_field(data, "call_id", str),
            local_tag=_field(data, "local_tag", str),
            local_address=_field(data, "local_address", str),
            remote_address=_field(data, "remote_address", str),
            request_uri=_field(data, "request_uri", str),
            local_seq=_field(data, "local_seq", int),
            method=_field(data, "method", str),
            secure=_field(data, "secure", bool),
            local_contact=_optional(data, "local_contact", str),
            dialogs=tuple(Dialog.from_dict(d) for d in dialogs),
            answered_tags=tuple(tags),
        )


# -- a table ----------------------------------------------------------------------------


class DialogTable:
    """Dialogs by DialogKey: where requests and responses in a dialog find theirs."""

    __slots__ = ("_dialogs",)

    def __init__(self, dialogs: Iterable[Dialog] = ()) -> None:
        self._dialogs: dict[DialogKey, Dialog] = {d.key: d for d in dialogs}

    def __len__(self) -> int:
        return len(self._dialogs)

    def __iter__(self) -> Iterator[Dialog]:
        return iter(list(self._dialogs.values()))

    def __contains__(self, key: object) -> bool:
        return key in self._dialogs

    def get(self, key: DialogKey) -> Dialog | None:
        return self._dialogs.get(key)

    def put(self, dialog: Dialog) -> None:
        """Store (or replace) ``dialog`` under its key."""
        self._dialogs[dialog.key] = dialog

    def discard(self, key: DialogKey) -> Dialog | None:
        return self._dialogs.pop(key, None)

    def match_request(self, request: Request) -> Dialog | None:
        """The dialog a received request belongs to (RFC 3261 12.2.2), if any."""
        key = DialogKey.for_request(request)
        return None if key is None else self._dialogs.get(key)

    def match_response(self, response: Response) -> Dialog | None:
        """The dialog a response to one of our in-dialog requests belongs to."""
        key = DialogKey.for_response(response)
        return None if key is None else self._dialogs.get(key)


# -- helpers ----------------------------------------------------------------------------


#: From/To values built for a dialog's requests, by (address, tag): every request
#: of a dialog (ACK, BYE, refreshes) builds the same two. Bounded; cleared when full.
_TAGGED: dict[tuple[str, str], str] = {}
_MAX_TAGGED: Final = 4096


def _with_tag(address: str, tag: str) -> str:
    """``address`` (header text without tag) with ``tag``; as is when ``tag`` is empty."""
    key = (address, tag)
    value = _TAGGED.get(key)
    if value is None:
        parsed = Address.parse(address)
        value = str(parsed.with_param("tag", tag) if tag else parsed)
        if len(_TAGGED) >= _MAX_TAGGED:
            _TAGGED.clear()
        _TAGGED[key] = value
    return value


def _without_tag(address: Address) -> str:
    if get_param(address.params, "tag") is None:
        return str(address)
    return str(evolve(address, params=remove_param(address.params, "tag")))


def _is_sips(uri: Uri) -> bool:
    return isinstance(uri, SipUri) and uri.secure


def _uac_route_set(response: Response) -> tuple[str, ...]:
    # RFC 3261 12.1.2: the UAC's route set is the Record-Route URIs in reverse order.
    return tuple(reversed([str(a.uri) for a in response.addresses("Record-Route")]))


def _request_uri(text: str) -> Uri:
    """``text`` fit for a Request-URI: no URI headers, no ``method`` (RFC 3261 19.1.1)."""
    uri = parse_uri(text)
    if isinstance(uri, SipUri) and (uri.headers or uri.param("method") is not None):
        uri = evolve(uri.with_params(method=None), headers=())
    return uri


def _set_body(request: Request, body: bytes, content_type: str | None) -> None:
    if body or content_type:
        request.set_body(body, content_type)
    else:
        request.headers.add("Content-Length", "0")


def _field(data: Mapping[str, object], name: str, kind: type[_T]) -> _T:
    value = data.get(name)
    # bool is an int: a sequence number must not be True.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DialogError(f"dialog field {name!r} must be {kind.__name__}, not {value!r}")
    return value


def _optional(data: Mapping[str, object], name: str, kind: type[_T]) -> _T | None:
    return None if data.get(name) is None else _field(data, name, kind)


def _enum(kind: type[_E], value: str, name: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise DialogError(f"dialog field {name!r} has unknown value {value!r}") from None
