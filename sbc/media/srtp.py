"""SRTP termination with SDES keys (RFC 4568 a=crypto, RFC 3711) via pylibsrtp.

The relay terminates SRTP per leg: a leg whose peer offered ``a=crypto`` gets a key
of the relay's own (for the SDP sent back to that peer). Packets from the peer are
authenticated and decrypted with the peer's key; packets to the peer are encrypted
with the relay's key. The other leg may be plain RTP or SRTP with other keys.

Key material is never logged: `SdesCrypto.__repr__` hides it, and errors name the
suite and tag, never the key.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
import re
from dataclasses import dataclass, field
from typing import Any


class SrtpError(ValueError):
    """A malformed or unsupported a=crypto attribute, or SRTP unavailable."""


class SrtpSuite(enum.Enum):
    """Crypto suites the relay offers and accepts (RFC 4568 6.2, RFC 7714 14.2)."""

    AES_CM_128_HMAC_SHA1_80 = "AES_CM_128_HMAC_SHA1_80"
    AES_CM_128_HMAC_SHA1_32 = "AES_CM_128_HMAC_SHA1_32"
    AEAD_AES_128_GCM = "AEAD_AES_128_GCM"

    @property
    def key_length(self) -> int:
        """Master key plus master salt, in bytes."""
        return 28 if self is SrtpSuite.AEAD_AES_128_GCM else 30


#: a=crypto:<tag> <suite> inline:<key||salt>[|lifetime][|MKI:length] [session params]
_CRYPTO = re.compile(
    r"(?P<tag>\d{1,9}) +(?P<suite>[A-Za-z0-9_]+) +inline:(?P<key>[A-Za-z0-9+/=]+)"
    r"(?:\|(?P<lifetime>[0-9^]+))?(?:\|(?P<mki>\d+:\d+))?(?: +(?P<params>.*))?"
)


@dataclass(frozen=True)
class SdesCrypto:
    """One a=crypto attribute: a tag, a suite and the key (never shown in repr)."""

    tag: int
    suite: SrtpSuite
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != self.suite.key_length:
            raise SrtpError(
                f"a=crypto tag {self.tag}: {self.suite.value} needs a "
                f"{self.suite.key_length}-byte key and salt, got {len(self.key)}"
            )

    @classmethod
    def parse(cls, value: str) -> SdesCrypto:
        """From the value of an a=crypto attribute (after ``crypto:``)."""
        match = _CRYPTO.fullmatch(value.strip())
        if match is None:
            raise SrtpError("a=crypto: expected '<tag> <suite> inline:<key>'")
        try:
            suite = SrtpSuite(match["suite"])
        except ValueError:
            raise SrtpError(f"a=crypto: unsupported suite {match['suite']}") from None
        if match["mki"]:
            # An MKI would change the packet format; the relay offers none and needs none.
            raise SrtpError("a=crypto: MKI is not supported")
        if match["params"]:
            raise SrtpError("a=crypto: session parameters are not supported")
        try:
            key = base64.b64decode(match["key"], validate=True)
        except binascii.Error:
            raise SrtpError("a=crypto: key is not valid base64") from None
        return cls(int(match["tag"]), suite, key)

    def __str__(self) -> str:
        """The a=crypto value for an SDP body (contains the key: keep out of logs)."""
        return f"{self.tag} {self.suite.value} inline:{base64.b64encode(self.key).decode()}"

    @classmethod
    def generate(cls, suite: SrtpSuite, tag: int = 1) -> SdesCrypto:
        return cls(tag, suite, os.urandom(suite.key_length))

    def to_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "suite": self.suite.value,
            "key": base64.b64encode(self.key).decode(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SdesCrypto:
        return cls(int(data["tag"]), SrtpSuite(data["suite"]), base64.b64decode(data["key"]))


class SrtpAuthError(Exception):
    """A packet failed SRTP/SRTCP authentication or replay check."""


class SrtpProtectError(Exception):
    """A packet SRTP/SRTCP cannot protect (its header does not parse)."""


class SrtpTransform:
    """Inbound (unprotect) or outbound (protect) SRTP for one leg and one key."""

    def __init__(self, crypto: SdesCrypto, outbound: bool) -> None:
        try:
            import pylibsrtp
        except ImportError as exc:
            raise SrtpError(f"SRTP needs pylibsrtp ({exc})") from exc
        self._error = pylibsrtp.Error
        profiles = {
            SrtpSuite.AES_CM_128_HMAC_SHA1_80: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
            SrtpSuite.AES_CM_128_HMAC_SHA1_32: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
            SrtpSuite.AEAD_AES_128_GCM: pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
        }
        policy = pylibsrtp.Policy(
            key=crypto.key,
            ssrc_type=(
                pylibsrtp.Policy.SSRC_ANY_OUTBOUND
                if outbound
                else pylibsrtp.Policy.SSRC_ANY_INBOUND
            ),
            srtp_profile=profiles[crypto.suite],
        )
        # Late packets after a re-INVITE or a reordering burst: a wide replay window.
        policy.window_size = 1024
        self._session = pylibsrtp.Session(policy)

    def protect(self, packet: bytes, rtcp: bool) -> bytes:
        try:
            if rtcp:
                return bytes(self._session.protect_rtcp(packet))
            return bytes(self._session.protect(packet))
        except self._error as exc:
            raise SrtpProtectError(str(exc)) from None

    def unprotect(self, packet: bytes, rtcp: bool) -> bytes:
        try:
            if rtcp:
                return bytes(self._session.unprotect_rtcp(packet))
            return bytes(self._session.unprotect(packet))
        except self._error as exc:
            raise SrtpAuthError(str(exc)) from None
