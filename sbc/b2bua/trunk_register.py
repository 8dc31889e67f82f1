"""Registration of the SBC at its trunks' carriers (``trunks[].register``).

Many SIP trunk providers send a customer's calls only to where the customer's
account is registered: the SBC registers each such trunk's account itself (RFC
3261 10), the Contact its own address in the trunk's realm, and keeps the binding
alive. Calls then come from the carrier to that Contact and are routed like any
other.

Pure: the controller asks ``due(now)`` for the trunks to register, builds each
REGISTER with ``request()``, sends it (answering a digest challenge with the
trunk's credentials, `sbc.b2bua.trunk_auth`) and hands the final response to
``result()``, which decides when the next one goes:

* registered: again before the binding the registrar granted runs out (half-way
  for short ones, a minute early for long ones), one Call-ID and a rising CSeq
  for the whole registration (RFC 3261 10.2.4);
* ``423 Interval Too Brief``: again at once asking for its Min-Expires (10.3);
* any other failure (a timeout, a refusal, credentials refused): again after a
  wait that doubles from ``RETRY_BASE`` to ``RETRY_MAX`` with the failures, drawn
  between half and all of it (RFC 5626 4.5, so a carrier coming back is not hit by
  every customer at once), or the failure's Retry-After when it gives one.

``shutdown()`` lists the registered trunks so the controller can remove their
bindings (Expires 0) as the SBC stops.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from sbc.b2bua.topology import via_for
from sbc.sip.errors import ParseError
from sbc.sip.headers import Address, parse_delta, split_list
from sbc.sip.message import Headers, Request, Response, new_branch, new_tag, random_hex
from sbc.sip.uri import SipUri, escape_user, format_host, parse_uri
from sbc.transport.base import ListenAddress, Transport

logger = logging.getLogger(__name__)

#: The first wait after a failure, and the longest (RFC 5626 4.5's base and max).
RETRY_BASE: Final = 30.0
RETRY_MAX: Final = 1800.0
#: Refreshes go this early before a long binding runs out (half-way for short ones).
REFRESH_MARGIN: Final = 60.0
#: Seconds between tries while the trunk has no gateway to send to (its name not
#: resolved yet, every gateway down): no failure of the carrier's, so no back-off.
NO_GATEWAY_RETRY: Final = 5.0
#: The longest binding the SBC believes a registrar granted (a day).
MAX_GRANTED: Final = 86400


class RegistrationState(enum.StrEnum):
    UNREGISTERED = "unregistered"
    REGISTERING = "registering"
    REGISTERED = "registered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TrunkRegistration:
    """What to register for one trunk: the account, its domain and the binding."""

    trunk: str
    username: str
    #: The registrar's domain: the Request-URI's host, From's and To's.
    domain: str
    expires: int = 600


@dataclass(slots=True)
class _State:
    config: TrunkRegistration
    call_id: str = field(default_factory=lambda: random_hex(16))
    tag: str = field(default_factory=new_tag)
    cseq: int = 0
    state: RegistrationState = RegistrationState.UNREGISTERED
    #: When the next REGISTER goes (None: one is out).
    due: float | None = 0.0
    expires_at: float | None = None
    failures: int = 0
    last_status: int | None = None
    #: What to ask for next (423 raises it).
    asking: int = 0
    contact: str | None = None
    #: The REGISTER out removes the binding (Expires 0: the SBC stops).
    removing: bool = False


class TrunkRegistrations:
    """Each registering trunk's binding at its carrier, driven by the caller's ``now``."""

    def __init__(
        self, registrations: Iterable[TrunkRegistration] = (), *, rng: random.Random | None = None
    ) -> None:
        self._states: dict[str, _State] = {}
        self._rng = rng or random.Random()
        self.reconfigure(registrations)

    def reconfigure(self, registrations: Iterable[TrunkRegistration]) -> None:
        """New accounts: an unchanged one keeps its binding and schedule; a new or
        changed one registers at once; a removed one is forgotten (its binding runs
        out at the carrier)."""
        states = {}
        for config in registrations:
            state = self._states.get(config.trunk)
            if state is None or state.config != config:
                state = _State(config, asking=config.expires)
            states[config.trunk] = state
        self._states = states

    def __contains__(self, trunk: object) -> bool:
        return trunk in self._states

    def __len__(self) -> int:
        return len(self._states)

    def next_due(self) -> float | None:
        if not self._states:
            return None  # asked after every message: most SBCs register nothing
        dues = [s.due for s in self._states.values() if s.due is not None]
        return min(dues) if dues else None

    def due(self, now: float) -> list[str]:
        """The trunks whose REGISTER should go now."""
        if not self._states:
            return []
        return [name for name, s in self._states.items() if s.due is not None and s.due <= now]

    def request(
        self, trunk: str, local: ListenAddress, *, user_agent: str, expires: int | None = None
    ) -> Request:
        """The next REGISTER of ``trunk`` from the SBC's listener ``local`` (its
        Contact there); ``expires`` 0 removes the binding."""
        state = self._states[trunk]
        config = state.config
        state.cseq += 1
        state.due = None
        state.removing = expires == 0
        if not state.removing:
            state.state = RegistrationState.REGISTERING
        transport = (
            "" if local.transport is Transport.UDP else f";transport={local.transport.value}"
        )
        scheme = "sips" if local.transport is Transport.TLS else "sip"
        user = escape_user(config.username)
        contact = f"{scheme}:{user}@{format_host(local.host)}:{local.port}{transport}"
        state.contact = contact
        aor = f"{scheme}:{user}@{config.domain}"
        headers = Headers()
        headers.add("Via", via_for(local, new_branch()))
        headers.add("Max-Forwards", "70")
        headers.add("From", f"<{aor}>;tag={state.tag}")
        headers.add("To", f"<{aor}>")
        headers.add("Call-ID", state.call_id)
        headers.add("CSeq", f"{state.cseq} REGISTER")
        headers.add("Contact", f"<{contact}>")
        headers.add("Expires", str(state.asking if expires is None else expires))
        headers.add("User-Agent", user_agent)
        headers.add("Content-Length", "0")
        return Request("REGISTER", f"{scheme}:{config.domain}", headers)

    def sent_again(self, trunk: str, request: Request) -> None:
        """``request`` went again (a challenge answered): its CSeq is the latest."""
        state = self._states.get(trunk)
        if state is not None and request.call_id == state.call_id:
            state.cseq = max(state.cseq, request.cseq.seq)

    def no_gateway(self, trunk: str, now: float) -> None:
        """No gateway of the trunk could be asked (its name not resolved yet, all
        down): tried again soon, as no failure of the carrier's."""
        state = self._states.get(trunk)
        if state is not None and state.due is not None:
            state.due = now + NO_GATEWAY_RETRY

    def result(self, trunk: str, response: Response | None, now: float) -> None:
        """The final answer to the trunk's REGISTER (None: none came, or it could not
        be sent); schedules the next one."""
        state = self._states.get(trunk)
        if state is None or (response is not None and response.call_id != state.call_id):
            return  # a registration the configuration replaced meanwhile
        status = None if response is None else response.status
        state.last_status = status
        if state.removing:
            state.state, state.expires_at = RegistrationState.UNREGISTERED, None
            return
        granted = 0
        if response is not None and 200 <= response.status < 300:
            granted = _granted(response, state.contact, state.asking)
        if granted > 0:
            state.state = RegistrationState.REGISTERED
            state.failures = 0
            state.expires_at = now + granted
            # (At least a second apart, whatever a registrar grants.)
            state.due = now + max(1.0, granted - min(REFRESH_MARGIN, granted / 2))
            logger.info("- trunk %s registered for %d s", trunk, granted)
            return
        if response is not None and response.status == 423:
            wanted = _delta(response.headers.get("Min-Expires"))
            if wanted is not None and state.asking < wanted <= MAX_GRANTED:
                state.asking = wanted
                state.due = now
                return
        state.failures += 1
        state.state = RegistrationState.FAILED
        if state.expires_at is not None and state.expires_at <= now:
            state.expires_at = None
        wait = min(RETRY_MAX, RETRY_BASE * 2 ** min(state.failures - 1, 16))
        wait *= 0.5 + 0.5 * self._rng.random()
        retry = None if response is None else _delta(response.headers.get("Retry-After"))
        if retry is not None and response is not None and response.status in (500, 503):
            wait = min(float(retry), RETRY_MAX)
        state.due = now + wait
        logger.warning("x trunk %s: REGISTER %s, again in %.0f s", trunk,
                       status if status is not None else "unanswered", wait)  # fmt: skip

    def shutdown(self) -> list[str]:
        """The trunks registered now: their bindings are to be removed (Expires 0)."""
        return [n for n, s in self._states.items() if s.state is RegistrationState.REGISTERED]

    def status(self, now: float) -> dict[str, dict[str, object]]:
        """Each trunk's registration, for the health report."""
        return {
            name: {
                "state": s.state.value,
                "expires_in": None if s.expires_at is None else round(s.expires_at - now),
                "last_status": s.last_status,
                "failures": s.failures,
            }
            for name, s in self._states.items()
        }


def _delta(value: str | None) -> int | None:
    """A delta-seconds header value (Expires, Min-Expires, Retry-After's number:
    parameters or a comment may follow), `parse_delta`'s reading of it."""
    if value is None:
        return None
    return parse_delta(value.split(";", 1)[0].split("(", 1)[0].strip())


def _granted(response: Response, contact: str | None, asked: int) -> int:
    """Seconds the registrar bound our Contact for (RFC 3261 10.2.4): its expires
    parameter in the 2xx, else the Expires header, else what was asked."""
    for value in response.headers.fields("Contact"):
        for address in _addresses(value):
            uri = address.uri
            if not isinstance(uri, SipUri) or contact is None:
                continue
            if _same_contact(uri, contact):
                expires = _delta(address.param("expires"))
                if expires is not None:
                    return min(expires, MAX_GRANTED)
    header = _delta(response.headers.get("Expires"))
    return min(header if header is not None else asked, MAX_GRANTED)


def _addresses(value: str) -> list[Address]:
    out = []
    for part in split_list(value):
        try:
            out.append(Address.parse(part, "Contact"))
        except ParseError:
            continue
    return out


def _same_contact(uri: SipUri, contact: str) -> bool:
    """Whether the registrar's ``uri`` is our ``contact`` (user, host and port)."""
    try:
        ours = parse_uri(contact)
    except ParseError:
        return False
    return (
        isinstance(ours, SipUri)
        and uri.user == ours.user
        and uri.host.lower() == ours.host.lower()
        and (uri.port or 5060) == (ours.port or 5060)
    )
