"""SDES-SRTP terminated per leg by the SBC, proved with real softphones (baresip).

Phone A (127.0.0.2, 440 Hz) dials the SBC on a listener of its realm; a static route
relays the call to phone B (127.0.0.3, 1000 Hz) through another realm; each phone
records what it hears. baresip's ``mediaenc=srtp-mand`` offers ``RTP/SAVP`` with one
``a=crypto:1 AES_CM_128_HMAC_SHA1_80`` (RFC 4568) and accepts nothing else; a plain
baresip 1.0.0 answers an ``RTP/SAVP`` offer with 488 ("no common audio codecs").

Each realm's ``srtp`` key is its policy: ``optional`` (the default: an SRTP offer is
terminated by the relay and the offer sent on mirrors it, SRTP only if it was SRTP),
``required`` (SRTP only), ``off`` (plain RTP only) and ``passthrough`` (both realms
passthrough: a=crypto crosses end to end). With the relay terminating SRTP no key
crosses between realms: each phone sees only keys the relay made. A plain callee
in an ``optional`` realm is first offered SRTP (the mirror), refuses it, and is
offered RTP; in an ``off`` realm it is offered RTP at once.

What is checked is what the phones saw: their SIP traces (``baresip -s``), their
recordings (both tones, so SRTP was decrypted and re-encrypted correctly: a phone
with ``srtp-mand`` decodes nothing it cannot authenticate) and their log line
"SRTP is Enabled". No key may appear in the SBC's log.

The scenario tests need ``baresip`` (Debian ``baresip-core`` with its ``srtp.so``)
and are skipped without it, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import array
import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import pytest

from sbc.config.loader import load_config_text
from tests.scenario.baresip_peer import (
    BaresipError,
    BaresipPeer,
    EventType,
    PeerConfig,
    SipTraceEntry,
)
from tests.scenario.sbcproc import Ports, SbcProcess, free_port, wait_until
from tests.scenario.test_baresip import (
    A_ADDRESS,
    A_RTP,
    A_TONE,
    B_ADDRESS,
    B_RTP,
    B_TONE,
    TALK_SECONDS,
    assert_heard,
    final_statuses,
    read_cdrs,
    requests_sent,
    require_baresip,
)

#: baresip's account parameter for SRTP only (RTP/SAVP offers, SAVP answers only).
SRTP_MAND: Final = "srtp-mand"
#: The suite baresip 1.0.0 offers first and the SBC offers (RFC 4568 6.2.1).
SUITE: Final = "AES_CM_128_HMAC_SHA1_80"
#: What baresip's srtp module logs once a stream is protected.
SRTP_ENABLED: Final = "SRTP is Enabled"


@pytest.fixture
def baresip() -> str:
    return require_baresip()


# -- SDP and config helpers ----------------------------------------------------------------


@dataclass(frozen=True)
class SdesKey:
    """One ``a=crypto`` line (RFC 4568 9.1): tag, suite and the inline key||salt."""

    tag: int
    suite: str
    key: str


_CRYPTO_LINE = re.compile(r"(?m)^a=crypto:(\d+) +(\S+) +inline:([A-Za-z0-9+/=]+)")
_AUDIO_LINE = re.compile(r"(?m)^m=audio +\d+ +(\S+)")


def sdp_of(message: str) -> str:
    """The body of a message from the trace (baresip prints it with LF line ends)."""
    return message.partition("\n\n")[2]


def crypto_keys(message: str) -> list[SdesKey]:
    """Every a=crypto of a message's SDP, in order."""
    return [SdesKey(int(t), s, k) for t, s, k in _CRYPTO_LINE.findall(sdp_of(message))]


def audio_proto(message: str) -> str | None:
    """The transport protocol of the SDP's m=audio line (RTP/AVP, RTP/SAVP...)."""
    found = _AUDIO_LINE.search(sdp_of(message))
    return found.group(1) if found else None


def test_sdp_helpers_read_protos_and_keys() -> None:
    message = (
        "SIP/2.0 200 OK\nCSeq: 1 INVITE\nContent-Type: application/sdp\n\n"
        "v=0\nc=IN IP4 127.0.0.1\nm=audio 20000 RTP/SAVP 0 101\na=rtpmap:0 PCMU/8000\n"
        "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:clgRePwJyGwlbnMfzpFaZY0UWPgaPDQZXBp78Evo\n"
        "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:J9KQCflUvHaCenyDf3AhZzc8+BrhRD2x/RAvwpWZ|2^20"
    )
    assert audio_proto(message) == "RTP/SAVP"
    assert crypto_keys(message) == [
        SdesKey(1, SUITE, "clgRePwJyGwlbnMfzpFaZY0UWPgaPDQZXBp78Evo"),
        SdesKey(2, "AES_CM_128_HMAC_SHA1_32", "J9KQCflUvHaCenyDf3AhZzc8+BrhRD2x/RAvwpWZ"),
    ]
    # A header that looks like SDP is not the body.
    headers_only = "INVITE sip:b@x SIP/2.0\nm=audio 1 RTP/SAVP 0\na=crypto:1 X inline:AAAA"
    assert audio_proto(headers_only) is None and crypto_keys(headers_only) == []
    plain = "INVITE sip:b@x SIP/2.0\n\nv=0\nm=audio 4000 RTP/AVP 0"
    assert audio_proto(plain) == "RTP/AVP" and crypto_keys(plain) == []


def test_peer_config_mediaenc_adds_the_parameter_and_the_module() -> None:
    plain = PeerConfig("a", A_ADDRESS, A_TONE, A_RTP)
    srtp = replace(plain, mediaenc=SRTP_MAND)
    assert srtp.account_line() == (
        "<sip:a@127.0.0.2>;audio_codecs=pcmu;answermode=auto;regint=0;mediaenc=srtp-mand\n"
    )
    registered = PeerConfig(
        "alice", A_ADDRESS, A_TONE, A_RTP, registrar="127.0.0.1:5080", mediaenc="srtp"
    )
    assert registered.account_line() == (
        "<sip:alice@127.0.0.1:5080>;audio_codecs=pcmu;answermode=auto;regint=60;"
        "auth_user=alice;mediaenc=srtp\n"
    )
    args = (40000, 40010, Path("/t/tone.wav"), Path("/t/rec"))
    with_srtp = srtp.config_text(*args).splitlines(keepends=True)
    module = [line for line in with_srtp if re.fullmatch(r"module +srtp\.so\n", line)]
    assert len(module) == 1, with_srtp
    # Loaded with the other "module" lines, before account.so reads mediaenc.
    assert with_srtp.index(module[0]) < next(
        i for i, line in enumerate(with_srtp) if line.startswith("module_tmp ")
    )
    # Without mediaenc the files are exactly what they were: no srtp module, no parameter.
    without = plain.config_text(*args)
    assert "srtp" not in without and "mediaenc" not in plain.account_line()
    assert "".join(line for line in with_srtp if line not in module) == without


@dataclass(frozen=True)
class Realm:
    """One realm of the lab: its name and ``srtp`` policy (None: the key is left out)."""

    name: str
    srtp: str | None = None


def lab_config(
    workdir: Path,
    plain: int,
    mgmt: int,
    realms: Mapping[Realm, int],
    routes: Sequence[tuple[str, str]],
    b_port: int,
) -> str:
    """Realms on 127.0.0.1 (each its own UDP port); each ``(from, to)`` route relays
    every call entering realm ``from`` to phone B through realm ``to``."""
    lines = [
        f"state_dir: {workdir / 'state'}",
        "log:",
        "  level: info",
        "sip:",
        "  listen:",
        f"    - {{transport: udp, address: 127.0.0.1, port: {plain}}}",
        "management:",
        f"  listen: {{address: 127.0.0.1, port: {mgmt}}}",
        "realms:",
    ]
    for realm, port in realms.items():
        lines += [
            f"  - name: {realm.name}",
            f"    listen: [{{transport: udp, address: 127.0.0.1, port: {port}}}]",
            "    media_address: 127.0.0.1",
        ]
        if realm.srtp is not None:
            lines.append(f"    srtp: {realm.srtp}")
    lines.append("routes:")
    lines += [
        f"  - {{name: {source}-to-{target}, from_realm: {source}, action: trunk,"
        f" realm: {target}, host: {B_ADDRESS}, port: {b_port}, transport: udp}}"
        for source, target in routes
    ]
    return "\n".join(lines) + "\n"


TWO_REALMS: Final = (Realm("outside"), Realm("inside"))
OUTSIDE_TO_INSIDE: Final = (("outside", "inside"),)


def test_lab_config_writes_the_policy_only_when_given() -> None:
    text = lab_config(
        Path("/w"),
        5000,
        5001,
        {Realm("outside"): 5002, Realm("inside", "required"): 5003},
        [("outside", "inside")],
        5004,
    )
    assert text.count("srtp:") == 1
    assert (
        "  - name: inside\n    listen: [{transport: udp, address: 127.0.0.1, port: 5003}]\n"
        "    media_address: 127.0.0.1\n    srtp: required\nroutes:\n"
    ) in text
    assert (
        "  - {name: outside-to-inside, from_realm: outside, action: trunk, realm: inside,"
        " host: 127.0.0.3, port: 5004, transport: udp}\n"
    ) in text


def test_lab_config_is_a_valid_sbc_config(tmp_path: Path) -> None:
    """The config the scenarios start loads, each policy written bare as a user would
    (``off`` included, which YAML 1.1 alone would read as false)."""
    realms = [Realm("outside"), Realm("inside", "off"), Realm("secure", "required")]
    realms.append(Realm("pt", "passthrough"))
    text = lab_config(
        tmp_path,
        5000,
        5001,
        {realm: 5002 + i for i, realm in enumerate(realms)},
        [("outside", "inside"), ("pt", "secure")],
        5010,
    )
    config = load_config_text(text, "lab.yaml", tmp_path)
    assert [(r.name, str(r.srtp)) for r in config.realms] == [
        ("outside", "optional"),
        ("inside", "off"),
        ("secure", "required"),
        ("pt", "passthrough"),
    ]


# -- calls ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One call A -> SBC -> B: whether it was established, and what each side saw."""

    #: Why A's dial failed (e.g. "CALL_CLOSED (488 Not Acceptable Here)"); None: answered.
    error: str | None
    a_at: str
    b_at: str
    #: The SIP messages each phone sent and received during this call.
    a_trace: tuple[SipTraceEntry, ...]
    b_trace: tuple[SipTraceEntry, ...]
    heard_by_a: array.array[int] | None = None
    heard_by_b: array.array[int] | None = None

    def received(self, side: str) -> list[str]:
        trace, own = (self.a_trace, self.a_at) if side == "a" else (self.b_trace, self.b_at)
        return [e.message for e in trace if e.destination == own]

    def a_invite(self) -> str:
        """The (last) INVITE A sent: its offer."""
        invites = requests_sent(list(self.a_trace), self.a_at, "INVITE")
        assert invites, f"A sent no INVITE: {self.a_trace}"
        return invites[-1]

    def invites_to_b(self) -> list[str]:
        """The INVITEs B received (from the SBC): the offers made into B's realm."""
        return [m for m in self.received("b") if m.startswith("INVITE ")]

    def answer(self, side: str) -> str:
        """The first 2xx to an INVITE that ``side`` received, with SDP (its answer)."""
        found = [
            m
            for m in self.received(side)
            if m.startswith("SIP/2.0 2")
            and re.search(r"(?mi)^CSeq: *\d+ INVITE\s*$", m)
            and sdp_of(m)
        ]
        assert found, f"{side} received no answer ({self.error}): {self.received(side)}"
        return found[0]

    def b_answer(self) -> str:
        """The 2xx B sent to the SBC's INVITE: B's answer."""
        found = [
            e.message
            for e in self.b_trace
            if e.source == self.b_at and e.message.startswith("SIP/2.0 2") and sdp_of(e.message)
        ]
        assert found, f"B sent no answer ({self.error})"
        return found[0]


@dataclass
class SrtpLab:
    """The SBC and both phones, running; ``ports`` maps realm name -> SIP port."""

    sbc: SbcProcess
    a: BaresipPeer
    b: BaresipPeer
    ports: dict[str, int]
    calls: list[Call] = field(default_factory=list)

    def call(self, realm: str) -> Call:
        """A dials B through the SBC's listener in ``realm``; talks, then hangs up.

        A failure to establish is recorded in ``Call.error`` (with both traces), not
        raised: the tests say what should have happened.
        """
        a, b = self.a, self.b
        a_mark, b_mark = len(a.sip_trace()), len(b.sip_trace())
        b_events = len(b.events)
        heard_by_a = heard_by_b = None
        error: str | None = None
        try:
            a.dial(f"sip:b@127.0.0.1:{self.ports[realm]}", timeout=10)
            # B may have refused an offer of this call first (and closed that one).
            b.wait_event(EventType.CALL_ESTABLISHED, timeout=5, after=b_events)
        except BaresipError as exc:
            error = str(exc)
            # Let the ACK of a failure answer, or the SBC's BYE, reach the traces; hang
            # up whatever half is still up so that the next call starts clean.
            a.pump_for(0.5)
            b.pump_for(0.5)
            for phone in (a, b):
                if phone.events and phone.events[-1].type == EventType.CALL_ESTABLISHED:
                    with contextlib.suppress(BaresipError):
                        phone.hangup()
        else:
            a.pump_for(TALK_SECONDS)
            a.hangup()
            b.wait_closed()
            heard_by_a, heard_by_b = a.recording(), b.recording()
        call = Call(
            error=error,
            a_at=f"{A_ADDRESS}:{a.sip_port}",
            b_at=f"{B_ADDRESS}:{b.sip_port}",
            a_trace=tuple(a.sip_trace()[a_mark:]),
            b_trace=tuple(b.sip_trace()[b_mark:]),
            heard_by_a=heard_by_a,
            heard_by_b=heard_by_b,
        )
        self.calls.append(call)
        return call

    def calls_now(self) -> object:
        """The SBC's count of calls in progress (``/healthz``)."""
        return self.sbc.health()[1].get("calls")


@contextlib.contextmanager
def srtp_lab(
    workdir: Path,
    realms: Sequence[Realm],
    routes: Sequence[tuple[str, str]],
    a_mediaenc: str | None,
    b_mediaenc: str | None,
) -> Iterator[SrtpLab]:
    """B, then the SBC (routes to B's port), then A; all stopped (by PID) on exit,
    in reverse order; the SBC's exit status is then ``lab.sbc.proc.returncode``."""
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(
            BaresipPeer(workdir, PeerConfig("b", B_ADDRESS, B_TONE, B_RTP, mediaenc=b_mediaenc))
        )
        b.start()
        ports = {realm.name: free_port(also_udp=True) for realm in realms}
        plain, mgmt = free_port(also_udp=True), free_port()
        config = workdir / "sbc.yaml"
        config.write_text(
            lab_config(workdir, plain, mgmt, {r: ports[r.name] for r in realms}, routes, b.sip_port)
        )
        sbc = SbcProcess(workdir, config, Ports(plain, 0, mgmt)).start()
        stack.callback(sbc.stop)
        a = stack.enter_context(
            BaresipPeer(workdir, PeerConfig("a", A_ADDRESS, A_TONE, A_RTP, mediaenc=a_mediaenc))
        )
        a.start()
        yield SrtpLab(sbc, a, b, ports)


@dataclass(frozen=True)
class Scenario:
    """A lab's calls and what was left once everything stopped."""

    calls: list[Call]
    sbc_log: str
    sbc_exit: int | None
    a_log: str
    b_log: str
    #: The SBC's CDR rows (written by the time it stopped), in order.
    cdrs: list[dict[str, object]] = field(default_factory=list)

    def encryption(self) -> list[tuple[object, object]]:
        """Each call's (a_encryption, b_encryption) as the CDRs recorded them."""
        return [(cdr["a_encryption"], cdr["b_encryption"]) for cdr in self.cdrs]

    @property
    def call(self) -> Call:
        return self.calls[0]


def run_scenario(
    workdir: Path,
    realms: Sequence[Realm],
    routes: Sequence[tuple[str, str]],
    a_mediaenc: str | None,
    b_mediaenc: str | None,
    dial_realms: Sequence[str],
) -> Scenario:
    """One lab, one call per entry of ``dial_realms`` (the realm A dials into)."""
    with srtp_lab(workdir, realms, routes, a_mediaenc, b_mediaenc) as lab:
        for realm in dial_realms:
            lab.call(realm)
            wait_until(lambda: lab.calls_now() == 0, 5, interval=0.1)
    assert lab.sbc.proc is not None
    return Scenario(
        lab.calls,
        lab.sbc.log(),
        lab.sbc.proc.returncode,
        lab.a.log(),
        lab.b.log(),
        read_cdrs(workdir / "state" / "cdr.sqlite"),
    )


def assert_clean_sbc(scenario: Scenario) -> None:
    """The SBC stopped cleanly and logged no key of any a=crypto the phones saw."""
    log = scenario.sbc_log
    assert "Traceback" not in log, log[-3000:]
    assert scenario.sbc_exit == 0, log[-3000:]
    for call in scenario.calls:
        for entry in (*call.a_trace, *call.b_trace):
            for key in crypto_keys(entry.message):
                assert key.key not in log, f"a=crypto key of {entry.source} in the SBC log"


def assert_tones_both_ways(call: Call) -> None:
    assert call.error is None, call.error
    assert call.heard_by_a is not None and call.heard_by_b is not None
    assert_heard(call.heard_by_b, A_TONE, B_TONE, "b")
    assert_heard(call.heard_by_a, B_TONE, A_TONE, "a")


def statuses_sent(call: Call, side: str) -> list[int]:
    """The status codes of the responses ``side`` sent, in order."""
    trace, own = (call.a_trace, call.a_at) if side == "a" else (call.b_trace, call.b_at)
    return [
        int(e.message.split(" ", 2)[1])
        for e in trace
        if e.source == own and e.message.startswith("SIP/2.0 ")
    ]


def only_key(message: str) -> SdesKey:
    """The one a=crypto of a message's SDP (baresip and the SBC offer one each)."""
    keys = crypto_keys(message)
    assert len(keys) == 1, sdp_of(message)
    return keys[0]


# -- 1. SRTP caller, plain callee: terminated on A's leg, plain on B's -------------------------


@pytest.fixture(scope="module")
def srtp_to_plain(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """A (srtp-mand) -> outside (``optional``, the default) -> SBC -> inside (``off``)
    -> B (plain)."""
    require_baresip()
    return run_scenario(
        tmp_path_factory.mktemp("srtp-to-plain"),
        (Realm("outside"), Realm("inside", "off")),
        OUTSIDE_TO_INSIDE,
        SRTP_MAND,
        None,
        ["outside"],
    )


def test_srtp_caller_and_plain_callee_hear_each_other(srtp_to_plain: Scenario) -> None:
    assert_tones_both_ways(srtp_to_plain.call)
    # A's stream was protected (baresip's srtp module), B's was not.
    assert SRTP_ENABLED in srtp_to_plain.a_log
    assert SRTP_ENABLED not in srtp_to_plain.b_log
    assert srtp_to_plain.encryption() == [("srtp", "rtp")]
    assert_clean_sbc(srtp_to_plain)


def test_plain_callee_is_offered_rtp_avp_without_crypto(srtp_to_plain: Scenario) -> None:
    call = srtp_to_plain.call
    # What A offered: SRTP, one key (the checks below would be empty otherwise).
    assert audio_proto(call.a_invite()) == "RTP/SAVP", call.a_invite()
    assert only_key(call.a_invite()).suite == SUITE
    invites = call.invites_to_b()
    assert invites, f"B received no INVITE ({call.error})"
    for invite in invites:
        assert audio_proto(invite) == "RTP/AVP", sdp_of(invite)
        assert "a=crypto" not in invite, sdp_of(invite)


def test_srtp_caller_gets_the_relays_key_and_its_key_stays_on_its_leg(
    srtp_to_plain: Scenario,
) -> None:
    call = srtp_to_plain.call
    offered = only_key(call.a_invite())
    answer = call.answer("a")
    assert audio_proto(answer) == "RTP/SAVP", sdp_of(answer)
    relay_key = only_key(answer)
    # RFC 4568 5.1.2: the answer takes one of the offered suites, under the offer's tag.
    assert (relay_key.tag, relay_key.suite) == (offered.tag, offered.suite), sdp_of(answer)
    assert relay_key.key != offered.key, "the SBC answered A with A's own key"
    for message in call.received("b"):
        assert offered.key not in message, f"B received A's key:\n{message}"
        assert relay_key.key not in message, f"B received A's leg's relay key:\n{message}"


def test_optional_realm_offers_srtp_then_rtp_to_a_plain_callee(
    tmp_path: Path, baresip: str
) -> None:
    """Both realms ``optional``: A's SRTP offer is mirrored, so B is first offered SRTP
    with the relay's own key (never A's); a plain B refuses it (488), and the SBC
    offers it RTP instead: A keeps SRTP with the relay, B talks plain RTP."""
    scenario = run_scenario(tmp_path, TWO_REALMS, OUTSIDE_TO_INSIDE, SRTP_MAND, None, ["outside"])
    call = scenario.call
    assert call.error is None, call.error
    assert_tones_both_ways(call)
    offered = only_key(call.a_invite())
    mirrored_invite, plain_invite = call.invites_to_b()
    assert audio_proto(mirrored_invite) == "RTP/SAVP", sdp_of(mirrored_invite)
    mirrored = only_key(mirrored_invite)
    assert mirrored.suite == SUITE, sdp_of(mirrored_invite)
    assert mirrored.key != offered.key, "B was offered A's key: SRTP passed end to end"
    assert audio_proto(plain_invite) == "RTP/AVP", sdp_of(plain_invite)
    assert "a=crypto" not in plain_invite, sdp_of(plain_invite)
    for message in call.received("b"):
        assert offered.key not in message, f"B received A's key:\n{message}"
    assert statuses_sent(call, "b")[0] == 488
    assert audio_proto(call.answer("a")) == "RTP/SAVP"
    assert SRTP_ENABLED in scenario.a_log and SRTP_ENABLED not in scenario.b_log
    assert scenario.encryption() == [("srtp", "rtp")]
    assert_clean_sbc(scenario)


def test_opportunistic_srtp_caller_gets_srtp_in_the_rtp_profile(
    tmp_path: Path, baresip: str
) -> None:
    """baresip's ``mediaenc=srtp`` offers RTP/AVP with a=crypto (RFC 8643): the SBC
    takes it as SRTP and answers RTP/AVP with a key of its own, so A's stream is
    protected; plain B ends up with RTP (SRTP offered first, refused, then RTP)."""
    scenario = run_scenario(tmp_path, TWO_REALMS, OUTSIDE_TO_INSIDE, "srtp", None, ["outside"])
    call = scenario.call
    assert call.error is None, call.error
    assert_tones_both_ways(call)
    offered = only_key(call.a_invite())
    assert audio_proto(call.a_invite()) == "RTP/AVP"
    answer = call.answer("a")
    assert audio_proto(answer) == "RTP/AVP", sdp_of(answer)
    relay_key = only_key(answer)
    assert (relay_key.tag, relay_key.suite) == (offered.tag, offered.suite)
    assert relay_key.key != offered.key
    assert SRTP_ENABLED in scenario.a_log and SRTP_ENABLED not in scenario.b_log
    for message in call.received("b"):
        assert offered.key not in message, f"B received A's key:\n{message}"
    assert_clean_sbc(scenario)


# -- 2. SRTP on both legs, each with keys of its own -------------------------------------------


@pytest.fixture(scope="module")
def srtp_both(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """A (srtp-mand) -> SBC -> B (srtp-mand); both realms ``optional``."""
    require_baresip()
    return run_scenario(
        tmp_path_factory.mktemp("srtp-both"),
        TWO_REALMS,
        OUTSIDE_TO_INSIDE,
        SRTP_MAND,
        SRTP_MAND,
        ["outside"],
    )


def test_srtp_phones_hear_each_other_through_the_sbc(srtp_both: Scenario) -> None:
    assert_tones_both_ways(srtp_both.call)
    assert SRTP_ENABLED in srtp_both.a_log and SRTP_ENABLED in srtp_both.b_log
    assert srtp_both.encryption() == [("srtp", "srtp")]
    assert_clean_sbc(srtp_both)


def test_no_key_crosses_between_srtp_legs(srtp_both: Scenario) -> None:
    call = srtp_both.call
    a_key = only_key(call.a_invite())
    (invite,) = call.invites_to_b()
    assert audio_proto(invite) == "RTP/SAVP", sdp_of(invite)
    b_sees = only_key(invite)
    assert b_sees.suite == SUITE, sdp_of(invite)
    b_key = only_key(call.b_answer())
    a_sees = only_key(call.answer("a"))
    assert b_sees.key != a_key.key, "B was offered A's key: SRTP passed end to end"
    assert a_sees.key != b_key.key, "A was answered with B's key: SRTP passed end to end"
    for message in call.received("b"):
        assert a_key.key not in message and a_sees.key not in message, message
    for message in call.received("a"):
        assert b_key.key not in message and b_sees.key not in message, message


# -- 3. A realm that requires SRTP, and a plain callee in it -----------------------------------


def test_required_realm_refuses_a_plain_callee_and_the_sbc_carries_on(
    tmp_path: Path, baresip: str
) -> None:
    """A (plain) calls B (plain) through realm ``secure`` (``srtp: required``): the SBC
    offers B SRTP, which a plain baresip refuses (488); A gets the refusal. Then A
    calls B through realm ``inside`` (no policy: ``optional``): plain, both tones."""
    scenario = run_scenario(
        tmp_path,
        (Realm("outside"), Realm("lobby"), Realm("secure", "required"), Realm("inside")),
        (("outside", "secure"), ("lobby", "inside")),
        None,
        None,
        ["outside", "lobby"],
    )
    refused, plain = scenario.calls
    assert refused.error is not None, "a plain phone took an SRTP-only call"
    (invite,) = refused.invites_to_b()
    assert audio_proto(invite) == "RTP/SAVP", sdp_of(invite)
    assert only_key(invite).suite == SUITE, sdp_of(invite)
    assert statuses_sent(refused, "b") == [488]
    assert final_statuses(list(refused.a_trace), refused.a_at, "INVITE") == [488], refused.error
    # The next call, plain end to end, works as ever.
    assert_tones_both_ways(plain)
    (invite,) = plain.invites_to_b()
    assert audio_proto(invite) == "RTP/AVP" and "a=crypto" not in invite, sdp_of(invite)
    assert SRTP_ENABLED not in scenario.a_log + scenario.b_log
    assert_clean_sbc(scenario)


# -- 4. Passthrough on both realms: the old behaviour ------------------------------------------


def test_passthrough_realms_pass_keys_end_to_end(tmp_path: Path, baresip: str) -> None:
    scenario = run_scenario(
        tmp_path,
        (Realm("outside", "passthrough"), Realm("inside", "passthrough")),
        OUTSIDE_TO_INSIDE,
        SRTP_MAND,
        SRTP_MAND,
        ["outside"],
    )
    call = scenario.call
    assert_tones_both_ways(call)
    (invite,) = call.invites_to_b()
    assert audio_proto(invite) == "RTP/SAVP", sdp_of(invite)
    assert only_key(invite).key == only_key(call.a_invite()).key
    assert only_key(call.answer("a")).key == only_key(call.b_answer()).key
    assert scenario.encryption() == [("srtp-passthrough", "srtp-passthrough")]
    assert_clean_sbc(scenario)


# -- 5. Offers a realm's policy refuses ------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "a_mediaenc"),
    [("off", SRTP_MAND), ("required", None)],
    ids=["srtp-offer-into-off", "plain-offer-into-required"],
)
def test_offer_against_the_callers_realm_policy_gets_488(
    tmp_path: Path, baresip: str, policy: str, a_mediaenc: str | None
) -> None:
    """``off``: an SRTP offer from the realm gets 488; ``required``: a plain one does.
    The SBC answers itself: B is never called."""
    scenario = run_scenario(
        tmp_path,
        (Realm("outside", policy), Realm("inside")),
        OUTSIDE_TO_INSIDE,
        a_mediaenc,
        None,
        ["outside"],
    )
    call = scenario.call
    assert call.error is not None, "the call was established"
    assert final_statuses(list(call.a_trace), call.a_at, "INVITE") == [488], call.error
    assert call.invites_to_b() == []
    assert_clean_sbc(scenario)
