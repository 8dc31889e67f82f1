"""SRTP at the border: which legs of a call speak SDES-SRTP, by realm policy.

The media relay terminates SDES-SRTP (RFC 4568 a=crypto, RFC 3711; `sbc.media.srtp`):
a leg that speaks it has a key of the relay's own, sent to that leg's peer only, and
the peer's key is read from its SDP. A key therefore never crosses from one realm to
the other, and each leg's security is what its realm asks for, whatever the other
side can do: an SRTP phone outside calls a plain-RTP PBX inside, and the keys of a
TLS leg never reach the inside in clear SIP over UDP.

Which legs speak SRTP is decided once, at the first offer of the call, and holds for
its whole life: the relay's keys are made when the session is allocated, and the
SDP the B2BUA sends names them. A later offer or answer that would switch a leg
between RTP and SRTP is refused with 488.

Functions over `LegOffer` values (what `topology.leg_offers` read from an SDP) and
the relay's `LegState`, pure but for one thing: `established` draws a new key when a
late offer asks for another suite than the one made ready. A call between two
``passthrough`` realms does not come here: its a=crypto crosses end to end, as the
relay's ``encrypted`` streams.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final

from sbc.evolve import evolve
from sbc.media.session import LegOffer, LegState
from sbc.media.srtp import SdesCrypto, SrtpError, SrtpSuite
from sbc.sip.sdp import Attribute, MediaDescription, SdpError, SessionDescription


class SrtpPolicy(enum.StrEnum):
    """What media a realm's legs carry (config ``realms[].srtp``)."""

    #: SRTP where the realm's peer offers it, else RTP; offers sent into the realm
    #: follow the other side's offer: SRTP with the relay's key if it was SRTP, and
    #: RTP when the callee refuses that with 488.
    OPTIONAL = "optional"
    #: SDES-SRTP only: a plain RTP offer from the realm gets 488, offers sent into it
    #: are SRTP.
    REQUIRED = "required"
    #: RTP only: an SRTP offer from the realm gets 488, offers sent into it are RTP.
    OFF = "off"
    #: Between two such realms SRTP is not terminated: a=crypto crosses end to end
    #: and the relay passes the packets encrypted. With any other realm, as optional.
    PASSTHROUGH = "passthrough"


#: The suite of the offers the B2BUA makes itself: AES counter mode with the 80-bit
#: HMAC-SHA1 tag, the one RFC 3711 makes mandatory, so any SDES answerer has it.
OFFER_SUITE: Final = SrtpSuite.AES_CM_128_HMAC_SHA1_80

#: RTP profiles of each security (RFC 3711 12, RFC 5124): the relay terminates only
#: SDES over these. DTLS-SRTP (UDP/TLS/RTP/SAVP[F]) needs a DTLS handshake it does not do.
_TO_SECURE: Final = {"RTP/AVP": "RTP/SAVP", "RTP/AVPF": "RTP/SAVPF"}
_TO_PLAIN: Final = {"RTP/SAVP": "RTP/AVP", "RTP/SAVPF": "RTP/AVPF"}


def is_sdes_proto(proto: str) -> bool:
    return proto.upper() in _TO_PLAIN


def _sdes_capable(proto: str) -> bool:
    """A profile that may carry SDES keys: SAVP[F], or AVP[F] with them (RFC 8643)."""
    upper = proto.upper()
    return upper in _TO_PLAIN or upper in _TO_SECURE


def opportunistic_streams(sdp: SessionDescription, offers: Sequence[LegOffer]) -> frozenset[int]:
    """The streams of ``sdp`` that are opportunistic SRTP (RFC 8643): RTP/AVP[F] the
    B2BUA took as SRTP (``offers``, read from ``sdp``). What the B2BUA sends that
    side next keeps the RTP profile with an a=crypto on them (RFC 8643 3.2: the
    answer's profile is the offer's, stream by stream)."""
    return frozenset(
        index
        for index, (media, offer) in enumerate(zip(sdp.media, offers, strict=False))
        if offer.srtp is not None and media.proto.upper() in _TO_SECURE
    )


def is_secure_proto(proto: str) -> bool:
    """Any SRTP profile: SAVP, SAVPF, over UDP or DTLS."""
    return "SAVP" in proto.upper()


def secure_proto(proto: str) -> str:
    """The SRTP profile of an RTP profile (RTP/AVP -> RTP/SAVP); others as they are."""
    return _TO_SECURE.get(proto.upper(), proto)


def plain_proto(proto: str) -> str:
    """The RTP profile of an SDES profile (RTP/SAVPF -> RTP/AVPF); others as they are."""
    return _TO_PLAIN.get(proto.upper(), proto)


def offered_crypto(media: MediaDescription, suite: SrtpSuite | None = None) -> SdesCrypto | None:
    """The first a=crypto of ``media`` the relay can take (of ``suite`` if given).

    RFC 4568 6.1: the offerer lists its choices in order of preference; one with an
    unsupported suite, an MKI or session parameters is passed over, not refused.
    """
    for line in media.lines:
        if not isinstance(line, Attribute) or line.name.lower() != "crypto":
            continue
        try:
            crypto = SdesCrypto.parse(line.value or "")
        except SrtpError:
            continue
        if suite is None or crypto.suite is suite:
            return crypto
    return None


def first_offers(
    sdp: SessionDescription,
    offerer: Sequence[LegOffer],
    offerer_policy: SrtpPolicy,
    answerer: Sequence[LegOffer],
    answerer_policy: SrtpPolicy,
) -> tuple[tuple[LegOffer, ...], tuple[LegOffer, ...]]:
    """The relay's offers of both sides for a call's first offer ``sdp``.

    ``offerer`` is what `leg_offers` read from ``sdp``; ``answerer`` the blank offers
    of the side the offer goes to. Each RTP stream of the offerer becomes SRTP with
    its preferred usable a=crypto, or RTP; the answerer's side is SRTP in
    :data:`OFFER_SUITE` where its policy asks for it or the offer was SRTP, unless
    its policy is off. SdpError 488 when a policy refuses the offer or the relay
    cannot terminate its SRTP (DTLS-SRTP, no a=crypto of a suite it has).
    """
    out_a: list[LegOffer] = []
    out_b: list[LegOffer] = []
    for index, (media, a, b) in enumerate(zip(sdp.media, offerer, answerer, strict=False)):
        if not a.rtp:
            # T.38 crosses in the clear, but a re-offer may turn the stream into audio
            # (RFC 3264 8.3.2), and the legs' security is fixed now: a realm that
            # requires SRTP gets its key made ready for that audio.
            a_key = OFFER_SUITE if offerer_policy is SrtpPolicy.REQUIRED else None
            b_key = OFFER_SUITE if answerer_policy is SrtpPolicy.REQUIRED else None
            out_a.append(evolve(a, srtp=a_key, encrypted=False))
            out_b.append(evolve(b, srtp=b_key, encrypted=False))
            continue
        if media.is_rejected:
            # No media now, but the legs' security is fixed at allocation: a stream a
            # re-offer brings back (RFC 3264 8.1) keeps each realm's policy.
            a_secure = offerer_policy is SrtpPolicy.REQUIRED or (
                offerer_policy is not SrtpPolicy.OFF and is_sdes_proto(media.proto)
            )
            b_secure = answerer_policy is SrtpPolicy.REQUIRED or (
                a_secure and answerer_policy is not SrtpPolicy.OFF
            )
            out_a.append(evolve(a, srtp=OFFER_SUITE if a_secure else None, encrypted=False))
            out_b.append(evolve(b, srtp=OFFER_SUITE if b_secure else None, encrypted=False))
            continue
        crypto = None
        if is_secure_proto(media.proto):
            if offerer_policy is SrtpPolicy.OFF:
                raise SdpError(f"stream {index}: SRTP offered where SRTP is off", 488)
            crypto = offered_crypto(media) if is_sdes_proto(media.proto) else None
            if crypto is None:
                raise SdpError(
                    f"stream {index}: {media.proto} without an a=crypto the relay can take"
                    " (it terminates SDES-SRTP: AES_CM_128_HMAC_SHA1_80/32, AEAD_AES_128_GCM)",
                    488,
                )
        else:
            # RFC 8643 opportunistic SRTP: RTP/AVP with a=crypto; taken as SRTP, and
            # answered in the same profile (`opportunistic_streams`), except where SRTP is
            # off (the key is dropped, the call is plain).
            if offerer_policy is not SrtpPolicy.OFF:
                crypto = offered_crypto(media)
            if crypto is None and offerer_policy is SrtpPolicy.REQUIRED:
                raise SdpError(f"stream {index}: {media.proto} offered where SRTP is required", 488)
        out_a.append(
            evolve(
                a,
                srtp=None if crypto is None else crypto.suite,
                crypto=crypto,
                encrypted=False,
            )
        )
        secure = answerer_policy is SrtpPolicy.REQUIRED or (
            crypto is not None and answerer_policy is not SrtpPolicy.OFF
        )
        out_b.append(evolve(b, srtp=OFFER_SUITE if secure else None, encrypted=False))
    return tuple(out_a), tuple(out_b)


def blank_srtp(offers: Sequence[LegOffer], policy: SrtpPolicy) -> tuple[LegOffer, ...]:
    """Blank offers (a side whose SDP is not known yet: a late offer) as ``policy``
    has them: a key made ready in :data:`OFFER_SUITE` unless SRTP is off. A side whose
    policy leaves the choice open takes the first offer's (`established` with
    ``undecided``, then `mirror` for the other side), and gives the key up for RTP."""
    if policy is SrtpPolicy.OFF:
        return tuple(offers)
    return tuple(evolve(offer, srtp=OFFER_SUITE) for offer in offers)


def established(
    sdp: SessionDescription,
    offers: Sequence[LegOffer],
    legs: Sequence[LegState],
    current: Sequence[LegOffer] | None = None,
    *,
    undecided: bool = False,
    unsent: bool = False,
) -> tuple[LegOffer, ...]:
    """``offers`` (read from ``sdp``, an offer or answer of one side after the first
    offer) for the relay's ``legs`` of that side, which keep their security: an SRTP
    leg takes the peer's a=crypto of its suite, an RTP leg takes no SRTP.

    ``current``: the side's offers so far, where a leg the relay made a key for may
    have given SRTP up (``srtp`` None). ``undecided``: the side's first SDP of a
    late-offer call whose policy leaves the choice open: RTP is taken too, and the
    leg gives its key up. ``unsent``: no SDP sent to that side carried the relay's
    keys yet (a late offer's first SDP): a stream without an a=crypto of the key's
    suite takes the first one of another suite the relay has, with a new key of
    that suite (``LegOffer.local_crypto``). SdpError 488 when ``sdp`` does not fit
    (an RTP answer to an SRTP offer, a re-offer moving a stream between RTP and SRTP). Streams the
    relay has no leg for are rejected in what the B2BUA sends on: anything goes."""
    out: list[LegOffer] = []
    for index, (media, offer) in enumerate(zip(sdp.media, offers, strict=False)):
        if index >= len(legs):
            out.append(evolve(offer, encrypted=False))
            continue
        local = legs[index].local_crypto
        if current is not None and index < len(current) and current[index].srtp is None:
            local = None
        if not offer.rtp:
            # T.38 in an SRTP call crosses in the clear (secure fax is UDPTL over
            # DTLS, RFC 7345, which the relay does not do); the leg keeps its key
            # for the audio the call may go back to.
            out.append(evolve(offer, srtp=None if local is None else local.suite, encrypted=False))
            continue
        if local is not None and undecided and not is_secure_proto(media.proto):
            out.append(evolve(offer, srtp=None, encrypted=False))
            continue
        if local is None:
            if is_secure_proto(media.proto) and not media.is_rejected:
                raise SdpError(
                    f"stream {index}: {media.proto} on a leg of plain RTP (RTP and SRTP"
                    " do not change within a call)",
                    488,
                )
            out.append(evolve(offer, encrypted=False))
            continue
        # SAVP, or RTP/AVP with a=crypto (RFC 8643, an opportunistic offerer's re-offer).
        crypto = offered_crypto(media, local.suite) if _sdes_capable(media.proto) else None
        if crypto is None and unsent and _sdes_capable(media.proto):
            other = offered_crypto(media)
            if other is not None:
                new_key = SdesCrypto.generate(other.suite)
                out.append(evolve(offer, srtp=other.suite, crypto=other, local_crypto=new_key))
                continue
        if crypto is None and not media.is_rejected:
            raise SdpError(
                f"stream {index}: {media.proto} without a=crypto {local.suite.value} on an"
                " SRTP leg (RTP and SRTP do not change within a call)",
                488,
            )
        out.append(evolve(offer, srtp=local.suite, crypto=crypto, encrypted=False))
    return tuple(out)


def mirror(decided: Sequence[LegOffer], undecided: Sequence[LegOffer]) -> tuple[LegOffer, ...]:
    """The offers of a late-offer side whose policy left the choice open, once the
    other side's first offer ``decided`` it: SRTP on the streams that offer made
    SRTP (with the key made ready, `blank_srtp`), RTP on the others."""
    return tuple(
        offer
        if offer.srtp is None or (index < len(decided) and decided[index].srtp is not None)
        else evolve(offer, srtp=None)
        for index, offer in enumerate(undecided)
    )


def crypto_attribute(local: SdesCrypto, peer: SdesCrypto | None) -> Attribute:
    """The a=crypto naming the relay's key ``local`` for a leg's peer: under the tag
    of the peer's own a=crypto when it has one (the answer takes the tag of the
    offer's line it accepts, RFC 4568 5.1.2), else the relay's."""
    tag = local.tag if peer is None else peer.tag
    return Attribute("crypto", str(evolve(local, tag=tag)))
