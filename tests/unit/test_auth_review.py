"""Digest review: defects found against RFC 7616 / RFC 3261 22 and Internet attacks.

Each test failed before its fix: user enumeration by response time, an ``nc`` that
was accepted in uppercase but hashed in lowercase, and a users database that
followed a planted symlink.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sbc.registrar.credentials import CredentialStoreError, SqliteCredentials
from sbc.sip.auth import (
    AuthHeaderError,
    AuthOutcome,
    DigestAlgorithm,
    DigestClient,
    DigestServer,
    DigestServerConfig,
    Qop,
    UserSecret,
    digest_ha1,
    digest_response,
    parse_credentials,
)

REALM = "sbc.example.net"
URI = "sip:sbc.example.net"
PASSWORD = "s3cret-pa55"
KEY = b"k" * 32


def stored_secret(user: str) -> UserSecret:
    """What the SQLite store hands the server: HA1 values, no password."""
    stored = (DigestAlgorithm.MD5, DigestAlgorithm.SHA_256)
    return UserSecret.from_ha1({a: digest_ha1(a, user, REALM, PASSWORD) for a in stored})


# --------------------------------------------------------------------------- enumeration


@pytest.mark.parametrize(
    "algorithm", [DigestAlgorithm.SHA_256, DigestAlgorithm.MD5, DigestAlgorithm.SHA_256_SESS]
)
def test_an_unknown_user_costs_the_same_hashing_as_a_wrong_password(
    monkeypatch: pytest.MonkeyPatch, algorithm: DigestAlgorithm
) -> None:
    # Both answers are the same fresh 401; only the time to compute it could tell
    # an attacker which user names exist, so both must do the same hash work.
    server = DigestServer(DigestServerConfig(realm=REALM, key=KEY, algorithms=(algorithm,)))
    guess = DigestClient("alice", "not-the-password").respond(
        server.challenge_values(0.0), method="REGISTER", uri=URI
    )
    original: Callable[[DigestAlgorithm, str], str] = DigestAlgorithm.hash
    calls: list[str] = []

    def counting(self: DigestAlgorithm, data: str) -> str:
        calls.append(data)
        return original(self, data)

    monkeypatch.setattr(DigestAlgorithm, "hash", counting)
    hashes: dict[AuthOutcome, int] = {}
    for secret in (stored_secret("alice"), None):
        calls.clear()
        result = server.verify(guess, method="REGISTER", request_uri=URI, secret=secret, now=1.0)
        hashes[result.outcome] = len(calls)
    assert hashes.keys() == {AuthOutcome.BAD_RESPONSE, AuthOutcome.UNKNOWN_USER}
    assert hashes[AuthOutcome.UNKNOWN_USER] == hashes[AuthOutcome.BAD_RESPONSE] > 0


def test_the_stand_in_for_an_unknown_user_never_authenticates() -> None:
    # A response built on an all-zero HA1 (what an unknown user is checked against)
    # is still an unknown user, never a login.
    server = DigestServer(DigestServerConfig(realm=REALM, key=KEY))
    nonce = server.make_nonce(0.0)
    response = digest_response(
        algorithm=DigestAlgorithm.SHA_256, ha1="0" * 64, nonce=nonce, method="REGISTER",
        uri=URI, qop=Qop.AUTH, nc=1, cnonce="c",
    )  # fmt: skip
    value = (
        f'Digest username="nobody", realm="{REALM}", nonce="{nonce}", uri="{URI}", '
        f'response="{response}", algorithm=SHA-256, cnonce="c", qop=auth, nc=00000001'
    )
    result = server.verify(value, method="REGISTER", request_uri=URI, secret=None, now=1.0)
    assert result.outcome is AuthOutcome.UNKNOWN_USER


# --------------------------------------------------------------------------- parsing


def test_an_uppercase_nc_is_malformed_not_a_wrong_password() -> None:
    # RFC 3261 25.1: nc-value = 8LHEX. The request-digest hashes nc as sent; the
    # server rebuilt it lowercase, so a client hashing "0000000A" got BAD_RESPONSE,
    # a "wrong password" the firewall counts towards a ban, instead of a 400.
    server = DigestServer(DigestServerConfig(realm=REALM, key=KEY))
    nonce = server.make_nonce(0.0)
    algorithm = DigestAlgorithm.SHA_256
    ha1 = digest_ha1(algorithm, "alice", REALM, PASSWORD)
    ha2 = algorithm.hash(f"REGISTER:{URI}")
    response = algorithm.hash(f"{ha1}:{nonce}:0000000A:c:auth:{ha2}")
    value = (
        f'Digest username="alice", realm="{REALM}", nonce="{nonce}", uri="{URI}", '
        f'response="{response}", algorithm=SHA-256, cnonce="c", qop=auth, nc=0000000A'
    )
    with pytest.raises(AuthHeaderError) as info:
        parse_credentials(value)
    assert str(info.value) == "invalid nc '0000000A'"
    assert info.value.status == 400
    result = server.verify(
        value, method="REGISTER", request_uri=URI, secret=stored_secret("alice"), now=1.0
    )
    assert result.outcome is AuthOutcome.MALFORMED
    # Lowercase is unchanged: the same digest with nc as the grammar spells it.
    lower = algorithm.hash(f"{ha1}:{nonce}:0000000a:c:auth:{ha2}")
    good = value.replace(response, lower).replace("nc=0000000A", "nc=0000000a")
    assert server.verify(
        good, method="REGISTER", request_uri=URI, secret=stored_secret("alice"), now=1.0
    ).ok


# --------------------------------------------------------------------------- users database


def test_a_symlink_as_users_db_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    # `sudo sbc user add` opens <state_dir>/users.sqlite as root in a directory the
    # service user can write: a symlink planted there must not make root chmod an
    # existing file or create (and then hand over) a new one wherever it points.
    target = tmp_path / "precious"
    target.write_text("not a database\n")
    target.chmod(0o644)
    link = tmp_path / "users.sqlite"
    link.symlink_to(target)
    with pytest.raises(CredentialStoreError) as info:
        SqliteCredentials(link, REALM)
    assert str(info.value) == f"{link}: is a symbolic link"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_text() == "not a database\n"

    dangling = tmp_path / "other.sqlite"
    elsewhere = tmp_path / "created-by-root"
    dangling.symlink_to(elsewhere)
    with pytest.raises(CredentialStoreError, match=r": is a symbolic link$"):
        SqliteCredentials(dangling, REALM)
    assert not os.path.lexists(elsewhere)


# --------------------------------------------------------------------------- clock steps


def test_a_wall_clock_stepped_back_does_not_make_every_fresh_nonce_stale() -> None:
    # The registrar's clock is the wall clock (its bindings are replicated). When NTP
    # steps it back by more than the nonce lifetime, the replay tracker's watermark
    # (the issue time of the last nonce it forgot) lay in the future: every fresh
    # nonce was "stale", each phone retried on stale=true again and again, and no
    # one could register or call until the clock caught up.
    server = DigestServer(DigestServerConfig(realm=REALM, key=KEY, nonce_lifetime=300))
    secret = stored_secret("alice")

    def register(now: float) -> AuthOutcome:
        client = DigestClient("alice", PASSWORD)
        value = client.respond(server.challenge_values(now), method="REGISTER", uri=URI)
        return server.verify(
            value, method="REGISTER", request_uri=URI, secret=secret, now=now
        ).outcome

    t = 1_800_000_000.0
    assert register(t) is AuthOutcome.OK
    assert register(t + 1000) is AuthOutcome.OK  # the first nonce is forgotten now
    stepped = t - 3600  # NTP steps the clock back an hour
    assert register(stepped) is AuthOutcome.OK
    assert register(stepped + 10) is AuthOutcome.OK


def test_a_nonce_from_before_a_step_back_is_not_replayable() -> None:
    # Forgetting what was tracked must not open a replay: a nonce issued before the
    # step is from the future afterwards, and refused as such.
    server = DigestServer(DigestServerConfig(realm=REALM, key=KEY, nonce_lifetime=300))
    secret = stored_secret("alice")
    t = 1_800_000_000.0
    client = DigestClient("alice", PASSWORD)
    value = client.respond(server.challenge_values(t), method="REGISTER", uri=URI)
    verify = server.verify
    assert verify(value, method="REGISTER", request_uri=URI, secret=secret, now=t).ok
    stepped = t - 3600
    server.verify(
        DigestClient("alice", PASSWORD).respond(
            server.challenge_values(stepped), method="REGISTER", uri=URI
        ),
        method="REGISTER",
        request_uri=URI,
        secret=secret,
        now=stepped,
    )
    again = verify(value, method="REGISTER", request_uri=URI, secret=secret, now=stepped + 1)
    assert not again.ok
