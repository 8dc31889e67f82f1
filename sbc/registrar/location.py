"""The location service: contact bindings by address-of-record (RFC 3261 10), sans-I/O.

A :class:`Binding` ties one AOR to one Contact URI, with everything the SBC needs to
reach the phone again: the transport, source address and port the REGISTER came from
(``received``, where requests go for a phone behind NAT), the listener and realm it
arrived on, the connection for TCP/TLS, the RFC 3327 Path and the RFC 5626 instance
and reg-id. Bindings are plain frozen values with ``to_dict``/``from_dict`` so they
can be replicated to an HA standby.

:class:`LocationService` keeps bindings by AOR. It never reads the clock: ``now`` is
a wall-clock epoch float passed in (expiry times are absolute, so they mean the same
on the standby).

AOR keys (RFC 3261 10.3 step 5, 19.1.4)
    The key of ``sip:User@Example.COM`` is ``User@example.com``: the user part with
    its escapes decoded, compared case-sensitively, and the host lowercased (IP
    literals in canonical form). Scheme, port and URI parameters are dropped, so
    ``sip:`` and ``sips:`` registrations of one user share their bindings.
    With ``domains`` empty (the default) any domain is accepted and the key is the
    user part alone, so a phone can register to ``127.0.0.1`` or ``localhost``
    alike. With ``domains`` set, only AORs in those domains have keys.

Caps
    ``max_contacts`` bindings per AOR: a change that would add bindings beyond it is
    refused (:class:`TooManyContactsError`, the registrar answers 503), as Kamailio's
    registrar ``max_contacts`` does (its R_TOO_MANY: "503 Too many registered
    contacts"); existing bindings are never evicted to make room, so a phone that
    keeps re-registering with new contacts cannot push out the user's other phones.
    ``max_aors`` AORs in total: a new AOR beyond it is refused
    (:class:`TooManyAorsError`, 503); refreshing an AOR that has bindings always works.

Flows (RFC 5626 5.3, 6)
    A binding registered over TCP or TLS is reached over that connection: its
    ``received`` port is the phone's end of it (an ephemeral port nobody listens
    on), so once the connection is gone the binding is unusable. Bindings
    registered here (:meth:`LocationService.replace`) are indexed by
    ``connection_id`` and :meth:`LocationService.remove_connection` drops those of
    one connection, costing what that connection holds. Connection ids are local
    to the node whose transport numbered them: replicated or restored bindings
    (:meth:`LocationService.apply`, ``from_dict``) are never indexed, so a
    connection of this node that happens to reuse a number cannot take them.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final
from urllib.parse import unquote

from sbc.sip.errors import ParseError
from sbc.sip.uri import SipUri, Uri, parse_uri
from sbc.transport.base import Destination, ListenAddress, normalize_host
from sbc.transport.resolver import Transport

logger = logging.getLogger(__name__)

#: Default cap on bindings per AOR (the config's ``registrar.max_contacts``).
DEFAULT_MAX_CONTACTS: Final = 10
#: Default cap on AORs with bindings (the config's ``registrar.max_users``).
DEFAULT_MAX_AORS: Final = 100_000
#: Version of the ``to_dict`` layout.
LOCATION_VERSION: Final = 1
#: Status the registrar answers when a cap is reached (Kamailio's R_TOO_MANY).
LOCATION_FULL_STATUS: Final = 503

# RFC 3261 19.1.4: these parameters must agree when either URI has them. The rules
# leave transport out, but the section's own examples say sip:bob@biloxi.com and
# sip:bob@biloxi.com;transport=udp differ ("can resolve to different ports"); a
# binding's transport decides where requests go, so it is compared strictly too.
_STRICT_URI_PARAMS: Final = ("user", "ttl", "method", "maddr", "transport")
# Compared without regard to case: they name hosts, transports, methods or fixed tokens.
_CASELESS_URI_PARAMS: Final = frozenset({"user", "method", "maddr", "transport", "lr"})


class LocationError(Exception):
    """A change the location service refuses; ``status`` is what a registrar answers."""

    status: int = LOCATION_FULL_STATUS


class TooManyContactsError(LocationError):
    """The change would leave an AOR with more than ``max_contacts`` bindings."""


class TooManyAorsError(LocationError):
    """A new AOR would exceed ``max_aors``."""


# --------------------------------------------------------------------------- AOR keys


def aor_key(user: str, domain: str | None, domains: Iterable[str] = ()) -> str | None:
    """The key of AOR ``user@domain`` (module docstring), or None if not served.

    ``user`` is taken as already unescaped. With ``domains`` empty the key is the
    user alone; otherwise ``domain`` must be one of them.
    """
    if not user:
        return None
    served = frozenset(normalize_domain(d) for d in domains)
    if not served:
        return user
    if domain is None:
        return None
    host = normalize_domain(domain)
    return f"{user}@{host}" if host in served else None


def normalize_domain(domain: str) -> str:
    """A domain as keys hold it: lowercase, no trailing dot, IP literals canonical."""
    return normalize_host(domain)


# --------------------------------------------------------------------------- URI equality


def _unescape(text: str) -> str:
    return unquote(text, errors="surrogateescape")


def _uri_params(uri: SipUri) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in uri.params:
        key = name.lower()
        text = "" if value is None else _unescape(value)
        out.setdefault(key, text.lower() if key in _CASELESS_URI_PARAMS else text)
    return out


def sip_uris_equal(a: SipUri, b: SipUri) -> bool:
    """RFC 3261 19.1.4 URI comparison, as a registrar matches Contact bindings.

    Scheme and host compare without case, user and password after unescaping and
    with case; an omitted port does not match an explicit default port. ``user``,
    ``ttl``, ``method``, ``maddr`` and ``transport`` must agree when either URI has
    them, every other parameter only when both have it; URI headers must all agree.
    """
    if a.scheme.lower() != b.scheme.lower():
        return False
    if a.user_unescaped != b.user_unescaped:
        return False
    password_a = None if a.password is None else _unescape(a.password)
    password_b = None if b.password is None else _unescape(b.password)
    if password_a != password_b:
        return False
    if normalize_host(a.host) != normalize_host(b.host) or a.port != b.port:
        return False
    pa, pb = _uri_params(a), _uri_params(b)
    for name in _STRICT_URI_PARAMS:
        if pa.get(name) != pb.get(name):
            return False
    if any(pa[name] != pb[name] for name in pa.keys() & pb.keys()):
        return False

    def headers(uri: SipUri) -> set[tuple[str, str]]:
        return {(n.lower(), _unescape(v)) for n, v in uri.headers}

    return headers(a) == headers(b)


# --------------------------------------------------------------------------- bindings


def _endpoint_dict(value: Destination | ListenAddress) -> dict[str, Any]:
    return {"transport": value.transport.value, "host": value.host, "port": value.port}


@dataclass(frozen=True, slots=True)
class Binding:
    """One registered contact of one AOR (RFC 3261 10.3 step 7).

    ``contact`` is the Contact URI text as registered (what a request to the phone
    carries as its Request-URI); ``received`` is where the REGISTER came from, the
    address to send to; ``local`` and ``realm`` are the listener and realm it
    arrived on (send from there). ``connection_id`` names the TCP/TLS connection
    it arrived over; it is only meaningful on the node that accepted it, so a
    standby taking over should ignore it and connect to ``received`` instead.
    ``call_id``/``cseq`` order later REGISTERs of the same contact (10.3 step 7).
    ``q`` is None when the phone gave none. ``instance`` is the ``+sip.instance``
    value without its quotes, ``reg_id`` the RFC 5626 reg-id; ``path`` the RFC
    3327 Path header values in order.
    """

    aor: str
    contact: str
    expires_at: float
    call_id: str
    cseq: int
    received: Destination
    local: ListenAddress
    realm: str
    registered_at: float
    q: float | None = None
    instance: str | None = None
    reg_id: int | None = None
    path: tuple[str, ...] = ()
    user_agent: str | None = None
    connection_id: int | None = None

    @property
    def uri(self) -> Uri:
        """The Contact URI, parsed."""
        return parse_uri(self.contact)

    def expires_in(self, now: float) -> int:
        """Whole seconds left (rounded up), 0 once expired: the 200's ``expires``."""
        return max(0, math.ceil(self.expires_at - now))

    def alive(self, now: float) -> bool:
        return self.expires_at > now

    @property
    def outbound_key(self) -> tuple[str, int] | None:
        """(instance, reg-id) when both are set: RFC 5626 6 matches bindings by them."""
        if self.instance is None or self.reg_id is None:
            return None
        return self.instance, self.reg_id

    def matches(self, contact: SipUri, instance: str | None, reg_id: int | None) -> bool:
        """Whether a Contact in a REGISTER refers to this binding.

        RFC 5626 6: with an instance and a reg-id, the binding with the same pair is
        the one (whatever its URI); otherwise Contact URIs are compared (RFC 3261
        10.3 step 7, 19.1.4).
        """
        key = None if instance is None or reg_id is None else (instance, reg_id)
        if key is not None or self.outbound_key is not None:
            if key == self.outbound_key:
                return True
            if key is not None:
                return False
        stored = self.uri
        return isinstance(stored, SipUri) and sip_uris_equal(stored, contact)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for the HA peer and the state file)."""
        return {
            "aor": self.aor,
            "contact": self.contact,
            "expires_at": self.expires_at,
            "call_id": self.call_id,
            "cseq": self.cseq,
            "received": _endpoint_dict(self.received),
            "local": _endpoint_dict(self.local),
            "realm": self.realm,
            "registered_at": self.registered_at,
            "q": self.q,
            "instance": self.instance,
            "reg_id": self.reg_id,
            "path": list(self.path),
            "user_agent": self.user_agent,
            "connection_id": self.connection_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Binding:
        """The binding ``to_dict`` produced; raises ValueError/KeyError/TypeError if bad."""
        received = data["received"]
        local = data["local"]
        q = data.get("q")
        reg_id = data.get("reg_id")
        connection_id = data.get("connection_id")
        return cls(
            aor=str(data["aor"]),
            contact=str(data["contact"]),
            expires_at=float(data["expires_at"]),
            call_id=str(data["call_id"]),
            cseq=int(data["cseq"]),
            received=Destination(
                Transport(received["transport"]), str(received["host"]), int(received["port"])
            ),
            local=ListenAddress(
                Transport(local["transport"]), str(local["host"]), int(local["port"])
            ),
            realm=str(data["realm"]),
            registered_at=float(data["registered_at"]),
            q=None if q is None else float(q),
            instance=data.get("instance"),
            reg_id=None if reg_id is None else int(reg_id),
            path=tuple(str(p) for p in data.get("path", ())),
            user_agent=data.get("user_agent"),
            connection_id=None if connection_id is None else int(connection_id),
        )


def _rank(binding: Binding) -> tuple[float, float]:
    # A contact without q ranks as q=1.0 (the top); ties: the latest registration first.
    return (-(1.0 if binding.q is None else binding.q), -binding.registered_at)


@dataclass(frozen=True, slots=True)
class LocationChange:
    """What one :meth:`LocationService.replace` did to an AOR.

    ``added`` holds new and refreshed bindings (their current values: what a
    standby upserts), ``removed`` the bindings that are gone.
    """

    aor: str
    added: tuple[Binding, ...] = ()
    removed: tuple[Binding, ...] = ()


@dataclass
class LocationService:
    """Bindings by AOR key, with caps; pure, ``now`` is passed in.

    ``domains`` empty: any domain, keys are user parts (module docstring).
    """

    domains: tuple[str, ...] = ()
    max_contacts: int = DEFAULT_MAX_CONTACTS
    max_aors: int = DEFAULT_MAX_AORS
    _bindings: dict[str, list[Binding]] = field(default_factory=dict, init=False, repr=False)
    # (expires_at, aor, contact): lazily invalidated expiry deadlines.
    _deadlines: list[tuple[float, str, str]] = field(default_factory=list, init=False, repr=False)
    # Deadlines the heap may hold before _compact counts the bindings again.
    _compact_at: int = field(default=0, init=False, repr=False)
    # connection_id -> (aor, contact) of the bindings registered here over it (the
    # module docstring's Flows); kept exact by every change of _bindings.
    _by_connection: dict[int, set[tuple[str, str]]] = field(
        default_factory=dict, init=False, repr=False
    )
    # received (where a REGISTER came from) -> (aor, contact) of the bindings
    # registered from there, replicated ones too (`registered_from`); kept exact by
    # every change of _bindings, as _by_connection is.
    _by_received: dict[Destination, set[tuple[str, str]]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.max_contacts < 1 or self.max_aors < 1:
            raise ValueError("max_contacts and max_aors must be at least 1")
        self.domains = tuple(normalize_domain(d) for d in self.domains)

    # -- keys

    def aor_of(self, uri: Uri) -> str | None:
        """The AOR key of a SIP/SIPS URI (a To, or a Request-URI to route); None if the
        URI has no user, is not SIP, or its domain is not served."""
        if not isinstance(uri, SipUri) or not uri.user:
            return None
        user = uri.user_unescaped
        assert user is not None
        return aor_key(user, uri.host, self.domains)

    def normalize(self, aor: str | Uri) -> str | None:
        """The key for ``aor``: a URI (its user unescaped, RFC 3261 19.1.4), or ``user``
        / ``user@domain`` text taken as already unescaped (a key, as ``aor_key``:
        decoding it again would turn a user ``a%41`` into ``aA``)."""
        if not isinstance(aor, str):
            return self.aor_of(aor)
        user, at, domain = aor.rpartition("@")
        if not at:
            return aor if not self.domains and aor else None
        return aor_key(user, domain, self.domains)

    # -- reading

    def __len__(self) -> int:
        """How many bindings are stored (expired ones not yet swept included)."""
        return sum(len(items) for items in self._bindings.values())

    def __contains__(self, aor: object) -> bool:
        return isinstance(aor, str) and aor in self._bindings

    def aors(self) -> list[str]:
        """The AOR keys that have bindings, sorted."""
        return sorted(self._bindings)

    def __iter__(self) -> Iterator[Binding]:
        for items in self._bindings.values():
            yield from items

    def bindings(self, aor: str | Uri, now: float) -> list[Binding]:
        """Every unexpired binding of ``aor``, highest q first (no q counts as 1.0),
        then the most recently registered; [] for unknown or unserved AORs. What a
        registrar lists in its 200 (RFC 3261 10.3 step 8)."""
        key = self.normalize(aor)
        if key is None:
            return []
        alive = [b for b in self._bindings.get(key, ()) if b.alive(now)]
        return sorted(alive, key=_rank)

    def lookup(self, aor: str | Uri, now: float) -> list[Binding]:
        """The bindings to route a request for ``aor`` to, in :meth:`bindings` order,
        with one binding per ``+sip.instance``: RFC 5626 5.3, a proxy "MUST NOT
        populate the target set with more than one contact with the same AOR and
        instance-id at a time" (two flows of one phone would ring it twice).

        Route calls with the Request-URI itself: ``sip:%61lice@...`` finds ``alice``
        (``normalize``), whatever octets its escapes decode to."""
        seen: set[str] = set()
        out: list[Binding] = []
        for binding in self.bindings(aor, now):
            if binding.instance is not None:
                if binding.instance in seen:
                    continue
                seen.add(binding.instance)
            out.append(binding)
        return out

    def registered_from(self, source: Destination, now: float) -> list[Binding]:
        """The live bindings whose REGISTER came from ``source`` (transport, address
        and port): the phones that are there, as far as registration says."""
        found = []
        for aor, contact in self._by_received.get(source, ()):
            binding = self.get(aor, contact)
            if binding is not None and binding.received == source and binding.alive(now):
                found.append(binding)
        return found

    def get(self, aor: str, contact: str) -> Binding | None:
        """The binding of AOR key ``aor`` whose contact text is exactly ``contact``."""
        for binding in self._bindings.get(aor, ()):
            if binding.contact == contact:
                return binding
        return None

    # -- changing

    def replace(self, aor: str, bindings: Sequence[Binding], now: float) -> LocationChange:
        """Make ``bindings`` the whole set of ``aor``'s bindings, all or nothing.

        Expired bindings are dropped first (they are reported removed). Raises
        :class:`TooManyContactsError` when the set is bigger than ``max_contacts``
        and bigger than what is stored now (a cap lowered under existing bindings
        still lets them refresh), :class:`TooManyAorsError` for a new AOR beyond
        ``max_aors``; nothing changes then.
        """
        if any(b.aor != aor for b in bindings):
            raise ValueError("every binding must belong to the AOR being replaced")
        # Nothing else sweeps: every AOR's expired bindings go here (by the deadline
        # heap, no walk over all AORs), so they neither hold memory nor count against
        # max_aors; this AOR's are still reported removed.
        swept = [b for b in self.expire(now) if b.aor == aor]
        old = swept + self._bindings.get(aor, [])
        new = [b for b in bindings if b.alive(now)]
        old_alive = [b for b in old if b.alive(now)]
        if len(new) > self.max_contacts and len(new) > len(old_alive):
            raise TooManyContactsError(
                f"{aor}: {len(new)} contacts exceed the limit of {self.max_contacts}"
            )
        if new and aor not in self._bindings and len(self._bindings) >= self.max_aors:
            raise TooManyAorsError(f"{len(self._bindings)} AORs registered, the limit")
        contacts = {b.contact for b in new}
        if len(contacts) != len(new):
            raise ValueError("two bindings of one AOR with the same contact")
        # A refreshed binding is a new value for the same contact: added, not removed.
        removed = tuple(b for b in old if b.contact not in contacts)
        known = {id(b) for b in old}
        added = tuple(b for b in new if id(b) not in known)
        kept = {id(b) for b in new}
        if new:
            self._bindings[aor] = list(new)
        else:
            self._bindings.pop(aor, None)
        # Unindex every value replaced (a refresh may come over another connection)
        # before indexing the new ones.
        for binding in old:
            if id(binding) not in kept:
                self._unindex(binding)
        for binding in added:
            heapq.heappush(self._deadlines, (binding.expires_at, aor, binding.contact))
            self._by_received.setdefault(binding.received, set()).add((aor, binding.contact))
            if binding.connection_id is not None:
                self._by_connection.setdefault(binding.connection_id, set()).add(
                    (aor, binding.contact)
                )
        self._compact()
        return LocationChange(aor, added, removed)

    def remove_aor(self, aor: str) -> list[Binding]:
        """Drop every binding of AOR key ``aor``; returns them."""
        gone = self._bindings.pop(aor, [])
        for binding in gone:
            self._unindex(binding)
        return gone

    def remove_connection(self, connection_id: int) -> list[Binding]:
        """Drop and return every binding registered here over TCP/TLS connection
        ``connection_id``, which has closed (module docstring, Flows). An AOR left
        without bindings is gone, so it no longer counts against ``max_aors``."""
        keys = self._by_connection.pop(connection_id, None)
        if not keys:
            return []
        gone: list[Binding] = []
        for aor, contact in keys:
            items = self._bindings.get(aor)
            if not items:
                continue
            for index, binding in enumerate(items):
                if binding.contact == contact and binding.connection_id == connection_id:
                    del items[index]
                    gone.append(binding)
                    self._unindex_received(binding)
                    break
            if not items:
                del self._bindings[aor]
        # The deadline heap keeps their entries: expire() and next_expiry() skip
        # deadlines whose binding is gone (lazy invalidation).
        return gone

    def expire(self, now: float) -> list[Binding]:
        """Remove and return every binding whose time is up (``expires_at <= now``)."""
        gone: list[Binding] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            expires_at, aor, contact = heapq.heappop(deadlines)
            items = self._bindings.get(aor)
            if not items:
                continue
            # Lazy invalidation: the deadline counts only if that binding still has it.
            for index, binding in enumerate(items):
                if binding.contact == contact and binding.expires_at == expires_at:
                    del items[index]
                    gone.append(binding)
                    self._unindex(binding)
                    break
            if not items:
                del self._bindings[aor]
        for binding in gone:
            logger.debug("- binding expired %s -> %s", binding.aor, _loggable(binding.contact))
        return gone

    def next_expiry(self) -> float | None:
        """The earliest time :meth:`expire` may have something to do (a deadline)."""
        while self._deadlines:
            expires_at, aor, contact = self._deadlines[0]
            binding = self.get(aor, contact)
            if binding is not None and binding.expires_at == expires_at:
                return expires_at
            heapq.heappop(self._deadlines)
        return None

    def apply(self, added: Iterable[Binding], removed: Iterable[Binding]) -> None:
        """Replay a change made elsewhere (the HA primary): upsert ``added`` and drop
        ``removed``, matched by AOR and contact text. Caps are not checked here: the
        primary checked them. The bindings added are not indexed by connection
        (module docstring, Flows): their ``connection_id`` is the primary's."""
        for binding in removed:
            self._pop(binding.aor, binding.contact)
        for binding in added:
            self._pop(binding.aor, binding.contact)
            self._bindings.setdefault(binding.aor, []).append(binding)
            heapq.heappush(self._deadlines, (binding.expires_at, binding.aor, binding.contact))
            self._by_received.setdefault(binding.received, set()).add(
                (binding.aor, binding.contact)
            )

    def _pop(self, aor: str, contact: str) -> None:
        """Drop the binding of ``aor`` with contact text ``contact``, if there is one."""
        items = self._bindings.get(aor)
        if items is None:
            return
        for index, binding in enumerate(items):
            if binding.contact == contact:
                del items[index]
                self._unindex(binding)
                break
        if not items:
            del self._bindings[aor]

    def _unindex(self, binding: Binding) -> None:
        """Forget ``binding`` in the indexes (a no-op for an index it is not in: the
        connection index of one replicated, or replaced meanwhile by a value over
        another connection)."""
        self._unindex_received(binding)
        if binding.connection_id is None:
            return
        keys = self._by_connection.get(binding.connection_id)
        if keys is None:
            return
        keys.discard((binding.aor, binding.contact))
        if not keys:
            del self._by_connection[binding.connection_id]

    def _unindex_received(self, binding: Binding) -> None:
        keys = self._by_received.get(binding.received)
        if keys is None:
            return
        # A refresh from the same address is a new value under the same key: only a
        # key that no binding from there holds any more goes.
        current = self.get(binding.aor, binding.contact)
        if current is not None and current is not binding and current.received == binding.received:
            return
        keys.discard((binding.aor, binding.contact))
        if not keys:
            del self._by_received[binding.received]

    def _compact(self) -> None:
        # Refreshes leave stale deadlines behind; rebuild once they dominate the heap.
        # Counting the bindings walks every AOR: done only when the heap has grown
        # past what the last count allowed (amortized O(1) per change, where counting
        # on every REGISTER was 5 % of its CPU with 5,000 users).
        if len(self._deadlines) <= self._compact_at:
            return
        live = len(self)
        if len(self._deadlines) > 2 * live + 64:
            self._deadlines = [(b.expires_at, b.aor, b.contact) for b in self]
            heapq.heapify(self._deadlines)
        self._compact_at = 2 * live + 64

    # -- replication

    def to_dict(self) -> dict[str, Any]:
        """Every binding as plain values, for the HA standby or a state file."""
        return {
            "version": LOCATION_VERSION,
            "bindings": [b.to_dict() for items in self._bindings.values() for b in items],
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        domains: tuple[str, ...] = (),
        max_contacts: int = DEFAULT_MAX_CONTACTS,
        max_aors: int = DEFAULT_MAX_AORS,
    ) -> LocationService:
        """A service holding the bindings of :meth:`to_dict` output (caps not applied
        to what is restored). Raises ValueError on an unknown version or bad data."""
        if data.get("version") != LOCATION_VERSION:
            raise ValueError(f"unsupported location data version {data.get('version')!r}")
        service = cls(domains=domains, max_contacts=max_contacts, max_aors=max_aors)
        try:
            bindings = [Binding.from_dict(item) for item in data["bindings"]]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad binding in location data: {exc}") from None
        service.apply(bindings, ())
        return service


def parse_contact_uri(text: str) -> SipUri | None:
    """``text`` parsed as a SIP/SIPS URI, or None."""
    try:
        uri = parse_uri(text)
    except ParseError:
        return None
    return uri if isinstance(uri, SipUri) else None


def _loggable(contact: str) -> str:
    """A Contact URI for the log: a password in its userinfo (RFC 3261 19.1.1 allows
    one, NOT RECOMMENDED) masked, as logs never show secrets."""
    uri = parse_contact_uri(contact)
    if uri is None or uri.password is None:
        return contact
    return str(replace(uri, password="****"))
