"""The users table: HA1 values only, mode 0600, lookups the digest server accepts; the CLI."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sbc.registrar.cli import PasswordInputError, read_password
from sbc.registrar.credentials import (
    CredentialError,
    CredentialStoreError,
    SqliteCredentials,
    StaticCredentials,
    UnknownUserError,
    UserExistsError,
    WeakPasswordError,
)
from sbc.sip.auth import (
    AuthOutcome,
    DigestAlgorithm,
    DigestClient,
    DigestServer,
    DigestServerConfig,
    digest_ha1,
)

REALM = "sbc"
PASSWORD = "correct horse battery"
NOW = 1_700_000_000.0
SBC = Path(sys.executable).with_name("sbc")


def verify(secret_source: SqliteCredentials | StaticCredentials, user: str, password: str) -> str:
    """The outcome of a REGISTER-style digest exchange against ``secret_source``."""
    server = DigestServer(DigestServerConfig(realm=REALM, key=b"k" * 32))
    client = DigestClient(user, password)
    uri = "sip:127.0.0.1"
    authorization = client.respond(server.challenge_values(NOW), method="REGISTER", uri=uri)
    result = server.verify(
        authorization,
        method="REGISTER",
        request_uri=uri,
        secret=secret_source.lookup(user, REALM),
        now=NOW,
    )
    return result.outcome.value


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteCredentials]:
    with SqliteCredentials(tmp_path / "state" / "users.sqlite", REALM) as credentials:
        yield credentials


def test_added_users_authenticate_with_sha256_and_md5(store: SqliteCredentials) -> None:
    store.add("alice", PASSWORD, now=NOW)
    assert verify(store, "alice", PASSWORD) == AuthOutcome.OK.value
    assert verify(store, "alice", "wrong password") == AuthOutcome.BAD_RESPONSE.value
    assert verify(store, "mallory", PASSWORD) == AuthOutcome.UNKNOWN_USER.value
    secret = store.lookup("alice", REALM)
    assert secret is not None
    assert secret.password is None
    assert dict(secret.ha1) == {
        DigestAlgorithm.MD5: digest_ha1(DigestAlgorithm.MD5, "alice", REALM, PASSWORD),
        DigestAlgorithm.SHA_256: digest_ha1(DigestAlgorithm.SHA_256, "alice", REALM, PASSWORD),
    }
    assert store.lookup("alice", "other-realm") is None


def test_the_file_is_0600_and_never_holds_the_password(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite"
    old_umask = os.umask(0o022)
    try:
        with SqliteCredentials(path, REALM) as credentials:
            credentials.add("alice", PASSWORD)
            credentials.set_password("alice", "another secret phrase")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert b"alice" in data  # the row is there ...
    assert PASSWORD.encode() not in data  # ... but neither password is
    assert b"another secret phrase" not in data
    ha1 = digest_ha1(DigestAlgorithm.SHA_256, "alice", REALM, "another secret phrase")
    assert ha1.encode() in data


def test_an_existing_loose_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    SqliteCredentials(path, REALM).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_repr_shows_no_secrets(store: SqliteCredentials) -> None:
    store.add("alice", PASSWORD)
    secret = store.lookup("alice", REALM)
    assert secret is not None and secret.ha1
    for _, ha1 in secret.ha1:
        assert ha1 not in repr(secret)
    assert "users.sqlite" in repr(store)


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("short", "password must be at least 8 characters"),
        ("", "password must be at least 8 characters"),
        ("long enough\nbut", "password must not contain control characters"),
        ("x" * 257, "password must be at most 256 characters"),
    ],
)
def test_weak_passwords_are_refused(store: SqliteCredentials, password: str, message: str) -> None:
    with pytest.raises(WeakPasswordError, match=message):
        store.add("alice", password)
    assert store.list() == []


@pytest.mark.parametrize("name", ["", "al:ice", "al ice", "a" * 65, "ali\u00e7e"])
def test_bad_user_names_are_refused(store: SqliteCredentials, name: str) -> None:
    with pytest.raises(CredentialError, match="must be 1-64 letters"):
        store.add(name, PASSWORD)


def test_user_administration(store: SqliteCredentials) -> None:
    store.add("bob", PASSWORD)
    store.add("+4930123", PASSWORD)
    with pytest.raises(UserExistsError, match="user 'bob' already exists in realm 'sbc'"):
        store.add("bob", PASSWORD)
    assert store.list() == ["+4930123", "bob"]
    store.set_password("bob", "new password!")
    assert verify(store, "bob", "new password!") == "ok"
    assert verify(store, "bob", PASSWORD) == "bad-response"
    store.disable("bob")
    assert store.lookup("bob", REALM) is None
    assert [e.disabled for e in store.entries()] == [False, True]
    store.enable("bob")
    assert verify(store, "bob", "new password!") == "ok"
    store.remove("bob")
    assert store.list() == ["+4930123"]
    for operation in (store.remove, store.disable, store.enable):
        with pytest.raises(UnknownUserError, match="no user 'bob' in realm 'sbc'"):
            operation("bob")
    with pytest.raises(UnknownUserError):
        store.set_password("bob", PASSWORD)


def test_realms_are_separate_tables_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite"
    with SqliteCredentials(path, "sbc") as one, SqliteCredentials(path, "other") as two:
        one.add("alice", PASSWORD)
        two.add("alice", "a different one")
        assert one.list() == ["alice"] and two.list() == ["alice"]
        assert one.lookup("alice", "sbc") != one.lookup("alice", "other")
        # A second connection sees committed changes at once (the CLI while the SBC runs).
        two.remove("alice")
        assert one.lookup("alice", "other") is None


def test_a_user_name_that_is_not_utf8_is_unknown_not_a_crash(
    store: SqliteCredentials,
) -> None:
    # The parser keeps undecodable bytes as lone surrogates (surrogateescape); SQLite
    # cannot encode those, and the Authorization username is the peer's choice.
    store.add("alice", PASSWORD)
    assert store.lookup("\udcffalice", REALM) is None
    assert store.lookup("alice", "\udcff") is None
    assert store.lookup("alice", REALM) is not None


def test_a_corrupt_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite"
    path.write_bytes(b"this is not a database at all, not even close" * 40)
    with pytest.raises(CredentialStoreError, match=r"users\.sqlite: file is not a database"):
        SqliteCredentials(path, REALM)


def test_static_credentials() -> None:
    static = StaticCredentials({"alice": PASSWORD}, realm=REALM)
    assert verify(static, "alice", PASSWORD) == "ok"
    assert static.lookup("alice", "elsewhere") is None
    assert PASSWORD not in repr(static)


# --------------------------------------------------------------------------- CLI


def test_read_password_from_stdin_and_prompt() -> None:
    assert read_password(from_stdin=True, stdin=io.StringIO("pass word 1\r\nnext\n")) == (
        "pass word 1"
    )
    with pytest.raises(PasswordInputError, match="no password on standard input"):
        read_password(from_stdin=True, stdin=io.StringIO(""))
    answers = iter(["typed twice", "typed twice"])
    assert read_password(from_stdin=False, prompt=lambda _: next(answers)) == "typed twice"
    answers = iter(["one", "two"])
    with pytest.raises(PasswordInputError, match="the passwords differ"):
        read_password(from_stdin=False, prompt=lambda _: next(answers))


def sbc_user(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SBC), "user", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_add_list_passwd_remove(tmp_path: Path) -> None:
    added = sbc_user("add", "alice", "--password-stdin", cwd=tmp_path, stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert "added user alice (realm sbc)" in added.stdout
    database = tmp_path / "state" / "users.sqlite"  # the default: ./state/users.sqlite
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert PASSWORD.encode() not in database.read_bytes()
    weak = sbc_user("add", "bob", "--password-stdin", cwd=tmp_path, stdin="short\n")
    assert weak.returncode == 1
    assert "sbc user: password must be at least 8 characters" in weak.stderr
    listed = sbc_user("list", cwd=tmp_path)
    assert listed.stdout == "alice\n"
    changed = sbc_user(
        "passwd", "alice", "--password-stdin", cwd=tmp_path, stdin="brand new secret\n"
    )
    assert changed.returncode == 0, changed.stderr
    with SqliteCredentials(database, REALM) as credentials:
        assert verify(credentials, "alice", "brand new secret") == "ok"
    removed = sbc_user("remove", "alice", cwd=tmp_path)
    assert removed.returncode == 0
    assert sbc_user("list", cwd=tmp_path).stdout == ""
    again = sbc_user("remove", "alice", cwd=tmp_path)
    assert again.returncode == 1
    assert "no user 'alice' in realm 'sbc'" in again.stderr


def test_cli_db_realm_and_state_dir_options(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "people.db"
    added = sbc_user(
        "add", "carol", "--db", str(db), "--realm", "pbx", "--password-stdin",
        cwd=tmp_path, stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    with SqliteCredentials(db, "pbx") as credentials:
        assert credentials.list() == ["carol"]
    # Listing a missing database does not create one.
    empty = sbc_user("list", "--state-dir", str(tmp_path / "none"), cwd=tmp_path)
    assert empty.returncode == 0 and empty.stdout == ""
    assert not (tmp_path / "none").exists()
    both = sbc_user("list", "--db", str(db), "--state-dir", "x", cwd=tmp_path)
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr
