"""The kernel fast path: stateless nftables rewrites in the SBC's table.

Every media object lives in table ``inet sbc`` under a ``media_`` name, and no object
is made per forward: a forward is a handful of elements in sets and maps, keyed by
UDP 4-tuples (saddr . sport . daddr . dport). Every libnftables call fetches the
objects it touches into its cache first; with chains and named counters per
forward that made each call cost O(forwards) (53 ms to install one at 10,000),
where adding elements stays well under a millisecond (docs/performance.md).

Per address family (``_v4`` / ``_v6``):

- set ``media_fwd``: the latched tuple as it arrives (peer -> SBC port on the
  receiving side), with a counter per element: the forward's packets and bytes. The
  key is the latched peer's exact source, so strict source stays enforced in the
  kernel: a packet from anywhere else misses it and goes on to user space, which
  drops or re-latches it.
- set ``media_mux``: the tuples of forwards whose port carries rtcp-mux. RTCP on
  them (RFC 5761: second octet 192..223) is left to user space, which parses it for
  quality figures; RTCP on its own port is always relayed in user space.
- maps ``media_daddr`` (latched tuple -> the other side's peer address) and
  ``media_dport`` (the tuple once the address is rewritten -> that peer's port),
  used in chain ``media_prerouting`` (filter, hook prerouting, priority raw), which
  also marks the packet ``notrack``. The kernel routes it on (``ip_forward=1``);
  user space never sees it.
- maps ``media_saddr`` (the rewritten tuple -> the SBC's address on the other
  side) and ``media_sport`` (the tuple once that is rewritten -> the SBC's port),
  used in chain ``media_postrouting`` (filter, hook postrouting, priority srcnat):
  the source is rewritten after routing so the reverse-path and martian-source
  checks see the peer's real address.

A concatenation cannot be written to two header fields in one statement, so each
chain rewrites in two statements, the second keyed by the tuple the first left.
A lookup that misses ends the rule: a packet of no forward passes untouched. The
second keys drop one field of the first (the receiving port, or the peer's
address), so two forwards could in principle need the same second key with
different values (one peer source reaching the SBC on the same port number of two
of its addresses, forwarded to one address); `KernelMediaTable` refuses such a
forward (KernelPathUnavailable) and its stream stays in user space.

On stop the relay removes every ``media_`` object in one transaction, and the table
with it when nothing else is in it: the SBC owns ``inet sbc`` and ``nft list
ruleset`` after a stop reads as before the start. When the firewall is on, its objects
keep the table alive and the firewall removes it on its own stop (after the relay's).

Rendering is pure (`render_*` return nftables JSON commands); `KernelMediaTable`
applies them in batches through the nftables Python binding (libnftables).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from sbc.media.values import Endpoint, IPAddress, ip_address
from sbc.nft_table import TABLE, TABLE_FAMILY, TABLE_NAME, TABLES, table_listed

logger = logging.getLogger(__name__)

PREFIX = "media_"
PREROUTING = "media_prerouting"
POSTROUTING = "media_postrouting"
#: The sets and maps of each family; the name ends in _v4 or _v6.
FWD = "media_fwd"
MUX = "media_mux"
DADDR = "media_daddr"
DPORT = "media_dport"
SADDR = "media_saddr"
SPORT = "media_sport"
#: Map name -> what its values are ("addr" or the port type).
_MAPS = {DADDR: "addr", DPORT: "inet_service", SADDR: "addr", SPORT: "inet_service"}
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
        if families != families2:
            raise ValueError(f"{self.name}: the kernel path cannot change address family")

    @functools.cached_property
    def elements(self) -> tuple[tuple[str, Key, Any], ...]:
        """(set or map, key, value) of every element the forward needs; the value is
        None for a set. Sets and maps are named without their family suffix.
        Worked out once (an install, its ownership check and its removal use it)."""
        src, inp, out, dst = self.source, self.local_in, self.local_out, self.destination
        latched = _key(src.address, src.port, inp.address, inp.port)
        rewritten = _key(src.address, src.port, dst.address, dst.port)
        result: list[tuple[str, Key, Any]] = [(FWD, latched, None)]
        if self.spare_rtcp:
            result.append((MUX, latched, None))
        result += [
            (DADDR, latched, str(dst.address)),
            (DPORT, _key(src.address, src.port, dst.address, inp.port), dst.port),
            (SADDR, rewritten, str(out.address)),
            (SPORT, _key(out.address, src.port, dst.address, dst.port), out.port),
        ]
        return tuple(result)


#: A UDP 4-tuple as the sets and maps hold it: saddr, sport, daddr, dport.
Key = tuple[str, int, str, int]


def _key(saddr: IPAddress, sport: int, daddr: IPAddress, dport: int) -> Key:
    return (str(saddr), sport, str(daddr), dport)


#: One element of a counted tuple set in nft's text listing.
_COUNTED: Final = re.compile(
    r"([0-9A-Fa-f:.]+) \. (\d+) \. ([0-9A-Fa-f:.]+) \. (\d+) counter packets (\d+) bytes (\d+)"
)


def _canonical(key: Key) -> Key | None:
    """``key`` with its addresses in Python's spelling (nftables' spelling of an
    IPv6 address can differ: an IPv4-mapped one, say)."""
    try:
        return _key(ip_address(key[0]), key[1], ip_address(key[2]), key[3])
    except ValueError:
        return None


def _family_name(name: str, family: int) -> str:
    return f"{name}_v{family}"


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _mangle(key: dict[str, Any], value: Any) -> dict[str, Any]:
    return {"mangle": {"key": key, "value": value}}


def _obj(kind: str, **fields: Any) -> dict[str, Any]:
    return {kind: {"family": TABLE_FAMILY, "table": TABLE_NAME, **fields}}


def _tuple(family: int) -> dict[str, Any]:
    """The packet's ``saddr . sport . daddr . dport``."""
    ip = "ip" if family == 4 else "ip6"
    fields = [(ip, "saddr"), ("udp", "sport"), (ip, "daddr"), ("udp", "dport")]
    return {"concat": [_payload(protocol, field) for protocol, field in fields]}


def _udp_of(family: int) -> list[dict[str, Any]]:
    return [
        _match({"meta": {"key": "nfproto"}}, _NFPROTO[family]),
        _match({"meta": {"key": "l4proto"}}, "udp"),
    ]


def _rewrite(family: int, protocol: str, field: str, name: str) -> dict[str, Any]:
    """``<field> set <the packet's tuple> map @<name>``: a miss ends the rule."""
    lookup = {"map": {"key": _tuple(family), "data": f"@{_family_name(name, family)}"}}
    return _mangle(_payload(protocol, field), lookup)


def render_rules(family: int) -> list[dict[str, Any]]:
    """The media rules of one family: two in prerouting, one in postrouting."""
    ip = "ip" if family == 4 else "ip6"
    # Second octet of the UDP payload: bit offset 8*8 + 8 from the transport header.
    octet = {"payload": {"base": "th", "offset": 72, "len": 8}}
    spare_rtcp = [
        *_udp_of(family),
        _match(_tuple(family), f"@{_family_name(MUX, family)}"),
        _match(octet, {"range": list(RTCP_MUX_RANGE)}),
        {"accept": None},
    ]
    forward = [
        *_udp_of(family),
        _match(_tuple(family), f"@{_family_name(FWD, family)}"),  # counts the element
        {"notrack": None},
        _rewrite(family, ip, "daddr", DADDR),
        _rewrite(family, "udp", "dport", DPORT),
    ]
    source = [
        *_udp_of(family),
        _rewrite(family, ip, "saddr", SADDR),
        _rewrite(family, "udp", "sport", SPORT),
    ]
    return [
        _obj("rule", chain=PREROUTING, expr=spare_rtcp),
        _obj("rule", chain=PREROUTING, expr=forward),
        _obj("rule", chain=POSTROUTING, expr=source),
    ]


def render_base() -> list[dict[str, Any]]:
    """Commands that create the table (if missing), the media base chains, the sets
    and maps of both families, and the rules.

    ``add`` leaves existing objects alone and the base chains hold nothing but the
    media rules (flushed and added again in the same transaction), so this is
    idempotent and never disturbs the firewall's part of the table nor the forwards
    already installed (they are elements).
    """
    commands: list[dict[str, Any]] = [
        {"add": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}},
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
    for family in (4, 6):
        address = _ADDRESS_TYPE[family]
        key_type = [address, "inet_service", address, "inet_service"]
        counted = {"stmt": [{"counter": None}]}
        commands.append(
            {"add": _obj("set", name=_family_name(FWD, family), type=key_type, **counted)}
        )
        commands.append({"add": _obj("set", name=_family_name(MUX, family), type=key_type)})
        for name, value in _MAPS.items():
            value_type = address if value == "addr" else value
            map_name = _family_name(name, family)
            commands.append({"add": _obj("map", name=map_name, type=key_type, map=value_type)})
    for chain in (PREROUTING, POSTROUTING):
        commands.append({"flush": _obj("chain", name=chain)})
    commands += [{"add": rule} for family in (4, 6) for rule in render_rules(family)]
    return commands


def _element_commands(verb: str, forwards: Iterable[KernelForward]) -> list[dict[str, Any]]:
    """One ``add``/``delete element`` per set or map touched, all forwards in it."""
    by_name: dict[str, list[Any]] = {}
    for forward in forwards:
        family = forward.source.family
        for name, key, value in forward.elements:
            concat = {"concat": list(key)}
            elem = concat if value is None or verb == "delete" else [concat, value]
            by_name.setdefault(_family_name(name, family), []).append(elem)
    return [{verb: _obj("element", name=name, elem=elems)} for name, elems in by_name.items()]


def render_install(forwards: Iterable[KernelForward]) -> list[dict[str, Any]]:
    """The elements of every forward, in one transaction. The set that the rule
    matches first comes last, so no packet finds a half-made forward."""
    commands = _element_commands("add", forwards)
    commands.sort(key=lambda c: c["add"]["element"]["name"].startswith(FWD))
    return commands


def render_remove(forwards: Iterable[KernelForward]) -> list[dict[str, Any]]:
    """Delete the elements of the forwards (the set the rule matches first, first)."""
    commands = _element_commands("delete", forwards)
    commands.sort(key=lambda c: not c["delete"]["element"]["name"].startswith(FWD))
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
        commands.append({"delete": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}})
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
        #: (set or map, family, key) -> the forward whose element it is.
        self._owners: dict[tuple[str, int, Key], str] = {}

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
        rc, output, error = self._nft.cmd(f"list table {TABLE}")
        if rc != 0:
            if "No such file or directory" in error:
                return None
            raise KernelPathUnavailable(f"nft 'list table' failed: {error.strip()}")
        items: list[dict[str, Any]] = json.loads(output)["nftables"] if output else []
        return items

    def open(self) -> None:
        """Create the table if missing and the media base chains; KernelPathUnavailable
        if nftables cannot be used."""
        self._run(render_base())

    def table_present(self) -> bool:
        """Whether the table exists: `list tables`, which fetches no elements."""
        rc, output, error = self._nft.cmd(f"list {TABLES}")
        if rc != 0:
            raise KernelPathUnavailable(f"nft 'list {TABLES}' failed: {error.strip()}")
        return table_listed(json.loads(output) if output else None)

    def reopen(self) -> None:
        """The table vanished (``nft flush ruleset``): forget the forwards it had and
        create the base objects again."""
        self._forget_all()
        self.open()

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
        self._forget_all()
        return sum(o.media for o in objects)

    def teardown(self) -> MediaTeardown:
        """Remove every media object (base chains, sets, maps and any forward left)
        in one transaction, and the table too when nothing else is left in it.

        Idempotent: a missing table or missing objects are not an error. The table is
        listed first (libnftables 1.0.6 has no ``destroy``), so between the listing and
        the transaction nobody else may add to it: the SBC starts the firewall before
        the relay and stops it after. KernelPathUnavailable if nftables refuses.
        """
        items = self._list_table()
        if items is None:
            self._forget_all()
            return MediaTeardown(removed=0, kept=0, table_deleted=False)
        objects = table_objects(items)
        commands = render_teardown(objects)
        self._run(commands)
        self._forget_all()
        removed = sum(o.media for o in objects)
        return MediaTeardown(
            removed=removed,
            kept=len(objects) - removed,
            table_deleted=any("table" in c.get("delete", {}) for c in commands),
        )

    def _forget_all(self) -> None:
        self._forwards.clear()
        self._owners.clear()

    def _check(self, gone: Sequence[KernelForward], install: Sequence[KernelForward]) -> None:
        """KernelPathUnavailable if an element of ``install`` would be another
        forward's (after ``gone`` left): that forward stays in user space."""
        gone_names = {f.name for f in gone}
        claimed: dict[tuple[str, int, Key], str] = {}
        for forward in install:
            for name, key, _ in forward.elements:
                slot = (name, forward.source.family, key)
                owner = self._owners.get(slot)
                if owner is None or owner in gone_names:
                    owner = claimed.setdefault(slot, forward.name)
                if owner != forward.name:
                    raise KernelPathUnavailable(
                        f"{forward.name}: {name} element {key} is {owner}'s"
                    )

    def install(self, forwards: Sequence[KernelForward]) -> None:
        """Add the forwards in one transaction (all or nothing); one already
        installed under the same name is replaced."""
        self.apply([f.name for f in forwards if f.name in self._forwards], forwards)

    def apply(self, remove: Sequence[str], install: Sequence[KernelForward]) -> None:
        """Delete the named forwards, then add ``install``, in one transaction (all or
        nothing): one libnftables call, one fetch of what it touches into its cache.
        A forward in ``install`` whose name is installed and not in ``remove``
        replaces it."""
        names = dict.fromkeys([*remove, *(f.name for f in install)])
        gone = [self._forwards[n] for n in names if n in self._forwards]
        self._check(gone, install)
        commands = render_remove(gone) + render_install(install)
        if not commands:
            return
        self._run(commands)
        for forward in gone:
            del self._forwards[forward.name]
            for name, key, _ in forward.elements:
                self._owners.pop((name, forward.source.family, key), None)
        for forward in install:
            self._forwards[forward.name] = forward
            for name, key, _ in forward.elements:
                self._owners[name, forward.source.family, key] = forward.name

    def remove(self, names: Iterable[str]) -> None:
        """Delete the named forwards' elements in one transaction."""
        self.apply(list(names), [])

    def counters(self) -> dict[str, KernelCounter]:
        """Packets and bytes of every installed forward (its ``media_fwd`` element),
        read in one listing per family that has forwards.

        The listing is nft's text, not its JSON: at 40,000 elements 0.6 s against
        1.0-1.1 s with the JSON and its parsing (docs/performance.md). Elements
        are written as nft reads them (``a . port . b . port counter packets N
        bytes M``), ports as numbers (no ``-S``)."""
        result: dict[str, KernelCounter] = {}
        for family in sorted({f.source.family for f in self._forwards.values()}):
            name = _family_name(FWD, family)
            what = f"list set {TABLE} {name}"
            self._nft.set_json_output(False)
            try:
                rc, output, error = self._nft.cmd(what)
            finally:
                self._nft.set_json_output(True)
            if rc != 0:
                raise KernelPathUnavailable(f"nft {what!r} failed: {error.strip()}")
            for saddr, sport, daddr, dport, packets, octets in _COUNTED.findall(output):
                key = (saddr, int(sport), daddr, int(dport))
                # Most addresses are spelled alike by both: look up as listed
                # first (40,000 elements would thrash any address cache).
                forward = self._owners.get((FWD, family, key))
                if forward is None and (canonical := _canonical(key)) is not None:
                    forward = self._owners.get((FWD, family, canonical))
                if forward is not None:
                    result[forward] = KernelCounter(int(packets), int(octets))
        return result

    @property
    def installed(self) -> frozenset[str]:
        return frozenset(self._forwards)
