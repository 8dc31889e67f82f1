"""Removal of the kernel fast path's base objects on stop (pure rendering, a fake
libnftables binding, and `MediaRelay.close()` driving it)."""

from __future__ import annotations

import asyncio
import json
import logging
from ipaddress import IPv4Address
from typing import Any

import pytest

from sbc.media.config import MediaConfig, RealmMediaAddress
from sbc.media.kernel import (
    KernelMediaTable,
    KernelPathUnavailable,
    MediaTeardown,
    TableObject,
    render_remove_objects,
    render_teardown,
    table_objects,
)
from sbc.media.relay import MediaRelay

FWD = "media_0123456789ab_0_a"
_DISPATCH_KEY = ["ipv4_addr", "inet_service", "ipv4_addr", "inet_service"]

#: `nft -j list table inet sbc` (libnftables 1.0.6) with the media base objects, one
#: forward and two firewall objects; rules and map elements trimmed to what matters.
LISTING: list[dict[str, Any]] = [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "sbc", "handle": 1}},
    {"counter": {"family": "inet", "name": FWD, "table": "sbc", "handle": 11, "packets": 0}},
    {
        "map": {
            "family": "inet",
            "name": "media_pre_v4",
            "table": "sbc",
            "type": _DISPATCH_KEY,
            "handle": 3,
            "map": "verdict",
            "elem": [[{"concat": ["198.51.100.10", 34000, "198.51.100.1", 20000]}, {}]],
        }
    },
    {"map": {"family": "inet", "name": "media_post_v4", "table": "sbc", "handle": 5}},
    {"set": {"family": "inet", "name": "blacklist_v4", "table": "sbc", "handle": 17}},
    {"chain": {"family": "inet", "table": "sbc", "name": "media_prerouting", "handle": 1}},
    {"chain": {"family": "inet", "table": "sbc", "name": f"{FWD}_pre", "handle": 12}},
    {"chain": {"family": "inet", "table": "sbc", "name": "fw_input", "handle": 16}},
    {"rule": {"family": "inet", "table": "sbc", "chain": "media_prerouting", "handle": 7}},
    {"rule": {"family": "inet", "table": "sbc", "chain": "fw_input", "handle": 18}},
]
FIREWALL_NAMES = {"blacklist_v4", "fw_input"}


def _obj(kind: str, name: str) -> dict[str, Any]:
    return {kind: {"family": "inet", "table": "sbc", "name": name}}


def _media_only(listing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def keep(item: dict[str, Any]) -> bool:
        body = next(iter(item.values()))
        return body.get("name", body.get("chain")) not in FIREWALL_NAMES

    return [item for item in listing if keep(item)]


MEDIA_REMOVAL = [
    # Chains emptied first (rules hold counters and maps) ...
    {"flush": _obj("chain", "media_prerouting")},
    {"flush": _obj("chain", f"{FWD}_pre")},
    # ... then the maps (their elements hold the forwards' chains) ...
    {"delete": _obj("map", "media_pre_v4")},
    {"delete": _obj("map", "media_post_v4")},
    # ... then the chains, then the counters.
    {"delete": _obj("chain", "media_prerouting")},
    {"delete": _obj("chain", f"{FWD}_pre")},
    {"delete": _obj("counter", FWD)},
]
DELETE_TABLE = {"delete": {"table": {"family": "inet", "name": "sbc"}}}


def test_listing_yields_named_objects_without_table_rules_or_metainfo() -> None:
    assert table_objects(LISTING) == (
        TableObject("counter", FWD),
        TableObject("map", "media_pre_v4"),
        TableObject("map", "media_post_v4"),
        TableObject("set", "blacklist_v4"),
        TableObject("chain", "media_prerouting"),
        TableObject("chain", f"{FWD}_pre"),
        TableObject("chain", "fw_input"),
    )
    assert {o.name for o in table_objects(LISTING) if not o.media} == FIREWALL_NAMES
    # Whatever nftables lists is an object: a flowtable or ct helper keeps the table.
    assert table_objects([{"ct helper": {"name": "sip", "table": "sbc"}}]) == (
        TableObject("ct helper", "sip"),
    )


def test_teardown_beside_the_firewall_deletes_media_objects_only() -> None:
    commands = render_teardown(table_objects(LISTING))
    assert commands == MEDIA_REMOVAL
    touched = {obj["name"] for c in commands for verb in c.values() for obj in verb.values()}
    assert touched.isdisjoint(FIREWALL_NAMES)


def test_teardown_deletes_the_table_once_nothing_else_is_left() -> None:
    assert render_teardown(table_objects(_media_only(LISTING))) == [*MEDIA_REMOVAL, DELETE_TABLE]
    # An empty table (left by a previous run) goes too; a foreign object alone keeps it.
    assert render_teardown(()) == [DELETE_TABLE]
    assert render_teardown([TableObject("flowtable", "ft")]) == []


def test_stale_cleanup_at_start_never_deletes_the_table() -> None:
    assert render_remove_objects(table_objects(_media_only(LISTING))) == MEDIA_REMOVAL
    assert render_remove_objects([TableObject("chain", "fw_prerouting")]) == []


class FakeNft:
    """libnftables with a canned `list table` answer; records every batch."""

    def __init__(self, listing: list[dict[str, Any]] | None, list_error: str = "") -> None:
        self.listing = listing
        self.list_error = list_error or "Error: No such file or directory\nlist table inet sbc\n"
        self.refuse: str | None = None
        self.batches: list[list[dict[str, Any]]] = []

    def set_json_output(self, value: bool) -> None:
        pass

    def set_echo_output(self, value: bool) -> None:
        pass

    def set_handle_output(self, value: bool) -> None:
        pass

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]:
        self.batches.append(json_root["nftables"])
        if self.refuse is not None:
            return 1, "", self.refuse
        return 0, "", ""

    def cmd(self, cmdline: str) -> tuple[int, str, str]:
        assert cmdline == "list table inet sbc"
        if self.listing is None:
            return 1, "", self.list_error
        return 0, json.dumps({"nftables": self.listing}), ""


def test_teardown_applies_one_transaction_and_reports_it() -> None:
    nft = FakeNft(_media_only(LISTING))
    assert KernelMediaTable(nft).teardown() == MediaTeardown(removed=5, kept=0, table_deleted=True)
    assert nft.batches == [[*MEDIA_REMOVAL, DELETE_TABLE]]

    nft = FakeNft(LISTING)
    assert KernelMediaTable(nft).teardown() == MediaTeardown(removed=5, kept=2, table_deleted=False)
    assert nft.batches == [MEDIA_REMOVAL]


def test_teardown_without_table_or_media_objects_sends_nothing() -> None:
    nft = FakeNft(None)
    assert KernelMediaTable(nft).teardown() == MediaTeardown(0, 0, False)
    nft_fw = FakeNft([item for item in LISTING if item not in _media_only(LISTING)])
    assert KernelMediaTable(nft_fw).teardown() == MediaTeardown(0, 2, False)
    assert nft.batches == nft_fw.batches == []


def test_teardown_errors_name_what_nftables_said() -> None:
    with pytest.raises(KernelPathUnavailable) as listing:
        KernelMediaTable(FakeNft(None, "Error: Operation not permitted\n")).teardown()
    assert str(listing.value) == "nft 'list table' failed: Error: Operation not permitted"
    nft = FakeNft(LISTING)
    nft.refuse = "Error: Could not process rule: Device or resource busy\n"
    with pytest.raises(KernelPathUnavailable) as batch:
        KernelMediaTable(nft).teardown()
    assert str(batch.value) == (
        "nftables refused the batch: Error: Could not process rule: Device or resource busy"
    )


def _relay(nft: FakeNft) -> MediaRelay:
    config = MediaConfig(realms=(RealmMediaAddress("outside", IPv4Address("198.51.100.1")),))
    return MediaRelay(config, kernel_factory=lambda: KernelMediaTable(nft))


def test_relay_close_removes_the_base_objects_once() -> None:
    nft = FakeNft(_media_only(LISTING))

    async def scenario() -> tuple[bool, bool]:
        relay = _relay(nft)
        await relay.start()
        opened = relay.kernel_enabled
        await relay.close()
        await relay.close()  # a second close finds nothing to do
        return opened, relay.kernel_enabled

    assert asyncio.run(scenario()) == (True, False)
    # start: stale cleanup, then the base objects; close: the teardown, once.
    assert len(nft.batches) == 3
    assert nft.batches[0] == MEDIA_REMOVAL
    assert nft.batches[1][0] == {"add": {"table": {"family": "inet", "name": "sbc"}}}
    assert nft.batches[2] == [*MEDIA_REMOVAL, DELETE_TABLE]


def test_relay_close_logs_a_refused_teardown_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    nft = FakeNft(LISTING)

    async def scenario() -> None:
        relay = _relay(nft)
        await relay.start()
        nft.refuse = "Error: Could not process rule: Operation not permitted\n"
        await relay.close()

    with caplog.at_level(logging.ERROR, logger="sbc.media.relay"):
        asyncio.run(scenario())  # does not raise: the firewall's stop comes next
    assert [r.getMessage() for r in caplog.records] == [
        "x kernel base objects not removed on close: nftables refused the batch: "
        "Error: Could not process rule: Operation not permitted"
    ]
    assert nft.batches[-1] == MEDIA_REMOVAL


def test_relay_reopen_that_fails_turns_the_kernel_path_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The table vanished and nftables refuses the base objects now: the relay goes
    on in user space, as at a start without nftables, instead of retrying."""
    nft = FakeNft(_media_only(LISTING))

    async def scenario() -> tuple[int, bool, str | None]:
        relay = _relay(nft)
        await relay.start()
        assert relay.kernel_enabled
        nft.refuse = "Error: Could not process rule: Operation not permitted\n"
        streams = await relay.reopen_kernel()
        enabled, why = relay.kernel_enabled, relay.kernel_unavailable
        await relay.close()
        return streams, enabled, why

    with caplog.at_level(logging.WARNING, logger="sbc.media.relay"):
        streams, enabled, why = asyncio.run(scenario())
    assert (streams, enabled) == (0, False)
    assert why is not None and why.startswith("table not made again: nftables refused")
    assert "relaying media in user space" in caplog.text
