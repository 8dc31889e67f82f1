"""RFC 4475 and RFC 5118 torture messages: every file gets the verdict in verdicts.tsv,
and the valid ones parse to the values the RFCs describe."""

from __future__ import annotations

import pytest

from sbc.sip.errors import ParseError
from sbc.sip.headers import Address
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.sip.uas import UasPolicy, check_request
from sbc.sip.uri import AbsoluteUri, SipUri
from tests.torture import load_verdicts, vector_files

VERDICTS = load_verdicts()


def test_every_vector_file_has_a_verdict() -> None:
    files = vector_files()
    assert len(files) == 62
    missing = [f for f in files if f not in VERDICTS]
    assert not missing, f"add these files to verdicts.tsv: {missing}"
    assert sorted(VERDICTS) == files


@pytest.mark.parametrize("name", vector_files())
def test_verdict(name: str) -> None:
    verdict = VERDICTS[name]
    data = verdict.data
    if verdict.parse in ("reject", "drop"):
        with pytest.raises(ParseError) as info:
            parse_message(data)
        if verdict.parse == "drop":
            assert info.value.is_response
        else:
            assert not info.value.is_response
            assert info.value.status == verdict.status
        return
    message = parse_message(data)
    if verdict.parse == "accept-drop":
        assert isinstance(message, Response)
        return
    assert isinstance(message, Request)
    rejection = check_request(message, UasPolicy())
    if verdict.parse == "app-reject":
        assert rejection is not None
        assert rejection.status == verdict.status
    else:
        assert rejection is None, rejection


def parse(name: str) -> Request | Response:
    return parse_message(VERDICTS[name].data)


def req(name: str) -> Request:
    message = parse(name)
    assert isinstance(message, Request)
    return message


def test_wsinv_whitespace_folding_and_compact_forms() -> None:
    m = req("rfc4475/wsinv.dat")
    assert m.method == "INVITE"
    assert m.to.tag == "1918181833n"
    assert str(m.to.uri) == "sip:vivekg@chair-dnrc.example.com"
    assert m.from_.display_name == 'J Rosenberg \\"'
    assert m.from_.tag == "98asjd8"
    assert m.max_forwards == 68
    assert m.cseq.seq == 9 and m.cseq.method == "INVITE"
    assert [(v.transport, v.host, v.branch) for v in m.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert m.headers.get("Subject") == ""
    assert m.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert m.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    (contact,) = m.contacts
    assert contact.display_name == 'Quoted string ""'
    assert contact.param("newparam") == "newvalue"
    assert contact.param("secondparam") == ""
    assert contact.param("q") == "0.33"
    (route,) = m.addresses("Route")
    assert isinstance(route.uri, SipUri) and route.uri.lr
    assert route.uri.param("unknownwith") == "value"
    assert len(m.body) == 150


def test_intmeth_unusual_characters() -> None:
    m = req("rfc4475/intmeth.dat")
    assert m.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert isinstance(m.uri, SipUri)
    assert m.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert m.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert m.uri.host == "example.com"
    assert m.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert m.from_.display == "token1~` token2'+_ token3*%!.-"
    assert m.from_.tag == "_token~1'+`*%!-."
    assert m.from_.param("fromParam''~+*_!.-%") == '"работающий"'
    assert m.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert m.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"


def test_esc01_escapes_kept_and_decodable() -> None:
    m = req("rfc4475/esc01.dat")
    assert isinstance(m.uri, SipUri)
    assert m.uri.user == "sips%3Auser%40example.com"
    assert m.uri.user_unescaped == "sips:user@example.com"
    assert m.uri.host == "example.net"
    assert isinstance(m.to.uri, SipUri) and m.to.uri.user_unescaped == "user"
    assert isinstance(m.from_.uri, SipUri) and m.from_.uri.user_unescaped == "I have spaces"
    (contact,) = m.contacts
    assert isinstance(contact.uri, SipUri)
    assert contact.uri.params == (("%6C%72", None), ("n%61me", "v%61lue%25%34%31"))


def test_escnull_keeps_two_distinct_contacts() -> None:
    m = req("rfc4475/escnull.dat")
    assert isinstance(m.to.uri, SipUri) and m.to.uri.user_unescaped == "null-\x00-null"
    users = [c.uri.user for c in m.contacts if isinstance(c.uri, SipUri)]
    assert users == ["%00", "%00%00"]


def test_esc02_percent_not_an_escape() -> None:
    m = req("rfc4475/esc02.dat")
    assert m.method == "RE%47IST%45R"
    assert m.to.display == '"%Z%45"'
    # C%6Fntact is an unknown header, not a third Contact.
    assert len(m.contacts) == 2
    assert m.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"


def test_lwsdisp_no_space_before_angle() -> None:
    m = req("rfc4475/lwsdisp.dat")
    assert m.from_.display == "caller"
    assert m.from_.tag == "323"


def test_longreq_long_values() -> None:
    m = req("rfc4475/longreq.dat")
    assert len(m.vias) > 20
    assert isinstance(m.to.uri, SipUri) and m.to.uri.port == 6000
    assert len(m.to.uri.params[1][0]) > 100 and m.to.uri.params[1][1] == "shortvalue"
    assert m.to.uri.params[2][0].endswith("ParameterNameWithNoValue")
    assert m.to.uri.params[2][1] is None
    assert len(m.to.display or "") > 100
    assert m.from_.tag and len(m.from_.tag) > 100


def test_dblreq_trailing_octets_ignored() -> None:
    m = req("rfc4475/dblreq.dat")
    assert m.method == "REGISTER"
    assert m.body == b""
    assert b"INVITE" not in bytes(m)


def test_semiuri_user_with_semicolon() -> None:
    m = req("rfc4475/semiuri.dat")
    assert isinstance(m.uri, SipUri)
    assert m.uri.user == "user;par=u%40example.net"
    assert m.uri.user_unescaped == "user;par=u@example.net"
    assert m.uri.host == "example.com" and m.uri.params == ()
    assert len(m.headers.values("Accept")) == 6


def test_transports_unknown_transport_tokens() -> None:
    m = req("rfc4475/transports.dat")
    assert [v.transport for v in m.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]


def test_mpart01_binary_body_framed_exactly() -> None:
    m = req("rfc4475/mpart01.dat")
    assert len(m.body) == 553
    assert m.body.count(b"\x00") == 2
    ct = m.content_type
    assert ct is not None and ct.essence == "multipart/mixed"
    assert ct.param("boundary") == "7a9cbec02ceef655"
    assert bytes(m).endswith(m.body)


def test_unreason_and_noreason_responses() -> None:
    m = parse("rfc4475/unreason.dat")
    assert isinstance(m, Response) and m.status == 200
    assert m.reason.startswith("= 2**3 * 5**2 но сто")
    m = parse("rfc4475/noreason.dat")
    assert isinstance(m, Response) and m.status == 100 and m.reason == ""


def test_badbranch_is_not_an_rfc3261_branch() -> None:
    m = req("rfc4475/badbranch.dat")
    assert m.via.branch == "z9hG4bK"
    assert not m.via.is_rfc3261_branch


def test_unknown_schemes_are_kept_opaque() -> None:
    m = req("rfc4475/unkscm.dat")
    assert isinstance(m.uri, AbsoluteUri) and m.uri.scheme == "nobodyKnowsThisScheme"
    m = req("rfc4475/novelsc.dat")
    assert isinstance(m.uri, AbsoluteUri) and m.uri.opaque == "//192.0.2.103:3002"
    m = req("rfc4475/unksm2.dat")
    assert str(m.to.uri) == "isbn:2983792873"
    assert str(m.from_.uri) == "http://www.example.com"


def test_bext01_unsupported_lists_require_values() -> None:
    rejection = check_request(req("rfc4475/bext01.dat"), UasPolicy())
    assert rejection is not None
    assert rejection.headers == (("Unsupported", "nothingSupportsThis, nothingSupportsThisEither"),)


def test_invut_and_sdp01_rejections_carry_explanations() -> None:
    r = check_request(req("rfc4475/invut.dat"), UasPolicy())
    assert r is not None and ("Accept", "application/sdp, multipart/mixed") in r.headers
    r = check_request(req("rfc4475/sdp01.dat"), UasPolicy())
    assert r is not None and r.headers[0][0] == "Warning"


def test_regaut01_unknown_auth_scheme_passes_parser() -> None:
    m = req("rfc4475/regaut01.dat")
    assert m.headers.get("Authorization") == "NoOneKnowsThisScheme opaque-data=here"


def test_bcast_broadcast_via_parses() -> None:
    m = parse("rfc4475/bcast.dat")
    assert isinstance(m, Response)
    assert m.vias[1].host == "255.255.255.255"


def test_zeromf_max_forwards_zero() -> None:
    assert req("rfc4475/zeromf.dat").max_forwards == 0


def test_contact_param_vs_uri_param() -> None:
    (c,) = req("rfc4475/cparam01.dat").contacts
    assert c.param("unknownparam") == "" and isinstance(c.uri, SipUri) and c.uri.params == ()
    (c,) = req("rfc4475/cparam02.dat").contacts
    assert c.params == () and isinstance(c.uri, SipUri)
    assert c.uri.param("unknownparam") == ""


def test_regescrt_escaped_header_kept_in_contact_uri() -> None:
    (c,) = req("rfc4475/regescrt.dat").contacts
    assert isinstance(c.uri, SipUri)
    assert c.uri.headers == (("Route", "%3Csip:sip.example.com%3E"),)


def test_inv2543_body_is_rest_of_datagram() -> None:
    m = req("rfc4475/inv2543.dat")
    assert m.via.branch is None
    assert m.from_.tag is None
    assert m.max_forwards is None
    assert len(m.body) == 105


def test_rejections_say_why() -> None:
    cases = {
        "rfc4475/badinv01.dat": "bad parameter '' in Via",
        "rfc4475/clerr.dat": "Content-Length 9999 exceeds the 154 body bytes received",
        "rfc4475/ncl.dat": "bad Content-Length: '-999'",
        "rfc4475/scalar02.dat": "CSeq number 36893488147419103232 exceeds 2**32-1",
        "rfc4475/quotbal.dat": "unterminated quoted string",
        "rfc4475/ltgtruri.dat": "bad URI: '<sip:user@example.com>'",
        "rfc4475/badaspec.dat": "spaces inside <> in To",
        "rfc4475/baddn.dat": "bad display name 'Bell, Alexander' in From",
        "rfc4475/badvers.dat": "unsupported version 'SIP/7.0'",
        "rfc4475/mismatch01.dat": "CSeq method 'INVITE' does not match request method 'OPTIONS'",
        "rfc4475/multi01.dat": "more than one",
        "rfc4475/mcl01.dat": "more than one Content-Length header",
        "rfc4475/insuf.dat": "missing From header",
        "rfc4475/regbadct.dat": "must be enclosed in <> in Contact",
        "rfc4475/escruri.dat": "headers in the Request-URI are not allowed",
        "rfc5118/ipv6-bad.dat": "bad port in URI host: 'db8::10'",
    }
    for name, text in cases.items():
        with pytest.raises(ParseError) as info:
            parse_message(VERDICTS[name].data)
        assert text in str(info.value), name


def test_rejected_requests_keep_what_a_response_needs() -> None:
    with pytest.raises(ParseError) as info:
        parse_message(VERDICTS["rfc4475/insuf.dat"].data)
    partial = info.value.partial
    assert isinstance(partial, Request)
    assert partial.headers.get("Via") == "SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf"


def test_ipv6_references() -> None:
    m = req("rfc5118/ipv6-good.dat")
    assert isinstance(m.uri, SipUri) and m.uri.host == "[2001:db8::10]" and m.uri.port is None
    assert m.via.host == "[2001:db8::9:1]"
    assert isinstance(m.contacts[0].uri, SipUri) and m.contacts[0].uri.host == "[2001:db8::1]"
    m = req("rfc5118/port-ambiguous.dat")
    assert isinstance(m.uri, SipUri) and m.uri.host == "[2001:db8::10:5070]" and m.uri.port is None
    m = req("rfc5118/port-unambiguous.dat")
    assert isinstance(m.uri, SipUri) and m.uri.host == "[2001:db8::10]" and m.uri.port == 5070
    assert req("rfc5118/via-received-param-with-delim.dat").via.received == "[2001:db8::9:255]"
    assert req("rfc5118/via-received-param-no-delim.dat").via.received == "2001:db8::9:255"
    vias = req("rfc5118/mult-ip-in-header.dat").vias
    assert [(v.host, v.port, v.received) for v in vias] == [
        ("[2001:db8::9:1]", 6050, None),
        ("192.0.2.1", None, None),
        ("[2001:db8::9:255]", None, "192.0.2.200"),
    ]
    m = req("rfc5118/ipv4-mapped-ipv6.dat")
    assert m.vias[0].host == "[::ffff:192.0.2.10]" and m.vias[0].port == 19823
    assert req("rfc5118/ipv6-bug-abnf-3-colons.dat").uri == SipUri(
        "sip", "[2001:db8:::192.0.2.1]", "user"
    )
    assert b"IN IP6 2001:db8::20" in req("rfc5118/ipv6-in-sdp.dat").body


def test_raw_rfc5118_lf_only_files_parse_too() -> None:
    """Bare-LF messages are tolerated; the wrong Content-Length is caught."""
    raw = (VERDICTS["rfc5118/ipv6-good.dat"].path).read_bytes()
    assert b"\r" not in raw
    m = parse_message(raw)
    assert isinstance(m, Request) and m.method == "REGISTER"
    with pytest.raises(ParseError, match="Content-Length 268 exceeds"):
        parse_message(VERDICTS["rfc5118/ipv6-in-sdp.dat"].path.read_bytes())


def test_accepted_messages_survive_serialize_and_reparse() -> None:
    for name, verdict in VERDICTS.items():
        if verdict.parse not in ("accept", "accept-drop", "app-reject"):
            continue
        first = parse_message(verdict.data)
        again = parse_message(bytes(first))
        assert again.start_line() == first.start_line(), name
        assert list(again.headers) == list(first.headers) or name == "rfc4475/inv2543.dat", name
        assert again.body == first.body, name


def test_address_round_trip() -> None:
    for text in (
        '"A \\"B\\"" <sip:a@b.example;transport=tcp>;tag=x;q=0.5',
        "<sip:[2001:db8::1]:5070;lr>",
        "sip:a@b;tag=1",
        "caller <sips:c@d.example>",
    ):
        assert str(Address.parse(text)) == text
