"""Call flows through the real SBC, driven by SIPp: registration, PRACK, mid-call
requests, REFER with its NOTIFYs, MESSAGE, admission, trunk failover and probing,
header rules, CDRs, the maximum call duration and the media timeout.

One `sbc run` serves most flows: each flow enters through its own realm (its own
UDP port on loopback) so that per-realm policy (registrar, REFER, limits) can be
told apart, and calls its own number so that its CDR can be found. Probing, header
rules, the call duration limit and the media timeout get an SBC of their own: their
timers and rules would disturb the other flows. Every SIPp side records what it sent and received
(``-trace_msg``); each test asserts what crossed the SBC and what did not: neither
side ever sees the other's Call-ID, tags, branches, SIP or media ports.
"""

from __future__ import annotations

import itertools
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from tests.scenario.sbcproc import Ports, SbcProcess, free_port, wait_until
from tests.scenario.test_b2bua_sipp import (
    SCENARIOS,
    SIPP,
    SippRun,
    _messages,
    header,
    identifiers,
    tag_of,
)

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) not installed")

#: SIPp's own SDP media ports are taken from here: below the kernel's ephemeral
#: range (32768-60999), above the relay's (20000-29999), apart from the 31000/31500
#: of test_b2bua_sipp. SIPp refuses to start when its media port is taken.
MEDIA_PORTS = range(30000, 30960, 4)

#: Registrar users and their passwords (digest realm "sbc").
ALICE = ("alice", "alice-secret-1")
BOB = ("bob", "bob-secret-2")
CAROL = ("carol", "carol-secret-3")
DAVE = ("dave", "dave-secret-4")

#: SIPp's own bound on one run, and ours on waiting for it.
SIPP_TIMEOUT = "12s"
WAIT = 20.0


# -- ports ---------------------------------------------------------------------------------


_media_turn = itertools.count()


def media_port() -> int:
    """An even port of MEDIA_PORTS whose RTP, RTCP and SIPp's video pair are all free
    now (taken in turn, so runs started together do not pick the same)."""
    for _ in range(len(MEDIA_PORTS)):
        port = MEDIA_PORTS[next(_media_turn) % len(MEDIA_PORTS)]
        try:
            for offset in range(4):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError("no free SIPp media port")


# -- SIPp ----------------------------------------------------------------------------------


@dataclass
class Sipp:
    """One running SIPp; ``finish`` waits for it and returns what it exchanged."""

    proc: subprocess.Popen[bytes]
    trace: Path
    port: int
    media: int

    def finish(self, timeout: float = WAIT) -> SippRun:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
        return SippRun(self.proc.returncode, _messages(self.trace), err.decode(errors="replace"))

    def stop(self) -> SippRun:
        """End a SIPp that would run on (one answering OPTIONS with -aa). SIGINT ends
        it at once, its message trace written."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.finish(timeout=5)


def start_sipp(
    workdir: Path,
    name: str,
    scenario: str,
    *,
    port: int | None = None,
    remote: int | None = None,
    service: str = "1000",
    calls: int | None = 1,
    extra: Sequence[str] = (),
) -> Sipp:
    """SIPp with ``scenario`` on 127.0.0.1:``port`` (a free one by default); a UAC
    when ``remote`` (the SBC's realm port) is given, else a UAS."""
    assert SIPP is not None
    port = port or free_port(socket.SOCK_DGRAM)
    media = media_port()
    trace = workdir / f"{name}.msg"
    trace.unlink(missing_ok=True)
    args = [
        SIPP, "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port),
        "-mp", str(media), "-timeout", SIPP_TIMEOUT, "-timeout_error", "-nostdin",
        "-trace_msg", "-message_file", str(trace),
        "-trace_err", "-error_file", str(workdir / f"{name}.err"), *extra,
    ]  # fmt: skip
    if calls is not None:
        args += ["-m", str(calls)]
    if remote is not None:
        args += ["-s", service, f"127.0.0.1:{remote}"]
    proc = subprocess.Popen(
        args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return Sipp(proc, trace, port, media)


def first(run: SippRun, start: str) -> str:
    """The first message of ``run`` starting with ``start`` (e.g. ``<INVITE``)."""
    found = [m for m in run.messages if m.startswith(start)]
    assert found, f"no {start!r} in:\n" + "\n".join(m.split("\n", 1)[0] for m in run.messages)
    return found[0]


def starts(run: SippRun) -> list[str]:
    """Each message's direction and first line, e.g. ``<INVITE sip:...``."""
    return [m.split("\n", 1)[0].strip() for m in run.messages]


def finals(run: SippRun) -> list[int]:
    """Status codes of the final responses ``run`` received, in order."""
    codes = [int(s.split()[1]) for s in starts(run) if s.startswith("<SIP/2.0 ")]
    return [code for code in codes if code >= 200]


def received_text(run: SippRun) -> str:
    return "\n".join(run.received)


def mentions_port(text: str, port: int) -> bool:
    """True when ``text`` names ``port`` as a port (":port" or "port " not inside a
    longer number)."""
    return re.search(rf"(?<![0-9]){port}(?![0-9])", text) is not None


def assert_hidden(caller: SippRun, callee: SippRun, caller_sipp: Sipp, callee_sipp: Sipp) -> None:
    """Topology hiding: no Call-ID, tag, branch, SIP port or media port of one side
    in any byte the other side received."""
    caller_ids, callee_ids = identifiers(caller), identifiers(callee)
    assert caller_ids and callee_ids
    seen_by_callee, seen_by_caller = received_text(callee), received_text(caller)
    for ident in caller_ids:
        assert ident not in seen_by_callee, ident
    for ident in callee_ids:
        assert ident not in seen_by_caller, ident
    for port in (caller_sipp.port, caller_sipp.media):
        assert not mentions_port(seen_by_callee, port), port
    for port in (callee_sipp.port, callee_sipp.media):
        assert not mentions_port(seen_by_caller, port), port


def explain(sbc: SbcProcess, *runs: SippRun) -> str:
    parts = []
    for run in runs:
        parts.append(f"rc={run.returncode} {run.log[-1500:]}")
        parts.append("\n".join(run.messages)[-3000:])
    parts.append(sbc.log()[-3000:])
    return "\n".join(parts)


# -- the SBC -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedCdr:
    """The columns the CDR of one call attempt must hold; found by its callee's
    Request-URI user (each flow calls its own number)."""

    user: str
    route: str
    disposition: str
    final_status: int
    end_reason: str
    hangup_side: str | None
    a_realm: str
    b_realm: str
    #: Where the B-leg INVITE went, "" when none was sent.
    destination: str
    #: The trunk and gateway of a trunk call (docs/cdr.md), "" otherwise.
    trunk: str = ""
    gateway: str = ""

    def check(self, rows: Sequence[sqlite3.Row]) -> sqlite3.Row:
        """The one row of ``rows`` for this attempt, asserted column by column."""
        mine = [r for r in rows if user_of(r["callee"]) == self.user]
        assert len(mine) == 1, (self, [dict(r) for r in mine])
        row = mine[0]
        names = (
            "route", "disposition", "final_status", "end_reason", "hangup_side", "a_realm",
            "b_realm", "destination", "trunk", "gateway",
        )  # fmt: skip
        assert {n: row[n] for n in names} == {n: getattr(self, n) for n in names}, self.user
        if self.disposition == "answered":
            assert row["answer_time"] is not None and row["duration"] > 0, dict(row)
            assert row["duration"] == pytest.approx(row["end_time"] - row["answer_time"])
        else:
            assert row["answer_time"] is None and row["duration"] == 0, dict(row)
        return row


def answered(
    user: str, route: str, a_realm: str, b_realm: str, port: int, *, hangup: str = "caller"
) -> ExpectedCdr:
    """An answered call's CDR, ended by a BYE from ``hangup``, the callee at ``port``."""
    return ExpectedCdr(
        user, route, "answered", 200, "bye", hangup, a_realm, b_realm, f"127.0.0.1:{port}"
    )


def read_cdrs(path: Path) -> list[sqlite3.Row]:
    """Every row of table cdr (docs/cdr.md), opened read-only."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return list(db.execute("SELECT * FROM cdr ORDER BY id"))
    finally:
        db.close()


def user_of(uri: str) -> str:
    found = re.match(r"sips?:([^@;>]+)@", uri)
    return found.group(1) if found else ""


@dataclass
class FlowLab:
    sbc: SbcProcess
    workdir: Path
    #: The SBC's UDP port of each realm.
    realm: dict[str, int]
    #: The static peer of most routes: one SIPp UAS at a time.
    uas: int
    #: The port the registered phone (bob) registers from and answers on.
    phone: int
    #: The two gateways of trunk "pair" (priority 1, then 2).
    gateways: tuple[int, int]
    #: CDRs the flows so far must have left, checked by test_cdrs (last).
    cdrs: list[ExpectedCdr] = field(default_factory=list)


def add_user(state_dir: Path, name: str, password: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "sbc", "user", "add", name, "--password-stdin",
         "--state-dir", str(state_dir)],
        input=f"{password}\n".encode(), check=True, timeout=20, capture_output=True,
    )  # fmt: skip


def realm_yaml(name: str, port: int, extra: str = "") -> str:
    return f"""\
  - name: {name}
    listen: [{{transport: udp, address: 127.0.0.1, port: {port}}}]
    media_address: 127.0.0.1
{extra}"""


def sbc_config(workdir: Path, mgmt: int, plain: int, body: str) -> str:
    """The common head of every SBC here (own state_dir, user-space media relay:
    the kernel path would touch the nftables state other test runs share), ``body``
    after it."""
    return f"""\
state_dir: {workdir / "state"}
log:
  level: info
sip:
  listen: [{{transport: udp, address: 127.0.0.1, port: {plain}}}]
  user_agent: sbc-flows
management:
  listen: {{address: 127.0.0.1, port: {mgmt}}}
media:
  kernel_path: false
{body}"""


def start_sbc(workdir: Path, body: str) -> SbcProcess:
    """``sbc run`` on ``sbc_config(body)``, healthy, in ``workdir``."""
    mgmt, plain = free_port(), udp_port()
    config = workdir / "sbc.yaml"
    config.write_text(sbc_config(workdir, mgmt, plain, body))
    return SbcProcess(workdir, config, Ports(plain, 0, mgmt)).start()


def flow_config(r: dict[str, int], uas: int, gateways: tuple[int, int]) -> str:
    """Realms of the shared SBC (one per policy under test), routes, trunk "pair"."""
    g1, g2 = gateways
    realms = "".join(
        (
            realm_yaml("phones", r["phones"], "    registrar: true\n    authenticate: [INVITE]\n"),
            realm_yaml("outside", r["outside"]),
            realm_yaml("xfer", r["xfer"], "    refer: relay\n"),
            realm_yaml("limited", r["limited"], "    limits: {max_calls: 1}\n"),
            realm_yaml("g711", r["g711"], "    codecs: [PCMU, PCMA, telephone-event]\n"),
            realm_yaml("regonly", r["regonly"], "    registrar: true\n    registered_only: true\n"),
            realm_yaml("inside", r["inside"]),
        )
    )
    return f"""\
registrar:
  nat_keepalive: 0
realms:
{realms}routes:
  - {{name: sos, from_realm: phones, user_prefix: "112", action: trunk, realm: inside,
      host: 127.0.0.1, port: {uas}, emergency: true,
      limits: {{calls_per_second: 0.01, burst: 1}}}}
  - {{name: sos-out, from_realm: outside, user_prefix: "911", action: trunk, realm: inside,
      host: 127.0.0.1, port: {uas}, emergency: true}}
  - {{name: users, from_realm: phones, action: registered}}
  - {{name: pair, user_prefix: "71", action: trunk, trunk: pair}}
  - {{name: carrier, user_prefix: "73", action: trunk, trunk: carrier}}
  - {{name: busy, user_prefix: "486", action: reject, status: 486}}
  - {{name: to-uas, action: trunk, realm: inside, host: 127.0.0.1, port: {uas}}}
trunks:
  - name: pair
    realm: inside
    gateways:
      - {{host: 127.0.0.1, port: {g1}, priority: 1}}
      - {{host: 127.0.0.1, port: {g2}, priority: 2}}
    probe: {{enabled: false}}
  - name: carrier
    realm: inside
    gateways: [{{host: 127.0.0.1, port: {g1}}}]
    probe: {{enabled: false}}
    auth: {{username: acct-7, password: "carrier pass 7", realm: carrier.example}}
"""


def udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowLab]:
    workdir = tmp_path_factory.mktemp("flows")
    names = ("phones", "outside", "xfer", "limited", "g711", "regonly", "inside")
    realm = {name: udp_port() for name in names}
    uas, gateways = udp_port(), (udp_port(), udp_port())
    for user, password in (ALICE, BOB, CAROL, DAVE):
        add_user(workdir / "state", user, password)
    sbc = start_sbc(workdir, flow_config(realm, uas, gateways))
    lab = FlowLab(sbc, workdir, realm, uas, udp_port(), gateways)
    try:
        yield lab
    finally:
        lab.sbc.stop()


def wait_for_log(sbc: SbcProcess, pattern: str, timeout: float) -> re.Match[str] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, sbc.log())
        if found:
            return found
        time.sleep(0.05)
    return None


def wait_for_calls(sbc: SbcProcess, calls: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, health = sbc.health()
        if status == 200 and health.get("calls") == calls:
            return True
        time.sleep(0.05)
    return False


def call(
    lab: FlowLab,
    uac: str,
    uas: str,
    *,
    realm: str = "outside",
    service: str = "1000",
    uac_extra: Sequence[str] = (),
    uas_extra: Sequence[str] = (),
) -> tuple[SippRun, SippRun, Sipp, Sipp]:
    """One call from a SIPp UAC entering ``realm`` to the SIPp UAS on ``lab.uas``."""
    callee = start_sipp(lab.workdir, "uas", uas, port=lab.uas, extra=uas_extra)
    time.sleep(0.1)  # SIPp binds its port
    caller = start_sipp(
        lab.workdir, "uac", uac, remote=lab.realm[realm], service=service, extra=uac_extra
    )
    caller_run = caller.finish()
    callee_run = callee.finish()
    return caller_run, callee_run, caller, callee


def passed_call(
    lab: FlowLab, uac: str, uas: str, *, realm: str = "outside", service: str = "1000"
) -> tuple[SippRun, SippRun, Sipp, Sipp]:
    """``call``, whose caller and callee scenarios both ran to their end."""
    caller, callee, caller_sipp, callee_sipp = call(lab, uac, uas, realm=realm, service=service)
    assert caller.returncode == 0, explain(lab.sbc, caller, callee)
    assert callee.returncode == 0, explain(lab.sbc, caller, callee)
    return caller, callee, caller_sipp, callee_sipp


# -- 1. registration with digest, then a call to the registered phone ----------------------


def test_register_with_digest_then_call_the_registered_phone(lab: FlowLab) -> None:
    user, password = BOB
    registrar = lab.realm["phones"]
    wrong = start_sipp(
        lab.workdir, "reg-wrong", "flow_register_rejected.xml", port=lab.phone,
        remote=registrar, service=user, extra=("-au", user, "-ap", "not-" + password),
    ).finish()  # fmt: skip
    assert wrong.returncode == 0, explain(lab.sbc, wrong)
    challenges = [m for m in wrong.received if m.startswith("<SIP/2.0 401")]
    assert len(challenges) == 2
    assert all("WWW-Authenticate: Digest" in m and 'realm="sbc"' in m for m in challenges)
    # Nothing was bound: the phone is not reachable yet.
    assert "registered bob" not in lab.sbc.log()

    ok = start_sipp(
        lab.workdir, "reg", "flow_register.xml", port=lab.phone, remote=registrar,
        service=user, extra=("-au", user, "-ap", password),
    ).finish()  # fmt: skip
    assert ok.returncode == 0, explain(lab.sbc, ok)
    assert [s[:14] for s in starts(ok)] == [
        ">REGISTER sip:",
        "<SIP/2.0 401 U",
        ">REGISTER sip:",
        "<SIP/2.0 200 O",
    ]
    second = [m for m in ok.messages if m.startswith(">REGISTER")][1]
    assert re.search(r'(?m)^Authorization: Digest .*username="bob"', second)
    granted = first(ok, "<SIP/2.0 200")
    contacts = header(granted, "Contact")
    assert contacts == [f"<sip:bob@127.0.0.1:{lab.phone}>;expires=120"], contacts
    assert wait_for_log(lab.sbc, r"- registered \S*bob\S* from", 2)

    # alice calls bob: 407, credentials, and the INVITE reaches bob at his contact.
    phone = start_sipp(lab.workdir, "phone", "uas_basic.xml", port=lab.phone)
    time.sleep(0.1)
    caller_sipp = start_sipp(
        lab.workdir, "alice", "flow_uac_auth.xml", remote=registrar, service="bob",
        extra=("-au", ALICE[0], "-ap", ALICE[1], "-auth_uri", f"bob@127.0.0.1:{registrar}"),
    )  # fmt: skip
    caller, callee = caller_sipp.finish(), phone.finish()
    assert caller.returncode == 0, explain(lab.sbc, caller, callee)
    assert callee.returncode == 0, explain(lab.sbc, caller, callee)
    # 407 to the first INVITE, 200 to the second, 200 to the BYE.
    assert finals(caller) == [407, 200, 200]
    challenge = first(caller, "<SIP/2.0 407")
    assert "Proxy-Authenticate: Digest" in challenge
    invites = [m for m in callee.received if m.startswith("<INVITE")]
    assert len(invites) == 1  # the challenged INVITE never left the SBC
    invite = invites[0]
    assert invite.startswith(f"<INVITE sip:bob@127.0.0.1:{lab.phone} SIP/2.0")
    assert f"Via: SIP/2.0/UDP 127.0.0.1:{registrar};" in invite
    # The caller's credentials stay with the SBC, which asserts who it found alice is
    # (RFC 3325; the phones realm is untrusted, so only what it authenticated).
    assert "Authorization" not in received_text(callee)
    asserted = f'"Alice A" <sip:alice@127.0.0.1:{registrar}>'
    assert header(invite, "P-Asserted-Identity") == [asserted]
    assert_hidden(caller, callee, caller_sipp, phone)
    lab.cdrs.append(answered("bob", "users", "phones", "phones", lab.phone))


def two_phones(
    lab: FlowLab,
    account: tuple[str, str],
    prefix: str,
    desk: tuple[str, str],
    mobile: tuple[str, str],
) -> tuple[SippRun, SippRun, SippRun, Sipp, Sipp, Sipp, int, int]:
    """``account``'s desk phone and mobile register (each a SIPp REGISTER scenario
    and then a SIPp UAS, ``(register, uas)``) and alice calls the user, with digest:
    the three runs (caller, desk, mobile), their Sipps and the phones' ports. Each
    run ended well and the caller got 407, then 200 (INVITE) and 200 (BYE)."""
    user, password = account
    registrar = lab.realm["phones"]
    ports = udp_port(), udp_port()
    for (register, _), port, name in zip((desk, mobile), ports, ("desk", "mobile"), strict=True):
        run = start_sipp(
            lab.workdir, f"reg-{prefix}-{name}", register, port=port, remote=registrar,
            service=user, extra=("-au", user, "-ap", password),
        ).finish()  # fmt: skip
        assert run.returncode == 0, explain(lab.sbc, run)
    desk_sipp = start_sipp(lab.workdir, f"{prefix}-desk", desk[1], port=ports[0])
    mobile_sipp = start_sipp(lab.workdir, f"{prefix}-mobile", mobile[1], port=ports[1])
    time.sleep(0.1)
    caller_sipp = start_sipp(
        lab.workdir, f"{prefix}-alice", "flow_uac_auth.xml", remote=registrar, service=user,
        extra=("-au", ALICE[0], "-ap", ALICE[1], "-auth_uri", f"{user}@127.0.0.1:{registrar}"),
    )  # fmt: skip
    caller, desk_run, mobile_run = caller_sipp.finish(), desk_sipp.finish(), mobile_sipp.finish()
    for run in (caller, desk_run, mobile_run):
        assert run.returncode == 0, explain(lab.sbc, caller, desk_run, mobile_run)
    assert finals(caller) == [407, 200, 200], starts(caller)
    return caller, desk_run, mobile_run, caller_sipp, desk_sipp, mobile_sipp, *ports


def test_a_call_to_a_user_with_two_phones_rings_both_and_the_answer_wins(
    lab: FlowLab,
) -> None:
    """Parallel forking (RFC 3261 16.7 as a B2BUA does it): one B leg per registered
    contact; the first 2xx wins and the other phone gets a CANCEL."""
    user = CAROL[0]
    phones = two_phones(lab, CAROL, "fork", ("flow_register.xml", "uas_basic.xml"),
                        ("flow_register.xml", "uas_ring.xml"))  # fmt: skip
    caller, desk_run, mobile_run, caller_sipp, answering, ringing, desk, mobile = phones
    # Both phones got the call, each as its own B leg (its own Call-ID).
    to_desk, to_mobile = first(desk_run, "<INVITE"), first(mobile_run, "<INVITE")
    assert to_desk.startswith(f"<INVITE sip:{user}@127.0.0.1:{desk} SIP/2.0")
    assert to_mobile.startswith(f"<INVITE sip:{user}@127.0.0.1:{mobile} SIP/2.0")
    assert header(to_desk, "Call-ID") != header(to_mobile, "Call-ID")
    # The phone that did not answer was cancelled (and its 487 stayed at the SBC).
    got = [s.split()[0] for s in starts(mobile_run) if s.startswith("<")]
    assert got == ["<INVITE", "<CANCEL", "<ACK"], starts(mobile_run)
    assert 487 not in finals(caller)
    assert_hidden(caller, desk_run, caller_sipp, answering)
    assert_hidden(caller, mobile_run, caller_sipp, ringing)
    lab.cdrs.append(answered(user, "users", "phones", "phones", desk))


def test_a_busy_desk_phone_passes_the_call_to_the_mobile_of_lower_q(lab: FlowLab) -> None:
    """Sequential search by q-value (RFC 3261 16.6): the desk phone (no q, 1.0) rings
    alone; its 486 sends the call to the mobile (q=0.5), whose 200 the caller gets."""
    user = DAVE[0]
    phones = two_phones(lab, DAVE, "q", ("flow_register.xml", "uas_reject.xml"),
                        ("flow_register_q.xml", "uas_basic.xml"))  # fmt: skip
    caller, _, mobile_run, caller_sipp, _, answering, _, mobile = phones
    # The mobile's INVITE left only after the desk phone's 486.
    busy_at = next(t for t, line in stamped(lab.workdir / "q-desk.msg") if "486" in line)
    invited_at = next(
        t for t, line in stamped(lab.workdir / "q-mobile.msg") if line.startswith("<INVITE")
    )
    assert busy_at <= invited_at, (busy_at, invited_at)
    assert 486 not in finals(caller)
    assert "trying the contacts of q=0.5" in lab.sbc.log()
    assert_hidden(caller, mobile_run, caller_sipp, answering)
    lab.cdrs.append(answered(user, "users", "phones", "phones", mobile))


def test_an_emergency_call_from_the_phones_realm_needs_no_digest(lab: FlowLab) -> None:
    """Route sos (emergency: true): a phone that never registered calls 112 in the
    realm that asks every INVITE for a digest, and is put through at once. The
    route's own limit (one call a hundred seconds) refuses the next one: 503."""
    caller, callee, caller_sipp, callee_sipp = passed_call(
        lab, "uac_basic.xml", "uas_basic.xml", realm="phones", service="112"
    )
    assert finals(caller) == [200, 200]  # no 407: the INVITE's answer, then the BYE's
    invite = first(callee, "<INVITE")
    assert invite.startswith("<INVITE sip:112@127.0.0.1")
    assert not header(invite, "P-Asserted-Identity")  # nobody authenticated, untrusted
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    lab.cdrs.append(answered("112", "sos", "phones", "inside", lab.uas))
    flood = start_sipp(
        lab.workdir, "sos-refused", "flow_uac_503.xml", remote=lab.realm["phones"], service="1120"
    ).finish()
    assert flood.returncode == 0, explain(lab.sbc, flood)
    retry = header(first(flood, "<SIP/2.0 503"), "Retry-After")
    assert len(retry) == 1 and 90 <= int(retry[0]) <= 100, retry
    assert "not admitted (route sos: rate)" in lab.sbc.log()
    lab.cdrs.append(ExpectedCdr("1120", "sos", "failed", 503, "admission", None, "phones", "", ""))


def test_an_emergency_call_conveys_the_caller_s_location(lab: FlowLab) -> None:
    """RFC 6442: the caller's PIDF-LO (civic address) and Geolocation cross with an
    emergency call, under a Content-ID of the SBC's; the SDP part is the relay's."""
    caller, callee, caller_sipp, callee_sipp = passed_call(
        lab, "flow_uac_location.xml", "uas_basic.xml", service="911"
    )
    invite = first(callee, "<INVITE")
    assert header(invite, "Content-Type")[0].startswith("multipart/mixed;boundary=")
    (geolocation,) = header(invite, "Geolocation")
    assert geolocation.startswith("<cid:") and geolocation.endswith("@127.0.0.1>")
    assert f"Content-ID: <{geolocation[5:-1]}>" in invite
    assert "<ca:RD>Rue de la Loi</ca:RD>" in invite
    assert header(invite, "Geolocation-Routing") == ["yes"]
    assert "loc-1@" not in invite  # the caller's own Content-ID stays with it
    assert "c=IN IP4 127.0.0.1" in invite and "m=audio " in invite
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    lab.cdrs.append(answered("911", "sos-out", "outside", "inside", lab.uas))


def test_a_realm_for_registered_phones_takes_calls_from_where_they_registered(
    lab: FlowLab,
) -> None:
    """registered_only: alice's first call, from a port nobody registered from, gets
    403; she registers from her port (digest), and her call from there goes through
    with no digest, asserted as alice."""
    refused = start_sipp(
        lab.workdir, "regonly-refused", "flow_uac_forbidden.xml",
        remote=lab.realm["regonly"], service="2011",
    ).finish()  # fmt: skip
    assert refused.returncode == 0, explain(lab.sbc, refused)
    assert "Forbidden: not registered" in first(refused, "<SIP/2.0 403")
    phone = udp_port()
    registered = start_sipp(
        lab.workdir, "regonly-reg", "flow_register.xml", port=phone,
        remote=lab.realm["regonly"], service=ALICE[0], extra=("-au", ALICE[0], "-ap", ALICE[1]),
    ).finish()  # fmt: skip
    assert registered.returncode == 0, explain(lab.sbc, registered)
    callee = start_sipp(lab.workdir, "uas", "uas_basic.xml", port=lab.uas)
    time.sleep(0.1)  # SIPp binds its port
    caller_sipp = start_sipp(
        lab.workdir, "regonly-call", "uac_basic.xml", port=phone,
        remote=lab.realm["regonly"], service="2011",
    )  # fmt: skip
    caller, called = caller_sipp.finish(), callee.finish()
    assert caller.returncode == 0, explain(lab.sbc, caller, called)
    assert called.returncode == 0, explain(lab.sbc, caller, called)
    assert finals(caller) == [200, 200]  # no 407
    invite = first(called, "<INVITE")
    (asserted,) = header(invite, "P-Asserted-Identity")
    assert asserted.startswith('"Alice A" <sip:alice@127.0.0.1:'), asserted
    assert_hidden(caller, called, caller_sipp, callee)
    lab.cdrs.append(answered("2011", "to-uas", "regonly", "inside", lab.uas))


# -- 2. PRACK / 100rel ---------------------------------------------------------------------


def test_reliable_183_is_pracked_by_the_sbc(lab: FlowLab) -> None:
    caller, callee, caller_sipp, callee_sipp = passed_call(
        lab, "flow_uac_early.xml", "flow_uas_100rel.xml", service="2001"
    )
    invite = first(callee, "<INVITE")
    assert re.search(r"(?im)^Supported:.*\b100rel\b", invite)
    # The inside realm has no header rules (compare the core realm's below).
    assert header(invite, "User-Agent") == ["sbc-flows"] and not header(invite, "X-Realm")
    prack = first(callee, "<PRACK")
    assert re.search(r"(?m)^RAck: 1 1 INVITE\s*$", prack)
    # In the early dialog of the 183: the callee's own tag in To.
    callee_tag = tag_of(header(first(callee, ">SIP/2.0 183"), "To")[0])
    assert callee_tag and tag_of(header(prack, "To")[0]) == callee_tag
    # The caller asked for no 100rel: its 183 is unreliable, with the relay's SDP.
    early = first(caller, "<SIP/2.0 183")
    assert not header(early, "Require") and not header(early, "RSeq")
    assert re.search(r"(?m)^m=audio (\d+) RTP/AVP 0", early)
    assert "<SIP/2.0 200" in "\n".join(starts(caller))
    # The PRACK is hop by hop: nothing of it reaches the caller.
    assert not [m for m in caller.received if re.search(r"(?m)^(PRACK |CSeq: \d+ PRACK)", m[1:])]
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    lab.cdrs.append(answered("2001", "to-uas", "outside", "inside", lab.uas))


def test_a_caller_requiring_100rel_gets_a_reliable_183_and_its_prack_answered(
    lab: FlowLab,
) -> None:
    caller, callee, caller_sipp, callee_sipp = passed_call(
        lab, "flow_uac_100rel.xml", "flow_uas_100rel.xml", service="2006"
    )
    # Reliable on the caller's leg: Require: 100rel, an RSeq of the SBC's own.
    early = first(caller, "<SIP/2.0 183")
    assert header(early, "Require") == ["100rel"]
    (rseq,) = header(early, "RSeq")
    assert 1 <= int(rseq) < 2**31
    assert re.search(r"(?m)^m=audio (\d+) RTP/AVP 0", early)
    # The caller's PRACK is answered by the SBC; the callee sees only the SBC's own.
    ok = [m for m in caller.received if m.startswith("<SIP/2.0 200")]
    assert "CSeq: 2 PRACK" in ok[0] and "CSeq: 1 INVITE" in ok[1]
    (prack,) = [m for m in callee.received if m.startswith("<PRACK")]
    assert re.search(r"(?m)^RAck: 1 1 INVITE\s*$", prack)
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    lab.cdrs.append(answered("2006", "to-uas", "outside", "inside", lab.uas))


def test_offers_before_the_answer_cross_in_a_prack_and_an_early_update(lab: FlowLab) -> None:
    # RFC 3262 5: the caller's new offer in its PRACK reaches the callee as an UPDATE
    # and its answer comes back in the PRACK's 200; RFC 3311 5.1: the callee's own
    # early offer reaches the caller, which PRACKed the 183 that answered it.
    caller, callee, caller_sipp, callee_sipp = passed_call(
        lab, "flow_uac_prack_offer.xml", "flow_uas_prack_offer.xml", service="2007"
    )
    (update,) = [m for m in callee.received if m.startswith("<UPDATE")]
    assert re.search(r"(?m)^a=sendonly\s*$", update) and not header(update, "RAck")
    (prack_ok,) = [m for m in caller.received if m.startswith("<SIP/2.0 200") and "2 PRACK" in m]
    assert re.search(r"(?m)^a=recvonly\s*$", prack_ok)
    (early_update,) = [m for m in caller.received if m.startswith("<UPDATE")]
    assert re.search(r"(?m)^a=sendonly\s*$", early_update)
    (update_ok,) = [m for m in callee.received if m.startswith("<SIP/2.0 200") and "1 UPDATE" in m]
    assert re.search(r"(?m)^a=recvonly\s*$", update_ok)
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    lab.cdrs.append(answered("2007", "to-uas", "outside", "inside", lab.uas))


def test_a_re_invite_answered_481_hangs_the_caller_up(lab: FlowLab) -> None:
    # RFC 3261 12.2.1.2: the callee's 481 says its dialog is gone. The caller gets
    # the 481 and then the SBC's BYE, so the call does not live on with nothing
    # behind it; the callee, whose dialog is gone, gets no BYE.
    caller, callee, caller_sipp, callee_sipp = passed_call(
        lab, "flow_uac_dialog_gone.xml", "flow_uas_dialog_gone.xml", service="2008"
    )
    assert first(caller, "<SIP/2.0 481")
    bye = first(caller, "<BYE")
    assert "CSeq:" in bye
    assert not [m for m in callee.received if m.startswith("<BYE")]
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    lab.cdrs.append(
        ExpectedCdr(
            "2008", "to-uas", "answered", 200, "dialog_gone", "callee", "outside", "inside",
            f"127.0.0.1:{lab.uas}",
        )
    )  # fmt: skip


def test_a_realm_s_codec_policy_restricts_the_offer_out_of_it(lab: FlowLab) -> None:
    # The caller's realm allows G.711 and telephone-event: its offer of G.729, PCMU,
    # telephone-event and video reaches the callee as PCMU and telephone-event,
    # the video stream rejected (port 0).
    caller, callee, caller_sipp, callee_sipp = passed_call(
        lab, "flow_uac_codecs.xml", "uas_basic.xml", realm="g711", service="2009"
    )
    invite = first(callee, "<INVITE")
    audio = re.search(r"(?m)^m=audio (\d+) RTP/AVP ([0-9 ]+?)\s*$", invite)
    assert audio is not None and audio.group(2) == "0 101", invite
    assert re.search(r"(?m)^m=video 0 ", invite) and "G729" not in invite
    assert "a=rtpmap:101 telephone-event/8000" in invite
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    lab.cdrs.append(answered("2009", "to-uas", "g711", "inside", lab.uas))


# -- 3. UPDATE, INFO both ways; REFER policy -----------------------------------------------


def test_update_and_info_both_ways_refer_rejected(lab: FlowLab) -> None:
    caller, callee, caller_sipp, callee_sipp = passed_call(
        lab, "flow_uac_midcall.xml", "flow_uas_midcall.xml", service="2002"
    )
    # Caller -> callee, bodies intact.
    info = first(callee, "<INFO")
    assert "Content-Type: application/dtmf-relay" in info and "Signal=5" in info
    assert "Duration=160" in info
    first(callee, "<UPDATE")
    # Callee -> caller.
    info_back = first(caller, "<INFO")
    assert "Signal=9" in info_back and "Duration=100" in info_back
    update_back = first(caller, "<UPDATE")
    caller_tag = tag_of(header(first(caller, ">INVITE"), "From")[0])
    assert caller_tag and tag_of(header(update_back, "To")[0]) == caller_tag
    # REFER from a realm with the default policy: 403 from the SBC, never relayed.
    refused = first(caller, "<SIP/2.0 403")
    assert "CSeq: 4 REFER" in refused
    assert not [m for m in callee.received if m.startswith("<REFER")]
    assert "carol" not in received_text(callee)
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    lab.cdrs.append(answered("2002", "to-uas", "outside", "inside", lab.uas))


def test_refer_relayed_with_refer_to_at_the_sbc(lab: FlowLab) -> None:
    caller, callee, caller_sipp, callee_sipp = passed_call(
        lab, "flow_uac_refer.xml", "flow_uas_refer.xml", realm="xfer", service="2003"
    )
    refer = first(callee, "<REFER")
    refer_to = header(refer, "Refer-To")
    assert len(refer_to) == 1 and refer_to[0].startswith(
        f"<sip:carol@127.0.0.1:{lab.realm['inside']}"
    ), refer_to
    # Referred-By named the caller's address: it is not let through.
    assert not header(refer, "Referred-By")
    assert "<SIP/2.0 202" in "\n".join(starts(caller))
    # The transfer's progress (RFC 3515 2.4.4) reaches the transferor in its dialog.
    notifies = [m for m in caller.received if m.startswith("<NOTIFY")]
    assert len(notifies) == 2, starts(caller)
    for notify, frag, state in zip(
        notifies, ("SIP/2.0 100 Trying", "SIP/2.0 200 OK"), ("active", "terminated"), strict=True
    ):
        assert header(notify, "Event") == ["refer"]
        assert header(notify, "Subscription-State")[0].startswith(state)
        assert header(notify, "Content-Type") == ["message/sipfrag;version=2.0"]
        assert notify.rstrip().endswith(frag)
        assert header(notify, "Call-ID") == header(first(caller, ">INVITE"), "Call-ID")
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    lab.cdrs.append(answered("2003", "to-uas", "xfer", "inside", lab.uas))


def test_refer_notifies_reach_a_transferor_that_hung_up(lab: FlowLab) -> None:
    # Blind transfer: the transferor hangs up right after the 202. The REFER's
    # subscription outlives the BYE (RFC 5057 5.5): both NOTIFYs reach it, in its
    # dialog, and the SBC answers the transferee's NOTIFYs 200, not 481.
    caller, callee, caller_sipp, callee_sipp = passed_call(
        lab, "flow_uac_refer_bye.xml", "flow_uas_refer_bye.xml", realm="xfer", service="2005"
    )
    notifies = [m for m in caller.received if m.startswith("<NOTIFY")]
    assert len(notifies) == 2, starts(caller)
    for notify, state in zip(notifies, ("active", "terminated"), strict=True):
        assert header(notify, "Event") == ["refer"]
        assert header(notify, "Subscription-State")[0].startswith(state)
        assert header(notify, "Call-ID") == header(first(caller, ">INVITE"), "Call-ID")
    assert finals(callee) == [200, 200], starts(callee)  # its two NOTIFYs
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    lab.cdrs.append(answered("2005", "to-uas", "xfer", "inside", lab.uas))


# -- 4. MESSAGE ----------------------------------------------------------------------------


def test_message_out_of_dialog_is_routed(lab: FlowLab) -> None:
    callee_sipp = start_sipp(lab.workdir, "uas-msg", "flow_uas_message.xml", port=lab.uas)
    time.sleep(0.1)
    caller_sipp = start_sipp(
        lab.workdir, "uac-msg", "flow_uac_message.xml", remote=lab.realm["outside"],
        service="2004",
    )  # fmt: skip
    caller, callee = caller_sipp.finish(), callee_sipp.finish()
    assert caller.returncode == 0, explain(lab.sbc, caller, callee)
    assert callee.returncode == 0, explain(lab.sbc, caller, callee)
    message = first(callee, "<MESSAGE")
    assert message.startswith(f"<MESSAGE sip:2004@127.0.0.1:{lab.uas} SIP/2.0")
    assert "Content-Type: text/plain" in message and "hello through the sbc" in message
    assert f"Via: SIP/2.0/UDP 127.0.0.1:{lab.realm['inside']};" in message
    assert "sipp-flows" not in message  # the caller's User-Agent stays outside
    assert starts(caller)[-1].startswith("<SIP/2.0 200")
    assert_hidden(caller, callee, caller_sipp, callee_sipp)


# -- 5. admission --------------------------------------------------------------------------


def test_second_call_over_the_realm_limit_gets_503(lab: FlowLab) -> None:
    callee_sipp = start_sipp(lab.workdir, "uas-adm", "uas_basic.xml", port=lab.uas)
    time.sleep(0.1)
    held = start_sipp(
        lab.workdir, "uac-held", "flow_uac_call.xml", remote=lab.realm["limited"],
        service="2051", extra=("-d", "1500"),
    )  # fmt: skip
    assert wait_for_calls(lab.sbc, 1), lab.sbc.log()[-2000:]
    refused_sipp = start_sipp(
        lab.workdir, "uac-refused", "flow_uac_503.xml", remote=lab.realm["limited"],
        service="2052",
    )  # fmt: skip
    refused = refused_sipp.finish()
    caller, callee = held.finish(), callee_sipp.finish()
    assert refused.returncode == 0, explain(lab.sbc, refused)
    assert caller.returncode == 0 and callee.returncode == 0, explain(lab.sbc, caller, callee)
    answer = first(refused, "<SIP/2.0 503")
    assert header(answer, "Retry-After") == ["5"], answer
    # The refused INVITE never left the SBC: the callee saw one call only.
    invites = [m for m in callee.received if m.startswith("<INVITE")]
    assert len(invites) == 1 and invites[0].startswith("<INVITE sip:2051@")
    lab.cdrs.append(answered("2051", "to-uas", "limited", "inside", lab.uas))
    lab.cdrs.append(
        ExpectedCdr("2052", "to-uas", "failed", 503, "admission", None, "limited", "", "")
    )


# -- 6. trunk failover ---------------------------------------------------------------------


def test_trunk_fails_over_to_the_second_gateway_on_503(lab: FlowLab) -> None:
    g1, g2 = lab.gateways
    busy = start_sipp(lab.workdir, "gw1", "flow_uas_503.xml", port=g1)
    good = start_sipp(lab.workdir, "gw2", "uas_basic.xml", port=g2)
    time.sleep(0.1)
    caller_sipp = start_sipp(
        lab.workdir, "uac-fo", "flow_uac_call.xml", remote=lab.realm["outside"],
        service="7101", extra=("-d", "200"),
    )  # fmt: skip
    caller, first_gw, second_gw = caller_sipp.finish(), busy.finish(), good.finish()
    assert caller.returncode == 0, explain(lab.sbc, caller, first_gw, second_gw)
    assert first_gw.returncode == 0, explain(lab.sbc, first_gw)
    assert second_gw.returncode == 0, explain(lab.sbc, second_gw)
    assert starts(first_gw)[0].startswith(f"<INVITE sip:7101@127.0.0.1:{g1} ")
    assert starts(second_gw)[0].startswith(f"<INVITE sip:7101@127.0.0.1:{g2} ")
    # A new B leg for the second attempt, and the caller never hears the 503.
    assert header(first(first_gw, "<INVITE"), "Call-ID") != header(
        first(second_gw, "<INVITE"), "Call-ID"
    )
    assert not [s for s in starts(caller) if s.startswith("<SIP/2.0 503")]
    assert "<SIP/2.0 200" in "\n".join(starts(caller))
    assert_hidden(caller, second_gw, caller_sipp, good)
    assert_hidden(caller, first_gw, caller_sipp, busy)
    # One attempt, one row, though two gateways were tried: the one that answered.
    # The trunk and the gateway that answered, as configured.
    row = answered("7101", "pair", "outside", "inside", g2)
    lab.cdrs.append(replace(row, trunk="pair", gateway=f"udp:127.0.0.1:{g2}"))


def test_a_carrier_s_challenges_are_answered_with_the_trunk_s_account(lab: FlowLab) -> None:
    """trunks[].auth: the carrier (SIPp checking the digests itself, verifyauth)
    challenges the INVITE and the BYE with 401; the SBC answers both with the
    account, and the caller sees none of it."""
    g1, _ = lab.gateways
    carrier = start_sipp(lab.workdir, "carrier", "flow_uas_auth.xml", port=g1)
    time.sleep(0.1)
    caller_sipp = start_sipp(
        lab.workdir, "uac-carrier", "flow_uac_call.xml", remote=lab.realm["outside"],
        service="7301", extra=("-d", "200"),
    )  # fmt: skip
    caller, callee = caller_sipp.finish(), carrier.finish()
    assert caller.returncode == 0, explain(lab.sbc, caller, callee)
    assert callee.returncode == 0, explain(lab.sbc, caller, callee)
    invites = [m for m in callee.received if m.startswith("<INVITE")]
    assert len(invites) == 2 and not header(invites[0], "Authorization")
    assert 'username="acct-7"' in header(invites[1], "Authorization")[0]
    assert header(invites[0], "Call-ID") == header(invites[1], "Call-ID")
    byes = [m for m in callee.received if m.startswith("<BYE")]
    assert len(byes) == 2 and header(byes[1], "Authorization")
    assert not [s for s in starts(caller) if s.startswith(("<SIP/2.0 401", "<SIP/2.0 403"))]
    assert "carrier pass 7" not in lab.sbc.log()
    assert_hidden(caller, callee, caller_sipp, carrier)
    row = answered("7301", "carrier", "outside", "inside", g1)
    lab.cdrs.append(replace(row, trunk="carrier", gateway=f"udp:127.0.0.1:{g1}"))


def test_the_sbc_registers_its_trunk_account_refreshes_and_removes_it(tmp_path: Path) -> None:
    """trunks[].register: the carrier's registrar (SIPp, checking the digest itself)
    challenges the SBC's REGISTER and grants 3 s; the SBC refreshes in time, a call
    from the carrier to the registered Contact goes through, and the SBC removes its
    binding (Expires 0) as it stops."""
    outside, inside, registrar, uas = udp_port(), udp_port(), udp_port(), udp_port()
    carrier = start_sipp(tmp_path, "registrar", "flow_registrar_trunk.xml", port=registrar,
                         extra=("-timeout", "30s"))  # fmt: skip
    time.sleep(0.1)  # SIPp binds its port
    sbc = start_sbc(tmp_path, f"""\
realms:
{realm_yaml("outside", outside)}{realm_yaml("inside", inside)}routes:
  - {{name: from-carrier, from_realm: inside, action: trunk, realm: outside,
      host: 127.0.0.1, port: {uas}}}
trunks:
  - name: carrier
    realm: inside
    gateways: [{{host: 127.0.0.1, port: {registrar}}}]
    probe: {{enabled: false}}
    auth: {{username: acct-9, password: "trunk pass 9"}}
    register: {{domain: carrier.example}}
""")  # fmt: skip
    try:

        def refreshed() -> bool:
            _, health = sbc.health()
            registrations: Any = health.get("trunk_registrations", {})
            state = registrations.get("carrier", {})
            return state.get("state") == "registered" and state.get("expires_in", 0) > 60

        assert wait_until(refreshed, 10.0), sbc.log()[-3000:]
        callee = start_sipp(tmp_path, "pbx", "uas_basic.xml", port=uas)
        time.sleep(0.1)
        caller = start_sipp(tmp_path, "carrier-call", "uac_basic.xml", remote=inside,
                            service="acct-9").finish()  # fmt: skip
        pbx = callee.finish()
        assert caller.returncode == 0 and pbx.returncode == 0, explain(sbc, caller, pbx)
    finally:
        sbc.stop()
    run = carrier.finish()
    assert run.returncode == 0, explain(sbc, run)
    registers = [m for m in run.received if m.startswith("<REGISTER")]
    assert len(registers) == 4  # challenged, answered, refreshed, removed
    assert all(m.startswith("<REGISTER sip:carrier.example SIP/2.0") for m in registers)
    assert header(registers[0], "Contact") == [f"<sip:acct-9@127.0.0.1:{inside}>"]
    assert len({header(m, "Call-ID")[0] for m in registers}) == 1
    assert header(registers[-1], "Expires") == ["0"]
    assert "trunk pass 9" not in sbc.log()


@dataclass
class ProbeRun:
    sbc_log: str
    #: Seconds from starting the SBC to its "down" log line; None: never logged.
    down_after: float | None
    failures: str
    caller: SippRun | None
    gateway: SippRun
    caller_sipp: Sipp | None
    gateway_sipp: Sipp
    #: Every datagram the silent gateway received.
    heard: list[bytes]
    dead: int
    alive: int
    inside: int


def probe_gateways(workdir: Path, *, wait: float) -> ProbeRun:
    """Trunk "probed": gateway 1 a socket that reads and never answers, gateway 2 a
    SIPp UAS that answers the probes itself (-aa) and takes a call to 7201, placed
    once gateway 1 is logged down (or ``wait`` seconds passed)."""
    outside, inside = udp_port(), udp_port()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    dead = int(silent.getsockname()[1])
    alive = start_sipp(workdir, "gw2", "uas_basic.xml", calls=None, extra=("-aa",))
    body = (
        "realms:\n"
        + realm_yaml("outside", outside)
        + realm_yaml("inside", inside)
        + "routes:\n"
        + "  - {name: probed, action: trunk, trunk: probed}\n"
        + "trunks:\n"
        + "  - name: probed\n"
        + "    realm: inside\n"
        + "    gateways:\n"
        + f"      - {{host: 127.0.0.1, port: {dead}, priority: 1}}\n"
        + f"      - {{host: 127.0.0.1, port: {alive.port}, priority: 2}}\n"
        + "    probe: {interval: 1, timeout: 0.5, down_after: 2, up_after: 2}\n"
    )
    caller: SippRun | None = None
    caller_sipp: Sipp | None = None
    heard: list[bytes] = []
    try:
        started = time.monotonic()
        sbc = start_sbc(workdir, body)
        try:
            down = wait_for_log(
                sbc,
                rf"gateway probed/0 \(udp:127\.0\.0\.1:{dead}\) down after (\d+) failures",
                wait,
            )
            took = None if down is None else time.monotonic() - started
            if down is not None:
                caller_sipp = start_sipp(
                    workdir, "uac", "flow_uac_call.xml", remote=outside, service="7201",
                    extra=("-d", "200"),
                )  # fmt: skip
                caller = caller_sipp.finish()
        finally:
            sbc.stop()
        gateway = alive.stop()
    finally:
        silent.setblocking(False)
        for _ in range(1000):
            try:
                heard.append(silent.recv(65535))
            except BlockingIOError:
                break
        silent.close()
        if alive.proc.poll() is None:
            alive.proc.kill()
            alive.proc.wait(5)
    return ProbeRun(
        sbc.log(), took, "" if down is None else down.group(1), caller, gateway, caller_sipp,
        alive, heard, dead, alive.port, inside,
    )  # fmt: skip


def assert_probed_and_skipped(run: ProbeRun) -> None:
    """Gateway 1 down after two unanswered probes; the call went to gateway 2 only."""
    assert run.down_after is not None, run.sbc_log[-3000:]
    assert run.failures == "2"
    assert run.caller is not None and run.caller.returncode == 0, run.sbc_log[-3000:]
    assert finals(run.caller) == [200, 200]
    probes = [d for d in run.heard if d.startswith(b"OPTIONS sip:")]
    assert len(probes) >= 2, run.heard
    # The new call never tried the silent gateway.
    assert not [d for d in run.heard if d.startswith(b"INVITE sip:7201@")], run.heard
    invites = [m for m in run.gateway.received if m.startswith("<INVITE")]
    assert len(invites) == 1, starts(run.gateway)
    assert invites[0].startswith(f"<INVITE sip:7201@127.0.0.1:{run.alive} ")
    # Gateway 2 answered its probes (SIPp -aa) and stayed usable.
    options = [m for m in run.gateway.received if m.startswith("<OPTIONS")]
    assert options and all(f"Via: SIP/2.0/UDP 127.0.0.1:{run.inside};" in m for m in options)
    assert f":{run.alive}) down" not in run.sbc_log
    assert run.caller_sipp is not None
    assert_hidden(run.caller, run.gateway, run.caller_sipp, run.gateway_sipp)


def test_probing_takes_a_silent_gateway_down_and_calls_skip_it(tmp_path: Path) -> None:
    run = probe_gateways(tmp_path, wait=5.0)
    assert_probed_and_skipped(run)
    # Two probes a second apart, the second unanswered for 0.5 s: about 1.5 s.
    assert run.down_after is not None and run.down_after <= 5.0


# -- 7. header manipulation ----------------------------------------------------------------

#: The core realm's rules, as docs and `sbc default-config` show them.
STRIP_USER_AGENT = "      - {action: strip, header: User-Agent}\n"
ADD_X_REALM = '      - {action: add, header: X-Realm, value: "${realm}", direction: outbound}\n'
REWRITE_RURI = (
    "      - {action: rewrite, header: request-uri, pattern: '^sip:\\+49', replacement: 'sip:0'}\n"
)


@dataclass
class RulesCall:
    caller: SippRun
    callee: SippRun
    invite: str
    core: int
    uas: int


def call_through_rules(workdir: Path, rules: str) -> RulesCall:
    """`call_through_core` with ``rules`` as the core realm's header_rules."""
    return call_through_core(workdir, "    header_rules:\n" + rules)


def call_through_core(workdir: Path, core_extra: str) -> RulesCall:
    """A call from the outside realm to +4930123456 on a SIPp UAS in the core realm,
    whose YAML ends with ``core_extra``; on an SBC of its own."""
    outside, core, uas = udp_port(), udp_port(), udp_port()
    body = (
        "realms:\n"
        + realm_yaml("outside", outside)
        + realm_yaml("core", core, core_extra)
        + "routes:\n"
        + f"  - {{name: to-core, action: trunk, realm: core, host: 127.0.0.1, port: {uas}}}\n"
    )
    sbc = start_sbc(workdir, body)
    try:
        callee_sipp = start_sipp(workdir, "uas", "uas_basic.xml", port=uas)
        time.sleep(0.1)
        caller_sipp = start_sipp(
            workdir, "uac", "flow_uac_call.xml", remote=outside, service="+4930123456",
            extra=("-d", "200"),
        )  # fmt: skip
        caller, callee = caller_sipp.finish(), callee_sipp.finish()
        assert caller.returncode == 0, explain(sbc, caller, callee)
        assert callee.returncode == 0, explain(sbc, caller, callee)
        assert_hidden(caller, callee, caller_sipp, callee_sipp)
    finally:
        sbc.stop()
    return RulesCall(caller, callee, first(callee, "<INVITE"), core, uas)


def test_request_uri_rewrite_rule(tmp_path: Path) -> None:
    done = call_through_rules(tmp_path, REWRITE_RURI)
    assert done.invite.startswith(f"<INVITE sip:030123456@127.0.0.1:{done.uas} SIP/2.0")
    assert f"Via: SIP/2.0/UDP 127.0.0.1:{done.core};" in done.invite
    # Only the Request-URI: the SBC's User-Agent is still there, nothing added.
    assert header(done.invite, "User-Agent") == ["sbc-flows"]
    assert not header(done.invite, "X-Realm")


def test_header_rules_strip_add_and_rewrite(tmp_path: Path) -> None:
    done = call_through_rules(tmp_path, STRIP_USER_AGENT + ADD_X_REALM + REWRITE_RURI)
    assert done.invite.startswith(f"<INVITE sip:030123456@127.0.0.1:{done.uas} SIP/2.0")
    # Every request the SBC sent into the core realm: no User-Agent, X-Realm added.
    requests = [m for m in done.callee.received if not m.startswith("<SIP/2.0")]
    assert [m.split(" ", 1)[0] for m in requests] == ["<INVITE", "<ACK", "<BYE"]
    for message in requests:
        assert not header(message, "User-Agent"), message
        assert header(message, "X-Realm") == ["core"], message
    # The outside realm has no rules: the caller's messages are untouched by them.
    assert "X-Realm" not in received_text(done.caller)
    assert header(first(done.caller, "<SIP/2.0 200"), "Server") == ["sbc-flows"]


# -- 8. CDRs (stops the shared SBC, reads its database, starts it again) ---------------


def test_cdrs_one_row_per_attempt(lab: FlowLab) -> None:
    # Attempts of this test itself, so it checks something when run alone.
    callee_bye = call(lab, "uac_callee_bye.xml", "uas_bye.xml", service="2081")
    assert callee_bye[0].returncode == 0 and callee_bye[1].returncode == 0
    rejected = call(lab, "uac_reject.xml", "uas_reject.xml", service="2082")
    assert rejected[0].returncode == 0 and rejected[1].returncode == 0
    cancelled = call(lab, "uac_cancel.xml", "uas_ring.xml", service="2083")
    assert cancelled[0].returncode == 0 and cancelled[1].returncode == 0
    local = start_sipp(
        lab.workdir, "uac-busy", "uac_reject.xml", remote=lab.realm["outside"], service="4869"
    ).finish()
    assert local.returncode == 0, explain(lab.sbc, local)
    expected = [
        *lab.cdrs,
        answered("2081", "to-uas", "outside", "inside", lab.uas, hangup="callee"),
        ExpectedCdr(
            "2082", "to-uas", "busy", 486, "rejected", None, "outside", "inside",
            f"127.0.0.1:{lab.uas}",
        ),
        ExpectedCdr(
            "2083", "to-uas", "cancelled", 487, "cancel", None, "outside", "inside",
            f"127.0.0.1:{lab.uas}",
        ),
        ExpectedCdr("4869", "busy", "busy", 486, "rejected", None, "outside", "", ""),
    ]  # fmt: skip
    assert lab.sbc.stop() == 0  # SIGTERM: a clean stop writes every queued CDR
    try:
        rows = read_cdrs(lab.workdir / "state" / "cdr.sqlite")
    finally:
        lab.sbc.start()  # later tests, if any, still have an SBC
    for want in expected:
        want.check(rows)
    # No row for anything else (the 407-challenged INVITE is not an attempt).
    assert len(rows) == len(expected), [(r["callee"], r["disposition"]) for r in rows]


# -- 9. maximum call duration --------------------------------------------------------------


_TRACE_STAMP = re.compile(r"^-{5,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)$", re.MULTILINE)


def stamped(path: Path) -> list[tuple[float, str]]:
    """SIPp's -message_file as (time, first line) with '<' received, '>' sent."""
    parts = _TRACE_STAMP.split(path.read_text(errors="replace"))
    out = []
    for stamp, chunk in zip(parts[1::2], parts[2::2], strict=True):
        head, _, body = chunk.strip("\n").partition("\n")
        when = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + float(stamp[19:])
        line = body.lstrip("\n").split("\n", 1)[0].strip()
        out.append((when, ("<" if "received" in head else ">") + line))
    return out


def test_max_duration_ends_the_call_with_bye_on_both_legs(tmp_path: Path) -> None:
    outside, inside, uas = udp_port(), udp_port(), udp_port()
    body = (
        "calls:\n  max_duration: 2\n"
        "realms:\n"
        + realm_yaml("outside", outside)
        + realm_yaml("inside", inside)
        + "routes:\n"
        + f"  - {{name: to-uas, action: trunk, realm: inside, host: 127.0.0.1, port: {uas}}}\n"
    )
    sbc = start_sbc(tmp_path, body)
    try:
        # Neither side hangs up: both wait for the SBC's BYE and answer it.
        callee_sipp = start_sipp(tmp_path, "uas", "uas_basic.xml", port=uas)
        time.sleep(0.1)
        caller_sipp = start_sipp(
            tmp_path, "uac", "uac_callee_bye.xml", remote=outside, service="2090"
        )
        caller, callee = caller_sipp.finish(), callee_sipp.finish()
        assert caller.returncode == 0, explain(sbc, caller, callee)
        assert callee.returncode == 0, explain(sbc, caller, callee)
        assert "maximum duration reached" in sbc.log()
    finally:
        assert sbc.stop() == 0
    for sipp in (caller_sipp, callee_sipp):
        lines = stamped(sipp.trace)
        answer = next(t for t, line in lines if line.startswith(("<SIP/2.0 200", ">SIP/2.0 200")))
        bye = next(t for t, line in lines if line.startswith("<BYE "))
        assert 1.8 <= bye - answer <= 3.5, (bye - answer, lines)
    # Each BYE is in its own leg's dialog: the tags that side knows.
    a_bye, b_bye = first(caller, "<BYE"), first(callee, "<BYE")
    caller_tag = tag_of(header(first(caller, ">INVITE"), "From")[0])
    assert tag_of(header(a_bye, "To")[0]) == caller_tag
    assert header(a_bye, "Call-ID") == header(first(caller, ">INVITE"), "Call-ID")
    callee_tag = tag_of(header(first(callee, ">SIP/2.0 200"), "To")[0])
    assert tag_of(header(b_bye, "To")[0]) == callee_tag
    assert header(b_bye, "Call-ID") == header(first(callee, "<INVITE"), "Call-ID")
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    rows = read_cdrs(tmp_path / "state" / "cdr.sqlite")
    assert len(rows) == 1
    # docs/cdr.md: "answered" is decided first, so it wins over the SBC's own hang-up;
    # end_reason and hangup_side tell why the call ended.
    row = ExpectedCdr(
        "2090", "to-uas", "answered", 200, "max_duration", "sbc", "outside", "inside",
        f"127.0.0.1:{uas}",
    ).check(rows)  # fmt: skip
    assert row["duration"] == pytest.approx(2.0, abs=0.5)


# -- 10. media timeout ---------------------------------------------------------------------


def relay_rtp_ports(pid: int) -> list[int]:
    """The even UDP ports process ``pid`` has bound on 127.0.0.1 in the relay's range
    (20000-29999): its RTP ports, one per leg of each call."""
    out = subprocess.run(
        ["ss", "-H", "-u", "-a", "-n", "-p"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    ports = set()
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        found = re.search(r"127\.0\.0\.1:(\d+)\s", line)
        if found and 20000 <= int(found.group(1)) <= 29999 and int(found.group(1)) % 2 == 0:
            ports.add(int(found.group(1)))
    return sorted(ports)


def rtp_packet(seq: int) -> bytes:
    """An RTP packet (RFC 3550): PCMU, 20 ms of silence."""
    return (
        bytes([0x80, 0x00])
        + seq.to_bytes(2, "big")
        + (seq * 160).to_bytes(4, "big")
        + (b"\x12\x34\x56\x78" + b"\xff" * 160)
    )


def test_media_timeout_ends_a_silent_call_not_a_talking_one(tmp_path: Path) -> None:
    outside, inside, uas = udp_port(), udp_port(), udp_port()
    body = (
        "realms:\n"
        + realm_yaml("outside", outside)
        + realm_yaml("inside", inside)
        + "routes:\n"
        + f"  - {{name: to-uas, action: trunk, realm: inside, host: 127.0.0.1, port: {uas}}}\n"
    )
    # The body follows the config's "media:" section: its first line joins it.
    sbc = start_sbc(tmp_path, "  timeout: 2\n" + body)
    talkers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        # Neither side hangs up: both wait for the SBC's BYE and answer it.
        callee_sipp = start_sipp(tmp_path, "uas", "uas_basic.xml", port=uas)
        time.sleep(0.1)
        caller_sipp = start_sipp(
            tmp_path, "uac", "uac_callee_bye.xml", remote=outside, service="2091"
        )
        assert wait_for_calls(sbc, 1), sbc.log()[-3000:]
        assert wait_until(lambda: len(relay_rtp_ports(sbc.pid)) == 2, 5.0, 0.1)
        ports = relay_rtp_ports(sbc.pid)
        # RTP into both legs for 4 s, twice the media timeout: the call stays up.
        talked = time.monotonic()
        seq = 0
        while time.monotonic() - talked < 4.0:
            for talker, port in zip(talkers, ports, strict=True):
                talker.sendto(rtp_packet(seq), ("127.0.0.1", port))
            seq += 1
            time.sleep(0.05)
        status, health = sbc.health()
        assert status == 200 and health.get("calls") == 1, (health, sbc.log()[-3000:])
        silent_from = time.time()
        caller, callee = caller_sipp.finish(), callee_sipp.finish()
        assert caller.returncode == 0, explain(sbc, caller, callee)
        assert callee.returncode == 0, explain(sbc, caller, callee)
    finally:
        for talker in talkers:
            talker.close()
        assert sbc.stop() == 0
    # Silent from then on: both legs get the SBC's BYE about the timeout later (the
    # relay checks once a second; the rest is slack for a busy CI machine).
    for sipp in (caller_sipp, callee_sipp):
        bye = next(t for t, line in stamped(sipp.trace) if line.startswith("<BYE "))
        assert 1.5 <= bye - silent_from <= 5.0, bye - silent_from
    assert_hidden(caller, callee, caller_sipp, callee_sipp)
    row = ExpectedCdr(
        "2091", "to-uas", "answered", 200, "media_timeout", "sbc", "outside", "inside",
        f"127.0.0.1:{uas}",
    ).check(read_cdrs(tmp_path / "state" / "cdr.sqlite"))  # fmt: skip
    assert row["duration"] >= 5.5
