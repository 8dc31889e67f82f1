"""Requests the SBC answers itself, before any routing exists for them.

This is the transaction user of the foundation: OPTIONS is answered locally with
the SBC's capabilities (RFC 3261 11.2), in-dialog requests for dialogs it does
not know get 481, and everything else that passes RFC 3261 8.2 inspection gets
the answer an SBC with an empty routing table gives (404, or 405 for REGISTER
while no registrar is configured). The B2BUA replaces these answers with calls
and registrations; the inspection and the OPTIONS answer stay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sbc.sip.message import Request, Response, make_response, new_tag
from sbc.sip.uas import UasPolicy, check_request

logger = logging.getLogger(__name__)

#: What the SBC can carry inside a request body (RFC 3261 20.1 Accept).
ACCEPT = "application/sdp, multipart/mixed"


@dataclass
class LocalResponder:
    """Answers requests with the SBC's own responses; pure, no I/O."""

    server: str = "sbc"
    policy: UasPolicy = field(default_factory=UasPolicy)

    def respond(self, request: Request) -> Response | None:
        """The response to ``request``, or None when none is due (ACK)."""
        if request.method == "ACK":
            # RFC 3261 17.2.1: ACK is never answered.
            return None
        tag = new_tag()
        server = ("Server", self.server)
        rejection = check_request(request, self.policy)
        if rejection is not None:
            headers = (*rejection.headers, server)
            return make_response(
                request, rejection.status, rejection.reason, to_tag=tag, headers=headers
            )
        if request.method == "OPTIONS":
            capabilities = (
                ("Allow", self.policy.allow_header),
                ("Accept", ACCEPT),
                ("Supported", ", ".join(self.policy.supported)),
                server,
            )
            return make_response(request, 200, to_tag=tag, headers=capabilities)
        if request.method in ("CANCEL", "BYE") or request.to.tag:
            # RFC 3261 9.2 / 12.2.2: no transaction or dialog of ours matches.
            return make_response(request, 481, to_tag=tag, headers=(server,))
        if request.method == "REGISTER":
            allow = ", ".join(m for m in sorted(self.policy.allowed_methods) if m != "REGISTER")
            return make_response(request, 405, to_tag=tag, headers=(("Allow", allow), server))
        # No routing rule matches anything yet: what an SBC with an empty table says.
        return make_response(request, 404, to_tag=tag, headers=(server,))
