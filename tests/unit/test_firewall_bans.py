"""Bans, escalation, the state file, and the blacklist over a fake kernel."""

from __future__ import annotations

import argparse
import json
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from sbc.firewall.bans import Ban, BanTargetError, BlacklistStore, ban_target
from sbc.firewall.blacklist import Blacklist, TrustedTargetError
from sbc.firewall.cli import add_ban_subcommands, ban_add, ban_list, ban_remove, format_listing
from sbc.firewall.config import BanPolicy
from sbc.firewall.nft import CounterValue, NftError


class FakeKernel:
    """Records the nft text it is given; keeps blacklist elements from it."""

    def __init__(self, installed: bool = True) -> None:
        self.installed = installed
        self.commands: list[str] = []
        self.elements: dict[str, dict[str, dict[str, Any]]] = {
            "blacklist_v4": {},
            "blacklist_v6": {},
        }

    def run(self, text: str, *, check: bool = False) -> None:
        if not self.installed:
            raise NftError("apply", "Error: Could not process rule: No such file or directory")
        self.commands.append(text)
        for line in text.splitlines():
            words = line.split()
            name, value = words[4], words[6]
            if words[0] == "add" and "timeout" in words:
                seconds = int(words[words.index("timeout") + 1].rstrip("s"))
                self.elements[name][value] = {"val": value, "timeout": seconds, "expires": seconds}
            elif words[0] == "delete":
                self.elements[name].pop(value, None)

    def list_table(self) -> dict[str, Any] | None:
        return None

    def list_set(self, name: str) -> list[dict[str, Any]] | None:
        if not self.installed:
            return None
        return [{"elem": e} for e in self.elements[name].values()]

    def counters(self) -> dict[str, CounterValue]:
        return {}

    def table_present(self) -> bool:
        return self.installed


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


POLICY = BanPolicy(durations=(60, 600, 3600), forget_after=86400)


def make(tmp_path: Path, kernel: FakeKernel | None = None) -> tuple[Blacklist, FakeKernel, Clock]:
    kernel = kernel or FakeKernel()
    clock = Clock()
    blacklist = Blacklist(
        kernel,
        BlacklistStore(tmp_path / "state" / "bl.json"),
        POLICY,
        trusted=[ip_network("198.51.100.0/29")],
        clock=clock,
    )
    return blacklist, kernel, clock


def test_ban_targets() -> None:
    assert ban_target(ip_address("203.0.113.7")) == ip_network("203.0.113.7/32")
    assert ban_target("2001:db8:1:2:3:4:5:6") == ip_network("2001:db8:1:2::/64")
    assert ban_target("2001:db8:1:2::/64") == ip_network("2001:db8:1:2::/64")
    assert ban_target("2001:db8::1", 56) == ip_network("2001:db8::/56")
    # An IPv4 peer through a dual-stack socket is that IPv4 address, not the mapped /64.
    assert ban_target(ip_address("::ffff:203.0.113.7")) == ip_network("203.0.113.7/32")
    with pytest.raises(BanTargetError, match=r"203.0.113.0/24: IPv4 bans are per address \(/32\)"):
        ban_target("203.0.113.0/24")
    with pytest.raises(BanTargetError, match="'nope' is not an IP address"):
        ban_target("nope")


def test_policy_escalation() -> None:
    assert [POLICY.duration(n) for n in (1, 2, 3, 4, 9)] == [60, 600, 3600, 3600, 3600]


def test_bans_escalate_on_repeat_offences_and_are_forgotten(tmp_path: Path) -> None:
    blacklist, kernel, clock = make(tmp_path)
    target = ip_network("203.0.113.7/32")
    first = blacklist.add(target, "rate-peak")
    assert first is not None and first.duration == 60 and first.offence == 1
    assert kernel.elements["blacklist_v4"]["203.0.113.7"]["timeout"] == 60
    # Still banned: a detector's repeat decision changes nothing.
    assert blacklist.add(target, "rate-peak") is None
    clock.now += 61
    second = blacklist.add(target, "scanner")
    assert second is not None and (second.duration, second.offence) == (600, 2)
    assert kernel.elements["blacklist_v4"]["203.0.113.7"]["timeout"] == 600
    clock.now += 601 + 86400
    third = blacklist.add(target, "scanner")
    assert third is not None and (third.duration, third.offence) == (60, 1)


def test_kernel_add_replaces_an_existing_element(tmp_path: Path) -> None:
    blacklist, kernel, _ = make(tmp_path)
    blacklist.add(ip_network("203.0.113.7/32"), "x", duration=5)
    assert kernel.commands[-1].splitlines() == [
        "add element inet sbc blacklist_v4 { 203.0.113.7 }",
        "delete element inet sbc blacklist_v4 { 203.0.113.7 }",
        'add element inet sbc blacklist_v4 { 203.0.113.7 timeout 5s comment "x" }',
    ]


def test_trusted_never_banned(tmp_path: Path) -> None:
    blacklist, kernel, _ = make(tmp_path)
    with pytest.raises(TrustedTargetError, match=r"198\.51\.100\.3/32 is \(inside\) a trusted"):
        blacklist.add(ip_network("198.51.100.3/32"), "x")
    assert kernel.commands == []


def test_state_file_round_trip_and_restore(tmp_path: Path) -> None:
    blacklist, _, clock = make(tmp_path)
    blacklist.add(ip_network("203.0.113.7/32"), "a")
    blacklist.add(ip_network("2001:db8:1:2::/64"), "b", duration=3)
    data = json.loads((tmp_path / "state" / "bl.json").read_text())
    assert data["version"] == 1
    assert [b["target"] for b in data["bans"]] == ["2001:db8:1:2::/64", "203.0.113.7/32"]
    clock.now += 10
    assert [b.target for b in blacklist.restorable()] == [ip_network("203.0.113.7/32")]


def test_ban_without_table_goes_to_the_file(tmp_path: Path) -> None:
    blacklist, _, _ = make(tmp_path, FakeKernel(installed=False))
    ban = blacklist.add(ip_network("203.0.113.9/32"), "operator")
    assert ban is not None
    entries = blacklist.entries()
    assert [(e.ban.target, e.in_kernel) for e in entries] == [(ban.target, False)]


def test_cli_functions(tmp_path: Path) -> None:
    blacklist, kernel, clock = make(tmp_path)
    ban = ban_add(blacklist, "203.0.113.10", duration=120, reason="seen on honeypot")
    assert ban.reason == "operator: seen on honeypot"
    assert ban_add(blacklist, "2001:db8:5:6::1").target == ip_network("2001:db8:5:6::/64")
    listed = ban_list(blacklist)
    assert [str(e.ban.target) for e in listed] == ["2001:db8:5:6::/64", "203.0.113.10/32"]
    text = format_listing(listed, clock.now)
    assert "203.0.113.10/32" in text and "operator: seen on honeypot" in text
    assert ban_remove(blacklist, "203.0.113.10") is True
    assert "203.0.113.10" not in kernel.elements["blacklist_v4"]
    assert ban_remove(blacklist, "203.0.113.10") is False


def test_argparse_wiring(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blacklist, _, _ = make(tmp_path)
    parser = argparse.ArgumentParser(prog="sbc")
    sub = parser.add_subparsers(dest="command", required=True)
    add_ban_subcommands(sub, lambda args: blacklist)
    args = parser.parse_args(["ban", "add", "203.0.113.11", "--duration", "30", "--reason", "r"])
    assert args.func(args) == 0
    assert "banned 203.0.113.11/32 until" in capsys.readouterr().out
    args = parser.parse_args(["ban", "list", "--json"])
    assert args.func(args) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["target"] == "203.0.113.11/32" and listed[0]["in_kernel"] is True
    args = parser.parse_args(["ban", "add", "198.51.100.1"])
    assert args.func(args) == 2
    assert "trusted" in capsys.readouterr().err
    args = parser.parse_args(["ban", "remove", "203.0.113.99"])
    assert args.func(args) == 1


def test_ban_json_round_trip() -> None:
    ban = Ban(ip_network("2001:db8::/64"), "r", 1.0, 2.0, 3)
    assert Ban.from_json(ban.to_json()) == ban
