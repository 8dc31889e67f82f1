"""`sbc ban list|add|remove`: the operators' blacklist commands.

The functions take a `Blacklist` and return what they print, so the web UI and the
REST API can call the same ones. `add_ban_subcommands` plugs them into `sbc`'s
argparse tree; `sbc.cli` calls it. The commands use the ``firewall:`` section of the
configuration ``--config FILE`` names (as ``sbc run --config`` takes it), else
``$SBC_CONFIG``, else the embedded default: its state file (``--state-file``
overrides it), ban durations and trusted networks, as the running SBC does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network, summarize_address_range
from pathlib import Path
from typing import Any

from sbc.cli import add_config_option, command_config, report_config_error
from sbc.config.loader import ConfigError
from sbc.firewall.bans import Ban, BanTargetError
from sbc.firewall.blacklist import BanListing, Blacklist, TrustedTargetError
from sbc.firewall.config import MAX_BAN_SECONDS
from sbc.firewall.detectors import BanReason
from sbc.firewall.nft import Kernel, NftError
from sbc.firewall.ruleset import SET_TRUSTED_V4, SET_TRUSTED_V6


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _ban_seconds(text: str) -> float:
    """`--duration`: the bound of `firewall.bans.durations` (the kernel refuses longer
    element timeouts, and the expiry must be a date)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 1 <= seconds <= MAX_BAN_SECONDS:  # NaN too
        raise argparse.ArgumentTypeError(f"expected seconds 1..{MAX_BAN_SECONDS}, got {text!r}")
    return seconds


def ban_list(blacklist: Blacklist) -> list[BanListing]:
    """The running bans, soonest expiry first."""
    return blacklist.entries()


def ban_add(
    blacklist: Blacklist, address: str, *, duration: float | None = None, reason: str = ""
) -> Ban:
    """Ban an address (IPv6: its prefix) for `duration` s, or the escalated duration.

    Raises `BanTargetError` for a bad address, `TrustedTargetError` for a trusted one.
    """
    target = blacklist.target(address)
    text = f"{BanReason.OPERATOR}: {reason}" if reason else str(BanReason.OPERATOR)
    ban = blacklist.add(target, text, duration=duration)
    if ban is None:  # already banned and no duration given: renew at the policy length
        ban = blacklist.add(target, text, duration=float(blacklist.policy.duration(1)))
    assert ban is not None
    return ban


def ban_remove(blacklist: Blacklist, address: str) -> bool:
    """Lift the ban on an address (IPv6: its prefix). False if it was not banned."""
    return blacklist.remove(blacklist.target(address))


def listing_json(item: BanListing, now: float) -> dict[str, Any]:
    return {
        **item.ban.to_json(),
        "remaining": round(item.ban.remaining(now), 1),
        "in_kernel": item.in_kernel,
    }


def format_listing(items: list[BanListing], now: float) -> str:
    if not items:
        return "no bans"
    rows = [("TARGET", "EXPIRES (UTC)", "LEFT", "#", "REASON")]
    for item in items:
        ban = item.ban
        left = f"{ban.remaining(now):.0f}s" + ("" if item.in_kernel else " (file)")
        rows.append((str(ban.target), _when(ban.expires), left, str(ban.offence), ban.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4]
        for row in rows
    )


# --- argparse ------------------------------------------------------------------

BlacklistFactory = Callable[[argparse.Namespace], Blacklist]


def default_blacklist(args: argparse.Namespace, kernel: Kernel | None = None) -> Blacklist:
    """The running SBC's `Blacklist`, on the live kernel set (or `kernel`).

    Built from the configuration's ``firewall:`` section (`sbc.cli.command_config`)
    as `Firewall` builds its own, ``--state-file`` replacing its state file, and
    trusting what the kernel's trusted sets hold now as well. Raises `ConfigError`
    for a bad configuration before touching the kernel or the file.
    """
    section = command_config(args).firewall
    if args.state_file:
        section = replace(section, state_file=Path(args.state_file))
    if kernel is None:
        from sbc.firewall.nft import NftBackend

        kernel = NftBackend()
    return Blacklist.from_config(section, kernel, trusted=live_trusted(kernel))


def live_trusted(kernel: Kernel) -> list[IPv4Network | IPv6Network]:
    """The trusted networks installed in the kernel now (none if the table is absent).

    The CLI runs apart from the SBC: what the running firewall trusts is what the
    kernel's trusted sets hold.
    """
    networks: list[IPv4Network | IPv6Network] = []
    for name in (SET_TRUSTED_V4, SET_TRUSTED_V6):
        for element in kernel.list_set(name) or []:
            value = element.get("elem", {}).get("val") if isinstance(element, dict) else element
            value = element if value is None else value
            if isinstance(value, str):
                networks.append(ip_network(value))
            elif isinstance(value, dict) and "prefix" in value:
                networks.append(ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}"))
            elif isinstance(value, dict) and "range" in value:
                first, last = (ip_address(a) for a in value["range"])
                networks.extend(summarize_address_range(first, last))
    return networks


def _run(args: argparse.Namespace) -> int:
    factory: BlacklistFactory = args.blacklist_factory
    try:
        blacklist = factory(args)
        now = time.time()
        if args.ban_command == "list":
            items = ban_list(blacklist)
            if args.json:
                print(json.dumps([listing_json(i, now) for i in items], indent=1))
            else:
                print(format_listing(items, now))
        elif args.ban_command == "add":
            ban = ban_add(blacklist, args.address, duration=args.duration, reason=args.reason)
            print(f"banned {ban.target} until {_when(ban.expires)} ({ban.duration:.0f} s)")
        else:
            if not ban_remove(blacklist, args.address):
                print(f"{args.address}: not banned", file=sys.stderr)
                return 1
            print(f"unbanned {blacklist.target(args.address)}")
    except ConfigError as exc:
        return report_config_error(exc, "sbc ban")
    except (BanTargetError, TrustedTargetError, NftError) as exc:
        print(f"sbc ban: {exc}", file=sys.stderr)
        return 2
    return 0


def add_ban_subcommands(
    subparsers: Any, blacklist_factory: BlacklistFactory | None = None
) -> argparse.ArgumentParser:
    """Add `ban list|add|remove` to `sbc`'s subparsers.

    `blacklist_factory(args)` builds the `Blacklist`; the default,
    `default_blacklist`, reads `--config` and `--state-file`. A factory may raise
    `ConfigError`: the command then prints it and exits 2.
    """
    ban = subparsers.add_parser("ban", help="list, add or lift blacklist bans")
    add_config_option(ban)
    ban.add_argument(
        "--state-file",
        help="blacklist state file (default: the configuration's firewall.state_file)",
    )
    ban.set_defaults(func=_run, blacklist_factory=blacklist_factory or default_blacklist)
    sub = ban.add_subparsers(dest="ban_command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    add_config_option(config)
    listing = sub.add_parser("list", parents=[config], help="running bans, with reason and expiry")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    add = sub.add_parser("add", parents=[config], help="ban an address (IPv6: its /64)")
    add.add_argument("address")
    add.add_argument(
        "--duration",
        type=_ban_seconds,
        help=f"seconds, 1..{MAX_BAN_SECONDS} (default: escalating policy)",
    )
    add.add_argument("--reason", default="", help="free text, logged and listed")
    remove = sub.add_parser("remove", parents=[config], help="lift a ban")
    remove.add_argument("address")
    return ban
