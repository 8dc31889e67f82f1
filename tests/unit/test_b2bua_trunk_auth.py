"""Digest authentication towards trunks (``trunks[].auth``, `sbc.b2bua.trunk_auth`).

The carrier's challenge (401/407) to the SBC's INVITE or BYE is answered with the
trunk's credentials, checked here by the SBC's own digest server playing the
carrier; the caller never sees the challenge. A challenge that cannot be answered
(no credentials, refused ones, another realm, a server that keeps saying stale)
ends that target with 403 for the caller, never a challenge it could not answer.
"""

from __future__ import annotations

import logging

import pytest

from sbc.b2bua.controller import AllocateMedia, CallController, Step, TrunkPlan
from sbc.b2bua.trunk_auth import MAX_TRIES, TrunkAuth, TrunkCredentials
from sbc.sip.auth import DigestServer, DigestServerConfig, UserSecret
from sbc.sip.message import Request
from tests.unit.test_b2bua_flows import (
    A_CALL_ID,
    ANSWER,
    CALLER,
    GW,
    PSTN,
    SESSION_TIMERS,
    TRUNK,
    StubTargets,
    answer,
    confirmed_call,
    controller,
    from_a,
    from_b,
    gw_flow,
    invite_text,
    receive,
    requests,
    sdp,
    session,
    statuses,
    trunk_plan,
)

PASSWORD = "s3cret-pass"
CARRIER = DigestServer(DigestServerConfig("carrier.example", b"k" * 32))
HERE = gw_flow(GW[0])


def trunk_controller(credentials: TrunkCredentials | None) -> CallController:
    c = controller(rules=PSTN, targets=trunk_plan())
    if credentials is not None:
        c.trunk_auth = TrunkAuth({"pstn": credentials})
    return c


def first_invite(c: CallController) -> Request:
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    (invite,) = requests(c.media_allocated(allocate.call_ref, session(), 0.0), "INVITE")
    return invite


def challenge(status: int = 407, *, stale: bool = False, server: DigestServer = CARRIER) -> str:
    name = "Proxy-Authenticate" if status == 407 else "WWW-Authenticate"
    return "".join(f"{name}: {v}\r\n" for v in server.challenge_values(0.0, stale=stale))


def verified(request: Request, header: str = "Proxy-Authorization") -> bool:
    (value,) = request.headers.fields(header)
    secret = UserSecret.from_password(PASSWORD)
    result = CARRIER.verify(
        value, method=request.method, request_uri=request.raw_uri, secret=secret, now=1.0
    )
    return result.ok and result.username == "sbc-account"


def test_a_challenged_invite_goes_again_with_the_trunk_s_credentials() -> None:
    c = trunk_controller(TrunkCredentials("sbc-account", PASSWORD))
    invite = first_invite(c)
    step = receive(c, answer(invite, 407, extra=challenge()), HERE, 0.1)
    assert statuses(step) == []  # the caller hears nothing of it
    (again,) = requests(step, "INVITE")
    assert (again.call_id, again.from_.tag, again.raw_uri) == (
        invite.call_id,
        invite.from_.tag,
        invite.raw_uri,
    )
    assert again.cseq.seq == invite.cseq.seq + 1
    assert again.via.branch != invite.via.branch
    assert again.body == invite.body
    assert verified(again)
    # Answered: the call goes on as any other, its ACK in the INVITE's CSeq.
    step = receive(c, answer(again, 200, ANSWER), HERE, 0.2)
    assert statuses(step) == [200]
    (ack,) = requests(step, "ACK")
    assert ack.cseq.seq == again.cseq.seq


def test_a_401_is_answered_in_authorization() -> None:
    c = trunk_controller(TrunkCredentials("sbc-account", PASSWORD, realm="carrier.example"))
    invite = first_invite(c)
    (again,) = requests(receive(c, answer(invite, 401, extra=challenge(401)), HERE, 0.1), "INVITE")
    assert verified(again, "Authorization")
    assert "Proxy-Authorization" not in again.headers


@pytest.mark.parametrize(
    ("credentials", "why"),
    [
        (None, "no credentials for that trunk"),
        (TrunkCredentials("sbc-account", PASSWORD, realm="other.example"), "another realm"),
    ],
)
def test_a_challenge_the_sbc_cannot_answer_is_403_for_the_caller(
    credentials: TrunkCredentials | None, why: str
) -> None:
    c = trunk_controller(credentials)
    invite = first_invite(c)
    step = receive(c, answer(invite, 407, extra=challenge()), HERE, 0.1)
    assert requests(step, "INVITE") == [], why
    # Not a 407 the caller could never answer (its challenge never crosses).
    assert statuses(step) == [403], why


def test_refused_credentials_are_not_sent_again() -> None:
    c = trunk_controller(TrunkCredentials("sbc-account", "wrong"))
    invite = first_invite(c)
    (again,) = requests(receive(c, answer(invite, 407, extra=challenge()), HERE, 0.1), "INVITE")
    assert not verified(again)
    step = receive(c, answer(again, 407, extra=challenge()), HERE, 0.2)
    assert requests(step, "INVITE") == []
    assert statuses(step) == [403]


def test_a_server_that_keeps_saying_stale_is_followed_a_bounded_number_of_times() -> None:
    c = trunk_controller(TrunkCredentials("sbc-account", PASSWORD))
    request = first_invite(c)
    sent = 0
    for n in range(MAX_TRIES + 2):
        step = receive(c, answer(request, 407, extra=challenge(stale=n > 0)), HERE, 0.1 * n)
        again = requests(step, "INVITE")
        if not again:
            assert statuses(step) == [403]
            break
        sent += 1
        (request,) = again
    assert sent == MAX_TRIES


def answered_call(c: CallController) -> tuple[Request, str]:
    """A call through the trunk, answered after a challenge: its B INVITE, A's tag."""
    invite = first_invite(c)
    (again,) = requests(receive(c, answer(invite, 407, extra=challenge()), HERE, 0.1), "INVITE")
    (ok,) = [
        r for r in receive(c, answer(again, 200, ANSWER), HERE, 0.2).output.messages
        if not isinstance(r.message, Request)
    ]  # fmt: skip
    tag = ok.message.to.tag
    assert tag is not None
    receive(c, from_a("ACK", tag, 1), CALLER, 0.3)
    return again, tag


def test_a_challenged_bye_goes_again_with_the_credentials() -> None:
    c = trunk_controller(TrunkCredentials("sbc-account", PASSWORD))
    _, a_tag = answered_call(c)
    step: Step = receive(c, from_a("BYE", a_tag, 2), CALLER, 1.0)
    (bye,) = requests(step, "BYE")
    assert c.calls() == ()  # the call is over on the SBC's side
    step = receive(c, answer(bye, 401, extra=challenge(401)), HERE, 1.1)
    (again,) = requests(step, "BYE")
    assert again.cseq.seq == bye.cseq.seq + 1 and again.call_id == bye.call_id
    assert again.via.branch != bye.via.branch
    assert verified(again, "Authorization")
    # Its 200 ends it; a second challenge to good credentials is not followed.
    assert requests(receive(c, answer(again, 200), HERE, 1.2)) == []


def test_the_password_is_in_no_log_line_and_no_repr(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    credentials = TrunkCredentials("sbc-account", PASSWORD)
    assert PASSWORD not in repr(credentials) and PASSWORD not in repr(TrunkAuth())
    c = trunk_controller(credentials)
    invite = first_invite(c)
    (again,) = requests(receive(c, answer(invite, 407, extra=challenge()), HERE, 0.1), "INVITE")
    receive(c, answer(again, 407, extra=challenge()), HERE, 0.2)
    assert caplog.records
    assert PASSWORD not in caplog.text


def test_a_relayed_re_invite_and_info_challenged_go_again_with_the_dialog_s_next_cseq() -> None:
    c = trunk_controller(TrunkCredentials("sbc-account", PASSWORD))
    _, a_tag = answered_call(c)
    hold = sdp("alice", "198.51.100.9", 4000, version=2).replace("sendrecv", "sendonly")
    step = receive(c, from_a("INVITE", a_tag, 2, body=hold), CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    step = receive(c, answer(reinvite, 407, extra=challenge()), HERE, 1.1)
    assert statuses(step) == []  # the caller's re-INVITE still waits
    (again,) = requests(step, "INVITE")
    assert again.cseq.seq == reinvite.cseq.seq + 1 and again.body == reinvite.body
    assert again.via.branch != reinvite.via.branch and verified(again)
    step = receive(c, answer(again, 200, ANSWER), HERE, 1.2)
    assert statuses(step) == [200]
    (ack,) = requests(step, "ACK")
    assert ack.cseq.seq == again.cseq.seq
    # An INFO after it takes the dialog's next CSeq, and so does its second sending.
    step = receive(c, from_a("INFO", a_tag, 3, body="x", content_type="text/plain"), CALLER, 2.0)
    (info,) = requests(step, "INFO")
    assert info.cseq.seq == again.cseq.seq + 1
    (info_again,) = requests(receive(c, answer(info, 401, extra=challenge(401)), HERE, 2.1), "INFO")
    assert info_again.cseq.seq == info.cseq.seq + 1
    assert verified(info_again, "Authorization")
    assert statuses(receive(c, answer(info_again, 200), HERE, 2.2)) == [200]


def test_the_sbc_s_session_refresh_challenged_by_the_trunk_goes_again() -> None:
    c = controller(SESSION_TIMERS, rules=PSTN, targets=trunk_plan())
    c.trunk_auth = TrunkAuth({"pstn": TrunkCredentials("sbc-account", PASSWORD)})
    invite, _ = answered_call(c)
    step = c.handle_timers(55.2)  # half the 90 s interval after the answer
    (refresh,) = [r for r in requests(step) if r.call_id == invite.call_id]
    step = receive(c, answer(refresh, 407, extra=challenge()), HERE, 55.3)
    (again,) = requests(step, refresh.method)
    assert again.cseq.seq == refresh.cseq.seq + 1 and verified(again)
    step = receive(c, answer(again, 200, ANSWER if again.body else ""), HERE, 55.4)
    (call,) = c.calls()
    assert call.state.name == "CONFIRMED"


def test_no_room_for_the_invite_again_fails_the_call_without_raising() -> None:
    c = trunk_controller(TrunkCredentials("sbc-account", PASSWORD))
    invite = first_invite(c)
    c.transactions.max_transactions = len(c.transactions)  # no room for another
    step = receive(c, answer(invite, 407, extra=challenge()), HERE, 0.1)
    assert requests(step, "INVITE") == []
    assert statuses(step) == [403]


def test_a_carrier_s_own_call_answers_its_challenges_on_the_caller_s_leg() -> None:
    # The carrier calls in (from the realm of the trunk with the account); the SBC's
    # BYE to it, when the callee hangs up, is challenged: answered with the account.
    # Two trunks with accounts in the caller's realm: which one is unknown, none.
    c = controller(targets=StubTargets(plan=TrunkPlan("outside", ())))
    c.trunk_auth = TrunkAuth({"pstn": TrunkCredentials("sbc-account", PASSWORD)})
    invite, _, _ = confirmed_call(c)
    step = receive(c, from_b(invite, "BYE", 2), TRUNK, 1.0)
    (bye,) = requests(step, "BYE")
    assert bye.call_id == A_CALL_ID
    step = receive(c, answer(bye, 407, extra=challenge()), CALLER, 1.1)
    (again,) = requests(step, "BYE")
    assert again.cseq.seq == bye.cseq.seq + 1 and verified(again)

    c = controller(targets=StubTargets(plan=TrunkPlan("outside", ())))
    c.trunk_auth = TrunkAuth({"pstn": TrunkCredentials("sbc-account", PASSWORD),
                              "other": TrunkCredentials("x", "y")})  # fmt: skip
    invite, _, _ = confirmed_call(c)
    (bye,) = requests(receive(c, from_b(invite, "BYE", 2), TRUNK, 1.0), "BYE")
    assert requests(receive(c, answer(bye, 407, extra=challenge()), CALLER, 1.1)) == []
