"""lynis inside the booted appliance: copied in from the host's Debian package for the
audit only (the image does not ship it), started in the background as soon as the VM is
up (under TCG it takes minutes, so it overlaps the other checks), collected at the end."""

from __future__ import annotations

import io
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.image.vm import BootedVm

LYNIS_BIN = Path("/usr/sbin/lynis")
LYNIS_SHARE = Path("/usr/share/lynis")
LYNIS_ETC = Path("/etc/lynis")
UNIT = "sbc-test-lynis"
REPORT = "/root/lynis/report.dat"
LOG = "/root/lynis/lynis.log"


@dataclass(frozen=True)
class LynisResult:
    hardening_index: int
    findings: list[tuple[str, str]]  # (test id, text) of warnings and suggestions
    report: str


def available() -> bool:
    return LYNIS_BIN.exists() and (LYNIS_SHARE / "include").is_dir()


def bundle() -> bytes:
    """The host's lynis as a tar of a self-contained lynis directory."""
    parts = {
        "lynis/lynis": LYNIS_BIN,
        "lynis/include": LYNIS_SHARE / "include",
        "lynis/db": LYNIS_SHARE / "db",
        "lynis/plugins": LYNIS_ETC / "plugins",
        "lynis/default.prf": LYNIS_ETC / "default.prf",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, path in parts.items():
            tar.add(path, name)
    return buf.getvalue()


def start(vm: BootedVm) -> None:
    """Copy lynis into the guest and start `lynis audit system` as a transient unit."""
    # lynis refuses to run as root from files another user owns.
    vm.run_root(
        "rm -rf /root/lynis && tar -x -C /root --no-same-permissions -f - "
        "&& chown -R root:root /root/lynis",
        stdin=bundle(),
    )
    vm.run_root(
        f"systemd-run --unit={UNIT} --collect --property=WorkingDirectory=/root/lynis "
        f"/root/lynis/lynis audit system --quick --no-colors "
        f"--report-file {REPORT} --logfile {LOG}"
    )


def wait(vm: BootedVm, timeout: float) -> LynisResult:
    """Wait for the audit started by `start` to finish; its hardening index and findings."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = vm.run_root(f"systemctl show -P ActiveState {UNIT}.service").strip()
        if state not in ("active", "activating", "deactivating"):
            break
        time.sleep(10)
    else:
        progress = vm.run_root(f"grep 'Performing tests from' {LOG} | tail -3")
        raise AssertionError(f"lynis did not finish in {timeout} s; last:\n{progress}")
    report = vm.run_root(f"cat {REPORT} 2>/dev/null || true")
    (vm.work / "lynis-report.dat").write_text(report)
    (vm.work / "lynis.log").write_text(vm.run_root(f"cat {LOG} 2>/dev/null || true"))
    m = re.search(r"^hardening_index=(\d+)$", report, re.M)
    assert m, f"no hardening index; unit {state}, see {vm.work}/lynis.log"
    findings = re.findall(r"^(?:warning|suggestion)\[\]=([^|]+)\|([^|]+)", report, re.M)
    return LynisResult(int(m.group(1)), findings, report)
