"""SDES a=crypto attributes (RFC 4568) and SRTP transforms."""

from __future__ import annotations

import pytest

from sbc.media.rtp import RtpHeader
from sbc.media.srtp import (
    SdesCrypto,
    SrtpAuthError,
    SrtpError,
    SrtpProtectError,
    SrtpSuite,
    SrtpTransform,
)

# RFC 4568 9.1 example key.
RFC_4568 = "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32"


def test_parse_the_rfc_example_and_keep_the_key_out_of_repr() -> None:
    with pytest.raises(SrtpError, match="a=crypto: MKI is not supported"):
        SdesCrypto.parse(RFC_4568)
    crypto = SdesCrypto.parse(RFC_4568.split("|")[0] + "|2^20")
    assert (crypto.tag, crypto.suite, len(crypto.key)) == (1, SrtpSuite.AES_CM_128_HMAC_SHA1_80, 30)
    assert "PS1uQ" not in repr(crypto) and "key" not in repr(crypto)
    assert str(crypto) == RFC_4568.split("|")[0]
    assert SdesCrypto.parse(str(crypto)) == crypto
    assert SdesCrypto.from_dict(crypto.to_dict()) == crypto


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "1 F8_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR",
            "unsupported suite F8_128",
        ),
        (
            "1 AEAD_AES_128_GCM inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR",
            "needs a 28-byte key",
        ),
        ("1 AES_CM_128_HMAC_SHA1_32 inline:c2hvcnQ=", "needs a 30-byte key and salt, got 5"),
        ("AES_CM_128_HMAC_SHA1_80", "expected '<tag> <suite> inline:<key>'"),
    ],
)
def test_bad_crypto_attributes(value: str, message: str) -> None:
    with pytest.raises(SrtpError, match=message):
        SdesCrypto.parse(value)


@pytest.mark.parametrize("suite", list(SrtpSuite))
def test_protect_unprotect_and_tamper(suite: SrtpSuite) -> None:
    crypto = SdesCrypto.generate(suite)
    tx, rx = SrtpTransform(crypto, outbound=True), SrtpTransform(crypto, outbound=False)
    packet = bytes(RtpHeader(0, 1, 160, 0xA)) + b"\xd5" * 160
    protected = tx.protect(packet, rtcp=False)
    assert protected != packet
    assert rx.unprotect(protected, rtcp=False) == packet
    tampered = tx.protect(bytes(RtpHeader(0, 2, 320, 0xA)) + b"\xd5" * 160, rtcp=False)
    with pytest.raises(SrtpAuthError):
        rx.unprotect(tampered[:-1] + bytes([tampered[-1] ^ 1]), rtcp=False)
    other = SrtpTransform(SdesCrypto.generate(suite), outbound=False)
    with pytest.raises(SrtpAuthError):
        other.unprotect(
            tx.protect(bytes(RtpHeader(0, 3, 480, 0xA)) + b"x" * 10, rtcp=False), rtcp=False
        )


def test_a_packet_srtp_cannot_protect_raises_a_relay_error() -> None:
    tx = SrtpTransform(SdesCrypto.generate(SrtpSuite.AES_CM_128_HMAC_SHA1_80), outbound=True)
    # 15 CSRCs announced in a 12-byte packet: libsrtp refuses it.
    with pytest.raises(SrtpProtectError):
        tx.protect(b"\x8f\x00" + b"\x00" * 10, rtcp=False)
