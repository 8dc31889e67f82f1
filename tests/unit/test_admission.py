"""Call admission control: pure, driven by a fake clock (the ``now`` argument)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sbc.b2bua.admission import (
    DEFAULT_RETRY_AFTER,
    NODE,
    AdmissionControl,
    AdmissionScope,
    AdmissionTicket,
    Admitted,
    Decision,
    Limits,
    RefusalReason,
    Refused,
)


def admitted(decision: Decision) -> AdmissionTicket:
    assert isinstance(decision, Admitted), decision
    return decision.ticket


def refused(decision: Decision) -> Refused:
    assert isinstance(decision, Refused), decision
    return decision


# --- Limits -----------------------------------------------------------------------------


def test_limits_default_burst_is_one_second_of_calls() -> None:
    assert Limits(calls_per_second=2.5).burst == 3
    assert Limits(calls_per_second=0.2).burst == 1
    assert Limits(calls_per_second=4).burst == 4
    assert Limits(calls_per_second=4, burst=10).burst == 10
    assert Limits(max_calls=3).burst is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_calls": -1}, "max_calls must be an integer >= 0, not -1"),
        ({"max_calls": 1.5}, "max_calls must be an integer >= 0, not 1.5"),
        ({"max_calls": True}, "max_calls must be an integer >= 0, not True"),
        ({"calls_per_second": 0}, "calls_per_second must be a finite number > 0, not 0"),
        ({"calls_per_second": -2.0}, "calls_per_second must be a finite number > 0, not -2.0"),
        ({"calls_per_second": math.inf}, "calls_per_second must be a finite number > 0, not inf"),
        ({"calls_per_second": math.nan}, "calls_per_second must be a finite number > 0, not nan"),
        ({"calls_per_second": "5"}, "calls_per_second must be a finite number > 0, not '5'"),
        ({"burst": 3}, "burst needs calls_per_second"),
        ({"calls_per_second": 1, "burst": 0}, "burst must be an integer >= 1, not 0"),
        ({"calls_per_second": 1, "burst": 2.0}, "burst must be an integer >= 1, not 2.0"),
    ],
)
def test_limits_reject_nonsense(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Limits(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


@pytest.mark.parametrize("retry_after", [0, -3, 2.5, True])
def test_retry_after_must_be_a_positive_integer(retry_after: object) -> None:
    with pytest.raises(ValueError) as info:
        AdmissionControl({}, {}, retry_after=retry_after)  # type: ignore[arg-type]
    assert str(info.value) == f"retry_after must be an integer >= 1, not {retry_after!r}"
    control = AdmissionControl({}, {})
    with pytest.raises(ValueError):
        control.reconfigure({}, {}, retry_after)  # type: ignore[arg-type]


def test_limits_values_must_be_limits() -> None:
    with pytest.raises(TypeError) as info:
        AdmissionControl({}, {"carrier": {"max_calls": 3}})  # type: ignore[dict-item]
    assert str(info.value) == "trunk carrier: limits must be Limits, not {'max_calls': 3}"


# --- concurrency ------------------------------------------------------------------------


def test_concurrency_limit_exactly_at_the_edge() -> None:
    control = AdmissionControl({"public": Limits(max_calls=2)}, {}, retry_after=7)
    admitted(control.admit(["public"], None, 0.0))
    admitted(control.admit(["public"], None, 0.0))
    assert control.active(AdmissionScope.REALM, "public") == 2
    refusal = refused(control.admit(["public"], None, 0.0))
    assert refusal == Refused(AdmissionScope.REALM, "public", RefusalReason.CONCURRENT, 7)
    assert refusal.scope == "realm"
    # Waiting does not help a concurrency limit: only a release does.
    refused(control.admit(["public"], None, 3600.0))
    assert control.active("realm", "public") == 2


def test_release_frees_a_slot() -> None:
    control = AdmissionControl({}, {"carrier": Limits(max_calls=1)})
    first = admitted(control.admit(["core"], "carrier", 0.0))
    assert refused(control.admit(["core"], "carrier", 1.0)).name == "carrier"
    control.release(first)
    assert control.active(AdmissionScope.TRUNK, "carrier") == 0
    assert control.active(AdmissionScope.REALM, "core") == 0
    second = admitted(control.admit(["core"], "carrier", 2.0))
    assert second != first
    assert control.active(AdmissionScope.TRUNK, "carrier") == 1


def test_max_calls_zero_closes_the_scope() -> None:
    control = AdmissionControl({}, {"closed": Limits(max_calls=0)})
    refusal = refused(control.admit([], "closed", 0.0))
    assert (refusal.scope, refusal.reason) == (AdmissionScope.TRUNK, RefusalReason.CONCURRENT)
    assert refusal.retry_after == DEFAULT_RETRY_AFTER


def test_both_legs_in_one_realm_count_once() -> None:
    control = AdmissionControl({"public": Limits(max_calls=1)}, {})
    ticket = admitted(control.admit(["public", "public"], None, 0.0))
    assert ticket.realms == ("public",)
    assert control.active(AdmissionScope.REALM, "public") == 1
    control.release(ticket)
    assert control.active(AdmissionScope.REALM, "public") == 0


def test_a_call_counts_against_each_realm_and_the_trunk() -> None:
    control = AdmissionControl({"public": Limits(max_calls=5)}, {"carrier": Limits(max_calls=5)})
    ticket = admitted(control.admit(["public", "core"], "carrier", 0.0))
    assert ticket.scopes == (
        (AdmissionScope.REALM, "public"),
        (AdmissionScope.REALM, "core"),
        (AdmissionScope.TRUNK, "carrier"),
    )
    assert control.active(AdmissionScope.REALM, "public") == 1
    assert control.active(AdmissionScope.REALM, "core") == 1
    assert control.active(AdmissionScope.TRUNK, "carrier") == 1
    # A realm and a trunk may share a name without sharing a count.
    assert control.active(AdmissionScope.TRUNK, "public") == 0


def test_realms_given_as_a_string_is_a_mistake() -> None:
    control = AdmissionControl({}, {})
    with pytest.raises(TypeError):
        control.admit("public", None, 0.0)


# --- rate -------------------------------------------------------------------------------


def test_rate_limit_with_burst() -> None:
    control = AdmissionControl({}, {"carrier": Limits(calls_per_second=1, burst=3)})
    for _ in range(3):
        admitted(control.admit([], "carrier", 10.0))
    refusal = refused(control.admit([], "carrier", 10.0))
    assert refusal == Refused(AdmissionScope.TRUNK, "carrier", RefusalReason.RATE, 1)


def test_token_refill_over_time() -> None:
    control = AdmissionControl({"public": Limits(calls_per_second=10, burst=1)}, {})
    admitted(control.admit(["public"], None, 0.2))
    refused(control.admit(["public"], None, 0.25))
    # 0.3 - 0.2 is 0.0999... in binary floating point: still a whole token.
    admitted(control.admit(["public"], None, 0.3))
    refused(control.admit(["public"], None, 0.3))


def test_bucket_never_fills_beyond_burst() -> None:
    control = AdmissionControl({"public": Limits(calls_per_second=2, burst=4)}, {})
    admitted(control.admit(["public"], None, 0.0))
    results = [control.admit(["public"], None, 1000.0) for _ in range(6)]
    assert [isinstance(r, Admitted) for r in results] == [True] * 4 + [False] * 2


def test_rate_retry_after_is_the_time_until_a_token_rounded_up() -> None:
    control = AdmissionControl({}, {"slow": Limits(calls_per_second=0.3)}, retry_after=9)
    admitted(control.admit([], "slow", 0.0))
    # Empty bucket, 0.3 tokens/s: 3.33 s until a token.
    assert refused(control.admit([], "slow", 0.0)).retry_after == 4
    assert refused(control.admit([], "slow", 2.0)).retry_after == 2
    # Less than a second left is still at least 1 (RFC 3261 20.33 counts whole seconds).
    assert refused(control.admit([], "slow", 3.3)).retry_after == 1
    admitted(control.admit([], "slow", 3.34))


def test_rate_retry_after_exact_seconds_are_not_rounded_up() -> None:
    control = AdmissionControl({}, {"slow": Limits(calls_per_second=0.5)})
    admitted(control.admit([], "slow", 0.0))
    assert refused(control.admit([], "slow", 0.0)).retry_after == 2
    assert refused(control.admit([], "slow", 1.0)).retry_after == 1
    admitted(control.admit([], "slow", 2.0))


def test_a_clock_going_backwards_refills_nothing() -> None:
    control = AdmissionControl({}, {"carrier": Limits(calls_per_second=1)})
    admitted(control.admit([], "carrier", 100.0))
    refused(control.admit([], "carrier", 50.0))
    refused(control.admit([], "carrier", 100.5))
    admitted(control.admit([], "carrier", 101.0))


def test_concurrency_is_checked_before_rate() -> None:
    control = AdmissionControl({"public": Limits(max_calls=1, calls_per_second=1)}, {})
    admitted(control.admit(["public"], None, 0.0))
    assert refused(control.admit(["public"], None, 0.0)).reason is RefusalReason.CONCURRENT


# --- all or nothing ---------------------------------------------------------------------


def test_a_realm_refusal_does_not_consume_the_trunk_token() -> None:
    control = AdmissionControl(
        {"public": Limits(max_calls=1)}, {"carrier": Limits(calls_per_second=1, burst=1)}
    )
    admitted(control.admit(["public"], None, 0.0))
    refusal = refused(control.admit(["public"], "carrier", 0.0))
    assert (refusal.scope, refusal.name) == (AdmissionScope.REALM, "public")
    assert control.active(AdmissionScope.TRUNK, "carrier") == 0
    # The trunk's only token is still there.
    admitted(control.admit(["core"], "carrier", 0.0))
    refused(control.admit(["core"], "carrier", 0.0))


def test_a_trunk_refusal_holds_no_realm_slot_or_token() -> None:
    control = AdmissionControl(
        {"public": Limits(max_calls=1, calls_per_second=1, burst=1)},
        {"carrier": Limits(max_calls=0)},
    )
    refusal = refused(control.admit(["public"], "carrier", 0.0))
    assert (refusal.scope, refusal.name) == (AdmissionScope.TRUNK, "carrier")
    assert control.active(AdmissionScope.REALM, "public") == 0
    assert control.counters()["realm"]["public"]["admitted"] == 0
    admitted(control.admit(["public"], None, 0.0))


def test_a_second_realm_refusal_does_not_consume_the_first_realm() -> None:
    control = AdmissionControl(
        {"public": Limits(calls_per_second=1, burst=1), "core": Limits(max_calls=0)}, {}
    )
    assert refused(control.admit(["public", "core"], None, 0.0)).name == "core"
    admitted(control.admit(["public"], None, 0.0))


# --- unknown scopes, release ------------------------------------------------------------


def test_unknown_scopes_are_unlimited_but_counted() -> None:
    control = AdmissionControl({"public": Limits(max_calls=1)}, {"carrier": Limits(max_calls=1)})
    tickets = [admitted(control.admit(["lab"], "other", 0.0)) for _ in range(500)]
    assert control.active(AdmissionScope.REALM, "lab") == 500
    assert control.active(AdmissionScope.TRUNK, "other") == 500
    for ticket in tickets:
        control.release(ticket)
    assert control.active(AdmissionScope.REALM, "lab") == 0


def test_a_call_without_trunk_or_realms_is_admitted() -> None:
    control = AdmissionControl({"public": Limits(max_calls=0)}, {"carrier": Limits(max_calls=0)})
    ticket = admitted(control.admit([], None, 0.0))
    assert ticket.scopes == ()
    control.release(ticket)


def test_double_release_is_a_noop() -> None:
    control = AdmissionControl({"public": Limits(max_calls=2)}, {"carrier": Limits(max_calls=2)})
    first = admitted(control.admit(["public"], "carrier", 0.0))
    second = admitted(control.admit(["public"], "carrier", 0.0))
    control.release(first)
    control.release(first)
    assert control.active(AdmissionScope.REALM, "public") == 1
    assert control.active(AdmissionScope.TRUNK, "carrier") == 1
    control.release(second)
    control.release(second)
    control.release(first)
    assert control.active(AdmissionScope.REALM, "public") == 0
    assert control.active(AdmissionScope.TRUNK, "carrier") == 0


def test_a_ticket_from_another_controller_releases_nothing() -> None:
    control = AdmissionControl({"public": Limits(max_calls=1)}, {})
    other = AdmissionControl({"public": Limits(max_calls=1)}, {})
    admitted(control.admit(["public"], None, 0.0))
    foreign = admitted(other.admit(["public"], None, 0.0))
    control.release(foreign)
    assert control.active(AdmissionScope.REALM, "public") == 1
    refused(control.admit(["public"], None, 0.0))


# --- reconfigure ------------------------------------------------------------------------


def test_reconfigure_with_calls_in_flight() -> None:
    control = AdmissionControl({"public": Limits(max_calls=5)}, {"carrier": Limits(max_calls=5)})
    tickets = [admitted(control.admit(["public"], "carrier", 0.0)) for _ in range(3)]
    control.reconfigure({"public": Limits(max_calls=2)}, {}, 11)
    # Three calls stay counted against the new limit of two.
    assert control.active(AdmissionScope.REALM, "public") == 3
    assert refused(control.admit(["public"], None, 1.0)).retry_after == 11
    control.release(tickets[0])
    refused(control.admit(["public"], None, 1.0))
    control.release(tickets[1])
    admitted(control.admit(["public"], None, 1.0))
    # The trunk's limits are gone, yet its calls were counted and release cleanly.
    assert control.active(AdmissionScope.TRUNK, "carrier") == 1
    control.release(tickets[2])
    assert control.active(AdmissionScope.TRUNK, "carrier") == 0
    assert control.active(AdmissionScope.REALM, "public") == 1


def test_reconfigure_adding_a_limit_sees_calls_already_in_flight() -> None:
    control = AdmissionControl({}, {})
    admitted(control.admit(["public"], None, 0.0))
    control.reconfigure({"public": Limits(max_calls=1)}, {})
    refused(control.admit(["public"], None, 0.0))


def test_reconfigure_caps_tokens_at_the_new_burst() -> None:
    control = AdmissionControl({}, {"carrier": Limits(calls_per_second=1, burst=10)})
    admitted(control.admit([], "carrier", 0.0))
    control.reconfigure({}, {"carrier": Limits(calls_per_second=1, burst=2)})
    results = [control.admit([], "carrier", 0.0) for _ in range(3)]
    assert [isinstance(r, Admitted) for r in results] == [True, True, False]


def test_reconfigure_gaining_a_rate_starts_with_a_full_bucket() -> None:
    control = AdmissionControl({}, {"carrier": Limits(max_calls=100)})
    admitted(control.admit([], "carrier", 0.0))
    control.reconfigure({}, {"carrier": Limits(calls_per_second=1, burst=2)})
    results = [control.admit([], "carrier", 0.0) for _ in range(3)]
    assert [isinstance(r, Admitted) for r in results] == [True, True, False]


# --- restore, counters, responses -------------------------------------------------------


def test_restore_counts_calls_without_checking_limits() -> None:
    control = AdmissionControl(
        {"public": Limits(max_calls=1)}, {"carrier": Limits(calls_per_second=1, burst=2)}
    )
    running = admitted(control.admit([], "carrier", 0.0))
    tickets = control.restore([(["public", "core"], "carrier"), (["public"], None)])
    assert len(tickets) == 2
    assert control.active(AdmissionScope.REALM, "public") == 2
    assert control.active(AdmissionScope.REALM, "core") == 1
    assert control.active(AdmissionScope.TRUNK, "carrier") == 2
    # No token was spent on the restored call: the bucket's second token is there.
    admitted(control.admit([], "carrier", 0.0))
    refused(control.admit([], "carrier", 0.0))
    refused(control.admit(["public"], None, 0.0))
    for ticket in tickets:
        control.release(ticket)
        control.release(ticket)
    assert control.active(AdmissionScope.REALM, "public") == 0
    assert control.active(AdmissionScope.REALM, "core") == 0
    assert control.active(AdmissionScope.TRUNK, "carrier") == 2
    control.release(running)
    assert control.active(AdmissionScope.TRUNK, "carrier") == 1
    assert control.counters()["realm"]["public"]["admitted"] == 0


def test_counters() -> None:
    control = AdmissionControl(
        {"public": Limits(max_calls=1), "idle": Limits(max_calls=9)},
        {"carrier": Limits(calls_per_second=1, burst=1)},
    )
    first = admitted(control.admit(["public"], "carrier", 0.0))
    refused(control.admit(["public"], "carrier", 0.0))
    refused(control.admit(["core"], "carrier", 0.0))
    admitted(control.admit(["core"], None, 0.0))
    control.release(first)
    counts = {"admitted": 0, "refused_concurrent": 0, "refused_rate": 0, "refused_busy": 0}
    assert control.counters() == {
        "realm": {
            "core": {**counts, "admitted": 1, "active": 1},
            "idle": {**counts, "active": 0},
            "public": {**counts, "admitted": 1, "refused_concurrent": 1, "active": 0},
        },
        "trunk": {"carrier": {**counts, "admitted": 1, "refused_rate": 1, "active": 0}},
        "route": {},
        "node": {},
    }


def test_a_busy_node_refuses_every_call_and_charges_no_scope() -> None:
    control = AdmissionControl({"public": Limits(max_calls=5)}, {}, retry_after=7)
    busy = [True]
    control.busy = lambda: busy[0]
    refusal = refused(control.admit(["public"], "carrier", 0.0))
    assert (refusal.scope, refusal.name, refusal.reason) == (
        AdmissionScope.NODE,
        NODE,
        RefusalReason.BUSY,
    )
    assert refusal.status == 503 and refusal.headers == (("Retry-After", "7"),)
    refused(control.admit(["other"], None, 0.0))
    assert control.active("realm", "public") == 0
    busy[0] = False
    admitted(control.admit(["public"], "carrier", 0.0))
    counters = control.counters()
    assert counters["node"] == {
        NODE: {"admitted": 0, "refused_concurrent": 0, "refused_rate": 0, "refused_busy": 2,
               "active": 0}
    }  # fmt: skip
    assert counters["realm"]["public"]["admitted"] == 1


def test_refused_gives_the_503_and_retry_after() -> None:
    refusal = Refused(AdmissionScope.TRUNK, "carrier", RefusalReason.RATE, 3)
    assert refusal.status == 503
    assert refusal.headers == (("Retry-After", "3"),)


# --- properties -------------------------------------------------------------------------

REALMS = ("a", "b", "c")
TRUNKS = ("t", "u")

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("admit"),
            st.lists(st.sampled_from(REALMS), max_size=3),
            st.none() | st.sampled_from(TRUNKS),
        ),
        st.tuples(st.just("release"), st.integers(min_value=0, max_value=50)),
        st.tuples(st.just("wait"), st.floats(min_value=0.0, max_value=3.0)),
    ),
    max_size=80,
)
limits = st.builds(
    Limits,
    max_calls=st.none() | st.integers(min_value=0, max_value=4),
    calls_per_second=st.none() | st.floats(min_value=0.1, max_value=20.0),
)


@settings(max_examples=200, deadline=None)
@given(
    realm_limits=st.dictionaries(st.sampled_from(REALMS), limits),
    trunk_limits=st.dictionaries(st.sampled_from(TRUNKS), limits),
    ops=operations,
)
def test_active_counts_stay_within_zero_and_max_calls(
    realm_limits: dict[str, Limits],
    trunk_limits: dict[str, Limits],
    ops: list[tuple[object, ...]],
) -> None:
    control = AdmissionControl(realm_limits, trunk_limits)
    scopes = [(AdmissionScope.REALM, n, realm_limits) for n in REALMS] + [
        (AdmissionScope.TRUNK, n, trunk_limits) for n in TRUNKS
    ]
    held: list[AdmissionTicket] = []
    released: list[AdmissionTicket] = []
    now = 0.0
    for op in ops:
        before = {(s, n): control.active(s, n) for s, n, _ in scopes}
        if op[0] == "admit":
            _, realms, trunk = op
            decision = control.admit(realms, trunk, now)  # type: ignore[arg-type]
            if isinstance(decision, Admitted):
                held.append(decision.ticket)
            else:
                # All or nothing: a refusal holds no slot anywhere.
                assert {(s, n): control.active(s, n) for s, n, _ in scopes} == before
                assert decision.retry_after >= 1
        elif op[0] == "release":
            index = op[1]
            assert isinstance(index, int)
            pool = held + released
            if pool:
                ticket = pool[index % len(pool)]
                control.release(ticket)
                if ticket in held:
                    held.remove(ticket)
                    released.append(ticket)
        else:
            assert isinstance(op[1], float)
            now += op[1]
        for scope, name, configured in scopes:
            active = control.active(scope, name)
            expected = sum((scope, name) in t.scopes for t in held)
            assert active == expected >= 0
            cap = configured[name].max_calls if name in configured else None
            if cap is not None:
                assert active <= cap


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.05, max_value=50.0),
    burst=st.integers(min_value=1, max_value=5),
    start=st.floats(min_value=0.0, max_value=1e6),
)
def test_rate_refusal_retry_after_is_tight(rate: float, burst: int, start: float) -> None:
    control = AdmissionControl({"r": Limits(calls_per_second=rate, burst=burst)}, {})
    for _ in range(burst):
        admitted(control.admit(["r"], None, start))
    refusal = refused(control.admit(["r"], None, start))
    assert refusal.reason is RefusalReason.RATE
    assert refusal.retry_after == max(1, math.ceil((1 - 1e-9) / rate))
    if refusal.retry_after > 1:
        # One second earlier than advised is still too early...
        refused(control.admit(["r"], None, start + refusal.retry_after - 1))
    # ...and retrying when advised works.
    admitted(control.admit(["r"], None, start + refusal.retry_after))


def test_a_call_replacing_another_skips_the_concurrent_limit_only() -> None:
    control = AdmissionControl({"outside": Limits(max_calls=1, calls_per_second=1)}, {})
    first = control.admit(["outside"], None, 0.0)
    assert isinstance(first, Admitted)
    # Over the concurrent limit: refused, unless it replaces a call the SBC holds ...
    refused = control.admit(["outside"], None, 5.0)
    assert isinstance(refused, Refused) and refused.reason is RefusalReason.CONCURRENT
    second = control.admit(["outside"], None, 5.0, replacing=True)
    assert isinstance(second, Admitted)
    assert control.active("realm", "outside") == 2
    # ... but the rate still applies to it (the bucket was emptied at 5.0).
    third = control.admit(["outside"], None, 5.1, replacing=True)
    assert isinstance(third, Refused) and third.reason is RefusalReason.RATE
    control.release(first.ticket)
    control.release(second.ticket)
    control.release(second.ticket)  # twice: nothing more
    assert control.active("realm", "outside") == 0
