"""`sbc user add|list|remove|passwd|disable|enable`: the registrar's users table.

Passwords are read from the terminal (twice, not echoed) or, with
``--password-stdin``, from the first line of standard input (for scripts: never put
a password on the command line, where ``ps`` shows it). The table holds HA1 values
for one digest realm: a user added for another realm than the registrar's cannot
log in.

The commands act on the users of the configuration ``--config FILE`` names (a YAML
file as ``sbc run --config`` takes it), else ``$SBC_CONFIG``, else the embedded
default configuration: the database is its ``registrar.users_db``, else
``<state_dir>/users.sqlite`` (``./state/users.sqlite`` by default), and the realm is
its ``registrar.realm`` ("sbc" by default). ``--db PATH``, ``--state-dir DIR``
(``DIR/users.sqlite``) and ``--realm`` override them. `add_user_subcommands` plugs
the commands into `sbc`'s argparse tree; `sbc.cli` calls it.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sbc.cli import add_config_option, command_config, report_config_error
from sbc.config.loader import ConfigError
from sbc.files import give_to_directory_owner
from sbc.registrar.credentials import CredentialError, CredentialStoreError, SqliteCredentials

if TYPE_CHECKING:
    from sbc.config.schema import Config

PasswordPrompt = Callable[[str], str]


class PasswordInputError(Exception):
    """The password could not be read, or the two entries differ."""


def database_path(args: argparse.Namespace, config: Config) -> Path:
    """``--db``, else ``<--state-dir>/users.sqlite``, else the users database the
    registrar of `config` opens."""
    from sbc.assembly import users_db

    if args.db:
        return Path(args.db)
    if args.state_dir:
        registrar = replace(config.registrar, users_db=None)
        config = replace(config, state_dir=Path(args.state_dir), registrar=registrar)
    return users_db(config)


def digest_realm(args: argparse.Namespace, config: Config) -> str:
    """``--realm``, else the registrar's digest realm in `config`."""
    realm: str = args.realm if args.realm is not None else config.registrar.realm
    return realm


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
    try:
        config = command_config(args)
    except ConfigError as exc:
        return report_config_error(exc, "sbc user")
    path = database_path(args, config)
    realm = digest_realm(args, config)
    command: str = args.user_command
    if command != "add" and not path.exists():
        # Reading or changing users must not create an empty database by accident.
        if command == "list":
            print(f"no users ({path} does not exist)", file=sys.stderr)
            return 0
        print(f"sbc user: {path} does not exist", file=sys.stderr)
        return 1
    created = not path.exists()
    try:
        with SqliteCredentials(path, realm) as store:
            if created:
                give_to_directory_owner(path)
            if command == "list":
                for entry in store.entries():
                    print(entry.username + (" (disabled)" if entry.disabled else ""))
            elif command == "add":
                store.add(args.name, read_password(from_stdin=args.password_stdin))
                print(f"added user {args.name} (realm {realm}) to {path}")
            elif command == "passwd":
                store.set_password(args.name, read_password(from_stdin=args.password_stdin))
                print(f"changed the password of {args.name} (realm {realm})")
            elif command == "remove":
                store.remove(args.name)
                print(f"removed user {args.name} (realm {realm})")
            elif command == "disable":
                store.disable(args.name)
                print(f"disabled user {args.name} (realm {realm})")
            else:
                store.enable(args.name)
                print(f"enabled user {args.name} (realm {realm})")
    except (CredentialError, CredentialStoreError, PasswordInputError) as exc:
        print(f"sbc user: {exc}", file=sys.stderr)
        return 1
    return 0


def add_user_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `user add|list|remove|passwd|disable|enable` to `sbc`'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    add_config_option(common)
    common.add_argument(
        "--realm", help="digest realm (default: the configuration's registrar.realm)"
    )
    where = common.add_mutually_exclusive_group()
    where.add_argument(
        "--state-dir",
        help="state directory holding users.sqlite (default: the configuration's "
        "registrar.users_db, else its state_dir)",
    )
    where.add_argument("--db", help="the users database file itself")
    stdin = argparse.ArgumentParser(add_help=False)
    stdin.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )

    user = subparsers.add_parser("user", help="manage the registrar's users")
    add_config_option(user)
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
