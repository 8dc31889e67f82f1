"""Review of SDES-SRTP terminated per leg (`sbc.b2bua.srtp`): what each side gets.

Each test drives the controller (or the relay) as tests/unit/test_b2bua_srtp.py does
and asserts on the SDP on the wire and the relay's commands. Ten of them showed bugs,
fixed since (a session-level a=crypto crossed; a stream brought back went plain
into a required realm; opportunistic SRTP answered in the wrong profile; a refused
or withdrawn re-offer left the relay with the wrong key or context; a late offer
decided plain kept keys on its unused stream); the others pin what the review
found to be right.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from sbc.b2bua.controller import AllocateMedia, CallController, RealmPolicy, Step, UpdateMedia
from sbc.cdr.from_call import cdr_record
from sbc.evolve import evolve
from sbc.media.session import LegOffer, Side, StreamOffer
from sbc.media.srtp import SdesCrypto, SrtpSuite, SrtpTransform
from sbc.sip.message import Request
from tests.unit.test_b2bua_flows import (
    BOB1_FLOW,
    BOB2_FLOW,
    CALLER,
    SESSION_TIMERS,
    TRUNK,
    USERS,
    answer,
    controller,
    from_a,
    from_b,
    invite_text,
    receive,
    registered_targets,
    requests,
    responses,
    sdp,
    statuses,
)
from tests.unit.test_b2bua_reoffer_rejected import cancel_for
from tests.unit.test_b2bua_srtp import (
    A_KEY_32,
    A_KEY_80,
    B_KEY,
    OSRTP_OFFER,
    PLAIN_ANSWER,
    PLAIN_OFFER,
    SRTP_ANSWER,
    SRTP_OFFER,
    P,
    a_tag_of_response,
    call,
    confirmed_srtp_call,
    crypto_lines,
    evolve_tag,
    key_text,
    late_answer,
    late_call,
    media_line,
    relay_line,
    savp,
    srtp_controller,
)
from tests.unit.test_media_relay import PEER_A, RTP, leg, make_relay, offer

A_NEW_KEY = SdesCrypto(1, A_KEY_32.suite, bytes(range(5, 35)))
B_NEW_KEY = SdesCrypto(1, B_KEY.suite, bytes(range(7, 37)))


def media_lines(body: bytes) -> list[str]:
    return [line for line in body.decode().splitlines() if line.startswith("m=")]


def sections(body: bytes) -> list[list[str]]:
    """The lines of each media section of ``body`` (its m= line first)."""
    out: list[list[str]] = []
    for line in body.decode().splitlines():
        if line.startswith("m="):
            out.append([line])
        elif out:
            out[-1].append(line)
    return out


def session_lines(body: bytes) -> list[str]:
    lines = body.decode().splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("m=")), len(lines))
    return lines[:end]


def updates(step: Step) -> list[tuple[StreamOffer, ...]]:
    return [m.streams for m in step.media if isinstance(m, UpdateMedia)]


def keys_absent(data: bytes, *keys: SdesCrypto) -> bool:
    return all(key_text(key).encode() not in data for key in keys)


def confirmed(c: CallController, offer: str, b_answer: str) -> tuple[Step, Request, str]:
    """A call with ``offer`` answered with ``b_answer`` and ACKed: the first step, the
    B-leg INVITE and the A leg's tag."""
    step, _, _ = call(c, offer)
    (invite,) = requests(step, "INVITE")
    (ok,) = responses(receive(c, answer(invite, 200, b_answer), TRUNK, 0.1))
    a_tag = a_tag_of_response(ok)
    receive(c, from_a("ACK", a_tag, 1), CALLER, 0.2)
    return step, invite, a_tag


# -- 1. RFC 4568 / 3264 / 8643: what each side receives --------------------------------


def test_mki_and_session_param_lines_are_skipped_a_lifetime_line_is_taken() -> None:
    # RFC 4568 6.1: the offerer's lines in order of preference; the relay has no MKI
    # and no session parameters, so it takes the first line without them, and the
    # answer names that line's tag (5.1.2).
    key = key_text(A_KEY_80)
    lines = (
        f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{key}|2^20|1:4\r\n"
        f"a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:{key} UNENCRYPTED_SRTCP\r\n"
        f"a=crypto:3 AES_CM_128_HMAC_SHA1_80 inline:{key}|2^31\r\n"
    )
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, allocate, session = call(c, savp("a", "198.51.100.9", 40000) + lines)
    assert allocate is not None and session is not None
    assert allocate.streams[0].a.crypto == evolve_tag(A_KEY_80, 3)
    (invite,) = requests(step, "INVITE")
    assert keys_absent(bytes(invite), A_KEY_80)
    (ok,) = responses(receive(c, answer(invite, 200, SRTP_ANSWER), TRUNK, 0.1))
    a_key = session.streams[0].a.local_crypto
    assert a_key is not None
    assert crypto_lines(ok.body) == [relay_line(3, a_key)]


def test_an_answer_with_another_tag_and_several_lines_is_taken_by_the_suite_offered() -> None:
    # RFC 4568 5.1.2 wants one a=crypto with the offer's tag; a lenient relay takes
    # the line of the suite it offered, whatever its tag, and never echoes it.
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, _, session = call(c, SRTP_OFFER)
    assert session is not None
    (invite,) = requests(step, "INVITE")
    other_suite = SdesCrypto(4, SrtpSuite.AES_CM_128_HMAC_SHA1_32, bytes(range(3, 33)))
    b_answer = savp("b", "203.0.113.5", 42000, other_suite, evolve_tag(B_KEY, 5))
    step = receive(c, answer(invite, 200, b_answer), TRUNK, 0.1)
    (ok,) = responses(step)
    assert ok.status == 200 and keys_absent(bytes(ok), B_KEY, other_suite)
    (streams,) = updates(step)
    assert streams[0].b.crypto == evolve_tag(B_KEY, 5)


def test_a_callee_answering_in_another_suite_than_offered_ends_the_call_cleanly() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, _, _ = call(c, SRTP_OFFER)
    (invite,) = requests(step, "INVITE")
    b_answer = savp("b", "203.0.113.5", 42000, A_KEY_32)
    step = receive(c, answer(invite, 200, b_answer), TRUNK, 0.1)
    assert statuses(step) == [502]
    assert [r.method for r in requests(step)] == ["ACK", "BYE"]


def test_a_session_level_crypto_never_crosses() -> None:
    # RFC 4568 9.1 defines a=crypto at media level only, but some endpoints put one
    # at session level too; it is still their key.
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    offer = SRTP_OFFER.replace("t=0 0\r\n", f"a=crypto:{A_KEY_80}\r\nt=0 0\r\n")
    step, _, _ = call(c, offer)
    (invite,) = requests(step, "INVITE")
    b_answer = SRTP_ANSWER.replace("t=0 0\r\n", f"a=crypto:{B_NEW_KEY}\r\nt=0 0\r\n")
    (ok,) = responses(receive(c, answer(invite, 200, b_answer), TRUNK, 0.1))
    assert keys_absent(bytes(invite), A_KEY_80, A_KEY_32)
    assert keys_absent(bytes(ok), B_NEW_KEY, B_KEY)


def test_each_stream_is_answered_in_the_profile_it_was_offered_in() -> None:
    # RFC 3264 6: the answer's proto is the offer's, stream by stream; RFC 8643 3.2:
    # the opportunistic stream alone keeps RTP/AVP with its a=crypto.
    video = "m=video 40002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
    offer = SRTP_OFFER + video + f"a=crypto:{A_KEY_80}\r\n"
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, _, _ = call(c, offer)
    (invite,) = requests(step, "INVITE")
    b_video = "m=video 42002 RTP/SAVP 96\r\na=rtpmap:96 H264/90000\r\n"
    b_answer = SRTP_ANSWER + b_video + f"a=crypto:{B_NEW_KEY}\r\n"
    (ok,) = responses(receive(c, answer(invite, 200, b_answer), TRUNK, 0.1))
    assert ok.status == 200
    audio, video_section = sections(ok.body)
    assert [audio[0], video_section[0]] == ["m=audio 20000 RTP/SAVP 0", "m=video 20002 RTP/AVP 96"]
    assert len([line for line in audio if line.startswith("a=crypto:1 ")]) == 1


def test_an_opportunistic_caller_s_savp_re_offer_is_answered_in_savp() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    _, _, a_tag = confirmed(c, OSRTP_OFFER, SRTP_ANSWER)
    reoffer = savp("a", "198.51.100.9", 40000, A_KEY_80)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=reoffer), CALLER, 1.0))
    (ok,) = responses(receive(c, answer(reinvite, 200, SRTP_ANSWER), TRUNK, 1.1))
    assert ok.status == 200 and media_line(ok.body).endswith("RTP/SAVP 0")


def test_an_opportunistic_late_offer_of_the_callee_is_answered_in_rtp_avp() -> None:
    c = srtp_controller(P.OPTIONAL, P.REQUIRED)
    invite, session = late_call(c)
    b_offer = sdp("b", "203.0.113.5", 42000) + f"a=crypto:{evolve_tag(B_KEY, 3)}\r\n"
    _, ok = late_answer(c, invite, b_offer)
    step = receive(c, from_a("ACK", a_tag_of_response(ok), 1, body=SRTP_OFFER), CALLER, 0.2)
    (ack,) = requests(step, "ACK")
    b_key = session.streams[0].b.local_crypto
    assert b_key is not None
    assert crypto_lines(ack.body) == [relay_line(3, b_key)]
    # RFC 8643 3.2: the answer to RTP/AVP with a=crypto keeps RTP/AVP.
    assert media_line(ack.body).endswith("RTP/AVP 0")


def test_an_opportunistic_re_offer_of_the_callee_is_answered_in_rtp_avp() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    _, invite, _ = confirmed(c, SRTP_OFFER, SRTP_ANSWER)
    b_offer = sdp("b", "203.0.113.5", 42000, 2) + f"a=crypto:{B_KEY}\r\n"
    (reinvite,) = requests(receive(c, from_b(invite, "INVITE", 1, body=b_offer), TRUNK, 1.0))
    assert keys_absent(bytes(reinvite), B_KEY)
    (ok,) = responses(receive(c, answer(reinvite, 200, SRTP_OFFER, tag="x"), CALLER, 1.1))
    assert ok.status == 200 and media_line(ok.body).endswith("RTP/AVP 0")


def test_hold_and_resume_keep_the_relay_s_keys_and_cross_the_directions() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    session, a_tag = confirmed_srtp_call(c)
    a_key, b_key = session.streams[0].a.local_crypto, session.streams[0].b.local_crypto
    assert a_key is not None and b_key is not None
    hold = savp("a", "198.51.100.9", 40000, A_NEW_KEY) + "a=sendonly\r\n"
    step = receive(c, from_a("INVITE", a_tag, 2, body=hold), CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    assert "a=sendonly" in reinvite.body.decode()
    assert crypto_lines(reinvite.body) == [relay_line(1, b_key)]
    assert keys_absent(bytes(reinvite), A_NEW_KEY, A_KEY_32)
    held = SRTP_ANSWER + "a=recvonly\r\n"
    (ok,) = responses(receive(c, answer(reinvite, 200, held), TRUNK, 1.1))
    assert "a=recvonly" in ok.body.decode() and crypto_lines(ok.body) == [relay_line(1, a_key)]
    receive(c, from_a("ACK", a_tag, 2), CALLER, 1.2)
    resume = savp("a", "198.51.100.9", 40000, A_NEW_KEY)
    (back,) = requests(receive(c, from_a("INVITE", a_tag, 3, body=resume), CALLER, 2.0))
    assert "a=sendonly" not in back.body.decode()
    assert crypto_lines(back.body) == [relay_line(1, b_key)]


def test_a_re_offer_adding_a_stream_gets_it_rejected_without_a_crypto_anywhere() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    _, a_tag = confirmed_srtp_call(c)
    video = f"m=video 40002 RTP/SAVP 96\r\na=crypto:{A_NEW_KEY}\r\n"
    offer = savp("a", "198.51.100.9", 40000, A_KEY_32) + video
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=offer), CALLER, 1.0))
    audio, rejected = sections(reinvite.body)
    assert len([line for line in audio if line.startswith("a=crypto:")]) == 1
    assert rejected[0].startswith("m=video 0 ") and not any("crypto" in ln for ln in rejected)
    assert keys_absent(bytes(reinvite), A_NEW_KEY, A_KEY_32)
    b_answer = SRTP_ANSWER + f"m=video 0 RTP/SAVP 96\r\na=crypto:{B_NEW_KEY}\r\n"
    (ok,) = responses(receive(c, answer(reinvite, 200, b_answer), TRUNK, 1.1))
    assert sections(ok.body)[1][0].startswith("m=video 0 ")
    assert keys_absent(bytes(ok), B_NEW_KEY, B_KEY)


def test_a_stream_brought_back_keeps_the_realm_s_required_srtp() -> None:
    # RFC 3264 8.1: a port-0 stream of the first offer may be reused by a re-offer.
    c = srtp_controller(P.OPTIONAL, P.REQUIRED)
    first = PLAIN_OFFER + "m=video 0 RTP/AVP 96\r\n"
    b_answer = SRTP_ANSWER + "m=video 0 RTP/SAVP 96\r\n"
    _, _, a_tag = confirmed(c, first, b_answer)
    reoffer = sdp("a", "198.51.100.9", 40000, 2) + "m=video 40002 RTP/AVP 96\r\n"
    step = receive(c, from_a("INVITE", a_tag, 2, body=reoffer), CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    video = sections(reinvite.body)[1]
    assert video[0] == "m=video 21002 RTP/SAVP 96"
    assert len([line for line in video if line.startswith("a=crypto:")]) == 1


# -- 2. key leaks ------------------------------------------------------------------------


def test_two_forks_early_media_keys_stay_in_their_realm() -> None:
    c = controller(
        rules=USERS,
        targets=registered_targets(),
        policies={
            "outside": RealmPolicy(srtp=P.OPTIONAL),
            "inside": RealmPolicy(srtp=P.OPTIONAL),
        },
    )
    step, _, session = call(c, SRTP_OFFER)
    assert session is not None
    first, second = requests(step, "INVITE")
    b_key = session.streams[0].b.local_crypto
    assert b_key is not None
    assert crypto_lines(first.body) == crypto_lines(second.body) == [relay_line(1, b_key)]
    key1, key2 = evolve_tag(B_KEY, 1), B_NEW_KEY
    e1 = savp("b", "203.0.113.5", 42000, key1)
    e2 = savp("b", "203.0.113.6", 42000, key2)
    (r1,) = responses(receive(c, answer(first, 183, e1, tag="bob1"), BOB1_FLOW, 0.1))
    (r2,) = responses(
        receive(
            c,
            answer(second, 183, e2, tag="bob2", contact="sip:bob@203.0.113.6:5070"),
            BOB2_FLOW,
            0.2,
        )
    )
    a_key = session.streams[0].a.local_crypto
    assert a_key is not None
    for provisional in (r1, r2):
        assert crypto_lines(provisional.body) == [relay_line(1, a_key)]
        assert keys_absent(bytes(provisional), key1, key2)


def test_the_rtp_retry_after_488_and_the_refreshes_carry_no_key_of_the_other_leg() -> None:
    c = controller(
        SESSION_TIMERS,
        policies={
            "outside": RealmPolicy(srtp=P.OPTIONAL),
            "inside": RealmPolicy(srtp=P.OPTIONAL),
        },
    )
    step, _, session = call(c, SRTP_OFFER)
    assert session is not None
    (invite,) = requests(step, "INVITE")
    (plain,) = requests(receive(c, answer(invite, 488), TRUNK, 0.1), "INVITE")
    assert crypto_lines(plain.body) == [] and keys_absent(bytes(plain), A_KEY_32, A_KEY_80)
    (ok,) = responses(receive(c, answer(plain, 200, PLAIN_ANSWER), TRUNK, 0.2))
    receive(c, from_a("ACK", a_tag_of_response(ok), 1), CALLER, 0.3)
    # RFC 4028: the refreshes re-offer the SDP last sent on each leg.
    refreshes = {r.call_id: r for r in requests(c.handle_timers(46.0), "INVITE")}
    to_b, to_a = refreshes[plain.call_id], refreshes[ok.call_id]
    assert media_line(to_b.body).endswith("RTP/AVP 0") and crypto_lines(to_b.body) == []
    a_key = session.streams[0].a.local_crypto
    assert a_key is not None and crypto_lines(to_a.body) == [relay_line(1, a_key)]
    assert keys_absent(bytes(to_a), A_KEY_32, A_KEY_80)


def test_no_key_reaches_the_logs_or_the_repr_of_the_relay_s_commands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, allocate, session = call(c, SRTP_OFFER)
    assert allocate is not None and session is not None
    (invite,) = requests(step, "INVITE")
    (ok,) = responses(receive(c, answer(invite, 200, SRTP_ANSWER), TRUNK, 0.1))
    a_tag = a_tag_of_response(ok)
    receive(c, from_a("ACK", a_tag, 1), CALLER, 0.2)
    refused = receive(c, from_a("INVITE", a_tag, 2, body=PLAIN_OFFER), CALLER, 1.0)
    rekey = savp("a", "198.51.100.9", 40000, A_NEW_KEY)
    step = receive(c, from_a("INVITE", a_tag, 3, body=rekey), CALLER, 2.0)
    (reinvite,) = requests(step, "INVITE")
    receive(c, answer(reinvite, 200, PLAIN_ANSWER), TRUNK, 2.1)  # refused answer
    relay_keys = [s.leg(side).local_crypto for s in session.streams for side in Side]
    keys = [A_KEY_32, A_KEY_80, B_KEY, A_NEW_KEY, *(k for k in relay_keys if k is not None)]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "refused" in logged  # the log lines were made
    shown = logged + repr(allocate) + repr(step.media) + repr(refused.media) + repr(session)
    assert all(key_text(key) not in shown for key in keys)


# -- 3. state: the relay's legs, the offers and the SDP ----------------------------------


def test_a_491_to_a_rekeying_re_invite_gives_the_relay_the_caller_s_old_key_back() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    _, a_tag = confirmed_srtp_call(c)
    rekey = savp("a", "198.51.100.9", 40000, A_NEW_KEY)
    step = receive(c, from_a("INVITE", a_tag, 2, body=rekey), CALLER, 1.0)
    (reinvite,) = requests(step, "INVITE")
    assert [s[0].a.crypto for s in updates(step)] == [A_NEW_KEY]
    step = receive(c, answer(reinvite, 491), TRUNK, 1.1)
    assert 491 in statuses(step)
    assert [s[0].a.crypto for s in updates(step)] == [A_KEY_32]


def test_a_withdrawn_hold_is_rolled_back_to_the_old_keys() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    session, a_tag = confirmed_srtp_call(c)
    hold = savp("a", "198.51.100.9", 40000, A_NEW_KEY) + "a=sendonly\r\n"
    text = from_a("INVITE", a_tag, 2, body=hold)
    (reinvite,) = requests(receive(c, text, CALLER, 1.0), "INVITE")
    receive(c, answer(reinvite, 180), TRUNK, 1.05)
    assert 487 in statuses(receive(c, cancel_for(text), CALLER, 1.1))
    b_answer = savp("b", "203.0.113.5", 42000, B_NEW_KEY) + "a=recvonly\r\n"
    step = receive(c, answer(reinvite, 200, b_answer), TRUNK, 1.2)
    (again,) = requests(step, "INVITE")
    b_key = session.streams[0].b.local_crypto
    assert b_key is not None and crypto_lines(again.body) == [relay_line(1, b_key)]
    assert "a=sendonly" not in again.body.decode()
    assert keys_absent(bytes(again), A_NEW_KEY, A_KEY_32)
    assert [(s[0].a.crypto, s[0].b.crypto) for s in updates(step)] == [(A_KEY_32, B_NEW_KEY)]


def test_a_withdrawn_rekey_still_takes_the_callee_s_new_key_from_its_answer() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    _, a_tag = confirmed_srtp_call(c)
    text = from_a("INVITE", a_tag, 2, body=savp("a", "198.51.100.9", 40000, A_NEW_KEY))
    (reinvite,) = requests(receive(c, text, CALLER, 1.0), "INVITE")
    receive(c, answer(reinvite, 180), TRUNK, 1.05)
    assert 487 in statuses(receive(c, cancel_for(text), CALLER, 1.1))
    # The callee's SDP from the B2BUA did not change (the relay's key and port are
    # the same): no re-INVITE is needed, but the callee answered with a key of its
    # own that it now sends with (RFC 4568 7.1.4: a new answer may rekey).
    b_answer = savp("b", "203.0.113.5", 42000, B_NEW_KEY)
    step = receive(c, answer(reinvite, 200, b_answer), TRUNK, 1.2)
    assert requests(step, "INVITE") == []
    assert [(s[0].a.crypto, s[0].b.crypto) for s in updates(step)] == [(A_KEY_32, B_NEW_KEY)]


def test_a_re_invite_whose_answer_is_refused_leaves_the_caller_s_key_as_it_was() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    _, a_tag = confirmed_srtp_call(c)
    rekey = savp("a", "198.51.100.9", 40000, A_NEW_KEY)
    (reinvite,) = requests(receive(c, from_a("INVITE", a_tag, 2, body=rekey), CALLER, 1.0))
    # The callee answers the relay's SRTP offer in plain RTP: unusable.
    step = receive(c, answer(reinvite, 200, PLAIN_ANSWER), TRUNK, 1.1)
    assert statuses(step) == [502]
    # RFC 3261 14.1: the caller's session is as before its re-INVITE, keys included.
    assert [s[0].a.crypto for s in updates(step)][-1:] == [A_KEY_32]


def test_t38_and_back_after_the_rtp_retry_keeps_the_callee_leg_plain() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step, _, session = call(c, SRTP_OFFER)
    assert session is not None
    (invite,) = requests(step, "INVITE")
    (plain,) = requests(receive(c, answer(invite, 488), TRUNK, 0.1), "INVITE")
    (ok,) = responses(receive(c, answer(plain, 200, PLAIN_ANSWER), TRUNK, 0.2))
    a_tag = a_tag_of_response(ok)
    receive(c, from_a("ACK", a_tag, 1), CALLER, 0.3)
    fax = sdp("a", "198.51.100.9", 40100).replace("audio 40100 RTP/AVP 0", "image 40100 udptl t38")
    step = receive(c, from_a("INVITE", a_tag, 2, body=fax), CALLER, 1.0)
    (t38,) = requests(step, "INVITE")
    assert [s[0].b.srtp for s in updates(step)] == [None]
    b_fax = sdp("b", "203.0.113.5", 42100).replace("audio 42100 RTP/AVP 0", "image 42100 udptl t38")
    receive(c, answer(t38, 200, b_fax), TRUNK, 1.1)
    receive(c, from_a("ACK", a_tag, 2), CALLER, 1.2)
    step = receive(c, from_a("INVITE", a_tag, 3, body=SRTP_OFFER), CALLER, 2.0)
    (back,) = requests(step, "INVITE")
    assert media_line(back.body).endswith("RTP/AVP 0") and crypto_lines(back.body) == []
    (ok,) = responses(receive(c, answer(back, 200, PLAIN_ANSWER), TRUNK, 2.1))
    a_key = session.streams[0].a.local_crypto
    assert a_key is not None and crypto_lines(ok.body) == [relay_line(1, a_key)]


def test_a_late_offer_decided_plain_refuses_a_later_srtp_re_offer() -> None:
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    invite, _ = late_call(c)
    _, ok = late_answer(c, invite, PLAIN_ANSWER)
    a_tag = a_tag_of_response(ok)
    receive(c, from_a("ACK", a_tag, 1, body=PLAIN_OFFER), CALLER, 0.2)
    step = receive(c, from_a("INVITE", a_tag, 2, body=SRTP_OFFER), CALLER, 1.0)
    assert statuses(step)[-1] == 488 and requests(step, "INVITE") == []


def test_a_refused_re_offer_keeps_the_old_key_s_srtp_context() -> None:
    relay = make_relay()
    suite = SrtpSuite.AES_CM_128_HMAC_SHA1_80
    old = SdesCrypto.generate(suite)
    srtp_a = LegOffer("outside", remote=PEER_A, srtp=suite, crypto=old)
    session = asyncio.run(relay.allocate("call", offer(a=srtp_a)))
    a = leg(relay, session, Side.A)
    peer = SrtpTransform(old, outbound=True)

    def packet(seq: int) -> bytes:
        return peer.protect(RTP[:2] + seq.to_bytes(2, "big") + RTP[4:], rtcp=False)

    for seq in (65534, 65535, 0):  # the peer's sequence numbers wrap: its ROC is 1
        relay._packet(a, False, packet(seq), PEER_A.sockaddr())
    assert (a.packets, a.dropped_auth) == (3, 0)
    # A re-offer with a new key, then refused (491, 488 ...): `_restore` gives the
    # old key back. The peer never left its old key and context.
    new = SdesCrypto.generate(suite)
    asyncio.run(relay.update(session.session_id, offer(a=evolve(srtp_a, crypto=new))))
    asyncio.run(relay.update(session.session_id, offer(a=srtp_a)))
    relay._packet(a, False, packet(1), PEER_A.sockaddr())
    assert (a.packets, a.dropped_auth) == (4, 0)


def test_a_late_offer_call_decided_plain_is_recorded_as_rtp() -> None:
    relay = make_relay()
    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    step = receive(c, invite_text(body=""), CALLER, 0.0)
    (allocate,) = step.media
    assert isinstance(allocate, AllocateMedia)
    session = asyncio.run(relay.allocate(allocate.call_id, allocate.streams))
    (invite,) = requests(c.media_allocated(allocate.call_ref, session, 0.0), "INVITE")
    step = receive(c, answer(invite, 200, PLAIN_ANSWER), TRUNK, 0.1)
    (ok,) = responses(step)
    assert crypto_lines(ok.body) == []
    for streams in updates(step):
        asyncio.run(relay.update(session.session_id, streams))
    receive(c, from_a("ACK", a_tag_of_response(ok), 1, body=PLAIN_OFFER), CALLER, 0.2)
    final = asyncio.run(relay.delete(session.session_id))
    (ended,) = c.calls()
    record = cdr_record(ended, final, 0.0)
    assert (record.a_encryption, record.b_encryption) == ("rtp", "rtp")


# -- 4. what an operator configuring srtp: trips over -----------------------------------


@pytest.mark.parametrize(
    ("outside", "inside", "offer", "expected"),
    [
        # README: passthrough with any other realm is optional: terminated.
        (P.PASSTHROUGH, P.REQUIRED, PLAIN_OFFER, "RTP/SAVP 0"),
        (P.PASSTHROUGH, P.OFF, SRTP_OFFER, "RTP/AVP 0"),
        (P.REQUIRED, P.PASSTHROUGH, SRTP_OFFER, "RTP/SAVP 0"),
    ],
)
def test_passthrough_against_another_policy_is_optional_as_the_readme_says(
    outside: P, inside: P, offer: str, expected: str
) -> None:
    c = srtp_controller(outside, inside)
    step, allocate, _ = call(c, offer)
    assert allocate is not None and isinstance(allocate, AllocateMedia)
    assert not allocate.streams[0].a.encrypted
    (invite,) = requests(step, "INVITE")
    assert media_line(invite.body).endswith(expected)
    assert keys_absent(bytes(invite), A_KEY_32, A_KEY_80)
    assert not any(line.startswith("a=crypto") for line in session_lines(invite.body))


def test_mikey_keys_never_cross_either() -> None:
    from sbc.sip.transaction import Outgoing

    c = srtp_controller(P.OPTIONAL, P.OPTIONAL)
    mikey = "a=key-mgmt:mikey AQAFgM0XflABAAAAAAAAAAAAAAsAyO5e\r\n"
    offer = SRTP_OFFER.replace("t=0 0\r\n", "t=0 0\r\n" + mikey) + mikey
    step, _, _ = call(c, offer)
    (invite,) = requests(step, "INVITE")
    assert b"key-mgmt" not in bytes(invite)
    # The bytes of what is sent (keys of the leg it goes to) stay out of reprs.
    out = Outgoing(invite, bytes(invite), None)
    assert b"inline:" in out.data and "inline:" not in repr(out)
