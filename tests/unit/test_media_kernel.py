"""Rendering of the kernel fast-path objects (pure), and `KernelMediaTable`'s
bookkeeping over a recording binding (no nftables needed)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from sbc.media.kernel import (
    POSTROUTING,
    PREROUTING,
    KernelCounter,
    KernelForward,
    KernelMediaTable,
    KernelPathUnavailable,
    render_base,
    render_install,
    render_remove,
)
from sbc.media.values import Endpoint

FORWARD = KernelForward(
    name="media_0123456789ab_0_a",
    source=Endpoint.of("198.51.100.10", 34000),
    local_in=Endpoint.of("198.51.100.1", 20000),
    local_out=Endpoint.of("203.0.113.1", 20002),
    destination=Endpoint.of("203.0.113.20", 5000),
)
V4 = ["ipv4_addr", "inet_service", "ipv4_addr", "inet_service"]
V6 = ["ipv6_addr", "inet_service", "ipv6_addr", "inet_service"]


def _payload(protocol: str, field: str) -> dict[str, object]:
    return {"payload": {"protocol": protocol, "field": field}}


def _tuple(ip: str) -> dict[str, object]:
    fields = [(ip, "saddr"), ("udp", "sport"), (ip, "daddr"), ("udp", "dport")]
    return {"concat": [_payload(p, f) for p, f in fields]}


def _rewrite(protocol: str, field: str, ip: str, data: str) -> dict[str, object]:
    value = {"map": {"key": _tuple(ip), "data": data}}
    return {"mangle": {"key": _payload(protocol, field), "value": value}}


def _elements(commands: list[dict[str, Any]], verb: str = "add") -> dict[str, list[Any]]:
    return {c[verb]["element"]["name"]: c[verb]["element"]["elem"] for c in commands}


def test_base_adds_table_chains_sets_maps_and_three_rules_per_family() -> None:
    commands = render_base()
    assert commands[0] == {"add": {"table": {"family": "inet", "name": "sbc"}}}
    added = [next(iter(c["add"].items())) for c in commands if "add" in c]
    chains = [body for kind, body in added if kind == "chain"]
    assert [(c["name"], c["hook"], c["prio"], c["type"]) for c in chains] == [
        ("media_prerouting", "prerouting", -300, "filter"),
        ("media_postrouting", "postrouting", 100, "filter"),
    ]
    sets = {b["name"]: b for kind, b in added if kind == "set"}
    assert sets["media_fwd_v4"]["type"] == V4 and sets["media_mux_v6"]["type"] == V6
    # Only the forwards' set counts: one counter per element, no named counters.
    assert sets["media_fwd_v4"]["stmt"] == [{"counter": None}]
    assert "stmt" not in sets["media_mux_v4"]
    maps = {b["name"]: (b["type"], b["map"]) for kind, b in added if kind == "map"}
    assert maps == {
        "media_daddr_v4": (V4, "ipv4_addr"),
        "media_dport_v4": (V4, "inet_service"),
        "media_saddr_v4": (V4, "ipv4_addr"),
        "media_sport_v4": (V4, "inet_service"),
        "media_daddr_v6": (V6, "ipv6_addr"),
        "media_dport_v6": (V6, "inet_service"),
        "media_saddr_v6": (V6, "ipv6_addr"),
        "media_sport_v6": (V6, "inet_service"),
    }
    # The base chains hold only the media rules: flushed and refilled in the same
    # transaction, so opening twice leaves three rules per family, not six.
    flushed = [c["flush"]["chain"]["name"] for c in commands if "flush" in c]
    assert flushed == [PREROUTING, POSTROUTING]
    rules = [body for kind, body in added if kind == "rule"]
    assert [r["chain"] for r in rules] == [PREROUTING, PREROUTING, POSTROUTING] * 2
    assert all(not any("counter" in e for e in r["expr"]) for r in rules)
    assert not any(kind == "counter" for kind, _ in added)


def test_prerouting_counts_the_latched_tuple_then_rewrites_the_destination() -> None:
    rules = [c["add"]["rule"] for c in render_base() if "rule" in c.get("add", {})]
    spare, forward, source = rules[:3]
    udp_v4 = [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
    ]
    # RTCP on an rtcp-mux port (second octet 192..223) goes on to user space.
    assert spare["expr"] == [
        *udp_v4,
        {"match": {"op": "==", "left": _tuple("ip"), "right": "@media_mux_v4"}},
        {
            "match": {
                "op": "==",
                "left": {"payload": {"base": "th", "offset": 72, "len": 8}},
                "right": {"range": [192, 223]},
            }
        },
        {"accept": None},
    ]
    # The exact latched source, or nothing: strict source in the kernel.
    assert forward["expr"] == [
        *udp_v4,
        {"match": {"op": "==", "left": _tuple("ip"), "right": "@media_fwd_v4"}},
        {"notrack": None},
        _rewrite("ip", "daddr", "ip", "@media_daddr_v4"),
        _rewrite("udp", "dport", "ip", "@media_dport_v4"),
    ]
    assert source["expr"] == [
        *udp_v4,
        _rewrite("ip", "saddr", "ip", "@media_saddr_v4"),
        _rewrite("udp", "sport", "ip", "@media_sport_v4"),
    ]
    v6 = [c["add"]["rule"] for c in render_base() if "rule" in c.get("add", {})][3:]
    assert v6[1]["expr"][-1] == _rewrite("udp", "dport", "ip6", "@media_dport_v6")
    assert v6[2]["expr"][-2] == _rewrite("ip6", "saddr", "ip6", "@media_saddr_v6")


def test_install_keys_each_rewrite_by_the_tuple_the_one_before_left() -> None:
    commands = render_install([FORWARD])
    latched = {"concat": ["198.51.100.10", 34000, "198.51.100.1", 20000]}
    assert _elements(commands) == {
        # peer -> SBC port: to the other peer's address ...
        "media_daddr_v4": [[latched, "203.0.113.20"]],
        # ... then, with that address, to its port.
        "media_dport_v4": [[{"concat": ["198.51.100.10", 34000, "203.0.113.20", 20000]}, 5000]],
        # After routing: the SBC's address on the other side ...
        "media_saddr_v4": [
            [{"concat": ["198.51.100.10", 34000, "203.0.113.20", 5000]}, "203.0.113.1"]
        ],
        # ... then its port.
        "media_sport_v4": [[{"concat": ["203.0.113.1", 34000, "203.0.113.20", 5000]}, 20002]],
        "media_fwd_v4": [latched],
    }
    # The set the prerouting rule matches first is filled last: no packet finds a
    # half-made forward.
    assert commands[-1]["add"]["element"]["name"] == "media_fwd_v4"


def test_rtcp_mux_puts_the_tuple_in_the_mux_set() -> None:
    forward = replace(FORWARD, spare_rtcp=True)
    elements = _elements(render_install([forward]))
    assert elements["media_mux_v4"] == elements["media_fwd_v4"]
    assert "media_mux_v4" not in _elements(render_install([FORWARD]))


def test_forwards_share_one_command_per_set_and_ipv6_goes_to_v6() -> None:
    other = KernelForward(
        "media_x_0_b",
        Endpoint.of("2001:db8:2::20", 5000),
        Endpoint.of("2001:db8:2::1", 20002),
        Endpoint.of("2001:db8:1::1", 20000),
        Endpoint.of("2001:db8:1::10", 34000),
    )
    second = replace(FORWARD, name="media_y_0_a")
    elements = _elements(render_install([FORWARD, other, second]))
    assert len(elements["media_fwd_v4"]) == 2
    assert elements["media_fwd_v6"] == [
        {"concat": ["2001:db8:2::20", 5000, "2001:db8:2::1", 20002]}
    ]
    assert elements["media_saddr_v6"] == [
        [{"concat": ["2001:db8:2::20", 5000, "2001:db8:1::10", 34000]}, "2001:db8:1::1"]
    ]


def test_names_must_be_media_prefixed_and_families_consistent() -> None:
    ends = (FORWARD.source, FORWARD.local_in, FORWARD.local_out, FORWARD.destination)
    with pytest.raises(ValueError, match="lacks the 'media_' prefix"):
        KernelForward("fw_x", *ends)
    with pytest.raises(ValueError, match="mixed address families"):
        KernelForward("media_x", Endpoint.of("2001:db8::1", 1), *ends[1:])
    with pytest.raises(ValueError, match="cannot change address family"):
        KernelForward(
            "media_x",
            *ends[:2],
            Endpoint.of("2001:db8::1", 1),
            Endpoint.of("2001:db8::2", 2),
        )


def test_remove_deletes_the_counted_tuple_first_keys_only() -> None:
    commands = render_remove([FORWARD])
    assert commands[0]["delete"]["element"]["name"] == "media_fwd_v4"
    deleted = _elements(commands, "delete")
    assert deleted["media_daddr_v4"] == [
        {"concat": ["198.51.100.10", 34000, "198.51.100.1", 20000]}
    ]
    assert sorted(deleted) == sorted(_elements(render_install([FORWARD])))


class RecordingBinding:
    """Stands in for libnftables: records JSON batches, answers `list set` with
    nft's text (as the real one prints a counted set; `sets` holds each
    element's tuple and counts)."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.listed: list[str] = []
        self.sets: dict[str, list[tuple[tuple[str, int, str, int], int, int]]] = {}
        self.json_output = False

    def set_json_output(self, value: bool) -> None:
        self.json_output = value

    def set_echo_output(self, value: bool) -> None: ...
    def set_handle_output(self, value: bool) -> None: ...

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]:
        self.batches.append(json_root["nftables"])
        return 0, None, ""

    def cmd(self, cmdline: str) -> tuple[int, str, str]:
        assert not self.json_output, "counters are read from the text listing"
        self.listed.append(cmdline)
        name = cmdline.split()[-1]
        elements = ",\n\t\t\t     ".join(
            f"{a} . {ap} . {b} . {bp} counter packets {packets} bytes {octets}"
            for (a, ap, b, bp), packets, octets in self.sets.get(name, [])
        )
        family = "ipv6_addr" if name.endswith("v6") else "ipv4_addr"
        text = (
            f"table inet sbc {{\n\tset {name} {{\n"
            f"\t\ttype {family} . inet_service . {family} . inet_service\n\t\tcounter\n"
            + (f"\t\telements = {{ {elements} }}\n" if elements else "")
            + "\t}\n}\n"
        )
        return 0, text, ""


def _forward(name: str, port: int, local_in: str = "198.51.100.1") -> KernelForward:
    return KernelForward(
        name,
        Endpoint.of("198.51.100.10", port),
        Endpoint.of(local_in, 20000),
        Endpoint.of("203.0.113.1", 20002),
        Endpoint.of("203.0.113.20", 5000),
    )


def test_a_forward_needing_another_forwards_element_is_refused() -> None:
    """Second keys drop one field: one peer source reaching two SBC addresses on the
    same port, forwarded to one address, would share the port rewrite."""
    nft = RecordingBinding()
    table = KernelMediaTable(nft)
    table.install([_forward("media_s1_0_a", 34000)])
    with pytest.raises(KernelPathUnavailable, match=r"media_dport element .* is media_s1_0_a.s"):
        table.install([_forward("media_s2_0_a", 34000, local_in="198.51.100.2")])
    assert len(nft.batches) == 1 and table.installed == {"media_s1_0_a"}
    # Once the first is gone (in the same transaction too) the second fits.
    table.apply(["media_s1_0_a"], [_forward("media_s2_0_a", 34000, local_in="198.51.100.2")])
    assert table.installed == {"media_s2_0_a"}
    # Installing a name again replaces it: its old elements go in the same batch.
    table.install([_forward("media_s2_0_a", 34002, local_in="198.51.100.2")])
    verbs = [next(iter(c)) for c in nft.batches[-1]]
    assert verbs == ["delete"] * 5 + ["add"] * 5


def test_counters_come_from_the_counted_set_by_latched_tuple() -> None:
    nft = RecordingBinding()
    table = KernelMediaTable(nft)
    assert table.counters() == {} and nft.listed == []  # nothing installed: no listing
    table.install([_forward("media_s1_0_a", 34000), _forward("media_s2_0_a", 34002)])
    nft.sets["media_fwd_v4"] = [
        (("198.51.100.10", 34000, "198.51.100.1", 20000), 7, 1400),
        # Someone else's element (a previous run's, say): not a forward of ours.
        (("198.51.100.99", 1, "198.51.100.1", 20000), 1, 1),
        (("198.51.100.10", 34002, "198.51.100.1", 20000), 0, 0),
    ]
    assert table.counters() == {
        "media_s1_0_a": KernelCounter(7, 1400),
        "media_s2_0_a": KernelCounter(0, 0),
    }
    assert nft.listed == ["list set inet sbc media_fwd_v4"]
    assert nft.json_output  # the batches go on in JSON


def test_counters_match_an_ipv6_tuple_whatever_its_spelling() -> None:
    """nftables prints addresses with inet_ntop: an IPv4-mapped IPv6 address,
    spelled otherwise by Python, still finds its forward."""
    nft = RecordingBinding()
    table = KernelMediaTable(nft)
    forward = KernelForward(
        "media_s6_0_a",
        Endpoint.of("::ffff:198.51.100.10", 34000),
        Endpoint.of("2001:db8:2::1", 20002),
        Endpoint.of("2001:db8:1::1", 20000),
        Endpoint.of("2001:db8:1::10", 5000),
    )
    table.install([forward])
    # As nft prints it (inet_ntop): Python spells the source ::ffff:c633:640a.
    nft.sets["media_fwd_v6"] = [
        (("::ffff:198.51.100.10", 34000, "2001:db8:2::1", 20002), 3, 516),
    ]
    assert table.counters() == {"media_s6_0_a": KernelCounter(3, 516)}
