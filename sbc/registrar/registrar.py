"""The embedded registrar: REGISTER processing (RFC 3261 10.3) and digest checks, sans-I/O.

:meth:`Registrar.register` takes one REGISTER, the flow it came on and ``now`` (a
wall-clock epoch float) and returns a :class:`RegisterResult`: the response to send,
the bindings that changed (for the HA standby) and, when credentials were wrong, an
:class:`AuthFailure` for the firewall's digest-failure detector. The steps follow
RFC 3261 10.3:

1. The Request-URI names a served domain (any, when ``domains`` is empty; an IP
   literal always does, because phones are often configured with the SBC's
   address): else 404.
2. Require: only option tags the registrar implements (``path``, ``outbound``):
   else 420 with Unsupported (RFC 3261 8.2.2.3).
3. Authentication (RFC 3261 22): no credentials for our realm -> 401 with one
   WWW-Authenticate per algorithm (SHA-256 first); a stale nonce with the right
   password -> 401 ``stale=true``; a wrong password or unknown user -> 401 again
   (RFC 3261 22.4: a server re-challenges, it does not answer 403) and an
   :class:`AuthFailure`; malformed credentials -> 400. A source or user name with
   too many recent failures is locked out for a while: 503 with Retry-After, the
   credentials unchecked (:class:`~sbc.sip.auth.PasswordGuessLimiter`).
4. Authorization: the authenticated user must be the To user: else 403.
5. The AOR comes from To (a SIP/SIPS URI with a user): else 400; its domain must be
   served: else 404.
6. ``Contact: *`` is allowed only alone and with ``Expires: 0``: else 400.
7. Each contact's interval is its ``expires`` parameter, else the Expires header,
   else ``default_expires``; malformed values count as 3600 (RFC 3261 20.10). A
   non-zero interval under ``min_expires`` (and under an hour) -> 423 with
   Min-Expires; longer than ``max_expires`` is shortened. A contact that matches a
   binding with the same Call-ID and a CSeq that is not higher fails the whole
   request with 400 "Invalid CSeq number" (RFC 3261 10.3 step 7 names no status;
   Kamailio's and OpenSIPS's registrars, and the registration relay, answer 400: a
   500 would invite the phone to send the same request again, 21.5.1). Updates
   are all or nothing. A change beyond the location caps -> 503 (Kamailio's "Too many
   registered contacts").
8. 200 with every current binding as a Contact with its ``expires``, and a Date.

A REGISTER without Contact is a query: step 8 with the bindings unchanged.

NAT keepalive: phones behind NAT on UDP lose their mapping unless something goes
through it. :meth:`Registrar.keepalive_targets` returns the UDP bindings due for a
keepalive every ``keepalive_interval`` seconds (a REGISTER refresh counts as
traffic), one per (source address, listener) pair; the app sends each a CRLFCRLF
datagram (RFC 5626 4.4.1's keepalive, which a SIP stack ignores) or an OPTIONS
request from ``binding.local`` to ``binding.received``. TCP/TLS flows keep their
own mappings alive, so they are never returned.

With ``keepalive_options`` the keepalive is an OPTIONS (Kamailio's "SIP ping"),
and it also tells whether the phone is still there: :meth:`Registrar.keepalive_ping`
names each one (a Call-ID), the app hands any response to it to
:meth:`Registrar.keepalive_answered`, and a flow that leaves
``keepalive_failures`` pings in a row unanswered has its bindings removed, as if
they had expired: calls stop ringing a phone that is gone (unplugged, its NAT
mapping lost) until it registers again. Any REGISTER over the flow counts as an
answer.

Closed flows (RFC 5626 5.3, 6): a binding registered over a TCP or TLS connection
is reached over that connection, at the phone's (ephemeral) end of it. When the
transport layer reports the connection closed, :meth:`Registrar.connection_closed`
removes its bindings, as an expiry would: a call to the user then goes to the
user's other bindings (another flow of the same RFC 5626 instance included), or
is answered 480 when none is left, instead of waiting on a connect to a port
nobody listens on. The phone registers again over its next connection.
"""

from __future__ import annotations

import heapq
import logging
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Final

from sbc.registrar.credentials import CredentialBackend, CredentialStoreError
from sbc.registrar.location import (
    Binding,
    LocationError,
    LocationService,
    TooManyAorsError,
    normalize_domain,
)
from sbc.sip.auth import (
    AuthHeaderError,
    AuthOutcome,
    AuthResult,
    DigestCredentials,
    DigestServer,
    PasswordGuessLimiter,
    parse_credentials,
)
from sbc.sip.errors import ParseError
from sbc.sip.headers import (
    MAX_DELTA_SECONDS,
    Address,
    get_param,
    parse_delta,
    quote_string,
    split_list,
    unquote_string,
)
from sbc.sip.message import Request, Response, make_response, new_tag
from sbc.sip.uri import SipUri
from sbc.transport.base import Destination, Flow, ListenAddress, ip_literal
from sbc.transport.resolver import Transport

logger = logging.getLogger(__name__)

#: Option tags this registrar implements (RFC 3327 Path, RFC 5626 outbound).
SUPPORTED_EXTENSIONS: Final = ("outbound", "path")
#: Call-IDs of OPTIONS keepalives start so; the app hands responses to them to the
#: registrar (``keepalive_answered``), not to the transaction layer.
KEEPALIVE_CALL_ID_PREFIX: Final = "sbc-keepalive-"
#: RFC 3261 20.10 / 20.19: a malformed interval counts as an hour.
MALFORMED_EXPIRES: Final = 3600
#: RFC 3261 10.3 step 7: 423 only for intervals shorter than an hour.
INTERVAL_TOO_BRIEF_CEILING: Final = 3600
#: RFC 5626 4.1: reg-id is 1 to 2**31-1.
MAX_REG_ID: Final = 2**31 - 1
#: Longest Call-ID / User-Agent stored in a binding (they are replicated and logged).
MAX_STORED_TEXT: Final = 256
#: Status of a request whose source or user name is locked out after failed
#: authentications. Not 403: RFC 3261 21.4.4 says not to repeat the request, and
#: UAs obey (Asterisk's outbound registration stops for good on 403 unless
#: forbidden_retry_interval is set), which would make a bounded lockout a lasting
#: one. 503 with Retry-After (RFC 3261 21.5.4, 20.33) says "temporarily, retry
#: then", which registering UAs honour.
LOCKED_OUT_STATUS: Final = 503

#: The reason of the 400 to a REGISTER out of CSeq order (step 7), as Kamailio words it.
ORDER_REASON: Final = "Bad Request: Invalid CSeq number"

# RFC 3261 25.1: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE: Final = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")


@dataclass(frozen=True, slots=True)
class RegistrarPolicy:
    """What the registrar accepts (the config's ``registrar`` section).

    ``realm`` is the digest realm; ``domains``, ``max_contacts`` and ``max_aors``
    must be those of the :class:`LocationService` (:meth:`new_location` builds one).
    ``keepalive_interval`` is the NAT keepalive period when ``nat_keepalive`` is on.
    """

    realm: str = "sbc"
    domains: tuple[str, ...] = ()
    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 3600
    auth_required: bool = True
    max_contacts: int = 10
    max_aors: int = 100_000
    nat_keepalive: bool = True
    keepalive_interval: float = 25.0
    #: OPTIONS keepalives whose answers prove the phone alive (module docstring).
    keepalive_options: bool = False
    keepalive_failures: int = 3

    def __post_init__(self) -> None:
        if not self.realm:
            raise ValueError("realm must not be empty")
        if not 1 <= self.min_expires <= self.default_expires <= self.max_expires:
            raise ValueError("expected 1 <= min_expires <= default_expires <= max_expires")
        if self.max_contacts < 1 or self.max_aors < 1:
            raise ValueError("max_contacts and max_aors must be at least 1")
        if not (self.keepalive_interval > 0 and math.isfinite(self.keepalive_interval)):
            raise ValueError("keepalive_interval must be a positive number of seconds")
        if self.keepalive_failures < 1:
            raise ValueError("keepalive_failures must be at least 1")

    def new_location(self) -> LocationService:
        """An empty location service with this policy's domains and caps."""
        return LocationService(
            domains=self.domains, max_contacts=self.max_contacts, max_aors=self.max_aors
        )


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """Credentials that were wrong (bad digest, unknown user): not merely missing or
    stale. What the firewall's digest-failure detector counts per source and user."""

    username: str | None
    outcome: AuthOutcome


@dataclass(frozen=True)
class RegisterResult:
    """The outcome of one REGISTER.

    ``response`` is always set. ``aor`` is the AOR key once known, ``username`` the
    authenticated user. ``added`` holds new and refreshed bindings (their current
    values), ``removed`` the bindings that went away: together, what a standby
    applies (:meth:`LocationService.apply`).
    """

    response: Response
    aor: str | None = None
    username: str | None = None
    auth_failure: AuthFailure | None = None
    added: tuple[Binding, ...] = ()
    removed: tuple[Binding, ...] = ()


@dataclass(frozen=True)
class AuthCheck:
    """The verdict on a request's credentials: ``response`` is None when authenticated.

    ``result`` is None when no credentials for our realm were sent.
    """

    result: AuthResult | None
    response: Response | None
    failure: AuthFailure | None = None

    @property
    def ok(self) -> bool:
        return self.response is None


class _Reject(Exception):
    """Abort REGISTER processing with a response (internal control flow)."""

    def __init__(
        self, status: int, reason: str | None = None, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        super().__init__(status)
        self.status = status
        self.reason = reason
        self.headers: tuple[tuple[str, str], ...] = tuple(headers)


@dataclass(frozen=True, slots=True)
class _ContactRequest:
    """One Contact of a REGISTER, read and checked."""

    uri: SipUri
    expires: int
    q: float | None
    instance: str | None
    reg_id: int | None


@dataclass
class Registrar:
    """RFC 3261 10.3 registrar over a :class:`LocationService` (module docstring).

    ``guesses`` limits password guessing per source and per user name, for
    REGISTER and for the requests :meth:`check_credentials` checks for the B2BUA.
    """

    policy: RegistrarPolicy
    credentials: CredentialBackend
    location: LocationService
    digest: DigestServer
    guesses: PasswordGuessLimiter = field(default_factory=PasswordGuessLimiter)
    # (aor, contact) -> when its next NAT keepalive is due; the heap holds the same
    # deadlines, lazily invalidated.
    _keepalive_due: dict[tuple[str, str], float] = field(
        default_factory=dict, init=False, repr=False
    )
    _keepalive_heap: list[tuple[float, str, str]] = field(
        default_factory=list, init=False, repr=False
    )
    # OPTIONS keepalives: pings in a row each flow left unanswered, and the Call-ID
    # of each flow's last ping (one per flow: a new ping replaces it).
    _unanswered: dict[tuple[Destination, ListenAddress], int] = field(
        default_factory=dict, init=False, repr=False
    )
    _pings: dict[str, tuple[Destination, ListenAddress]] = field(
        default_factory=dict, init=False, repr=False
    )
    _ping_of: dict[tuple[Destination, ListenAddress], str] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        policy, location = self.policy, self.location
        if self.digest.config.realm != policy.realm:
            raise ValueError(
                f"digest realm {self.digest.config.realm!r} is not the policy's {policy.realm!r}"
            )
        domains = tuple(normalize_domain(d) for d in policy.domains)
        if (location.domains, location.max_contacts, location.max_aors) != (
            domains,
            policy.max_contacts,
            policy.max_aors,
        ):
            raise ValueError("the location service's domains and caps differ from the policy's")

    # ------------------------------------------------------------------ REGISTER

    def register(
        self, request: Request, flow: Flow, realm_name: str, listen: ListenAddress, now: float
    ) -> RegisterResult:
        """Process one REGISTER that arrived on ``flow`` at listener ``listen`` of realm
        ``realm_name`` (RFC 3261 10.3, see the module docstring)."""
        if request.method != "REGISTER":
            raise ValueError(f"not a REGISTER: {request.method}")
        state = _Progress()
        try:
            return self._register(request, flow, realm_name, listen, now, state)
        except _Reject as reject:
            response = self._reply(request, reject.status, reject.reason, reject.headers)
        except ParseError as exc:
            logger.info("x REGISTER from %s: %s", flow, exc)
            response = self._reply(request, exc.status)
        return RegisterResult(response, state.aor, state.username, state.failure)

    def _register(
        self,
        request: Request,
        flow: Flow,
        realm_name: str,
        listen: ListenAddress,
        now: float,
        state: _Progress,
    ) -> RegisterResult:
        policy = self.policy
        # Step 1: is the Request-URI a domain of ours?
        uri = request.uri
        if not isinstance(uri, SipUri):
            raise _Reject(416)
        if not self._domain_served(uri.host, allow_ip=True):
            raise _Reject(404, "Not Found: domain not served")
        # Step 2: Require (RFC 3261 8.2.2.3).
        required = request.tokens("Require")
        unsupported = [t for t in required if t.lower() not in SUPPORTED_EXTENSIONS]
        if unsupported:
            raise _Reject(420, None, (("Unsupported", ", ".join(unsupported)),))
        to_uri = request.to.uri
        if not isinstance(to_uri, SipUri):
            raise _Reject(400, "Bad Request: To is not a SIP or SIPS AOR")
        # Steps 3 and 4: authentication, then authorization for this AOR.
        if policy.auth_required:
            check = self.check_credentials(request, now, source=flow.remote_host)
            state.failure = check.failure
            if check.response is not None:
                if check.failure is not None:
                    logger.info(
                        "x REGISTER auth failed for %r from %s: %s",
                        check.failure.username,
                        flow,
                        check.failure.outcome.value,
                    )
                return RegisterResult(check.response, None, None, check.failure)
            assert check.result is not None
            state.username = check.result.username
            if state.username != to_uri.user_unescaped:
                logger.info(
                    "x REGISTER from %s: user %r may not register %s", flow, state.username, to_uri
                )
                raise _Reject(403, "Forbidden: not your AOR")
        # Step 5: the AOR.
        if not to_uri.user:
            raise _Reject(400, "Bad Request: no user in To")
        aor = self.location.aor_of(to_uri)
        if aor is None:
            raise _Reject(404, "Not Found: domain not served")
        state.aor = aor
        call_id = _stored_call_id(request)
        cseq = request.cseq.seq
        # Step 6: wildcard.
        raw_contacts = request.headers.values("Contact")
        if any(value.strip() == "*" for value in raw_contacts):
            if len(raw_contacts) != 1 or _header_expires(request) != 0:
                raise _Reject(400, "Bad Request: '*' needs to be alone and Expires: 0")
            return self._remove_all(request, aor, call_id, cseq, now, state)
        if not raw_contacts:
            return self._ok(request, aor, now, state, (), ())
        # Step 7: intervals first (423 before anything changes), then the bindings.
        contacts = [self._read_contact(c, request) for c in request.contacts]
        return self._update(request, flow, realm_name, listen, aor, contacts, now, state)

    def _read_contact(self, contact: Address, request: Request) -> _ContactRequest:
        policy = self.policy
        if not isinstance(contact.uri, SipUri):
            raise _Reject(400, "Bad Request: Contact is not a SIP or SIPS URI")
        param = contact.param("expires")
        expires = (
            _delta_seconds(param)
            if param is not None
            else (_header_expires(request) if "Expires" in request.headers else None)
        )
        if expires is None:
            expires = policy.default_expires
        if 0 < expires < policy.min_expires and expires < INTERVAL_TOO_BRIEF_CEILING:
            raise _Reject(423, None, (("Min-Expires", str(policy.min_expires)),))
        expires = min(expires, policy.max_expires)
        q_text = contact.param("q")
        q: float | None = None
        if q_text is not None:
            if not _QVALUE.fullmatch(q_text):
                raise _Reject(400, "Bad Request: bad q in Contact")
            q = float(q_text)
        instance_text = contact.param("+sip.instance")
        instance = unquote_string(instance_text) if instance_text else None
        reg_id: int | None = None
        reg_text = contact.param("reg-id")
        # RFC 5626 6: reg-id without +sip.instance is ignored.
        if reg_text is not None and instance is not None:
            value = parse_delta(reg_text, MAX_REG_ID + 1)
            if value is None or not 1 <= value <= MAX_REG_ID:
                raise _Reject(400, "Bad Request: bad reg-id in Contact")
            reg_id = value
        return _ContactRequest(contact.uri, expires, q, instance, reg_id)

    def _update(
        self,
        request: Request,
        flow: Flow,
        realm_name: str,
        listen: ListenAddress,
        aor: str,
        contacts: list[_ContactRequest],
        now: float,
        state: _Progress,
    ) -> RegisterResult:
        call_id = _stored_call_id(request)
        cseq = request.cseq.seq
        current = self.location.bindings(aor, now)
        tentative = list(current)
        path = tuple(request.headers.values("Path"))
        agent = request.headers.get("User-Agent")
        received = Destination(flow.transport, flow.remote_host, flow.remote_port)
        for item in contacts:
            match = next(
                (b for b in current if b.matches(item.uri, item.instance, item.reg_id)), None
            )
            # RFC 3261 10.3 step 7: same Call-ID needs a higher CSeq, else the request fails.
            if match is not None and match.call_id == call_id and cseq <= match.cseq:
                logger.info(
                    "x REGISTER %s from %s: CSeq %d not above %d, out of order",
                    aor,
                    flow,
                    cseq,
                    match.cseq,
                )
                raise _Reject(400, ORDER_REASON)
            text = str(item.uri)
            tentative = [
                b
                for b in tentative
                if b.contact != text and not b.matches(item.uri, item.instance, item.reg_id)
            ]
            if item.expires == 0:
                continue
            tentative.append(
                Binding(
                    aor=aor,
                    contact=text,
                    expires_at=now + item.expires,
                    call_id=call_id,
                    cseq=cseq,
                    received=received,
                    local=listen,
                    realm=realm_name,
                    registered_at=match.registered_at if match is not None else now,
                    q=item.q,
                    instance=item.instance,
                    reg_id=item.reg_id,
                    path=path,
                    user_agent=None if agent is None else agent[:MAX_STORED_TEXT],
                    connection_id=flow.connection_id,
                )
            )
        try:
            change = self.location.replace(aor, tentative, now)
        except LocationError as exc:
            logger.warning("x REGISTER %s from %s refused: %s", aor, flow, exc)
            reason = (
                "Too Many Registered Users"
                if isinstance(exc, TooManyAorsError)
                else "Too Many Registered Contacts"
            )
            raise _Reject(exc.status, reason) from None
        self._track_keepalives(change.added, change.removed, now)
        if change.added or change.removed:
            new = [b for b in change.added if b.contact not in {c.contact for c in current}]
            logger.info(
                "- registered %s from %s: %d new, %d refreshed, %d removed",
                aor,
                flow,
                len(new),
                len(change.added) - len(new),
                len(change.removed),
            )
        outbound = any(c.reg_id is not None for c in contacts)
        return self._ok(request, aor, now, state, change.added, change.removed, outbound=outbound)

    def _remove_all(
        self, request: Request, aor: str, call_id: str, cseq: int, now: float, state: _Progress
    ) -> RegisterResult:
        current = self.location.bindings(aor, now)
        for binding in current:
            if binding.call_id == call_id and cseq <= binding.cseq:
                raise _Reject(400, ORDER_REASON)
        change = self.location.replace(aor, (), now)
        self._track_keepalives((), change.removed, now)
        if change.removed:
            logger.info("- unregistered %s: %d binding(s) removed", aor, len(change.removed))
        return self._ok(request, aor, now, state, (), change.removed)

    def expire(self, now: float) -> list[Binding]:
        """Remove the bindings whose time is up (the app runs this every second, so
        a user gone quiet stops counting against ``max_users`` at once, not at the
        next REGISTER of anyone); returns them, what a standby drops."""
        removed = self.location.expire(now)
        if removed:
            self._track_keepalives((), removed, now)
            logger.debug("- %d binding(s) expired", len(removed))
        return removed

    # ------------------------------------------------------------------ flows

    def answers_challenge(self, request: Request, now: float) -> bool:
        """Whether ``request`` answers a challenge of ours: an Authorization for our
        realm whose nonce this registrar issued and is still fresh (the second
        REGISTER of a digest exchange). Nothing is verified beyond the nonce."""
        realm = self.digest.config.realm
        for value in request.headers.fields("Authorization"):
            try:
                parsed = parse_credentials(value)
            except ParseError:
                continue
            if isinstance(parsed, DigestCredentials) and parsed.realm == realm:
                return self.digest.nonce_fresh(parsed.nonce, now)
        return False

    def connection_closed(self, connection_id: int, now: float) -> list[Binding]:
        """Remove every binding registered over TCP/TLS connection ``connection_id``,
        which has closed (module docstring, Closed flows); returns them, what a
        standby drops (``LocationService.apply((), removed)``) as after an expiry."""
        removed = self.location.remove_connection(connection_id)
        if removed:
            self._track_keepalives((), removed, now)
            # One line per connection: an edge proxy's may carry thousands of users.
            logger.info(
                "- connection #%d closed: %d binding(s) removed", connection_id, len(removed)
            )
            for binding in removed:
                logger.debug("- binding of %s gone with its connection", binding.aor)
        return removed

    def _ok(
        self,
        request: Request,
        aor: str,
        now: float,
        state: _Progress,
        added: tuple[Binding, ...],
        removed: tuple[Binding, ...],
        *,
        outbound: bool = False,
    ) -> RegisterResult:
        headers: list[tuple[str, str]] = [
            ("Contact", _render_binding(b, now)) for b in self.location.bindings(aor, now)
        ]
        headers.append(("Date", formatdate(now, usegmt=True)))
        # RFC 3327 5.3: the registrar returns the Path it stored to a UA that supports it.
        if "path" in {t.lower() for t in request.tokens("Supported")}:
            headers.extend(("Path", value) for value in request.headers.fields("Path"))
        # RFC 5626 6: a registration that used outbound is confirmed by Require: outbound.
        if outbound:
            headers.append(("Require", "outbound"))
        response = self._reply(request, 200, None, headers)
        return RegisterResult(response, aor, state.username, None, added, removed)

    def _domain_served(self, host: str, *, allow_ip: bool) -> bool:
        domains = self.location.domains
        if not domains:
            return True
        if allow_ip and ip_literal(host) is not None:
            return True
        return normalize_domain(host) in domains

    # ------------------------------------------------------------------ authentication

    def check_credentials(
        self, request: Request, now: float, *, proxy: bool = False, source: str | None = None
    ) -> AuthCheck:
        """Check the request's digest credentials for our realm (RFC 3261 22.1 - 22.3).

        ``proxy`` reads Proxy-Authorization and challenges with 407 /
        Proxy-Authenticate (a request to be relayed, e.g. INVITE or MESSAGE);
        otherwise Authorization and 401 / WWW-Authenticate (REGISTER). ``source``
        is the address the request came from, for the guessing limit; by default
        the one the transport layer stamped into the top Via (RFC 3261 18.2.1).
        Credentials from a locked-out source or for a locked-out user name get 503
        with Retry-After and are not checked.
        """
        realm = self.policy.realm
        header = "Proxy-Authorization" if proxy else "Authorization"
        credentials: DigestCredentials | None = None
        malformed: AuthHeaderError | None = None
        for value in request.headers.fields(header):
            try:
                parsed = parse_credentials(value)
            except AuthHeaderError as exc:
                # Perhaps another realm's, in a scheme or algorithm we do not speak
                # (IMS AKA, say): ours may still follow.
                malformed = malformed or exc
                continue
            # RFC 3261 22.3: credentials for other realms are someone else's business.
            if isinstance(parsed, DigestCredentials) and parsed.realm == realm:
                credentials = parsed
                break
        if credentials is None and malformed is not None:
            logger.info("x %s with malformed %s: %s", request.method, header, malformed)
            return AuthCheck(None, self._reply(request, 400, "Bad Request: bad credentials"))
        if credentials is None:
            return AuthCheck(None, self._challenge(request, now, proxy=proxy, stale=False))
        user = credentials.username
        if source is None:
            source = _stamped_source(request)
        # Before the store and the hashing: a locked-out guess costs nothing.
        left = self.guesses.lockout(user, source, now)
        if left is not None:
            logger.debug(
                "x %s for %r from %s: locked out, %.0f s left", request.method, user, source, left
            )
            result = AuthResult(AuthOutcome.LOCKED_OUT, user, None, f"{left:.0f} s left")
            retry = (("Retry-After", str(math.ceil(left))),)
            reason = "Service Unavailable: too many failed authentications"
            return AuthCheck(result, self._reply(request, LOCKED_OUT_STATUS, reason, retry))
        try:
            secret = self.credentials.lookup(credentials.username, realm)
        except CredentialStoreError as exc:
            logger.error("x credential store: %s", exc)
            return AuthCheck(None, self._reply(request, 500))
        result = self.digest.verify(
            credentials,
            method=request.method,
            request_uri=request.raw_uri,
            secret=secret,
            now=now,
            body=request.body,
        )
        if result.ok:
            self.guesses.succeeded(user, source, now)
            return AuthCheck(result, None)
        if result.outcome in (AuthOutcome.MALFORMED, AuthOutcome.URI_MISMATCH):
            # RFC 2617 3.2.2.5: a digest-uri that is not the Request-URI is a 400.
            return AuthCheck(result, self._reply(request, 400, "Bad Request: bad credentials"))
        # Only a judged guess counts: not a stale nonce, a replay (a right digest),
        # nor anything refused before the digest was compared.
        failure = (
            AuthFailure(result.username, result.outcome)
            if result.outcome in (AuthOutcome.BAD_RESPONSE, AuthOutcome.UNKNOWN_USER)
            else None
        )
        if failure is not None:
            locked = self.guesses.failed(user, source, now)
            if locked:
                logger.warning(
                    "x too many failed authentications: %s locked out for %g s",
                    " and ".join(locked),
                    self.guesses.lockout_duration,
                )
        # Wrong and unknown users get the same fresh challenge: no user enumeration.
        return AuthCheck(
            result, self._challenge(request, now, proxy=proxy, stale=result.stale), failure
        )

    def authenticate(self, request: Request, now: float, *, proxy: bool) -> AuthResult | Response:
        """The AuthResult of an authenticated request, or the response to send (401 /
        407 challenge, 400). Use :meth:`check_credentials` to also learn whether the
        credentials were wrong (for the firewall). The caller decides whether the
        authenticated user may send this request (e.g. is the From user)."""
        check = self.check_credentials(request, now, proxy=proxy)
        if check.response is not None:
            return check.response
        assert check.result is not None
        return check.result

    def _challenge(self, request: Request, now: float, *, proxy: bool, stale: bool) -> Response:
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        values = self.digest.challenge_values(now, stale=stale)
        return self._reply(request, 407 if proxy else 401, None, [(name, v) for v in values])

    def _reply(
        self,
        request: Request,
        status: int,
        reason: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Response:
        return make_response(request, status, reason, to_tag=new_tag(), headers=headers)

    # ------------------------------------------------------------------ NAT keepalive

    def keepalive_targets(self, now: float) -> list[Binding]:
        """UDP bindings whose last keepalive (or REGISTER) is ``keepalive_interval`` old,
        one per (received, local) pair; each returned binding is rescheduled. The app
        sends each a CRLFCRLF or an OPTIONS (module docstring)."""
        if not self.policy.nat_keepalive:
            return []
        interval = self.policy.keepalive_interval
        heap = self._keepalive_heap
        targets: list[Binding] = []
        seen: set[tuple[Destination, ListenAddress]] = set()
        # Bounded: every entry popped is dropped or pushed back due after ``now``.
        while heap and heap[0][0] <= now:
            due, aor, contact = heapq.heappop(heap)
            key = (aor, contact)
            if self._keepalive_due.get(key) != due:
                continue
            binding = self.location.get(aor, contact)
            if binding is None or not binding.alive(now) or not _wants_keepalive(binding):
                del self._keepalive_due[key]
                continue
            pair = (binding.received, binding.local)
            if self._unanswered.get(pair, 0) >= self.policy.keepalive_failures:
                self._gone(binding, now)
                continue
            self._schedule_keepalive(key, now + interval)
            if pair not in seen:
                seen.add(pair)
                targets.append(binding)
        return targets

    def keepalive_ping(self, binding: Binding) -> str:
        """The Call-ID of the OPTIONS keepalive about to go to ``binding``'s flow
        (``keepalive_options``); it counts as unanswered until
        :meth:`keepalive_answered` hears of a response to it."""
        pair = (binding.received, binding.local)
        self._unanswered[pair] = self._unanswered.get(pair, 0) + 1
        old = self._ping_of.pop(pair, None)
        if old is not None:
            self._pings.pop(old, None)
        call_id = f"{KEEPALIVE_CALL_ID_PREFIX}{secrets.token_hex(8)}"
        self._pings[call_id] = pair
        self._ping_of[pair] = call_id
        return call_id

    def keepalive_answered(self, call_id: str) -> bool:
        """A response (any status: something answered) to the keepalive ``call_id``;
        False when it is none of the last pings (a late or forged one)."""
        pair = self._pings.pop(call_id, None)
        if pair is None:
            return False
        del self._ping_of[pair]
        self._unanswered.pop(pair, None)
        return True

    def _gone(self, binding: Binding, now: float) -> None:
        """Remove ``binding``: its flow left ``keepalive_failures`` pings unanswered."""
        unanswered = self._unanswered.get((binding.received, binding.local), 0)
        self.location.apply((), (binding,))
        self._keepalive_due.pop((binding.aor, binding.contact), None)
        logger.info(
            "- binding of %s removed: %d keepalives to %s unanswered",
            binding.aor,
            unanswered,
            binding.received,
        )
        if len(self._unanswered) > 2 * len(self._keepalive_due) + 1024:
            # Flows whose bindings all went this way: nothing else forgets them.
            live = {
                (found.received, found.local)
                for key in self._keepalive_due
                if (found := self.location.get(*key)) is not None
            }
            for pair in [pair for pair in self._unanswered if pair not in live]:
                self._forget_pings(pair)

    def next_keepalive(self) -> float | None:
        """When :meth:`keepalive_targets` may next return something (a deadline)."""
        heap = self._keepalive_heap
        while heap and self._keepalive_due.get((heap[0][1], heap[0][2])) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def restore_keepalives(self, now: float) -> None:
        """Schedule keepalives for every UDP binding in the location service (after
        restoring it from the HA peer or a state file); the first is due at once."""
        for binding in self.location:
            if _wants_keepalive(binding):
                self._schedule_keepalive((binding.aor, binding.contact), now)

    def _track_keepalives(
        self, added: Iterable[Binding], removed: Iterable[Binding], now: float
    ) -> None:
        for binding in removed:
            self._keepalive_due.pop((binding.aor, binding.contact), None)
            self._forget_pings((binding.received, binding.local))
        if not self.policy.nat_keepalive:
            return
        for binding in added:
            # A REGISTER came over the flow: it is there, whatever the pings say.
            self._forget_pings((binding.received, binding.local))
            if _wants_keepalive(binding):
                key = (binding.aor, binding.contact)
                self._schedule_keepalive(key, now + self.policy.keepalive_interval)

    def _forget_pings(self, pair: tuple[Destination, ListenAddress]) -> None:
        """The flow answered (a REGISTER came over it) or lost a binding: its count of
        unanswered pings starts again (and a removed flow leaves nothing behind)."""
        if self._unanswered.pop(pair, None) is not None:
            ping = self._ping_of.pop(pair, None)
            if ping is not None:
                self._pings.pop(ping, None)

    def _schedule_keepalive(self, key: tuple[str, str], due: float) -> None:
        self._keepalive_due[key] = due
        heapq.heappush(self._keepalive_heap, (due, *key))
        if len(self._keepalive_heap) > 2 * len(self._keepalive_due) + 64:
            self._keepalive_heap = [(d, a, c) for (a, c), d in self._keepalive_due.items()]
            heapq.heapify(self._keepalive_heap)


@dataclass
class _Progress:
    """What a REGISTER has established so far, for the result of an early answer."""

    aor: str | None = None
    username: str | None = None
    failure: AuthFailure | None = None


def _stamped_source(request: Request) -> str | None:
    """Where a request came from, as the transport layer stamped it into the top Via
    (RFC 3261 18.2.1 ``received``, set whenever the sent-by host is not the source
    address; a ``received`` the sender wrote is replaced)."""
    try:
        via = request.via
    except ParseError:
        return None
    return via.received or via.host


def _wants_keepalive(binding: Binding) -> bool:
    return binding.received.transport is Transport.UDP


def _stored_call_id(request: Request) -> str:
    """The Call-ID as bindings keep it (cut to MAX_STORED_TEXT), for the step 7 check."""
    return request.call_id[:MAX_STORED_TEXT]


def _delta_seconds(text: str) -> int:
    """A delta-seconds value; malformed -> 3600, too big -> 2**32-1 (RFC 3261 20.10)."""
    value = parse_delta(text.strip(), MAX_DELTA_SECONDS)
    return MALFORMED_EXPIRES if value is None else value


def _header_expires(request: Request) -> int | None:
    value = request.headers.get("Expires")
    return None if value is None else _delta_seconds(value)


def _render_binding(binding: Binding, now: float) -> str:
    """A Contact value of the 200: the URI and its remaining ``expires`` (10.3 step 8)."""
    params = []
    if binding.q is not None:
        params.append(f";q={binding.q:g}")
    if binding.instance is not None:
        params.append(f";+sip.instance={quote_string(binding.instance)}")
    if binding.reg_id is not None:
        params.append(f";reg-id={binding.reg_id}")
    params.append(f";expires={binding.expires_in(now)}")
    return f"<{binding.contact}>{''.join(params)}"


def registered_for(response: Response) -> int | None:
    """How long a 2xx to a REGISTER keeps bindings: the longest ``expires`` of its
    Contacts (RFC 3261 10.3 step 8), else its Expires; None for anything else or
    without bindings. What the flow the phone registered over must stay open for
    (``TransportLayer.hold_open``), whoever answered (the registrar, a relay)."""
    if not 200 <= response.status < 300:
        return None
    try:
        if response.cseq.method != "REGISTER":
            return None
        default = parse_delta(response.headers.get("Expires") or "")
        longest: int | None = None
        for value in response.headers.fields("Contact"):
            for item in split_list(value):
                if item.strip() == "*":
                    continue
                contact = Address.parse(item, "Contact")
                given = get_param(contact.params, "expires")
                seconds = default if given is None else parse_delta(given)
                if seconds is not None:
                    longest = seconds if longest is None else max(longest, seconds)
    except ParseError:
        return None
    return longest or None
