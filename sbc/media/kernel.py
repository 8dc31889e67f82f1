"""The kernel fast path: stateless nftables rewrite rules in the SBC's table.

Every media object lives in table ``inet sbc`` under a ``media_`` name:

- chain ``media_prerouting`` (filter, hook prerouting, priority raw): one rule per
  relayed direction matches the latched peer's packets to the SBC port
  (saddr, sport, daddr, dport), marks them ``notrack`` (no conntrack entry), counts
  them in a named counter and rewrites the destination to the other side's latched
  address. The kernel routes the packet on (``ip_forward=1``), user space never sees it.
- chain ``media_postrouting`` (filter, hook postrouting, priority srcnat): the
  matching rule rewrites the source to the SBC's port on the other side. The source
  is rewritten after routing so the reverse-path and martian-source checks see the
  peer's real address.
- counters ``media_<session>_<stream>_<direction>``: packets and bytes per direction.

With rtcp-mux the prerouting rule leaves RTCP (RFC 5761: second octet 192..223) to
user space, which parses it for quality figures; RTCP on its own port is always
relayed in user space (a few packets per five seconds).

Rendering is pure (`render_*` return nftables JSON commands); `KernelMediaTable`
applies them in batches through the nftables Python binding (libnftables).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sbc.media.values import Endpoint

logger = logging.getLogger(__name__)

TABLE_FAMILY = "inet"
TABLE = "sbc"
PREFIX = "media_"
PREROUTING = "media_prerouting"
POSTROUTING = "media_postrouting"
#: NF_IP_PRI_RAW: before conntrack, so `notrack` takes effect.
PRIO_RAW = -300
#: NF_IP_PRI_NAT_SRC.
PRIO_SRCNAT = 100
#: Second octet of RTCP on a multiplexed port (RFC 5761 4).
RTCP_MUX_RANGE = (192, 223)


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
    def comment(self) -> str:
        return self.name


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


def render_base() -> list[dict[str, Any]]:
    """Commands that create the table (if missing) and the media base chains.

    ``add`` leaves existing objects alone, so this never disturbs the firewall's part
    of the table nor rules already installed.
    """
    return [
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


def render_prerouting_rule(forward: KernelForward) -> dict[str, Any]:
    src, dst = _ip(forward.source), _ip(forward.destination)
    expr: list[dict[str, Any]] = [
        _match(_payload(src, "saddr"), str(forward.source.address)),
        _match(_payload(src, "daddr"), str(forward.local_in.address)),
        _match({"meta": {"key": "l4proto"}}, "udp"),
        _match(_payload("udp", "sport"), forward.source.port),
        _match(_payload("udp", "dport"), forward.local_in.port),
    ]
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
    return _obj("rule", chain=PREROUTING, comment=forward.comment, expr=expr)


def render_postrouting_rule(forward: KernelForward) -> dict[str, Any]:
    src, dst = _ip(forward.source), _ip(forward.destination)
    if src != dst:
        raise ValueError(f"{forward.name}: the kernel path cannot change address family")
    expr = [
        _match(_payload(dst, "saddr"), str(forward.source.address)),
        _match(_payload(dst, "daddr"), str(forward.destination.address)),
        _match({"meta": {"key": "l4proto"}}, "udp"),
        _match(_payload("udp", "sport"), forward.source.port),
        _match(_payload("udp", "dport"), forward.destination.port),
        _mangle(_payload(dst, "saddr"), str(forward.local_out.address)),
        _mangle(_payload("udp", "sport"), forward.local_out.port),
    ]
    return _obj("rule", chain=POSTROUTING, comment=forward.comment, expr=expr)


def render_install(forwards: Iterable[KernelForward]) -> list[dict[str, Any]]:
    """Counter and both rules of every forward: one transaction."""
    commands: list[dict[str, Any]] = []
    for forward in forwards:
        commands.append({"add": _obj("counter", name=forward.name)})
        commands.append({"add": render_prerouting_rule(forward)})
        commands.append({"add": render_postrouting_rule(forward)})
    return commands


def render_remove(handles: Mapping[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Delete the rules (by handle) then the counters of the named forwards."""
    commands: list[dict[str, Any]] = []
    for name, (pre, post) in handles.items():
        commands.append({"delete": _obj("rule", chain=PREROUTING, handle=pre)})
        commands.append({"delete": _obj("rule", chain=POSTROUTING, handle=post)})
        commands.append({"delete": _obj("counter", name=name)})
    return commands


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
        # forward name -> (prerouting rule handle, postrouting rule handle)
        self._handles: dict[str, tuple[int, int]] = {}

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
            items = self._list(f"list table {TABLE_FAMILY} {TABLE}")
        except KernelPathUnavailable:
            return 0  # no table: nothing stale
        chains, others = [], []
        for item in items:
            kind, body = next(iter(item.items()))
            name = body.get("name", "") if isinstance(body, dict) else ""
            if not name.startswith(PREFIX):
                continue
            if kind == "chain":
                chains.append(name)
            elif kind in ("counter", "set", "map", "quota", "limit"):
                others.append((kind, name))
        commands: list[dict[str, Any]] = []
        for name in chains:
            commands.append({"flush": _obj("chain", name=name)})
            commands.append({"delete": _obj("chain", name=name)})
        commands += [{"delete": _obj(kind, name=name)} for kind, name in others]
        self._run(commands)
        self._handles.clear()
        return len(chains) + len(others)

    def install(self, forwards: Sequence[KernelForward]) -> None:
        """Add the forwards in one transaction (all or nothing)."""
        output = self._run(render_install(forwards), echo=True)
        handles: dict[str, list[int]] = {}
        for item in output["nftables"] if output else ():
            rule = item.get("add", {}).get("rule")
            if rule is not None:
                slot = 0 if rule["chain"] == PREROUTING else 1
                handles.setdefault(rule["comment"], [0, 0])[slot] = int(rule["handle"])
        for forward in forwards:
            pre, post = handles.get(forward.name, [0, 0])
            if not pre or not post:
                raise KernelPathUnavailable(f"{forward.name}: no rule handle echoed back")
            self._handles[forward.name] = (pre, post)

    def remove(self, names: Iterable[str]) -> None:
        """Delete the named forwards (rules and counters) in one transaction."""
        handles = {n: self._handles[n] for n in names if n in self._handles}
        self._run(render_remove(handles))
        for name in handles:
            del self._handles[name]

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
        return frozenset(self._handles)
