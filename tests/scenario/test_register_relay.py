"""Registration relay through the real SBC to Kamailio as the inside registrar.

A phone (SIPp) registers to the SBC's outside realm five times; the SBC relays the
first REGISTER to Kamailio as its own request (Contact: a token at the SBC's inside
address) and answers the refreshes itself, so Kamailio sees one REGISTER. Then a
caller sends an INVITE for the user to Kamailio: Kamailio's lookup finds the SBC's
Contact, the SBC maps the token to the phone and the call reaches the phone at the
address its REGISTER came from. Nothing of the phone's side reaches Kamailio.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.scenario.sbcproc import Ports, SbcProcess, free_port
from tests.scenario.test_b2bua_sipp import _messages

SIPP = shutil.which("sipp")
KAMAILIO = shutil.which("kamailio") or (
    "/usr/sbin/kamailio" if Path("/usr/sbin/kamailio").exists() else None
)
HERE = Path(__file__).parent
SCENARIOS = HERE / "sipp"

if (SIPP is None or KAMAILIO is None) and not os.environ.get("CI"):
    pytest.skip("needs sipp and kamailio (make deps installs them)", allow_module_level=True)


@dataclass
class RelayLab:
    workdir: Path
    sbc: SbcProcess
    kamailio: subprocess.Popen[bytes]
    kamailio_log: Path
    outside: int
    inside: int
    kamailio_port: int
    phone: int

    def kamailio_text(self) -> str:
        return self.kamailio_log.read_text(errors="replace")


def sbc_config(workdir: Path, ports: Ports, outside: int, inside: int, kamailio: int) -> str:
    return f"""\
state_dir: {workdir / "state"}
sip:
  listen: []
management:
  listen: {{address: 127.0.0.1, port: {ports.mgmt}}}
realms:
  - name: outside
    listen: [{{transport: udp, address: 127.0.0.1, port: {outside}}}]
    media_address: 127.0.0.1
    register_relay:
      realm: inside
      host: 127.0.0.1
      port: {kamailio}
      domain: voip.example
      upstream_expires: 3600
      phone_expires: 60
  - name: inside
    listen: [{{transport: udp, address: 127.0.0.1, port: {inside}}}]
    media_address: 127.0.0.1
routes:
  - {{name: to-phones, from_realm: inside, action: registered}}
  - {{name: to-core, from_realm: outside, action: trunk, realm: inside, host: 127.0.0.1,
      port: {kamailio}}}
media: {{kernel_path: false}}
"""


@pytest.fixture(scope="module")
def relay_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayLab]:
    assert SIPP is not None and KAMAILIO is not None, "sipp and kamailio are needed"
    workdir = tmp_path_factory.mktemp("relay")
    kamailio_port = free_port(also_udp=True)
    cfg = workdir / "kamailio.cfg"
    cfg.write_text(
        (HERE / "kamailio" / "registrar.cfg").read_text().replace("@@PORT@@", str(kamailio_port))
    )
    kamailio_log = workdir / "kamailio.log"
    with kamailio_log.open("wb") as log:
        kamailio = subprocess.Popen(
            [KAMAILIO, "-DD", "-E", "-f", str(cfg), "-w", str(workdir), "-Y", str(workdir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    ports = Ports.pick()
    outside, inside = free_port(also_udp=True), free_port(also_udp=True)
    config = workdir / "sbc.yaml"
    config.write_text(sbc_config(workdir, ports, outside, inside, kamailio_port))
    sbc = SbcProcess(workdir, config, ports)
    try:
        deadline = time.monotonic() + 10
        while "INFO: <core>" not in kamailio_log.read_text(errors="replace"):
            if kamailio.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kamailio did not start:\n{kamailio_log.read_text()}")
            time.sleep(0.1)
        sbc.start()
        yield RelayLab(
            workdir,
            sbc,
            kamailio,
            kamailio_log,
            outside,
            inside,
            kamailio_port,
            free_port(also_udp=True),
        )
    finally:
        sbc.stop()
        if kamailio.poll() is None:
            kamailio.terminate()
            try:
                kamailio.wait(10)
            except subprocess.TimeoutExpired:
                kamailio.kill()
                kamailio.wait(5)


def run_sipp(
    lab: RelayLab,
    scenario: str,
    name: str,
    target: int,
    *,
    port: int,
    calls: int = 1,
    service: str | None = None,
    background: bool = False,
) -> subprocess.Popen[bytes]:
    assert SIPP is not None
    args = [
        SIPP, "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port),
        "-m", str(calls), "-r", "20", "-timeout", "20s", "-timeout_error", "-nostdin",
        "-trace_msg", "-message_file", str(lab.workdir / f"{name}.msg"),
        "-mp", str(free_port(also_udp=True)),
    ]  # fmt: skip
    if service is not None:
        args += ["-s", service]
    if not background:
        args.append(f"127.0.0.1:{target}")
    return subprocess.Popen(
        args,
        cwd=lab.workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def wait(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=5)
    return proc.returncode, err.decode(errors="replace")


def test_refreshes_are_cached_and_calls_reach_the_phone(relay_lab: RelayLab) -> None:
    lab = relay_lab
    phone = run_sipp(lab, "relay_register.xml", "phone-reg", lab.outside, port=lab.phone, calls=5)
    code, err = wait(phone)
    assert code == 0, err + lab.sbc.log()
    answers = [m for m in _messages(lab.workdir / "phone-reg.msg") if m.startswith("<")]
    assert len(answers) == 5 and all(m.startswith("<SIP/2.0 200") for m in answers)
    # The phone is granted the short interval; Kamailio saw exactly one REGISTER.
    assert all("expires=60" in m for m in answers)
    seen = lab.kamailio_text().count("REGISTER-SEEN")
    assert seen == 1, lab.kamailio_text()
    register_line = next(
        line for line in lab.kamailio_text().splitlines() if "REGISTER-SEEN" in line
    )
    # Kamailio registered the SBC's inside Contact, from the SBC's inside listener.
    assert f"@127.0.0.1:{lab.inside}>" in register_line and "user=alice" in register_line
    assert f"src=127.0.0.1:{lab.inside}" in register_line
    assert str(lab.phone) not in register_line and "phone-behind-nat" not in lab.kamailio_text()

    # The phone (now a UAS on its registered port) gets a call routed by Kamailio.
    callee = run_sipp(lab, "uas_basic.xml", "phone-uas", 0, port=lab.phone, background=True)
    time.sleep(0.5)
    caller = run_sipp(
        lab, "uac_basic.xml", "caller", lab.kamailio_port, port=free_port(also_udp=True),
        service="alice",
    )  # fmt: skip
    code, err = wait(caller)
    assert code == 0, err + lab.sbc.log() + lab.kamailio_text()
    code, err = wait(callee)
    assert code == 0, err + lab.sbc.log()
    assert "INVITE-TO sip:r" in lab.kamailio_text()  # the SBC's token Contact
    received = [m for m in _messages(lab.workdir / "phone-uas.msg") if m.startswith("<INVITE")]
    assert len(received) == 1
    invite = received[0]
    # The phone sees its own registered contact as Request-URI, and nothing of Kamailio.
    assert invite.startswith(f"<INVITE sip:alice@127.0.0.1:{lab.phone} ")
    assert str(lab.kamailio_port) not in invite


def test_deregistration_goes_upstream(relay_lab: RelayLab) -> None:
    lab = relay_lab
    before = lab.kamailio_text().count("REGISTER-SEEN")
    scenario = lab.workdir / "relay_unregister.xml"
    scenario.write_text(
        (SCENARIOS / "relay_register.xml").read_text().replace("Expires: 120", "Expires: 0")
    )
    assert SIPP is not None
    args = [
        SIPP, "-sf", str(scenario), "-i", "127.0.0.1", "-p", str(lab.phone), "-m", "1",
        "-timeout", "10s", "-timeout_error", "-nostdin", f"127.0.0.1:{lab.outside}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        cwd=lab.workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    code, err = wait(proc)
    assert code == 0, err + lab.sbc.log()
    assert lab.kamailio_text().count("REGISTER-SEEN") == before + 1
