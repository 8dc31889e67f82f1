# ruff: noqa: E501  (embedded C source and SIP message templates)
"""A two-namespace lab for the firewall's scenario tests, and the processes in it.

    ext (peers, scanners, flooders)  ==veth==  sbc (the firewall + a SIP stand-in)
    198.51.100.2 trusted trunk (SIPp)          198.51.100.1, 2001:db8:100::1
    198.51.100.3 untrusted peer
    2001:db8:100::2, 2001:db8:1:2::1/::2, 2001:db8:1:3::1
    203.0.113.0/24 and 198.51.100.64/26: spoofed flood sources (raw socket)

`python -m tests.scenario.fw_lab node CONFIG_JSON STATUS_FILE` runs, inside the sbc
namespace, a `Firewall` plus a tiny UDP SIP responder (INVITE/BYE/OPTIONS -> 200,
REGISTER -> digest 401/200) that feeds every request, parse error and digest failure
to the detectors. `sbc run` itself feeds its firewall now (test_firewall_sbc.py) and
its embedded registrar's digest failures too (test_firewall_auth_sbc.py, with the
`digest_exchanges` client run in ext by `lab_call`); test_firewall_lab.py and the
flood scenarios keep the stand-in. The flood sender is a small C program
(`FLOOD_C`), bounded in packets and seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

SBC_V4 = "198.51.100.1"
TRUNK_V4 = "198.51.100.2"
PEER_V4 = "198.51.100.3"
SBC_V6 = "2001:db8:100::1"
EXT_V6 = ("2001:db8:100::2", "2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:3::1")
PASSWORD = "correct horse"
REALM = "sbc.test"


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def available() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    try:
        import nftables  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "nftables Python binding missing (pip-nftables)"
    return None


@dataclass
class Lab:
    ext: str
    sbc: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def ns(self, name: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", name, *args]

    def run(self, name: str, *args: str, check: bool = True, timeout: float = 30) -> str:
        return sh(*self.ns(name, *args), check=check, timeout=timeout).stdout

    def spawn(self, name: str, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.ns(name, *args), **kw)
        self.procs.append(proc)
        return proc

    def nft_json(self, *what: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.run(self.sbc, "nft", "-j", "list", *what))
        return out

    def counters(self) -> dict[str, int]:
        data = self.nft_json("counters", "table", "inet", "sbc")
        return {
            item["counter"]["name"]: item["counter"]["packets"]
            for item in data["nftables"]
            if "counter" in item
        }

    def set_elements(self, name: str) -> list[str]:
        data = self.nft_json("set", "inet", "sbc", name)
        for item in data["nftables"]:
            if "set" in item:
                return [
                    e["elem"]["val"] if isinstance(e, dict) else e
                    for e in item["set"].get("elem", [])
                ]
        return []

    def ruleset_outside_sbc(self) -> str:
        """`nft list ruleset` of the sbc namespace without table inet sbc."""
        out = self.run(self.sbc, "nft", "list", "ruleset")
        kept, skipping = [], False
        for line in out.splitlines():
            if line.startswith("table inet sbc "):
                skipping = True
            elif skipping and line == "}":
                skipping = False
                continue
            if not skipping:
                kept.append(line)
        return "\n".join(kept)


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    """Create the namespaces; always delete them (and end our processes) afterwards."""
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    the_lab = Lab(ext=f"fwext{tag}", sbc=f"fwsbc{tag}")
    veth_ext, veth_sbc = f"fwe{tag}", f"fws{tag}"
    try:
        sh("ip", "netns", "add", the_lab.ext)
        sh("ip", "netns", "add", the_lab.sbc)
        sh(
            "ip",
            "link",
            "add",
            veth_ext,
            "netns",
            the_lab.ext,
            "type",
            "veth",
            "peer",
            "name",
            veth_sbc,
            "netns",
            the_lab.sbc,
        )
        e, s = the_lab.ext, the_lab.sbc
        for ns_name, dev in ((e, veth_ext), (s, veth_sbc)):
            the_lab.run(ns_name, "ip", "link", "set", "lo", "up")
            the_lab.run(ns_name, "ip", "link", "set", dev, "up")
            the_lab.run(ns_name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
            the_lab.run(ns_name, "sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0")
        the_lab.run(s, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
        the_lab.run(s, "sysctl", "-qw", f"net.ipv4.conf.{veth_sbc}.rp_filter=0")
        # A /26 on the link; everything else (the spoofed ranges among it) is behind
        # a gateway in ext, as the internet is: replies to spoofed sources go to a
        # resolved next hop instead of piling up behind failed ARP lookups.
        the_lab.run(s, "ip", "addr", "add", f"{SBC_V4}/26", "dev", veth_sbc)
        the_lab.run(s, "ip", "-6", "addr", "add", f"{SBC_V6}/64", "dev", veth_sbc, "nodad")
        the_lab.run(s, "ip", "route", "add", "default", "via", TRUNK_V4)
        the_lab.run(s, "ip", "-6", "route", "add", "2001:db8::/32", "via", EXT_V6[0])
        for address in (TRUNK_V4, PEER_V4):
            the_lab.run(e, "ip", "addr", "add", f"{address}/24", "dev", veth_ext)
        for address in EXT_V6:
            the_lab.run(e, "ip", "-6", "addr", "add", f"{address}/64", "dev", veth_ext, "nodad")
        the_lab.run(e, "ip", "-6", "route", "add", "2001:db8:100::/64", "dev", veth_ext)
        yield the_lab
    finally:
        for proc in the_lab.procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        for name in (the_lab.ext, the_lab.sbc):
            sh("ip", "netns", "del", name, check=False)


# --- the flood sender ------------------------------------------------------------

FLOOD_C = r"""
/* Spoofed UDP flood, bounded: flood DST PORT MAX_PACKETS MAX_SECONDS PPS BASE COUNT [BASE COUNT]
 * PPS 0 sends as fast as possible.
 * Sources cycle through COUNT addresses from each BASE (a.b.c.d). Payloads rotate
 * INVITE / REGISTER / garbage. Prints "sent N seconds S". */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#define BATCH 64
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int argc,char**argv){
  if(argc<8){fprintf(stderr,"usage\n");return 2;}
  in_addr_t dst=inet_addr(argv[1]); int port=atoi(argv[2]);
  long maxp=atol(argv[3]); double maxs=atof(argv[4]); double pps=atof(argv[5]);
  unsigned srcs[1024]; int nsrc=0;
  for(int a=6;a+1<argc;a+=2){unsigned b=ntohl(inet_addr(argv[a]));int c=atoi(argv[a+1]);
    for(int i=0;i<c&&nsrc<1024;i++)srcs[nsrc++]=htonl(b+i);}
  const char*payload[3]={
   "INVITE sip:100@198.51.100.1 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKflood\r\nMax-Forwards: 70\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:100@198.51.100.1>\r\nCall-ID: flood\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
   "REGISTER sip:198.51.100.1 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKfloodr\r\nMax-Forwards: 70\r\nFrom: <sip:b@x>;tag=2\r\nTo: <sip:b@x>\r\nCall-ID: floodr\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n",
   "\x16\x03\x01garbage garbage garbage \xff\xfe\r\n\r\n"};
  int s=socket(AF_INET,SOCK_RAW,IPPROTO_RAW); if(s<0){perror("socket");return 1;}
  int sndbuf=4<<20; setsockopt(s,SOL_SOCKET,SO_SNDBUF,&sndbuf,sizeof sndbuf);
  static char pkt[BATCH][600]; struct mmsghdr msgs[BATCH]; struct iovec iov[BATCH];
  struct sockaddr_in to={.sin_family=AF_INET,.sin_addr.s_addr=dst};
  long sent=0; double t0=now(), t=t0; unsigned k=0;
  while(sent<maxp && (t=now())-t0<maxs){
    if(pps>0 && sent>pps*(t-t0)){usleep(200);continue;}
    int n=BATCH; if(maxp-sent<n)n=maxp-sent;
    for(int i=0;i<n;i++,k++){
      const char*p=payload[k%3]; int len=strlen(p);
      struct iphdr*ip=(struct iphdr*)pkt[i]; struct udphdr*u=(struct udphdr*)(ip+1);
      memset(ip,0,sizeof *ip+sizeof *u);
      ip->ihl=5;ip->version=4;ip->ttl=64;ip->protocol=IPPROTO_UDP;
      ip->saddr=srcs[k%nsrc];ip->daddr=dst;ip->tot_len=htons(28+len);
      u->source=htons(5060);u->dest=htons(port);u->len=htons(8+len);u->check=0;
      memcpy(u+1,p,len);
      iov[i].iov_base=pkt[i];iov[i].iov_len=28+len;
      memset(&msgs[i],0,sizeof msgs[i]);
      msgs[i].msg_hdr.msg_iov=&iov[i];msgs[i].msg_hdr.msg_iovlen=1;
      msgs[i].msg_hdr.msg_name=&to;msgs[i].msg_hdr.msg_namelen=sizeof to;
    }
    int r=sendmmsg(s,msgs,n,0); if(r>0)sent+=r; else usleep(100);
  }
  printf("sent %ld seconds %.3f\n",sent,now()-t0); return 0;
}
"""


def build_flooder(directory: Path) -> Path | None:
    if shutil.which("gcc") is None:
        return None
    source = directory / "flood.c"
    source.write_text(FLOOD_C)
    binary = directory / "flood"
    sh("gcc", "-O2", "-o", str(binary), str(source))
    return binary


# --- the SBC stand-in ------------------------------------------------------------


def firewall_config(options: dict[str, Any]) -> Any:
    """A FirewallConfig from the few knobs the scenario tests turn."""
    from sbc.firewall.config import (
        AuthFailureDetector,
        BanPolicy,
        FirewallConfig,
        MalformedDetector,
        PacketMeter,
        RatePeakDetector,
        ScannerDetector,
    )

    base = FirewallConfig()
    det = base.detectors
    if "rate" in options:
        det = replace(
            det, rate=RatePeakDetector(window=options["rate"][0], max_requests=options["rate"][1])
        )
    if "auth" in options:
        w, s, u = options["auth"]
        det = replace(det, auth=AuthFailureDetector(window=w, per_source=s, per_user=u))
    if "sweep" in options:
        det = replace(
            det,
            scanner=ScannerDetector(
                sweep_window=options["sweep"][0], sweep_users=options["sweep"][1]
            ),
        )
    if "malformed" in options:
        det = replace(
            det,
            malformed=MalformedDetector(
                window=options["malformed"][0], max_messages=options["malformed"][1]
            ),
        )
    config = replace(
        base,
        trusted=tuple(ip_network(n) for n in options.get("trusted", ())),
        detectors=det,
        state_file=Path(options["state_file"]),
    )
    if "udp" in options:
        config = replace(config, udp=PacketMeter(rate=options["udp"][0], burst=options["udp"][1]))
    if "durations" in options:
        config = replace(config, bans=BanPolicy(durations=tuple(options["durations"])))
    return config


class _Responder(asyncio.DatagramProtocol):
    def __init__(self, node: _Node) -> None:
        self.node = node
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            reply = self.node.handle(data, addr[0])
        except Exception:
            import logging

            logging.getLogger("fw_lab").exception("x handling %d bytes from %s", len(data), addr)
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class _Node:
    def __init__(self, options: dict[str, Any], status: Path) -> None:
        from sbc.firewall import Firewall
        from sbc.sip.auth import DigestServer, DigestServerConfig

        self.firewall = Firewall(firewall_config(options))
        self.status = status
        self.requests: Counter[str] = Counter()
        self.malformed: Counter[str] = Counter()
        self.bans: list[dict[str, Any]] = []
        self.auth = DigestServer(DigestServerConfig(realm=REALM, key=b"k" * 32))

    def handle(self, data: bytes, host: str) -> bytes | None:
        from sbc.firewall.detectors import AuthFailed
        from sbc.firewall.sip_events import malformed_event, request_event
        from sbc.sip.auth import UserSecret
        from sbc.sip.errors import ParseError
        from sbc.sip.message import Request, make_response
        from sbc.sip.parser import parse_message

        source = ip_address(host.split("%")[0])
        if source.version == 6 and source.ipv4_mapped:
            source = source.ipv4_mapped
        try:
            message = parse_message(data)
        except ParseError as exc:
            self.malformed[str(source)] += 1
            self._ban(self.firewall.observe(malformed_event(exc, source)))
            return None
        if not isinstance(message, Request):
            return None
        self.requests[str(source)] += 1
        self._ban(self.firewall.observe(request_event(message, source)))
        if message.method == "ACK":
            return None
        now = time.time()
        if message.method == "REGISTER":
            authorization = message.headers.get("Authorization")
            if authorization is None:
                challenge = [("WWW-Authenticate", v) for v in self.auth.challenge_values(now)]
                return bytes(make_response(message, 401, headers=challenge))
            result = self.auth.verify(
                authorization,
                method="REGISTER",
                request_uri=message.raw_uri,
                secret=UserSecret.from_password(PASSWORD),
                now=now,
            )
            if not result.ok:
                user = result.username or "?"
                self._ban(self.firewall.observe(AuthFailed(source, user)))
                return bytes(make_response(message, 403))
            return bytes(make_response(message, 200, to_tag="reg"))
        return bytes(
            make_response(
                message, 200, to_tag="sbc", headers=[("Contact", f"<sip:sbc@{SBC_V4}:5060>")]
            )
        )

    def _ban(self, bans: list[Any]) -> None:
        for ban in bans:
            self.bans.append(
                {
                    **ban.to_json(),
                    "at": time.time(),
                    "requests_before": self.requests[str(ban.target.network_address)],
                }
            )

    def write_status(self) -> None:
        stats = self.firewall.stats()
        data = {
            "requests": dict(self.requests),
            "malformed": dict(self.malformed),
            "bans": self.bans,
            "decisions": {str(k): v for k, v in stats.decisions.items()},
            "trusted_events": stats.trusted_events,
        }
        tmp = self.status.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.status)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        sockets = []
        for family, host in ((socket.AF_INET, SBC_V4), (socket.AF_INET6, SBC_V6)):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.bind((host, 5060))
            sockets.append(sock)
            await loop.create_datagram_endpoint(lambda: _Responder(self), sock=sock)
        print("READY", flush=True)
        while not stop.is_set():
            self.firewall.flush()
            self.write_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        self.write_status()

    def main(self) -> None:
        self.firewall.start()
        try:
            asyncio.run(self.serve())
        finally:
            self.firewall.stop()
            print("STOPPED", flush=True)


def start_node(the_lab: Lab, options: dict[str, Any], status: Path) -> subprocess.Popen[str]:
    """Run the SBC stand-in in the sbc namespace; returns once it listens."""
    root = Path(__file__).resolve().parents[2]
    # The log goes to a file: a pipe nobody drains fills up with ban lines and
    # blocks the node mid-flood.
    log_path = status.with_suffix(".log")
    with open(log_path, "w") as log_file:
        proc = the_lab.spawn(
            the_lab.sbc,
            sys.executable,
            "-m",
            "tests.scenario.fw_lab",
            "node",
            json.dumps(options),
            str(status),
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"node failed: {line}{log_path.read_text()}")
    return proc


def lab_python(the_lab: Lab, namespace: str, *args: str, timeout: float = 60) -> str:
    """Run `python -m tests.scenario.fw_lab ARGS` in a namespace; its stdout."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        the_lab.ns(namespace, sys.executable, "-m", "tests.scenario.fw_lab", *args),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{args}: rc {proc.returncode}: {proc.stderr}")
    return proc.stdout


def stop_node(proc: subprocess.Popen[str], timeout: float = 10) -> str:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=timeout)
    log: str = proc.log_path.read_text()  # type: ignore[attr-defined]
    return log


def read_status(status: Path) -> dict[str, Any]:
    for _ in range(50):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            data: dict[str, Any] = json.loads(status.read_text())
            return data
        time.sleep(0.05)
    raise AssertionError(f"no status in {status}")


def send_requests(
    source: str,
    target: str,
    count: int,
    method: str = "OPTIONS",
    user_agent: str = "lab-phone/1.0",
    distinct_users: bool = False,
    wait: float = 0.3,
) -> int:
    """Send `count` requests from `source`; return how many were answered."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.settimeout(wait)
    host = f"[{target}]" if ":" in target else target
    me = f"[{source}]" if ":" in source else source
    answered = 0
    for i in range(count):
        user = f"{100 + i}" if distinct_users else "100"
        request = (
            f"{method} sip:{user}@{host} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {me}:{sock.getsockname()[1]};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:probe@{me}>;tag={i}\r\nTo: <sip:{user}@{host}>\r\n"
            f"Call-ID: {secrets.token_hex(8)}\r\nCSeq: 1 {method}\r\n"
            f"User-Agent: {user_agent}\r\nContent-Length: 0\r\n\r\n"
        )
        sock.sendto(request.encode(), (target, 5060))
        with contextlib.suppress(TimeoutError):
            sock.recvfrom(4096)
            answered += 1
    return answered


def register_attempts(source: str, target: str, user: str, password: str, count: int) -> list[int]:
    """REGISTER with digest `count` times; the final status of each (0: no answer)."""
    from sbc.sip.auth import DigestClient
    from sbc.sip.message import Response
    from sbc.sip.parser import parse_message

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.settimeout(0.5)
    statuses = []
    for i in range(count):
        client = DigestClient(user, password)
        authorization = None
        status = 0
        for _ in range(2):
            lines = [
                f"REGISTER sip:{target} SIP/2.0",
                f"Via: SIP/2.0/UDP {source}:{sock.getsockname()[1]};branch=z9hG4bK{secrets.token_hex(6)}",
                "Max-Forwards: 70",
                f"From: <sip:{user}@{REALM}>;tag=r{i}",
                f"To: <sip:{user}@{REALM}>",
                f"Call-ID: reg{i}-{secrets.token_hex(4)}",
                "CSeq: 1 REGISTER",
                f"Contact: <sip:{user}@{source}>",
            ]
            if authorization:
                lines.append(f"Authorization: {authorization}")
            sock.sendto(
                ("\r\n".join([*lines, "Content-Length: 0", "", ""])).encode(), (target, 5060)
            )
            try:
                data, _ = sock.recvfrom(4096)
            except TimeoutError:
                status = 0
                break
            response = parse_message(data)
            assert isinstance(response, Response)
            status = response.status
            if status != 401:
                break
            challenges = response.headers.values("WWW-Authenticate")
            authorization = client.respond(challenges, method="REGISTER", uri=f"sip:{target}")
        statuses.append(status)
    return statuses


def ban_cli(argv: list[str]) -> int:
    """`sbc ban ...` exactly as `sbc.cli` will wire it (add_ban_subcommands)."""
    import argparse

    from sbc.firewall.cli import add_ban_subcommands

    parser = argparse.ArgumentParser(prog="sbc")
    add_ban_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "ban":
        sys.exit(ban_cli(sys.argv[1:]))
    if len(sys.argv) >= 2 and sys.argv[1] == "send":
        kwargs = json.loads(sys.argv[2])
        print(json.dumps(send_requests(**kwargs)))
        sys.exit(0)
    if len(sys.argv) >= 2 and sys.argv[1] == "register":
        kwargs = json.loads(sys.argv[2])
        print(json.dumps(register_attempts(**kwargs)))
        sys.exit(0)
    if len(sys.argv) == 4 and sys.argv[1] == "node":
        import faulthandler
        import logging

        faulthandler.register(signal.SIGUSR1)
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
        )
        _Node(json.loads(sys.argv[2]), Path(sys.argv[3])).main()
    else:
        sys.exit("usage: python -m tests.scenario.fw_lab node|send|register|ban ...")


def sbc_health(lab: Lab, mgmt_port: int) -> dict[str, Any] | None:
    """The real SBC's /healthz, fetched from inside its namespace (None if down)."""
    code = (
        "import urllib.request\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:{mgmt_port}/healthz', timeout=1)\n"
        "    print(r.read().decode())\n"
        "except OSError:\n"
        "    print('null')\n"
    )
    out = lab.run(lab.sbc, sys.executable, "-c", code, check=False)
    health: dict[str, Any] | None = json.loads(out or "null")
    return health


def spawn_sbc(
    lab: Lab, config: Path, log: Path, cwd: Path, mgmt_port: int, timeout: float = 15
) -> subprocess.Popen[Any]:
    """`python -m sbc run` in the SBC namespace, returned once /healthz says ok."""
    with log.open("w") as out:
        # `ip netns exec` execs the command: the Popen's pid is the SBC's.
        proc = lab.spawn(
            lab.sbc,
            sys.executable,
            "-m",
            "sbc",
            "run",
            "--config",
            str(config),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sbc exited with {proc.returncode}:\n{log.read_text()}")
        health = sbc_health(lab, mgmt_port)
        if health and health["ok"]:
            return proc
        time.sleep(0.1)
    raise AssertionError(f"sbc not healthy in {timeout} s:\n{log.read_text()}")


def stop_sbc(proc: subprocess.Popen[Any], timeout: float = 10) -> int:
    """SIGTERM to a `spawn_sbc` process, its exit status; killed (and an error)
    when it has not stopped within `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        raise


# --- digest clients against the real SBC -------------------------------------------


def add_ext_addresses(the_lab: Lab, *addresses: str) -> None:
    """More IPv4 sources in ext, on the lab link (198.51.100.4-62 are on-link for sbc)."""
    out = the_lab.run(the_lab.ext, "ip", "-o", "link", "show", "type", "veth")
    device = out.split(":")[1].strip().split("@")[0]
    for address in addresses:
        the_lab.run(the_lab.ext, "ip", "addr", "add", f"{address}/24", "dev", device)


def lab_call(
    the_lab: Lab, namespace: str, function: str, timeout: float = 60, **kwargs: Any
) -> Any:
    """`fw_lab.<function>(**kwargs)` run by a fresh Python in `namespace`: its JSON result."""
    root = Path(__file__).resolve().parents[2]
    code = (
        "import json, sys\n"
        "from tests.scenario import fw_lab\n"
        "print(json.dumps(getattr(fw_lab, sys.argv[1])(**json.loads(sys.argv[2]))))\n"
    )
    proc = subprocess.run(
        the_lab.ns(namespace, sys.executable, "-c", code, function, json.dumps(kwargs)),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{function}: rc {proc.returncode}: {proc.stderr}")
    return json.loads(proc.stdout)


def _final_response(sock: socket.socket, call_id: str, cseq: int, wait: float) -> Any:
    """The final response to (call_id, cseq) within `wait` s, or None; others are skipped."""
    from sbc.sip.errors import ParseError
    from sbc.sip.message import Response
    from sbc.sip.parser import parse_message

    deadline = time.monotonic() + wait
    for _ in range(64):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(65535)
        except TimeoutError:
            return None
        try:
            message = parse_message(data)
        except ParseError:
            continue
        if (
            isinstance(message, Response)
            and message.status >= 200
            and message.call_id == call_id
            and message.cseq.seq == cseq
        ):
            return message
    return None


def digest_exchanges(
    target: str, steps: list[dict[str, str]], wait: float = 0.4, port: int = 5060
) -> list[dict[str, Any]]:
    """Digest-authenticated REGISTERs or MESSAGEs to `target`, in order, each from its source.

    A step is {"source", "user", "password"[, "method"]} (method REGISTER or MESSAGE).
    The request goes out without credentials and its 401/407 challenge is answered
    once (RFC 3261 22.2, 22.3), as a phone or a password guesser does. Per step:
    `status` (the final one; 0 when nothing came back within `wait` s), `sent`
    (requests sent), and `started` / `ended` (time.time()).
    """
    from sbc.sip.auth import DigestClient

    host = f"[{target}]" if ":" in target else target
    sockets: dict[str, socket.socket] = {}
    results: list[dict[str, Any]] = []
    try:
        for index, step in enumerate(steps):
            source, user = step["source"], step["user"]
            method = step.get("method", "REGISTER")
            sock = sockets.get(source)
            if sock is None:
                sock = socket.socket(
                    socket.AF_INET6 if ":" in source else socket.AF_INET, socket.SOCK_DGRAM
                )
                sock.bind((source, 0))
                sockets[source] = sock
            me = (
                f"[{source}]:{sock.getsockname()[1]}"
                if ":" in source
                else f"{source}:{sock.getsockname()[1]}"
            )
            if method == "REGISTER":
                uri, to, body = f"sip:{host}", f"<sip:{user}@{REALM}>", b""
                extra = [f"Contact: <sip:{user}@{me}>"]
            else:
                uri, to, body = f"sip:echo@{host}", f"<sip:echo@{host}>", b"guess"
                extra = ["Content-Type: text/plain"]
            call_id = f"dx{index}-{secrets.token_hex(6)}"
            client = DigestClient(user, step["password"])
            credentials: str | None = None
            status, sent, started = 0, 0, time.time()
            for cseq in (1, 2):
                lines = [
                    f"{method} {uri} SIP/2.0",
                    f"Via: SIP/2.0/UDP {me};rport;branch=z9hG4bK{secrets.token_hex(6)}",
                    "Max-Forwards: 70",
                    f"From: <sip:{user}@{REALM}>;tag=dx{index}",
                    f"To: {to}",
                    f"Call-ID: {call_id}",
                    f"CSeq: {cseq} {method}",
                    *extra,
                ]
                if credentials is not None:
                    lines.append(credentials)
                lines += [f"Content-Length: {len(body)}", "", ""]
                sock.sendto("\r\n".join(lines).encode() + body, (target, port))
                sent += 1
                response = _final_response(sock, call_id, cseq, wait)
                if response is None:
                    status = 0
                    break
                status = response.status
                if status not in (401, 407) or credentials is not None:
                    break
                name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
                value = client.respond(
                    response.headers.fields(name), method=method, uri=uri, body=body
                )
                credentials = (
                    f"{'Authorization' if status == 401 else 'Proxy-Authorization'}: {value}"
                )
            results.append(
                {"status": status, "sent": sent, "started": started, "ended": time.time()}
            )
    finally:
        for sock in sockets.values():
            sock.close()
    return results
