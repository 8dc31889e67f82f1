"""Where the registrar finds users' digest secrets: a SQLite users table, or a mapping.

:class:`CredentialBackend` is the one question the registrar asks: the
:class:`~sbc.sip.auth.UserSecret` of a user in a realm, or None. The SQLite store
keeps HA1 values only (RFC 7616 3.4.2: H(username ":" realm ":" password), for MD5
and SHA-256), never the password, so the file does not hand out passwords that
users may have reused elsewhere; an HA1 is still enough to authenticate as that user
*in that realm*, which is why the file is created mode 0600 and never logged.

Password policy: at least :data:`MIN_PASSWORD_LENGTH` (8) characters, no control
characters. Digest lets anyone holding a captured challenge/response pair try
passwords offline as fast as MD5 goes, so short passwords fall in minutes; 8 is a
floor, not a recommendation (the CLI says so). User names: 1 to 64 letters, digits,
``.``, ``_``, ``+`` or ``-`` (no ``:``, which would make HA1 ambiguous; the same
characters a phone puts in the To user part unescaped).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from sbc.sip.auth import DigestAlgorithm, UserSecret, digest_ha1

#: Shortest password ``add``/``set_password`` accept.
MIN_PASSWORD_LENGTH: Final = 8
#: Longest password accepted (a guard against pasting a file by mistake).
MAX_PASSWORD_LENGTH: Final = 256
#: Digest user names the store accepts.
USERNAME_PATTERN: Final = re.compile(r"[A-Za-z0-9._+\-]{1,64}")
#: The HA1 variants stored, one column each (RFC 8760: SHA-256 first, MD5 for old phones).
STORED_ALGORITHMS: Final = (DigestAlgorithm.MD5, DigestAlgorithm.SHA_256)
#: File mode of the database: HA1 values authenticate as their user.
DB_FILE_MODE: Final = 0o600
#: Seconds a writer waits for another process's lock (the CLI while the SBC reads).
BUSY_TIMEOUT: Final = 5.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS users (
    username   TEXT    NOT NULL,
    realm      TEXT    NOT NULL,
    ha1_md5    TEXT    NOT NULL,
    ha1_sha256 TEXT    NOT NULL,
    created    REAL    NOT NULL,
    disabled   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (username, realm)
) WITHOUT ROWID
"""


class CredentialError(ValueError):
    """A user name, password or operation the store refuses; the message says why."""


class UserExistsError(CredentialError):
    """``add`` for a user that already exists in the realm."""


class UnknownUserError(CredentialError):
    """An operation on a user that does not exist in the realm."""


class WeakPasswordError(CredentialError):
    """A password that does not meet the policy (module docstring)."""


class CredentialStoreError(Exception):
    """The store could not be read (I/O, corruption): the registrar answers 500."""


class CredentialBackend(Protocol):
    """Looks up a user's digest secret; None for unknown or disabled users.

    Raises :class:`CredentialStoreError` when the store cannot answer.
    """

    def lookup(self, username: str, realm: str) -> UserSecret | None: ...


def check_username(username: str) -> None:
    """Raise :class:`CredentialError` unless ``username`` is acceptable."""
    if not USERNAME_PATTERN.fullmatch(username):
        raise CredentialError(
            f"user name {username!r} must be 1-64 letters, digits, '.', '_', '+' or '-'"
        )


def check_password(password: str) -> None:
    """Raise :class:`WeakPasswordError` unless ``password`` meets the policy."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPasswordError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPasswordError(f"password must be at most {MAX_PASSWORD_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in password):
        raise WeakPasswordError("password must not contain control characters")


def _ha1_values(username: str, realm: str, password: str) -> tuple[str, str]:
    md5, sha256 = (digest_ha1(a, username, realm, password) for a in STORED_ALGORITHMS)
    return md5, sha256


@dataclass(frozen=True, slots=True)
class UserEntry:
    """One row of the users table as listings show it (no HA1 values)."""

    username: str
    realm: str
    created: float
    disabled: bool


class SqliteCredentials:
    """The users table in a SQLite file, for one digest realm.

    Opening creates the file (mode 0600) and the table if needed. Reads and writes
    are short transactions, so the CLI can change users while the SBC runs; each
    :meth:`lookup` sees the latest committed state. Not thread-safe: one instance
    per thread.
    """

    def __init__(self, path: Path | str, realm: str) -> None:
        if not realm:
            raise CredentialError("realm must not be empty")
        self.path = Path(path)
        self.realm = realm
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file 0600 before SQLite opens it (SQLite would use the umask),
        # and tighten an existing one; journals inherit the database file's mode.
        # O_NOFOLLOW: `sudo sbc user` works in the service user's state directory,
        # where a planted symlink must not make root chmod or create its target.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, DB_FILE_MODE)
            try:
                os.fchmod(fd, DB_FILE_MODE)
            finally:
                os.close(fd)
        except OSError as exc:
            reason = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise CredentialStoreError(f"{self.path}: {reason}") from None
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            self._db.close()
            raise CredentialStoreError(f"{self.path}: {exc}") from None

    def __repr__(self) -> str:
        return f"SqliteCredentials(path={str(self.path)!r}, realm={self.realm!r})"

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqliteCredentials:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- CredentialBackend

    def lookup(self, username: str, realm: str) -> UserSecret | None:
        """The HA1 values of an enabled user of ``realm`` (primary-key lookup), or None."""
        try:
            row = self._db.execute(
                "SELECT ha1_md5, ha1_sha256 FROM users"
                " WHERE username = ? AND realm = ? AND disabled = 0",
                (username, realm),
            ).fetchone()
        except UnicodeEncodeError:
            # A lone surrogate (an undecodable byte the parser kept): not UTF-8, so
            # no stored name; the username is whatever the peer sent.
            return None
        except sqlite3.Error as exc:
            raise CredentialStoreError(f"{self.path}: {exc}") from None
        if row is None:
            return None
        md5, sha256 = row
        return UserSecret.from_ha1({DigestAlgorithm.MD5: md5, DigestAlgorithm.SHA_256: sha256})

    # -- administration (this store's realm)

    def add(self, username: str, password: str, *, now: float | None = None) -> None:
        """Add an enabled user. Raises :class:`UserExistsError`, :class:`CredentialError`
        for a bad name, :class:`WeakPasswordError` for a bad password."""
        check_username(username)
        check_password(password)
        md5, sha256 = _ha1_values(username, self.realm, password)
        created = time.time() if now is None else now
        with self._transaction() as db:
            try:
                db.execute(
                    "INSERT INTO users (username, realm, ha1_md5, ha1_sha256, created, disabled)"
                    " VALUES (?, ?, ?, ?, ?, 0)",
                    (username, self.realm, md5, sha256, created),
                )
            except sqlite3.IntegrityError:
                raise UserExistsError(
                    f"user {username!r} already exists in realm {self.realm!r}"
                ) from None

    def set_password(self, username: str, password: str) -> None:
        """Replace a user's HA1 values. Raises :class:`UnknownUserError`,
        :class:`WeakPasswordError`."""
        check_password(password)
        md5, sha256 = _ha1_values(username, self.realm, password)
        self._update(username, "UPDATE users SET ha1_md5 = ?, ha1_sha256 = ?", (md5, sha256))

    def disable(self, username: str) -> None:
        """Keep the user but refuse their credentials. Raises :class:`UnknownUserError`."""
        self._update(username, "UPDATE users SET disabled = 1", ())

    def enable(self, username: str) -> None:
        """Accept a disabled user's credentials again. Raises :class:`UnknownUserError`."""
        self._update(username, "UPDATE users SET disabled = 0", ())

    def remove(self, username: str) -> None:
        """Delete the user. Raises :class:`UnknownUserError`."""
        self._update(username, "DELETE FROM users", ())

    def _update(self, username: str, statement: str, values: tuple[object, ...]) -> None:
        with self._transaction() as db:
            cursor = db.execute(
                f"{statement} WHERE username = ? AND realm = ?", (*values, username, self.realm)
            )
            if cursor.rowcount == 0:
                raise UnknownUserError(f"no user {username!r} in realm {self.realm!r}")

    def list(self) -> builtins.list[str]:
        """The user names of this realm, sorted (disabled ones included)."""
        return [entry.username for entry in self.entries()]

    def entries(self) -> builtins.list[UserEntry]:
        """The users of this realm, sorted by name, without their HA1 values."""
        rows = self._db.execute(
            "SELECT username, realm, created, disabled FROM users WHERE realm = ?"
            " ORDER BY username",
            (self.realm,),
        ).fetchall()
        return [UserEntry(name, realm, created, bool(off)) for name, realm, created, off in rows]


class StaticCredentials:
    """Users from a mapping of user name to password (or secret); for tests and demos.

    With ``realm`` set, only that realm's lookups find anyone.
    """

    def __init__(self, users: Mapping[str, str | UserSecret], realm: str | None = None) -> None:
        self._users = {
            name: UserSecret.from_password(value) if isinstance(value, str) else value
            for name, value in users.items()
        }
        self.realm = realm

    def __repr__(self) -> str:
        return f"StaticCredentials(users={len(self._users)}, realm={self.realm!r})"

    def lookup(self, username: str, realm: str) -> UserSecret | None:
        if self.realm is not None and realm != self.realm:
            return None
        return self._users.get(username)
