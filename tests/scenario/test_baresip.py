"""Two real softphones (baresip) calling through the real SBC, tones checked both ways.

Phone A (127.0.0.2) plays 440 Hz, phone B (127.0.0.3) plays 1000 Hz; each records
what it hears. Both tones are multiples of tones.BLOCK_SECONDS' 10 Hz bins and sit
well inside G.711's 300-3400 Hz telephony band, far from each other's harmonics.

The first tests prove the pure helpers (netstrings, the SIP trace parser, tone
detection) in milliseconds; the scenario tests need ``baresip`` (Debian
``baresip-core``) and are skipped without it, except under CI (``CI`` set), where
a missing baresip fails so that CI cannot silently skip them.

Three kinds of call: A dials B directly (the harness alone); A -> SBC -> B through
a static route; and alice and bob registered with the SBC's embedded default
configuration (registrar, digest auth on REGISTER and INVITE, route "registered"),
once with its ports moved to free ones and once unchanged on 5060/5061/8080, as
`make run` starts it. Each checks the tones, topology hiding and the CDR.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.scenario.baresip_peer import (
    BARESIP,
    BaresipError,
    BaresipEvent,
    BaresipPeer,
    NetstringDecoder,
    NetstringError,
    PeerConfig,
    Registration,
    SipTraceEntry,
    netstring,
    parse_reginfo,
    parse_sip_trace,
    running,
    wait_until,
)
from tests.scenario.sbcproc import Ports, SbcProcess, free_port
from tests.scenario.tones import (
    HAS_TONE_THRESHOLD,
    Tone,
    describe,
    dominant_tones,
    fft,
    has_tone,
    read_wav,
    sine,
    tone_power,
    write_tone,
)

A_ADDRESS, B_ADDRESS = "127.0.0.2", "127.0.0.3"
A_TONE, B_TONE = 440, 1000
# Below the kernel's ephemeral range (32768-60999), above the relay's (20000-29999)
# and SIPp's media ports (31000, 31500) in test_b2bua_sipp.
A_RTP, B_RTP = (32100, 32199), (32200, 32299)
#: How long the phones talk before A hangs up.
TALK_SECONDS = 3.0
#: A tone the other side did not play must stay below this share of the power.
ABSENT = 0.05


def require_baresip() -> str:
    """The baresip executable; skip without it, but fail under CI."""
    if BARESIP is not None:
        return BARESIP
    if os.environ.get("CI"):
        pytest.fail("baresip is not installed (apt-get install baresip-core); CI must not skip")
    pytest.skip("baresip (Debian baresip-core) not installed")


@pytest.fixture
def baresip() -> str:
    return require_baresip()


# -- netstrings and events -------------------------------------------------------------


def test_netstring_round_trip_across_split_reads() -> None:
    payloads = [b'{"event":true}', b"", b"1:2,3"]
    wire = b"".join(netstring(p) for p in payloads)
    assert wire == b'14:{"event":true},0:,5:1:2,3,'
    decoder = NetstringDecoder()
    got = []
    for byte in range(len(wire)):  # one byte at a time: every split point
        got += decoder.feed(wire[byte : byte + 1])
    assert got == payloads


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"x:abc,", "bad netstring length b'x'"),
        (b"03:abc,", "bad netstring length b'03'"),
        (b"3:abcd", "netstring not terminated by ','"),
        (b"99999999:", "netstring of 99999999 bytes exceeds 1048576"),
        (b"12345678901", "bad netstring length b'12345678901'"),
    ],
)
def test_netstring_errors(wire: bytes, message: str) -> None:
    with pytest.raises(NetstringError) as info:
        NetstringDecoder().feed(wire)
    assert str(info.value) == message


def test_event_from_ctrl_tcp_json() -> None:
    raw = (
        '{"event":true,"type":"CALL_ESTABLISHED","class":"call","accountaor":"sip:a@127.0.0.2",'
        '"direction":"outgoing","peeruri":"sip:b@127.0.0.1:5080","id":"7b68c8224ead821a",'
        '"param":"sip:b@127.0.0.1:5080"}'
    )
    assert BaresipEvent.from_json(json.loads(raw)) == BaresipEvent(
        "CALL_ESTABLISHED",
        "sip:a@127.0.0.2",
        "outgoing",
        "sip:b@127.0.0.1:5080",
        "7b68c8224ead821a",
        "sip:b@127.0.0.1:5080",
    )


#: baresip 1.0.0's ``-s`` output, as written to its log (shortened SDP).
TRACE = (
    "baresip is ready.\n"
    "\x1b[36;1m#\nUDP 127.0.0.2:45769 -> 127.0.0.3:33533\n"
    "INVITE sip:b@127.0.0.3:33533 SIP/2.0\nCall-ID: a25613a246d38ef8\nContent-Length: 4\n\n"
    "v=0\n\x1b[;m\n"
    "ua: using AF from sdp offer: af=AF_INET\n"
    "\x1b[36;1m#\nUDP 127.0.0.3:33533 -> 127.0.0.2:45769\n"
    "SIP/2.0 180 Ringing\nCall-ID: a25613a246d38ef8\nContent-Length: 0\n\n\x1b[;m\n"
    "call: answering call on line 1 from sip:a@127.0.0.2 with 200\n"
)


def test_sip_trace_parser_splits_messages_and_directions() -> None:
    assert parse_sip_trace(TRACE) == [
        SipTraceEntry(
            "UDP",
            "127.0.0.2:45769",
            "127.0.0.3:33533",
            "INVITE sip:b@127.0.0.3:33533 SIP/2.0\nCall-ID: a25613a246d38ef8\n"
            "Content-Length: 4\n\nv=0",
        ),
        SipTraceEntry(
            "UDP",
            "127.0.0.3:33533",
            "127.0.0.2:45769",
            "SIP/2.0 180 Ringing\nCall-ID: a25613a246d38ef8\nContent-Length: 0",
        ),
    ]


def test_reginfo_states() -> None:
    aor = "sip:alice@127.0.0.1:5080"
    ok = "\n--- User Agents (1) ---\n> sip:alice@127.0.0.1:5080   \x1b[32mOK \x1b[;m  Expires 60s\n"
    err = "\n--- User Agents (1) ---\n> sip:alice@127.0.0.1:5080   \x1b[31mERR\x1b[;m  Expires 0s\n"
    idle = "\n--- User Agents (1) ---\n> sip:alice@127.0.0.1:5080   \x1b[33mzzz\x1b[;m\n"
    assert parse_reginfo(ok, aor) is Registration.OK
    assert parse_reginfo(err, aor) is Registration.FAILED
    assert parse_reginfo(idle, aor) is Registration.PENDING
    assert parse_reginfo(ok, "sip:bob@127.0.0.1:5080") is Registration.PENDING


def test_peer_config_account_lines() -> None:
    direct = PeerConfig("b", B_ADDRESS, B_TONE, B_RTP)
    assert direct.account_line() == (
        "<sip:b@127.0.0.3>;audio_codecs=pcmu;answermode=auto;regint=0\n"
    )
    registered = PeerConfig(
        "alice", A_ADDRESS, A_TONE, A_RTP, registrar="127.0.0.1:5080", password="s3cret"
    )
    assert registered.account_line() == (
        "<sip:alice@127.0.0.1:5080>;audio_codecs=pcmu;answermode=auto;regint=60;"
        "auth_user=alice;auth_pass=s3cret\n"
    )
    named = PeerConfig(
        "bob", B_ADDRESS, B_TONE, B_RTP, registrar="127.0.0.1:5080", domain="sbc.test"
    )
    assert named.aor() == "sip:bob@sbc.test"
    assert named.account_line().endswith(';auth_user=bob;outbound="sip:127.0.0.1:5080"\n')
    config = registered.config_text(40000, 40010, Path("/t/tone.wav"), Path("/t/rec"))
    assert re.search(r"(?m)^sip_listen +127\.0\.0\.2:40000$", config)
    assert re.search(r"(?m)^net_interface +127\.0\.0\.2$", config)
    assert re.search(r"(?m)^audio_source +aufile,/t/tone\.wav$", config)
    assert re.search(r"(?m)^rtp_ports +32100-32199$", config)
    assert re.search(r"(?m)^ctrl_tcp_listen +127\.0\.0\.2:40010$", config)
    assert "s3cret" not in config


# -- tones -------------------------------------------------------------------------------


def _mix(*parts: array.array[int]) -> list[int]:
    return [sum(values) for values in zip(*parts, strict=True)]


def test_tone_file_round_trip(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "a.wav", 440, 0.5)
    samples, rate = read_wav(path)
    assert rate == 8000 and len(samples) == 4000
    assert max(samples) == 16384 and min(samples) == -16384
    assert samples == sine(440, 0.5)


def test_tone_power_of_a_clean_tone_and_of_others() -> None:
    tone = sine(440, 1.0)
    assert tone_power(tone, 440) == pytest.approx(1.0, abs=1e-6)
    assert tone_power(tone, 1000) < 1e-6
    assert tone_power(tone, 450) < 1e-6  # the neighbouring 10 Hz bin
    assert has_tone(tone, 440) and not has_tone(tone, 1000)


def test_tone_power_of_a_mix_is_its_share() -> None:
    mix = _mix(sine(440, 1.0, amplitude=0.4), sine(1000, 1.0, amplitude=0.2))
    # Power goes with amplitude squared: 0.16 : 0.04.
    assert tone_power(mix, 440) == pytest.approx(0.8, abs=1e-3)
    assert tone_power(mix, 1000) == pytest.approx(0.2, abs=1e-3)
    assert has_tone(mix, 440) and not has_tone(mix, 1000)
    assert has_tone(mix, 1000, threshold=0.15)


def test_threshold_is_a_dominance_test() -> None:
    equal = _mix(sine(440, 1.0, amplitude=0.3), sine(1000, 1.0, amplitude=0.3))
    assert tone_power(equal, 440) == pytest.approx(HAS_TONE_THRESHOLD, abs=1e-3)


def test_silence_and_short_input_have_no_tone() -> None:
    assert tone_power([0] * 8000, 440) == 0.0
    assert tone_power([], 440) == 0.0
    assert tone_power(sine(440, 0.05), 440) == 0.0  # shorter than one 100 ms block
    assert dominant_tones([0] * 2048) == []


def test_leading_silence_does_not_dilute_the_tone() -> None:
    late = [0] * 4000 + list(sine(1000, 1.0))
    assert tone_power(late, 1000) == pytest.approx(1.0, abs=1e-6)


def test_dominant_tones_finds_both_tones_of_a_mix() -> None:
    mix = _mix(sine(440, 0.5, amplitude=0.4), sine(1000, 0.5, amplitude=0.2))
    first, second = dominant_tones(mix, count=2)
    assert abs(first.freq - 440) <= 8000 / 1024 and first.share == pytest.approx(0.8, abs=0.02)
    assert abs(second.freq - 1000) <= 8000 / 1024 and second.share == pytest.approx(0.2, abs=0.02)
    assert "peaks: 438 Hz 0.80" in describe(mix)


def test_fft_matches_the_dft_definition() -> None:
    values = [complex(math.sin(n), n % 3) for n in range(8)]
    dft = [
        sum(v * complex(math.cos(-2 * math.pi * k * n / 8), math.sin(-2 * math.pi * k * n / 8))
            for n, v in enumerate(values))
        for k in range(8)
    ]  # fmt: skip
    assert fft(values) == pytest.approx(dft)
    with pytest.raises(ValueError) as info:
        fft([0j] * 6)
    assert str(info.value) == "FFT size 6 is not a power of two"


def test_tone_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^frequency 4000 Hz is not between 0 and 4000\.0 Hz"):
        sine(4000, 1.0)
    with pytest.raises(ValueError, match=r"^amplitude 1\.5 is not in \(0, 1\]$"):
        sine(440, 1.0, amplitude=1.5)
    assert Tone(440.0, 1.0) == Tone(440.0, 1.0)


# -- real phones -------------------------------------------------------------------------


def assert_heard(samples: array.array[int], expected: int, absent: int, who: str) -> None:
    """``who`` heard ``expected`` (dominant) for most of the talk time, not ``absent``."""
    frames = [samples[i : i + 160] for i in range(0, len(samples) - 159, 160)]  # 20 ms
    loud = 0.02 * sum(1 for f in frames if math.sqrt(sum(x * x for x in f) / 160) > 1000)
    heard, other = tone_power(samples, expected), tone_power(samples, absent)
    # (An assert's message is built only when it fails: describe() runs an FFT.)
    assert loud >= 0.8 * TALK_SECONDS, f"{who}: sound for {loud:.2f} s; {describe(samples)}"
    assert heard > 0.9, f"{who}: {expected} Hz at {heard:.3f}; {describe(samples)}"
    assert other < ABSENT, f"{who}: {absent} Hz at {other:.3f}; {describe(samples)}"


def test_assert_heard_rejects_silence_short_calls_and_the_wrong_tone() -> None:
    talk = int(TALK_SECONDS * 8000)
    assert_heard(sine(A_TONE, TALK_SECONDS), A_TONE, B_TONE, "x")
    for samples in (
        array.array("h", [0] * talk),  # silence
        sine(A_TONE, TALK_SECONDS / 2),  # sound for half the talk time only
        sine(B_TONE, TALK_SECONDS),  # the other tone
        array.array(
            "h", _mix(sine(A_TONE, TALK_SECONDS), sine(B_TONE, TALK_SECONDS, amplitude=0.2))
        ),
    ):
        with pytest.raises(AssertionError):
            assert_heard(samples, A_TONE, B_TONE, "x")


def test_missing_baresip_skips_locally_but_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "BARESIP", None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_baresip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must not skip"):
        require_baresip()


def test_harness_direct_call_without_sbc(tmp_path: Path, baresip: str) -> None:
    """The harness alone: A calls B directly; if this fails, the SBC is not to blame."""
    b_config = PeerConfig("b", B_ADDRESS, B_TONE, B_RTP)
    a_config = PeerConfig("a", A_ADDRESS, A_TONE, A_RTP)
    with running(tmp_path, b_config, a_config) as (b, a):
        established = a.dial(b.uri)
        assert b.wait_established().call_id == established.call_id  # no B2BUA between
        a.pump_for(TALK_SECONDS)
        a.hangup()
        b.wait_closed()
        assert_heard(b.recording(), A_TONE, B_TONE, "b")
        assert_heard(a.recording(), B_TONE, A_TONE, "a")
        assert has_tone(a.transmitted(), A_TONE)


class FakeRegistrar:
    """A UDP registrar stub, to prove the harness registers before the SBC can.

    Challenges every REGISTER without credentials (401, RFC 3261 22.2; digest
    without qop, RFC 2617 3.2.2.1) and answers the retry 200 when the digest
    matches ``password``, 403 otherwise. Serves in a thread until ``close``.
    """

    REALM = "fake.test"

    def __init__(self, password: str) -> None:
        self.password = password
        self.requests: list[str] = []
        self.statuses: list[int] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            request = data.decode(errors="replace")
            if not request.startswith("REGISTER "):
                continue
            self.requests.append(request)
            status, extra = self._answer(request)
            self.statuses.append(status)
            self._sock.sendto(self._response(request, status, extra).encode(), source)

    def _answer(self, request: str) -> tuple[int, list[str]]:
        auth = _header(request, "Authorization")
        if auth is None:
            challenge = f'Digest realm="{self.REALM}", nonce="n{len(self.requests)}", algorithm=MD5'
            return 401, [f"WWW-Authenticate: {challenge}"]
        fields = dict(re.findall(r'(\w+)="?([^",]*)"?', auth))

        def md5(text: str) -> str:
            return hashlib.md5(text.encode()).hexdigest()

        ha1 = md5(f"{fields.get('username')}:{self.REALM}:{self.password}")
        expected = md5(f"{ha1}:{fields.get('nonce')}:{md5('REGISTER:' + fields.get('uri', ''))}")
        if fields.get("response") != expected:
            return 403, []
        contact = _header(request, "Contact") or ""
        return 200, [f"Contact: {contact.split(';')[0]};expires=60"]

    @staticmethod
    def _response(request: str, status: int, extra: list[str]) -> str:
        reason = {200: "OK", 401: "Unauthorized", 403: "Forbidden"}[status]
        to = _header(request, "To") or ""
        lines = [f"SIP/2.0 {status} {reason}"]
        lines += [f"Via: {v}" for v in re.findall(r"(?mi)^Via:\s*(.*?)\s*$", request)]
        lines += [
            f"From: {_header(request, 'From')}",
            f"To: {to};tag=fake" if "tag=" not in to else f"To: {to}",
            f"Call-ID: {_header(request, 'Call-ID')}",
            f"CSeq: {_header(request, 'CSeq')}",
            *extra,
            "Content-Length: 0",
        ]
        return "\r\n".join(lines) + "\r\n\r\n"


def _header(message: str, name: str) -> str | None:
    found = re.search(rf"(?mi)^{name}:\s*(.*?)\s*$", message)
    return found.group(1) if found else None


@contextlib.contextmanager
def fake_registrar(password: str) -> Iterator[FakeRegistrar]:
    registrar = FakeRegistrar(password)
    try:
        yield registrar
    finally:
        registrar.close()


def test_harness_registers_with_digest_credentials(tmp_path: Path, baresip: str) -> None:
    with fake_registrar("s3cret-pw") as registrar:
        config = PeerConfig(
            "alice",
            A_ADDRESS,
            A_TONE,
            A_RTP,
            registrar=f"127.0.0.1:{registrar.port}",
            password="s3cret-pw",
        )
        with BaresipPeer(tmp_path, config) as alice:
            assert alice.start().registration() is Registration.OK
            assert registrar.statuses == [401, 200]
            retry = registrar.requests[1]
            assert re.search(r'(?m)^Authorization: Digest .*username="alice"', retry), retry
            assert "s3cret-pw" not in "".join(registrar.requests)  # only its digest


def test_harness_registers_a_named_domain_through_the_registrar(
    tmp_path: Path, baresip: str
) -> None:
    with fake_registrar("pw") as registrar:
        config = PeerConfig(
            "bob",
            B_ADDRESS,
            B_TONE,
            B_RTP,
            registrar=f"127.0.0.1:{registrar.port}",
            password="pw",
            domain="sbc.test",
        )
        with BaresipPeer(tmp_path, config) as bob:
            assert bob.start().registration() is Registration.OK
            assert registrar.requests[0].startswith("REGISTER sip:sbc.test SIP/2.0")
            assert re.search(r"(?m)^To: <sip:bob@sbc\.test>", registrar.requests[0])


def test_harness_reports_a_refused_registration(tmp_path: Path, baresip: str) -> None:
    with fake_registrar("the-right-one") as registrar:
        config = PeerConfig(
            "alice",
            A_ADDRESS,
            A_TONE,
            A_RTP,
            registrar=f"127.0.0.1:{registrar.port}",
            password="wrong",
        )
        with BaresipPeer(tmp_path, config) as alice, pytest.raises(BaresipError) as info:
            alice.start()
        assert str(info.value) == "baresip alice: registration refused"
        assert registrar.statuses[:2] == [401, 403]


@dataclass
class Lab:
    sbc: SbcProcess
    #: The SBC's UDP listener in realm "lan": what A dials.
    lan_port: int


def relay_config(workdir: Path, plain: int, lan: int, mgmt: int, b_port: int) -> str:
    """Realm "lan" on 127.0.0.1:lan; every call is relayed to phone B."""
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
  - name: lan
    listen: [{{transport: udp, address: 127.0.0.1, port: {lan}}}]
    media_address: 127.0.0.1
routes:
  - {{name: to-b, action: trunk, realm: lan, host: {B_ADDRESS}, port: {b_port}, transport: udp}}
"""


@contextlib.contextmanager
def sbc_relaying_to(workdir: Path, b_port: int) -> Iterator[Lab]:
    plain, lan = free_port(also_udp=True), free_port(also_udp=True)
    mgmt = free_port()
    config = workdir / "sbc.yaml"
    config.write_text(relay_config(workdir, plain, lan, mgmt, b_port))
    sbc = SbcProcess(workdir, config, Ports(plain, 0, mgmt)).start()
    try:
        yield Lab(sbc, lan)
    finally:
        sbc.stop()


def sdp_media(message: str) -> tuple[str, int]:
    """(c= address, m=audio port) of a message's SDP."""
    address = re.search(r"(?m)^c=IN IP4 (\S+)", message)
    port = re.search(r"(?m)^m=audio (\d+) ", message)
    assert address and port, message
    return address.group(1), int(port.group(1))


@dataclass
class SbcCall:
    """One call A -> SBC -> B, run once for the tests below, and what each side saw."""

    lan_port: int
    sbc_log: str
    health_in_call: dict[str, object]
    health_after: dict[str, object]
    established_a: BaresipEvent
    established_b: BaresipEvent
    heard_by_a: array.array[int]
    heard_by_b: array.array[int]
    a_address: str
    b_address: str
    #: The SIP messages each phone sent and received.
    a_trace: list[SipTraceEntry]
    b_trace: list[SipTraceEntry]

    def received(self, side: str) -> list[SipTraceEntry]:
        trace, own = (
            (self.a_trace, self.a_address) if side == "a" else (self.b_trace, self.b_address)
        )
        return [e for e in trace if e.destination == own]

    def sent(self, side: str) -> list[SipTraceEntry]:
        trace, own = (
            (self.a_trace, self.a_address) if side == "a" else (self.b_trace, self.b_address)
        )
        return [e for e in trace if e.source == own]


@pytest.fixture(scope="module")
def sbc_call(tmp_path_factory: pytest.TempPathFactory) -> SbcCall:
    """A (440 Hz) dials sip:b@SBC; the route relays to B (1000 Hz); A hangs up after 3 s."""
    require_baresip()
    workdir = tmp_path_factory.mktemp("baresip-sbc")
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(BaresipPeer(workdir, PeerConfig("b", B_ADDRESS, B_TONE, B_RTP)))
        b.start()
        lab = stack.enter_context(sbc_relaying_to(workdir, b.sip_port))
        a = stack.enter_context(BaresipPeer(workdir, PeerConfig("a", A_ADDRESS, A_TONE, A_RTP)))
        a.start()

        established_a = a.dial(f"sip:b@127.0.0.1:{lab.lan_port}")
        established_b = b.wait_established()
        _, in_call = lab.sbc.health()
        a.pump_for(TALK_SECONDS)
        a.hangup()
        b.wait_closed()
        wait_until(lambda: lab.sbc.health()[1].get("calls") == 0, 5)
        return SbcCall(
            lan_port=lab.lan_port,
            sbc_log=lab.sbc.log(),
            health_in_call=in_call,
            health_after=lab.sbc.health()[1],
            established_a=established_a,
            established_b=established_b,
            heard_by_a=a.recording(),
            heard_by_b=b.recording(),
            a_address=f"{A_ADDRESS}:{a.sip_port}",
            b_address=f"{B_ADDRESS}:{b.sip_port}",
            a_trace=a.sip_trace(),
            b_trace=b.sip_trace(),
        )
    raise AssertionError("unreachable")  # for mypy: ExitStack may swallow exceptions


def test_tones_cross_the_sbc_both_ways(sbc_call: SbcCall) -> None:
    assert_heard(sbc_call.heard_by_b, A_TONE, B_TONE, "b")
    assert_heard(sbc_call.heard_by_a, B_TONE, A_TONE, "a")


def test_the_call_went_through_the_sbc(sbc_call: SbcCall) -> None:
    assert sbc_call.health_in_call.get("calls") == 1, sbc_call.health_in_call
    assert sbc_call.health_after.get("calls") == 0, sbc_call.health_after
    log = sbc_call.sbc_log
    route = rf"- call (\w+): lan sip:b@127\.0\.0\.1:{sbc_call.lan_port} -> route to-b"
    routed = re.search(route, log)
    assert routed, log[-3000:]
    assert re.search(rf"- call {routed.group(1)} ended \(200\b", log), log[-3000:]
    # Two dialogs (a B2BUA), and every message B received came from the SBC's listener.
    assert sbc_call.established_a.call_id != sbc_call.established_b.call_id
    received = sbc_call.received("b")
    assert {e.source for e in received} == {f"127.0.0.1:{sbc_call.lan_port}"}, received
    requests = [e.message.split(" ", 1)[0] for e in received if not e.message.startswith("SIP/")]
    assert requests[0] == "INVITE" and "ACK" in requests and requests[-1] == "BYE", requests
    # Media: B was offered the relay, not A.
    invite = next(e.message for e in received if e.message.startswith("INVITE "))
    a_invite = next(e.message for e in sbc_call.sent("a") if e.message.startswith("INVITE "))
    relay_address, relay_port = sdp_media(invite)
    assert relay_address == "127.0.0.1" and 20000 <= relay_port <= 29999, invite
    assert relay_port != sdp_media(a_invite)[1]


def test_sip_headers_hide_each_side_from_the_other(sbc_call: SbcCall) -> None:
    """RFC 3261 headers B received name only the SBC; same for A (SDP: next test)."""
    a_invite = next(e.message for e in sbc_call.sent("a") if e.message.startswith("INVITE "))
    a_tag = re.search(r"(?m)^From:.*;tag=([^;\s]+)", a_invite)
    assert a_tag
    a_port = sbc_call.a_address.rsplit(":", 1)[1]
    heads_b = "\n".join(e.message.split("\n\n", 1)[0] for e in sbc_call.received("b"))
    for secret in (A_ADDRESS, sbc_call.established_a.call_id, a_tag.group(1)):
        assert secret not in heads_b, secret
    if a_port != str(sbc_call.lan_port):  # same number on another address: cannot tell
        assert not re.search(rf":{a_port}\b", heads_b)
    heads_a = "\n".join(e.message.split("\n\n", 1)[0] for e in sbc_call.received("a"))
    for secret in (B_ADDRESS, sbc_call.established_b.call_id):
        assert secret not in heads_a, secret


def test_sdp_hides_each_side_from_the_other(sbc_call: SbcCall) -> None:
    """Not a byte of A's address in anything B received, SDP included, and back."""
    for side, other in (("b", A_ADDRESS), ("a", B_ADDRESS)):
        for entry in sbc_call.received(side):
            leaks = [line for line in entry.message.splitlines() if other in line]
            assert not leaks, f"{side} received {other}: {leaks}"


# -- registered phones: the embedded default ---------------------------------------------

#: The SBC's command line, run with this interpreter (the venv's).
SBC_CLI: Final = (sys.executable, "-m", "sbc")
#: Ports of the embedded default (`make run`): UDP/TCP SIP, TLS SIP, management.
DEFAULT_PORTS: Final = (5060, 5061, 8080)
#: How long the unchanged-default test waits for another test run to free those ports.
DEFAULT_PORTS_WAIT: Final = 30.0
#: The registrar's digest realm in the default config (``registrar.realm``).
DIGEST_REALM: Final = "sbc"


@functools.cache
def embedded_default_config() -> str:
    """What ``sbc default-config`` prints: the configuration of ``sbc run`` without --config."""
    return subprocess.run(
        [*SBC_CLI, "default-config"], check=True, capture_output=True, text=True, timeout=30
    ).stdout


def default_config_on_free_ports(ports: Ports) -> str:
    """The embedded default configuration, its listeners moved off 5060/5061/8080.

    Only the ports change (tests must never bind the well-known ones); state_dir
    stays ./state, which resolves against the file's directory.
    """
    text = embedded_default_config()
    # Wherever the listeners sit (sip.listen or a realm's listen), only the ports move.
    moves = {
        r"(?m)^(\s*- \{transport: (?:udp|tcp), address: 127\.0\.0\.1, port: )5060\}": ports.sip,
        r"(?m)^(\s*- \{transport: tls, address: 127\.0\.0\.1, port: )5061\}": ports.tls,
        r"(?m)^(\s*listen: \{address: 127\.0\.0\.1, port: )8080\}": ports.mgmt,
    }
    for pattern, port in moves.items():
        text, count = re.subn(pattern, rf"\g<1>{port}}}", text)
        assert count >= 1, f"default config changed shape: {pattern}"
    return text


def test_default_config_on_free_ports_moves_only_the_ports() -> None:
    ports = Ports(40001, 40002, 40003)
    default = embedded_default_config()
    moved = default_config_on_free_ports(ports)
    changed = [
        (old, new)
        for old, new in zip(default.splitlines(), moved.splitlines(), strict=True)
        if old != new
    ]
    assert changed == [
        (
            "  listen: {address: 127.0.0.1, port: 8080}   # admin UI and REST API",
            "  listen: {address: 127.0.0.1, port: 40003}   # admin UI and REST API",
        ),
        (
            "      - {transport: udp, address: 127.0.0.1, port: 5060}",
            "      - {transport: udp, address: 127.0.0.1, port: 40001}",
        ),
        (
            "      - {transport: tcp, address: 127.0.0.1, port: 5060}",
            "      - {transport: tcp, address: 127.0.0.1, port: 40001}",
        ),
        (
            "      - {transport: tls, address: 127.0.0.1, port: 5061}",
            "      - {transport: tls, address: 127.0.0.1, port: 40002}",
        ),
    ]


def add_users(state_dir: Path, passwords: dict[str, str]) -> None:
    """``sbc user add NAME --password-stdin`` for each user (digest realm "sbc")."""
    for user, password in passwords.items():
        subprocess.run(
            [*SBC_CLI, "user", "add", user, "--password-stdin", "--state-dir", str(state_dir)],
            input=password + "\n",
            text=True,
            check=True,
            capture_output=True,
            timeout=30,
        )


def read_cdrs(path: Path) -> list[dict[str, object]]:
    """Every row of the ``cdr`` table, as column -> value."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM cdr ORDER BY id")]


def final_statuses(trace: list[SipTraceEntry], own: str, method: str) -> list[int]:
    """Final statuses (RFC 3261 7.2: 200..699) of the responses to ``method`` that the
    phone at ``own`` received, in order."""
    cseq = re.compile(rf"(?mi)^CSeq: *\d+ {method}\s*$")
    found = [
        int(e.message.split(" ", 2)[1])
        for e in trace
        if e.destination == own and e.message.startswith("SIP/2.0 ") and cseq.search(e.message)
    ]
    return [status for status in found if status >= 200]


def requests_sent(trace: list[SipTraceEntry], own: str, method: str) -> list[str]:
    """The ``method`` requests the phone at ``own`` sent, in order."""
    return [e.message for e in trace if e.source == own and e.message.startswith(f"{method} ")]


def identifiers(trace: list[SipTraceEntry], own: str) -> set[str]:
    """What names the dialogs of the phone at ``own``: every Call-ID in its trace (its
    own and the SBC's leg towards it) and the tags it chose (From of its requests, To
    of its responses, RFC 3261 19.3)."""
    found = {m.group(1) for e in trace for m in [_CALL_ID.search(e.message)] if m}
    for entry in trace:
        if entry.source != own:
            continue
        header = "To" if entry.message.startswith("SIP/2.0 ") else "From"
        tag = re.search(rf"(?mi)^{header}:.*;tag=([^;\s]+)", entry.message)
        if tag:
            found.add(tag.group(1))
    return found


_CALL_ID = re.compile(r"(?mi)^Call-ID: *(\S+)")


@dataclass(frozen=True)
class RegisteredCall:
    """alice -> SBC -> bob between two registered phones, and what everyone saw."""

    sip_port: int
    passwords: dict[str, str]
    health_in_call: dict[str, object]
    sbc_exit: int | None
    sbc_log: str
    cdrs: list[dict[str, object]]
    established_alice: BaresipEvent
    established_bob: BaresipEvent
    heard_by_alice: array.array[int]
    heard_by_bob: array.array[int]
    alice: str
    bob: str
    alice_trace: list[SipTraceEntry]
    bob_trace: list[SipTraceEntry]

    def received(self, own: str) -> list[SipTraceEntry]:
        trace = self.alice_trace if own == self.alice else self.bob_trace
        return [e for e in trace if e.destination == own]


def call_between_registered_phones(
    workdir: Path, config: Path | None, ports: Ports
) -> RegisteredCall:
    """Add alice and bob, start the SBC, register both phones, alice calls bob by name.

    ``config`` None runs the embedded default (``sbc run`` without --config, cwd
    ``workdir``); either way the state directory is ``workdir/state``. The SBC is
    stopped with SIGTERM before the CDR is read: the CDR store flushes on stop.
    """
    passwords = {"alice": "alice-" + os.urandom(6).hex(), "bob": "bob-" + os.urandom(6).hex()}
    add_users(workdir / "state", passwords)
    sbc = SbcProcess(workdir, config, ports).start()
    try:
        registrar = f"127.0.0.1:{ports.sip}"
        bob_config = PeerConfig(
            "bob", B_ADDRESS, B_TONE, B_RTP, registrar=registrar, password=passwords["bob"]
        )
        alice_config = PeerConfig(
            "alice", A_ADDRESS, A_TONE, A_RTP, registrar=registrar, password=passwords["alice"]
        )
        with running(workdir, bob_config, alice_config) as (bob, alice):  # both registered
            established_alice = alice.dial(f"sip:bob@{registrar}")
            established_bob = bob.wait_established()
            _, in_call = sbc.health()
            alice.pump_for(TALK_SECONDS)
            alice.hangup()
            bob.wait_closed()
            heard_by_alice, heard_by_bob = alice.recording(), bob.recording()
            alice_at, bob_at = f"{A_ADDRESS}:{alice.sip_port}", f"{B_ADDRESS}:{bob.sip_port}"
            alice_trace, bob_trace = alice.sip_trace(), bob.sip_trace()
    finally:
        sbc_exit = sbc.stop()
    return RegisteredCall(
        sip_port=ports.sip,
        passwords=passwords,
        health_in_call=in_call,
        sbc_exit=sbc_exit,
        sbc_log=sbc.log(),
        cdrs=read_cdrs(workdir / "state" / "cdr.sqlite"),
        established_alice=established_alice,
        established_bob=established_bob,
        heard_by_alice=heard_by_alice,
        heard_by_bob=heard_by_bob,
        alice=alice_at,
        bob=bob_at,
        alice_trace=alice_trace,
        bob_trace=bob_trace,
    )


def assert_registered_call(call: RegisteredCall) -> None:
    """What the phones, the SBC's log and its CDR say about a call between users."""
    log_tail = call.sbc_log[-3000:]
    sbc_at = f"127.0.0.1:{call.sip_port}"
    # RFC 3261 22.2: each REGISTER challenged (401), the retry with credentials accepted.
    for own, trace in ((call.alice, call.alice_trace), (call.bob, call.bob_trace)):
        assert final_statuses(trace, own, "REGISTER")[:2] == [401, 200], (own, trace)
        challenge = next(e.message for e in trace if e.message.startswith("SIP/2.0 401 "))
        # One challenge, MD5 only (registrar.digest_algorithms: []): baresip 1.0.0 gives
        # up on a SHA-256 one (RFC 8760 lets a server offer several).
        offered = re.findall(r"(?mi)^WWW-Authenticate: *(Digest .*)$", challenge)
        assert len(offered) == 1, challenge
        assert f'realm="{DIGEST_REALM}"' in offered[0], challenge
        assert "algorithm=MD5" in offered[0], challenge
    # RFC 3261 22.3: the INVITE is challenged by the SBC as a proxy would (407), and
    # the retry carries Proxy-Authorization for alice.
    assert final_statuses(call.alice_trace, call.alice, "INVITE")[0] == 407, call.alice_trace
    assert final_statuses(call.alice_trace, call.alice, "INVITE")[-1] == 200, call.alice_trace
    invites = requests_sent(call.alice_trace, call.alice, "INVITE")
    assert len(invites) == 2, invites
    assert "Proxy-Authorization" not in invites[0]
    challenge = next(e.message for e in call.alice_trace if e.message.startswith("SIP/2.0 407 "))
    assert re.search(rf'(?mi)^Proxy-Authenticate: Digest .*realm="{DIGEST_REALM}"', challenge)
    assert re.search(r'(?m)^Proxy-Authorization: Digest .*username="alice"', invites[1])
    # bob was called at his registered contact, by the SBC's listener, as a new dialog.
    to_bob = [e for e in call.received(call.bob) if e.message.startswith("INVITE ")]
    assert len(to_bob) == 1, to_bob
    assert to_bob[0].source == sbc_at, to_bob[0]
    # RFC 3261 10.3 and 16.5: the Request-URI is the Contact bob registered.
    register = requests_sent(call.bob_trace, call.bob, "REGISTER")[-1]
    contact = re.search(r"(?mi)^Contact: *<(sip:[^>;]+)>", register)
    assert contact and contact.group(1).endswith(f"@{call.bob}"), register
    assert to_bob[0].message.startswith(f"INVITE {contact.group(1)} SIP/2.0\n"), to_bob[0]
    assert call.established_alice.call_id != call.established_bob.call_id
    assert call.health_in_call.get("calls") == 1, call.health_in_call
    assert re.search(r"- call \w+: phones sip:bob@\S+ -> route users", call.sbc_log), log_tail
    # Media crossed the relay both ways.
    assert_heard(call.heard_by_bob, A_TONE, B_TONE, "bob")
    assert_heard(call.heard_by_alice, B_TONE, A_TONE, "alice")
    # Topology hiding: not a byte of one phone's address, Call-IDs or tags in anything
    # the other received, SIP headers and SDP alike.
    for own, other, other_at, trace in (
        (call.bob, A_ADDRESS, call.alice, call.alice_trace),
        (call.alice, B_ADDRESS, call.bob, call.bob_trace),
    ):
        hidden = {other, *identifiers(trace, other_at)}
        # The search can find what it looks for: each phone's own Call-ID comes back to it.
        established = call.established_alice if other_at == call.alice else call.established_bob
        assert established.call_id in hidden, (established, hidden)
        assert any(established.call_id in e.message for e in call.received(other_at))
        for entry in call.received(own):
            leaks = sorted(s for s in hidden if s in entry.message)
            assert not leaks, f"{own} received {leaks}:\n{entry.message}"
    # Passwords go nowhere: only digests cross the wire, and the log has neither.
    everything = "".join(e.message for e in call.alice_trace + call.bob_trace) + call.sbc_log
    for password in call.passwords.values():
        assert password not in everything
    # RFC 3261 15.1: alice's BYE ended it; the SBC stopped cleanly and wrote one CDR.
    assert call.sbc_exit == 0, log_tail
    assert len(call.cdrs) == 1, call.cdrs
    cdr = call.cdrs[0]
    assert cdr["disposition"] == "answered", cdr
    assert (cdr["a_realm"], cdr["b_realm"]) == ("phones", "phones"), cdr
    assert "alice" in str(cdr["caller"]), cdr
    assert cdr["hangup_side"] == "caller", cdr
    assert isinstance(cdr["a_to_b_packets"], int) and cdr["a_to_b_packets"] > 0, cdr
    assert isinstance(cdr["b_to_a_packets"], int) and cdr["b_to_a_packets"] > 0, cdr


@pytest.fixture(scope="module")
def registered_call(tmp_path_factory: pytest.TempPathFactory) -> RegisteredCall:
    """The embedded default, its ports moved to free ones so that other test runs on
    this machine do not collide; state in the fixture's directory, under ./state."""
    require_baresip()
    workdir = tmp_path_factory.mktemp("baresip-registered")
    ports = Ports.pick()
    config = workdir / "sbc.yaml"
    config.write_text(default_config_on_free_ports(ports))
    return call_between_registered_phones(workdir, config, ports)


def test_registered_phones_call_each_other(registered_call: RegisteredCall) -> None:
    """alice and bob REGISTER with the default config (digest auth), alice calls bob by name."""
    assert_registered_call(registered_call)


def test_cdr_records_the_setup_time(registered_call: RegisteredCall) -> None:
    """docs/cdr.md: setup_time is from the INVITE to the first final response."""
    (cdr,) = registered_call.cdrs
    start, answer = cdr["start_time"], cdr["answer_time"]
    assert isinstance(start, float) and isinstance(answer, float), cdr
    assert isinstance(cdr["setup_time"], float), cdr
    assert 0 < cdr["setup_time"] <= answer - start + 0.001, cdr


def busy_default_ports() -> list[str]:
    """Which of UDP/TCP 5060, TCP 5061 and TCP 8080 on 127.0.0.1 cannot be bound now.

    TCP is probed with SO_REUSEADDR, as asyncio binds its servers: a connection left
    in TIME_WAIT does not keep the SBC from listening, another listener does.
    """
    sip, tls, mgmt = DEFAULT_PORTS
    busy = []
    for kind, port in (
        (socket.SOCK_DGRAM, sip),
        (socket.SOCK_STREAM, sip),
        (socket.SOCK_STREAM, tls),
        (socket.SOCK_STREAM, mgmt),
    ):
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                if kind == socket.SOCK_STREAM:
                    s.listen()
            except OSError:
                busy.append(f"{'udp' if kind == socket.SOCK_DGRAM else 'tcp'} {port}")
    return busy


def test_phones_register_to_the_make_run_default_and_call_each_other(
    tmp_path: Path, baresip: str
) -> None:
    """`make run` unchanged: no --config, 5060/5061/8080, ./state in the working directory.

    Another test run may hold those ports for a while: wait for them (never take
    them over); if they stay busy, skip locally and fail under CI.
    """
    if not wait_until(lambda: not busy_default_ports(), DEFAULT_PORTS_WAIT, interval=0.5):
        message = f"127.0.0.1 {busy_default_ports()} stayed busy for {DEFAULT_PORTS_WAIT} s"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    call = call_between_registered_phones(tmp_path, None, Ports(*DEFAULT_PORTS))
    assert "listening on udp 127.0.0.1:5060" in call.sbc_log, call.sbc_log[-3000:]
    assert_registered_call(call)
    assert (tmp_path / "state" / "users.sqlite").exists()


def _with_entry(call: RegisteredCall, side: str, entry: SipTraceEntry) -> RegisteredCall:
    if side == "alice":
        return dataclasses.replace(call, alice_trace=[*call.alice_trace, entry])
    return dataclasses.replace(call, bob_trace=[*call.bob_trace, entry])


def test_assert_registered_call_catches_leaks_and_wrong_cdrs(
    registered_call: RegisteredCall,
) -> None:
    """The checks above can fail: each broken copy of the real call is refused."""
    call = registered_call
    alice_call_id = call.established_alice.call_id
    bob_call_id = call.established_bob.call_id
    options = "OPTIONS sip:x SIP/2.0\nContent-Length: 0\n\n"
    sbc_at = f"127.0.0.1:{call.sip_port}"
    broken = {
        "alice's address in bob's SDP": _with_entry(
            call, "bob", SipTraceEntry("UDP", sbc_at, call.bob, options + f"c=IN IP4 {A_ADDRESS}")
        ),
        "alice's Call-ID at bob": _with_entry(
            call, "bob", SipTraceEntry("UDP", sbc_at, call.bob, options + alice_call_id)
        ),
        "bob's leg's Call-ID at alice": _with_entry(
            call, "alice", SipTraceEntry("UDP", sbc_at, call.alice, options + bob_call_id)
        ),
        "a password in the log": dataclasses.replace(
            call, sbc_log=call.sbc_log + call.passwords["bob"]
        ),
        "no CDR": dataclasses.replace(call, cdrs=[]),
        "hung up by bob": dataclasses.replace(
            call, cdrs=[{**call.cdrs[0], "hangup_side": "callee"}]
        ),
        "no media from bob": dataclasses.replace(
            call, cdrs=[{**call.cdrs[0], "b_to_a_packets": 0}]
        ),
    }
    for what, copy in broken.items():
        with pytest.raises(AssertionError):
            assert_registered_call(copy)
            pytest.fail(f"not caught: {what}")  # pragma: no cover


def test_trace_helpers_read_statuses_requests_and_identifiers() -> None:
    a, s = "127.0.0.2:5070", "127.0.0.1:5060"
    trace = [
        SipTraceEntry("UDP", a, s, "INVITE sip:b@x SIP/2.0\nCall-ID: c1\nFrom: <sip:a@x>;tag=ta"),
        SipTraceEntry("UDP", s, a, "SIP/2.0 100 Trying\nCall-ID: c1\nCSeq: 1 INVITE"),
        SipTraceEntry("UDP", s, a, "SIP/2.0 407 Proxy Auth\nCall-ID: c1\nCSeq: 1 INVITE"),
        SipTraceEntry("UDP", s, a, "SIP/2.0 200 OK\nCall-ID: c9\nCSeq: 7 REGISTER"),
        SipTraceEntry("UDP", s, a, "BYE sip:a@x SIP/2.0\nCall-ID: c2\nFrom: <sip:b@x>;tag=tb"),
        SipTraceEntry("UDP", a, s, "SIP/2.0 200 OK\nCall-ID: c2\nTo: <sip:a@x>;tag=tc"),
    ]
    assert final_statuses(trace, a, "INVITE") == [407]
    assert final_statuses(trace, a, "REGISTER") == [200]
    assert final_statuses(trace, s, "INVITE") == []
    assert requests_sent(trace, a, "INVITE") == [trace[0].message]
    assert requests_sent(trace, a, "BYE") == []
    # The SBC's tag "tb" is not the phone's; "tc", the tag it answered with, is.
    assert identifiers(trace, a) == {"c1", "c9", "c2", "ta", "tc"}
