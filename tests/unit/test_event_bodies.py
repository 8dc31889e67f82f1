"""Event bodies crossing realms: MWI, dialog-info (busy lamps) and PIDF presence keep
nothing of the other side's topology, and every other byte as written."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st

from sbc.b2bua.event_bodies import DIALOG_INFO, PIDF, screen_event_body

INSIDE = (b"10.20.30.40", b"pbx.inside.example", b"a84b4c76e66710", b"1928301774", b"314159")

# RFC 4235 section 5.2's example, with inside addresses and dialog identifiers.
DIALOG_DOC = b"""<?xml version="1.0"?>
<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info"
             version="1" state="full" entity="sip:200@sbc.example.com">
  <dialog id="as7d900as8" call-id="a84b4c76e66710@pbx.inside.example"
          local-tag="1928301774" remote-tag="314159" direction="initiator">
    <state>confirmed</state>
    <duration>274</duration>
    <local>
      <identity display="Bob">sip:200@sbc.example.com</identity>
      <target uri="sip:200@10.20.30.40:5060;transport=udp">
        <param pname="+sip.rendering" pval="yes"/>
      </target>
    </local>
    <remote>
      <identity>sip:300@sbc.example.com</identity>
      <target uri='sip:300@pbx.inside.example;a=">"'/>
    </remote>
  </dialog>
</dialog-info>
"""

PIDF_DOC = b"""<?xml version="1.0" encoding="UTF-8"?>
<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="pres:200@sbc.example.com">
  <tuple id="t1">
    <status><basic>open</basic></status>
    <contact priority="0.8">sip:200@10.20.30.40:5060</contact>
    <note>On the phone</note>
  </tuple>
</presence>
"""


def screened(content_type: str, body: bytes) -> bytes:
    out, kept_type = screen_event_body(content_type, body)
    assert kept_type == content_type
    return out


def test_dialog_info_loses_the_dialog_ids_and_targets() -> None:
    out = screened(DIALOG_INFO, DIALOG_DOC)
    for secret in INSIDE:
        assert secret not in out, secret
    root = ET.fromstring(out)
    ns = {"d": "urn:ietf:params:xml:ns:dialog-info"}
    (dialog,) = root.findall("d:dialog", ns)
    assert dialog.attrib == {
        "id": hashlib.sha256(b"as7d900as8").hexdigest()[:20],
        "direction": "initiator",
    }
    assert dialog.findtext("d:state", namespaces=ns) == "confirmed"
    identities = [e.text for e in dialog.iter("{urn:ietf:params:xml:ns:dialog-info}identity")]
    assert identities == ["sip:200@sbc.example.com", "sip:300@sbc.example.com"]
    assert root.attrib["entity"] == "sip:200@sbc.example.com"
    assert not list(root.iter("{urn:ietf:params:xml:ns:dialog-info}target"))
    # Everything else byte for byte: the prolog, the root tag, the state lines.
    assert out.startswith(DIALOG_DOC[: DIALOG_DOC.index(b"<dialog id")])
    assert b"    <state>confirmed</state>\n    <duration>274</duration>\n" in out


def test_a_dialog_keeps_one_id_across_notifies() -> None:
    first = screened(DIALOG_INFO + ";charset=utf-8", DIALOG_DOC)
    again = screened(DIALOG_INFO, DIALOG_DOC.replace(b"confirmed", b"terminated"))
    key = b'id="' + hashlib.sha256(b"as7d900as8").hexdigest()[:20].encode() + b'"'
    assert key in first and key in again


def test_prefixed_namespaces_are_screened_too() -> None:
    doc = (
        b'<d:dialog-info xmlns:d="urn:ietf:params:xml:ns:dialog-info" version="2"'
        b' state="partial" entity="sip:200@sbc.example.com">'
        b'<d:dialog id="x" call-id="a84b4c76e66710"><d:state>early</d:state>'
        b'<d:local><d:target uri="sip:200@10.20.30.40"/></d:local></d:dialog>'
        b"</d:dialog-info>"
    )
    out = screened(DIALOG_INFO, doc)
    assert b"10.20.30.40" not in out and b"a84b4c76e66710" not in out
    assert b"<d:local></d:local>" in out and b"<d:state>early</d:state>" in out


def test_pidf_loses_its_contact() -> None:
    out = screened(PIDF, PIDF_DOC)
    assert b"10.20.30.40" not in out
    assert b"<basic>open</basic>" in out and b"<note>On the phone</note>" in out
    ET.fromstring(out)


def test_a_body_that_is_not_xml_does_not_cross() -> None:
    for content_type in (DIALOG_INFO, PIDF):
        assert screen_event_body(content_type, b"<dialog-info call-id='x@10.0.0.1'") == (
            b"",
            None,
        )
        assert screen_event_body(content_type, DIALOG_DOC.decode().encode("utf-16")) == (
            b"",
            None,
        )


def test_other_bodies_cross_unchanged_and_mwi_loses_its_account() -> None:
    body = b"<whatever call-id='x'/>"
    assert screen_event_body("application/xpidf+xml", body) == (body, "application/xpidf+xml")
    assert screen_event_body(None, body) == (body, None)
    assert screen_event_body(DIALOG_INFO, b"") == (b"", DIALOG_INFO)
    mwi = b"Messages-Waiting: yes\r\nMessage-Account: sip:vm@pbx.inside.example\r\n"
    assert screen_event_body("application/simple-message-summary", mwi) == (
        b"Messages-Waiting: yes\r\n",
        "application/simple-message-summary",
    )


def test_entity_expansion_is_bounded() -> None:
    """The parser's own limits (expat's amplification guard) refuse a billion laughs."""
    laughs = b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
    for level in range(1, 10):
        prev = chr(ord("a") + level - 1)
        laughs += f'<!ENTITY {chr(ord("a") + level)} "{("&" + prev + ";") * 10}">'.encode()
    laughs += b']><dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info">&j;</dialog-info>'
    assert screen_event_body(DIALOG_INFO, laughs) == (b"", None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(body: bytes) -> None:
    for content_type in (DIALOG_INFO, PIDF):
        out, kept = screen_event_body(content_type, DIALOG_DOC[:200] + body)
        assert kept in (content_type, None)
        if kept is not None:  # what crosses is still a document
            ET.fromstring(out)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                '<target uri="sip:1@10.9.9.9"/>',
                "<target uri='sip:1@10.9.9.9'><param pname='a' pval='b'/></target>",
                '<dialog id="d" call-id="c@10.9.9.9" local-tag="lt">',
                "</dialog>",
                "<local>",
                "</local>",
                "text",
            ]
        ),
        max_size=12,
    )
)
def test_what_parses_still_parses_and_names_nothing_inside(parts: list[str]) -> None:
    doc = (
        '<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info">'
        + "".join(parts)
        + "</dialog-info>"
    ).encode()
    out, kept = screen_event_body(DIALOG_INFO, doc)
    if kept is None:
        return  # not well-formed: nothing crosses
    ET.fromstring(out)
    assert b"10.9.9.9" not in out and b"lt" not in out.replace(b"dialog-info", b"")


def test_identities_take_the_sbc_s_host_in_the_realm_they_enter() -> None:
    doc = (
        DIALOG_DOC.replace(b"sbc.example.com", b"pbx.inside.example:5060;user=phone", 1)
        .replace(b"sip:200@sbc.example.com<", b"sips:200@[2001:db8::7]:5061<")
        .replace(b"sip:300@sbc.example.com", b" tel:+15551234 ")
    )
    out = screen_event_body(DIALOG_INFO, doc, "[2001:db8::1]")[0]
    root = ET.fromstring(out)
    ns = {"d": "urn:ietf:params:xml:ns:dialog-info"}
    assert root.get("entity") == "sip:200@[2001:db8::1];user=phone"
    identities = [e.text for e in root.iterfind(".//d:identity", ns)]
    # A tel: URI names no host: it stays as written.
    assert identities == ["sips:200@[2001:db8::1]", " tel:+15551234 "]
    assert b"pbx.inside.example" not in out and b"2001:db8::7" not in out
    pidf = screen_event_body(PIDF, PIDF_DOC.replace(b"sbc.example.com", b"10.20.30.40"), "sbc.test")
    assert ET.fromstring(pidf[0]).get("entity") == "pres:200@sbc.test"
    # Without a host, identities cross as written.
    assert b'entity="sip:200@pbx.inside.example' in screen_event_body(DIALOG_INFO, doc)[0]


def test_an_identity_with_markup_in_it_is_left_alone() -> None:
    doc = DIALOG_DOC.replace(
        b">sip:300@sbc.example.com<", b"><!-- c -->sip:300@pbx.inside.example<"
    )
    out = screen_event_body(DIALOG_INFO, doc, "sbc.test")[0]
    assert b"<!-- c -->sip:300@pbx.inside.example<" in out
    ET.fromstring(out)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="sipre:@[]1.a;>< &amp;/\"'=", max_size=40))
def test_rehosted_documents_still_parse(identity: str) -> None:
    text = identity.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    doc = (
        '<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" entity="sip:a@b">'
        f"<dialog id='d'><local><identity>{text}</identity></local></dialog></dialog-info>"
    ).encode()
    out, kept = screen_event_body(DIALOG_INFO, doc, "[2001:db8::1]")
    assert kept == DIALOG_INFO
    ET.fromstring(out)


# -- through the B2BUA ---------------------------------------------------------------------


def test_a_busy_lamp_notify_crosses_without_the_inside_dialog() -> None:
    from tests.unit.test_topology_review import subscribed_notify

    to_a = subscribed_notify(DIALOG_DOC.decode(), DIALOG_INFO)
    wire = bytes(to_a)
    for secret in INSIDE:
        assert secret not in wire, secret
    assert to_a.headers.get("Content-Type") == DIALOG_INFO
    assert b"<state>confirmed</state>" in to_a.body
    assert int(to_a.headers.get("Content-Length") or -1) == len(to_a.body)


def test_a_busy_lamp_s_identities_are_the_uri_the_phone_subscribed_to() -> None:
    from sbc.sip.headers import Address
    from sbc.sip.uri import SipUri
    from tests.unit.test_topology_review import subscribed_notify

    doc = DIALOG_DOC.replace(b"sbc.example.com", b"pbx.inside.example")
    to_a = subscribed_notify(doc.decode(), DIALOG_INFO)
    assert b"pbx.inside.example" not in bytes(to_a)
    # The NOTIFY's From is the URI the subscriber subscribed to (its To).
    subscribed = Address.parse(to_a.headers.get("From") or "").uri
    assert isinstance(subscribed, SipUri)
    root = ET.fromstring(to_a.body)
    assert root.get("entity") == f"sip:200@{subscribed.host}"


def test_a_publish_s_entity_is_the_presentity_it_is_sent_to() -> None:
    from sbc.sip.uri import SipUri
    from tests.unit.test_b2bua_flows import CALLER, MESSAGE, controller, receive, requests

    doc = PIDF_DOC.replace(b"sbc.example.com", b"198.51.100.9")
    text = (
        MESSAGE.replace("MESSAGE", "PUBLISH")
        .replace("text/plain", f"{PIDF}\r\nEvent: presence")
        .replace("Content-Length: 5\r\n\r\nhello", f"Content-Length: {len(doc)}\r\n\r\n")
    ) + doc.decode()
    (out,) = requests(receive(controller(), text, CALLER, 0.0), "PUBLISH")
    assert b"198.51.100.9" not in bytes(out)
    assert isinstance(out.uri, SipUri)
    assert ET.fromstring(out.body).get("entity") == f"pres:200@{out.uri.host}"


def test_a_broken_dialog_info_notify_crosses_without_its_body() -> None:
    from tests.unit.test_topology_review import subscribed_notify

    to_a = subscribed_notify("<dialog-info call-id='a84b4c76e66710@10.20.30.40'>", DIALOG_INFO)
    assert to_a.body == b""
    assert to_a.headers.get("Content-Type") is None
    assert b"10.20.30.40" not in bytes(to_a)
