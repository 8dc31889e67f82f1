"""Sequential search by q-value among a registered user's contacts (RFC 3261 16.6, 16.7).

A user with a desk phone at q=1.0 and a mobile softphone at q=0.5 has the desk phone
ring first; the mobile rings when the desk phone answers busy, unavailable or not at
all (any 4xx/5xx, or no answer within ``calls.sequential_ring_timeout``). A 6xx ends
the search (16.7 step 5). Contacts of equal q, and contacts without one (1.0), ring
together, so without q-values a call forks in parallel as before. The controller is
driven as in test_b2bua_flows, with a fake clock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import pytest

from sbc.assembly import call_timers
from sbc.b2bua.call import CallState, EndReason
from sbc.b2bua.controller import (
    MAX_FORKS,
    AllocateMedia,
    CallController,
    CallTimers,
    Step,
    Target,
)
from sbc.b2bua.targets import Directory
from sbc.config.loader import ConfigError
from sbc.registrar.location import LocationService
from sbc.sip.message import Request
from sbc.sip.uri import parse_uri
from sbc.transport.base import Destination, Transport
from tests.unit.test_b2bua_flows import (
    ANSWER,
    BOB1,
    BOB1_FLOW,
    BOB2,
    BOB2_FLOW,
    CALLER,
    GW,
    NO_TIMERS,
    PSTN,
    USERS,
    StubTargets,
    answer,
    controller,
    ended_calls,
    forked,
    gw_flow,
    hop_of,
    invite_text,
    receive,
    requests,
    responses,
    session,
    statuses,
    trunk_plan,
)
from tests.unit.test_location import T0, binding
from tests.unit.test_timer_c import advance, cancels_of, invites_but, load
from tests.unit.test_trunks_review import first_invite

DESK = Target("inside", BOB1, "sip:bob@203.0.113.5:5070", q=1.0)
MOBILE = Target("inside", BOB2, "sip:bob@203.0.113.6:5070", q=0.5)
MOBILE_CONTACT = "sip:bob@203.0.113.6:5070"

#: The default ring time per q-group (20 s); no other call timer.
SEQUENTIAL = replace(NO_TIMERS, sequential_ring_timeout=20.0)


def sequential(
    timers: CallTimers = SEQUENTIAL, contacts: tuple[Target, ...] = (MOBILE, DESK)
) -> CallController:
    """A controller routing to a registered user's contacts (given lowest q first:
    the order is the q-values', not the location service's)."""
    return controller(timers, rules=USERS, targets=StubTargets(contacts=contacts))


def first_group(c: CallController) -> tuple[Request, str, Step]:
    """The caller's INVITE, its media allocated: the one INVITE of the highest q."""
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    step = c.media_allocated(allocate.call_ref, session(), 0.0)
    (invite,) = requests(step, "INVITE")
    assert hop_of(step, "INVITE") == BOB1
    return invite, allocate.call_ref, step


def only_invite(step: Step, *old: Request) -> Request:
    (invite,) = invites_but(step, *old)
    return invite


def mobile_ringing(c: CallController, at: float) -> tuple[Request, Request]:
    """The desk phone rang 20 s, then the mobile rings from ``at``: both INVITEs."""
    desk, _, _ = first_group(c)
    receive(c, answer(desk, 180, tag="desk"), BOB1_FLOW, 1.0)
    mobile = only_invite(advance(c, 20.0), desk)
    receive(c, answer(mobile, 180, tag="mob", contact=MOBILE_CONTACT), BOB2_FLOW, at)
    return desk, mobile


# -- groups ------------------------------------------------------------------------------


@pytest.mark.parametrize(("q1", "q2"), [(None, None), (1.0, None), (None, 1.0), (0.5, 0.5)])
def test_contacts_of_equal_or_no_q_ring_together_as_before(
    q1: float | None, q2: float | None
) -> None:
    c = sequential(contacts=(replace(DESK, q=q1), replace(MOBILE, q=q2)))
    first, second, _ = forked(c)  # both INVITEs at once, in the given order
    receive(c, answer(first, 180, tag="desk"), BOB1_FLOW, 1.0)
    receive(c, answer(second, 180, tag="mob", contact=MOBILE_CONTACT), BOB2_FLOW, 1.0)
    # One group, so the last: its ring time moves nothing on.
    step = advance(c, 20.0, 40.0, 60.0)
    assert requests(step, "CANCEL") == [] and invites_but(step, first, second) == []
    assert responses(step) == []


def test_the_highest_q_rings_first_and_the_directory_hands_over_each_binding_s_q() -> None:
    location = LocationService()
    bindings = [
        binding(aor="bob", contact="sip:bob@192.0.2.10", q=0.5),
        binding(aor="bob", contact="sip:bob@192.0.2.11"),
    ]
    location.replace("bob", bindings, T0)
    directory = Directory(location=location, wall=lambda: T0 + 1)
    targets = directory.registered(parse_uri("sip:bob@sbc"), None, time.monotonic())
    assert sorted((t.uri, t.q) for t in targets) == [
        ("sip:bob@192.0.2.10", 0.5),
        ("sip:bob@192.0.2.11", None),
    ]
    c = sequential()
    invite, _, _ = first_group(c)
    assert invite.raw_uri == DESK.uri


def test_max_forks_keeps_the_highest_q_contacts() -> None:
    low = tuple(
        Target("inside", Destination(Transport.UDP, f"203.0.113.{n}", 5070), f"sip:l{n}@x", q=0.1)
        for n in range(20, 20 + MAX_FORKS)
    )
    c = sequential(contacts=(*low, DESK))
    invite, _, _ = first_group(c)
    assert invite.raw_uri == DESK.uri
    # The desk phone answers busy: MAX_FORKS - 1 of the low ones ring, no more.
    step = receive(c, answer(invite, 486), BOB1_FLOW, 1.0)
    assert [r.raw_uri for r in invites_but(step, invite)] == [t.uri for t in low[:-1]]


# -- the next group after final answers ------------------------------------------------------


@pytest.mark.parametrize("status", [486, 480, 404, 500, 503])
def test_a_busy_desk_phone_moves_the_call_to_the_mobile_whose_200_connects_it(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    c = sequential()
    desk, ref, _ = first_group(c)
    with caplog.at_level(logging.INFO, logger="sbc.b2bua.controller"):
        step = receive(c, answer(desk, status), BOB1_FLOW, 1.0)
    assert responses(step) == []  # the caller hears nothing of the desk phone's answer
    mobile = only_invite(step, desk)
    assert hop_of(step, "INVITE") == BOB2 and mobile.raw_uri == MOBILE.uri
    assert f"- call {ref}: {status}, trying the contacts of q=0.5" in caplog.messages
    step = receive(
        c, answer(mobile, 200, ANSWER, tag="mob", contact=MOBILE_CONTACT), BOB2_FLOW, 2.0
    )
    assert statuses(step) == [200]
    (ack,) = requests(step, "ACK")
    assert ack.call_id == mobile.call_id
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED and call.b.call_id == mobile.call_id


def test_a_timeout_of_the_desk_phone_moves_the_call_to_the_mobile() -> None:
    # The 408 the transaction layer makes up when Timer B fires (nobody answered).
    c = sequential(replace(NO_TIMERS, sequential_ring_timeout=0.0))
    desk, _, _ = first_group(c)
    step = advance(c, 32.0)
    assert responses(step) == []
    assert only_invite(step, desk).raw_uri == MOBILE.uri


def test_a_603_from_the_desk_phone_ends_the_search() -> None:
    c = sequential()
    desk, _, _ = first_group(c)
    step = receive(c, answer(desk, 603), BOB1_FLOW, 1.0)
    assert statuses(step) == [603] and requests(step, "INVITE") == []
    (call,) = ended_calls(step)
    assert call.end_status == 603 and call.end_reason is EndReason.REJECTED
    assert len(c) == 0


def test_the_caller_and_the_cdr_get_the_best_answer_of_all_groups() -> None:
    c = sequential()
    desk, _, _ = first_group(c)
    mobile = only_invite(receive(c, answer(desk, 486), BOB1_FLOW, 1.0), desk)
    step = receive(c, answer(mobile, 404, tag="mob", contact=MOBILE_CONTACT), BOB2_FLOW, 2.0)
    assert statuses(step) == [486]
    (call,) = ended_calls(step)
    assert call.end_status == 486 and call.end_reason is EndReason.REJECTED


# -- the ring time of a group --------------------------------------------------------------------


def test_a_ringing_desk_phone_is_cancelled_after_the_ring_time_and_the_mobile_rings() -> None:
    c = sequential()
    desk, _, _ = first_group(c)
    (ringing,) = responses(receive(c, answer(desk, 180, tag="desk"), BOB1_FLOW, 1.0))
    assert ringing.status == 180
    step = advance(c, 19.9)
    assert requests(step, "CANCEL") == [] and invites_but(step, desk) == []
    step = advance(c, 20.0)
    (cancel,) = cancels_of(step, desk)
    assert cancel.via.branch == desk.via.branch and hop_of(step, "CANCEL") == BOB1
    mobile = only_invite(step, desk)
    assert hop_of(step, "INVITE") == BOB2 and responses(step) == []
    step = receive(
        c, answer(mobile, 200, ANSWER, tag="mob", contact=MOBILE_CONTACT), BOB2_FLOW, 21.0
    )
    assert statuses(step) == [200]
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED and call.b.call_id == mobile.call_id


def test_a_desk_phone_picked_up_as_its_ring_time_ran_out_answers_the_call() -> None:
    # Its 200 crossed the CANCEL: the person who picked up gets the call (the SBC
    # used to ACK and hang up on them), and the mobile is CANCELled instead.
    c = sequential()
    desk, mobile = mobile_ringing(c, 20.05)
    step = receive(c, answer(desk, 200, ANSWER, tag="desk"), BOB1_FLOW, 20.1)
    assert statuses(step) == [200]
    assert [(r.method, r.call_id) for r in requests(step)] == [
        ("ACK", desk.call_id),
        ("CANCEL", mobile.call_id),
    ]
    (call,) = c.calls()
    assert call.state is CallState.CONFIRMED and call.b.call_id == desk.call_id


def test_a_desk_phone_that_rang_out_counts_as_unavailable_when_the_mobile_is_unreachable() -> None:
    c = sequential()
    desk, _, _ = first_group(c)
    receive(c, answer(desk, 180, tag="desk"), BOB1_FLOW, 1.0)
    mobile = only_invite(advance(c, 20.0), desk)
    # The mobile never answers at all: Timer B (32 s) gives its 408.
    step = advance(c, 60.0)
    assert statuses(step) == [480]
    (call,) = ended_calls(step)
    assert call.end_status == 480 and call.end_reason is EndReason.REJECTED
    assert mobile.raw_uri == MOBILE.uri


def test_a_desk_phone_silent_at_the_ring_time_gets_its_cancel_on_its_first_provisional() -> None:
    c = sequential()
    desk, _, _ = first_group(c)
    step = advance(c, 20.0)
    # RFC 3261 9.1: no CANCEL before a provisional response.
    assert cancels_of(step, desk) == []
    only_invite(step, desk)
    step = receive(c, answer(desk, 180, tag="desk"), BOB1_FLOW, 21.0)
    assert len(cancels_of(step, desk)) == 1 and responses(step) == []


def test_the_ring_time_of_the_last_group_moves_nothing() -> None:
    c = sequential()
    _, mobile = mobile_ringing(c, 21.0)
    step = advance(c, 40.0, 41.0, 60.0)
    assert cancels_of(step, mobile) == [] and responses(step) == []
    (call,) = c.calls()
    assert call.state is CallState.EARLY


def test_a_ring_time_of_0_waits_for_the_desk_phone_s_final_answer() -> None:
    c = sequential(replace(NO_TIMERS, sequential_ring_timeout=0.0))
    desk, _, _ = first_group(c)
    receive(c, answer(desk, 180, tag="desk"), BOB1_FLOW, 1.0)
    step = advance(c, 20.0, 100.0)
    assert requests(step, "CANCEL") == [] and invites_but(step, desk) == []
    step = receive(c, answer(desk, 480, tag="desk"), BOB1_FLOW, 120.0)
    assert only_invite(step, desk).raw_uri == MOBILE.uri


def test_the_no_answer_timeout_still_bounds_the_whole_call() -> None:
    c = sequential(replace(SEQUENTIAL, no_answer_timeout=30.0))
    _, mobile = mobile_ringing(c, 21.0)
    step = advance(c, 30.0)
    assert statuses(step) == [408] and len(cancels_of(step, mobile)) == 1
    (call,) = ended_calls(step)
    assert call.end_reason is EndReason.NO_ANSWER_TIMEOUT


# -- trunks are not registered users --------------------------------------------------------------


def test_a_trunk_gateway_rings_on_past_the_sequential_ring_time() -> None:
    c = controller(SEQUENTIAL, rules=PSTN, targets=trunk_plan())
    invite, _ = first_invite(c)
    receive(c, answer(invite, 180), gw_flow(GW[0]), 1.0)
    step = advance(c, 20.0, 60.0)
    assert requests(step, "CANCEL") == [] and invites_but(step, invite) == []


def test_a_trunk_still_does_not_fail_over_on_486() -> None:
    c = controller(SEQUENTIAL, rules=PSTN, targets=trunk_plan())
    invite, _ = first_invite(c)
    step = receive(c, answer(invite, 486), gw_flow(GW[0]), 1.0)
    assert statuses(step) == [486] and requests(step, "INVITE") == []
    (call,) = ended_calls(step)
    assert call.end_status == 486


# -- configuration ------------------------------------------------------------------------------


def test_calls_sequential_ring_timeout_defaults_to_20_s_and_parses() -> None:
    assert CallTimers().sequential_ring_timeout == 20.0
    assert load("calls:\n  max_duration: 14400\n").calls.sequential_ring_timeout == 20
    assert load("calls:\n  sequential_ring_timeout: 0\n").calls.sequential_ring_timeout == 0
    config = load("calls:\n  sequential_ring_timeout: 3600\n")
    assert config.calls.sequential_ring_timeout == 3600
    # What the controller runs with.
    assert call_timers(config).sequential_ring_timeout == 3600.0


@pytest.mark.parametrize("value", [-1, 3601])
def test_a_sequential_ring_timeout_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ConfigError) as info:
        load(f"calls:\n  sequential_ring_timeout: {value}\n")
    assert str(info.value).splitlines() == [
        f"sbc.yaml:2: calls.sequential_ring_timeout: expected an integer 0..3600, got {value}"
    ]


# -- groups that cannot be tried ------------------------------------------------------------

#: A desk phone registered over TCP: the inside realm listens on UDP only.
DESK_TCP = Target("inside", Destination(Transport.TCP, "203.0.113.5", 5070), DESK.uri, q=1.0)
MOBILE_TCP = Target("inside", Destination(Transport.TCP, "203.0.113.6", 5070), MOBILE.uri, q=0.5)


def test_a_group_that_cannot_be_sent_to_is_passed_over_for_the_next() -> None:
    # The caller got 503 although the mobile was there to ring.
    c = sequential(contacts=(MOBILE, DESK_TCP))
    step = receive(c, invite_text(), CALLER, 0.0)
    (allocate,) = step.media
    step = c.media_allocated(allocate.call_ref, session(), 0.0)
    (invite,) = requests(step, "INVITE")
    assert hop_of(step, "INVITE") == BOB2 and invite.raw_uri == MOBILE.uri
    assert responses(step) == []
    step = receive(
        c, answer(invite, 200, ANSWER, tag="mob", contact=MOBILE_CONTACT), BOB2_FLOW, 1.0
    )
    assert statuses(step) == [200]


def test_a_busy_desk_phone_s_486_reaches_the_caller_when_the_mobile_cannot_be_sent_to() -> None:
    # The 486 said more than the 503 the caller got for the mobile nobody could reach.
    c = sequential(contacts=(MOBILE_TCP, DESK))
    desk, _, _ = first_group(c)
    step = receive(c, answer(desk, 486, tag="desk"), BOB1_FLOW, 1.0)
    assert statuses(step) == [486]
    (call,) = ended_calls(step)
    assert call.end_status == 486 and call.end_reason is EndReason.REJECTED
    assert len(c) == 0
