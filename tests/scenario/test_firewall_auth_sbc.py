"""Digest-failure bans by the real `sbc run`, in the two-namespace lab of `fw_lab`.

The SBC runs with `firewall.enabled` and one realm whose REGISTERs go to the embedded
registrar (and whose MESSAGEs need credentials). Wrong passwords are reported by the
controller and fed to the firewall's `AuthFailures` detector (sbc.firewall.detectors):

1. `per_source` wrong passwords from one address ban it (reason auth-failures): what
   it sends next is dropped in the kernel, `sbc ban list` shows the ban and the log
   names it. A phone with the right password keeps registering the same user, and
   the trusted trunk guessing passwords is answered and never banned.
2. IPv6 sources are counted per /64: two addresses of one /64, one guessing with
   REGISTER and one with MESSAGE, share one count and earn one ban of the prefix.
3. `per_user` failures for one user from several addresses, each below `per_source`
   (distributed guessing), ban every address involved (reason auth-failures-user),
   and any address that guesses that user's password later in the window at its
   first failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.scenario import fw_lab

pytestmark = [pytest.mark.root]

MGMT_PORT = 18080
#: The detector's knobs here: failures per source (and per /64) in WINDOW seconds.
WINDOW = 60
PER_SOURCE = 4
WRONG = "not the password"
#: A phone at an untrusted address that knows its password.
PHONE_V4 = "198.51.100.10"
#: Distributed guessers, and one that joins after the per-user threshold.
GUESSERS_V4 = ("198.51.100.11", "198.51.100.12", "198.51.100.13")
LATECOMER_V4 = "198.51.100.14"


@dataclass(frozen=True)
class RunningSbc:
    proc: subprocess.Popen[Any]
    log: Path
    state_file: Path


def config_text(state_dir: Path, state_file: Path, per_user: int) -> str:
    return f"""\
state_dir: {state_dir}
sip:
  listen: []
management:
  listen: {{address: 127.0.0.1, port: {MGMT_PORT}}}
media:
  kernel_path: false
registrar:
  nat_keepalive: 0
realms:
  - name: phones
    listen:
      - {{transport: udp, address: {fw_lab.SBC_V4}, port: 5060}}
      - {{transport: udp, address: "{fw_lab.SBC_V6}", port: 5060}}
    media_address: {fw_lab.SBC_V4}
    registrar: true
    authenticate: [MESSAGE]
firewall:
  enabled: true
  required: true
  trusted: [{fw_lab.TRUNK_V4}/32]
  state_file: {state_file}
  detectors:
    auth: {{window: {WINDOW}, per_source: {PER_SOURCE}, per_user: {per_user}}}
"""


@pytest.fixture
def lab() -> Iterator[fw_lab.Lab]:
    why = fw_lab.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the firewall lab must run in CI: {why}")
        pytest.skip(why)
    with fw_lab.lab() as the_lab:
        yield the_lab


@contextlib.contextmanager
def running_sbc(
    lab: fw_lab.Lab, tmp_path: Path, *, per_user: int, users: tuple[str, ...]
) -> Iterator[RunningSbc]:
    """`sbc run` with the registrar `users` (password fw_lab.PASSWORD); it must stop
    cleanly (exit 0) when the block ends without an error."""
    state_dir = tmp_path / "state"
    for user in users:
        subprocess.run(
            [sys.executable, "-m", "sbc", "user", "add", user, "--password-stdin",
             "--state-dir", str(state_dir)],
            input=f"{fw_lab.PASSWORD}\n", text=True, check=True, timeout=20, capture_output=True,
        )  # fmt: skip
    state_file = tmp_path / "blacklist.json"
    config = tmp_path / "sbc.yaml"
    config.write_text(config_text(state_dir, state_file, per_user))
    log = tmp_path / "sbc.log"
    proc = fw_lab.spawn_sbc(lab, config, log, tmp_path, MGMT_PORT)
    try:
        yield RunningSbc(proc, log, state_file)
    finally:
        code = fw_lab.stop_sbc(proc)
    assert code == 0, log.read_text()[-3000:]


def guess(source: str, user: str, method: str = "REGISTER") -> dict[str, str]:
    return {"source": source, "user": user, "password": WRONG, "method": method}


def phone(source: str, user: str) -> dict[str, str]:
    return {"source": source, "user": user, "password": fw_lab.PASSWORD}


def exchanges(lab: fw_lab.Lab, target: str, steps: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Run the steps from ext (fw_lab.digest_exchanges); one result per step."""
    results: list[dict[str, Any]] = fw_lab.lab_call(
        lab, lab.ext, "digest_exchanges", target=target, steps=steps, wait=0.4
    )
    assert len(results) == len(steps)
    return results


def of(source: str, steps: list[dict[str, str]], results: list[dict[str, Any]]) -> list[Any]:
    """The results of `source`'s steps, in order."""
    return [r for s, r in zip(steps, results, strict=True) if s["source"] == source]


def statuses(results: list[dict[str, Any]]) -> list[int]:
    return [r["status"] for r in results]


def blacklist(lab: fw_lab.Lab, name: str) -> list[str]:
    """The kernel set's elements. IPv6 bans are the /64's network address: the rule
    looks the source up masked to its prefix."""
    return sorted(str(value) for value in lab.set_elements(name))


def saved_bans(state_file: Path) -> dict[str, dict[str, Any]]:
    """The bans in the SBC's state file, by target."""
    data = json.loads(state_file.read_text())
    return {b["target"]: b for b in data["bans"]}


def ban_list(lab: fw_lab.Lab, state_file: Path, expected: int) -> list[dict[str, Any]]:
    """`sbc ban list --json` in the SBC's namespace, run once the SBC's once-a-second
    flush has put `expected` bans in the state file (the listing's reasons come from
    there; the kernel set gives the targets and what is left of each ban)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if len(saved_bans(state_file)) >= expected:
                break
        time.sleep(0.1)
    listed = subprocess.run(
        lab.ns(lab.sbc, sys.executable, "-m", "sbc", "ban", "--state-file", str(state_file),
               "list", "--json"),
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    bans: list[dict[str, Any]] = json.loads(listed.stdout)
    return sorted(bans, key=lambda b: str(b["target"]))


def health_bans(lab: fw_lab.Lab) -> int | None:
    health = fw_lab.sbc_health(lab, MGMT_PORT)
    return None if health is None else int(health["firewall"]["bans"])


def test_wrong_passwords_ban_the_guesser_not_the_phone_nor_the_trunk(
    lab: fw_lab.Lab, tmp_path: Path
) -> None:
    fw_lab.add_ext_addresses(lab, PHONE_V4)
    rounds = PER_SOURCE + 2
    steps: list[dict[str, str]] = []
    for _ in range(rounds):
        steps += [
            guess(fw_lab.PEER_V4, "alice"),
            phone(PHONE_V4, "alice"),
            guess(fw_lab.TRUNK_V4, "alice"),
        ]
    with running_sbc(lab, tmp_path, per_user=100, users=("alice",)) as sbc:
        before = lab.counters()
        results = exchanges(lab, fw_lab.SBC_V4, steps)
        after = lab.counters()

        guesser = of(fw_lab.PEER_V4, steps, results)
        # RFC 3261 22.4: wrong credentials are challenged again (401), not refused.
        # The PER_SOURCE-th failure is still answered, then the kernel drops the rest:
        # no challenge comes back, so each later attempt is a single request.
        assert statuses(guesser) == [401] * PER_SOURCE + [0, 0]
        assert [r["sent"] for r in guesser] == [2] * PER_SOURCE + [1, 1]
        assert after["fw_drop_blacklist_v4"] - before["fw_drop_blacklist_v4"] == 2
        # The phone registers the attacked user throughout; the trunk is trusted.
        assert statuses(of(PHONE_V4, steps, results)) == [200] * rounds
        assert statuses(of(fw_lab.TRUNK_V4, steps, results)) == [401] * rounds
        assert blacklist(lab, "blacklist_v4") == [fw_lab.PEER_V4]

        bans = ban_list(lab, sbc.state_file, 1)
        assert [b["target"] for b in bans] == [f"{fw_lab.PEER_V4}/32"]
        (ban,) = bans
        assert ban["reason"] == (
            f"auth-failures: {PER_SOURCE} digest failures in {WINDOW} s (last user 'alice')"
        )
        assert ban["in_kernel"] is True
        # The first offence: 300 s. The listing takes the expiry from the kernel's
        # element (whole seconds left); the state file keeps the exact one.
        assert ban["offence"] == 1 and 295 < ban["remaining"] <= 300
        saved = saved_bans(sbc.state_file)[f"{fw_lab.PEER_V4}/32"]
        assert saved["expires"] - saved["created"] == 300
        log = sbc.log.read_text()
        assert f"x ban {fw_lab.PEER_V4}/32 for 300 s" in log
        assert f"auth-failures: {PER_SOURCE} digest failures" in log
        assert f"x ban {fw_lab.TRUNK_V4}" not in log
        assert WRONG not in log and fw_lab.PASSWORD not in log
        assert health_bans(lab) == 1
    print(
        {
            "requests_until_ban": sum(r["sent"] for r in guesser[:PER_SOURCE]),
            "failures_until_ban": PER_SOURCE,
            "seconds_to_ban": round(guesser[PER_SOURCE - 1]["ended"] - guesser[0]["started"], 3),
        }
    )


def test_ipv6_guessers_in_one_64_share_the_count_and_the_ban(
    lab: fw_lab.Lab, tmp_path: Path
) -> None:
    register_guesser, message_guesser = fw_lab.EXT_V6[1], fw_lab.EXT_V6[2]
    other_64 = fw_lab.EXT_V6[3]  # 2001:db8:1:3::1, a phone in the next /64
    prefix = "2001:db8:1:2::/64"
    steps: list[dict[str, str]] = []
    for _ in range(PER_SOURCE // 2 + 1):
        steps += [
            guess(register_guesser, "alice"),
            guess(message_guesser, "alice", method="MESSAGE"),
            phone(other_64, "alice"),
        ]
    with running_sbc(lab, tmp_path, per_user=100, users=("alice",)) as sbc:
        before = lab.counters()
        results = exchanges(lab, fw_lab.SBC_V6, steps)
        after = lab.counters()

        # Two failures each: the fourth of the /64 (the MESSAGE's 407) bans the prefix,
        # and both addresses go unanswered from then on.
        half = PER_SOURCE // 2
        assert statuses(of(register_guesser, steps, results)) == [401] * half + [0]
        assert statuses(of(message_guesser, steps, results)) == [407] * half + [0]
        assert after["fw_drop_blacklist_v6"] - before["fw_drop_blacklist_v6"] == 2
        assert statuses(of(other_64, steps, results)) == [200] * (half + 1)
        assert blacklist(lab, "blacklist_v6") == ["2001:db8:1:2::"]
        assert blacklist(lab, "blacklist_v4") == []

        bans = ban_list(lab, sbc.state_file, 1)
        assert [b["target"] for b in bans] == [prefix]
        assert bans[0]["reason"] == (
            f"auth-failures: {PER_SOURCE} digest failures in {WINDOW} s (last user 'alice')"
        )
        assert bans[0]["in_kernel"] is True
        assert f"x ban {prefix} for 300 s" in sbc.log.read_text()
    guessers = [r for s, r in zip(steps, results, strict=True) if s["password"] == WRONG]
    print(
        {
            "requests_until_ban": sum(r["sent"] for r in guessers[:PER_SOURCE]),
            "seconds_to_ban": round(guessers[PER_SOURCE - 1]["ended"] - guessers[0]["started"], 3),
        }
    )


def test_distributed_guessing_of_one_user_bans_every_guesser(
    lab: fw_lab.Lab, tmp_path: Path
) -> None:
    per_user = 2 * len(GUESSERS_V4)  # two failures each: below PER_SOURCE
    fw_lab.add_ext_addresses(lab, PHONE_V4, *GUESSERS_V4, LATECOMER_V4)
    steps: list[dict[str, str]] = []
    for _ in range(2):
        steps += [guess(g, "carol") for g in GUESSERS_V4]
        steps.append(phone(PHONE_V4, "carol"))
    steps += [
        guess(LATECOMER_V4, "carol"),
        guess(LATECOMER_V4, "carol"),
        guess(GUESSERS_V4[0], "carol"),
        phone(PHONE_V4, "carol"),
    ]
    with running_sbc(lab, tmp_path, per_user=per_user, users=("carol",)) as sbc:
        results = exchanges(lab, fw_lab.SBC_V4, steps)

        # The per_user-th failure (the last guesser's second) bans all three at once.
        assert statuses(of(GUESSERS_V4[0], steps, results)) == [401, 401, 0]
        for guesser in GUESSERS_V4[1:]:
            assert statuses(of(guesser, steps, results)) == [401, 401]
        # Later in the window, one failure for carol is enough.
        assert statuses(of(LATECOMER_V4, steps, results)) == [401, 0]
        # Carol herself is not locked out: the bans are on the guessers' addresses.
        assert statuses(of(PHONE_V4, steps, results)) == [200, 200, 200]
        assert blacklist(lab, "blacklist_v4") == sorted([*GUESSERS_V4, LATECOMER_V4])

        bans = ban_list(lab, sbc.state_file, len(GUESSERS_V4) + 1)
        reasons = {b["target"]: b["reason"] for b in bans}
        user_reason = "auth-failures-user: {} digest failures for user 'carol' in 60 s"
        assert reasons == {
            **{f"{g}/32": user_reason.format(per_user) for g in GUESSERS_V4},
            f"{LATECOMER_V4}/32": user_reason.format(per_user + 1),
        }
        assert all(b["in_kernel"] for b in bans)
        log = sbc.log.read_text()
        for guesser in (*GUESSERS_V4, LATECOMER_V4):
            assert f"x ban {guesser}/32 for 300 s" in log
        assert "auth-failures-user" in log
        assert health_bans(lab) == len(GUESSERS_V4) + 1
    guesses = [r for s, r in zip(steps, results, strict=True) if s["password"] == WRONG]
    print(
        {
            "failures_until_ban": per_user,
            "requests_until_ban": sum(r["sent"] for r in guesses[:per_user]),
            "seconds_to_ban": round(guesses[per_user - 1]["ended"] - guesses[0]["started"], 3),
        }
    )
