"""`sbc user` and `sbc ban` act on the files and policy of `--config` / $SBC_CONFIG /
the appliance's /etc/sbc/sbc.yaml; `sbc run` reads `--config` / $SBC_CONFIG."""

from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest

from sbc import assembly, cli
from sbc.cli import CONFIG_ENV, main
from sbc.config.loader import default_config, load_config
from sbc.firewall.firewall import Firewall
from sbc.firewall.ruleset import SET_TRUSTED_V4, SET_TRUSTED_V6
from sbc.registrar.credentials import SqliteCredentials
from sbc.sip.auth import DigestAlgorithm, digest_ha1
from tests.unit.test_firewall_bans import FakeKernel

PASSWORD = "correct horse battery"

#: An appliance-like configuration: state outside the working directory (relative
#: paths resolve against the file's directory), its own digest realm, a trusted trunk
#: network, its own ban policy and state file.
APPLIANCE_YAML = """\
state_dir: var/lib/sbc
registrar:
  realm: pbx.example
firewall:
  trusted: [203.0.113.0/24]
  bans: {durations: [42, 4200], forget_after: 86400}
  state_file: var/lib/sbc/bans.json
"""

#: Line 4 is wrong (an unknown key): the message must name the file and that line.
BAD_YAML = """\
state_dir: var/lib/sbc
registrar:
  realm: pbx.example
  users_dbb: /tmp/users.sqlite
"""


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory, no $SBC_CONFIG from the caller's environment and
    no appliance configuration of the machine's."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setattr(cli, "SYSTEM_CONFIG", tmp_path / "no-etc" / "sbc.yaml")
    return cwd


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "sbc.yaml"
    path.write_text(APPLIANCE_YAML)
    return path


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    """The table installed, with empty trusted sets; `sbc ban` gets it for NftBackend()."""
    fake = FakeKernel()
    fake.elements[SET_TRUSTED_V4] = {}
    fake.elements[SET_TRUSTED_V6] = {}
    monkeypatch.setattr("sbc.firewall.nft.NftBackend", lambda: fake)
    yield fake


def sbc(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *argv: str,
    stdin: str = "",
) -> tuple[int, str, str]:
    """`sbc ARGV...` in this process: exit status, stdout, stderr."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def add_user(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str, *options: str
) -> tuple[int, str, str]:
    return sbc(
        capsys, monkeypatch, "user", "add", name, "--password-stdin", *options,
        stdin=PASSWORD + "\n",
    )  # fmt: skip


def registrar_knows(config_path: Path | None, user: str) -> bool:
    """Whether the registrar `sbc run` builds from this configuration accepts `user`."""
    config = load_config(config_path) if config_path else default_config()
    path = assembly.users_db(config)
    if not path.exists():
        return False
    with SqliteCredentials(path, config.registrar.realm) as credentials:
        registrar = assembly.registrar(config, credentials, b"k" * 32)
        return assembly.EmbeddedRegistrar(registrar).user_exists(user)


# --- sbc user --------------------------------------------------------------------


def test_user_add_with_config_writes_the_registrars_database_and_realm(
    tmp_path: Path,
    workdir: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status, out, err = add_user(capsys, monkeypatch, "alice", "--config", str(config_file))
    assert status == 0, err
    database = tmp_path / "var" / "lib" / "sbc" / "users.sqlite"
    assert out == f"added user alice (realm pbx.example) to {database}\n"
    assert not (workdir / "state").exists()
    assert registrar_knows(config_file, "alice")
    # The HA1 is the one for the configured realm (what phones answer challenges with).
    with SqliteCredentials(database, "pbx.example") as credentials:
        secret = credentials.lookup("alice", "pbx.example")
    assert secret is not None
    assert dict(secret.ha1)[DigestAlgorithm.MD5] == digest_ha1(
        DigestAlgorithm.MD5, "alice", "pbx.example", PASSWORD
    )
    # Without --config the user lands where this registrar never looks.
    status, out, _ = add_user(capsys, monkeypatch, "bob")
    assert status == 0
    assert out == f"added user bob (realm sbc) to {workdir / 'state' / 'users.sqlite'}\n"
    assert registrar_knows(None, "bob")
    assert not registrar_knows(config_file, "bob")


def test_user_config_from_environment_and_either_side_of_the_subcommand(
    tmp_path: Path,
    workdir: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(config_file))
    status, out, err = add_user(capsys, monkeypatch, "carol")
    assert status == 0, err
    assert "(realm pbx.example)" in out
    assert registrar_knows(config_file, "carol")
    assert not (workdir / "state").exists()
    assert sbc(capsys, monkeypatch, "user", "list")[1] == "carol\n"
    # --config wins over $SBC_CONFIG, before or after the subcommand.
    other = tmp_path / "other.yaml"
    other.write_text("state_dir: other-state\n")
    status, out, err = sbc(capsys, monkeypatch, "user", "-c", str(other), "list")
    assert status == 0
    assert err == f"no users ({tmp_path / 'other-state' / 'users.sqlite'} does not exist)\n"
    status, _, err = sbc(capsys, monkeypatch, "user", "list", "-c", str(other))
    assert "other-state" in err
    # An empty variable is no configuration: the embedded default.
    monkeypatch.setenv(CONFIG_ENV, "")
    status, _, err = sbc(capsys, monkeypatch, "user", "list")
    assert err == f"no users ({workdir / 'state' / 'users.sqlite'} does not exist)\n"


def test_user_db_realm_and_state_dir_options_win_over_the_config(
    tmp_path: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = tmp_path / "elsewhere" / "people.db"
    status, out, err = add_user(
        capsys, monkeypatch, "dave", "-c", str(config_file), "--db", str(db), "--realm", "lab"
    )
    assert status == 0, err
    assert out == f"added user dave (realm lab) to {db}\n"
    with SqliteCredentials(db, "lab") as credentials:
        assert credentials.lookup("dave", "lab") is not None
        assert credentials.lookup("dave", "pbx.example") is None
    assert not (tmp_path / "var").exists()
    # --realm alone: the config's database, another realm the registrar does not use.
    status, out, _ = add_user(capsys, monkeypatch, "erin", "-c", str(config_file), "--realm", "x")
    assert out == f"added user erin (realm x) to {tmp_path / 'var/lib/sbc/users.sqlite'}\n"
    assert not registrar_knows(config_file, "erin")
    # --state-dir beats even an explicit registrar.users_db.
    with_db = tmp_path / "with-db.yaml"
    with_db.write_text("registrar: {realm: pbx.example, users_db: fixed/users.sqlite}\n")
    state = tmp_path / "override"
    status, out, _ = add_user(
        capsys, monkeypatch, "frank", "-c", str(with_db), "--state-dir", str(state)
    )
    assert status == 0
    assert out == f"added user frank (realm pbx.example) to {state / 'users.sqlite'}\n"
    assert not (tmp_path / "fixed").exists()
    status, out, _ = add_user(capsys, monkeypatch, "gina", "-c", str(with_db))
    assert out == f"added user gina (realm pbx.example) to {tmp_path / 'fixed' / 'users.sqlite'}\n"


def test_bad_config_exits_2_with_file_and_line_and_creates_nothing(
    tmp_path: Path,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    status, out, err = add_user(capsys, monkeypatch, "alice", "--config", str(bad))
    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith(f"{bad}:4: registrar: unknown key 'users_dbb'")
    assert lines[-1] == "sbc user: configuration refused, nothing changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "cwd"]
    assert list(workdir.iterdir()) == []
    # The same through $SBC_CONFIG, and for a file that is not there.
    monkeypatch.setenv(CONFIG_ENV, str(bad))
    assert sbc(capsys, monkeypatch, "user", "list")[0] == 2
    missing = tmp_path / "missing.yaml"
    monkeypatch.setenv(CONFIG_ENV, str(missing))
    status, _, err = add_user(capsys, monkeypatch, "alice")
    assert status == 2
    assert err.startswith(f"{missing}: cannot read")
    assert list(workdir.iterdir()) == []


# --- sbc ban ---------------------------------------------------------------------


def test_ban_refuses_a_network_the_config_trusts(
    tmp_path: Path,
    config_file: Path,
    kernel: FakeKernel,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status, out, err = sbc(capsys, monkeypatch, "ban", "-c", str(config_file), "add", "203.0.113.9")
    assert status == 2
    assert "trusted" in err
    assert kernel.elements["blacklist_v4"] == {}
    assert not (tmp_path / "var" / "lib" / "sbc" / "bans.json").exists()
    # Through $SBC_CONFIG, with the option after the subcommand, too.
    monkeypatch.setenv(CONFIG_ENV, str(config_file))
    assert sbc(capsys, monkeypatch, "ban", "add", "203.0.113.9")[0] == 2
    assert sbc(capsys, monkeypatch, "ban", "add", "203.0.113.9", "-c", str(config_file))[0] == 2
    assert kernel.elements["blacklist_v4"] == {}
    # The embedded default trusts nothing: the same command bans the trunk.
    monkeypatch.delenv(CONFIG_ENV)
    status, out, err = sbc(capsys, monkeypatch, "ban", "add", "203.0.113.9")
    assert status == 0, err
    assert out.startswith("banned 203.0.113.9/32 until")
    assert "203.0.113.9" in kernel.elements["blacklist_v4"]


def test_ban_uses_the_configs_state_file_and_policy(
    tmp_path: Path,
    workdir: Path,
    config_file: Path,
    kernel: FakeKernel,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state_file = tmp_path / "var" / "lib" / "sbc" / "bans.json"
    status, out, err = sbc(
        capsys, monkeypatch, "ban", "-c", str(config_file), "add", "198.51.100.7"
    )
    assert status == 0, err
    assert out.endswith("(42 s)\n")  # the config's first ban duration, not the default 300
    assert kernel.elements["blacklist_v4"]["198.51.100.7"]["timeout"] == 42
    assert "198.51.100.7/32" in state_file.read_text()
    assert not (workdir / "state").exists()
    status, out, _ = sbc(capsys, monkeypatch, "ban", "list", "--json", "-c", str(config_file))
    assert [item["target"] for item in json.loads(out)] == ["198.51.100.7/32"]
    # --state-file wins over the config's.
    override = tmp_path / "override.json"
    status, _, _ = sbc(
        capsys, monkeypatch, "ban", "-c", str(config_file), "--state-file", str(override),
        "add", "198.51.100.8",
    )  # fmt: skip
    assert status == 0
    assert "198.51.100.8/32" in override.read_text()
    assert "198.51.100.8" not in state_file.read_text()


def test_ban_with_a_bad_config_exits_2_and_touches_nothing(
    tmp_path: Path,
    workdir: Path,
    kernel: FakeKernel,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("firewall:\n  trusted: [not-a-network]\n")
    status, out, err = sbc(capsys, monkeypatch, "ban", "--config", str(bad), "add", "198.51.100.7")
    assert status == 2
    assert out == ""
    assert err.startswith(f"{bad}:2: firewall.trusted")
    assert err.splitlines()[-1] == "sbc ban: configuration refused, nothing changed"
    assert kernel.commands == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "cwd"]
    assert list(workdir.iterdir()) == []


def test_running_firewall_and_cli_build_the_same_blacklist(
    tmp_path: Path, config_file: Path, kernel: FakeKernel
) -> None:
    from sbc.firewall.cli import default_blacklist
    from sbc.firewall.config import FirewallConfig

    section: FirewallConfig = load_config(config_file).firewall
    running = Firewall(section, kernel).blacklist
    assert running.trusted == (ip_network("203.0.113.0/24"),)
    assert running.policy.durations == (42, 4200)
    assert running.store.path == tmp_path / "var" / "lib" / "sbc" / "bans.json"
    kernel.elements[SET_TRUSTED_V4]["192.0.2.0/24"] = {"val": "192.0.2.0/24"}
    cli = default_blacklist(argparse.Namespace(config=str(config_file), state_file=None), kernel)
    assert cli.trusted == (*running.trusted, ip_network("192.0.2.0/24"))
    assert (cli.policy, cli.store.path) == (running.policy, running.store.path)
    assert cli.ipv6_prefix_length == running.ipv6_prefix_length
    assert running.deferred and not cli.deferred


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_a_database_root_creates_belongs_to_the_state_directorys_owner(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the appliance `sudo sbc user add` must leave a file the `sbc` user can open."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 4242, 4343)
    status, _, err = add_user(capsys, monkeypatch, "alice", "--state-dir", str(state))
    assert status == 0, err
    info = (state / "users.sqlite").stat()
    assert (info.st_uid, info.st_gid) == (4242, 4343)
    assert info.st_mode & 0o777 == 0o600
    # An existing file keeps its owner: a later command does not take it over.
    os.chown(state / "users.sqlite", 0, 0)
    status, _, err = add_user(capsys, monkeypatch, "bob", "--state-dir", str(state))
    assert status == 0, err
    assert (state / "users.sqlite").stat().st_uid == 0


def test_the_blacklist_lives_in_state_dir_unless_the_file_says_otherwise(tmp_path: Path) -> None:
    """A path relative to /etc/sbc/sbc.yaml would be read-only to the service."""
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "sbc.yaml"
    config.write_text(f"state_dir: {tmp_path / 'var'}\n")
    assert load_config(config).firewall.state_file == tmp_path / "var" / "firewall-blacklist.json"
    config.write_text(f"state_dir: {tmp_path / 'var'}\nfirewall: {{state_file: bans.json}}\n")
    assert load_config(config).firewall.state_file == etc / "bans.json"
    assert default_config().firewall.state_file == Path.cwd() / "state" / "firewall-blacklist.json"


def test_without_option_or_environment_the_appliance_config_is_used(
    tmp_path: Path,
    workdir: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`sudo sbc user add` on the appliance: sudo dropped $SBC_CONFIG."""
    monkeypatch.setattr(cli, "SYSTEM_CONFIG", config_file)
    status, _, err = add_user(capsys, monkeypatch, "alice")
    assert status == 0, err
    assert registrar_knows(config_file, "alice")
    assert not (workdir / "state").exists()
    # Something there that is not a file: the embedded default.
    monkeypatch.setattr(cli, "SYSTEM_CONFIG", tmp_path / "a-directory")
    (tmp_path / "a-directory").mkdir()
    status, _, _ = add_user(capsys, monkeypatch, "bob")
    assert status == 0 and (workdir / "state" / "users.sqlite").exists()


def test_sbc_run_reads_the_config_named_by_the_environment(
    tmp_path: Path, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sbc.app

    seen: list[Path | None] = []

    def run(path: Path | None) -> int:
        seen.append(path)
        return 0

    monkeypatch.setattr(sbc.app, "run", run)
    assert main(["run"]) == 0
    monkeypatch.setenv(CONFIG_ENV, str(config_file))
    assert main(["run"]) == 0
    assert main(["run", "-c", str(tmp_path / "other.yaml")]) == 0
    # The appliance file is for the admin commands only: the service names its file.
    assert seen == [None, config_file, tmp_path / "other.yaml"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_a_ban_root_adds_leaves_files_the_service_user_can_open(
    tmp_path: Path,
    workdir: Path,
    kernel: FakeKernel,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 4242, 4343)
    state_file = state / "firewall-blacklist.json"
    for address in ("198.51.100.7", "198.51.100.8"):  # created, then replaced
        status, _, err = sbc(
            capsys, monkeypatch, "ban", "--state-file", str(state_file), "add", address
        )
        assert status == 0, err
        for path in (state_file, state / "firewall-blacklist.json.lock"):
            info = path.stat()
            assert (info.st_uid, info.st_gid) == (4242, 4343), path
    assert "198.51.100.8/32" in state_file.read_text()
    # In a directory of root's, files stay root's.
    root_file = tmp_path / "root-bans.json"
    status, _, err = sbc(
        capsys, monkeypatch, "ban", "--state-file", str(root_file), "add", "198.51.100.9"
    )
    assert status == 0, err
    assert root_file.stat().st_uid == os.stat(tmp_path).st_uid
