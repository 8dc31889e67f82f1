"""Rendering of the kernel fast-path objects (pure; no nftables needed)."""

from __future__ import annotations

import pytest

from sbc.media.kernel import (
    POSTROUTING,
    PREROUTING,
    KernelForward,
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


def _obj(kind: str, **fields: object) -> dict[str, object]:
    return {kind: {"family": "inet", "table": "sbc", **fields}}


def _payload(protocol: str, field: str) -> dict[str, object]:
    return {"payload": {"protocol": protocol, "field": field}}


def _mangle(protocol: str, field: str, value: object) -> dict[str, object]:
    return {"mangle": {"key": _payload(protocol, field), "value": value}}


def test_base_adds_table_chains_maps_and_one_dispatch_rule_per_family() -> None:
    commands = render_base()
    assert commands[0] == {"add": {"table": {"family": "inet", "name": "sbc"}}}
    added = [next(iter(c["add"].items())) for c in commands if "add" in c]
    chains = [body for kind, body in added if kind == "chain"]
    assert [(c["name"], c["hook"], c["prio"], c["type"]) for c in chains] == [
        ("media_prerouting", "prerouting", -300, "filter"),
        ("media_postrouting", "postrouting", 100, "filter"),
    ]
    maps = [body for kind, body in added if kind == "map"]
    v4 = ["ipv4_addr", "inet_service", "ipv4_addr", "inet_service"]
    v6 = ["ipv6_addr", "inet_service", "ipv6_addr", "inet_service"]
    assert [(m["name"], m["type"], m["map"]) for m in maps] == [
        ("media_pre_v4", v4, "verdict"),
        ("media_pre_v6", v6, "verdict"),
        ("media_post_v4", v4, "verdict"),
        ("media_post_v6", v6, "verdict"),
    ]
    # The base chains hold only the dispatch rules: flushed and refilled in the same
    # transaction, so opening twice leaves one rule per family, not two.
    rules = [body for kind, body in added if kind == "rule"]
    assert [(r["chain"], r["expr"][-1]["vmap"]["data"]) for r in rules] == [
        (PREROUTING, "@media_pre_v4"),
        (PREROUTING, "@media_pre_v6"),
        (POSTROUTING, "@media_post_v4"),
        (POSTROUTING, "@media_post_v6"),
    ]
    flushes = [c["flush"]["chain"]["name"] for c in commands if "flush" in c]
    assert flushes == [PREROUTING, POSTROUTING]
    # Never a flush or delete of the table, never another table.
    assert all(list(c) in (["add"], ["flush"]) for c in commands)
    bodies = [body for c in commands[1:] for verb in c.values() for body in verb.values()]
    assert {(b["family"], b["table"]) for b in bodies} == {("inet", "sbc")}


def test_dispatch_rule_looks_up_the_full_latched_tuple() -> None:
    rule = next(
        c["add"]["rule"] for c in render_base() if "rule" in c.get("add", {})
    )  # prerouting, IPv4
    assert rule["expr"] == [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
        {
            "vmap": {
                "key": {
                    "concat": [
                        _payload("ip", "saddr"),
                        _payload("udp", "sport"),
                        _payload("ip", "daddr"),
                        _payload("udp", "dport"),
                    ]
                },
                "data": "@media_pre_v4",
            }
        },
    ]


def test_install_renders_counter_chains_then_dispatch_elements() -> None:
    commands = render_install([FORWARD])
    assert [(verb, kind) for c in commands for verb, body in c.items() for kind in body] == [
        ("add", "counter"),
        ("add", "chain"),
        ("flush", "chain"),
        ("add", "rule"),
        ("add", "chain"),
        ("flush", "chain"),
        ("add", "rule"),
        ("add", "element"),
        ("add", "element"),
    ]
    counter, pre_chain, _, pre, post_chain, _, post, pre_elem, post_elem = (
        next(iter(c.values()))[next(iter(next(iter(c.values()))))] for c in commands
    )
    assert counter == {"family": "inet", "table": "sbc", "name": FORWARD.name}
    assert pre_chain["name"] == pre["chain"] == "media_0123456789ab_0_a_pre"
    assert post_chain["name"] == post["chain"] == "media_0123456789ab_0_a_post"
    # Regular chains: reached only through the dispatch maps.
    assert "hook" not in pre_chain and "hook" not in post_chain
    assert pre["expr"] == [
        {"notrack": None},
        {"counter": FORWARD.name},
        _mangle("ip", "daddr", "203.0.113.20"),
        _mangle("udp", "dport", 5000),
    ]
    assert post["expr"] == [_mangle("ip", "saddr", "203.0.113.1"), _mangle("udp", "sport", 20002)]
    # Strict source: the key is the latched peer's exact address and port.
    assert pre_elem == {
        "family": "inet",
        "table": "sbc",
        "name": "media_pre_v4",
        "elem": [
            [
                {"concat": ["198.51.100.10", 34000, "198.51.100.1", 20000]},
                {"goto": {"target": "media_0123456789ab_0_a_pre"}},
            ]
        ],
    }
    # After the prerouting rewrite the packet runs peer -> other peer.
    assert post_elem["name"] == "media_post_v4"
    assert post_elem["elem"] == [
        [
            {"concat": ["198.51.100.10", 34000, "203.0.113.20", 5000]},
            {"goto": {"target": "media_0123456789ab_0_a_post"}},
        ]
    ]


def test_rtcp_mux_leaves_rtcp_to_user_space() -> None:
    forward = KernelForward(**{**FORWARD.__dict__, "spare_rtcp": True})
    pre = render_install([forward])[3]["add"]["rule"]
    assert pre["expr"][0] == {
        "match": {
            "op": "!=",
            "left": {"payload": {"base": "th", "offset": 72, "len": 8}},
            "right": {"range": [192, 223]},
        }
    }
    assert pre["expr"][1:3] == [{"notrack": None}, {"counter": forward.name}]


def test_ipv6_uses_ip6_payloads_and_v6_maps() -> None:
    forward = KernelForward(
        "media_x_0_b",
        Endpoint.of("2001:db8:2::20", 5000),
        Endpoint.of("2001:db8:2::1", 20002),
        Endpoint.of("2001:db8:1::1", 20000),
        Endpoint.of("2001:db8:1::10", 34000),
    )
    commands = render_install([forward])
    pre, post = commands[3]["add"]["rule"], commands[6]["add"]["rule"]
    assert pre["expr"][-2] == _mangle("ip6", "daddr", "2001:db8:1::10")
    assert post["expr"][0] == _mangle("ip6", "saddr", "2001:db8:1::1")
    pre_elem, post_elem = commands[7]["add"]["element"], commands[8]["add"]["element"]
    assert pre_elem["name"] == "media_pre_v6"
    assert pre_elem["elem"][0][0] == {"concat": ["2001:db8:2::20", 5000, "2001:db8:2::1", 20002]}
    assert post_elem["name"] == "media_post_v6"
    assert post_elem["elem"][0][0] == {"concat": ["2001:db8:2::20", 5000, "2001:db8:1::10", 34000]}


def test_names_must_be_media_prefixed_and_families_consistent() -> None:
    with pytest.raises(ValueError, match="lacks the 'media_' prefix"):
        KernelForward(
            "fw_x", *(FORWARD.source, FORWARD.local_in, FORWARD.local_out, FORWARD.destination)
        )
    with pytest.raises(ValueError, match="mixed address families"):
        KernelForward(
            "media_x",
            Endpoint.of("2001:db8::1", 1),
            FORWARD.local_in,
            FORWARD.local_out,
            FORWARD.destination,
        )


def test_remove_deletes_elements_then_chains_then_the_counter() -> None:
    assert render_remove([FORWARD]) == [
        {"delete": _obj("element", name="media_pre_v4", elem=[FORWARD.pre_key()])},
        {"delete": _obj("element", name="media_post_v4", elem=[FORWARD.post_key()])},
        {"flush": _obj("chain", name="media_0123456789ab_0_a_pre")},
        {"delete": _obj("chain", name="media_0123456789ab_0_a_pre")},
        {"flush": _obj("chain", name="media_0123456789ab_0_a_post")},
        {"delete": _obj("chain", name="media_0123456789ab_0_a_post")},
        {"delete": _obj("counter", name=FORWARD.name)},
    ]
    assert FORWARD.pre_key() == {"concat": ["198.51.100.10", 34000, "198.51.100.1", 20000]}
