"""SIP transactions (RFC 3261 17, with the RFC 6026 Accepted state).

Sans-I/O: nothing here touches a socket or the clock. Every input takes ``now``
(seconds, any monotonic origin) and returns an :class:`Output`, a frozen value with

* ``messages``: :class:`Outgoing` items, each the message, its bytes (serialized
  once, so a retransmission is the same octets) and the opaque ``destination``
  given when the transaction was created (an address or a connection: whatever the
  transport layer passed in; it is never looked at here, but for the
  ``remote_host`` of a request's source, by which the layer counts each peer's
  server transactions);
* ``events``: frozen dataclasses for the transaction user (TU), listed below.

Timers are absolute deadlines; ``next_deadline()`` says when to call
``handle_timer(now)`` (one transaction) or ``handle_timers(now)`` (the layer).

The four state machines are the four transition tables below, one per figure:
RFC 3261 figure 5 (client INVITE, with RFC 6026's Accepted state), figure 6
(client non-INVITE), RFC 6026 figure 7 (server INVITE, which replaces RFC 3261's)
and RFC 3261 figure 8 (server non-INVITE). A (state, stimulus) pair that is not in
a table is absorbed, as the figures absorb it. On a state change the timers that do
not run in the new state (``LIVE_TIMERS``) are cancelled.

Events:

* :class:`RequestReceived` - a new request created a server transaction.
* :class:`CancelReceived` - a new CANCEL, with the INVITE server transaction it
  cancels (RFC 3261 9.2), or None when it matches no transaction (answer 481). A
  CANCEL of a live non-INVITE transaction (of a registered method,
  ``CANCELLABLE_METHODS``) is not reported: the layer answers it 200 itself, and it
  has no effect on that transaction (9.2).
* :class:`ResponseReceived` - a response for the TU (every one but a 2xx to INVITE).
* :class:`InviteAccepted` - a 2xx to our INVITE, first or retransmitted or from
  another fork (RFC 6026 7.2). The transaction does not ACK it: the TU must
  (RFC 3261 13.2.2.4).
* :class:`AckReceived` - an ACK that no transaction absorbed: normally the ACK for
  a 2xx, which belongs to the dialog (RFC 3261 17.2.3, RFC 6026 7.1).
* :class:`StrayResponse` - a response that matches no client transaction
  (RFC 3261 17.1.3 / 18.1.2: a proxy would forward it; a UA drops it).
* :class:`TransactionTimeout` - Timer B, F or H fired (B also 64*T1 after the TU's
  CANCEL of an INVITE that got no final response, RFC 3261 9.1).
* :class:`TransportError` - the transport reported a failure to send one of the
  transaction's messages: a request or ACK (17.1.4) or a response (17.2.4). Every
  transaction but an INVITE server one then ends; that one goes on (RFC 6026 figure
  7), and the TU still owes it a final response if it has none.
* :class:`TransactionTerminated` - the transaction reached Terminated.
* :class:`RequestRefused` - the layer, or the source's share of it, is full; a
  stateless 503 was sent.

A TU normally drives a :class:`TransactionLayer`::

    out = layer.receive(parse_message(data), source, now, reliable=False)
    for event in out.events:
        if isinstance(event, RequestReceived):
            out += layer.send_response(event.transaction, make_response(...), now)
    send_all(out.messages); wake_at(layer.next_deadline())

Transactions owned by a layer must be driven through the layer (its
``send_response`` / ``transport_error`` / ``handle_timers``) so that it can keep
its timer heap and forget terminated transactions; standalone transactions
(tests, tools) are driven directly.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, Final

from sbc.sip.errors import ParseError, SipError
from sbc.sip.headers import Via
from sbc.sip.message import Headers, Request, Response, make_response, new_tag

logger = logging.getLogger(__name__)

#: Transactions a layer holds at once; beyond it new requests get a stateless 503.
MAX_TRANSACTIONS: Final = 50_000
#: Server transactions one source host holds at once; beyond it its new requests get
#: the same 503: one peer (a scanner, a PBX in a loop) must not take the whole table.
MAX_TRANSACTIONS_PER_SOURCE: Final = MAX_TRANSACTIONS // 10
#: The answer to a request that would exceed either bound (RFC 3261 21.5.4).
OVERLOAD_STATUS: Final = 503
#: Seconds in the Retry-After of that 503 (RFC 3261 20.33).
OVERLOAD_RETRY_AFTER: Final = 5
#: Seconds between two warnings that the layer is full: a flood must not flood the log.
OVERLOAD_LOG_INTERVAL: Final = 10.0
#: RFC 3261 8.1.1.6: Max-Forwards of an ACK or CANCEL built here when the INVITE has none.
DEFAULT_MAX_FORWARDS: Final = 70
#: The methods whose transactions a CANCEL is matched to besides INVITE's (RFC 3261
#: 9.2): every non-INVITE method of the IANA registry that a CANCEL can refer to (RFC
#: 3261, 3262, 3311, 3428, 3515, 3903, 6086, 6665), most used first. Tried one by one
#: on a CANCEL that matches no INVITE (rare: 9.1 says not to send one), this costs the
#: requests nothing, where an index of every request would (0.3-1 us each). A CANCEL
#: of an unregistered extension method's transaction goes to the TU unmatched (481).
CANCELLABLE_METHODS: Final = (
    "OPTIONS",
    "REGISTER",
    "BYE",
    "SUBSCRIBE",
    "NOTIFY",
    "MESSAGE",
    "INFO",
    "UPDATE",
    "PRACK",
    "REFER",
    "PUBLISH",
)


class TransactionError(SipError):
    """The TU asked for something the transaction state does not allow."""


class TransactionLimitError(TransactionError):
    """A client transaction would exceed the layer's bound."""


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """RFC 3261 17.1.1.1 / table 4 timer values, in seconds."""

    #: RTT estimate.
    t1: float = 0.5
    #: Maximum retransmit interval for non-INVITE requests and INVITE responses.
    t2: float = 4.0
    #: Maximum duration a message will remain in the network.
    t4: float = 5.0
    #: Timer D over unreliable transports: "at least 32 seconds" (17.1.1.2).
    timer_d: float = 32.0


class TransactionState(Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's hash is Python code
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"  # RFC 6026 7.1 / 7.2
    TERMINATED = "Terminated"


class Timer(Enum):
    """RFC 3261 table 4, plus L (RFC 6026 7.1) and M (RFC 6026 7.2)."""

    __hash__ = object.__hash__  # members are singletons; Enum's hash is Python code

    A = "A"  # INVITE request retransmit interval, UDP only
    B = "B"  # INVITE transaction timeout
    D = "D"  # wait time for response retransmits
    E = "E"  # non-INVITE request retransmit interval, UDP only
    F = "F"  # non-INVITE transaction timeout
    G = "G"  # INVITE response retransmit interval
    H = "H"  # wait time for ACK receipt
    I = "I"  # wait time for ACK retransmits  # noqa: E741
    J = "J"  # wait time for non-INVITE request retransmits
    K = "K"  # wait time for response retransmits
    L = "L"  # wait time for accepted INVITE request retransmits
    M = "M"  # wait time for retransmission of 2xx to INVITE or additional 2xx


class Stimulus(Enum):
    """What arrives at a transaction, named as the figures label their arcs."""

    __hash__ = object.__hash__  # members are singletons; Enum's hash is Python code

    RECEIVED_1XX = "1xx received"
    RECEIVED_2XX = "2xx received"
    RECEIVED_300_699 = "300-699 received"
    REQUEST = "request retransmission received"
    ACK = "ACK received"
    TU_1XX = "1xx from TU"
    TU_2XX = "2xx from TU"
    TU_300_699 = "300-699 from TU"
    TRANSPORT_ERROR = "transport error"
    CANCEL_SENT = "CANCEL sent"  # RFC 3261 9.1; no figure has it


class Action(Enum):
    """What a transition does, in the figures' words."""

    __hash__ = object.__hash__  # members are singletons; Enum's hash is Python code

    RETRANSMIT_REQUEST = "resend request"
    PASS_TO_TU = "pass response to TU"
    SEND_ACK = "send ACK"
    SEND_RESPONSE = "send response"
    RESEND_RESPONSE = "resend last response"
    PASS_ACK_TO_TU = "pass ACK to TU"
    REPORT_TIMEOUT = "inform TU of timeout"
    REPORT_TRANSPORT_ERROR = "inform TU of transport error"


@dataclass(frozen=True, slots=True)
class Transition:
    """One arc of a figure: the next state, what to do, which timers to (re)start."""

    state: TransactionState
    actions: tuple[Action, ...] = ()
    start: tuple[Timer, ...] = ()


TransitionTable = Mapping[tuple[TransactionState, Stimulus | Timer], Transition]


def _go(state: TransactionState, *actions: Action, start: tuple[Timer, ...] = ()) -> Transition:
    return Transition(state, actions, start)


_S = TransactionState
_In = Stimulus
_Do = Action

#: RFC 3261 figure 5, with RFC 6026 figure 5: a 2xx leads to Accepted, not Terminated.
CLIENT_INVITE_TABLE: Final[TransitionTable] = {
    (_S.CALLING, Timer.A): _go(_S.CALLING, _Do.RETRANSMIT_REQUEST, start=(Timer.A,)),
    (_S.CALLING, Timer.B): _go(_S.TERMINATED, _Do.REPORT_TIMEOUT),
    (_S.CALLING, _In.TRANSPORT_ERROR): _go(_S.TERMINATED, _Do.REPORT_TRANSPORT_ERROR),
    (_S.CALLING, _In.RECEIVED_1XX): _go(_S.PROCEEDING, _Do.PASS_TO_TU),
    (_S.CALLING, _In.RECEIVED_2XX): _go(_S.ACCEPTED, _Do.PASS_TO_TU, start=(Timer.M,)),
    (_S.CALLING, _In.RECEIVED_300_699): _go(
        _S.COMPLETED, _Do.SEND_ACK, _Do.PASS_TO_TU, start=(Timer.D,)
    ),
    (_S.PROCEEDING, _In.RECEIVED_1XX): _go(_S.PROCEEDING, _Do.PASS_TO_TU),
    (_S.PROCEEDING, _In.RECEIVED_2XX): _go(_S.ACCEPTED, _Do.PASS_TO_TU, start=(Timer.M,)),
    (_S.PROCEEDING, _In.RECEIVED_300_699): _go(
        _S.COMPLETED, _Do.SEND_ACK, _Do.PASS_TO_TU, start=(Timer.D,)
    ),
    # RFC 3261 9.1: with no final response 64*T1 after the CANCEL, the INVITE is taken
    # as cancelled and its transaction destroyed (Timer B again: 64*T1, then timeout).
    (_S.PROCEEDING, _In.CANCEL_SENT): _go(_S.PROCEEDING, start=(Timer.B,)),
    (_S.PROCEEDING, Timer.B): _go(_S.TERMINATED, _Do.REPORT_TIMEOUT),
    (_S.COMPLETED, _In.RECEIVED_300_699): _go(_S.COMPLETED, _Do.SEND_ACK),
    (_S.COMPLETED, _In.TRANSPORT_ERROR): _go(_S.TERMINATED, _Do.REPORT_TRANSPORT_ERROR),
    (_S.COMPLETED, Timer.D): _go(_S.TERMINATED),
    (_S.ACCEPTED, _In.RECEIVED_2XX): _go(_S.ACCEPTED, _Do.PASS_TO_TU),
    (_S.ACCEPTED, Timer.M): _go(_S.TERMINATED),
}

#: RFC 3261 figure 6.
CLIENT_NON_INVITE_TABLE: Final[TransitionTable] = {
    (_S.TRYING, Timer.E): _go(_S.TRYING, _Do.RETRANSMIT_REQUEST, start=(Timer.E,)),
    (_S.TRYING, Timer.F): _go(_S.TERMINATED, _Do.REPORT_TIMEOUT),
    (_S.TRYING, _In.TRANSPORT_ERROR): _go(_S.TERMINATED, _Do.REPORT_TRANSPORT_ERROR),
    (_S.TRYING, _In.RECEIVED_1XX): _go(_S.PROCEEDING, _Do.PASS_TO_TU),
    (_S.TRYING, _In.RECEIVED_2XX): _go(_S.COMPLETED, _Do.PASS_TO_TU, start=(Timer.K,)),
    (_S.TRYING, _In.RECEIVED_300_699): _go(_S.COMPLETED, _Do.PASS_TO_TU, start=(Timer.K,)),
    (_S.PROCEEDING, Timer.E): _go(_S.PROCEEDING, _Do.RETRANSMIT_REQUEST, start=(Timer.E,)),
    (_S.PROCEEDING, Timer.F): _go(_S.TERMINATED, _Do.REPORT_TIMEOUT),
    (_S.PROCEEDING, _In.TRANSPORT_ERROR): _go(_S.TERMINATED, _Do.REPORT_TRANSPORT_ERROR),
    (_S.PROCEEDING, _In.RECEIVED_1XX): _go(_S.PROCEEDING, _Do.PASS_TO_TU),
    (_S.PROCEEDING, _In.RECEIVED_2XX): _go(_S.COMPLETED, _Do.PASS_TO_TU, start=(Timer.K,)),
    (_S.PROCEEDING, _In.RECEIVED_300_699): _go(_S.COMPLETED, _Do.PASS_TO_TU, start=(Timer.K,)),
    (_S.COMPLETED, Timer.K): _go(_S.TERMINATED),
}

#: RFC 6026 figure 7, which replaces RFC 3261's: a 2xx from the TU leads to Accepted,
#: and a transport error is reported to the TU without ending the transaction. Ended,
#: it would let a retransmitted INVITE make a new transaction: the error RFC 6026 fixes.
SERVER_INVITE_TABLE: Final[TransitionTable] = {
    (_S.PROCEEDING, _In.REQUEST): _go(_S.PROCEEDING, _Do.RESEND_RESPONSE),
    (_S.PROCEEDING, _In.TU_1XX): _go(_S.PROCEEDING, _Do.SEND_RESPONSE),
    (_S.PROCEEDING, _In.TU_2XX): _go(_S.ACCEPTED, _Do.SEND_RESPONSE, start=(Timer.L,)),
    (_S.PROCEEDING, _In.TU_300_699): _go(_S.COMPLETED, _Do.SEND_RESPONSE, start=(Timer.G, Timer.H)),
    (_S.PROCEEDING, _In.TRANSPORT_ERROR): _go(_S.PROCEEDING, _Do.REPORT_TRANSPORT_ERROR),
    (_S.COMPLETED, _In.REQUEST): _go(_S.COMPLETED, _Do.RESEND_RESPONSE),
    (_S.COMPLETED, Timer.G): _go(_S.COMPLETED, _Do.RESEND_RESPONSE, start=(Timer.G,)),
    (_S.COMPLETED, Timer.H): _go(_S.TERMINATED, _Do.REPORT_TIMEOUT),
    (_S.COMPLETED, _In.ACK): _go(_S.CONFIRMED, start=(Timer.I,)),
    (_S.COMPLETED, _In.TRANSPORT_ERROR): _go(_S.COMPLETED, _Do.REPORT_TRANSPORT_ERROR),
    (_S.CONFIRMED, Timer.I): _go(_S.TERMINATED),
    # RFC 6026 7.1: INVITE retransmissions are absorbed, 2xx retransmissions from the
    # TU are sent, and the ACK for the 2xx is not the transaction's: it goes up.
    (_S.ACCEPTED, _In.REQUEST): _go(_S.ACCEPTED),
    (_S.ACCEPTED, _In.ACK): _go(_S.ACCEPTED, _Do.PASS_ACK_TO_TU),
    (_S.ACCEPTED, _In.TU_2XX): _go(_S.ACCEPTED, _Do.SEND_RESPONSE),
    (_S.ACCEPTED, _In.TRANSPORT_ERROR): _go(_S.ACCEPTED, _Do.REPORT_TRANSPORT_ERROR),
    (_S.ACCEPTED, Timer.L): _go(_S.TERMINATED),
}

#: RFC 3261 figure 8.
SERVER_NON_INVITE_TABLE: Final[TransitionTable] = {
    (_S.TRYING, _In.TU_1XX): _go(_S.PROCEEDING, _Do.SEND_RESPONSE),
    (_S.TRYING, _In.TU_2XX): _go(_S.COMPLETED, _Do.SEND_RESPONSE, start=(Timer.J,)),
    (_S.TRYING, _In.TU_300_699): _go(_S.COMPLETED, _Do.SEND_RESPONSE, start=(Timer.J,)),
    (_S.PROCEEDING, _In.TU_1XX): _go(_S.PROCEEDING, _Do.SEND_RESPONSE),
    (_S.PROCEEDING, _In.REQUEST): _go(_S.PROCEEDING, _Do.RESEND_RESPONSE),
    (_S.PROCEEDING, _In.TU_2XX): _go(_S.COMPLETED, _Do.SEND_RESPONSE, start=(Timer.J,)),
    (_S.PROCEEDING, _In.TU_300_699): _go(_S.COMPLETED, _Do.SEND_RESPONSE, start=(Timer.J,)),
    (_S.PROCEEDING, _In.TRANSPORT_ERROR): _go(_S.TERMINATED, _Do.REPORT_TRANSPORT_ERROR),
    (_S.COMPLETED, _In.REQUEST): _go(_S.COMPLETED, _Do.RESEND_RESPONSE),
    (_S.COMPLETED, _In.TRANSPORT_ERROR): _go(_S.TERMINATED, _Do.REPORT_TRANSPORT_ERROR),
    (_S.COMPLETED, Timer.J): _go(_S.TERMINATED),
}


# -- outputs and events ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to send: its bytes go to ``destination``.

    ``transaction`` is whom to tell (``transport_error``) if the send fails; None
    for a stateless response.
    """

    message: Request | Response
    #: Not in repr: an SDP body may hold SRTP keys (a=crypto), and reprs end up in logs.
    data: bytes = field(repr=False)
    destination: object
    transaction: Transaction | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class RequestReceived:
    transaction: ServerTransaction
    request: Request


@dataclass(frozen=True, slots=True)
class CancelReceived:
    """A CANCEL and the INVITE server transaction it matches (RFC 3261 9.2), if any."""

    transaction: ServerNonInviteTransaction
    request: Request
    invite: ServerInviteTransaction | None


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    transaction: ClientTransaction
    response: Response


@dataclass(frozen=True, slots=True)
class InviteAccepted:
    """A 2xx to our INVITE; the TU sends the ACK (RFC 3261 13.2.2.4, RFC 6026 7.2)."""

    transaction: ClientInviteTransaction
    response: Response


@dataclass(frozen=True, slots=True)
class AckReceived:
    """An ACK for the TU: no transaction absorbed it (RFC 3261 17.2.3, RFC 6026 7.1)."""

    request: Request
    source: object
    transaction: ServerInviteTransaction | None = None


@dataclass(frozen=True, slots=True)
class StrayResponse:
    response: Response
    source: object


@dataclass(frozen=True, slots=True)
class TransactionTimeout:
    transaction: Transaction
    timer: Timer


@dataclass(frozen=True, slots=True)
class TransportError:
    transaction: Transaction


@dataclass(frozen=True, slots=True)
class TransactionTerminated:
    transaction: Transaction


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """A request refused statelessly because the layer is full."""

    request: Request
    source: object
    status: int


Event = (
    RequestReceived
    | CancelReceived
    | ResponseReceived
    | InviteAccepted
    | AckReceived
    | StrayResponse
    | TransactionTimeout
    | TransportError
    | TransactionTerminated
    | RequestRefused
)


@dataclass(frozen=True, slots=True)
class Output:
    """What one input produced: messages to send and events for the TU."""

    messages: tuple[Outgoing, ...] = ()
    events: tuple[Event, ...] = ()

    def __add__(self, other: Output) -> Output:
        if not (other.messages or other.events):
            return self
        if not (self.messages or self.events):
            return other
        return Output(self.messages + other.messages, self.events + other.events)

    def __bool__(self) -> bool:
        return bool(self.messages or self.events)


NOTHING: Final = Output()


# -- matching keys --------------------------------------------------------------------

TransactionKey = tuple[Hashable, ...]


def client_key(branch: str, method: str) -> TransactionKey:
    """RFC 3261 17.1.3: a response matches by top Via branch and CSeq method.

    The method matters because a CANCEL shares its INVITE's branch.
    """
    return ("client", branch, method)


def _via_identity(via: Via) -> tuple[Hashable, ...]:
    params = tuple(sorted((name.lower(), value) for name, value in via.params))
    return (via.protocol.upper(), via.transport, via.host.lower(), via.port, params)


def server_key(
    request: Request, method: str | None = None, to_tag: str | None = ""
) -> TransactionKey:
    """RFC 3261 17.2.3: the key of the server transaction ``request`` belongs to.

    ``method`` overrides the request's (CANCEL looks for its INVITE, 9.2); an ACK
    looks for its INVITE. With an RFC 3261 branch the key is branch, sent-by and
    method. Without the magic cookie (an RFC 2543 peer) it is Request-URI, To tag,
    From tag, Call-ID, CSeq number, the top Via and method; ``to_tag`` overrides the
    request's To tag (an ACK carries the tag of our response). The method is last in
    both: a CANCEL matches by the rest (RFC 3261 9.2).
    """
    method = method or request.method
    if method == "ACK":
        method = "INVITE"
    via = request.via
    if via.is_rfc3261_branch:
        return ("rfc3261", via.branch, via.host.lower(), via.port, method)
    tag = request.to.tag if to_tag == "" else to_tag
    return (
        "rfc2543",
        request.raw_uri.strip(),
        tag,
        request.from_.tag,
        request.call_id,
        request.cseq.seq,
        _via_identity(via),
        method,
    )


# -- the transactions -----------------------------------------------------------------


class _Effects:
    """What a run of transitions accumulates before it becomes an Output."""

    __slots__ = ("events", "messages")

    def __init__(self) -> None:
        self.messages: list[Outgoing] = []
        self.events: list[Event] = []

    def output(self) -> Output:
        if not (self.messages or self.events):
            return NOTHING
        return Output(tuple(self.messages), tuple(self.events))


class Transaction:
    """What all four state machines share: state, timers, the table interpreter."""

    TABLE: ClassVar[TransitionTable]
    #: The states in which the figure sends its message again: the client's request
    #: (Timers A, E) or the server's last response (a retransmitted request, Timer G).
    RETRANSMITTING: ClassVar[frozenset[TransactionState]]
    #: Timers that keep running in each state; the others stop on entering it.
    LIVE_TIMERS: ClassVar[Mapping[TransactionState, frozenset[Timer]]]
    INITIAL_STATE: ClassVar[TransactionState]
    kind: ClassVar[str]

    def __init__(
        self,
        request: Request,
        destination: object,
        *,
        reliable: bool,
        config: TimerConfig | None = None,
    ) -> None:
        self.request = request
        self.destination = destination
        self.reliable = reliable
        self.config = config if config is not None else TimerConfig()
        self.state = self.INITIAL_STATE
        self.method = request.method
        self.branch = request.via.branch
        self.key: TransactionKey = ()
        self._deadlines: dict[Timer, float] = {}
        self._interval: float | None = None  # current A, E or G interval
        self._started = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method} {self.branch} {self.state.value}>"

    @property
    def terminated(self) -> bool:
        return self.state is TransactionState.TERMINATED

    def timer_deadline(self, timer: Timer) -> float | None:
        """When ``timer`` fires, or None if it is not running."""
        return self._deadlines.get(timer)

    def next_deadline(self) -> float | None:
        """The earliest running timer's deadline."""
        return min(self._deadlines.values(), default=None)

    def handle_timer(self, now: float) -> Output:
        """Fire every timer whose deadline is at or before ``now``."""
        effects = _Effects()
        self._fire_due(now, effects)
        return effects.output()

    def transport_error(self, now: float) -> Output:
        """The transport failed to send one of this transaction's messages (17.1.4, 17.2.4)."""
        return self._input(Stimulus.TRANSPORT_ERROR, now)

    # -- the interpreter --------------------------------------------------------------

    def _input(
        self, stimulus: Stimulus, now: float, message: Request | Response | None = None
    ) -> Output:
        effects = _Effects()
        self._step(stimulus, now, message, effects)
        # A timer of zero (D, I, J, K on reliable transports) fires at once.
        self._fire_due(now, effects)
        return effects.output()

    def _fire_due(self, now: float, effects: _Effects) -> None:
        deadlines = self._deadlines
        while deadlines:
            timer = min(deadlines, key=deadlines.__getitem__)
            if deadlines[timer] > now:
                return
            del deadlines[timer]
            self._step(timer, now, None, effects)
            deadlines = self._deadlines

    def _step(
        self,
        stimulus: Stimulus | Timer,
        now: float,
        message: Request | Response | None,
        effects: _Effects,
    ) -> None:
        transition = self.TABLE.get((self.state, stimulus))
        if transition is None:
            logger.debug("- %r absorbs %s", self, stimulus.value)
            return
        if transition.state is not self.state:
            logger.debug("- %r -> %s on %s", self, transition.state.value, stimulus.value)
            self.state = transition.state
            live = self.LIVE_TIMERS.get(transition.state, frozenset())
            if self._deadlines:
                self._deadlines = {t: d for t, d in self._deadlines.items() if t in live}
            self._entered(transition.state)
        for action in transition.actions:
            self._do(action, stimulus, message, effects)
        for timer in transition.start:
            self._start_timer(timer, now)
        if self.state is TransactionState.TERMINATED:
            self._deadlines.clear()
            effects.events.append(TransactionTerminated(self))

    def _entered(self, state: TransactionState) -> None:
        """A state change: let go of what no arc of the new state sends again."""

    def _start_timer(self, timer: Timer, now: float) -> None:
        duration = self._duration(timer)
        if duration is not None:
            self._deadlines[timer] = now + duration

    def _duration(self, timer: Timer) -> float | None:
        """RFC 3261 table 4, RFC 6026 7.1 (L) and 7.2 (M); None: the timer is not set."""
        cfg = self.config
        if timer in (Timer.A, Timer.E, Timer.G):
            # 17.1.1.2, 17.1.2.2, 17.2.1: no retransmissions over reliable transports.
            if self.reliable:
                return None
            previous = self._interval
            if previous is None:
                interval = cfg.t1
            elif timer is Timer.A:
                interval = 2 * previous  # 17.1.1.2: A doubles without cap
            elif timer is Timer.E and self.state is TransactionState.PROCEEDING:
                interval = cfg.t2  # 17.1.2.2: E is T2 once a provisional arrived
            else:
                interval = min(2 * previous, cfg.t2)  # E and G cap at T2
            self._interval = interval
            return interval
        if timer in (Timer.B, Timer.F, Timer.H, Timer.L, Timer.M):
            return 64 * cfg.t1
        if timer is Timer.D:
            return 0.0 if self.reliable else cfg.timer_d
        if timer is Timer.J:
            return 0.0 if self.reliable else 64 * cfg.t1
        # Timers I and K.
        return 0.0 if self.reliable else cfg.t4

    def _send(self, message: Request | Response, data: bytes, effects: _Effects) -> None:
        logger.debug("> %r %s", self, message.start_line())
        effects.messages.append(Outgoing(message, data, self.destination, self))

    def _do(
        self,
        action: Action,
        stimulus: Stimulus | Timer,
        message: Request | Response | None,
        effects: _Effects,
    ) -> None:
        if action is Action.REPORT_TIMEOUT:
            assert isinstance(stimulus, Timer)
            # Timer H: a peer never ACKed our final answer, as scanners and floods
            # never do: a line each would let them fill the log. B and F are a peer
            # of ours that does not answer: worth one.
            level = logging.DEBUG if stimulus is Timer.H else logging.INFO
            logger.log(level, "x %r timed out (Timer %s)", self, stimulus.value)
            effects.events.append(TransactionTimeout(self, stimulus))
        elif action is Action.REPORT_TRANSPORT_ERROR:
            # The transport logged the failed send already. A server's is an outside
            # peer gone (a scanner that sends and hangs up does it on every request:
            # as for Timer H, not a line each); a client's is a peer of ours: worth one.
            level = logging.DEBUG if isinstance(self, ServerTransaction) else logging.INFO
            logger.log(level, "x %r transport error", self)
            effects.events.append(TransportError(self))
        else:
            self._do_specific(action, message, effects)

    def _do_specific(
        self, action: Action, message: Request | Response | None, effects: _Effects
    ) -> None:
        raise NotImplementedError(action)


def _states_doing(table: TransitionTable, action: Action) -> frozenset[TransactionState]:
    """The states in which some arc of ``table`` does ``action``."""
    return frozenset(state for (state, _), arc in table.items() if action in arc.actions)


def _copy_for_hop(invite: Request, method: str, to_value: str) -> Request:
    """An ACK or CANCEL built from ``invite`` (RFC 3261 17.1.1.3, 9.1).

    Same Request-URI, Call-ID, From and CSeq number; a single Via, the INVITE's top
    one (same branch); the INVITE's Route header fields; To as given.
    """
    headers = Headers()
    headers.add("Via", invite.headers.values("Via")[0])
    for route in invite.headers.fields("Route"):
        headers.add("Route", route)
    max_forwards = invite.headers.get("Max-Forwards")
    headers.add("Max-Forwards", max_forwards.strip() if max_forwards else str(DEFAULT_MAX_FORWARDS))
    headers.add("From", invite.headers.fields("From")[0])
    headers.add("To", to_value)
    headers.add("Call-ID", invite.headers.fields("Call-ID")[0])
    headers.add("CSeq", f"{invite.cseq.seq} {method}")
    headers.add("Content-Length", "0")
    return Request(method, invite.raw_uri, headers)


class ClientTransaction(Transaction):
    """A client transaction: the TU's request going out (RFC 3261 17.1)."""

    #: Timers the entry arc starts: A and B, or E and F.
    START_TIMERS: ClassVar[tuple[Timer, ...]]

    def __init__(
        self,
        request: Request,
        destination: object,
        *,
        reliable: bool,
        config: TimerConfig | None = None,
    ) -> None:
        super().__init__(request, destination, reliable=reliable, config=config)
        branch = self.branch
        if branch is None or not request.via.is_rfc3261_branch:
            # RFC 3261 8.1.1.7: every request we originate carries a magic-cookie branch.
            raise TransactionError(f"request has no RFC 3261 branch: {branch!r}")
        if request.method == "ACK":
            raise TransactionError("ACK is not sent in a client transaction (17.1)")
        if request.cseq.method != request.method:
            raise TransactionError(
                f"CSeq method {request.cseq.method} differs from {request.method}"
            )
        self.key = client_key(branch, request.method)
        self._data = bytes(request)
        #: The last response received, if any.
        self.last_response: Response | None = None

    def start(self, now: float) -> Output:
        """Send the request; the figure's entry arc (Timers A/B or E/F start)."""
        if self._started:
            raise TransactionError("transaction already started")
        self._started = True
        effects = _Effects()
        self._send(self.request, self._data, effects)
        for timer in self.START_TIMERS:
            self._start_timer(timer, now)
        return effects.output()

    def receive(self, response: Response, now: float) -> Output:
        """A response matched to this transaction (17.1.3)."""
        logger.debug("< %r %s", self, response.start_line())
        status = response.status
        if status < 200:
            stimulus = Stimulus.RECEIVED_1XX
        elif status < 300:
            stimulus = Stimulus.RECEIVED_2XX
        else:
            stimulus = Stimulus.RECEIVED_300_699
        return self._input(stimulus, now, response)

    def _do_specific(
        self, action: Action, message: Request | Response | None, effects: _Effects
    ) -> None:
        if action is Action.RETRANSMIT_REQUEST:
            self._send(self.request, self._data, effects)
        elif action is Action.PASS_TO_TU:
            assert isinstance(message, Response)
            self.last_response = message
            effects.events.append(self._event_for(message))
        else:
            self._do_client(action, message, effects)

    def _entered(self, state: TransactionState) -> None:
        # The request's bytes are only sent again by Timer A/E arcs; an INVITE in
        # Accepted (32 s of RFC 6026 Timer M) keeps nothing it will not send.
        if state not in self.RETRANSMITTING:
            self._data = b""

    def _event_for(self, response: Response) -> Event:
        return ResponseReceived(self, response)

    def _do_client(
        self, action: Action, message: Request | Response | None, effects: _Effects
    ) -> None:
        raise NotImplementedError(action)


class ClientInviteTransaction(ClientTransaction):
    """RFC 3261 17.1.1 and figure 5, with RFC 6026's Accepted state."""

    TABLE = CLIENT_INVITE_TABLE
    RETRANSMITTING = _states_doing(CLIENT_INVITE_TABLE, Action.RETRANSMIT_REQUEST)
    LIVE_TIMERS = {
        TransactionState.CALLING: frozenset({Timer.A, Timer.B}),
        TransactionState.COMPLETED: frozenset({Timer.D}),
        TransactionState.ACCEPTED: frozenset({Timer.M}),
    }
    INITIAL_STATE = TransactionState.CALLING
    START_TIMERS = (Timer.A, Timer.B)
    kind = "client INVITE"

    def __init__(
        self,
        request: Request,
        destination: object,
        *,
        reliable: bool,
        config: TimerConfig | None = None,
    ) -> None:
        if request.method != "INVITE":
            raise TransactionError(f"{request.method} in a client INVITE transaction")
        super().__init__(request, destination, reliable=reliable, config=config)
        #: The ACK this transaction sent for a non-2xx final response (17.1.1.3).
        self.ack: Request | None = None
        self._ack_data = b""

    def _event_for(self, response: Response) -> Event:
        if 200 <= response.status < 300:
            return InviteAccepted(self, response)
        return ResponseReceived(self, response)

    def _do_client(
        self, action: Action, message: Request | Response | None, effects: _Effects
    ) -> None:
        assert action is Action.SEND_ACK and isinstance(message, Response)
        if self.ack is None:
            self.ack = self.build_ack(message)
            self._ack_data = bytes(self.ack)
        # 17.1.1.2: a retransmitted final response gets the same ACK again.
        self._send(self.ack, self._ack_data, effects)

    def build_ack(self, response: Response) -> Request:
        """The ACK for a non-2xx final ``response`` (RFC 3261 17.1.1.3).

        Request-URI, Call-ID, From, CSeq number, top Via and Route as in the INVITE;
        To as in the response (with its tag); CSeq method ACK.
        """
        if response.status < 300:
            raise TransactionError("the ACK for a 2xx is the TU's (RFC 3261 13.2.2.4)")
        return _copy_for_hop(self.request, "ACK", response.headers.fields("To")[0])

    @property
    def can_cancel(self) -> bool:
        """RFC 3261 9.1: CANCEL only after a provisional and before a final response."""
        return self.state is TransactionState.PROCEEDING

    def cancel_sent(self, now: float) -> Output:
        """The TU sent the CANCEL of this INVITE: 64*T1 for a final response (9.1)."""
        return self._input(Stimulus.CANCEL_SENT, now)

    def build_cancel(self) -> Request:
        """The CANCEL for this INVITE (RFC 3261 9.1).

        Request-URI, Call-ID, To, From, CSeq number, top Via (same branch) and Route
        as in the INVITE; CSeq method CANCEL. Send it in its own client non-INVITE
        transaction to this transaction's destination.
        """
        if not self.can_cancel:
            raise TransactionError(f"CANCEL not allowed in state {self.state.value} (RFC 3261 9.1)")
        return _copy_for_hop(self.request, "CANCEL", self.request.headers.fields("To")[0])


class ClientNonInviteTransaction(ClientTransaction):
    """RFC 3261 17.1.2 and figure 6."""

    TABLE = CLIENT_NON_INVITE_TABLE
    RETRANSMITTING = _states_doing(CLIENT_NON_INVITE_TABLE, Action.RETRANSMIT_REQUEST)
    LIVE_TIMERS = {
        TransactionState.TRYING: frozenset({Timer.E, Timer.F}),
        # 17.1.2.2: E and F keep running after a provisional response.
        TransactionState.PROCEEDING: frozenset({Timer.E, Timer.F}),
        TransactionState.COMPLETED: frozenset({Timer.K}),
    }
    INITIAL_STATE = TransactionState.TRYING
    START_TIMERS = (Timer.E, Timer.F)
    kind = "client non-INVITE"

    def __init__(
        self,
        request: Request,
        destination: object,
        *,
        reliable: bool,
        config: TimerConfig | None = None,
    ) -> None:
        if request.method == "INVITE":
            raise TransactionError("INVITE in a client non-INVITE transaction")
        super().__init__(request, destination, reliable=reliable, config=config)


class ServerTransaction(Transaction):
    """A server transaction: a request received, answered by the TU (RFC 3261 17.2)."""

    def __init__(
        self,
        request: Request,
        destination: object,
        *,
        reliable: bool,
        config: TimerConfig | None = None,
    ) -> None:
        super().__init__(request, destination, reliable=reliable, config=config)
        self.key = server_key(request)
        #: The last response sent, and its bytes, for retransmissions.
        self.last_response: Response | None = None
        self._last_data = b""

    def start(self, now: float) -> Output:
        """The figure's entry arc: nothing is sent (see ServerInviteTransaction)."""
        self._started = True
        return NOTHING

    def receive(self, request: Request, now: float) -> Output:
        """A retransmission of the request, or (INVITE) its ACK (17.2.3)."""
        logger.debug("< %r %s", self, request.start_line())
        stimulus = Stimulus.ACK if request.method == "ACK" else Stimulus.REQUEST
        return self._input(stimulus, now, request)

    def send_response(self, response: Response, now: float) -> Output:
        """The TU's response; absorbed if the state no longer takes one (17.2.1, 17.2.2)."""
        status = response.status
        if not 100 <= status <= 699:
            raise TransactionError(f"bad status {status}")
        if status < 200:
            stimulus = Stimulus.TU_1XX
        elif status < 300:
            stimulus = Stimulus.TU_2XX
        else:
            stimulus = Stimulus.TU_300_699
        return self._input(stimulus, now, response)

    @property
    def response_to_tag(self) -> str | None:
        """The To tag of the last response sent (RFC 2543 ACK matching, 17.2.3)."""
        if self.last_response is None:
            return None
        try:
            return self.last_response.to.tag
        except ParseError:
            return None

    def _entered(self, state: TransactionState) -> None:
        # Only Proceeding and Completed resend the last response (17.2.1, 17.2.2); an
        # INVITE in Accepted gets each 2xx from the TU again (RFC 6026 7.1).
        if state not in self.RETRANSMITTING:
            self._last_data = b""

    def _do_specific(
        self, action: Action, message: Request | Response | None, effects: _Effects
    ) -> None:
        if action is Action.SEND_RESPONSE:
            assert isinstance(message, Response)
            self.last_response = message
            data = bytes(message)
            if self.state in self.RETRANSMITTING:
                self._last_data = data
            self._send(message, data, effects)
        elif action is Action.RESEND_RESPONSE:
            # 17.2.1 / 17.2.2: a retransmitted request gets the last response again.
            if self.last_response is not None:
                self._send(self.last_response, self._last_data, effects)
        elif action is Action.PASS_ACK_TO_TU:
            assert isinstance(message, Request) and isinstance(self, ServerInviteTransaction)
            effects.events.append(AckReceived(message, self.destination, self))
        else:
            raise NotImplementedError(action)


class ServerInviteTransaction(ServerTransaction):
    """RFC 3261 17.2.1 with RFC 6026's Accepted state, and RFC 6026 figure 7."""

    TABLE = SERVER_INVITE_TABLE
    RETRANSMITTING = _states_doing(SERVER_INVITE_TABLE, Action.RESEND_RESPONSE)
    LIVE_TIMERS = {
        TransactionState.COMPLETED: frozenset({Timer.G, Timer.H}),
        TransactionState.CONFIRMED: frozenset({Timer.I}),
        TransactionState.ACCEPTED: frozenset({Timer.L}),
    }
    INITIAL_STATE = TransactionState.PROCEEDING
    kind = "server INVITE"

    def __init__(
        self,
        request: Request,
        destination: object,
        *,
        reliable: bool,
        config: TimerConfig | None = None,
        send_trying: bool = True,
    ) -> None:
        if request.method != "INVITE":
            raise TransactionError(f"{request.method} in a server INVITE transaction")
        super().__init__(request, destination, reliable=reliable, config=config)
        self.send_trying = send_trying

    def start(self, now: float) -> Output:
        """Enter Proceeding; send 100 Trying unless the TU will answer in 200 ms (17.2.1)."""
        self._started = True
        if not self.send_trying:
            return NOTHING
        trying = make_response(self.request, 100)
        # RFC 3261 8.2.6.1: a 100 copies the Timestamp header.
        timestamp = self.request.headers.get("Timestamp")
        if timestamp is not None:
            trying.headers.add("Timestamp", timestamp, first=True)
        return self.send_response(trying, now)


class ServerNonInviteTransaction(ServerTransaction):
    """RFC 3261 17.2.2 and figure 8."""

    TABLE = SERVER_NON_INVITE_TABLE
    RETRANSMITTING = _states_doing(SERVER_NON_INVITE_TABLE, Action.RESEND_RESPONSE)
    LIVE_TIMERS = {TransactionState.COMPLETED: frozenset({Timer.J})}
    INITIAL_STATE = TransactionState.TRYING
    kind = "server non-INVITE"

    def __init__(
        self,
        request: Request,
        destination: object,
        *,
        reliable: bool,
        config: TimerConfig | None = None,
    ) -> None:
        if request.method in ("INVITE", "ACK"):
            raise TransactionError(f"{request.method} in a server non-INVITE transaction")
        super().__init__(request, destination, reliable=reliable, config=config)


# -- the layer ------------------------------------------------------------------------


class _RefusalLog:
    """The refusals at one bound, and when they were last logged: a flood of requests
    must not become a flood of warnings (one every OVERLOAD_LOG_INTERVAL seconds)."""

    __slots__ = ("refused", "warned_at")

    def __init__(self) -> None:
        self.refused = 0
        self.warned_at: float | None = None

    def note(self, now: float) -> tuple[int, float] | None:
        """One more refusal; when a warning is due, the refusals it reports and the
        seconds they took (since the last warning), else None."""
        self.refused += 1
        if self.warned_at is not None and now - self.warned_at < OVERLOAD_LOG_INTERVAL:
            return None
        due = (self.refused, 0.0 if self.warned_at is None else now - self.warned_at)
        self.refused, self.warned_at = 0, now
        return due


class TransactionLayer:
    """Owns transactions: matches messages to them, runs their timers (RFC 3261 17).

    Lookups are dictionary hits on the 17.1.3 / 17.2.3 keys. Terminated
    transactions are forgotten as soon as they terminate. At most
    ``max_transactions`` live at once: a new request beyond that is answered with a
    stateless 503 and reported as RequestRefused; a new client transaction raises
    TransactionLimitError. A CANCEL of a live transaction, either way, is let in (RFC
    3261 9.1, 9.2): there is one per transaction at most, so the excess is bounded.

    A source host (the ``remote_host`` of the transport flow a request came in on,
    whatever its port) holds at most ``max_transactions_per_source`` server
    transactions: beyond that its new requests get the same 503 (a CANCEL of a live
    transaction is let in, as above), and the other peers are still served. A
    source with no ``remote_host`` is not counted, and one ``trusted`` says is a
    configured peer is not held to the share (a carrier's one address may carry
    most of the SBC's calls).
    """

    def __init__(
        self,
        config: TimerConfig | None = None,
        *,
        max_transactions: int = MAX_TRANSACTIONS,
        max_transactions_per_source: int = MAX_TRANSACTIONS_PER_SOURCE,
        send_trying: bool = True,
    ) -> None:
        self.config = config if config is not None else TimerConfig()
        self.max_transactions = max_transactions
        self.max_transactions_per_source = max_transactions_per_source
        #: Sources exempt from the per-source share: the peers the configuration
        #: names (trunks' gateways, upstream registrars), which carry a whole site's
        #: or carrier's traffic from one address. Asked only of a source over its share.
        self.trusted: Callable[[str], bool] | None = None
        self.send_trying = send_trying
        self._client: dict[TransactionKey, ClientTransaction] = {}
        self._server: dict[TransactionKey, ServerTransaction] = {}
        # Live server transactions by source host; a host holding none has no entry.
        # Counted in when a transaction enters _server, out when _forget takes it out.
        self._per_source: dict[str, int] = {}
        # Deadline heap with lazy deletion: an entry is live while _scheduled agrees.
        self._heap: list[tuple[float, int, Transaction]] = []
        self._scheduled: dict[Transaction, float] = {}
        self._order = itertools.count()
        self._full_log = _RefusalLog()
        self._source_full_log = _RefusalLog()

    def __len__(self) -> int:
        return len(self._client) + len(self._server)

    def _trusted(self, host: str) -> bool:
        return self.trusted is not None and self.trusted(host)

    def held_by(self, host: str) -> int:
        """The live server transactions of requests from source ``host``."""
        return self._per_source.get(host, 0)

    # -- TU-facing --------------------------------------------------------------------

    def send_request(
        self, request: Request, destination: object, now: float, *, reliable: bool
    ) -> tuple[ClientTransaction, Output]:
        """Start a client transaction for ``request`` and send it.

        A BYE is not refused when the layer is full: it ends a call the TU holds (so
        there are at most two per call), and what a call holds is freed by it."""
        if len(self) >= self.max_transactions and request.method != "BYE":
            raise TransactionLimitError(f"transaction limit of {self.max_transactions} reached")
        return self._start_client(request, destination, now, reliable)

    def _start_client(
        self, request: Request, destination: object, now: float, reliable: bool
    ) -> tuple[ClientTransaction, Output]:
        tx: ClientTransaction
        if request.method == "INVITE":
            tx = ClientInviteTransaction(
                request, destination, reliable=reliable, config=self.config
            )
        else:
            tx = ClientNonInviteTransaction(
                request, destination, reliable=reliable, config=self.config
            )
        if tx.key in self._client:
            raise TransactionError(f"a {request.method} transaction {tx.branch} exists")
        self._client[tx.key] = tx
        logger.debug("- %r created", tx)
        return tx, self._track(tx, tx.start(now))

    def send_cancel(
        self, invite: ClientInviteTransaction, now: float
    ) -> tuple[ClientTransaction, Output]:
        """CANCEL ``invite`` in a new client transaction to the same destination (9.1).

        Not refused when the layer is full: a live INVITE has at most one CANCEL (its
        branch), so the bound holds, and a caller's hang-up must reach the callee.
        """
        cancel = invite.build_cancel()
        tx, out = self._start_client(cancel, invite.destination, now, invite.reliable)
        return tx, out + self._track(invite, invite.cancel_sent(now))

    def send_response(
        self, transaction: ServerTransaction, response: Response, now: float
    ) -> Output:
        """The TU's response in ``transaction``."""
        return self._track(transaction, transaction.send_response(response, now))

    def transport_error(self, transaction: Transaction, now: float) -> Output:
        """The transport failed to send a message of ``transaction`` (Outgoing.transaction)."""
        if transaction.terminated:
            return NOTHING
        return self._track(transaction, transaction.transport_error(now))

    def handle_timers(self, now: float) -> Output:
        """Fire every timer due at ``now``."""
        out = NOTHING
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, tx = heapq.heappop(heap)
            if self._scheduled.get(tx) != deadline:
                continue  # superseded entry
            del self._scheduled[tx]
            out += self._track(tx, tx.handle_timer(now))
        return out

    def next_deadline(self) -> float | None:
        """When ``handle_timers`` should next be called, or None."""
        heap = self._heap
        while heap and self._scheduled.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    # -- network-facing ---------------------------------------------------------------

    def receive(
        self, message: Request | Response, source: object, now: float, *, reliable: bool
    ) -> Output:
        """A message from the transport; ``source`` is where responses to it go."""
        try:
            if isinstance(message, Response):
                return self._receive_response(message, source, now)
            return self._receive_request(message, source, now, reliable)
        except ParseError as error:
            # The parser validated these headers; anything still broken is dropped.
            logger.info("x dropped %r from %r: %s", message, source, error)
            return NOTHING

    def find_client(self, response: Response) -> ClientTransaction | None:
        """RFC 3261 17.1.3: the client transaction ``response`` belongs to."""
        branch = response.via.branch
        if branch is None:
            return None
        return self._client.get(client_key(branch, response.cseq.method))

    def find_server(self, request: Request) -> ServerTransaction | None:
        """RFC 3261 17.2.3: the server transaction ``request`` belongs to.

        An ACK finds its INVITE; without the magic cookie its To tag is compared
        with the tag of the response the INVITE transaction sent.
        """
        if request.method != "ACK" or request.via.is_rfc3261_branch:
            return self._server.get(server_key(request))
        tx = self._server.get(server_key(request))
        if tx is not None:
            return tx
        # RFC 2543 ACK: the INVITE had no To tag; the ACK has the one we sent.
        tx = self._server.get(server_key(request, to_tag=None))
        ack_tag = request.to.tag
        if tx is not None and ack_tag is not None and tx.response_to_tag == ack_tag:
            return tx
        return None

    def find_cancelled(self, cancel: Request) -> ServerInviteTransaction | None:
        """RFC 3261 9.2: the INVITE server transaction a CANCEL cancels."""
        tx = self._server.get(server_key(cancel, method="INVITE"))
        return tx if isinstance(tx, ServerInviteTransaction) else None

    def _receive_response(self, response: Response, source: object, now: float) -> Output:
        tx = self.find_client(response)
        if tx is None:
            logger.debug("< stray %s from %r", response.start_line(), source)
            return Output(events=(StrayResponse(response, source),))
        return self._track(tx, tx.receive(response, now))

    def _receive_request(
        self, request: Request, source: object, now: float, reliable: bool
    ) -> Output:
        tx = self.find_server(request)
        if tx is not None:
            return self._track(tx, tx.receive(request, now))
        if request.method == "ACK":
            # 17.2.3: the ACK for a 2xx matches no transaction; it is the dialog's.
            return Output(events=(AckReceived(request, source),))
        if request.method == "CANCEL":
            return self._receive_cancel(request, source, now, reliable)
        if len(self) >= self.max_transactions:
            return self._refuse(request, source, now)
        # The transport's Flow; anything else (tests, tools) is not counted.
        host = getattr(source, "remote_host", None)
        held = 0 if host is None else self._per_source.get(host, 0)
        if (
            host is not None
            and held >= self.max_transactions_per_source
            and not self._trusted(host)
        ):
            return self._refuse(request, source, now, host)
        new: ServerTransaction
        if request.method == "INVITE":
            new = ServerInviteTransaction(
                request,
                source,
                reliable=reliable,
                config=self.config,
                send_trying=self.send_trying,
            )
        else:
            new = ServerNonInviteTransaction(request, source, reliable=reliable, config=self.config)
        self._server[new.key] = new
        if host is not None:
            self._per_source[host] = held + 1
        logger.debug("- %r created", new)
        return Output(events=(RequestReceived(new, request),)) + self._track(new, new.start(now))

    def _receive_cancel(
        self, cancel: Request, source: object, now: float, reliable: bool
    ) -> Output:
        """RFC 3261 9.2: a CANCEL that no CANCEL transaction absorbed.

        Of an INVITE: the TU's (200 to the CANCEL, 487 to the INVITE). Of a live
        non-INVITE (CANCELLABLE_METHODS): answered 200 here, as the UAS must whatever
        the method, and not reported: it has no effect on that transaction. Of
        nothing: the TU's (481).

        A CANCEL of a live transaction is let in when the layer, or its source's share
        of it, is full: one per transaction at most (same branch, or the same RFC 2543
        fields).
        """
        invite = self.find_cancelled(cancel)
        other = None if invite is not None else self._find_cancelled_non_invite(cancel)
        host = getattr(source, "remote_host", None)
        held = 0 if host is None else self._per_source.get(host, 0)
        if invite is None and other is None:
            if len(self) >= self.max_transactions:
                return self._refuse(cancel, source, now)
            full = host is not None and held >= self.max_transactions_per_source
            if full and host is not None and not self._trusted(host):
                return self._refuse(cancel, source, now, host)
        new = ServerNonInviteTransaction(cancel, source, reliable=reliable, config=self.config)
        self._server[new.key] = new
        if host is not None:
            self._per_source[host] = held + 1
        logger.debug("- %r created", new)
        out = self._track(new, new.start(now))
        if other is None:
            return Output(events=(CancelReceived(new, cancel, invite),)) + out
        # 9.2: the To tag of the answer to the original request, when it has one.
        ok = make_response(cancel, 200, to_tag=other.response_to_tag or new_tag())
        logger.debug("- %r answered: %r is not an INVITE", new, other)
        return out + self.send_response(new, ok, now)

    def _find_cancelled_non_invite(self, cancel: Request) -> ServerTransaction | None:
        """RFC 3261 9.2: the live non-INVITE server transaction a CANCEL matches, if its
        method is a registered one (CANCELLABLE_METHODS)."""
        # 9.2: matched by 17.2.3 but for the method, which server_key puts last.
        rest = server_key(cancel)[:-1]
        server = self._server
        for method in CANCELLABLE_METHODS:
            tx = server.get((*rest, method))
            if tx is not None:
                return tx
        return None

    def _refuse(
        self, request: Request, source: object, now: float, host: str | None = None
    ) -> Output:
        """The stateless 503 at the global bound, or at source ``host``'s share."""
        if host is None:
            due = self._full_log.note(now)
            if due is None:
                logger.debug("x transaction limit reached, refusing %s", request.start_line())
            else:
                logger.warning(
                    "x transaction limit of %d reached: refused %d request(s) in %.0f s,"
                    " the last %s",
                    self.max_transactions,
                    *due,
                    request.start_line(),
                )
        else:
            due = self._source_full_log.note(now)
            if due is None:
                logger.debug(
                    "x per-source transaction limit reached by %s, refusing %s",
                    host,
                    request.start_line(),
                )
            else:
                logger.warning(
                    "x per-source transaction limit of %d reached: refused %d request(s)"
                    " in %.0f s, the last %s from %s",
                    self.max_transactions_per_source,
                    *due,
                    request.start_line(),
                    host,
                )
        response = make_response(
            request,
            OVERLOAD_STATUS,
            to_tag=new_tag(),
            headers=(("Retry-After", str(OVERLOAD_RETRY_AFTER)),),
        )
        return Output(
            (Outgoing(response, bytes(response), source),),
            (RequestRefused(request, source, OVERLOAD_STATUS),),
        )

    # -- bookkeeping ------------------------------------------------------------------

    def _track(self, tx: Transaction, out: Output) -> Output:
        """After ``tx`` handled an input: forget it if terminated, else reschedule."""
        if tx.terminated:
            self._forget(tx)
            return out
        deadline = tx.next_deadline()
        if deadline is None:
            self._scheduled.pop(tx, None)
        elif self._scheduled.get(tx) != deadline:
            self._scheduled[tx] = deadline
            heapq.heappush(self._heap, (deadline, next(self._order), tx))
            if len(self._heap) > 2 * len(self._scheduled) + 64:
                self._compact()
        return out

    def _forget(self, tx: Transaction) -> None:
        self._scheduled.pop(tx, None)
        if isinstance(tx, ClientTransaction):
            if self._client.get(tx.key) is tx:
                del self._client[tx.key]
        elif self._server.get(tx.key) is tx:
            del self._server[tx.key]
            # Counted in by the source it was created with (its destination, never
            # reassigned), and out only here, once: it is no longer in _server.
            host = getattr(tx.destination, "remote_host", None)
            if host is not None:
                held = self._per_source.get(host, 0) - 1
                if held > 0:
                    self._per_source[host] = held
                else:
                    self._per_source.pop(host, None)
        logger.debug("- %r forgotten", tx)

    def _compact(self) -> None:
        self._heap = [(d, next(self._order), tx) for tx, d in self._scheduled.items()]
        heapq.heapify(self._heap)
