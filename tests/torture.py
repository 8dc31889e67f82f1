"""The RFC 4475 / RFC 5118 torture vectors and their verdicts, for unit and scenario tests."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

VECTORS = Path(__file__).parent / "vectors" / "sip-torture"


@dataclass(frozen=True)
class Verdict:
    name: str  # e.g. "rfc4475/wsinv.dat"
    parse: str  # accept | reject | drop | app-reject | accept-drop
    status: int | None  # ParseError / check_request status
    answer: int | None  # what the running SBC answers over UDP, None for nothing

    @property
    def path(self) -> Path:
        return VECTORS / self.name

    @property
    def data(self) -> bytes:
        raw = self.path.read_bytes()
        return normalize_rfc5118(raw) if self.name.startswith("rfc5118/") else raw


def load_verdicts() -> dict[str, Verdict]:
    verdicts = {}
    for line in (VECTORS / "verdicts.tsv").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, parse, status, answer = line.split("\t")
        verdicts[name] = Verdict(
            name,
            parse,
            None if status == "-" else int(status),
            None if answer == "-" else int(answer),
        )
    return verdicts


def vector_files() -> list[str]:
    """Every .dat file in the vector folder, so a new file is never silently skipped."""
    return sorted(str(p.relative_to(VECTORS)) for p in VECTORS.rglob("*.dat"))


def normalize_rfc5118(raw: bytes) -> bytes:
    """RFC 5118's archive is LF-only, two files lack the blank line, and three
    declare a wrong Content-Length (see INDEX.md): make them the messages the RFC
    meant: CRLF line ends, a blank line after the headers, a true Content-Length."""
    text = raw.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    if not sep:
        head, body = text.rstrip(b"\n"), b""
    body = body.replace(b"\n", b"\r\n")
    head = re.sub(rb"(?im)^(content-length|l)[ \t]*:.*$", b"Content-Length: %d" % len(body), head)
    return head.replace(b"\n", b"\r\n") + b"\r\n\r\n" + body
