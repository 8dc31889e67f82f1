"""Digest authentication towards trunks: the SBC answers a carrier's challenges.

A SIP trunk provider commonly challenges what the SBC sends it (401 with
WWW-Authenticate from a registrar-like server, 407 with Proxy-Authenticate from a
proxy: RFC 3261 22.2, 22.3) and takes only requests with the account's credentials.
The caller cannot answer for the SBC: the challenge names the carrier's realm, the
caller has no account there, and the B2BUA never lets it across (it would name the
carrier's hosts). So the SBC answers it itself, with the credentials configured for
the trunk (``trunks[].auth``), and sends the request again (the INVITE of a call,
an in-dialog request on the trunk's leg with that dialog's next CSeq, a BYE after
the call ended on the SBC's side, a REGISTER of `sbc.b2bua.trunk_register`). A
call the carrier makes is tied to no trunk: on its leg, the account of the one
trunk with an account in the realm the call came from answers (none when two
could):

* same Call-ID, tags and Request-URI, a new branch and the CSeq one higher (RFC 3261
  8.1.3.5, 22.2), the credentials in Authorization (401) or Proxy-Authorization
  (407);
* at most ``MAX_TRIES`` times a request: a second challenge to credentials already
  sent means they were refused (RFC 7616 3.3), unless it says ``stale=true`` (the
  nonce aged, a fresh one comes with it);
* only challenges of the trunk's configured ``realm``, when one is set: any other
  realm is some other server's (or a forger's) asking for a response it could attack
  offline.

The password is in no repr and no log line. What cannot be answered (no usable
Digest challenge, credentials refused) is left to the caller's side as a failure of
that target; the controller never relays a challenge.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from sbc.sip.auth import (
    CredentialsRejectedError,
    DigestChallenge,
    DigestClient,
    NoUsableChallengeError,
    parse_challenge,
)
from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response, new_branch

logger = logging.getLogger(__name__)

#: Challenged requests sent again at most this many times each (a stale nonce and
#: then the answer; a server that keeps saying stale is not followed for ever).
MAX_TRIES: Final = 2

#: The challenge header of each status and the header that answers it.
_ANSWERS: Final = {
    401: ("WWW-Authenticate", "Authorization"),
    407: ("Proxy-Authenticate", "Proxy-Authorization"),
}
_BRANCH: Final = re.compile(r";\s*branch\s*=\s*[^;,\s]+", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class TrunkCredentials:
    """The account the SBC has at a trunk's carrier."""

    username: str
    password: str = field(repr=False)
    #: Answer only challenges of this realm (None: any the trunk sends).
    realm: str | None = None


class TrunkAuth:
    """The trunks' credentials and a digest client each (its nonce counts)."""

    def __init__(self, credentials: Mapping[str, TrunkCredentials] | None = None) -> None:
        self._credentials: dict[str, TrunkCredentials] = {}
        self._clients: dict[str, DigestClient] = {}
        self.reconfigure(credentials or {})

    def reconfigure(self, credentials: Mapping[str, TrunkCredentials]) -> None:
        """New credentials; a trunk whose account changed starts a new client."""
        self._clients = {
            name: client
            for name, client in self._clients.items()
            if self._credentials.get(name) == credentials.get(name)
        }
        self._credentials = dict(credentials)

    def __contains__(self, trunk: object) -> bool:
        return trunk in self._credentials

    def trunks(self) -> tuple[str, ...]:
        """The trunks the SBC has an account at."""
        return tuple(self._credentials)

    def again(
        self, trunk: str | None, request: Request, response: Response, tries: int
    ) -> Request | None:
        """``request`` again with credentials answering ``response`` (a 401 or 407 to
        it from ``trunk``), or None when the SBC has none to give; ``tries``: how many
        times this request was already sent again for a challenge."""
        names = _ANSWERS.get(response.status)
        credentials = None if trunk is None else self._credentials.get(trunk)
        if names is None or credentials is None or trunk is None:
            return None
        challenge_name, answer_name = names
        if tries >= MAX_TRIES:
            logger.warning("x trunk %s: challenged %d times, given up", trunk, tries + 1)
            return None
        challenges = _challenges(response.headers.fields(challenge_name), credentials.realm)
        client = self._clients.get(trunk)
        if client is None:
            client = self._clients[trunk] = DigestClient(credentials.username, credentials.password)
        try:
            value = client.respond(
                challenges,
                method=request.method,
                uri=request.raw_uri,
                body=request.body,
                already_tried=answer_name in request.headers,
            )
        except (NoUsableChallengeError, CredentialsRejectedError) as exc:
            logger.warning("x trunk %s: %d to %s not answered: %s", trunk,
                           response.status, request.method, exc)  # fmt: skip
            return None
        return _authorized(request, answer_name, value)


def _challenges(values: list[str], realm: str | None) -> list[DigestChallenge]:
    """The Digest challenges among ``values`` (of ``realm`` only, if given)."""
    out = []
    for value in values:
        try:
            challenge = parse_challenge(value)
        except ParseError:
            continue
        if isinstance(challenge, DigestChallenge) and realm in (None, challenge.realm):
            out.append(challenge)
    return out


def _authorized(request: Request, name: str, value: str) -> Request:
    """A copy of ``request`` for a new transaction (a new branch, the next CSeq) with
    ``value`` as its only ``name`` header (RFC 3261 8.1.3.5)."""
    headers = request.headers.copy()
    via = headers.get("Via")
    if via is not None:
        headers.set("Via", _BRANCH.sub(f";branch={new_branch()}", via, count=1))
    cseq = request.cseq
    headers.set("CSeq", f"{cseq.seq + 1} {cseq.method}")
    headers.remove(name)
    headers.add(name, value)
    return Request(request.method, request.raw_uri, headers, request.body)
