"""OPTIONS keepalives tell the registrar which UDP phones are gone.

With ``registrar.keepalive: options`` each NAT keepalive is an OPTIONS; a flow that
answers none of ``keepalive_failures`` in a row loses its bindings, so calls stop
ringing a phone that is unplugged (its Contact would otherwise stay until its
registration runs out, up to an hour, and every call to that user would wait on
it). CRLF keepalives tell nothing back and remove nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sbc.app import keepalive_options
from sbc.assembly import registrar as build_registrar
from sbc.config.loader import ConfigError, load_config_text
from sbc.registrar.credentials import StaticCredentials
from sbc.registrar.registrar import KEEPALIVE_CALL_ID_PREFIX, Registrar
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from sbc.transport.base import Flow, Transport
from tests.unit.test_registrar import LISTEN, T0, Phone, make_registrar

OTHER_FLOW = Flow(Transport.UDP, "203.0.113.1", 5060, "198.51.100.21", 40002)


def options_registrar(failures: int = 3) -> Registrar:
    return make_registrar(
        keepalive_interval=20.0, keepalive_options=True, keepalive_failures=failures
    )


def ping_round(registrar: Registrar, now: float, answer: set[str]) -> list[str]:
    """One keepalive round at ``now``: ping every target, the users in ``answer``
    answer theirs. Returns the users pinged."""
    pinged = []
    for binding in registrar.keepalive_targets(now):
        call_id = registrar.keepalive_ping(binding)
        assert call_id.startswith(KEEPALIVE_CALL_ID_PREFIX)
        pinged.append(binding.aor)
        if binding.aor in answer:
            assert registrar.keepalive_answered(call_id)
    return sorted(pinged)


def test_a_phone_that_answers_no_pings_loses_its_bindings() -> None:
    registrar = options_registrar(failures=3)
    Phone(registrar).send(T0, contacts=("<sip:alice@192.0.2.10>", "<sip:alice@192.0.2.11>"))
    Phone(registrar, user="bob", flow=OTHER_FLOW).send(T0, contacts=("<sip:bob@192.0.2.20>",))
    for n in (1, 2, 3):
        assert ping_round(registrar, T0 + 20 * n, answer={"bob"}) == ["alice", "bob"]
    assert len(registrar.location.lookup("alice", T0 + 61)) == 2
    # The fourth round finds three unanswered: both of alice's bindings go, bob stays.
    assert ping_round(registrar, T0 + 80, answer={"bob"}) == ["bob"]
    assert registrar.location.lookup("alice", T0 + 81) == []
    assert [b.contact for b in registrar.location.lookup("bob", T0 + 81)] == ["sip:bob@192.0.2.20"]


def test_an_answer_or_a_register_starts_the_count_again() -> None:
    registrar = options_registrar(failures=2)
    Phone(registrar).send(T0)
    ping_round(registrar, T0 + 20, answer=set())
    ping_round(registrar, T0 + 40, answer={"alice"})  # answered: count back to 0
    ping_round(registrar, T0 + 60, answer=set())
    Phone(registrar).send(T0 + 61, cseq=2)  # a refresh is an answer too
    ping_round(registrar, T0 + 81, answer=set())
    assert ping_round(registrar, T0 + 101, answer=set()) == ["alice"]
    assert len(registrar.location.lookup("alice", T0 + 102)) == 1
    assert ping_round(registrar, T0 + 121, answer=set()) == []
    assert registrar.location.lookup("alice", T0 + 122) == []


def test_only_the_last_ping_of_a_flow_counts_as_answered() -> None:
    registrar = options_registrar()
    Phone(registrar).send(T0)
    (binding,) = registrar.keepalive_targets(T0 + 20)
    old = registrar.keepalive_ping(binding)
    (binding,) = registrar.keepalive_targets(T0 + 40)
    registrar.keepalive_ping(binding)
    assert not registrar.keepalive_answered(old)  # replaced by the newer ping
    assert not registrar.keepalive_answered(f"{KEEPALIVE_CALL_ID_PREFIX}forged")
    assert not registrar.keepalive_answered("some-call@elsewhere")


def test_crlf_keepalives_remove_nothing() -> None:
    registrar = make_registrar(keepalive_interval=20.0)
    Phone(registrar).send(T0)
    for n in range(1, 10):
        assert len(registrar.keepalive_targets(T0 + 20 * n)) == 1
    assert len(registrar.location.lookup("alice", T0 + 200)) == 1


def test_the_options_keepalive_is_a_request_to_the_contact_from_the_listener() -> None:
    registrar = options_registrar()
    Phone(registrar).send(T0)
    (binding,) = registrar.keepalive_targets(T0 + 20)
    call_id = registrar.keepalive_ping(binding)
    request = parse_message(keepalive_options(binding, call_id, "sbc-test"))
    assert isinstance(request, Request) and request.method == "OPTIONS"
    assert request.raw_uri == binding.contact == "sip:alice@192.0.2.10:5062"
    assert request.call_id == call_id and request.cseq.method == "OPTIONS"
    assert request.via.host == LISTEN.host and request.via.port == LISTEN.port
    assert request.from_.tag and request.to.tag is None
    assert request.headers.get("User-Agent") == "sbc-test"


def test_the_config_chooses_the_keepalive() -> None:
    def policy(text: str) -> tuple[bool, int]:
        config = load_config_text(text, "sbc.yaml", Path("/nonexistent"))
        built = build_registrar(config, StaticCredentials({}), b"k" * 32)
        return built.policy.keepalive_options, built.policy.keepalive_failures

    assert policy("registrar: {nat_keepalive: 25}\n") == (False, 3)
    assert policy("registrar: {keepalive: options, keepalive_failures: 5}\n") == (True, 5)
    with pytest.raises(ConfigError) as info:
        load_config_text("registrar: {keepalive: sip-ping}\n", "sbc.yaml", Path("/nonexistent"))
    assert str(info.value).startswith("sbc.yaml:1: registrar.keepalive:")


def test_expired_bindings_are_swept_without_a_register() -> None:
    registrar = options_registrar()
    Phone(registrar).send(T0, expires="60")
    Phone(registrar, user="bob", flow=OTHER_FLOW).send(T0, expires="120")
    assert registrar.expire(T0 + 59) == []
    (gone,) = registrar.expire(T0 + 60)
    assert gone.aor == "alice" and len(registrar.location) == 1
    # Its keepalives stop with it.
    assert [b.aor for b in registrar.keepalive_targets(T0 + 100)] == ["bob"]
