"""The B2BUA end to end: SIPp caller -> `sbc run` -> SIPp callee, on loopback.

Two realms (outside, inside) on their own ephemeral UDP ports; a route sends
every call from outside to the SIPp UAS in the inside realm. Each side logs every
message it sends and receives (SIPp ``-trace_msg``); the topology-leak check looks
for the other side's identifiers in every byte a side received.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.scenario.sbcproc import SbcProcess, free_port

SIPP = shutil.which("sipp")
SCENARIOS = Path(__file__).parent / "sipp"
#: SIPp's SDP media ports; the relay's range is 20000-29999.
# Between the relay's range and the kernel's ephemeral range (32768-60999),
# so neither the relay nor a free_port() can collide with them.
CALLER_MEDIA = 31000
CALLEE_MEDIA = 31500

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) not installed")


@dataclass
class Lab:
    sbc: SbcProcess
    workdir: Path
    outside: int
    inside: int
    uas: int
    uac: int
    #: SIPp's -t for the callee: u1 (UDP) or t1 (TCP).
    uas_transport: str = "u1"


@dataclass
class Ports:
    """What SbcProcess needs: health on the management port."""

    sip: int
    tls: int
    mgmt: int


def lab_config(
    workdir: Path, plain: int, outside: int, inside: int, uas: int, mgmt: int, inside_t: str = "udp"
) -> str:
    return f"""\
state_dir: {workdir / "state"}
log:
  level: info
sip:
  listen:
    - {{transport: udp, address: 127.0.0.1, port: {plain}}}
management:
  listen: {{address: 127.0.0.1, port: {mgmt}}}
realms:
  - name: outside
    listen: [{{transport: udp, address: 127.0.0.1, port: {outside}}}]
    media_address: 127.0.0.1
  - name: inside
    listen: [{{transport: {inside_t}, address: 127.0.0.1, port: {inside}}}]
    media_address: 127.0.0.1
    keep_headers: [Subject]
routes:
  - {{name: busy-test, from_realm: outside, user_prefix: "486", action: reject, status: 486}}
  - {{name: to-core, from_realm: outside, action: trunk, realm: inside,
      host: 127.0.0.1, port: {uas}, transport: {inside_t}}}
"""


def _lab(workdir: Path, inside_transport: str) -> Generator[Lab, None, None]:
    plain, outside, inside, uas, uac = (free_port(also_udp=True) for _ in range(5))
    mgmt = free_port()
    config = workdir / "sbc.yaml"
    config.write_text(lab_config(workdir, plain, outside, inside, uas, mgmt, inside_transport))
    sbc = SbcProcess(workdir, config, Ports(plain, 0, mgmt)).start()  # type: ignore[arg-type]
    try:
        yield Lab(
            sbc, workdir, outside, inside, uas, uac, "u1" if inside_transport == "udp" else "t1"
        )
    finally:
        sbc.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _lab(tmp_path_factory.mktemp("b2bua"), "udp")


@pytest.fixture(scope="module")
def tcp_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The inside realm over TCP: calls cross from UDP to TCP."""
    yield from _lab(tmp_path_factory.mktemp("b2bua-tcp"), "tcp")


@dataclass
class SippRun:
    returncode: int
    messages: list[str]
    log: str

    @property
    def received(self) -> list[str]:
        return [m for m in self.messages if m.startswith("<")]


_MESSAGE_SPLIT = re.compile(r"^-{5,} .*$", re.MULTILINE)


def _messages(path: Path) -> list[str]:
    """SIPp's -message_file: each message after a '----- date' line, with a
    'UDP message sent/received' header line; prefix '<' for received, '>' sent."""
    if not path.exists():
        return []
    out = []
    for chunk in _MESSAGE_SPLIT.split(path.read_text(errors="replace")):
        chunk = chunk.strip("\n")
        if not chunk:
            continue
        head, _, body = chunk.partition("\n")
        body = body.lstrip("\n")
        if "received" in head:
            out.append("<" + body)
        elif "sent" in head:
            out.append(">" + body)
    return out


def sipp(
    lab: Lab, role: str, scenario: str, name: str, *, service: str = "1000", calls: int = 1
) -> subprocess.Popen[bytes]:
    assert SIPP is not None
    trace = lab.workdir / f"{name}.msg"
    trace.unlink(missing_ok=True)
    common = [
        SIPP, "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-m", str(calls),
        "-timeout", "15s", "-timeout_error", "-nostdin", "-trace_msg",
        "-message_file", str(trace), "-trace_err", "-error_file", str(lab.workdir / f"{name}.err"),
    ]  # fmt: skip
    if role == "uas":
        args = [*common, "-p", str(lab.uas), "-mp", str(CALLEE_MEDIA), "-t", lab.uas_transport]
    else:
        args = [*common, "-p", str(lab.uac), "-mp", str(CALLER_MEDIA), "-s", service,
                "-r", "10", "-l", "5", f"127.0.0.1:{lab.outside}"]  # fmt: skip
    return subprocess.Popen(
        args, cwd=lab.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def finish(lab: Lab, proc: subprocess.Popen[bytes], name: str, timeout: float = 25) -> SippRun:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=5)
    return SippRun(
        proc.returncode, _messages(lab.workdir / f"{name}.msg"), err.decode(errors="replace")
    )


def call(
    lab: Lab, uac: str, uas: str | None, service: str = "1000", calls: int = 1
) -> tuple[SippRun, SippRun | None]:
    callee = sipp(lab, "uas", uas, "uas", calls=calls) if uas else None
    caller = sipp(lab, "uac", uac, "uac", service=service, calls=calls)
    caller_run = finish(lab, caller, "uac")
    callee_run = finish(lab, callee, "uas") if callee else None
    return caller_run, callee_run


def _explain(run: SippRun | None, lab: Lab) -> str:
    if run is None:
        return ""
    return (
        f"rc={run.returncode}\n{run.log}\n"
        + "\n".join(run.messages)[-4000:]
        + lab.sbc.log()[-4000:]
    )


def header(message: str, name: str) -> list[str]:
    return re.findall(rf"(?im)^{name}\s*:\s*(.*?)\s*$", message)


def tag_of(value: str) -> str | None:
    found = re.search(r";\s*tag=([^;>\s]+)", value)
    return found.group(1) if found else None


def identifiers(run: SippRun) -> set[str]:
    """What a side put in the messages it sent: Call-ID, tags, branches, its port."""
    out: set[str] = set()
    for message in run.messages:
        if not message.startswith(">"):
            continue
        out.update(header(message, "Call-ID"))
        for name in ("From", "To"):
            for value in header(message, name):
                tag = tag_of(value)
                if tag:
                    out.add(tag)
        for value in header(message, "Via"):
            branch = re.search(r"branch=([^;\s]+)", value)
            if branch:
                out.add(branch.group(1))
    return out


def test_basic_call_caller_hangs_up(lab: Lab) -> None:
    caller, callee = call(lab, "uac_basic.xml", "uas_basic.xml")
    assert caller.returncode == 0, _explain(caller, lab)
    assert callee is not None and callee.returncode == 0, _explain(callee, lab)


def test_callee_hangs_up(lab: Lab) -> None:
    caller, callee = call(lab, "uac_callee_bye.xml", "uas_bye.xml")
    assert caller.returncode == 0, _explain(caller, lab)
    assert callee is not None and callee.returncode == 0, _explain(callee, lab)


def test_cancel_before_answer_gets_487(lab: Lab) -> None:
    caller, callee = call(lab, "uac_cancel.xml", "uas_ring.xml")
    assert caller.returncode == 0, _explain(caller, lab)
    assert callee is not None and callee.returncode == 0, _explain(callee, lab)
    assert any(m.startswith("<SIP/2.0 487") for m in caller.received)


def test_rejection_is_relayed(lab: Lab) -> None:
    caller, callee = call(lab, "uac_reject.xml", "uas_reject.xml")
    assert caller.returncode == 0, _explain(caller, lab)
    assert callee is not None and callee.returncode == 0, _explain(callee, lab)


def test_reject_route_answers_locally(lab: Lab) -> None:
    caller, _ = call(lab, "uac_reject.xml", None, service="4861")
    assert caller.returncode == 0, _explain(caller, lab)


def test_no_topology_leaks_and_sdp_points_at_relay(lab: Lab) -> None:
    caller, callee = call(lab, "uac_basic.xml", "uas_basic.xml")
    assert caller.returncode == 0 and callee is not None and callee.returncode == 0
    caller_ids, callee_ids = identifiers(caller), identifiers(callee)
    assert caller_ids and callee_ids
    # Each side's own identifiers are all different from the other's...
    assert not caller_ids & callee_ids
    seen_by_callee = "\n".join(callee.received)
    seen_by_caller = "\n".join(caller.received)
    # ... and none of them reaches the other side, in any byte.
    for ident in caller_ids:
        assert ident not in seen_by_callee, ident
    for ident in callee_ids:
        assert ident not in seen_by_caller, ident
    # Addresses: the caller's SIP port and RTP port never reach the callee, and back.
    assert f":{lab.uac}" not in seen_by_callee and str(CALLER_MEDIA) not in seen_by_callee
    assert f":{lab.uas}" not in seen_by_caller
    assert f" {CALLEE_MEDIA} " not in seen_by_caller
    # Headers not on the keep-list are dropped; Subject is kept into the inside realm.
    assert "X-Secret-Topology" not in seen_by_callee and "X-Secret-Topology" not in seen_by_caller
    assert "Subject: b2bua scenario" in seen_by_callee
    assert "a=candidate" not in seen_by_callee
    # SDP: c= is the relay's address, m= a relay port, o= the SBC's own.
    invite = next(m for m in callee.received if m.startswith("<INVITE"))
    answer = next(m for m in caller.received if m.startswith("<SIP/2.0 200") and "m=audio" in m)
    for sdp in (invite, answer):
        assert "c=IN IP4 127.0.0.1" in sdp
        assert re.search(r"(?m)^o=sbc \d+ \d+ IN IP4 127\.0\.0\.1", sdp), sdp
        port = int(re.search(r"(?m)^m=audio (\d+) ", sdp).group(1))  # type: ignore[union-attr]
        assert 20000 <= port <= 29999
    # Via/Contact on each side name only the SBC's listener of that side's realm.
    for message in callee.received:
        for value in header(message, "Via") + header(message, "Contact"):
            assert f"127.0.0.1:{lab.inside}" in value, value
    for message in caller.received:
        for value in header(message, "Contact"):
            assert f"127.0.0.1:{lab.outside}" in value, value


def test_reinvite_is_relayed_as_a_new_transaction(lab: Lab) -> None:
    caller, callee = call(lab, "uac_reinvite.xml", "uas_reinvite.xml")
    assert caller.returncode == 0, _explain(caller, lab)
    assert callee is not None and callee.returncode == 0, _explain(callee, lab)
    invites = [m for m in callee.received if m.startswith("<INVITE")]
    assert len(invites) == 2
    assert "CSeq: 2 INVITE" in invites[1] and "a=sendonly" in invites[1]
    # The SBC's own o= on the inside leg: same session, version up by one.
    first = re.search(r"(?m)^o=sbc (\d+) (\d+) ", invites[0])
    second = re.search(r"(?m)^o=sbc (\d+) (\d+) ", invites[1])
    assert first and second and first.group(1) == second.group(1)
    assert int(second.group(2)) == int(first.group(2)) + 1
    answers = [m for m in caller.received if m.startswith("<SIP/2.0 200") and "a=recvonly" in m]
    assert len(answers) == 1 and "CSeq: 2 INVITE" in answers[0]


def test_twenty_calls_back_to_back(lab: Lab) -> None:
    before = lab.sbc.log().count("ended (200, bye)")
    caller, callee = call(lab, "uac_basic.xml", "uas_basic.xml", calls=20)
    assert caller.returncode == 0, _explain(caller, lab)
    assert callee is not None and callee.returncode == 0, _explain(callee, lab)
    assert lab.sbc.log().count("ended (200, bye)") - before == 20
    status, health = lab.sbc.health()
    assert status == 200 and health["calls"] == 0


def test_udp_caller_to_tcp_callee(tcp_lab: Lab) -> None:
    caller, callee = call(tcp_lab, "uac_basic.xml", "uas_basic.xml")
    assert caller.returncode == 0, _explain(caller, tcp_lab)
    assert callee is not None and callee.returncode == 0, _explain(callee, tcp_lab)
    invite = next(m for m in callee.received if m.startswith("<INVITE"))
    assert f"Via: SIP/2.0/TCP 127.0.0.1:{tcp_lab.inside}" in invite
    assert f"<sip:127.0.0.1:{tcp_lab.inside};transport=tcp>" in invite


def test_callee_hangs_up_over_tcp(tcp_lab: Lab) -> None:
    caller, callee = call(tcp_lab, "uac_callee_bye.xml", "uas_bye.xml")
    assert caller.returncode == 0, _explain(caller, tcp_lab)
    assert callee is not None and callee.returncode == 0, _explain(callee, tcp_lab)


def test_sighup_applies_new_routes_to_new_calls(tmp_path: Path) -> None:
    running = _lab(tmp_path, "udp")
    lab = next(running)
    try:
        config = lab.workdir / "sbc.yaml"
        config.write_text(config.read_text().replace('user_prefix: "486"', 'user_prefix: "1"'))
        lab.sbc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "configuration reloaded" not in lab.sbc.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Every 1xxx call now hits the reject rule: the caller hears 486, no callee needed.
        caller, _ = call(lab, "uac_reject.xml", None, service="1000")
        assert caller.returncode == 0, _explain(caller, lab)
    finally:
        running.close()  # stops the SBC
