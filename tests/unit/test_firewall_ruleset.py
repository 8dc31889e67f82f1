"""The pure renderer: what goes into the one nftables transaction."""

from __future__ import annotations

import shutil
from ipaddress import ip_network

import pytest

from sbc.firewall.bans import Ban
from sbc.firewall.config import FirewallConfig, MediaPorts, PacketMeter, SipPorts
from sbc.firewall.ruleset import (
    COUNTERS,
    DropReason,
    TableInventory,
    is_owned,
    render_apply,
    render_bans,
    render_teardown,
)

CONFIG = FirewallConfig(
    trusted=(ip_network("198.51.100.2/32"), ip_network("2001:db8:9::/48")),
    udp=PacketMeter(rate=50, burst=80),
)


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_fresh_apply_starts_with_the_table_and_never_touches_anything_else() -> None:
    text = render_apply(CONFIG, TableInventory(exists=False))
    out = lines(text)
    assert out[0] == "add table inet sbc"
    assert all(" inet sbc " in line or line.endswith(" inet sbc") for line in out)
    for forbidden in ("flush ruleset", "delete table", "policy drop", "destroy"):
        assert forbidden not in text
    assert not any(line.startswith("delete") or line.startswith("flush") for line in out)


def test_a_start_closes_pinholes_left_open_a_reload_keeps_them() -> None:
    """A crashed process left pinholes in the set: a start empties it (after the
    `add`, in the same transaction); a reload keeps what live sessions opened."""
    started = lines(render_apply(CONFIG, TableInventory(exists=True), close_pinholes=True))
    ensure = started.index("add set inet sbc fw_media_pinholes { type inet_service; }")
    assert started.index("flush set inet sbc fw_media_pinholes") == ensure + 1
    reloaded = lines(render_apply(CONFIG, TableInventory(exists=True)))
    assert not any(line.startswith("flush") for line in reloaded)


def test_base_chains_and_their_priorities() -> None:
    out = lines(render_apply(CONFIG, TableInventory(exists=False)))
    assert (
        "add chain inet sbc fw_prerouting "
        "{ type filter hook prerouting priority -350; policy accept; }"
    ) in out
    assert (
        "add chain inet sbc fw_input { type filter hook input priority -10; policy accept; }"
    ) in out


def test_trusted_sets_and_bypass_come_before_any_drop() -> None:
    out = lines(render_apply(CONFIG, TableInventory(exists=False)))
    assert (
        "add set inet sbc trusted_v4 { type ipv4_addr; flags interval; auto-merge; "
        "elements = { 198.51.100.2/32 }; }"
    ) in out
    assert (
        "add set inet sbc trusted_v6 { type ipv6_addr; flags interval; auto-merge; "
        "elements = { 2001:db8:9::/48 }; }"
    ) in out
    pre = [line for line in out if line.startswith("add rule inet sbc fw_prerouting")]
    first_drop = next(i for i, line in enumerate(pre) if line.endswith(" drop"))
    assert any("@trusted_v4" in line and "accept" in line for line in pre[:first_drop])
    assert any("@trusted_v6" in line and "accept" in line for line in pre[:first_drop])


def test_udp_meters_ipv4_per_address_ipv6_per_64() -> None:
    out = lines(render_apply(CONFIG, TableInventory(exists=False)))
    assert (
        "add rule inet sbc fw_prerouting meta nfproto ipv4 udp dport 5060 add @fw_meter_udp_v4 "
        "{ ip saddr limit rate over 50/second burst 80 packets } "
        'counter name "fw_drop_rate_udp_v4" drop'
    ) in out
    assert (
        "add rule inet sbc fw_prerouting meta nfproto ipv6 udp dport 5060 add @fw_meter_udp_v6 "
        "{ ip6 saddr & ffff:ffff:ffff:ffff:: limit rate over 50/second burst 80 packets } "
        'counter name "fw_drop_rate_udp_v6" drop'
    ) in out
    assert (
        "add set inet sbc fw_meter_udp_v4 "
        "{ type ipv4_addr; size 65536; flags dynamic,timeout; timeout 60s; }"
    ) in out


def test_untrusted_udp_sip_is_capped_in_total_after_the_per_source_meters() -> None:
    out = lines(render_apply(CONFIG, TableInventory(exists=False)))
    total = (
        "add rule inet sbc fw_prerouting udp dport 5060 "
        "limit rate over 2000/second burst 4000 packets "
        'counter name "fw_drop_total_udp" drop'
    )
    assert total in out
    pre = [line for line in out if line.startswith("add rule inet sbc fw_prerouting")]
    trusted = max(i for i, line in enumerate(pre) if "@trusted_v" in line)
    meters = max(i for i, line in enumerate(pre) if "@fw_meter_udp_" in line)
    assert trusted < meters < pre.index(total)  # trusted peers never meet the cap


def test_stream_limits_new_connections_and_ct_count() -> None:
    out = lines(render_apply(CONFIG, TableInventory(exists=False)))
    assert (
        "add rule inet sbc fw_prerouting meta nfproto ipv4 tcp dport 5061 "
        "tcp flags & (syn | ack) == syn add @fw_newconn_tls_v4 "
        "{ ip saddr limit rate over 5/second burst 20 packets } "
        'counter name "fw_drop_newconn_tls_v4" drop'
    ) in out
    assert (
        "add rule inet sbc fw_input meta nfproto ipv6 tcp dport 5060 ct state new "
        "add @fw_connlimit_tcp_v6 { ip6 saddr & ffff:ffff:ffff:ffff:: ct count over 64 } "
        'counter name "fw_drop_connlimit_tcp_v6" drop'
    ) in out


def test_several_ports_and_no_tls() -> None:
    config = FirewallConfig(sip_ports=SipPorts(udp=(5080, 5060), tcp=(5060,), tls=()))
    text = render_apply(config, TableInventory(exists=False))
    assert "udp dport { 5060, 5080 } add @fw_meter_udp_v4" in text
    assert "tls" not in text.replace("fw_drop_rate_tls", "").replace(
        "fw_drop_newconn_tls", ""
    ).replace("fw_drop_connlimit_tls", "")


def test_media_range_closed_except_pinholes() -> None:
    out = lines(render_apply(CONFIG, TableInventory(exists=False)))
    assert "add set inet sbc fw_media_pinholes { type inet_service; }" in out
    assert (
        "add rule inet sbc fw_prerouting udp dport 20000-29999 udp dport != @fw_media_pinholes "
        'counter name "fw_drop_media_closed" drop'
    ) in out
    closed = render_apply(
        FirewallConfig(media_ports=MediaPorts(enabled=False)), TableInventory(exists=False)
    )
    assert "20000-29999" not in closed


def test_every_drop_has_a_named_counter() -> None:
    text = render_apply(CONFIG, TableInventory(exists=False))
    for name in COUNTERS:
        assert f"add counter inet sbc {name}" in text
    for line in lines(text):
        if line.endswith(" drop"):
            assert 'counter name "fw_drop_' in line, line
    assert {r.counter for r in DropReason} <= set(COUNTERS)


def test_reapply_deletes_only_the_firewalls_recreated_objects() -> None:
    inventory = TableInventory(
        exists=True,
        objects=frozenset(
            {
                ("chain", "fw_prerouting"),
                ("chain", "fw_input"),
                ("chain", "media_pre"),
                ("set", "blacklist_v4"),
                ("set", "trusted_v4"),
                ("set", "fw_meter_udp_v4"),
                ("set", "fw_media_pinholes"),
                ("map", "media_streams"),
                ("counter", "fw_drop_blacklist_v4"),
                ("counter", "media_rx"),
            }
        ),
    )
    out = lines(render_apply(CONFIG, inventory))
    deletes = [line for line in out if line.startswith(("delete", "flush"))]
    assert deletes == [
        "flush chain inet sbc fw_input",
        "delete chain inet sbc fw_input",
        "flush chain inet sbc fw_prerouting",
        "delete chain inet sbc fw_prerouting",
        "delete set inet sbc fw_meter_udp_v4",
        "delete set inet sbc trusted_v4",
    ]
    assert out.index(deletes[-1]) < out.index(
        "add set inet sbc trusted_v4 "
        "{ type ipv4_addr; flags interval; auto-merge; "
        "elements = { 198.51.100.2/32 }; }"
    )


def test_bans_restored_in_the_same_transaction() -> None:
    bans = [
        Ban(ip_network("203.0.113.7/32"), 'scanner "x"', created=900.0, expires=1300.0),
        Ban(ip_network("2001:db8:1:2::/64"), "auth", created=900.0, expires=1000.5),
        Ban(ip_network("203.0.113.8/32"), "expired", created=0.0, expires=999.0),
    ]
    text = render_apply(CONFIG, TableInventory(exists=False), bans, now=1000.0)
    out = lines(text)
    assert out[-2:] == [
        "add element inet sbc blacklist_v4 { 203.0.113.7 timeout 300s comment \"scanner 'x'\" }",
        'add element inet sbc blacklist_v6 { 2001:db8:1:2:: timeout 1s comment "auth" }',
    ]
    assert render_bans([], 0.0) == []


def test_teardown_keeps_others_objects() -> None:
    mine = TableInventory(
        exists=True, objects=frozenset({("chain", "fw_input"), ("set", "blacklist_v6")})
    )
    assert render_teardown(mine) == "delete table inet sbc\n"
    shared = TableInventory(
        exists=True,
        objects=frozenset(
            {
                ("chain", "fw_input"),
                ("set", "blacklist_v6"),
                ("counter", "fw_drop_media_closed"),
                ("chain", "media_pre"),
            }
        ),
    )
    assert lines(render_teardown(shared)) == [
        "flush chain inet sbc fw_input",
        "delete chain inet sbc fw_input",
        "delete set inet sbc blacklist_v6",
        "delete counter inet sbc fw_drop_media_closed",
    ]
    assert render_teardown(TableInventory(exists=False)) == ""


def test_ownership() -> None:
    assert is_owned("fw_input") and is_owned("blacklist_v4") and is_owned("trusted_v6")
    assert not is_owned("media_streams") and not is_owned("blacklist") and not is_owned("x")


def test_inventory_from_json() -> None:
    listing = {
        "nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"table": {"family": "inet", "name": "sbc"}},
            {"chain": {"name": "fw_input"}},
            {"set": {"name": "media_x"}},
            {"rule": {"chain": "fw_input"}},
        ]
    }
    inventory = TableInventory.from_json(listing)
    assert inventory.objects == {("chain", "fw_input"), ("set", "media_x")}
    assert inventory.foreign == {("set", "media_x")}
    assert TableInventory.from_json(None) == TableInventory(exists=False)


@pytest.mark.root
@pytest.mark.skipif(shutil.which("nft") is None, reason="nftables not installed")
def test_rendered_ruleset_passes_nft_check(tmp_path: object) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("nft -c needs CAP_NET_ADMIN")
    from sbc.firewall.nft import NftBackend

    bans = [Ban(ip_network("203.0.113.7/32"), "x", 0.0, 10.0)]
    NftBackend().run(render_apply(CONFIG, TableInventory(exists=False), bans, 1.0), check=True)
