"""Dialogs (RFC 3261 12): creation, in-dialog requests, routing, forking, replication."""

from __future__ import annotations

import json
from typing import TypeVar

import pytest

from sbc.sip.dialog import (
    AnswerRetransmitted,
    Dialog,
    DialogAnswered,
    DialogError,
    DialogKey,
    DialogRole,
    DialogSet,
    DialogState,
    DialogTable,
    EarlyDialog,
    ExtraForkAnswered,
    RequestFailed,
)
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.sip.uas import Rejection

M = TypeVar("M", Request, Response)

CALL_ID = "a84b4c76e66710@pc33.atlanta.example.com"
P1 = "sip:p1.atlanta.example.com;lr"
P2 = "sip:p2.biloxi.example.com;lr"
# As both UAs see it: each proxy puts its Record-Route on top (RFC 3261 16.6 step 4),
# so P2 (nearest the callee) comes first.
RECORD_ROUTE = f"<{P2}>, <{P1}>"
VIA = ("UDP", "sbc.example.net", 5060)

# The INVITE we (the UAC leg of the B2BUA) send.
OUR_INVITE = (
    "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP sbc.example.net:5060;branch=z9hG4bK776asdhds\r\n"
    "Max-Forwards: 70\r\n"
    "To: Bob <sip:bob@biloxi.example.com>\r\n"
    'From: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    f"Call-ID: {CALL_ID}\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:sbc@sbc.example.net:5060>\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
)

# The INVITE we (the UAS leg) receive, through two record-routing proxies.
THEIR_INVITE = (
    "INVITE sip:bob@sbc.example.net SIP/2.0\r\n"
    "Via: SIP/2.0/UDP p2.biloxi.example.com;branch=z9hG4bK4b43c2ff8.1\r\n"
    "Via: SIP/2.0/UDP p1.atlanta.example.com;branch=z9hG4bK77ef4c2312983.1\r\n"
    "Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8\r\n"
    "Max-Forwards: 68\r\n"
    f"Record-Route: {RECORD_ROUTE}\r\n"
    "To: Bob <sip:bob@biloxi.example.com>\r\n"
    "From: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n"
    "Call-ID: 3848276298220188511@atlanta.example.com\r\n"
    "CSeq: 101 INVITE\r\n"
    "Contact: <sip:alice@pc33.atlanta.example.com;transport=tcp>\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
)


def wire(message: M) -> M:
    """``message`` serialized and parsed again: proves it is valid on the wire."""
    parsed = parse_message(bytes(message))
    assert type(parsed) is type(message)
    return parsed


def request(text: str) -> Request:
    parsed = parse_message(text.encode())
    assert isinstance(parsed, Request)
    return parsed


def answer(
    invite: Request,
    status: int,
    tag: str,
    contact: str = "<sip:bob@192.0.2.4>",
    record_route: str | None = RECORD_ROUTE,
) -> Response:
    headers = [("Contact", contact)]
    if record_route is not None:
        headers.append(("Record-Route", record_route))
    response = make_response(invite, status, to_tag=tag, headers=headers)
    # make_response keeps a To tag already there; a test may want another one.
    response.headers.set("To", str(invite.to.with_param("tag", tag)))
    return wire(response)


def send(dialog: Dialog, method: str, **kwargs: object) -> tuple[Dialog, Request]:
    transport, host, port = VIA
    dialog, req = dialog.create_request(
        method,
        transport=transport,
        host=host,
        port=port,
        **kwargs,  # type: ignore[arg-type]
    )
    return dialog, wire(req)


def ack(dialog: Dialog, invite_seq: int | None = None) -> Request:
    transport, host, port = VIA
    return wire(dialog.create_ack(transport=transport, host=host, port=port, invite_seq=invite_seq))


def uac_dialog(status: int = 200, tag: str = "bobtag") -> Dialog:
    invite = request(OUR_INVITE)
    return Dialog.from_uac_response(invite, answer(invite, status, tag))


def uas_dialog(status: int = 200) -> tuple[Request, Dialog]:
    invite = request(THEIR_INVITE)
    response = make_response(
        invite, status, to_tag="sbctag", headers=[("Contact", "<sip:sbc@198.51.100.1:5060>")]
    )
    return invite, Dialog.from_uas_response(invite, wire(response))


def in_dialog(method: str, seq: int, extra: str = "") -> Request:
    """A request Alice sends in the dialog of THEIR_INVITE."""
    return request(
        f"{method} sip:sbc@198.51.100.1:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds9\r\n"
        "Max-Forwards: 70\r\n"
        f"Route: <{P1}>, <{P2}>\r\n"
        "From: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n"
        "To: Bob <sip:bob@biloxi.example.com>;tag=sbctag\r\n"
        "Call-ID: 3848276298220188511@atlanta.example.com\r\n"
        f"CSeq: {seq} {method}\r\n"
        f"{extra}"
        "Content-Length: 0\r\n"
        "\r\n"
    )


# -- creation (RFC 3261 12.1) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "state"), [(180, DialogState.EARLY), (200, DialogState.CONFIRMED)]
)
def test_uac_dialog_from_response(status: int, state: DialogState) -> None:
    dialog = uac_dialog(status)
    assert dialog.state is state
    assert dialog.role is DialogRole.UAC
    assert dialog.key == DialogKey(CALL_ID, "1928301774", "bobtag")
    assert dialog.local_address == '"Alice" <sip:alice@atlanta.example.com>'
    assert dialog.remote_address == "Bob <sip:bob@biloxi.example.com>"
    assert dialog.remote_target == "sip:bob@192.0.2.4"
    # 12.1.2: the UAC reverses Record-Route.
    assert dialog.route_set == (P1, P2)
    assert (dialog.local_seq, dialog.remote_seq) == (314159, None)
    assert dialog.local_invite_seq == 314159
    assert dialog.local_contact == "<sip:sbc@sbc.example.net:5060>"
    assert dialog.secure is False


@pytest.mark.parametrize(
    ("status", "state"), [(180, DialogState.EARLY), (200, DialogState.CONFIRMED)]
)
def test_uas_dialog_from_response(status: int, state: DialogState) -> None:
    _, dialog = uas_dialog(status)
    assert dialog.state is state
    assert dialog.role is DialogRole.UAS
    assert dialog.key == DialogKey(
        "3848276298220188511@atlanta.example.com", "sbctag", "9fxced76sl"
    )
    assert dialog.local_address == "Bob <sip:bob@biloxi.example.com>"
    assert dialog.remote_address == "Alice <sip:alice@atlanta.example.com>"
    assert dialog.remote_target == "sip:alice@pc33.atlanta.example.com;transport=tcp"
    # 12.1.1: the UAS keeps Record-Route in order.
    assert dialog.route_set == (P2, P1)
    assert (dialog.local_seq, dialog.remote_seq) == (None, 101)
    assert dialog.local_contact == "<sip:sbc@198.51.100.1:5060>"


def test_sips_request_uri_sets_the_secure_flag() -> None:
    invite = request(OUR_INVITE.replace("INVITE sip:bob@", "INVITE sips:bob@", 1))
    dialog = Dialog.from_uac_response(invite, answer(invite, 200, "t"))
    assert dialog.secure is True
    assert Dialog.from_uac_response(invite, answer(invite, 200, "t"), secure=False).secure is False


def test_responses_that_do_not_create_a_dialog() -> None:
    invite = request(OUR_INVITE)
    with pytest.raises(DialogError, match=r"^a 100 response does not create a dialog"):
        Dialog.from_uac_response(invite, wire(make_response(invite, 100)))
    with pytest.raises(DialogError, match=r"^response has no To tag \(RFC 3261 12.1.2\)$"):
        Dialog.from_uac_response(invite, wire(make_response(invite, 180)))
    with pytest.raises(DialogError, match=r"^a 486 response does not create a dialog"):
        Dialog.from_uac_response(invite, answer(invite, 486, "x"))


def test_provisional_without_contact_targets_the_request_uri() -> None:
    invite = request(OUR_INVITE)
    ringing = wire(make_response(invite, 180, to_tag="t"))
    dialog = Dialog.from_uac_response(invite, ringing)
    assert dialog.remote_target == "sip:bob@biloxi.example.com"


def test_uas_dialog_needs_a_contact_in_the_request() -> None:
    invite = request(
        THEIR_INVITE.replace("Contact: <sip:alice@pc33.atlanta.example.com;transport=tcp>\r\n", "")
    )
    with pytest.raises(DialogError, match=r"^request has no Contact \(RFC 3261 8.1.1.8\)$"):
        Dialog.from_uas_response(invite, make_response(invite, 200, to_tag="x"))


def test_uac_early_dialog_confirmed_by_2xx_recomputes_route_set() -> None:
    invite = request(OUR_INVITE)
    early = Dialog.from_uac_response(invite, answer(invite, 183, "bobtag"))
    ok = answer(invite, 200, "bobtag", contact="<sip:bob@192.0.2.9>", record_route=f"<{P2}>")
    confirmed = early.receive_response(ok)
    assert confirmed.state is DialogState.CONFIRMED
    # 13.2.2.4: the route set is recomputed from the 2xx; the target comes from it too.
    assert confirmed.route_set == (P2,)
    assert confirmed.remote_target == "sip:bob@192.0.2.9"


def test_uas_early_dialog_confirmed_or_terminated_by_final_response() -> None:
    invite, early = uas_dialog(180)
    assert early.response_sent(invite, make_response(invite, 200, to_tag="sbctag")).state is (
        DialogState.CONFIRMED
    )
    # 12.3: a non-2xx final response ends the early dialog.
    assert early.response_sent(invite, make_response(invite, 486, to_tag="sbctag")).state is (
        DialogState.TERMINATED
    )


# -- requests we send (RFC 3261 12.2.1.1) ---------------------------------------------------


def test_loose_routing_request() -> None:
    dialog, bye = send(uac_dialog(), "BYE")
    assert bye.start_line() == "BYE sip:bob@192.0.2.4 SIP/2.0"
    assert bye.headers.values("Route") == [f"<{P1}>", f"<{P2}>"]
    assert bye.headers.get("From") == '"Alice" <sip:alice@atlanta.example.com>;tag=1928301774'
    assert bye.headers.get("To") == "Bob <sip:bob@biloxi.example.com>;tag=bobtag"
    assert bye.call_id == CALL_ID
    assert str(bye.cseq) == "314160 BYE"
    assert bye.max_forwards == 70
    assert bye.via.transport == "UDP" and bye.via.sent_by == ("sbc.example.net", 5060)
    assert bye.via.is_rfc3261_branch
    assert "Contact" not in bye.headers
    assert bye.headers.get("Content-Length") == "0"
    # 15.1.1: the dialog ends once the BYE is sent.
    assert dialog.state is DialogState.TERMINATED


def test_strict_routing_request() -> None:
    strict = "sip:strict.example.com;maddr=192.0.2.66;method=INVITE"
    dialog = Dialog.from_uac_response(
        request(OUR_INVITE),
        answer(request(OUR_INVITE), 200, "bobtag", record_route=f"<{P2}>, <{strict}>"),
    )
    assert dialog.route_set == (strict, P2)
    _, info = send(dialog, "INFO")
    # 12.2.1.1: R-URI is the first route (minus what a Request-URI may not hold), and
    # the remote target goes last in Route.
    assert info.raw_uri == "sip:strict.example.com;maddr=192.0.2.66"
    assert info.headers.values("Route") == [f"<{P2}>", "<sip:bob@192.0.2.4>"]


def test_empty_route_set_sends_no_route() -> None:
    invite = request(OUR_INVITE)
    dialog = Dialog.from_uac_response(invite, answer(invite, 200, "t", record_route=None))
    _, info = send(dialog, "INFO")
    assert info.raw_uri == "sip:bob@192.0.2.4"
    assert "Route" not in info.headers


def test_uas_side_request_swaps_from_and_to() -> None:
    _, dialog = uas_dialog()
    dialog, bye = send(dialog, "BYE")
    assert bye.raw_uri == "sip:alice@pc33.atlanta.example.com;transport=tcp"
    assert bye.headers.values("Route") == [f"<{P2}>", f"<{P1}>"]
    assert bye.headers.get("From") == "Bob <sip:bob@biloxi.example.com>;tag=sbctag"
    assert bye.headers.get("To") == "Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl"
    # 12.2.1.1: an empty local sequence number starts somewhere below 2**31.
    assert str(bye.cseq) == "1 BYE"
    assert dialog.local_seq == 1


def test_cseq_increments_and_contact_on_target_refresh() -> None:
    dialog = uac_dialog()
    dialog, info = send(dialog, "INFO", body=b"Signal=5\r\n", content_type="application/dtmf-relay")
    dialog, reinvite = send(dialog, "INVITE", body=b"v=0\r\n", content_type="application/sdp")
    dialog, update = send(dialog, "UPDATE", contact="<sip:sbc@203.0.113.7>")
    assert [r.cseq.seq for r in (info, reinvite, update)] == [314160, 314161, 314162]
    assert dialog.local_seq == 314162
    assert dialog.local_invite_seq == 314161
    assert "Contact" not in info.headers
    assert info.body == b"Signal=5\r\n" and info.headers.get("Content-Length") == "10"
    assert reinvite.headers.get("Contact") == "<sip:sbc@sbc.example.net:5060>"
    assert update.headers.get("Contact") == "<sip:sbc@203.0.113.7>"
    assert len({r.via.branch for r in (info, reinvite, update)}) == 3


def test_requests_the_dialog_does_not_build() -> None:
    dialog = uac_dialog()
    with pytest.raises(DialogError, match=r"^ACK is not built with create_request"):
        send(dialog, "ACK")
    with pytest.raises(DialogError, match=r"^CANCEL is not built with create_request"):
        send(dialog, "CANCEL")
    _, early = uas_dialog(180)
    with pytest.raises(DialogError, match=r"^the UAS cannot send BYE in an early dialog"):
        send(early, "BYE")
    ended, _ = send(dialog, "BYE")
    with pytest.raises(DialogError, match=r"is terminated$"):
        send(ended, "INFO")


def test_uac_may_bye_an_early_dialog() -> None:
    dialog, bye = send(uac_dialog(180), "BYE")
    assert bye.method == "BYE" and dialog.state is DialogState.TERMINATED


# -- ACK for 2xx (RFC 3261 13.2.2.4) -------------------------------------------------------


def test_ack_for_2xx() -> None:
    dialog = uac_dialog()
    first = ack(dialog)
    assert first.start_line() == "ACK sip:bob@192.0.2.4 SIP/2.0"
    assert str(first.cseq) == "314159 ACK"
    assert first.headers.values("Route") == [f"<{P1}>", f"<{P2}>"]
    assert first.headers.get("To") == "Bob <sip:bob@biloxi.example.com>;tag=bobtag"
    assert first.via.is_rfc3261_branch
    # A fresh branch: the ACK for a 2xx is a transaction of its own (17.1.1.3).
    assert first.via.branch != "z9hG4bK776asdhds"
    assert ack(dialog).via.branch != first.via.branch
    # Building it changes nothing; after a re-INVITE the default is its CSeq.
    dialog, _ = send(dialog, "INVITE")
    assert str(ack(dialog).cseq) == "314160 ACK"
    assert str(ack(dialog, invite_seq=314159).cseq) == "314159 ACK"


def test_ack_needs_an_invite() -> None:
    _, dialog = uas_dialog()
    with pytest.raises(DialogError, match=r"^no INVITE was sent in this dialog"):
        ack(dialog)


# -- requests we receive (RFC 3261 12.2.2) ---------------------------------------------------


def test_remote_cseq_updates_and_lower_is_rejected_with_500() -> None:
    _, dialog = uas_dialog()
    info = in_dialog("INFO", 102)
    after = dialog.receive_request(info)
    assert isinstance(after, Dialog) and after.remote_seq == 102
    old = in_dialog("INFO", 101)
    rejection = after.receive_request(old)
    assert rejection == Rejection(500, "Server Internal Error")
    assert isinstance(rejection, Rejection)
    assert wire(rejection.response_to(old)).start_line() == "SIP/2.0 500 Server Internal Error"
    # ACK and CANCEL are exempt, and leave the remote sequence number alone.
    ack_old = after.receive_request(in_dialog("ACK", 101))
    assert isinstance(ack_old, Dialog) and ack_old.remote_seq == 102


def test_empty_remote_cseq_takes_the_first_one() -> None:
    invite = request(OUR_INVITE)
    dialog = Dialog.from_uac_response(invite, answer(invite, 200, "bobtag"))
    notify = request(
        "INFO sip:sbc@sbc.example.net:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 192.0.2.4;branch=z9hG4bKx1\r\n"
        "From: Bob <sip:bob@biloxi.example.com>;tag=bobtag\r\n"
        'To: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
        f"Call-ID: {CALL_ID}\r\n"
        "CSeq: 7 INFO\r\n"
        "\r\n"
    )
    after = dialog.receive_request(notify)
    assert isinstance(after, Dialog) and after.remote_seq == 7
    assert after.receive_request(request(bytes(notify).decode().replace("7 INFO", "6 INFO"))) == (
        Rejection(500, "Server Internal Error")
    )


def test_requests_for_other_or_ended_dialogs_get_481() -> None:
    _, dialog = uas_dialog()
    other = in_dialog("INFO", 102)
    other.headers.set("To", "Bob <sip:bob@biloxi.example.com>;tag=other")
    other.invalidate()
    assert dialog.receive_request(other) == Rejection(481, "Call/Transaction Does Not Exist")
    assert dialog.terminate().receive_request(in_dialog("INFO", 102)) == Rejection(
        481, "Call/Transaction Does Not Exist"
    )


def test_received_bye_terminates() -> None:
    _, dialog = uas_dialog()
    after = dialog.receive_request(in_dialog("BYE", 102))
    assert isinstance(after, Dialog) and after.state is DialogState.TERMINATED


# -- target refresh (RFC 3261 12.2) ---------------------------------------------------------


def test_target_refresh_from_reinvite_2xx() -> None:
    dialog, reinvite = send(uac_dialog(), "INVITE")
    # A Record-Route in the 2xx to a re-INVITE does not change the route set (12.2).
    ok = answer(reinvite, 200, "bobtag", contact="<sip:bob@192.0.2.77:5080>", record_route=None)
    refreshed = dialog.receive_response(ok)
    assert refreshed.remote_target == "sip:bob@192.0.2.77:5080"
    assert refreshed.route_set == (P1, P2)
    assert refreshed.state is DialogState.CONFIRMED
    _, bye = send(refreshed, "BYE")
    assert bye.raw_uri == "sip:bob@192.0.2.77:5080"
    # A failed re-INVITE changes nothing.
    refused = answer(reinvite, 488, "bobtag", contact="<sip:bob@192.0.2.78>")
    assert dialog.receive_response(refused) == dialog


def test_target_refresh_from_received_update_on_acceptance() -> None:
    _, dialog = uas_dialog()
    update = in_dialog("UPDATE", 102, "Contact: <sip:alice@192.0.2.200:5062>\r\n")
    checked = dialog.receive_request(update)
    assert isinstance(checked, Dialog)
    # Not before the TU accepts it.
    assert checked.remote_target == "sip:alice@pc33.atlanta.example.com;transport=tcp"
    refused = checked.response_sent(update, make_response(update, 491))
    assert refused.remote_target == checked.remote_target
    ok = make_response(update, 200, headers=[("Contact", "<sip:sbc@198.51.100.2:5060>")])
    accepted = checked.response_sent(update, ok)
    assert accepted.remote_target == "sip:alice@192.0.2.200:5062"
    assert accepted.local_contact == "<sip:sbc@198.51.100.2:5060>"
    assert accepted.route_set == (P2, P1)
    _, info = send(accepted, "INFO")
    assert info.raw_uri == "sip:alice@192.0.2.200:5062"


@pytest.mark.parametrize(("status", "ends"), [(481, True), (408, True), (404, False)])
def test_481_and_408_to_an_in_dialog_request_terminate(status: int, ends: bool) -> None:
    dialog, info = send(uac_dialog(), "INFO")
    after = dialog.receive_response(answer(info, status, "bobtag"))
    assert (after.state is DialogState.TERMINATED) is ends


def test_response_for_another_dialog_is_refused() -> None:
    dialog, info = send(uac_dialog(), "INFO")
    with pytest.raises(DialogError, match=r"^response for dialog .*;remote=other given to"):
        dialog.receive_response(answer(info, 200, "other"))


# -- forking (RFC 3261 12.1.2, 13.2.2.4) ------------------------------------------------------


def test_forked_invite_early_dialogs_and_extra_2xx() -> None:
    invite = request(OUR_INVITE)
    forks = DialogSet.for_request(invite)
    forks, event = forks.receive_response(wire(make_response(invite, 100)))
    assert event is None
    forks, event = forks.receive_response(answer(invite, 180, "A", contact="<sip:a@192.0.2.1>"))
    assert isinstance(event, EarlyDialog) and event.created
    assert event.dialog.remote_tag == "A" and event.dialog.state is DialogState.EARLY
    forks, event = forks.receive_response(answer(invite, 183, "B", contact="<sip:b@192.0.2.2>"))
    assert isinstance(event, EarlyDialog) and event.dialog.remote_tag == "B"
    forks, event = forks.receive_response(answer(invite, 180, "A"))
    assert event == EarlyDialog(forks.get("A"), created=False)  # type: ignore[arg-type]
    assert {d.remote_tag for d in forks.early} == {"A", "B"}

    forks, event = forks.receive_response(answer(invite, 200, "B", contact="<sip:b@192.0.2.2>"))
    assert isinstance(event, DialogAnswered)
    assert event.dialog.remote_tag == "B" and event.dialog.state is DialogState.CONFIRMED
    # A stays early until the TU ends it; it is reported as the one to terminate.
    assert [d.remote_tag for d in event.unconfirmed] == ["A"]
    assert forks.answered == event.dialog
    assert [d.remote_tag for d in forks.early] == ["A"]

    forks, event = forks.receive_response(answer(invite, 200, "B"))
    assert event == AnswerRetransmitted(forks.get("B"))  # type: ignore[arg-type]

    forks, event = forks.receive_response(answer(invite, 200, "A", contact="<sip:a@192.0.2.1>"))
    assert isinstance(event, ExtraForkAnswered)
    extra = event.dialog
    assert extra.remote_tag == "A" and extra.state is DialogState.CONFIRMED
    assert forks.extra == (extra,)
    assert forks.answered is not None and forks.answered.remote_tag == "B"
    # The B2BUA ACKs the extra 2xx and hangs it up.
    assert str(ack(extra).cseq) == "314159 ACK" and ack(extra).raw_uri == "sip:a@192.0.2.1"
    ended, bye = send(extra, "BYE")
    assert bye.headers.get("To") == "Bob <sip:bob@biloxi.example.com>;tag=A"
    forks = forks.with_dialog(ended)
    assert forks.get("A") == ended and not forks.early

    # A late non-2xx final changes nothing after a 2xx.
    assert forks.receive_response(answer(invite, 487, "C")) == (forks, None)


def test_transaction_completion_ends_remaining_early_dialogs() -> None:
    invite = request(OUR_INVITE)
    forks = DialogSet.for_request(invite)
    forks, _ = forks.receive_response(answer(invite, 180, "A"))
    forks, _ = forks.receive_response(answer(invite, 200, "B"))
    forks, ended = forks.terminate_early()
    assert [(d.remote_tag, d.state) for d in ended] == [("A", DialogState.TERMINATED)]
    assert forks.get("A") == ended[0]
    assert forks.get("B") is not None and forks.get("B").state is DialogState.CONFIRMED  # type: ignore[union-attr]


def test_non_2xx_final_ends_every_early_dialog() -> None:
    invite = request(OUR_INVITE)
    forks = DialogSet.for_request(invite)
    forks, _ = forks.receive_response(answer(invite, 180, "A"))
    forks, _ = forks.receive_response(answer(invite, 183, "B"))
    forks, event = forks.receive_response(answer(invite, 486, "C"))
    assert isinstance(event, RequestFailed) and event.status == 486
    assert sorted((d.remote_tag, d.state) for d in event.terminated) == [
        ("A", DialogState.TERMINATED),
        ("B", DialogState.TERMINATED),
    ]
    assert not forks.early


def test_dialog_set_ignores_responses_to_other_requests() -> None:
    invite = request(OUR_INVITE)
    forks = DialogSet.for_request(invite)
    other = answer(invite, 180, "A")
    other.headers.set("CSeq", "314158 INVITE")
    other.invalidate()
    assert forks.receive_response(other) == (forks, None)


# -- lookup and replication ----------------------------------------------------------------


def test_dialog_table_matches_requests_and_responses() -> None:
    _, uas = uas_dialog()
    uac, info = send(uac_dialog(), "INFO")
    table = DialogTable([uas])
    table.put(uac)
    assert len(table) == 2 and uac.key in table
    assert table.match_request(in_dialog("INFO", 102)) == uas
    assert table.match_response(answer(info, 200, "bobtag")) == uac
    assert table.match_response(answer(info, 200, "other")) is None
    assert table.match_request(request(THEIR_INVITE)) is None  # no To tag: not in a dialog
    assert table.discard(uas.key) == uas and table.get(uas.key) is None


def test_dialog_dict_round_trip_through_json() -> None:
    dialog, _ = send(uac_dialog(183), "PRACK")
    data = json.loads(json.dumps(dialog.to_dict()))
    assert Dialog.from_dict(data) == dialog
    assert data["state"] == "early" and data["route_set"] == [P1, P2]
    _, uas = uas_dialog()
    assert Dialog.from_dict(json.loads(json.dumps(uas.to_dict()))) == uas


def test_dialog_from_bad_dict() -> None:
    data = uac_dialog().to_dict()
    with pytest.raises(DialogError, match=r"^dialog field 'local_seq' must be int, not True$"):
        Dialog.from_dict({**data, "local_seq": True})
    with pytest.raises(DialogError, match=r"^dialog field 'state' has unknown value 'gone'$"):
        Dialog.from_dict({**data, "state": "gone"})
    with pytest.raises(DialogError, match=r"^unsupported dialog dict version: None$"):
        Dialog.from_dict({k: v for k, v in data.items() if k != "version"})


def test_dialog_set_dict_round_trip_through_json() -> None:
    invite = request(OUR_INVITE)
    forks = DialogSet.for_request(invite)
    forks, _ = forks.receive_response(answer(invite, 180, "A"))
    forks, _ = forks.receive_response(answer(invite, 200, "B"))
    assert DialogSet.from_dict(json.loads(json.dumps(forks.to_dict()))) == forks


def test_next_hop_is_the_first_route_else_the_remote_target() -> None:
    assert str(uac_dialog().next_hop) == P1
    invite = request(OUR_INVITE)
    direct = Dialog.from_uac_response(invite, answer(invite, 200, "t", record_route=None))
    assert str(direct.next_hop) == "sip:bob@192.0.2.4"
