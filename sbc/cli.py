"""The ``sbc`` command: run the SBC, check a configuration file."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

from sbc import __version__

if TYPE_CHECKING:
    from sbc.config.loader import ConfigError
    from sbc.config.schema import Config

#: The configuration file `sbc run`, `sbc user` and `sbc ban` read when `--config` is
#: not given.
CONFIG_ENV: Final = "SBC_CONFIG"
#: The appliance's configuration: what `sbc user` and `sbc ban` act on when neither
#: `--config` nor $SBC_CONFIG names a file (sudo drops $SBC_CONFIG). `sbc run` does not
#: fall back to it: the service names its file, `make run` means the embedded default.
SYSTEM_CONFIG: Final = Path("/etc/sbc/sbc.yaml")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _cmd_run(args: argparse.Namespace) -> int:
    from sbc.app import run

    path = args.config or os.environ.get(CONFIG_ENV)
    return run(Path(path) if path else None)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from sbc.config.loader import check_config

    result = check_config(Path(args.file))
    stream = sys.stdout if result.status == 0 else sys.stderr
    for line in result.messages:
        print(line, file=stream)
    return result.status


def _cmd_default_config(args: argparse.Namespace) -> int:
    from sbc.config.loader import default_config_text

    sys.stdout.write(default_config_text())
    return 0


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config/-c FILE`` for a command that acts on the running SBC's files.

    The default is SUPPRESS so that the option can be given before and after a
    subcommand (`sbc user -c F add alice`, `sbc user add alice -c F`): a subcommand
    that did not see it leaves the value given before it alone.
    """
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"YAML configuration as `sbc run` takes it (default: ${CONFIG_ENV}, "
        "else the embedded default configuration)",
    )


def command_config(args: argparse.Namespace) -> Config:
    """``--config``, else the file ``$SBC_CONFIG`` names, else the appliance's
    `SYSTEM_CONFIG` if there is one, else the embedded default.

    Raises `ConfigError` for an unreadable or invalid file.
    """
    from sbc.config.loader import default_config, load_config

    path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV)
    if path:
        return load_config(Path(path))
    try:
        system = SYSTEM_CONFIG.is_file()
    except OSError:
        system = True  # there, but not for us: load_config says so, with the reason
    if system:
        return load_config(SYSTEM_CONFIG)
    return default_config()


def report_config_error(exc: ConfigError, command: str) -> int:
    """Print every problem (``file:line: key: reason``) to stderr; the exit status, 2."""
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    print(f"{command}: configuration refused, nothing changed", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbc", description="Session border controller")
    parser.add_argument("--version", action="version", version=f"sbc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the SBC (the embedded default config without --config)")
    run.add_argument(
        "--config", "-c", help=f"YAML configuration file (default: ${CONFIG_ENV}, else embedded)"
    )
    run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file")
    check.set_defaults(func=_cmd_check_config)
    default = sub.add_parser("default-config", help="print the embedded default configuration")
    default.set_defaults(func=_cmd_default_config)
    from sbc.firewall.cli import add_ban_subcommands

    add_ban_subcommands(sub)
    from sbc.registrar.cli import add_user_subcommands

    add_user_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status
