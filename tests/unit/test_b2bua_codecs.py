"""Codec policy per realm (``realms[].codecs``, `sbc.b2bua.codecs`).

Offers into and out of a realm list only the encodings its policy allows (both
realms' lists for a call between two); a stream left with none is rejected, and an
offer left with no stream gets 488. Answers pass as they are: they answer offers
that were restricted already.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.b2bua.call import CallState
from sbc.b2bua.codecs import CodecPolicyError, allowed_codecs, restrict_codecs
from sbc.b2bua.controller import CallController, RealmPolicy
from sbc.config.loader import ConfigError, load_config_text
from sbc.sip.message import Request
from sbc.sip.sdp import SessionDescription
from tests.unit.test_b2bua_flows import (
    CALLER,
    TRUNK,
    answer,
    controller,
    from_a,
    from_b,
    invite_text,
    receive,
    requests,
    responses,
    statuses,
)
from tests.unit.test_b2bua_srtp import call, late_call

OFFER = (
    "v=0\r\no=a 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 18 0 8 101\r\n"
    "a=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n"
    "m=video 40002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=fmtp:96 profile-level-id=42e01f\r\n"
)


def parsed(text: str) -> SessionDescription:
    return SessionDescription.parse(text.encode())


def formats(sdp: SessionDescription) -> list[tuple[str, int, tuple[str, ...]]]:
    return [(m.media, m.port, m.formats) for m in sdp.media]


def test_allowed_codecs_is_the_intersection_of_the_lists_that_restrict() -> None:
    assert allowed_codecs((), ()) is None
    assert allowed_codecs(("PCMU", "G729"), ()) == {"pcmu", "g729"}
    assert allowed_codecs(("PCMU", "G729"), ("pcma", "pcmu")) == {"pcmu"}


def test_an_offer_lists_only_what_is_allowed_and_a_stream_left_empty_is_rejected() -> None:
    out = restrict_codecs(parsed(OFFER), frozenset({"pcmu", "pcma", "telephone-event"}))
    assert formats(out) == [("audio", 40000, ("0", "8", "101")), ("video", 0, ("96",))]
    text = bytes(out).decode()
    assert "G729" not in text and "annexb" not in text
    assert "a=rtpmap:101 telephone-event/8000" in text and "a=fmtp:101 0-15" in text


def test_a_stream_left_with_only_telephone_event_is_rejected() -> None:
    out = restrict_codecs(parsed(OFFER), frozenset({"g722", "h264", "telephone-event"}))
    assert formats(out) == [("audio", 0, ("18", "0", "8", "101")), ("video", 40002, ("96",))]


def test_an_offer_left_with_no_stream_gets_488() -> None:
    with pytest.raises(CodecPolicyError) as raised:
        restrict_codecs(parsed(OFFER), frozenset({"opus"}))
    assert raised.value.status == 488


def test_an_offer_whose_offerer_rejected_every_stream_is_left_alone() -> None:
    held = parsed(OFFER.replace("audio 40000", "audio 0").replace("video 40002", "video 0"))
    assert restrict_codecs(held, frozenset({"opus"})) == held


def test_no_policy_changes_nothing() -> None:
    sdp = parsed(OFFER)
    assert restrict_codecs(sdp, None) is sdp


@given(st.sets(st.sampled_from(["pcmu", "pcma", "g729", "telephone-event", "h264", "opus"])))
def test_what_is_kept_is_allowed_and_parses_again(allowed: set[str]) -> None:
    try:
        out = restrict_codecs(parsed(OFFER), frozenset(allowed))
    except CodecPolicyError:
        assert not allowed & {"pcmu", "pcma", "g729", "h264"}
        return
    again = SessionDescription.parse(bytes(out))
    for media in again.media:
        if media.port:
            assert {c.encoding_name.lower() for c in media.codecs()} <= allowed
            rtpmaps = [a.value for a in media.find_attributes("rtpmap")]
            assert all((v or "").split()[0] in media.formats for v in rtpmaps)


# -- through the B2BUA -----------------------------------------------------------------

G711_ONLY = ("pcmu", "pcma", "telephone-event")


def policy_controller(
    outside: tuple[str, ...] = (), inside: tuple[str, ...] = ()
) -> CallController:
    return controller(
        policies={
            "outside": RealmPolicy(codecs=frozenset(outside)),
            "inside": RealmPolicy(codecs=frozenset(inside)),
        }
    )


def test_the_callee_s_realm_policy_restricts_the_caller_s_offer() -> None:
    c = policy_controller(inside=G711_ONLY)
    step, _, _ = call(c, OFFER)
    (invite,) = requests(step, "INVITE")
    body = invite.body.decode()
    assert "m=audio" in body and " RTP/AVP 0 8 101\r\n" in body and "G729" not in body
    assert "m=video 0 " in body


def test_an_offer_no_codec_of_which_a_realm_allows_gets_488_and_goes_nowhere() -> None:
    c = policy_controller(outside=("opus",))
    step = receive(c, invite_text(body=OFFER), CALLER, 0.0)
    assert statuses(step)[-1] == 488
    assert not step.media and not requests(step, "INVITE")
    assert len(c) == 0


def answered_with_pcma(c: CallController) -> tuple[Request, str]:
    """A call the callee answered with PCMA, ACKed: its B-leg INVITE and the tag the
    caller knows the SBC by."""
    step, _, _ = call(c, OFFER)
    (invite,) = requests(step, "INVITE")
    b_answer = OFFER.replace("RTP/AVP 18 0 8 101", "RTP/AVP 8").replace("40000", "42000")
    (ok,) = responses(receive(c, answer(invite, 200, b_answer), TRUNK, 0.1))
    assert ok.to.tag is not None
    receive(c, from_a("ACK", ok.to.tag, 1), CALLER, 0.2)
    return invite, ok.to.tag


def test_a_re_offer_is_restricted_and_one_left_with_nothing_gets_488() -> None:
    c = policy_controller(outside=("pcma", "g729"))
    invite, _ = answered_with_pcma(c)
    reoffer = (
        "v=0\r\no=b 1 2 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n"
        "m=audio 42000 RTP/AVP 9\r\n"
    )
    # The callee re-offers G.722 only: nothing the caller's realm takes.
    step = receive(c, from_b(invite, "UPDATE", 2, body=reoffer), TRUNK, 1.0)
    assert statuses(step) == [488] and not requests(step)
    # G.722 and PCMA: the caller gets PCMA only.
    both = reoffer.replace("RTP/AVP 9", "RTP/AVP 9 8").replace("1 2 IN", "1 3 IN")
    step = receive(c, from_b(invite, "INVITE", 3, body=both), TRUNK, 2.0)
    (reinvite,) = requests(step, "INVITE")
    assert " RTP/AVP 8\r\n" in reinvite.body.decode()


def test_a_late_offer_in_the_2xx_is_restricted_or_refused() -> None:
    c = policy_controller(outside=G711_ONLY)
    invite, _ = late_call(c)
    step = receive(c, answer(invite, 200, OFFER.replace("198.51.100.9", "203.0.113.5")), TRUNK, 0.1)
    (ok,) = responses(step)
    body = ok.body.decode()
    assert ok.status == 200 and " RTP/AVP 0 8 101\r\n" in body and "m=video 0 " in body
    # A callee that offers none of them: ACKed, hung up, and the caller gets 488.
    c = policy_controller(outside=G711_ONLY)
    invite, _ = late_call(c)
    g729 = OFFER.replace("RTP/AVP 18 0 8 101", "RTP/AVP 18").split("m=video")[0]
    step = receive(c, answer(invite, 200, g729), TRUNK, 0.1)
    assert statuses(step) == [488]
    assert [r.method for r in requests(step)] == ["ACK", "BYE"]


def offerless_reinvite(c: CallController) -> tuple[Request, str]:
    """A call the callee answered with PCMA, then the caller's re-INVITE without an
    offer: the B-leg re-INVITE, and the caller's tag."""
    _, a_tag = answered_with_pcma(c)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2), CALLER, 1.0), "INVITE")
    assert reinvite.body == b""
    return reinvite, a_tag


#: The callee's offer in its 2xx to an offerless re-INVITE.
B_REOFFER = (
    "v=0\r\no=b 1 2 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n"
    "m=audio 42000 RTP/AVP 18 8\r\n"
)


def test_the_offer_in_a_2xx_to_an_offerless_re_invite_is_restricted() -> None:
    c = policy_controller(outside=("pcma",))
    reinvite, _ = offerless_reinvite(c)
    step = receive(c, answer(reinvite, 200, B_REOFFER), TRUNK, 1.1)
    assert requests(step) == []  # the ACK waits for the caller's answer
    (ok,) = responses(step)
    assert ok.status == 200 and " RTP/AVP 8\r\n" in ok.body.decode()


def test_an_offer_in_a_2xx_with_nothing_allowed_is_answered_rejected_and_offered_back() -> None:
    c = policy_controller(outside=("pcma",))
    reinvite, _ = offerless_reinvite(c)
    g729 = B_REOFFER.replace("RTP/AVP 18 8", "RTP/AVP 18")
    step = receive(c, answer(reinvite, 200, g729), TRUNK, 1.1)
    # RFC 3261 13.2.2.4: the ACK answers the offer, every stream rejected; the caller,
    # whose session stays as it was, gets 488; the callee is offered that session back.
    assert statuses(step) == [488]
    ack, again = requests(step)
    assert ack.method == "ACK" and ack.cseq.seq == reinvite.cseq.seq
    answer_sdp = SessionDescription.parse(ack.body)
    assert [(m.media, m.port) for m in answer_sdp.media] == [("audio", 0)]
    assert again.method == "INVITE" and again.cseq.seq > reinvite.cseq.seq
    offer_sdp = SessionDescription.parse(again.body)
    assert offer_sdp.origin.sess_version > answer_sdp.origin.sess_version
    audio = offer_sdp.media[0]
    assert audio.media == "audio" and audio.port > 0
    (call_now,) = c.calls()
    assert call_now.state is CallState.CONFIRMED


def test_an_unparseable_offer_in_a_2xx_to_an_offerless_re_invite_gets_502() -> None:
    c = policy_controller()
    reinvite, _ = offerless_reinvite(c)
    step = receive(c, answer(reinvite, 200, "v=0\r\nnonsense\r\n"), TRUNK, 1.1)
    assert statuses(step) == [502]
    assert [r.method for r in requests(step)] == ["ACK"]
    assert len(c) == 1


def test_answers_are_not_restricted() -> None:
    # The caller's realm allows G.711 only, but its own offer listed G.729 and the
    # callee chose it: an answer is a subset of its offer and crosses as it is.
    c = policy_controller(inside=("pcmu", "g729"))
    step, _, _ = call(c, OFFER)
    (invite,) = requests(step, "INVITE")
    b_answer = OFFER.replace("RTP/AVP 18 0 8 101", "RTP/AVP 18").split("m=video")[0]
    (ok,) = responses(
        receive(c, answer(invite, 200, b_answer + "m=video 0 RTP/AVP 96\r\n"), TRUNK, 0.1)
    )
    assert " RTP/AVP 18\r\n" in ok.body.decode()


def test_a_codec_name_that_is_no_encoding_name_is_refused_with_its_path() -> None:
    text = """
realms:
  - name: outside
    listen: [{transport: udp, address: 127.0.0.1, port: 5060}]
    media_address: 127.0.0.1
    codecs: [PCMU, "G 729"]
"""
    with pytest.raises(ConfigError, match=r"codecs\[1\]"):
        load_config_text(text, "sbc.yaml", Path("/nonexistent-base"))
