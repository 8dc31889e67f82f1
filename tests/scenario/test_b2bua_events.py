"""More flows through the real SBC, driven by SIPp: subscriptions (SUBSCRIBE/NOTIFY,
message waiting), PUBLISH (presence), OPTIONS answered locally or relayed per
realm, re-INVITE glare (491 and the back-off) with a MESSAGE in the dialog, the
CANCEL/200 race, and 3xx followed or relayed per route.

One `sbc run` serves them all; each flow calls its own number so that its CDR can
be found. Every SIPp side records what it sent and received; each test checks
what crossed the SBC, what did not, and that neither side saw the other's Call-ID,
tags, branches, SIP or media ports (``assert_hidden``).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.scenario.sbcproc import SbcProcess
from tests.scenario.test_b2bua_flows import (
    SIPP,
    Sipp,
    assert_hidden,
    call_through_core,
    explain,
    finals,
    first,
    read_cdrs,
    realm_yaml,
    start_sbc,
    start_sipp,
    starts,
    udp_port,
    user_of,
    wait_for_calls,
)
from tests.scenario.test_b2bua_sipp import SippRun, _messages, header, tag_of

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) not installed")


@dataclass
class EventLab:
    sbc: SbcProcess
    workdir: Path
    #: The SBC's UDP port of each realm: "outside" answers OPTIONS itself,
    #: "relaying" routes them like calls.
    realm: dict[str, int]
    #: The SIPp UAS of every route but "target".
    uas: int
    #: The SIPp UAS of route "target" (user 4002), where redirects point.
    target: int
    #: The CDR each flow so far must have left, by callee user: (disposition,
    #: final status, side that hung up).
    cdrs: dict[str, tuple[str, int, str | None]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EventLab]:
    workdir = tmp_path_factory.mktemp("events")
    realm = {name: udp_port() for name in ("outside", "relaying", "inside")}
    uas, target = udp_port(), udp_port()
    peer = "action: trunk, realm: inside, host: 127.0.0.1"
    body = (
        "realms:\n"
        + realm_yaml("outside", realm["outside"])
        + realm_yaml("relaying", realm["relaying"], "    options: relay\n")
        + realm_yaml("inside", realm["inside"])
        + "routes:\n"
        + f"  - {{name: following, user_prefix: '4003', {peer}, port: {uas},"
        " follow_redirects: true}\n"
        + f"  - {{name: target, user_prefix: '4002', {peer}, port: {target}}}\n"
        + f"  - {{name: to-uas, {peer}, port: {uas}}}\n"
    )
    sbc = start_sbc(workdir, body)
    try:
        yield EventLab(sbc, workdir, realm, uas, target)
    finally:
        sbc.stop()


def run_pair(
    lab: EventLab,
    name: str,
    uac: str,
    uas: str,
    service: str,
    *,
    realm: str = "outside",
    uas_calls: int = 1,
) -> tuple[SippRun, SippRun, Sipp, Sipp]:
    """``uac`` entering ``realm`` calls ``service`` at the SIPp UAS ``uas`` (which
    takes ``uas_calls`` SIPp calls); both must end well."""
    callee_sipp = start_sipp(lab.workdir, f"uas-{name}", uas, port=lab.uas, calls=uas_calls)
    time.sleep(0.1)  # SIPp binds its port
    caller_sipp = start_sipp(
        lab.workdir, f"uac-{name}", uac, remote=lab.realm[realm], service=service
    )
    caller, callee = caller_sipp.finish(), callee_sipp.finish()
    assert caller.returncode == 0, explain(lab.sbc, caller, callee)
    assert callee.returncode == 0, explain(lab.sbc, caller, callee)
    return caller, callee, caller_sipp, callee_sipp


# -- subscriptions -------------------------------------------------------------------------


def test_message_waiting_subscription_and_its_notifies(lab: EventLab) -> None:
    caller, callee, caller_sipp, callee_sipp = run_pair(
        lab, "mwi", "flow_uac_subscribe.xml", "flow_uas_subscribe.xml", "3001"
    )
    subscribe = first(callee, "<SUBSCRIBE")
    assert subscribe.startswith(f"<SUBSCRIBE sip:3001@127.0.0.1:{lab.uas} SIP/2.0")
    # The event package crosses (RFC 6665 7.2); the caller's User-Agent does not.
    assert header(subscribe, "Event") == ["message-summary"]
    assert header(subscribe, "Expires") == ["600"]
    assert "sipp-flows" not in subscribe
    # The first NOTIFY reaches the subscriber in the dialog of its SUBSCRIBE, body
    # and subscription state intact.
    notifies = [m for m in caller.received if m.startswith("<NOTIFY")]
    assert len(notifies) == 2, starts(caller)
    active, terminated = notifies
    assert header(active, "Event") == ["message-summary"]
    assert header(active, "Subscription-State")[0].startswith("active")
    assert header(active, "Content-Type") == ["application/simple-message-summary"]
    assert "Messages-Waiting: yes" in active and "Voice-Message: 2/8 (0/2)" in active
    subscriber_tag = tag_of(header(first(caller, ">SUBSCRIBE"), "From")[0])
    assert subscriber_tag and tag_of(header(active, "To")[0]) == subscriber_tag
    assert header(active, "Call-ID") == header(first(caller, ">SUBSCRIBE"), "Call-ID")
    # The unsubscribe went through the dialog, and the last NOTIFY ended it.
    unsubscribe = [m for m in callee.received if m.startswith("<SUBSCRIBE")][1]
    assert header(unsubscribe, "Expires") == ["0"]
    assert header(unsubscribe, "Call-ID") == header(subscribe, "Call-ID")
    assert header(terminated, "Subscription-State")[0].startswith("terminated")
    assert [int(s.split()[1]) for s in starts(caller) if s.startswith("<SIP/2.0")] == [200, 200]
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    assert wait_for_calls(lab.sbc, 0), lab.sbc.log()[-3000:]


# -- PUBLISH -------------------------------------------------------------------------------


def test_presence_publish_refresh_and_removal(lab: EventLab) -> None:
    caller, callee, caller_sipp, callee_sipp = run_pair(
        lab, "pub", "flow_uac_publish.xml", "flow_uas_publish.xml", "3002", uas_calls=3
    )
    publishes = [m for m in callee.received if m.startswith("<PUBLISH")]
    assert len(publishes) == 3, starts(callee)
    initial, refresh, removal = publishes
    assert initial.startswith(f"<PUBLISH sip:3002@127.0.0.1:{lab.uas} SIP/2.0")
    assert header(initial, "Event") == ["presence"]
    assert header(initial, "Content-Type") == ["application/pidf+xml"]
    assert "<basic>open</basic>" in initial and "on the phone" in initial
    assert "sipp-flows" not in initial
    # The entity tags the server gave come back to the publisher, and the tag it
    # names in SIP-If-Match reaches the server (RFC 3903 4, 11).
    etags = [header(m, "SIP-ETag") for m in caller.received if m.startswith("<SIP/2.0 200")]
    assert etags == [["etag-1"], ["etag-2"], ["etag-3"]], etags
    assert header(refresh, "SIP-If-Match") == ["etag-1"]
    assert header(removal, "SIP-If-Match") == ["etag-2"]
    assert header(refresh, "Expires") == ["3600"] and header(removal, "Expires") == ["0"]
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    assert wait_for_calls(lab.sbc, 0), lab.sbc.log()[-3000:]


# -- OPTIONS -------------------------------------------------------------------------------


def test_options_answered_by_the_sbc_by_default(lab: EventLab) -> None:
    # Nothing may reach the far end: a plain socket on its port listens.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as far_end:
        far_end.bind(("127.0.0.1", lab.uas))
        far_end.settimeout(0.5)
        caller = start_sipp(
            lab.workdir, "uac-opt-local", "flow_uac_options.xml",
            remote=lab.realm["outside"], service="3003",
        ).finish()  # fmt: skip
        assert caller.returncode == 0, explain(lab.sbc, caller)
        with pytest.raises(TimeoutError):
            far_end.recv(65535)
    answer = first(caller, "<SIP/2.0 200")
    assert "far-end-pbx" not in answer
    allow = ",".join(header(answer, "Allow"))
    assert "INVITE" in allow and "X-FAR-END" not in allow


def test_options_relayed_where_the_realm_says_so(lab: EventLab) -> None:
    caller, callee, caller_sipp, callee_sipp = run_pair(
        lab, "opt-relay", "flow_uac_options.xml", "flow_uas_options.xml", "3004",
        realm="relaying",
    )  # fmt: skip
    options = first(callee, "<OPTIONS")
    assert options.startswith(f"<OPTIONS sip:3004@127.0.0.1:{lab.uas} SIP/2.0")
    assert f"Via: SIP/2.0/UDP 127.0.0.1:{lab.realm['inside']};" in options
    # The far end's answer, not the SBC's: its capabilities reach the caller.
    answer = first(caller, "<SIP/2.0 200")
    assert "X-FAR-END" in ",".join(header(answer, "Allow")), answer
    assert_hidden(caller, callee, caller_sipp, callee_sipp)


# -- glare ---------------------------------------------------------------------------------


def test_reinvite_glare_gets_491_then_the_retry_succeeds(lab: EventLab) -> None:
    caller, callee, caller_sipp, callee_sipp = run_pair(
        lab, "glare", "flow_uac_glare.xml", "flow_uas_glare.xml", "3005"
    )
    # The callee's re-INVITE met the SBC's own pending one on that leg: 491 from
    # the SBC (RFC 3261 14.2), and it never reached the caller.
    assert "<SIP/2.0 491" in "\n".join(starts(callee)), starts(callee)
    assert [s for s in starts(caller) if s.startswith("<INVITE")] == []
    assert "PCMA" not in "\n".join(caller.received)
    # The callee's 491 to the caller's re-INVITE came back to the caller, which
    # waited and tried again: the retry got through, answered with the relay's SDP.
    invites = [m for m in callee.received if m.startswith("<INVITE")]
    assert len(invites) == 3, starts(callee)
    assert all("a=sendonly" in m for m in invites[1:])
    caller_finals = [
        (int(m.split()[1]), header(m, "CSeq")[0])
        for m in caller.received
        if m.startswith("<SIP/2.0 ") and int(m.split()[1]) >= 200
    ]
    assert caller_finals == [
        (200, "1 INVITE"), (491, "2 INVITE"), (200, "3 INVITE"), (200, "4 MESSAGE"),
        (200, "5 BYE"),
    ], caller_finals  # fmt: skip
    retry_answer = [m for m in caller.received if "CSeq: 3 INVITE" in m][-1]
    assert "a=recvonly" in retry_answer
    assert re.search(r"(?m)^c=IN IP4 127\.0\.0\.1\s*$", retry_answer)
    # The MESSAGE went through the dialog, its body intact.
    message = first(callee, "<MESSAGE")
    assert "on hold, back soon" in message
    assert header(message, "Call-ID") == header(invites[0], "Call-ID")
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    assert wait_for_calls(lab.sbc, 0), lab.sbc.log()[-3000:]
    lab.cdrs["3005"] = ("answered", 200, "caller")


# -- the CANCEL/200 race -------------------------------------------------------------------


def test_answer_crossing_the_cancel_is_acked_and_hung_up(lab: EventLab) -> None:
    caller, callee, caller_sipp, callee_sipp = run_pair(
        lab, "race", "uac_cancel.xml", "flow_uas_cancel_race.xml", "3006"
    )
    # The caller's CANCEL won: 200 to it and 487 to the INVITE, never the 200.
    assert finals(caller) == [200, 487], starts(caller)
    # The callee's 2xx was ACKed, then its dialog ended with a BYE from the SBC.
    got = [s.split()[0] for s in starts(callee) if s.startswith("<")]
    assert got == ["<INVITE", "<CANCEL", "<ACK", "<BYE"], starts(callee)
    ack, bye = first(callee, "<ACK"), first(callee, "<BYE")
    callee_tag = tag_of(header(first(callee, ">SIP/2.0 200"), "To")[0])
    assert callee_tag and tag_of(header(ack, "To")[0]) == callee_tag
    assert tag_of(header(bye, "To")[0]) == callee_tag
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    assert wait_for_calls(lab.sbc, 0), lab.sbc.log()[-3000:]
    lab.cdrs["3006"] = ("cancelled", 487, None)


# -- 3xx -----------------------------------------------------------------------------------


def redirected_call(
    lab: EventLab, name: str, uac: str, service: str, *extra: str
) -> tuple[SippRun, SippRun, SippRun, Sipp, Sipp, Sipp]:
    """``uac`` calls ``service`` routed to a redirect server whose 302 names user 4002
    at ``lab.target``, where a SIPp UAS answers: caller, redirector and target runs,
    then their SIPps."""
    redirector = start_sipp(
        lab.workdir, f"uas-{name}", "flow_uas_redirect.xml", port=lab.uas,
        extra=("-key", "target_port", str(lab.target)),
    )  # fmt: skip
    target_sipp = start_sipp(lab.workdir, f"uas-{name}-target", "uas_basic.xml", port=lab.target)
    time.sleep(0.1)
    caller_sipp = start_sipp(
        lab.workdir, f"uac-{name}", uac, remote=lab.realm["outside"], service=service,
        extra=extra,
    )  # fmt: skip
    caller, moved, target = caller_sipp.finish(), redirector.finish(), target_sipp.finish()
    for run in (caller, moved, target):
        assert run.returncode == 0, explain(lab.sbc, caller, moved, target)
    return caller, moved, target, caller_sipp, redirector, target_sipp


def test_a_3xx_is_followed_where_the_route_says_so(lab: EventLab) -> None:
    caller, moved, target, caller_sipp, redirector, target_sipp = redirected_call(
        lab, "3xx-follow", "flow_uac_call.xml", "4003", "-d", "200"
    )
    # The SBC took the 302 itself and called its Contact: the caller saw none of it.
    assert first(moved, "<INVITE").startswith(f"<INVITE sip:4003@127.0.0.1:{lab.uas} ")
    assert first(target, "<INVITE").startswith(f"<INVITE sip:4002@127.0.0.1:{lab.target} ")
    assert finals(caller) == [200, 200], starts(caller)
    assert_hidden(caller, target, caller_sipp, target_sipp)
    assert_hidden(caller, moved, caller_sipp, redirector)
    assert wait_for_calls(lab.sbc, 0), lab.sbc.log()[-3000:]
    lab.cdrs["4003"] = ("answered", 200, "caller")


def test_a_3xx_is_relayed_pointing_at_the_sbc(lab: EventLab) -> None:
    caller, moved, target, caller_sipp, redirector, target_sipp = redirected_call(
        lab, "3xx-relay", "flow_uac_redirected.xml", "4001"
    )
    # The caller got the 302 with the SBC's own address in its realm and the user
    # the callee named; its new INVITE there was routed to that user.
    redirect = first(caller, "<SIP/2.0 302")
    assert header(redirect, "Contact") == [f"<sip:4002@127.0.0.1:{lab.realm['outside']}>"]
    assert first(target, "<INVITE").startswith(f"<INVITE sip:4002@127.0.0.1:{lab.target} ")
    assert finals(caller) == [302, 200, 200], starts(caller)
    assert_hidden(caller, target, caller_sipp, target_sipp)
    assert_hidden(caller, moved, caller_sipp, redirector)
    assert wait_for_calls(lab.sbc, 0), lab.sbc.log()[-3000:]
    lab.cdrs["4001"] = ("rejected", 302, None)  # docs/cdr.md: a 3xx is "rejected"
    lab.cdrs["4002"] = ("answered", 200, "caller")


# -- host masking --------------------------------------------------------------------------


def test_masked_hosts_in_the_requests_into_a_realm(tmp_path: Path) -> None:
    """A realm with from_host, to_host and request_uri_host: the callee sees those names
    in From, To and Request-URI (in the dialog too), the INVITE still reaches it."""
    done = call_through_core(
        tmp_path,
        "    from_host: sbc.example.net\n"
        "    to_host: carrier.example\n"
        "    request_uri_host: carrier.example\n",
    )
    invite, bye = done.invite, first(done.callee, "<BYE")
    assert invite.startswith("<INVITE sip:+4930123456@carrier.example SIP/2.0")
    for message in (invite, bye):
        assert re.search(r"<sip:alice@sbc\.example\.net>;tag=", header(message, "From")[0])
        assert re.match(r"<sip:\+4930123456@carrier\.example>", header(message, "To")[0])


# -- CDRs ----------------------------------------------------------------------------------


# -- late offer ---------------------------------------------------------------------------


def sdp_of(message: str) -> str:
    """The body of a message as SIPp logged it."""
    return message.split("\n\n", 1)[1] if "\n\n" in message else ""


def test_late_offer_call_and_offerless_re_invite(lab: EventLab) -> None:
    caller, callee, caller_sipp, callee_sipp = run_pair(
        lab, "late", "flow_uac_late.xml", "flow_uas_late.xml", "3007"
    )
    # The callee's INVITE and re-INVITE come without SDP, as the caller sent them.
    invites = [m for m in callee.received if m.startswith("<INVITE")]
    assert len(invites) == 2, starts(callee)
    assert all("m=audio" not in sdp_of(m) for m in invites)
    # Its offer reaches the caller in each 200, on the relay's address and port.
    offers = [m for m in caller.received if m.startswith("<SIP/2.0 200") and "INVITE" in m]
    assert len(offers) == 2, starts(caller)
    for offer in offers:
        assert re.search(r"(?m)^m=audio \d+ RTP/AVP 0 8", sdp_of(offer)), offer
        assert f"m=audio {callee_sipp.media} " not in offer
    # The caller's answers, from its ACKs, reach the callee in the SBC's ACKs.
    acks = [m for m in callee.received if m.startswith("<ACK")]
    assert len(acks) == 2, starts(callee)
    for ack in acks:
        assert header(ack, "Content-Type") == ["application/sdp"], ack
        assert re.search(r"(?m)^m=audio \d+ RTP/AVP 0", sdp_of(ack)), ack
        assert f"m=audio {caller_sipp.media} " not in ack
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    assert wait_for_calls(lab.sbc, 0), lab.sbc.log()[-3000:]
    lab.cdrs["3007"] = ("answered", 200, "caller")


# -- attended transfer ----------------------------------------------------------------------


def answered(sipp: Sipp, wait: float = 5.0) -> str:
    """The 200 a running SIPp caller received, from its message trace."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        found = [m for m in _messages(sipp.trace) if m.startswith("<SIP/2.0 200")]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("no 200 in " + str(sipp.trace))


def test_replaces_names_the_far_leg_of_the_call_it_replaces(lab: EventLab) -> None:
    """The last step of an attended transfer: an INVITE with Replaces naming the
    caller's dialog with the SBC reaches the callee naming the callee's own
    dialog of that call (RFC 3891)."""
    callee_sipp = start_sipp(lab.workdir, "uas-replaces", "uas_basic.xml", port=lab.uas, calls=2)
    time.sleep(0.1)
    held_sipp = start_sipp(
        lab.workdir, "uac-replaced", "flow_uac_call.xml", remote=lab.realm["outside"],
        service="3008", extra=("-d", "2000"),
    )  # fmt: skip
    ok = answered(held_sipp)
    replaces = (
        f"{header(ok, 'Call-ID')[0]};to-tag={tag_of(header(ok, 'To')[0])}"
        f";from-tag={tag_of(header(ok, 'From')[0])}"
    )
    caller_sipp = start_sipp(
        lab.workdir, "uac-replaces", "flow_uac_replaces.xml", remote=lab.realm["outside"],
        service="3009", extra=("-key", "replaces", replaces, "-d", "200"),
    )  # fmt: skip
    caller, held, callee = caller_sipp.finish(), held_sipp.finish(), callee_sipp.finish()
    for run in (caller, held, callee):
        assert run.returncode == 0, explain(lab.sbc, caller, held, callee)
    first_invite, second_invite = [m for m in callee.received if m.startswith("<INVITE")]
    call_id = header(first_invite, "Call-ID")[0]
    callee_tag = next(
        tag_of(header(m, "To")[0])
        for m in callee.messages
        if m.startswith(">SIP/2.0 200") and header(m, "Call-ID") == [call_id]
    )
    sbc_tag = tag_of(header(first_invite, "From")[0])
    assert header(second_invite, "Replaces") == [
        f"{call_id};to-tag={callee_tag};from-tag={sbc_tag}"
    ]
    assert header(ok, "Call-ID")[0] not in "\n".join(callee.received)
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    assert wait_for_calls(lab.sbc, 0), lab.sbc.log()[-3000:]
    lab.cdrs["3008"] = ("answered", 200, "caller")
    lab.cdrs["3009"] = ("answered", 200, "caller")


def test_cdrs_of_these_flows(lab: EventLab) -> None:
    """A record per call attempt; none for subscriptions and PUBLISH or OPTIONS
    transactions (docs/cdr.md). Runs last here: it checks what the flows before it
    left."""
    assert lab.sbc.stop() == 0  # SIGTERM: a clean stop writes every queued CDR
    try:
        rows = read_cdrs(lab.workdir / "state" / "cdr.sqlite")
    finally:
        lab.sbc.start()
    found = {
        user_of(r["callee"]): (r["disposition"], r["final_status"], r["hangup_side"]) for r in rows
    }
    assert len(found) == len(rows), [dict(r) for r in rows]
    assert found == lab.cdrs, [dict(r) for r in rows]
