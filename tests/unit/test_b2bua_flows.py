"""The CallController's flows beyond one plain call, driven by messages and a fake clock.

Forking to registered contacts, trunk failover and probing, admission, digest on
INVITE, PRACK, in-dialog relaying (UPDATE, INFO, REFER, NOTIFY), session timers and
call timers, media timeout, shutdown, MESSAGE, glare, redirects and what an ended
call records for its CDR.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from sbc.b2bua.admission import AdmissionControl, Limits
from sbc.b2bua.call import Call, CallState, EndReason, LegSide
from sbc.b2bua.controller import (
    AllocateMedia,
    AuthFailure,
    AuthVerdict,
    CallController,
    CallTimers,
    DeleteMedia,
    NoTargets,
    RealmPolicy,
    RegisterOutcome,
    RegistrarPort,
    Step,
    Target,
    TargetSource,
    TrunkPlan,
)
from sbc.b2bua.local import LocalResponder
from sbc.b2bua.realm import Hop, Realm, RealmTable
from sbc.b2bua.routing import RouteAction, Router, RouteRule
from sbc.b2bua.targets import Directory
from sbc.b2bua.trunks import Gateway, Health, ProbePolicy, Trunk, TrunkTable
from sbc.media.session import LegState, MediaSession, MediaStream
from sbc.media.values import Endpoint
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.sip.sdp import SessionDescription
from sbc.sip.transaction import TransactionLayer
from sbc.sip.uri import Uri, parse_uri
from sbc.transport.base import Destination, Flow, ListenAddress, Transport

OUT = ListenAddress(Transport.UDP, "198.51.100.1", 5060)
IN = ListenAddress(Transport.UDP, "203.0.113.1", 5060)
CORE = Destination(Transport.UDP, "203.0.113.5", 5070)
CALLER = Flow(Transport.UDP, "198.51.100.1", 5060, "198.51.100.9", 5099)
TRUNK = Flow(Transport.UDP, "203.0.113.1", 5060, "203.0.113.5", 5070)

A_CALL_ID = "secret-call@198.51.100.9"


def sdp(user: str, address: str, port: int, version: int = 1) -> str:
    return (
        f"v=0\r\no={user} 1 {version} IN IP4 {address}\r\ns=-\r\nc=IN IP4 {address}\r\n"
        f"t=0 0\r\nm=audio {port} RTP/AVP 0\r\n"
    )


SDP = sdp("a", "198.51.100.9", 40000)
ANSWER = sdp("b", "203.0.113.5", 42000)

#: No call timers: each test turns on the ones it is about.
NO_TIMERS = CallTimers(max_duration=0, no_answer_timeout=0, session_expires=0)

_branches = itertools.count(1)


def branch() -> str:
    return f"z9hG4bKt{next(_branches)}"


def session(session_id: str = "sess") -> MediaSession:
    return MediaSession(
        session_id,
        A_CALL_ID,
        (
            MediaStream(
                0,
                LegState("outside", Endpoint.of("198.51.100.1", 20000)),
                LegState("inside", Endpoint.of("203.0.113.1", 21000)),
            ),
        ),
        0.0,
    )


def invite_text(
    *,
    call_id: str = A_CALL_ID,
    via_branch: str = "z9hG4bKcaller1",
    cseq: int = 1,
    uri: str = "sip:1000@198.51.100.1",
    extra: str = "",
    body: str = SDP,
) -> str:
    return (
        f"INVITE {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.9:5099;branch={via_branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@198.51.100.9>;tag=alicetag\r\n"
        f"To: <{uri}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} INVITE\r\n"
        "Contact: <sip:alice@198.51.100.9:5099>\r\n"
        f"{extra}"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    )


def controller(
    timers: CallTimers = NO_TIMERS,
    *,
    rules: list[RouteRule] | None = None,
    targets: TargetSource | None = None,
    registrar: RegistrarPort | None = None,
    admission: AdmissionControl | None = None,
    policies: dict[str, RealmPolicy] | None = None,
) -> CallController:
    realms = RealmTable(
        [Realm.build("outside", [OUT], "198.51.100.1"), Realm.build("inside", [IN], "203.0.113.1")]
    )
    router = Router(
        rules
        if rules is not None
        else [RouteRule("core", RouteAction.TRUNK, "outside", realm="inside", destination=CORE)]
    )
    return CallController(
        TransactionLayer(),
        realms,
        router,
        LocalResponder(),
        timers=timers,
        targets=targets,
        registrar=registrar,
        admission=admission,
        policies=policies,
    )


def receive(c: CallController, data: str, flow: Flow, now: float) -> Step:
    message = parse_message(data.encode())
    return c.handle(c.transactions.receive(message, flow, now, reliable=False), now)


def sent(step: Step) -> list[Request | Response]:
    return [o.message for o in step.output.messages]


def requests(step: Step, method: str | None = None) -> list[Request]:
    return [
        m for m in sent(step) if isinstance(m, Request) and (method is None or m.method == method)
    ]


def responses(step: Step) -> list[Response]:
    return [m for m in sent(step) if isinstance(m, Response)]


def statuses(step: Step) -> list[int]:
    return [r.status for r in responses(step)]


def ended_calls(step: Step) -> list[Call]:
    """Every call that ended in ``step``, with or without a media session."""
    out = list(step.ended)
    out.extend(m.call for m in step.media if isinstance(m, DeleteMedia) and m.call is not None)
    return out


def answer(
    request: Request,
    status: int,
    body: str = "",
    *,
    tag: str = "bobtag",
    contact: str = "sip:bob@203.0.113.5:5070",
    extra: str = "",
    content_type: str = "application/sdp",
) -> str:
    """A peer's response to ``request`` (a To tag added unless it has one)."""
    head = "".join(
        f"{name}: {value}\r\n"
        for name, value in request.headers
        if name in ("Via", "From", "Call-ID", "CSeq")
    )
    to = request.headers.get("To")
    if request.to.tag is None and status > 100:
        to = f"{to};tag={tag}"
    ctype = f"Content-Type: {content_type}\r\n" if body else ""
    return (
        f"SIP/2.0 {status} X\r\n{head}To: {to}\r\nContact: <{contact}>\r\n{extra}"
        f"{ctype}Content-Length: {len(body)}\r\n\r\n{body}"
    )


def from_a(
    method: str,
    a_tag: str,
    cseq: int,
    *,
    body: str = "",
    content_type: str = "application/sdp",
    extra: str = "",
    call_id: str = A_CALL_ID,
) -> str:
    """An in-dialog request of the caller (its dialog with the SBC's ``a_tag``)."""
    ctype = f"Content-Type: {content_type}\r\n" if body else ""
    return (
        f"{method} sip:198.51.100.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.9:5099;branch={branch()};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:alice@198.51.100.9>;tag=alicetag\r\n"
        f"To: <sip:1000@198.51.100.1>;tag={a_tag}\r\n"
        f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
        "Contact: <sip:alice@198.51.100.9:5099>\r\n"
        f"{extra}{ctype}Content-Length: {len(body)}\r\n\r\n{body}"
    )


def from_b(
    invite: Request,
    method: str,
    cseq: int,
    *,
    tag: str = "bobtag",
    body: str = "",
    content_type: str = "application/sdp",
    extra: str = "",
) -> str:
    """An in-dialog request of the callee in the dialog of the B-leg ``invite``."""
    ctype = f"Content-Type: {content_type}\r\n" if body else ""
    return (
        f"{method} sip:203.0.113.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 203.0.113.5:5070;branch={branch()};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: {invite.headers.get('To')};tag={tag}\r\n"
        f"To: {invite.headers.get('From')}\r\n"
        f"Call-ID: {invite.call_id}\r\nCSeq: {cseq} {method}\r\n"
        "Contact: <sip:bob@203.0.113.5:5070>\r\n"
        f"{extra}{ctype}Content-Length: {len(body)}\r\n\r\n{body}"
    )


def start_call(
    c: CallController,
    now: float = 0.0,
    *,
    call_id: str = A_CALL_ID,
    via_branch: str = "z9hG4bKcaller1",
    session_id: str = "sess",
    extra: str = "",
) -> tuple[list[Request], str]:
    """An INVITE from the caller, its media allocated: the B-leg INVITEs and call ref."""
    step = receive(c, invite_text(call_id=call_id, via_branch=via_branch, extra=extra), CALLER, now)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    allocated = c.media_allocated(allocate.call_ref, session(session_id), now)
    return requests(allocated, "INVITE"), allocate.call_ref


def ack_from_a(c: CallController, a_tag: str, now: float, *, call_id: str = A_CALL_ID) -> None:
    ack = from_a("ACK", a_tag, 1, call_id=call_id)
    assert sent(receive(c, ack, CALLER, now)) == []


def confirmed_call(
    c: CallController,
    now: float = 0.0,
    *,
    b_extra: str = "",
    a_extra: str = "",
) -> tuple[Request, str, str]:
    """A call answered by the callee and ACKed by the caller: B INVITE, ref, A's tag."""
    (invite,), ref = start_call(c, now, extra=a_extra)
    step = receive(c, answer(invite, 200, ANSWER, extra=b_extra), TRUNK, now)
    (ok,) = responses(step)
    assert ok.status == 200 and ok.to.tag
    ack_from_a(c, ok.to.tag, now)
    return invite, ref, ok.to.tag


class StubTargets(NoTargets):
    """Registered contacts and a trunk plan as given; records every call result."""

    def __init__(self, contacts: tuple[Target, ...] = (), plan: TrunkPlan | None = None) -> None:
        self.contacts = contacts
        self.plan = plan
        self.results: list[tuple[str, str, int | None]] = []

    def registered(self, uri: Uri, realm: str | None, now: float) -> list[Target]:
        return list(self.contacts)

    def user_known(self, uri: Uri) -> bool:
        return True

    def trunk(self, name: str, uri: Uri, now: float) -> TrunkPlan | None:
        return self.plan

    def call_result(
        self,
        trunk: str,
        gateway: str,
        status: int | None,
        now: float,
        retry_after: float | None = None,
        destination: Destination | None = None,
    ) -> None:
        self.results.append((trunk, gateway, status))

    def trunk_realm(self, trunk: str) -> str | None:
        return None if self.plan is None else self.plan.realm


def until_timers(c: CallController, done: Callable[[Step], bool]) -> tuple[float, Step]:
    """Fire the transaction layer's timers, one deadline at a time, until ``done``
    says yes to what they led to: that time and step."""
    for _ in range(50):
        deadline = c.transactions.next_deadline()
        assert deadline is not None
        step = c.handle(c.transactions.handle_timers(deadline), deadline)
        if done(step):
            return deadline, step
    raise AssertionError("the timers never led there")


def hop_of(step: Step, method: str) -> Destination:
    for outgoing in step.output.messages:
        message = outgoing.message
        if isinstance(message, Request) and message.method == method:
            assert isinstance(outgoing.destination, Hop)
            return outgoing.destination.destination
    raise AssertionError(f"no {method} sent")


# -- forking to registered contacts -------------------------------------------------------

BOB1 = Destination(Transport.UDP, "203.0.113.5", 5070)
BOB2 = Destination(Transport.UDP, "203.0.113.6", 5070)
BOB1_FLOW = TRUNK
BOB2_FLOW = Flow(Transport.UDP, "203.0.113.1", 5060, "203.0.113.6", 5070)
USERS = [RouteRule("users", RouteAction.REGISTERED, "outside", realm="inside")]


def forked(c: CallController) -> tuple[Request, Request, str]:
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    step = c.media_allocated(allocate.call_ref, session(), 0.0)
    invites = requests(step, "INVITE")
    assert len(invites) == 2
    destinations = [
        o.destination.destination for o in step.output.messages if isinstance(o.destination, Hop)
    ]
    assert destinations == [BOB1, BOB2]
    return invites[0], invites[1], allocate.call_ref


def registered_targets() -> StubTargets:
    return StubTargets(
        contacts=(
            Target("inside", BOB1, "sip:bob@203.0.113.5:5070"),
            Target("inside", BOB2, "sip:bob@203.0.113.6:5070"),
        )
    )


def test_fork_the_second_answer_wins_the_other_is_cancelled_and_a_late_2xx_hung_up() -> None:
    c = controller(rules=USERS, targets=registered_targets())
    first, second, _ = forked(c)
    assert first.call_id != second.call_id and first.call_id != A_CALL_ID
    assert first.from_.tag != second.from_.tag
    assert first.raw_uri == "sip:bob@203.0.113.5:5070"
    assert second.raw_uri == "sip:bob@203.0.113.6:5070"

    (ringing,) = responses(receive(c, answer(first, 180, tag="bob1"), BOB1_FLOW, 0.1))
    assert ringing.status == 180 and ringing.call_id == A_CALL_ID

    step = receive(
        c,
        answer(second, 200, ANSWER, tag="bob2", contact="sip:bob@203.0.113.6:5070"),
        BOB2_FLOW,
        0.2,
    )
    (ok,) = responses(step)
    assert ok.status == 200 and ok.to.tag == ringing.to.tag  # one dialog on A
    (ack,) = requests(step, "ACK")
    assert ack.call_id == second.call_id and ack.to.tag == "bob2"
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == first.call_id and cancel.via.branch == first.via.branch
    assert hop_of(step, "CANCEL") == BOB1

    # The losing fork answered before it saw the CANCEL: ACK it, then BYE it.
    step = receive(c, answer(first, 200, ANSWER, tag="bob1"), BOB1_FLOW, 0.3)
    assert responses(step) == []
    assert [(r.method, r.call_id, r.to.tag) for r in requests(step)] == [
        ("ACK", first.call_id, "bob1"),
        ("BYE", first.call_id, "bob1"),
    ]
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED and call.b.call_id == second.call_id


def test_fork_all_rejected_answers_the_best_response() -> None:
    c = controller(rules=USERS, targets=registered_targets())
    first, second, ref = forked(c)
    step = receive(c, answer(first, 404), BOB1_FLOW, 0.1)
    assert responses(step) == [] and len(c) == 1  # the other fork may still answer
    step = receive(c, answer(second, 486, contact="sip:bob@203.0.113.6:5070"), BOB2_FLOW, 0.2)
    assert statuses(step) == [486]
    assert step.media == (DeleteMedia(ref, "sess"),)
    (call,) = ended_calls(step)
    assert call.end_status == 486 and call.end_reason is EndReason.REJECTED
    assert len(c) == 0


@pytest.mark.parametrize(
    ("first_status", "second_status", "relayed"),
    [(486, 404, 486), (480, 404, 480), (486, 480, 486), (404, 603, 603), (503, 500, 500)],
)
def test_fork_all_rejected_relays_the_best_in_either_order(
    first_status: int, second_status: int, relayed: int
) -> None:
    for order in ((first_status, second_status), (second_status, first_status)):
        c = controller(rules=USERS, targets=registered_targets())
        first, second, _ = forked(c)
        receive(c, answer(first, order[0]), BOB1_FLOW, 0.1)
        step = receive(c, answer(second, order[1], tag="bob2"), BOB2_FLOW, 0.2)
        assert statuses(step) == [relayed], order


# -- serial failover on a trunk -----------------------------------------------------------

GW = [Destination(Transport.UDP, f"203.0.113.{n}", 5060) for n in (11, 12, 13)]
PSTN = [RouteRule("pstn", RouteAction.TRUNK, "outside", trunk="pstn")]


def trunk_plan() -> StubTargets:
    return StubTargets(
        plan=TrunkPlan(
            "inside",
            tuple(
                Target("inside", gw, f"sip:1000@{gw.host}:5060", f"gw{n}")
                for n, gw in enumerate(GW, 1)
            ),
        )
    )


def gw_flow(destination: Destination) -> Flow:
    return Flow(Transport.UDP, "203.0.113.1", 5060, destination.host, destination.port)


def test_trunk_fails_over_on_503_and_timeout_then_answers() -> None:
    targets = trunk_plan()
    c = controller(rules=PSTN, targets=targets)
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    step = c.media_allocated(allocate.call_ref, session(), 0.0)
    (first,) = requests(step, "INVITE")
    assert hop_of(step, "INVITE") == GW[0]

    step = receive(c, answer(first, 503), gw_flow(GW[0]), 0.1)
    assert responses(step) == []  # the caller hears nothing of the failed gateway
    (second,) = requests(step, "INVITE")
    assert hop_of(step, "INVITE") == GW[1]
    assert second.call_id not in (first.call_id, A_CALL_ID)
    assert second.from_.tag != first.from_.tag

    # The second gateway never answers: Timer B (64*T1) fires, the third is tried.
    def third_tried(step: Step) -> bool:
        assert responses(step) == []
        return any(r.call_id != second.call_id for r in requests(step, "INVITE"))

    now, step = until_timers(c, third_tried)
    (third,) = [r for r in requests(step, "INVITE") if r.call_id != second.call_id]
    assert hop_of(step, "INVITE") == GW[2]
    assert third.call_id not in (first.call_id, second.call_id)
    assert now >= 64 * c.transactions.config.t1

    step = receive(c, answer(third, 200, ANSWER), gw_flow(GW[2]), now + 1)
    assert statuses(step) == [200]
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED and call.gateway == "gw3"
    assert call.a.call_id == A_CALL_ID and call.b.call_id == third.call_id
    assert targets.results == [("pstn", "gw1", 503), ("pstn", "gw2", None), ("pstn", "gw3", 200)]


def test_trunk_does_not_fail_over_on_486() -> None:
    targets = trunk_plan()
    c = controller(rules=PSTN, targets=targets)
    (first,), _ = start_call(c)
    step = receive(c, answer(first, 486), gw_flow(GW[0]), 0.1)
    assert requests(step, "INVITE") == []
    assert statuses(step) == [486]
    assert targets.results == [("pstn", "gw1", 486)]
    assert len(c) == 0


# -- trunk OPTIONS probing ----------------------------------------------------------------


def test_probes_take_a_silent_gateway_down_and_an_answer_brings_it_back() -> None:
    policy = ProbePolicy(interval=10.0, timeout=2.0, down_after=2, up_after=1)
    primary = Gateway("primary", "203.0.113.21", 5060, priority=0)
    backup = Gateway("backup", "203.0.113.22", 5060, priority=1)
    table = TrunkTable([Trunk("pstn", "inside", (primary, backup), probe=policy)])
    directory = Directory(table, rng=random.Random(1))
    c = controller(rules=PSTN, targets=directory)
    primary_flow = Flow(Transport.UDP, "203.0.113.1", 5060, "203.0.113.21", 5060)
    backup_flow = Flow(Transport.UDP, "203.0.113.1", 5060, "203.0.113.22", 5060)

    def probe_round(now: float) -> dict[str, Request]:
        step = c.handle_timers(now)
        out: dict[str, Request] = {}
        for outgoing in step.output.messages:
            message = outgoing.message
            assert isinstance(message, Request) and message.method == "OPTIONS"
            assert isinstance(outgoing.destination, Hop)
            assert outgoing.destination.local == IN
            out[outgoing.destination.destination.host] = message
        return out

    probes = probe_round(0.0)
    assert set(probes) == {"203.0.113.21", "203.0.113.22"}
    assert probes["203.0.113.21"].raw_uri == "sip:203.0.113.21:5060"
    assert c.next_deadline() == 2.0  # the probes' timeout
    receive(c, answer(probes["203.0.113.22"], 200), backup_flow, 0.1)
    assert c.handle_timers(2.0).output.messages == ()  # primary's probe lost: 1 failure
    state = table["pstn"]
    assert state.gateway_health(primary.key) is Health.UNKNOWN
    assert state.gateway_health(backup.key) is Health.UP

    probes = probe_round(10.0)
    assert set(probes) == {"203.0.113.21", "203.0.113.22"}
    receive(c, answer(probes["203.0.113.22"], 200), backup_flow, 10.1)
    c.handle_timers(12.0)
    assert state.gateway_health(primary.key) is Health.DOWN

    (invite,), _ = start_call(c, 12.5)
    assert invite.raw_uri == "sip:1000@203.0.113.22:5060"  # the primary is skipped
    receive(c, answer(invite, 486), backup_flow, 12.6)

    probes = probe_round(20.0)
    receive(c, answer(probes["203.0.113.21"], 200), primary_flow, 20.1)
    assert state.gateway_health(primary.key) is Health.UP
    (invite,), _ = start_call(c, 21.0, call_id="second-call", via_branch="z9hG4bKcaller9")
    assert invite.raw_uri == "sip:1000@203.0.113.21:5060"


# -- admission ----------------------------------------------------------------------------


def test_admission_refuses_the_second_call_until_the_first_ends() -> None:
    admission = AdmissionControl({"outside": Limits(max_calls=1)}, {}, retry_after=7)
    c = controller(admission=admission)
    _, _, a_tag = confirmed_call(c)

    step = receive(c, invite_text(call_id="second", via_branch="z9hG4bKsecond"), CALLER, 1.0)
    assert step.media == ()
    (refusal,) = [r for r in responses(step) if r.status != 100]
    assert refusal.status == 503 and refusal.headers.get("Retry-After") == "7"
    (record,) = step.ended
    assert record.end_reason is EndReason.ADMISSION and record.end_status == 503
    assert record.a.call_id == "second" and record.caller == "sip:alice@198.51.100.9"
    assert len(c) == 1

    receive(c, from_a("BYE", a_tag, 2), CALLER, 2.0)
    assert len(c) == 0
    step = receive(c, invite_text(call_id="third", via_branch="z9hG4bKthird"), CALLER, 3.0)
    assert [type(m) for m in step.media] == [AllocateMedia]
    assert len(c) == 1


# -- digest authentication on INVITE ------------------------------------------------------


class StubRegistrar:
    """Challenges a request without Proxy-Authorization; accepts the password "right"."""

    def __init__(self) -> None:
        self.asked = 0
        self.sources: list[str | None] = []

    def register(self, *args: object) -> RegisterOutcome:
        raise AssertionError("no REGISTER in these tests")

    def answers_challenge(self, request: Request, now: float) -> bool:
        raise AssertionError("no REGISTER in these tests")

    def authenticate(
        self, request: Request, now: float, *, source: str | None = None
    ) -> AuthVerdict:
        self.asked += 1
        self.sources.append(source)
        credentials = request.headers.get("Proxy-Authorization")
        if credentials is None:
            challenge = ("Proxy-Authenticate", 'Digest realm="sbc", nonce="n1"')
            response = make_response(request, 407, to_tag="t407", headers=(challenge,))
            return AuthVerdict(response)
        if 'response="right"' in credentials:
            return AuthVerdict(None, user="alice")
        return AuthVerdict(make_response(request, 403, to_tag="t403"), "alice", auth_failed=True)


def test_invite_is_challenged_then_the_retry_becomes_a_call() -> None:
    registrar = StubRegistrar()
    c = controller(
        registrar=registrar,
        policies={"outside": RealmPolicy(authenticate=frozenset({"INVITE"}))},
    )
    step = receive(c, invite_text(), CALLER, 0.0)
    assert [s for s in statuses(step) if s != 100] == [407]
    (challenge,) = [r for r in responses(step) if r.status == 407]
    assert challenge.headers.get("Proxy-Authenticate") == 'Digest realm="sbc", nonce="n1"'
    assert step.media == () and len(c) == 0 and step.auth_failures == ()

    credentials = 'Proxy-Authorization: Digest username="alice", response="right"\r\n'
    step = receive(
        c, invite_text(via_branch="z9hG4bKretry", cseq=2, extra=credentials), CALLER, 0.1
    )
    assert [type(m) for m in step.media] == [AllocateMedia]
    assert len(c) == 1 and registrar.asked == 2
    # The guessing limit counts by where the request came from (RFC 3261 18.2.1).
    assert registrar.sources == [CALLER.remote_host] * 2


def test_wrong_credentials_report_the_source() -> None:
    c = controller(
        registrar=StubRegistrar(),
        policies={"outside": RealmPolicy(authenticate=frozenset({"INVITE"}))},
    )
    credentials = 'Proxy-Authorization: Digest username="alice", response="wrong"\r\n'
    step = receive(c, invite_text(extra=credentials), CALLER, 0.0)
    assert [s for s in statuses(step) if s != 100] == [403]
    assert step.auth_failures == (AuthFailure("198.51.100.9", "alice"),)
    assert step.media == () and len(c) == 0


# -- PRACK --------------------------------------------------------------------------------

RELIABLE = "Require: 100rel\r\nRSeq: 1\r\n"


def test_reliable_183_is_pracked_once_and_relayed_unreliably() -> None:
    c = controller()
    (invite,), _ = start_call(c)
    assert "100rel" in invite.tokens("Supported")
    step = receive(c, answer(invite, 183, ANSWER, extra=RELIABLE), TRUNK, 0.1)
    (prack,) = requests(step, "PRACK")
    assert prack.headers.get("RAck") == "1 1 INVITE"
    assert prack.call_id == invite.call_id and prack.to.tag == "bobtag"
    assert prack.from_.tag == invite.from_.tag
    assert prack.raw_uri == "sip:bob@203.0.113.5:5070"  # the early dialog's remote target
    assert prack.cseq.seq == 2
    (progress,) = responses(step)
    assert progress.status == 183 and progress.call_id == A_CALL_ID
    assert "100rel" not in progress.tokens("Require") and progress.headers.get("RSeq") is None
    assert b"m=audio 20000 " in progress.body

    step = receive(c, answer(invite, 183, ANSWER, extra=RELIABLE), TRUNK, 0.2)
    assert requests(step, "PRACK") == []
    receive(c, answer(prack, 200), TRUNK, 0.2)

    # The PRACK used CSeq 2 in the dialog: the next request must go above it
    # (RFC 3261 12.2.1.1), also after the 2xx confirmed the dialog.
    receive(c, answer(invite, 200, ANSWER), TRUNK, 0.3)
    (call,) = c.calls()
    step = receive(c, from_a("BYE", call.a.local_tag, 2), CALLER, 0.4)
    (bye,) = requests(step, "BYE")
    assert bye.call_id == invite.call_id and bye.cseq.seq == 3


def test_a_second_reliable_provisional_gets_its_own_prack() -> None:
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 183, ANSWER, extra=RELIABLE), TRUNK, 0.1)
    (first,) = requests(step, "PRACK")
    receive(c, answer(invite, 183, ANSWER, extra=RELIABLE), TRUNK, 0.15)  # retransmission
    step = receive(c, answer(invite, 180, extra="Require: 100rel\r\nRSeq: 2\r\n"), TRUNK, 0.2)
    (second,) = requests(step, "PRACK")
    assert second.headers.get("RAck") == "2 1 INVITE"
    assert second.cseq.seq > first.cseq.seq


# -- in-dialog relaying: UPDATE, INFO, REFER, NOTIFY ---------------------------------------


def test_update_and_info_are_relayed_both_ways_with_bodies() -> None:
    c = controller()
    invite, _, a_tag = confirmed_call(c)

    offer = sdp("a", "198.51.100.9", 40002, version=2)
    step = receive(c, from_a("UPDATE", a_tag, 2, body=offer), CALLER, 1.0)
    (update,) = requests(step, "UPDATE")
    assert update.call_id == invite.call_id and update.to.tag == "bobtag"
    assert b"c=IN IP4 203.0.113.1" in update.body and b"198.51.100" not in bytes(update)
    step = receive(c, answer(update, 200, sdp("b", "203.0.113.5", 42002, 2)), TRUNK, 1.1)
    (ok,) = responses(step)
    assert ok.status == 200 and ok.call_id == A_CALL_ID and ok.cseq.method == "UPDATE"
    assert b"m=audio 20000 " in ok.body and b"203.0.113" not in bytes(ok)

    dtmf = "Signal=5\r\nDuration=160\r\n"
    info_b = from_b(invite, "INFO", 1, body=dtmf, content_type="application/dtmf-relay")
    step = receive(c, info_b, TRUNK, 2.0)
    (info,) = requests(step, "INFO")
    assert info.call_id == A_CALL_ID and info.to.tag == "alicetag" and info.from_.tag == a_tag
    assert info.body == dtmf.encode() and info.headers.get("Content-Type") == (
        "application/dtmf-relay"
    )
    assert b"203.0.113" not in bytes(info)
    step = receive(c, answer(info, 200), CALLER, 2.1)
    (ok,) = responses(step)
    assert ok.status == 200 and ok.call_id == invite.call_id and ok.cseq.method == "INFO"

    step = receive(
        c, from_a("INFO", a_tag, 3, body=dtmf, content_type="application/dtmf-relay"), CALLER, 3
    )
    (info,) = requests(step, "INFO")
    assert info.call_id == invite.call_id and info.body == dtmf.encode()
    step = receive(c, answer(info, 200), TRUNK, 3.1)
    assert statuses(step) == [200]


def test_an_error_answer_to_a_relayed_request_keeps_its_capabilities() -> None:
    """405 must name Allow (RFC 3261 21.4.6), 415 Accept: the far end's own lists
    cross with the error; a success answer carries none of them."""
    c = controller()
    _, _, a_tag = confirmed_call(c)
    step = receive(c, from_a("INFO", a_tag, 2, body="x", content_type="text/plain"), CALLER, 1)
    (info,) = requests(step, "INFO")
    lists = "Allow: INVITE, ACK, BYE\r\nAccept: application/sdp\r\nSupported: timer\r\n"
    step = receive(c, answer(info, 405, extra=lists), TRUNK, 1.1)
    (refused,) = responses(step)
    assert refused.status == 405 and refused.cseq.method == "INFO"
    assert refused.headers.fields("Allow") == ["INVITE, ACK, BYE"]
    assert refused.headers.fields("Accept") == ["application/sdp"]
    assert refused.headers.fields("Supported") == ["timer"]
    assert b"203.0.113" not in bytes(refused)

    step = receive(c, from_a("INFO", a_tag, 3, body="y", content_type="text/plain"), CALLER, 2)
    (info,) = requests(step, "INFO")
    step = receive(c, answer(info, 200, extra=lists), TRUNK, 2.1)
    (ok,) = responses(step)
    assert ok.status == 200 and "Allow" not in ok.headers and "Accept" not in ok.headers


def test_early_update_and_info_keep_each_leg_s_cseq_rising_after_the_answer() -> None:
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 183, ANSWER), TRUNK, 0.1)
    (progress,) = responses(step)
    a_tag = progress.to.tag
    assert a_tag

    # Early UPDATE from the caller goes out on B with CSeq 2 (the INVITE had 1).
    offer = sdp("a", "198.51.100.9", 40002, version=2)
    step = receive(c, from_a("UPDATE", a_tag, 2, body=offer), CALLER, 0.2)
    (update,) = requests(step, "UPDATE")
    assert update.cseq.seq == 2
    receive(c, answer(update, 200, sdp("b", "203.0.113.5", 42000, 2)), TRUNK, 0.25)

    # Early INFO from the callee is the SBC's first request on A: CSeq 1.
    step = receive(c, from_b(invite, "INFO", 1, body="x", content_type="text/plain"), TRUNK, 0.3)
    (info,) = requests(step, "INFO")
    receive(c, answer(info, 200), CALLER, 0.35)

    receive(c, answer(invite, 200, ANSWER), TRUNK, 0.4)
    ack_from_a(c, a_tag, 0.5)
    step = c.media_timeout("sess", 1.0)
    byes = {bye.call_id: bye for bye in requests(step, "BYE")}
    assert byes[invite.call_id].cseq.seq > update.cseq.seq  # RFC 3261 12.2.1.1
    assert byes[A_CALL_ID].cseq.seq > info.cseq.seq


REFER_TO = "Refer-To: <sip:carol@198.51.100.20:5060>\r\nReferred-By: <sip:alice@198.51.100.9>\r\n"


def test_masked_hosts_in_from_to_and_request_uri_of_the_b_leg() -> None:
    masks = RealmPolicy(
        from_host="sbc.example.net", to_host="carrier.example", request_uri_host="carrier.example"
    )
    c = controller(policies={"inside": masks})
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    allocated = c.media_allocated(allocate.call_ref, session("s"), 0.0)
    (out,) = allocated.output.messages
    invite = out.message
    assert isinstance(invite, Request)
    assert invite.raw_uri == "sip:1000@carrier.example"
    assert invite.from_.uri == parse_uri("sip:alice@sbc.example.net")
    assert invite.to.uri == parse_uri("sip:1000@carrier.example")
    # Masking names hosts only: the INVITE still goes to the route's peer.
    assert isinstance(out.destination, Hop)
    assert out.destination.destination.host == "203.0.113.5"

    # In the dialog the masked From and To stay; the Request-URI is the peer's Contact.
    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 0.1)
    (ok,) = responses(step)
    assert ok.to.tag
    ack_from_a(c, ok.to.tag, 0.2)
    step = receive(c, from_a("BYE", ok.to.tag, 2), CALLER, 1.0)
    (bye,) = requests(step, "BYE")
    assert bye.raw_uri == "sip:bob@203.0.113.5:5070"
    assert bye.from_.uri == parse_uri("sip:alice@sbc.example.net")
    assert bye.to.uri == parse_uri("sip:1000@carrier.example")


def test_escaped_crlf_in_a_user_part_injects_no_header() -> None:
    """A peer may write CR LF as %0D%0A in a user part. The SBC builds its own From,
    Request-URI and Refer-To from those users: escaped again, not decoded into the
    message (that was a header injection, and a From that broke the B-leg INVITE)."""
    c = controller(policies={"outside": RealmPolicy(refer_relay=True)})
    text = invite_text(uri="sip:10%0D%0AX-Ruri:%201@198.51.100.1").replace(
        "From: <sip:alice@198.51.100.9>", "From: <sip:al%0D%0AX-From:%201@198.51.100.9>"
    )
    step = receive(c, text, CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session("s"), 0.0), "INVITE")
    data = bytes(invite)
    again = parse_message(data)
    assert "X-From" not in again.headers and "X-Ruri" not in again.headers
    assert data.startswith(b"INVITE sip:10%0D%0AX-Ruri@")
    assert invite.from_.uri.user_unescaped == "al\r\nX-From"  # type: ignore[union-attr]

    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 0.1)
    (ok,) = responses(step)
    assert ok.to.tag
    ack_from_a(c, ok.to.tag, 0.2)
    evil = "Refer-To: <sip:ev%0D%0AX-Evil:%201@198.51.100.9>\r\n"
    step = receive(c, from_a("REFER", ok.to.tag, 2, extra=evil), CALLER, 1.0)
    (refer,) = requests(step, "REFER")
    again = parse_message(bytes(refer))
    assert "X-Evil" not in again.headers
    assert again.headers.get("Refer-To") == "<sip:ev%0D%0AX-Evil@203.0.113.1:5060>"


def test_refer_is_refused_by_default() -> None:
    c = controller()
    _, _, a_tag = confirmed_call(c)
    step = receive(c, from_a("REFER", a_tag, 2, extra=REFER_TO), CALLER, 1.0)
    assert statuses(step) == [403] and requests(step) == []


def test_refer_is_relayed_pointing_at_the_sbc_and_notify_comes_back() -> None:
    c = controller(policies={"outside": RealmPolicy(refer_relay=True)})
    invite, _, a_tag = confirmed_call(c)
    step = receive(c, from_a("REFER", a_tag, 2, extra=REFER_TO), CALLER, 1.0)
    (refer,) = requests(step, "REFER")
    assert refer.call_id == invite.call_id
    assert refer.headers.get("Refer-To") == "<sip:carol@203.0.113.1:5060>"
    assert b"198.51.100" not in bytes(refer)
    step = receive(c, answer(refer, 202), TRUNK, 1.1)
    assert statuses(step) == [202]

    sipfrag = "SIP/2.0 200 OK\r\n"
    notify_b = from_b(
        invite,
        "NOTIFY",
        1,
        body=sipfrag,
        content_type="message/sipfrag",
        extra="Event: refer\r\nSubscription-State: terminated;reason=noresource\r\n",
    )
    step = receive(c, notify_b, TRUNK, 2.0)
    (notify,) = requests(step, "NOTIFY")
    assert notify.call_id == A_CALL_ID and notify.to.tag == "alicetag"
    assert notify.headers.get("Event") == "refer"
    assert notify.headers.get("Subscription-State") == "terminated;reason=noresource"
    assert notify.body == sipfrag.encode()
    step = receive(c, answer(notify, 200), CALLER, 2.1)
    assert statuses(step) == [200]


# -- session timers (RFC 4028) ------------------------------------------------------------

SESSION_TIMERS = CallTimers(max_duration=0, no_answer_timeout=0, session_expires=90, min_se=90)
A_ALLOWS_UPDATE = "Allow: INVITE, ACK, BYE, CANCEL, UPDATE\r\n"


def refreshes(step: Step) -> tuple[Request, Request]:
    (update,) = requests(step, "UPDATE")
    (reinvite,) = requests(step, "INVITE")
    return update, reinvite


def o_line(body: bytes) -> str:
    return str(SessionDescription.parse(body).origin)


def test_session_refresh_on_each_leg_and_re_armed_by_a_200() -> None:
    c = controller(SESSION_TIMERS)
    invite, _, _ = confirmed_call(c, 10.0, a_extra=A_ALLOWS_UPDATE)
    assert invite.headers.get("Session-Expires") == "90;refresher=uac"
    assert c.handle_timers(54.9).output.messages == ()

    update, reinvite = refreshes(c.handle_timers(55.0))
    assert update.call_id == A_CALL_ID and update.to.tag == "alicetag"
    assert update.body == b"" and update.headers.get("Session-Expires") == "90;refresher=uac"
    assert reinvite.call_id == invite.call_id and reinvite.cseq.seq == 2
    assert reinvite.body and o_line(reinvite.body) == o_line(invite.body)

    step = receive(c, answer(update, 200), CALLER, 55.1)
    assert sent(step) == []
    step = receive(c, answer(reinvite, 200, ANSWER), TRUNK, 55.1)
    assert [r.method for r in requests(step)] == ["ACK"]
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED

    assert c.handle_timers(99.9).output.messages == ()
    update, reinvite = refreshes(c.handle_timers(100.0))
    assert reinvite.cseq.seq == 3 and o_line(reinvite.body) == o_line(invite.body)


def test_session_refresh_is_a_re_invite_where_update_is_not_allowed() -> None:
    c = controller(SESSION_TIMERS)
    (invite,), _ = start_call(c, 0.0)
    allow = "Allow: INVITE, ACK, BYE, UPDATE\r\n"
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER, extra=allow), TRUNK, 0.0))
    assert ok.to.tag
    ack_from_a(c, ok.to.tag, 0.0)
    step = c.handle_timers(45.0)
    (update,) = requests(step, "UPDATE")
    (reinvite,) = requests(step, "INVITE")
    assert update.call_id == invite.call_id and update.body == b""
    assert reinvite.call_id == A_CALL_ID and reinvite.to.tag == "alicetag"
    assert reinvite.headers.get("Session-Expires") == "90;refresher=uac"
    assert o_line(reinvite.body) == o_line(ok.body)  # RFC 3264 8: unchanged, same version
    step = receive(c, answer(reinvite, 200, SDP), CALLER, 45.1)
    (ack,) = requests(step, "ACK")
    assert ack.call_id == A_CALL_ID and ack.cseq.seq == reinvite.cseq.seq


def test_a_malformed_allow_entry_is_left_out_and_the_rest_still_counts() -> None:
    # Allow is advice on what may be sent: one bad entry must not fail the
    # INVITE (it used to be answered 400) nor hide the methods listed beside it.
    c = controller(SESSION_TIMERS)
    bad = "Allow: INVITE, ACK, BYE, {}, UP DATE, UPDATE\r\n"
    invite, _, _ = confirmed_call(c, 10.0, a_extra=bad, b_extra=bad)
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED
    step = c.handle_timers(55.0)
    # Both sides still allow UPDATE: each refresh is an UPDATE, no re-INVITE.
    assert sorted(r.call_id == invite.call_id for r in requests(step, "UPDATE")) == [
        False,
        True,
    ]
    assert requests(step, "INVITE") == []


def test_a_481_to_a_refresh_ends_the_call_with_bye_on_both_legs() -> None:
    c = controller(SESSION_TIMERS)
    invite, ref, _ = confirmed_call(c, 0.0, a_extra=A_ALLOWS_UPDATE)
    update, reinvite = refreshes(c.handle_timers(45.0))
    receive(c, answer(update, 200), CALLER, 45.1)
    step = receive(c, answer(reinvite, 481), TRUNK, 45.2)
    # The 481 ACKed hop by hop, then RFC 4028 10's BYE on each leg: the one whose
    # refresh failed gets it on the dialog as it was (next CSeq, same tags).
    assert [r.method for r in requests(step)] == ["ACK", "BYE", "BYE"]
    a_bye, b_bye = requests(step, "BYE")
    assert a_bye.call_id == A_CALL_ID
    assert b_bye.call_id == invite.call_id and b_bye.cseq.seq == reinvite.cseq.seq + 1
    assert b_bye.to.tag == reinvite.to.tag and b_bye.from_.tag == reinvite.from_.tag
    assert step.media == (DeleteMedia(ref, "sess"),)
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.SESSION_TIMER and call.hangup is None
    assert len(c) == 0


def test_a_refresh_that_times_out_ends_the_call_with_bye_on_both_legs() -> None:
    c = controller(SESSION_TIMERS)
    invite, ref, _ = confirmed_call(c, 0.0, a_extra=A_ALLOWS_UPDATE)
    update, reinvite = refreshes(c.handle_timers(45.0))
    receive(c, answer(update, 200), CALLER, 45.1)
    # The callee never answers the re-INVITE: Timer B (64*T1) ends its transaction.
    now, step = until_timers(c, lambda step: bool(requests(step, "BYE")))
    assert now >= 45.0 + 64 * c.transactions.config.t1
    a_bye, b_bye = requests(step, "BYE")
    assert a_bye.call_id == A_CALL_ID
    assert b_bye.call_id == invite.call_id and b_bye.cseq.seq == reinvite.cseq.seq + 1
    assert step.media == (DeleteMedia(ref, "sess"),)
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.SESSION_TIMER and call.end_status == 408
    assert len(c) == 0


def test_re_invite_from_a_during_our_refresh_on_b_gets_491() -> None:
    c = controller(SESSION_TIMERS)
    _, _, a_tag = confirmed_call(c, 0.0, a_extra=A_ALLOWS_UPDATE)
    _, reinvite = refreshes(c.handle_timers(45.0))
    offer = sdp("a", "198.51.100.9", 40000, version=2)
    step = receive(c, from_a("INVITE", a_tag, 2, body=offer), CALLER, 45.1)
    assert [s for s in statuses(step) if s != 100] == [491]
    assert requests(step) == []
    # Once our refresh is answered, the caller's retry goes through.
    receive(c, answer(reinvite, 200, ANSWER), TRUNK, 45.2)
    step = receive(c, from_a("INVITE", a_tag, 3, body=offer), CALLER, 46.0)
    assert len(requests(step, "INVITE")) == 1


def test_re_invite_from_b_during_our_refresh_on_b_gets_491() -> None:
    c = controller(SESSION_TIMERS)
    invite, _, _ = confirmed_call(c, 0.0, a_extra=A_ALLOWS_UPDATE)
    refreshes(c.handle_timers(45.0))
    offer = sdp("b", "203.0.113.5", 42000, version=2)
    step = receive(c, from_b(invite, "INVITE", 1, body=offer), TRUNK, 45.1)
    # RFC 3261 14.2: an INVITE on a dialog where our own INVITE is in progress.
    assert [s for s in statuses(step) if s != 100] == [491]
    assert requests(step) == []


# -- call timers --------------------------------------------------------------------------


def test_max_duration_hangs_up_both_legs() -> None:
    c = controller(CallTimers(max_duration=60, no_answer_timeout=0, session_expires=0))
    invite, ref, _ = confirmed_call(c, 5.0)
    assert c.next_deadline() == 65.0
    assert c.handle_timers(64.9).output.messages == ()
    step = c.handle_timers(65.0)
    byes = requests(step, "BYE")
    assert sorted(b.call_id for b in byes) == sorted([A_CALL_ID, invite.call_id])
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.MAX_DURATION and call.hangup is None
    assert step.media == (DeleteMedia(ref, "sess"),)


def test_no_answer_timeout_answers_408_and_cancels_the_b_leg() -> None:
    c = controller(CallTimers(max_duration=0, no_answer_timeout=30, session_expires=0))
    (invite,), ref = start_call(c, 0.0)
    (ringing,) = responses(receive(c, answer(invite, 180), TRUNK, 1.0))
    assert ringing.status == 180 and ringing.to.tag
    assert c.handle_timers(29.9).output.messages == ()
    step = c.handle_timers(30.0)
    assert statuses(step) == [408]
    # RFC 3261 8.2.6.2: the final response carries the tag of the provisional.
    assert responses(step)[0].to.tag == ringing.to.tag
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == invite.call_id and cancel.via.branch == invite.via.branch
    assert step.media == (DeleteMedia(ref, "sess"),)
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.NO_ANSWER_TIMEOUT and call.end_status == 408
    assert len(c) == 0


def test_media_timeout_hangs_up_a_confirmed_call() -> None:
    c = controller()
    invite, ref, _ = confirmed_call(c)
    assert c.media_timeout("other-session", 5.0) == Step()
    step = c.media_timeout("sess", 5.0)
    assert sorted(b.call_id for b in requests(step, "BYE")) == sorted([A_CALL_ID, invite.call_id])
    assert step.media == (DeleteMedia(ref, "sess"),)
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.MEDIA_TIMEOUT
    assert len(c) == 0


def test_a_lost_media_session_ends_its_call_whatever_its_state() -> None:
    """A media worker died: the answered call is hung up both ways, the ringing one
    gets 503 and its callee a CANCEL; other calls go on."""
    c = controller()
    invite, _, _ = confirmed_call(c)
    (ringing,), _ = start_call(
        c, 1.0, call_id="ringing", via_branch="z9hG4bKring", session_id="sess2"
    )
    (ring,) = responses(receive(c, answer(ringing, 180, tag="ring"), TRUNK, 1.1))
    assert c.media_lost("other-session", 2.0) == Step()
    step = c.media_lost("sess2", 2.0)
    (refusal,) = responses(step)
    assert refusal.status == 503 and refusal.call_id == "ringing"
    assert refusal.to.tag == ring.to.tag
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == ringing.call_id and requests(step, "BYE") == []
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.MEDIA_LOST and call.end_status == 503
    assert len(c) == 1
    step = c.media_lost("sess", 3.0)
    assert sorted(b.call_id for b in requests(step, "BYE")) == sorted([A_CALL_ID, invite.call_id])
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.MEDIA_LOST
    assert step.media == (DeleteMedia(call.call_ref, "sess"),)
    assert len(c) == 0


def test_shutdown_ends_a_confirmed_and_a_ringing_call() -> None:
    c = controller()
    invite, _, _ = confirmed_call(c)
    (ringing,), _ = start_call(
        c, 1.0, call_id="ringing", via_branch="z9hG4bKring", session_id="sess2"
    )
    (ring,) = responses(receive(c, answer(ringing, 180, tag="ring"), TRUNK, 1.1))
    step = c.shutdown(2.0)
    byes = requests(step, "BYE")
    assert sorted(b.call_id for b in byes) == sorted([A_CALL_ID, invite.call_id])
    (refusal,) = responses(step)
    assert refusal.status == 503 and refusal.call_id == "ringing"
    assert refusal.to.tag == ring.to.tag
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == ringing.call_id
    calls = ended_calls(step)
    assert len(calls) == 2 and {call.end_reason for call in calls} == {EndReason.SHUTDOWN}
    assert {m.session_id for m in step.media if isinstance(m, DeleteMedia)} == {"sess", "sess2"}
    assert len(c) == 0


def test_cancel_answers_487_with_the_tag_of_the_ringing() -> None:
    c = controller()
    (invite,), _ = start_call(c)
    (ringing,) = responses(receive(c, answer(invite, 180), TRUNK, 0.1))
    cancel = (
        "CANCEL sip:1000@198.51.100.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKcaller1;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:alice@198.51.100.9>;tag=alicetag\r\n"
        "To: <sip:1000@198.51.100.1>\r\n"
        f"Call-ID: {A_CALL_ID}\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    )
    step = receive(c, cancel, CALLER, 0.2)
    (terminated,) = [r for r in responses(step) if r.cseq.method == "INVITE"]
    assert terminated.status == 487 and terminated.to.tag == ringing.to.tag


# -- MESSAGE out of dialog ----------------------------------------------------------------


#: A caller's MESSAGE outside any dialog.
MESSAGE = (
    "MESSAGE sip:1000@198.51.100.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKmsg;rport\r\n"
    "Max-Forwards: 70\r\nFrom: <sip:alice@198.51.100.9>;tag=alicetag\r\n"
    "To: <sip:1000@198.51.100.1>\r\nCall-ID: msg@198.51.100.9\r\nCSeq: 7 MESSAGE\r\n"
    "Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
)


def test_message_is_routed_and_its_answer_relayed_without_crossing() -> None:
    c = controller()
    step = receive(c, MESSAGE, CALLER, 0.0)
    (out,) = requests(step, "MESSAGE")
    assert hop_of(step, "MESSAGE") == CORE
    assert out.body == b"hello" and out.headers.get("Content-Type") == "text/plain"
    wire = bytes(out)
    for secret in (b"198.51.100", b"msg@", b"alicetag", b"z9hG4bKmsg"):
        assert secret not in wire

    step = receive(c, answer(out, 200, extra="X-Callee: 203.0.113.5\r\n", tag="bobmsg"), TRUNK, 0.1)
    (ok,) = responses(step)
    assert ok.status == 200 and ok.call_id == "msg@198.51.100.9" and ok.cseq.seq == 7
    assert ok.via.branch == "z9hG4bKmsg"
    wire = bytes(ok)
    assert out.via.branch is not None
    for secret in (b"203.0.113", b"bobmsg", out.call_id.encode(), out.via.branch.encode()):
        assert secret not in wire


# -- 3xx ----------------------------------------------------------------------------------

REDIRECTED = Destination(Transport.UDP, "203.0.113.7", 5080)


def test_3xx_contacts_are_tried_with_follow_redirects() -> None:
    rules = [
        RouteRule(
            "core",
            RouteAction.TRUNK,
            "outside",
            realm="inside",
            destination=CORE,
            follow_redirects=True,
        )
    ]
    c = controller(rules=rules)
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 302, contact="sip:bob@203.0.113.7:5080"), TRUNK, 0.1)
    assert responses(step) == []
    (again,) = requests(step, "INVITE")
    assert again.raw_uri == "sip:bob@203.0.113.7:5080" and hop_of(step, "INVITE") == REDIRECTED
    assert again.call_id != invite.call_id
    step = receive(c, answer(again, 200, ANSWER), TRUNK, 0.2)
    assert statuses(step) == [200]


def test_3xx_is_relayed_without_follow_redirects() -> None:
    c = controller()
    (invite,), ref = start_call(c)
    step = receive(c, answer(invite, 302, contact="sip:bob@203.0.113.7:5080"), TRUNK, 0.1)
    assert requests(step, "INVITE") == []
    (moved,) = responses(step)
    assert moved.status == 302 and moved.call_id == A_CALL_ID
    assert b"203.0.113" not in bytes(moved)
    # Where to go, at the SBC: the caller's new INVITE is routed like any call.
    assert moved.headers.fields("Contact") == ["<sip:bob@198.51.100.1:5060>"]
    assert step.media == (DeleteMedia(ref, "sess"),)


def test_a_relayed_3xx_keeps_its_contacts_q_and_expires() -> None:
    c = controller()
    (invite,), _ = start_call(c)
    contacts = (
        "Contact: <sip:desk@203.0.113.7:5080>;q=0.7;expires=300,"
        " <sip:mobile@203.0.113.8>;q=1;expires=3600;x=203.0.113.8,"
        " <sip:odd@203.0.113.9>;q=high\r\n"
    )
    step = receive(c, answer(invite, 300, extra=contacts, contact="sip:x@203.0.113.6"), TRUNK, 0.1)
    (moved,) = responses(step)
    assert moved.status == 300 and b"203.0.113" not in bytes(moved)
    assert moved.headers.values("Contact") == [
        "<sip:x@198.51.100.1:5060>",
        "<sip:desk@198.51.100.1:5060>;q=0.7;expires=300",
        "<sip:mobile@198.51.100.1:5060>;q=1;expires=3600",
        "<sip:odd@198.51.100.1:5060>",
    ]


def test_a_relayed_3xx_without_a_usable_contact_has_none() -> None:
    c = controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 302, contact="sip:203.0.113.7:5080"), TRUNK, 0.1)
    (moved,) = responses(step)
    assert moved.status == 302 and moved.headers.fields("Contact") == []


# -- what an ended call records -----------------------------------------------------------


def test_an_answered_call_records_its_cdr_fields() -> None:
    c = controller()
    (invite,), ref = start_call(c, 1.0)
    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 3.0)
    (ok,) = responses(step)
    assert ok.to.tag
    ack_from_a(c, ok.to.tag, 3.1)
    step = receive(c, from_a("BYE", ok.to.tag, 2), CALLER, 10.0)
    (call,) = ended_calls(step)
    assert call.call_ref == ref and call.route == "core"
    assert call.caller == "sip:alice@198.51.100.9" and call.callee == "sip:1000@198.51.100.1"
    assert call.created == 1.0 and call.answered_at == 3.0 and call.ended_at == 10.0
    assert call.end_reason is EndReason.BYE and call.hangup is LegSide.A
    assert call.end_status == 200
    assert call.a_codecs == "PCMU/8000" and call.b_codecs == "PCMU/8000"


def test_a_rejected_call_records_its_cdr_fields() -> None:
    c = controller()
    (invite,), ref = start_call(c, 1.0)
    step = receive(c, answer(invite, 486), TRUNK, 2.0)
    (call,) = ended_calls(step)
    assert call.call_ref == ref
    assert call.caller == "sip:alice@198.51.100.9" and call.callee == "sip:1000@198.51.100.1"
    assert call.answered_at is None and call.ended_at == 2.0
    assert call.end_reason is EndReason.REJECTED and call.hangup is LegSide.B
    assert call.end_status == 486
    assert call.a_codecs == "PCMU/8000" and call.b_codecs == ""


def test_no_answer_timeout_also_ends_a_call_stuck_allocating_media() -> None:
    c = controller(CallTimers(max_duration=0, no_answer_timeout=30, session_expires=0))
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    step = c.handle_timers(30.0)
    assert statuses(step) == [408] and len(c) == 0
    (ended,) = ended_calls(step)
    assert ended.end_reason is EndReason.NO_ANSWER_TIMEOUT
    # The relay's late answer is freed, and nothing is sent.
    late = c.media_allocated(allocate.call_ref, session(), 31.0)
    assert sent(late) == [] and [type(m).__name__ for m in late.media] == ["DeleteMedia"]


def test_a_relayed_reinvite_holds_off_the_session_refresh_on_that_leg() -> None:
    timers = CallTimers(max_duration=0, no_answer_timeout=0, session_expires=90, min_se=90)
    c = controller(timers)
    b_invite, _, a_tag = confirmed_call(c, 0.1)
    reinvite = invite_text(cseq=2, via_branch="z9hG4bKre1", body=SDP).replace(
        "To: <sip:1000@198.51.100.1>", f"To: <sip:1000@198.51.100.1>;tag={a_tag}"
    )
    step = receive(c, reinvite, CALLER, 40.0)
    assert len(requests(step, "INVITE")) == 1  # relayed to B, not answered yet
    # The refresh of B falls due while the relayed re-INVITE is pending: none is sent.
    step = c.handle_timers(45.2)
    on_b = [r for r in requests(step) if r.call_id == b_invite.call_id]
    assert on_b == [], [r.method for r in on_b]


def test_a_491_to_our_refresh_retries_after_the_rfc_back_off() -> None:
    c = controller(SESSION_TIMERS)
    confirmed_call(c, 0.0, a_extra=A_ALLOWS_UPDATE)
    update, reinvite = refreshes(c.handle_timers(45.0))
    receive(c, answer(update, 200), CALLER, 45.1)
    step = receive(c, answer(reinvite, 491), TRUNK, 45.2)
    assert [r.method for r in requests(step)] == ["ACK"] and len(c) == 1
    # RFC 3261 14.1: the B leg's Call-ID is ours, so 2.1-4 s later, not before.
    assert not requests(c.handle_timers(47.2), "INVITE")
    again = requests(c.handle_timers(49.3), "INVITE")
    assert len(again) == 1 and again[0].call_id == reinvite.call_id
    assert again[0].cseq.seq == reinvite.cseq.seq + 1


# -- late answers to B INVITEs the call let go of (RFC 3261 13.2.2.4) --------------------


def test_a_2xx_after_timer_b_is_acked_and_hung_up_while_the_call_fails_over() -> None:
    targets = trunk_plan()
    c = controller(rules=PSTN, targets=targets)
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (first,) = requests(c.media_allocated(allocate.call_ref, session(), 0.0), "INVITE")
    now = 0.0
    second: Request | None = None
    for _ in range(50):
        deadline = c.transactions.next_deadline()
        assert deadline is not None
        now = deadline
        step = c.handle(c.transactions.handle_timers(now), now)
        invites = [r for r in requests(step, "INVITE") if r.call_id != first.call_id]
        if invites:
            (second,) = invites
            break
    assert second is not None and hop_of(step, "INVITE") == GW[1]

    # The first gateway answers after its INVITE timed out: it gets an ACK and a BYE
    # in that dialog, the caller hears nothing of it and the call stays on gw2.
    late = answer(first, 200, ANSWER, tag="late")
    step = receive(c, late, gw_flow(GW[0]), now + 1)
    assert responses(step) == []
    (ack,) = requests(step, "ACK")
    (bye,) = requests(step, "BYE")
    for request in (ack, bye):
        assert request.call_id == first.call_id and request.to.tag == "late"
        assert request.from_.tag == first.from_.tag
        assert str(request.uri) == "sip:bob@203.0.113.5:5070"
    assert hop_of(step, "BYE") == GW[0]
    assert ack.cseq.seq == first.cseq.seq and bye.cseq.seq > first.cseq.seq
    assert [call.state for call in c.calls()] == [CallState.CALLING]

    # Its retransmission is ACKed again, not hung up twice.
    step = receive(c, late, gw_flow(GW[0]), now + 1.5)
    assert [r.method for r in requests(step)] == ["ACK"]
    # The BYE's answer is absorbed; gw2 still answers the call.
    assert sent(receive(c, answer(bye, 200), gw_flow(GW[0]), now + 1.6)) == []
    step = receive(c, answer(second, 200, ANSWER), gw_flow(GW[1]), now + 2)
    assert statuses(step) == [200]
    assert c.counters.get("late_answers_hung_up") == 1


def test_a_2xx_crossing_the_shutdown_cancel_is_acked_and_hung_up() -> None:
    c = controller()
    (invite,), _ = start_call(c)
    receive(c, answer(invite, 180), TRUNK, 0.1)
    step = c.shutdown(1.0)
    assert len(requests(step, "CANCEL")) == 1 and len(c) == 0
    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 1.1)
    assert responses(step) == []
    assert [r.method for r in requests(step)] == ["ACK", "BYE"]
    assert all(r.call_id == invite.call_id for r in requests(step))


def test_late_2xx_is_forgotten_after_its_window_and_strangers_get_nothing() -> None:
    c = controller()
    (invite,), _ = start_call(c)
    receive(c, answer(invite, 180), TRUNK, 0.1)
    c.shutdown(1.0)
    stranger = answer(invite, 200, ANSWER).replace(invite.call_id, "someone-else")
    assert sent(receive(c, stranger, TRUNK, 1.1)) == []
    # Long after the INVITE could be answered (the transaction gone too): ignored.
    c.handle(c.transactions.handle_timers(500.0), 500.0)
    assert sent(receive(c, answer(invite, 200, ANSWER), TRUNK, 500.0)) == []


# -- large requests over TCP (RFC 3261 18.1.1) ---------------------------------------------

IN_TCP = ListenAddress(Transport.TCP, "203.0.113.1", 5062)
CORE_TCP = Destination(Transport.TCP, "203.0.113.5", 5070)
BIG = "Subject: " + "x" * 1400 + "\r\n"


def tcp_controller(*, enabled: bool = True) -> CallController:
    realms = RealmTable(
        [
            Realm.build("outside", [OUT], "198.51.100.1"),
            Realm.build("inside", [IN, IN_TCP], "203.0.113.1", keep_headers=["Subject"]),
        ]
    )
    router = Router(
        [RouteRule("core", RouteAction.TRUNK, "outside", realm="inside", destination=CORE)]
    )
    policies = {"inside": RealmPolicy(large_requests_over_tcp=enabled)}
    return CallController(
        TransactionLayer(), realms, router, LocalResponder(), timers=NO_TIMERS, policies=policies
    )


def outgoing_invite(step: Step) -> tuple[Request, Destination, object]:
    for outgoing in step.output.messages:
        message = outgoing.message
        if isinstance(message, Request) and message.method == "INVITE":
            assert isinstance(outgoing.destination, Hop)
            return message, outgoing.destination.destination, outgoing.transaction
    raise AssertionError("no INVITE sent")


def b_invite_step(c: CallController, n: int, extra: str = BIG) -> Step:
    step = receive(
        c,
        invite_text(call_id=f"big-{n}", via_branch=f"z9hG4bKbig{n}", extra=extra),
        CALLER,
        float(n),
    )
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    return c.media_allocated(allocate.call_ref, session(f"s{n}"), float(n))


def test_a_large_invite_goes_over_tcp_and_falls_back_to_udp_when_tcp_fails() -> None:
    c = tcp_controller()
    step = b_invite_step(c, 1)
    invite, destination, tx = outgoing_invite(step)
    assert len(bytes(invite)) > 1300
    assert destination == CORE_TCP
    assert invite.via.transport == "TCP" and invite.via.port == 5062
    assert invite.via.host == "203.0.113.1"
    # Reliable: no Timer A retransmission, only Timer B.
    deadline = c.transactions.next_deadline()
    assert deadline is not None and deadline >= 1.0 + 64 * c.transactions.config.t1

    # The peer has no TCP: the INVITE goes again over UDP as a new transaction.
    assert tx is not None
    step = c.handle(c.transactions.transport_error(tx, 1.5), 1.5)  # type: ignore[arg-type]
    assert responses(step) == []  # the caller hears nothing of it
    retry, destination, _ = outgoing_invite(step)
    assert destination == CORE
    assert retry.via.transport == "UDP" and retry.via.port == 5060
    assert retry.via.branch != invite.via.branch
    assert (retry.call_id, retry.cseq.seq, retry.from_.tag) == (
        invite.call_id,
        invite.cseq.seq,
        invite.from_.tag,
    )
    assert retry.body == invite.body
    step = receive(c, answer(retry, 180), TRUNK, 1.6)
    assert statuses(step) == [180]
    step = receive(c, answer(retry, 200, ANSWER), TRUNK, 1.7)
    assert statuses(step) == [200]
    assert [call.state for call in c.calls()] == [CallState.CONFIRMED]

    # That peer now gets large requests over UDP straight away, for a while.
    _, destination, _ = outgoing_invite(b_invite_step(c, 2))
    assert destination == CORE
    _, destination, _ = outgoing_invite(b_invite_step(c, 700))
    assert destination == CORE_TCP


def test_small_requests_and_realms_without_the_policy_stay_on_udp() -> None:
    c = tcp_controller()
    invite, destination, _ = outgoing_invite(b_invite_step(c, 1, extra=""))
    assert destination == CORE and invite.via.transport == "UDP"
    c = tcp_controller(enabled=False)
    invite, destination, _ = outgoing_invite(b_invite_step(c, 1))
    assert destination == CORE and invite.via.transport == "UDP" and len(bytes(invite)) > 1300


def test_no_udp_retry_for_a_call_that_ended_while_tcp_connected() -> None:
    c = tcp_controller()
    _, destination, tx = outgoing_invite(b_invite_step(c, 1))
    assert destination == CORE_TCP and tx is not None
    c.shutdown(1.2)
    step = c.handle(c.transactions.transport_error(tx, 1.5), 1.5)  # type: ignore[arg-type]
    assert requests(step, "INVITE") == [] and len(c) == 0
    # The peer is remembered all the same.
    _, destination, _ = outgoing_invite(b_invite_step(c, 2))
    assert destination == CORE


def test_an_in_dialog_request_requiring_an_unsupported_extension_gets_420() -> None:
    # Relayed, the re-INVITE lost its Require: the caller took reliable provisionals
    # as granted and got them unreliably (the B2BUA sends reliable provisionals for
    # the first INVITE only).
    c = controller()
    invite, _, a_tag = confirmed_call(c, 0.0)
    offer = sdp("a", "198.51.100.9", 40000, version=2)
    text = from_a("INVITE", a_tag, 2, body=offer, extra="Require: 100rel, foo\r\n")
    step = receive(c, text, CALLER, 1.0)
    (refused,) = [r for r in responses(step) if r.status != 100]
    assert refused.status == 420 and refused.headers.get("Unsupported") == "100rel, foo"
    assert requests(step) == []
    # Session timers it may require: the B2BUA runs them on each leg itself.
    text = from_a("INVITE", a_tag, 3, body=offer, extra="Require: timer\r\n")
    (reinvite,) = requests(receive(c, text, CALLER, 2.0), "INVITE")
    assert reinvite.call_id == invite.call_id
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED
