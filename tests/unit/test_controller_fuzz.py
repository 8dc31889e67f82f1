"""Whole calls through the B2BUA with one message made bad: nothing raises, nothing leaks.

The parser is fuzzed on its own (``test_fuzz.py``); this drives the transaction layer
and the CallController together, as ``SbcNode`` does, through a call a phone and a
trunk could make (INVITE, 180, 200, ACK, re-INVITE, INFO, BYE; or a CANCEL), and
hypothesis spoils one or two of its messages: a header dropped, doubled or given a
hostile value, another status code, a broken SDP body, a retransmission. A message
that no longer parses is what the transport answers 400 (or drops): it is skipped.
Whatever the controller is given must not raise, and once the clock has run past
every timer (maximum call duration included) no call, transaction or dialog is left.

``make test`` runs a fixed set of examples (derandomized); ``make fuzz`` explores.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbc.b2bua import controller as controller_module
from sbc.b2bua.call import Call
from sbc.b2bua.controller import (
    AllocateMedia,
    CallController,
    CallTimers,
    DeleteMedia,
    RealmPolicy,
    Step,
)
from sbc.b2bua.local import LocalResponder
from sbc.b2bua.realm import Hop, Realm, RealmTable
from sbc.b2bua.routing import RouteAction, Router, RouteRule
from sbc.b2bua.targets import Directory
from sbc.b2bua.trunk_auth import TrunkAuth, TrunkCredentials
from sbc.b2bua.trunks import Gateway, ProbePolicy, Trunk, TrunkTable
from sbc.media.session import LegState, MediaSession, MediaStream
from sbc.media.values import Endpoint
from sbc.sip.auth import DigestServer, DigestServerConfig
from sbc.sip.dialog import DialogError
from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.sip.sdp import SdpError
from sbc.sip.transaction import TransactionLayer
from sbc.transport.base import Destination, Flow, ListenAddress, Transport

OUT = ListenAddress(Transport.UDP, "198.51.100.1", 5060)
IN = ListenAddress(Transport.UDP, "203.0.113.1", 5060)
CORE = Destination(Transport.UDP, "203.0.113.5", 5070)
CALLER = Flow(Transport.UDP, "198.51.100.1", 5060, "198.51.100.9", 5099)
TRUNK = Flow(Transport.UDP, "203.0.113.1", 5060, "203.0.113.5", 5070)

#: Long enough for every transaction to have ended (Timer B, D, H, J: 64*T1 at most).
AFTER_EVERYTHING = 10_000.0
MAX_DURATION = 3_600

FUZZ_SECONDS = float(os.environ.get("SBC_FUZZ_SECONDS") or 0)
SETTINGS = settings(
    max_examples=5_000 if FUZZ_SECONDS else 1_000,
    deadline=None,
    derandomize=not FUZZ_SECONDS,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def sdp(user: str, address: str, port: int, extra: str = "") -> str:
    return (
        f"v=0\r\no={user} 1 1 IN IP4 {address}\r\ns=-\r\nc=IN IP4 {address}\r\n"
        f"t=0 0\r\nm=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n"
        f"{extra}"
    )


#: Bodies a broken or hostile peer might send in place of its SDP.
BAD_BODIES = (
    "",
    "v=0\r\n",
    "not sdp at all",
    "v=0\r\no=- 1 1 IN IP4 198.51.100.9\r\ns=-\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n",
    sdp("x", "198.51.100.9", 0),
    sdp("x", "198.51.100.9", 65536),
    sdp("x", "2001:db8::9", 40000),
    sdp("x", "198.51.100.9", 40000, "m=video 40002 RTP/AVP 96\r\nm=image 40004 udptl t38\r\n"),
    sdp("x", "198.51.100.9", 40000, "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:short\r\n"),
    sdp("x", "198.51.100.9", 40000, "a=rtcp-mux\r\na=rtcp:abc\r\na=inactive\r\na=sendonly\r\n"),
    sdp("x", "0.0.0.0", 40000, "a=sendonly\r\n"),
    "v=0\r\no=- 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\n",
    "v=0\r\no=- 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\n"
    "m=audio 40000 RTP/SAVP 0\r\n",
    "v=0\r\r\n\x00\xff" + "a=x\r\n" * 3,
)

#: Header values that are wrong in the ways peers get them wrong.
BAD_VALUES = (
    "",
    '"X" <sip:+15551234@carrier.example;user=phone>, <tel:+15551234>, <tel:>',
    "id; header",
    " ",
    "<>",
    "<sip:>",
    "sip:@",
    "<sip:a@b;lr",
    '"unterminated <sip:x@198.51.100.9>',
    "x" * 300,
    "1 INVITE",
    "2 BYE",
    "4294967296 INVITE",
    "-1",
    "0",
    "70000",
    "SIP/2.0/UDP ;branch=",
    "SIP/2.0/TCP 198.51.100.9:5099;branch=z9hG4bKother;rport=0",
    "<sip:x@[::1]>",
    "<sip:x@198.51.100.9:99999>",
    "*",
    "<sip:a@198.51.100.9>;tag=;tag=x",
    ";;;",
    ",,,",
    "<sip:a@198.51.100.9>;expires=abc",
    'application/sdp;charset="',
    "text/plain",
    "multipart/mixed;boundary=x",
    "%00",
    "<tel:+15551234>",
    "timer",
    "100rel, timer, replaces",
    "90;refresher=uas",
    "1 1 INVITE",
    "abc;to-tag=x;from-tag=y",
    "<sip:198.51.100.66;lr>, <sip:198.51.100.67;lr>",
)

HEADERS = (
    "Via",
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Contact",
    "Max-Forwards",
    "Content-Type",
    "Record-Route",
    "Route",
    "Session-Expires",
    "Min-SE",
    "Supported",
    "Require",
    "RSeq",
    "RAck",
    "Replaces",
    "Refer-To",
    "Event",
    "Allow",
    "Expires",
    "Content-Length",
    # Both realms are trusted (controller()): what they assert is read.
    "P-Asserted-Identity",
    "Privacy",
)


@dataclass
class Message:
    """A message as lines, so that one header can be spoiled and the rest kept."""

    start: str
    headers: list[tuple[str, str]]
    body: str = ""

    def text(self) -> str:
        fields = list(self.headers)
        if not any(name.lower() == "content-length" for name, _ in fields):
            fields.append(("Content-Length", str(len(self.body.encode("utf-8", "replace")))))
        head = "".join(f"{name}: {value}\r\n" for name, value in fields)
        return f"{self.start}\r\n{head}\r\n{self.body}"


@dataclass(frozen=True)
class Spoil:
    """One way to make a message bad."""

    kind: str
    header: str = ""
    value: str = ""
    status: int = 0

    def apply(self, message: Message) -> list[Message]:
        """The message(s) to send instead (two for a retransmission)."""
        if self.kind == "drop":
            message.headers = [(n, v) for n, v in message.headers if n != self.header]
        elif self.kind == "set":
            if any(n == self.header for n, _ in message.headers):
                message.headers = [
                    (n, self.value if n == self.header else v) for n, v in message.headers
                ]
            else:
                message.headers.append((self.header, self.value))
        elif self.kind == "double":
            message.headers += [(n, v) for n, v in message.headers if n == self.header]
        elif self.kind == "body":
            message.body = self.value
            if self.value and not any(n == "Content-Type" for n, _ in message.headers):
                message.headers.append(("Content-Type", "application/sdp"))
        elif self.kind == "status" and message.start.startswith("SIP/2.0 "):
            message.start = f"SIP/2.0 {self.status} Spoilt"
        elif self.kind == "again":
            return [message, message]
        return [message]


spoils = st.one_of(
    st.builds(Spoil, st.just("drop"), st.sampled_from(HEADERS)),
    st.builds(Spoil, st.just("set"), st.sampled_from(HEADERS), st.sampled_from(BAD_VALUES)),
    st.builds(Spoil, st.just("double"), st.sampled_from(HEADERS)),
    st.builds(Spoil, st.just("body"), st.just(""), st.sampled_from(BAD_BODIES)),
    st.builds(
        Spoil,
        st.just("status"),
        status=st.sampled_from([100, 180, 183, 199, 200, 202, 299, 302, 401, 481, 491, 503, 699]),
    ),
    st.builds(Spoil, st.just("again")),
)


def session_for(command: AllocateMedia, serial: int) -> MediaSession:
    streams = tuple(
        MediaStream(
            index,
            LegState(offer.a.realm, Endpoint.of("198.51.100.1", 20000 + 4 * index)),
            LegState(offer.b.realm, Endpoint.of("203.0.113.1", 30000 + 4 * index)),
        )
        for index, offer in enumerate(command.streams)
    )
    return MediaSession(f"sess{serial}", command.call_id, streams, 0.0)


@dataclass
class Run:
    """One call's worth of messages, fed as SbcNode feeds them."""

    controller: CallController
    now: float = 0.0
    #: Every request the SBC sent each side, by method, latest last.
    to_a: dict[str, list[Request]] = field(default_factory=dict)
    to_b: dict[str, list[Request]] = field(default_factory=dict)
    #: The To tag the SBC gave the caller (its 1xx/2xx).
    a_tag: str | None = None
    sessions: int = 0
    #: Every response the SBC sent the caller.
    responses_to_a: list[Response] = field(default_factory=list)
    responses_to_b: list[Response] = field(default_factory=list)
    #: Every call that ended, as it ended.
    ended: list[Call] = field(default_factory=list)

    def absorb(self, step: Step) -> None:
        self.ended.extend(step.ended)
        for outgoing in step.output.messages:
            message = outgoing.message
            if isinstance(message, Response):
                answered = (
                    self.responses_to_a if outgoing.destination == CALLER else self.responses_to_b
                )
                answered.append(message)
            if isinstance(message, Request):
                hop = outgoing.destination
                side = self.to_b if isinstance(hop, Hop) and hop.local == IN else self.to_a
                side.setdefault(message.method, []).append(message)
            elif message.to.tag and message.status > 100 and self.a_tag is None:
                self.a_tag = message.to.tag
        for command in step.media:
            if isinstance(command, DeleteMedia) and command.call is not None:
                self.ended.append(command.call)
            if isinstance(command, AllocateMedia):
                self.sessions += 1
                session = session_for(command, self.sessions)
                self.absorb(self.controller.media_allocated(command.call_ref, session, self.now))

    def feed(self, message: Message, flow: Flow, spoil: Spoil | None) -> None:
        self.now += 0.05
        for each in spoil.apply(message) if spoil is not None else [message]:
            try:
                parsed = parse_message(each.text().encode("utf-8", "surrogateescape"))
            except (ParseError, UnicodeError):
                continue  # the transport's 400 (or a drop), not the controller's business
            c = self.controller
            out = c.transactions.receive(parsed, flow, self.now, reliable=False)
            self.absorb(c.handle(out, self.now))

    def run_out(self) -> None:
        """Every timer, until none is left or the clock is past them all."""
        c = self.controller
        for _ in range(2_000):
            deadline = next_deadline(c)
            if deadline is None or deadline > AFTER_EVERYTHING:
                return
            self.now = max(self.now, deadline)
            # As SbcNode._on_timer: the call timers, then the transactions'.
            step = c.handle_timers(self.now)
            self.absorb(step + c.handle(c.transactions.handle_timers(self.now), self.now))


def next_deadline(c: CallController) -> float | None:
    due = [d for d in (c.next_deadline(), c.transactions.next_deadline()) if d is not None]
    return min(due, default=None)


# -- the call, as messages built from what the SBC sent -------------------------------

A_VIA = "SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bK{branch};rport"
A_FROM = "<sip:alice@198.51.100.9>;tag=alicetag"
A_CALL_ID = "secret-call@198.51.100.9"


def from_a(method: str, cseq: int, branch: str, run: Run, body: str = "") -> Message:
    # In the dialog the SBC made with the caller: all but the INVITE and its CANCEL.
    in_dialog = run.a_tag is not None and (cseq > 1 or method == "ACK")
    to = "<sip:1000@198.51.100.1>" + (f";tag={run.a_tag}" if in_dialog else "")
    headers = [
        ("Via", A_VIA.format(branch=branch)),
        ("Max-Forwards", "70"),
        ("From", A_FROM),
        ("To", to),
        ("Call-ID", A_CALL_ID),
        ("CSeq", f"{cseq} {method}"),
        ("Contact", "<sip:alice@198.51.100.9:5099>"),
        ("Supported", "timer, 100rel"),
    ]
    if body:
        headers.append(("Content-Type", "application/sdp"))
    uri = "sip:1000@198.51.100.1" if cseq == 1 else "sip:alice-contact@198.51.100.1"
    return Message(f"{method} {uri} SIP/2.0", headers, body)


def answer(request: Request, status: int, tag: str, contact: str, body: str = "") -> Message:
    headers = [(n, v) for n, v in request.headers if n in ("Via", "From", "Call-ID", "CSeq")]
    to = request.headers.get("To") or ""
    if ";tag=" not in to:
        to += f";tag={tag}"
    headers += [("To", to), ("Contact", contact)]
    if request.method == "INVITE" and status < 300:
        headers.append(("Record-Route", "<sip:203.0.113.66;lr>"))
    if body:
        headers.append(("Content-Type", "application/sdp"))
    return Message(f"SIP/2.0 {status} X", headers, body)


def from_b(method: str, cseq: int, run: Run) -> Message | None:
    """An in-dialog request of the callee, on the dialog the SBC made with it."""
    invites = run.to_b.get("INVITE")
    if not invites:
        return None
    invite = invites[0]
    sbc_tag = invite.from_.tag
    headers = [
        ("Via", f"SIP/2.0/UDP 203.0.113.5:5070;branch=z9hG4bKb{method}{cseq}"),
        ("Max-Forwards", "70"),
        ("From", "<sip:1000@203.0.113.5>;tag=bobtag"),
        ("To", f"{invite.from_.uri};tag={sbc_tag}"),
        ("Call-ID", invite.call_id),
        ("CSeq", f"{cseq} {method}"),
        ("Contact", "<sip:bob@203.0.113.5:5070>"),
    ]
    if method != "INFO":
        return Message(f"{method} sip:b2b@203.0.113.1:5060 SIP/2.0", headers)
    # (Without its Content-Type the body would get 400, RFC 3261 20.15.)
    headers.append(("Content-Type", "application/dtmf-relay"))
    return Message(
        f"{method} sip:b2b@203.0.113.1:5060 SIP/2.0", headers, "Signal=5\r\nDuration=160\r\n"
    )


B_CONTACT = "<sip:bob@203.0.113.5:5070>"
A_CONTACT = "<sip:alice@198.51.100.9:5099>"
Script = list[Callable[[Run], tuple[Message, Flow] | None]]


def latest(requests: dict[str, list[Request]], method: str) -> Request | None:
    found = requests.get(method)
    return found[-1] if found else None


def b_answers(
    method: str, status: int, body: str = ""
) -> Callable[[Run], tuple[Message, Flow] | None]:
    def make(run: Run) -> tuple[Message, Flow] | None:
        request = latest(run.to_b, method)
        if request is None:
            return None
        return answer(request, status, "bobtag", B_CONTACT, body), TRUNK

    return make


def a_answers(method: str, status: int) -> Callable[[Run], tuple[Message, Flow] | None]:
    def make(run: Run) -> tuple[Message, Flow] | None:
        request = latest(run.to_a, method)
        if request is None:
            return None
        return answer(request, status, "alicetag", A_CONTACT), CALLER

    return make


ANSWER = sdp("b", "203.0.113.5", 42000)
OFFER = sdp("a", "198.51.100.9", 40000)
HOLD = sdp("a", "198.51.100.9", 40000, "a=sendonly\r\n")

ANSWERED: Script = [
    lambda run: (from_a("INVITE", 1, "inv1", run, OFFER), CALLER),
    b_answers("INVITE", 180),
    b_answers("INVITE", 200, ANSWER),
    lambda run: (from_a("ACK", 1, "ack1", run), CALLER),
    lambda run: (from_a("INVITE", 2, "inv2", run, HOLD), CALLER),
    b_answers("INVITE", 200, sdp("b", "203.0.113.5", 42000, "a=recvonly\r\n")),
    lambda run: (from_a("ACK", 2, "ack2", run), CALLER),
    lambda run: (m, TRUNK) if (m := from_b("INFO", 10, run)) else None,
    a_answers("INFO", 200),
    lambda run: (m, TRUNK) if (m := from_b("BYE", 11, run)) else None,
    a_answers("BYE", 200),
]


def b_reinvite(run: Run) -> tuple[Message, Flow] | None:
    message = from_b("INVITE", 12, run)
    if message is None:
        return None
    message.body = sdp("b", "203.0.113.5", 42000, "a=sendonly\r\n")
    message.headers.append(("Content-Type", "application/sdp"))
    return message, TRUNK


def b_ack(run: Run) -> tuple[Message, Flow] | None:
    message = from_b("ACK", 12, run)
    return None if message is None else (message, TRUNK)


def a_answers_sdp(method: str, status: int) -> Callable[[Run], tuple[Message, Flow] | None]:
    def make(run: Run) -> tuple[Message, Flow] | None:
        request = latest(run.to_a, method)
        if request is None:
            return None
        body = sdp("a", "198.51.100.9", 40000, "a=recvonly\r\n")
        return answer(request, status, "alicetag", A_CONTACT, body), CALLER

    return make


#: A call answered at once: INVITE, 200, ACK.
CALL_UP: Script = [
    lambda run: (from_a("INVITE", 1, "inv1", run, OFFER), CALLER),
    b_answers("INVITE", 200, ANSWER),
    lambda run: (from_a("ACK", 1, "ack1", run), CALLER),
]

#: The callee puts the call on hold, the caller hangs up.
HELD_BY_B: Script = [
    *CALL_UP,
    b_reinvite,
    a_answers_sdp("INVITE", 200),
    b_ack,
    lambda run: (from_a("BYE", 3, "bye3", run), CALLER),
    b_answers("BYE", 200),
]


def prack(run: Run) -> tuple[Message, Flow] | None:
    reliable = [r for r in run.responses_to_a if r.headers.get("RSeq")]
    if not reliable:
        return None
    message = from_a("PRACK", 2, "prack2", run)
    message.headers.append(("RAck", f"{reliable[-1].headers.get('RSeq')} 1 INVITE"))
    return message, CALLER


def early_update(run: Run) -> tuple[Message, Flow] | None:
    return from_a("UPDATE", 3, "upd3", run, HOLD), CALLER


def reliable_183(run: Run) -> tuple[Message, Flow] | None:
    request = latest(run.to_b, "INVITE")
    if request is None:
        return None
    message = answer(request, 183, "bobtag", B_CONTACT, ANSWER)
    message.headers += [("Require", "100rel"), ("RSeq", "1")]
    return message, TRUNK


#: Early media with a reliable 183 (RFC 3262), its PRACK, and an UPDATE before the
#: answer (RFC 3311).
def invite_requiring_100rel(run: Run) -> tuple[Message, Flow] | None:
    message = from_a("INVITE", 1, "inv1", run, OFFER)
    message.headers.append(("Require", "100rel"))
    return message, CALLER


EARLY: Script = [
    invite_requiring_100rel,
    reliable_183,
    prack,
    b_answers("PRACK", 200),
    early_update,
    b_answers("UPDATE", 200, sdp("b", "203.0.113.5", 42000, "a=recvonly\r\n")),
    b_answers("INVITE", 200),
    lambda run: (from_a("ACK", 1, "ack1", run), CALLER),
    lambda run: (from_a("BYE", 4, "bye4", run), CALLER),
    b_answers("BYE", 200),
]


#: The end of a call set up with one PRACK: the caller ACKs the 2xx and hangs up.
ACKED_THEN_BYE: Script = [
    lambda run: (from_a("ACK", 1, "ack1", run), CALLER),
    lambda run: (from_a("BYE", 3, "bye3", run), CALLER),
    b_answers("BYE", 200),
]


def prack_offer(run: Run) -> tuple[Message, Flow] | None:
    """The caller's PRACK with a new offer (RFC 3262 5): relayed as an UPDATE."""
    made = prack(run)
    if made is None:
        return None
    message, flow = made
    message.headers.append(("Content-Type", "application/sdp"))
    message.body = HOLD
    return message, flow


#: A reliable 183 whose PRACK makes a new offer, answered through the callee's UPDATE.
PRACK_OFFER: Script = [
    invite_requiring_100rel,
    reliable_183,
    prack_offer,
    b_answers("PRACK", 200),
    b_answers("UPDATE", 200, sdp("b", "203.0.113.5", 42000, "a=recvonly\r\n")),
    b_answers("INVITE", 200),
    *ACKED_THEN_BYE,
]


#: The same with the callee's 2xx first: held until the PRACK's offer is answered.
PRACK_OFFER_HELD: Script = [
    invite_requiring_100rel,
    reliable_183,
    b_answers("INVITE", 200),
    prack_offer,
    b_answers("PRACK", 200),
    b_answers("UPDATE", 200, sdp("b", "203.0.113.5", 42000, "a=recvonly\r\n")),
    *ACKED_THEN_BYE,
]


#: The callee's 2xx overtakes its answer to the PRACK's offer: held for that answer.
PRACK_OFFER_CROSSED: Script = [
    invite_requiring_100rel,
    reliable_183,
    prack_offer,
    b_answers("PRACK", 200),
    b_answers("INVITE", 200),
    b_answers("UPDATE", 200, sdp("b", "203.0.113.5", 42000, "a=recvonly\r\n")),
    *ACKED_THEN_BYE,
]


def b_early_update(run: Run) -> tuple[Message, Flow] | None:
    """The callee's UPDATE with an offer in the early dialog (RFC 3311 5.1)."""
    message = from_b("UPDATE", 2, run)
    if message is None:
        return None
    message.headers.append(("Content-Type", "application/sdp"))
    message.body = sdp("b", "203.0.113.5", 42000, "a=sendonly\r\n")
    return message, TRUNK


def late_invite_requiring_100rel(run: Run) -> tuple[Message, Flow] | None:
    message = from_a("INVITE", 1, "inv1", run)
    message.headers.append(("Require", "100rel"))
    return message, CALLER


def invite_allowing_update(run: Run) -> tuple[Message, Flow] | None:
    made = invite_requiring_100rel(run)
    assert made is not None
    made[0].headers.append(("Allow", "INVITE, ACK, BYE, CANCEL, PRACK, UPDATE"))
    return made


#: The callee offers in the early dialog, to a caller that PRACKed its answer.
EARLY_FROM_B: Script = [
    invite_allowing_update,
    reliable_183,
    prack,
    b_answers("PRACK", 200),
    b_early_update,
    a_answers_sdp("UPDATE", 200),
    b_answers("INVITE", 200),
    *ACKED_THEN_BYE,
]

#: A late offer from a caller requiring 100rel: the callee's early SDP stays out of
#: the reliable 183, the 2xx offers, the ACK answers.
LATE_RELIABLE: Script = [
    late_invite_requiring_100rel,
    reliable_183,
    prack,
    b_answers("PRACK", 200),
    b_answers("INVITE", 200, ANSWER),
    lambda run: (from_a("ACK", 1, "ack1", run, OFFER), CALLER),
    lambda run: (from_a("BYE", 3, "bye3", run), CALLER),
    b_answers("BYE", 200),
]


def out_of_dialog(method: str, extra: list[tuple[str, str]], body: str = "") -> Message:
    headers = [
        ("Via", A_VIA.format(branch=f"ood{method}")),
        ("Max-Forwards", "70"),
        ("From", A_FROM),
        ("To", "<sip:1000@198.51.100.1>"),
        ("Call-ID", f"ood-{method}@198.51.100.9"),
        ("CSeq", f"1 {method}"),
        ("Contact", A_CONTACT),
        *extra,
    ]
    return Message(f"{method} sip:1000@198.51.100.1 SIP/2.0", headers, body)


def notify(run: Run) -> tuple[Message, Flow] | None:
    subscribe = latest(run.to_b, "SUBSCRIBE")
    if subscribe is None:
        return None
    message = Message(
        f"NOTIFY {(subscribe.headers.get('Contact') or '<sip:x@203.0.113.1>').strip('<>')} SIP/2.0",
        [
            ("Via", "SIP/2.0/UDP 203.0.113.5:5070;branch=z9hG4bKbnotify"),
            ("Max-Forwards", "70"),
            ("From", "<sip:1000@203.0.113.5>;tag=bobtag"),
            ("To", f"{subscribe.from_.uri};tag={subscribe.from_.tag}"),
            ("Call-ID", subscribe.call_id),
            ("CSeq", "1 NOTIFY"),
            ("Contact", B_CONTACT),
            ("Event", "presence"),
            ("Subscription-State", "terminated;reason=timeout"),
            ("Content-Type", "application/pidf+xml"),
        ],
        '<?xml version="1.0"?><presence xmlns="urn:ietf:params:xml:ns:pidf"'
        ' entity="sip:1000@203.0.113.5"><tuple id="t"><status><basic>open</basic>'
        "</status></tuple></presence>",
    )
    return message, TRUNK


#: Out of any call: a MESSAGE, and a presence subscription ended by its NOTIFY.
OUT_OF_DIALOG: Script = [
    lambda run: (
        out_of_dialog("MESSAGE", [("Content-Type", "text/plain")], "hello"),
        CALLER,
    ),
    b_answers("MESSAGE", 200),
    lambda run: (
        out_of_dialog(
            "SUBSCRIBE",
            [("Event", "presence"), ("Expires", "60"), ("Accept", "application/pidf+xml")],
        ),
        CALLER,
    ),
    b_answers("SUBSCRIBE", 200),
    notify,
    a_answers("NOTIFY", 200),
]


def refer_from_a(run: Run) -> tuple[Message, Flow] | None:
    message = from_a("REFER", 2, "refer2", run)
    message.headers += [("Refer-To", "<sip:carol@198.51.100.9>"), ("Referred-By", A_FROM)]
    return message, CALLER


def notify_from_b(state: str, frag: str, cseq: int) -> Callable[[Run], tuple[Message, Flow] | None]:
    def make(run: Run) -> tuple[Message, Flow] | None:
        message = from_b("NOTIFY", cseq, run)
        if message is None:
            return None
        message.headers += [
            ("Event", "refer"),
            ("Subscription-State", state),
            ("Content-Type", "message/sipfrag"),
        ]
        message.body = frag
        return message, TRUNK

    return make


#: The caller transfers the callee (REFER relayed), the callee reports progress in
#: NOTIFYs, then the caller hangs up.
TRANSFER: Script = [
    *CALL_UP,
    refer_from_a,
    b_answers("REFER", 202),
    notify_from_b("active;expires=60", "SIP/2.0 100 Trying\r\n", 20),
    a_answers("NOTIFY", 200),
    notify_from_b("terminated;reason=noresource", "SIP/2.0 200 OK\r\n", 21),
    a_answers("NOTIFY", 200),
    lambda run: (from_a("BYE", 3, "bye3", run), CALLER),
    b_answers("BYE", 200),
]

#: The caller CANCELs its re-INVITE (answered 180 only), then the callee hangs up.
REINVITE_CANCELLED: Script = [
    *CALL_UP,
    lambda run: (from_a("INVITE", 2, "inv2", run, HOLD), CALLER),
    b_answers("INVITE", 180),
    lambda run: (from_a("CANCEL", 2, "inv2", run), CALLER),
    b_answers("CANCEL", 200),
    b_answers("INVITE", 487),
    lambda run: (m, TRUNK) if (m := from_b("BYE", 11, run)) else None,
    a_answers("BYE", 200),
]

#: The callee answers a re-INVITE 481 (its dialog is gone): the SBC hangs the caller up.
REINVITE_481: Script = [
    *CALL_UP,
    lambda run: (from_a("INVITE", 2, "inv2", run, HOLD), CALLER),
    b_answers("INVITE", 481),
    lambda run: (from_a("ACK", 2, "inv2", run), CALLER),
    a_answers("BYE", 200),
]

#: The caller CANCELs a re-INVITE without an offer; the callee's 2xx, with an offer,
#: crosses the CANCEL: the SBC answers it itself and offers the old session back.
OFFERLESS_REINVITE_CROSSED: Script = [
    *CALL_UP,
    lambda run: (from_a("INVITE", 2, "inv2", run), CALLER),
    b_answers("INVITE", 180),
    lambda run: (from_a("CANCEL", 2, "inv2", run), CALLER),
    b_answers("CANCEL", 200),
    b_answers("INVITE", 200, sdp("b", "203.0.113.5", 42002)),
    b_answers("INVITE", 200, ANSWER),
    lambda run: (from_a("BYE", 3, "bye3", run), CALLER),
    b_answers("BYE", 200),
]

CANCELLED: Script = [
    lambda run: (from_a("INVITE", 1, "inv1", run, OFFER), CALLER),
    b_answers("INVITE", 183, ANSWER),
    lambda run: (from_a("CANCEL", 1, "inv1", run), CALLER),
    b_answers("CANCEL", 200),
    b_answers("INVITE", 487),
]


#: The trunk's account: the callee's side may challenge what the SBC sends it.
CARRIER = DigestServer(DigestServerConfig("carrier.example", b"fuzz-key" * 4))


def challenged_by_b(method: str, status: int) -> Callable[[Run], tuple[Message, Flow] | None]:
    """The callee's side challenges the last ``method`` the SBC sent it."""

    def make(run: Run) -> tuple[Message, Flow] | None:
        request = latest(run.to_b, method)
        if request is None:
            return None
        message = answer(request, status, "bobtag", B_CONTACT)
        name = "Proxy-Authenticate" if status == 407 else "WWW-Authenticate"
        message.headers.extend((name, value) for value in CARRIER.challenge_values(0.0))
        return message, TRUNK

    return make


#: The trunk challenges the INVITE, a re-INVITE and the BYE (``trunks[].auth``).
CHALLENGED: Script = [
    lambda run: (from_a("INVITE", 1, "inv1", run, OFFER), CALLER),
    challenged_by_b("INVITE", 407),
    b_answers("INVITE", 200, ANSWER),
    lambda run: (from_a("ACK", 1, "ack1", run), CALLER),
    lambda run: (from_a("INVITE", 2, "inv2", run, HOLD), CALLER),
    challenged_by_b("INVITE", 401),
    b_answers("INVITE", 200, sdp("b", "203.0.113.5", 42000, "a=recvonly\r\n")),
    lambda run: (from_a("ACK", 2, "ack2", run), CALLER),
    lambda run: (from_a("BYE", 3, "bye3", run), CALLER),
    challenged_by_b("BYE", 407),
    b_answers("BYE", 200),
]


def controller() -> CallController:
    realms = RealmTable(
        [Realm.build("outside", [OUT], "198.51.100.1"), Realm.build("inside", [IN], "203.0.113.1")]
    )
    # Through a trunk with an account: what the callee's side sends may be a
    # challenge (CHALLENGED, or any status a spoil turns into 401 or 407).
    router = Router([RouteRule("core", RouteAction.TRUNK, "outside", trunk="core")])
    gateway = Gateway("core-gw", CORE.host, CORE.port)
    trunk = Trunk("core", "inside", (gateway,), probe=ProbePolicy(enabled=False))
    targets = Directory(TrunkTable([trunk]))
    auth = TrunkAuth({"core": TrunkCredentials("sbc-account", "fuzz-password")})
    timers = CallTimers(max_duration=MAX_DURATION, no_answer_timeout=120, session_expires=0)
    # Transfers are relayed both ways, so that REFER and its NOTIFYs are played too.
    # Both trusted (RFC 3325): asserted identities are read both ways.
    policies = {
        name: RealmPolicy(refer_relay=True, trust_identity=True) for name in ("outside", "inside")
    }
    return CallController(
        TransactionLayer(),
        realms,
        router,
        LocalResponder(),
        timers=timers,
        policies=policies,
        targets=targets,
        trunk_auth=auth,
    )


def play(script: Script, spoilt: dict[int, Spoil]) -> Run:
    run = Run(controller())
    for index, make in enumerate(script):
        made = make(run)
        if made is None:
            continue
        message, flow = made
        run.feed(message, flow, spoilt.get(index))
    return run


def assert_nothing_left(run: Run) -> None:
    run.run_out()
    c = run.controller
    assert len(c) == 0, c.calls()
    assert len(c.transactions) == 0
    deadline = next_deadline(c)
    assert deadline is None or deadline > AFTER_EVERYTHING


def test_the_unspoilt_calls_end_with_nothing_left() -> None:
    for script in SCRIPTS.values():
        run = play(script, {})
        assert run.a_tag is not None
        assert_nothing_left(run)


# -- what the fuzzing found, kept as plain cases ---------------------------------------


def replay(script: Script, spoilt: dict[int, Spoil]) -> Run:
    run = Run(controller())
    for index, make in enumerate(script):
        made = make(run)
        if made is not None:
            run.feed(made[0], made[1], spoilt.get(index))
    return run


@pytest.mark.parametrize(
    ("error", "status"),
    [(ParseError("bad"), 400), (SdpError("bad"), 400), (DialogError("bad"), 500)],
)
def test_a_request_whose_handling_fails_half_way_is_answered(
    monkeypatch: pytest.MonkeyPatch, error: Exception, status: int
) -> None:
    # A header that fails to parse once the INVITE is being handled (an Allow did,
    # until Allow was read leniently): the INVITE was left unanswered, its
    # transaction in Proceeding for ever (each such INVITE took a table entry).
    def fails(message: object) -> frozenset[str]:
        raise error

    monkeypatch.setattr(controller_module, "_allowed", fails)
    run = replay(ANSWERED[:1], {})
    assert [(r.status, r.cseq.method) for r in run.responses_to_a] == [
        (100, "INVITE"),
        (status, "INVITE"),
    ]
    assert_nothing_left(run)


def test_an_invite_failing_after_its_call_was_made_ends_that_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The call was made, then the handling failed: the caller got its 400, but
    # the call held its relay session and admission until the no-answer timer.
    def fails(*args: object) -> object:
        raise SdpError("bad")

    monkeypatch.setattr(controller_module, "stream_offers", fails)
    run = replay(ANSWERED[:1], {})
    assert [(r.status, r.cseq.method) for r in run.responses_to_a] == [
        (100, "INVITE"),
        (400, "INVITE"),
    ]
    assert len(run.controller) == 0
    assert_nothing_left(run)


def test_a_re_invite_answered_only_1xx_is_cancelled_when_the_call_ends() -> None:
    # The callee answers the caller's re-INVITE with a 180 and hangs up: the caller
    # gets 487 and the callee's re-INVITE a CANCEL (it waited for ever in Proceeding).
    run = replay(ANSWERED, {5: Spoil("status", status=180)})
    assert (487, "INVITE") in [(r.status, r.cseq.method) for r in run.responses_to_a]
    (cancel,) = run.to_b["CANCEL"]
    assert cancel.cseq.seq == run.to_b["INVITE"][-1].cseq.seq
    assert_nothing_left(run)


def test_an_answer_to_a_relayed_re_invite_naming_another_dialog_gets_502() -> None:
    # The callee's 200 to the re-INVITE names another Call-ID: the caller waited for
    # ever for an answer to its re-INVITE.
    run = replay(ANSWERED[:7], {5: Spoil("set", "Call-ID", "elsewhere@203.0.113.5")})
    statuses = [(r.status, r.cseq.method, r.cseq.seq) for r in run.responses_to_a]
    assert (502, "INVITE", 2) in statuses
    assert_nothing_left(run)


def test_a_notify_ahead_of_a_subscribe_answer_that_never_comes_gets_481() -> None:
    # The SUBSCRIBE gets only a 1xx; the NOTIFY that overtook its 2xx (RFC 6665
    # 4.1.2.4) waited for ever, unanswered, once the SUBSCRIBE timed out.
    run = replay(OUT_OF_DIALOG, {3: Spoil("status", status=180)})
    assert_nothing_left(run)
    assert [(r.status, r.cseq.method) for r in run.responses_to_b] == [(481, "NOTIFY")]


def test_the_sbc_s_own_re_invite_answered_only_1xx_is_cancelled_when_the_call_ends() -> None:
    # The callee's answer to the caller's re-INVITE has no Content-Type: the SBC offers
    # it the old session again in a re-INVITE of its own, which it answers with 180
    # only, then hangs up: that re-INVITE waited for ever in Proceeding.
    run = replay(ANSWERED[:6], {5: Spoil("drop", "Content-Type")})
    reoffer = latest(run.to_b, "INVITE")
    assert reoffer is not None and reoffer.cseq.seq > run.to_b["INVITE"][1].cseq.seq
    for make in (b_answers("INVITE", 180), ANSWERED[9], a_answers("BYE", 200)):
        made = make(run)
        assert made is not None
        run.feed(made[0], made[1], None)
    (cancel,) = {r.cseq.seq: r for r in run.to_b["CANCEL"]}.values()
    assert cancel.via.branch == reoffer.via.branch
    assert_nothing_left(run)


def test_a_call_ending_after_its_re_invite_was_cancelled_cancels_nothing_twice() -> None:
    # The caller CANCELs its re-INVITE, which the callee answered only 180; then the
    # callee hangs up. The CANCEL already sent must not be sent again at the end.
    run = replay(ANSWERED[:6], {5: Spoil("status", status=180)})
    cancel = from_a("CANCEL", 2, "inv2", run)
    run.feed(cancel, CALLER, None)
    assert len({r.cseq.seq for r in run.to_b["CANCEL"]}) == 1
    for make in ANSWERED[9:]:
        made = make(run)
        assert made is not None
        run.feed(made[0], made[1], None)
    assert len(run.controller) == 0
    assert len({r.via.branch for r in run.to_b["CANCEL"]}) == 1
    assert_nothing_left(run)


def test_an_early_dialog_is_offered_again_by_update_never_re_invite() -> None:
    # The callee's answer to an early UPDATE is unusable: no re-INVITE may go while
    # the INVITE is unanswered (RFC 3261 14.1); the SBC sent one.
    run = replay(EARLY[:6], {5: Spoil("drop", "Content-Type")})
    assert len(run.to_b["INVITE"]) == 1


SCRIPTS = {
    "answered": ANSWERED,
    "cancelled": CANCELLED,
    "held by b": HELD_BY_B,
    "early": EARLY,
    "out of dialog": OUT_OF_DIALOG,
    "transfer": TRANSFER,
    "re-invite cancelled": REINVITE_CANCELLED,
    "re-invite 481": REINVITE_481,
    "offerless re-invite crossed": OFFERLESS_REINVITE_CROSSED,
    "prack offer": PRACK_OFFER,
    "prack offer, 2xx held": PRACK_OFFER_HELD,
    "prack offer, 2xx crossed": PRACK_OFFER_CROSSED,
    "early offer from b": EARLY_FROM_B,
    "late offer, 100rel": LATE_RELIABLE,
    "trunk challenges": CHALLENGED,
}


@SETTINGS
@given(
    st.sampled_from(sorted(SCRIPTS)),
    st.dictionaries(st.integers(0, len(ANSWERED) - 1), spoils, min_size=1, max_size=2),
)
def test_a_spoilt_message_raises_nothing_and_leaks_nothing(
    which: str, spoilt: dict[int, Spoil]
) -> None:
    run = play(SCRIPTS[which], spoilt)
    assert_nothing_left(run)


def test_the_trunk_s_challenges_are_answered_in_the_unspoilt_script() -> None:
    run = play(CHALLENGED, {})
    invites, byes = run.to_b["INVITE"], run.to_b["BYE"]
    assert len(invites) == 4 and len(byes) == 2
    answered = [invites[1], invites[3], byes[1]]
    assert all(r.headers.fields("Proxy-Authorization") or r.headers.fields("Authorization")
               for r in answered)  # fmt: skip
    assert not invites[0].headers.fields("Proxy-Authorization")
    assert_nothing_left(run)
