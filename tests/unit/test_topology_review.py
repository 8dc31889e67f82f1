"""What crosses from one leg to the other: a review for leaks of the other realm.

Each test names something a peer of one realm could learn of the other (addresses,
host names, Call-IDs, tags, keys) from what the B2BUA sends it: the SDP rewrite, the
keep-list copy, and the messages the controller builds per leg. ``INSIDE_HOST`` and
the 10.x addresses stand for the inside; none of them may reach the caller.
"""

from __future__ import annotations

from sbc.b2bua.call import CallLeg
from sbc.b2bua.controller import CallController, RealmPolicy
from sbc.b2bua.local import LocalResponder
from sbc.b2bua.realm import Realm, RealmTable
from sbc.b2bua.routing import RouteAction, Router, RouteRule
from sbc.b2bua.topology import copy_kept_headers, rewrite_sdp
from sbc.config.b2bua import DEFAULT_KEEP_HEADERS
from sbc.media.session import LegState, MediaSession, MediaStream, Side
from sbc.media.values import Endpoint
from sbc.sip.message import Headers, Request, Response
from sbc.sip.sdp import SessionDescription
from sbc.sip.transaction import TransactionLayer
from sbc.transport.base import Destination, Transport
from tests.unit.test_b2bua_flows import (
    ANSWER,
    CALLER,
    CORE,
    IN,
    NO_TIMERS,
    OUT,
    TRUNK,
    ack_from_a,
    answer,
    from_a,
    from_b,
    receive,
    requests,
    responses,
    start_call,
)

INSIDE_HOST = "pbx1.core.internal"
INSIDE_ADDRESS = "10.0.0.5"

# -- the SDP rewrite -------------------------------------------------------------------

RELAY = MediaSession(
    "s",
    "c",
    (
        MediaStream(
            0,
            LegState("outside", Endpoint.of("198.51.100.1", 20000)),
            LegState("inside", Endpoint.of("203.0.113.1", 21000)),
        ),
    ),
    0.0,
)

A_LEG = CallLeg(
    "outside",
    "a-call",
    "a-tag",
    OUT,
    Destination(Transport.UDP, "198.51.100.9", 5060),
    sdp_session="1234",
)


def rewritten(session_lines: str, media_lines: str = "") -> str:
    """The inside's SDP (with ``session_lines`` and ``media_lines`` added) as the
    caller gets it."""
    offer = (
        f"v=0\r\no={INSIDE_HOST} 99 77 IN IP4 {INSIDE_ADDRESS}\r\ns=-\r\n"
        f"c=IN IP4 {INSIDE_ADDRESS}\r\nt=0 0\r\n{session_lines}"
        f"m=audio 42000 RTP/AVP 0\r\n{media_lines}"
    )
    body, _ = rewrite_sdp(SessionDescription.parse(offer.encode()), RELAY, Side.A, A_LEG)
    return body.decode()


def test_the_other_side_s_origin_and_free_text_do_not_cross() -> None:
    text = rewritten(
        f"i=media of {INSIDE_HOST}\r\nu=http://{INSIDE_HOST}/\r\ne=root@{INSIDE_HOST}\r\n"
        "p=+1 555 0100\r\nk=clear:secret\r\nx=unknown line\r\n",
        f"i=leg of {INSIDE_HOST}\r\nk=prompt\r\n",
    )
    assert INSIDE_HOST not in text and INSIDE_ADDRESS not in text
    assert "secret" not in text and "555" not in text and "x=" not in text
    # RFC 3264 8: the leg's own o= numbering, not the other side's (99 77).
    assert "o=sbc 1234 1 IN IP4 198.51.100.1\r\n" in text


def test_the_other_side_s_media_identifiers_and_keys_do_not_cross() -> None:
    text = rewritten(
        "a=ice-ufrag:abcd\r\na=ice-pwd:secretsecretsecretsecret\r\n",
        f"a=rtcp:42001 IN IP4 {INSIDE_ADDRESS}\r\n"
        f"a=candidate:1 1 UDP 2130706431 {INSIDE_ADDRESS} 42000 typ host\r\n"
        f"a=remote-candidates:1 {INSIDE_ADDRESS} 42000\r\n"
        f"a=ssrc:1 cname:asterisk@{INSIDE_HOST}\r\na=msid:stream track\r\n"
        "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n"
        f"a=source-filter: incl IN IP4 * {INSIDE_ADDRESS}\r\n",
    )
    assert INSIDE_HOST not in text and INSIDE_ADDRESS not in text
    assert "inline:" not in text and "ice-" not in text
    assert "a=rtcp:20001 IN IP4 198.51.100.1\r\n" in text


def test_session_level_rtcp_address_does_not_cross() -> None:
    # RFC 3605 defines a=rtcp at media level; some endpoints put it at session level.
    text = rewritten(f"a=rtcp:42001 IN IP4 {INSIDE_ADDRESS}\r\n")
    assert INSIDE_ADDRESS not in text


def test_alternative_connection_addresses_do_not_cross() -> None:
    # RFC 6947 a=altc: the other side's addresses of each family.
    text = rewritten(f"a=altc:1 IP4 {INSIDE_ADDRESS} 42000\r\n", "a=altc:2 IP6 fd00::5 42000\r\n")
    assert INSIDE_ADDRESS not in text and "fd00::5" not in text and "altc" not in text


def test_capability_negotiation_does_not_carry_keys_or_addresses_across() -> None:
    # RFC 5939 a=acap carries any attribute (a=crypto with the other side's key, the
    # best-effort SRTP of 3.11); RFC 7006 a=ccap carries its connection addresses.
    text = rewritten(
        "a=csup:med-v0\r\n",
        "a=tcap:1 RTP/SAVP\r\n"
        "a=acap:1 crypto:1 AES_CM_128_HMAC_SHA1_80 inline:V0VDUkVUS0VZU0VDUkVUS0VZU0VDUkVUS0VZ\r\n"
        f"a=ccap:1 IN IP4 {INSIDE_ADDRESS}\r\na=pcfg:1 t=1 a=1\r\n",
    )
    assert "inline:" not in text and INSIDE_ADDRESS not in text
    for name in ("acap", "tcap", "ccap", "pcfg", "csup"):
        assert f"a={name}" not in text


def test_vendor_attributes_do_not_cross() -> None:
    # Experimental x- attributes are one vendor's words: what the relay cannot vouch
    # for (often NAT and relay addresses: a=X-nat, a=x-relay-addr).
    text = rewritten(f"a=X-relay-addr:{INSIDE_ADDRESS}\r\n", f"a=x-nat:{INSIDE_ADDRESS}\r\n")
    assert INSIDE_ADDRESS not in text and "x-" not in text.lower()


def test_codec_and_stream_attributes_still_cross() -> None:
    text = rewritten(
        "a=group:BUNDLE 0\r\n",
        "a=mid:0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=rtcp-fb:* nack\r\n"
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\na=sendonly\r\n",
    )
    for line in (
        "a=group:BUNDLE 0",
        "a=mid:0",
        "a=rtpmap:0 PCMU/8000",
        "a=ptime:20",
        "a=rtcp-fb:* nack",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "a=sendonly",
    ):
        assert f"{line}\r\n" in text


# -- the keep-list ---------------------------------------------------------------------

#: A realm with the keep-list of the default config.
DEFAULT_KEEPING = Realm.build("outside", [OUT], "198.51.100.1", DEFAULT_KEEP_HEADERS)


def copied(realm: Realm, *headers: tuple[str, str]) -> list[tuple[str, str]]:
    source = Response(180, None, Headers(list(headers)))
    target = Response(180, None, Headers())
    copy_kept_headers(source, target, realm)
    return list(target.headers)


def test_alert_info_naming_an_inside_host_does_not_cross() -> None:
    # Alert-Info is kept by default (distinctive ringing); its URL is the inside
    # server's, which the caller could not fetch anyway.
    out = copied(
        DEFAULT_KEEPING,
        ("Alert-Info", f"<http://{INSIDE_ADDRESS}/ring/{INSIDE_HOST}.wav>"),
        ("Alert-Info", f"<http://{INSIDE_HOST}/Bellcore-dr2>;info=alert-group"),
    )
    assert INSIDE_HOST not in str(out) and INSIDE_ADDRESS not in str(out)


def test_alert_info_hints_without_a_host_still_cross() -> None:
    # RFC 7462 URNs, and the loopback URLs PBXs send as ring-tone hints.
    urn = "<urn:alert:service:call-waiting>"
    loopback = "<http://127.0.0.1/Bellcore-dr2>"
    out = copied(DEFAULT_KEEPING, ("Alert-Info", urn), ("Alert-Info", loopback))
    assert out == [("Alert-Info", urn), ("Alert-Info", loopback)]
    # A list whose one element names a host keeps the others.
    out = copied(DEFAULT_KEEPING, ("Alert-Info", f"<http://{INSIDE_HOST}/a>, {urn}"))
    assert out == [("Alert-Info", urn)]
    # Not the grammar's, but what some phones send for intercom: no URI, no host.
    out = copied(DEFAULT_KEEPING, ("Alert-Info", "info=alert-autoanswer"))
    assert out == [("Alert-Info", "info=alert-autoanswer")]
    out = copied(DEFAULT_KEEPING, ("Alert-Info", f"info={INSIDE_HOST}:80"))
    assert out == []


def test_parameters_naming_an_inside_party_do_not_cross() -> None:
    # RFC 7463 shared line appearances: Call-Info's appearance-uri is a party's URI.
    out = copied(
        DEFAULT_KEEPING,
        (
            "Alert-Info",
            "<urn:alert:service:call-waiting>;appearance-index=2"
            f';appearance-uri="<sip:alice@{INSIDE_HOST}>";answer-after=0.5'
            f";server={INSIDE_HOST};m=BS",
        ),
        ("Alert-Info", f"<http://127.0.0.1/ring>;x={INSIDE_ADDRESS};info=alert-group"),
    )
    assert out == [
        ("Alert-Info", "<urn:alert:service:call-waiting>;appearance-index=2;answer-after=0.5;m=BS"),
        ("Alert-Info", "<http://127.0.0.1/ring>;info=alert-group"),
    ]


def test_uri_headers_kept_by_an_operator_do_not_name_inside_hosts() -> None:
    realm = Realm.build("outside", [OUT], "198.51.100.1", ["Call-Info", "Error-Info"])
    out = copied(
        realm,
        ("Call-Info", f"<sip:{INSIDE_ADDRESS}>;answer-after=0"),
        ("Error-Info", f"<sip:announcement@{INSIDE_HOST}>"),
        ("Call-Info", "<sip:127.0.0.1>;answer-after=0"),
    )
    assert out == [("Call-Info", "<sip:127.0.0.1>;answer-after=0")]


def test_warning_agent_is_a_pseudonym() -> None:
    # RFC 3261 20.43: warn-agent is the host of the server that added it, or a
    # pseudonym: the copy names nobody.
    realm = Realm.build("outside", [OUT], "198.51.100.1", ["Warning"])
    out = copied(
        realm,
        ("Warning", f'399 {INSIDE_HOST}:5060 "Codec mismatch", 307 {INSIDE_ADDRESS} "x"'),
    )
    assert out == [("Warning", '399 - "Codec mismatch", 307 - "x"')]


def test_dialog_references_of_the_other_leg_are_never_kept() -> None:
    # Target-Dialog (RFC 4538), Join (RFC 3911) and In-Reply-To (RFC 3261 20.21) name
    # the other leg's Call-IDs and tags: meaningless on this leg, and its identifiers.
    realm = Realm.build(
        "outside", [OUT], "198.51.100.1", ["Target-Dialog", "Join", "In-Reply-To", "Subject"]
    )
    call_id = f"abc@{INSIDE_ADDRESS}"
    out = copied(
        realm,
        ("Target-Dialog", f"{call_id};local-tag=x;remote-tag=y"),
        ("Join", f"{call_id};to-tag=x;from-tag=y"),
        ("In-Reply-To", call_id),
        ("Subject", "hi"),
    )
    assert out == [("Subject", "hi")]


# -- messages the controller builds per leg ----------------------------------------------


def keeping_controller(policies: dict[str, RealmPolicy] | None = None) -> CallController:
    """The flows' controller, its realms keeping what the default config keeps."""
    realms = RealmTable(
        [
            Realm.build("outside", [OUT], "198.51.100.1", DEFAULT_KEEP_HEADERS),
            Realm.build("inside", [IN], "203.0.113.1", DEFAULT_KEEP_HEADERS),
        ]
    )
    router = Router(
        [RouteRule("core", RouteAction.TRUNK, "outside", realm="inside", destination=CORE)]
    )
    return CallController(
        TransactionLayer(), realms, router, LocalResponder(), timers=NO_TIMERS, policies=policies
    )


def test_the_b_leg_invite_carries_nothing_of_the_caller() -> None:
    c = keeping_controller()
    extra = (
        "Alert-Info: <urn:alert:service:normal>\r\nUser-Agent: Softphone 1.2\r\n"
        "Organization: Alice Corp\r\nHistory-Info: <sip:x@198.51.100.9>;index=1\r\n"
        "Diversion: <sip:y@198.51.100.9>;reason=unconditional\r\n"
        "P-Preferred-Identity: <sip:alice@198.51.100.9>\r\n"
        "Remote-Party-ID: <sip:alice@198.51.100.9>;party=calling\r\n"
    )
    (invite,), _ = start_call(c, extra=extra)
    wire = bytes(invite)
    for secret in (b"198.51.100.9", b"secret-call", b"alicetag", b"z9hG4bKcaller1", b"Softphone"):
        assert secret not in wire
    assert invite.headers.get("Alert-Info") == "<urn:alert:service:normal>"
    assert invite.headers.get("Organization") is None


def test_the_answer_to_the_caller_carries_nothing_of_the_callee() -> None:
    c = keeping_controller()
    (invite,), _ = start_call(c)
    extra = (
        f'Server: Asterisk PBX 18.2\r\nWarning: 399 {INSIDE_HOST} "x"\r\n'
        f"Record-Route: <sip:{INSIDE_HOST};lr>\r\nOrganization: Core\r\n"
        f"P-Asserted-Identity: <sip:bob@{INSIDE_HOST}>\r\n"
        f"P-Charging-Vector: icid-value=1;icid-generated-at={INSIDE_ADDRESS}\r\n"
    )
    contact = f"sip:bob@{INSIDE_ADDRESS}:5070;maddr={INSIDE_ADDRESS};gr=urn:uuid:1"
    step = receive(c, answer(invite, 200, ANSWER, extra=extra, contact=contact), TRUNK, 0.1)
    (ok,) = responses(step)
    wire = bytes(ok)
    for secret in (
        INSIDE_HOST,
        INSIDE_ADDRESS,
        "203.0.113.5",
        invite.call_id,
        "bobtag",
        "Asterisk",
    ):
        assert secret.encode() not in wire


def test_a_challenge_of_the_inside_does_not_name_its_realm() -> None:
    c = keeping_controller()
    (invite,), _ = start_call(c)
    challenge = f'Proxy-Authenticate: Digest realm="{INSIDE_HOST}", nonce="n1"\r\n'
    step = receive(c, answer(invite, 407, extra=challenge), TRUNK, 0.1)
    # Not relayed (the caller could not answer it): refused, naming nothing inside.
    (out,) = [r for r in responses(step) if r.status >= 400]
    assert out.status == 403
    assert INSIDE_HOST.encode() not in bytes(out)


def test_redirect_contacts_keep_only_the_user() -> None:
    c = keeping_controller()
    (invite,), _ = start_call(c)
    uri = f"sip:carol@{INSIDE_HOST}:5070;maddr={INSIDE_ADDRESS};transport=tcp"
    params = f';+sip.instance="<urn:uuid:1>";pub-gruu="sip:g@{INSIDE_HOST}";q=0.5'
    text = answer(invite, 302, contact=uri).replace(f"<{uri}>", f"<{uri}>{params}", 1)
    step = receive(c, text, TRUNK, 0.1)
    (moved,) = [r for r in responses(step) if r.status == 302]
    assert moved.headers.fields("Contact") == ["<sip:carol@198.51.100.1:5060>;q=0.5"]


def custom_reason(invite: Request, status: int, reason: str) -> str:
    text = answer(invite, status)
    return text.replace(f"SIP/2.0 {status} X", f"SIP/2.0 {status} {reason}", 1)


def test_the_reason_phrase_of_a_final_answer_does_not_cross() -> None:
    c = keeping_controller()
    (invite,), _ = start_call(c)
    reason = f"Forwarded to {INSIDE_ADDRESS} via {INSIDE_HOST}"
    step = receive(c, custom_reason(invite, 486, reason), TRUNK, 0.1)
    (busy,) = [r for r in responses(step) if r.status == 486]
    assert INSIDE_ADDRESS.encode() not in bytes(busy)


def test_the_reason_phrase_of_a_relayed_in_dialog_answer_does_not_cross() -> None:
    c = keeping_controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 0.1)
    (ok,) = responses(step)
    assert ok.to.tag
    ack_from_a(c, ok.to.tag, 0.2)
    step = receive(c, from_a("INFO", ok.to.tag, 2), CALLER, 1.0)
    (info,) = requests(step, "INFO")
    step = receive(c, custom_reason(info, 403, f"Denied by {INSIDE_HOST}"), TRUNK, 1.1)
    (denied,) = responses(step)
    assert denied.status == 403
    assert INSIDE_HOST.encode() not in bytes(denied)


def test_the_comment_of_retry_after_does_not_cross() -> None:
    # RFC 3261 20.33: "Retry-After: 120 (comment)": free text of the inside.
    c = keeping_controller()
    (invite,), _ = start_call(c)
    extra = f"Retry-After: 120 (maintenance of {INSIDE_HOST});duration=60\r\n"
    step = receive(c, answer(invite, 486, extra=extra), TRUNK, 0.1)
    (busy,) = [r for r in responses(step) if r.status == 486]
    assert (busy.headers.get("Retry-After") or "").startswith("120")
    assert INSIDE_HOST.encode() not in bytes(busy)


def test_the_reason_phrase_of_a_refer_notify_does_not_cross() -> None:
    c = keeping_controller({"outside": RealmPolicy(refer_relay=True)})
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 0.1)
    (ok,) = responses(step)
    assert ok.to.tag
    ack_from_a(c, ok.to.tag, 0.2)
    refer_to = "Refer-To: <sip:carol@198.51.100.9>\r\n"
    step = receive(c, from_a("REFER", ok.to.tag, 2, extra=refer_to), CALLER, 1.0)
    (refer,) = requests(step, "REFER")
    receive(c, answer(refer, 202), TRUNK, 1.1)
    notify_b = from_b(
        invite,
        "NOTIFY",
        1,
        body=f"SIP/2.0 503 Gateway {INSIDE_ADDRESS} down\r\n",
        content_type="message/sipfrag",
        extra="Event: refer\r\nSubscription-State: terminated;reason=noresource\r\n",
    )
    step = receive(c, notify_b, TRUNK, 2.0)
    (notify,) = requests(step, "NOTIFY")
    assert notify.body.startswith(b"SIP/2.0 503 ")
    assert INSIDE_ADDRESS.encode() not in notify.body


def test_the_sdp_of_a_re_invite_from_the_inside_is_rewritten() -> None:
    c = keeping_controller()
    (invite,), _ = start_call(c)
    step = receive(c, answer(invite, 200, ANSWER), TRUNK, 0.1)
    (ok,) = responses(step)
    assert ok.to.tag
    ack_from_a(c, ok.to.tag, 0.2)
    offer = ANSWER.replace("203.0.113.5", INSIDE_ADDRESS).replace("o=b 1 1", "o=b 1 2")
    multipart = (
        "--b1\r\nContent-Type: application/sdp\r\n\r\n"
        f"{offer}\r\n--b1\r\nContent-Type: application/pidf+xml\r\n\r\n"
        f"<presence entity='sip:bob@{INSIDE_HOST}'/>\r\n--b1--\r\n"
    )
    reinvite = from_b(
        invite, "INVITE", 2, body=multipart, content_type="multipart/mixed;boundary=b1"
    )
    step = receive(c, reinvite, TRUNK, 1.0)
    (out,) = requests(step, "INVITE")
    assert out.headers.get("Content-Type") == "application/sdp"
    assert INSIDE_ADDRESS.encode() not in out.body and INSIDE_HOST.encode() not in out.body


# -- bodies of a subscription's NOTIFYs ----------------------------------------------------


def subscribed_notify(body: str, content_type: str) -> Request:
    """A NOTIFY of the inside notifier with ``body``, as the caller's leg gets it."""
    from tests.unit.test_b2bua_flows import controller
    from tests.unit.test_b2bua_subscriptions import notify, subscribe

    c = controller()
    step, b_call_id, to_b, from_b = subscribe(c)
    (b_subscribe,) = requests(step, "SUBSCRIBE")
    receive(c, answer(b_subscribe, 200, extra="Expires: 600\r\n"), TRUNK, 0.1)
    text = notify(to_b, b_call_id, from_b, 1, "active;expires=599")
    head, _, _ = text.partition("Content-Type:")
    text = f"{head}Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    (to_a,) = requests(receive(c, text, TRUNK, 0.2), "NOTIFY")
    return to_a


def test_sdp_in_a_subscription_dialog_does_not_cross_raw() -> None:
    # A dialog without a relay session (a subscription): an SDP body in it crosses
    # as the inside wrote it, its c= and o= naming the inside.
    offer = ANSWER.replace("203.0.113.5", INSIDE_ADDRESS)
    to_a = subscribed_notify(offer, "application/sdp")
    assert INSIDE_ADDRESS.encode() not in bytes(to_a)


def test_the_message_account_of_a_notify_does_not_name_the_inside() -> None:
    # RFC 3842 5.2: Message-Account is the voicemail account's URI, on the inside.
    body = f"Messages-Waiting: yes\r\nMessage-Account: sip:*97@{INSIDE_HOST}\r\n"
    to_a = subscribed_notify(body, "application/simple-message-summary")
    assert INSIDE_HOST.encode() not in bytes(to_a)
