"""The CallController without I/O: a whole call driven by messages and a fake clock."""

from __future__ import annotations

from sbc.b2bua.controller import (
    AllocateMedia,
    CallController,
    CallTimers,
    DeleteMedia,
    Step,
    UpdateMedia,
)
from sbc.b2bua.local import LocalResponder
from sbc.b2bua.realm import Hop, Realm, RealmTable
from sbc.b2bua.routing import RouteAction, Router, RouteRule
from sbc.media.session import LegState, MediaSession, MediaStream
from sbc.media.values import Endpoint
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.sip.transaction import TransactionLayer
from sbc.transport.base import Destination, Flow, ListenAddress, Transport

OUT = ListenAddress(Transport.UDP, "198.51.100.1", 5060)
IN = ListenAddress(Transport.UDP, "203.0.113.1", 5060)
CORE = Destination(Transport.UDP, "203.0.113.5", 5070)
CALLER = Flow(Transport.UDP, "198.51.100.1", 5060, "198.51.100.9", 5099)

INVITE = (
    "INVITE sip:1000@198.51.100.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKcaller1;rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:alice@198.51.100.9>;tag=alicetag\r\n"
    "To: <sip:1000@198.51.100.1>\r\n"
    "Call-ID: secret-call@198.51.100.9\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:alice@198.51.100.9:5099>\r\n"
    "X-Private: 198.51.100.9\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n\r\n{body}"
)


def sdp(user: str, address: str, port: int) -> str:
    return (
        f"v=0\r\no={user} 1 1 IN IP4 {address}\r\ns=-\r\nc=IN IP4 {address}\r\n"
        f"t=0 0\r\nm=audio {port} RTP/AVP 0\r\n"
    )


SDP = sdp("a", "198.51.100.9", 40000)
ANSWER = sdp("b", "203.0.113.5", 42000)

SESSION = MediaSession(
    "sess",
    "secret-call@198.51.100.9",
    (
        MediaStream(
            0,
            LegState("outside", Endpoint.of("198.51.100.1", 20000)),
            LegState("inside", Endpoint.of("203.0.113.1", 21000)),
        ),
    ),
    0.0,
)


#: No call timers: the tests of one flow see only that flow's deadlines.
NO_TIMERS = CallTimers(max_duration=0, no_answer_timeout=0, session_expires=0)


def controller(timers: CallTimers = NO_TIMERS) -> CallController:
    realms = RealmTable(
        [Realm.build("outside", [OUT], "198.51.100.1"), Realm.build("inside", [IN], "203.0.113.1")]
    )
    router = Router(
        [RouteRule("core", RouteAction.TRUNK, "outside", realm="inside", destination=CORE)]
    )
    return CallController(TransactionLayer(), realms, router, LocalResponder(), timers=timers)


def receive(c: CallController, data: str, flow: Flow, now: float) -> Step:
    message = parse_message(data.encode())
    return c.handle(c.transactions.receive(message, flow, now, reliable=False), now)


def sent(step: Step) -> list[Request | Response]:
    return [o.message for o in step.output.messages]


def answer(request: Request, status: int, body: str = "") -> str:
    head = "".join(
        f"{name}: {value}\r\n"
        for name, value in request.headers
        if name in ("Via", "From", "Call-ID", "CSeq")
    )
    to = request.headers.get("To")
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    return (
        f"SIP/2.0 {status} X\r\n{head}To: {to};tag=bobtag\r\n"
        f"Contact: <sip:bob@203.0.113.5:5070>\r\n{ctype}Content-Length: {len(body)}\r\n\r\n{body}"
    )


def test_a_call_is_two_dialogs_and_nothing_crosses() -> None:
    c = controller()
    step = receive(c, INVITE.format(length=len(SDP), body=SDP), CALLER, 0.0)
    assert [r.status for r in sent(step) if isinstance(r, Response)] == [100]
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia) and len(allocate.streams) == 1

    step = c.media_allocated(allocate.call_ref, SESSION, 0.1)
    (outgoing,) = step.output.messages
    invite = outgoing.message
    assert isinstance(invite, Request) and isinstance(outgoing.destination, Hop)
    assert outgoing.destination.destination == CORE and outgoing.destination.local == IN
    wire = bytes(invite)
    for secret in (b"198.51.100", b"secret-call", b"alicetag", b"z9hG4bKcaller1", b"X-Private"):
        assert secret not in wire
    assert b"m=audio 21000 " in wire and b"c=IN IP4 203.0.113.1" in wire

    step = receive(
        c, answer(invite, 180), Flow(Transport.UDP, "203.0.113.1", 5060, "203.0.113.5", 5070), 0.2
    )
    (ringing,) = sent(step)
    assert isinstance(ringing, Response) and ringing.status == 180
    a_tag = ringing.to.tag
    assert a_tag and a_tag != "bobtag"

    step = receive(
        c,
        answer(invite, 200, ANSWER),
        Flow(Transport.UDP, "203.0.113.1", 5060, "203.0.113.5", 5070),
        0.3,
    )
    messages = sent(step)
    ack = next(m for m in messages if isinstance(m, Request))
    ok = next(m for m in messages if isinstance(m, Response))
    assert ack.method == "ACK" and ack.call_id == invite.call_id
    assert ok.status == 200 and ok.to.tag == a_tag
    ok_wire = bytes(ok)
    for secret in (b"203.0.113", b"bobtag", b"42000"):
        assert secret not in ok_wire
    assert b"m=audio 20000 " in ok_wire
    assert any(isinstance(m, UpdateMedia) for m in step.media)
    assert len(c) == 1

    bye = (
        "BYE sip:198.51.100.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKcaller2;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:alice@198.51.100.9>;tag=alicetag\r\n"
        f"To: <sip:1000@198.51.100.1>;tag={a_tag}\r\n"
        "Call-ID: secret-call@198.51.100.9\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    step = receive(c, bye, CALLER, 1.0)
    messages = sent(step)
    assert [m.status for m in messages if isinstance(m, Response)] == [200]
    (b_bye,) = [m for m in messages if isinstance(m, Request)]
    assert b_bye.method == "BYE" and b_bye.call_id == invite.call_id
    assert b_bye.to.tag == "bobtag" and b_bye.cseq.seq == 2
    assert step.media == (DeleteMedia(allocate.call_ref, "sess"),)
    assert len(c) == 0


def test_out_of_dialog_options_is_answered_locally() -> None:
    c = controller()
    options = (
        "OPTIONS sip:198.51.100.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKopt;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:probe@198.51.100.9>;tag=p\r\n"
        "To: <sip:198.51.100.1>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    (response,) = sent(receive(c, options, CALLER, 0.0))
    assert isinstance(response, Response) and response.status == 200
    assert "INVITE" in response.tokens("Allow")


TRUNK = Flow(Transport.UDP, "203.0.113.1", 5060, "203.0.113.5", 5070)


def start_call(c: CallController, now: float = 0.0) -> tuple[Request, str]:
    """An INVITE from the caller, its media allocated: the B leg's INVITE and call ref."""
    step = receive(c, INVITE.format(length=len(SDP), body=SDP), CALLER, now)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (outgoing,) = c.media_allocated(allocate.call_ref, SESSION, now).output.messages
    assert isinstance(outgoing.message, Request)
    return outgoing.message, allocate.call_ref


def cancel_from_caller(c: CallController, now: float) -> Step:
    cancel = (
        "CANCEL sip:1000@198.51.100.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKcaller1;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:alice@198.51.100.9>;tag=alicetag\r\n"
        "To: <sip:1000@198.51.100.1>\r\n"
        "Call-ID: secret-call@198.51.100.9\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
    )
    return receive(c, cancel, CALLER, now)


def test_2xx_is_retransmitted_until_the_ack() -> None:
    c = controller()
    invite, _ = start_call(c)
    receive(c, answer(invite, 200, ANSWER), TRUNK, 0.0)
    t1 = c.transactions.config.t1
    assert c.next_deadline() == t1
    assert c.handle_timers(t1 / 2).output.messages == ()
    (again,) = sent(c.handle_timers(t1))
    assert isinstance(again, Response) and again.status == 200
    assert c.next_deadline() == t1 + 2 * t1  # 13.3.1.4: the interval doubles
    ack = (
        "ACK sip:198.51.100.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.9:5099;branch=z9hG4bKcaller3;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:alice@198.51.100.9>;tag=alicetag\r\n"
        f"To: <sip:1000@198.51.100.1>;tag={again.to.tag}\r\n"
        "Call-ID: secret-call@198.51.100.9\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    )
    assert sent(receive(c, ack, CALLER, 1.0)) == []
    assert c.next_deadline() is None
    assert len(c) == 1


def test_2xx_never_acked_ends_the_call_on_both_legs() -> None:
    c = controller()
    invite, ref = start_call(c)
    receive(c, answer(invite, 200, ANSWER), TRUNK, 0.0)
    step = Step()
    now = 0.0
    for _ in range(20):  # bounded: 64*T1 is reached after 7 retransmissions
        deadline = c.next_deadline()
        if deadline is None:
            break
        now = deadline
        step = c.handle_timers(now)
    byes = [m for m in sent(step) if isinstance(m, Request) and m.method == "BYE"]
    assert len(byes) == 2 and {b.call_id for b in byes} == {
        invite.call_id,
        "secret-call@198.51.100.9",
    }
    assert step.media == (DeleteMedia(ref, "sess"),)
    assert len(c) == 0


def test_cancel_after_ringing_answers_487_and_cancels_the_b_leg() -> None:
    c = controller()
    invite, ref = start_call(c)
    receive(c, answer(invite, 180), TRUNK, 0.1)
    messages = sent(cancel_from_caller(c, 0.2))
    statuses = sorted(m.status for m in messages if isinstance(m, Response))
    assert statuses == [200, 487]
    (cancel,) = [m for m in messages if isinstance(m, Request)]
    assert cancel.method == "CANCEL" and cancel.call_id == invite.call_id
    assert cancel.via.branch == invite.via.branch
    step = receive(c, answer(invite, 487), TRUNK, 0.3)
    # The transaction layer ACKs the 487 hop by hop; the caller hears nothing more.
    assert [m.method for m in sent(step) if isinstance(m, Request)] == ["ACK"]
    assert not [m for m in sent(step) if isinstance(m, Response)]
    assert step.media == (DeleteMedia(ref, "sess"),)


def test_cancel_before_any_provisional_waits_for_one() -> None:
    c = controller()
    invite, _ = start_call(c)
    messages = sent(cancel_from_caller(c, 0.1))
    assert not [m for m in messages if isinstance(m, Request)]  # RFC 3261 9.1
    step = receive(c, answer(invite, 180), TRUNK, 0.2)
    assert [m.method for m in sent(step) if isinstance(m, Request)] == ["CANCEL"]
    assert not [m for m in sent(step) if isinstance(m, Response)]  # no 180 after the 487


def test_cancel_while_allocating_frees_the_media_later() -> None:
    c = controller()
    step = receive(c, INVITE.format(length=len(SDP), body=SDP), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    cancel_from_caller(c, 0.1)
    late = c.media_allocated(allocate.call_ref, SESSION, 0.2)
    assert late.output.messages == () and late.media == (DeleteMedia(allocate.call_ref, "sess"),)


def test_rejection_is_relayed_without_the_callee_headers() -> None:
    c = controller()
    invite, ref = start_call(c)
    step = receive(c, answer(invite, 486), TRUNK, 0.1)
    (busy,) = [m for m in sent(step) if isinstance(m, Response)]
    assert busy.status == 486 and busy.call_id == "secret-call@198.51.100.9"
    assert b"203.0.113" not in bytes(busy) and b"bobtag" not in bytes(busy)
    assert step.media == (DeleteMedia(ref, "sess"),)


def test_b_leg_timeout_answers_408() -> None:
    c = controller()
    start_call(c)
    step = Step()
    for _ in range(20):
        deadline = c.transactions.next_deadline()
        if deadline is None:
            break
        step = c.handle(c.transactions.handle_timers(deadline), deadline)
        if any(isinstance(m, Response) for m in sent(step)):
            break
    assert [m.status for m in sent(step) if isinstance(m, Response)] == [408]


def test_no_route_is_404_and_require_is_420() -> None:
    c = controller()
    c.router = Router()
    (_, response) = sent(receive(c, INVITE.format(length=len(SDP), body=SDP), CALLER, 0.0))
    assert isinstance(response, Response) and response.status == 404
    c = controller()
    # 100rel is supported now (test_b2bua_100rel_caller.py); an unknown extension is not.
    invite = INVITE.replace("CSeq: 1 INVITE\r\n", "CSeq: 1 INVITE\r\nRequire: foo\r\n")
    responses = sent(receive(c, invite.format(length=len(SDP), body=SDP), CALLER, 0.0))
    final = [r for r in responses if isinstance(r, Response)][-1]
    assert final.status == 420 and final.tokens("Unsupported") == ("foo",)
