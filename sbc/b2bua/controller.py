"""The B2BUA: calls as two dialogs, driven by transaction events, sans-I/O.

``CallController`` is the transaction user. It takes the transaction layer's
``Output`` (and ``now``) and hands back a ``Step``: the transaction layer's output
plus what the B2BUA made it send, and media commands for the relay. It never
awaits: the asyncio side runs each media command and reports an allocation back
with ``media_allocated``, which continues the call.

A call: an INVITE entering realm A is routed (``Router``); the relay allocates a
session; a new INVITE, with the B2BUA's own Call-ID, tags, branch, Via, Contact,
CSeq and SDP, leaves through the route's realm. Provisional and final responses
come back re-originated; the 2xx of each leg is ACKed per leg (RFC 3261 13.2.2.4),
non-2xx ACKs stay hop-by-hop in the transaction layer (17.1.1.3). BYE, CANCEL,
re-INVITE and other in-dialog requests are re-originated on the other leg.
Anything not part of a call goes to the ``LocalResponder``.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field, replace
from typing import Final

from sbc.b2bua.call import Call, CallLeg, CallState, LegSide
from sbc.b2bua.local import LocalResponder
from sbc.b2bua.realm import Hop, RealmTable
from sbc.b2bua.routing import RejectRoute, Router, TrunkRoute, uri_user_host
from sbc.b2bua.topology import (
    SDP_CONTENT_TYPE,
    blank_offers,
    contact_for,
    copy_kept_headers,
    leg_offers,
    parse_sdp,
    rewrite_sdp,
    sip_uri_for,
    stream_offers,
    via_for,
)
from sbc.media.session import LegOffer, MediaSession, Side, StreamOffer
from sbc.sip.dialog import (
    AnswerRetransmitted,
    Dialog,
    DialogAnswered,
    DialogError,
    DialogSet,
    EarlyDialog,
    ExtraForkAnswered,
)
from sbc.sip.errors import ParseError
from sbc.sip.headers import quote_string
from sbc.sip.message import Headers, Request, Response, make_response, new_branch, new_tag
from sbc.sip.sdp import SdpError
from sbc.sip.transaction import (
    NOTHING,
    AckReceived,
    CancelReceived,
    ClientInviteTransaction,
    ClientTransaction,
    InviteAccepted,
    Outgoing,
    Output,
    RequestReceived,
    ResponseReceived,
    ServerInviteTransaction,
    ServerTransaction,
    TransactionError,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimeout,
    TransportError,
)
from sbc.sip.uas import UasPolicy, check_request
from sbc.sip.uri import format_host
from sbc.transport.base import Destination, Flow, Transport, is_reliable

logger = logging.getLogger(__name__)

#: RFC 3261 8.1.1.6: Max-Forwards of a request the B2BUA originates, at most.
MAX_FORWARDS: Final = 70

#: What the B2BUA itself handles on a leg (RFC 3261 20.5 Allow).
ALLOW: Final = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO"

_MEDIA_SIDE: Final = {LegSide.A: Side.A, LegSide.B: Side.B}

#: What a new call may require: nothing yet (no 100rel/PRACK, no session timers
#: across the legs), so a Require of anything gets 420 (RFC 3261 8.2.2.3).
INVITE_POLICY: Final = UasPolicy(supported=())


# -- what the controller asks of the world ----------------------------------------------


@dataclass(frozen=True, slots=True)
class AllocateMedia:
    """Allocate a relay session; report it with ``CallController.media_allocated``."""

    call_ref: str
    call_id: str
    streams: tuple[StreamOffer, ...]


@dataclass(frozen=True, slots=True)
class UpdateMedia:
    """A new offer or answer for an existing session (fire and forget, in order)."""

    call_ref: str
    session_id: str
    streams: tuple[StreamOffer, ...]


@dataclass(frozen=True, slots=True)
class DeleteMedia:
    call_ref: str
    session_id: str


MediaCommand = AllocateMedia | UpdateMedia | DeleteMedia


@dataclass(frozen=True, slots=True)
class Step:
    """Messages to send (the transaction layer's output) and media commands, in order."""

    output: Output = NOTHING
    media: tuple[MediaCommand, ...] = ()

    def __add__(self, other: Step) -> Step:
        return Step(self.output + other.output, self.media + other.media)


# -- runtime state beside the Call value -------------------------------------------------


@dataclass(eq=False)
class _Relayed:
    """An in-dialog request re-originated on the other leg, awaiting its answer."""

    from_side: LegSide
    server: ServerTransaction
    request: Request


@dataclass(eq=False)
class _Live:
    """A call and what is not replicated with it: transactions and SDP in flight."""

    call: Call
    a_invite: ServerInviteTransaction
    a_request: Request
    route: TrunkRoute
    b_invite: ClientInviteTransaction | None = None
    b_request: Request | None = None
    b_dialogs: DialogSet | None = None
    a_offer: bytes = b""
    session: MediaSession | None = None
    offers: dict[LegSide, tuple[LegOffer, ...]] = field(default_factory=dict)
    #: The A leg has its final response (answered, rejected or 487).
    a_final: bool = False
    #: CANCEL waits for a provisional response of the B leg (RFC 3261 9.1).
    cancel_pending: bool = False
    b_ack: Request | None = None


@dataclass(eq=False)
class _Unacked:
    """A 2xx the B2BUA sent to an INVITE, retransmitted until its ACK (13.3.1.4)."""

    call_ref: str
    server: ServerTransaction
    response: Response
    interval: float
    next_at: float
    give_up_at: float


@dataclass(frozen=True, slots=True)
class _ByRole:
    call_ref: str
    role: str
    relayed: _Relayed | None = None


class CallController:
    """The transaction user of the SBC: calls, routing, topology hiding; pure."""

    def __init__(
        self,
        transactions: TransactionLayer,
        realms: RealmTable,
        router: Router,
        responder: LocalResponder,
        *,
        user_agent: str = "sbc",
    ) -> None:
        self.transactions = transactions
        self.realms = realms
        self.router = router
        self.responder = responder
        self.user_agent = user_agent
        self._calls: dict[str, _Live] = {}
        #: (Call-ID, the SBC's tag on that leg) -> call and side.
        self._by_dialog: dict[tuple[str, str], tuple[str, LegSide]] = {}
        self._by_client: dict[ClientTransaction, _ByRole] = {}
        self._by_server: dict[ServerTransaction, str] = {}
        #: (Call-ID, the SBC's To tag, CSeq number) of a 2xx not yet ACKed.
        self._unacked: dict[tuple[str, str, int], _Unacked] = {}

    # -- views ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._calls)

    def calls(self) -> tuple[Call, ...]:
        """Every live call, as plain values."""
        return tuple(live.call for live in self._calls.values())

    def reconfigure(self, realms: RealmTable, router: Router, responder: LocalResponder) -> None:
        """New realms and routes for new calls; calls in progress keep their legs."""
        self.realms, self.router, self.responder = realms, router, responder

    # -- timers --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``handle_timers`` should next run (2xx retransmissions), or None."""
        return min((u.next_at for u in self._unacked.values()), default=None)

    def handle_timers(self, now: float) -> Step:
        """RFC 3261 13.3.1.4: retransmit each unACKed 2xx, T1 doubling up to T2; after
        64*T1 without ACK the dialog is confirmed and at once ended with a BYE."""
        step = Step()
        config = self.transactions.config
        for key, unacked in list(self._unacked.items()):
            if unacked.next_at > now:
                continue
            live = self._calls.get(unacked.call_ref)
            if live is None:
                del self._unacked[key]
                continue
            if unacked.server.terminated and now < unacked.give_up_at:
                # Timer L ended the transaction first (RFC 6026 8.7): wait for give-up.
                unacked.next_at = unacked.give_up_at
                continue
            if now >= unacked.give_up_at:
                del self._unacked[key]
                logger.info("x call %s: no ACK for the 2xx, hanging up", unacked.call_ref)
                side = self._by_dialog.get((key[0], key[1]), (unacked.call_ref, LegSide.A))[1]
                step = step + self._hang_up(live, side, 408, now)
                step = step + self._hang_up(live, side.other, 408, now)
                continue
            unacked.interval = min(2 * unacked.interval, config.t2)
            unacked.next_at = now + unacked.interval
            step = step + Step(
                self.transactions.send_response(unacked.server, unacked.response, now)
            )
        return step

    def _expect_ack(
        self, call_ref: str, server: ServerTransaction, response: Response, now: float
    ) -> None:
        t1 = self.transactions.config.t1
        key = (response.call_id, response.to.tag or "", response.cseq.seq)
        self._unacked[key] = _Unacked(call_ref, server, response, t1, now + t1, now + 64 * t1)

    # -- input ---------------------------------------------------------------------------

    def handle(self, out: Output, now: float) -> Step:
        """Consume the events of ``out``; its messages are passed through, in order."""
        step = Step(Output(out.messages))
        for event in out.events:
            try:
                step = step + self._event(event, now)
            except (ParseError, DialogError, TransactionError, SdpError) as exc:
                logger.warning("x %s: %s", type(event).__name__, exc)
        return step

    def _event(self, event: object, now: float) -> Step:
        if isinstance(event, RequestReceived):
            return self._request(event.transaction, event.request, now)
        if isinstance(event, CancelReceived):
            return self._cancel(event, now)
        if isinstance(event, InviteAccepted | ResponseReceived):
            return self._response(event.transaction, event.response, now)
        if isinstance(event, AckReceived):
            self._ack(event.request)
            return Step()
        if isinstance(event, TransactionTimeout | TransportError):
            tx = event.transaction
            if isinstance(tx, ClientTransaction) and tx in self._by_client:
                status = 408 if isinstance(event, TransactionTimeout) else 503
                return self._response(tx, make_response(tx.request, status), now)
            return Step()
        if isinstance(event, TransactionTerminated):
            tx = event.transaction
            if isinstance(tx, ClientTransaction):
                self._by_client.pop(tx, None)
            elif isinstance(tx, ServerTransaction):
                self._by_server.pop(tx, None)
        return Step()

    # -- requests ------------------------------------------------------------------------

    def _local(self, tx: ServerTransaction, request: Request, now: float) -> Step:
        response = self.responder.respond(request)
        if response is None:
            return Step()
        return self._send_response(tx, response, now)

    def _send_response(self, tx: ServerTransaction, response: Response, now: float) -> Step:
        response.headers.add("Server", self.user_agent)
        return Step(self.transactions.send_response(tx, response, now))

    def _request(self, tx: ServerTransaction, request: Request, now: float) -> Step:
        if request.to.tag is not None:
            found = self._by_dialog.get((request.call_id, request.to.tag))
            if found is None:
                return self._local(tx, request, now)
            call_ref, side = found
            return self._in_dialog(self._calls[call_ref], side, tx, request, now)
        if request.method != "INVITE" or not isinstance(tx, ServerInviteTransaction):
            return self._local(tx, request, now)
        return self._new_call(tx, request, now)

    def _new_call(self, tx: ServerInviteTransaction, request: Request, now: float) -> Step:
        flow = tx.destination
        realm = self.realms.of_flow(flow) if isinstance(flow, Flow) else None
        if realm is None or not isinstance(flow, Flow):
            return self._local(tx, request, now)
        rejection = check_request(request, INVITE_POLICY)
        if rejection is not None:
            return self._send_response(tx, rejection.response_to(request, new_tag()), now)
        decision = self.router.route(realm.name, request.uri)
        if decision is None:
            logger.info("x %s from %s: no route", request.raw_uri, realm.name)
            return self._send_response(tx, make_response(request, 404, to_tag=new_tag()), now)
        if isinstance(decision, RejectRoute):
            logger.info(
                "x %s from %s: rejected %d by route %s",
                request.raw_uri,
                realm.name,
                decision.status,
                decision.rule,
            )
            response = make_response(request, decision.status, to_tag=new_tag())
            return self._send_response(tx, response, now)
        target = self.realms.get(decision.realm)
        hop = None if target is None else self.realms.hop(target, decision.destination)
        if target is None or hop is None:
            logger.error(
                "x route %s: realm %s has no %s listener",
                decision.rule,
                decision.realm,
                decision.destination.transport.value,
            )
            return self._send_response(tx, make_response(request, 503, to_tag=new_tag()), now)
        max_forwards = request.max_forwards
        if max_forwards is not None and max_forwards <= 1:
            return self._send_response(tx, make_response(request, 483, to_tag=new_tag()), now)
        try:
            sdp = parse_sdp(request)
        except SdpError as exc:
            logger.info("x %s: bad SDP offer: %s", request.raw_uri, exc)
            return self._send_response(
                tx, make_response(request, exc.status, to_tag=new_tag()), now
            )
        if sdp is None or not sdp.media:
            # Late offer (SDP in the 2xx and ACK) is not relayed yet.
            response = make_response(request, 488, "Offer Required", to_tag=new_tag())
            return self._send_response(tx, response, now)
        a_local = realm.listener(flow.transport, flow.remote_host)
        assert a_local is not None  # the request arrived on one
        call = Call(
            call_ref=secrets.token_hex(8),
            state=CallState.ALLOCATING,
            a=CallLeg(
                realm=realm.name,
                call_id=request.call_id,
                local_tag=new_tag(),
                local=a_local,
                peer=Destination(flow.transport, flow.remote_host, flow.remote_port),
                sdp_session=str(secrets.randbelow(10**12)),
            ),
            b=CallLeg(
                realm=target.name,
                call_id=secrets.token_hex(16),
                local_tag=new_tag(),
                local=hop.local,
                peer=decision.destination,
                sdp_session=str(secrets.randbelow(10**12)),
            ),
            route=decision.rule,
            created=now,
        )
        live = _Live(call, tx, request, decision, a_offer=request.body)
        live.offers[LegSide.A] = leg_offers(sdp, realm)
        live.offers[LegSide.B] = blank_offers(len(sdp.media), target)
        self._calls[call.call_ref] = live
        self._by_server[tx] = call.call_ref
        self._by_dialog[(call.a.call_id, call.a.local_tag)] = (call.call_ref, LegSide.A)
        self._by_dialog[(call.b.call_id, call.b.local_tag)] = (call.call_ref, LegSide.B)
        logger.info(
            "- call %s: %s %s -> route %s -> %s",
            call.call_ref,
            realm.name,
            request.raw_uri,
            decision.rule,
            hop,
        )
        streams = stream_offers(live.offers[LegSide.A], live.offers[LegSide.B])
        return Step(media=(AllocateMedia(call.call_ref, call.a.call_id, streams),))

    def media_allocated(self, call_ref: str, session: MediaSession | None, now: float) -> Step:
        """The relay answered an ``AllocateMedia`` (None: it failed); the call goes on."""
        live = self._calls.get(call_ref)
        if live is None or live.call.state is not CallState.ALLOCATING:
            if session is not None:
                return Step(media=(DeleteMedia(call_ref, session.session_id),))
            return Step()
        if session is None:
            return self._fail_a(live, 503, now)
        live.session = session
        live.call = replace(live.call, media_session=session.session_id)
        sdp = parse_sdp(live.a_request)
        assert sdp is not None
        body, b_leg = rewrite_sdp(sdp, session, Side.B, live.call.b)
        live.call = live.call.with_leg(LegSide.B, b_leg)
        invite = self._b_invite(live, body)
        hop = self._hop(live.call.b)
        live.b_request = invite
        live.b_dialogs = DialogSet.for_request(invite)
        tx, out = self.transactions.send_request(
            invite, hop, now, reliable=is_reliable(hop.destination.transport)
        )
        assert isinstance(tx, ClientInviteTransaction)
        live.b_invite = tx
        self._by_client[tx] = _ByRole(call_ref, "invite")
        live.call = live.call.with_state(CallState.CALLING)
        return Step(out)

    def _b_invite(self, live: _Live, body: bytes) -> Request:
        """The B leg's INVITE: everything the B2BUA's own, kept headers copied."""
        a_request, leg = live.a_request, live.call.b
        destination = leg.peer
        user, _ = uri_user_host(a_request.uri)
        caller, _ = uri_user_host(a_request.from_.uri)
        userinfo = f"{user}@" if user else ""
        host = format_host(destination.host)
        params = (
            ""
            if destination.transport is Transport.UDP
            else (f";transport={destination.transport.value}")
        )
        headers = Headers()
        headers.add("Via", via_for(leg.local, new_branch()))
        max_forwards = a_request.max_forwards
        headers.add("Max-Forwards", str(min(MAX_FORWARDS, (max_forwards or MAX_FORWARDS + 1) - 1)))
        own = sip_uri_for(leg.local, caller).split(";", 1)[0]
        display = a_request.from_.display_name
        from_ = f"<{own}>;tag={leg.local_tag}"
        if display:
            from_ = f"{quote_string(display)} {from_}"
        headers.add("From", from_)
        headers.add("To", f"<sip:{userinfo}{host}>")
        headers.add("Call-ID", leg.call_id)
        headers.add("CSeq", "1 INVITE")
        headers.add("Contact", contact_for(leg.local))
        headers.add("Allow", ALLOW)
        headers.add("User-Agent", self.user_agent)
        invite = Request("INVITE", f"sip:{userinfo}{host}:{destination.port}{params}", headers)
        realm = self.realms.get(leg.realm)
        if realm is not None:
            copy_kept_headers(a_request, invite, realm)
        invite.set_body(body, SDP_CONTENT_TYPE)
        return invite

    def _hop(self, leg: CallLeg) -> Hop:
        return Hop(leg.realm, leg.local, leg.peer)

    def _in_dialog(
        self, live: _Live, side: LegSide, tx: ServerTransaction, request: Request, now: float
    ) -> Step:
        leg = live.call.leg(side)
        dialog = leg.dialog
        if dialog is None:
            return self._local(tx, request, now)
        checked = dialog.receive_request(request)
        if not isinstance(checked, Dialog):
            return self._send_response(tx, checked.response_to(request), now)
        live.call = live.call.with_leg(side, leg.with_dialog(checked))
        if request.method == "BYE":
            logger.info("- call %s: BYE from %s", live.call.call_ref, side.value)
            step = self._send_response(tx, make_response(request, 200), now)
            return step + self._hang_up(live, side.other, 200, now)
        return self._relay(live, side, tx, request, now)

    def _relay(
        self, live: _Live, side: LegSide, tx: ServerTransaction, request: Request, now: float
    ) -> Step:
        """Re-originate an in-dialog request (re-INVITE, INFO ...) on the other leg."""
        other = side.other
        leg = live.call.leg(other)
        if leg.dialog is None or live.call.state is not CallState.CONFIRMED:
            response = make_response(request, 491 if request.method == "INVITE" else 481)
            return self._send_response(tx, response, now)
        step = Step()
        body, content_type = request.body, request.headers.get("Content-Type")
        sdp = parse_sdp(request)
        if sdp is not None and live.session is not None:
            realm = self.realms.get(live.call.leg(side).realm)
            if realm is not None:
                live.offers[side] = leg_offers(sdp, realm)
                step = step + self._update_media(live)
            body, new_leg = rewrite_sdp(sdp, live.session, _MEDIA_SIDE[other], leg)
            leg = new_leg
        extra: list[tuple[str, str]] = []
        realm_to = self.realms.get(leg.realm)
        probe = Request(request.method, "sip:probe", Headers())
        if realm_to is not None:
            copy_kept_headers(request, probe, realm_to)
        extra.extend(probe.headers)
        dialog, out_request = leg.dialog.create_request(  # type: ignore[union-attr]
            request.method,
            transport=leg.local.transport.value,
            host=format_host(leg.local.host),
            port=leg.local.port,
            contact=contact_for(leg.local),
            headers=extra,
            body=body,
            content_type=content_type if body else None,
        )
        live.call = live.call.with_leg(other, replace(leg, dialog=dialog))
        self._fix_via(out_request)
        hop = self._hop(leg)
        client, out = self.transactions.send_request(
            out_request, hop, now, reliable=is_reliable(hop.destination.transport)
        )
        self._by_client[client] = _ByRole(live.call.call_ref, "relay", _Relayed(side, tx, request))
        logger.info(
            "- call %s: %s relayed %s -> %s",
            live.call.call_ref,
            request.method,
            side.value,
            other.value,
        )
        return step + Step(out)

    @staticmethod
    def _fix_via(request: Request) -> None:
        # RFC 3581: ask for rport on every request the SBC originates.
        via = request.headers.pop_first_value("Via")
        assert via is not None
        request.headers.add("Via", f"{via};rport", first=True)
        request.invalidate()

    def _cancel(self, event: CancelReceived, now: float) -> Step:
        invite = event.invite
        call_ref = None if invite is None else self._by_server.get(invite)
        status = 481 if invite is None else 200
        response = make_response(event.request, status, to_tag=None)
        step = self._send_response(event.transaction, response, now)
        live = None if call_ref is None else self._calls.get(call_ref)
        if live is None or live.a_final:
            return step
        logger.info("- call %s: CANCEL from a", live.call.call_ref)
        # RFC 3261 9.2: the INVITE gets 487 at once; the B leg is cancelled after it.
        step = step + self._answer_a(live, make_response(live.a_request, 487), now)
        if live.call.state is CallState.ALLOCATING:
            return step + self._end(live, 487)
        live.call = live.call.with_state(CallState.CANCELLING)
        return step + self._cancel_b(live, now)

    def _cancel_b(self, live: _Live, now: float) -> Step:
        tx = live.b_invite
        if tx is None:
            return Step()
        if not tx.can_cancel:
            # RFC 3261 9.1: no CANCEL before a provisional response; sent on the first.
            live.cancel_pending = True
            return Step()
        live.cancel_pending = False
        client, out = self.transactions.send_cancel(tx, now)
        self._by_client[client] = _ByRole(live.call.call_ref, "cancel")
        return Step(out)

    def _ack(self, request: Request) -> None:
        # The ACK for a 2xx ends at the B2BUA: each leg's 2xx is ACKed by the B2BUA
        # itself (RFC 3261 13.2.2.4), so there is nothing to relay.
        try:
            key = (request.call_id, request.to.tag or "")
            seq = request.cseq.seq
        except ParseError:
            return
        if self._unacked.pop((*key, seq), None) is not None:
            logger.debug("< ACK for call %s", self._by_dialog.get(key, ("?",))[0])

    # -- responses -----------------------------------------------------------------------

    def _response(self, tx: ClientTransaction, response: Response, now: float) -> Step:
        role = self._by_client.get(tx)
        if role is None:
            return Step()
        live = self._calls.get(role.call_ref)
        if live is None:
            return Step()
        if role.role == "invite":
            return self._invite_response(live, response, now)
        if role.role == "relay" and role.relayed is not None:
            return self._relayed_response(live, tx, role.relayed, response, now)
        if role.role == "bye" and response.status >= 200:
            self._by_client.pop(tx, None)
        return Step()

    def _invite_response(self, live: _Live, response: Response, now: float) -> Step:
        status = response.status
        call = live.call
        if status == 100:
            return Step()
        assert live.b_dialogs is not None
        dialog_set, event = live.b_dialogs.receive_response(response)
        live.b_dialogs = dialog_set
        if isinstance(event, AnswerRetransmitted | ExtraForkAnswered):
            return self._ack_b(live, event.dialog, now, bye=isinstance(event, ExtraForkAnswered))
        if status < 200:
            step = Step()
            if live.cancel_pending:
                step = step + self._cancel_b(live, now)
            if call.state is CallState.CANCELLING or live.a_final:
                return step
            if isinstance(event, EarlyDialog):
                live.call = call.with_leg(LegSide.B, call.b.with_dialog(event.dialog)).with_state(
                    CallState.EARLY
                )
            return step + self._answer_a(live, self._to_a(live, response), now)
        if status < 300:
            if not isinstance(event, DialogAnswered):
                logger.warning("x call %s: 2xx that answers no dialog", call.call_ref)
                return Step()
            live.call = call.with_leg(LegSide.B, call.b.with_dialog(event.dialog))
            step = self._ack_b(live, event.dialog, now, bye=False)
            if call.state is CallState.CANCELLING or live.a_final:
                # RFC 3261 9.1: the 2xx crossed our CANCEL; the call is over.
                logger.info("- call %s: answered after CANCEL, hanging up b", call.call_ref)
                return step + self._hang_up(live, LegSide.B, 487, now)
            step = step + self._media_answer(live, response)
            a_response = self._to_a(live, response)
            step = step + self._answer_a(live, a_response, now)
            self._expect_ack(call.call_ref, live.a_invite, a_response, now)
            try:
                a_dialog: Dialog | None = Dialog.from_uas_response(live.a_request, a_response)
            except (DialogError, ParseError) as exc:
                # No Contact from the caller: the call goes on, but only A can end it.
                logger.warning("x call %s: no dialog on a: %s", call.call_ref, exc)
                a_dialog = None
            live.call = live.call.with_leg(LegSide.A, live.call.a.with_dialog(a_dialog)).with_state(
                CallState.CONFIRMED
            )
            logger.info("- call %s: answered", call.call_ref)
            return step
        # Non-2xx final: the transaction layer ACKs it hop by hop (17.1.1.3).
        logger.info("- call %s: b answered %d", call.call_ref, status)
        step = Step()
        if not live.a_final:
            step = self._answer_a(live, self._to_a(live, response), now)
        return step + self._end(live, status)

    def _media_answer(self, live: _Live, response: Response) -> Step:
        try:
            sdp = parse_sdp(response)
        except SdpError:
            return Step()
        realm = self.realms.get(live.call.b.realm)
        if sdp is None or realm is None:
            return Step()
        live.offers[LegSide.B] = leg_offers(sdp, realm)
        return self._update_media(live)

    def _update_media(self, live: _Live) -> Step:
        if live.session is None:
            return Step()
        streams = stream_offers(live.offers[LegSide.A], live.offers[LegSide.B])
        return Step(media=(UpdateMedia(live.call.call_ref, live.session.session_id, streams),))

    def _to_a(self, live: _Live, response: Response) -> Response:
        """The A leg's copy of a B-leg response to the INVITE."""
        status = response.status
        headers: list[tuple[str, str]] = []
        if 100 < status < 300:
            # RFC 3261 12.1.1: the A side's own Record-Route comes back in its responses.
            record_route = live.a_request.headers.fields("Record-Route")
            headers.extend(("Record-Route", value) for value in record_route)
            headers.append(("Contact", contact_for(live.call.a.local)))
            headers.append(("Allow", ALLOW))
        out = make_response(
            live.a_request,
            status,
            response.reason,
            to_tag=live.call.a.local_tag,
            headers=headers,
        )
        realm = self.realms.get(live.call.a.realm)
        if realm is not None:
            copy_kept_headers(response, out, realm)
        if 100 < status < 300 and live.session is not None:
            try:
                sdp = parse_sdp(response)
            except SdpError:
                sdp = None
            if sdp is not None:
                body, a_leg = rewrite_sdp(sdp, live.session, Side.A, live.call.a)
                live.call = live.call.with_leg(LegSide.A, a_leg)
                out.set_body(body, SDP_CONTENT_TYPE)
        return out

    def _answer_a(self, live: _Live, response: Response, now: float) -> Step:
        if response.status >= 200:
            live.a_final = True
        return self._send_response(live.a_invite, response, now)

    def _ack_b(self, live: _Live, dialog: Dialog, now: float, *, bye: bool) -> Step:
        leg = live.call.b
        ack = dialog.create_ack(
            transport=leg.local.transport.value,
            host=format_host(leg.local.host),
            port=leg.local.port,
        )
        self._fix_via(ack)
        hop = self._hop(leg)
        step = Step(Output((Outgoing(ack, bytes(ack), hop),)))
        if bye:
            _, bye_request = dialog.create_request(
                "BYE",
                transport=leg.local.transport.value,
                host=format_host(leg.local.host),
                port=leg.local.port,
            )
            step = step + self._send_on(live, bye_request, hop, "bye", now)
        return step

    def _send_on(self, live: _Live, request: Request, hop: Hop, role: str, now: float) -> Step:
        self._fix_via(request)
        request.headers.add("User-Agent", self.user_agent)
        client, out = self.transactions.send_request(
            request, hop, now, reliable=is_reliable(hop.destination.transport)
        )
        self._by_client[client] = _ByRole(live.call.call_ref, role)
        return Step(out)

    def _relayed_response(
        self,
        live: _Live,
        tx: ClientTransaction,
        relayed: _Relayed,
        response: Response,
        now: float,
    ) -> Step:
        status = response.status
        if status < 200:
            return Step()
        self._by_client.pop(tx, None)
        side, other = relayed.from_side, relayed.from_side.other
        step = Step()
        leg = live.call.leg(other)
        if leg.dialog is not None:
            dialog = leg.dialog.receive_response(response)
            live.call = live.call.with_leg(other, leg.with_dialog(dialog))
            if relayed.request.method == "INVITE" and status < 300:
                step = step + self._ack_leg(live, other, dialog, response.cseq.seq)
        headers: list[tuple[str, str]] = []
        if relayed.request.method == "INVITE" and status < 300:
            headers.append(("Contact", contact_for(live.call.leg(side).local)))
        out = make_response(relayed.request, status, response.reason, headers=headers)
        realm = self.realms.get(live.call.leg(side).realm)
        if realm is not None:
            copy_kept_headers(response, out, realm)
        try:
            sdp = parse_sdp(response)
        except SdpError:
            sdp = None
        if sdp is not None and live.session is not None and status < 300:
            realm_other = self.realms.get(leg.realm)
            if realm_other is not None:
                live.offers[other] = leg_offers(sdp, realm_other)
                step = step + self._update_media(live)
            body, new_leg = rewrite_sdp(sdp, live.session, _MEDIA_SIDE[side], live.call.leg(side))
            live.call = live.call.with_leg(side, new_leg)
            out.set_body(body, SDP_CONTENT_TYPE)
        elif response.body and sdp is None and status < 300:
            out.set_body(response.body, response.headers.get("Content-Type"))
        dialog_side = live.call.leg(side).dialog
        if dialog_side is not None and status < 300:
            updated = dialog_side.response_sent(relayed.request, out)
            live.call = live.call.with_leg(side, live.call.leg(side).with_dialog(updated))
        step = step + self._send_response(relayed.server, out, now)
        if relayed.request.method == "INVITE" and status < 300:
            self._expect_ack(live.call.call_ref, relayed.server, out, now)
        return step

    def _ack_leg(self, live: _Live, side: LegSide, dialog: Dialog, seq: int) -> Step:
        leg = live.call.leg(side)
        ack = dialog.create_ack(
            transport=leg.local.transport.value,
            host=format_host(leg.local.host),
            port=leg.local.port,
            invite_seq=seq,
        )
        self._fix_via(ack)
        return Step(Output((Outgoing(ack, bytes(ack), self._hop(leg)),)))

    # -- ending --------------------------------------------------------------------------

    def _hang_up(self, live: _Live, side: LegSide, status: int, now: float) -> Step:
        """BYE the leg ``side`` (if it has a confirmed dialog) and end the call."""
        leg = live.call.leg(side)
        step = Step()
        if leg.dialog is not None:
            try:
                dialog, bye = leg.dialog.create_request(
                    "BYE",
                    transport=leg.local.transport.value,
                    host=format_host(leg.local.host),
                    port=leg.local.port,
                )
            except DialogError as exc:
                logger.info("x call %s: no BYE on %s: %s", live.call.call_ref, side.value, exc)
            else:
                live.call = live.call.with_leg(side, leg.with_dialog(dialog))
                step = self._send_on(live, bye, self._hop(leg), "bye", now)
        return step + self._end(live, status)

    def _fail_a(self, live: _Live, status: int, now: float) -> Step:
        step = Step()
        if not live.a_final:
            step = self._answer_a(live, make_response(live.a_request, status), now)
        return step + self._end(live, status)

    def _end(self, live: _Live, status: int) -> Step:
        call = live.call
        if call.state is CallState.TERMINATED:
            return Step()
        live.call = replace(call, state=CallState.TERMINATED, end_status=status)
        self._calls.pop(call.call_ref, None)
        for key in ((call.a.call_id, call.a.local_tag), (call.b.call_id, call.b.local_tag)):
            self._by_dialog.pop(key, None)
        for pending, unacked in list(self._unacked.items()):
            if unacked.call_ref == call.call_ref:
                del self._unacked[pending]
        logger.info("- call %s ended (%d)", call.call_ref, status)
        if live.session is not None:
            return Step(media=(DeleteMedia(call.call_ref, live.session.session_id),))
        return Step()


__all__ = [
    "ALLOW",
    "AllocateMedia",
    "CallController",
    "DeleteMedia",
    "MediaCommand",
    "Step",
    "UpdateMedia",
]
