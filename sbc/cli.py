"""The ``sbc`` command: run the SBC, check a configuration file."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sbc import __version__


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

    return run(Path(args.config) if args.config else None)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbc", description="Session border controller")
    parser.add_argument("--version", action="version", version=f"sbc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the SBC (the embedded default config without --config)")
    run.add_argument("--config", "-c", help="YAML configuration file")
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
