"""Where `sbc run` sends the requests of a dialog with a trunk, with SIPp peers on loopback.

RFC 3261 12.2.1.1: a request inside a dialog goes to the first route of the route set
(the callee's Record-Route, reversed), else to the remote target (the callee's
Contact). A trunk whose 200 names another node of its cluster in Contact, or a proxy
in Record-Route, must get the ACK and the BYE there, not at the address the INVITE
went to. A Contact the SBC does not follow (a host name: no DNS inside a dialog;
another transport) keeps the dialog at the INVITE's destination.

Each call: a SIPp caller enters the outside realm and calls the route of its case; the
SIPp trunk at the route's address answers 200 naming another port of 127.0.0.1 (the
same scope as the trunk's own loopback address, so the SBC may follow it). Where the
dialog belongs, a second SIPp expects the ACK and the BYE and answers the BYE 200;
where it does not, either the trunk's scenario fails on any request after its 200, or
a trap socket (UDP and TCP on one port) records what arrived. Every wait is bounded to
a few seconds: a request sent to the wrong place fails the test, with what each side
received in the message.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.scenario.sbcproc import SbcProcess, free_port, start_routed
from tests.scenario.test_b2bua_flows import (
    SIPP,
    Sipp,
    explain,
    finals,
    start_sipp,
    starts,
    udp_port,
)
from tests.scenario.test_b2bua_sipp import SippRun, header

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) not installed")

#: The route (Request-URI user) of each case; each has its own trunk port.
TO_CONTACT, TO_RECORD_ROUTE, STAYS = "6001", "6002", "6003"
#: SIPp's own bound on a run: a correct call takes about 1 s, the trunk's 2 s pause
#: included; a peer waiting for a request that went elsewhere gives up here.
SIPP_BOUND = ("-timeout", "8s", "-timeout_error")
#: Ours on waiting for a SIPp run to end.
WAIT = 12.0


@dataclass
class HopLab:
    sbc: SbcProcess
    workdir: Path
    #: The SBC's outside realm port, where the caller sends.
    outside: int
    #: The trunk port (the INVITE's destination) of each route.
    trunk: dict[str, int]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HopLab]:
    workdir = tmp_path_factory.mktemp("dialog-hop")
    trunk = {user: udp_port() for user in (TO_CONTACT, TO_RECORD_ROUTE, STAYS)}
    sbc, outside = start_routed(workdir, trunk)
    try:
        yield HopLab(sbc, workdir, outside, trunk)
    finally:
        sbc.stop()


class Trap:
    """UDP and TCP on one loopback port where nothing of the dialog may arrive."""

    def __init__(self) -> None:
        self.port = free_port(also_udp=True)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for s in (self.udp, self.tcp):
            s.bind(("127.0.0.1", self.port))
            s.setblocking(False)
        self.tcp.listen(4)

    def arrivals(self) -> list[str]:
        """The first line of each datagram received so far, and any TCP connection."""
        out = []
        while True:
            try:
                data = self.udp.recv(65535)
            except BlockingIOError:
                break
            out.append("udp: " + data.split(b"\r\n", 1)[0].decode(errors="replace"))
        try:
            conn, _ = self.tcp.accept()
        except BlockingIOError:
            pass
        else:
            conn.close()
            out.append("tcp: a connection")
        return out

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


@pytest.fixture
def peers() -> Iterator[ExitStack]:
    """Closes the traps and ends (SIGKILL) every SIPp a test leaves running."""
    with ExitStack() as stack:
        yield stack


def sipp(
    stack: ExitStack,
    lab: HopLab,
    name: str,
    scenario: str,
    *,
    port: int | None = None,
    remote: int | None = None,
    service: str = "1000",
    extra: tuple[str, ...] = (),
) -> Sipp:
    """``start_sipp`` with this module's bound, killed at the test's end if still running."""
    peer = start_sipp(
        lab.workdir, name, scenario, port=port, remote=remote, service=service,
        extra=(*SIPP_BOUND, *extra),
    )  # fmt: skip
    stack.callback(_reap, peer.proc)
    return peer


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def trap(stack: ExitStack) -> Trap:
    found = Trap()
    stack.callback(found.close)
    return found


def keys(**values: str) -> tuple[str, ...]:
    """SIPp's ``-key name value`` for each item: ``[name]`` in the scenario."""
    return tuple(arg for name, value in values.items() for arg in ("-key", name, value))


def requests(run: SippRun) -> list[str]:
    """Request line of each request ``run`` received, e.g. ``ACK sip:bob@... SIP/2.0``."""
    return [s[1:] for s in starts(run) if s.startswith("<") and not s.startswith("<SIP/2.0")]


def received(run: SippRun, method: str) -> str:
    found = [m for m in run.received if m.startswith(f"<{method} ")]
    assert len(found) == 1, (method, starts(run))
    return found[0]


def route_uris(message: str) -> list[str]:
    """The URIs of the Route header fields of ``message``, in order."""
    return re.findall(r"<([^>]+)>", ",".join(header(message, "Route")))


def call_caller(lab: HopLab, stack: ExitStack, user: str) -> Sipp:
    return sipp(stack, lab, f"uac-{user}", "hop_uac.xml", remote=lab.outside, service=user)


def where(**runs: SippRun) -> str:
    """What each SIPp received, for a failure message."""
    return "\n".join(f"{name}: {requests(run)} rc={run.returncode}" for name, run in runs.items())


def test_the_ack_and_bye_go_to_the_callee_s_contact(lab: HopLab, peers: ExitStack) -> None:
    """The trunk answers from 127.0.0.1:trunk naming 127.0.0.1:other in Contact: the
    SBC's ACK and its BYE (after the caller's) go to the other node."""
    other = udp_port()
    contact = f"sip:bob@127.0.0.1:{other}"
    node = sipp(peers, lab, "node", "hop_uas_target.xml", port=other)
    trunk = sipp(
        peers, lab, "trunk", "hop_uas_contact.xml", port=lab.trunk[TO_CONTACT],
        extra=keys(contact=contact),
    )  # fmt: skip
    caller = call_caller(lab, peers, TO_CONTACT)
    a, b, first = caller.finish(WAIT), node.finish(WAIT), trunk.finish(WAIT)
    seen = where(caller=a, contact=b, trunk=first) + "\n" + explain(lab.sbc, a, b, first)

    assert requests(first) == [f"INVITE sip:{TO_CONTACT}@127.0.0.1:{trunk.port} SIP/2.0"], seen
    assert requests(b) == [f"ACK {contact} SIP/2.0", f"BYE {contact} SIP/2.0"], seen
    assert not header(received(b, "BYE"), "Route"), seen  # no Record-Route: no route set
    assert b.returncode == 0 and first.returncode == 0, seen
    assert a.returncode == 0 and finals(a) == [200, 200], seen


def test_the_ack_and_bye_go_to_the_first_record_route(lab: HopLab, peers: ExitStack) -> None:
    """The trunk's 200 has two loose routers in Record-Route and a Contact behind them:
    the route set is the Record-Route reversed, so both requests go to the proxy next
    to the SBC (the last Record-Route entry) with both in Route, for the Contact."""
    near = udp_port()
    far, behind = trap(peers), trap(peers)
    contact = f"sip:bob@127.0.0.1:{behind.port}"
    record_route = f"<sip:127.0.0.1:{far.port};lr>, <sip:127.0.0.1:{near};lr>"
    proxy = sipp(peers, lab, "proxy", "hop_uas_target.xml", port=near)
    trunk = sipp(
        peers, lab, "trunk", "hop_uas_record_route.xml", port=lab.trunk[TO_RECORD_ROUTE],
        extra=keys(contact=contact, record_route=record_route),
    )  # fmt: skip
    caller = call_caller(lab, peers, TO_RECORD_ROUTE)
    a, b, first = caller.finish(WAIT), proxy.finish(WAIT), trunk.finish(WAIT)
    strays = {"far proxy": far.arrivals(), "contact": behind.arrivals()}
    seen = where(caller=a, proxy=b, trunk=first) + f"\n{strays}\n" + explain(lab.sbc, a, b, first)

    assert requests(first) == [f"INVITE sip:{TO_RECORD_ROUTE}@127.0.0.1:{trunk.port} SIP/2.0"], seen
    # RFC 3261 12.2.1.1: a loose first route: the Request-URI is the remote target.
    assert requests(b) == [f"ACK {contact} SIP/2.0", f"BYE {contact} SIP/2.0"], seen
    routes = [f"sip:127.0.0.1:{near};lr", f"sip:127.0.0.1:{far.port};lr"]
    for method in ("ACK", "BYE"):
        assert route_uris(received(b, method)) == routes, seen
    assert strays == {"far proxy": [], "contact": []}, seen
    assert b.returncode == 0 and first.returncode == 0, seen
    assert a.returncode == 0 and finals(a) == [200, 200], seen


@pytest.mark.parametrize(
    "contact",
    [
        # A host name (that resolves to the trap): no DNS for requests in a dialog.
        "sip:bob@localhost:{port}",
        # Another transport than the trunk's UDP.
        "sip:bob@127.0.0.1:{port};transport=tcp",
    ],
    ids=["host-name", "other-transport"],
)
def test_a_contact_not_followed_keeps_the_dialog_at_the_trunk(
    lab: HopLab, peers: ExitStack, contact: str
) -> None:
    """The Contact names the trap's port in a form the SBC does not follow: the ACK and
    BYE go to the INVITE's destination, still for the Contact (the Request-URI)."""
    elsewhere = trap(peers)
    contact = contact.format(port=elsewhere.port)
    trunk = sipp(
        peers, lab, "trunk", "hop_uas_stays.xml", port=lab.trunk[STAYS],
        extra=keys(contact=contact),
    )  # fmt: skip
    caller = call_caller(lab, peers, STAYS)
    a, first = caller.finish(WAIT), trunk.finish(WAIT)
    strays = elsewhere.arrivals()
    seen = where(caller=a, trunk=first) + f"\ncontact: {strays}\n" + explain(lab.sbc, a, first)

    assert requests(first) == [
        f"INVITE sip:{STAYS}@127.0.0.1:{trunk.port} SIP/2.0",
        f"ACK {contact} SIP/2.0",
        f"BYE {contact} SIP/2.0",
    ], seen
    assert strays == [], seen
    assert first.returncode == 0, seen
    assert a.returncode == 0 and finals(a) == [200, 200], seen
