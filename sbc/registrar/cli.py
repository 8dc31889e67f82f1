"""`sbc user add|list|remove|passwd|disable|enable`: the registrar's users table.

Passwords are read from the terminal (twice, not echoed) or, with
``--password-stdin``, from the first line of standard input (for scripts: never put
a password on the command line, where ``ps`` shows it). The table holds HA1 values
for ``--realm``, which must be the registrar's digest realm (``registrar.realm`` in
the configuration, "sbc" by default): a user added for another realm cannot log in.

The database is ``--db PATH``, else ``<--state-dir>/users.sqlite`` with the embedded
configuration's state directory ``./state`` as the default. `add_user_subcommands`
plugs the commands into `sbc`'s argparse tree; `sbc.cli` calls it.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TextIO

from sbc.registrar.credentials import CredentialError, CredentialStoreError, SqliteCredentials

#: The embedded configuration's state directory and the users file inside it.
DEFAULT_STATE_DIR: Final = Path("state")
USERS_DB_NAME: Final = "users.sqlite"
#: The registrar's default digest realm (config ``registrar.realm``).
DEFAULT_REALM: Final = "sbc"

PasswordPrompt = Callable[[str], str]


class PasswordInputError(Exception):
    """The password could not be read, or the two entries differ."""


def database_path(args: argparse.Namespace) -> Path:
    """``--db``, else ``<state dir>/users.sqlite``."""
    if args.db:
        return Path(args.db)
    state_dir = Path(args.state_dir) if args.state_dir else DEFAULT_STATE_DIR
    return state_dir / USERS_DB_NAME


def read_password(
    *, from_stdin: bool, stdin: TextIO | None = None, prompt: PasswordPrompt = getpass.getpass
) -> str:
    """The first line of ``stdin`` (without its line break), or the password typed
    twice at the terminal. Raises :class:`PasswordInputError`."""
    if from_stdin:
        line = (stdin or sys.stdin).readline()
        password = line.rstrip("\r\n")
        if not password:
            raise PasswordInputError("no password on standard input")
        return password
    try:
        first = prompt("Password: ")
        second = prompt("Repeat password: ")
    except EOFError:
        raise PasswordInputError("no password entered") from None
    if first != second:
        raise PasswordInputError("the passwords differ")
    return first


def _run(args: argparse.Namespace) -> int:
    path = database_path(args)
    command: str = args.user_command
    if command != "add" and not path.exists():
        # Reading or changing users must not create an empty database by accident.
        if command == "list":
            print(f"no users ({path} does not exist)", file=sys.stderr)
            return 0
        print(f"sbc user: {path} does not exist", file=sys.stderr)
        return 1
    try:
        with SqliteCredentials(path, args.realm) as store:
            if command == "list":
                for entry in store.entries():
                    print(entry.username + (" (disabled)" if entry.disabled else ""))
            elif command == "add":
                store.add(args.name, read_password(from_stdin=args.password_stdin))
                print(f"added user {args.name} (realm {args.realm}) to {path}")
            elif command == "passwd":
                store.set_password(args.name, read_password(from_stdin=args.password_stdin))
                print(f"changed the password of {args.name} (realm {args.realm})")
            elif command == "remove":
                store.remove(args.name)
                print(f"removed user {args.name} (realm {args.realm})")
            elif command == "disable":
                store.disable(args.name)
                print(f"disabled user {args.name} (realm {args.realm})")
            else:
                store.enable(args.name)
                print(f"enabled user {args.name} (realm {args.realm})")
    except (CredentialError, CredentialStoreError, PasswordInputError) as exc:
        print(f"sbc user: {exc}", file=sys.stderr)
        return 1
    return 0


def add_user_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `user add|list|remove|passwd|disable|enable` to `sbc`'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--realm", default=DEFAULT_REALM, help=f"digest realm (default: {DEFAULT_REALM})"
    )
    where = common.add_mutually_exclusive_group()
    where.add_argument(
        "--state-dir", help=f"state directory holding {USERS_DB_NAME} (default: ./state)"
    )
    where.add_argument("--db", help="the users database file itself")
    stdin = argparse.ArgumentParser(add_help=False)
    stdin.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )

    user = subparsers.add_parser("user", help="manage the registrar's users")
    user.set_defaults(func=_run)
    sub = user.add_subparsers(dest="user_command", required=True)
    sub.add_parser("list", parents=[common], help="user names, one per line")
    add = sub.add_parser(
        "add", parents=[common, stdin], help="add a user (password: 8 characters or more)"
    )
    add.add_argument("name")
    passwd = sub.add_parser("passwd", parents=[common, stdin], help="change a user's password")
    passwd.add_argument("name")
    for name, text in (
        ("remove", "delete a user"),
        ("disable", "refuse a user's credentials, keep the user"),
        ("enable", "accept a disabled user's credentials again"),
    ):
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("name")
    return user
