"""Upper bounds of the firewall and admission limits, the capped problem report, and
problems inside YAML aliases.

What `sbc check-config` accepts must load and run: an absurd limit (2**64 packets a
second, a ban of 10**20 seconds, a detector window of 1e30 s) is refused at load time
with `file:line: key: reason`, not at nftables apply time or never.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import yaml

from sbc.assembly import admission
from sbc.b2bua.admission import Admitted
from sbc.cli import main
from sbc.config.b2bua import AdmissionLimits
from sbc.config.loader import (
    MAX_REPORTED_PROBLEMS,
    ConfigError,
    check_config,
    load_config_text,
)
from sbc.config.schema import SPEC_KEY, Config, FieldSpec, Section
from sbc.firewall.bans import Ban, BlacklistStore
from sbc.firewall.blacklist import Blacklist
from sbc.firewall.config import FirewallConfig
from sbc.firewall.detectors import Guard, RequestSeen, Scanner
from sbc.firewall.ruleset import SET_TRUSTED_V4, SET_TRUSTED_V6, TableInventory, render_apply
from tests.unit.test_firewall_bans import FakeKernel

BASE = Path("/nonexistent-base")

DAY = 86_400
YEAR = 365 * DAY
MILLION = 1_000_000

#: Every number of the firewall and admission sections: (lowest, highest) accepted.
#: These are the documented bounds; `test_every_limit_is_listed` keeps the table whole.
BOUNDS: dict[str, tuple[float, float]] = {
    **{
        f"firewall.{meter}.{key}": (1, MILLION)
        for meter in (
            "udp",
            "udp_total",
            "tcp.packets",
            "tcp.new_connections",
            "tls.packets",
            "tls.new_connections",
        )
        for key in ("rate", "burst")
    },
    "firewall.tcp.max_connections": (1, 65535),
    "firewall.tls.max_connections": (1, 65535),
    "firewall.sip_ports.udp[0]": (1, 65535),
    "firewall.sip_ports.tcp[0]": (1, 65535),
    "firewall.sip_ports.tls[0]": (1, 65535),
    "firewall.ipv6_prefix_length": (32, 128),
    "firewall.meter_size": (16, 1 << 20),
    "firewall.meter_idle_timeout": (1, DAY),
    "firewall.media_ports.first": (1, 65535),
    "firewall.media_ports.last": (1, 65535),
    "firewall.bans.durations[0]": (1, YEAR),
    "firewall.bans.forget_after": (1, YEAR),
    "firewall.detectors.rate.window": (0.1, DAY),
    "firewall.detectors.rate.max_requests": (1, MILLION),
    "firewall.detectors.auth.window": (1, DAY),
    "firewall.detectors.auth.per_source": (1, MILLION),
    "firewall.detectors.auth.per_user": (1, MILLION),
    "firewall.detectors.scanner.sweep_window": (1, DAY),
    # The sweep detector remembers at most 1024 users per source: more never fires.
    "firewall.detectors.scanner.sweep_users": (2, 1024),
    "firewall.detectors.malformed.window": (1, DAY),
    "firewall.detectors.malformed.max_messages": (1, MILLION),
    **{
        f"{scope}[0].limits.{key}": bound
        for scope in ("realms", "trunks", "routes")
        for key, bound in (
            ("max_calls", (1, MILLION)),
            ("calls_per_second", (0.01, 100_000)),
            ("burst", (1, MILLION)),
        )
    },
}

#: Keys whose range is checked by the section (no "got ..." in the message).
CHECKED_BY_SECTION = {f"firewall.sip_ports.{name}[0]" for name in ("udp", "tcp", "tls")}

#: A realm and a trunk for the admission limits; calls_per_second so that burst applies.
_ADMISSION_BASE: dict[str, Any] = {
    "realms": [
        {
            "name": "a",
            "listen": [{"transport": "udp", "address": "127.0.0.1", "port": 0}],
            "media_address": "127.0.0.1",
            "limits": {"calls_per_second": 10},
        }
    ],
    "trunks": [
        {
            "name": "t",
            "realm": "a",
            "gateways": [{"host": "127.0.0.1"}],
            "limits": {"calls_per_second": 10},
        }
    ],
    "routes": [
        {
            "name": "r",
            "action": "trunk",
            "trunk": "t",
            "emergency": True,
            "limits": {"calls_per_second": 10},
        }
    ],
}


def _numeric_leaves(cls: type[Section], prefix: str) -> Iterator[tuple[str, Any]]:
    """(key path, type) of every int and float field under `cls`, lists as `[0]`."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[field.name]
        path = f"{prefix}.{field.name}"
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(arg for arg in typing.get_args(tp) if arg is not type(None))
        if typing.get_origin(tp) is tuple:
            tp = typing.get_args(tp)[0]
            path += "[0]"
        if isinstance(tp, type) and issubclass(tp, Section):
            yield from _numeric_leaves(tp, path)
        elif tp in (int, float):
            yield path, tp


#: Type (int or float) of every number of the firewall and admission sections.
LEAVES: dict[str, Any] = dict(
    [
        *_numeric_leaves(FirewallConfig, "firewall"),
        *_numeric_leaves(AdmissionLimits, "realms[0].limits"),
        *_numeric_leaves(AdmissionLimits, "trunks[0].limits"),
        *_numeric_leaves(AdmissionLimits, "routes[0].limits"),
    ]
)


def _leaf_type(path: str) -> Any:
    return LEAVES[path]


def _spec(path: str) -> FieldSpec:
    cls: Any = Config
    spec: FieldSpec | None = None
    for part in re.sub(r"\[0\]", "", path).split("."):
        hints = typing.get_type_hints(cls)
        field = next(f for f in dataclasses.fields(cls) if f.name == part)
        spec = field.metadata.get(SPEC_KEY)
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(arg for arg in typing.get_args(tp) if arg is not type(None))
        if typing.get_origin(tp) is tuple:
            tp = typing.get_args(tp)[0]
        cls = tp
    assert spec is not None
    return spec


def document(path: str, value: object) -> str:
    """A configuration with `value` at `path` (`a.b[0].c`), as YAML text."""
    data: dict[str, Any] = copy.deepcopy(_ADMISSION_BASE) if "limits" in path else {}
    if path == "firewall.media_ports.first":
        data["firewall"] = {"media_ports": {"last": 65535}}
    parts = re.findall(r"[a-z0-9_]+|\[0\]", path)
    node: Any = data
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "[0]":
            if last:
                node[0] = value
            else:
                node = node[0]
        elif last:
            node[part] = value
        elif parts[index + 1] == "[0]":
            # A list of one item: the value itself, or a mapping holding it.
            item: Any = None if index + 2 == len(parts) else {}
            node = node.setdefault(part, [item])
        else:
            node = node.setdefault(part, {})
    return yaml.safe_dump(data, sort_keys=False)


def load(text: str) -> Config:
    return load_config_text(text, "sbc.yaml", BASE)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return str(info.value).splitlines()


def value_of(config: Config, path: str) -> Any:
    node: Any = config
    for part in re.findall(r"[a-z0-9_]+|\[0\]", path):
        node = node[0] if part == "[0]" else getattr(node, part)
    return node


def line_of(text: str, written: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if written in line)


def _shown(value: float) -> str:
    return yaml.safe_dump(value).splitlines()[0]


# --- the bounds ----------------------------------------------------------------------


def test_every_limit_is_listed() -> None:
    """Each number of the firewall and admission sections has a bound in BOUNDS."""
    assert set(LEAVES) == set(BOUNDS)


@pytest.mark.parametrize("path", sorted(set(BOUNDS) - CHECKED_BY_SECTION))
def test_the_documented_bound_is_the_schemas(path: str) -> None:
    """The range an error message states is the one in the field's spec."""
    spec = _spec(path)
    assert (spec.min, spec.max) == BOUNDS[path]


@pytest.mark.parametrize("path", sorted(BOUNDS))
def test_the_highest_value_loads(path: str) -> None:
    high = BOUNDS[path][1]
    value: float = float(high) if _leaf_type(path) is float else int(high)
    config = load(document(path, value))
    assert value_of(config, path) == value


@pytest.mark.parametrize("path", sorted(BOUNDS))
def test_just_above_the_bound_is_refused_with_file_line_and_key(path: str) -> None:
    low, high = BOUNDS[path]
    is_float = _leaf_type(path) is float
    value: float = high + 0.5 if is_float else int(high) + 1
    text = document(path, value)
    line = line_of(text, _shown(value))
    if path in CHECKED_BY_SECTION:
        assert errors(text) == [f"sbc.yaml:{line}: {path}: expected an integer 1..65535"]
        return
    noun = "a number" if is_float else "an integer"
    null = " or null" if "limits" in path else ""
    assert errors(text) == [
        f"sbc.yaml:{line}: {path}: expected {noun} {low}..{high}{null}, got {_shown(value)}"
    ]


ABSURD_INTEGERS = [2**32, 2**64, 10**23]
ABSURD_NUMBERS = [1.0e30, 1.7e308, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize(
    ("path", "value"),
    [(p, v) for p in sorted(BOUNDS) for v in ABSURD_INTEGERS]
    + [(p, v) for p in sorted(BOUNDS) if _leaf_type(p) is float for v in ABSURD_NUMBERS],
    ids=str,
)
def test_absurd_values_are_refused_at_load_time(path: str, value: float) -> None:
    text = document(path, value)
    problems = errors(text)
    assert len(problems) == 1
    assert problems[0].startswith(f"sbc.yaml:{line_of(text, _shown(value))}: {path}: expected ")


# --- accepted means it runs ------------------------------------------------------------


@pytest.mark.parametrize("scope", ["realms", "trunks", "routes"])
def test_burst_without_calls_per_second_is_refused_not_a_crash_at_start(scope: str) -> None:
    data = copy.deepcopy(_ADMISSION_BASE)
    data[scope][0]["limits"] = {"max_calls": 5, "burst": 3}
    text = yaml.safe_dump(data, sort_keys=False)
    assert errors(text) == [
        f"sbc.yaml:{line_of(text, 'burst: 3')}: {scope}[0].limits.burst: needs calls_per_second"
    ]


def _admission_at_the_bounds() -> Config:
    limits = {"max_calls": MILLION, "calls_per_second": 100_000, "burst": MILLION}
    data = copy.deepcopy(_ADMISSION_BASE)
    data["realms"][0]["limits"] = limits
    data["trunks"][0]["limits"] = limits
    data["routes"][0]["limits"] = limits
    return load(yaml.safe_dump(data))


@pytest.mark.parametrize("emergency", [False, True])
def test_admission_limits_at_the_bounds_run(emergency: bool) -> None:
    control = admission(_admission_at_the_bounds())
    decisions = [
        control.admit(["a"], "t", now=100.0, route="r", emergency=emergency) for _ in range(1000)
    ]
    assert all(isinstance(d, Admitted) for d in decisions)
    assert control.active("route", "r") == 1000


def _firewall_at_the_bounds(tmp_path: Path) -> Config:
    firewall: dict[str, Any] = {
        "state_file": str(tmp_path / "bans.json"),
        "meter_size": 1 << 20,
        "meter_idle_timeout": DAY,
        "bans": {"durations": [YEAR], "forget_after": YEAR},
        "detectors": {
            "rate": {"window": float(DAY), "max_requests": MILLION},
            "auth": {"window": float(DAY), "per_source": MILLION, "per_user": MILLION},
            "scanner": {"sweep_window": float(DAY), "sweep_users": 1024},
            "malformed": {"window": float(DAY), "max_messages": MILLION},
        },
    }
    meter = {"rate": MILLION, "burst": MILLION}
    firewall["udp"] = firewall["udp_total"] = meter
    for name in ("tcp", "tls"):
        firewall[name] = {"packets": meter, "new_connections": meter, "max_connections": 65535}
    return load(yaml.safe_dump({"firewall": firewall}))


def test_the_longest_ban_is_recorded_and_logged(tmp_path: Path) -> None:
    """Its expiry fits a datetime (the log line) and the state file."""
    config = _firewall_at_the_bounds(tmp_path).firewall
    blacklist = Blacklist.from_config(config, None, clock=lambda: 1_700_000_000.0)
    ban = blacklist.add(ip_network("203.0.113.9/32"), "test")
    assert ban is not None and ban.duration == YEAR
    assert BlacklistStore(tmp_path / "bans.json").read().bans[ban.target] == ban


@pytest.fixture
def ban_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], FakeKernel, Path]:
    """`sbc ban` with a configuration of its own, and a fake kernel (never the host's)."""
    kernel = FakeKernel()
    kernel.elements[SET_TRUSTED_V4] = {}
    kernel.elements[SET_TRUSTED_V6] = {}
    monkeypatch.setattr("sbc.firewall.nft.NftBackend", lambda: kernel)
    state = tmp_path / "bans.json"
    config = tmp_path / "sbc.yaml"
    config.write_text(f"firewall: {{state_file: {state}}}\n", encoding="utf-8")
    return ["ban", "--config", str(config)], kernel, state


@pytest.mark.parametrize("duration", ["1e20", "inf", "nan", "0", "-5", str(YEAR + 1)])
def test_an_operators_ban_duration_has_the_same_bound(
    ban_command: tuple[list[str], FakeKernel, Path],
    capsys: pytest.CaptureFixture[str],
    duration: str,
) -> None:
    """`sbc ban add --duration` refuses what the kernel or the log's date cannot take
    (a traceback before, or a ban of -5 s), and bans nothing."""
    command, kernel, state = ban_command
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "add", "203.0.113.9", "--duration", duration])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --duration: expected seconds 1..{YEAR}, got {duration!r}" in err
    assert not state.exists() and not kernel.commands


def test_an_operators_longest_ban_is_taken(
    ban_command: tuple[list[str], FakeKernel, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    command, kernel, state = ban_command
    assert main([*command, "add", "203.0.113.9", "--duration", str(YEAR)]) == 0
    assert f"({YEAR} s)" in capsys.readouterr().out
    assert kernel.elements["blacklist_v4"]["203.0.113.9"]["timeout"] == YEAR
    (ban,) = BlacklistStore(state).read().bans.values()
    assert ban.duration == YEAR


def test_the_most_sweep_users_still_fires() -> None:
    """sweep_users at its bound is reachable: the detector remembers that many users."""
    config = load(document("firewall.detectors.scanner.sweep_users", 1024)).firewall
    scanner = Scanner(config.detectors.scanner)
    source = ip_address("203.0.113.5")
    decisions = [
        scanner.observe(RequestSeen(source, "OPTIONS", target_user=f"u{i}"), now=1.0)
        for i in range(1024)
    ]
    assert [bool(d) for d in decisions] == [False] * 1023 + [True]


def test_detectors_at_the_bounds_run(tmp_path: Path) -> None:
    guard = Guard(_firewall_at_the_bounds(tmp_path).firewall.detectors)
    source = ip_address("203.0.113.5")
    for now in (0.0, DAY - 1.0, DAY + 1.0, 1e9):
        assert guard.observe(RequestSeen(source, "OPTIONS", target_user="x"), now) == []


def _find(data: object, key: str) -> Iterator[Any]:
    """Every value under `key` anywhere in nftables' JSON."""
    if isinstance(data, dict):
        for name, value in data.items():
            if name == key:
                yield value
            yield from _find(value, key)
    elif isinstance(data, list):
        for value in data:
            yield from _find(value, key)


@pytest.mark.root
def test_every_firewall_limit_at_its_bound_loads_into_nftables(tmp_path: Path) -> None:
    """The ruleset of a configuration with every firewall limit at its highest, and a
    ban of the longest duration, applies in a fresh network namespace, and the kernel
    keeps every value as given (a burst above 2**32 - 1 would wrap, silently)."""
    from tests.netns import Lab, can_run_lab

    reason = can_run_lab()
    if reason is not None:
        pytest.skip(reason)
    try:
        from sbc.firewall.nft import NftBackend, NftUnavailableError

        NftBackend()
    except NftUnavailableError as exc:
        pytest.skip(str(exc))
    config = _firewall_at_the_bounds(tmp_path).firewall
    ban = Ban(ip_network("203.0.113.7/32"), "longest", 1000.0, 1000.0 + YEAR)
    text = render_apply(config, TableInventory(exists=False), [ban], 1000.0)
    with Lab() as lab:
        lab.add("fw")
        with lab.inside("fw"):
            # Created in the namespace: its netlink socket stays there.
            kernel = NftBackend()
            kernel.run(text, check=True)
            kernel.run(text)
            listing = kernel.list_table()
    assert listing is not None
    items = listing["nftables"]
    rules = [item["rule"] for item in items if "rule" in item]
    limits = list(_find(rules, "limit"))
    # udp v4/v6 + total, and packets + new connections of tcp and tls, v4 and v6.
    assert len(limits) == 11
    assert all(
        (lim["rate"], lim["burst"], lim["per"]) == (MILLION, MILLION, "second") for lim in limits
    )
    assert [count["val"] for count in _find(rules, "ct count")] == [65535] * 4
    meters = {s["name"]: s for item in items if "set" in item for s in [item["set"]]}
    assert all(meters[name]["size"] == 1 << 20 for name in meters if name.startswith("fw_meter_"))
    assert meters["fw_meter_udp_v4"]["timeout"] == DAY
    elements = meters["blacklist_v4"]["elem"]
    assert [(e["elem"]["val"], e["elem"]["timeout"]) for e in elements] == [("203.0.113.7", YEAR)]


# --- the problem report is capped ---------------------------------------------------


def _unknown_keys(count: int) -> str:
    return "".join(f"unknown{i}: 1\n" for i in range(count))


@pytest.mark.parametrize(
    ("count", "summary"),
    [
        (MAX_REPORTED_PROBLEMS, None),
        (MAX_REPORTED_PROBLEMS + 1, "... and 1 more problem"),
        (1000, f"... and {1000 - MAX_REPORTED_PROBLEMS} more problems"),
    ],
)
def test_check_config_reports_the_first_problems_then_how_many_more(
    tmp_path: Path, count: int, summary: str | None
) -> None:
    assert MAX_REPORTED_PROBLEMS == 50
    path = tmp_path / "sbc.yaml"
    path.write_text(_unknown_keys(count), encoding="utf-8")
    status, messages = check_config(path)
    assert status == 1
    shown = [f"{path}:{i + 1}: unknown key 'unknown{i}'" for i in range(min(count, 50))]
    assert messages == shown + ([f"{path}: {summary}"] if summary else [])


def test_the_first_problems_are_the_first_by_line_not_the_first_found() -> None:
    """A cross-field problem is found after every field, yet sorts by its line."""
    text = (
        "sip: {listen: [{transport: tcp, address: 127.0.0.1, port: 8080}]}\n"
        "management: {listen: {port: 8080}}\n" + _unknown_keys(100)
    )
    problems = errors(text)
    assert len(problems) == 51
    assert problems[0].startswith("sbc.yaml:2: management.listen: 127.0.0.1:8080 is already used")
    assert problems[1] == "sbc.yaml:3: unknown key 'unknown0'"
    assert problems[-1] == "sbc.yaml: ... and 51 more problems"


def test_every_reporting_path_is_capped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sbc.yaml"
    path.write_text(_unknown_keys(300), encoding="utf-8")
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 51 and err[-1] == f"{path}: ... and 250 more problems"
    # The commands that read the running SBC's file (sbc user, sbc ban).
    assert main(["user", "--config", str(path), "list"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [
        f"{path}: ... and 250 more problems",
        "sbc user: configuration refused, nothing changed",
    ]
    assert len(err) == 52


def test_a_pathological_file_is_reported_in_a_few_lines(tmp_path: Path) -> None:
    """Aliases let 1 MB stand for most of a million problems: 51 lines still."""
    path = tmp_path / "sbc.yaml"
    count = 5_000
    path.write_text("realms: [&r {bad: 1}" + ", *r" * count + "]\n", encoding="utf-8")
    status, messages = check_config(path)
    assert status == 1
    assert len(messages) == 51
    assert messages[-1] == f"{path}: ... and {4 * (count + 1) - 50} more problems"


# --- problems inside aliases are placed where the alias is used ------------------------

REALMS = """\
realms:
  - name: a
    listen: [{transport: udp, address: 127.0.0.1, port: 5070}]
    media_address: 127.0.0.1
    limits: &lim
      calls_per_second: 10
      max_calls: 0
  - name: b
    listen: [{transport: udp, address: 127.0.0.1, port: 5071}]
    media_address: 127.0.0.1
    limits: *lim
"""


def test_a_problem_in_an_aliased_value_is_placed_at_the_alias() -> None:
    assert errors(REALMS) == [
        "sbc.yaml:7: realms[0].limits.max_calls: expected an integer 1..1000000 or null, got 0",
        "sbc.yaml:11: realms[1].limits.max_calls: expected an integer 1..1000000 or null,"
        " got 0 (from line 7 via alias *lim)",
    ]


def test_an_aliased_scalar_is_placed_at_the_alias() -> None:
    text = REALMS.replace("max_calls: 0", "max_calls: &n 0").replace(
        "limits: *lim", "limits: {max_calls: *n}"
    )
    assert errors(text)[1] == (
        "sbc.yaml:11: realms[1].limits.max_calls: expected an integer 1..1000000 or null,"
        " got 0 (from line 7 via alias *n)"
    )


def test_an_alias_of_the_wrong_kind_names_its_anchor() -> None:
    text = REALMS.replace("max_calls: 0", "max_calls: 1").replace(
        "    listen: [{transport: udp, address: 127.0.0.1, port: 5071}]",
        "    listen: *lim",
    )
    assert errors(text) == [
        "sbc.yaml:9: realms[1].listen: expected a list, got a mapping (from line 5 via alias *lim)"
    ]


def test_cross_field_problems_of_an_aliased_item_are_placed_at_the_alias() -> None:
    text = """\
realms:
  - &c
    name: c
    listen: [{transport: udp, address: 127.0.0.1, port: 0}]
    media_address: 127.0.0.1
    registrar: true
  - *c
"""
    assert errors(text) == [
        "sbc.yaml:7: realms[1].name: duplicate realm 'c' (from line 3 via alias *c)"
    ]
    text = text.replace(
        "registrar: true", "registrar: true\n    register_relay: {realm: c, host: 127.0.0.2}"
    )
    assert errors(text) == [
        "sbc.yaml:2: realms[0]: registrar and register_relay exclude each other",
        "sbc.yaml:8: realms[1]: registrar and register_relay exclude each other"
        " (from line 2 via alias *c)",
        "sbc.yaml:8: realms[1].name: duplicate realm 'c' (from line 3 via alias *c)",
    ]
