"""Location conveyance (RFC 6442, `sbc.b2bua.location`): what of a caller's location
crosses, and the body and headers it crosses in."""

from __future__ import annotations

from sbc.b2bua.location import MAX_PARTS, conveyed
from sbc.sip.message import Request
from sbc.sip.parser import parse_message


def request(geolocation: str, parts: list[tuple[str, str, str]], routing: str = "") -> Request:
    """A MESSAGE-like request with ``parts`` (type, Content-ID, content) as its body."""
    body = "".join(
        f"--b\r\nContent-Type: {kind}\r\n" + (f"Content-ID: <{cid}>\r\n" if cid else "")
        + f"\r\n{content}\r\n"
        for kind, cid, content in parts
    ) + "--b--\r\n"  # fmt: skip
    head = (
        "INVITE sip:112@sbc SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        "From: <sip:a@h>;tag=1\r\nTo: <sip:112@sbc>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n"
        + (f"Geolocation: {geolocation}\r\n" if geolocation else "")
        + (f"Geolocation-Routing: {routing}\r\n" if routing else "")
        + "Content-Type: multipart/mixed;boundary=b\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n"
    )  # fmt: skip
    message = parse_message((head + body).encode())
    assert isinstance(message, Request)
    return message


def test_only_what_a_geolocation_points_at_crosses_and_routing_only_as_yes_or_no() -> None:
    parts = [
        ("application/pidf+xml", "one@inside", "<presence>1</presence>"),
        ("application/pidf+xml", "two@inside", "<presence>2</presence>"),
        ("text/plain", "three@inside", "not a location"),
    ]
    location = conveyed(
        request("<cid:two@inside>, <cid:three@inside>, <cid:nowhere@x>", parts, "maybe"), "sbc"
    )
    assert location is not None
    (part,) = location.parts
    assert part.content == b"<presence>2</presence>" and part.content_id is not None
    assert part.content_id.endswith("@sbc") and "inside" not in part.content_id
    assert location.geolocation == (f"<cid:{part.content_id}>",)
    assert location.headers() == [("Geolocation", f"<cid:{part.content_id}>")]  # no "maybe"


def test_a_reference_crosses_as_it_is_and_the_body_stays_the_sdp() -> None:
    location = conveyed(request("<https://lis.example/l/1>, garbage<", [], "no"), "sbc")
    assert location is not None and location.parts == ()
    assert location.body(b"v=0\r\n", "application/sdp") == (b"v=0\r\n", "application/sdp")
    assert location.headers() == [
        ("Geolocation", "<https://lis.example/l/1>"),
        ("Geolocation-Routing", "no"),
    ]


def test_nothing_conveyed_without_a_usable_geolocation() -> None:
    parts = [("application/pidf+xml", "one@inside", "<presence/>")]
    assert conveyed(request("", parts), "sbc") is None
    assert conveyed(request("<cid:other@inside>", parts), "sbc") is None
    assert conveyed(request("<ftp://x/y>", parts), "sbc") is None


def test_at_most_max_parts_cross_and_a_late_offer_carries_the_location_alone() -> None:
    count = MAX_PARTS + 3
    parts = [("application/pidf+xml", f"p{n}@inside", f"<presence>{n}</presence>")
             for n in range(count)]  # fmt: skip
    values = ", ".join(f"<cid:p{n}@inside>" for n in range(count))
    location = conveyed(request(values, parts), "sbc")
    assert location is not None and len(location.parts) == MAX_PARTS
    references = ", ".join(f"<https://lis.example/{n}>" for n in range(count))
    by_reference = conveyed(request(references, []), "sbc")
    assert by_reference is not None and len(by_reference.geolocation) == MAX_PARTS
    body, content_type = location.body(b"", "application/sdp")
    assert content_type.startswith("multipart/mixed;boundary=")
    assert b"application/sdp" not in body
    assert body.count(b"Content-Type: application/pidf+xml") == MAX_PARTS
