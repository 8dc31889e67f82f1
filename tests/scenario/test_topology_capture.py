"""Topology hiding checked on the wire: every frame the peers receive from the real SBC.

Layout on loopback aliases (all of 127.0.0.0/8 is local; no namespace needed), in a
/24 of 127/8 drawn per run (``NET``) so that other tests' peers on 127.0.0.2/3 and
parallel runs never share an address with this one:

    outside SIPp NET.2 <-> NET.10 [SBC: outside | inside realm] NET.11 <-> NET.3 inside SIPp

An ``AF_PACKET`` socket on ``lo`` (tests/scenario/capture.py) records every packet
to or from those four addresses while a flow runs; the test parses the IP and
UDP/TCP headers to split what the outside peer received from what the inside peer
received. Each side's identifiers are read from what its SIPp sent (``-trace_msg``):
its addresses and ports, Call-IDs, From/To tags, Via branches, host names and SDP
``o=`` usernames and session ids. None of them may appear in any byte of any frame
delivered to the other side, SIP or RTP. The SBC's listener and relay address in a
realm is that realm's: NET.11 is an inside address and must not reach the
outside, and the reverse.

Guards against passing by seeing nothing: the capture must be complete (no kernel
drops, not cut short), every message SIPp says it received must be in the capture,
every identifier searched for must be on the wire of its own side, and a leaky
message sent directly (not through the SBC) is caught.
"""

from __future__ import annotations

import enum
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest

from tests.scenario.capture import (
    Capture,
    CaptureResult,
    FrameError,
    Packet,
    StreamKey,
    parse_frame,
    udp_frame,
    write_pcap,
)
from tests.scenario.sbcproc import SbcProcess
from tests.scenario.test_b2bua_sipp import SCENARIOS, SippRun, _messages, header, tag_of

SIPP = shutil.which("sipp")

NET = f"127.{100 + secrets.randbelow(150)}.{1 + secrets.randbelow(250)}"
OUTSIDE_PEER = f"{NET}.2"
INSIDE_PEER = f"{NET}.3"
SBC_OUTSIDE = f"{NET}.10"
SBC_INSIDE = f"{NET}.11"
#: Host names the leak_ scenarios put in Via, Record-Route, From, Warning...
INSIDE_HOST = "pbx.inside.example"
OUTSIDE_HOST = "edge.outside.example"

#: SIPp's media ports are picked here: below the kernel's ephemeral range (where the
#: SIP ports come from) and above the relay's 20000-29999, so no number is shared.
MEDIA_PORTS = range(30000, 32000, 4)
#: RTP the inside caller plays (SIPp's play_pcap_audio): 25 x 20 ms of PCMU.
RTP_PACKETS = 25
#: An RFC 3550 SSRC for the played RTP.
RTP_SSRC = 0x5EC0_1D00
SIPP_TIMEOUT = "10s"
WAIT = 20.0


class Side(enum.Enum):
    OUTSIDE = "outside"
    INSIDE = "inside"

    @property
    def peer(self) -> str:
        """The address of this side's SIP peers (and their media)."""
        return OUTSIDE_PEER if self is Side.OUTSIDE else INSIDE_PEER

    @property
    def sbc(self) -> str:
        """The SBC's listener and media relay address in this side's realm."""
        return SBC_OUTSIDE if self is Side.OUTSIDE else SBC_INSIDE

    @property
    def other(self) -> Side:
        return Side.INSIDE if self is Side.OUTSIDE else Side.OUTSIDE


def _need(reason: str | None) -> None:
    """Skip for ``reason``, except under CI (``CI`` set), which must not skip."""
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must not skip the topology capture")
    pytest.skip(reason)


def capture_unavailable() -> str | None:
    """Why a packet capture cannot run here, or None."""
    if not hasattr(socket, "AF_PACKET"):
        return "AF_PACKET capture needs Linux"
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
    except PermissionError:
        return "AF_PACKET capture needs root (CAP_NET_RAW)"
    return None


# -- identifiers and leaks ------------------------------------------------------------------


_IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.]*\d)")
_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)"
_HOST_FIELDS = (
    re.compile(rf"(?im)^(?:via|v)[ \t]*:[ \t]*SIP/2\.0/\w+[ \t]+{_HOST}"),
    re.compile(rf"(?i)sips?:(?:[^@\s;>]+@)?{_HOST}"),
    re.compile(rf"(?im)^(?:call-id|i)[ \t]*:[ \t]*\S*@{_HOST}"),
    re.compile(rf"(?im)^warning[ \t]*:[ \t]*\d{{3}}[ \t]+{_HOST}"),
    re.compile(rf"(?m)^[oc]=.* IN IP[46] {_HOST}"),
)
#: host:port in URIs and Via sent-by, the SDP m= and a=rtcp ports.
_PORT_FIELDS = (
    re.compile(r"(?:\d{1,3}(?:\.\d{1,3}){3}|\]|[A-Za-z][A-Za-z0-9-]*\.[A-Za-z.-]+):(\d{2,5})\b"),
    re.compile(r"(?m)^m=\w+ (\d+) "),
    re.compile(r"(?m)^a=rtcp:(\d+)"),
)
_BRANCH = re.compile(r"branch=([^;,\s]+)")
_ORIGIN = re.compile(r"(?m)^o=(\S+) (\d+) ")
#: Identifiers shorter than this would match by chance.
MIN_TOKEN = 6
#: Ports below this are well-known numbers that also occur in SDP and headers.
MIN_PORT = 1024


@dataclass(frozen=True)
class Identifiers:
    """What one side put on the wire, which the other side must never receive."""

    side: Side
    #: Call-IDs, tags, Via branches, host names: found as plain substrings.
    tokens: frozenset[str] = frozenset()
    #: Ports and SDP session ids: found as whole digit runs.
    numbers: frozenset[str] = frozenset()
    #: IP addresses: found as text (whole) and as the 4 or 16 packed bytes.
    addresses: frozenset[str] = frozenset()
    #: SDP o= usernames: found in o= lines only (a From user may legitimately cross).
    sdp_users: frozenset[str] = frozenset()

    def patterns(self) -> Iterator[tuple[str, re.Pattern[bytes]]]:
        """(identifier as reported, the bytes pattern that finds it)."""
        for token in sorted(self.tokens):
            yield token, re.compile(re.escape(token.encode()))
        for number in sorted(self.numbers):
            yield number, re.compile(rb"(?<!\d)" + number.encode() + rb"(?!\d)")
        for address in sorted(self.addresses):
            text = re.escape(address.encode())
            yield address, re.compile(rb"(?<![\d.])" + text + rb"(?![\d]|\.\d)")
            packed = ip_address(address).packed
            yield f"{address} (packed)", re.compile(re.escape(packed))
        for user in sorted(self.sdp_users):
            yield f"o={user}", re.compile(rb"(?m)^o=" + re.escape(user.encode()) + rb" ")


def identifiers_of(run: SippRun, side: Side, ports: Iterable[int] = ()) -> Identifiers:
    """Everything a side's SIPp sent that identifies it (or the SBC in its realm)."""
    tokens: set[str] = set()
    numbers = {str(p) for p in ports}
    addresses = {side.peer, side.sbc}
    users: set[str] = set()
    for message in (m[1:] for m in run.messages if m.startswith(">")):
        tokens.update(header(message, "Call-ID"))
        for name in ("From", "To"):
            tokens.update(t for t in map(tag_of, header(message, name)) if t)
        for value in header(message, "Via"):
            tokens.update(_BRANCH.findall(value))
        for pattern in _HOST_FIELDS:
            for host in pattern.findall(message):
                if _IPV4.fullmatch(host):
                    addresses.add(host)
                elif "." in host and any(c.isalpha() for c in host):
                    tokens.add(host.lower())
        addresses.update(_IPV4.findall(message))
        for pattern in _PORT_FIELDS:
            numbers.update(p for p in pattern.findall(message) if int(p) >= MIN_PORT)
        for user, session in _ORIGIN.findall(message):
            users.add(user)
            numbers.add(session)
    return Identifiers(
        side,
        frozenset(t for t in tokens if len(t) >= MIN_TOKEN),
        frozenset(numbers),
        frozenset(addresses),
        frozenset(users),
    )


@dataclass(frozen=True)
class Leak:
    """An identifier of ``side`` found in a packet delivered to the other side."""

    side: Side
    identifier: str
    where: str

    def __str__(self) -> str:
        return f"{self.side.value} {self.identifier!r} in {self.where}"


def _first_line(data: bytes) -> str:
    line = data.split(b"\r\n", 1)[0][:60]
    return line.decode("ascii", "replace") if line.isascii() and line.strip() else "binary"


def find_leaks(result: CaptureResult, ids: Identifiers) -> list[Leak]:
    """``ids`` found in any byte of a frame (or TCP stream) delivered to the other side."""
    to = ip_address(ids.side.other.peer)
    leaks: list[Leak] = []
    patterns = list(ids.patterns())
    in_segments: set[tuple[StreamKey, str]] = set()
    for packet in result.delivered_to(to):
        for name, pattern in patterns:
            if pattern.search(packet.frame):
                leaks.append(Leak(ids.side, name, f"{packet} [{_first_line(packet.payload)}]"))
        stream = packet.stream
        if stream is not None:
            in_segments.update(
                (stream, name) for name, pattern in patterns if pattern.search(packet.payload)
            )
    # A TCP segment boundary could split an identifier: search each stream whole.
    for key, data in result.tcp_streams().items():
        src, sport, dst, dport = key
        if dst != to:
            continue
        for name, pattern in patterns:
            if pattern.search(data) and (key, name) not in in_segments:
                leaks.append(Leak(ids.side, name, f"tcp stream {src}:{sport} -> {dst}:{dport}"))
    return leaks


def unseen(result: CaptureResult, ids: Identifiers) -> list[str]:
    """Identifiers not found on their own side's wire: a search for them elsewhere
    would prove nothing (wrong encoding, or the capture missed the flow). Packed
    addresses are left out: they are IP headers', present only when that address
    sends or receives (over TCP too: connections leave from the realm's address)."""
    own = ip_address(ids.side.peer)
    frames = [p.frame for p in result.packets if own in (p.src, p.dst)]
    return [
        name
        for name, pattern in ids.patterns()
        if not name.endswith("(packed)") and not any(pattern.search(f) for f in frames)
    ]


# -- the lab: one SBC with two realms, SIPp on each side -------------------------------------


@dataclass(frozen=True)
class MgmtPorts:
    """What SbcProcess needs: health on the management port."""

    sip: int
    tls: int
    mgmt: int


@dataclass(frozen=True)
class LabPorts:
    sbc_outside: int
    sbc_inside: int
    outside_uac: int
    outside_uas: int
    inside_uac: int
    inside_uas: int
    mgmt: int
    #: SIPp media ports (each with the next three free: SIPp binds audio and video).
    media: dict[Side, tuple[int, int]] = field(default_factory=dict)


def _bindable(host: str, port: int) -> bool:
    try:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as probe:
                probe.bind((host, port))
    except OSError:
        return False
    return True


def _free_port(host: str, taken: set[int]) -> int:
    """A port free for UDP and TCP on ``host``, not already used by the lab (a number
    shared between sides would be a false leak)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in taken and _bindable(host, port):
            taken.add(port)
            return port
    raise RuntimeError(f"no free port on {host}")


def _media_ports(host: str, taken: set[int]) -> tuple[int, int]:
    found: list[int] = []
    for port in MEDIA_PORTS:
        if all(p not in taken and _bindable(host, p) for p in range(port, port + 4)):
            taken.update(range(port, port + 4))
            found.append(port)
            if len(found) == 2:
                return found[0], found[1]
    raise RuntimeError(f"no free SIPp media ports on {host}")


def pick_ports() -> LabPorts:
    taken: set[int] = set()
    return LabPorts(
        sbc_outside=_free_port(SBC_OUTSIDE, taken),
        sbc_inside=_free_port(SBC_INSIDE, taken),
        outside_uac=_free_port(OUTSIDE_PEER, taken),
        outside_uas=_free_port(OUTSIDE_PEER, taken),
        inside_uac=_free_port(INSIDE_PEER, taken),
        inside_uas=_free_port(INSIDE_PEER, taken),
        mgmt=_free_port("127.0.0.1", taken),
        media={side: _media_ports(side.peer, taken) for side in Side},
    )


def lab_config(workdir: Path, ports: LabPorts) -> str:
    return f"""\
state_dir: {workdir / "state"}
log:
  level: info
sip:
  listen: []
management:
  listen: {{address: 127.0.0.1, port: {ports.mgmt}}}
realms:
  - name: outside
    listen:
      - {{transport: udp, address: {SBC_OUTSIDE}, port: {ports.sbc_outside}}}
    media_address: {SBC_OUTSIDE}
  - name: inside
    listen:
      - {{transport: udp, address: {SBC_INSIDE}, port: {ports.sbc_inside}}}
      - {{transport: tcp, address: {SBC_INSIDE}, port: {ports.sbc_inside}}}
    media_address: {SBC_INSIDE}
    trust_identity: true
routes:
  - {{name: core-tcp, from_realm: outside, user_prefix: "2", action: trunk, realm: inside,
      host: {INSIDE_PEER}, port: {ports.inside_uas}, transport: tcp}}
  - {{name: core, from_realm: outside, action: trunk, realm: inside,
      host: {INSIDE_PEER}, port: {ports.inside_uas}, transport: udp}}
  - {{name: carrier, from_realm: inside, action: trunk, realm: outside,
      host: {OUTSIDE_PEER}, port: {ports.outside_uas}, transport: udp}}
media:
  kernel_path: false
"""


@dataclass(frozen=True)
class Lab:
    sbc: SbcProcess
    workdir: Path
    ports: LabPorts


def rtp_pcap(path: Path) -> int:
    """The RTP the inside caller plays: SIPp sends each UDP payload from its media
    port to the media address of the answer, at the pcap's pace."""
    frames = []
    for seq in range(RTP_PACKETS):
        # RFC 3550 5.1: V=2, PT 0 (PCMU), 160 samples of silence (0xFF) every 20 ms.
        rtp = struct.pack("!BBHII", 0x80, 0, 1000 + seq, 8000 + 160 * seq, RTP_SSRC)
        frame = udp_frame("192.0.2.1", 40000, "192.0.2.2", 40002, rtp + b"\xff" * 160)
        frames.append((1_700_000_000 + seq * 0.02, frame))
    return write_pcap(str(path), frames)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _need(capture_unavailable())
    _need(None if SIPP else "sipp (Debian sip-tester) not installed")
    workdir = tmp_path_factory.mktemp("leak")
    ports = pick_ports()
    config = workdir / "sbc.yaml"
    config.write_text(lab_config(workdir, ports))
    rtp_pcap(workdir / "leak_rtp.pcap")
    sbc = SbcProcess(workdir, config, MgmtPorts(0, 0, ports.mgmt))  # type: ignore[arg-type]
    sbc.start()
    try:
        yield Lab(sbc, workdir, ports)
    finally:
        sbc.stop()


# -- flows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """A caller on ``origin``'s side through the SBC to a callee on the other side."""

    name: str
    caller: str
    callee: str
    origin: Side = Side.OUTSIDE
    service: str = "1000"
    #: The callee's transport (SIPp -t): u1 (UDP) or t1 (TCP).
    callee_transport: str = "u1"
    #: SIPp -cid_str host part; None: SIPp's default (its own address).
    call_id_host: str | None = None
    #: The caller plays leak_rtp.pcap and the callee echoes it (SIPp -rtp_echo).
    media: bool = False
    #: SIPp calls the callee takes (each PUBLISH reaches it as its own call).
    callee_calls: int = 1


@dataclass(frozen=True)
class FlowRun:
    flow: Flow
    runs: dict[Side, SippRun]
    capture: CaptureResult
    ids: dict[Side, Identifiers]
    pcap: Path


def _sipp(lab: Lab, flow: Flow, side: Side) -> tuple[subprocess.Popen[bytes], Path]:
    assert SIPP is not None
    caller = side is flow.origin
    ports = lab.ports
    if side is Side.OUTSIDE:
        port = ports.outside_uac if caller else ports.outside_uas
    else:
        port = ports.inside_uac if caller else ports.inside_uas
    media = ports.media[side][0 if caller else 1]
    name = f"{flow.name}-{side.value}"
    trace = lab.workdir / f"{name}.msg"
    trace.unlink(missing_ok=True)
    args = [
        SIPP, "-sf", str(SCENARIOS / (flow.caller if caller else flow.callee)),
        "-i", side.peer, "-p", str(port), "-mp", str(media),
        "-m", str(1 if caller else flow.callee_calls),
        "-timeout", SIPP_TIMEOUT, "-timeout_error", "-nostdin",
        "-trace_msg", "-message_file", str(trace),
        "-trace_err", "-error_file", str(lab.workdir / f"{name}.err"),
    ]  # fmt: skip
    if caller:
        if flow.call_id_host:
            args += ["-cid_str", f"%u-%p@{flow.call_id_host}"]
        args += ["-key", "rtp_port", str(media), "-key", "rtcp_port", str(media + 1)]
        sbc_port = ports.sbc_outside if side is Side.OUTSIDE else ports.sbc_inside
        args += ["-s", flow.service, f"{side.sbc}:{sbc_port}"]
    else:
        args += ["-t", flow.callee_transport]
        if flow.media:
            args.append("-rtp_echo")
    proc = subprocess.Popen(
        args, cwd=lab.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    return proc, trace


def _finish(proc: subprocess.Popen[bytes], trace: Path) -> SippRun:
    try:
        _, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own SIPp, by its Popen handle
        _, err = proc.communicate(timeout=5)
    return SippRun(proc.returncode, _messages(trace), err.decode(errors="replace"))


def run_flow(lab: Lab, flow: Flow) -> FlowRun:
    """Run one flow under capture; both SIPp must succeed."""
    hosts = (OUTSIDE_PEER, INSIDE_PEER, SBC_OUTSIDE, SBC_INSIDE)
    with Capture("lo", hosts, max_seconds=WAIT + 10) as capture:
        callee = _sipp(lab, flow, flow.origin.other)
        caller = _sipp(lab, flow, flow.origin)
        runs = {flow.origin: _finish(*caller), flow.origin.other: _finish(*callee)}
    result = capture.result
    pcap = lab.workdir / f"{flow.name}.pcap"
    result.save(str(pcap))
    for side, run in runs.items():
        assert run.returncode == 0, (
            f"{side.value} SIPp rc={run.returncode}\n{run.log}\n"
            + "\n".join(run.messages)[-3000:]
            + lab.sbc.log()[-3000:]
        )
    ids = {}
    for side, run in runs.items():
        sip_port = {
            (Side.OUTSIDE, True): lab.ports.outside_uac,
            (Side.OUTSIDE, False): lab.ports.outside_uas,
            (Side.INSIDE, True): lab.ports.inside_uac,
            (Side.INSIDE, False): lab.ports.inside_uas,
        }[(side, side is flow.origin)]
        sbc_port = lab.ports.sbc_outside if side is Side.OUTSIDE else lab.ports.sbc_inside
        ids[side] = identifiers_of(run, side, (sip_port, sbc_port))
    return FlowRun(flow, runs, result, ids, pcap)


def _received_in_capture(run: FlowRun, side: Side) -> list[str]:
    """Messages SIPp on ``side`` received that no captured packet (or TCP stream) to
    it carries, matched on start line and Call-ID."""
    delivered = [p.payload for p in run.capture.delivered_to(side.peer) if p.payload]
    delivered += [
        data
        for (_, _, dst, _), data in run.capture.tcp_streams().items()
        if dst == ip_address(side.peer)
    ]
    missing = []
    for message in run.runs[side].received:
        start = message[1:].split("\n", 1)[0].strip().encode()
        call_id = header(message, "Call-ID")[0].encode()
        if not any(start in data and call_id in data for data in delivered):
            missing.append(start.decode())
    return missing


def _rtp_to(run: FlowRun, side: Side) -> list[Packet]:
    """RTP (RFC 3550: version 2) the relay delivered to ``side``'s peer."""
    return [
        p
        for p in run.capture.delivered_to(side.peer)
        if p.src == ip_address(side.sbc)
        and p.transport == "udp"
        and len(p.payload) >= 12
        and p.payload[0] >> 6 == 2
        and p.sport is not None
        and 20000 <= p.sport <= 29999
    ]


FLOWS = [
    Flow("basic", "uac_basic.xml", "uas_basic.xml"),
    Flow("reinvite", "uac_reinvite.xml", "uas_reinvite.xml"),
    Flow("cancel", "uac_cancel.xml", "uas_ring.xml"),
    Flow("reject", "uac_reject.xml", "uas_reject.xml"),
    Flow("basic-tcp", "uac_basic.xml", "uas_basic.xml", service="2000", callee_transport="t1"),
    Flow("message", "leak_uac_message.xml", "leak_uas_message.xml", call_id_host=OUTSIDE_HOST),
    Flow(
        "inside-call",
        "leak_uac_inside.xml",
        "uas_basic.xml",
        origin=Side.INSIDE,
        call_id_host=INSIDE_HOST,
        media=True,
    ),
    Flow("early-prack", "flow_uac_early.xml", "flow_uas_100rel.xml"),
    Flow("prack-offer", "flow_uac_prack_offer.xml", "flow_uas_prack_offer.xml"),
    Flow("midcall", "flow_uac_midcall.xml", "flow_uas_midcall.xml"),
    Flow("dialog-gone", "flow_uac_dialog_gone.xml", "flow_uas_dialog_gone.xml"),
    Flow("glare", "flow_uac_glare.xml", "flow_uas_glare.xml"),
    Flow("cancel-race", "uac_cancel.xml", "flow_uas_cancel_race.xml"),
    Flow("subscribe", "flow_uac_subscribe.xml", "flow_uas_subscribe.xml"),
    Flow("publish", "flow_uac_publish.xml", "flow_uas_publish.xml", callee_calls=3),
    Flow("late-offer", "flow_uac_late.xml", "flow_uas_late.xml"),
]


class FlowRuns:
    """Each flow runs once under capture; the tests below read the same run."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._done: dict[str, FlowRun | BaseException] = {}

    def __call__(self, flow: Flow) -> FlowRun:
        if flow.name not in self._done:
            try:
                self._done[flow.name] = run_flow(self.lab, flow)
            except Exception as exc:  # reported by every test of this flow, run once
                self._done[flow.name] = exc
        done = self._done[flow.name]
        if isinstance(done, BaseException):
            raise done
        return done


@pytest.fixture(scope="module")
def flow_runs(lab: Lab) -> FlowRuns:
    return FlowRuns(lab)


#: TCP from the SBC to a peer is not bound to the realm's listener address: the kernel
#: picks the source by route (here 127.0.0.1), so the peer sees an SBC address outside
#: its realm; on a multi-homed host that can be another realm's (outside) address.


def _flows(**marks: pytest.MarkDecorator) -> list[object]:
    return [
        pytest.param(f, id=f.name, marks=[marks[f.name]] if f.name in marks else []) for f in FLOWS
    ]


@pytest.mark.root
@pytest.mark.parametrize("flow", _flows())
def test_capture_holds_every_message_and_identifier(flow_runs: FlowRuns, flow: Flow) -> None:
    """The guard against passing by capturing nothing."""
    run = flow_runs(flow)
    capture = run.capture
    # Nothing dropped by the kernel, cut short by the bounds, or unparseable ...
    assert capture.complete, (capture.drops, capture.truncated, len(capture.malformed))
    for side in Side:
        # ... every message SIPp received is in a captured packet to it ...
        assert run.runs[side].received, side
        assert not _received_in_capture(run, side), (side, run.pcap)
        # ... and every identifier searched for is on its own side's wire.
        ids = run.ids[side]
        assert ids.tokens and ids.numbers and ids.addresses, ids
        assert not unseen(capture, ids), (side, unseen(capture, ids))
    if flow.media:
        for side in Side:
            assert len(_rtp_to(run, side)) >= RTP_PACKETS // 2, (side, run.pcap)
    if flow.call_id_host:
        assert flow.call_id_host in run.ids[flow.origin].tokens


@pytest.mark.root
@pytest.mark.parametrize("flow", _flows())
def test_no_identifier_of_one_side_reaches_the_other(flow_runs: FlowRuns, flow: Flow) -> None:
    run = flow_runs(flow)
    leaks = [leak for side in Side for leak in find_leaks(run.capture, run.ids[side])]
    assert not leaks, f"{len(leaks)} leaks (capture: {run.pcap}):\n" + "\n".join(map(str, leaks))


@pytest.mark.root
@pytest.mark.parametrize("flow", _flows())
def test_peers_hear_the_sbc_only_from_their_realm_address(flow_runs: FlowRuns, flow: Flow) -> None:
    """Every packet a peer receives comes from the SBC's address in the peer's realm
    (SIP and relayed media alike): any other source is an address the realm does not
    need to know."""
    run = flow_runs(flow)
    for side in Side:
        sources = {str(p.src) for p in run.capture.delivered_to(side.peer)}
        assert sources == {side.sbc}, (side, sources, run.pcap)


@pytest.mark.root
def test_a_trusted_realm_s_identity_crosses_without_its_host(flow_runs: FlowRuns) -> None:
    """The inside realm is trusted (trust_identity): the inside PBX's
    P-Asserted-Identity reaches the outside as the user at the SBC's outside address;
    its host, like every inside identifier, does not (the test above)."""
    (flow,) = [f for f in FLOWS if f.name == "inside-call"]
    run = flow_runs(flow)
    asserted = f'P-Asserted-Identity: "Bob B" <sip:bob@{SBC_OUTSIDE}:'.encode()
    delivered = [p.payload for p in run.capture.delivered_to(Side.OUTSIDE.peer)]
    assert any(b"INVITE " in data and asserted in data for data in delivered), run.pcap


# -- the negative control: a leak sent directly (not through the SBC) is caught -------------


@pytest.mark.root
def test_a_direct_leak_is_caught() -> None:
    """A datagram and a TCP stream "from the SBC's outside address" carrying inside
    identifiers: each kind of identifier is found, also when TCP splits it."""
    _need(capture_unavailable())
    call_id = "ctl-7f3a9c@pbx.inside.example"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener,
    ):
        receiver.bind((OUTSIDE_PEER, 0))
        receiver_port = receiver.getsockname()[1]
        listener.bind((OUTSIDE_PEER, 0))
        listener.listen(1)
        inside_port = _free_port(INSIDE_PEER, set())
        ids = Identifiers(
            Side.INSIDE,
            tokens=frozenset({call_id, "z9hG4bK-ctl-branch"}),
            numbers=frozenset({str(inside_port)}),
            addresses=frozenset({INSIDE_PEER}),
            sdp_users=frozenset({"pbxuser"}),
        )
        leaky = (
            f"INVITE sip:1000@{OUTSIDE_PEER} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {INSIDE_PEER}:{inside_port};branch=z9hG4bK-ctl-branch\r\n"
            f"Call-ID: {call_id}\r\n\r\n"
            f"o=pbxuser 1 1 IN IP4 0.0.0.0\r\n"
        ).encode()
        rtp = struct.pack("!BBHII", 0x80, 0, 1, 1, 1) + IPv4Address(INSIDE_PEER).packed
        with Capture("lo", (OUTSIDE_PEER, SBC_OUTSIDE), max_seconds=10) as capture:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                sender.bind((SBC_OUTSIDE, 0))
                sender.sendto(leaky, receiver.getsockname())
                sender.sendto(rtp, receiver.getsockname())
            receiver.settimeout(2)
            assert receiver.recv(2048) == leaky and receiver.recv(2048) == rtp
            with socket.create_connection(
                listener.getsockname(), timeout=2, source_address=(SBC_OUTSIDE, 0)
            ) as client:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(2)
                    # The Call-ID in two segments: the second sent once the first arrived.
                    client.sendall(b"BYE x SIP/2.0\r\nCall-ID: ctl-7f3a")
                    assert conn.recv(100).endswith(b"ctl-7f3a")
                    client.sendall(b"9c@pbx.inside.example\r\n\r\n")
                    assert conn.recv(100).startswith(b"9c@")
    result = capture.result
    assert result.complete
    leaks = find_leaks(result, ids)
    found = {leak.identifier for leak in leaks}
    assert found == {
        call_id,
        "z9hG4bK-ctl-branch",
        str(inside_port),
        INSIDE_PEER,
        f"{INSIDE_PEER} (packed)",
        "o=pbxuser",
    }
    # The datagrams' leaks are in packets to the outside peer from the SBC's address ...
    udp = [leak for leak in leaks if leak.where.startswith("udp")]
    assert {leak.where.split(" (")[0] for leak in udp} == {
        f"udp {SBC_OUTSIDE}:{p.sport} -> {OUTSIDE_PEER}:{receiver_port}"
        for p in result.delivered_to(OUTSIDE_PEER)
        if p.transport == "udp"
    }
    # ... and the split Call-ID only in the reassembled TCP stream.
    assert [leak.where.split(" ")[:2] for leak in leaks if leak.identifier == call_id][-1] == [
        "tcp",
        "stream",
    ]
    # Nothing of the outside's own appears in what the outside received: no false leak.
    assert not find_leaks(result, Identifiers(Side.OUTSIDE, tokens=frozenset({"no-such-id"})))


# -- the pure parts, without root ----------------------------------------------------------


IPV4_UDP = bytes.fromhex(
    "000000000000" "000000000000" "0800"  # Ethernet: lo's zero addresses, IPv4
    "4500" "0021" "1c46" "4000" "4011" "0000" "7f000002" "7f00000a"  # IPv4, 33 bytes
    "13c4" "0050" "000d" "0000" "68656c6c6f"  # UDP 5060 -> 80, "hello"
    "0000"  # Ethernet padding past the IP total length
)  # fmt: skip
IPV6_HBH_TCP = bytes.fromhex(
    "000000000000" "000000000000" "86dd"
    "60000000" "001e" "00" "40"  # payload 30 bytes, next header hop-by-hop
    "20010db8000000000000000000000001" "20010db8000000000000000000000002"
    "0600" "010400000000"  # hop-by-hop: next TCP, 8 bytes (PadN)
    "13c4" "13c5" "00000001" "00000000" "5018" "ffff" "0000" "0000"  # TCP, 20 bytes
    "6869"  # "hi"
)  # fmt: skip


def test_parse_ipv4_udp_frame_ignores_ethernet_padding() -> None:
    packet = parse_frame(IPV4_UDP, 1.5)
    assert packet is not None
    assert (str(packet.src), packet.sport, str(packet.dst), packet.dport) == (
        "127.0.0.2", 5060, "127.0.0.10", 80,
    )  # fmt: skip
    assert packet.payload == b"hello" and packet.transport == "udp" and packet.time == 1.5
    assert str(packet) == "udp 127.0.0.2:5060 -> 127.0.0.10:80 (5 bytes)"


def test_parse_ipv6_walks_extension_headers_to_tcp() -> None:
    packet = parse_frame(IPV6_HBH_TCP)
    assert packet is not None
    assert packet.protocol == socket.IPPROTO_TCP and packet.payload == b"hi"
    assert str(packet) == "tcp [2001:db8::1]:5060 -> [2001:db8::2]:5061 (2 bytes)"


def test_non_ip_frames_are_not_packets() -> None:
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    assert parse_frame(arp) is None


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (IPV4_UDP[:10], "truncated Ethernet header (10 bytes)"),
        (IPV4_UDP[:30], "truncated IPv4 header (16 bytes)"),
        (IPV4_UDP[:40], "IPv4 lengths inconsistent (header 20, total 33)"),
        (IPV4_UDP[:14] + b"\x65" + IPV4_UDP[15:], "IP version 6 in an IPv4 frame"),
        (IPV4_UDP[:38] + b"\x00\x40" + IPV4_UDP[40:], "UDP length 64 outside 8..13"),
        (IPV6_HBH_TCP[:-24], "IPv6 payload length 30 beyond the frame"),
        (IPV6_HBH_TCP[:74] + b"\x30" + IPV6_HBH_TCP[75:], "TCP data offset 12 outside 20..22"),
    ],
)
def test_broken_frames_say_which_layer(frame: bytes, message: str) -> None:
    with pytest.raises(FrameError) as error:
        parse_frame(frame)
    assert str(error.value) == message


def test_udp_frame_round_trips_with_a_valid_header_checksum(tmp_path: Path) -> None:
    frame = udp_frame("127.0.0.3", 31000, "127.0.0.11", 20000, b"\x80\x00rtp")
    packet = parse_frame(frame)
    assert packet is not None and packet.payload == b"\x80\x00rtp" and packet.dport == 20000
    header_words = struct.unpack("!10H", frame[14:34])
    assert sum(header_words) % 0xFFFF == 0  # RFC 1071: the sum with its checksum is ~0
    assert write_pcap(str(tmp_path / "one.pcap"), [(1.25, frame)]) == 1
    data = (tmp_path / "one.pcap").read_bytes()
    assert data[:4] == b"\xd4\xc3\xb2\xa1" and struct.unpack_from("<I", data, 20)[0] == 1
    assert struct.unpack_from("<IIII", data, 24) == (1, 250000, len(frame), len(frame))
    assert data[40:] == frame


def _result(*frames: bytes) -> CaptureResult:
    packets = tuple(p for p in map(parse_frame, frames) if p is not None)
    return CaptureResult(packets, drops=0, truncated=False)


def test_find_leaks_matches_whole_numbers_packed_addresses_and_origin_users() -> None:
    ids = Identifiers(
        Side.INSIDE,
        tokens=frozenset({"abc123@pbx.inside.example"}),
        numbers=frozenset({"31000"}),
        addresses=frozenset({"127.0.0.3"}),
        sdp_users=frozenset({"bob"}),
    )
    clean = (
        b"SIP/2.0 200 OK\r\nFrom: <sip:bob@127.0.0.10>\r\nX: 310001 127.0.0.30 "
        b"abc123@pbx\r\n\r\no=sbc 131000 1 IN IP4 127.0.0.10\r\n"
    )
    assert find_leaks(_result(udp_frame(SBC_OUTSIDE, 5, OUTSIDE_PEER, 6, clean)), ids) == []
    leaky = b"a=x:31000\r\no=bob 1 1 IN IP4 127.0.0.3\r\n" + IPv4Address("127.0.0.3").packed
    leaks = find_leaks(_result(udp_frame(SBC_OUTSIDE, 5, OUTSIDE_PEER, 6, leaky)), ids)
    assert sorted(leak.identifier for leak in leaks) == [
        "127.0.0.3", "127.0.0.3 (packed)", "31000", "o=bob",
    ]  # fmt: skip
    assert str(leaks[0]).startswith(f"inside '31000' in udp {SBC_OUTSIDE}:5 -> {OUTSIDE_PEER}:6")
    # Only what is delivered to the other side counts: the inside peer's own sending is not.
    assert find_leaks(_result(udp_frame(INSIDE_PEER, 5, SBC_INSIDE, 6, leaky)), ids) == []


def test_identifiers_come_from_what_a_side_sent() -> None:
    sent = (
        f">INVITE sip:1000@{SBC_OUTSIDE}:4000 SIP/2.0\n"
        f"Via: SIP/2.0/UDP {OUTSIDE_PEER}:5999;branch=z9hG4bK-1-2-3\n"
        "Via: SIP/2.0/UDP edge.outside.example:5080;branch=z9hG4bK-edge-9\n"
        f"From: <sip:alice@{OUTSIDE_PEER}:5999>;tag=777SIPpTag001\n"
        f"To: <sip:1000@{SBC_OUTSIDE}:4000>\n"
        "Call-ID: 1-777@edge.outside.example\n\n"
        f"o=alice 53655765 1 IN IP4 {OUTSIDE_PEER}\nm=audio 31000 RTP/AVP 0\na=rtcp:31001\n"
        "a=candidate:1 1 UDP 2130706431 192.0.2.7 31000 typ host\n"
    )
    received = "<SIP/2.0 200 OK\nCall-ID: not-ours-at-all\nTo: <sip:x@y>;tag=theirs123\n"
    ids = identifiers_of(SippRun(0, [sent, received], ""), Side.OUTSIDE, (5999,))
    assert ids.tokens == {
        "z9hG4bK-1-2-3", "z9hG4bK-edge-9", "777SIPpTag001", "1-777@edge.outside.example",
        "edge.outside.example",
    }  # fmt: skip
    assert ids.numbers == {"4000", "5999", "5080", "53655765", "31000", "31001"}
    assert ids.addresses == {OUTSIDE_PEER, SBC_OUTSIDE, "192.0.2.7"}
    assert ids.sdp_users == {"alice"}


def test_skips_locally_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        _need("no capture here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must not skip"):
        _need("no capture here")
    _need(None)
