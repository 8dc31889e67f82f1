"""Review of call admission control: limits per realm and trunk, tickets released
exactly once however a call ends, the token bucket, refusals, reloads.

Driven through AdmissionControl directly (a fake clock: the ``now`` argument) and
through the CallController as test_b2bua_flows drives it.
"""

from __future__ import annotations

from pathlib import Path

from sbc.b2bua.admission import (
    AdmissionControl,
    AdmissionScope,
    Limits,
    RefusalReason,
)
from sbc.b2bua.call import EndReason
from sbc.b2bua.controller import AllocateMedia, CallTimers, TrunkPlan
from sbc.b2bua.routing import RouteAction, RouteRule
from sbc.transport.base import Destination, Transport
from tests.unit.test_admission import admitted, refused
from tests.unit.test_b2bua_flows import (
    ANSWER,
    BOB1_FLOW,
    BOB2_FLOW,
    CALLER,
    GW,
    MESSAGE,
    PSTN,
    SDP,
    TRUNK,
    USERS,
    StubTargets,
    Target,
    ack_from_a,
    answer,
    confirmed_call,
    controller,
    ended_calls,
    forked,
    from_a,
    from_b,
    gw_flow,
    invite_text,
    receive,
    registered_targets,
    requests,
    responses,
    session,
    start_call,
    statuses,
    trunk_plan,
    until_timers,
)
from tests.unit.test_b2bua_review import cancel_for
from tests.unit.test_b2bua_subscriptions import SUBSCRIBE
from tests.unit.test_b2bua_unreachable import ringing_call

# -- through the controller: what each call holds, and that it gives it back ----------------


def limited() -> AdmissionControl:
    """Generous limits on both realms and the trunk: every call is counted on each."""
    return AdmissionControl(
        {"outside": Limits(max_calls=10), "inside": Limits(max_calls=10)},
        {"pstn": Limits(max_calls=10)},
    )


def held(admission: AdmissionControl) -> tuple[int, int, int]:
    """Calls held by realm outside, realm inside and trunk pstn."""
    return (
        admission.active("realm", "outside"),
        admission.active("realm", "inside"),
        admission.active("trunk", "pstn"),
    )


def assert_nothing_outstanding(admission: AdmissionControl) -> None:
    assert held(admission) == (0, 0, 0)
    for scopes in admission.counters().values():
        for name, counts in scopes.items():
            assert counts["active"] == 0, name


def test_a_trunk_call_counts_on_both_realms_and_the_trunk_until_bye() -> None:
    admission = limited()
    c = controller(rules=PSTN, targets=trunk_plan(), admission=admission)
    (invite,), _ = start_call(c)
    assert held(admission) == (1, 1, 1)
    step = receive(c, answer(invite, 200, ANSWER), gw_flow(GW[0]), 0.1)
    (ok,) = responses(step)
    ack_from_a(c, ok.to.tag or "", 0.2)
    assert held(admission) == (1, 1, 1)
    receive(c, from_a("BYE", ok.to.tag or "", 2), CALLER, 5.0)
    assert len(c) == 0
    assert_nothing_outstanding(admission)


def test_a_callee_bye_releases() -> None:
    admission = limited()
    c = controller(admission=admission)
    invite, _, _ = confirmed_call(c)
    assert held(admission) == (1, 1, 0)  # no trunk on a static route
    receive(c, from_b(invite, "BYE", 2), TRUNK, 3.0)
    assert len(c) == 0
    assert_nothing_outstanding(admission)


def test_a_rejected_call_releases() -> None:
    admission = limited()
    c = controller(rules=PSTN, targets=trunk_plan(), admission=admission)
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 486), gw_flow(GW[0]), 0.1)
    assert statuses(step) == [486]
    assert_nothing_outstanding(admission)


def test_a_cancelled_call_releases_once_the_callee_confirms() -> None:
    admission = limited()
    c = controller(admission=admission)
    (invite,), _ = start_call(c)
    receive(c, answer(invite, 180), TRUNK, 0.1)
    step = receive(c, cancel_for(invite_text()), CALLER, 0.2)
    assert 487 in statuses(step)
    receive(c, answer(invite, 487), TRUNK, 0.3)
    assert len(c) == 0
    assert_nothing_outstanding(admission)


def test_a_cancel_crossing_the_callee_s_2xx_releases_once() -> None:
    admission = limited()
    c = controller(admission=admission)
    (invite,), _ = start_call(c)
    receive(c, answer(invite, 180), TRUNK, 0.1)
    receive(c, cancel_for(invite_text()), CALLER, 0.2)
    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 0.3)
    assert [r.method for r in requests(step)] == ["ACK", "BYE"]
    assert len(c) == 0
    assert_nothing_outstanding(admission)
    # The retransmitted 2xx and the BYE's answer change nothing.
    receive(c, answer(invite, 200, ANSWER), TRUNK, 0.4)
    assert_nothing_outstanding(admission)


def test_failover_within_the_trunk_keeps_one_ticket() -> None:
    admission = limited()
    c = controller(rules=PSTN, targets=trunk_plan(), admission=admission)
    (first,), _ = start_call(c)
    step = receive(c, answer(first, 503), gw_flow(GW[0]), 0.1)
    (second,) = requests(step, "INVITE")
    assert held(admission) == (1, 1, 1)
    step = receive(c, answer(second, 503), gw_flow(GW[1]), 0.2)
    (third,) = requests(step, "INVITE")
    assert held(admission) == (1, 1, 1)
    step = receive(c, answer(third, 503), gw_flow(GW[2]), 0.3)
    assert [s for s in statuses(step) if s >= 200] == [500]  # RFC 3261 16.7 step 6
    assert len(c) == 0
    assert_nothing_outstanding(admission)


def test_every_gateway_timing_out_releases() -> None:
    admission = limited()
    c = controller(rules=PSTN, targets=trunk_plan(), admission=admission)
    start_call(c)
    until_timers(c, lambda step: len(c) == 0)
    assert_nothing_outstanding(admission)


def test_a_gateway_the_b_leg_cannot_reach_releases() -> None:
    # The second gateway is over TCP, which the inside realm does not listen on: the
    # call fails over to a target it cannot start, and ends.
    plan = TrunkPlan(
        "inside",
        (
            Target("inside", GW[0], "sip:1000@203.0.113.11:5060", "gw1"),
            Target(
                "inside",
                Destination(Transport.TCP, "203.0.113.12", 5060),
                "sip:1000@203.0.113.12:5060;transport=tcp",
                "gw2",
            ),
        ),
    )
    admission = limited()
    c = controller(rules=PSTN, targets=StubTargets(plan=plan), admission=admission)
    (first,), _ = start_call(c)
    step = receive(c, answer(first, 503), gw_flow(GW[0]), 0.1)
    assert len(c) == 0, statuses(step)
    assert_nothing_outstanding(admission)


def test_a_followed_redirect_keeps_one_ticket_and_releases() -> None:
    rules = [
        RouteRule(
            "core",
            RouteAction.TRUNK,
            "outside",
            realm="inside",
            destination=Destination(Transport.UDP, "203.0.113.5", 5070),
            follow_redirects=True,
        )
    ]
    admission = limited()
    c = controller(rules=rules, admission=admission)
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 302, contact="sip:bob@203.0.113.7:5080"), TRUNK, 0.1)
    (again,) = requests(step, "INVITE")
    assert held(admission) == (1, 1, 0)
    step = receive(c, answer(again, 404), TRUNK, 0.2)
    assert statuses(step) == [404]
    assert_nothing_outstanding(admission)


def test_forking_holds_one_ticket_and_releases_when_the_call_ends() -> None:
    admission = limited()
    c = controller(rules=USERS, targets=registered_targets(), admission=admission)
    first, second, _ = forked(c)
    assert held(admission) == (1, 1, 0)
    receive(c, answer(first, 404), BOB1_FLOW, 0.1)
    assert held(admission) == (1, 1, 0)
    step = receive(
        c,
        answer(second, 200, ANSWER, tag="bob2", contact="sip:bob@203.0.113.6:5070"),
        BOB2_FLOW,
        0.2,
    )
    (ok,) = responses(step)
    ack_from_a(c, ok.to.tag or "", 0.3)
    assert held(admission) == (1, 1, 0)
    receive(c, from_a("BYE", ok.to.tag or "", 2), CALLER, 1.0)
    assert_nothing_outstanding(admission)


def test_max_duration_releases() -> None:
    admission = limited()
    c = controller(
        CallTimers(max_duration=60, no_answer_timeout=0, session_expires=0), admission=admission
    )
    confirmed_call(c)
    c.handle_timers(60.0)
    assert len(c) == 0
    assert_nothing_outstanding(admission)


def test_no_answer_timeout_while_allocating_releases() -> None:
    admission = limited()
    c = controller(
        CallTimers(max_duration=0, no_answer_timeout=30, session_expires=0), admission=admission
    )
    receive(c, invite_text(), CALLER, 0.0)
    assert held(admission) == (1, 1, 0)
    c.handle_timers(30.0)
    assert_nothing_outstanding(admission)


def test_media_timeout_releases() -> None:
    admission = limited()
    c = controller(admission=admission)
    confirmed_call(c)
    c.media_timeout("sess", 5.0)
    assert_nothing_outstanding(admission)


def test_shutdown_releases_confirmed_and_ringing_calls() -> None:
    admission = limited()
    c = controller(admission=admission)
    confirmed_call(c)
    (ringing,), _ = start_call(c, 1.0, call_id="ringing", via_branch="z9hG4bKring", session_id="s2")
    receive(c, answer(ringing, 180, tag="ring"), TRUNK, 1.1)
    assert held(admission) == (2, 2, 0)
    c.shutdown(2.0)
    assert_nothing_outstanding(admission)


def test_a_call_the_relay_refuses_releases() -> None:
    admission = limited()
    c = controller(admission=admission)
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    step = c.media_allocated(allocate.call_ref, None, 0.1)
    assert statuses(step) == [503]
    assert_nothing_outstanding(admission)


def test_a_call_whose_b_leg_cannot_start_releases() -> None:
    admission = limited()
    c = controller(admission=admission)
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    c.transactions.max_transactions = len(c.transactions)  # no room for the B leg
    step = c.media_allocated(allocate.call_ref, session(), 0.1)
    assert statuses(step) == [503] and len(c) == 0
    assert_nothing_outstanding(admission)


def test_a_caller_that_cannot_be_reached_releases() -> None:
    admission = limited()
    c = controller(admission=admission)
    tx, _ = ringing_call(c)
    assert held(admission) == (1, 1, 0)
    c.handle(c.transactions.transport_error(tx, 1.0), 1.0)
    assert len(c) == 0
    assert_nothing_outstanding(admission)


def test_a_cancel_while_media_is_allocated_releases_at_once() -> None:
    admission = limited()
    c = controller(admission=admission)
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    step = receive(c, cancel_for(invite_text()), CALLER, 0.1)
    assert 487 in statuses(step) and len(c) == 0
    assert_nothing_outstanding(admission)
    c.media_allocated(allocate.call_ref, session(), 0.2)  # the relay's late answer
    assert_nothing_outstanding(admission)


def test_non_invite_requests_and_re_invites_are_not_calls() -> None:
    admission = AdmissionControl({"outside": Limits(max_calls=1, calls_per_second=1)}, {})
    c = controller(admission=admission)
    _, _, a_tag = confirmed_call(c)
    assert admission.active("realm", "outside") == 1
    # A re-INVITE of the call is not a new call, whatever the limits say.
    step = receive(c, from_a("INVITE", a_tag, 2, body=SDP), CALLER, 0.1)
    assert len(requests(step, "INVITE")) == 1
    step = receive(c, MESSAGE, CALLER, 0.2)
    assert len(requests(step, "MESSAGE")) == 1
    step = receive(c, SUBSCRIBE, CALLER, 0.3)
    assert len(requests(step, "SUBSCRIBE")) == 1
    counts = admission.counters()["realm"]["outside"]
    assert counts["admitted"] == 1 and counts["active"] == 1
    assert counts["refused_concurrent"] == counts["refused_rate"] == 0


def test_a_refusal_by_the_trunk_answers_503_with_retry_after_and_a_cdr() -> None:
    admission = AdmissionControl({}, {"pstn": Limits(calls_per_second=0.5)}, retry_after=9)
    c = controller(rules=PSTN, targets=trunk_plan(), admission=admission)
    start_call(c, 0.0)
    step = receive(c, invite_text(call_id="second", via_branch="z9hG4bKsecond"), CALLER, 0.5)
    assert step.media == () and requests(step, "INVITE") == []  # no gateway tried
    (refusal,) = [r for r in responses(step) if r.status >= 200]
    # The bucket has 0.25 of a token: one more in 1.5 s, so "2" (rounded up).
    assert refusal.status == 503 and refusal.headers.get("Retry-After") == "2"
    (record,) = ended_calls(step)
    assert record.end_reason is EndReason.ADMISSION and record.end_status == 503
    assert c.counters.get("rejected_admission") == 1
    assert admission.counters()["trunk"]["pstn"]["refused_rate"] == 1
    assert held(admission) == (1, 1, 1)


# -- AdmissionControl directly ----------------------------------------------------------------


def test_a_limit_lowered_below_the_count_refuses_until_calls_end_and_never_goes_negative() -> None:
    control = AdmissionControl({"r": Limits(max_calls=5)}, {})
    tickets = [admitted(control.admit(["r"], None, 0.0)) for _ in range(5)]
    control.reconfigure({"r": Limits(max_calls=2)}, {})
    assert control.active("realm", "r") == 5
    assert refused(control.admit(["r"], None, 1.0)).reason is RefusalReason.CONCURRENT
    for ticket in tickets[:3]:
        control.release(ticket)
    assert refused(control.admit(["r"], None, 2.0)).reason is RefusalReason.CONCURRENT
    control.release(tickets[3])
    last = admitted(control.admit(["r"], None, 3.0))
    for ticket in [*tickets, last, last]:
        control.release(ticket)
    assert control.active("realm", "r") == 0


def test_a_scope_removed_by_a_reload_keeps_its_calls_releasable() -> None:
    control = AdmissionControl({"old": Limits(max_calls=1)}, {"gone": Limits(max_calls=1)})
    ticket = admitted(control.admit(["old"], "gone", 0.0))
    control.reconfigure({}, {})
    assert control.active("trunk", "gone") == 1
    control.release(ticket)
    assert control.active("trunk", "gone") == control.active("realm", "old") == 0
    # Configured again later: its count is right, so is its limit.
    control.reconfigure({}, {"gone": Limits(max_calls=1)})
    admitted(control.admit([], "gone", 1.0))
    assert refused(control.admit([], "gone", 1.0)).name == "gone"


def test_a_refusal_charges_no_scope_of_the_call() -> None:
    control = AdmissionControl(
        {"a": Limits(calls_per_second=1), "b": Limits(max_calls=0)},
        {"t": Limits(calls_per_second=1)},
    )
    refusal = refused(control.admit(["a", "b"], "t", 0.0))
    assert (refusal.scope, refusal.name) == (AdmissionScope.REALM, "b")
    admitted(control.admit(["a"], "t", 0.0))  # a's and t's tokens are still there


def test_a_fractional_rate_refills_over_several_seconds() -> None:
    control = AdmissionControl({}, {"t": Limits(calls_per_second=0.25)})
    admitted(control.admit([], "t", 100.0))
    assert refused(control.admit([], "t", 100.0)).retry_after == 4
    assert refused(control.admit([], "t", 103.9)).retry_after == 1
    admitted(control.admit([], "t", 104.0))


def test_a_clock_jump_forward_fills_the_bucket_to_burst_only() -> None:
    control = AdmissionControl({}, {"t": Limits(calls_per_second=2, burst=3)})
    admitted(control.admit([], "t", 0.0))
    for _ in range(3):
        admitted(control.admit([], "t", 1e6))
    assert refused(control.admit([], "t", 1e6)).reason is RefusalReason.RATE


def test_a_clock_going_backwards_then_forwards_refills_only_for_new_time() -> None:
    control = AdmissionControl({}, {"t": Limits(calls_per_second=1, burst=1)})
    admitted(control.admit([], "t", 10.0))
    refused(control.admit([], "t", 5.0))
    # From 10.0, not from 5.0: a clock that went back gives no extra token.
    refused(control.admit([], "t", 10.5))
    admitted(control.admit([], "t", 11.0))


def test_max_calls_zero_refuses_every_call_of_that_scope_only() -> None:
    control = AdmissionControl({"closed": Limits(max_calls=0)}, {})
    refusal = refused(control.admit(["closed"], None, 0.0))
    assert refusal.status == 503 and refusal.reason is RefusalReason.CONCURRENT
    admitted(control.admit(["open"], None, 0.0))


def test_retry_after_covers_every_scope_that_would_refuse() -> None:
    # The realm allows a call a second, the trunk one every ten: both buckets are
    # empty. A caller honouring Retry-After must not be refused again by the trunk.
    control = AdmissionControl(
        {"public": Limits(calls_per_second=1)}, {"carrier": Limits(calls_per_second=0.1)}
    )
    admitted(control.admit(["public"], "carrier", 0.0))
    refusal = refused(control.admit(["public"], "carrier", 0.0))
    # The first scope to refuse is the one reported and counted ...
    assert (refusal.scope, refusal.name) == (AdmissionScope.REALM, "public")
    assert control.counters()["trunk"]["carrier"]["refused_rate"] == 0
    # ... but the wait is the longest of them.
    assert refusal.retry_after == 10
    admitted(control.admit(["public"], "carrier", refusal.retry_after))


def test_a_reload_lowering_the_rate_keeps_the_tokens_earned_before_it() -> None:
    # 10 calls/s, emptied at 0; half a second later 5 tokens are earned. A reload
    # then lowers the rate to one call in 100 s (burst 1): the bucket keeps its
    # tokens, capped at the new burst (the docstring's promise), so one more call.
    control = AdmissionControl({}, {"carrier": Limits(calls_per_second=10, burst=10)})
    for _ in range(10):
        admitted(control.admit([], "carrier", 0.0))
    control.reconfigure({}, {"carrier": Limits(calls_per_second=0.01)}, now=0.5)
    admitted(control.admit([], "carrier", 0.5))
    assert refused(control.admit([], "carrier", 0.5)).retry_after == 100


def test_a_reload_raising_the_rate_gives_no_tokens_for_the_time_before_it() -> None:
    control = AdmissionControl({}, {"carrier": Limits(calls_per_second=0.01, burst=1)})
    admitted(control.admit([], "carrier", 0.0))
    control.reconfigure({}, {"carrier": Limits(calls_per_second=10, burst=10)}, now=50.0)
    # 0.5 of a token earned at the old rate; the new one adds 10/s from 50.0 on.
    assert refused(control.admit([], "carrier", 50.0)).retry_after == 1
    admitted(control.admit([], "carrier", 50.05))


def test_the_node_s_reload_passes_its_time_to_admission() -> None:
    from sbc import assembly
    from sbc.config.loader import load_config_text
    from sbc.config.schema import Config

    def config(rate: float) -> Config:
        text = (
            "realms:\n"
            "  - name: a\n"
            "    listen: [{transport: udp, address: 127.0.0.1, port: 5070}]\n"
            "    media_address: 127.0.0.1\n"
            f"    limits: {{calls_per_second: {rate}}}\n"
        )
        return load_config_text(text, "sbc.yaml", Path("/nonexistent-base"))

    control = assembly.admission(config(10))
    for _ in range(10):
        admitted(control.admit(["a"], None, 0.0))
    assembly.reconfigure_admission(control, config(0.01), now=0.5)
    admitted(control.admit(["a"], None, 0.5))
