"""The B2BUA: calls as two dialogs, driven by transaction events, sans-I/O.

``CallController`` is the transaction user. It takes the transaction layer's
``Output`` (and ``now``) and hands back a ``Step``: the transaction layer's output
plus what the B2BUA made it send, media commands for the relay, ended calls (for
CDRs) and digest failures (for the firewall). It never awaits: the asyncio side runs
each media command and reports an allocation back with ``media_allocated``, which
continues the call.

A call: an INVITE entering realm A is authenticated when its realm asks for it,
routed (``Router``) to targets (a static peer, a trunk's gateways in failover
order, or the contacts registered for the user: those of one q-value forked in
parallel, the next lower q after them, RFC 3261 16.6 sequential search), admitted
(``AdmissionPort``); the relay allocates a session; new INVITEs, with the B2BUA's
own Call-ID, tags, branch, Via, Contact, CSeq and SDP, leave through the target's
realm. Provisional and final responses come back re-originated; the 2xx of each
leg is ACKed per leg (RFC 3261 13.2.2.4), non-2xx ACKs stay hop-by-hop in the
transaction layer (17.1.1.3), reliable provisionals of the B leg are PRACKed by the
B2BUA (RFC 3262). BYE, CANCEL, re-INVITE, UPDATE, INFO, REFER (per realm policy)
and NOTIFY are re-originated on the other leg. The B2BUA refreshes each leg's
session (RFC 4028) and ends a call whose refresh fails, on media timeout, on the
maximum duration and when the SBC shuts down. REGISTER goes to the registrar of a
realm that has one (or to its registration relay); SUBSCRIBE makes a dialog on each
leg like a call without media (RFC 6665), whose NOTIFYs are relayed; MESSAGE,
PUBLISH and unsolicited NOTIFY are routed like calls, without media or dialog.
Anything else goes to the ``LocalResponder``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import re
import secrets
import urllib.parse
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_network
from typing import Final, Protocol, TypeVar

from sbc.b2bua.admission import AdmissionControl, AdmissionTicket, RefusalReason, Refused
from sbc.b2bua.call import Call, CallLeg, CallState, EndReason, LegSide
from sbc.b2bua.codecs import CodecPolicyError, allowed_codecs, restrict_codecs
from sbc.b2bua.event_bodies import names_identities, screen_event_body
from sbc.b2bua.identity import (
    ANONYMOUS_DISPLAY,
    ANONYMOUS_URI,
    Identity,
    asserted_by_peer,
    authenticated,
    identity_headers,
    is_anonymous,
    privacy_of,
    withholds_user,
)
from sbc.b2bua.local import LocalResponder
from sbc.b2bua.location import conveyed
from sbc.b2bua.realm import Hop, Realm, RealmTable
from sbc.b2bua.register_rate import RegisterRate
from sbc.b2bua.routing import (
    RegisteredRoute,
    RejectRoute,
    RouteDecision,
    Router,
    TrunkRoute,
    uri_user_host,
)
from sbc.b2bua.srtp import (
    SrtpPolicy,
    blank_srtp,
    established,
    first_offers,
    mirror,
    opportunistic_streams,
)
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
from sbc.b2bua.trunk_auth import TrunkAuth
from sbc.b2bua.trunk_register import TrunkRegistrations
from sbc.b2bua.trunks import Gateway, probe_request
from sbc.burst import BurstLog
from sbc.evolve import evolve
from sbc.media.session import LegOffer, MediaSession, Side, StreamOffer
from sbc.sip.dialog import (
    AnswerRetransmitted,
    Dialog,
    DialogAnswered,
    DialogError,
    DialogSet,
    DialogState,
    EarlyDialog,
    ExtraForkAnswered,
)
from sbc.sip.errors import ParseError, reason_phrase
from sbc.sip.headers import Address, Via, is_token, parse_delta, quote_string, split_list
from sbc.sip.message import (
    Headers,
    Message,
    Request,
    Response,
    make_response,
    new_branch,
    new_tag,
    random_below,
    random_hex,
)
from sbc.sip.parser import parse_message
from sbc.sip.sdp import SdpError, SessionDescription
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
    StrayResponse,
    Transaction,
    TransactionError,
    TransactionLayer,
    TransactionState,
    TransactionTerminated,
    TransactionTimeout,
    TransportError,
)
from sbc.sip.uas import UasPolicy, check_request
from sbc.sip.uri import SipUri, Uri, escape_user, format_host, parse_uri, service_urn
from sbc.transport.base import (
    Destination,
    Flow,
    ListenAddress,
    Transport,
    ip_literal,
    is_reliable,
)

logger = logging.getLogger(__name__)

#: RFC 3261 8.1.1.6: Max-Forwards of a request the B2BUA originates, at most.
MAX_FORWARDS: Final = 70

#: What the B2BUA itself handles on a leg (RFC 3261 20.5 Allow).
ALLOW: Final = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, UPDATE, PRACK, REFER, NOTIFY, MESSAGE"

#: Option tags of the B2BUA's own INVITEs: reliable provisionals are PRACKed by the
#: B2BUA (RFC 3262), session timers are run by it (RFC 4028).
SUPPORTED: Final = "100rel, timer"

#: The same without 100rel, for an INVITE without an offer: a reliable provisional
#: would then carry the offer, and the answer in its PRACK is the caller's to give,
#: which the B2BUA (PRACKing at once) cannot wait for.
SUPPORTED_NO_OFFER: Final = "timer"

#: Option tags of the in-dialog INVITEs the B2BUA sends (relayed re-INVITEs, session
#: refreshes): their provisionals are not PRACKed (only the initial INVITE's are), so
#: no 100rel, or a reliable one is retransmitted and the re-INVITE fails (RFC 3262 3).
SUPPORTED_IN_DIALOG: Final = "timer"

#: Relay streams reserved for a call whose INVITE has no offer (the callee's offer in
#: its 2xx comes later): audio and one more, video say. m= lines beyond them are
#: rejected (port 0) in the offer the caller gets.
LATE_OFFER_STREAMS: Final = 2

_MEDIA_SIDE: Final = {LegSide.A: Side.A, LegSide.B: Side.B}

#: What a new call may require: session timers (the B2BUA refreshes both legs
#: itself), Replaces (mapped to the far side, ``_replaced``) and 100rel (the
#: caller's provisionals are then sent reliably, ``_ReliableA``; a caller that
#: only supports 100rel gets them unreliably, as RFC 3262 allows).
INVITE_POLICY: Final = UasPolicy(supported=("timer", "replaces", "100rel"), service_urns=True)

#: Characters of a Replaces value that stay as they are in a URI header (RFC 3261
#: 25.1 hvalue: hnv-unreserved and unreserved); the rest (";", "=", "@") escaped.
_HVALUE_SAFE: Final = "[]/?:+$-_.!~*'()"

#: Requests routed like calls, without media or dialog (RFC 3428, RFC 3903; an
#: unsolicited NOTIFY, as message-waiting indications are often sent).
ROUTED_REQUESTS: Final = frozenset({"MESSAGE", "PUBLISH", "NOTIFY"})

#: Headers of a SUBSCRIBE/NOTIFY that carry the event package, not topology (RFC 6665).
EVENT_HEADERS: Final = ("Event", "Expires", "Accept", "Allow-Events", "Subscription-State")

#: Headers of an answer that say what its sender supports (RFC 3261 20.5, 20.1, 20.2,
#: 20.37, 20.40): capability tokens, never an address. They cross on error answers,
#: which they explain (405 must name Allow, 415 Accept, 420 Unsupported), and on
#: answers to a relayed OPTIONS, which exist to carry them.
CAPABILITY_HEADERS: Final = ("Allow", "Accept", "Accept-Encoding", "Supported", "Unsupported")

#: Seconds a subscription outlives its Expires without a refresh before it is dropped.
SUBSCRIPTION_GRACE: Final = 32.0
#: Answers of a callee that cannot take the SRTP offer made only because the
#: caller's was SRTP: 488 Not Acceptable Here (RFC 3264 6: no common profile), and
#: 606 Not Acceptable, which some endpoints send for the same (RFC 3261 21.6.4).
SRTP_REFUSALS: Final = frozenset({488, 606})

#: Retry-After of a request the B2BUA cannot pass on at the transaction limit.
OVERLOAD_RETRY: Final = ("Retry-After", "5")
#: Seconds until a session refresh the transaction limit held back is tried again.
REFRESH_RETRY: Final = 5.0

#: Seconds between two log lines of REGISTERs refused over a realm's rate.
STORM_LOG_INTERVAL: Final = 10.0

#: Statuses of a non-2xx final answer after which the next gateway is tried.
FAILOVER_STATUSES: Final = frozenset({408, 500, 502, 503, 504})

#: Statuses after which a registered user's contacts of the next lower q-value are
#: tried (RFC 3261 16.6 sequential search): any 4xx or 5xx. A 6xx ends the search
#: (16.7 step 5), a 3xx is redirected or relayed as for any call.
SEQUENTIAL_STATUSES: Final = frozenset(range(400, 600))

#: Longest session interval a callee's 422 can make the B2BUA ask for (RFC 4028 7.4).
MAX_SESSION_INTERVAL: Final = 86400

#: Most parallel forks of one call (contacts of one user) and serial attempts.
MAX_FORKS: Final = 10
MAX_ATTEMPTS: Final = 16

#: Seconds between the log lines of calls refused because the node is busy.
BUSY_LOG_INTERVAL: Final = 10.0

#: B-leg INVITEs let go of while they could still be answered, kept so that a late
#: 2xx is ACKed and hung up; the oldest are forgotten beyond this many.
MAX_ORPHANS: Final = 10_000

#: Seconds a REFER's subscription (RFC 3515) outlives the BYE of its call at most,
#: waiting for the NOTIFY with the transfer's outcome: the transfer target may ring
#: for a while. RFC 3515 leaves the duration to the notifier.
REFER_LINGER: Final = 180.0

#: RFC 3261 18.1.1: a request larger than this, the path MTU unknown, goes over a
#: congestion-controlled transport (TCP) when the realm's policy asks for it.
UDP_SIZE_LIMIT: Final = 1300

#: Seconds a peer whose TCP connection failed gets large requests over UDP again.
NO_TCP_MEMORY: Final = 600.0

#: Most 3xx Contacts followed, and how often a call may be redirected.
MAX_REDIRECTS: Final = 3

#: Statuses after which a session refresh shows the dialog is gone (RFC 4028 10).
DEAD_DIALOG_STATUSES: Final = frozenset({408, 481})
#: Relayed requests whose 408/481 does not end the call (``_dialog_gone``).
_NOT_SESSION: Final = frozenset({"NOTIFY", "SUBSCRIBE", "PRACK"})


# -- collaborators ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One place a call may go: the realm, the next hop and the Request-URI to ask for."""

    realm: str
    destination: Destination
    uri: str
    gateway: str | None = None
    #: Route header values the request starts with: a registered contact's Path
    #: (RFC 3327 5.3, the proxies between the SBC and the phone), in order.
    route: tuple[str, ...] = ()
    #: A registered contact's q-value (RFC 3261 10.2.1.2); None: it gave none, which
    #: ranks as 1.0. Contacts of a lower q ring after those of a higher one (16.6).
    q: float | None = None


@dataclass(frozen=True, slots=True)
class TrunkPlan:
    """A trunk's usable gateways for one call, in the order they are to be tried."""

    realm: str
    targets: tuple[Target, ...]
    max_attempts: int = 3
    #: Final statuses of one gateway that send the call to the next (the trunk's).
    failover_statuses: frozenset[int] = FAILOVER_STATUSES


class TargetSource(Protocol):
    """Where routes point: registered contacts, trunks' gateways (the app's view)."""

    def registered(self, uri: Uri, realm: str | None, now: float) -> list[Target]: ...

    def user_known(self, uri: Uri) -> bool: ...

    def registered_from(self, source: Destination, realm: str) -> list[str]: ...

    def trunk(self, name: str, uri: Uri, now: float) -> TrunkPlan | None: ...

    def call_result(
        self,
        trunk: str,
        gateway: str,
        status: int | None,
        now: float,
        retry_after: float | None = None,
        destination: Destination | None = None,
    ) -> None: ...

    def due_probes(self, now: float) -> list[tuple[str, Gateway, Destination]]: ...

    def probe_sent(
        self, trunk: str, gateway: str, now: float, destination: Destination | None = None
    ) -> None: ...

    def probe_result(
        self,
        trunk: str,
        gateway: str,
        status: int | None,
        now: float,
        destination: Destination | None = None,
    ) -> None: ...

    def next_probe(self) -> float | None: ...

    def trunk_realm(self, trunk: str) -> str | None: ...


class NoTargets:
    """No registrar and no trunks."""

    def registered(self, uri: Uri, realm: str | None, now: float) -> list[Target]:
        return []

    def user_known(self, uri: Uri) -> bool:
        return False

    def registered_from(self, source: Destination, realm: str) -> list[str]:
        return []

    def trunk(self, name: str, uri: Uri, now: float) -> TrunkPlan | None:
        return None

    def call_result(
        self,
        trunk: str,
        gateway: str,
        status: int | None,
        now: float,
        retry_after: float | None = None,
        destination: Destination | None = None,
    ) -> None:
        return None

    def due_probes(self, now: float) -> list[tuple[str, Gateway, Destination]]:
        return []

    def probe_sent(
        self, trunk: str, gateway: str, now: float, destination: Destination | None = None
    ) -> None:
        return None

    def probe_result(
        self,
        trunk: str,
        gateway: str,
        status: int | None,
        now: float,
        destination: Destination | None = None,
    ) -> None:
        return None

    def next_probe(self) -> float | None:
        return None

    def trunk_realm(self, trunk: str) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class RegisterOutcome:
    """The registrar's answer to a REGISTER; ``failed_user`` set on wrong credentials."""

    response: Response
    auth_failed: bool = False
    failed_user: str | None = None


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    """A request's digest check: ``response`` (401/407/403/400) to send instead, or None."""

    response: Response | None
    user: str | None = None
    auth_failed: bool = False


class RegistrarPort(Protocol):
    """The embedded registrar as the controller uses it."""

    def register(
        self, request: Request, flow: Flow, realm: str, listen: ListenAddress, now: float
    ) -> RegisterOutcome: ...

    def authenticate(
        self, request: Request, now: float, *, source: str | None = None
    ) -> AuthVerdict: ...

    def answers_challenge(self, request: Request, now: float) -> bool: ...


class RegisterForward(Protocol):
    """A REGISTER a relay wants sent upstream (``sbc.registrar.relay.Forward``)."""

    @property
    def request(self) -> Request: ...


class RegisterRelayPort(Protocol):
    """A realm's registration relay to an inside registrar (``sbc.registrar.relay``)."""

    @property
    def hop(self) -> Hop: ...

    def register(
        self, request: Request, flow: Flow, realm: str, listen: ListenAddress, now: float
    ) -> Response | RegisterForward: ...

    def upstream_response(
        self, forward: RegisterForward, phone_request: Request, response: Response, now: float
    ) -> Response: ...

    def upstream_failed(self, forward: RegisterForward, phone_request: Request) -> Response: ...


class ManipulationPort(Protocol):
    """Header manipulation of one realm (``sbc.b2bua.manipulation``)."""

    def inbound(self, message: Message, realm: str) -> None: ...

    def outbound(self, message: Message, realm: str) -> None: ...


@dataclass(frozen=True, slots=True)
class CallTimers:
    """Call timers, seconds; 0 turns one off."""

    max_duration: float = 14400.0
    no_answer_timeout: float = 180.0
    #: RFC 4028 session interval the B2BUA refreshes each leg within.
    session_expires: float = 1800.0
    min_se: float = 90.0
    #: RFC 3261 16.6 step 11: how long each B-leg INVITE waits for a final response,
    #: from when it is sent and again from each provisional but a 100 (16.7 step 2).
    #: More than 3 minutes, as RFC 3261 asks of a proxy; 0 turns it off.
    timer_c: float = 185.0
    #: Seconds a B-leg INVITE may go without ringing or progress (a provisional but
    #: 100) before it is let go of as Timer C would be; 0: no such limit. What
    #: catches a gateway that answers 100 and then nothing well before Timer C.
    progress_timeout: float = 0.0
    #: RFC 3261 16.6 sequential search: how long the contacts of one q-value of a
    #: registered user ring before they are CANCELled and those of the next lower q
    #: are tried; 0: until they have all answered.
    sequential_ring_timeout: float = 20.0


@dataclass(frozen=True, slots=True)
class RealmPolicy:
    """Per-realm behaviour of the controller beyond listeners and keep-lists."""

    registrar: bool = False
    authenticate: frozenset[str] = frozenset()
    refer_relay: bool = False
    options_relay: bool = False
    #: Requests above UDP_SIZE_LIMIT bytes to UDP peers go over TCP (RFC 3261 18.1.1).
    large_requests_over_tcp: bool = False
    #: Hosts written into the From, To and Request-URI of the requests the B2BUA
    #: starts into this realm (masking); None: its own address, the destination's.
    from_host: str | None = None
    to_host: str | None = None
    request_uri_host: str | None = None
    #: Which of the realm's legs speak SDES-SRTP (`sbc.b2bua.srtp`).
    srtp: SrtpPolicy = SrtpPolicy.OPTIONAL
    #: REGISTERs a second the realm takes (`sbc.b2bua.register_rate`); None: any.
    registers_per_second: float | None = None
    #: RTP encodings allowed in offers into and out of the realm (`sbc.b2bua.codecs`);
    #: empty: any.
    codecs: frozenset[str] = frozenset()
    #: Inside the trust domain (RFC 3325, `sbc.b2bua.identity`): its asserted
    #: identities are believed, and it is given the SBC's despite Privacy: id.
    trust_identity: bool = False
    #: Requests but REGISTER are taken only from where a phone of the realm
    #: registered from (403 otherwise); they assert that phone's user.
    registered_only: bool = False


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
    """Free a session; ``call`` is the ended call, whose CDR wants the final counters."""

    call_ref: str
    session_id: str
    call: Call | None = field(default=None, compare=False)


MediaCommand = AllocateMedia | UpdateMedia | DeleteMedia


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """Wrong digest credentials from ``source`` for ``user`` (the firewall's detector)."""

    source: str
    user: str | None


@dataclass(frozen=True, slots=True)
class Step:
    """Messages to send (the transaction layer's output), media commands, ended calls
    without a media session (with one, their ``DeleteMedia`` carries them) and digest
    failures, in order."""

    output: Output = NOTHING
    media: tuple[MediaCommand, ...] = ()
    ended: tuple[Call, ...] = ()
    auth_failures: tuple[AuthFailure, ...] = ()

    def __add__(self, other: Step) -> Step:
        # Most steps are empty or carry only messages: no new value for nothing.
        if not (other.output or other.media or other.ended or other.auth_failures):
            return self
        if not (self.output or self.media or self.ended or self.auth_failures):
            return other
        return Step(
            self.output + other.output,
            self.media + other.media,
            self.ended + other.ended,
            self.auth_failures + other.auth_failures,
        )


# -- runtime state beside the Call value -------------------------------------------------


@dataclass(eq=False, slots=True)
class _Relayed:
    """An in-dialog request re-originated on the other leg, awaiting its answer."""

    from_side: LegSide
    server: ServerTransaction
    request: Request
    #: A CANCEL ended it on the side it came from (487 sent there, CANCEL relayed).
    cancelled: bool = False
    #: Its CANCEL waits for the copy's first provisional (RFC 3261 9.1).
    cancel_pending: bool = False
    #: The session as it was before the offer it carries: restored if it fails.
    before: _Before | None = None


@dataclass(frozen=True, slots=True)
class _Before:
    """What a relayed offer changed, as it was (RFC 3261 14.1, RFC 3311 5.1: a failed
    offer leaves the session as if it had not been made): the offerer's media for the
    relay, the last SDP sent to the answerer (session refreshes re-send it), and the
    answerer leg's o= version."""

    offers: tuple[LegOffer, ...] | None
    sdp_sent: bytes | None
    sdp_version: int
    sdp_digest: str


@dataclass(eq=False, slots=True)
class _HeldAck:
    """The ACK for a 2xx that carried the offer, to an INVITE sent without one: it
    must carry the answer (RFC 3261 13.2.2.4), and the answer comes in the other
    side's ACK for the 2xx the B2BUA relayed to it."""

    #: The leg whose 2xx this ACKs, its dialog and the INVITE's CSeq number.
    side: LegSide
    dialog: Dialog
    seq: int
    tx: ClientInviteTransaction
    #: The server transaction whose 2xx's ACK brings the answer.
    server: ServerTransaction
    #: The offer, for an answer rejecting every stream when no answer comes.
    offer: SessionDescription


@dataclass(eq=False, slots=True)
class _Fork:
    """One B-leg INVITE of a call: a contact of a forked call, or one gateway attempt."""

    leg: CallLeg
    target: Target
    request: Request
    tx: ClientInviteTransaction
    dialogs: DialogSet
    final: int = 0
    cancel_pending: bool = False
    cancel_sent: bool = False
    #: RSeq of the last reliable provisional PRACKed, per early dialog (To tag):
    #: each fork of the request numbers its own (RFC 3262 3, errata 4600).
    rseqs: dict[str, int] | None = None
    #: The answer a reliable provisional carried (RFC 3262 5): the 2xx may come
    #: without it, and the caller, whose provisionals are unreliable, needs it there.
    early_answer: SessionDescription | None = None
    #: When its Timer C fires (RFC 3261 16.6 step 11); None: not running.
    timer_c: float | None = None
    #: A provisional other than 100 came: the far end works on the call (it rings),
    #: so Timer C firing says nothing of the gateway's health.
    progressed: bool = False
    #: Times its INVITE was sent again for the trunk's digest challenge.
    auth_tries: int = 0


@dataclass(eq=False, slots=True)
class _Live:
    """A call and what is not replicated with it: transactions and SDP in flight."""

    call: Call
    #: The A leg's dialog-creating request and its server transaction (an INVITE,
    #: or a SUBSCRIBE for a subscription: a "call" without media). Only the set-up
    #: reads them: they are let go once the call is settled (``_settle``).
    invite_tx: ServerTransaction | None
    invite: Request | None
    route: TrunkRoute | RegisteredRoute
    #: Target groups still to try: each group is forked in parallel, groups in series.
    pending: list[tuple[Target, ...]] = field(default_factory=list)
    forks: dict[ClientInviteTransaction, _Fork] = field(default_factory=dict)
    winner: _Fork | None = None
    best: Response | None = None
    #: The best final answer of the gateways failed over from (RFC 3261 16.7 step 6:
    #: the caller hears the best of all attempts, not the last one's).
    tried_best: Response | None = None
    attempts: int = 0
    redirects: int = 0
    session: MediaSession | None = None
    offers: dict[LegSide, tuple[LegOffer, ...]] = field(default_factory=dict)
    #: The A leg has its final response (answered, rejected or 487).
    a_final: bool = False
    ticket: AdmissionTicket | None = None
    #: The last SDP body sent on each leg (session refreshes re-send it).
    sdp_sent: dict[LegSide, bytes] = field(default_factory=dict)
    #: Methods each side allows (Allow of its INVITE / 2xx): UPDATE refreshes if there.
    allows: dict[LegSide, frozenset[str]] = field(default_factory=dict)
    #: When each leg's next session refresh is due (monotonic).
    refresh_at: dict[LegSide, float] = field(default_factory=dict)
    #: An in-dialog INVITE of the B2BUA's is pending on that leg (RFC 3261 14.1 glare);
    #: a frozenset replaced on change (most calls never have one; a set is 200 bytes).
    reinvite_pending: frozenset[LegSide] = frozenset()
    #: A subscription (RFC 6665): its B-leg SUBSCRIBE, and NOTIFYs that overtook its 2xx.
    subscribe: Request | None = None
    early_notifies: list[tuple[ServerTransaction, Request]] = field(default_factory=list)
    #: The ACK for the A leg's 2xx arrived (RFC 3261 13.3.1.4).
    a_acked: bool = False
    #: An ACK waiting for the answer in the other side's ACK (late offer).
    held_ack: _HeldAck | None = None
    #: The Replaces of the B-leg INVITE (RFC 3891), as the far side knows the dialog.
    replaces: str | None = None
    #: Who the caller is, as the SBC asserts it to the targets (`sbc.b2bua.identity`).
    identity: Identity | None = None
    #: The call admitted over the concurrent-call limits to replace this one (RFC
    #: 3891): while it lives, another INVITE replacing this call is counted in full.
    replaced_by: str | None = None
    #: In-dialog requests relayed and not answered yet (None: none so far).
    relayed: list[ClientTransaction] | None = None
    #: Final statuses of one target that send the call to the next (a trunk's own).
    failover: frozenset[int] = FAILOVER_STATUSES
    #: Session intervals (RFC 4028) shorter than the configured one: what the caller
    #: asked for, what the callee's 2xx said (None: the configured one on both).
    intervals: dict[LegSide, float] | None = None
    #: The caller supports session timers and asked to refresh (refresher=uac): its
    #: 2xx says so (RFC 4028 9), and the B2BUA refreshes it only if it does not.
    a_refreshes: bool = False
    #: Sides that accepted a relayed REFER and have not sent its terminating NOTIFY:
    #: the REFER's subscription outlives the call's BYE (``_Referral``).
    notifiers: frozenset[LegSide] = frozenset()
    #: Their REFERs' subscriptions, per notifier side: the CSeq of each REFER as
    #: relayed to it (the Event id of its NOTIFYs, RFC 3515 2.4.6) -> the CSeq the
    #: referrer gave it, which the NOTIFYs relayed back name instead.
    refer_ids: dict[LegSide, dict[int, int]] | None = None
    #: Both realms pass SRTP through: a=crypto crosses, the relay does not terminate it.
    srtp_passthrough: bool = False
    #: Late offer: the sides whose realm leaves RTP or SRTP to the first offer, which
    #: has not come yet (`sbc.b2bua.srtp.blank_srtp`).
    srtp_open: frozenset[LegSide] = frozenset()
    #: The callee is offered SRTP only because the caller's offer was SRTP: a 488
    #: makes the B2BUA offer it RTP instead, once.
    srtp_fallback: bool = False
    #: The streams each side last sent as opportunistic SRTP (RFC 8643): what the
    #: B2BUA sends it keeps RTP/AVP there.
    srtp_opportunistic: dict[LegSide, frozenset[int]] = field(default_factory=dict)
    #: When the call's Timer C deadline entry is due: the earliest of its forks' Timer
    #: C when it was scheduled (a provisional only moves a fork's later, so the entry
    #: is re-armed when it fires rather than pushed again for every provisional).
    timer_c_due: float | None = None
    #: When the target group ringing now has rung for ``sequential_ring_timeout`` and
    #: the contacts of the next lower q are tried; None: no such limit on it.
    group_due: float | None = None
    #: The caller requires 100rel (RFC 3262): its provisionals go reliably.
    a_reliable: _ReliableA | None = None
    #: The B2BUA's own re-INVITEs (session refreshes, re-offers) not known to be over.
    own_invites: list[ClientInviteTransaction] | None = None
    is_subscription: bool = field(init=False)

    def __post_init__(self) -> None:
        assert self.invite is not None
        self.is_subscription = self.invite.method == "SUBSCRIBE"

    @property
    def a_invite(self) -> ServerTransaction:
        """The A leg's server transaction; set-up steps only (see ``invite_tx``)."""
        assert self.invite_tx is not None, "the A leg's transaction was let go"
        return self.invite_tx

    @property
    def a_request(self) -> Request:
        """The A leg's dialog-creating request; set-up steps only (see ``invite``)."""
        assert self.invite is not None, "the A leg's request was let go"
        return self.invite


@dataclass(eq=False, slots=True)
class _Unacked:
    """A 2xx the B2BUA sent to an INVITE, retransmitted until its ACK (13.3.1.4)."""

    call_ref: str
    server: ServerTransaction
    response: Response
    interval: float
    next_at: float
    give_up_at: float


@dataclass(eq=False, slots=True)
class _ReliableA:
    """RFC 3262 3 towards a caller that requires 100rel: its provisionals are sent
    reliably, one at a time, each retransmitted until its PRACK."""

    #: The RSeq of the last reliable provisional sent (the first is random, 7.1).
    rseq: int
    #: The one sent and not PRACKed yet, its retransmission schedule.
    outstanding: Response | None = None
    interval: float = 0.0
    next_at: float = 0.0
    give_up_at: float = 0.0
    #: Provisionals made while one is outstanding, sent in turn (a few at most).
    queue: list[Response] = field(default_factory=list)
    #: A 2xx that waits for the PRACK of a provisional with SDP (RFC 3262 3).
    held: Response | None = None
    #: A provisional with SDP (the answer to the caller's offer) was PRACKed: the
    #: caller may now be sent an offer in the early dialog (RFC 3311 5.1).
    answered: bool = False


#: Provisionals queued behind an unPRACKed one, at most: the oldest without SDP
#: go first (a 180 superseded by later ringing says nothing new).
RELIABLE_QUEUE: Final = 4


@dataclass(eq=False, slots=True)
class _Routed:
    """An out-of-dialog MESSAGE/PUBLISH/OPTIONS relayed to a target, awaiting its answer."""

    server: ServerTransaction
    request: Request
    a_realm: str


@dataclass(eq=False, slots=True)
class _RegisterRelayed:
    """A phone's REGISTER relayed upstream, awaiting the upstream's answer."""

    relay: RegisterRelayPort
    forward: RegisterForward
    server: ServerTransaction
    request: Request
    realm: str


@dataclass(eq=False, slots=True)
class _Orphan:
    """A B-leg INVITE whose call let go of it before it had a final response (its
    Timer B fired, or the call ended while it rang). A 2xx that still comes for it
    is ACKed, and its dialog ended with a BYE, rather than left to the callee's
    own 64*T1 timeout (RFC 3261 13.2.2.4, 13.3.1.4)."""

    call_ref: str
    leg: CallLeg
    dialogs: DialogSet
    expires: float
    #: Remote tags of the dialogs already hung up: a retransmitted 2xx gets the ACK again.
    byed: set[str] = field(default_factory=set)
    #: Its CANCEL waits for a provisional response (RFC 3261 9.1).
    cancel_pending: bool = False
    #: The fork it was, while its call still rings elsewhere (a group that rang out,
    #: a Timer C): a 2xx that crosses the CANCEL then answers the call (``_rejoin``).
    fork: _Fork | None = None


@dataclass(eq=False, slots=True)
class _Referral:
    """A REFER's implicit subscription still open when its call ended. The BYE ends
    the dialog's INVITE usage only (RFC 5057 5.5, RFC 6665 4.4.1): the transfer's
    NOTIFYs from the ``notifier`` leg are still relayed to the ``referrer`` leg, until a
    terminating one or ``expires``."""

    call_ref: str
    notifier: CallLeg
    referrer: CallLeg
    expires: float
    #: The open subscriptions' Event ids, as in ``_Live.refer_ids``.
    ids: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _ByRole:
    call_ref: str
    role: str
    relayed: _Relayed | None = None
    side: LegSide | None = None
    #: A probe: the trunk, gateway key and address it tests.
    probe: tuple[str, str, Destination] | None = None
    #: A request to a trunk with credentials (a BYE, a REGISTER, one sent again for
    #: a challenge): the trunk, the hop it went by and how many times it was sent
    #: again for a challenge.
    challenged: tuple[str, Hop, int] | None = None


class _Timer:
    RING = "ring"
    MAX_DURATION = "max-duration"
    REFRESH_A = "refresh-a"
    REFRESH_B = "refresh-b"
    #: A refresh that must re-offer the session (a re-INVITE with the SDP last sent).
    REOFFER_A = "reoffer-a"
    REOFFER_B = "reoffer-b"
    SUBSCRIPTION = "subscription"
    #: RFC 3261 16.6 step 11: the Timer C of one of the call's B-leg INVITEs.
    TIMER_C = "timer-c"
    #: The ring time of a registered user's contacts of one q-value ran out.
    SEQUENTIAL_RING = "sequential-ring"
    #: A reliable provisional to the caller is due again, or given up (RFC 3262 3).
    RELIABLE = "reliable"


#: Codec lists already seen: every call keeps two, and few lists exist (bounded).
_CODEC_LISTS: dict[str, str] = {}


def codecs_of(sdp: SessionDescription | None) -> str:
    """``PCMU/8000,telephone-event/8000`` of the first audio (or any) m= section."""
    if sdp is None:
        return ""
    for media in sdp.media:
        if media.is_rejected:
            continue
        try:
            codecs = media.codecs()
        except SdpError:
            return ""
        text = ",".join(f"{c.encoding_name}/{c.clock_rate}" for c in codecs)
        if len(_CODEC_LISTS) < 1024:
            text = _CODEC_LISTS.setdefault(text, text)
        return text
    return ""


def _uri_text(uri: Uri) -> str:
    return str(uri)


#: Allow sets by the Allow fields they were read from: peers of one kind send the
#: same list, and every call keeps one per leg (bounded; cleared when full).
_ALLOW_SETS: dict[tuple[str, ...], frozenset[str]] = {}
_MAX_ALLOW_SETS: Final = 256


#: The option tags an in-dialog request may require: session timers, which the
#: B2BUA runs on each leg itself (RFC 4028).
IN_DIALOG_SUPPORTED: Final = frozenset({"timer"})


def _takes_early_offers(live: _Live) -> bool:
    """Whether the caller may be sent an offer before its INVITE's 2xx (RFC 3311
    5.1): its offer was answered in a reliable provisional it PRACKed, and it
    allows UPDATE."""
    reliable = live.a_reliable
    return (
        reliable is not None
        and reliable.answered
        and "UPDATE" in live.allows.get(LegSide.A, frozenset())
    )


def _unsupported_in_dialog(request: Request) -> list[str]:
    """The option tags an in-dialog request requires that the B2BUA does not
    support (malformed Require: ParseError, a 400)."""
    if not request.headers.fields("Require") or request.method in ("ACK", "CANCEL"):
        return []
    # A PRACK naming 100rel asks for nothing more than the PRACK it is.
    extra = ("100rel",) if request.method == "PRACK" else ()
    return [
        t
        for t in request.tokens("Require")
        if t.lower() not in IN_DIALOG_SUPPORTED and t.lower() not in extra
    ]


def _allowed(message: Message) -> frozenset[str]:
    """The methods a message's Allow lists, upper case (RFC 3261 20.5)."""
    fields = tuple(message.headers.fields("Allow"))
    allowed = _ALLOW_SETS.get(fields)
    if allowed is None:
        # Leniently: Allow only tells which methods may be sent, so a malformed
        # entry is left out rather than failing the request that carried it.
        allowed = frozenset(
            item.upper() for text in fields for item in split_list(text) if is_token(item)
        )
        if len(_ALLOW_SETS) >= _MAX_ALLOW_SETS:
            _ALLOW_SETS.clear()
        _ALLOW_SETS[fields] = allowed
    return allowed


class _RealmLookups:
    """Realm lookups of one RealmTable, remembered: matching a flow or a listener
    parses and compares IP addresses, and every message asks again.

    The table and its realms are immutable; the memo is bounded (remote hosts and
    the local ends of outbound connections are many), and cleared when full.
    """

    MAX_ENTRIES: Final = 4096

    __slots__ = ("_hops", "_listeners", "_realms_of", "table")

    def __init__(self, table: RealmTable) -> None:
        self.table = table
        self._realms_of: dict[tuple[Transport, str, int], Realm | None] = {}
        self._listeners: dict[tuple[str, Transport, str], ListenAddress | None] = {}
        self._hops: dict[tuple[str, Destination], Hop | None] = {}

    def of_flow(self, flow: Flow) -> Realm | None:
        key = (flow.transport, flow.local_host, flow.local_port)
        try:
            return self._realms_of[key]
        except KeyError:
            pass
        realm = self.table.of_flow(flow)
        if len(self._realms_of) >= self.MAX_ENTRIES:
            self._realms_of.clear()
        self._realms_of[key] = realm
        return realm

    def listener(self, realm: Realm, transport: Transport, host: str) -> ListenAddress | None:
        key = (realm.name, transport, host)
        try:
            return self._listeners[key]
        except KeyError:
            pass
        local = realm.listener(transport, host)
        if len(self._listeners) >= self.MAX_ENTRIES:
            self._listeners.clear()
        self._listeners[key] = local
        return local

    def hop(self, realm: Realm, destination: Destination) -> Hop | None:
        key = (realm.name, destination)
        try:
            return self._hops[key]
        except KeyError:
            pass
        hop = self.table.hop(realm, destination)
        if len(self._hops) >= self.MAX_ENTRIES:
            self._hops.clear()
        self._hops[key] = hop
        return hop


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
        targets: TargetSource | None = None,
        registrar: RegistrarPort | None = None,
        admission: AdmissionControl | None = None,
        manipulation: ManipulationPort | None = None,
        policies: dict[str, RealmPolicy] | None = None,
        timers: CallTimers | None = None,
        trunk_auth: TrunkAuth | None = None,
        trunk_registrations: TrunkRegistrations | None = None,
    ) -> None:
        self.transactions = transactions
        self.realms = realms
        self.router = router
        self.responder = responder
        self.user_agent = user_agent
        self.targets: TargetSource = targets or NoTargets()
        self.registrar = registrar
        self.admission = admission
        self.manipulation = manipulation
        self.policies: dict[str, RealmPolicy] = dict(policies or {})
        self.timers = timers or CallTimers()
        #: The trunks' credentials: the SBC answers their digest challenges.
        self.trunk_auth = trunk_auth or TrunkAuth()
        #: The SBC's own registrations at its trunks' carriers.
        self.trunk_registrations = trunk_registrations or TrunkRegistrations()
        #: Registration relays by the realm whose phones they serve.
        self.register_relays: dict[str, RegisterRelayPort] = {}
        #: REGISTERs per second by realm, where a realm limits them.
        self.register_rate = RegisterRate()
        self._storm_log = BurstLog(STORM_LOG_INTERVAL)
        self._calls: dict[str, _Live] = {}
        self._register_relayed: dict[ClientTransaction, _RegisterRelayed] = {}
        #: (Call-ID, the SBC's tag on that leg) -> call and side.
        self._by_dialog: dict[tuple[str, str], tuple[str, LegSide]] = {}
        #: Out-of-dialog INVITE server transactions by Call-ID, From tag and CSeq, to
        #: tell merged requests (RFC 3261 8.2.2.2).
        self._invites: dict[tuple[str, str, int], ServerTransaction] = {}
        self._by_client: dict[ClientTransaction, _ByRole] = {}
        self._by_server: dict[ServerTransaction, str] = {}
        self._by_session: dict[str, str] = {}
        self._routed: dict[ClientTransaction, _Routed] = {}
        #: (Call-ID, the SBC's To tag, CSeq number) of a 2xx not yet ACKed.
        self._unacked: dict[tuple[str, str, int], _Unacked] = {}
        #: The ACK sent for the 2xx of an in-dialog INVITE or of a late-offer INVITE,
        #: sent again for each retransmission of that 2xx (RFC 3261 13.2.2.4) until
        #: its transaction ends; None while it waits for the answer (``_HeldAck``).
        self._acks: dict[ClientInviteTransaction, Outgoing | None] = {}
        #: INVITEs of calls that ended while their transaction lives on (a 2xx may
        #: still come, or come again): what to build their ACK from, if one does.
        self._ack_later: dict[ClientInviteTransaction, tuple[CallLeg, Dialog, int]] = {}
        #: The B2BUA's own re-INVITEs of ended calls that had no provisional yet: the
        #: CANCEL their call owed them goes on the first (RFC 3261 9.1).
        self._cancel_on_1xx: set[ClientInviteTransaction] = set()
        self._busy_log = BurstLog(BUSY_LOG_INTERVAL)
        #: (Call-ID, the SBC's From tag) of B INVITEs let go of unanswered, oldest first.
        self._orphans: OrderedDict[tuple[str, str], _Orphan] = OrderedDict()
        #: Keyed by the notifier leg's Call-ID and the B2BUA's tag on it.
        self._referrals: OrderedDict[tuple[str, str], _Referral] = OrderedDict()
        #: Requests sent over TCP for their size: the UDP hop they fall back to.
        self._over_tcp: dict[ClientTransaction, Hop] = {}
        #: (host, port) of peers whose TCP connection failed -> until when UDP only.
        self._no_tcp: dict[tuple[str, int], float] = {}
        #: Their retransmission times: (when, sequence, key), entries whose time is no
        #: longer the entry's ``next_at`` skipped (the heap spares a scan of them all).
        self._unacked_due: list[tuple[float, int, tuple[str, str, int]]] = []
        #: Call timers: (when, sequence, call ref, kind), stale entries skipped.
        self._deadlines: list[tuple[float, int, str, str]] = []
        self._sequence = itertools.count()
        #: Counters for metrics: started, answered, failed ... by name.
        self.counters: dict[str, int] = {}
        self._lookups = _RealmLookups(realms)

    # -- views ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._calls)

    def calls(self) -> tuple[Call, ...]:
        """Every live call, as plain values."""
        return tuple(live.call for live in self._calls.values())

    def reconfigure(
        self,
        realms: RealmTable,
        router: Router,
        responder: LocalResponder,
        *,
        policies: dict[str, RealmPolicy] | None = None,
        timers: CallTimers | None = None,
    ) -> None:
        """New realms and routes for new calls; calls in progress keep their legs."""
        self.realms, self.router, self.responder = realms, router, responder
        if policies is not None:
            self.policies = dict(policies)
        if timers is not None:
            self.timers = timers

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    @property
    def _realm_lookups(self) -> _RealmLookups:
        lookups = self._lookups
        if lookups.table is not self.realms:
            # New realms (reconfigure, or assigned): nothing remembered applies.
            lookups = self._lookups = _RealmLookups(self.realms)
        return lookups

    def _realm_of_flow(self, flow: Flow) -> Realm | None:
        return self._realm_lookups.of_flow(flow)

    def _policy(self, realm: str) -> RealmPolicy:
        return self.policies.get(realm, RealmPolicy())

    # -- timers --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``handle_timers`` should next run (2xx retransmissions, call timers)."""
        deadlines = self._deadlines
        while deadlines and self._stale(deadlines[0]):
            heapq.heappop(deadlines)
        due = self._unacked_due
        while due and not self._unacked_live(due[0]):
            heapq.heappop(due)
        deadline = deadlines[0][0] if deadlines else None
        if due and (deadline is None or due[0][0] < deadline):
            deadline = due[0][0]
        probe = self.targets.next_probe()
        if probe is not None and (deadline is None or probe < deadline):
            deadline = probe
        register = self.trunk_registrations.next_due()
        if register is not None and (deadline is None or register < deadline):
            deadline = register
        return deadline

    def _stale(self, entry: tuple[float, int, str, str]) -> bool:
        """A call timer entry of an ended call, or a Timer C one left behind (most
        calls are answered long before theirs: no wake-up for it)."""
        when, _, call_ref, kind = entry
        live = self._calls.get(call_ref)
        if live is None:
            return True
        if kind == _Timer.SEQUENTIAL_RING:
            # Answered, cancelled or ended: the next group's contacts ring no more.
            ringing = live.call.state in (CallState.CALLING, CallState.EARLY)
            return live.group_due != when or not ringing
        return kind == _Timer.TIMER_C and not self._timer_c_due(live, when)

    def _unacked_live(self, entry: tuple[float, int, tuple[str, str, int]]) -> bool:
        unacked = self._unacked.get(entry[2])
        return unacked is not None and unacked.next_at == entry[0]

    def _unacked_at(self, key: tuple[str, str, int], when: float) -> None:
        heapq.heappush(self._unacked_due, (when, next(self._sequence), key))

    def _schedule(self, when: float, call_ref: str, kind: str) -> None:
        heapq.heappush(self._deadlines, (when, next(self._sequence), call_ref, kind))

    def handle_timers(self, now: float) -> Step:
        """2xx retransmissions (13.3.1.4), ringing and duration limits, session refreshes."""
        step = self._retransmit_2xx(now) + self._probe(now)
        if len(self.trunk_registrations):
            step = step + self._register_trunks(now)
        while self._deadlines and self._deadlines[0][0] <= now:
            when, _, call_ref, kind = heapq.heappop(self._deadlines)
            live = self._calls.get(call_ref)
            if live is None:
                continue
            try:
                step = step + self._call_timer(live, kind, when, now)
            except (ParseError, DialogError, TransactionError, SdpError) as exc:
                # As in handle(): one call's timer must not lose the others' steps.
                logger.warning("x call %s: %s timer: %s", call_ref, kind, exc)
        return step

    def _call_timer(self, live: _Live, kind: str, when: float, now: float) -> Step:
        call = live.call
        if kind == _Timer.RING:
            ringing = (CallState.ALLOCATING, CallState.CALLING, CallState.EARLY)
            if call.state in ringing and not live.a_final:
                logger.info("x call %s: no answer in time", call.call_ref)
                step = self._answer_a(
                    live, make_response(live.a_request, 408, to_tag=live.call.a.local_tag), now
                )
                step = step + self._cancel_forks(live, now)
                return step + self._end(live, 408, EndReason.NO_ANSWER_TIMEOUT, None, now)
            return Step()
        if kind == _Timer.TIMER_C:
            return self._timer_c(live, now) if self._timer_c_due(live, when) else Step()
        if kind == _Timer.SEQUENTIAL_RING:
            return self._group_rang_out(live, now) if live.group_due == when else Step()
        if kind == _Timer.RELIABLE:
            return self._reliable_due(live, when, now)
        if call.state is not CallState.CONFIRMED:
            return Step()
        if kind == _Timer.SUBSCRIPTION:
            if live.refresh_at.get(LegSide.A) != when:
                return Step()
            logger.info("- subscription %s expired", call.call_ref)
            return self._end(live, 200, EndReason.BYE, None, now)
        if kind == _Timer.MAX_DURATION:
            logger.info("- call %s: maximum duration reached", call.call_ref)
            return self._hang_up_both(live, EndReason.MAX_DURATION, now)
        side = LegSide.A if kind in (_Timer.REFRESH_A, _Timer.REOFFER_A) else LegSide.B
        if live.refresh_at.get(side) != when:
            return Step()
        return self._refresh(live, side, now, offer=kind in (_Timer.REOFFER_A, _Timer.REOFFER_B))

    def _arm_timer_c(self, live: _Live, when: float) -> None:
        due = live.timer_c_due
        if due is None or when < due:
            live.timer_c_due = when
            self._schedule(when, live.call.call_ref, _Timer.TIMER_C)

    @staticmethod
    def _timer_c_due(live: _Live, when: float) -> bool:
        """Whether the Timer C entry for ``when`` is the call's live one. Once the
        call is answered or ending its forks left are CANCELled, and their
        transactions end on their own (RFC 3261 9.1: Timer B after the CANCEL)."""
        return (
            live.timer_c_due == when
            and live.winner is None
            and not live.a_final
            and live.call.state in (CallState.CALLING, CallState.EARLY)
        )

    def _timer_c(self, live: _Live, now: float) -> Step:
        """The call's Timer C entry is due: each fork whose Timer C ran out is let go
        of (``_timer_c_expired``); the entry is re-armed for the others."""
        live.timer_c_due = None
        step = Step()
        # A failover replaces live.forks; the forks of the group it left are final.
        for fork in list(live.forks.values()):
            if fork.timer_c is None or fork.timer_c > now:
                continue
            fork.timer_c = None
            if fork.final or fork.cancel_sent or fork.cancel_pending:
                continue
            step = step + self._timer_c_expired(live, fork, now)
            if live.call.state is CallState.TERMINATED:
                return step
        later = [f.timer_c for f in live.forks.values() if f.timer_c is not None]
        if later:
            self._arm_timer_c(live, min(later))
        return step

    def _timer_c_expired(self, live: _Live, fork: _Fork, now: float) -> Step:
        """RFC 3261 16.8: Timer C fired for a B INVITE. With a provisional it is
        CANCELled; without one it is taken as answered 408, and a provisional that
        still comes gets the CANCEL then (9.1). Either way the attempt counts as a 408:
        the next target is tried (as for the 408 of Timer B), or the caller hears the
        best answer. The INVITE is let go of like an orphan of Timer B; a 2xx that
        crosses the CANCEL answers the call if it still rings (``_rejoin``), else it
        is ACKed and hung up."""
        call_ref = live.call.call_ref
        progress = self.timers.progress_timeout
        logger.info(
            "x call %s: %s from %s in time (%s)",
            call_ref,
            "no final response" if fork.progressed else "no ringing or progress",
            fork.target.destination,
            "progress timeout"
            if progress and not fork.progressed and not 0 < self.timers.timer_c <= progress
            else "Timer C",
        )
        step = Step()
        if fork.tx.can_cancel:
            step = self._cancel_fork(live, fork, now)
        else:
            fork.cancel_pending = True
        del live.forks[fork.tx]
        self._adopt(call_ref, fork, now)
        self._count("timer_c_expired")
        timeout = make_response(fork.request, 408)
        # A gateway that rang proved alive: only one stuck after its 100, or silent,
        # counts as a timeout for the trunk's passive health.
        return step + self._fork_failed(live, fork, timeout, now, report=not fork.progressed)

    def _retransmit_2xx(self, now: float) -> Step:
        """RFC 3261 13.3.1.4: retransmit each unACKed 2xx, T1 doubling up to T2; after
        64*T1 without ACK the dialog is confirmed and at once ended with a BYE."""
        step = Step()
        config = self.transactions.config
        due = self._unacked_due
        while due and due[0][0] <= now:
            entry = heapq.heappop(due)
            if not self._unacked_live(entry):
                continue
            key = entry[2]
            unacked = self._unacked[key]
            live = self._calls.get(unacked.call_ref)
            if live is None:
                del self._unacked[key]
                continue
            reliable = live.a_reliable
            if reliable is not None and reliable.held is unacked.response:
                # Not sent yet: it waits for a PRACK (``_answer_a_reliably``).
                unacked.next_at = now + unacked.interval
                self._unacked_at(key, unacked.next_at)
                continue
            if unacked.server.terminated and now < unacked.give_up_at:
                # Timer L ended the transaction first (RFC 6026 8.7): wait for give-up.
                unacked.next_at = unacked.give_up_at
                self._unacked_at(key, unacked.next_at)
                continue
            if now >= unacked.give_up_at:
                del self._unacked[key]
                logger.info("x call %s: no ACK for the 2xx, hanging up", unacked.call_ref)
                step = step + self._hang_up_both(live, EndReason.ACK_TIMEOUT, now, status=408)
                continue
            unacked.interval = min(2 * unacked.interval, config.t2)
            unacked.next_at = now + unacked.interval
            self._unacked_at(key, unacked.next_at)
            step = step + Step(
                self.transactions.send_response(unacked.server, unacked.response, now)
            )
        return step

    def _probe(self, now: float) -> Step:
        """OPTIONS to each trunk gateway whose probe is due (RFC 3261 11)."""
        step = Step()
        for trunk, gateway, destination in self.targets.due_probes(now):
            trunk_realm = self._trunk_realm(trunk)
            local = (
                None
                if trunk_realm is None
                else trunk_realm.listener(destination.transport, destination.host)
            )
            if trunk_realm is None or local is None:
                # Unreachable from its realm (a TLS gateway where the realm listens on
                # UDP only, say): a failed probe, so it is not due again at once (the
                # timer would fire without end) and the gateway is marked down.
                logger.warning("x probe %s: no listener towards %s", gateway.key, destination)
                self.targets.probe_sent(trunk, gateway.key, now, destination)
                self.targets.probe_result(trunk, gateway.key, None, now, destination)
                continue
            request = probe_request(
                gateway,
                destination,
                local,
                user_agent=self.user_agent,
                call_id=random_hex(16),
                branch=new_branch(),
                tag=new_tag(),
                now=-1.0,
            )
            request.headers.remove("Content-Length")
            request.invalidate()
            hop = Hop(trunk_realm.name, local, destination)
            try:
                client, out = self._send_request(request, hop, now)
            except TransactionError as exc:
                # At the transaction limit: as a probe lost on the way (its timeout
                # counts), not due again at once.
                logger.warning("x probe %s: %s", gateway.key, exc)
                self.targets.probe_sent(trunk, gateway.key, now, destination)
                continue
            self.targets.probe_sent(trunk, gateway.key, now, destination)
            self._by_client[client] = _ByRole("", "probe", probe=(trunk, gateway.key, destination))
            step = step + Step(out)
        return step

    def _register_trunks(
        self, now: float, *, trunks: list[str] | None = None, expires: int | None = None
    ) -> Step:
        """A REGISTER to each trunk's carrier that is due (`sbc.b2bua.trunk_register`);
        ``trunks`` and ``expires`` 0: remove those bindings."""
        registrations = self.trunk_registrations
        step = Step()
        for trunk in registrations.due(now) if trunks is None else trunks:
            hop = self._registrar_hop(trunk, now)
            if hop is None:
                logger.warning("x trunk %s: no gateway to register with", trunk)
                registrations.no_gateway(trunk, now)
                continue
            request = registrations.request(
                trunk, hop.local, user_agent=self.user_agent, expires=expires
            )
            try:
                client, out = self._send_request(request, hop, now)
            except TransactionError as exc:
                logger.warning("x trunk %s: REGISTER not sent: %s", trunk, exc)
                registrations.result(trunk, None, now)
                continue
            self._by_client[client] = _ByRole("", "trunk-register", challenged=(trunk, hop, 0))
            step = step + Step(out)
        return step

    def _registrar_hop(self, trunk: str, now: float) -> Hop | None:
        """The hop to a trunk's first usable gateway, from the trunk's realm."""
        try:
            plan = self.targets.trunk(trunk, parse_uri("sip:registrar.invalid"), now)
        except ParseError:
            return None
        realm = None if plan is None else self.realms.get(plan.realm)
        if plan is None or realm is None or not plan.targets:
            return None
        destination = plan.targets[0].destination
        local = realm.listener(destination.transport, destination.host)
        return None if local is None else Hop(realm.name, local, destination)

    def _trunk_realm(self, trunk: str) -> Realm | None:
        name = self.targets.trunk_realm(trunk)
        return None if name is None else self.realms.get(name)

    def _expect_ack(
        self, call_ref: str, server: ServerTransaction, response: Response, now: float
    ) -> None:
        t1 = self.transactions.config.t1
        key = (response.call_id, response.to.tag or "", response.cseq.seq)
        self._unacked[key] = _Unacked(call_ref, server, response, t1, now + t1, now + 64 * t1)
        self._unacked_at(key, now + t1)

    # -- events from the world ----------------------------------------------------------

    def media_timeout(self, session_id: str, now: float) -> Step:
        """The relay saw no media for too long: the call ends on both legs."""
        call_ref = self._by_session.get(session_id)
        live = None if call_ref is None else self._calls.get(call_ref)
        if live is None:
            return Step()
        logger.info("x call %s: media timeout", live.call.call_ref)
        if live.call.state is CallState.CONFIRMED:
            return self._hang_up_both(live, EndReason.MEDIA_TIMEOUT, now)
        return Step()

    def _caller_unreachable(self, tx: ServerInviteTransaction, now: float) -> Step:
        """A response to a caller's INVITE could not be sent (RFC 3261 17.2.4): its
        connection is gone and a new one to it failed. Nothing more reaches the
        caller, so the call ends now instead of ringing on (or, for the 2xx, of
        waiting 32 s for an ACK): the callee is cancelled or hung up. The transaction
        stays (RFC 6026), and a final response still goes to it, so Timer H ends it.
        Every further failed send reports again: once the call has ended, nothing
        is done."""
        call_ref = self._by_server.get(tx)
        live = None if call_ref is None else self._calls.get(call_ref)
        if live is None or live.invite_tx is not tx:
            return Step()  # a re-INVITE's: the call's own timers deal with its end
        logger.info("x call %s: the caller cannot be reached", live.call.call_ref)
        if not live.a_final:
            to_tag = live.call.a.local_tag
            step = self._answer_a(live, make_response(live.a_request, 503, to_tag=to_tag), now)
            step = step + self._cancel_forks(live, now)
            return step + self._end(live, 503, EndReason.TRANSPORT_ERROR, None, now)
        if live.call.state is CallState.CONFIRMED and not live.a_acked:
            return self._hang_up_both(live, EndReason.TRANSPORT_ERROR, now)
        return Step()

    def media_lost(self, session_id: str, now: float) -> Step:
        """The call's media session is gone (its media worker died): whatever its
        state, the call ends, as at a shutdown. Its offer or answer named ports
        nothing relays any more."""
        call_ref = self._by_session.get(session_id)
        live = None if call_ref is None else self._calls.get(call_ref)
        if live is None:
            return Step()
        logger.info("x call %s: media lost", live.call.call_ref)
        return self._abort(live, EndReason.MEDIA_LOST, now)

    def _abort(self, live: _Live, reason: EndReason, now: float) -> Step:
        """End a call in any state on the SBC's account: BYE both legs once
        answered, else 503 to the caller and CANCEL to the callees."""
        if live.call.state is CallState.CONFIRMED:
            return self._hang_up_both(live, reason, now, status=503)
        step = Step()
        if not live.a_final:
            step = step + self._answer_a(
                live, make_response(live.a_request, 503, to_tag=live.call.a.local_tag), now
            )
        step = step + self._cancel_forks(live, now)
        return step + self._end(live, 503, reason, None, now)

    def shutdown(self, now: float) -> Step:
        """The SBC stops: every call ends (BYE both legs, or 503 and CANCEL while it rings)."""
        step = Step()
        for live in list(self._calls.values()):
            step = step + self._abort(live, EndReason.SHUTDOWN, now)
        # The carriers' bindings of the SBC go too: calls to it fail at once there.
        leaving = self.trunk_registrations.shutdown()
        return step + self._register_trunks(now, trunks=leaving, expires=0)

    # -- input ---------------------------------------------------------------------------

    def handle(self, out: Output, now: float) -> Step:
        """Consume the events of ``out``; its messages are passed through, in order."""
        step = Step(Output(out.messages))
        for event in out.events:
            try:
                step = step + self._event(event, now)
            except (ParseError, DialogError, TransactionError, SdpError) as exc:
                logger.warning("x %s: %s", type(event).__name__, exc)
                if isinstance(event, RequestReceived):
                    step = step + self._answer_unhandled(event, exc, now)
        return step

    def _answer_unhandled(self, event: RequestReceived, exc: Exception, now: float) -> Step:
        """A request whose handling failed half-way still gets a final answer: 400
        when it was malformed, else 500. Unanswered, its server
        transaction would wait for ever (an INVITE's Proceeding state has no timer),
        and a peer sending such requests would fill the transaction table."""
        tx = event.transaction
        if tx.state not in (TransactionState.TRYING, TransactionState.PROCEEDING):
            return Step()
        if event.request.method == "ACK":
            return Step()
        # The standard phrase: what failed may name the other realm's values.
        status = 400 if isinstance(exc, ParseError | SdpError) else 500
        call_ref = self._by_server.get(tx) if isinstance(tx, ServerInviteTransaction) else None
        live = None if call_ref is None else self._calls.get(call_ref)
        if live is not None and live.invite_tx is tx and not live.a_final:
            # It failed after its call was made: the call ends with the answer, or
            # it would hold its relay session and admission until a timer.
            try:
                return self._fail_a(live, status, EndReason.REJECTED, now)
            except (ParseError, DialogError, TransactionError, SdpError) as again:
                logger.warning("x call %s: not ended: %s", call_ref, again)
        response = make_response(event.request, status, to_tag=new_tag())
        try:
            return self._send_response(tx, response, now)
        except (ParseError, TransactionError) as again:
            logger.warning("x %r: no answer possible: %s", event.request, again)
            return Step()

    def _event(self, event: object, now: float) -> Step:
        if isinstance(event, RequestReceived):
            self._inbound(event.request, event.transaction.destination)
            return self._request(event.transaction, event.request, now)
        if isinstance(event, CancelReceived):
            return self._cancel(event, now)
        if isinstance(event, InviteAccepted | ResponseReceived):
            destination = event.transaction.destination
            if isinstance(destination, Hop) and self.manipulation is not None:
                self.manipulation.inbound(event.response, destination.realm)
            return self._response(event.transaction, event.response, now)
        if isinstance(event, AckReceived):
            return self._ack(event.request, now)
        if isinstance(event, StrayResponse):
            return self._orphan_response(event.response, now)
        if isinstance(event, TransportError):
            if isinstance(event.transaction, ServerInviteTransaction):
                return self._caller_unreachable(event.transaction, now)
            retried = self._retry_over_udp(event.transaction, now)
            if retried is not None:
                return retried
        if isinstance(event, TransactionTimeout | TransportError):
            tx = event.transaction
            if isinstance(tx, ClientInviteTransaction):
                self._orphan_fork(tx, now)
            if isinstance(tx, ClientTransaction) and (
                tx in self._by_client or tx in self._routed or tx in self._register_relayed
            ):
                status = 408 if isinstance(event, TransactionTimeout) else 503
                return self._response(tx, make_response(tx.request, status), now)
            return Step()
        if isinstance(event, TransactionTerminated):
            tx = event.transaction
            if isinstance(tx, ClientTransaction):
                role = self._by_client.pop(tx, None)
                self._routed.pop(tx, None)
                self._register_relayed.pop(tx, None)
                self._over_tcp.pop(tx, None)
                if isinstance(tx, ClientInviteTransaction):
                    self._acks.pop(tx, None)
                    self._ack_later.pop(tx, None)
                    self._cancel_on_1xx.discard(tx)
                if role is not None and role.role == "invite":
                    live = self._calls.get(role.call_ref)
                    if live is not None:
                        self._settle(live)
            elif isinstance(tx, ServerTransaction):
                self._by_server.pop(tx, None)
                if isinstance(tx, ServerInviteTransaction):
                    request = tx.request
                    merged = (request.call_id, request.from_.tag or "", request.cseq.seq)
                    if self._invites.get(merged) is tx:
                        del self._invites[merged]
        return Step()

    def _inbound(self, message: Message, flow: object) -> None:
        if self.manipulation is None or not isinstance(flow, Flow):
            return
        realm = self._realm_of_flow(flow)
        if realm is not None:
            self.manipulation.inbound(message, realm.name)

    # -- requests ------------------------------------------------------------------------

    def _local(self, tx: ServerTransaction, request: Request, now: float) -> Step:
        response = self.responder.respond(request)
        if response is None:
            return Step()
        return self._send_response(tx, response, now)

    def _realm_of_tx(self, tx: ServerTransaction) -> str | None:
        flow = tx.destination
        if isinstance(flow, Flow):
            realm = self._realm_of_flow(flow)
            if realm is not None:
                return realm.name
        return None

    def _send_response(
        self, tx: ServerTransaction, response: Response, now: float, realm: str | None = None
    ) -> Step:
        response.headers.add("Server", self.user_agent)
        realm = realm or self._realm_of_tx(tx)
        if realm is not None and self.manipulation is not None:
            self.manipulation.outbound(response, realm)
        return Step(self.transactions.send_response(tx, response, now))

    def _request(self, tx: ServerTransaction, request: Request, now: float) -> Step:
        if request.to.tag is not None:
            found = self._by_dialog.get((request.call_id, request.to.tag))
            if found is None:
                referral = self._referrals.get((request.call_id, request.to.tag))
                if referral is not None and referral.expires > now:
                    return self._referral_notify(referral, tx, request, now)
                return self._local(tx, request, now)
            call_ref, side = found
            live = self._calls[call_ref]
            if (
                live.is_subscription
                and side is LegSide.B
                and live.call.b.dialog is None
                and request.method == "NOTIFY"
            ):
                # RFC 6665 4.1.2.4: a NOTIFY may overtake the 2xx to the SUBSCRIBE; it is
                # answered once the dialog exists (its transaction absorbs retransmissions).
                live.early_notifies.append((tx, request))
                return Step()
            return self._in_dialog(live, side, tx, request, now)
        if request.method == "INVITE" and isinstance(tx, ServerInviteTransaction):
            return self._new_call(tx, request, now)
        flow = tx.destination
        realm = self._realm_of_flow(flow) if isinstance(flow, Flow) else None
        if realm is None or not isinstance(flow, Flow):
            return self._local(tx, request, now)
        policy = self._policy(realm.name)
        if request.method == "REGISTER":
            relayed = realm.name in self.register_relays
            if relayed or (policy.registrar and self.registrar is not None):
                if policy.registers_per_second:
                    # The answer to a challenge of ours completes a registration the
                    # bucket let start: it goes on, charged (``RegisterRate.take``).
                    answer = (
                        not relayed
                        and self.registrar is not None
                        and self.registrar.answers_challenge(request, now)
                    )
                    wait = self.register_rate.take(
                        realm.name, policy.registers_per_second, now, answer=answer
                    )
                    if wait is not None:
                        return self._register_storm(tx, request, realm.name, wait, now)
                if relayed:
                    return self._relay_register(tx, request, flow, realm, now)
                return self._register(tx, request, flow, realm, now)
        if request.method == "SUBSCRIBE":
            return self._new_subscription(tx, request, flow, realm, now)
        if request.method in ROUTED_REQUESTS or (
            request.method == "OPTIONS" and policy.options_relay
        ):
            return self._route_request(tx, request, flow, realm, now)
        return self._local(tx, request, now)

    def _register_storm(
        self, tx: ServerTransaction, request: Request, realm: str, wait: int, now: float
    ) -> Step:
        """A REGISTER over the realm's rate: 503, back in ``wait`` seconds (RFC 3261
        21.5.4); logged once per burst."""
        quiet = self._storm_log.hit(now)
        if quiet is not None:
            logger.warning(
                "x realm %s: over %g REGISTERs a second, refusing with 503%s",
                realm,
                self._policy(realm).registers_per_second,
                f" ({quiet} more refused since the last report)" if quiet else "",
            )
        response = make_response(
            request, 503, to_tag=new_tag(), headers=[("Retry-After", str(wait))]
        )
        return self._send_response(tx, response, now, realm)

    def _register(
        self, tx: ServerTransaction, request: Request, flow: Flow, realm: Realm, now: float
    ) -> Step:
        assert self.registrar is not None
        rejection = check_request(request, self.responder.policy)
        if rejection is not None:
            return self._send_response(tx, rejection.response_to(request, new_tag()), now)
        listen = self._realm_lookups.listener(realm, flow.transport, flow.remote_host)
        assert listen is not None
        outcome = self.registrar.register(request, flow, realm.name, listen, now)
        step = self._send_response(tx, outcome.response, now, realm.name)
        if outcome.auth_failed:
            failure = AuthFailure(flow.remote_host, outcome.failed_user)
            step = step + Step(auth_failures=(failure,))
        return step

    def _relay_register(
        self, tx: ServerTransaction, request: Request, flow: Flow, realm: Realm, now: float
    ) -> Step:
        """A phone's REGISTER for the inside registrar: answered from the relay's cache,
        or sent upstream as the SBC's own REGISTER (``sbc.registrar.relay``)."""
        relay = self.register_relays[realm.name]
        rejection = check_request(request, self.responder.policy)
        if rejection is not None:
            return self._send_response(tx, rejection.response_to(request, new_tag()), now)
        listen = self._realm_lookups.listener(realm, flow.transport, flow.remote_host)
        assert listen is not None
        try:
            answer = relay.register(request, flow, realm.name, listen, now)
        except ParseError as exc:
            response = make_response(request, exc.status, to_tag=new_tag())
            return self._send_response(tx, response, now, realm.name)
        if isinstance(answer, Response):
            return self._send_response(tx, answer, now, realm.name)
        hop = relay.hop
        upstream = answer.request
        upstream.headers.add("User-Agent", self.user_agent)
        self._outbound(upstream, hop.realm)
        try:
            client, out = self._send_request(upstream, hop, now)
        except TransactionError as exc:
            logger.warning("x REGISTER relay to %s: %s", hop, exc)
            return self._send_response(tx, relay.upstream_failed(answer, request), now, realm.name)
        self._register_relayed[client] = _RegisterRelayed(relay, answer, tx, request, realm.name)
        logger.info("> REGISTER relayed to %s", hop)
        return Step(out)

    def _relayed_register_response(
        self, tx: ClientTransaction, response: Response, now: float
    ) -> Step:
        pending = self._register_relayed.get(tx)
        if pending is None or response.status < 200:
            return Step()
        del self._register_relayed[tx]
        synthesized = response.to.tag is None and response.status in (408, 503)
        if synthesized:
            answer = pending.relay.upstream_failed(pending.forward, pending.request)
        else:
            answer = pending.relay.upstream_response(
                pending.forward, pending.request, response, now
            )
        return self._send_response(pending.server, answer, now, pending.realm)

    def _authenticate(
        self,
        tx: ServerTransaction,
        request: Request,
        flow: Flow,
        realm: Realm,
        now: float,
        *,
        challenge: bool = True,
    ) -> Step | Identity | None:
        """The step that answers the request when it may not go on; else who it is from
        as the SBC asserts it (`sbc.b2bua.identity`), or None. ``challenge`` false (an
        emergency call): nothing is asked of the caller; it asserts what its trusted
        realm says, or the user of the phone registered from where it came."""
        policy = self._policy(realm.name)
        peer = asserted_by_peer(request) if policy.trust_identity else None
        source = Destination(flow.transport, flow.remote_host, flow.remote_port)
        if not challenge:
            if peer is not None or not policy.registrar:
                return peer
            # An emergency call from a registered phone: the emergency service gets
            # its user to call back, as registration knows it (no digest asked).
            user = _registered_caller(request, self.targets.registered_from(source, realm.name))
            return None if user is None else authenticated(request, user)
        if policy.registered_only:
            users = self.targets.registered_from(source, realm.name)
            user = _registered_caller(request, users)
            if user is None:
                logger.info("x %s from %s: not a registered phone's", request.method, flow)
                phrase = "Forbidden: not your identity" if users else "Forbidden: not registered"
                response = make_response(request, 403, phrase, to_tag=new_tag())
                return self._send_response(tx, response, now, realm.name)
            if peer is None and request.method not in policy.authenticate:
                return authenticated(request, user)
        if request.method not in policy.authenticate:
            return peer
        if self.registrar is None:
            response = make_response(request, 503, to_tag=new_tag())
            return self._send_response(tx, response, now, realm.name)
        verdict = self.registrar.authenticate(request, now, source=flow.remote_host)
        if verdict.response is None:
            if peer is not None or verdict.user is None:
                return peer
            return authenticated(request, verdict.user)
        step = self._send_response(tx, verdict.response, now, realm.name)
        if verdict.auth_failed:
            logger.info("x %s auth failed for %r from %s", request.method, verdict.user, flow)
            step = step + Step(auth_failures=(AuthFailure(flow.remote_host, verdict.user),))
        return step

    def _reject_attempt(
        self,
        tx: ServerTransaction,
        request: Request,
        realm: str,
        status: int,
        reason: EndReason,
        now: float,
        *,
        route: str = "",
        headers: Sequence[tuple[str, str]] = (),
        phrase: str | None = None,
    ) -> Step:
        """Refuse a new call (no route, rejected, admission ...), with a CDR for it."""
        response = make_response(request, status, phrase, to_tag=new_tag(), headers=headers)
        step = self._send_response(tx, response, now, realm)
        if request.method != "INVITE":
            return step
        self._count(f"rejected_{reason.value}")
        flow = tx.destination
        peer = (
            Destination(flow.transport, flow.remote_host, flow.remote_port)
            if isinstance(flow, Flow)
            else Destination(Transport.UDP, "0.0.0.0", 0)
        )
        local = (
            ListenAddress(flow.transport, flow.local_host, flow.local_port)
            if isinstance(flow, Flow)
            else ListenAddress(Transport.UDP, "0.0.0.0", 0)
        )
        leg = CallLeg(realm, request.call_id, "", local, peer)
        call = Call(
            call_ref=random_hex(8),
            state=CallState.TERMINATED,
            a=leg,
            b=evolve(leg, realm="", call_id=""),
            route=route,
            created=now,
            end_status=status,
            caller=self._caller(request),
            callee=request.raw_uri,
            ended_at=now,
            end_reason=reason,
        )
        return step + Step(ended=(call,))

    @staticmethod
    def _caller(request: Request) -> str:
        try:
            return _uri_text(request.from_.uri)
        except ParseError:
            return ""

    # -- new calls -----------------------------------------------------------------------

    def _targets(
        self, decision: TrunkRoute | RegisteredRoute, request: Request, now: float
    ) -> tuple[list[tuple[Target, ...]], str | None, int, frozenset[int]]:
        """Target groups of a decision (forked within, tried in series), the trunk name,
        the status when there are none, and the statuses that fail over."""
        if isinstance(decision, RegisteredRoute):
            contacts = self.targets.registered(request.uri, decision.realm, now)
            if not contacts:
                known = self.targets.user_known(request.uri)
                return [], None, 480 if known else 404, FAILOVER_STATUSES
            return _by_q(contacts), None, 0, SEQUENTIAL_STATUSES
        if decision.trunk is not None:
            plan = self.targets.trunk(decision.trunk, request.uri, now)
            if plan is None or not plan.targets:
                return [], decision.trunk, 503, FAILOVER_STATUSES
            attempts = min(plan.max_attempts, MAX_ATTEMPTS)
            groups: list[tuple[Target, ...]] = [(t,) for t in plan.targets[:attempts]]
            return groups, decision.trunk, 0, plan.failover_statuses
        assert decision.realm is not None and decision.destination is not None
        destination = decision.destination
        target = Target(decision.realm, destination, self._static_uri(request, destination))
        single: list[tuple[Target, ...]] = [(target,)]
        return single, None, 0, FAILOVER_STATUSES

    @staticmethod
    def _static_uri(request: Request, destination: Destination) -> str:
        urn = service_urn(request.uri)
        if urn is not None:
            return urn  # RFC 5031: the service URN stays the Request-URI
        user, _ = uri_user_host(request.uri)
        userinfo = f"{escape_user(user)}@" if user else ""
        params = (
            ""
            if destination.transport is Transport.UDP
            else f";transport={destination.transport.value}"
        )
        return f"sip:{userinfo}{format_host(destination.host)}:{destination.port}{params}"

    def _new_call(self, tx: ServerInviteTransaction, request: Request, now: float) -> Step:
        flow = tx.destination
        realm = self._realm_of_flow(flow) if isinstance(flow, Flow) else None
        if realm is None or not isinstance(flow, Flow):
            return self._local(tx, request, now)
        rejection = check_request(request, INVITE_POLICY)
        if rejection is not None:
            return self._send_response(tx, rejection.response_to(request, new_tag()), now)
        merged = (request.call_id, request.from_.tag or "", request.cseq.seq)
        if self._invites.setdefault(merged, tx) is not tx:
            # RFC 3261 8.2.2.2: the same request by another path (a proxy forked it
            # to the SBC twice): one call, not two calls to the same callee.
            return self._send_response(tx, make_response(request, 482, to_tag=new_tag()), now)
        decision = self.router.route(realm.name, request.uri, request, flow.remote_host)
        emergency = _is_emergency(decision)
        identity = self._authenticate(tx, request, flow, realm, now, challenge=not emergency)
        if isinstance(identity, Step):
            return identity
        too_brief = self._too_brief(request)
        if too_brief is not None:
            return self._send_response(tx, too_brief, now)
        replaces, replaced = None, None
        replaces_text = request.headers.get("Replaces")
        if replaces_text is not None:
            found = self._replaced(replaces_text, request.from_.tag)
            if found is None:
                # RFC 3891 3: no dialog of ours matches.
                response = make_response(request, 481, to_tag=new_tag())
                return self._send_response(tx, response, now)
            replaces, replaced = found
        if decision is None or isinstance(decision, RejectRoute):
            return self._refuse_route(tx, request, realm, decision, now)
        groups, trunk, status, failover = self._targets(decision, request, now)
        replaced_holder: _Live | None = None
        if replaced is not None and replaced.dialog is not None:
            # The dialog to replace is at the far peer of that call: there, whatever
            # the route says of the Request-URI.
            # Its trunk and gateway too, when that peer is the replaced call's trunk:
            # the new call holds the trunk's line when the old one lets it go.
            holder = self._holder(replaced)
            trunk, gateway = None, None
            if holder is not None and holder[1] is LegSide.B:
                trunk, gateway = holder[0].call.trunk, holder[0].call.gateway
            if holder is not None and holder[0].replaced_by not in self._calls:
                # Over the concurrent-call limits once per replaced call: its own
                # line is freed when it ends. A second replacing INVITE while the
                # first call lives is counted in full.
                replaced_holder = holder[0]
            target = Target(
                replaced.realm, replaced.peer, replaced.dialog.remote_target, gateway=gateway
            )
            groups = [(target,)]
        if not groups:
            logger.info("x %s from %s: no target (%d)", request.raw_uri, realm.name, status)
            return self._reject_attempt(
                tx, request, realm.name, status, EndReason.NO_ROUTE, now, route=decision.rule
            )
        target_realm = self.realms.get(groups[0][0].realm)
        if target_realm is None:
            return self._reject_attempt(
                tx, request, realm.name, 503, EndReason.NO_ROUTE, now, route=decision.rule
            )
        # One relay session per call: every target must be in the first one's realm.
        groups = [
            g for g in (tuple(t for t in g if t.realm == target_realm.name) for g in groups) if g
        ]
        # The first target the realm has a listener towards (a phone registered over
        # TCP where the realm has UDP only is passed over, ``_next_group``).
        hop, first = None, groups[0][0]
        for target in itertools.chain.from_iterable(groups):
            hop = self._realm_lookups.hop(target_realm, target.destination)
            if hop is not None:
                first = target
                break
        if hop is None:
            logger.error(
                "x route %s: realm %s has no %s listener",
                decision.rule,
                target_realm.name,
                first.destination.transport.value,
            )
            return self._reject_attempt(
                tx, request, realm.name, 503, EndReason.NO_ROUTE, now, route=decision.rule
            )
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
        if sdp is not None and not sdp.media:
            response = make_response(request, 488, "No Media Offered", to_tag=new_tag())
            return self._send_response(tx, response, now)
        a_srtp, b_srtp = self._policy(realm.name).srtp, self._policy(target_realm.name).srtp
        passthrough = a_srtp is b_srtp is SrtpPolicy.PASSTHROUGH
        srtp_open: frozenset[LegSide] = frozenset()
        if sdp is None:
            # Late offer: the callee's 2xx brings the offer, the caller's ACK the answer.
            a_offers = blank_offers(LATE_OFFER_STREAMS, realm)
            b_offers = blank_offers(LATE_OFFER_STREAMS, target_realm)
            if not passthrough:
                a_offers, b_offers = blank_srtp(a_offers, a_srtp), blank_srtp(b_offers, b_srtp)
                fixed = (SrtpPolicy.REQUIRED, SrtpPolicy.OFF)
                srtp_open = frozenset(
                    side
                    for side, policy in ((LegSide.A, a_srtp), (LegSide.B, b_srtp))
                    if policy not in fixed
                )
        else:
            a_offers = leg_offers(sdp, realm, self.realms.media_addresses)
            b_offers = blank_offers(len(sdp.media), target_realm)
            try:
                # The realms' codec policies: an offer they leave no stream of goes
                # nowhere (each fork's INVITE is restricted as it is sent).
                restrict_codecs(sdp, self._offer_codecs(realm.name, target_realm.name))
                if not passthrough:
                    a_offers, b_offers = first_offers(sdp, a_offers, a_srtp, b_offers, b_srtp)
            except SdpError as exc:
                logger.info("x %s from %s: offer refused: %s", request.raw_uri, realm.name, exc)
                return self._reject_attempt(
                    tx,
                    request,
                    realm.name,
                    exc.status,
                    EndReason.REJECTED,
                    now,
                    route=decision.rule,
                )
        ticket = None
        if self.admission is not None:
            verdict = self.admission.admit(
                (realm.name, target_realm.name),
                trunk,
                now,
                route=decision.rule,
                replacing=replaced_holder is not None,
                emergency=emergency,
            )
            if isinstance(verdict, Refused):
                if verdict.reason is RefusalReason.BUSY:
                    # A line a call would add to the load that causes them.
                    quiet = self._busy_log.hit(now)
                    if quiet is not None:
                        logger.warning(
                            "x sbc busy (media set-up backlog): new calls get 503%s",
                            f"; {quiet} more refused since the last report" if quiet else "",
                        )
                else:
                    logger.info(
                        "x %s from %s: not admitted (%s %s: %s)",
                        request.raw_uri,
                        realm.name,
                        verdict.scope,
                        verdict.name,
                        verdict.reason.name.lower(),
                    )
                return self._reject_attempt(
                    tx,
                    request,
                    realm.name,
                    verdict.status,
                    EndReason.ADMISSION,
                    now,
                    route=decision.rule,
                    headers=verdict.headers,
                )
            ticket = verdict.ticket
        a_local = self._realm_lookups.listener(realm, flow.transport, flow.remote_host)
        assert a_local is not None  # the request arrived on one
        call = Call(
            call_ref=random_hex(8),
            state=CallState.ALLOCATING,
            a=CallLeg(
                realm=realm.name,
                call_id=request.call_id,
                local_tag=new_tag(),
                local=a_local,
                peer=Destination(flow.transport, flow.remote_host, flow.remote_port),
                sdp_session=str(random_below(10**12)),
            ),
            b=CallLeg(
                realm=target_realm.name,
                call_id=random_hex(16),
                local_tag=new_tag(),
                local=hop.local,
                peer=first.destination,
                sdp_session=str(random_below(10**12)),
            ),
            route=decision.rule,
            created=now,
            caller=self._caller(request),
            callee=request.raw_uri,
            a_codecs=codecs_of(sdp),
            trunk=trunk,
        )
        live = _Live(call, tx, request, decision, pending=groups, ticket=ticket)
        if "100rel" in {t.lower() for t in request.tokens("Require")}:
            live.a_reliable = _ReliableA(rseq=secrets.randbelow(2**31 - 2**20) + 1)
        live.replaces = replaces
        live.identity = identity
        if replaced_holder is not None:
            replaced_holder.replaced_by = call.call_ref
        live.failover = failover
        if self.timers.session_expires:
            self._shorter_interval(live, LegSide.A, request)
            self._callers_floor(live, request)
            live.a_refreshes = _asks_to_refresh(request)
        live.allows[LegSide.A] = _allowed(request)
        live.srtp_passthrough, live.srtp_open = passthrough, srtp_open
        if sdp is not None:
            live.srtp_opportunistic[LegSide.A] = opportunistic_streams(sdp, a_offers)
        live.srtp_fallback = (
            sdp is not None
            and b_srtp is not SrtpPolicy.REQUIRED
            and any(offer.srtp is not None for offer in b_offers)
        )
        live.offers[LegSide.A], live.offers[LegSide.B] = a_offers, b_offers
        self._calls[call.call_ref] = live
        self._by_server[tx] = call.call_ref
        self._by_dialog[(call.a.call_id, call.a.local_tag)] = (call.call_ref, LegSide.A)
        self._count("calls_started")
        if self.timers.no_answer_timeout:
            self._schedule(now + self.timers.no_answer_timeout, call.call_ref, _Timer.RING)
        if logger.isEnabledFor(logging.INFO):
            # A call logs this line and the one of its end at INFO; the steps between
            # are DEBUG (five lines a call cost more than the call at high rates).
            logger.info(
                "- call %s: %s %s -> route %s -> %s",
                call.call_ref,
                realm.name,
                request.raw_uri,
                decision.rule,
                ", ".join(str(t.destination) for g in groups for t in g),
            )
        streams = stream_offers(live.offers[LegSide.A], live.offers[LegSide.B])
        return Step(media=(AllocateMedia(call.call_ref, call.a.call_id, streams),))

    def _refuse_route(
        self,
        tx: ServerInviteTransaction,
        request: Request,
        realm: Realm,
        decision: RouteDecision | None,
        now: float,
    ) -> Step:
        if decision is None:
            logger.info("x %s from %s: no route", request.raw_uri, realm.name)
            return self._reject_attempt(tx, request, realm.name, 404, EndReason.NO_ROUTE, now)
        assert isinstance(decision, RejectRoute)
        logger.info(
            "x %s from %s: rejected %d by route %s",
            request.raw_uri,
            realm.name,
            decision.status,
            decision.rule,
        )
        return self._reject_attempt(
            tx, request, realm.name, decision.status, EndReason.REJECTED, now, route=decision.rule
        )

    def media_allocated(self, call_ref: str, session: MediaSession | None, now: float) -> Step:
        """The relay answered an ``AllocateMedia`` (None: it failed); the call goes on."""
        live = self._calls.get(call_ref)
        if live is None or live.call.state is not CallState.ALLOCATING:
            if session is not None:
                return Step(media=(DeleteMedia(call_ref, session.session_id),))
            return Step()
        if session is None:
            return self._fail_a(live, 503, EndReason.TRANSPORT_ERROR, now)
        live.session = session
        self._by_session[session.session_id] = call_ref
        live.call = evolve(live.call, media_session=session.session_id, state=CallState.CALLING)
        step = self._next_group(live, now)
        if not live.forks:
            # No target could be tried (no listener towards it, transaction limit).
            return step + self._fail_a(live, 503, EndReason.TRANSPORT_ERROR, now)
        return step

    def _next_group(self, live: _Live, now: float) -> Step:
        """Fork the next target group (one gateway of a trunk, or a registered user's
        contacts of one q-value)."""
        step = Step()
        # A group none of whose targets could be sent to (no listener towards them,
        # the transaction table full) is passed over for the next.
        while not live.forks and live.pending and live.attempts < MAX_ATTEMPTS:
            group = live.pending.pop(0)
            for index, target in enumerate(group):
                step = step + self._fork(
                    live, target, first=(index == 0 and live.attempts == 0), now=now
                )
            live.attempts += 1
        ring = self.timers.sequential_ring_timeout
        if ring and live.forks and live.pending and isinstance(live.route, RegisteredRoute):
            # RFC 3261 16.6: contacts of a lower q wait their turn, for so long at most.
            live.group_due = now + ring
            self._schedule(live.group_due, live.call.call_ref, _Timer.SEQUENTIAL_RING)
        else:
            live.group_due = None
        return step

    def _group_rang_out(self, live: _Live, now: float) -> Step:
        """The contacts of one q-value rang for ``sequential_ring_timeout`` unanswered
        (a sequential search need not wait for their final answers as RFC 3261 16.6
        has it: a desk phone nobody picks up rings for minutes): they are CANCELled
        (9.1: a fork without a provisional gets its CANCEL on its first one) and let
        go of like forks whose Timer C fired (a 2xx that crosses the CANCEL answers
        the call, ``_rejoin``); the contacts of the next lower q are forked. No group
        follows the last: it rings on, until ``no_answer_timeout``."""
        live.group_due = None
        call = live.call
        ringing = call.state in (CallState.CALLING, CallState.EARLY)
        if not ringing or live.winner is not None or live.a_final or not live.pending:
            return Step()
        logger.info(
            "- call %s: no answer in %gs, trying %s",
            call.call_ref,
            self.timers.sequential_ring_timeout,
            _next_targets(live),
        )
        step = Step()
        for fork in list(live.forks.values()):
            if fork.final:
                continue
            if not fork.cancel_sent:
                step = step + self._cancel_fork(live, fork, now)
            del live.forks[fork.tx]
            self._by_dialog.pop((fork.leg.call_id, fork.leg.local_tag), None)
            self._adopt(call.call_ref, fork, now)
        # RFC 3261 16.7 step 6: a final answer some of them gave still counts, and
        # the ones that rang out count as unavailable (480, 21.4.18): a later group
        # that nobody could reach (408) does not make the call a transport failure.
        rang_out = make_response(live.a_request, 480)
        for best in (live.best, rang_out):
            if best is not None and (live.tried_best is None or _better(best, live.tried_best)):
                live.tried_best = best
        return step + self._retry(live, now)

    def _fork(self, live: _Live, target: Target, *, first: bool, now: float) -> Step:
        assert live.session is not None
        call = live.call
        realm = self.realms.get(target.realm)
        hop = None if realm is None else self._realm_lookups.hop(realm, target.destination)
        if hop is None:
            logger.warning("x call %s: no listener towards %s", call.call_ref, target.destination)
            return Step()
        if self._layer_full():
            logger.info("x call %s: transaction limit, %s not tried", call.call_ref, target.uri)
            return Step()
        template = call.b
        # A trunk is reached as RFC 3261 says, a registered phone through its flow.
        follow = isinstance(live.route, TrunkRoute)
        leg = (
            evolve(template, local=hop.local, peer=target.destination, follow_route=follow)
            if first
            else evolve(
                template,
                call_id=random_hex(16),
                local_tag=new_tag(),
                local=hop.local,
                peer=target.destination,
                dialog=None,
                follow_route=follow,
            )
        )
        sdp = parse_sdp(live.a_request)
        body = b""
        if sdp is not None:
            try:
                sdp = restrict_codecs(sdp, self._offer_codecs(call.a.realm, target.realm))
            except SdpError as exc:
                # (Another realm than the first target's, with a stricter policy.)
                logger.info("x call %s: %s not tried: %s", call.call_ref, target.uri, exc)
                return Step()
            body, leg = self._rewrite(live, sdp, LegSide.B, leg)
        invite = self._b_invite(live, leg, target, body)
        tx, out = self._send_request(invite, hop, now)
        assert isinstance(tx, ClientInviteTransaction)
        fork = _Fork(leg, target, invite, tx, DialogSet.for_request(invite))
        live.forks[tx] = fork
        limits = [t for t in (self.timers.timer_c, self.timers.progress_timeout) if t]
        if limits:
            # RFC 3261 16.6 step 11: Timer C starts with the INVITE (or the shorter
            # progress timeout, until the first provisional but 100).
            fork.timer_c = now + min(limits)
            self._arm_timer_c(live, fork.timer_c)
        if body:
            live.sdp_sent[LegSide.B] = body
        if first or live.winner is None:
            live.call = evolve(live.call, b=leg, gateway=target.gateway)
        self._by_client[tx] = _ByRole(call.call_ref, "invite")
        self._by_dialog[(leg.call_id, leg.local_tag)] = (call.call_ref, LegSide.B)
        logger.debug("> call %s: INVITE %s via %s", call.call_ref, target.uri, hop)
        return Step(out)

    def _b_invite(self, live: _Live, leg: CallLeg, target: Target, body: bytes) -> Request:
        """A B-leg INVITE: everything the B2BUA's own, kept headers copied."""
        a_request = live.a_request
        caller, _ = uri_user_host(a_request.from_.uri)
        headers = Headers()
        headers.add("Via", via_for(leg.local, new_branch()))
        headers.add("Max-Forwards", _one_less(a_request))
        for value in target.route:
            headers.add("Route", value)
        own, to, request_uri = self._addressing(
            leg.realm, leg.local, caller, target, anonymous=withholds_user(a_request)
        )
        display = a_request.from_.display_name
        if withholds_user(a_request) and not is_anonymous(a_request):
            display = ANONYMOUS_DISPLAY  # the SBC withholds it (Privacy: user)
        from_ = f"<{own}>;tag={leg.local_tag}"
        if display:
            from_ = f"{quote_string(display)} {from_}"
        headers.add("From", from_)
        headers.add("To", f"<{to}>")
        headers.add("Call-ID", leg.call_id)
        headers.add("CSeq", "1 INVITE")
        headers.add("Contact", contact_for(leg.local))
        headers.add("Allow", ALLOW)
        headers.add("Supported", SUPPORTED if body else SUPPORTED_NO_OFFER)
        if live.replaces is not None:
            headers.add("Replaces", live.replaces)
        if self.timers.session_expires:
            interval = self._interval(live, LegSide.B)
            headers.add("Session-Expires", f"{int(interval)};refresher=uac")
            # RFC 4028 7.4: after a 422, Min-SE is the interval it asked for.
            headers.add("Min-SE", str(int(self._min_se(live, LegSide.B))))
        headers.add("User-Agent", self.user_agent)
        invite = Request("INVITE", request_uri, headers)
        realm = self.realms.get(leg.realm)
        if realm is not None:
            copy_kept_headers(a_request, invite, realm)
        self._assert_identity(a_request, live.identity, invite, leg.realm, leg.local)
        invite.set_body(body, SDP_CONTENT_TYPE if body else None)
        if live.route.emergency:
            # RFC 6442: where the caller is goes with an emergency call (only).
            location = conveyed(a_request, format_host(leg.local.host))
            if location is not None:
                invite.set_body(*location.body(body, SDP_CONTENT_TYPE))
                invite.headers.remove("Geolocation")  # a keep-list's copy names cids
                invite.headers.remove("Geolocation-Routing")
                for name, value in location.headers():
                    invite.headers.add(name, value)
        self._outbound(invite, leg.realm)
        return invite

    def _addressing(
        self,
        realm: str,
        local: ListenAddress,
        caller: str | None,
        target: Target,
        *,
        anonymous: bool = False,
    ) -> tuple[str, str, str]:
        """The From URI, To URI and Request-URI of a request the B2BUA starts into
        ``realm`` towards ``target``: the SBC's own address (``local``) with the
        caller's user in From (``anonymous``: the anonymous URI, RFC 3323), the
        target in To and Request-URI; each host replaced by the realm's mask where it
        has one. The request still goes to the target."""
        policy = self._policy(realm)
        own = ANONYMOUS_URI if anonymous else self._own_uri(realm, local, caller)
        to, request_uri = self._to_uri(target), target.uri
        if policy.to_host:
            to = _with_host(to, policy.to_host)
        if policy.request_uri_host:
            request_uri = _with_host(request_uri, policy.request_uri_host)
        return own, to, request_uri

    def _own_uri(self, realm: str, local: ListenAddress, user: str | None) -> str:
        """``user`` at the SBC's own address in ``realm`` (or the realm's from_host)."""
        own = sip_uri_for(local, user, params=False)
        from_host = self._policy(realm).from_host
        return _with_host(own, from_host) if from_host else own

    def _assert_identity(
        self,
        message: Message,
        identity: Identity | None,
        out: Message,
        realm: str,
        local: ListenAddress,
    ) -> None:
        """P-Asserted-Identity (and Privacy) of ``out``, a new request (or a response
        to the caller) into ``realm`` for ``message`` (`sbc.b2bua.identity`)."""
        if identity is None:
            return
        fields = identity_headers(
            identity,
            privacy_of(message),
            trusted=self._policy(realm).trust_identity,
            sip_uri=lambda user: self._own_uri(realm, local, user),
            privacy_header=message.headers.get("Privacy"),
        )
        for name, value in fields:
            if name == "Privacy" and "Privacy" in out.headers:
                continue  # kept already (keep_headers)
            out.headers.add(name, value)
        if fields:
            out.invalidate()

    @staticmethod
    def _to_uri(target: Target) -> str:
        """The To of a B-leg INVITE: the target's URI without parameters."""
        try:
            uri = parse_uri(target.uri)
        except ParseError:
            return target.uri
        if isinstance(uri, SipUri):
            userinfo = f"{uri.user}@" if uri.user else ""
            port = f":{uri.port}" if uri.port else ""
            return f"{uri.scheme}:{userinfo}{format_host(uri.host)}{port}"
        return target.uri

    def _outbound(self, message: Message, realm: str) -> None:
        if self.manipulation is not None:
            self.manipulation.outbound(message, realm)

    def _hop(self, leg: CallLeg) -> Hop:
        peer = leg.peer
        if leg.follow_route and leg.dialog is not None:
            peer = self._dialog_destination(leg.dialog, peer)
        return Hop(leg.realm, leg.local, peer)

    def _dialog_destination(self, dialog: Dialog, peer: Destination) -> Destination:
        """Where a request in ``dialog`` goes (RFC 3261 12.2.1.1, 8.1.2: its first
        route, else its remote target) when that is an IP address of the kind of
        ``peer``'s, the INVITE's destination; else ``peer``.

        Kept at ``peer``: TLS (its name was verified there), a host name (no DNS for
        requests in a dialog), another transport or family, the SBC itself, and a
        private or loopback address named by a peer that is not one (a trunk behind
        NAT advertising its inside address)."""
        if peer.transport is Transport.TLS:
            return peer
        try:
            uri = dialog.next_hop
        except ParseError:
            return peer
        if not isinstance(uri, SipUri) or uri.scheme != "sip":
            return peer
        address, peer_address = ip_literal(uri.host), ip_literal(peer.host)
        if address is None or peer_address is None or address.version != peer_address.version:
            return peer
        if uri.transport is not None and uri.transport.lower() != peer.transport.value:
            return peer
        destination = Destination(peer.transport, str(address), uri.port or 5060)
        if destination == peer or self.realms.is_own(destination):
            return peer
        if _address_scope(address) != _address_scope(peer_address):
            return peer
        return destination

    def _first_target(
        self, tx: ServerTransaction, request: Request, flow: Flow, realm: Realm, now: float
    ) -> (
        Step | tuple[TrunkRoute | RegisteredRoute, Target, Realm, Hop, str | None, Identity | None]
    ):
        """Checks, digest, route and the first target of a request that is routed
        without forking (SUBSCRIBE, MESSAGE ...), and who it is from; a Step when it
        is answered here."""
        rejection = check_request(request, self.responder.policy)
        if rejection is not None:
            return self._send_response(tx, rejection.response_to(request, new_tag()), now)
        max_forwards = request.max_forwards
        if max_forwards is not None and max_forwards <= 1:
            if request.method == "OPTIONS" and max_forwards == 0:
                return self._local(tx, request, now)  # RFC 3261 11: asked of the SBC
            return self._send_response(tx, make_response(request, 483, to_tag=new_tag()), now)
        decision = self.router.route(realm.name, request.uri, request, flow.remote_host)
        challenge = not _is_emergency(decision)
        identity = self._authenticate(tx, request, flow, realm, now, challenge=challenge)
        if isinstance(identity, Step):
            return identity
        if decision is None or isinstance(decision, RejectRoute):
            status = 404 if decision is None else decision.status
            return self._send_response(tx, make_response(request, status, to_tag=new_tag()), now)
        groups, trunk, status, _ = self._targets(decision, request, now)
        if not groups:
            return self._send_response(tx, make_response(request, status, to_tag=new_tag()), now)
        target = groups[0][0]
        target_realm = self.realms.get(target.realm)
        hop = (
            None
            if target_realm is None
            else self._realm_lookups.hop(target_realm, target.destination)
        )
        if hop is not None and self._layer_full():
            response = make_response(request, 503, to_tag=new_tag(), headers=[OVERLOAD_RETRY])
            return self._send_response(tx, response, now)
        if hop is None or target_realm is None:
            return self._send_response(tx, make_response(request, 503, to_tag=new_tag()), now)
        return decision, target, target_realm, hop, trunk, identity

    # -- subscriptions (RFC 6665) ------------------------------------------------------------

    def _new_subscription(
        self, tx: ServerTransaction, request: Request, flow: Flow, realm: Realm, now: float
    ) -> Step:
        """SUBSCRIBE: a dialog on each leg, like a call without media; NOTIFYs and
        re-SUBSCRIBEs are then relayed in those dialogs by ``_relay``."""
        routed = self._first_target(tx, request, flow, realm, now)
        if isinstance(routed, Step):
            return routed
        decision, target, target_realm, hop, trunk, identity = routed
        a_local = self._realm_lookups.listener(realm, flow.transport, flow.remote_host)
        if a_local is None:
            return self._send_response(tx, make_response(request, 503, to_tag=new_tag()), now)
        call = Call(
            call_ref=random_hex(8),
            state=CallState.CALLING,
            a=CallLeg(
                realm=realm.name,
                call_id=request.call_id,
                local_tag=new_tag(),
                local=a_local,
                peer=Destination(flow.transport, flow.remote_host, flow.remote_port),
            ),
            b=CallLeg(
                realm=target_realm.name,
                call_id=random_hex(16),
                local_tag=new_tag(),
                local=hop.local,
                peer=target.destination,
            ),
            route=decision.rule,
            created=now,
            caller=self._caller(request),
            callee=request.raw_uri,
            trunk=trunk,
        )
        live = _Live(call, tx, request, decision)
        caller, _ = uri_user_host(request.from_.uri)
        headers = Headers()
        headers.add("Via", via_for(hop.local, new_branch()))
        headers.add("Max-Forwards", _one_less(request))
        for value in target.route:
            headers.add("Route", value)
        own, to, request_uri = self._addressing(
            target_realm.name, hop.local, caller, target, anonymous=withholds_user(request)
        )
        headers.add("From", f"<{own}>;tag={call.b.local_tag}")
        headers.add("To", f"<{to}>")
        headers.add("Call-ID", call.b.call_id)
        headers.add("CSeq", "1 SUBSCRIBE")
        headers.add("Contact", contact_for(hop.local))
        headers.add("User-Agent", self.user_agent)
        for name in EVENT_HEADERS:
            for value in request.headers.fields(name):
                headers.add(name, value)
        out = Request("SUBSCRIBE", request_uri, headers)
        copy_kept_headers(request, out, target_realm)
        self._assert_identity(request, identity, out, target_realm.name, hop.local)
        if request.body:
            out.set_body(request.body, request.headers.get("Content-Type"))
        self._outbound(out, target_realm.name)
        client, output = self._send_request(out, hop, now)
        live.subscribe = out
        self._calls[call.call_ref] = live
        self._by_server[tx] = call.call_ref
        self._by_dialog[(call.a.call_id, call.a.local_tag)] = (call.call_ref, LegSide.A)
        self._by_dialog[(call.b.call_id, call.b.local_tag)] = (call.call_ref, LegSide.B)
        self._by_client[client] = _ByRole(call.call_ref, "subscribe")
        logger.info(
            "- subscription %s: %s %s -> %s", call.call_ref, realm.name, request.raw_uri, hop
        )
        return Step(output)

    def _subscribe_response(self, live: _Live, response: Response, now: float) -> Step:
        status = response.status
        if status < 200:
            return Step()
        call = live.call
        if status >= 300:
            out = self._to_a(live, response)
            step = self._answer_a(live, out, now)
            return step + self._end(live, status, EndReason.REJECTED, LegSide.B, now)
        assert live.subscribe is not None
        try:
            b_dialog = Dialog.from_uac_response(live.subscribe, response)
        except (DialogError, ParseError) as exc:
            logger.warning("x subscription %s: no dialog on b: %s", call.call_ref, exc)
            step = self._answer_a(
                live, make_response(live.a_request, 500, to_tag=call.a.local_tag), now
            )
            return step + self._end(live, 500, EndReason.REJECTED, None, now)
        headers = [("Contact", contact_for(call.a.local))]
        headers.extend(("Expires", v) for v in response.headers.fields("Expires"))
        # The standard phrase: the peer's own is free text that may name its side.
        a_response = make_response(live.a_request, status, to_tag=call.a.local_tag, headers=headers)
        step = self._answer_a(live, a_response, now)
        try:
            a_dialog: Dialog | None = Dialog.from_uas_response(live.a_request, a_response)
        except (DialogError, ParseError):
            a_dialog = None
        live.call = evolve(
            call.with_leg(LegSide.A, call.a.with_dialog(a_dialog)).with_leg(
                LegSide.B, call.b.with_dialog(b_dialog)
            ),
            state=CallState.CONFIRMED,
            answered_at=now,
        )
        self._arm_subscription(live, response, now)
        for tx, notify in live.early_notifies:
            step = step + self._in_dialog(live, LegSide.B, tx, notify, now)
        live.early_notifies.clear()
        return step

    def _arm_subscription(self, live: _Live, response: Response, now: float) -> None:
        """Drop the subscription when its Expires runs out without a refresh."""
        expires = response.headers.get("Expires")
        seconds = int(expires.strip()) if expires and expires.strip().isdigit() else 3600
        when = now + seconds + SUBSCRIPTION_GRACE
        live.refresh_at[LegSide.A] = when
        self._schedule(when, live.call.call_ref, _Timer.SUBSCRIPTION)

    # -- out-of-dialog requests routed like calls -----------------------------------------

    def _route_request(
        self, tx: ServerTransaction, request: Request, flow: Flow, realm: Realm, now: float
    ) -> Step:
        """MESSAGE, PUBLISH (and OPTIONS when relayed): a new transaction to the first
        target, its final answer relayed back; nothing of either side crosses."""
        routed = self._first_target(tx, request, flow, realm, now)
        if isinstance(routed, Step):
            return routed
        _, target, target_realm, hop, _, identity = routed
        caller, _ = uri_user_host(request.from_.uri)
        headers = Headers()
        headers.add("Via", via_for(hop.local, new_branch()))
        headers.add("Max-Forwards", _one_less(request))
        for value in target.route:
            headers.add("Route", value)
        own, to, request_uri = self._addressing(
            target_realm.name, hop.local, caller, target, anonymous=withholds_user(request)
        )
        headers.add("From", f"<{own}>;tag={new_tag()}")
        headers.add("To", f"<{to}>")
        headers.add("Call-ID", random_hex(16))
        headers.add("CSeq", f"1 {request.method}")
        headers.add("User-Agent", self.user_agent)
        for name in ("Event", "Expires", "SIP-If-Match"):
            for value in request.headers.fields(name):
                headers.add(name, value)
        out = Request(request.method, request_uri, headers)
        copy_kept_headers(request, out, target_realm)
        self._assert_identity(request, identity, out, target_realm.name, hop.local)
        if request.body:
            content_type = request.headers.get("Content-Type")
            # A PUBLISH's entity is the presentity its Request-URI names (RFC 3903 4).
            host = _uri_host(to) if names_identities(content_type) else None
            out.set_body(*screen_event_body(content_type, request.body, host))
        self._outbound(out, target_realm.name)
        client, output = self._send_request(out, hop, now)
        self._routed[client] = _Routed(tx, request, realm.name)
        logger.info("> %s %s -> %s", request.method, request.raw_uri, hop)
        return Step(output)

    def _routed_response(self, tx: ClientTransaction, response: Response, now: float) -> Step:
        routed = self._routed.get(tx)
        if routed is None or response.status < 200:
            return Step()
        del self._routed[tx]
        headers: list[tuple[str, str]] = []
        for name in ("SIP-ETag", "Expires", "Min-Expires"):
            headers.extend((name, value) for value in response.headers.fields(name))
        realm = self.realms.get(routed.a_realm)
        headers.extend(_capabilities(routed.request.method, response, realm))
        out = make_response(routed.request, response.status, to_tag=new_tag(), headers=headers)
        if realm is not None:
            copy_kept_headers(response, out, realm)
        return self._send_response(routed.server, out, now, routed.a_realm)

    # -- in-dialog requests ---------------------------------------------------------------

    def _in_dialog(
        self, live: _Live, side: LegSide, tx: ServerTransaction, request: Request, now: float
    ) -> Step:
        leg = live.call.leg(side)
        dialog = leg.dialog
        if dialog is None:
            return self._local(tx, request, now)
        checked = dialog.receive_request(request)
        if not isinstance(checked, Dialog):
            return self._send_response(tx, checked.response_to(request), now, leg.realm)
        live.call = live.call.with_leg(side, leg.with_dialog(checked))
        unsupported = _unsupported_in_dialog(request)
        if unsupported:
            # RFC 3261 8.2.2.3: relayed, it would lose its Require, and the sender
            # would take the extension as granted (100rel: reliable provisionals to a
            # re-INVITE, which the B2BUA sends only for the first INVITE).
            extra = [("Unsupported", ", ".join(unsupported))]
            response = make_response(request, 420, headers=extra)
            return self._send_response(tx, response, now, leg.realm)
        if request.method == "PRACK" and side is LegSide.A:
            return self._prack_from_a(live, tx, request, now)
        if request.method == "BYE":
            logger.debug("- call %s: BYE from %s", live.call.call_ref, side.value)
            step = self._send_response(tx, make_response(request, 200), now, leg.realm)
            return step + self._hang_up(live, side.other, 200, EndReason.BYE, side, now)
        if request.method == "REFER" and not self._policy(leg.realm).refer_relay:
            response = make_response(request, 403, "Transfer Not Allowed")
            return self._send_response(tx, response, now, leg.realm)
        if request.method == "REFER" and len(request.addresses("Refer-To")) != 1:
            # RFC 3515 2.4.1: exactly one Refer-To.
            response = make_response(request, 400, "Exactly One Refer-To Required")
            return self._send_response(tx, response, now, leg.realm)
        if request.method == "INVITE" and live.reinvite_pending & {side, side.other}:
            if self._relaying_invite_from(live, side):
                # RFC 3261 14.2: its own INVITE still unanswered: 500, Retry-After 0-10 s.
                retry = str(secrets.randbelow(11))
                response = make_response(request, 500, headers=[("Retry-After", retry)])
                return self._send_response(tx, response, now, leg.realm)
            # RFC 3261 14.2: our own re-INVITE is pending on this dialog (glare), or
            # on the other leg, where this one would be relayed.
            return self._send_response(tx, make_response(request, 491), now, leg.realm)
        if (
            request.method == "UPDATE"
            and live.reinvite_pending & {side, side.other}
            and _carries_sdp(request)
        ):
            if self._relaying_invite_from(live, side):
                # RFC 3311 5.2: an offer while its INVITE's offer is not answered yet.
                retry = str(secrets.randbelow(11))
                response = make_response(request, 500, headers=[("Retry-After", retry)])
                return self._send_response(tx, response, now, leg.realm)
            # RFC 3311 5.2: an offer while ours (an INVITE's) awaits its answer, on this
            # leg or on the other one, where this one would be relayed: glare.
            return self._send_response(tx, make_response(request, 491), now, leg.realm)
        return self._relay(live, side, tx, request, now)

    def _relaying_invite_from(self, live: _Live, side: LegSide) -> bool:
        """Whether an INVITE from ``side`` is relayed and not answered yet."""
        for client in live.relayed or ():
            role = self._by_client.get(client)
            relayed = None if role is None else role.relayed
            if relayed is not None and (relayed.from_side, relayed.request.method) == (
                side,
                "INVITE",
            ):
                return True
        return False

    def _relay(
        self,
        live: _Live,
        side: LegSide,
        tx: ServerTransaction,
        request: Request,
        now: float,
        *,
        as_method: str | None = None,
    ) -> Step:
        """Re-originate an in-dialog request (re-INVITE, UPDATE, INFO ...) on the other leg
        (``as_method``: as a request of that method, answered as ``request``)."""
        method = as_method or request.method
        other = side.other
        leg = live.call.leg(other)
        early_ok = method in ("UPDATE", "INFO") and live.call.state is CallState.EARLY
        if leg.dialog is None or (live.call.state is not CallState.CONFIRMED and not early_ok):
            response = make_response(request, 491 if method == "INVITE" else 481)
            return self._send_response(tx, response, now)
        if method != "BYE" and self._layer_full():
            response = make_response(request, 503, headers=[OVERLOAD_RETRY])
            return self._send_response(tx, response, now, leg.realm)
        step = Step()
        body, content_type = request.body, request.headers.get("Content-Type")
        try:
            sdp = parse_sdp(request)
        except SdpError as exc:
            logger.info("x call %s: bad SDP in %s: %s", live.call.call_ref, method, exc)
            return self._send_response(tx, make_response(request, exc.status), now)
        if sdp is not None and method in ("INVITE", "UPDATE"):
            try:
                sdp = restrict_codecs(sdp, self._offer_codecs(live.call.leg(side).realm, leg.realm))
            except SdpError as exc:
                logger.info("x call %s: %s refused: %s", live.call.call_ref, method, exc)
                return self._send_response(tx, make_response(request, exc.status), now)
        if early_ok and sdp is not None and side is LegSide.B and not _takes_early_offers(live):
            # RFC 3311 5.1: the caller may get an early offer only once its own offer
            # was answered reliably (a 183 with SDP it PRACKed), and only if it allows
            # UPDATE. After the 2xx the UPDATE goes through: Retry-After.
            response = make_response(request, 500, headers=[("Retry-After", "1")])
            return self._send_response(tx, response, now, leg.realm)
        before = None
        if sdp is not None and live.session is not None:
            try:
                offers = self._leg_offers(live, side, sdp)
            except SdpError as exc:
                logger.info("x call %s: %s refused: %s", live.call.call_ref, method, exc)
                return self._send_response(tx, make_response(request, exc.status), now)
            before = _Before(
                live.offers.get(side), live.sdp_sent.get(other), leg.sdp_version, leg.sdp_digest
            )
            if offers is not None:
                live.offers[side] = offers
                step = step + self._update_media(live)
            body, new_leg = self._rewrite(live, sdp, other, leg)
            content_type = SDP_CONTENT_TYPE  # the SDP part of a multipart body crosses alone
            leg = new_leg
            live.sdp_sent[other] = body
        elif sdp is not None:
            # No relay session (a subscription's dialog): the SDP would cross as the
            # other side wrote it, its c= and o= naming that side. Not at all.
            logger.info("x call %s: SDP in %s dropped", live.call.call_ref, method)
            body, content_type = b"", None
        host = None
        if body and names_identities(content_type):
            # A NOTIFY's entity: the URI the subscriber subscribed to, its dialog's own.
            assert leg.dialog is not None
            host = _uri_host(leg.dialog.local_address)
        body, content_type = screen_event_body(content_type, body, host)
        extra: list[tuple[str, str]] = []
        realm_to = self.realms.get(leg.realm)
        probe = Request(method, "sip:probe", Headers())
        if realm_to is not None:
            copy_kept_headers(request, probe, realm_to)
        extra.extend(probe.headers)
        names = ("Event", "Subscription-State", "Expires", "Info-Package", "RAck", "RSeq")
        for name in names if as_method is None else names[:4]:
            extra.extend((name, value) for value in request.headers.fields(name))
        if method == "REFER":
            extra.extend(self._refer_headers(request, leg))
            extra.extend(_norefersub(request, realm_to))
        elif method == "NOTIFY" and _refer_event(request):
            body = _sipfrag_status(body)
            ids = (live.refer_ids or {}).get(side, {})
            extra = _refer_notify_headers(request, ids, extra)
            if _terminated(request):
                _subscription_ended(request, ids)
                if not ids:
                    live.notifiers = live.notifiers - {side}
        if method == "INVITE":
            extra.append(("Allow", ALLOW))
            extra.append(("Supported", SUPPORTED_IN_DIALOG))
        assert leg.dialog is not None
        dialog, out_request = leg.dialog.create_request(
            method,
            transport=leg.local.transport.value,
            host=format_host(leg.local.host),
            port=leg.local.port,
            contact=contact_for(leg.local),
            headers=extra,
            body=body,
            content_type=content_type if body else None,
        )
        live.call = live.call.with_leg(other, evolve(leg, dialog=dialog))
        if early_ok and other is LegSide.B:
            # The fork's dialog set hands this dialog back on the next provisional
            # and on the 2xx: it must know this request's CSeq too (12.2.1.1).
            for fork in live.forks.values():
                if fork.leg.call_id == dialog.call_id and fork.dialogs.get(dialog.remote_tag):
                    fork.dialogs = fork.dialogs.with_dialog(dialog)
                    fork.leg = fork.leg.with_dialog(dialog)
        self._fix_via(out_request)
        self._outbound(out_request, leg.realm)
        hop = self._hop(leg)
        client, out = self._send_request(out_request, hop, now)
        relayed = _Relayed(side, tx, request, before=before)
        self._by_client[client] = _ByRole(live.call.call_ref, "relay", relayed)
        if live.relayed is None:
            live.relayed = []
        live.relayed.append(client)
        if method == "INVITE":
            self._by_server[tx] = live.call.call_ref  # a CANCEL finds it (``_cancel``)
            # RFC 3261 14.1: no second INVITE (a refresh) on that leg until this one ends.
            live.reinvite_pending = live.reinvite_pending | {other}
        logger.debug(
            "- call %s: %s relayed %s -> %s",
            live.call.call_ref,
            method,
            side.value,
            other.value,
        )
        return step + Step(out)

    def _refer_headers(self, request: Request, leg: CallLeg) -> list[tuple[str, str]]:
        """Refer-To pointing at the SBC in the other realm: the transferee's INVITE comes
        back through the SBC and is routed like any call (the user part is kept)."""
        out: list[tuple[str, str]] = []
        for address in request.addresses("Refer-To"):
            user, _ = uri_user_host(address.uri)
            headers = address.uri.headers if isinstance(address.uri, SipUri) else ()
            values = [v for n, v in headers if n.lower() == "replaces"]
            found = self._replaced(urllib.parse.unquote(values[-1])) if values else None
            replaces = None if found is None else found[0]
            if replaces is None:
                out.append(("Refer-To", contact_for(leg.local, user)))
            else:
                # Attended transfer: the dialog to replace, as the far side knows it.
                escaped = urllib.parse.quote(replaces, safe=_HVALUE_SAFE)
                uri = sip_uri_for(leg.local, user)
                out.append(("Refer-To", f"<{uri}?Replaces={escaped}>"))
        return out

    def _replaced(self, value: str, sender_tag: str | None = None) -> tuple[str, CallLeg] | None:
        """A Replaces value (RFC 3891) naming one of the SBC's dialogs as its peer
        knows it (``call-id;to-tag=<the SBC's tag>;from-tag=<the peer's>``), rewritten
        as the far side of that call knows its own leg, and that leg; None if it
        names none. With ``sender_tag`` (the From tag of the INVITE carrying it),
        also a leg named as its far peer knows it, unchanged, and that leg."""
        call_id, _, rest = value.strip().partition(";")
        params: dict[str, str] = {}
        for item in rest.split(";"):
            name, _, text = item.strip().partition("=")
            params[name.strip().lower()] = text.strip()
        to_tag, from_tag = params.get("to-tag"), params.get("from-tag")
        if not call_id.strip() or not to_tag or not from_tag:
            return None
        call_id = call_id.strip()
        early = ";early-only" if "early-only" in params else ""
        found = self._by_dialog.get((call_id, to_tag))
        if found is None:
            if sender_tag is None or sender_tag == to_tag:
                # The sender's own tag as the to-tag (the recipient's, RFC 3891 3):
                # it names itself the recipient; no dialog of ours.
                return None
            # The dialog as its far peer knows it (to-tag the peer's, from-tag ours):
            # the value ``_refer_headers`` wrote into a relayed Refer-To, which
            # points the transferee back at the SBC. It goes on unchanged, to that
            # peer (RFC 3891 3: the to-tag is the recipient's local tag).
            mine = self._by_dialog.get((call_id, from_tag))
            live = None if mine is None else self._calls.get(mine[0])
            if mine is None or live is None or live.is_subscription:
                return None
            leg = live.call.leg(mine[1])
            if leg.dialog is None or leg.dialog.remote_tag != to_tag:
                return None
            return f"{call_id};to-tag={to_tag};from-tag={from_tag}{early}", leg
        live = self._calls.get(found[0])
        if live is None or live.is_subscription:
            return None
        side = found[1]
        dialog = live.call.leg(side).dialog
        if dialog is None or dialog.remote_tag != from_tag:
            return None
        other = live.call.leg(side.other)
        if other.dialog is None or not other.dialog.remote_tag:
            return None
        mapped = f"{other.call_id};to-tag={other.dialog.remote_tag};from-tag={other.local_tag}"
        return mapped + early, other

    def _holder(self, leg: CallLeg) -> tuple[_Live, LegSide] | None:
        """The live call a leg is part of, and which leg it is."""
        found = self._by_dialog.get((leg.call_id, leg.local_tag))
        live = None if found is None else self._calls.get(found[0])
        return None if live is None or found is None else (live, found[1])

    @staticmethod
    def _fix_via(request: Request) -> None:
        # RFC 3581: ask for rport on every request the SBC originates (its only Via,
        # kept where it stands: first, RFC 3261 7.3.1).
        via = request.headers.get("Via")
        assert via is not None
        request.headers.set("Via", f"{via};rport")
        request.invalidate()

    def _cancel(self, event: CancelReceived, now: float) -> Step:
        invite = event.invite
        call_ref = None if invite is None else self._by_server.get(invite)
        status = 481 if invite is None else 200
        live = None if call_ref is None else self._calls.get(call_ref)
        # RFC 3261 8.2.6.2: a To tag; 9.2: the one of the INVITE's answers (an
        # in-dialog CANCEL has it already, and make_response keeps it).
        to_tag = live.call.a.local_tag if live is not None else new_tag()
        response = make_response(event.request, status, to_tag=to_tag)
        step = self._send_response(event.transaction, response, now)
        if live is not None and invite is not live.invite_tx:
            return step + self._cancel_relayed(live, event, now)
        if live is not None and live.a_reliable is not None and live.a_reliable.held is not None:
            # Answered, but the 2xx still waits for a PRACK: the caller cancelled first.
            logger.info("- call %s: CANCEL from a before its 2xx left", live.call.call_ref)
            return step + self._hang_up(live, LegSide.B, 487, EndReason.CANCEL, LegSide.A, now)
        if live is None or live.a_final:
            return step
        logger.info("- call %s: CANCEL from a", live.call.call_ref)
        # RFC 3261 9.2: the INVITE gets 487 at once; the B leg is cancelled after it.
        step = step + self._answer_a(
            live, make_response(live.a_request, 487, to_tag=live.call.a.local_tag), now
        )
        live.pending.clear()
        if live.call.state is CallState.ALLOCATING:
            return step + self._end(live, 487, EndReason.CANCEL, LegSide.A, now)
        live.call = live.call.with_state(CallState.CANCELLING)
        step = step + self._cancel_forks(live, now)
        if all(f.final for f in live.forks.values()):
            step = step + self._end(live, 487, EndReason.CANCEL, LegSide.A, now)
        return step

    def _cancel_relayed(self, live: _Live, event: CancelReceived, now: float) -> Step:
        """RFC 3261 9.2: a CANCEL of a re-INVITE still relayed: 487 for it at once,
        and a CANCEL for its copy on the other leg. Should that copy be answered 2xx
        anyway, it is ACKed and not relayed (the canceller got its 487)."""
        for client in live.relayed or ():
            role = self._by_client.get(client)
            relayed = None if role is None else role.relayed
            if relayed is None or relayed.server is not event.invite or relayed.cancelled:
                continue
            relayed.cancelled = True
            realm = live.call.leg(relayed.from_side).realm
            response = make_response(relayed.request, 487)
            step = self._send_response(relayed.server, response, now, realm)
            if isinstance(client, ClientInviteTransaction):
                if client.can_cancel:
                    step = step + self._send_cancel(live.call.call_ref, client, now)
                else:
                    # RFC 3261 9.1: not before a provisional; sent on the first.
                    relayed.cancel_pending = True
            return step
        return Step()

    def _send_cancel(self, call_ref: str, client: ClientInviteTransaction, now: float) -> Step:
        """The CANCEL of B INVITE ``client`` (it has had a provisional). Once only:
        a second one (two paths of an ending call reaching the same INVITE) is a no-op
        rather than an error that would lose the rest of the step."""
        try:
            cancel, out = self.transactions.send_cancel(client, now)
        except TransactionError as exc:
            logger.debug("x call %s: no CANCEL: %s", call_ref, exc)
            return Step()
        self._by_client[cancel] = _ByRole(call_ref, "cancel")
        return Step(out)

    def _cancel_forks(self, live: _Live, now: float, *, keep: _Fork | None = None) -> Step:
        step = Step()
        for fork in live.forks.values():
            if fork is keep or fork.final or fork.cancel_sent:
                continue
            step = step + self._cancel_fork(live, fork, now)
        return step

    def _cancel_fork(self, live: _Live, fork: _Fork, now: float) -> Step:
        if not fork.tx.can_cancel:
            # RFC 3261 9.1: no CANCEL before a provisional response; sent on the first.
            fork.cancel_pending = True
            return Step()
        fork.cancel_pending = False
        fork.cancel_sent = True
        return self._send_cancel(live.call.call_ref, fork.tx, now)

    def _ack(self, request: Request, now: float) -> Step:
        # The ACK for a 2xx ends at the B2BUA: each leg's 2xx is ACKed by the B2BUA
        # itself (RFC 3261 13.2.2.4), so there is nothing to relay, except the answer
        # it may carry to an offer in that 2xx (late offer).
        try:
            key = (request.call_id, request.to.tag or "")
            seq = request.cseq.seq
        except ParseError:
            return Step()
        unacked = self._unacked.pop((*key, seq), None)
        if unacked is None:
            return Step()
        logger.debug("< ACK for call %s", unacked.call_ref)
        live = self._calls.get(unacked.call_ref)
        if live is None:
            return Step()
        reliable = live.a_reliable
        if reliable is not None and reliable.held is not None and unacked.server is live.invite_tx:
            # An ACK for a 2xx that has not left yet (it waits for a PRACK): not this
            # 2xx's ACK, which is still to come (the 2xx is retransmitted until then).
            self._unacked[(*key, seq)] = unacked
            return Step()
        step = Step()
        if live.held_ack is not None and unacked.server is live.held_ack.server:
            step = self._release_ack(live, request, now)
        if live.invite_tx is not None and unacked.server is live.invite_tx:
            live.a_acked = True
            self._settle(live)
        return step

    def _release_ack(self, live: _Live, ack: Request | None, now: float) -> Step:
        """Send the held ACK with the answer in ``ack`` (the other side's ACK), or, with
        no usable answer, one rejecting every stream of the offer and then end the
        call (RFC 3261 13.2.2.4: a valid answer in the ACK, then BYE)."""
        held = live.held_ack
        assert held is not None
        live.held_ack = None
        live.reinvite_pending = live.reinvite_pending - {held.side}
        answer_side = held.side.other
        try:
            sdp = None if ack is None else parse_sdp(ack)
        except SdpError as exc:
            logger.info("x call %s: bad SDP answer in the ACK: %s", live.call.call_ref, exc)
            sdp = None
        offers = None
        if sdp is not None and sdp.media:
            try:
                offers = self._leg_offers(live, answer_side, sdp)
            except SdpError as exc:
                logger.info("x call %s: answer in the ACK refused: %s", live.call.call_ref, exc)
        usable = sdp is not None and offers is not None
        step = Step()
        if sdp is not None and offers is not None:
            live.offers[answer_side] = offers
            step = self._update_media(live)
        else:
            sdp = evolve(held.offer, media=tuple(m.rejected() for m in held.offer.media))
        leg = live.call.leg(held.side)
        body = b""
        if live.session is not None:
            body, leg = self._rewrite(live, sdp, held.side, leg)
            live.call = live.call.with_leg(held.side, leg)
            live.sdp_sent[held.side] = body
        step = step + self._ack_leg(live, held.side, held.dialog, held.seq, held.tx, body)
        if ack is not None and not usable:
            logger.info("x call %s: no answer in the ACK, hanging up", live.call.call_ref)
            step = step + self._hang_up_both(live, EndReason.REJECTED, now, status=488)
        return step

    def _settle(self, live: _Live) -> None:
        """Let go of what only the call's set-up reads, once it is over: the call is
        confirmed, the ACK for A's 2xx arrived, and every B-leg INVITE transaction
        ended (until then a retransmitted 2xx needs its fork's dialog set for the
        ACK, RFC 3261 13.2.2.4). The A INVITE, its transaction, the forks (B INVITEs,
        their transactions and dialog sets) and the best failure stay out of memory
        for the rest of the call; in-dialog requests, refreshes and the CDR read
        only the Call, the media session, the offers and the SDP last sent."""
        if live.call.state is not CallState.CONFIRMED or not live.a_acked:
            return
        if any(not fork.tx.terminated for fork in live.forks.values()):
            # Until then, keep what is kept without the parsed views (re-parsed on use).
            if live.invite is not None:
                live.invite.compact()
            if live.invite_tx is not None and live.invite_tx.last_response is not None:
                live.invite_tx.last_response.compact()
            for fork in live.forks.values():
                fork.request.compact()
                if fork.tx.last_response is not None:
                    fork.tx.last_response.compact()
            return
        live.invite_tx = None
        live.invite = None
        live.forks = {}
        live.winner = None
        live.best = None
        live.pending = []

    # -- responses -----------------------------------------------------------------------

    def _response(self, tx: ClientTransaction, response: Response, now: float) -> Step:
        if tx in self._routed:
            return self._routed_response(tx, response, now)
        if tx in self._register_relayed:
            return self._relayed_register_response(tx, response, now)
        role = self._by_client.get(tx)
        if role is None:
            return self._ack_again(tx, response) or Step()
        challenged = role.challenged
        if (
            challenged is not None
            and role.role in ("bye", "trunk-register")
            and response.status in (401, 407)
        ):
            return self._challenged_again(tx, role, challenged, response, now)
        if role.role == "trunk-register":
            if response.status >= 200 and role.challenged is not None:
                self._by_client.pop(tx, None)
                self.trunk_registrations.result(role.challenged[0], response, now)
            return Step()
        if role.probe is not None:
            if response.status >= 200:
                self._by_client.pop(tx, None)
                synthesized = response.to.tag is None and response.status in (408, 503)
                status = None if synthesized else response.status
                trunk, key, destination = role.probe
                self.targets.probe_result(trunk, key, status, now, destination)
            return Step()
        live = self._calls.get(role.call_ref)
        if live is None:
            if role.role == "invite" and isinstance(tx, ClientInviteTransaction):
                return self._let_go_response(tx, role.call_ref, response, now)
            relayed = role.relayed
            if (
                relayed is not None
                and relayed.cancel_pending
                and isinstance(tx, ClientInviteTransaction)
                and tx.can_cancel
            ):
                # A re-INVITE of a call that ended before its first 1xx (``_end_pending``).
                relayed.cancel_pending = False
                return self._send_cancel(role.call_ref, tx, now)
            if (
                tx in self._cancel_on_1xx
                and isinstance(tx, ClientInviteTransaction)
                and tx.can_cancel
            ):
                self._cancel_on_1xx.discard(tx)
                return self._send_cancel(role.call_ref, tx, now)
            return self._ack_again(tx, response) or Step()
        if response.status in (401, 407) and role.role in ("relay", "refresh"):
            again = self._in_dialog_again(live, tx, role, response, now)
            if again is not None:
                return again
        if role.role == "invite" and isinstance(tx, ClientInviteTransaction):
            fork = live.forks.get(tx)
            if fork is None:
                fork = self._rejoin(live, tx, response)
            if fork is None:
                # Its call let go of it (Timer C, its group rang out) and tries other
                # targets meanwhile.
                return self._let_go_response(tx, role.call_ref, response, now)
            return self._invite_response(live, fork, response, now)
        if role.role == "subscribe":
            if response.status >= 200:
                self._by_client.pop(tx, None)
            return self._subscribe_response(live, response, now)
        if role.role == "relay" and role.relayed is not None:
            try:
                step = self._relayed_response(live, tx, role.relayed, response, now)
            except (ParseError, DialogError, SdpError) as exc:
                if response.status < 200:
                    raise
                step = self._relay_failed(live, role.relayed, exc, now)
            if (
                response.status >= 200
                and role.relayed.request.method == "PRACK"
                and live.a_reliable is not None
            ):
                # A PRACK's offer, relayed as an UPDATE, has its answer (whatever it
                # is): the 2xx or the provisionals the PRACK held go.
                step = step + self._after_prack(live, live.a_reliable, now)
            return step
        if role.role == "refresh" and role.side is not None:
            return self._refresh_response(live, tx, role.side, response, now)
        if response.status >= 200:
            self._by_client.pop(tx, None)
        return Step()

    def _in_dialog_again(
        self, live: _Live, tx: ClientTransaction, role: _ByRole, response: Response, now: float
    ) -> Step | None:
        """A trunk's challenge to an in-dialog request on the B leg (a relayed
        re-INVITE, UPDATE, INFO ... or the SBC's session refresh) answered with the
        trunk's credentials: the request again, with the dialog's next CSeq; None
        when it cannot be (the answer then goes on as any failure)."""
        side = role.relayed.from_side.other if role.relayed is not None else role.side
        trunk = self._leg_trunk(live, side)
        leg = None if side is None else live.call.leg(side)
        if side is None or trunk is None or leg is None or leg.dialog is None:
            return None
        if role.relayed is not None and role.relayed.cancelled:
            return None
        tries = 0 if role.challenged is None else role.challenged[2]
        again = self.trunk_auth.again(trunk, tx.request, response, tries)
        if again is None:
            return None
        try:
            dialog, fresh = leg.dialog.create_request(
                again.method,
                transport=leg.local.transport.value,
                host=format_host(leg.local.host),
                port=leg.local.port,
            )
        except DialogError:
            return None
        # The dialog's next CSeq (another request may have gone on it meanwhile).
        again.headers.set("CSeq", f"{fresh.cseq.seq} {again.method}")
        hop = self._hop(leg)
        try:
            client, out = self._send_request(again, hop, now)
        except TransactionError as exc:
            logger.warning("x call %s: %s not sent again: %s", live.call.call_ref, again.method,
                           exc)  # fmt: skip
            return None
        live.call = live.call.with_leg(side, leg.with_dialog(dialog))
        self._by_client.pop(tx, None)
        self._by_client[client] = evolve(role, challenged=(trunk, hop, tries + 1))
        if live.relayed is not None:
            live.relayed = [client if t is tx else t for t in live.relayed]
        if isinstance(client, ClientInviteTransaction) and role.role == "refresh":
            live.own_invites = [client if t is tx else t for t in live.own_invites or ()]
        logger.info("- call %s: %d to %s answered with trunk %s's credentials",
                    live.call.call_ref, response.status, again.method, trunk)  # fmt: skip
        return Step(out)

    def _leg_trunk(self, live: _Live, side: LegSide | None) -> str | None:
        """The trunk with an account on the far side of the ``side`` leg: the call's
        trunk for the B leg; for the A leg (a carrier's call coming in, tied to no
        trunk), the one trunk with an account whose realm the call came from."""
        if side is LegSide.B:
            return live.call.trunk
        if side is not LegSide.A or not len(self.trunk_auth.trunks()):
            return None
        realm = live.call.a.realm
        found = [t for t in self.trunk_auth.trunks() if self.targets.trunk_realm(t) == realm]
        return found[0] if len(found) == 1 else None

    def _challenged_again(
        self,
        tx: ClientTransaction,
        role: _ByRole,
        challenged: tuple[str, Hop, int],
        response: Response,
        now: float,
    ) -> Step:
        """A trunk's challenge to the SBC's BYE (the call may be over on the SBC's
        side already) or REGISTER answered with the trunk's credentials."""
        trunk, hop, tries = challenged
        again = self.trunk_auth.again(trunk, tx.request, response, tries)
        self._by_client.pop(tx, None)
        registering = role.role == "trunk-register"
        if again is None:
            if registering:
                self.trunk_registrations.result(trunk, response, now)
            else:
                logger.warning("x call %s: BYE refused by trunk %s (%d)", role.call_ref,
                               trunk, response.status)  # fmt: skip
            return Step()
        if registering:
            self.trunk_registrations.sent_again(trunk, again)
        try:
            client, out = self._send_request(again, hop, now)
        except TransactionError as exc:
            logger.warning("x trunk %s: %s not sent again: %s", trunk, again.method, exc)
            if registering:
                self.trunk_registrations.result(trunk, None, now)
            return Step()
        self._by_client[client] = evolve(role, challenged=(trunk, hop, tries + 1))
        return Step(out)

    def _ack_again(self, tx: ClientTransaction, response: Response) -> Step | None:
        """The ACK for a 2xx to an INVITE whose first 2xx was ACKed already, or whose
        call ended before (RFC 3261 13.2.2.4: every 2xx is ACKed); None: not ours."""
        if not isinstance(tx, ClientInviteTransaction) or not 200 <= response.status < 300:
            return None
        if tx in self._acks:
            sent = self._acks[tx]
            return Step() if sent is None else Step(Output((sent,)))
        later = self._ack_later.pop(tx, None)
        if later is None:
            return None
        return self._send_ack(*later, tx)

    def _invite_response(self, live: _Live, fork: _Fork, response: Response, now: float) -> Step:
        status = response.status
        call = live.call
        if status == 100:
            # RFC 3261 9.1: a CANCEL may go once any provisional came, a 100 too.
            return self._cancel_fork(live, fork, now) if fork.cancel_pending else Step()
        dialog_set, event = fork.dialogs.receive_response(response)
        fork.dialogs = dialog_set
        if isinstance(event, AnswerRetransmitted):
            again = self._ack_again(fork.tx, response)
            if again is not None:
                return again
        if isinstance(event, AnswerRetransmitted | ExtraForkAnswered):
            bye = isinstance(event, ExtraForkAnswered) or (
                live.winner is not None and live.winner is not fork
            )
            return self._ack_b(fork.leg, event.dialog, now, bye=bye, call_ref=call.call_ref)
        if status < 200:
            return self._provisional(live, fork, response, event, now)
        if status < 300:
            return self._answered(live, fork, response, event, now)
        if status in (401, 407):
            again = self._invite_again(live, fork, response, now)
            if again is not None:
                return again
        return self._fork_failed(live, fork, response, now)

    def _invite_again(
        self, live: _Live, fork: _Fork, response: Response, now: float
    ) -> Step | None:
        """A trunk's challenge to a B-leg INVITE answered with the trunk's credentials
        (`sbc.b2bua.trunk_auth`): the INVITE again as a new transaction of the same
        fork; None when it cannot be answered (or the call no longer wants it)."""
        if live.winner is not None or live.a_final or fork.cancel_pending or fork.cancel_sent:
            return None
        if live.call.state is CallState.CANCELLING:
            return None
        invite = self.trunk_auth.again(live.call.trunk, fork.request, response, fork.auth_tries)
        realm = self.realms.get(fork.target.realm)
        hop = None if realm is None else self._realm_lookups.hop(realm, fork.target.destination)
        if invite is None or hop is None:
            return None
        try:
            tx, out = self._send_request(invite, hop, now)
        except TransactionError as exc:
            logger.warning("x call %s: INVITE not sent again: %s", live.call.call_ref, exc)
            return None
        assert isinstance(tx, ClientInviteTransaction)
        del live.forks[fork.tx]
        self._by_client.pop(fork.tx, None)
        again = evolve(
            fork, request=invite, tx=tx, dialogs=DialogSet.for_request(invite),
            auth_tries=fork.auth_tries + 1,
        )  # fmt: skip
        live.forks[tx] = again
        self._by_client[tx] = _ByRole(live.call.call_ref, "invite")
        logger.info("- call %s: %d of trunk %s answered with its credentials",
                    live.call.call_ref, response.status, live.call.trunk)  # fmt: skip
        return Step(out)

    def _provisional(
        self, live: _Live, fork: _Fork, response: Response, event: object, now: float
    ) -> Step:
        call = live.call
        step = Step()
        # RFC 3261 16.7 step 2: every provisional but 100 (kept out by _invite_response:
        # it only says the next hop has the INVITE) restarts Timer C.
        fork.progressed = True
        if fork.timer_c is not None:
            fork.timer_c = now + self.timers.timer_c if self.timers.timer_c else None
        if fork.cancel_pending:
            step = step + self._cancel_fork(live, fork, now)
        if isinstance(event, EarlyDialog):
            fork.leg = fork.leg.with_dialog(event.dialog)
            rseq = _reliable_rseq(response)
            if rseq is not None and rseq <= (fork.rseqs or {}).get(response.to.tag or "", 0):
                # RFC 3262 4: "retransmissions of that response MUST be discarded".
                return step
            step = step + self._prack(live, fork, response, now)
        if call.state is CallState.CANCELLING or live.a_final or fork.cancel_pending:
            return step
        if isinstance(event, EarlyDialog):
            live.call = evolve(call, b=fork.leg, state=CallState.EARLY, gateway=fork.target.gateway)
        step = step + self._media_answer(live, response)
        return step + self._answer_a(live, self._to_a(live, response), now)

    def _prack(self, live: _Live, fork: _Fork, response: Response, now: float) -> Step:
        """RFC 3262 4: a reliable provisional is PRACKed on its early dialog."""
        rseq = _reliable_rseq(response)
        if rseq is None:
            return Step()
        if self._layer_full():
            return Step()  # the callee sends the provisional again (RFC 3262 3)
        tag = response.to.tag or ""
        last = 0 if fork.rseqs is None else fork.rseqs.get(tag, 0)
        if (last and rseq != last + 1) or fork.leg.dialog is None:
            # A retransmission (already PRACKed), or out of order: RFC 3262 4 says not
            # to PRACK that one (the callee sends it again after the one missing).
            return Step()
        if fork.rseqs is None:
            fork.rseqs = {}
        fork.rseqs[tag] = rseq
        try:
            answer = parse_sdp(response)
        except SdpError:
            answer = None  # _media_answer logs it
        if answer is not None:
            fork.early_answer = answer
        leg = fork.leg
        assert leg.dialog is not None
        dialog, prack = leg.dialog.create_request(
            "PRACK",
            transport=leg.local.transport.value,
            host=format_host(leg.local.host),
            port=leg.local.port,
            headers=[("RAck", f"{rseq} {response.cseq.seq} {response.cseq.method}")],
        )
        fork.leg = leg.with_dialog(dialog)
        # The dialog set hands this dialog back on the next provisional and on the
        # 2xx: it must know the PRACK's CSeq, or that number is used again (12.2.1.1).
        fork.dialogs = fork.dialogs.with_dialog(dialog)
        return self._send_on(
            live.call.call_ref, prack, self._hop(leg), "prack", now, realm=leg.realm
        )

    def _answered(
        self, live: _Live, fork: _Fork, response: Response, event: object, now: float
    ) -> Step:
        call = live.call
        if not isinstance(event, DialogAnswered):
            logger.warning("x call %s: 2xx that answers no dialog", call.call_ref)
            return Step()
        fork.final = response.status
        fork.leg = fork.leg.with_dialog(event.dialog)
        self._gateway_result(live, fork, response, now)
        if live.winner is not None:
            # Another fork answered first: this one is ACKed and hung up (13.2.2.4).
            return self._ack_b(fork.leg, event.dialog, now, bye=True, call_ref=call.call_ref)
        live.winner = fork
        live.call = evolve(call, b=fork.leg, gateway=fork.target.gateway)
        late = parse_sdp(live.a_request) is None
        try:
            b_sdp = parse_sdp(response)
            if b_sdp is None and not late:
                # RFC 3262 5: the answer came in a reliable provisional, and the 2xx
                # need not repeat it; the caller's 2xx must (RFC 3261 13.2.1).
                b_sdp = fork.early_answer
            if late and b_sdp is not None:
                # The callee's offer: the realms' codec policies apply to it.
                b_sdp = restrict_codecs(b_sdp, self._offer_codecs(fork.target.realm, call.a.realm))
            # An answer (or late offer) that does not fit the legs' SRTP is as bad.
            b_offers = None if b_sdp is None else self._leg_offers(live, LegSide.B, b_sdp)
        except SdpError as exc:
            # Nothing to answer the caller with: the 2xx is ACKed, and the call ends.
            logger.info("x call %s: bad SDP in the 2xx: %s", call.call_ref, exc)
            step = self._ack_b(fork.leg, event.dialog, now, bye=False, call_ref=call.call_ref)
            step = step + self._cancel_forks(live, now, keep=fork)
            step = step + self._bye(live, LegSide.B, now)
            status = 488 if isinstance(exc, CodecPolicyError) else 502
            return step + self._fail_a(live, status, EndReason.REJECTED, now)
        if late and b_sdp is not None and b_sdp.media:
            # Late offer: the ACK carries the answer, which the caller's ACK brings.
            self._acks[fork.tx] = None
            live.held_ack = _HeldAck(
                LegSide.B, event.dialog, response.cseq.seq, fork.tx, live.a_invite, b_sdp
            )
            step = Step()
        else:
            step = self._ack_b(fork.leg, event.dialog, now, bye=False, call_ref=call.call_ref)
        step = step + self._cancel_forks(live, now, keep=fork)
        for other in live.forks.values():
            if other is not fork:
                self._by_dialog.pop((other.leg.call_id, other.leg.local_tag), None)
        if call.state is CallState.CANCELLING or live.a_final:
            # RFC 3261 9.1: the 2xx crossed our CANCEL; the call is over.
            logger.info("- call %s: answered after CANCEL, hanging up b", call.call_ref)
            return step + self._hang_up(live, LegSide.B, 487, EndReason.CANCEL, LegSide.A, now)
        if late and live.held_ack is None:
            # RFC 3261 13.2.1: a 2xx to an INVITE without an offer must carry one.
            logger.info("x call %s: the 2xx to an INVITE without offer has none", call.call_ref)
            step = step + self._bye(live, LegSide.B, now)
            return step + self._fail_a(live, 502, EndReason.REJECTED, now)
        live.allows[LegSide.B] = _allowed(response)
        if self.timers.session_expires:
            self._shorter_interval(live, LegSide.B, response)
        b_codecs = codecs_of(b_sdp)
        if b_codecs and b_codecs != live.call.b_codecs:
            live.call = evolve(live.call, b_codecs=b_codecs)
        step = step + self._media_answer(live, response, b_offers, b_sdp)
        a_response = self._to_a(live, response, b_sdp)
        step = step + self._answer_a(live, a_response, now)
        self._expect_ack(call.call_ref, live.a_invite, a_response, now)
        early_a = live.call.a.dialog
        try:
            # An early dialog on A is confirmed, keeping the CSeq numbers of the
            # requests already sent and received in it (RFC 3261 12.2.1.1, 12.2.2).
            a_dialog: Dialog | None = (
                early_a.response_sent(live.a_request, a_response)
                if early_a is not None and early_a.state is DialogState.EARLY
                else Dialog.from_uas_response(live.a_request, a_response)
            )
        except (DialogError, ParseError) as exc:
            # No Contact from the caller: the call goes on, but only A can end it.
            logger.warning("x call %s: no dialog on a: %s", call.call_ref, exc)
            a_dialog = None
        live.call = evolve(
            live.call,
            a=evolve(live.call.a, dialog=a_dialog),
            state=CallState.CONFIRMED,
            answered_at=now,
        )
        self._count("calls_answered")
        if self.timers.max_duration:
            self._schedule(now + self.timers.max_duration, call.call_ref, _Timer.MAX_DURATION)
        self._arm_refresh(live, LegSide.A, now)
        self._arm_refresh(live, LegSide.B, now)
        logger.debug("- call %s: answered", call.call_ref)
        return step

    def _fork_failed(
        self, live: _Live, fork: _Fork, response: Response, now: float, *, report: bool = True
    ) -> Step:
        """A non-2xx final of one fork (ACKed hop by hop by the transaction layer), or
        the 408 its Timer C stands for; ``report``: tell the trunk's passive health."""
        status = response.status
        fork.final = status
        if report:
            self._gateway_result(live, fork, response, now)
        self._by_dialog.pop((fork.leg.call_id, fork.leg.local_tag), None)
        if live.winner is not None:
            return Step()
        if live.best is None or _better(response, live.best):
            live.best = response
        step = Step()
        if status >= 600 and not (status in SRTP_REFUSALS and live.srtp_fallback):
            # RFC 3261 16.7 step 5: the callee declines everywhere. The forks still
            # ringing are CANCELled and no more are tried; the caller hears the
            # best answer (the 6xx, step 6) once they have all answered.
            live.pending.clear()
            step = self._cancel_forks(live, now)
        if any(not f.final for f in live.forks.values()):
            return step
        call = live.call
        logger.info("- call %s: b answered %d", call.call_ref, status)
        if call.state is CallState.CANCELLING or live.a_final:
            return self._end(live, 487, EndReason.CANCEL, LegSide.A, now)
        best = live.best
        assert best is not None
        if 300 <= best.status < 400 and live.route.follow_redirects:
            redirected = self._redirect_targets(live, best)
            if redirected:
                live.pending.insert(0, redirected)
                live.redirects += 1
                return self._retry(live, now)
        if best.status == 422 and self.timers.session_expires:
            # RFC 4028 7.4: the callee wants a longer session interval: the B2BUA, which
            # chose it, asks again with the 422's Min-SE (once it grows, so no loop).
            wanted = _delta_of(best.headers.get("Min-SE")) or 0
            if self._interval(live, LegSide.B) < wanted <= MAX_SESSION_INTERVAL:
                live.intervals = {**(live.intervals or {}), LegSide.B: float(wanted)}
                live.pending.insert(0, tuple(f.target for f in live.forks.values()))
                return self._retry(live, now)
        if best.status in SRTP_REFUSALS and live.srtp_fallback:
            # The callee's realm leaves SRTP open and the callee refused it: the
            # caller keeps its SRTP with the relay, the callee is offered RTP.
            live.srtp_fallback = False
            live.offers[LegSide.B] = tuple(
                evolve(offer, srtp=None) for offer in live.offers[LegSide.B]
            )
            live.pending.insert(0, tuple(f.target for f in live.forks.values()))
            logger.info("- call %s: 488 to an SRTP offer, offering RTP", call.call_ref)
            return self._update_media(live) + self._retry(live, now)
        if live.pending and (best.status in live.failover or best.status == 0):
            logger.info("- call %s: %d, trying %s", call.call_ref, best.status, _next_targets(live))
            if live.tried_best is None or _better(best, live.tried_best):
                live.tried_best = best
            return self._retry(live, now)
        if live.tried_best is not None and _better(live.tried_best, best):
            best = live.tried_best
        return self._answer_best(live, best, now)

    def _answer_best(self, live: _Live, best: Response, now: float) -> Step:
        """The caller gets the best final answer of the call's targets; the call ends."""
        reason = EndReason.REJECTED
        if best.status in (408, 503) and best.to.tag is None:
            # Synthesized for a timeout or a transport failure: nobody answered.
            reason = EndReason.TRANSPORT_ERROR
        if best.status == 503 and best.to.tag is not None:
            # RFC 3261 16.7 step 6: a callee's or gateway's 503 is not passed on, 500
            # instead. Its Retry-After would tell the caller (a carrier, say) that the
            # SBC itself is out of service (21.5.4, RFC 3263 4.3), for every call.
            a_response = make_response(live.a_request, 500, to_tag=live.call.a.local_tag)
            step = self._answer_a(live, a_response, now)
            return step + self._end(live, 500, reason, LegSide.B, now)
        if best.status in (401, 407):
            # A challenge the SBC could not answer (no credentials for that target,
            # or refused ones): the caller cannot either (its realm is not the
            # callee's, and the challenge does not cross), so the call is refused.
            logger.warning("x call %s: %d of the callee's side not answered (trunks[].auth)",
                           live.call.call_ref, best.status)  # fmt: skip
            a_response = make_response(live.a_request, 403, to_tag=live.call.a.local_tag)
            step = self._answer_a(live, a_response, now)
            return step + self._end(live, 403, reason, LegSide.B, now)
        step = self._answer_a(live, self._to_a(live, best), now)
        return step + self._end(live, best.status, reason, LegSide.B, now)

    def _gateway_result(self, live: _Live, fork: _Fork, response: Response, now: float) -> None:
        trunk, gateway = live.call.trunk, fork.target.gateway
        if trunk is None or gateway is None:
            return
        synthesized = response.to.tag is None and response.status in (408, 503)
        status = None if synthesized else response.status
        # RFC 3261 21.5.4, RFC 3263 4.3: a 503's Retry-After keeps that gateway out.
        retry_after = _retry_after(response) if status == 503 else None
        self.targets.call_result(
            trunk,
            gateway,
            status,
            now,
            retry_after=retry_after,
            destination=fork.target.destination,
        )

    def _retry(self, live: _Live, now: float) -> Step:
        live.forks.clear()
        live.best = None
        live.call = live.call.with_state(CallState.CALLING)
        step = self._next_group(live, now)
        if not live.forks:
            # Nothing more could be tried: an answer the targets tried before gave
            # (a 486, the 480 of a group that rang out) says more than a 503.
            if live.tried_best is not None:
                return step + self._answer_best(live, live.tried_best, now)
            return step + self._fail_a(live, 503, EndReason.TRANSPORT_ERROR, now)
        return step

    def _redirect_targets(self, live: _Live, response: Response) -> tuple[Target, ...]:
        """RFC 3261 8.1.3.4: a 3xx's Contacts, each reachable by IP from the B realm."""
        if live.redirects >= MAX_REDIRECTS:
            return ()
        realm, call_ref = live.call.b.realm, live.call.call_ref
        out: list[Target] = []
        try:
            contacts = response.contacts
        except ParseError:
            return ()
        for address in contacts[:MAX_FORKS]:
            uri = address.uri
            if not isinstance(uri, SipUri):
                continue
            name = (uri.transport or "udp").lower()
            transport = Transport(name) if name in ("udp", "tcp", "tls") else Transport.UDP
            port = uri.port or (5061 if transport is Transport.TLS else 5060)
            try:
                destination = Destination(transport, format_host(uri.host).strip("[]"), port)
            except ValueError:
                continue
            if self.realms.is_own(destination):
                # The call would come back in as a new one, routed the same way and
                # redirected again, until Max-Forwards ran out: one INVITE, ~70 calls.
                logger.info("x call %s: 3xx Contact %s is the SBC: not followed", call_ref, uri)
                continue
            out.append(Target(realm, destination, str(uri)))
        return tuple(out)

    def _media_answer(
        self,
        live: _Live,
        response: Response,
        offers: tuple[LegOffer, ...] | None = None,
        sdp: SessionDescription | None = None,
    ) -> Step:
        """The relay follows the callee's SDP in a response to the INVITE (``offers``:
        read from it already; ``sdp``: the answer it stands for, when it has none)."""
        try:
            if sdp is None:
                sdp = parse_sdp(response)
            if sdp is not None and offers is None:
                offers = self._leg_offers(live, LegSide.B, sdp)
        except SdpError as exc:
            status, call_ref = response.status, live.call.call_ref
            logger.info("x call %s: SDP of a %d not followed: %s", call_ref, status, exc)
            return Step()
        if sdp is None or offers is None:
            return Step()
        live.offers[LegSide.B] = offers
        if not live.call.b_codecs:
            live.call = evolve(live.call, b_codecs=codecs_of(sdp))
        return self._update_media(live)

    def _offer_codecs(self, *realms: str) -> frozenset[str] | None:
        """The encodings an offer between ``realms`` may carry (`sbc.b2bua.codecs`)."""
        return allowed_codecs(*(self._policy(realm).codecs for realm in realms))

    def _leg_offers(
        self, live: _Live, side: LegSide, sdp: SessionDescription
    ) -> tuple[LegOffer, ...] | None:
        """What ``side``'s SDP asks of the relay (None: its realm is gone, or no relay
        session yet); SdpError 488 when it does not fit the SRTP of the side's legs."""
        realm = self.realms.get(live.call.leg(side).realm)
        if realm is None or live.session is None:
            return None
        offers = leg_offers(sdp, realm, self.realms.media_addresses)
        if live.srtp_passthrough:
            return offers
        media_side = _MEDIA_SIDE[side]
        offers = established(
            sdp,
            offers,
            [s.leg(media_side) for s in live.session.streams],
            live.offers.get(side),
            undecided=side in live.srtp_open,
            unsent=side not in live.sdp_sent,
        )
        if any(offer.local_crypto is not None for offer in offers):
            # Keys of another suite than the ones made ready (a late offer): the
            # SDP this side gets names them, and the relay takes them (UpdateMedia).
            live.session = _with_local_keys(live.session, media_side, offers)
        live.srtp_opportunistic[side] = opportunistic_streams(sdp, offers)
        if live.srtp_open:
            # The late offer's first SDP decides its side, and the other side follows
            # it where its realm leaves the choice open. The late offer's streams it
            # has no m= line for give up the keys made ready (the CDR reads them).
            offers = offers + tuple(
                evolve(offer, srtp=None) for offer in live.offers.get(side, ())[len(offers) :]
            )
            other = side.other
            if other in live.srtp_open and other in live.offers:
                live.offers[other] = mirror(offers, live.offers[other])
            live.srtp_open = frozenset()
        return offers

    def _rewrite(
        self, live: _Live, sdp: SessionDescription, side: LegSide, leg: CallLeg
    ) -> tuple[bytes, CallLeg]:
        """``sdp`` of the other side as ``leg`` (of ``side``) gets it (`rewrite_sdp`)."""
        assert live.session is not None
        return rewrite_sdp(
            sdp,
            live.session,
            _MEDIA_SIDE[side],
            leg,
            live.offers.get(side),
            passthrough=live.srtp_passthrough,
            opportunistic=live.srtp_opportunistic.get(side, frozenset()),
        )

    def _update_media(self, live: _Live) -> Step:
        if live.session is None:
            return Step()
        streams = stream_offers(live.offers[LegSide.A], live.offers[LegSide.B])
        return Step(media=(UpdateMedia(live.call.call_ref, live.session.session_id, streams),))

    def _to_a(
        self, live: _Live, response: Response, answer: SessionDescription | None = None
    ) -> Response:
        """The A leg's copy of a B-leg response to the INVITE (``answer``: the SDP it
        carries for the caller when it has none of its own)."""
        status = response.status
        headers: list[tuple[str, str]] = []
        if 100 < status < 300:
            # RFC 3261 12.1.1: the A side's own Record-Route comes back in its responses.
            record_route = live.a_request.headers.fields("Record-Route")
            headers.extend(("Record-Route", value) for value in record_route)
            headers.append(("Contact", contact_for(live.call.a.local)))
            headers.append(("Allow", ALLOW))
        if 200 <= status < 300 and self.timers.session_expires:
            # RFC 4028 9: the B2BUA refreshes, never asking more than the caller asked
            # for; a caller that supports timers and asked to refresh keeps that choice
            # (the table of section 9), with Require: timer.
            interval = int(self._interval(live, LegSide.A))
            if live.a_refreshes:
                headers.append(("Session-Expires", f"{interval};refresher=uac"))
                headers.append(("Require", "timer"))
            else:
                headers.append(("Session-Expires", f"{interval};refresher=uas"))
        if status in (423, 422):
            headers.extend(("Min-SE", v) for v in response.headers.fields("Min-SE"))
        if status == 503 or status == 486 or status == 480:
            headers.extend(_retry_after_header(response))
        if 300 <= status < 400:
            headers.extend(("Contact", c) for c in _redirect_contacts(response, live.call.a.local))
        # Its status's standard phrase: the callee's own ("Forwarded to 10.0.0.5")
        # is free text of the other realm.
        out = make_response(live.a_request, status, to_tag=live.call.a.local_tag, headers=headers)
        realm = self.realms.get(live.call.a.realm)
        if realm is not None:
            copy_kept_headers(response, out, realm)
        if 100 < status < 300:
            # RFC 3325 in responses (connected identity): a trusted callee's assertion
            # reaches the caller as a trusted caller's reaches the callee; a phone the
            # call reached through its registration is the user it registered as.
            identity = None
            if self._policy(live.call.b.realm).trust_identity:
                identity = asserted_by_peer(response)
            if identity is None and isinstance(live.route, RegisteredRoute):
                identity = _registered_callee(live.a_request)
            if identity is not None:
                self._assert_identity(response, identity, out, live.call.a.realm, live.call.a.local)
        if (
            100 < status < 300
            and live.session is not None
            and not (status < 200 and live.a_reliable is not None and not live.a_request.body)
        ):
            # (Not in a reliable provisional of a late-offer call: there it would be
            # an offer whose answer comes in the caller's PRACK (RFC 3262 5), while
            # the callee, asked without 100rel, makes its offer in the 2xx and waits
            # for the answer in the ACK.)
            sdp = answer
            if sdp is None:
                try:
                    sdp = parse_sdp(response)
                    if sdp is not None and not live.a_request.body:
                        # A late-offer call: the callee's SDP is its offer (or early
                        # media's), under the realms' codec policies.
                        allowed = self._offer_codecs(live.call.b.realm, live.call.a.realm)
                        sdp = restrict_codecs(sdp, allowed)
                except SdpError:
                    sdp = None
            if sdp is not None:
                body, a_leg = self._rewrite(live, sdp, LegSide.A, live.call.a)
                live.call = live.call.with_leg(LegSide.A, a_leg)
                live.sdp_sent[LegSide.A] = body
                out.set_body(body, SDP_CONTENT_TYPE)
        return out

    def _answer_a(self, live: _Live, response: Response, now: float) -> Step:
        if response.status >= 200:
            live.a_final = True
        elif live.call.a.dialog is None and response.to.tag:
            # An early dialog on A, so that UPDATE/INFO from the caller find the call.
            try:
                early = Dialog.from_uas_response(live.a_request, response)
            except (DialogError, ParseError):
                early = None
            live.call = live.call.with_leg(LegSide.A, live.call.a.with_dialog(early))
        if live.a_reliable is not None:
            return self._answer_a_reliably(live, live.a_reliable, response, now)
        return self._send_response(live.a_invite, response, now, live.call.a.realm)

    # -- reliable provisionals towards the caller (RFC 3262) ------------------------------

    def _answer_a_reliably(
        self, live: _Live, reliable: _ReliableA, response: Response, now: float
    ) -> Step:
        """Section 3: one reliable provisional at a time; a 2xx waits for the PRACK of
        one that carried SDP; any other final goes at once and ends the retransmissions
        (a PRACK for them is still answered, ``_prack_from_a``)."""
        status = response.status
        if status == 100:
            # Never reliable (RFC 3262 3): it only says the request arrived.
            return self._send_response(live.a_invite, response, now, live.call.a.realm)
        if status < 200:
            if reliable.outstanding is None:
                return self._send_reliable(live, reliable, response, now)
            queue = reliable.queue
            queue.append(response)
            if len(queue) > RELIABLE_QUEUE:
                plain = next((r for r in queue if not r.body), queue[0])
                queue.remove(plain)
            return Step()
        reliable.queue.clear()
        if status < 300 and (
            (reliable.outstanding is not None and reliable.outstanding.body)
            or self._prack_offer_pending(live)
        ):
            # Until the PRACK of the provisional that answered the caller's offer, or
            # the answer to an offer the caller made in a PRACK (the callee's two
            # answers may cross on the way): the caller is not to see its INVITE
            # answered while an offer of its own is open.
            reliable.held = response
            return Step()
        # No more retransmissions; a PRACK for the outstanding one still gets its 200.
        reliable.next_at = math.inf
        return self._send_response(live.a_invite, response, now, live.call.a.realm)

    def _send_reliable(
        self, live: _Live, reliable: _ReliableA, response: Response, now: float
    ) -> Step:
        reliable.rseq += 1
        response.headers.add("Require", "100rel")
        response.headers.add("RSeq", str(reliable.rseq))
        t1 = self.transactions.config.t1
        reliable.outstanding = response
        reliable.interval = t1
        reliable.next_at = now + t1
        reliable.give_up_at = now + 64 * t1
        self._schedule(reliable.next_at, live.call.call_ref, _Timer.RELIABLE)
        return self._send_response(live.a_invite, response, now, live.call.a.realm)

    def _reliable_due(self, live: _Live, when: float, now: float) -> Step:
        """Retransmit the outstanding reliable provisional, T1 doubling; after 64*T1
        without its PRACK the caller is not answering them: the call is refused with
        a 5xx (RFC 3262 3), unless a 2xx waits, which then goes."""
        reliable = live.a_reliable
        if reliable is None or reliable.outstanding is None or reliable.next_at != when:
            return Step()
        if now >= reliable.give_up_at:
            reliable.outstanding = None
            reliable.queue.clear()
            held, reliable.held = reliable.held, None
            if held is not None:
                return self._send_held(live, live.a_invite, held, now)
            if live.a_final:
                return Step()
            logger.info("x call %s: no PRACK from the caller, ending it", live.call.call_ref)
            return self._end(live, 500, EndReason.REJECTED, None, now)
        reliable.interval *= 2
        reliable.next_at = min(now + reliable.interval, reliable.give_up_at)
        self._schedule(reliable.next_at, live.call.call_ref, _Timer.RELIABLE)
        return Step(self.transactions.send_response(live.a_invite, reliable.outstanding, now))

    def _prack_from_a(
        self, live: _Live, tx: ServerTransaction, request: Request, now: float
    ) -> Step:
        """A PRACK of the caller's: 200 when its RAck names the outstanding reliable
        provisional, which lets the next one (or a held 2xx) go; else 481 (RFC 3262
        7.2). The B2BUA PRACKs the callee's provisionals itself: it is not relayed."""
        reliable = live.a_reliable
        realm = live.call.a.realm
        rack = (request.headers.get("RAck") or "").split()
        outstanding = None if reliable is None else reliable.outstanding
        matches = (
            reliable is not None
            and outstanding is not None
            and len(rack) == 3
            and rack[0] == str(reliable.rseq)
            and rack[1] == str(outstanding.cseq.seq)
            and rack[2] == outstanding.cseq.method
        )
        if not matches or reliable is None:
            return self._send_response(tx, make_response(request, 481), now, realm)
        if outstanding is not None and outstanding.body and live.a_request.body:
            reliable.answered = True
        reliable.outstanding = None
        if request.body and reliable.answered:
            # A new offer, its first one answered (RFC 3262 5, RFC 6337 3.1): the
            # callee gets it in an UPDATE, and the PRACK's 200 carries its answer.
            relayed = len(live.relayed or ())
            step = self._relay(live, LegSide.A, tx, request, now, as_method="UPDATE")
            if len(live.relayed or ()) > relayed:
                # A held 2xx and queued provisionals wait for that answer: the caller
                # is not to see the INVITE answered while its offer is not.
                return step
        else:
            if request.body:
                # Not an offer it may make (its INVITE's has no answer yet).
                logger.info("x call %s: PRACK body ignored", live.call.call_ref)
            step = self._send_response(tx, make_response(request, 200), now, realm)
        return step + self._after_prack(live, reliable, now)

    def _after_prack(self, live: _Live, reliable: _ReliableA, now: float) -> Step:
        """A PRACK answered: the 2xx it held goes, or the next queued provisional."""
        if self._prack_offer_pending(live):
            return Step()  # another PRACK's offer is still open
        held, reliable.held = reliable.held, None
        if held is not None and live.invite_tx is not None:
            return self._send_held(live, live.invite_tx, held, now)
        if reliable.queue and not live.a_final:
            return self._send_reliable(live, reliable, reliable.queue.pop(0), now)
        return Step()

    def _prack_offer_pending(self, live: _Live) -> bool:
        """A caller's PRACK with an offer is relayed (as an UPDATE) and unanswered."""
        for tx in live.relayed or ():
            role = self._by_client.get(tx)
            relayed = None if role is None else role.relayed
            if relayed is not None and relayed.request.method == "PRACK":
                return True
        return False

    def _send_held(
        self, live: _Live, server: ServerTransaction, held: Response, now: float
    ) -> Step:
        """A 2xx held for a PRACK goes: its retransmissions, and the caller's 64*T1 to
        ACK it (RFC 3261 13.3.1.4), count from now, not from when it was made."""
        key = (held.call_id, held.to.tag or "", held.cseq.seq)
        unacked = self._unacked.get(key)
        if unacked is not None and unacked.response is held:
            t1 = self.transactions.config.t1
            unacked.interval = t1
            unacked.next_at = now + t1
            unacked.give_up_at = now + 64 * t1
            self._unacked_at(key, unacked.next_at)
        return self._send_response(server, held, now, live.call.a.realm)

    def _ack_b(self, leg: CallLeg, dialog: Dialog, now: float, *, bye: bool, call_ref: str) -> Step:
        ack = dialog.create_ack(
            transport=leg.local.transport.value,
            host=format_host(leg.local.host),
            port=leg.local.port,
        )
        self._fix_via(ack)
        self._outbound(ack, leg.realm)
        hop = self._hop(leg)
        step = Step(Output((Outgoing(ack, bytes(ack), hop),)))
        if bye:
            _, bye_request = dialog.create_request(
                "BYE",
                transport=leg.local.transport.value,
                host=format_host(leg.local.host),
                port=leg.local.port,
            )
            step = step + self._send_on(call_ref, bye_request, hop, "bye", now, realm=leg.realm)
        return step

    # -- sending requests -----------------------------------------------------------------

    def _layer_full(self) -> bool:
        """No new client transaction can start (TransactionLimitError): checked
        before a step changes anything for a request it would send, so that at the
        limit the step answers or waits instead of raising half-way."""
        layer = self.transactions
        return len(layer) >= layer.max_transactions

    def _send_request(
        self, request: Request, hop: Hop, now: float
    ) -> tuple[ClientTransaction, Output]:
        """A new client transaction for ``request`` to ``hop``: over TCP instead of
        UDP when it is too large for UDP and the realm's policy says so."""
        tcp = self._tcp_for_size(request, hop, now)
        if tcp is not None:
            client, out = self.transactions.send_request(request, tcp, now, reliable=True)
            self._over_tcp[client] = hop
            return client, out
        reliable = is_reliable(hop.destination.transport)
        return self.transactions.send_request(request, hop, now, reliable=reliable)

    def _tcp_for_size(self, request: Request, hop: Hop, now: float) -> Hop | None:
        """RFC 3261 18.1.1: a request over UDP_SIZE_LIMIT bytes (the path MTU is not
        known) goes over TCP, from the realm's TCP listener to the same address
        and port, its Via saying so; None: it stays on ``hop``."""
        destination = hop.destination
        if destination.transport is not Transport.UDP:
            return None
        policy = self.policies.get(hop.realm)
        if policy is None or not policy.large_requests_over_tcp:
            return None
        size = len(bytes(request))
        if size <= UDP_SIZE_LIMIT:
            return None
        peer = (destination.host, destination.port)
        refused_until = self._no_tcp.get(peer)
        if refused_until is not None:
            if refused_until > now:
                return None
            del self._no_tcp[peer]
        realm = self.realms.get(hop.realm)
        listener = None if realm is None else realm.listener(Transport.TCP, hop.local.host)
        if listener is None:
            return None
        _set_via(request, Transport.TCP, listener.port)
        logger.debug("- %s: %d bytes, over TCP", request.method, size)
        return Hop(hop.realm, listener, evolve(destination, transport=Transport.TCP))

    def _retry_over_udp(self, tx: Transaction, now: float) -> Step | None:
        """The TCP connection for a request sent over TCP for its size failed: the
        request goes over UDP after all, as a new transaction (RFC 3261 18.1.1),
        and that peer gets UDP for a while. None: ``tx`` was not such a request."""
        if not isinstance(tx, ClientTransaction):
            return None
        hop = self._over_tcp.pop(tx, None)
        if hop is None:
            return None
        destination = hop.destination
        if len(self._no_tcp) >= MAX_ORPHANS:
            self._no_tcp = {p: t for p, t in self._no_tcp.items() if t > now}
        self._no_tcp[(destination.host, destination.port)] = now + NO_TCP_MEMORY
        role = self._by_client.get(tx)
        if role is not None and role.role == "invite":
            live = self._calls.get(role.call_ref)
            if live is None or not isinstance(tx, ClientInviteTransaction) or tx not in live.forks:
                return None  # its call is over: nothing to retry for
        old = tx.request
        request = parse_message(bytes(old))
        assert isinstance(request, Request)
        _set_via(request, Transport.UDP, hop.local.port, branch=new_branch())
        logger.info(
            "- %s to %s:%d: TCP failed, over UDP", old.method, destination.host, destination.port
        )
        client, out = self.transactions.send_request(request, hop, now, reliable=False)
        if tx in self._by_client:
            self._by_client[client] = self._by_client.pop(tx)
        if tx in self._routed:
            self._routed[client] = self._routed.pop(tx)
        if tx in self._register_relayed:
            self._register_relayed[client] = self._register_relayed.pop(tx)
        live = None if role is None else self._calls.get(role.call_ref)
        if live is not None:
            fork = live.forks.pop(tx, None) if isinstance(tx, ClientInviteTransaction) else None
            if fork is not None and isinstance(client, ClientInviteTransaction):
                fork.tx, fork.request = client, request
                live.forks[client] = fork
            if live.subscribe is old:
                live.subscribe = request
        return Step(out)

    # -- REFER subscriptions outliving their call ----------------------------------------

    def _linger(self, call: Call, notifier: LegSide, ids: dict[int, int], now: float) -> None:
        """Keep the legs of an ended call for its open REFER subscription (``_Referral``)."""
        legs = call.leg(notifier), call.leg(notifier.other)
        if any(leg.dialog is None or leg.dialog.state is DialogState.EARLY for leg in legs):
            return
        referrals = self._referrals
        _make_room(referrals, now)
        # The BYE terminated the dialogs as the INVITE usage knows them; the
        # subscription usage goes on in them (RFC 5057 5.5).
        on, to = (
            leg.with_dialog(evolve(leg.dialog, state=DialogState.CONFIRMED))
            for leg in legs
            if leg.dialog is not None
        )
        key = (on.call_id, on.local_tag)
        referrals[key] = _Referral(call.call_ref, on, to, now + REFER_LINGER, dict(ids))

    def _referral_notify(
        self, referral: _Referral, tx: ServerTransaction, request: Request, now: float
    ) -> Step:
        """A request in the dialog of an ended call with an open REFER subscription: its
        NOTIFYs are answered and relayed; anything else gets 481 (``_local``)."""
        on = referral.notifier
        if request.method != "NOTIFY" or not _refer_event(request) or on.dialog is None:
            return self._local(tx, request, now)
        checked = on.dialog.receive_request(request)
        if not isinstance(checked, Dialog):
            return self._send_response(tx, checked.response_to(request), now, on.realm)
        referral.notifier = on.with_dialog(checked)
        step = self._send_response(tx, make_response(request, 200), now, on.realm)
        headers = [
            (name, value)
            for name in ("Event", "Subscription-State")
            for value in request.headers.fields(name)
        ]
        headers = _refer_notify_headers(request, referral.ids, headers)
        if _terminated(request):
            _subscription_ended(request, referral.ids)
            if not referral.ids:
                self._referrals.pop((on.call_id, on.local_tag), None)
        to = referral.referrer
        if to.dialog is None:
            return step
        body = _sipfrag_status(request.body)
        try:
            dialog, notify = to.dialog.create_request(
                "NOTIFY",
                transport=to.local.transport.value,
                host=format_host(to.local.host),
                port=to.local.port,
                contact=contact_for(to.local),
                headers=headers,
                body=body,
                content_type=request.headers.get("Content-Type") if body else None,
            )
        except DialogError as exc:
            logger.info("x call %s: REFER NOTIFY not relayed: %s", referral.call_ref, exc)
            return step
        referral.referrer = to.with_dialog(dialog)
        logger.debug("- call %s: REFER NOTIFY relayed after the BYE", referral.call_ref)
        return step + self._send_on(
            referral.call_ref, notify, self._hop(to), "notify", now, realm=to.realm
        )

    # -- late answers to B INVITEs let go of -------------------------------------------

    def _orphan_fork(self, tx: ClientInviteTransaction, now: float) -> None:
        """Timer B fired for a B INVITE: its call goes on without it (failover, or
        a failure for A), but the callee may still answer it."""
        role = self._by_client.get(tx)
        live = None if role is None else self._calls.get(role.call_ref)
        fork = None if live is None else live.forks.get(tx)
        if live is not None and fork is not None and not fork.final:
            self._adopt(live.call.call_ref, fork, now)

    def _let_go_response(
        self, tx: ClientInviteTransaction, call_ref: str, response: Response, now: float
    ) -> Step:
        """A response to a B INVITE its call no longer waits for (the call ended, or
        its Timer C fired): a provisional gets the CANCEL the call owed it, a 2xx its
        ACK and a BYE."""
        again = self._ack_again(tx, response)
        if again is not None:
            return again
        if response.status < 200:
            return self._orphan_cancel(tx, call_ref, now)
        return self._orphan_response(response, now)

    def _rejoin(self, live: _Live, tx: ClientInviteTransaction, response: Response) -> _Fork | None:
        """A 2xx from a target the call let go of (its group rang out, its Timer C
        fired) while the call still rings elsewhere: the callee picked up as the CANCEL
        crossed. Hanging up on it would drop the person who answered: the fork is taken
        back and answers the call (the others are CANCELled as for any answer)."""
        if not 200 <= response.status < 300 or live.winner is not None or live.a_final:
            return None
        if live.call.state not in (CallState.CALLING, CallState.EARLY):
            return None
        key = (tx.request.call_id, tx.request.from_.tag or "")
        orphan = self._orphans.get(key)
        fork = None if orphan is None else orphan.fork
        if fork is None or fork.tx is not tx:
            return None
        del self._orphans[key]
        live.forks[tx] = fork
        self._by_dialog[key] = (live.call.call_ref, LegSide.B)
        logger.info("- call %s: answered by a target let go of, taking it", live.call.call_ref)
        return fork

    def _adopt(self, call_ref: str, fork: _Fork, now: float) -> None:
        orphans = self._orphans
        _make_room(orphans, now)
        key = (fork.leg.call_id, fork.leg.local_tag)
        if key not in orphans:
            # A 2xx can come as long as the callee retransmits it (64*T1) after
            # answering at the last moment the INVITE was still alive.
            expires = now + 2 * 64 * self.transactions.config.t1
            live = self._calls.get(call_ref)
            ringing = live is not None and live.call.state is not CallState.TERMINATED
            orphans[key] = _Orphan(
                call_ref,
                fork.leg,
                fork.dialogs,
                expires,
                cancel_pending=fork.cancel_pending,
                fork=fork if ringing else None,
            )

    def _orphan_cancel(self, tx: ClientInviteTransaction, call_ref: str, now: float) -> Step:
        """A provisional for a B INVITE let go of before it had one: the CANCEL its
        call owed it goes now (RFC 3261 9.1), or the callee rings on unheard."""
        request = tx.request
        orphan = self._orphans.get((request.call_id, request.from_.tag or ""))
        if orphan is None or not orphan.cancel_pending or not tx.can_cancel:
            return Step()
        orphan.cancel_pending = False
        return self._send_cancel(call_ref, tx, now)

    def _orphan_response(self, response: Response, now: float) -> Step:
        """A 2xx for a B INVITE no call waits for any more: ACK it, then BYE."""
        if not 200 <= response.status < 300:
            return Step()
        try:
            if response.cseq.method != "INVITE":
                return Step()
            key = (response.call_id, response.from_.tag or "")
        except ParseError:
            return Step()
        orphan = self._orphans.get(key)
        if orphan is None or orphan.expires <= now:
            return Step()
        try:
            dialogs, event = orphan.dialogs.receive_response(response)
        except (DialogError, ParseError) as exc:
            logger.warning("x call %s: late 2xx unusable: %s", orphan.call_ref, exc)
            return Step()
        orphan.dialogs = dialogs
        if not isinstance(event, DialogAnswered | ExtraForkAnswered | AnswerRetransmitted):
            return Step()
        dialog = event.dialog
        bye = dialog.remote_tag not in orphan.byed
        if bye:
            orphan.byed.add(dialog.remote_tag)
            logger.info("- call %s: 2xx after the call let go of it, hanging up", orphan.call_ref)
            self._count("late_answers_hung_up")
        return self._ack_b(orphan.leg, dialog, now, bye=bye, call_ref=orphan.call_ref)

    def _send_on(
        self,
        call_ref: str,
        request: Request,
        hop: Hop,
        role: str,
        now: float,
        *,
        realm: str,
        side: LegSide | None = None,
        challenged: tuple[str, Hop, int] | None = None,
    ) -> Step:
        self._fix_via(request)
        request.headers.add("User-Agent", self.user_agent)
        self._outbound(request, realm)
        client, out = self._send_request(request, hop, now)
        self._by_client[client] = _ByRole(call_ref, role, side=side, challenged=challenged)
        if role == "refresh" and isinstance(client, ClientInviteTransaction):
            live = self._calls.get(call_ref)
            if live is not None:
                # Cancelled if the call ends while it is unanswered (``_end_pending``).
                ongoing = [tx for tx in live.own_invites or () if not tx.terminated]
                live.own_invites = [*ongoing, client]
        return Step(out)

    def _relay_failed(self, live: _Live, relayed: _Relayed, exc: Exception, now: float) -> Step:
        """A final answer to a relayed request that could not be taken (it names
        another dialog, say): the requester gets 502 rather than waiting for ever,
        and keeps its session as it was (RFC 3261 14.1)."""
        logger.warning(
            "x call %s: unusable answer to a relayed %s: %s",
            live.call.call_ref,
            relayed.request.method,
            exc,
        )
        server = relayed.server
        if relayed.cancelled or server.state not in (
            TransactionState.TRYING,
            TransactionState.PROCEEDING,
        ):
            return Step()
        step = Step()
        if relayed.before is not None:
            step = self._roll_back(live, relayed.from_side, relayed.before, None, now)
        out = make_response(relayed.request, 502)
        realm = live.call.leg(relayed.from_side).realm
        return step + self._send_response(server, out, now, realm)

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
            if relayed.cancel_pending and isinstance(tx, ClientInviteTransaction) and tx.can_cancel:
                relayed.cancel_pending = False
                return self._send_cancel(live.call.call_ref, tx, now)
            return Step()
        self._by_client.pop(tx, None)
        if live.relayed is not None and tx in live.relayed:
            live.relayed.remove(tx)
        side, other = relayed.from_side, relayed.from_side.other
        if relayed.request.method == "INVITE":
            live.reinvite_pending = live.reinvite_pending - {other}
        elif relayed.request.method == "REFER" and status < 300:
            refer_sub = (response.headers.get("Refer-Sub") or "").strip().lower()
            if refer_sub != "false":  # RFC 4488 4: no subscription if "false"
                live.notifiers = live.notifiers | {other}
                if live.refer_ids is None:
                    live.refer_ids = {}
                ids = live.refer_ids.setdefault(other, {})
                ids[tx.request.cseq.seq] = relayed.request.cseq.seq
        step = Step()
        if status >= 300 and relayed.before is not None:
            step = self._restore(live, side, relayed.before)
        leg = live.call.leg(other)
        bad_sdp: SdpError | None = None
        answer: tuple[LegOffer, ...] | None = None
        #: A 2xx to an INVITE without an offer carries the far side's offer.
        offerless = (
            relayed.request.method == "INVITE"
            and status < 300
            and parse_sdp(relayed.request) is None
        )
        sdp: SessionDescription | None = None
        refused: SessionDescription | None = None
        try:
            sdp = parse_sdp(response)
            if offerless and sdp is not None and sdp.media:
                # The far side's offer: the realms' codec policies apply to it.
                sdp = restrict_codecs(sdp, self._offer_codecs(leg.realm, live.call.leg(side).realm))
            if sdp is not None and status < 300 and live.session is not None:
                answer = self._leg_offers(live, other, sdp)
        except SdpError as exc:
            logger.info("x call %s: bad SDP in a %d: %s", live.call.call_ref, status, exc)
            if offerless and sdp is not None and sdp.media:
                refused = sdp  # an offer that parsed, but that the SBC cannot take
            sdp = None
            if status < 300:
                bad_sdp = exc
        if leg.dialog is not None:
            dialog = leg.dialog.receive_response(response)
            live.call = live.call.with_leg(other, leg.with_dialog(dialog))
            if relayed.request.method == "INVITE" and status < 300:
                if offerless and relayed.cancelled and sdp is not None and sdp.media:
                    # The requester has its 487: nobody will answer this offer now.
                    refused, sdp = sdp, None
                if (
                    offerless
                    and sdp is not None
                    and sdp.media
                    and isinstance(tx, ClientInviteTransaction)
                    and live.held_ack is None
                ):
                    # The 2xx carries the offer; the ACK waits for the answer.
                    self._acks[tx] = None
                    live.held_ack = _HeldAck(
                        other, dialog, response.cseq.seq, tx, relayed.server, sdp
                    )
                    live.reinvite_pending = live.reinvite_pending | {other}
                elif refused is not None and live.session is not None:
                    # RFC 3261 13.2.2.4: the ACK must answer the offer; every stream
                    # rejected, and the far side is offered the old session again.
                    relayed.before = relayed.before or _Before(
                        live.offers.get(side),
                        live.sdp_sent.get(other),
                        live.call.leg(other).sdp_version,
                        live.call.leg(other).sdp_digest,
                    )
                    rejected = evolve(refused, media=tuple(m.rejected() for m in refused.media))
                    body, new_leg = self._rewrite(live, rejected, other, live.call.leg(other))
                    live.call = live.call.with_leg(other, new_leg)
                    live.sdp_sent[other] = body
                    step = step + self._ack_leg(live, other, dialog, response.cseq.seq, tx, body)
                else:
                    step = step + self._ack_leg(live, other, dialog, response.cseq.seq, tx)
        if relayed.cancelled:
            # The requester has its 487; a 2xx was ACKed above, and took an offer
            # the requester withdrew.
            if status < 300 and relayed.before is not None:
                step = step + self._roll_back(live, side, relayed.before, sdp, now)
            return step
        if bad_sdp is not None:
            # ACKed above; the requester learns that the far side's answer (or offer)
            # was unusable, and keeps its session as it was (RFC 3261 14.1): so does
            # the relay, and the far side is offered that session again. A far side's
            # offer that does not fit (the codec policy, SRTP) is 488, else 502.
            if relayed.before is not None:
                step = step + self._roll_back(live, side, relayed.before, None, now)
            unfit = offerless and bad_sdp.status == 488
            out = make_response(relayed.request, 488 if unfit else 502)
            return step + self._send_response(relayed.server, out, now, live.call.leg(side).realm)
        headers: list[tuple[str, str]] = []
        if relayed.request.method == "INVITE" and status < 300:
            headers.append(("Contact", contact_for(live.call.leg(side).local)))
        if status == 491 or status == 503:
            headers.extend(_retry_after_header(response))
        realm = self.realms.get(live.call.leg(side).realm)
        if relayed.request.method == "REFER" and status < 300:
            # RFC 4488 4: whether the recipient made the implicit subscription.
            headers.extend(_norefersub(response, realm))
        headers.extend(_capabilities(relayed.request.method, response, realm))
        out = make_response(relayed.request, status, headers=headers)  # the standard phrase
        if realm is not None:
            copy_kept_headers(response, out, realm)
        if sdp is not None and live.session is not None and status < 300:
            if answer is not None:
                live.offers[other] = answer
                step = step + self._update_media(live)
            body, new_leg = self._rewrite(live, sdp, side, live.call.leg(side))
            live.call = live.call.with_leg(side, new_leg)
            live.sdp_sent[side] = body
            out.set_body(body, SDP_CONTENT_TYPE)
        elif response.body and sdp is None and status < 300:
            out.set_body(response.body, response.headers.get("Content-Type"))
        dialog_side = live.call.leg(side).dialog
        if dialog_side is not None and status < 300:
            updated = dialog_side.response_sent(relayed.request, out)
            live.call = live.call.with_leg(side, live.call.leg(side).with_dialog(updated))
        if relayed.request.method == "SUBSCRIBE" and status < 300:
            for value in response.headers.fields("Expires"):
                out.headers.add("Expires", value)
            out.invalidate()
        step = step + self._send_response(relayed.server, out, now, live.call.leg(side).realm)
        if self._dialog_gone(live, relayed, status):
            # RFC 3261 12.2.1.2, 14.1: a 408 or 481 (or no answer) ended the far
            # side's dialog; the requester, told so, is to end its own, and may not:
            # the call would live on with nothing behind it until a timer noticed.
            logger.info(
                "x call %s: %s on %s got %d, its dialog is gone: hanging up",
                live.call.call_ref,
                relayed.request.method,
                other.value,
                status,
            )
            return step + self._hang_up(live, side, status, EndReason.DIALOG_GONE, other, now)
        if (
            relayed.request.method in ("INVITE", "UPDATE")
            and status < 300
            and live.call.state is CallState.CONFIRMED
        ):
            # RFC 4028 10: the 2xx to a peer's own refresh restarts that leg's session
            # interval, not the refresh's arrival: a refused one refreshes nothing, and
            # that leg's session still ends on time.
            self._arm_refresh(live, side, now)
        if relayed.request.method == "INVITE" and status < 300:
            self._expect_ack(live.call.call_ref, relayed.server, out, now)
        if live.is_subscription:
            step = step + self._subscription_progress(live, relayed.request, response, now)
        return step

    def _dialog_gone(self, live: _Live, relayed: _Relayed, status: int) -> bool:
        """Whether the answer to ``relayed`` ended the answered call's dialog on the
        far side. Not for a NOTIFY or SUBSCRIBE: a transfer's 481 there ends that
        subscription, not the call (RFC 6665 4.1.3; a subscription's own dialog ends
        as its subscriptions do); nor for a PRACK's offer, of a call the caller is
        not answered yet."""
        if status not in DEAD_DIALOG_STATUSES or relayed.request.method in _NOT_SESSION:
            return False
        if live.is_subscription or live.call.state is not CallState.CONFIRMED:
            return False
        dialog = live.call.leg(relayed.from_side.other).dialog
        return dialog is not None and dialog.state is DialogState.TERMINATED

    def _restore(self, live: _Live, offerer: LegSide, before: _Before) -> Step:
        """The session as it was before a relayed offer from ``offerer`` that failed."""
        answerer = offerer.other
        if before.sdp_sent is None:
            live.sdp_sent.pop(answerer, None)
        else:
            live.sdp_sent[answerer] = before.sdp_sent
        leg = live.call.leg(answerer)
        leg = evolve(leg, sdp_version=before.sdp_version, sdp_digest=before.sdp_digest)
        live.call = live.call.with_leg(answerer, leg)
        if before.offers is None or live.offers.get(offerer) == before.offers:
            return Step()
        live.offers[offerer] = before.offers
        logger.debug("- call %s: offer refused, session as it was", live.call.call_ref)
        return self._update_media(live)

    def _roll_back(
        self,
        live: _Live,
        offerer: LegSide,
        before: _Before,
        answer: SessionDescription | None,
        now: float,
    ) -> Step:
        """A 2xx crossed the CANCEL of a relayed offer: the answerer took an offer its
        sender withdrew (RFC 3261 9.2), so the two sides no longer have one session.
        The relay goes back to the offerer's media as it was and follows the
        answerer's answer, and the answerer is offered the old session again in a
        re-INVITE, with the next o= version (RFC 3264 8)."""
        answerer = offerer.other
        leg = live.call.leg(answerer)
        try:
            offers = None if answer is None else self._leg_offers(live, answerer, answer)
        except SdpError as exc:
            logger.info("x call %s: answer to a withdrawn offer: %s", live.call.call_ref, exc)
            offers = None
        if offers is not None:
            # The answerer sends as its answer says (a new key of its own, a new
            # port), whatever becomes of the offer.
            live.offers[answerer] = offers
        if before.sdp_sent is None or leg.sdp_digest == before.sdp_digest:
            # The offer changed nothing the answerer saw: no new offer for it.
            step = self._restore(live, offerer, before)
            return step if offers is None else self._update_media(live)
        version = leg.sdp_version + 1
        live.sdp_sent[answerer] = _with_version(before.sdp_sent, version)
        leg = evolve(leg, sdp_version=version, sdp_digest=before.sdp_digest)
        live.call = live.call.with_leg(answerer, leg)
        if before.offers is not None:
            live.offers[offerer] = before.offers
        logger.info(
            "- call %s: answer to a withdrawn offer, offering %s the session again",
            live.call.call_ref,
            answerer.value,
        )
        return self._update_media(live) + self._refresh(live, answerer, now, offer=True)

    def _subscription_progress(
        self, live: _Live, request: Request, response: Response, now: float
    ) -> Step:
        """A refresh re-arms the subscription; a terminating NOTIFY (or a 481) ends it."""
        status = response.status
        if request.method == "SUBSCRIBE" and 200 <= status < 300:
            self._arm_subscription(live, response, now)
            return Step()
        if request.method == "NOTIFY" and (_terminated(request) or status == 481):
            logger.info("- subscription %s terminated", live.call.call_ref)
            return self._end(live, 200, EndReason.BYE, LegSide.B, now)
        if status == 481:
            return self._end(live, 481, EndReason.BYE, None, now)
        return Step()

    def _ack_leg(
        self,
        live: _Live,
        side: LegSide,
        dialog: Dialog,
        seq: int,
        tx: ClientTransaction,
        body: bytes = b"",
    ) -> Step:
        """ACK a 2xx to the B2BUA's INVITE ``tx`` on ``side``."""
        return self._send_ack(live.call.leg(side), dialog, seq, tx, body)

    def _send_ack(
        self, leg: CallLeg, dialog: Dialog, seq: int, tx: ClientTransaction, body: bytes = b""
    ) -> Step:
        """The ACK for the 2xx to INVITE ``tx`` (CSeq ``seq``) on ``leg``; the same ACK
        answers each retransmission of that 2xx (``_acks``)."""
        ack = dialog.create_ack(
            transport=leg.local.transport.value,
            host=format_host(leg.local.host),
            port=leg.local.port,
            invite_seq=seq,
            body=body,
            content_type=SDP_CONTENT_TYPE if body else None,
        )
        self._fix_via(ack)
        self._outbound(ack, leg.realm)
        outgoing = Outgoing(ack, bytes(ack), self._hop(leg))
        if isinstance(tx, ClientInviteTransaction) and not tx.terminated:
            self._acks[tx] = outgoing
        return Step(Output((outgoing,)))

    # -- session timers (RFC 4028) --------------------------------------------------------

    def _min_se(self, live: _Live, side: LegSide) -> float:
        """The Min-SE a request on ``side`` carries (RFC 4028 7.4): the configured
        one, or the session interval once a 422 raised it above the configured."""
        interval = self._interval(live, side)
        return interval if interval > self.timers.session_expires else self.timers.min_se

    def _interval(self, live: _Live, side: LegSide) -> float:
        """The session interval on ``side`` (RFC 4028): the configured one, or less
        where the caller asked for less or the callee's 2xx said less."""
        if live.intervals is not None and side in live.intervals:
            return live.intervals[side]
        return self.timers.session_expires

    def _too_brief(self, request: Request) -> Response | None:
        """RFC 4028 8.1: 422 with our Min-SE for a Session-Expires below it."""
        asked = _delta_of(request.headers.get("Session-Expires"))
        if asked is None or not self.timers.session_expires or asked >= self.timers.min_se:
            return None
        min_se = ("Min-SE", str(int(self.timers.min_se)))
        return make_response(request, 422, to_tag=new_tag(), headers=[min_se])

    def _callers_floor(self, live: _Live, request: Request) -> None:
        """RFC 4028 9: the 2xx must not say less than the Min-SE of the request."""
        floor = _delta_of(request.headers.get("Min-SE"))
        if floor is not None and floor > self._interval(live, LegSide.A):
            wanted = float(min(floor, MAX_SESSION_INTERVAL))
            live.intervals = {**(live.intervals or {}), LegSide.A: wanted}

    def _shorter_interval(self, live: _Live, side: LegSide, message: Message) -> None:
        """Note a Session-Expires in ``message`` shorter than the configured interval."""
        seconds = _delta_of(message.headers.get("Session-Expires"))
        if seconds is not None and 0 < seconds < self.timers.session_expires:
            live.intervals = {**(live.intervals or {}), side: max(seconds, self.timers.min_se)}

    def _arm_refresh(self, live: _Live, side: LegSide, now: float) -> None:
        """The B2BUA refreshes ``side`` at half the session interval (RFC 4028 10);
        a caller that is the refresher itself at three quarters, only if its own
        refresh (due at half) did not come: two refreshers at once would glare."""
        interval = self._interval(live, side)
        if not interval:
            return
        share = 0.75 if side is LegSide.A and live.a_refreshes else 0.5
        when = now + interval * share
        live.refresh_at[side] = when
        self._schedule(
            when, live.call.call_ref, _Timer.REFRESH_A if side is LegSide.A else _Timer.REFRESH_B
        )

    def _refresh(self, live: _Live, side: LegSide, now: float, *, offer: bool = False) -> Step:
        """Refresh ``side``: UPDATE without a body where the peer allows it, else a
        re-INVITE with the SDP last sent on that leg (unchanged version). ``offer``:
        a re-INVITE with that SDP in any case (it changed: ``_roll_back``)."""
        leg = live.call.leg(side)
        if leg.dialog is None:
            return Step()
        if side in live.reinvite_pending or self._relaying_invite_from(live, side):
            # RFC 3261 14.1: no INVITE while one is pending on that leg. Again soon:
            # if that one fails, it refreshed nothing (RFC 4028 10).
            self._refresh_later(live, side, now + REFRESH_RETRY, offer=offer)
            return Step()
        if self._layer_full():
            # At the transaction limit: again soon (the interval's second half is long).
            self._refresh_later(live, side, now + REFRESH_RETRY, offer=offer)
            return Step()
        allows_update = "UPDATE" in live.allows.get(side, frozenset())
        early = live.call.state is not CallState.CONFIRMED
        if early and not allows_update:
            # RFC 3261 14.1: no re-INVITE while the first INVITE is unanswered; only
            # an UPDATE can offer in an early dialog (RFC 3311 5.1).
            logger.info("x call %s: no early offer to %s", live.call.call_ref, side.value)
            return Step()
        method = "UPDATE" if allows_update and (early or not offer) else "INVITE"
        sdp_sent = live.sdp_sent.get(side, b"")
        body = sdp_sent if method == "INVITE" or offer else b""
        interval = self._interval(live, side)
        headers = [
            ("Session-Expires", f"{int(interval)};refresher=uac"),
            # RFC 4028 7.4: the Min-SE of the session, raised by any 422 it had.
            ("Min-SE", str(int(self._min_se(live, side)))),
            ("Supported", SUPPORTED_IN_DIALOG),
        ]
        if method == "INVITE":
            headers.append(("Allow", ALLOW))
        try:
            dialog, request = leg.dialog.create_request(
                method,
                transport=leg.local.transport.value,
                host=format_host(leg.local.host),
                port=leg.local.port,
                contact=contact_for(leg.local),
                headers=headers,
                body=body,
                content_type=SDP_CONTENT_TYPE if body else None,
            )
        except DialogError as exc:
            logger.info("x call %s: no refresh on %s: %s", live.call.call_ref, side.value, exc)
            return Step()
        live.call = live.call.with_leg(side, leg.with_dialog(dialog))
        if method == "INVITE":
            live.reinvite_pending = live.reinvite_pending | {side}
        self._arm_refresh(live, side, now)
        logger.debug("> call %s: session refresh %s on %s", live.call.call_ref, method, side.value)
        return self._send_on(
            live.call.call_ref, request, self._hop(leg), "refresh", now, realm=leg.realm, side=side
        )

    def _refresh_response(
        self, live: _Live, tx: ClientTransaction, side: LegSide, response: Response, now: float
    ) -> Step:
        status = response.status
        if status < 200:
            return Step()
        self._by_client.pop(tx, None)
        step = Step()
        leg = live.call.leg(side)
        if tx.request.method == "INVITE":
            live.reinvite_pending = live.reinvite_pending - {side}
        if status in DEAD_DIALOG_STATUSES:
            # RFC 4028 10: a refresh that times out or gets 408/481 ends the session
            # with a BYE on that leg too, sent on the dialog as it was (the dialog
            # layer would end it on this answer and leave nothing to send it on).
            logger.info(
                "x call %s: session refresh on %s got %d, the dialog is gone",
                live.call.call_ref,
                side.value,
                status,
            )
            return self._hang_up_both(live, EndReason.SESSION_TIMER, now, status=status)
        if leg.dialog is not None:
            dialog = leg.dialog.receive_response(response)
            live.call = live.call.with_leg(side, leg.with_dialog(dialog))
            if tx.request.method == "INVITE" and status < 300:
                step = step + self._ack_leg(live, side, dialog, response.cseq.seq, tx)
        if tx.request.method == "INVITE" and 200 <= status < 300:
            # The peer may answer the refresh with other media (a new port): the
            # relay follows it.
            try:
                sdp = parse_sdp(response)
                offers = None if sdp is None else self._leg_offers(live, side, sdp)
            except SdpError as exc:
                call_ref = live.call.call_ref
                logger.info("x call %s: answer to a refresh not followed: %s", call_ref, exc)
                offers = None
            if offers is not None:
                live.offers[side] = offers
                step = step + self._update_media(live)
        if status == 422:
            # RFC 4028 7.4: the peer wants a longer session interval than the refresh
            # asked (it raised its Min-SE mid-call): ask again at once with that, or
            # the peer ends the session when the last interval runs out. Only when it
            # grows, so a peer repeating its 422 gets one retry, not a loop.
            wanted = _delta_of(response.headers.get("Min-SE")) or 0
            if self._interval(live, side) < wanted <= MAX_SESSION_INTERVAL:
                live.intervals = {**(live.intervals or {}), side: float(wanted)}
                self._refresh_later(live, side, now, offer=tx.request.method == "INVITE")
            else:
                logger.info(
                    "x call %s: session refresh on %s refused 422 (Min-SE %s)",
                    live.call.call_ref,
                    side.value,
                    response.headers.get("Min-SE"),
                )
        if status == 491:
            # RFC 3261 14.1 glare: try again after a random back-off, 2.1-4 s when we
            # own the Call-ID (the B leg's), else 0-2 s.
            low, high = (2.1, 4.0) if side is LegSide.B else (0.0, 2.0)
            when = now + low + (high - low) * secrets.randbelow(1000) / 1000
            # The retry is the same request: a re-INVITE re-offers (``_roll_back``'s
            # offer must not become a body-less UPDATE).
            self._refresh_later(live, side, when, offer=tx.request.method == "INVITE")
        return step

    def _refresh_later(self, live: _Live, side: LegSide, when: float, *, offer: bool) -> None:
        """Refresh ``side`` at ``when`` (instead of any refresh armed before)."""
        live.refresh_at[side] = when
        if side is LegSide.A:
            timer = _Timer.REOFFER_A if offer else _Timer.REFRESH_A
        else:
            timer = _Timer.REOFFER_B if offer else _Timer.REFRESH_B
        self._schedule(when, live.call.call_ref, timer)

    # -- ending --------------------------------------------------------------------------

    def _hang_up_both(
        self, live: _Live, reason: EndReason, now: float, *, status: int = 200
    ) -> Step:
        step = self._bye(live, LegSide.A, now) + self._bye(live, LegSide.B, now)
        return step + self._end(live, status, reason, None, now)

    def _bye(self, live: _Live, side: LegSide, now: float) -> Step:
        leg = live.call.leg(side)
        if leg.dialog is None or leg.dialog.state is DialogState.EARLY:
            # An early dialog ends with the INVITE: its final response on A, CANCEL
            # on B (``_end``).
            return Step()
        held = live.held_ack
        if held is not None and held.side is side:
            # The 2xx waits for its ACK, which must answer its offer (13.2.2.4): an
            # answer rejecting every stream goes first.
            step = self._release_ack(live, None, now)
            return step + self._bye(live, side, now)
        try:
            dialog, bye = leg.dialog.create_request(
                "BYE",
                transport=leg.local.transport.value,
                host=format_host(leg.local.host),
                port=leg.local.port,
            )
        except DialogError as exc:
            logger.info("x call %s: no BYE on %s: %s", live.call.call_ref, side.value, exc)
            return Step()
        live.call = live.call.with_leg(side, leg.with_dialog(dialog))
        hop = self._hop(leg)
        trunk = self._leg_trunk(live, side)
        # A trunk may challenge the BYE too: unanswered, the carrier would keep
        # the call up (and bill it) until its own timers end it.
        challenged = (trunk, hop, 0) if trunk is not None and trunk in self.trunk_auth else None
        return self._send_on(
            live.call.call_ref, bye, hop, "bye", now, realm=leg.realm, challenged=challenged
        )

    def _hang_up(
        self,
        live: _Live,
        side: LegSide,
        status: int,
        reason: EndReason,
        hangup: LegSide | None,
        now: float,
    ) -> Step:
        """BYE the leg ``side`` (if it has a confirmed dialog) and end the call."""
        return self._bye(live, side, now) + self._end(live, status, reason, hangup, now)

    def _fail_a(self, live: _Live, status: int, reason: EndReason, now: float) -> Step:
        step = Step()
        if not live.a_final:
            step = self._answer_a(
                live, make_response(live.a_request, status, to_tag=live.call.a.local_tag), now
            )
        return step + self._end(live, status, reason, None, now)

    def _end(
        self,
        live: _Live,
        status: int,
        reason: EndReason,
        hangup: LegSide | None,
        now: float,
    ) -> Step:
        call = live.call
        if call.state is CallState.TERMINATED:
            return Step()
        if live.held_ack is not None:
            # A 2xx still waits for the ACK with the answer (the callee hung up
            # first, say): it gets one rejecting the offer, or it is resent for 32 s.
            step = self._release_ack(live, None, now)
            return step + self._end(live, status, reason, hangup, now)
        step = self._end_pending(live, status, hangup, now)
        live.call = evolve(
            call,
            state=CallState.TERMINATED,
            end_status=status,
            ended_at=now,
            end_reason=reason,
            hangup=hangup,
        )
        self._calls.pop(call.call_ref, None)
        for fork in live.forks.values():
            if not fork.final and not fork.tx.terminated:
                self._adopt(call.call_ref, fork, now)
        keys = [(call.a.call_id, call.a.local_tag), (call.b.call_id, call.b.local_tag)]
        keys.extend((f.leg.call_id, f.leg.local_tag) for f in live.forks.values())
        for key in keys:
            self._by_dialog.pop(key, None)
        for notifier in live.notifiers:
            ids = (live.refer_ids or {}).get(notifier, {})
            self._linger(live.call, notifier, ids, now)
        for pending, unacked in list(self._unacked.items()):
            if unacked.call_ref == call.call_ref:
                del self._unacked[pending]
        if live.ticket is not None and self.admission is not None:
            self.admission.release(live.ticket)
            live.ticket = None
        self._count(f"calls_ended_{reason.value}")
        logger.info("- call %s ended (%d, %s)", call.call_ref, status, reason.value)
        if live.session is not None:
            self._by_session.pop(live.session.session_id, None)
            return step + Step(
                media=(DeleteMedia(call.call_ref, live.session.session_id, live.call),)
            )
        if live.is_subscription:
            return step  # not a call attempt: no CDR
        return step + Step(ended=(live.call,))

    def _end_pending(self, live: _Live, status: int, hangup: LegSide | None, now: float) -> Step:
        """What an ending call still owes (RFC 3261 15.1.2): a final response to the
        caller's INVITE and to each relayed request, CANCEL to unanswered forks, and
        ACKs for 2xx that may still come (``_ack_later``)."""
        step = Step()
        reliable = live.a_reliable
        if reliable is not None:
            reliable.outstanding = None
            reliable.queue.clear()
            if reliable.held is not None:
                # The 2xx never left (it waited for a PRACK): the caller gets a final
                # answer below instead.
                reliable.held = None
                live.a_final = False
        if not live.a_final and live.invite_tx is not None:
            final = status if status >= 300 else 487 if hangup is LegSide.A else 480
            response = make_response(live.a_request, final, to_tag=live.call.a.local_tag)
            step = step + self._answer_a(live, response, now)
        if live.winner is None and live.forks:
            step = step + self._cancel_forks(live, now)
        winner = live.winner
        if winner is not None and not winner.tx.terminated and winner.tx not in self._acks:
            dialog = winner.leg.dialog
            if dialog is not None:
                self._ack_later[winner.tx] = (winner.leg, dialog, winner.request.cseq.seq)
        for client in live.relayed or ():
            role = self._by_client.get(client)
            if role is None or role.relayed is None:
                continue
            relayed = role.relayed
            if not relayed.cancelled:
                realm = live.call.leg(relayed.from_side).realm
                response = make_response(relayed.request, 487)
                step = step + self._send_response(relayed.server, response, now, realm)
            leg = live.call.leg(relayed.from_side.other)
            if isinstance(client, ClientInviteTransaction):
                if leg.dialog is not None:
                    self._ack_later[client] = (leg, leg.dialog, client.request.cseq.seq)
                # A re-INVITE the far side only answered 1xx would wait for ever in
                # Proceeding (no Timer B there): CANCEL it (RFC 3261 9.1), which also
                # bounds it to 64*T1; before any 1xx, on the first (``_response``).
                # One its requester cancelled has its CANCEL sent or pending already.
                if relayed.cancelled:
                    pass
                elif client.can_cancel:
                    step = step + self._send_cancel(live.call.call_ref, client, now)
                elif not client.terminated:
                    relayed.cancel_pending = True
        live.relayed = None
        for client in live.own_invites or ():
            # A re-INVITE answered only 1xx would wait for ever in Proceeding.
            if client.can_cancel:
                step = step + self._send_cancel(live.call.call_ref, client, now)
            elif not client.terminated:
                self._cancel_on_1xx.add(client)
        live.own_invites = None
        for tx, notify in live.early_notifies:
            # NOTIFYs that overtook a SUBSCRIBE's 2xx that never came: no subscription
            # (RFC 6665 4.1.2.4), and a non-INVITE transaction in Trying has no timer.
            realm = live.call.b.realm
            step = step + self._send_response(tx, make_response(notify, 481), now, realm)
        live.early_notifies.clear()
        return step


class _Expiring(Protocol):
    @property
    def expires(self) -> float: ...


_E = TypeVar("_E", bound=_Expiring)


def _make_room(kept: OrderedDict[tuple[str, str], _E], now: float) -> None:
    """Forget entries of ``kept`` from the oldest on, while the oldest has expired or
    ``kept`` is full (``MAX_ORPHANS``): room for one more."""
    while kept:
        oldest = next(iter(kept.values()))
        if oldest.expires > now and len(kept) < MAX_ORPHANS:
            break
        kept.popitem(last=False)


def _one_less(request: Request) -> str:
    """The Max-Forwards of a request routed on for ``request`` (RFC 3261 16.6 step 3:
    one less; MAX_FORWARDS at most, and when it has none). Requests with none left
    are answered 483 before."""
    max_forwards = request.max_forwards
    return str(MAX_FORWARDS if max_forwards is None else min(MAX_FORWARDS, max_forwards - 1))


def _with_version(body: bytes, version: int) -> bytes:
    """An SDP body the B2BUA wrote (``rewrite_sdp``: v= first, then its o=) with
    ``version`` for the o= line's sess-version."""
    start = body.index(b"\no=") + 1
    end = body.index(b"\n", start)
    line = body[start:end].rstrip(b"\r")
    fields = line.split(b" ")
    fields[2] = b"%d" % version
    return body[:start] + b" ".join(fields) + body[start + len(line) :]


def _refer_event(request: Request) -> bool:
    """Whether ``request`` (a NOTIFY) is about a REFER (RFC 3515 2.4.4: Event: refer)."""
    event = request.headers.get("Event") or ""
    return event.split(";", 1)[0].strip().lower() == "refer"


def _refer_id(request: Request) -> int | None:
    """The id parameter of a REFER NOTIFY's Event (RFC 3515 2.4.6), if a number."""
    event = request.headers.get("Event") or ""
    for item in event.split(";")[1:]:
        name, _, value = item.partition("=")
        if name.strip().lower() == "id":
            value = value.strip()
            return int(value) if value.isdigit() else None
    return None


def _subscription_of(request: Request, ids: dict[int, int]) -> int | None:
    """Which of ``ids`` (REFER CSeqs on the notifier's leg) a REFER NOTIFY is about:
    its Event id, or without one the first REFER's (RFC 3515 2.4.6)."""
    given = _refer_id(request)
    if given is not None:
        return given if given in ids else None
    return min(ids) if ids else None


def _refer_notify_headers(
    request: Request, ids: dict[int, int], headers: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """``headers`` of a relayed REFER NOTIFY, its Event id naming the REFER as the
    referrer sent it: each leg numbers its own CSeqs (RFC 3515 2.4.6)."""
    given = _refer_id(request)
    if given is None or given not in ids:
        return headers
    event = f"refer;id={ids[given]}"
    return [(n, event if n.lower() == "event" else v) for n, v in headers]


def _with_local_keys(session: MediaSession, side: Side, offers: Sequence[LegOffer]) -> MediaSession:
    """``session`` with the relay's keys on ``side`` that ``offers`` chose anew."""
    streams = list(session.streams)
    for index, offer in enumerate(offers):
        if offer.local_crypto is None or index >= len(streams):
            continue
        stream = streams[index]
        leg = evolve(stream.leg(side), local_crypto=offer.local_crypto)
        streams[index] = evolve(stream, a=leg) if side is Side.A else evolve(stream, b=leg)
    return evolve(session, streams=tuple(streams))


def _subscription_ended(request: Request, ids: dict[int, int]) -> None:
    """A terminating REFER NOTIFY ends its own subscription, not its dialog's others."""
    which = _subscription_of(request, ids)
    if which is not None:
        del ids[which]
    elif _refer_id(request) is None:
        ids.clear()


def _norefersub(message: Message, realm: Realm | None) -> list[tuple[str, str]]:
    """RFC 4488: Refer-Sub of a REFER or of its 2xx, and the norefersub option tag of
    its Supported and Require, to relay (none the realm's keep-list copies)."""
    out: list[tuple[str, str]] = []
    if realm is None or not realm.keeps("Refer-Sub"):
        out.extend(("Refer-Sub", v) for v in message.headers.fields("Refer-Sub"))
    for name in ("Supported", "Require"):
        if realm is not None and realm.keeps(name):
            continue
        tokens = {t.strip().lower() for v in message.headers.fields(name) for t in v.split(",")}
        if "norefersub" in tokens:
            out.append((name, "norefersub"))
    return out


def _terminated(request: Request) -> bool:
    """Whether a NOTIFY ends its subscription (RFC 6665 4.1.3)."""
    state = request.headers.get("Subscription-State") or ""
    return state.split(";", 1)[0].strip().lower() == "terminated"


#: The status line of a sipfrag (RFC 3261 25.1 Status-Line), its code captured.
_SIPFRAG_STATUS: Final = re.compile(rb"SIP/2\.0 ([1-6][0-9]{2})(?:[ \t]|\r?$)")


def _sipfrag_status(body: bytes) -> bytes:
    """The status line of a REFER NOTIFY's message/sipfrag body (RFC 3515 2.4.5: the
    body must hold at least that), with its status's standard phrase. Headers the
    fragment may also carry are the transfer target's (Contact, Via ...), and its
    reason phrase is free text: of the other realm, they do not cross. A first line
    that is no status line crosses as nothing."""
    line, _, _ = body.partition(b"\n")
    match = _SIPFRAG_STATUS.match(line.rstrip(b"\r"))
    if match is None:
        return b""
    code = int(match[1])
    return f"SIP/2.0 {code} {reason_phrase(code)}\r\n".encode()


def _reliable_rseq(response: Response) -> int | None:
    """The RSeq of a reliable provisional (RFC 3262 7.1), None for any other."""
    if "100rel" not in {t.lower() for t in response.tokens("Require")}:
        return None
    text = (response.headers.get("RSeq") or "").strip()
    return int(text) if text.isdigit() else None


def _carries_sdp(request: Request) -> bool:
    """Whether ``request`` carries an SDP body (an offer, in an UPDATE: RFC 3311 5)."""
    try:
        return parse_sdp(request) is not None
    except SdpError:
        return False  # answered by _relay (400/488)


def _asks_to_refresh(request: Request) -> bool:
    """RFC 4028 9: the UAC supports session timers and chose to refresh itself."""
    tags = {t.lower() for t in (*request.tokens("Supported"), *request.tokens("Require"))}
    value = request.headers.get("Session-Expires") or ""
    params = {p.strip().lower().replace(" ", "") for p in value.split(";")[1:]}
    return "timer" in tags and "refresher=uac" in params


def _retry_after_header(response: Response) -> list[tuple[str, str]]:
    """A relayed Retry-After, its delta-seconds only: the comment (RFC 3261 20.33,
    "120 (maintenance of pbx1)") is free text of the other realm."""
    seconds = _retry_after(response)
    return [] if seconds is None else [("Retry-After", str(int(seconds)))]


def _retry_after(response: Response) -> float | None:
    """The delta-seconds of a Retry-After (RFC 3261 20.33: a comment and params may
    follow), or None."""
    return _delta_of((response.headers.get("Retry-After") or "").split("(", 1)[0] or None)


def _delta_of(value: str | None) -> int | None:
    """The delta-seconds that starts a header value (Session-Expires, Min-SE: RFC
    4028 params may follow), or None."""
    return None if value is None else parse_delta(value.split(";", 1)[0].strip())


def _registered_caller(request: Request, users: Sequence[str]) -> str | None:
    """Who ``request`` is from among the ``users`` registered from where it came: its
    From user, or (an anonymous From) the first of them; None when neither."""
    if not users:
        return None
    if is_anonymous(request):
        return users[0]
    try:
        from_user, _ = uri_user_host(request.from_.uri)
    except ParseError:
        return None
    return from_user if from_user in users else None


def _registered_callee(request: Request) -> Identity | None:
    """The identity of a phone reached through its registration: the user of the
    Request-URI it was registered under (its REGISTER proved it, RFC 3261 10.2)."""
    try:
        user, _ = uri_user_host(request.uri)
    except ParseError:
        return None
    return None if not user else Identity(None, user)


def _is_emergency(decision: RouteDecision | None) -> bool:
    """Whether ``decision`` is an emergency route's (refused by its route's limits
    only, no digest asked)."""
    return isinstance(decision, TrunkRoute | RegisteredRoute) and decision.emergency


def _with_host(uri_text: str, host: str) -> str:
    """``uri_text`` (a SIP or SIPS URI) with ``host`` for its host and no port; any
    other URI (tel:) as it is."""
    try:
        uri = parse_uri(uri_text)
    except ParseError:
        return uri_text
    if not isinstance(uri, SipUri):
        return uri_text
    return str(evolve(uri, host=format_host(host), port=None))


#: A q or expires value of a 3xx Contact that may cross (RFC 3261 25.1 qvalue, delta).
_REDIRECT_PARAM: Final = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,3})?")


def _redirect_contacts(response: Response, local: ListenAddress) -> list[str]:
    """The Contacts of a 3xx relayed to the caller: each names the SBC's own address in
    the caller's realm with the user part of a Contact the callee gave, so that the
    caller's new INVITE comes back through the SBC and is routed like any call (as
    Refer-To is). The callee's hosts, of the other realm, never cross."""
    try:
        contacts = response.contacts
    except ParseError:
        return []
    out: list[str] = []
    for address in contacts[:MAX_FORKS]:
        user, _ = uri_user_host(address.uri)
        if not user:
            continue
        contact = contact_for(local, user)
        # The caller tries Contacts by q and may cache them for expires (RFC 3261
        # 8.1.3.4, 20.10): both cross, checked, as numbers.
        for name in ("q", "expires"):
            value = address.param(name)
            if value and _REDIRECT_PARAM.fullmatch(value):
                contact += f";{name}={value}"
        if contact not in out:
            out.append(contact)
    return out


def _capabilities(method: str, response: Response, realm: Realm | None) -> list[tuple[str, str]]:
    """The CAPABILITY_HEADERS of ``response`` (to a ``method`` request) to relay:
    on an error answer or any answer to OPTIONS; none its realm's keep-list copies."""
    if response.status < 300 and method != "OPTIONS":
        return []
    out: list[tuple[str, str]] = []
    for name in CAPABILITY_HEADERS:
        if realm is not None and realm.keeps(name):
            continue
        out.extend((name, value) for value in response.headers.fields(name))
    return out


def _set_via(
    request: Request, transport: Transport, port: int, *, branch: str | None = None
) -> None:
    """Rewrite the SBC's (only) Via for another transport of the same address
    (RFC 3261 18.1.1: the top Via names the transport the request goes over)."""
    value = request.headers.get("Via")
    assert value is not None
    via = evolve(Via.parse(value), transport=transport.name, port=port)
    if branch is not None:
        via = via.with_param("branch", branch)
    request.headers.set("Via", str(via))
    request.invalidate()


def _uri_host(address: str) -> str | None:
    """The host of the SIP URI of a name-addr or URI, as a URI writes it ([v6]);
    None when it is no SIP URI."""
    try:
        uri = Address.parse(address).uri
    except ParseError:
        return None
    return format_host(uri.host) if isinstance(uri, SipUri) else None


def _q_of(target: Target) -> float:
    # RFC 3261 10.2.1.2: a contact without q ranks as 1.0, the top.
    return 1.0 if target.q is None else target.q


def _by_q(contacts: Sequence[Target]) -> list[tuple[Target, ...]]:
    """A registered user's contacts as target groups, highest q first (RFC 3261 16.6:
    sequential search by q, parallel within one q), at most ``MAX_FORKS`` in all.
    The order within a q is kept (the location service's: the latest first)."""
    ordered = sorted(contacts, key=_q_of, reverse=True)[:MAX_FORKS]
    return [tuple(group) for _, group in itertools.groupby(ordered, key=_q_of)]


def _next_targets(live: _Live) -> str:
    """What a call fails over to, for the log: a gateway, or contacts of some q."""
    if isinstance(live.route, RegisteredRoute) and live.pending:
        return f"the contacts of q={_q_of(live.pending[0][0]):g}"
    return "the next gateway"


def _better(candidate: Response, best: Response) -> bool:
    """RFC 3261 16.7 step 6, roughly: 6xx wins, then the lowest class, 503 last of 5xx.

    Within 4xx (16.7 leaves the choice open) a busy, then an unavailable callee goes
    first: what the caller can act on, not a stale contact's 404.
    """

    def rank(status: int) -> tuple[int, int]:
        if status >= 600:
            return (0, status)
        if status == 503:
            return (5, 999)
        if status in (486, 480):
            return (4, -2 if status == 486 else -1)
        return (status // 100, status)

    return rank(candidate.status) < rank(best.status)


__all__ = [
    "ALLOW",
    "AllocateMedia",
    "AuthFailure",
    "AuthVerdict",
    "CallController",
    "CallTimers",
    "DeleteMedia",
    "MediaCommand",
    "NoTargets",
    "RealmPolicy",
    "RegisterOutcome",
    "RegisterRelayPort",
    "RegistrarPort",
    "Step",
    "Target",
    "TargetSource",
    "TrunkPlan",
    "UpdateMedia",
]


#: Addresses behind NAT by convention: RFC 1918, RFC 6598 (carrier-grade NAT), RFC 4193.
_NATTED: Final = tuple(
    ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)


def _address_scope(address: IPv4Address | IPv6Address) -> str:
    """Loopback, link-local, NAT-private or other: a peer of one scope naming an
    address of another is not followed there (see `_dialog_destination`)."""
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link"
    if address.is_multicast or address.is_unspecified:
        return "none"
    if any(address in network for network in _NATTED):
        return "private"
    return "global"
