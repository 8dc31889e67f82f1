"""Tests for sbc.sip.transaction: RFC 3261 17 state machines, timers and matching.

The clock is fake: every test passes ``now`` explicitly and steps it to the
deadlines the transactions announce.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.sip.transaction import (
    CLIENT_INVITE_TABLE,
    CLIENT_NON_INVITE_TABLE,
    MAX_TRANSACTIONS,
    SERVER_INVITE_TABLE,
    SERVER_NON_INVITE_TABLE,
    AckReceived,
    CancelReceived,
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    InviteAccepted,
    Output,
    RequestReceived,
    RequestRefused,
    ResponseReceived,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    Stimulus,
    StrayResponse,
    Timer,
    TimerConfig,
    Transaction,
    TransactionError,
    TransactionLayer,
    TransactionLimitError,
    TransactionState,
    TransactionTerminated,
    TransactionTimeout,
    TransportError,
    client_key,
    server_key,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "sip-torture" / "rfc4475"
PEER = ("192.0.2.10", 5060)

INVITE = (
    "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/{transport} pc33.atlanta.example.com;branch={branch}\r\n"
    "Via: SIP/2.0/UDP client.atlanta.example.com;branch=z9hG4bKfirsthop\r\n"
    "Route: <sip:p1.example.com;lr>\r\n"
    "Route: <sip:p2.example.com;lr>\r\n"
    "Max-Forwards: 69\r\n"
    "To: Bob <sip:bob@biloxi.example.com>\r\n"
    "From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    "Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
)

OPTIONS = (
    "OPTIONS sip:carol@chicago.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/{transport} pc33.atlanta.example.com;branch={branch}\r\n"
    "Max-Forwards: 70\r\n"
    "To: <sip:carol@chicago.example.com>\r\n"
    "From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    "Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    "CSeq: 63104 OPTIONS\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
)


def invite(branch: str = "z9hG4bK776asdhds", transport: str = "UDP") -> Request:
    message = parse_message(INVITE.format(branch=branch, transport=transport).encode())
    assert isinstance(message, Request)
    return message


def options(branch: str = "z9hG4bKnashds8", transport: str = "UDP") -> Request:
    message = parse_message(OPTIONS.format(branch=branch, transport=transport).encode())
    assert isinstance(message, Request)
    return message


def response_to(request: Request, status: int, to_tag: str | None = "a6c85cf") -> Response:
    """A response as the peer would send it, round-tripped through the parser."""
    built = make_response(request, status, to_tag=to_tag if status > 100 else None)
    message = parse_message(bytes(built))
    assert isinstance(message, Response)
    return message


def sent(out: Output) -> list[bytes]:
    return [item.data for item in out.messages]


def start_lines(out: Output) -> list[bytes]:
    return [item.data.split(b"\r\n", 1)[0] for item in out.messages]


def kinds(out: Output) -> list[type]:
    return [type(event) for event in out.events]


def run_timers(tx: Transaction, until: float) -> list[tuple[float, Output]]:
    """Step the fake clock from deadline to deadline up to ``until``."""
    fired = []
    while (deadline := tx.next_deadline()) is not None and deadline <= until:
        fired.append((deadline, tx.handle_timer(deadline)))
    return fired


# -- the tables read like the figures -------------------------------------------------


def test_tables_only_use_their_figures_stimuli() -> None:
    server_inputs = {Stimulus.TU_1XX, Stimulus.TU_2XX, Stimulus.TU_300_699}
    client_inputs = {Stimulus.RECEIVED_1XX, Stimulus.RECEIVED_2XX, Stimulus.RECEIVED_300_699}
    for table in (CLIENT_INVITE_TABLE, CLIENT_NON_INVITE_TABLE):
        assert not {stimulus for _, stimulus in table} & server_inputs
    for table in (SERVER_INVITE_TABLE, SERVER_NON_INVITE_TABLE):
        assert not {stimulus for _, stimulus in table} & client_inputs
    assert {t for _, t in CLIENT_INVITE_TABLE if isinstance(t, Timer)} == {
        Timer.A,
        Timer.B,
        Timer.D,
        Timer.M,
    }
    assert {t for _, t in CLIENT_NON_INVITE_TABLE if isinstance(t, Timer)} == {
        Timer.E,
        Timer.F,
        Timer.K,
    }
    assert {t for _, t in SERVER_INVITE_TABLE if isinstance(t, Timer)} == {
        Timer.G,
        Timer.H,
        Timer.I,
        Timer.L,
    }
    assert {t for _, t in SERVER_NON_INVITE_TABLE if isinstance(t, Timer)} == {Timer.J}
    # Nothing leaves Terminated.
    for table in (
        CLIENT_INVITE_TABLE,
        CLIENT_NON_INVITE_TABLE,
        SERVER_INVITE_TABLE,
        SERVER_NON_INVITE_TABLE,
    ):
        assert all(state is not TransactionState.TERMINATED for state, _ in table)


# -- client INVITE: RFC 3261 figure 5 + RFC 6026 --------------------------------------


def test_client_invite_udp_timer_a_doubles_until_timer_b() -> None:
    request = invite()
    tx = ClientInviteTransaction(request, PEER, reliable=False)
    assert tx.state is TransactionState.CALLING
    out = tx.start(0.0)
    assert sent(out) == [bytes(request)]
    assert out.messages[0].destination == PEER
    assert out.messages[0].transaction is tx
    assert tx.timer_deadline(Timer.A) == 0.5
    assert tx.timer_deadline(Timer.B) == 32.0
    assert tx.handle_timer(0.49) == Output()
    fired = run_timers(tx, 100.0)
    retransmissions = [t for t, out in fired if sent(out) == [bytes(request)]]
    # 17.1.1.2: A = T1, 2*T1, 4*T1 ... until B = 64*T1.
    assert retransmissions == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    last_time, last = fired[-1]
    assert last_time == 32.0
    assert sent(last) == []
    assert last.events == (TransactionTimeout(tx, Timer.B), TransactionTerminated(tx))
    assert tx.state is TransactionState.TERMINATED
    assert tx.next_deadline() is None


def test_client_invite_timers_follow_t1() -> None:
    tx = ClientInviteTransaction(invite(), PEER, reliable=False, config=TimerConfig(t1=0.1))
    tx.start(10.0)
    assert tx.timer_deadline(Timer.A) == pytest.approx(10.1)
    assert tx.timer_deadline(Timer.B) == pytest.approx(16.4)


def test_client_invite_tcp_never_retransmits() -> None:
    tx = ClientInviteTransaction(invite(transport="TCP"), PEER, reliable=True)
    assert len(tx.start(0.0).messages) == 1
    assert tx.timer_deadline(Timer.A) is None
    assert tx.next_deadline() == 32.0
    fired = run_timers(tx, 100.0)
    assert [t for t, _ in fired] == [32.0]
    assert kinds(fired[0][1]) == [TransactionTimeout, TransactionTerminated]


def test_client_invite_provisional_stops_retransmissions_and_timer_b() -> None:
    request = invite()
    tx = ClientInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    ringing = response_to(request, 180)
    out = tx.receive(ringing, 0.2)
    assert out.events == (ResponseReceived(tx, ringing),)
    assert sent(out) == []
    assert tx.state is TransactionState.PROCEEDING
    # 17.1.1.2: no more retransmissions, and Timer B belongs to Calling only.
    assert tx.next_deadline() is None
    again = tx.receive(response_to(request, 183), 1.0)
    assert kinds(again) == [ResponseReceived]
    assert tx.state is TransactionState.PROCEEDING


@pytest.mark.parametrize("status", [300, 404, 486, 503, 603])
def test_client_invite_acks_non_2xx_with_exact_headers(status: int) -> None:
    request = invite()
    tx = ClientInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    tx.receive(response_to(request, 180), 0.1)
    final = parse_message(
        bytes(make_response(request, status)).replace(
            b"To: Bob <sip:bob@biloxi.example.com>",
            b'To: "Bob" <sip:bob@biloxi.example.com>;tag=a6c85cf',
        )
    )
    assert isinstance(final, Response)
    out = tx.receive(final, 1.0)
    assert tx.state is TransactionState.COMPLETED
    assert out.events == (ResponseReceived(tx, final),)
    # RFC 3261 17.1.1.3: Request-URI, Call-ID, From, CSeq number, the top Via and
    # Route from the INVITE; To from the response, tag included; method ACK.
    assert sent(out) == [
        b"ACK sip:bob@biloxi.example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n"
        b"Route: <sip:p1.example.com;lr>\r\n"
        b"Route: <sip:p2.example.com;lr>\r\n"
        b"Max-Forwards: 69\r\n"
        b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
        b'To: "Bob" <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n'
        b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
        b"CSeq: 314159 ACK\r\n"
        b"Content-Length: 0\r\n"
        b"\r\n"
    ]
    assert out.messages[0].destination == PEER
    assert tx.ack is not None and tx.ack.method == "ACK"
    # Timer D: 32 s over UDP; a retransmitted final is ACKed again, not passed up.
    assert tx.timer_deadline(Timer.D) == 33.0
    again = tx.receive(final, 5.0)
    assert sent(again) == sent(out)
    assert again.events == ()
    assert tx.receive(response_to(request, 180), 6.0) == Output()
    fired = run_timers(tx, 100.0)
    assert [t for t, _ in fired] == [33.0]
    assert fired[0][1].events == (TransactionTerminated(tx),)


def test_client_invite_non_2xx_straight_from_calling() -> None:
    request = invite()
    tx = ClientInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    out = tx.receive(response_to(request, 407), 0.3)
    assert kinds(out) == [ResponseReceived]
    assert start_lines(out) == [b"ACK sip:bob@biloxi.example.com SIP/2.0"]
    assert tx.timer_deadline(Timer.A) is None
    assert tx.timer_deadline(Timer.B) is None
    assert tx.next_deadline() == 32.3


def test_client_invite_tcp_timer_d_is_zero() -> None:
    request = invite(transport="TCP")
    tx = ClientInviteTransaction(request, PEER, reliable=True)
    tx.start(0.0)
    out = tx.receive(response_to(request, 486), 2.0)
    # The ACK is still sent, then D = 0 terminates at once (17.1.1.2).
    assert start_lines(out) == [b"ACK sip:bob@biloxi.example.com SIP/2.0"]
    assert kinds(out) == [ResponseReceived, TransactionTerminated]
    assert tx.state is TransactionState.TERMINATED


def test_client_invite_2xx_goes_to_accepted_and_is_not_acked() -> None:
    request = invite()
    tx = ClientInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    tx.receive(response_to(request, 180), 0.1)
    ok = response_to(request, 200)
    out = tx.receive(ok, 2.0)
    assert out.events == (InviteAccepted(tx, ok),)
    assert sent(out) == []
    assert tx.state is TransactionState.ACCEPTED
    assert tx.timer_deadline(Timer.M) == 34.0  # RFC 6026 7.2: M = 64*T1
    # RFC 6026 7.2: retransmitted and forked 2xx go to the TU for it to ACK.
    forked = response_to(request, 200, to_tag="fork2")
    assert tx.receive(ok, 3.0).events == (InviteAccepted(tx, ok),)
    assert tx.receive(forked, 4.0).events == (InviteAccepted(tx, forked),)
    assert tx.receive(response_to(request, 486), 5.0) == Output()
    with pytest.raises(TransactionError, match=r"the ACK for a 2xx is the TU's"):
        tx.build_ack(ok)
    fired = run_timers(tx, 100.0)
    assert [t for t, _ in fired] == [34.0]
    assert fired[0][1].events == (TransactionTerminated(tx),)


def test_client_invite_2xx_from_calling_over_tcp_keeps_timer_m() -> None:
    request = invite(transport="TCP")
    tx = ClientInviteTransaction(request, PEER, reliable=True)
    tx.start(0.0)
    out = tx.receive(response_to(request, 200), 1.0)
    assert kinds(out) == [InviteAccepted]
    assert tx.next_deadline() == 33.0


@pytest.mark.parametrize("first_final", [False, True])
def test_client_invite_transport_error(first_final: bool) -> None:
    request = invite()
    tx = ClientInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    if first_final:
        tx.receive(response_to(request, 500), 0.1)
    out = tx.transport_error(0.2)
    assert out.events == (TransportError(tx), TransactionTerminated(tx))
    assert tx.next_deadline() is None


def test_cancel_only_after_provisional_with_exact_headers() -> None:
    request = invite()
    tx = ClientInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    assert not tx.can_cancel
    with pytest.raises(TransactionError, match=r"^CANCEL not allowed in state Calling"):
        tx.build_cancel()
    tx.receive(response_to(request, 180), 0.1)
    assert tx.can_cancel
    # RFC 3261 9.1: the INVITE's Request-URI, Call-ID, To (no tag), From, CSeq
    # number, top Via and Route.
    assert bytes(tx.build_cancel()) == (
        b"CANCEL sip:bob@biloxi.example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n"
        b"Route: <sip:p1.example.com;lr>\r\n"
        b"Route: <sip:p2.example.com;lr>\r\n"
        b"Max-Forwards: 69\r\n"
        b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
        b"To: Bob <sip:bob@biloxi.example.com>\r\n"
        b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
        b"CSeq: 314159 CANCEL\r\n"
        b"Content-Length: 0\r\n"
        b"\r\n"
    )
    tx.receive(response_to(request, 487), 0.2)
    assert not tx.can_cancel


def test_client_transaction_refuses_bad_requests() -> None:
    with pytest.raises(TransactionError, match=r"^request has no RFC 3261 branch"):
        ClientInviteTransaction(invite(branch="776asdhds"), PEER, reliable=False)
    with pytest.raises(TransactionError, match=r"^OPTIONS in a client INVITE transaction$"):
        ClientInviteTransaction(options(), PEER, reliable=False)
    with pytest.raises(TransactionError, match=r"^INVITE in a client non-INVITE"):
        ClientNonInviteTransaction(invite(), PEER, reliable=False)
    tx = ClientNonInviteTransaction(options(), PEER, reliable=False)
    tx.start(0.0)
    with pytest.raises(TransactionError, match=r"^transaction already started$"):
        tx.start(0.0)


# -- client non-INVITE: RFC 3261 figure 6 ---------------------------------------------


def test_client_non_invite_udp_timer_e_caps_at_t2_until_timer_f() -> None:
    request = options()
    tx = ClientNonInviteTransaction(request, PEER, reliable=False)
    assert tx.state is TransactionState.TRYING
    assert sent(tx.start(0.0)) == [bytes(request)]
    assert tx.timer_deadline(Timer.F) == 32.0
    fired = run_timers(tx, 100.0)
    retransmissions = [t for t, out in fired if sent(out) == [bytes(request)]]
    # 17.1.2.2: E = T1, 2*T1, 4*T1, then T2 = 4 s each time.
    assert retransmissions == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert fired[-1][0] == 32.0
    assert fired[-1][1].events == (TransactionTimeout(tx, Timer.F), TransactionTerminated(tx))


def test_client_non_invite_timer_e_is_t2_in_proceeding() -> None:
    request = options()
    tx = ClientNonInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    run_timers(tx, 0.5)  # first retransmission; E now at 1.5
    trying = response_to(request, 100)
    out = tx.receive(trying, 0.7)
    assert out.events == (ResponseReceived(tx, trying),)
    assert tx.state is TransactionState.PROCEEDING
    # E and F keep running in Proceeding.
    assert tx.timer_deadline(Timer.E) == 1.5
    assert tx.timer_deadline(Timer.F) == 32.0
    fired = run_timers(tx, 100.0)
    times = [t for t, out in fired if out.messages]
    assert times == [1.5, 5.5, 9.5, 13.5, 17.5, 21.5, 25.5, 29.5]
    assert fired[-1][0] == 32.0
    assert kinds(fired[-1][1]) == [TransactionTimeout, TransactionTerminated]


@pytest.mark.parametrize("status", [200, 404])
@pytest.mark.parametrize("via_proceeding", [False, True])
def test_client_non_invite_final_then_timer_k(status: int, via_proceeding: bool) -> None:
    request = options()
    tx = ClientNonInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    if via_proceeding:
        tx.receive(response_to(request, 100), 0.1)
    final = response_to(request, status)
    out = tx.receive(final, 1.0)
    assert out.events == (ResponseReceived(tx, final),)
    assert sent(out) == []  # no ACK outside INVITE
    assert tx.state is TransactionState.COMPLETED
    assert tx.timer_deadline(Timer.K) == 6.0  # K = T4 over UDP
    assert tx.timer_deadline(Timer.E) is None
    assert tx.timer_deadline(Timer.F) is None
    # Retransmitted responses are absorbed (17.1.2.2).
    assert tx.receive(final, 2.0) == Output()
    fired = run_timers(tx, 100.0)
    assert [(t, out.events) for t, out in fired] == [(6.0, (TransactionTerminated(tx),))]


def test_client_non_invite_tcp() -> None:
    request = options(transport="TCP")
    tx = ClientNonInviteTransaction(request, PEER, reliable=True)
    tx.start(0.0)
    assert tx.timer_deadline(Timer.E) is None
    assert tx.next_deadline() == 32.0
    out = tx.receive(response_to(request, 200), 1.0)
    # K = 0 over reliable transports.
    assert kinds(out) == [ResponseReceived, TransactionTerminated]


def test_client_non_invite_tcp_timer_f() -> None:
    tx = ClientNonInviteTransaction(options(transport="TCP"), PEER, reliable=True)
    tx.start(0.0)
    fired = run_timers(tx, 100.0)
    assert [t for t, _ in fired] == [32.0]
    assert fired[0][1].events == (TransactionTimeout(tx, Timer.F), TransactionTerminated(tx))


@pytest.mark.parametrize("provisional", [False, True])
def test_client_non_invite_transport_error(provisional: bool) -> None:
    request = options()
    tx = ClientNonInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    if provisional:
        tx.receive(response_to(request, 100), 0.1)
    assert tx.transport_error(0.2).events == (TransportError(tx), TransactionTerminated(tx))


# -- server INVITE: RFC 3261 figure 7 + RFC 6026 --------------------------------------


def test_server_invite_sends_100_and_resends_last_provisional() -> None:
    request = invite()
    tx = ServerInviteTransaction(request, PEER, reliable=False)
    assert tx.state is TransactionState.PROCEEDING
    out = tx.start(0.0)
    assert sent(out) == [
        b"SIP/2.0 100 Trying\r\n"
        b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n"
        b"Via: SIP/2.0/UDP client.atlanta.example.com;branch=z9hG4bKfirsthop\r\n"
        b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
        b"To: Bob <sip:bob@biloxi.example.com>\r\n"
        b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
        b"CSeq: 314159 INVITE\r\n"
        b"Content-Length: 0\r\n"
        b"\r\n"
    ]
    assert out.messages[0].destination == PEER
    # An INVITE retransmission is absorbed and answered with the last provisional.
    assert sent(tx.receive(invite(), 0.5)) == sent(out)
    ringing = make_response(request, 180, to_tag="srv1")
    assert sent(tx.send_response(ringing, 1.0)) == [bytes(ringing)]
    assert sent(tx.receive(invite(), 1.5)) == [bytes(ringing)]
    assert tx.next_deadline() is None  # no timers in Proceeding


def test_server_invite_without_automatic_100() -> None:
    tx = ServerInviteTransaction(invite(), PEER, reliable=False, send_trying=False)
    assert tx.start(0.0) == Output()
    assert tx.receive(invite(), 0.5) == Output()


def test_an_unacknowledged_answer_is_logged_at_debug_a_silent_peer_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="sbc.sip.transaction")
    request = invite()
    server = ServerInviteTransaction(request, PEER, reliable=False)
    server.start(0.0)
    server.send_response(make_response(request, 404, to_tag="srv1"), 0.0)
    run_timers(server, 100.0)
    client = ClientInviteTransaction(invite(), PEER, reliable=False)
    client.start(0.0)
    run_timers(client, 100.0)
    levels = {r.getMessage()[-9:]: r.levelno for r in caplog.records if "timed out" in r.message}
    assert levels == {"(Timer H)": logging.DEBUG, "(Timer B)": logging.INFO}


def test_server_invite_timer_g_doubles_to_t2_until_timer_h() -> None:
    request = invite()
    tx = ServerInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    busy = make_response(request, 486, to_tag="srv1")
    out = tx.send_response(busy, 10.0)
    assert sent(out) == [bytes(busy)]
    assert tx.state is TransactionState.COMPLETED
    assert tx.timer_deadline(Timer.G) == 10.5
    assert tx.timer_deadline(Timer.H) == 42.0
    fired = run_timers(tx, 100.0)
    times = [t for t, out in fired if sent(out) == [bytes(busy)]]
    # 17.2.1: G = T1, 2*T1, 4*T1, then T2; H = 64*T1.
    assert times == [10.5, 11.5, 13.5, 17.5, 21.5, 25.5, 29.5, 33.5, 37.5, 41.5]
    assert fired[-1][0] == 42.0
    assert fired[-1][1].events == (TransactionTimeout(tx, Timer.H), TransactionTerminated(tx))


def test_server_invite_ack_confirms_then_timer_i() -> None:
    request = invite()
    tx = ServerInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    busy = make_response(request, 486, to_tag="srv1")
    tx.send_response(busy, 1.0)
    # A retransmitted INVITE gets the final response again.
    assert sent(tx.receive(invite(), 1.2)) == [bytes(busy)]
    # The TU's later responses are discarded in Completed.
    assert tx.send_response(make_response(request, 500, to_tag="srv1"), 1.3) == Output()
    ack = Request("ACK", request.raw_uri, request.headers.copy())
    assert tx.receive(ack, 1.4) == Output()
    assert tx.state is TransactionState.CONFIRMED
    assert tx.timer_deadline(Timer.G) is None
    assert tx.timer_deadline(Timer.H) is None
    assert tx.timer_deadline(Timer.I) == 6.4  # I = T4 over UDP
    # Confirmed absorbs ACK and INVITE retransmissions.
    assert tx.receive(ack, 2.0) == Output()
    assert tx.receive(invite(), 2.1) == Output()
    fired = run_timers(tx, 100.0)
    assert [(t, out.events) for t, out in fired] == [(6.4, (TransactionTerminated(tx),))]


def test_server_invite_tcp_no_timer_g_and_timer_i_zero() -> None:
    request = invite(transport="TCP")
    tx = ServerInviteTransaction(request, PEER, reliable=True)
    tx.start(0.0)
    tx.send_response(make_response(request, 603, to_tag="srv1"), 1.0)
    assert tx.timer_deadline(Timer.G) is None
    assert tx.timer_deadline(Timer.H) == 33.0
    ack = Request("ACK", request.raw_uri, request.headers.copy())
    assert tx.receive(ack, 2.0).events == (TransactionTerminated(tx),)


def test_server_invite_tcp_timer_h() -> None:
    request = invite(transport="TCP")
    tx = ServerInviteTransaction(request, PEER, reliable=True)
    tx.start(0.0)
    tx.send_response(make_response(request, 603, to_tag="srv1"), 1.0)
    fired = run_timers(tx, 100.0)
    assert [t for t, _ in fired] == [33.0]
    assert sent(fired[0][1]) == []
    assert kinds(fired[0][1]) == [TransactionTimeout, TransactionTerminated]


def test_server_invite_accepted_state() -> None:
    request = invite()
    tx = ServerInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    ok = make_response(request, 200, to_tag="srv1")
    assert sent(tx.send_response(ok, 1.0)) == [bytes(ok)]
    assert tx.state is TransactionState.ACCEPTED
    assert tx.timer_deadline(Timer.L) == 33.0  # RFC 6026 7.1: L = 64*T1
    assert tx.timer_deadline(Timer.G) is None  # the TU retransmits 2xx, not us
    # RFC 6026 7.1: INVITE retransmissions are absorbed, without a resend.
    assert tx.receive(invite(), 1.5) == Output()
    # 2xx retransmissions from the TU go out.
    assert sent(tx.send_response(ok, 1.6)) == [bytes(ok)]
    assert tx.send_response(make_response(request, 500), 1.7) == Output()
    # The ACK is not absorbed: it goes to the TU.
    ack = Request("ACK", request.raw_uri, request.headers.copy())
    assert tx.receive(ack, 2.0).events == (AckReceived(ack, PEER, tx),)
    fired = run_timers(tx, 100.0)
    assert [(t, out.events) for t, out in fired] == [(33.0, (TransactionTerminated(tx),))]


@pytest.mark.parametrize("status", [None, 180, 486, 200])
def test_server_invite_transport_error(status: int | None) -> None:
    request = invite()
    tx = ServerInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    if status is not None:
        tx.send_response(make_response(request, status, to_tag="srv1"), 0.1)
    state = tx.state
    # RFC 6026 figure 7: reported to the TU; the transaction stays (test_transaction_review2).
    assert tx.transport_error(0.2).events == (TransportError(tx),)
    assert tx.state is state


def test_server_transaction_rejects_wrong_methods_and_statuses() -> None:
    with pytest.raises(TransactionError, match=r"^OPTIONS in a server INVITE transaction$"):
        ServerInviteTransaction(options(), PEER, reliable=False)
    with pytest.raises(TransactionError, match=r"^INVITE in a server non-INVITE"):
        ServerNonInviteTransaction(invite(), PEER, reliable=False)
    tx = ServerNonInviteTransaction(options(), PEER, reliable=False)
    with pytest.raises(TransactionError, match=r"^bad status 700$"):
        tx.send_response(Response(700), 0.0)


# -- server non-INVITE: RFC 3261 figure 8 ---------------------------------------------


def test_server_non_invite_udp() -> None:
    request = options()
    tx = ServerNonInviteTransaction(request, PEER, reliable=False)
    assert tx.start(0.0) == Output()
    assert tx.state is TransactionState.TRYING
    # Trying absorbs retransmissions: there is nothing to resend yet.
    assert tx.receive(options(), 0.5) == Output()
    trying = make_response(request, 100)
    assert sent(tx.send_response(trying, 0.6)) == [bytes(trying)]
    assert tx.state is TransactionState.PROCEEDING
    assert sent(tx.receive(options(), 0.7)) == [bytes(trying)]
    ok = make_response(request, 200, to_tag="srv2")
    assert sent(tx.send_response(ok, 1.0)) == [bytes(ok)]
    assert tx.state is TransactionState.COMPLETED
    assert tx.timer_deadline(Timer.J) == 33.0  # J = 64*T1 over UDP
    assert sent(tx.receive(options(), 2.0)) == [bytes(ok)]
    # Later final responses from the TU are discarded (17.2.2).
    assert tx.send_response(make_response(request, 500), 2.5) == Output()
    fired = run_timers(tx, 100.0)
    assert [(t, out.events) for t, out in fired] == [(33.0, (TransactionTerminated(tx),))]


def test_server_non_invite_final_from_trying_over_tcp() -> None:
    request = options(transport="TCP")
    tx = ServerNonInviteTransaction(request, PEER, reliable=True)
    tx.start(0.0)
    ok = make_response(request, 404, to_tag="srv2")
    out = tx.send_response(ok, 1.0)
    # J = 0 over reliable transports: the response goes out and the transaction ends.
    assert sent(out) == [bytes(ok)]
    assert out.events == (TransactionTerminated(tx),)


@pytest.mark.parametrize("final", [False, True])
def test_server_non_invite_transport_error(final: bool) -> None:
    request = options()
    tx = ServerNonInviteTransaction(request, PEER, reliable=False)
    tx.start(0.0)
    assert tx.transport_error(0.1) == Output()  # nothing sent in Trying
    tx.send_response(make_response(request, 200 if final else 100, to_tag="x"), 0.2)
    assert tx.transport_error(0.3).events == (TransportError(tx), TransactionTerminated(tx))


# -- matching -------------------------------------------------------------------------


def test_keys_follow_17_1_3_and_17_2_3() -> None:
    request = invite()
    assert client_key("z9hG4bK776asdhds", "INVITE") != client_key("z9hG4bK776asdhds", "CANCEL")
    ack = Request("ACK", request.raw_uri, request.headers.copy())
    assert server_key(ack) == server_key(request)
    cancel = Request("CANCEL", request.raw_uri, request.headers.copy())
    assert server_key(cancel) != server_key(request)
    assert server_key(cancel, method="INVITE") == server_key(request)
    # sent-by takes part; host case does not.
    other_host = parse_message(bytes(request).replace(b"pc33.atlanta", b"pc34.atlanta", 1))
    upper_host = parse_message(bytes(request).replace(b"pc33.atlanta", b"PC33.ATLANTA", 1))
    assert isinstance(other_host, Request) and isinstance(upper_host, Request)
    assert server_key(other_host) != server_key(request)
    assert server_key(upper_host) == server_key(request)


def _layer_with_invite(
    request: Request, layer: TransactionLayer | None = None
) -> tuple[TransactionLayer, ServerInviteTransaction]:
    layer = layer or TransactionLayer()
    out = layer.receive(request, PEER, 0.0, reliable=False)
    assert len(out.events) == 1 and isinstance(out.events[0], RequestReceived)
    tx = out.events[0].transaction
    assert isinstance(tx, ServerInviteTransaction)
    return layer, tx


def test_layer_absorbs_duplicate_requests_and_resends_last_response() -> None:
    layer, tx = _layer_with_invite(invite())
    assert len(layer) == 1
    assert layer.find_server(invite()) is tx
    ringing = make_response(tx.request, 180, to_tag="srv1")
    layer.send_response(tx, ringing, 0.1)
    out = layer.receive(invite(), PEER, 0.5, reliable=False)
    assert out.events == ()
    assert sent(out) == [bytes(ringing)]
    assert len(layer) == 1
    # A different branch is a different transaction (a merged request is the TU's, 8.2.2.2).
    out = layer.receive(invite(branch="z9hG4bKother"), PEER, 0.6, reliable=False)
    assert kinds(out) == [RequestReceived]
    assert len(layer) == 2


def test_layer_ack_for_non_2xx_is_absorbed_ack_for_2xx_goes_up() -> None:
    layer, tx = _layer_with_invite(invite())
    layer.send_response(tx, make_response(tx.request, 404, to_tag="srv1"), 0.1)
    ack = Request("ACK", tx.request.raw_uri, tx.request.headers.copy())
    assert layer.receive(ack, PEER, 0.2, reliable=False) == Output()
    assert tx.state is TransactionState.CONFIRMED
    layer2, tx2 = _layer_with_invite(invite(branch="z9hG4bK2"))
    layer2.send_response(tx2, make_response(tx2.request, 200, to_tag="srv1"), 0.1)
    # 13.2.2.4: the ACK for a 2xx is a new transaction with its own branch.
    ack2xx = invite(branch="z9hG4bKack2xx")
    ack2xx.method = "ACK"
    out = layer2.receive(ack2xx, PEER, 0.2, reliable=False)
    assert out.events == (AckReceived(ack2xx, PEER, None),)
    assert len(layer2) == 1


def test_layer_routes_responses_by_branch_and_method() -> None:
    layer = TransactionLayer()
    request = invite()
    tx, out = layer.send_request(request, PEER, 0.0, reliable=False)
    assert isinstance(tx, ClientInviteTransaction)
    assert sent(out) == [bytes(request)]
    with pytest.raises(TransactionError, match=r"^CANCEL not allowed in state Calling"):
        layer.send_cancel(tx, 0.05)
    ringing = response_to(request, 180)
    assert layer.receive(ringing, PEER, 0.1, reliable=False).events == (
        ResponseReceived(tx, ringing),
    )
    cancel_tx, out = layer.send_cancel(tx, 0.2)
    assert isinstance(cancel_tx, ClientNonInviteTransaction)
    assert sent(out) == [bytes(tx.build_cancel())]
    assert start_lines(out) == [b"CANCEL sip:bob@biloxi.example.com SIP/2.0"]
    assert out.messages[0].destination == PEER
    assert len(layer) == 2
    # 17.1.3: the CANCEL shares the branch; the CSeq method tells them apart.
    cancel_ok = response_to(cancel_tx.request, 200)
    out = layer.receive(cancel_ok, PEER, 0.3, reliable=False)
    assert out.events == (ResponseReceived(cancel_tx, cancel_ok),)
    terminated = response_to(request, 487)
    out = layer.receive(terminated, PEER, 0.4, reliable=False)
    assert out.events == (ResponseReceived(tx, terminated),)
    assert start_lines(out) == [b"ACK sip:bob@biloxi.example.com SIP/2.0"]
    # A response for a branch we never used is stray.
    stray = response_to(invite(branch="z9hG4bKunknown"), 200)
    assert layer.receive(stray, PEER, 0.5, reliable=False).events == (StrayResponse(stray, PEER),)


def test_layer_refuses_duplicate_client_branch() -> None:
    layer = TransactionLayer()
    layer.send_request(options(), PEER, 0.0, reliable=False)
    with pytest.raises(TransactionError, match=r"^a OPTIONS transaction z9hG4bKnashds8 exists$"):
        layer.send_request(options(), PEER, 0.0, reliable=False)


def test_layer_matches_cancel_to_invite() -> None:
    layer, invite_tx = _layer_with_invite(invite())
    cancel = Request("CANCEL", invite_tx.request.raw_uri, invite_tx.request.headers.copy())
    cancel.headers.set("CSeq", "314159 CANCEL")
    cancel.invalidate()
    assert layer.find_cancelled(cancel) is invite_tx
    out = layer.receive(cancel, PEER, 0.5, reliable=False)
    assert len(out.events) == 1
    event = out.events[0]
    assert isinstance(event, CancelReceived)
    assert event.invite is invite_tx
    assert event.request is cancel
    assert isinstance(event.transaction, ServerNonInviteTransaction)
    assert len(layer) == 2
    # The CANCEL's own retransmission is absorbed by its transaction.
    layer.send_response(event.transaction, make_response(cancel, 200, to_tag="t"), 0.6)
    again = layer.receive(cancel, PEER, 0.7, reliable=False)
    assert again.events == ()
    assert start_lines(again) == [b"SIP/2.0 200 OK"]
    # A CANCEL for an unknown INVITE: the TU answers 481 (9.2).
    other = Request("CANCEL", cancel.raw_uri, cancel.headers.copy())
    other.headers.set("Via", "SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnope")
    other.invalidate()
    event = layer.receive(other, PEER, 0.8, reliable=False).events[0]
    assert isinstance(event, CancelReceived)
    assert event.invite is None


def test_rfc2543_request_matching_with_torture_vector() -> None:
    data = (VECTORS / "inv2543.dat").read_bytes()
    request = parse_message(data)
    assert isinstance(request, Request)
    assert request.via.branch is None
    layer, tx = _layer_with_invite(request)
    assert tx.key[0] == "rfc2543"
    # The retransmission (same bytes) matches without any branch.
    retransmission = parse_message(data)
    assert isinstance(retransmission, Request)
    assert layer.find_server(retransmission) is tx
    trying = layer.receive(retransmission, PEER, 0.5, reliable=False)
    assert start_lines(trying) == [b"SIP/2.0 100 Trying"]
    # Another CSeq is another transaction.
    other = parse_message(data.replace(b"CSeq: 56 INVITE", b"CSeq: 57 INVITE"))
    assert isinstance(other, Request)
    assert layer.find_server(other) is None
    # A CANCEL matches by the same rules, method aside (9.2).
    cancel = parse_message(
        data.replace(b"INVITE sip:", b"CANCEL sip:").replace(b"56 INVITE", b"56 CANCEL")
    )
    assert isinstance(cancel, Request)
    assert layer.find_cancelled(cancel) is tx
    # The ACK carries the To tag of the response we sent.
    layer.send_response(tx, make_response(request, 404, to_tag="2543tag"), 1.0)
    ack_data = (
        data.replace(b"INVITE sip:", b"ACK sip:")
        .replace(b"56 INVITE", b"56 ACK")
        .replace(b"user=phone\r\nCall-ID", b"user=phone;tag=2543tag\r\nCall-ID")
    )
    assert ack_data.count(b";tag=2543tag") == 1
    ack = parse_message(ack_data)
    assert isinstance(ack, Request)
    wrong_ack = parse_message(ack_data.replace(b"tag=2543tag", b"tag=wrong"))
    assert isinstance(wrong_ack, Request)
    assert layer.find_server(wrong_ack) is None
    assert layer.receive(wrong_ack, PEER, 1.5, reliable=False).events == (
        AckReceived(wrong_ack, PEER, None),
    )
    assert layer.find_server(ack) is tx
    assert layer.receive(ack, PEER, 2.0, reliable=False) == Output()
    assert tx.state is TransactionState.CONFIRMED


def test_rfc2543_branch_without_cookie_uses_fallback() -> None:
    request = invite(branch="776asdhds")
    _, tx = _layer_with_invite(request)
    assert tx.key[0] == "rfc2543"
    assert server_key(invite(branch="776asdhds")) == tx.key
    assert server_key(invite(branch="776asdhdt")) != tx.key  # top Via differs


# -- the layer: timers, lifetime, bound -----------------------------------------------


def test_layer_timers_and_removal() -> None:
    layer = TransactionLayer()
    assert layer.next_deadline() is None
    client, _ = layer.send_request(options(), PEER, 0.0, reliable=False)
    _, server = _layer_with_invite(invite(), layer)
    layer.send_response(server, make_response(server.request, 500, to_tag="x"), 0.2)
    assert layer.next_deadline() == 0.5  # Timer E
    out = layer.handle_timers(0.5)
    assert sent(out) == [bytes(client.request)]
    assert layer.next_deadline() == 0.7  # Timer G
    out = layer.handle_timers(0.7)
    assert start_lines(out) == [b"SIP/2.0 500 Server Internal Error"]
    # Both time out by 64*T1: F for the client, H for the server.
    events: list[object] = []
    while (deadline := layer.next_deadline()) is not None:
        events.extend(layer.handle_timers(deadline).events)
    assert TransactionTimeout(client, Timer.F) in events
    assert TransactionTimeout(server, Timer.H) in events
    assert len(layer) == 0


def test_layer_forgets_transactions_terminated_on_send() -> None:
    layer = TransactionLayer()
    out = layer.receive(options(transport="TCP"), "conn-1", 0.0, reliable=True)
    event = out.events[0]
    assert isinstance(event, RequestReceived)
    out = layer.send_response(event.transaction, make_response(event.request, 200), 0.1)
    assert out.messages[0].destination == "conn-1"
    assert kinds(out) == [TransactionTerminated]
    assert len(layer) == 0
    assert layer.next_deadline() is None
    # A transport error for a forgotten transaction does nothing.
    assert layer.transport_error(event.transaction, 0.2) == Output()


def test_layer_transport_error_forgets_transaction() -> None:
    layer = TransactionLayer()
    tx, out = layer.send_request(invite(), PEER, 0.0, reliable=False)
    assert out.messages[0].transaction is tx
    assert layer.transport_error(tx, 0.1).events == (TransportError(tx), TransactionTerminated(tx))
    assert len(layer) == 0
    assert layer.next_deadline() is None


def test_layer_bound_refuses_with_stateless_503() -> None:
    assert MAX_TRANSACTIONS >= 1000
    layer = TransactionLayer(max_transactions=2)
    layer.receive(invite(branch="z9hG4bK1"), PEER, 0.0, reliable=False)
    layer.receive(options(branch="z9hG4bK2"), PEER, 0.0, reliable=False)
    third = options(branch="z9hG4bK3")
    out = layer.receive(third, PEER, 0.0, reliable=False)
    assert out.events == (RequestRefused(third, PEER, 503),)
    refusal = parse_message(out.messages[0].data)
    assert isinstance(refusal, Response)
    assert refusal.status == 503
    assert refusal.headers.get("Retry-After") == "5"
    assert refusal.headers.get("CSeq") == "63104 OPTIONS"
    assert refusal.to.tag
    assert out.messages[0].destination == PEER
    assert len(layer) == 2
    # Retransmissions of known transactions still work at the bound.
    assert layer.receive(invite(branch="z9hG4bK1"), PEER, 0.1, reliable=False).messages
    # ACKs are never answered.
    ack = invite(branch="z9hG4bKack")
    ack.method = "ACK"
    assert kinds(layer.receive(ack, PEER, 0.2, reliable=False)) == [AckReceived]
    with pytest.raises(TransactionLimitError, match=r"^transaction limit of 2 reached$"):
        layer.send_request(options(), PEER, 0.0, reliable=False)


def test_layer_many_timer_updates_keep_heap_small() -> None:
    layer = TransactionLayer()
    _, tx = _layer_with_invite(invite())
    layer.send_response(tx, make_response(tx.request, 486, to_tag="x"), 0.0)
    now = 0.0
    while (deadline := layer.next_deadline()) is not None:
        now = deadline
        layer.handle_timers(now)
    assert now == 32.0
    assert layer._heap == []
