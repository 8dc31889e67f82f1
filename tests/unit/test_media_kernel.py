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


def test_base_adds_table_and_media_chains_only() -> None:
    commands = render_base()
    assert commands[0] == {"add": {"table": {"family": "inet", "name": "sbc"}}}
    chains = [c["add"]["chain"] for c in commands[1:]]
    assert [(c["name"], c["hook"], c["prio"], c["type"]) for c in chains] == [
        ("media_prerouting", "prerouting", -300, "filter"),
        ("media_postrouting", "postrouting", 100, "filter"),
    ]
    # Never a flush or delete of the table, never another table.
    assert all(list(c) == ["add"] for c in commands)


def test_install_renders_counter_then_stateless_rewrite_rules() -> None:
    counter, pre, post = (next(iter(c["add"].values())) for c in render_install([FORWARD]))
    assert counter == {"family": "inet", "table": "sbc", "name": FORWARD.name}
    assert pre["chain"] == PREROUTING and post["chain"] == POSTROUTING
    assert pre["comment"] == post["comment"] == FORWARD.name
    matches = [
        (e["match"]["left"].get("payload", e["match"]["left"].get("meta")), e["match"]["right"])
        for e in pre["expr"]
        if "match" in e
    ]
    assert matches == [
        ({"protocol": "ip", "field": "saddr"}, "198.51.100.10"),
        ({"protocol": "ip", "field": "daddr"}, "198.51.100.1"),
        ({"key": "l4proto"}, "udp"),
        ({"protocol": "udp", "field": "sport"}, 34000),
        ({"protocol": "udp", "field": "dport"}, 20000),
    ]
    actions = [e for e in pre["expr"] if "match" not in e]
    assert actions == [
        {"notrack": None},
        {"counter": FORWARD.name},
        {
            "mangle": {
                "key": {"payload": {"protocol": "ip", "field": "daddr"}},
                "value": "203.0.113.20",
            }
        },
        {"mangle": {"key": {"payload": {"protocol": "udp", "field": "dport"}}, "value": 5000}},
    ]
    assert post["expr"][-2:] == [
        {
            "mangle": {
                "key": {"payload": {"protocol": "ip", "field": "saddr"}},
                "value": "203.0.113.1",
            }
        },
        {"mangle": {"key": {"payload": {"protocol": "udp", "field": "sport"}}, "value": 20002}},
    ]


def test_rtcp_mux_leaves_rtcp_to_user_space() -> None:
    forward = KernelForward(**{**FORWARD.__dict__, "spare_rtcp": True})
    pre = render_install([forward])[1]["add"]["rule"]
    spare = [e for e in pre["expr"] if "match" in e and e["match"]["op"] == "!="]
    assert spare == [
        {
            "match": {
                "op": "!=",
                "left": {"payload": {"base": "th", "offset": 72, "len": 8}},
                "right": {"range": [192, 223]},
            }
        }
    ]


def test_ipv6_uses_ip6_payloads() -> None:
    forward = KernelForward(
        "media_x_0_b",
        Endpoint.of("2001:db8:2::20", 5000),
        Endpoint.of("2001:db8:2::1", 20002),
        Endpoint.of("2001:db8:1::1", 20000),
        Endpoint.of("2001:db8:1::10", 34000),
    )
    pre = render_install([forward])[1]["add"]["rule"]
    assert pre["expr"][0]["match"]["left"]["payload"]["protocol"] == "ip6"


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


def test_remove_deletes_rules_by_handle_then_the_counter() -> None:
    commands = render_remove({FORWARD.name: (11, 12)})
    assert commands == [
        {"delete": {"rule": {"family": "inet", "table": "sbc", "chain": PREROUTING, "handle": 11}}},
        {
            "delete": {
                "rule": {"family": "inet", "table": "sbc", "chain": POSTROUTING, "handle": 12}
            }
        },
        {"delete": {"counter": {"family": "inet", "table": "sbc", "name": FORWARD.name}}},
    ]
