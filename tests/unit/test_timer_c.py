"""Timer C of the B2BUA's outgoing INVITEs (RFC 3261 16.6 step 11, 16.7 step 2, 16.8).

Each B-leg INVITE (a gateway attempt, or one contact of a forked call) has its own
Timer C: started when the INVITE is sent, restarted by every provisional but a 100.
When it fires the INVITE is CANCELled if a provisional came (else, as RFC 3261 16.8
says, the attempt is taken as a 408 without one) and the attempt counts as a 408:
the next gateway of the trunk is tried, or the caller hears the best answer.
The controller is driven as in test_b2bua_flows, with a fake clock.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sbc.assembly import call_timers
from sbc.b2bua.call import CallState, EndReason
from sbc.b2bua.controller import CallController, CallTimers, DeleteMedia, Step, Target, TrunkPlan
from sbc.cdr.from_call import cdr_record
from sbc.cdr.record import Disposition
from sbc.config.loader import ConfigError, load_config_text
from sbc.config.schema import Config
from sbc.sip.message import Request
from tests.unit.test_b2bua_flows import (
    ANSWER,
    BOB1,
    BOB1_FLOW,
    BOB2,
    BOB2_FLOW,
    GW,
    NO_TIMERS,
    PSTN,
    USERS,
    StubTargets,
    ack_from_a,
    answer,
    controller,
    ended_calls,
    forked,
    gw_flow,
    hop_of,
    receive,
    registered_targets,
    requests,
    responses,
    statuses,
    trunk_plan,
)
from tests.unit.test_trunks_review import first_invite

#: Timer C shorter than Timer B (64*T1 = 32 s): it fires before any response.
SHORT_TIMER_C = CallTimers(max_duration=0, no_answer_timeout=0, session_expires=0, timer_c=20)


def advance(c: CallController, *times: float) -> Step:
    """Run the controller's and the transaction layer's timers at each of ``times``."""
    out = Step()
    for now in times:
        out = out + c.handle_timers(now) + c.handle(c.transactions.handle_timers(now), now)
    return out


def invites_but(step: Step, *old: Request) -> list[Request]:
    """The INVITEs of ``step`` that are not retransmissions of ``old`` ones."""
    known = {request.call_id for request in old}
    return [r for r in requests(step, "INVITE") if r.call_id not in known]


def cancels_of(step: Step, invite: Request) -> list[Request]:
    """The CANCELs of ``invite`` in ``step`` (over UDP, each is retransmitted)."""
    return [r for r in requests(step, "CANCEL") if r.call_id == invite.call_id]


def single_gateway() -> StubTargets:
    return StubTargets(plan=TrunkPlan("inside", (Target("inside", GW[0], "sip:1000@gw", "gw1"),)))


def test_timer_c_runs_over_three_minutes_from_the_invite_and_a_100_does_not_restart_it() -> None:
    assert NO_TIMERS.timer_c == 185.0
    c = controller(rules=PSTN, targets=trunk_plan())
    invite, _ = first_invite(c)
    # RFC 3261 16.7 step 2: only a provisional other than 100 restarts it.
    receive(c, answer(invite, 100), gw_flow(GW[0]), 50.0)
    assert requests(advance(c, 184.9)) == []
    step = advance(c, 185.0)
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == invite.call_id and hop_of(step, "CANCEL") == GW[0]
    (second,) = invites_but(step, invite)
    assert second.raw_uri == f"sip:1000@{GW[1].host}:5060" and responses(step) == []


def test_a_180_restarts_timer_c() -> None:
    targets = trunk_plan()
    c = controller(rules=PSTN, targets=targets)
    invite, _ = first_invite(c)
    (ringing,) = responses(receive(c, answer(invite, 180), gw_flow(GW[0]), 100.0))
    assert ringing.status == 180
    assert requests(advance(c, 185.0, 284.9)) == []
    step = advance(c, 285.0)
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == invite.call_id and hop_of(step, "CANCEL") == GW[0]
    (second,) = invites_but(step, invite)
    assert hop_of(step, "INVITE") == GW[1]
    # A gateway that rang proved alive: passive health counts no failure for it.
    assert targets.results == []
    # The second gateway's own Timer C runs from its INVITE.
    receive(c, answer(second, 100), gw_flow(GW[1]), 300.0)
    assert cancels_of(advance(c, 469.9), second) == []
    step = advance(c, 470.0)
    assert len(cancels_of(step, second)) == 1
    (third,) = invites_but(step, invite, second)
    assert third.raw_uri == f"sip:1000@{GW[2].host}:5060"


def test_a_gateway_stuck_after_its_100_counts_as_a_timeout_for_its_health() -> None:
    targets = trunk_plan()
    c = controller(rules=PSTN, targets=targets)
    invite, _ = first_invite(c)
    receive(c, answer(invite, 100), gw_flow(GW[0]), 0.1)
    advance(c, 185.0)
    assert targets.results == [("pstn", "gw1", None)]


def test_timer_c_without_a_provisional_fails_over_as_a_408_without_cancel() -> None:
    targets = trunk_plan()
    c = controller(SHORT_TIMER_C, rules=PSTN, targets=targets)
    invite, _ = first_invite(c)
    assert requests(advance(c, 19.9), "CANCEL") == []
    step = advance(c, 20.0)
    # RFC 3261 16.8 and 9.1: no CANCEL before a provisional; as if a 408 came.
    assert requests(step, "CANCEL") == [] and responses(step) == []
    (second,) = invites_but(step, invite)
    assert hop_of(step, "INVITE") == GW[1]
    assert targets.results == [("pstn", "gw1", None)]

    # The first gateway wakes up after all: it is CANCELled, the caller hears nothing.
    step = receive(c, answer(invite, 180, tag="late"), gw_flow(GW[0]), 21.0)
    assert responses(step) == []
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == invite.call_id and hop_of(step, "CANCEL") == GW[0]
    # The second gateway still has the call.
    step = receive(c, answer(second, 200, ANSWER), gw_flow(GW[1]), 22.0)
    assert statuses(step) == [200]
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED and call.gateway == "gw2"


def test_a_2xx_crossing_the_timer_c_cancel_answers_the_call_and_the_next_gateway_is_cancelled() -> (
    None
):
    # Someone picked up as the CANCEL crossed: hanging up on them (as the SBC did)
    # would drop the person who answered; the call takes that answer instead.
    c = controller(rules=PSTN, targets=trunk_plan())
    invite, _ = first_invite(c)
    receive(c, answer(invite, 183), gw_flow(GW[0]), 1.0)
    step = advance(c, 186.0)
    (second,) = invites_but(step, invite)
    receive(c, answer(second, 180), gw_flow(GW[1]), 186.05)
    step = receive(c, answer(invite, 200, ANSWER, tag="late"), gw_flow(GW[0]), 186.1)
    assert statuses(step) == [200]
    assert [(r.method, r.call_id) for r in requests(step)] == [
        ("ACK", invite.call_id),
        ("CANCEL", second.call_id),
    ]
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED and call.b.call_id == invite.call_id
    # The second gateway's 487 ends its INVITE; the call stays up.
    step = receive(c, answer(second, 487), gw_flow(GW[1]), 186.2)
    assert responses(step) == [] and len(c) == 1


def test_timer_c_on_the_last_gateway_answers_408_and_ends_the_call() -> None:
    c = controller(rules=PSTN, targets=single_gateway())
    invite, _ = first_invite(c)
    receive(c, answer(invite, 100), gw_flow(GW[0]), 0.1)
    step = advance(c, 185.0)
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == invite.call_id and hop_of(step, "CANCEL") == GW[0]
    assert requests(step, "INVITE") == []
    (final,) = responses(step)
    assert final.status == 408 and final.to.tag
    (deleted,) = [m for m in step.media if isinstance(m, DeleteMedia)]
    assert deleted.session_id == "sess"
    (call,) = ended_calls(step)
    assert call.end_status == 408 and call.end_reason is EndReason.TRANSPORT_ERROR
    assert cdr_record(call, None, 0.0).disposition is Disposition.FAILED
    assert len(c) == 0 and c.counters.get("timer_c_expired") == 1
    # The gateway's 487 for the CANCELled INVITE: ACKed hop by hop, nothing else.
    step = receive(c, answer(invite, 487), gw_flow(GW[0]), 185.1)
    assert [r.method for r in requests(step)] == ["ACK"] and responses(step) == []
    assert c.next_deadline() is None


def test_after_every_gateway_the_caller_hears_the_best_answer_not_timer_c_s_408() -> None:
    # RFC 3261 16.7 step 6: the best of every attempt, a 404 before Timer C's 408.
    plan = trunk_plan().plan
    assert plan is not None
    fail_over_404 = StubTargets(plan=replace(plan, failover_statuses=frozenset({404, 408, 503})))
    c = controller(rules=PSTN, targets=fail_over_404)
    invite, _ = first_invite(c)
    step = receive(c, answer(invite, 503), gw_flow(GW[0]), 0.1)
    (invite,) = requests(step, "INVITE")
    step = receive(c, answer(invite, 404), gw_flow(GW[1]), 0.2)
    (invite,) = requests(step, "INVITE")
    receive(c, answer(invite, 100), gw_flow(GW[2]), 0.3)
    step = advance(c, 185.3)
    assert len(cancels_of(step, invite)) == 1
    assert statuses(step) == [404]


def test_a_ring_timeout_shorter_than_timer_c_still_ends_the_call_first() -> None:
    for ring in (60.0, 185.0):  # the ring timer starts first: it wins a tie too
        timers = CallTimers(max_duration=0, no_answer_timeout=ring, session_expires=0)
        c = controller(timers, rules=PSTN, targets=trunk_plan())
        invite, _ = first_invite(c)
        receive(c, answer(invite, 180), gw_flow(GW[0]), 0.0)
        step = advance(c, ring)
        assert statuses(step) == [408], ring
        assert hop_of(step, "CANCEL") == GW[0] and invites_but(step, invite) == []
        (call,) = ended_calls(step)
        assert call.end_reason is EndReason.NO_ANSWER_TIMEOUT
        assert requests(advance(c, 400.0), "INVITE") == []


def test_timer_c_stops_once_the_call_is_answered() -> None:
    c = controller(rules=PSTN, targets=trunk_plan())
    invite, _ = first_invite(c)
    receive(c, answer(invite, 180), gw_flow(GW[0]), 1.0)
    (ok,) = responses(receive(c, answer(invite, 200, ANSWER), gw_flow(GW[0]), 2.0))
    assert ok.status == 200 and ok.to.tag
    ack_from_a(c, ok.to.tag, 2.1)
    step = advance(c, 200.0, 400.0)
    assert requests(step, "CANCEL") == [] and requests(step, "INVITE") == []
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED


def test_each_fork_to_registered_contacts_has_its_own_timer_c() -> None:
    c = controller(rules=USERS, targets=registered_targets())
    first, second, ref = forked(c)
    receive(c, answer(first, 100), BOB1_FLOW, 0.1)
    receive(c, answer(second, 180, tag="bob2"), BOB2_FLOW, 100.0)
    # The first contact's Timer C: it alone is CANCELled, the other rings on.
    step = advance(c, 185.0)
    (cancel,) = requests(step, "CANCEL")
    assert cancel.call_id == first.call_id and hop_of(step, "CANCEL") == BOB1
    assert responses(step) == [] and len(c) == 1
    # Its 487 changes nothing.
    assert responses(receive(c, answer(first, 487), BOB1_FLOW, 185.1)) == []
    # The second's, restarted by its 180: now both are out; the caller gets 408.
    assert cancels_of(advance(c, 284.9), second) == []
    step = advance(c, 285.0)
    (cancel,) = cancels_of(step, second)
    assert hop_of(step, "CANCEL") == BOB2
    assert statuses(step) == [408]
    (call,) = ended_calls(step)
    assert call.call_ref == ref and call.end_status == 408
    assert step.media == (DeleteMedia(ref, "sess"),)
    assert len(c) == 0


# -- configuration --------------------------------------------------------------------------


def load(text: str) -> Config:
    return load_config_text(text, "sbc.yaml", Path("/nonexistent-base"))


def test_calls_timer_c_defaults_to_185_s_and_reaches_the_controller() -> None:
    default = load("calls:\n  max_duration: 14400\n")
    assert default.calls.timer_c == 185 and call_timers(default).timer_c == 185.0
    config = load("calls:\n  no_answer_timeout: 600\n  timer_c: 240\n")
    assert call_timers(config).timer_c == 240.0


@pytest.mark.parametrize(
    ("value", "shown"),
    [("59", "59"), ("3601", "3601"), ("0", "0"), ("180.5", "180.5"), ("soon", "'soon'")],
)
def test_calls_timer_c_out_of_bounds_is_a_config_error_with_its_line(
    value: str, shown: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(f"calls:\n  no_answer_timeout: 600\n  timer_c: {value}\n")
    assert str(info.value).splitlines() == [
        f"sbc.yaml:3: calls.timer_c: expected an integer 60..3600, got {shown}"
    ]


# -- progress timeout: Timer C until the far end rings ----------------------------------------

PROGRESS = CallTimers(max_duration=0, no_answer_timeout=0, session_expires=0, progress_timeout=10)


def test_a_gateway_that_sends_only_100_is_failed_over_at_the_progress_timeout() -> None:
    targets = trunk_plan()
    c = controller(PROGRESS, rules=PSTN, targets=targets)
    invite, _ = first_invite(c)
    receive(c, answer(invite, 100), gw_flow(GW[0]), 0.5)
    assert requests(advance(c, 9.9), "CANCEL") == []
    step = advance(c, 10.0)
    assert len(cancels_of(step, invite)) == 1 and hop_of(step, "CANCEL") == GW[0]
    (second,) = invites_but(step, invite)
    assert second.raw_uri == f"sip:1000@{GW[1].host}:5060" and responses(step) == []
    assert targets.results == [("pstn", "gw1", None)]  # stuck: a failure for its health


def test_once_the_far_end_rings_timer_c_takes_over_from_the_progress_timeout() -> None:
    c = controller(PROGRESS, rules=PSTN, targets=trunk_plan())
    invite, _ = first_invite(c)
    receive(c, answer(invite, 100), gw_flow(GW[0]), 0.5)
    receive(c, answer(invite, 183), gw_flow(GW[0]), 8.0)
    # Ringing for longer than the progress timeout is what ringing does.
    assert requests(advance(c, 10.0, 60.0, 192.9), "CANCEL") == []
    step = advance(c, 193.0)  # Timer C: 185 s from the 183
    assert len(cancels_of(step, invite)) == 1


def test_each_gateway_gets_its_own_progress_timeout() -> None:
    c = controller(PROGRESS, rules=PSTN, targets=trunk_plan())
    invite, _ = first_invite(c)
    (second,) = invites_but(advance(c, 10.0), invite)
    assert cancels_of(advance(c, 19.9), second) == []
    (third,) = invites_but(advance(c, 20.0), invite, second)
    assert third.raw_uri == f"sip:1000@{GW[2].host}:5060"


def test_progress_timeout_is_off_by_default_and_configurable() -> None:
    assert NO_TIMERS.progress_timeout == 0.0
    default = load("calls:\n  max_duration: 14400\n")
    assert call_timers(default).progress_timeout == 0.0
    assert call_timers(load("calls:\n  progress_timeout: 12\n")).progress_timeout == 12.0
    with pytest.raises(ConfigError) as info:
        load("calls:\n  progress_timeout: 601\n")
    assert str(info.value).splitlines() == [
        "sbc.yaml:2: calls.progress_timeout: expected an integer 0..600, got 601"
    ]
