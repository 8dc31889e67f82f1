"""Tests for sbc.sip.auth: digest parsing, known answers, server and client."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sbc.sip.auth import (
    CLIENT_ALGORITHM_PREFERENCE,
    MAX_AUTH_PARAM_LENGTH,
    MAX_AUTH_PARAMS,
    MAX_AUTH_VALUE_LENGTH,
    AuthHeaderError,
    AuthOutcome,
    CredentialsRejectedError,
    DigestAlgorithm,
    DigestChallenge,
    DigestClient,
    DigestCredentials,
    DigestServer,
    DigestServerConfig,
    GenericAuth,
    NonceCountTracker,
    NoUsableChallengeError,
    Qop,
    UserSecret,
    digest_ha1,
    digest_response,
    digest_userhash,
    parse_challenge,
    parse_credentials,
    select_challenge,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "sip-torture" / "rfc4475"
KEY = b"k" * 32
REALM = "sbc.example.net"
URI = "sip:bob@sbc.example.net"
PASSWORD = "s3cret-pa55"


def make_server(**kwargs: object) -> DigestServer:
    config = DigestServerConfig(realm=REALM, key=KEY, **kwargs)  # type: ignore[arg-type]
    return DigestServer(config)


def counter_cnonce() -> Callable[[], str]:
    count = iter(range(1, 1_000_000))
    return lambda: f"cn{next(count)}"


def make_client(
    password: str = PASSWORD, preference: tuple[DigestAlgorithm, ...] = CLIENT_ALGORITHM_PREFERENCE
) -> DigestClient:
    return DigestClient("alice", password, cnonce_factory=counter_cnonce(), preference=preference)


def verify(server: DigestServer, value: str, now: float, **kwargs: object) -> AuthOutcome:
    args: dict[str, object] = {
        "method": "INVITE",
        "request_uri": URI,
        "secret": UserSecret.from_password(PASSWORD),
        "now": now,
    }
    args.update(kwargs)
    return server.verify(value, **args).outcome  # type: ignore[arg-type]


# --------------------------------------------------------------------------- known answers

RFC2617_CHALLENGE = (
    'Digest\r\n                 realm="testrealm@host.com",\r\n'
    '                 qop="auth,auth-int",\r\n'
    '                 nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",\r\n'
    '                 opaque="5ccc069c403ebaf9f0171e9517f40e41"'
)
RFC2617_AUTHORIZATION = (
    'Digest username="Mufasa",\r\n                 realm="testrealm@host.com",\r\n'
    '                 nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",\r\n'
    '                 uri="/dir/index.html",\r\n                 qop=auth,\r\n'
    '                 nc=00000001,\r\n                 cnonce="0a4f113b",\r\n'
    '                 response="6629fae49393a05397450978507c4ef1",\r\n'
    '                 opaque="5ccc069c403ebaf9f0171e9517f40e41"'
)

RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC7616_CHALLENGES = [
    f'Digest\r\n    realm="http-auth@example.org",\r\n    qop="auth, auth-int",\r\n'
    f'    algorithm={alg},\r\n    nonce="{RFC7616_NONCE}",\r\n    opaque="{RFC7616_OPAQUE}"'
    for alg in ("SHA-256", "MD5")
]
RFC7616_MD5 = "8ca523f5e9506fed4657c9700eebdbec"
RFC7616_SHA256 = "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"


def test_rfc2617_response_known_answer() -> None:
    ha1 = digest_ha1(DigestAlgorithm.MD5, "Mufasa", "testrealm@host.com", "Circle Of Life")
    response = digest_response(
        algorithm=DigestAlgorithm.MD5,
        ha1=ha1,
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        method="GET",
        uri="/dir/index.html",
        qop=Qop.AUTH,
        nc=1,
        cnonce="0a4f113b",
    )
    assert response == "6629fae49393a05397450978507c4ef1"


def test_rfc2617_values_parse() -> None:
    challenge = DigestChallenge.parse(RFC2617_CHALLENGE)
    assert challenge == DigestChallenge(
        realm="testrealm@host.com",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        qop=("auth", "auth-int"),
        opaque="5ccc069c403ebaf9f0171e9517f40e41",
    )
    creds = DigestCredentials.parse(RFC2617_AUTHORIZATION)
    assert creds == DigestCredentials(
        username="Mufasa",
        realm="testrealm@host.com",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        uri="/dir/index.html",
        response="6629fae49393a05397450978507c4ef1",
        cnonce="0a4f113b",
        opaque="5ccc069c403ebaf9f0171e9517f40e41",
        qop=Qop.AUTH,
        nc=1,
    )


def test_rfc2617_client_produces_exact_authorization() -> None:
    client = DigestClient("Mufasa", "Circle Of Life", cnonce_factory=lambda: "0a4f113b")
    value = client.respond(RFC2617_CHALLENGE, method="GET", uri="/dir/index.html")
    assert value == (
        'Digest username="Mufasa", realm="testrealm@host.com", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", '
        'response="6629fae49393a05397450978507c4ef1", cnonce="0a4f113b", '
        'opaque="5ccc069c403ebaf9f0171e9517f40e41", qop=auth, nc=00000001'
    )
    assert DigestCredentials.parse(value) == DigestCredentials.parse(RFC2617_AUTHORIZATION)


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [(DigestAlgorithm.MD5, RFC7616_MD5), (DigestAlgorithm.SHA_256, RFC7616_SHA256)],
)
def test_rfc7616_response_known_answer(algorithm: DigestAlgorithm, expected: str) -> None:
    ha1 = digest_ha1(algorithm, "Mufasa", "http-auth@example.org", "Circle of Life")
    response = digest_response(
        algorithm=algorithm,
        ha1=ha1,
        nonce=RFC7616_NONCE,
        method="GET",
        uri="/dir/index.html",
        qop=Qop.AUTH,
        nc=1,
        cnonce=RFC7616_CNONCE,
    )
    assert response == expected


@pytest.mark.parametrize(
    ("preference", "expected"),
    [
        ((DigestAlgorithm.SHA_256, DigestAlgorithm.MD5), RFC7616_SHA256),
        ((DigestAlgorithm.MD5,), RFC7616_MD5),
    ],
)
def test_rfc7616_client_picks_algorithm_and_answers(
    preference: tuple[DigestAlgorithm, ...], expected: str
) -> None:
    client = DigestClient(
        "Mufasa", "Circle of Life", cnonce_factory=lambda: RFC7616_CNONCE, preference=preference
    )
    # The server lists MD5 second; the order given to the client must not matter.
    for challenges in (RFC7616_CHALLENGES, RFC7616_CHALLENGES[::-1]):
        client.forget()
        creds = DigestCredentials.parse(
            client.respond(challenges, method="GET", uri="/dir/index.html")
        )
        assert creds.response == expected
        assert creds.algorithm is preference[0]
        assert creds.opaque == RFC7616_OPAQUE
        assert (creds.qop, creds.nc, creds.cnonce) == (Qop.AUTH, 1, RFC7616_CNONCE)


def test_rfc7616_challenge_parse() -> None:
    challenge = DigestChallenge.parse(RFC7616_CHALLENGES[0])
    assert challenge.algorithm is DigestAlgorithm.SHA_256
    assert challenge.qop == ("auth", "auth-int")
    assert challenge.qop_options == (Qop.AUTH, Qop.AUTH_INT)
    assert challenge.nonce == RFC7616_NONCE


def test_userhash_and_sha512_256() -> None:
    # RFC 7616 3.4.4: username = H(unq(username) ":" unq(realm)); the 3.9.2 example
    # values are wrong (RFC errata 4897), so check against hashlib directly.
    name, realm = "J\u00e4s\u00f8n Doe", "api@example.org"
    expected = hashlib.new("sha512_256", f"{name}:{realm}".encode()).hexdigest()
    assert digest_userhash(DigestAlgorithm.SHA_512_256, name, realm) == expected
    challenge = (
        'Digest realm="api@example.org", qop="auth", algorithm=SHA-512-256, '
        'nonce="5TsQWLVdgBdmrQ0XsxbDODV+57QdFR34I9HAbC/RVvkK", charset=UTF-8, userhash=true'
    )
    client = DigestClient(name, "Secret, or not?", cnonce_factory=lambda: "c")
    creds = DigestCredentials.parse(client.respond(challenge, method="GET", uri="/doe.json"))
    assert creds.username == expected
    assert creds.userhash is True
    assert creds.algorithm is DigestAlgorithm.SHA_512_256
    ha1 = hashlib.new("sha512_256", f"{name}:{realm}:Secret, or not?".encode()).hexdigest()
    ha2 = hashlib.new("sha512_256", b"GET:/doe.json").hexdigest()
    kd = f"{ha1}:5TsQWLVdgBdmrQ0XsxbDODV+57QdFR34I9HAbC/RVvkK:00000001:c:auth:{ha2}"
    assert creds.response == hashlib.new("sha512_256", kd.encode()).hexdigest()


def test_sess_and_auth_int_follow_rfc7616_formulas() -> None:
    def h(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    body = b"v=0\r\n"
    inner = h("u:r:p")
    sess_ha1 = h(f"{inner}:N:C")
    ha2 = h(f"INVITE:sip:x:{hashlib.sha256(body).hexdigest()}")
    expected = h(f"{sess_ha1}:N:0000000a:C:auth-int:{ha2}")
    got = digest_response(
        algorithm=DigestAlgorithm.SHA_256_SESS,
        ha1=digest_ha1(DigestAlgorithm.SHA_256_SESS, "u", "r", "p"),
        nonce="N",
        method="INVITE",
        uri="sip:x",
        qop=Qop.AUTH_INT,
        nc=10,
        cnonce="C",
        body=body,
    )
    assert got == expected
    # RFC 2069: no qop, H(HA1:nonce:HA2).
    no_qop = digest_response(
        algorithm=DigestAlgorithm.SHA_256,
        ha1=inner,
        nonce="N",
        method="INVITE",
        uri="sip:x",
        qop=None,
    )
    assert no_qop == h(f"{inner}:N:{h('INVITE:sip:x')}")


def test_digest_response_requires_cnonce() -> None:
    with pytest.raises(ValueError, match=r"^algorithm MD5-sess requires a cnonce$"):
        digest_response(
            algorithm=DigestAlgorithm.MD5_SESS, ha1="x", nonce="n", method="M", uri="u", qop=None
        )
    with pytest.raises(ValueError, match=r"^qop requires nc and cnonce$"):
        digest_response(
            algorithm=DigestAlgorithm.MD5, ha1="x", nonce="n", method="M", uri="u", qop=Qop.AUTH
        )


# --------------------------------------------------------------------------- parser


def test_regaut01_unknown_scheme_is_generic() -> None:
    message = (VECTORS / "regaut01.dat").read_bytes().decode()
    value = next(
        line.split(":", 1)[1].strip()
        for line in message.split("\r\n")
        if line.lower().startswith("authorization:")
    )
    assert value == "NoOneKnowsThisScheme opaque-data=here"
    parsed = parse_credentials(value)
    assert parsed == GenericAuth(
        scheme="NoOneKnowsThisScheme", raw="opaque-data=here", params=(("opaque-data", "here"),)
    )
    assert str(parsed) == value
    with pytest.raises(AuthHeaderError, match=r"^unsupported auth-scheme 'NoOneKnowsThisScheme'$"):
        DigestCredentials.parse(value)
    result = make_server().verify(
        value, method="REGISTER", request_uri="sip:example.com", secret=None, now=0.0
    )
    assert result.outcome is AuthOutcome.UNSUPPORTED_SCHEME


def test_generic_scheme_with_token68_keeps_raw() -> None:
    parsed = parse_credentials("Basic  dXNlcjpwYXNz")
    assert parsed == GenericAuth(scheme="Basic", raw="dXNlcjpwYXNz", params=None)
    assert str(parsed) == "Basic dXNlcjpwYXNz"
    assert parse_challenge("Negotiate") == GenericAuth(scheme="Negotiate", raw="", params=())


def test_escaped_quotes_and_backslashes() -> None:
    value = r'Digest realm="a \"quoted\" realm\\x", nonce="n\q"'
    challenge = DigestChallenge.parse(value)
    assert challenge.realm == 'a "quoted" realm\\x'
    assert challenge.nonce == "nq"
    assert str(challenge) == r'Digest realm="a \"quoted\" realm\\x", nonce="nq"'
    assert DigestChallenge.parse(str(challenge)) == challenge


@pytest.mark.parametrize(
    "value",
    [
        'digest realm="r",nonce="n",qop="auth"',
        'DIGEST   realm = "r"  ,   nonce= "n" , qop =auth',
        '  Digest\trealm="r",\r\n\tnonce="n", QOP="auth"  ',
        'Digest\r\n realm="r"\r\n ,\r\n nonce="n",qop="  auth  "',
    ],
)
def test_lws_case_and_spacing_tolerated(value: str) -> None:
    assert DigestChallenge.parse(value) == DigestChallenge(realm="r", nonce="n", qop=("auth",))


def test_folded_quoted_string_becomes_single_space() -> None:
    challenge = DigestChallenge.parse('Digest realm="a\r\n   b", nonce="n"')
    assert challenge.realm == "a b"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty auth header value"),
        ("   ", "empty auth header value"),
        ('"Digest" realm="r"', "auth-scheme is not a token"),
        ('Digest,realm="r"', "expected LWS after auth-scheme"),
        ("Digest", "no auth-params after auth-scheme"),
        ('Digest realm="r", nonce="n",', "expected auth-param name at offset 28"),
        ('Digest realm="r",, nonce="n"', "expected auth-param name at offset 17"),
        ('Digest realm "r"', "expected '=' after auth-param 'realm'"),
        ("Digest realm=", "expected value for auth-param 'realm'"),
        ('Digest realm="r" nonce="n"', "expected ',' at offset 17"),
        ('Digest realm="r', "unterminated quoted-string in auth-param 'realm'"),
        ('Digest realm="r\\', "unterminated quoted-string in auth-param 'realm'"),
        ('Digest realm="r\x00"', "control character in auth-param 'realm'"),
        ('Digest realm="a\r\nb", nonce="n"', "bare line break in auth-param 'realm'"),
        ('Digest realm="a\\\r", nonce="n"', "invalid quoted-pair in auth-param 'realm'"),
        ('Digest realm="r", Realm="s", nonce="n"', "duplicate auth-param 'realm'"),
        ('Digest realm="r"', "missing auth-param 'nonce'"),
        ('Digest nonce="n"', "missing auth-param 'realm'"),
        ('Digest realm="r", nonce="n", algorithm=AKAv1-MD5', "unsupported algorithm 'AKAv1-MD5'"),
        ("Basic realm=x", "unsupported auth-scheme 'Basic'"),
    ],
)
def test_challenge_errors(value: str, message: str) -> None:
    with pytest.raises(AuthHeaderError) as info:
        DigestChallenge.parse(value)
    assert str(info.value) == message
    assert info.value.status == 400
    assert isinstance(info.value, ValueError)


CREDS = 'Digest username="u", realm="r", nonce="n", uri="sip:x", response="00"'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (CREDS + ", qop=auth, nc=00000001", "auth-param 'cnonce' is required with qop"),
        (CREDS + ', qop=auth, cnonce="c"', "auth-param 'nc' is required with qop"),
        (CREDS + ', qop=auth-conf, cnonce="c", nc=00000001', "unsupported qop 'auth-conf'"),
        (CREDS + ', qop=auth, cnonce="c", nc=1', "invalid nc '1'"),
        (CREDS + ', qop=auth, cnonce="c", nc=0000000g', "invalid nc '0000000g'"),
        (CREDS.replace(', uri="sip:x"', ""), "missing auth-param 'uri'"),
        (CREDS.replace(', response="00"', ""), "missing auth-param 'response'"),
        (CREDS.replace('username="u", ', ""), "missing auth-param 'username'"),
        (CREDS + ", algorithm=SHA-1", "unsupported algorithm 'SHA-1'"),
    ],
)
def test_credentials_errors(value: str, message: str) -> None:
    with pytest.raises(AuthHeaderError) as info:
        parse_credentials(value)
    assert str(info.value) == message


def test_caps() -> None:
    many = ", ".join(f"p{i}=v" for i in range(MAX_AUTH_PARAMS - 2))
    assert len(DigestChallenge.parse(f'Digest realm="r", nonce="n", {many}').extra) == 30
    with pytest.raises(AuthHeaderError, match=r"^more than 32 auth-params$"):
        DigestChallenge.parse(f'Digest realm="r", nonce="n", {many}, one=1')
    long_value = "x" * MAX_AUTH_PARAM_LENGTH
    assert DigestChallenge.parse(f'Digest realm="{long_value}", nonce="n"').realm == long_value
    for quoted in (f'"{long_value}x"', f"{long_value}x"):
        with pytest.raises(AuthHeaderError) as info:
            DigestChallenge.parse(f"Digest realm={quoted}, nonce=n")
        assert str(info.value) == "auth-param 'realm' longer than 1024 characters"
    with pytest.raises(AuthHeaderError, match=r"^auth header value longer than 4096 characters$"):
        parse_credentials("Foo " + "a" * MAX_AUTH_VALUE_LENGTH)


def test_flags_and_unknown_qop_options() -> None:
    challenge = DigestChallenge.parse(
        'Digest realm="r", nonce="n", stale=TRUE, qop="auth-conf, AUTH", x-ext="a b", y=z'
    )
    assert challenge.stale is True
    assert challenge.qop == ("auth-conf", "auth")
    assert challenge.qop_options == (Qop.AUTH,)
    assert challenge.extra == (("x-ext", "a b"), ("y", "z"))
    assert DigestChallenge.parse('Digest realm="r", nonce="n", stale=yes').stale is False
    assert DigestChallenge.parse('Digest realm="r", nonce="n", algorithm=md5-SESS').algorithm is (
        DigestAlgorithm.MD5_SESS
    )


def test_round_trip_canonical_values() -> None:
    for value in make_server(opaque="op").challenge_values(0.0, stale=True):
        assert str(DigestChallenge.parse(value)) == value
    challenge = (
        'Digest realm="r", domain="sip:a sip:b", nonce="n", opaque="o", algorithm=SHA-256-sess, '
        'qop="auth,auth-int", stale=true, charset=UTF-8, userhash=true, ext="x y"'
    )
    assert str(parse_challenge(challenge)) == challenge
    creds = (
        'Digest username="a\\"b", realm="r", nonce="n", uri="sip:x", response="ab", '
        'algorithm=MD5, cnonce="c", opaque="o", qop=auth-int, nc=0000ffff, userhash=true, '
        "x=y"
    )
    assert str(parse_credentials(creds)) == creds


def test_serializer_refuses_header_injection() -> None:
    creds = DigestCredentials(
        username="a\r\nVia: evil", realm="r", nonce="n", uri="sip:x", response="0"
    )
    with pytest.raises(AuthHeaderError, match=r"^control character in auth-param 'username'$"):
        str(creds)
    challenge = DigestChallenge(realm="r", nonce="n", extra=(("bad name", "v"),))
    with pytest.raises(AuthHeaderError, match=r"^auth-param name 'bad name' is not a token$"):
        str(challenge)


# --------------------------------------------------------------------------- server + client


ROUND_TRIP_CASES = [
    (algorithm, qop) for algorithm in DigestAlgorithm for qop in (Qop.AUTH, Qop.AUTH_INT)
] + [(a, None) for a in DigestAlgorithm if not a.is_session]


@pytest.mark.parametrize(("algorithm", "qop"), ROUND_TRIP_CASES)
def test_round_trip_each_algorithm(algorithm: DigestAlgorithm, qop: Qop | None) -> None:
    server = make_server(
        algorithms=(algorithm,), qop=() if qop is None else (qop,), allow_no_qop=qop is None
    )
    client = make_client()
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\n"
    values = server.challenge_values(10.0)
    assert len(values) == 1
    value = client.respond(values, method="INVITE", uri=URI, body=body)
    creds = DigestCredentials.parse(value)
    assert creds.algorithm is algorithm
    assert creds.qop is qop
    result = server.verify(
        value,
        method="INVITE",
        request_uri=URI,
        secret=UserSecret.from_password(PASSWORD),
        now=11.0,
        body=body,
    )
    assert result.ok, result
    assert (result.username, result.algorithm) == ("alice", algorithm)
    wrong = make_client(password="guess").respond(values, method="INVITE", uri=URI, body=body)
    assert verify(server, wrong, 11.0, body=body) is AuthOutcome.BAD_RESPONSE
    if qop is Qop.AUTH_INT:
        fresh = client.authorize(method="INVITE", uri=URI, body=body)
        assert fresh is not None
        assert verify(server, fresh, 11.0, body=body + b"x") is AuthOutcome.BAD_RESPONSE


def test_default_challenges_sha256_then_md5_sharing_a_nonce() -> None:
    server = make_server()
    challenges = server.challenges(0.0)
    assert [c.algorithm for c in challenges] == [DigestAlgorithm.SHA_256, DigestAlgorithm.MD5]
    assert challenges[0].nonce == challenges[1].nonce
    values = server.challenge_values(0.0)
    assert values[0].startswith('Digest realm="sbc.example.net", nonce="')
    assert values[0].endswith('", algorithm=SHA-256, qop="auth"')
    assert values[1].endswith('", algorithm=MD5, qop="auth"')
    for preference in ((DigestAlgorithm.SHA_256,), (DigestAlgorithm.MD5,)):
        client = make_client(preference=preference)
        # A nonce goes to one requester; its nonce-count is tracked per nonce.
        value = client.respond(server.challenge_values(0.0), method="INVITE", uri=URI)
        assert DigestCredentials.parse(value).algorithm is preference[0]
        assert verify(server, value, 1.0) is AuthOutcome.OK


def test_nonce_reuse_increments_nc_and_rejects_replay() -> None:
    server = make_server()
    client = make_client()
    first = client.respond(server.challenge_values(0.0), method="INVITE", uri=URI)
    second = client.authorize(method="BYE", uri=URI)
    third = client.authorize(method="INVITE", uri=URI)
    assert second is not None and third is not None
    assert [DigestCredentials.parse(v).nc for v in (first, second, third)] == [1, 2, 3]
    assert verify(server, first, 1.0) is AuthOutcome.OK
    assert verify(server, first, 1.0) is AuthOutcome.REPLAY
    assert verify(server, second, 1.0, method="BYE") is AuthOutcome.OK
    assert verify(server, third, 1.0) is AuthOutcome.OK
    assert verify(server, second, 1.0, method="BYE") is AuthOutcome.REPLAY
    assert server.tracked_nonces == 1


def test_nc_going_backwards_is_replay() -> None:
    server = make_server()
    client = make_client()
    values = server.challenge_values(0.0)
    nc1 = client.respond(values, method="INVITE", uri=URI)
    nc2 = client.authorize(method="INVITE", uri=URI)
    nc3 = client.authorize(method="INVITE", uri=URI)
    assert nc2 is not None and nc3 is not None
    assert verify(server, nc3, 1.0) is AuthOutcome.OK
    assert verify(server, nc2, 1.0) is AuthOutcome.REPLAY
    assert verify(server, nc1, 1.0) is AuthOutcome.REPLAY


def test_nc_zero_is_malformed() -> None:
    server = make_server(algorithms=(DigestAlgorithm.MD5,))
    nonce = server.make_nonce(0.0)
    ha1 = digest_ha1(DigestAlgorithm.MD5, "alice", REALM, PASSWORD)
    response = digest_response(
        algorithm=DigestAlgorithm.MD5,
        ha1=ha1,
        nonce=nonce,
        method="INVITE",
        uri=URI,
        qop=Qop.AUTH,
        nc=0,
        cnonce="c",
    )
    creds = DigestCredentials(
        username="alice", realm=REALM, nonce=nonce, uri=URI, response=response,
        cnonce="c", qop=Qop.AUTH, nc=0,
    )  # fmt: skip
    assert verify(server, str(creds), 1.0) is AuthOutcome.MALFORMED


def test_stale_flow_with_fake_clock() -> None:
    server = make_server(nonce_lifetime=30.0)
    client = make_client()
    value = client.respond(server.challenge_values(100.0), method="REGISTER", uri=URI)
    assert verify(server, value, 130.0, method="REGISTER") is AuthOutcome.OK
    later = client.authorize(method="REGISTER", uri=URI)
    assert later is not None
    result = server.verify(
        later, method="REGISTER", request_uri=URI, secret=UserSecret.from_password(PASSWORD),
        now=130.001,
    )  # fmt: skip
    assert result.outcome is AuthOutcome.STALE and result.stale
    # The caller challenges again with stale=true; the client retries on its own.
    values = server.challenge_values(130.001, stale=result.stale)
    assert all(DigestChallenge.parse(v).stale for v in values)
    retry = client.respond(values, method="REGISTER", uri=URI, already_tried=True)
    assert DigestCredentials.parse(retry).nc == 1
    assert verify(server, retry, 131.0, method="REGISTER") is AuthOutcome.OK


def test_stale_only_with_correct_digest() -> None:
    server = make_server(nonce_lifetime=30.0)
    values = server.challenge_values(0.0)
    wrong = make_client(password="nope").respond(values, method="INVITE", uri=URI)
    assert verify(server, wrong, 100.0) is AuthOutcome.BAD_RESPONSE


def test_nonce_from_the_future_is_stale_beyond_skew() -> None:
    server = make_server()
    values = server.challenge_values(100.0)
    assert verify(server, make_client().respond(values, method="INVITE", uri=URI), 96.0) is (
        AuthOutcome.OK
    )
    assert verify(server, make_client().respond(values, method="INVITE", uri=URI), 94.0) is (
        AuthOutcome.STALE
    )


def test_rejected_credentials_need_the_user() -> None:
    server = make_server()
    client = make_client(password="guess")
    values = server.challenge_values(0.0)
    client.respond(values, method="INVITE", uri=URI)
    with pytest.raises(CredentialsRejectedError) as info:
        client.respond(server.challenge_values(1.0), method="INVITE", uri=URI, already_tried=True)
    assert str(info.value) == "credentials rejected for realm 'sbc.example.net'"


def test_forged_nonces() -> None:
    server = make_server()
    client = make_client()
    good = server.make_nonce(0.0)
    other_key = DigestServer(DigestServerConfig(realm=REALM, key=b"x" * 32)).make_nonce(0.0)
    other_realm = DigestServer(DigestServerConfig(realm="other", key=KEY)).make_nonce(0.0)
    tampered = ("B" if good[0] == "A" else "A") + good[1:]
    # Same 40 bytes, different spelling: the last character's unused bits set.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    non_canonical = good[:-1] + alphabet[alphabet.index(good[-1]) | 1]
    for nonce in ("dcd98b7102dd2f0e8b11d0f600bfb0c093", "", other_key, other_realm, tampered,
                  non_canonical, good + "AAAA", good[:-4]):  # fmt: skip
        assert server.nonce_issued_at(nonce) is None, nonce
        challenge = DigestChallenge(realm=REALM, nonce=nonce, qop=("auth",))
        client.forget()
        value = client.respond(challenge, method="INVITE", uri=URI)
        # The right password on a nonce not ours (a restart changed the key): stale,
        # so the phone retries without asking its user (RFC 7616 3.3) ...
        assert verify(server, value, 1.0) is AuthOutcome.STALE
        # ... and a wrong one is a failure: a forged nonce makes no free guess.
        guess = make_client("wrong")
        value = guess.respond(challenge, method="INVITE", uri=URI)
        assert verify(server, value, 1.0) is AuthOutcome.BAD_RESPONSE
    assert server.nonce_issued_at(good) == 0.0


def test_shared_key_nonces_verify_on_peer() -> None:
    def fixed(n: int) -> bytes:
        return b"\x01" * n

    a = DigestServer(DigestServerConfig(realm=REALM, key=KEY), random_bytes=fixed)
    b = DigestServer(DigestServerConfig(realm=REALM, key=KEY), random_bytes=fixed)
    assert a.make_nonce(5.0) == b.make_nonce(5.0)
    value = make_client().respond(a.challenge_values(5.0), method="INVITE", uri=URI)
    assert verify(b, value, 6.0) is AuthOutcome.OK


def test_request_mismatches() -> None:
    server = make_server(opaque="opq")
    client = make_client()
    values = server.challenge_values(0.0)
    value = client.respond(values, method="INVITE", uri=URI)
    assert verify(server, value, 1.0, request_uri="sip:carol@sbc.example.net") is (
        AuthOutcome.URI_MISMATCH
    )
    assert verify(server, value, 1.0, secret=None) is AuthOutcome.UNKNOWN_USER
    assert verify(server, value, 1.0, method="BYE") is AuthOutcome.BAD_RESPONSE
    creds = DigestCredentials.parse(value)
    cases: list[tuple[dict[str, Any], AuthOutcome]] = [
        ({"realm": "elsewhere"}, AuthOutcome.REALM_MISMATCH),
        ({"opaque": None}, AuthOutcome.OPAQUE_MISMATCH),
        ({"algorithm": DigestAlgorithm.SHA_512_256}, AuthOutcome.UNSUPPORTED_ALGORITHM),
        # Absent means MD5, which is offered, but a SHA-256 digest is too long for it.
        ({"algorithm": None}, AuthOutcome.MALFORMED),
        ({"response": "0" * 64}, AuthOutcome.BAD_RESPONSE),
        ({"qop": Qop.AUTH_INT}, AuthOutcome.UNSUPPORTED_QOP),
        ({"qop": None, "nc": None, "cnonce": None}, AuthOutcome.UNSUPPORTED_QOP),
        ({"response": "zz" * 32}, AuthOutcome.MALFORMED),
        ({"response": "ab" * 16}, AuthOutcome.MALFORMED),
        ({"response": "\u00e9" * 64}, AuthOutcome.MALFORMED),
        ({"userhash": True}, AuthOutcome.MALFORMED),
    ]
    for changed, outcome in cases:
        altered = replace(creds, **changed)
        assert server.verify(
            altered, method="INVITE", request_uri=URI,
            secret=UserSecret.from_password(PASSWORD), now=1.0,
        ).outcome is outcome, changed  # fmt: skip
    # Uppercase hex is accepted; the same request again is then a replay.
    upper = replace(creds, response=creds.response.upper())
    assert verify(server, str(upper), 1.0) is AuthOutcome.OK
    assert verify(server, value, 1.0) is AuthOutcome.REPLAY


def test_malformed_value_and_unhashable_text_do_not_raise() -> None:
    server = make_server()
    assert verify(server, 'Digest realm="r', 0.0) is AuthOutcome.MALFORMED
    value = make_client().respond(server.challenge_values(0.0), method="INVITE", uri=URI)
    assert verify(server, value, 1.0, method="INV\udcffITE\ud800") is AuthOutcome.MALFORMED


def test_stored_ha1() -> None:
    server = make_server()
    md5_only = UserSecret.from_ha1(
        {DigestAlgorithm.MD5: digest_ha1(DigestAlgorithm.MD5, "alice", REALM, PASSWORD).upper()}
    )
    values = server.challenge_values(0.0)
    md5 = make_client(preference=(DigestAlgorithm.MD5,)).respond(values, method="INVITE", uri=URI)
    assert verify(server, md5, 1.0, secret=md5_only) is AuthOutcome.OK
    sha = make_client().respond(values, method="INVITE", uri=URI)
    assert verify(server, sha, 1.0, secret=md5_only) is AuthOutcome.UNSUPPORTED_ALGORITHM
    sess = make_server(algorithms=(DigestAlgorithm.MD5_SESS,))
    value = make_client().respond(sess.challenge_values(0.0), method="INVITE", uri=URI)
    assert verify(sess, value, 1.0, secret=md5_only) is AuthOutcome.OK
    with pytest.raises(ValueError, match=r"^HA1 key must be a non-session algorithm: MD5-sess$"):
        UserSecret.from_ha1({DigestAlgorithm.MD5_SESS: "00"})


def test_rfc2069_mode() -> None:
    with pytest.raises(ValueError, match=r"^qop must not be empty unless allow_no_qop is set$"):
        make_server(qop=())
    server = make_server(qop=(), allow_no_qop=True, algorithms=(DigestAlgorithm.MD5,))
    client = make_client()
    value = client.respond(server.challenge_values(0.0), method="INVITE", uri=URI)
    creds = DigestCredentials.parse(value)
    assert (creds.qop, creds.nc, creds.cnonce) == (None, None, None)
    assert verify(server, value, 1.0) is AuthOutcome.OK
    # Without qop there is no nonce-count, so a nonce is not reused preemptively.
    assert client.authorize(method="INVITE", uri=URI) is None
    assert verify(make_server(algorithms=(DigestAlgorithm.MD5,)), value, 1.0) is (
        AuthOutcome.UNSUPPORTED_QOP
    )


def test_tracker_cap_never_opens_a_replay() -> None:
    server = make_server(max_tracked_nonces=2)
    clients = [make_client() for _ in range(3)]
    for t, client in enumerate(clients):
        value = client.respond(server.challenge_values(float(t)), method="INVITE", uri=URI)
        assert verify(server, value, 3.0) is AuthOutcome.OK
    assert server.tracked_nonces == 2
    # The first nonce was forgotten: its next use is stale, never accepted blindly.
    again = clients[0].authorize(method="INVITE", uri=URI)
    assert again is not None
    assert verify(server, again, 3.0) is AuthOutcome.STALE
    newest = clients[2].authorize(method="INVITE", uri=URI)
    assert newest is not None
    assert verify(server, newest, 3.0) is AuthOutcome.OK


def test_tracker_expires_old_nonces() -> None:
    server = make_server(nonce_lifetime=10.0)
    for t in (0.0, 5.0):
        value = make_client().respond(server.challenge_values(t), method="INVITE", uri=URI)
        assert verify(server, value, t) is AuthOutcome.OK
    assert server.tracked_nonces == 2
    value = make_client().respond(server.challenge_values(12.0), method="INVITE", uri=URI)
    assert verify(server, value, 12.0) is AuthOutcome.OK
    assert server.tracked_nonces == 2  # the t=0 nonce expired and left


def test_tracker_directly() -> None:
    tracker = NonceCountTracker(max_entries=1)
    assert tracker.check_and_record("a", 1.0, 1) is AuthOutcome.OK
    assert tracker.check_and_record("a", 1.0, 1) is AuthOutcome.REPLAY
    assert tracker.check_and_record("b", 2.0, 1) is AuthOutcome.OK
    assert tracker.check_and_record("a", 1.0, 5) is AuthOutcome.STALE
    assert tracker.check_and_record("c", 0.5, 1) is AuthOutcome.STALE
    assert len(tracker) == 1


def test_client_skips_what_it_cannot_use() -> None:
    client = make_client()
    useless = [
        "NoOneKnowsThisScheme opaque-data=here",
        'Digest realm="r", nonce="n", algorithm=AKAv1-MD5, qop="auth"',
        'Digest realm="r", nonce="n", qop="auth-conf"',
        'Digest realm="r", nonce="n", algorithm=MD5-sess',
        'Digest realm="r"',
    ]
    assert select_challenge(useless) is None
    with pytest.raises(NoUsableChallengeError, match=r"^no usable Digest challenge$"):
        client.respond(useless, method="INVITE", uri=URI)
    chosen = select_challenge([*useless, 'Digest realm="r", nonce="n"'])
    assert chosen == DigestChallenge(realm="r", nonce="n")
    assert client.authorize(method="INVITE", uri=URI) is None


def test_client_keeps_cnonce_per_nonce_and_resets_on_new_nonce() -> None:
    server = make_server()
    client = make_client()
    a = DigestCredentials.parse(client.respond(server.challenge_values(0.0), method="M", uri=URI))
    b_value = client.authorize(method="M", uri=URI)
    assert b_value is not None
    b = DigestCredentials.parse(b_value)
    assert (a.cnonce, a.nc, b.cnonce, b.nc) == ("cn1", 1, "cn1", 2)
    c = DigestCredentials.parse(client.respond(server.challenge_values(1.0), method="M", uri=URI))
    assert (c.cnonce, c.nc) == ("cn2", 1)
    assert c.nonce != a.nonce


def test_secrets_not_in_repr() -> None:
    secret = UserSecret(password="hunter2", ha1=((DigestAlgorithm.MD5, "feedface"),))
    assert "hunter2" not in repr(secret) and "feedface" not in repr(secret)
    assert "hunter2" not in repr(DigestClient("alice", "hunter2"))
    config = DigestServerConfig(realm=REALM, key=b"topsecretkeybytes!")
    assert "topsecret" not in repr(config)
    assert "topsecret" not in repr(DigestServer(config))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": b"short"}, "key must be at least 16 bytes"),
        ({"realm": ""}, "realm must not be empty"),
        ({"algorithms": ()}, "algorithms must be non-empty and distinct"),
        ({"nonce_lifetime": 0.0}, "nonce_lifetime must be a positive number of seconds"),
        ({"max_tracked_nonces": 0}, "max_tracked_nonces must be at least 1"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"realm": REALM, "key": KEY, **kwargs}
    with pytest.raises(ValueError) as info:
        DigestServerConfig(**args)  # type: ignore[arg-type]
    assert str(info.value) == message


# --------------------------------------------------------------------------- fuzz


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_verify_never_raises_on_arbitrary_text(text: str) -> None:
    server = make_server()
    for value in (text, "Digest " + text):
        result = server.verify(
            value, method="INVITE", request_uri=URI, secret=UserSecret.from_password("p"), now=0.0
        )
        assert result.outcome is not AuthOutcome.OK
        try:
            parse_challenge(value)
            parse_credentials(value)
        except AuthHeaderError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.text(max_size=4))
def test_verify_never_raises_on_mutated_credentials(index: int, insert: str) -> None:
    server = make_server()
    value = make_client().respond(server.challenge_values(0.0), method="INVITE", uri=URI)
    mutated = value[:index] + insert + value[index + len(insert) :]
    result = server.verify(
        mutated, method="INVITE", request_uri=URI, secret=UserSecret.from_password(PASSWORD),
        now=1.0,
    )  # fmt: skip
    if result.ok:
        # Only a spelling of the same credentials (case, LWS) may still pass.
        original, accepted = DigestCredentials.parse(value), DigestCredentials.parse(mutated)
        for name in ("username", "realm", "nonce", "uri", "cnonce", "nc", "qop", "algorithm"):
            assert getattr(accepted, name) == getattr(original, name)
        assert accepted.response.lower() == original.response
