"""The kernel fast path: stateless nftables rewrites in the SBC's table.

Every media object lives in table ``inet sbc`` under a ``media_`` name:

- chain ``media_prerouting`` (filter, hook prerouting, priority raw): one dispatch rule
  per address family looks the packet's (saddr . sport . daddr . dport) up in the
  verdict map ``media_pre_v4`` / ``media_pre_v6`` and jumps (``goto``) to the
  forward's own chain. A hash lookup, so the cost per packet does not grow with the
  number of streams (one rule per stream made every packet walk them all: 400 streams
  cost 4x rtpengine's CPU per packet). The key is the latched peer's exact source, so
  strict source stays enforced in the kernel: a packet from anywhere else misses the
  map and goes on to user space, which drops or re-latches it.
- chain ``media_<forward>_pre``: marks the packet ``notrack`` (no conntrack entry),
  counts it in the forward's named counter and rewrites the destination to the other
  side's latched address. The kernel routes it on (``ip_forward=1``); user space never
  sees it.
- chain ``media_postrouting`` (filter, hook postrouting, priority srcnat): the same
  dispatch on the rewritten tuple through ``media_post_v4`` / ``media_post_v6`` into
  ``media_<forward>_post``, which rewrites the source to the SBC's port on the other
  side. The source is rewritten after routing so the reverse-path and martian-source
  checks see the peer's real address.
- counters ``media_<session>_<stream>_<direction>``: packets and bytes per direction.

Values are plain addresses and ports set by payload statements; no map with
concatenated values is needed (libnftables 1.0.6 cannot declare those in JSON, and a
concatenation cannot be written to two header fields in one statement anyway).

With rtcp-mux the forward's prerouting chain leaves RTCP (RFC 5761: second octet
192..223) to user space, which parses it for quality figures; RTCP on its own port is
always relayed in user space (a few packets per five seconds).

On stop the relay removes every ``media_`` object in one transaction, and the table
with it when nothing else is left in it: the SBC owns ``inet sbc`` and ``nft list
ruleset`` after a stop reads as before the start. When the firewall is on, its objects
keep the table alive and the firewall removes it on its own stop (after the relay's).

Rendering is pure (`render_*` return nftables JSON commands); `KernelMediaTable`
applies them in batches through the nftables Python binding (libnftables).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sbc.media.values import Endpoint

logger = logging.getLogger(__name__)

TABLE_FAMILY = "inet"
TABLE = "sbc"
PREFIX = "media_"
PREROUTING = "media_prerouting"
POSTROUTING = "media_postrouting"
#: Verdict maps of the dispatch rules: (hook chain, family) -> map name.
DISPATCH_MAPS = {
    (PREROUTING, 4): "media_pre_v4",
    (PREROUTING, 6): "media_pre_v6",
    (POSTROUTING, 4): "media_post_v4",
    (POSTROUTING, 6): "media_post_v6",
}
#: NF_IP_PRI_RAW: before conntrack, so `notrack` takes effect.
PRIO_RAW = -300
#: NF_IP_PRI_NAT_SRC.
PRIO_SRCNAT = 100
#: Second octet of RTCP on a multiplexed port (RFC 5761 4).
RTCP_MUX_RANGE = (192, 223)
_ADDRESS_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_NFPROTO = {4: "ipv4", 6: "ipv6"}


class KernelPathUnavailable(RuntimeError):
    """nftables cannot be used (no libnftables, no CAP_NET_ADMIN, kernel refused)."""


@dataclass(frozen=True)
class KernelForward:
    """One relayed direction: packets from ``source`` to ``local_in`` leave from
    ``local_out`` to ``destination``."""

    name: str
    source: Endpoint
    local_in: Endpoint
    local_out: Endpoint
    destination: Endpoint
    #: rtcp-mux on the receiving port: leave RTCP to user space.
    spare_rtcp: bool = False

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX):
            raise ValueError(f"kernel object name {self.name!r} lacks the {PREFIX!r} prefix")
        families = {e.family for e in (self.source, self.local_in)}
        families2 = {e.family for e in (self.local_out, self.destination)}
        if len(families) != 1 or len(families2) != 1:
            raise ValueError(f"{self.name}: mixed address families on one side")

    @property
    def pre_chain(self) -> str:
        """The forward's chain behind the prerouting dispatch (destination rewrite)."""
        return f"{self.name}_pre"

    @property
    def post_chain(self) -> str:
        """The forward's chain behind the postrouting dispatch (source rewrite)."""
        return f"{self.name}_post"

    def pre_key(self) -> dict[str, Any]:
        """The latched tuple as it arrives: peer -> SBC port on the receiving side."""
        return _tuple(self.source, self.local_in)

    def post_key(self) -> dict[str, Any]:
        """The tuple after the prerouting rewrite: peer -> other side's peer."""
        return _tuple(self.source, self.destination)


def _tuple(source: Endpoint, destination: Endpoint) -> dict[str, Any]:
    return {
        "concat": [str(source.address), source.port, str(destination.address), destination.port]
    }


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _ip(endpoint: Endpoint) -> str:
    return "ip" if endpoint.family == 4 else "ip6"


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _mangle(key: dict[str, Any], value: Any) -> dict[str, Any]:
    return {"mangle": {"key": key, "value": value}}


def _obj(kind: str, **fields: Any) -> dict[str, Any]:
    return {kind: {"family": TABLE_FAMILY, "table": TABLE, **fields}}


def _dispatch_rule(chain: str, family: int) -> dict[str, Any]:
    """``ip saddr . udp sport . ip daddr . udp dport vmap @media_pre_v4`` and kin."""
    ip = "ip" if family == 4 else "ip6"
    key = [
        _payload(ip, "saddr"),
        _payload("udp", "sport"),
        _payload(ip, "daddr"),
        _payload("udp", "dport"),
    ]
    expr = [
        _match({"meta": {"key": "nfproto"}}, _NFPROTO[family]),
        _match({"meta": {"key": "l4proto"}}, "udp"),
        {"vmap": {"key": {"concat": key}, "data": f"@{DISPATCH_MAPS[chain, family]}"}},
    ]
    return _obj("rule", chain=chain, expr=expr)


def render_base() -> list[dict[str, Any]]:
    """Commands that create the table (if missing), the media base chains, the dispatch
    maps and the dispatch rules.

    ``add`` leaves existing objects alone and the base chains hold nothing but the
    dispatch rules (flushed and added again in the same transaction), so this is
    idempotent and never disturbs the firewall's part of the table nor the forwards
    already installed (they live in the maps and their own chains).
    """
    commands: list[dict[str, Any]] = [
        {"add": {"table": {"family": TABLE_FAMILY, "name": TABLE}}},
        {
            "add": _obj(
                "chain",
                name=PREROUTING,
                type="filter",
                hook="prerouting",
                prio=PRIO_RAW,
                policy="accept",
            )
        },
        {
            "add": _obj(
                "chain",
                name=POSTROUTING,
                type="filter",
                hook="postrouting",
                prio=PRIO_SRCNAT,
                policy="accept",
            )
        },
    ]
    for (_, family), name in DISPATCH_MAPS.items():
        address = _ADDRESS_TYPE[family]
        key_type = [address, "inet_service", address, "inet_service"]
        commands.append({"add": _obj("map", name=name, type=key_type, map="verdict")})
    for chain in (PREROUTING, POSTROUTING):
        commands.append({"flush": _obj("chain", name=chain)})
        commands += [{"add": _dispatch_rule(chain, family)} for family in (4, 6)]
    return commands


def render_prerouting_rule(forward: KernelForward) -> dict[str, Any]:
    """The rule of the forward's prerouting chain: the dispatch map matched the tuple."""
    dst = _ip(forward.destination)
    expr: list[dict[str, Any]] = []
    if forward.spare_rtcp:
        # Second octet of the UDP payload: bit offset 8*8 + 8 from the transport header.
        octet = {"payload": {"base": "th", "offset": 72, "len": 8}}
        expr.append(_match(octet, {"range": list(RTCP_MUX_RANGE)}, op="!="))
    expr += [
        {"notrack": None},
        {"counter": forward.name},
        _mangle(_payload(dst, "daddr"), str(forward.destination.address)),
        _mangle(_payload("udp", "dport"), forward.destination.port),
    ]
    return _obj("rule", chain=forward.pre_chain, expr=expr)


def render_postrouting_rule(forward: KernelForward) -> dict[str, Any]:
    """The rule of the forward's postrouting chain: the source rewrite."""
    src, dst = _ip(forward.source), _ip(forward.destination)
    if src != dst:
        raise ValueError(f"{forward.name}: the kernel path cannot change address family")
    expr = [
        _mangle(_payload(dst, "saddr"), str(forward.local_out.address)),
        _mangle(_payload("udp", "sport"), forward.local_out.port),
    ]
    return _obj("rule", chain=forward.post_chain, expr=expr)


def _element(chain: str, forward: KernelForward, with_verdict: bool) -> dict[str, Any]:
    family = forward.source.family
    if chain == PREROUTING:
        key, target = forward.pre_key(), forward.pre_chain
    else:
        key, target = forward.post_key(), forward.post_chain
    elem: Any = [key, {"goto": {"target": target}}] if with_verdict else key
    return _obj("element", name=DISPATCH_MAPS[chain, family], elem=[elem])


def render_install(forwards: Iterable[KernelForward]) -> list[dict[str, Any]]:
    """Counter, both chains with their rule and both dispatch elements of every forward:
    one transaction. The elements come last, so no packet reaches a half-built chain."""
    commands: list[dict[str, Any]] = []
    for forward in forwards:
        commands += [
            {"add": _obj("counter", name=forward.name)},
            # Flushed before the rule goes in: installing a forward again replaces it.
            {"add": _obj("chain", name=forward.pre_chain)},
            {"flush": _obj("chain", name=forward.pre_chain)},
            {"add": render_prerouting_rule(forward)},
            {"add": _obj("chain", name=forward.post_chain)},
            {"flush": _obj("chain", name=forward.post_chain)},
            {"add": render_postrouting_rule(forward)},
            {"add": _element(PREROUTING, forward, with_verdict=True)},
            {"add": _element(POSTROUTING, forward, with_verdict=True)},
        ]
    return commands


def render_remove(forwards: Iterable[KernelForward]) -> list[dict[str, Any]]:
    """Delete the dispatch elements, then the chains, then the counters of the forwards
    (in that order: an element holds its chain, a rule its counter)."""
    commands: list[dict[str, Any]] = []
    for forward in forwards:
        commands += [
            {"delete": _element(PREROUTING, forward, with_verdict=False)},
            {"delete": _element(POSTROUTING, forward, with_verdict=False)},
            {"flush": _obj("chain", name=forward.pre_chain)},
            {"delete": _obj("chain", name=forward.pre_chain)},
            {"flush": _obj("chain", name=forward.post_chain)},
            {"delete": _obj("chain", name=forward.post_chain)},
            {"delete": _obj("counter", name=forward.name)},
        ]
    return commands


#: Kinds in a ``list table`` listing that are not objects of their own: libnftables'
#: version record, the table itself and the rules (they belong to their chain).
_NOT_OBJECTS = frozenset({"metainfo", "table", "rule"})
#: Objects whose elements hold verdicts (``goto`` a chain): deleted before the chains.
_CONTAINERS = ("map", "set")


@dataclass(frozen=True)
class TableObject:
    """One named object of table ``inet sbc`` as listed (``kind`` as nftables JSON
    spells it: chain, map, set, counter, flowtable, ``ct helper``...)."""

    kind: str
    name: str

    @property
    def media(self) -> bool:
        """The relay's (every media object carries the prefix); else the firewall's."""
        return self.name.startswith(PREFIX)


def table_objects(listing: Iterable[dict[str, Any]]) -> tuple[TableObject, ...]:
    """The named objects of a ``list table`` JSON listing (its ``nftables`` items)."""
    objects: list[TableObject] = []
    for item in listing:
        for kind, body in item.items():
            if kind in _NOT_OBJECTS or not isinstance(body, dict) or "name" not in body:
                continue
            objects.append(TableObject(kind, str(body["name"])))
    return tuple(objects)


def render_remove_objects(objects: Iterable[TableObject]) -> list[dict[str, Any]]:
    """Delete the media objects among ``objects``; the others are not touched.

    Rules hold counters, maps and other stateful objects, and map elements hold
    chains: every media chain is flushed first, then maps and sets go, then the
    chains, then what is left (counters...). One transaction, all or nothing.
    """
    media = [o for o in objects if o.media]
    chains = [o for o in media if o.kind == "chain"]
    commands: list[dict[str, Any]] = [{"flush": _obj("chain", name=o.name)} for o in chains]
    commands += [{"delete": _obj(o.kind, name=o.name)} for o in media if o.kind in _CONTAINERS]
    commands += [{"delete": _obj("chain", name=o.name)} for o in chains]
    commands += [
        {"delete": _obj(o.kind, name=o.name)}
        for o in media
        if o.kind != "chain" and o.kind not in _CONTAINERS
    ]
    return commands


def render_teardown(objects: Iterable[TableObject]) -> list[dict[str, Any]]:
    """The stop transaction: every media object of the table, and the table itself
    when that leaves it empty (no chain, set, map, flowtable... of anyone).

    A table that still holds an object of others (the firewall's) stays: the firewall
    removes it on its own stop. Only what ``objects`` lists is deleted, so a listing of
    a table without media objects gives no command, or only the delete of an empty
    table: running it again finds nothing and is harmless.
    """
    objects = tuple(objects)
    commands = render_remove_objects(objects)
    if all(o.media for o in objects):
        commands.append({"delete": {"table": {"family": TABLE_FAMILY, "name": TABLE}}})
    return commands


@dataclass(frozen=True)
class MediaTeardown:
    """What `KernelMediaTable.teardown` did to table ``inet sbc``."""

    #: Media objects deleted (chains, maps, counters...).
    removed: int
    #: Objects of others left in the table (the firewall's).
    kept: int
    table_deleted: bool


@dataclass(frozen=True)
class KernelCounter:
    packets: int
    bytes: int


class NftablesBinding(Protocol):
    """The part of ``nftables.Nftables`` used here."""

    def set_json_output(self, value: bool) -> Any: ...
    def set_echo_output(self, value: bool) -> Any: ...
    def set_handle_output(self, value: bool) -> Any: ...
    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]: ...
    def cmd(self, cmdline: str) -> tuple[int, str, str]: ...


def _new_binding() -> NftablesBinding:
    try:
        import nftables  # type: ignore[import-untyped]  # pip-nftables / python3-nftables
    except ImportError as exc:
        raise KernelPathUnavailable(f"nftables Python binding missing ({exc})") from exc
    try:
        binding: NftablesBinding = nftables.Nftables()
    except OSError as exc:  # libnftables.so.1 missing
        raise KernelPathUnavailable(f"libnftables unavailable ({exc})") from exc
    return binding


class KernelMediaTable:
    """The media objects of table ``inet sbc``, applied through libnftables.

    Calls block for a few to a few tens of milliseconds; the relay runs them in one
    worker thread so they stay serialised.
    """

    def __init__(self, binding: NftablesBinding | None = None) -> None:
        self._nft = binding if binding is not None else _new_binding()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)
        # forward name -> the forward as installed (its keys name the map elements)
        self._forwards: dict[str, KernelForward] = {}

    def _run(self, commands: list[dict[str, Any]], echo: bool = False) -> Any:
        if not commands:
            return None
        self._nft.set_echo_output(echo)
        try:
            rc, output, error = self._nft.json_cmd({"nftables": commands})
        finally:
            self._nft.set_echo_output(False)
        if rc != 0:
            raise KernelPathUnavailable(f"nftables refused the batch: {error.strip()}")
        return output

    def _list_table(self) -> list[dict[str, Any]] | None:
        """The table's listing, None when the table does not exist."""
        rc, output, error = self._nft.cmd(f"list table {TABLE_FAMILY} {TABLE}")
        if rc != 0:
            if "No such file or directory" in error:
                return None
            raise KernelPathUnavailable(f"nft 'list table' failed: {error.strip()}")
        items: list[dict[str, Any]] = json.loads(output)["nftables"] if output else []
        return items

    def _list(self, what: str) -> list[dict[str, Any]]:
        rc, output, error = self._nft.cmd(what)
        if rc != 0:
            raise KernelPathUnavailable(f"nft {what!r} failed: {error.strip()}")
        items: list[dict[str, Any]] = json.loads(output)["nftables"] if output else []
        return items

    def open(self) -> None:
        """Create the table if missing and the media base chains; KernelPathUnavailable
        if nftables cannot be used."""
        self._run(render_base())

    def remove_all_media_objects(self) -> int:
        """Delete every ``media_`` chain, map, set and counter of the table (stale state
        of a previous run); the firewall's objects stay. Returns how many were removed."""
        try:
            items = self._list_table()
        except KernelPathUnavailable:
            items = None  # open() tells why the kernel path cannot be used
        if items is None:
            return 0  # no table: nothing stale
        objects = table_objects(items)
        self._run(render_remove_objects(objects))
        self._forwards.clear()
        return sum(o.media for o in objects)

    def teardown(self) -> MediaTeardown:
        """Remove every media object (base chains, dispatch maps and any forward left)
        in one transaction, and the table too when nothing else is left in it.

        Idempotent: a missing table or missing objects are not an error. The table is
        listed first (libnftables 1.0.6 has no ``destroy``), so between the listing and
        the transaction nobody else may add to it: the SBC starts the firewall before
        the relay and stops it after. KernelPathUnavailable if nftables refuses.
        """
        items = self._list_table()
        if items is None:
            self._forwards.clear()
            return MediaTeardown(removed=0, kept=0, table_deleted=False)
        objects = table_objects(items)
        commands = render_teardown(objects)
        self._run(commands)
        self._forwards.clear()
        removed = sum(o.media for o in objects)
        return MediaTeardown(
            removed=removed,
            kept=len(objects) - removed,
            table_deleted=any("table" in c.get("delete", {}) for c in commands),
        )

    def install(self, forwards: Sequence[KernelForward]) -> None:
        """Add the forwards in one transaction (all or nothing)."""
        self._run(render_install(forwards))
        for forward in forwards:
            self._forwards[forward.name] = forward

    def apply(self, remove: Sequence[str], install: Sequence[KernelForward]) -> None:
        """Delete the named forwards, then add ``install``, in one transaction (all or
        nothing): one libnftables call, one fetch of the table into its cache."""
        gone = [self._forwards[n] for n in dict.fromkeys(remove) if n in self._forwards]
        commands = render_remove(gone) + render_install(install)
        if not commands:
            return
        self._run(commands)
        for forward in gone:
            del self._forwards[forward.name]
        for forward in install:
            self._forwards[forward.name] = forward

    def remove(self, names: Iterable[str]) -> None:
        """Delete the named forwards (elements, chains, counters) in one transaction."""
        forwards = [self._forwards[n] for n in dict.fromkeys(names) if n in self._forwards]
        self._run(render_remove(forwards))
        for forward in forwards:
            del self._forwards[forward.name]

    def counters(self) -> dict[str, KernelCounter]:
        """Packets and bytes of every media counter, read in one call."""
        result: dict[str, KernelCounter] = {}
        for item in self._list(f"list counters table {TABLE_FAMILY} {TABLE}"):
            body = item.get("counter")
            if body and body["name"].startswith(PREFIX):
                result[body["name"]] = KernelCounter(body["packets"], body["bytes"])
        return result

    @property
    def installed(self) -> frozenset[str]:
        return frozenset(self._forwards)
