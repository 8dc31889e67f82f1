"""The registrar, step by step through RFC 3261 10.3, with a fake clock.

Every REGISTER is built as bytes and parsed, credentials come from the real
DigestClient, and assertions look at the response a phone would get.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from sbc.registrar.credentials import (
    CredentialStoreError,
    SqliteCredentials,
    StaticCredentials,
)
from sbc.registrar.location import LocationService
from sbc.registrar.registrar import AuthFailure, RegisterResult, Registrar, RegistrarPolicy
from sbc.sip.auth import (
    AuthOutcome,
    AuthResult,
    DigestChallenge,
    DigestClient,
    DigestServer,
    DigestServerConfig,
    UserSecret,
)
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.transport.base import Destination, Flow, ListenAddress, Transport

T0 = 1_700_000_000.0
REALM = "sbc"
PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22"}
RURI = "sip:203.0.113.1"
LISTEN = ListenAddress(Transport.UDP, "203.0.113.1", 5060)
FLOW = Flow(Transport.UDP, "203.0.113.1", 5060, "198.51.100.20", 40000)
TCP_FLOW = Flow(Transport.TCP, "203.0.113.1", 5060, "198.51.100.30", 51000, connection_id=7)
INSTANCE = "<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"


def make_registrar(**policy: object) -> Registrar:
    settings = RegistrarPolicy(realm=REALM, **policy)  # type: ignore[arg-type]
    digest = DigestServer(DigestServerConfig(realm=REALM, key=b"k" * 32))
    return Registrar(settings, StaticCredentials(PASSWORDS), settings.new_location(), digest)


def register(
    *,
    user: str = "alice",
    contacts: tuple[str, ...] = ("<sip:alice@192.0.2.10:5062>",),
    expires: str | None = None,
    call_id: str = "call-1@phone",
    cseq: int = 1,
    ruri: str = RURI,
    authorization: str | None = None,
    extra: tuple[str, ...] = (),
) -> Request:
    lines = [
        f"REGISTER {ruri} SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK" + f"{cseq}x{len(contacts)}",
        "Max-Forwards: 70",
        f"From: <sip:{user}@example.com>;tag=ft1",
        f"To: <sip:{user}@example.com>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *(f"Contact: {c}" for c in contacts),
        *([f"Expires: {expires}"] if expires is not None else []),
        *([f"Authorization: {authorization}"] if authorization else []),
        "User-Agent: TestPhone/2.0",
        *extra,
        "Content-Length: 0",
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape"))
    assert isinstance(message, Request)
    return message


@dataclass
class Phone:
    """A UA that answers the registrar's challenges like a real phone does."""

    registrar: Registrar
    user: str = "alice"
    password: str | None = None
    flow: Flow = FLOW
    client: DigestClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = DigestClient(self.user, self.password or PASSWORDS[self.user])

    def send(self, now: float, **kw: object) -> RegisterResult:
        """REGISTER, and once more with credentials if challenged."""
        kw.setdefault("user", self.user)
        first = self.registrar.register(register(**kw), self.flow, "access", LISTEN, now)  # type: ignore[arg-type]
        if first.response.status != 401:
            return first
        authorization = self.client.respond(
            first.response.headers.fields("WWW-Authenticate"),
            method="REGISTER",
            uri=str(kw.get("ruri", RURI)),
        )
        request = register(authorization=authorization, **kw)  # type: ignore[arg-type]
        return self.registrar.register(request, self.flow, "access", LISTEN, now)


def contacts_of(response: Response) -> list[str]:
    return response.headers.values("Contact")


# --------------------------------------------------------------------------- step 3: auth


def test_challenge_then_credentials_then_200_with_the_binding() -> None:
    registrar = make_registrar()
    first = registrar.register(register(), FLOW, "access", LISTEN, T0)
    assert first.response.status == 401
    challenges = [
        DigestChallenge.parse(v) for v in first.response.headers.fields("WWW-Authenticate")
    ]
    assert [c.effective_algorithm.value for c in challenges] == ["SHA-256", "MD5"]
    assert all(c.realm == REALM and not c.stale for c in challenges)
    assert first.response.to.tag  # RFC 3261 8.2.6.2
    assert first.auth_failure is None and first.added == ()
    assert len(registrar.location) == 0

    client = DigestClient("alice", PASSWORDS["alice"])
    authorization = client.respond(
        first.response.headers.fields("WWW-Authenticate"), method="REGISTER", uri=RURI
    )
    result = registrar.register(
        register(authorization=authorization, cseq=2), FLOW, "access", LISTEN, T0
    )
    response = result.response
    assert response.status == 200
    assert contacts_of(response) == ["<sip:alice@192.0.2.10:5062>;expires=3600"]
    assert parsedate_to_datetime(response.headers.get("Date") or "").timestamp() == T0
    assert result.aor == "alice" and result.username == "alice"
    (binding,) = result.added
    assert binding.contact == "sip:alice@192.0.2.10:5062"
    assert binding.received == Destination(Transport.UDP, "198.51.100.20", 40000)
    assert (binding.local, binding.realm) == (LISTEN, "access")
    assert (binding.call_id, binding.cseq) == ("call-1@phone", 2)
    assert binding.expires_at == T0 + 3600 and binding.registered_at == T0
    assert binding.user_agent == "TestPhone/2.0" and binding.connection_id is None
    assert registrar.location.lookup("alice", T0) == [binding]


def test_a_wrong_password_is_challenged_again_and_reported() -> None:
    registrar = make_registrar()
    result = Phone(registrar, password="not-the-password").send(T0)
    assert result.response.status == 401  # RFC 3261 22.4: challenge again, not 403
    assert result.auth_failure == AuthFailure("alice", AuthOutcome.BAD_RESPONSE)
    assert len(registrar.location) == 0


def test_an_unknown_user_looks_like_a_wrong_password() -> None:
    registrar = make_registrar()
    result = Phone(registrar, user="mallory", password="whatever-it-is").send(T0)
    assert result.response.status == 401
    assert result.response.headers.fields("WWW-Authenticate")
    assert result.auth_failure == AuthFailure("mallory", AuthOutcome.UNKNOWN_USER)


def test_a_stale_nonce_gets_stale_true_and_is_no_failure() -> None:
    registrar = make_registrar()
    first = registrar.register(register(), FLOW, "access", LISTEN, T0)
    authorization = DigestClient("alice", PASSWORDS["alice"]).respond(
        first.response.headers.fields("WWW-Authenticate"), method="REGISTER", uri=RURI
    )
    late = T0 + 301  # the nonce lifetime is 300 s
    result = registrar.register(register(authorization=authorization), FLOW, "access", LISTEN, late)
    assert result.response.status == 401
    challenges = [
        DigestChallenge.parse(v) for v in result.response.headers.fields("WWW-Authenticate")
    ]
    assert all(c.stale for c in challenges)
    assert result.auth_failure is None


def test_credentials_from_before_a_restart_get_stale_true_and_are_no_failure() -> None:
    before = make_registrar()  # the same users; each start draws its own nonce key
    first = before.register(register(), FLOW, "access", LISTEN, T0)
    authorization = DigestClient("alice", PASSWORDS["alice"]).respond(
        first.response.headers.fields("WWW-Authenticate"), method="REGISTER", uri=RURI
    )
    policy = RegistrarPolicy(realm=REALM)
    digest = DigestServer(DigestServerConfig(realm=REALM, key=b"n" * 32))
    after = Registrar(policy, StaticCredentials(PASSWORDS), policy.new_location(), digest)
    result = after.register(register(authorization=authorization), FLOW, "access", LISTEN, T0)
    assert result.response.status == 401
    challenges = [
        DigestChallenge.parse(v) for v in result.response.headers.fields("WWW-Authenticate")
    ]
    assert challenges and all(c.stale for c in challenges)
    assert result.auth_failure is None


def test_malformed_credentials_are_a_400() -> None:
    registrar = make_registrar()
    request = register(authorization='Digest username="alice", realm="sbc"')
    result = registrar.register(request, FLOW, "access", LISTEN, T0)
    assert result.response.status == 400
    assert result.auth_failure is None


def test_credentials_of_another_scheme_do_not_hide_ours() -> None:
    # RFC 3261 22.3: credentials for other realms are not ours to judge. An IMS phone
    # also sends an AKA Authorization the digest parser cannot read; it got 400 even
    # when valid credentials for our realm followed.
    registrar = make_registrar()
    first = registrar.register(register(), FLOW, "access", LISTEN, T0)
    ours = DigestClient("alice", PASSWORDS["alice"]).respond(
        first.response.headers.fields("WWW-Authenticate"), method="REGISTER", uri=RURI
    )
    aka = (
        'Authorization: Digest username="alice@ims.example", realm="ims.example", '
        'nonce="bm9uY2U=", uri="sip:ims.example", response="", algorithm=AKAv1-MD5'
    )
    request = register(cseq=2, extra=(aka, f"Authorization: {ours}"))
    result = registrar.register(request, FLOW, "access", LISTEN, T0)
    assert result.response.status == 200


def test_credentials_for_another_realm_get_a_challenge() -> None:
    registrar = make_registrar()
    other = DigestServer(DigestServerConfig(realm="elsewhere", key=b"z" * 32))
    authorization = DigestClient("alice", PASSWORDS["alice"]).respond(
        other.challenge_values(T0), method="REGISTER", uri=RURI
    )
    result = registrar.register(register(authorization=authorization), FLOW, "access", LISTEN, T0)
    assert result.response.status == 401
    assert result.auth_failure is None


def test_a_broken_credential_store_is_a_500() -> None:
    class Broken:
        def lookup(self, username: str, realm: str) -> UserSecret | None:
            raise CredentialStoreError("disk on fire")

    policy = RegistrarPolicy(realm=REALM)
    digest = DigestServer(DigestServerConfig(realm=REALM, key=b"k" * 32))
    registrar = Registrar(policy, Broken(), policy.new_location(), digest)
    assert Phone(registrar).send(T0).response.status == 500


def test_a_username_that_is_not_utf8_is_an_unknown_user_not_a_crash(tmp_path: Path) -> None:
    policy = RegistrarPolicy(realm=REALM)
    digest = DigestServer(DigestServerConfig(realm=REALM, key=b"k" * 32))
    with SqliteCredentials(tmp_path / "users.sqlite", REALM) as store:
        registrar = Registrar(policy, store, policy.new_location(), digest)
        first = registrar.register(register(), FLOW, "access", LISTEN, T0)
        # Byte 0xff in the username: the parser keeps it as a lone surrogate.
        authorization = DigestClient("\udcffalice", "whatever-it-is").respond(
            first.response.headers.fields("WWW-Authenticate"), method="REGISTER", uri=RURI
        )
        request = register(authorization=authorization, cseq=2)
        result = registrar.register(request, FLOW, "access", LISTEN, T0)
    assert result.response.status == 401
    assert result.auth_failure == AuthFailure("\udcffalice", AuthOutcome.UNKNOWN_USER)


# --------------------------------------------------------------------------- step 4: authorization


def test_the_authenticated_user_must_be_the_to_user() -> None:
    registrar = make_registrar()
    bob = DigestClient("bob", PASSWORDS["bob"])
    first = registrar.register(register(user="alice"), FLOW, "access", LISTEN, T0)
    authorization = bob.respond(
        first.response.headers.fields("WWW-Authenticate"), method="REGISTER", uri=RURI
    )
    result = registrar.register(
        register(user="alice", authorization=authorization), FLOW, "access", LISTEN, T0
    )
    assert result.response.status == 403
    assert result.username == "bob" and result.auth_failure is None
    assert len(registrar.location) == 0


def test_without_auth_anyone_registers() -> None:
    registrar = make_registrar(auth_required=False)
    result = registrar.register(register(user="carol"), FLOW, "access", LISTEN, T0)
    assert result.response.status == 200
    assert result.username is None and result.aor == "carol"


# --------------------------------------------------------------------------- steps 1, 2, 5


def test_domains_restrict_the_request_uri_and_the_aor() -> None:
    registrar = make_registrar(domains=("example.com",))
    phone = Phone(registrar)
    # The SBC's own address is always fine in the Request-URI.
    assert phone.send(T0).response.status == 200
    assert registrar.location.aors() == ["alice@example.com"]
    assert phone.send(T0, ruri="sip:EXAMPLE.com", cseq=2).response.status == 200
    refused = registrar.register(register(ruri="sip:example.org"), FLOW, "access", LISTEN, T0)
    assert (refused.response.status, refused.response.reason) == (
        404,
        "Not Found: domain not served",
    )


def test_an_aor_in_a_domain_not_served_is_404() -> None:
    registrar = make_registrar(domains=("example.org",), auth_required=False)
    result = registrar.register(register(), FLOW, "access", LISTEN, T0)
    assert result.response.status == 404


def test_without_domains_any_domain_maps_to_the_user() -> None:
    registrar = make_registrar()
    Phone(registrar).send(T0, ruri="sip:localhost")
    assert registrar.location.lookup("alice@127.0.0.1", T0)[0].contact == (
        "sip:alice@192.0.2.10:5062"
    )


def test_unsupported_require_is_420() -> None:
    registrar = make_registrar()
    result = registrar.register(register(extra=("Require: path, foo",)), FLOW, "access", LISTEN, T0)
    assert result.response.status == 420
    assert result.response.headers.get("Unsupported") == "foo"


def test_a_to_without_user_is_400() -> None:
    registrar = make_registrar(auth_required=False)
    request = register()
    request.headers.set("To", "<sip:example.com>")
    request.invalidate()
    assert registrar.register(request, FLOW, "access", LISTEN, T0).response.status == 400


# --------------------------------------------------------------------------- step 6: wildcard


def test_wildcard_with_expires_0_removes_everything() -> None:
    registrar = make_registrar()
    phone = Phone(registrar)
    phone.send(T0, contacts=("<sip:alice@192.0.2.10>", "<sip:alice@192.0.2.11>"))
    result = phone.send(T0 + 5, contacts=("*",), expires="0", call_id="other", cseq=1)
    assert result.response.status == 200
    assert contacts_of(result.response) == []
    assert sorted(b.contact for b in result.removed) == [
        "sip:alice@192.0.2.10",
        "sip:alice@192.0.2.11",
    ]
    assert len(registrar.location) == 0


@pytest.mark.parametrize(
    ("contacts", "expires"),
    [
        (("*",), "3600"),
        (("*",), None),
        (("*", "<sip:alice@192.0.2.10>"), "0"),
    ],
)
def test_wildcard_rules_are_400(contacts: tuple[str, ...], expires: str | None) -> None:
    registrar = make_registrar()
    result = Phone(registrar).send(T0, contacts=contacts, expires=expires)
    assert result.response.status == 400


def test_wildcard_with_the_same_call_id_needs_a_higher_cseq() -> None:
    registrar = make_registrar(auth_required=False)
    registrar.register(register(cseq=5), FLOW, "access", LISTEN, T0)
    stale = register(contacts=("*",), expires="0", cseq=5)
    assert registrar.register(stale, FLOW, "access", LISTEN, T0).response.status == 400
    assert len(registrar.location) == 1
    newer = register(contacts=("*",), expires="0", cseq=6)
    assert registrar.register(newer, FLOW, "access", LISTEN, T0).response.status == 200
    assert len(registrar.location) == 0


# --------------------------------------------------------------------------- step 7: intervals


def test_too_brief_is_423_with_min_expires() -> None:
    registrar = make_registrar()
    result = Phone(registrar).send(T0, contacts=("<sip:alice@192.0.2.10>;expires=30",))
    assert result.response.status == 423
    assert result.response.headers.get("Min-Expires") == "60"
    assert len(registrar.location) == 0


def test_the_contact_param_wins_over_expires_header_and_long_ones_are_cut() -> None:
    registrar = make_registrar(max_expires=1800, default_expires=900)
    phone = Phone(registrar)
    result = phone.send(
        T0,
        contacts=("<sip:alice@192.0.2.10>;expires=120", "<sip:alice@192.0.2.11>"),
        expires="7200",
    )
    # Same q, same registration time: listed in the order registered.
    assert contacts_of(result.response) == [
        "<sip:alice@192.0.2.10>;expires=120",
        "<sip:alice@192.0.2.11>;expires=1800",
    ]
    default = phone.send(T0, contacts=("<sip:alice@192.0.2.12>",), cseq=2)
    assert "<sip:alice@192.0.2.12>;expires=900" in contacts_of(default.response)


def test_malformed_intervals_count_as_an_hour() -> None:
    registrar = make_registrar(max_expires=7200)
    result = Phone(registrar).send(T0, contacts=("<sip:alice@192.0.2.10>;expires=soon",))
    assert contacts_of(result.response) == ["<sip:alice@192.0.2.10>;expires=3600"]


def test_bindings_expire_and_the_200_counts_down() -> None:
    registrar = make_registrar()
    phone = Phone(registrar)
    phone.send(T0, contacts=("<sip:alice@192.0.2.10>;expires=600",))
    query = phone.send(T0 + 100.5, contacts=(), cseq=2)
    assert contacts_of(query.response) == ["<sip:alice@192.0.2.10>;expires=500"]
    assert registrar.location.lookup("alice", T0 + 599.9)
    assert registrar.location.lookup("alice", T0 + 600) == []
    assert [b.contact for b in registrar.location.expire(T0 + 600)] == ["sip:alice@192.0.2.10"]
    assert len(registrar.location) == 0


def test_bad_q_is_400_and_q_orders_lookups() -> None:
    registrar = make_registrar()
    phone = Phone(registrar)
    assert phone.send(T0, contacts=("<sip:alice@192.0.2.10>;q=1.5",)).response.status == 400
    result = phone.send(
        T0,
        contacts=(
            "<sip:alice@192.0.2.10>;q=0.2",
            "<sip:alice@192.0.2.11>;q=0.9",
            "<sip:alice@192.0.2.12>;q=0.5",
        ),
        cseq=2,
    )
    assert result.response.status == 200
    assert "<sip:alice@192.0.2.11>;q=0.9;expires=3600" in contacts_of(result.response)
    order = [b.contact for b in registrar.location.lookup("alice", T0)]
    assert order == ["sip:alice@192.0.2.11", "sip:alice@192.0.2.12", "sip:alice@192.0.2.10"]


def test_huge_intervals_are_the_longest_not_a_crash() -> None:
    # RFC 3261 20.19: delta-seconds past 2**32-1 count as 2**32-1; int() refuses
    # strings of more than 4,300 digits, and a header line may hold 8,192.
    registrar = make_registrar(auth_required=False)
    digits = "9" * 5000
    result = registrar.register(register(expires=digits), FLOW, "access", LISTEN, T0)
    assert result.response.status == 200
    assert contacts_of(result.response) == ["<sip:alice@192.0.2.10:5062>;expires=3600"]
    param = register(contacts=(f"<sip:alice@192.0.2.10>;expires=0{digits}",), cseq=2)
    result = registrar.register(param, FLOW, "access", LISTEN, T0)
    assert result.response.status == 200
    assert "<sip:alice@192.0.2.10>;expires=3600" in contacts_of(result.response)
    zeros = register(contacts=("<sip:alice@192.0.2.10>;expires=" + "0" * 5000,), cseq=3)
    result = registrar.register(zeros, FLOW, "access", LISTEN, T0)
    assert [b.contact for b in result.removed] == ["sip:alice@192.0.2.10"]
    wildcard = register(contacts=("*",), expires="0" * 5000, cseq=4)
    assert registrar.register(wildcard, FLOW, "access", LISTEN, T0).response.status == 200
    assert len(registrar.location) == 0


def test_a_huge_reg_id_is_400_not_a_crash() -> None:
    registrar = make_registrar(auth_required=False)
    contact = f'<sip:alice@192.0.2.10>;+sip.instance="{INSTANCE}";reg-id=' + "1" * 5000
    result = registrar.register(register(contacts=(contact,)), FLOW, "access", LISTEN, T0)
    assert result.response.status == 400
    too_big = f'<sip:alice@192.0.2.10>;+sip.instance="{INSTANCE}";reg-id=2147483648'
    result = registrar.register(register(contacts=(too_big,)), FLOW, "access", LISTEN, T0)
    assert result.response.status == 400
    leading_zeros = f'<sip:alice@192.0.2.10>;+sip.instance="{INSTANCE}";reg-id=' + "0" * 20 + "7"
    result = registrar.register(register(contacts=(leading_zeros,)), FLOW, "access", LISTEN, T0)
    assert result.response.status == 200
    assert result.added[0].reg_id == 7


# --------------------------------------------------------------------------- step 7: ordering


def test_same_call_id_needs_a_higher_cseq() -> None:
    registrar = make_registrar(auth_required=False)
    ok = registrar.register(register(cseq=10), FLOW, "access", LISTEN, T0)
    assert ok.response.status == 200
    for cseq in (10, 9):  # a replay or a late copy in a new transaction
        late = registrar.register(register(cseq=cseq, expires="0"), FLOW, "access", LISTEN, T0)
        assert late.response.status == 400
        assert late.response.reason == "Bad Request: Invalid CSeq number"
        assert late.added == late.removed == ()
    assert registrar.location.lookup("alice", T0)[0].cseq == 10
    newer = registrar.register(register(cseq=11, expires="120"), FLOW, "access", LISTEN, T0)
    assert newer.response.status == 200
    assert registrar.location.lookup("alice", T0)[0].expires_at == T0 + 120
    # Another Call-ID (the phone rebooted) may start from any CSeq.
    reboot = register(call_id="call-2@phone", cseq=1, expires="60")
    assert registrar.register(reboot, FLOW, "access", LISTEN, T0).response.status == 200


def test_an_out_of_order_contact_fails_the_whole_request() -> None:
    registrar = make_registrar(auth_required=False)
    registrar.register(register(cseq=3), FLOW, "access", LISTEN, T0)
    both = register(cseq=2, contacts=("<sip:alice@192.0.2.99>", "<sip:alice@192.0.2.10:5062>"))
    assert registrar.register(both, FLOW, "access", LISTEN, T0).response.status == 400
    assert [b.contact for b in registrar.location.lookup("alice", T0)] == [
        "sip:alice@192.0.2.10:5062"
    ]


def test_a_long_call_id_still_needs_a_higher_cseq() -> None:
    # Bindings keep the first 256 characters of the Call-ID; the ordering check of
    # RFC 3261 10.3 step 7 must still see the same Call-ID.
    registrar = make_registrar(auth_required=False)
    call_id = "c" * 300 + "@phone"
    first = registrar.register(register(call_id=call_id, cseq=10), FLOW, "access", LISTEN, T0)
    assert first.response.status == 200
    late = register(call_id=call_id, cseq=9, expires="0")
    assert registrar.register(late, FLOW, "access", LISTEN, T0).response.status == 400
    wildcard = register(call_id=call_id, cseq=10, contacts=("*",), expires="0")
    assert registrar.register(wildcard, FLOW, "access", LISTEN, T0).response.status == 400
    assert len(registrar.location) == 1
    newer = register(call_id=call_id, cseq=11, expires="0")
    assert registrar.register(newer, FLOW, "access", LISTEN, T0).response.status == 200
    assert len(registrar.location) == 0


def test_a_refresh_updates_the_source_and_keeps_registered_at() -> None:
    registrar = make_registrar(auth_required=False)
    registrar.register(register(cseq=1), FLOW, "access", LISTEN, T0)
    moved = Flow(Transport.UDP, "203.0.113.1", 5060, "198.51.100.21", 41000)
    result = registrar.register(register(cseq=2), moved, "access", LISTEN, T0 + 60)
    (binding,) = result.added
    assert result.removed == ()
    assert binding.received == Destination(Transport.UDP, "198.51.100.21", 41000)
    assert binding.registered_at == T0 and binding.expires_at == T0 + 60 + 3600


# --------------------------------------------------------------------------- query, removal


def test_a_register_without_contact_is_a_query() -> None:
    registrar = make_registrar()
    phone = Phone(registrar)
    phone.send(T0, contacts=("<sip:alice@192.0.2.10>", "<sip:alice@192.0.2.11>"))
    query = phone.send(T0 + 10, contacts=(), cseq=2)
    assert query.response.status == 200
    assert sorted(contacts_of(query.response)) == [
        "<sip:alice@192.0.2.10>;expires=3590",
        "<sip:alice@192.0.2.11>;expires=3590",
    ]
    assert query.added == query.removed == ()


def test_expires_0_removes_one_binding() -> None:
    registrar = make_registrar()
    phone = Phone(registrar)
    phone.send(T0, contacts=("<sip:alice@192.0.2.10>", "<sip:alice@192.0.2.11>"))
    result = phone.send(T0, contacts=("<sip:alice@192.0.2.10>;expires=0",), cseq=2)
    assert contacts_of(result.response) == ["<sip:alice@192.0.2.11>;expires=3600"]
    assert [b.contact for b in result.removed] == ["sip:alice@192.0.2.10"]
    assert result.added == ()


def test_contact_uris_match_by_rfc3261_rules() -> None:
    registrar = make_registrar(auth_required=False)
    registrar.register(
        register(contacts=("<sip:alice@192.0.2.10;transport=UDP>",)), FLOW, "access", LISTEN, T0
    )
    # Same URI, other spelling: the removal finds it.
    removal = register(contacts=("<sip:%61lice@192.0.2.10;transport=udp>;expires=0",), cseq=2)
    result = registrar.register(removal, FLOW, "access", LISTEN, T0)
    assert len(result.removed) == 1 and len(registrar.location) == 0


# --------------------------------------------------------------------------- caps


def test_contacts_beyond_max_contacts_are_503_as_in_kamailio() -> None:
    registrar = make_registrar(max_contacts=2)
    phone = Phone(registrar)
    phone.send(T0, contacts=("<sip:alice@192.0.2.10>", "<sip:alice@192.0.2.11>"))
    third = phone.send(T0, contacts=("<sip:alice@192.0.2.12>",), cseq=2)
    assert (third.response.status, third.response.reason) == (503, "Too Many Registered Contacts")
    assert len(registrar.location) == 2
    refresh = phone.send(T0, contacts=("<sip:alice@192.0.2.11>",), cseq=3)
    assert refresh.response.status == 200
    swap = phone.send(
        T0, contacts=("<sip:alice@192.0.2.10>;expires=0", "<sip:alice@192.0.2.12>"), cseq=4
    )
    assert swap.response.status == 200
    assert sorted(b.contact for b in registrar.location) == [
        "sip:alice@192.0.2.11",
        "sip:alice@192.0.2.12",
    ]


def test_new_users_beyond_max_aors_are_503() -> None:
    registrar = make_registrar(max_aors=1)
    assert Phone(registrar).send(T0).response.status == 200
    bob = Phone(registrar, user="bob").send(T0, contacts=("<sip:bob@192.0.2.20>",))
    assert (bob.response.status, bob.response.reason) == (503, "Too Many Registered Users")


def test_the_location_must_match_the_policy() -> None:
    policy = RegistrarPolicy(realm=REALM, max_contacts=3)
    digest = DigestServer(DigestServerConfig(realm=REALM, key=b"k" * 32))
    with pytest.raises(ValueError, match="domains and caps differ"):
        Registrar(policy, StaticCredentials(PASSWORDS), LocationService(), digest)
    other = DigestServer(DigestServerConfig(realm="other", key=b"k" * 32))
    with pytest.raises(ValueError, match="digest realm 'other'"):
        Registrar(policy, StaticCredentials(PASSWORDS), policy.new_location(), other)
    with pytest.raises(ValueError, match="min_expires <= default_expires"):
        RegistrarPolicy(min_expires=600, default_expires=300)


# --------------------------------------------------------------------------- RFC 5626, 3327


def test_outbound_instance_and_reg_id_replace_the_binding_over_tcp() -> None:
    registrar = make_registrar()
    phone = Phone(registrar, flow=TCP_FLOW)
    contact = f'<sip:alice@192.0.2.10:5062;transport=tcp>;+sip.instance="{INSTANCE}";reg-id=1'
    first = phone.send(T0, contacts=(contact,), extra=("Supported: outbound, path",))
    assert first.response.status == 200
    assert first.response.headers.get("Require") == "outbound"
    (binding,) = first.added
    assert (binding.instance, binding.reg_id, binding.connection_id) == (INSTANCE, 1, 7)
    assert contacts_of(first.response) == [
        f'<sip:alice@192.0.2.10:5062;transport=tcp>;+sip.instance="{INSTANCE}";reg-id=1;'
        "expires=3600"
    ]
    # After a reboot the phone has another address and Call-ID: same instance, same reg-id.
    moved = contact.replace("192.0.2.10:5062", "192.0.2.44:6000")
    second = phone.send(T0 + 5, contacts=(moved,), call_id="new-call", cseq=1)
    assert [b.contact for b in registrar.location] == ["sip:alice@192.0.2.44:6000;transport=tcp"]
    assert [b.contact for b in second.removed] == ["sip:alice@192.0.2.10:5062;transport=tcp"]


def test_path_is_stored_and_echoed_when_supported() -> None:
    registrar = make_registrar(auth_required=False)
    path = "<sip:edge.example.net;lr>"
    without = register(extra=(f"Path: {path}",))
    result = registrar.register(without, FLOW, "access", LISTEN, T0)
    assert result.added[0].path == (path,)
    assert result.response.headers.get("Path") is None
    supported = register(cseq=2, extra=(f"Path: {path}", "Supported: path"))
    echoed = registrar.register(supported, FLOW, "access", LISTEN, T0)
    assert echoed.response.headers.get("Path") == path


# --------------------------------------------------------------------------- other requests


def invite(proxy_authorization: str | None = None) -> Request:
    lines = [
        "INVITE sip:bob@203.0.113.1 SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKinv1",
        "Max-Forwards: 70",
        "From: <sip:alice@example.com>;tag=a1",
        "To: <sip:bob@example.com>",
        "Call-ID: inv-1@phone",
        "CSeq: 1 INVITE",
        "Contact: <sip:alice@192.0.2.10:5062>",
        *([f"Proxy-Authorization: {proxy_authorization}"] if proxy_authorization else []),
        "Content-Length: 0",
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def test_authenticate_an_invite_with_407() -> None:
    registrar = make_registrar()
    challenge = registrar.authenticate(invite(), T0, proxy=True)
    assert isinstance(challenge, Response) and challenge.status == 407
    values = challenge.headers.fields("Proxy-Authenticate")
    assert values and not challenge.headers.fields("WWW-Authenticate")
    client = DigestClient("alice", PASSWORDS["alice"])
    authorization = client.respond(values, method="INVITE", uri="sip:bob@203.0.113.1")
    result = registrar.authenticate(invite(authorization), T0, proxy=True)
    assert isinstance(result, AuthResult) and result.ok and result.username == "alice"
    wrong = DigestClient("alice", "guess-guess").respond(
        values, method="INVITE", uri="sip:bob@203.0.113.1"
    )
    check = registrar.check_credentials(invite(wrong), T0, proxy=True)
    assert check.response is not None and check.response.status == 407
    assert check.failure == AuthFailure("alice", AuthOutcome.BAD_RESPONSE)


# --------------------------------------------------------------------------- NAT keepalive


def test_keepalives_go_to_udp_bindings_once_per_interval_and_source() -> None:
    registrar = make_registrar(keepalive_interval=20.0)
    Phone(registrar).send(T0, contacts=("<sip:alice@192.0.2.10>", "<sip:alice@192.0.2.11>"))
    Phone(registrar, user="bob", flow=TCP_FLOW).send(T0, contacts=("<sip:bob@192.0.2.20>",))
    assert registrar.next_keepalive() == T0 + 20
    assert registrar.keepalive_targets(T0 + 19.9) == []
    targets = registrar.keepalive_targets(T0 + 20)
    # Two bindings behind one NAT mapping: one keepalive; none for the TCP phone.
    assert [t.received for t in targets] == [FLOW_DESTINATION]
    assert registrar.keepalive_targets(T0 + 20) == []
    assert len(registrar.keepalive_targets(T0 + 40)) == 1
    # A REGISTER refresh is traffic too: the next keepalive is an interval after it.
    Phone(registrar).send(
        T0 + 50, contacts=("<sip:alice@192.0.2.10>", "<sip:alice@192.0.2.11>"), cseq=2
    )
    assert registrar.keepalive_targets(T0 + 60) == []
    assert len(registrar.keepalive_targets(T0 + 70)) == 1
    # Unregistered bindings get none.
    Phone(registrar).send(T0 + 71, contacts=("*",), expires="0", cseq=3)
    assert registrar.keepalive_targets(T0 + 200) == []
    assert registrar.next_keepalive() is None


FLOW_DESTINATION = Destination(Transport.UDP, "198.51.100.20", 40000)


def test_keepalives_can_be_switched_off_and_restored() -> None:
    off = make_registrar(nat_keepalive=False)
    Phone(off).send(T0)
    assert off.keepalive_targets(T0 + 1000) == []
    on = make_registrar()
    on.location.apply(list(off.location), ())
    on.restore_keepalives(T0 + 10)
    assert [t.contact for t in on.keepalive_targets(T0 + 10)] == ["sip:alice@192.0.2.10:5062"]
