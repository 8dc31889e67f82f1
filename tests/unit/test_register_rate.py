"""REGISTERs above a realm's ``registers_per_second`` get 503 with a spread-out
Retry-After (a registration storm), the others reach the registrar; the bucket, the
controller's use of it, the configuration and what /healthz shows."""

from __future__ import annotations

import logging
import random

import pytest

from sbc.assembly import EmbeddedRegistrar, realm_policies
from sbc.b2bua.controller import RealmPolicy
from sbc.b2bua.register_rate import RETRY_AFTER, RegisterRate
from sbc.config.loader import ConfigError
from tests.unit.test_b2bua_flows import CALLER, controller, receive, responses
from tests.unit.test_registrar import make_registrar, register
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
