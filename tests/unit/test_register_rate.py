"""REGISTERs above a realm's ``registers_per_second`` get 503 with a spread-out
Retry-After (a registration storm), the others reach the registrar; the bucket, the
controller's use of it, the configuration and what /healthz shows."""

from __future__ import annotations

import logging
import random

import pytest

from sbc.assembly import EmbeddedRegistrar, RegisterRelayPort, realm_policies
from sbc.b2bua.controller import RealmPolicy
from sbc.b2bua.register_rate import RETRY_AFTER, RegisterRate
from sbc.config.loader import ConfigError
from sbc.sip.auth import DigestClient
from sbc.sip.message import Request, Response
from tests.unit.test_b2bua_flows import CALLER, controller, receive, requests, responses
from tests.unit.test_registrar import PASSWORDS, RURI, make_registrar, register
from tests.unit.test_registration_relay_bindings import relay
from tests.unit.test_timer_c import load

# -- the bucket -------------------------------------------------------------------------


def test_one_second_s_worth_goes_at_once_then_the_rate() -> None:
    rate = RegisterRate(random.Random(7))
    assert [rate.take("a", 3, 0.0) for _ in range(3)] == [None] * 3
    refused = rate.take("a", 3, 0.0)
    assert refused is not None and RETRY_AFTER[0] <= refused <= RETRY_AFTER[1]
    # A third of a second earns one more; other realms have their own bucket.
    assert rate.take("a", 3, 1 / 3) is None and rate.take("a", 3, 1 / 3) is not None
    assert rate.take("b", 3, 1 / 3) is None
    # Idle time fills the bucket up to one second's worth, no more.
    assert [rate.take("a", 3, 100.0) for _ in range(4)].count(None) == 3
    assert rate.refused() == {"a": 3, "b": 0}


def test_a_rate_below_one_still_lets_one_through_then_waits() -> None:
    rate = RegisterRate()
    assert rate.take("a", 0.5, 0.0) is None
    assert rate.take("a", 0.5, 1.0) is not None
    assert rate.take("a", 0.5, 2.0) is None


def test_retry_afters_are_spread_over_the_range() -> None:
    rate = RegisterRate(random.Random(1))
    rate.take("a", 1, 0.0)
    waits = {rate.take("a", 1, 0.0) for _ in range(500)}
    assert None not in waits
    assert min(w for w in waits if w is not None) == RETRY_AFTER[0]
    assert max(w for w in waits if w is not None) == RETRY_AFTER[1]


def test_a_new_rate_applies_from_the_reload_on() -> None:
    rate = RegisterRate()
    assert rate.take("a", 1, 0.0) is None
    assert rate.take("a", 1, 0.5) is not None
    # Raised to 100/s: the half second since counts at the old rate (half a token),
    # each hundredth of a second from now at the new one.
    assert rate.take("a", 100, 0.5) is not None
    assert rate.take("a", 100, 0.51) is None


def test_an_answer_to_a_challenge_may_take_the_bucket_into_debt_of_one_second() -> None:
    rate = RegisterRate()
    assert [rate.take("a", 2, 0.0) for _ in range(2)] == [None, None]
    assert rate.take("a", 2, 0.0) is not None  # a new REGISTER: refused
    # Answers go on, charged, down to one second's worth of debt; then refused too.
    assert [rate.take("a", 2, 0.0, answer=True) for _ in range(2)] == [None, None]
    assert rate.take("a", 2, 0.0, answer=True) is not None
    # The debt is paid first: a second later the bucket is back at zero only.
    assert rate.take("a", 2, 1.0) is not None
    assert rate.take("a", 2, 1.5) is None


# -- through the controller ---------------------------------------------------------------------


def storm(count: int, policy: RealmPolicy) -> list[tuple[int, str | None]]:
    """``count`` REGISTERs of distinct phones at the same instant into realm
    "outside" (embedded registrar, digest): (status, Retry-After) of each answer."""
    c = controller(
        registrar=EmbeddedRegistrar(make_registrar(), wall=lambda: 1_700_000_000.0),
        policies={"outside": policy},
    )
    out = []
    for n in range(count):
        request = register(user=f"u{n}", call_id=f"storm-{n}@phone", cseq=n + 1)
        (response,) = responses(receive(c, bytes(request).decode(), CALLER, 0.0))
        out.append((response.status, response.headers.get("Retry-After")))
    return out


def test_registers_over_the_realm_s_rate_get_503_with_retry_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="sbc.b2bua.controller"):
        answers = storm(30, RealmPolicy(registrar=True, registers_per_second=10))
    # The first ten reach the registrar (its challenge), the rest are shed.
    assert [status for status, _ in answers[:10]] == [401] * 10
    assert {status for status, _ in answers[10:]} == {503}
    waits = [int(wait or 0) for _, wait in answers[10:]]
    assert all(RETRY_AFTER[0] <= wait <= RETRY_AFTER[1] for wait in waits)
    # Logged once for the burst, not once a REGISTER.
    lines = [r.getMessage() for r in caplog.records if "REGISTERs a second" in r.getMessage()]
    assert lines == ["x realm outside: over 10 REGISTERs a second, refusing with 503"]


def test_a_challenged_phone_s_answer_is_not_shed_and_others_wait_for_the_debt() -> None:
    # Ten phones challenged at once by a realm of 10/s; their answers came right
    # after, and used to get 503: the challenges were wasted and nobody registered.
    wall = [1_700_000_000.0]
    c = controller(
        registrar=EmbeddedRegistrar(make_registrar(), wall=lambda: wall[0]),
        policies={"outside": RealmPolicy(registrar=True, registers_per_second=10)},
    )

    def send(request: Request, now: float) -> Response:
        (response,) = responses(receive(c, bytes(request).decode(), CALLER, now))
        return response

    # (Each its own CSeq: the Via branch is made of it, and one branch is one transaction.)
    challenges = [
        send(register(user=user, call_id=f"{user}-{n}@phone", cseq=2 * n + 1), 0.0)
        for n, user in enumerate(["alice", "bob"] * 5)
    ]
    assert [r.status for r in challenges] == [401] * 10
    for n, (user, challenge) in enumerate(zip(["alice", "bob"] * 5, challenges, strict=True)):
        authorization = DigestClient(user, PASSWORDS[user]).respond(
            challenge.headers.fields("WWW-Authenticate"), method="REGISTER", uri=RURI
        )
        request = register(
            user=user, call_id=f"{user}-{n}@phone", cseq=2 * n + 2, authorization=authorization
        )
        assert send(request, 0.1).status == 200
    # A new phone waits for the debt the answers ran up (10 at 10/s) to be paid ...
    assert send(register(user="alice", call_id="late@phone", cseq=30), 1.0).status == 503
    # ... and an answer that is not to a challenge of ours counts as a new REGISTER.
    forged = 'Digest username="bob", realm="sbc", nonce="bm90LW91cnM", uri="sip:x", response="0"'
    request = register(user="bob", call_id="f@phone", cseq=31, authorization=forged)
    assert send(request, 1.0).status == 503
    assert send(register(user="alice", call_id="later@phone", cseq=32), 2.2).status == 401


@pytest.mark.parametrize(("late", "status"), [(0.0, 200), (301.0, 503)])
def test_an_answer_with_a_stale_nonce_counts_as_a_new_register(late: float, status: int) -> None:
    # The nonce is ours but older than its lifetime (300 s): no longer an answer the
    # bucket let start, so with the bucket empty it is shed like a new REGISTER.
    wall = [1_700_000_000.0]
    c = controller(
        registrar=EmbeddedRegistrar(make_registrar(), wall=lambda: wall[0]),
        policies={"outside": RealmPolicy(registrar=True, registers_per_second=1)},
    )
    request = register(call_id="a@phone", cseq=1)
    (challenge,) = responses(receive(c, bytes(request).decode(), CALLER, 0.0))
    assert challenge.status == 401
    wall[0] += late
    authorization = DigestClient("alice", PASSWORDS["alice"]).respond(
        challenge.headers.fields("WWW-Authenticate"), method="REGISTER", uri=RURI
    )
    request = register(call_id="a@phone", cseq=2, authorization=authorization)
    (response,) = responses(receive(c, bytes(request).decode(), CALLER, 0.5))
    assert response.status == status


def test_in_relay_mode_every_register_counts_even_with_a_nonce_of_ours() -> None:
    # The nonces a relayed phone answers are the inside registrar's: the SBC cannot
    # tell an answer, so none goes into debt, not even one carrying a nonce of the
    # embedded registrar's.
    registrar = make_registrar()
    c = controller(
        registrar=EmbeddedRegistrar(registrar, wall=lambda: 1_700_000_000.0),
        policies={"outside": RealmPolicy(registers_per_second=1)},
    )
    c.register_relays["outside"] = RegisterRelayPort(relay())
    first = register(call_id="a@phone", cseq=1)
    step = receive(c, bytes(first).decode(), CALLER, 0.0)
    assert responses(step) == [] and len(requests(step, "REGISTER")) == 1  # sent upstream
    nonce = registrar.digest.make_nonce(1_700_000_000.0)
    authorization = (
        f'Digest username="alice", realm="sbc", nonce="{nonce}", uri="{RURI}", response="0"'
    )
    second = register(call_id="a@phone", cseq=2, authorization=authorization)
    (response,) = responses(receive(c, bytes(second).decode(), CALLER, 0.0))
    assert response.status == 503


def test_without_a_rate_every_register_reaches_the_registrar() -> None:
    answers = storm(30, RealmPolicy(registrar=True))
    assert {status for status, _ in answers} == {401}


# -- configuration -----------------------------------------------------------------------------

REALM = """\
realms:
  - name: phones
    listen: [{transport: udp, address: 127.0.0.1, port: 5090}]
    media_address: 127.0.0.1
    registrar: true
"""


def test_registers_per_second_is_a_realm_setting() -> None:
    assert realm_policies(load(REALM))["phones"].registers_per_second is None
    config = load(REALM + "    registers_per_second: 25\n")
    assert realm_policies(config)["phones"].registers_per_second == 25


@pytest.mark.parametrize("value", ["0", "-1", "100001"])
def test_a_bad_rate_is_refused_with_its_line(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(REALM + f"    registers_per_second: {value}\n")
    assert "sbc.yaml:6: realms[0].registers_per_second" in str(info.value)
