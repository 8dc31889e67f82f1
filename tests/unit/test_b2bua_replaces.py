"""Attended transfer across the B2BUA: Replaces (RFC 3891) in an INVITE and in a
REFER's Refer-To names one of the SBC's dialogs as its peer knows it; on the far
side it must name that call's other leg as the far peer knows it, or the far side
finds no dialog to replace.
"""

from __future__ import annotations

import urllib.parse

from sbc.b2bua.admission import AdmissionControl, Limits
from sbc.b2bua.controller import CallController, RealmPolicy
from sbc.b2bua.routing import RouteAction, RouteRule
from sbc.sip.message import Request
from sbc.transport.base import Destination, Transport
from tests.unit.test_b2bua_flows import (
    ANSWER,
    CALLER,
    CORE,
    GW,
    PSTN,
    TRUNK,
    ack_from_a,
    answer,
    controller,
    from_a,
    from_b,
    gw_flow,
    hop_of,
    invite_text,
    receive,
    requests,
    responses,
    session,
    start_call,
    statuses,
    trunk_plan,
)

FIRST_CALL_ID = "first-call@198.51.100.9"


def first_call(c: CallController) -> tuple[Request, str]:
    """Alice's call to carol, answered (carol's tag "carolside"): the B-leg INVITE
    and the SBC's tag on alice's leg."""
    (invite,), _ = start_call(
        c, 0.0, call_id=FIRST_CALL_ID, via_branch="z9hG4bKfirst", session_id="s1"
    )
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER, tag="carolside"), TRUNK, 0.0))
    assert ok.to.tag is not None
    ack_from_a(c, ok.to.tag, 0.0, call_id=FIRST_CALL_ID)
    return invite, ok.to.tag


def replaces(call_id: str, to_tag: str, from_tag: str) -> str:
    return f"{call_id};to-tag={to_tag};from-tag={from_tag}"


def replace_first_call(c: CallController, sbc_tag: str) -> Request:
    """An INVITE (Call-ID second@) replacing the first call, let in and its media
    allocated: the INVITE it becomes on the far side."""
    extra = f"Replaces: {replaces(FIRST_CALL_ID, sbc_tag, 'alicetag')}\r\n"
    text = invite_text(call_id="second@198.51.100.9", via_branch="z9hG4bKsecond", extra=extra)
    step = receive(c, text, CALLER, 1.0)
    assert statuses(step) == [100]
    (allocate,) = step.media
    (invite,) = requests(c.media_allocated(allocate.call_ref, session("s2"), 1.0), "INVITE")
    return invite


def test_an_invite_with_replaces_names_the_far_leg_of_that_call() -> None:
    c = controller()
    carol_invite, sbc_tag = first_call(c)
    extra = f"Replaces: {replaces(FIRST_CALL_ID, sbc_tag, 'alicetag')}\r\nRequire: replaces\r\n"
    step = receive(c, invite_text(via_branch="z9hG4bKsecond", extra=extra), CALLER, 1.0)
    assert statuses(step) == [100]  # Require: replaces is understood (no 420)
    (allocate,) = step.media
    (invite,) = requests(c.media_allocated(allocate.call_ref, session("s2"), 1.0), "INVITE")
    assert invite.headers.get("Replaces") == replaces(
        carol_invite.call_id, "carolside", carol_invite.from_.tag or ""
    )
    assert FIRST_CALL_ID not in bytes(invite).decode()


def test_an_invite_with_replaces_goes_to_the_peer_of_the_dialog_it_replaces() -> None:
    elsewhere = Destination(Transport.UDP, "203.0.113.77", 5060)
    rules = [
        RouteRule("other", RouteAction.TRUNK, "outside", realm="inside", destination=elsewhere,
                  user_prefix="2000"),
        RouteRule("core", RouteAction.TRUNK, "outside", realm="inside", destination=CORE),
    ]  # fmt: skip
    c = controller(rules=rules)
    _, sbc_tag = first_call(c)
    extra = f"Replaces: {replaces(FIRST_CALL_ID, sbc_tag, 'alicetag')}\r\n"
    text = invite_text(via_branch="z9hG4bKsecond", uri="sip:2000@198.51.100.1", extra=extra)
    (allocate,) = receive(c, text, CALLER, 1.0).media
    step = c.media_allocated(allocate.call_ref, session("s2"), 1.0)
    (invite,) = requests(step, "INVITE")
    assert hop_of(step, "INVITE") == CORE  # not where route "other" would send 2000
    assert invite.raw_uri == "sip:bob@203.0.113.5:5070"  # carol's Contact on call 1
    assert invite.headers.get("Replaces") is not None


def test_an_invite_replacing_no_dialog_of_ours_gets_481() -> None:
    c = controller()
    _, sbc_tag = first_call(c)
    for cseq, value in enumerate(
        (
            replaces("no-such-call", sbc_tag, "alicetag"),
            replaces(FIRST_CALL_ID, sbc_tag, "someone-else"),  # RFC 3891 3: both tags match
            replaces(FIRST_CALL_ID, "alicetag", sbc_tag),
            FIRST_CALL_ID,
        ),
        start=2,
    ):
        extra = f"Replaces: {value}\r\n"
        text = invite_text(via_branch=f"z9hG4bKr{cseq}", cseq=cseq, extra=extra)
        step = receive(c, text, CALLER, 1.0)
        assert [s for s in statuses(step) if s != 100] == [481], value
        assert step.media == ()
    assert len(c) == 1


def test_a_refer_for_an_attended_transfer_names_the_far_leg_in_refer_to() -> None:
    c = controller(policies={"outside": RealmPolicy(refer_relay=True)})
    carol_invite, sbc_tag = first_call(c)
    (bob_invite,), _ = start_call(c, 1.0)
    (ok,) = responses(receive(c, answer(bob_invite, 200, ANSWER), TRUNK, 1.0))
    assert ok.to.tag is not None
    ack_from_a(c, ok.to.tag, 1.0)
    value = urllib.parse.quote(replaces(FIRST_CALL_ID, sbc_tag, "alicetag"), safe="")
    refer_to = f"Refer-To: <sip:carol@198.51.100.1?Replaces={value}>\r\n"
    step = receive(c, from_a("REFER", ok.to.tag, 2, extra=refer_to), CALLER, 2.0)
    (refer,) = requests(step, "REFER")
    assert refer.call_id == bob_invite.call_id
    text = refer.headers.get("Refer-To") or ""
    uri, _, header = text.strip("<>").partition("?Replaces=")
    assert uri == "sip:carol@203.0.113.1:5060"
    assert urllib.parse.unquote(header) == replaces(
        carol_invite.call_id, "carolside", carol_invite.from_.tag or ""
    )
    assert "@" not in header and ";" not in header  # escaped as a URI header value
    assert "198.51.100" not in bytes(refer).decode()


def test_a_refer_whose_replaces_names_nothing_loses_it() -> None:
    c = controller(policies={"outside": RealmPolicy(refer_relay=True)})
    (bob_invite,), _ = start_call(c, 1.0)
    (ok,) = responses(receive(c, answer(bob_invite, 200, ANSWER), TRUNK, 1.0))
    assert ok.to.tag is not None
    ack_from_a(c, ok.to.tag, 1.0)
    value = urllib.parse.quote(replaces("elsewhere@198.51.100.9", "x", "y"), safe="")
    refer_to = f"Refer-To: <sip:carol@198.51.100.1?Replaces={value}>\r\n"
    (refer,) = requests(receive(c, from_a("REFER", ok.to.tag, 2, extra=refer_to), CALLER, 2.0))
    assert refer.headers.get("Refer-To") == "<sip:carol@203.0.113.1:5060>"


def test_an_invite_replacing_a_call_is_not_refused_for_the_realm_s_concurrent_limit() -> None:
    # An attended transfer's INVITE replaces a call the SBC holds, which ends once it is
    # answered: at the realm's concurrent-call limit it was refused with 503.
    admission = AdmissionControl({"outside": Limits(max_calls=1)}, {})
    c = controller(admission=admission)
    carol_invite, sbc_tag = first_call(c)
    assert admission.active("realm", "outside") == 1
    # At the limit, a new call is refused ...
    third = invite_text(call_id="third@198.51.100.9", via_branch="z9hG4bKthird")
    assert [s for s in statuses(receive(c, third, CALLER, 1.0)) if s != 100] == [503]
    # ... but not an INVITE that replaces the call up.
    invite = replace_first_call(c, sbc_tag)
    assert admission.active("realm", "outside") == 2  # both up, for the moment
    # Only the replacing INVITE is let over the limit: a plain one is still refused.
    fourth = invite_text(call_id="fourth@198.51.100.9", via_branch="z9hG4bKfourth")
    assert [s for s in statuses(receive(c, fourth, CALLER, 1.05)) if s != 100] == [503]
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER, tag="carol2"), TRUNK, 1.1))
    assert ok.status == 200 and ok.to.tag is not None
    ack_from_a(c, ok.to.tag, 1.1, call_id="second@198.51.100.9")
    # The far side ends the replaced call (RFC 3891 3): one call, one count.
    bye = from_b(carol_invite, "BYE", 2, tag="carolside")
    assert 200 in statuses(receive(c, bye, TRUNK, 1.2))
    assert len(c) == 1 and admission.active("realm", "outside") == 1
    # The new call ends too: no call is left counted, none counted twice.
    bye = from_a("BYE", ok.to.tag, 2, call_id="second@198.51.100.9")
    assert 200 in statuses(receive(c, bye, CALLER, 2.0))
    assert len(c) == 0 and admission.active("realm", "outside") == 0
    counts = admission.counters()["realm"]["outside"]
    assert (counts["admitted"], counts["refused_concurrent"]) == (2, 2)
    # And the limit holds as before: one call again, not two.
    fifth = invite_text(call_id="fifth@198.51.100.9", via_branch="z9hG4bKfifth")
    assert statuses(receive(c, fifth, CALLER, 3.0)) == [100]
    sixth = invite_text(call_id="sixth@198.51.100.9", via_branch="z9hG4bKsixth")
    assert [s for s in statuses(receive(c, sixth, CALLER, 3.0)) if s != 100] == [503]


def test_an_invite_replacing_a_trunk_call_holds_that_trunk_and_its_gateway() -> None:
    # The replacing INVITE goes to the replaced call's far peer, here a trunk's
    # gateway; it used to count on no trunk, so the trunk's concurrent count fell
    # by one when the replaced call ended while the new call went on over it.
    admission = AdmissionControl({}, {"pstn": Limits(max_calls=10)})
    targets = trunk_plan()
    c = controller(rules=PSTN, targets=targets, admission=admission)
    (first,), _ = start_call(c, 0.0, call_id=FIRST_CALL_ID, via_branch="z9hG4bKfirst")
    step = receive(c, answer(first, 200, ANSWER, tag="carolside"), gw_flow(GW[0]), 0.1)
    (ok,) = responses(step)
    assert ok.to.tag is not None
    ack_from_a(c, ok.to.tag, 0.1, call_id=FIRST_CALL_ID)
    assert admission.active("trunk", "pstn") == 1

    extra = f"Replaces: {replaces(FIRST_CALL_ID, ok.to.tag, 'alicetag')}\r\n"
    text = invite_text(call_id="second@198.51.100.9", via_branch="z9hG4bKsecond", extra=extra)
    (allocate,) = receive(c, text, CALLER, 1.0).media
    step = c.media_allocated(allocate.call_ref, session("s2"), 1.0)
    (invite,) = requests(step, "INVITE")
    assert hop_of(step, "INVITE") == GW[0]
    assert admission.active("trunk", "pstn") == 2
    step = receive(c, answer(invite, 200, ANSWER, tag="carol2"), gw_flow(GW[0]), 1.1)
    (ok2,) = responses(step)
    assert ok2.to.tag is not None
    ack_from_a(c, ok2.to.tag, 1.1, call_id="second@198.51.100.9")
    assert targets.results[-1] == ("pstn", "gw1", 200)

    # The gateway ends the replaced call: the new one still holds the trunk.
    bye = from_b(first, "BYE", 2, tag="carolside")
    assert 200 in statuses(receive(c, bye, gw_flow(GW[0]), 1.2))
    (call,) = c.calls()
    assert (call.trunk, call.gateway) == ("pstn", "gw1")
    assert admission.active("trunk", "pstn") == 1
    bye = from_a("BYE", ok2.to.tag, 2, call_id="second@198.51.100.9")
    assert 200 in statuses(receive(c, bye, CALLER, 2.0))
    assert len(c) == 0 and admission.active("trunk", "pstn") == 0


def test_only_one_invite_replacing_a_call_is_let_over_the_limit_at_a_time() -> None:
    # Each INVITE naming the call went over the limit: one caller could hold any
    # number of calls by replacing the same one again and again.
    admission = AdmissionControl({"outside": Limits(max_calls=1)}, {})
    c = controller(admission=admission)
    _, sbc_tag = first_call(c)
    invite = replace_first_call(c, sbc_tag)
    extra = f"Replaces: {replaces(FIRST_CALL_ID, sbc_tag, 'alicetag')}\r\n"
    again = invite_text(call_id="third@198.51.100.9", via_branch="z9hG4bKthird", extra=extra)
    assert [s for s in statuses(receive(c, again, CALLER, 1.1)) if s != 100] == [503]
    assert admission.active("realm", "outside") == 2
    # Once the first replacing call has failed, the next one may go over again.
    receive(c, answer(invite, 486, tag="carol2"), TRUNK, 1.2)
    assert len(c) == 1
    fourth = invite_text(call_id="fourth@198.51.100.9", via_branch="z9hG4bKfourth", extra=extra)
    assert statuses(receive(c, fourth, CALLER, 1.3)) == [100]
