"""The transaction layer against RFC 3261 17 / 9, RFC 6026 and an operator under abuse,
from a review. The first tests name a defect each: they failed when written and were
fixed. Those under "checked" pin behaviour the review looked for and found right.

The clock is fake: every input takes ``now``; timers are stepped deadline by deadline.
"""

from __future__ import annotations

import logging

import pytest

from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.sip.transaction import (
    AckReceived,
    CancelReceived,
    ClientInviteTransaction,
    InviteAccepted,
    Output,
    RequestReceived,
    RequestRefused,
    ServerInviteTransaction,
    StrayResponse,
    Timer,
    TransactionLayer,
    TransactionLimitError,
    TransactionState,
    TransactionTerminated,
    TransactionTimeout,
)
from tests.unit.test_transaction import PEER, invite, options, response_to, sent, start_lines


def cancel_of(request: Request) -> Request:
    """The CANCEL a peer sends for its ``request`` (RFC 3261 9.1), as parsed off the wire."""
    data = (
        bytes(request)
        .replace(b"INVITE sip:", b"CANCEL sip:", 1)
        .replace(b" INVITE\r\n", b" CANCEL\r\n", 1)
    )
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


def run_layer(layer: TransactionLayer, until: float) -> list[tuple[float, Output]]:
    """Step the fake clock from the layer's deadline to deadline up to ``until``."""
    fired = []
    while (deadline := layer.next_deadline()) is not None and deadline <= until:
        fired.append((deadline, layer.handle_timers(deadline)))
    return fired


def statuses(out: Output) -> list[int]:
    return [item.message.status for item in out.messages if isinstance(item.message, Response)]


# -- RFC 3261 9.2 / 9.1: a CANCEL is never refused for want of room -------------------


def test_a_full_layer_still_takes_the_cancel_of_a_live_invite() -> None:
    # RFC 3261 9.2: a CANCEL that matches a transaction is answered 200 and the INVITE
    # 487. Before the fix a full layer answered it with its stateless 503: the caller
    # had hung up, and the call went on ringing at the callee. The room it takes is
    # bounded by the INVITEs (one CANCEL transaction per INVITE transaction).
    layer = TransactionLayer(max_transactions=1)
    first = layer.receive(invite(), PEER, 0.0, reliable=False)
    (received,) = first.events
    assert isinstance(received, RequestReceived)
    out = layer.receive(cancel_of(invite()), PEER, 1.0, reliable=False)
    assert statuses(out) == []  # no 503
    (event,) = out.events
    assert isinstance(event, CancelReceived)
    assert event.invite is received.transaction
    assert len(layer) == 2
    # A CANCEL that matches nothing, and any other new request, still find it full.
    stray = cancel_of(invite(branch="z9hG4bKnothere"))
    refused = layer.receive(stray, PEER, 1.1, reliable=False)
    assert refused.events == (RequestRefused(stray, PEER, 503),)
    assert statuses(refused) == [503]
    assert statuses(layer.receive(options(), PEER, 1.2, reliable=False)) == [503]
    assert len(layer) == 2


def test_a_full_layer_still_lets_the_tu_cancel_its_invite() -> None:
    # RFC 3261 9.1. Before the fix send_cancel raised TransactionLimitError when the
    # layer was full (a flood of requests fills it): the B2BUA, which cancels the
    # callee when the caller hangs up, lost the whole step (the 200 to the caller's
    # CANCEL and its 487 included) and the callee rang on.
    layer = TransactionLayer(max_transactions=1)
    request = invite()
    tx, _ = layer.send_request(request, PEER, 0.0, reliable=False)
    assert isinstance(tx, ClientInviteTransaction)
    layer.receive(response_to(request, 180), PEER, 0.1, reliable=False)
    cancel_tx, out = layer.send_cancel(tx, 1.0)
    assert start_lines(out) == [b"CANCEL sip:bob@biloxi.example.com SIP/2.0"]
    assert out.messages[0].transaction is cancel_tx
    assert len(layer) == 2
    with pytest.raises(TransactionLimitError, match=r"^transaction limit of 1 reached$"):
        layer.send_request(options(), PEER, 1.1, reliable=False)


def test_a_full_layer_still_lets_the_tu_hang_up() -> None:
    # The B2BUA's BYE ends a call and frees what it holds. Before, a full layer raised
    # TransactionLimitError for it, which lost the B2BUA's whole step: the caller's
    # BYE got no 200 and the callee's leg stayed up.
    layer = TransactionLayer(max_transactions=1)
    layer.send_request(options(), PEER, 0.0, reliable=False)
    request = parse_message(bytes(options("z9hG4bKbye")).replace(b"OPTIONS", b"BYE"))
    assert isinstance(request, Request)
    _, out = layer.send_request(request, PEER, 0.1, reliable=False)
    assert start_lines(out)[0].startswith(b"BYE ")
    with pytest.raises(TransactionLimitError):
        layer.send_request(options(), PEER, 0.2, reliable=False)


# -- RFC 3261 9.1: an INVITE cancelled but never answered is destroyed after 64*T1 ------


@pytest.mark.parametrize("reliable", [False, True])
def test_a_cancelled_invite_with_no_final_response_ends_after_64_t1(reliable: bool) -> None:
    # RFC 3261 9.1: "If there is no final response for the original request in 64*T1
    # seconds ... the client SHOULD then consider the original transaction cancelled and
    # SHOULD destroy the client transaction handling the original request." Before the
    # fix nothing ever ended it: a callee that answers the CANCEL but never the INVITE
    # (broken, or on purpose) held the transaction, and the B2BUA its call, for ever.
    layer = TransactionLayer()
    request = invite(transport="TCP" if reliable else "UDP")
    tx, _ = layer.send_request(request, PEER, 0.0, reliable=reliable)
    assert isinstance(tx, ClientInviteTransaction)
    layer.receive(response_to(request, 180), PEER, 0.5, reliable=reliable)
    assert layer.next_deadline() is None  # Proceeding runs no timer (17.1.1.2)
    cancel_tx, _ = layer.send_cancel(tx, 2.0)
    layer.receive(response_to(cancel_tx.request, 200), PEER, 2.1, reliable=reliable)
    # More provisionals do not put it off.
    layer.receive(response_to(request, 183), PEER, 10.0, reliable=reliable)
    assert tx.timer_deadline(Timer.B) == 34.0
    events = [event for _, out in run_layer(layer, 100.0) for event in out.events]
    assert TransactionTimeout(tx, Timer.B) in events
    assert TransactionTerminated(tx) in events
    assert tx.state is TransactionState.TERMINATED
    assert len(layer) == 0
    # A final response after that is no transaction's: the TU decides (17.1.3).
    late = response_to(request, 487)
    assert layer.receive(late, PEER, 40.0, reliable=reliable).events == (StrayResponse(late, PEER),)


@pytest.mark.parametrize("status", [487, 200])
def test_a_final_response_to_a_cancelled_invite_stops_the_64_t1_timer(status: int) -> None:
    layer = TransactionLayer()
    request = invite()
    tx, _ = layer.send_request(request, PEER, 0.0, reliable=False)
    assert isinstance(tx, ClientInviteTransaction)
    layer.receive(response_to(request, 180), PEER, 0.5, reliable=False)
    layer.send_cancel(tx, 2.0)
    final = response_to(request, status)
    layer.receive(final, PEER, 3.0, reliable=False)
    assert tx.timer_deadline(Timer.B) is None
    if status == 487:
        assert tx.state is TransactionState.COMPLETED
        assert tx.timer_deadline(Timer.D) == 35.0
    else:
        assert tx.state is TransactionState.ACCEPTED
        assert tx.timer_deadline(Timer.M) == 35.0
    timeouts = [
        event
        for _, out in run_layer(layer, 100.0)
        for event in out.events
        if isinstance(event, TransactionTimeout) and event.transaction is tx
    ]
    assert timeouts == []


# -- an operator under a flood ---------------------------------------------------------


def test_a_full_layer_warns_once_per_interval_not_once_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # At the bound every new request gets a stateless 503. Before the fix each one also
    # logged a WARNING: a flood of thousands of requests a second became thousands of
    # log lines a second (the layer already keeps Timer H out of the log for that
    # reason). Now: one warning, with the count, every OVERLOAD_LOG_INTERVAL seconds.
    caplog.set_level(logging.INFO, logger="sbc.sip.transaction")
    layer = TransactionLayer(max_transactions=1)
    layer.receive(invite(), PEER, 0.0, reliable=False)
    for i in range(1000):
        out = layer.receive(options(branch=f"z9hG4bKflood{i}"), PEER, i / 1000, reliable=False)
        assert statuses(out) == [503]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "x transaction limit of 1 reached: refused 1 request(s) in 0 s, the last "
        "OPTIONS sip:carol@chicago.example.com SIP/2.0"
    ]
    layer.receive(options(branch="z9hG4bKlater"), PEER, 12.0, reliable=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2
    assert warnings[1].startswith(
        "x transaction limit of 1 reached: refused 1000 request(s) in 12 s, the last "
    )


# -- checked: right already ------------------------------------------------------------


def test_checked_invite_retransmission_after_the_2xx_is_absorbed_by_the_layer() -> None:
    # RFC 6026 7.1: the INVITE server transaction stays in Accepted for Timer L; a
    # retransmitted INVITE is absorbed there and reaches the TU as nothing new.
    layer = TransactionLayer()
    (event,) = layer.receive(invite(), PEER, 0.0, reliable=False).events
    assert isinstance(event, RequestReceived)
    tx = event.transaction
    assert isinstance(tx, ServerInviteTransaction)
    ok = make_response(tx.request, 200, to_tag="srv1")
    layer.send_response(tx, ok, 1.0)
    assert layer.receive(invite(), PEER, 1.5, reliable=False) == Output()
    assert len(layer) == 1
    # After Timer L (64*T1 from the 2xx) a late ACK for the 2xx still reaches the TU.
    run_layer(layer, 100.0)
    assert len(layer) == 0
    ack = Request("ACK", tx.request.raw_uri, tx.request.headers.copy())
    assert layer.receive(ack, PEER, 40.0, reliable=False).events == (AckReceived(ack, PEER),)


def test_checked_2xx_of_a_fork_after_timer_m_reaches_the_tu() -> None:
    # RFC 6026 7.2: each 2xx is the TU's (it ACKs, and hangs up what it does not want);
    # in Accepted through the transaction, after Timer M as a stray response.
    layer = TransactionLayer()
    request = invite()
    tx, _ = layer.send_request(request, PEER, 0.0, reliable=False)
    assert isinstance(tx, ClientInviteTransaction)
    first = response_to(request, 200, to_tag="fork1")
    assert layer.receive(first, PEER, 1.0, reliable=False).events == (InviteAccepted(tx, first),)
    second = response_to(request, 200, to_tag="fork2")
    assert layer.receive(second, PEER, 2.0, reliable=False).events == (InviteAccepted(tx, second),)
    run_layer(layer, 100.0)
    assert len(layer) == 0
    assert layer.receive(second, PEER, 40.0, reliable=False).events == (
        StrayResponse(second, PEER),
    )


def test_checked_reliable_transports_run_no_retransmission_timers_and_zero_waits() -> None:
    # 17.1.1.2, 17.1.2.2, 17.2.1, 17.2.2: no A, E, G over TCP; D, I, J, K are zero, so a
    # transaction ends with its final exchange; B, F, H, L, M still run 64*T1.
    layer = TransactionLayer()
    (event,) = layer.receive(invite(transport="TCP"), "conn", 0.0, reliable=True).events
    assert isinstance(event, RequestReceived)
    server = event.transaction
    layer.send_response(server, make_response(server.request, 486, to_tag="t"), 1.0)
    assert server.timer_deadline(Timer.G) is None
    assert layer.next_deadline() == 33.0  # Timer H
    ack = Request("ACK", server.request.raw_uri, server.request.headers.copy())
    out = layer.receive(ack, "conn", 1.5, reliable=True)
    assert out.events == (TransactionTerminated(server),)  # Timer I = 0
    request = options(transport="TCP")
    client, out = layer.send_request(request, "conn", 2.0, reliable=True)
    assert sent(out) == [bytes(request)]
    assert client.timer_deadline(Timer.E) is None
    assert layer.next_deadline() == 34.0  # Timer F
    out = layer.receive(response_to(request, 200), "conn", 2.5, reliable=True)
    assert TransactionTerminated(client) in out.events  # Timer K = 0
    assert len(layer) == 0
