"""The SBC's registrations at its trunks' carriers (``trunks[].register``,
`sbc.b2bua.trunk_register`): the REGISTER, its digest (answered with the trunk's
credentials and checked by a digest server playing the carrier), the refresh
before the granted binding runs out, 423, the back-off after failures and the
removal when the SBC stops."""

from __future__ import annotations

import random

from sbc.b2bua.controller import CallController
from sbc.b2bua.trunk_auth import TrunkAuth, TrunkCredentials
from sbc.b2bua.trunk_register import (
    NO_GATEWAY_RETRY,
    RETRY_BASE,
    RETRY_MAX,
    RegistrationState,
    TrunkRegistration,
    TrunkRegistrations,
)
from sbc.sip.auth import UserSecret
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.transport.base import ListenAddress, Transport
from tests.unit.test_b2bua_flows import (
    GW,
    PSTN,
    answer,
    controller,
    hop_of,
    receive,
    requests,
    trunk_plan,
    until_timers,
)
from tests.unit.test_b2bua_trunk_auth import CARRIER, HERE, PASSWORD, challenge

ACCOUNT = TrunkRegistration("pstn", "acct-1", "carrier.example", expires=600)
LOCAL = ListenAddress(Transport.UDP, "203.0.113.1", 5060)


def ok(request: Request, extra: str = "") -> Response:
    message = parse_message(answer(request, 200, extra=extra).encode())
    assert isinstance(message, Response)
    return message


def test_the_register_names_the_account_at_the_carrier_and_the_sbc_as_contact() -> None:
    registrations = TrunkRegistrations([ACCOUNT])
    assert registrations.due(0.0) == ["pstn"]
    first = registrations.request("pstn", LOCAL, user_agent="sbc")
    assert first.raw_uri == "sip:carrier.example"
    assert str(first.headers.get("From")).startswith("<sip:acct-1@carrier.example>;tag=")
    assert first.headers.get("To") == "<sip:acct-1@carrier.example>"
    assert first.headers.get("Contact") == "<sip:acct-1@203.0.113.1:5060>"
    assert first.headers.get("Expires") == "600"
    assert registrations.due(0.0) == []  # one out at a time
    # Granted 300 s in its Contact: the refresh goes a minute early, on the same
    # Call-ID with the next CSeq (RFC 3261 10.2.4).
    registrations.result(
        "pstn", ok(first, "Contact: <sip:acct-1@203.0.113.1:5060>;expires=300\r\n"), 10.0
    )
    assert registrations.next_due() == 250.0
    assert registrations.status(10.0)["pstn"]["state"] == "registered"
    second = registrations.request("pstn", LOCAL, user_agent="sbc")
    assert second.call_id == first.call_id and second.cseq.seq == first.cseq.seq + 1
    # A short binding (Expires header only): refreshed half-way.
    registrations.result("pstn", ok(second, "Expires: 80\r\n"), 300.0)
    assert registrations.next_due() == 340.0


def test_423_asks_again_at_once_for_the_min_expires() -> None:
    registrations = TrunkRegistrations([ACCOUNT])
    first = registrations.request("pstn", LOCAL, user_agent="sbc")
    brief = parse_message(answer(first, 423, extra="Min-Expires: 1800\r\n").encode())
    assert isinstance(brief, Response)
    registrations.result("pstn", brief, 5.0)
    assert registrations.due(5.0) == ["pstn"]
    assert registrations.request("pstn", LOCAL, user_agent="sbc").headers.get("Expires") == "1800"


def test_failures_back_off_doubling_up_to_the_maximum_or_as_retry_after_says() -> None:
    registrations = TrunkRegistrations([ACCOUNT], rng=random.Random(7))
    waits = []
    now = 0.0
    for _ in range(10):
        registrations.request("pstn", LOCAL, user_agent="sbc")
        registrations.result("pstn", None, now)  # no answer
        due = registrations.next_due()
        assert due is not None
        waits.append(due - now)
        now = due
    for n, wait in enumerate(waits):
        ceiling = min(RETRY_MAX, RETRY_BASE * 2**n)
        assert ceiling / 2 <= wait <= ceiling, (n, wait)
    assert registrations.status(now)["pstn"]["state"] == "failed"
    request = registrations.request("pstn", LOCAL, user_agent="sbc")
    busy = parse_message(answer(request, 503, extra="Retry-After: 42\r\n").encode())
    assert isinstance(busy, Response)
    registrations.result("pstn", busy, now)
    assert registrations.next_due() == now + 42


def registering_controller() -> CallController:
    c = controller(rules=PSTN, targets=trunk_plan())
    c.trunk_auth = TrunkAuth({"pstn": TrunkCredentials("acct-1", PASSWORD)})
    c.trunk_registrations = TrunkRegistrations([ACCOUNT])
    return c


def test_the_controller_registers_answers_the_challenge_refreshes_and_removes() -> None:
    c = registering_controller()
    assert c.next_deadline() == 0.0
    step = c.handle_timers(0.0)
    (register,) = requests(step, "REGISTER")
    assert hop_of(step, "REGISTER") == GW[0]
    step = receive(c, answer(register, 401, extra=challenge(401)), HERE, 0.1)
    (again,) = requests(step, "REGISTER")
    assert again.call_id == register.call_id and again.cseq.seq == register.cseq.seq + 1
    (credentials,) = again.headers.fields("Authorization")
    verdict = CARRIER.verify(credentials, method="REGISTER", request_uri=again.raw_uri,
                             secret=UserSecret.from_password(PASSWORD), now=1.0)  # fmt: skip
    assert verdict.ok and verdict.username == "acct-1"
    receive(c, answer(again, 200, extra="Expires: 600\r\n"), HERE, 0.2)
    status = c.trunk_registrations.status(0.2)["pstn"]
    assert (status["state"], status["expires_in"]) == ("registered", 600)
    assert c.next_deadline() == 0.2 + 540
    # The refresh: the same registration, the next CSeq.
    (refresh,) = requests(c.handle_timers(540.2), "REGISTER")
    assert refresh.call_id == register.call_id and refresh.cseq.seq == again.cseq.seq + 1
    receive(c, answer(refresh, 200, extra="Expires: 600\r\n"), HERE, 540.3)
    # The SBC stops: the binding is removed.
    (removal,) = requests(c.shutdown(600.0), "REGISTER")
    assert removal.headers.get("Expires") == "0" and removal.call_id == register.call_id
    receive(c, answer(removal, 200), HERE, 600.1)
    assert c.trunk_registrations.status(600.1)["pstn"]["state"] == "unregistered"
    assert c.trunk_registrations.next_due() is None  # not registered again


def test_an_unanswered_register_is_tried_again_later() -> None:
    c = registering_controller()
    (register,) = requests(c.handle_timers(0.0), "REGISTER")

    def state(step: object) -> bool:
        return c.trunk_registrations.status(0.0)["pstn"]["state"] == "failed"

    now, _ = until_timers(c, state)  # Timer F: 64 * T1, a 408 of its own
    assert now >= 64 * c.transactions.config.t1
    due = c.next_deadline()
    assert due is not None and now + RETRY_BASE / 2 <= due <= now + RETRY_BASE
    (again,) = requests(c.handle_timers(due), "REGISTER")
    assert again.call_id == register.call_id
    assert c.trunk_registrations.status(due)["pstn"]["state"] == RegistrationState.REGISTERING


def test_a_changed_account_registers_anew_and_the_old_answer_is_ignored() -> None:
    registrations = TrunkRegistrations([ACCOUNT])
    old = registrations.request("pstn", LOCAL, user_agent="sbc")
    registrations.reconfigure([ACCOUNT])  # unchanged: the REGISTER out stays the one
    assert registrations.due(1.0) == []
    changed = TrunkRegistration("pstn", "acct-2", "carrier.example")
    registrations.reconfigure([changed])
    assert registrations.due(1.0) == ["pstn"]
    registrations.result("pstn", ok(old, "Expires: 600\r\n"), 1.0)
    assert registrations.status(1.0)["pstn"]["state"] == "unregistered"
    new = registrations.request("pstn", LOCAL, user_agent="sbc")
    assert new.call_id != old.call_id and "acct-2" in str(new.headers.get("From"))
    registrations.reconfigure([])
    assert "pstn" not in registrations and registrations.next_due() is None


def test_no_gateway_to_register_with_is_tried_again_soon_without_back_off() -> None:
    c = controller(rules=PSTN)  # no trunk plan: its gateways are not known yet
    c.trunk_registrations = TrunkRegistrations([ACCOUNT])
    for now in (0.0, 5.0, 10.0):
        assert requests(c.handle_timers(now)) == []
        assert c.trunk_registrations.next_due() == now + NO_GATEWAY_RETRY
    status = c.trunk_registrations.status(10.0)["pstn"]
    assert (status["state"], status["failures"]) == ("unregistered", 0)


def test_a_2xx_that_binds_nothing_is_a_failure_tried_again_later() -> None:
    registrations = TrunkRegistrations([ACCOUNT], rng=random.Random(3))
    first = registrations.request("pstn", LOCAL, user_agent="sbc")
    registrations.result("pstn", ok(first, "Expires: 0\r\n"), 0.0)
    status = registrations.status(0.0)["pstn"]
    assert (status["state"], status["failures"]) == ("failed", 1)
    due = registrations.next_due()
    assert due is not None and RETRY_BASE / 2 <= due <= RETRY_BASE
    # Over TCP the Contact says so.
    tcp = ListenAddress(Transport.TCP, "203.0.113.1", 5060)
    again = registrations.request("pstn", tcp, user_agent="sbc")
    assert again.headers.get("Contact") == "<sip:acct-1@203.0.113.1:5060;transport=tcp>"


def test_a_registrar_s_odd_digits_are_no_expiry_and_raise_nothing() -> None:
    # "²" is a digit to str.isdigit but not to int(): the expiry was int("²").
    registrations = TrunkRegistrations([ACCOUNT])
    first = registrations.request("pstn", LOCAL, user_agent="sbc")
    registrations.result("pstn", ok(first, "Expires: \u00b2\r\n"), 0.0)
    assert registrations.status(0.0)["pstn"]["expires_in"] == 600  # what was asked
