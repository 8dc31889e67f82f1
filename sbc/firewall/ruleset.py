"""The firewall's part of table `inet sbc`, rendered from config. Pure: text out.

The table is shared with the media relay, which owns every object named `media_*`.
The firewall owns the objects named in `OWNED_PREFIXES` / `OWNED_NAMES` and nothing
else, so an apply is one nftables transaction that:

1. creates the table if missing (`add table` never touches an existing one);
2. deletes the firewall's chains and recreated sets that exist now (the caller
   lists the table first: nftables 1.0.6 has no `destroy`);
3. ensures the persistent objects (blacklists, pinholes, counters) with `add`, which
   keeps their elements and counts when they already exist;
4. creates the chains, trusted sets and meters afresh, and the rules;
5. re-adds the bans restored from the state file.

Either the whole transaction applies or none of it does. Nothing here changes other
tables, and the firewall's base chains have policy accept: a host's own policies
still decide everything the SBC does not drop.

Chain placement:

- `fw_prerouting` hooks prerouting at priority -350, before conntrack (-200) and the
  raw priority (-300) where the media relay's stateless rewrite sits: a flood is
  dropped before it costs a conntrack entry, and the pinhole check sees the original
  destination port.
- `fw_input` hooks input at priority -10 (just before the usual `filter`): `ct count`
  needs conntrack, so the per-source connection limits live here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Final

from sbc.firewall.bans import Ban, kernel_comment
from sbc.firewall.config import FirewallConfig, PacketMeter, StreamLimits
from sbc.nft_table import TABLE

CHAIN_PREROUTING: Final = "fw_prerouting"
CHAIN_INPUT: Final = "fw_input"
PREROUTING_PRIORITY: Final = -350
INPUT_PRIORITY: Final = -10

SET_BLACKLIST_V4: Final = "blacklist_v4"
SET_BLACKLIST_V6: Final = "blacklist_v6"
SET_TRUSTED_V4: Final = "trusted_v4"
SET_TRUSTED_V6: Final = "trusted_v6"
SET_PINHOLES: Final = "fw_media_pinholes"

#: Objects of the table that belong to the firewall. Everything else (`media_*`
#: above all) is someone else's and is never deleted or changed.
OWNED_PREFIXES: Final = ("fw_",)
OWNED_NAMES: Final = frozenset({SET_BLACKLIST_V4, SET_BLACKLIST_V6, SET_TRUSTED_V4, SET_TRUSTED_V6})

#: Sets whose elements outlive an apply: bans, and the relay's open pinholes.
PERSISTENT_SETS: Final = {
    SET_BLACKLIST_V4: "type ipv4_addr; flags timeout;",
    SET_BLACKLIST_V6: "type ipv6_addr; flags timeout;",
    SET_PINHOLES: "type inet_service;",
}


class DropReason(StrEnum):
    """Why the kernel dropped a packet: each has a named counter `fw_drop_<reason>`."""

    BLACKLIST_V4 = "blacklist_v4"
    BLACKLIST_V6 = "blacklist_v6"
    RATE_UDP_V4 = "rate_udp_v4"
    RATE_UDP_V6 = "rate_udp_v6"
    RATE_TCP_V4 = "rate_tcp_v4"
    RATE_TCP_V6 = "rate_tcp_v6"
    RATE_TLS_V4 = "rate_tls_v4"
    RATE_TLS_V6 = "rate_tls_v6"
    NEWCONN_TCP_V4 = "newconn_tcp_v4"
    NEWCONN_TCP_V6 = "newconn_tcp_v6"
    NEWCONN_TLS_V4 = "newconn_tls_v4"
    NEWCONN_TLS_V6 = "newconn_tls_v6"
    CONNLIMIT_TCP_V4 = "connlimit_tcp_v4"
    CONNLIMIT_TCP_V6 = "connlimit_tcp_v6"
    CONNLIMIT_TLS_V4 = "connlimit_tls_v4"
    CONNLIMIT_TLS_V6 = "connlimit_tls_v6"
    MEDIA_CLOSED = "media_closed"
    TOTAL_UDP = "total_udp"

    @property
    def counter(self) -> str:
        return f"fw_drop_{self.value}"


COUNTER_TRUSTED_V4: Final = "fw_accept_trusted_v4"
COUNTER_TRUSTED_V6: Final = "fw_accept_trusted_v6"
COUNTERS: Final = (
    COUNTER_TRUSTED_V4,
    COUNTER_TRUSTED_V6,
    *(reason.counter for reason in DropReason),
)


def is_owned(name: str) -> bool:
    """True for the table objects the firewall creates, changes and deletes."""
    return name in OWNED_NAMES or name.startswith(OWNED_PREFIXES)


@dataclass(frozen=True)
class TableInventory:
    """What table `inet sbc` holds now, as `(kind, name)` pairs (`kind`: chain, set, ...)."""

    exists: bool
    objects: frozenset[tuple[str, str]] = frozenset()

    def names(self, kind: str) -> frozenset[str]:
        return frozenset(name for k, name in self.objects if k == kind)

    @property
    def foreign(self) -> frozenset[tuple[str, str]]:
        """Objects of others (the media relay's): never touched."""
        return frozenset(o for o in self.objects if not is_owned(o[1]))

    @classmethod
    def from_json(cls, listing: Mapping[str, Any] | None) -> TableInventory:
        """Read `nft -j list table inet sbc` output (None: the table does not exist)."""
        if listing is None:
            return cls(exists=False)
        objects: set[tuple[str, str]] = set()
        for item in listing.get("nftables", []):
            for kind, body in item.items():
                if kind in ("metainfo", "table", "rule", "element"):
                    continue
                if isinstance(body, Mapping) and "name" in body:
                    objects.add((kind, str(body["name"])))
        return cls(exists=True, objects=frozenset(objects))


# --- expression helpers ------------------------------------------------------


def _ports(ports: Sequence[int]) -> str:
    unique = sorted(set(ports))
    if len(unique) == 1:
        return str(unique[0])
    return "{ " + ", ".join(map(str, unique)) + " }"


def ipv6_mask(prefix_length: int) -> str:
    return str(IPv6Network(("::", prefix_length)).netmask)


def _source(family: int, prefix_length: int) -> str:
    """The meter/blacklist key of a packet's source: the address, or its IPv6 prefix."""
    if family == 4:
        return "ip saddr"
    if prefix_length == 128:
        return "ip6 saddr"
    return f"ip6 saddr & {ipv6_mask(prefix_length)}"


def _nfproto(family: int) -> str:
    # Explicit, so an IPv6 packet never reaches an `ip saddr` key and vice versa.
    return "meta nfproto ipv4" if family == 4 else "meta nfproto ipv6"


def _limit(meter: PacketMeter) -> str:
    return f"limit rate over {meter.rate}/second burst {meter.burst} packets"


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def _elements(values: Iterable[str]) -> str:
    items = list(values)
    return "" if not items else " elements = { " + ", ".join(items) + " };"


# --- the ruleset -------------------------------------------------------------


def _meter_sets(config: FirewallConfig) -> dict[str, str]:
    """Name -> definition of every dynamic set (meters and connection counts)."""
    sets: dict[str, str] = {}
    timed = (
        f"size {config.meter_size}; flags dynamic,timeout; timeout {config.meter_idle_timeout}s;"
    )
    counted = f"size {config.meter_size}; flags dynamic;"
    transports: list[tuple[str, Sequence[int], StreamLimits | None]] = [
        ("udp", config.sip_ports.udp, None),
        ("tcp", config.sip_ports.tcp, config.tcp),
        ("tls", config.sip_ports.tls, config.tls),
    ]
    for name, ports, stream in transports:
        if not ports:
            continue
        for family, key in ((4, "ipv4_addr"), (6, "ipv6_addr")):
            v = f"v{family}"
            sets[f"fw_meter_{name}_{v}"] = f"type {key}; {timed}"
            if stream is not None:
                sets[f"fw_newconn_{name}_{v}"] = f"type {key}; {timed}"
                sets[f"fw_connlimit_{name}_{v}"] = f"type {key}; {counted}"
    return sets


def _prerouting_rules(config: FirewallConfig) -> list[str]:
    prefix = config.ipv6_prefix_length
    rules = [
        'iif "lo" accept',
        f'ip saddr @{SET_TRUSTED_V4} counter name "{COUNTER_TRUSTED_V4}" accept',
        f'ip6 saddr @{SET_TRUSTED_V6} counter name "{COUNTER_TRUSTED_V6}" accept',
        f'ip saddr @{SET_BLACKLIST_V4} counter name "{DropReason.BLACKLIST_V4.counter}" drop',
        f"{_source(6, prefix)} @{SET_BLACKLIST_V6} "
        f'counter name "{DropReason.BLACKLIST_V6.counter}" drop',
    ]
    for family in (4, 6):
        v = f"v{family}"
        key = _source(family, prefix)
        head = _nfproto(family)
        if config.sip_ports.udp:
            rules.append(
                f"{head} udp dport {_ports(config.sip_ports.udp)} "
                f"add @fw_meter_udp_{v} {{ {key} {_limit(config.udp)} }} "
                f'counter name "{DropReason(f"rate_udp_{v}").counter}" drop'
            )
        for name, ports, limits in (
            ("tcp", config.sip_ports.tcp, config.tcp),
            ("tls", config.sip_ports.tls, config.tls),
        ):
            if not ports:
                continue
            # A SYN without ACK is a new connection; counted before conntrack sees it.
            rules.append(
                f"{head} tcp dport {_ports(ports)} tcp flags & (syn | ack) == syn "
                f"add @fw_newconn_{name}_{v} {{ {key} {_limit(limits.new_connections)} }} "
                f'counter name "{DropReason(f"newconn_{name}_{v}").counter}" drop'
            )
            rules.append(
                f"{head} tcp dport {_ports(ports)} "
                f"add @fw_meter_{name}_{v} {{ {key} {_limit(limits.packets)} }} "
                f'counter name "{DropReason(f"rate_{name}_{v}").counter}" drop'
            )
    if config.sip_ports.udp:
        # After the per-source meters: what many sources send together, each under
        # its own rate (a spoofed flood), is capped before it reaches the SBC.
        rules.append(
            f"udp dport {_ports(config.sip_ports.udp)} {_limit(config.udp_total)} "
            f'counter name "{DropReason.TOTAL_UDP.counter}" drop'
        )
    media = config.media_ports
    if media.enabled:
        rules.append(
            f"udp dport {media.first}-{media.last} udp dport != @{SET_PINHOLES} "
            f'counter name "{DropReason.MEDIA_CLOSED.counter}" drop'
        )
    return rules


def _input_rules(config: FirewallConfig) -> list[str]:
    prefix = config.ipv6_prefix_length
    rules = [
        'iif "lo" accept',
        f"ip saddr @{SET_TRUSTED_V4} accept",
        f"ip6 saddr @{SET_TRUSTED_V6} accept",
    ]
    for family in (4, 6):
        v = f"v{family}"
        for name, ports, limits in (
            ("tcp", config.sip_ports.tcp, config.tcp),
            ("tls", config.sip_ports.tls, config.tls),
        ):
            if not ports:
                continue
            rules.append(
                f"{_nfproto(family)} tcp dport {_ports(ports)} ct state new "
                f"add @fw_connlimit_{name}_{v} "
                f"{{ {_source(family, prefix)} ct count over {limits.max_connections} }} "
                f'counter name "{DropReason(f"connlimit_{name}_{v}").counter}" drop'
            )
    return rules


def ban_element(ban: Ban, now: float) -> str:
    """One blacklist element in native syntax, with its remaining time and reason."""
    seconds = max(1, int(ban.remaining(now) + 0.999))
    return f"{ban.target.network_address} timeout {seconds}s comment {_quote(kernel_comment(ban))}"


def render_bans(bans: Iterable[Ban], now: float) -> list[str]:
    """`add element` commands for the bans still running at `now`."""
    lines: list[str] = []
    by_set: dict[str, list[str]] = {SET_BLACKLIST_V4: [], SET_BLACKLIST_V6: []}
    for ban in bans:
        if ban.remaining(now) <= 0:
            continue
        name = SET_BLACKLIST_V4 if isinstance(ban.target, IPv4Network) else SET_BLACKLIST_V6
        by_set[name].append(ban_element(ban, now))
    for name, elements in by_set.items():
        if elements:
            lines.append(f"add element {TABLE} {name} {{ {', '.join(elements)} }}")
    return lines


def _delete_owned(inventory: TableInventory, keep_persistent: bool) -> list[str]:
    lines: list[str] = []
    # Chains first: their rules reference the sets and counters.
    for chain in sorted(inventory.names("chain")):
        if is_owned(chain):
            lines += [f"flush chain {TABLE} {chain}", f"delete chain {TABLE} {chain}"]
    for kind in ("set", "map", "counter", "quota", "limit"):
        for name in sorted(inventory.names(kind)):
            if not is_owned(name):
                continue
            if keep_persistent and (name in PERSISTENT_SETS or kind == "counter"):
                continue
            lines.append(f"delete {kind} {TABLE} {name}")
    return lines


def render_apply(
    config: FirewallConfig,
    inventory: TableInventory,
    restore: Iterable[Ban] = (),
    now: float = 0.0,
    *,
    close_pinholes: bool = False,
) -> str:
    """The whole transaction that installs `config` over what `inventory` describes.

    `close_pinholes`: empty the pinhole set too (a start: no media session of this
    process holds a port yet, and a crashed one's pinholes must not stay open)."""
    lines = [f"add table {TABLE}"]
    lines += _delete_owned(inventory, keep_persistent=True)
    for name, definition in PERSISTENT_SETS.items():
        lines.append(f"add set {TABLE} {name} {{ {definition} }}")
    if close_pinholes:
        lines.append(f"flush set {TABLE} {SET_PINHOLES}")
    lines += [f"add counter {TABLE} {name}" for name in COUNTERS]
    trusted_v4 = _elements(str(n) for n in config.trusted_v4)
    trusted_v6 = _elements(str(n) for n in config.trusted_v6)
    for name, key, elements in (
        (SET_TRUSTED_V4, "ipv4_addr", trusted_v4),
        (SET_TRUSTED_V6, "ipv6_addr", trusted_v6),
    ):
        lines.append(
            f"add set {TABLE} {name} {{ type {key}; flags interval; auto-merge;{elements} }}"
        )
    for name, definition in _meter_sets(config).items():
        lines.append(f"add set {TABLE} {name} {{ {definition} }}")
    lines.append(
        f"add chain {TABLE} {CHAIN_PREROUTING} "
        f"{{ type filter hook prerouting priority {PREROUTING_PRIORITY}; policy accept; }}"
    )
    lines += [f"add rule {TABLE} {CHAIN_PREROUTING} {rule}" for rule in _prerouting_rules(config)]
    lines.append(
        f"add chain {TABLE} {CHAIN_INPUT} "
        f"{{ type filter hook input priority {INPUT_PRIORITY}; policy accept; }}"
    )
    lines += [f"add rule {TABLE} {CHAIN_INPUT} {rule}" for rule in _input_rules(config)]
    lines += render_bans(restore, now)
    return "\n".join(lines) + "\n"


def render_teardown(inventory: TableInventory) -> str:
    """Remove every firewall object; the table too when nothing of others is left.

    Empty when there is nothing to remove.
    """
    if not inventory.exists:
        return ""
    if not inventory.foreign:
        return f"delete table {TABLE}\n"
    lines = _delete_owned(inventory, keep_persistent=False)
    return "\n".join(lines) + "\n" if lines else ""
