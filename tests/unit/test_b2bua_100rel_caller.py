"""Reliable provisionals towards a caller that requires them (RFC 3262 3).

Carriers that require 100rel (IMS networks, many trunks) got 420 Bad Extension
before: the B2BUA PRACKed the callee's reliable provisionals but answered the caller
only unreliably. Now a caller's ``Require: 100rel`` makes every provisional but 100
reliable on the A leg: ``Require: 100rel`` and an RSeq, retransmitted from T1,
doubling, until the caller's PRACK; one at a time; a 2xx waits for the PRACK of a
provisional that carried SDP; no PRACK in 64*T1 refuses the call with 500.
"""

from __future__ import annotations

from sbc.sip.message import Request, Response
from tests.unit.test_controller_fuzz import (
    A_CONTACT,
    ANSWER,
    B_CONTACT,
    CALLER,
    OFFER,
    TRUNK,
    Message,
    Run,
    answer,
    assert_nothing_left,
    controller,
    from_a,
    latest,
    next_deadline,
    sdp,
)
from tests.unit.test_controller_fuzz import from_b as request_from_b

T1 = 0.5


def call(*, require: bool = True, allow_update: bool = False) -> Run:
    run = Run(controller())
    invite = from_a("INVITE", 1, "inv1", run, OFFER)
    if require:
        invite.headers.append(("Require", "100rel"))
    if allow_update:
        invite.headers.append(("Allow", "INVITE, ACK, BYE, CANCEL, PRACK, UPDATE"))
    run.feed(invite, CALLER, None)
    return run


def from_b(run: Run, status: int, body: str = "", reliable: int | None = None) -> None:
    invite = latest(run.to_b, "INVITE")
    assert invite is not None
    message = answer(invite, status, "bobtag", B_CONTACT, body)
    if reliable is not None:
        message.headers += [("Require", "100rel"), ("RSeq", str(reliable))]
    run.feed(message, TRUNK, None)


def prack(run: Run, response: Response, cseq: int = 2) -> list[Response]:
    message = from_a("PRACK", cseq, f"prack{cseq}", run)
    message.headers.append(("RAck", f"{response.headers.get('RSeq')} 1 INVITE"))
    return fed(run, message)


def fed(run: Run, message: Message) -> list[Response]:
    before = len(run.responses_to_a)
    run.feed(message, CALLER, None)
    return run.responses_to_a[before:]


def provisionals(run: Run) -> list[Response]:
    return [r for r in run.responses_to_a if 100 < r.status < 200]


def until(run: Run, when: float) -> None:
    """Run every timer due up to ``when``, as SbcNode would."""
    c = run.controller
    while (deadline := next_deadline(c)) is not None and deadline <= when:
        run.now = max(run.now, deadline)
        step = c.handle_timers(run.now)
        run.absorb(step + c.handle(c.transactions.handle_timers(run.now), run.now))
    run.now = max(run.now, when)


def test_a_caller_requiring_100rel_gets_reliable_provisionals_retransmitted_until_prack() -> None:
    run = call()
    from_b(run, 183, ANSWER, reliable=1)
    (p183,) = provisionals(run)
    assert p183.tokens("Require") == ("100rel",)
    rseq = int(p183.headers.get("RSeq") or "0")
    assert 1 <= rseq < 2**31
    assert b"m=audio" in p183.body
    start = run.now
    until(run, start + T1 + 0.01)
    until(run, start + 3 * T1 + 0.01)
    assert [r.status for r in provisionals(run)] == [183, 183, 183]  # at T1, then 2*T1
    (ok,) = prack(run, p183)
    assert (ok.status, ok.cseq.method) == (200, "PRACK")
    until(run, start + 30)
    assert len(provisionals(run)) == 3  # no more once PRACKed
    # The callee's PRACK is the B2BUA's own: the caller's is not relayed.
    assert {r.cseq.seq for r in run.to_b["PRACK"]} == {run.to_b["PRACK"][0].cseq.seq}


def test_a_prack_for_no_outstanding_provisional_gets_481() -> None:
    run = call()
    from_b(run, 180)
    (ringing,) = provisionals(run)
    wrong = from_a("PRACK", 2, "prack2", run)
    wrong.headers.append(("RAck", f"{int(ringing.headers.get('RSeq') or 0) + 1} 1 INVITE"))
    assert [r.status for r in fed(run, wrong)] == [481]
    assert [r.status for r in prack(run, ringing, cseq=3)] == [200]
    assert [r.status for r in prack(run, ringing, cseq=4)] == [481]  # already PRACKed


def test_provisionals_go_one_at_a_time_rseq_by_one() -> None:
    run = call()
    from_b(run, 180)
    from_b(run, 183, ANSWER, reliable=1)
    (first,) = provisionals(run)  # the 183 waits for the 180's PRACK
    assert first.status == 180
    prack(run, first)
    second = provisionals(run)[-1]
    assert second.status == 183
    assert int(second.headers.get("RSeq") or 0) == int(first.headers.get("RSeq") or 0) + 1


def test_a_2xx_waits_for_the_prack_of_a_provisional_with_sdp() -> None:
    run = call()
    from_b(run, 183, ANSWER, reliable=1)
    (p183,) = provisionals(run)
    from_b(run, 200, ANSWER)
    assert not [r for r in run.responses_to_a if r.status == 200]
    until(run, run.now + 2 * T1 + 0.01)  # the 2xx's own retransmission holds off too
    assert not [r for r in run.responses_to_a if r.status == 200]
    answered = prack(run, p183)
    assert [(r.status, r.cseq.method) for r in answered] == [(200, "PRACK"), (200, "INVITE")]


def test_a_2xx_after_a_provisional_without_sdp_goes_at_once() -> None:
    run = call()
    from_b(run, 180)
    from_b(run, 200, ANSWER)
    assert [(r.status, r.cseq.method) for r in run.responses_to_a[-1:]] == [(200, "INVITE")]


def test_a_rejection_goes_at_once_and_ends_the_retransmissions() -> None:
    run = call()
    from_b(run, 180)
    from_b(run, 486)
    assert [r.status for r in run.responses_to_a if r.status >= 200] == [486]
    until(run, run.now + 40)
    assert [r.status for r in provisionals(run)] == [180]


def test_no_prack_in_64_t1_refuses_the_call_with_500() -> None:
    run = call()
    from_b(run, 180)
    until(run, run.now + 64 * T1 + 1)
    # (The 500 is retransmitted until the caller's ACK, which this one never sends.)
    assert {r.status for r in run.responses_to_a if r.status >= 200} == {500}
    assert len(provisionals(run)) == 7  # sent, then at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s
    cancel = latest(run.to_b, "CANCEL")
    assert isinstance(cancel, Request) and cancel.cseq.seq == 1
    assert len(run.controller) == 0


def test_a_caller_that_only_supports_100rel_gets_them_unreliably() -> None:
    run = call(require=False)  # its INVITE says Supported: timer, 100rel
    from_b(run, 183, ANSWER, reliable=1)
    (p183,) = provisionals(run)
    assert p183.headers.get("RSeq") is None and "100rel" not in p183.tokens("Require")


def test_a_cancel_while_the_2xx_waits_for_the_prack_ends_the_call() -> None:
    run = call()
    from_b(run, 183, ANSWER, reliable=1)
    from_b(run, 200, ANSWER)  # held: the 183 carried SDP and is not PRACKed
    cancel = from_a("CANCEL", 1, "inv1", run)
    answered = fed(run, cancel)
    assert sorted((r.status, r.cseq.method) for r in answered) == [
        (200, "CANCEL"),
        (487, "INVITE"),
    ]
    assert [r.method for r in run.to_b.get("BYE", [])][:1] == ["BYE"]
    assert_nothing_left(run)


def test_a_prack_after_the_final_answer_is_still_answered_200() -> None:
    # RFC 3262 3: a UAS that sends a final response with reliable provisionals
    # outstanding stops retransmitting them, but still processes their PRACKs.
    run = call()
    from_b(run, 180)
    (ringing,) = provisionals(run)
    from_b(run, 200, ANSWER)  # the 180 had no SDP: the 2xx goes at once
    assert [(r.status, r.cseq.method) for r in prack(run, ringing)] == [(200, "PRACK")]
    until(run, run.now + 10)
    assert len(provisionals(run)) == 1  # never retransmitted after the 2xx


def test_a_late_offer_caller_gets_no_sdp_in_reliable_provisionals() -> None:
    # No offer in the INVITE: SDP in a reliable provisional would be the offer, and
    # the caller's PRACK would carry its answer; but the callee (asked without
    # 100rel) makes its offer in the 2xx, and wants the answer in the ACK. So the
    # caller's reliable provisionals go without the callee's early SDP, and the
    # offer/answer is the 2xx's and the ACK's, as on the B leg.
    run = Run(controller())
    invite = from_a("INVITE", 1, "inv1", run)
    invite.headers.append(("Require", "100rel"))
    run.feed(invite, CALLER, None)
    b_invite = latest(run.to_b, "INVITE")
    assert isinstance(b_invite, Request) and not b_invite.body
    assert "100rel" not in b_invite.tokens("Supported")
    from_b(run, 183, ANSWER)  # an early-media preview of the callee's offer
    (p183,) = provisionals(run)
    assert p183.headers.get("RSeq") is not None and p183.body == b""
    assert [(r.status, r.cseq.method) for r in prack(run, p183)] == [(200, "PRACK")]
    from_b(run, 200, ANSWER)
    (ok,) = [r for r in run.responses_to_a if r.status == 200 and r.cseq.method == "INVITE"]
    assert ok.body  # the offer
    run.feed(from_a("ACK", 1, "ack1", run, OFFER), CALLER, None)
    ack = latest(run.to_b, "ACK")
    assert isinstance(ack, Request) and ack.body  # the answer


B_EARLY_OFFER = sdp("b", "203.0.113.5", 42000, "a=sendonly\r\n")


def early_update_from_b(run: Run) -> list[Response]:
    """The callee's UPDATE with a new offer in the early dialog: its answers."""
    update = request_from_b("UPDATE", 2, run)
    assert update is not None
    update.headers.append(("Content-Type", "application/sdp"))
    update.body = B_EARLY_OFFER
    before = len(run.responses_to_b)
    run.feed(update, TRUNK, None)
    return [r for r in run.responses_to_b[before:] if r.cseq.method == "UPDATE"]


def test_an_early_offer_of_the_callee_reaches_a_caller_that_pracked_the_answer() -> None:
    # RFC 3311 5.1: the caller's offer was answered in a reliable 183 it PRACKed, and
    # it allows UPDATE: the callee's early UPDATE goes to it (it got 500 before).
    run = call(allow_update=True)
    from_b(run, 183, ANSWER, reliable=1)
    (p183,) = provisionals(run)
    assert [r.status for r in prack(run, p183)] == [200]
    assert early_update_from_b(run) == []
    update = latest(run.to_a, "UPDATE")
    assert isinstance(update, Request) and update.body
    assert update.to.tag == "alicetag" and update.from_.tag == p183.to.tag
    assert b"203.0.113.5" not in update.body and b"a=sendonly" in update.body
    answer_text = sdp("a", "198.51.100.9", 40000, "a=recvonly\r\n")
    run.feed(answer(update, 200, "alicetag", A_CONTACT, answer_text), CALLER, None)
    (ok,) = [r for r in run.responses_to_b if r.cseq.method == "UPDATE"]
    assert ok.status == 200 and b"a=recvonly" in ok.body and b"198.51.100.9" not in ok.body
    # The call goes on: answered, ACKed, and the BYE after uses the next CSeq on A.
    from_b(run, 200, ANSWER)
    (ok,) = [r for r in run.responses_to_a if r.status == 200 and r.cseq.method == "INVITE"]
    run.feed(from_a("ACK", 1, "ack1", run), CALLER, None)
    bye = request_from_b("BYE", 3, run)
    assert bye is not None
    run.feed(bye, TRUNK, None)
    a_bye = latest(run.to_a, "BYE")
    assert isinstance(a_bye, Request) and a_bye.cseq.seq == update.cseq.seq + 1


def test_an_early_offer_of_the_callee_still_waits_without_a_reliable_answer() -> None:
    # A caller that did not PRACK an answer (or allows no UPDATE) cannot take an
    # offer before the 2xx: 500 with Retry-After, as before.
    for run in (call(require=False, allow_update=True), call(allow_update=False)):
        from_b(run, 183, ANSWER, reliable=1)
        (p183,) = provisionals(run)
        if p183.headers.get("RSeq"):
            assert [r.status for r in prack(run, p183)] == [200]
        (refused,) = early_update_from_b(run)
        assert refused.status == 500 and refused.headers.get("Retry-After") == "1"
        assert latest(run.to_a, "UPDATE") is None


def prack_with(run: Run, response: Response, body: str) -> list[Response]:
    message = from_a("PRACK", 2, "prack2", run, body)
    message.headers.append(("RAck", f"{response.headers.get('RSeq')} 1 INVITE"))
    return fed(run, message)


A_NEW_OFFER = sdp("a", "198.51.100.9", 40002, "a=sendonly\r\n")


def test_an_offer_in_a_prack_reaches_the_callee_in_an_update() -> None:
    # RFC 3262 5: its offer answered in the 183, the caller may make a new one in
    # the PRACK, whose 200 then carries the answer. It was ignored: a 200 without
    # an answer, and the callee never heard of the offer.
    run = call()
    from_b(run, 183, ANSWER, reliable=1)
    (p183,) = provisionals(run)
    assert prack_with(run, p183, A_NEW_OFFER) == []  # the 200 waits for the answer
    update = latest(run.to_b, "UPDATE")
    assert isinstance(update, Request) and b"a=sendonly" in update.body
    assert b"198.51.100.9" not in update.body and update.headers.get("RAck") is None
    until(run, run.now + 2)  # the 183 is not retransmitted: the PRACK acknowledged it
    assert len(provisionals(run)) == 1
    b_answer = sdp("b", "203.0.113.5", 42000, "a=recvonly\r\n")
    run.feed(answer(update, 200, "bobtag", B_CONTACT, b_answer), TRUNK, None)
    (ok,) = [r for r in run.responses_to_a if r.cseq.method == "PRACK"]
    assert ok.status == 200 and b"a=recvonly" in ok.body and b"203.0.113.5" not in ok.body
    from_b(run, 200, ANSWER)
    assert [r.status for r in run.responses_to_a if r.cseq.method == "INVITE"][-1] == 200


def test_a_prack_body_without_an_answered_offer_is_ignored() -> None:
    # A late offer's caller has made no offer the 183 could answer: its PRACK
    # cannot carry one (the 2xx brings the callee's offer). 200, nothing relayed.
    run = Run(controller())
    invite = from_a("INVITE", 1, "inv1", run)
    invite.headers.append(("Require", "100rel"))
    run.feed(invite, CALLER, None)
    from_b(run, 180)
    (ringing,) = provisionals(run)
    assert [r.status for r in prack_with(run, ringing, A_NEW_OFFER)] == [200]
    assert latest(run.to_b, "UPDATE") is None


def test_a_prack_that_requires_100rel_is_answered() -> None:
    # The in-dialog Require check (420 for what the B2BUA does not support) must not
    # refuse a PRACK that names the extension it belongs to.
    run = call()
    from_b(run, 180)
    (ringing,) = provisionals(run)
    message = from_a("PRACK", 2, "prack2", run)
    message.headers += [("RAck", f"{ringing.headers.get('RSeq')} 1 INVITE"), ("Require", "100rel")]
    assert [r.status for r in fed(run, message)] == [200]


B_RECVONLY = sdp("b", "203.0.113.5", 42000, "a=recvonly\r\n")


def held_2xx() -> tuple[Run, Response]:
    """A call whose callee sent a reliable 183 with SDP and then its 2xx, which waits
    for the caller's PRACK of that 183 (returned)."""
    run = call()
    from_b(run, 183, ANSWER, reliable=1)
    (p183,) = provisionals(run)
    from_b(run, 200, ANSWER)
    return run, p183


def answer_update(run: Run, status: int = 200) -> list[Response]:
    """The callee answers the UPDATE that carried the caller's PRACK offer: what
    the caller then got."""
    update = latest(run.to_b, "UPDATE")
    assert isinstance(update, Request)
    body = B_RECVONLY if status < 300 else ""
    return fed_from_b(run, answer(update, status, "bobtag", B_CONTACT, body))


def test_a_2xx_held_for_a_prack_with_an_offer_waits_for_that_offer_s_answer() -> None:
    # The callee answered before the caller's PRACK; the PRACK brings a new offer.
    # The caller must not see its INVITE answered while that offer is not: the 2xx
    # follows the PRACK's 200.
    run, p183 = held_2xx()  # the 183 carried SDP and is not PRACKed yet
    assert prack_with(run, p183, A_NEW_OFFER) == []
    answered = answer_update(run)
    assert [(r.status, r.cseq.method) for r in answered] == [(200, "PRACK"), (200, "INVITE")]


def test_a_2xx_held_for_a_prack_whose_offer_is_refused_still_goes() -> None:
    run, p183 = held_2xx()
    prack_with(run, p183, A_NEW_OFFER)
    answered = answer_update(run, 488)
    assert [(r.status, r.cseq.method) for r in answered] == [(488, "PRACK"), (200, "INVITE")]


def fed_from_b(run: Run, message: Message) -> list[Response]:
    before = len(run.responses_to_a)
    run.feed(message, TRUNK, None)
    return run.responses_to_a[before:]


def test_an_ack_before_the_held_2xx_left_is_not_taken_for_its_ack() -> None:
    # The fuzz test's find: an ACK arriving while the 2xx waited for a PRACK was
    # taken for that 2xx's ACK, so the call let go of the caller's INVITE
    # transaction once the callee's ended; the 2xx, sent when the PRACK's offer
    # got its answer (here Timer F's 408, 32 s later), then raised.
    run, p183 = held_2xx()
    run.feed(from_a("ACK", 1, "ack1", run), CALLER, None)
    assert prack_with(run, p183, A_NEW_OFFER) == []
    until(run, run.now + 40)
    final = [(r.status, r.cseq.method) for r in run.responses_to_a if r.status >= 200]
    assert final[:2] == [(408, "PRACK"), (200, "INVITE")]
    assert_nothing_left(run)


def test_a_2xx_crossing_the_answer_to_a_prack_s_offer_waits_for_it() -> None:
    # The PRACK (with an offer) reached the callee before its 2xx did, but the
    # callee's 2xx came back before its answer to the UPDATE: the caller is still
    # not to see its INVITE answered while its offer is open.
    run = call()
    from_b(run, 183, ANSWER, reliable=1)
    (p183,) = provisionals(run)
    assert prack_with(run, p183, A_NEW_OFFER) == []
    from_b(run, 200, ANSWER)
    assert not [r for r in run.responses_to_a if r.status >= 200]
    answered = answer_update(run)
    assert [(r.status, r.cseq.method) for r in answered] == [(200, "PRACK"), (200, "INVITE")]


def test_a_held_2xx_gives_the_caller_64_t1_to_ack_from_when_it_goes() -> None:
    # The caller PRACKs late (30 s, the 183 retransmitted meanwhile) with an offer,
    # answered at 31 s. The held 2xx then goes and is retransmitted until its ACK,
    # whose 32 s count from then: counted from the 2xx's arrival, the call ended
    # with no ACK a second after the 2xx left.
    run, p183 = held_2xx()
    start = run.now
    until(run, start + 30)
    assert prack_with(run, p183, A_NEW_OFFER) == []
    until(run, start + 31)
    answered = answer_update(run)
    assert [(r.status, r.cseq.method) for r in answered] == [(200, "PRACK"), (200, "INVITE")]
    until(run, start + 51)
    ok = [r for r in run.responses_to_a if r.status == 200 and r.cseq.method == "INVITE"]
    assert len(ok) > 3  # retransmitted: T1, 2*T1, 4*T1, then every T2
    assert run.to_b.get("BYE") is None
    run.feed(from_a("ACK", 1, "ack1", run), CALLER, None)
    until(run, start + 100)
    assert run.to_b.get("BYE") is None  # the call goes on
    (call_,) = run.controller.calls()
    assert call_.end_reason is None
    run.feed(from_a("BYE", 3, "bye3", run), CALLER, None)
    bye = latest(run.to_b, "BYE")
    assert isinstance(bye, Request)
    run.feed(answer(bye, 200, "bobtag", B_CONTACT), TRUNK, None)
    assert_nothing_left(run)


def test_a_held_2xx_goes_when_the_answer_to_a_prack_s_offer_is_unusable() -> None:
    # The UPDATE's 200 names another dialog: the PRACK gets 502, and the 2xx it held
    # still goes (it waited until the 2xx's own ACK time ran out).
    run, p183 = held_2xx()
    prack_with(run, p183, A_NEW_OFFER)
    update = latest(run.to_b, "UPDATE")
    assert isinstance(update, Request)
    wrong = answer(update, 200, "bobtag", B_CONTACT, B_RECVONLY)
    wrong.headers = [
        (n, "elsewhere@203.0.113.5" if n == "Call-ID" else v) for n, v in wrong.headers
    ]
    answered = fed_from_b(run, wrong)
    assert [(r.status, r.cseq.method) for r in answered] == [(502, "PRACK"), (200, "INVITE")]
