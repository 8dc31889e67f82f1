"""Registration relay to an inside registrar, with caching and throttling, sans-I/O.

A realm in relay mode does not register phones itself: each phone's REGISTER goes
on to the inside registrar (Kamailio, a PBX) as the SBC's own request. Nothing of
the outside crosses: the upstream REGISTER has its own Call-ID, tags, Via and a
Contact that names the SBC's inside listener with a per-binding token as user
(``sip:<token>@sbc-inside``: the Contact rewrite an SBC does instead of RFC 3327
Path, which would still need the phone's address). A call the registrar sends to
that Contact comes to the SBC, whose location service maps the token back to the
phone: to the address its REGISTER really came from, so phones behind a NAT are
reached (RFC 3261 10.3 lets the registrar record received/rport; RFC 5626 does the
same for outbound).

Caching and throttling: the SBC asks the upstream for ``upstream_expires`` (long)
and grants the phone at most ``phone_expires`` (short, so NAT mappings stay warm).
A re-REGISTER of the same contact, without credentials and from the address the
upstream last accepted it from, while the upstream binding still has more than the
phone's interval left (plus a margin) is answered locally with 200; the upstream
sees one refresh per ``upstream_expires / 2`` however often phones refresh. The
cache authenticates no one, so a REGISTER from anywhere else goes upstream (and
is challenged there), and a binding moves only when the upstream accepts. A
de-registration (expires 0 or ``*``) always goes upstream; ``*`` takes every
contact of the user with it.

The phone's 200, relayed or cached, lists every current binding of its user (RFC
3261 10.3 step 8): the phones' own contacts with their remaining intervals, never
the SBC's inside Contact. A binding remembers the phone's Call-ID and CSeq of the
REGISTER that last updated it; a later one in the same Call-ID needs a higher CSeq
or is refused here with 400, not sent upstream (10.3 step 7; a new Call-ID replaces).

Authentication stays the upstream's: its 401/407 challenge is relayed to the phone
and the phone's credentials are copied into the next upstream REGISTER (the digest
``uri`` is the phone's Request-URI; registrars that insist on it matching their
own Request-URI need ``upstream_domain`` set to what the phones are told to use).

Users are keyed by the To user with its escapes decoded (RFC 3261 19.1.4 compares
userinfo unescaped): ``sip:%61lice@...`` and ``sip:alice@...`` are one user, and
the upstream's AOR is written escaped again (``escape_user``), whatever octets the
phone's escapes decoded to.

Closed flows (RFC 5626 5.3): a phone registered over TCP or TLS is reached over
that connection, at its (ephemeral) end of it. When the connection closes,
:meth:`RegistrationRelay.connection_closed` takes the phone's token out of the
location service, so calls from the upstream to that Contact are answered at once
instead of waiting on a connect nobody accepts. The relayed binding itself stays
until it runs out, as does its upstream registration: the phone's next REGISTER,
over its next connection, refreshes the same upstream Contact (token) rather than
leaving a stale one upstream beside a new one. A connection that closes while its
REGISTER waits on the upstream leaves the phone the same way: the upstream's 200
registers it there, and it is not located here until its next REGISTER.

Everything here is a plain value or pure; ``now`` is a wall-clock epoch float.
"""

from __future__ import annotations

import heapq
import logging
import math
import secrets
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Any, Final

from sbc.registrar.location import Binding, LocationService
from sbc.sip.errors import ParseError
from sbc.sip.headers import parse_delta
from sbc.sip.message import Headers, Request, Response, make_response, new_branch, new_tag
from sbc.sip.uri import SipUri, escape_user, format_host
from sbc.transport.base import Destination, Flow, ListenAddress, Transport

logger = logging.getLogger(__name__)

#: Seconds of upstream validity kept in hand before answering a phone locally.
CACHE_MARGIN: Final = 30

#: What a phone gets when it asks no interval (RFC 3261 10.2.1.1 default).
DEFAULT_EXPIRES: Final = 3600

#: Most relayed bindings at once (each costs an upstream registration).
MAX_BINDINGS: Final = 100_000

#: Seconds a new binding waits for the upstream's answer before expiry may take it:
#: its REGISTER transaction lasts at most 64*T1 (RFC 3261 17.1.2.2).
PENDING_SECONDS: Final = 32.0

#: Seconds a new binding the upstream refused (401/407) waits for the phone's retry
#: with credentials, which then keeps the upstream Call-ID and the next CSeq
#: (RFC 3261 10.2.1); unauthenticated REGISTERs cannot fill the table for longer.
CHALLENGE_SECONDS: Final = 5.0

#: Auth headers the phone sends that the upstream must see (its own challenge).
_AUTH_HEADERS: Final = ("Authorization", "Proxy-Authorization")
_CHALLENGE_HEADERS: Final = ("WWW-Authenticate", "Proxy-Authenticate", "Min-Expires")


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    """Where registrations go and for how long."""

    #: The realm the upstream registrar is reached through, and its address.
    realm: str
    upstream: Destination
    #: The listener of ``realm`` the SBC's upstream Contact names.
    local: ListenAddress
    #: Host of the upstream's AORs (To/From/Request-URI); None = the upstream's address.
    upstream_domain: str | None = None
    #: Interval asked of the upstream, and the most a phone is granted.
    upstream_expires: int = 3600
    phone_expires: int = 300
    #: Contacts of one user at once: more get 503, as the embedded registrar's
    #: ``max_contacts`` (each 200 lists them all, RFC 3261 10.3 step 8).
    max_contacts: int = 10

    def __post_init__(self) -> None:
        if self.phone_expires < 1 or self.upstream_expires < 1:
            raise ValueError("phone_expires and upstream_expires must be at least 1")
        if self.max_contacts < 1:
            raise ValueError("max_contacts must be at least 1")


@dataclass(frozen=True, slots=True)
class RelayedBinding:
    """One phone contact registered upstream through the SBC.

    ``user`` is the To user unescaped (it may hold any character, and surrogates for
    octets that were not UTF-8): escape it before it goes into a URI.
    """

    user: str
    contact: str
    token: str
    received: Destination
    local: ListenAddress
    realm: str
    call_id: str
    cseq: int
    #: Wall-clock ends of the upstream's and the phone's registrations.
    upstream_expires_at: float = 0.0
    phone_expires_at: float = 0.0
    #: The phone's Call-ID and CSeq of the REGISTER that last updated the binding
    #: (RFC 3261 10.3 step 7); "" until the upstream first accepts it.
    phone_call_id: str = ""
    phone_cseq: int = 0
    #: The TCP/TLS connection ``received`` is reached over; None for UDP and once
    #: it closed. Only meaningful on the node whose transport numbered it.
    connection_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "contact": self.contact,
            "token": self.token,
            "received": [self.received.transport.value, self.received.host, self.received.port],
            "local": [self.local.transport.value, self.local.host, self.local.port],
            "realm": self.realm,
            "call_id": self.call_id,
            "cseq": self.cseq,
            "upstream_expires_at": self.upstream_expires_at,
            "phone_expires_at": self.phone_expires_at,
            "phone_call_id": self.phone_call_id,
            "phone_cseq": self.phone_cseq,
            "connection_id": self.connection_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RelayedBinding:
        t, h, p = data["received"]
        lt, lh, lp = data["local"]
        return cls(
            user=str(data["user"]),
            contact=str(data["contact"]),
            token=str(data["token"]),
            received=Destination(Transport(t), str(h), int(p)),
            local=ListenAddress(Transport(lt), str(lh), int(lp)),
            realm=str(data["realm"]),
            call_id=str(data["call_id"]),
            cseq=int(data["cseq"]),
            upstream_expires_at=float(data["upstream_expires_at"]),
            phone_expires_at=float(data["phone_expires_at"]),
            # Absent from records written before ordering was kept: no order yet.
            phone_call_id=str(data.get("phone_call_id", "")),
            phone_cseq=int(data.get("phone_cseq", 0)),
            connection_id=None if data.get("connection_id") is None else int(data["connection_id"]),
        )


@dataclass(frozen=True, slots=True)
class Forward:
    """Send ``request`` to the upstream; report its answer with ``upstream_response``.

    ``received``, ``local`` and ``realm`` say where the phone's REGISTER came from:
    its binding moves there only once the upstream accepts. ``wildcard``: a
    ``Contact: *`` de-registration of every binding of the user ``key[0]``.
    """

    request: Request
    key: tuple[str, str]
    expires: int
    received: Destination | None = None
    local: ListenAddress | None = None
    realm: str | None = None
    wildcard: bool = False
    #: A wildcard's contacts as it named them upstream: only those go when it is
    #: accepted (one registered meanwhile was not in it, and stays upstream).
    named: tuple[str, ...] = ()
    #: The phone's TCP/TLS connection, which ``received`` is reached over.
    connection_id: int | None = None


@dataclass
class RelayStats:
    forwarded: int = 0
    cached: int = 0
    rejected: int = 0


def _delta(text: str) -> int | None:
    """A delta-seconds value capped at 2**32-1, None if not ASCII digits ("²" is a
    digit to str.isdigit, not to int)."""
    return parse_delta(text.strip())


def _expires_of(request: Request) -> int | None:
    try:
        contacts = request.contacts
    except ParseError:
        contacts = []
    for contact in contacts[:1]:
        value = dict(contact.params).get("expires")
        if value is not None and (seconds := _delta(value)) is not None:
            return seconds
    header = request.headers.get("Expires")
    return None if header is None else _delta(header)


def _to_user(request: Request) -> str | None:
    """The To user with its escapes decoded (RFC 3261 19.1.4), None if there is none."""
    uri = request.to.uri
    if not isinstance(uri, SipUri) or not uri.user:
        return None
    return uri.user_unescaped


def _granted(response: Response, token: str) -> int | None:
    """The interval the upstream granted our Contact (its expires, or Expires)."""
    try:
        contacts = response.contacts
    except ParseError:
        contacts = []
    for contact in contacts:
        uri = contact.uri
        if isinstance(uri, SipUri) and uri.user_unescaped == token:
            value = dict(contact.params).get("expires")
            if value is not None and (seconds := _delta(value)) is not None:
                return seconds
    header = response.headers.get("Expires")
    return None if header is None else _delta(header)


def _out_of_order(binding: RelayedBinding, request: Request) -> bool:
    """RFC 3261 10.3 step 7: ``request`` is in the Call-ID that last updated
    ``binding`` without a higher CSeq (a different Call-ID replaces the binding)."""
    return (
        bool(binding.phone_call_id)
        and binding.phone_call_id == request.call_id
        and request.cseq.seq <= binding.phone_cseq
    )


def _ordered(binding: RelayedBinding, request: Request) -> RelayedBinding:
    """``binding`` as last updated by the phone's ``request``."""
    return replace(binding, phone_call_id=request.call_id, phone_cseq=request.cseq.seq)


@dataclass
class RegistrationRelay:
    """Relays phones' registrations to one upstream registrar, caching refreshes."""

    policy: RelayPolicy
    #: Where inbound calls find phones: AOR key = the token of the SBC's Contact.
    location: LocationService = field(default_factory=LocationService)
    stats: RelayStats = field(default_factory=RelayStats)
    _bindings: dict[tuple[str, str], RelayedBinding] = field(default_factory=dict)
    #: Each user's contacts in ``_bindings`` (a dict as an insertion-ordered set), so
    #: a REGISTER costs what its user holds, not the whole table. Derived: rebuilt
    #: from ``_bindings``, changed only by ``_store`` and ``_drop``.
    _by_user: dict[str, dict[str, None]] = field(init=False, repr=False)
    #: The keys of the bindings reached over each TCP/TLS connection, so a closed
    #: one costs what it carried. Changed only by ``_store`` and ``_drop``; bindings
    #: given at construction (restored: their ids are another process's) are not in it.
    _by_connection: dict[int, dict[tuple[str, str], None]] = field(init=False, repr=False)
    #: (phone_expires_at, user, contact) of every binding stored, lazily invalidated:
    #: ``expire`` costs what runs out, not a walk over the table every second.
    _deadlines: list[tuple[float, str, str]] = field(init=False, repr=False)
    #: REGISTERs waiting on the upstream, by the phone's TCP/TLS connection, and
    #: those of the connections that closed meanwhile: the upstream's 200 must not
    #: put a phone back in the location over a connection that is gone.
    _waiting: dict[int, int] = field(init=False, repr=False)
    _closed_waiting: set[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_user = {}
        self._by_connection = {}
        self._deadlines = []
        self._waiting = {}
        self._closed_waiting = set()
        for (user, contact), binding in self._bindings.items():
            self._by_user.setdefault(user, {})[contact] = None
            self._deadlines.append((binding.phone_expires_at, user, contact))
        heapq.heapify(self._deadlines)

    def __len__(self) -> int:
        return len(self._bindings)

    def bindings(self) -> tuple[RelayedBinding, ...]:
        return tuple(self._bindings.values())

    # -- from the phone -----------------------------------------------------------------

    def register(
        self, request: Request, flow: Flow, realm: str, listen: ListenAddress, now: float
    ) -> Response | Forward:
        """A phone's REGISTER: answered here (cached, or refused) or forwarded upstream."""
        user = _to_user(request)
        if user is None:
            self.stats.rejected += 1
            return make_response(request, 400, "Bad Request: no user in To", to_tag=new_tag())
        raw = request.headers.values("Contact")
        if not raw:
            # A query: what this SBC holds for the user, nothing changed.
            return self._ok(request, user, now)
        if any(value.strip() == "*" for value in raw):
            # RFC 3261 10.3 step 6: "*" only alone and with Expires: 0.
            expires = request.headers.get("Expires")
            if len(raw) != 1 or expires is None or _delta(expires) != 0:
                self.stats.rejected += 1
                return make_response(
                    request,
                    400,
                    "Bad Request: '*' needs to be alone and Expires: 0",
                    to_tag=new_tag(),
                )
            targets = self._of_user(user)
            if not targets:
                return self._ok(request, user, now)
            if any(_out_of_order(b, request) for b in targets):
                return self._refuse_out_of_order(request, user)
            return self._forward(
                request,
                targets[0],
                0,
                flow,
                listen,
                realm,
                now,
                wildcard=True,
                also=tuple(targets[1:]),
            )
        contacts = request.contacts
        if len(contacts) != 1 or not isinstance(contacts[0].uri, SipUri):
            self.stats.rejected += 1
            return make_response(
                request, 400, "Bad Request: one SIP Contact per REGISTER", to_tag=new_tag()
            )
        contact = str(contacts[0].uri)
        requested = _expires_of(request)
        requested = DEFAULT_EXPIRES if requested is None else requested
        key = (user, contact)
        binding = self._bindings.get(key)
        if binding is not None and _out_of_order(binding, request):
            # Refused here, refresh or removal alike: the upstream sees the SBC's own
            # Call-ID and CSeq, so only the SBC can tell the phone's order.
            return self._refuse_out_of_order(request, user)
        if requested == 0:
            if binding is None:
                return self._ok(request, user, now)
            return self._forward(request, binding, 0, flow, listen, realm, now)
        granted = min(requested, self.policy.phone_expires)
        source = Destination(flow.transport, flow.remote_host, flow.remote_port)
        # The cache answers without authentication: only from where the phone registered.
        if (
            binding is not None
            and binding.received == source
            and not any(request.headers.fields(h) for h in _AUTH_HEADERS)
        ):
            left = binding.upstream_expires_at - now
            if left > granted + CACHE_MARGIN:
                # Cached: the upstream registration outlives this refresh (throttling).
                binding = replace(
                    _ordered(binding, request),
                    local=listen,
                    realm=realm,
                    phone_expires_at=now + granted,
                    # The same address, perhaps over a new connection from the same port.
                    connection_id=flow.connection_id,
                )
                self._store(binding)
                self._locate(binding)
                self.stats.cached += 1
                return self._ok(request, user, now)
        if binding is None:
            if len(self._bindings) >= MAX_BINDINGS:
                self.stats.rejected += 1
                return make_response(request, 503, "Too Many Registrations", to_tag=new_tag())
            if len(self._by_user.get(user, ())) >= self.policy.max_contacts:
                self.stats.rejected += 1
                logger.info("x REGISTER %r: %d contacts already", user, self.policy.max_contacts)
                return make_response(request, 503, "Too Many Registered Contacts", to_tag=new_tag())
            binding = RelayedBinding(
                user=user,
                contact=contact,
                token="r" + secrets.token_hex(8),
                received=Destination(flow.transport, flow.remote_host, flow.remote_port),
                local=listen,
                realm=realm,
                call_id=secrets.token_hex(16),
                cseq=0,
                connection_id=flow.connection_id,
            )
        return self._forward(request, binding, granted, flow, listen, realm, now)

    def _refuse_out_of_order(self, request: Request, user: str) -> Response:
        """RFC 3261 10.3 step 7: the update is aborted and the request fails. The RFC
        names no status; 400, as Kamailio's and OpenSIPS's registrars answer ("Invalid
        CSeq number"): the request itself is wrong and must not be sent again as it
        is, where a 500 would invite the phone to retry it (RFC 3261 21.5.1)."""
        logger.info("x REGISTER %r: CSeq %d not above the binding's", user, request.cseq.seq)
        self.stats.rejected += 1
        return make_response(request, 400, "Bad Request: Invalid CSeq number", to_tag=new_tag())

    def _forward(
        self,
        request: Request,
        binding: RelayedBinding,
        granted: int,
        flow: Flow,
        listen: ListenAddress,
        realm: str,
        now: float,
        *,
        wildcard: bool = False,
        also: tuple[RelayedBinding, ...] = (),
    ) -> Forward:
        """The upstream REGISTER for ``binding``; ``also``: more of the user's bindings
        to remove with it (a wildcard de-registration)."""
        policy = self.policy
        # Where the phone is changes only when the upstream accepts (upstream_response):
        # a REGISTER the upstream refuses must not move the binding (nor the cache).
        binding = replace(binding, cseq=binding.cseq + 1)
        if binding.upstream_expires_at == 0.0:
            # Pending (never accepted upstream) until the upstream answers: the
            # once-a-second expiry must not take it before.
            binding = replace(binding, phone_expires_at=now + PENDING_SECONDS)
        self._store(binding)
        domain = policy.upstream_domain or format_host(policy.upstream.host)
        local = policy.local
        headers = Headers()
        headers.add(
            "Via",
            f"SIP/2.0/{local.transport.value.upper()} {format_host(local.host)}:{local.port}"
            f";branch={new_branch()};rport",
        )
        headers.add("Max-Forwards", "70")
        # Escaped again: a decoded CR LF would end the header line (header injection).
        aor = f"sip:{escape_user(binding.user)}@{domain}"
        headers.add("From", f"<{aor}>;tag={new_tag()}")
        headers.add("To", f"<{aor}>")
        headers.add("Call-ID", binding.call_id)
        headers.add("CSeq", f"{binding.cseq} REGISTER")
        expires = 0 if granted == 0 else policy.upstream_expires
        param = "" if local.transport is Transport.UDP else f";transport={local.transport.value}"
        for item in (binding, *also):
            headers.add(
                "Contact",
                f"<sip:{item.token}@{format_host(local.host)}:{local.port}{param}>"
                f";expires={expires}",
            )
        headers.add("Expires", str(expires))
        for name in _AUTH_HEADERS:
            for value in request.headers.fields(name):
                headers.add(name, value)
        upstream = Request("REGISTER", f"sip:{domain}", headers)
        self.stats.forwarded += 1
        # A flag, not a "*" user in the key: "*" (or %2A) is a valid user of its own.
        key = (binding.user, binding.contact)
        received = Destination(flow.transport, flow.remote_host, flow.remote_port)
        named = tuple(item.contact for item in (binding, *also)) if wildcard else ()
        if flow.connection_id is not None:
            self._waiting[flow.connection_id] = self._waiting.get(flow.connection_id, 0) + 1
        return Forward(
            upstream, key, granted, received, listen, realm, wildcard, named, flow.connection_id
        )

    # -- from the upstream ---------------------------------------------------------------

    def upstream_response(
        self, forward: Forward, phone_request: Request, response: Response, now: float
    ) -> Response:
        """The phone's answer for the upstream's final ``response`` to ``forward``."""
        closed = self._answered(forward)
        wildcard = forward.wildcard
        key = forward.key
        user = key[0]
        if wildcard:
            targets = [b for b in self._of_user(user) if b.contact in forward.named]
        else:
            found = self._bindings.get(key)
            targets = [] if found is None else [found]
        status = response.status
        if not 200 <= status < 300:
            for binding in targets:
                if binding.upstream_expires_at == 0.0 and not wildcard:
                    # Never accepted: kept only for the phone's retry.
                    self._store(replace(binding, phone_expires_at=now + CHALLENGE_SECONDS))
            headers = [
                (name, value)
                for name in _CHALLENGE_HEADERS
                for value in response.headers.fields(name)
            ]
            if status >= 500 or status == 408:
                # The upstream failed: the phone tries again later (RFC 3261 21.5.4).
                headers.append(("Retry-After", "30"))
            return make_response(
                phone_request, status, response.reason, to_tag=new_tag(), headers=headers
            )
        if forward.expires == 0 or wildcard:
            # Gone upstream, whatever the phone sent since: a refresh cached meanwhile
            # never reached the upstream, and must not keep a binding it no longer has.
            for binding in targets:
                self._drop(binding)
            return self._ok(phone_request, user, now)
        # A later REGISTER of the phone's was accepted (or cached) before this answer
        # came: this one, in order when it went up, is superseded and changes nothing
        # (RFC 3261 10.3 step 7: a binding never goes back to an older request).
        if not targets or _out_of_order(targets[0], phone_request):
            return self._ok(phone_request, user, now)
        binding = targets[0]
        granted_upstream = _granted(response, binding.token)
        upstream_for = (
            self.policy.upstream_expires if granted_upstream is None else granted_upstream
        )
        phone_for = max(1, min(forward.expires, upstream_for))
        binding = replace(
            _ordered(binding, phone_request),
            received=forward.received or binding.received,
            connection_id=forward.connection_id if forward.received else binding.connection_id,
            local=forward.local or binding.local,
            realm=forward.realm or binding.realm,
            upstream_expires_at=now + upstream_for,
            phone_expires_at=now + phone_for,
        )
        if closed:
            # The phone's connection closed while the upstream decided: registered
            # upstream (its next REGISTER refreshes the same token), unreachable here
            # until then, as connection_closed leaves a phone.
            binding = replace(binding, connection_id=None)
            self._store(binding)
            self.location.remove_aor(binding.token)
            logger.info(
                "- connection #%d closed before the upstream accepted %s: not located",
                forward.connection_id,
                user,
            )
            return self._ok(phone_request, user, now)
        self._store(binding)
        self._locate(binding)
        return self._ok(phone_request, user, now)

    def upstream_failed(self, forward: Forward, phone_request: Request) -> Response:
        """No answer from the upstream (timeout, transport error)."""
        self._answered(forward)
        return make_response(
            phone_request, 503, None, to_tag=new_tag(), headers=[("Retry-After", "30")]
        )

    def _answered(self, forward: Forward) -> bool:
        """``forward`` waits no more; True if its phone's connection closed meanwhile."""
        connection_id = forward.connection_id
        if connection_id is None or connection_id not in self._waiting:
            return False
        left = self._waiting[connection_id] - 1
        closed = connection_id in self._closed_waiting
        if left:
            self._waiting[connection_id] = left
        else:
            del self._waiting[connection_id]
            self._closed_waiting.discard(connection_id)
        return closed

    # -- housekeeping ----------------------------------------------------------------------

    def expire(self, now: float) -> list[RelayedBinding]:
        """Forget phones whose registration ran out (the upstream one lapses on its own)."""
        gone: list[RelayedBinding] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            due, user, contact = heapq.heappop(deadlines)
            binding = self._bindings.get((user, contact))
            # Only if that binding still has that deadline (a refresh moved it).
            if binding is not None and binding.phone_expires_at == due:
                self._drop(binding)
                gone.append(binding)
        return gone

    def connection_closed(self, connection_id: int, now: float) -> list[RelayedBinding]:
        """TCP/TLS connection ``connection_id`` closed: the phones reached over it
        leave the location service (module docstring, Closed flows); their relayed
        bindings stay until they run out. Returns them as they are now."""
        if connection_id in self._waiting:
            self._closed_waiting.add(connection_id)
        keys = self._by_connection.pop(connection_id, None)
        if not keys:
            return []
        gone: list[RelayedBinding] = []
        for key in keys:
            binding = self._bindings.get(key)
            if binding is None or binding.connection_id != connection_id:
                continue
            self.location.remove_aor(binding.token)
            binding = replace(binding, connection_id=None)
            self._store(binding)
            gone.append(binding)
        if gone:
            logger.info(
                "- connection #%d closed: %d relayed phone(s) unreachable until they register",
                connection_id,
                len(gone),
            )
        return gone

    def _store(self, binding: RelayedBinding) -> None:
        """Insert or replace ``binding`` in the table and in its user's and its
        connection's indexes."""
        key = (binding.user, binding.contact)
        old = self._bindings.get(key)
        if old is not None and old.connection_id != binding.connection_id:
            self._unindex(old)
        self._bindings[key] = binding
        if old is None or old.phone_expires_at != binding.phone_expires_at:
            heapq.heappush(self._deadlines, (binding.phone_expires_at, *key))
            if len(self._deadlines) > 2 * len(self._bindings) + 64:
                # Refreshes leave stale deadlines behind: rebuild once they dominate.
                self._deadlines = [(b.phone_expires_at, *k) for k, b in self._bindings.items()]
                heapq.heapify(self._deadlines)
        self._by_user.setdefault(binding.user, {})[binding.contact] = None
        if binding.connection_id is not None:
            self._by_connection.setdefault(binding.connection_id, {})[key] = None

    def _drop(self, binding: RelayedBinding) -> None:
        """Remove ``binding`` from the table, its indexes and the location service."""
        key = (binding.user, binding.contact)
        old = self._bindings.pop(key, None)
        if old is not None:
            self._unindex(old)
        contacts = self._by_user.get(binding.user)
        if contacts is not None:
            contacts.pop(binding.contact, None)
            if not contacts:
                del self._by_user[binding.user]
        self.location.remove_aor(binding.token)

    def _unindex(self, binding: RelayedBinding) -> None:
        if binding.connection_id is None:
            return
        keys = self._by_connection.get(binding.connection_id)
        if keys is not None:
            keys.pop((binding.user, binding.contact), None)
            if not keys:
                del self._by_connection[binding.connection_id]

    def _of_user(self, user: str) -> list[RelayedBinding]:
        """Every binding of ``user``, pending or refused ones included."""
        return [self._bindings[(user, contact)] for contact in self._by_user.get(user, ())]

    def _current(self, user: str, now: float) -> list[RelayedBinding]:
        """The bindings of ``user`` a 200 lists: accepted upstream and not run out."""
        return [
            b for b in self._of_user(user) if b.upstream_expires_at and b.phone_expires_at > now
        ]

    def _locate(self, binding: RelayedBinding) -> None:
        """The token's binding in the location service: inbound calls reach the phone."""
        entry = Binding(
            aor=binding.token,
            contact=binding.contact,
            expires_at=binding.phone_expires_at,
            call_id=binding.call_id,
            cseq=binding.cseq,
            received=binding.received,
            local=binding.local,
            realm=binding.realm,
            registered_at=binding.phone_expires_at,
        )
        self.location.apply([entry], [])

    def _ok(self, request: Request, user: str, now: float) -> Response:
        """200 with every current binding of ``user`` (RFC 3261 10.3 step 8), each the
        contact as its phone sent it with its own remaining interval: never the SBC's
        inside Contact, which would tell the outside the inside's addresses."""
        headers = [
            ("Contact", f"<{b.contact}>;expires={max(0, math.ceil(b.phone_expires_at - now))}")
            for b in self._current(user, now)
        ]
        headers.append(("Date", formatdate(now, usegmt=True)))
        return make_response(request, 200, None, to_tag=new_tag(), headers=headers)
