"""Review of configuration loading, checking and reloading against the standard: a bad
configuration file is refused with the file, line and reason, and the running
configuration stays in force."""

from __future__ import annotations

import asyncio
import logging
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sbc import app
from sbc.app import SbcNode
from sbc.cli import main
from sbc.config.loader import ConfigError, check_config, load_config, load_config_text
from sbc.config.schema import Config

BASE = Path("/etc/sbc")


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), "sbc.yaml", BASE)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return str(info.value).splitlines()


REALM = "{{name: {name}, media_address: 127.0.0.1, listen: [{listen}]}}"


def realm(name: str, listen: str = "{transport: udp, address: 127.0.0.1, port: 5070}") -> str:
    return REALM.format(name=name, listen=listen)


# --- YAML edge cases ---------------------------------------------------------------


def test_a_bom_is_skipped_and_a_tab_is_refused_at_its_line() -> None:
    assert load("\ufeffsip: {t1_ms: 600}\n").sip.t1_ms == 600
    assert errors("log:\n  level: info\n\tformat: text\n") == [
        "sbc.yaml:3: invalid YAML: found character '\\t' that cannot start any token"
        " (while scanning for the next token)"
    ]


@pytest.mark.parametrize("text", ["", "# all commented out\n"])
def test_an_empty_file_is_refused_not_taken_as_the_defaults(text: str) -> None:
    assert errors(text) == ["sbc.yaml:1: top level must be a mapping"]


def test_yaml_1_1_numbers_and_booleans() -> None:
    # 0123 is octal 83 to YAML 1.1: refused, not read as 83 nor as 123.
    assert errors("sip:\n  listen: [{transport: udp, address: 127.0.0.1, port: 0123}]\n") == [
        "sbc.yaml:2: sip.listen[0].port: expected an integer 1..65535, got 0123"
    ]
    assert errors("sip: {t1_ms: 0x1f4}\n") == [
        "sbc.yaml:1: sip.t1_ms: expected an integer 100..4000, got 0x1f4"
    ]
    # yes/no/on/off are booleans where a boolean is meant ...
    assert load("cdr: {enabled: no}\nmedia: {kernel_path: off}\n").cdr.enabled is False
    # ... and the word as written where the schema wants a word.
    config = load(f"realms: [{realm('a')}]\n".replace("}]}", "}], srtp: off}"))
    assert config.realms[0].srtp.value == "off"
    assert errors("log: {level: on}\n") == [
        "sbc.yaml:1: log.level: expected one of debug, info, warning, error, got on"
    ]
    # A realm called "no" (Norway) is a boolean to YAML 1.1: refused, not renamed.
    assert errors(f"realms: [{realm('no')}]\n") == [
        "sbc.yaml:1: realms[0].name: expected a string, got no"
    ]


def test_null_section_takes_defaults_null_value_and_null_list_are_refused() -> None:
    assert load("log:\n").log == load("{}").log
    assert errors("state_dir:\n") == ["sbc.yaml:1: state_dir: expected a path, got null"]
    assert errors("realms:\nroutes: abc\n") == [
        "sbc.yaml:1: realms: expected a list, got null",
        "sbc.yaml:2: routes: expected a list, got 'abc'",
    ]


def test_duplicate_and_unknown_keys_name_their_lines() -> None:
    assert errors("log: {level: info}\nsip:\n  t1_ms: 500\n  t1ms: 600\nlog: {}\n") == [
        "sbc.yaml:4: sip: unknown key 't1ms' (did you mean 't1_ms'?)",
        "sbc.yaml:5: duplicate key 'log' (first at line 1)",
    ]


def test_numbers_out_of_range_and_not_finite() -> None:
    assert errors("media: {timeout: .inf, hold_timeout: .nan, port_min: 80}\n") == [
        "sbc.yaml:1: media.port_min: expected an integer 1024..65535, got 80",
        "sbc.yaml:1: media.timeout: expected a number 1..86400, got .inf",
        "sbc.yaml:1: media.hold_timeout: expected a number 1..86400, got .nan",
    ]


def test_relatch_after_silence_reaches_the_relay_and_is_bounded() -> None:
    config = load("media: {relatch_after_silence: 2.5}\n")
    assert app.media_config(config).relatch_after_silence == 2.5
    assert app.media_config(load("{}")).relatch_after_silence == 0  # off by default
    assert errors("media:\n  relatch_after_silence: -1\n") == [
        "sbc.yaml:2: media.relatch_after_silence: expected a number 0..3600, got -1"
    ]


def test_ipv6_literals_load() -> None:
    config = load(
        "sip:\n  listen:\n    - {transport: udp, address: '::1', port: 5060}\n"
        "    - {transport: udp, address: 2001:db8::1, port: 5060}\n"
    )
    assert [str(listener.address) for listener in config.sip.listen] == ["::1", "2001:db8::1"]


def test_duplicate_names_and_dangling_references_are_refused() -> None:
    text = f"""\
        sip: {{listen: []}}
        realms:
          - {realm("a")}
          - {realm("a", "{transport: udp, address: 127.0.0.1, port: 5071}")}
        trunks:
          - {{name: t, realm: a, gateways: [{{host: 192.0.2.1}}]}}
          - {{name: t, realm: b, gateways: [{{host: 192.0.2.2}}]}}
        routes:
          - {{name: r, action: trunk, trunk: u}}
          - {{name: r, action: registered, from_realm: c}}
        """
    assert errors(text) == [
        "sbc.yaml:4: realms[1].name: duplicate realm 'a'",
        "sbc.yaml:7: trunks[1].name: duplicate trunk 't'",
        "sbc.yaml:7: trunks[1].realm: unknown realm 'b'",
        "sbc.yaml:9: routes[0].trunk: unknown trunk 'u'",
        "sbc.yaml:10: routes[1].name: duplicate route 'r'",
        "sbc.yaml:10: routes[1].from_realm: unknown realm 'c'",
    ]


def test_two_realms_on_one_address_and_port_are_refused() -> None:
    text = f"sip: {{listen: []}}\nrealms:\n  - {realm('a')}\n  - {realm('b')}\n"
    assert errors(text) == [
        "sbc.yaml:4: realms[1].listen[0]: udp 127.0.0.1:5070 is already used by another listener"
    ]


# --- listeners that clash through a wildcard address (fixed) ------------------------


def _bind_clashes(first: str, second: str, kind: socket.SocketKind) -> bool:
    """Whether the kernel refuses `second` beside `first` on one port, as the transport
    binds them (TCP: SO_REUSEADDR and IPv6 only; UDP: neither)."""
    socks = []
    try:
        port = 0
        for address in (first, second):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, kind)
            socks.append(sock)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return True
            if kind == socket.SOCK_STREAM:
                sock.listen()
            port = sock.getsockname()[1]
        return False
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(
    ("transport", "first", "second"),
    [
        ("udp", "0.0.0.0", "127.0.0.1"),
        ("udp", "127.0.0.1", "0.0.0.0"),
        ("tcp", "0.0.0.0", "127.0.0.1"),
        ("udp", "'::'", "0.0.0.0"),
        ("udp", "'::'", "127.0.0.1"),
    ],
)
def test_a_wildcard_listener_clashes_with_any_address_on_its_port(
    transport: str, first: str, second: str
) -> None:
    kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
    assert _bind_clashes(first.strip("'"), second, kind)  # what check-config must foresee
    text = (
        f"sip:\n  listen:\n    - {{transport: {transport}, address: {first}, port: 5060}}\n"
        f"    - {{transport: {transport}, address: {second}, port: 5060}}\n"
    )
    protocol = transport.upper()
    assert errors(text) == [
        f"sbc.yaml:4: sip.listen[1]: {protocol} port 5060 on {second} cannot be bound"
        f" beside sip.listen[0] on {first.strip(chr(39))}"
    ]


def test_listeners_that_can_share_a_port_still_load() -> None:
    # TCP :: is IPv6 only, so 0.0.0.0 may share its port; different specific addresses
    # and UDP beside TCP always may.
    assert not _bind_clashes("::", "0.0.0.0", socket.SOCK_STREAM)
    config = load(
        """\
        sip:
          listen:
            - {transport: tcp, address: '::', port: 5060}
            - {transport: tcp, address: 0.0.0.0, port: 5060}
            - {transport: udp, address: 127.0.0.1, port: 5060}
            - {transport: udp, address: 127.0.0.2, port: 5060}
            - {transport: udp, address: '::1', port: 5060}
        """
    )
    assert len(config.sip.listen) == 5


def test_a_realm_listener_on_a_wildcard_clashes_with_sip_listen() -> None:
    text = (
        "sip: {listen: [{transport: udp, address: 127.0.0.1, port: 5070}]}\n"
        f"realms: [{realm('a', '{transport: udp, address: 0.0.0.0, port: 5070}')}]\n"
    )
    assert errors(text) == [
        "sbc.yaml:2: realms[0].listen[0]: UDP port 5070 on 0.0.0.0 cannot be bound"
        " beside sip.listen[0] on 127.0.0.1"
    ]


def test_the_management_listener_clashes_with_a_wildcard_sip_tcp_listener() -> None:
    text = (
        "sip: {listen: [{transport: tcp, address: 0.0.0.0, port: 8080}]}\n"
        "management: {listen: {address: 127.0.0.1, port: 8080}}\n"
    )
    assert errors(text) == [
        "sbc.yaml:2: management.listen: TCP port 8080 on 127.0.0.1 cannot be bound"
        " beside sip.listen[0] on 0.0.0.0"
    ]


# --- media port range over a SIP port (fixed) ---------------------------------------


def test_a_udp_sip_listener_inside_the_media_range_is_refused() -> None:
    text = (
        "sip: {listen: [{transport: udp, address: 0.0.0.0, port: 20000}]}\n"
        f"realms: [{realm('a')}]\n"
        "media: {port_min: 20000, port_max: 20999}\n"
    )
    assert errors(text) == [
        "sbc.yaml:1: sip.listen[0]: udp 0.0.0.0:20000 is inside the media port range"
        " media.port_min..port_max (20000..20999)"
    ]
    # The realm's own listener on its media address too.
    text = (
        f"sip: {{listen: []}}\nrealms: [{realm('a')}]\nmedia: {{port_min: 5000, port_max: 6000}}\n"
    )
    assert errors(text) == [
        "sbc.yaml:2: realms[0].listen[0]: udp 127.0.0.1:5070 is inside the media port range"
        " media.port_min..port_max (5000..6000)"
    ]


def test_sip_ports_inside_the_media_range_that_cannot_clash_load() -> None:
    # TCP, another address than the media relay binds, or no realm (no relay).
    text = (
        "sip:\n  listen:\n"
        "    - {transport: tcp, address: 0.0.0.0, port: 20000}\n"
        "    - {transport: udp, address: 127.0.0.2, port: 20000}\n"
        f"realms: [{realm('a')}]\n"
    )
    assert len(load(text).sip.listen) == 2
    assert load("sip: {listen: [{transport: udp, address: 0.0.0.0, port: 20000}]}\n")


# --- TLS files ----------------------------------------------------------------------


def test_check_config_refuses_a_private_key_that_is_not_a_key(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    path = tmp_path / "sbc.yaml"
    path.write_text("sip:\n  tls: {certificate: cert.pem, private_key: key.pem}\n")
    status, problems = check_config(path)
    assert status == 1
    assert problems[0].startswith(f"{path}:2: sip.tls.private_key: {tmp_path / 'cert.pem'} and ")


def test_check_config_refuses_a_key_of_another_certificate(tmp_path: Path) -> None:
    from tests.tls_pki import Authority

    ca = Authority(tmp_path / "pki", "lab")
    one, other = ca.issue("sbc.example"), ca.issue("other.example")
    path = tmp_path / "sbc.yaml"
    path.write_text(
        f"sip:\n  tls: {{certificate: {one.cert}, private_key: {other.key},"
        f" client_ca: {ca.path}}}\n"
    )
    status, problems = check_config(path)
    assert status == 1 and len(problems) == 1
    assert "do not load as a certificate and its key" in problems[0]
    path.write_text(
        f"sip:\n  tls: {{certificate: {one.cert}, private_key: {one.key}, client_ca: {one.key}}}\n"
    )
    status, problems = check_config(path)
    assert status == 1 and "client_ca" in problems[0] and "does not load as PEM CA" in problems[0]
    path.write_text(
        f"sip:\n  tls: {{certificate: {one.cert}, private_key: {one.key}, client_ca: {ca.path}}}\n"
    )
    assert check_config(path).status == 0


def test_tls_files_missing_at_check_time_are_named(tmp_path: Path) -> None:
    path = tmp_path / "sbc.yaml"
    path.write_text("sip:\n  tls:\n    certificate: cert.pem\n    private_key: key.pem\n")
    assert check_config(path) == (
        1,
        [
            f"{path}:3: sip.tls.certificate: no such file: {tmp_path / 'cert.pem'}",
            f"{path}:4: sip.tls.private_key: no such file: {tmp_path / 'key.pem'}",
        ],
    )


# --- sbc check-config ---------------------------------------------------------------


def test_check_config_exit_codes_and_streams(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("log: {level: debug}\n")
    assert main(["check-config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: configuration OK\n"
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"log:\n  level: \xff\n")
    assert main(["check-config", str(bad)]) == 1
    assert capsys.readouterr().err == f"{bad}:2: not valid UTF-8 (byte 0xff)\n"
    missing = tmp_path / "missing.yaml"
    assert main(["check-config", str(missing)]) == 1
    assert capsys.readouterr().err == f"{missing}: cannot read: No such file or directory\n"
    assert main(["check-config", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"{tmp_path}: cannot read: Is a directory\n"


def test_the_default_config_passes_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["default-config"]) == 0
    path = tmp_path / "sbc.yaml"
    path.write_text(capsys.readouterr().out)
    assert main(["check-config", str(path)]) == 0


# --- reload -------------------------------------------------------------------------


@pytest.fixture
def quiet_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload re-installs the root handlers; keep pytest's log capture."""
    monkeypatch.setattr(app, "setup_logging", lambda level, fmt: None)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A TCP port of 127.0.0.1 that another process holds."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


NODE_YAML = """\
state_dir: {state}
sip: {{max_transactions: {limit}, listen: [{{transport: udp, address: 127.0.0.1, port: 0}}]}}
management: {{listen: {{address: 127.0.0.1, port: {mgmt}}}}}
cdr: {{enabled: false}}
"""


def _node(tmp_path: Path, limit: int = 2000, mgmt: int = 0) -> tuple[SbcNode, Path]:
    path = tmp_path / "sbc.yaml"
    path.write_text(NODE_YAML.format(state=tmp_path / "state", limit=limit, mgmt=mgmt))
    return SbcNode(load_config(path), path), path


def test_a_refused_reload_changes_nothing_and_names_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, quiet_logging: None
) -> None:
    node, path = _node(tmp_path)
    old = node.config
    path.write_text("sip: {max_transactions: 5000}\nlog: {levle: debug}\n")

    async def scenario() -> bool:
        try:
            return await node.reload()
        finally:
            await node.stop()

    with caplog.at_level(logging.INFO):
        assert not asyncio.run(scenario())
    assert node.config is old
    assert node.transactions.max_transactions == 2000
    assert f"x reload refused: {path}:2: log: unknown key 'levle'" in caplog.text
    assert "x the running configuration stays in force" in caplog.text


def test_a_file_replaced_by_rename_is_reread(tmp_path: Path, quiet_logging: None) -> None:
    node, path = _node(tmp_path)
    new = tmp_path / "sbc.yaml.new"
    new.write_text(NODE_YAML.format(state=tmp_path / "state", limit=3000, mgmt=0))
    new.replace(path)

    async def scenario() -> bool:
        try:
            return await node.reload()
        finally:
            await node.stop()

    assert asyncio.run(scenario())
    assert node.config.sip.max_transactions == 3000
    assert node.transactions.max_transactions == 3000


def test_a_reload_refused_half_way_leaves_the_old_configuration_entirely(
    tmp_path: Path, busy_port: int, quiet_logging: None
) -> None:
    node, path = _node(tmp_path)
    old = node.config
    path.write_text(NODE_YAML.format(state=tmp_path / "state", limit=3000, mgmt=busy_port))

    async def scenario() -> bool:
        try:
            return await node.reload()
        finally:
            await node.stop()

    assert not asyncio.run(scenario())  # the management port is taken: refused
    assert node.config is old
    assert node.transactions.max_transactions == old.sip.max_transactions


def test_a_reload_after_stop_starts_nothing(tmp_path: Path, quiet_logging: None) -> None:
    node, path = _node(tmp_path)
    path.write_text(NODE_YAML.format(state=tmp_path / "state", limit=2000, mgmt=_free_port()))

    async def scenario() -> bool:
        await node.stop()
        try:
            return await node.reload()
        finally:
            if node._runner is not None:
                await node._runner.cleanup()

    assert not asyncio.run(scenario())
    assert node._runner is None


def test_two_reloads_at_once_both_succeed_and_leak_nothing(
    tmp_path: Path, quiet_logging: None
) -> None:
    node, path = _node(tmp_path)
    port = _free_port()
    path.write_text(NODE_YAML.format(state=tmp_path / "state", limit=2000, mgmt=port))

    async def scenario() -> list[bool]:
        try:
            return list(await asyncio.gather(node.reload(), node.reload()))
        finally:
            await node.stop()

    assert asyncio.run(scenario()) == [True, True]
    with socket.socket() as sock:  # stopped: nothing listens on the new port any more
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_new_user_agent_does_not_restart_the_sip_listeners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet_logging: None
) -> None:
    path = tmp_path / "sbc.yaml"
    text = "state_dir: {state}\ncdr: {{enabled: false}}\nsip: {{user_agent: {ua}}}\n"
    path.write_text(text.format(state=tmp_path, ua="sbc-1"))
    node = SbcNode(load_config(path), path)

    async def no_restart(new: object, old: object) -> bool:
        raise AssertionError("the SIP listeners were restarted for a new User-Agent")

    monkeypatch.setattr(node, "_replace_transport", no_restart)

    async def scenario() -> bool:
        path.write_text(text.format(state=tmp_path, ua="sbc-2"))
        try:
            return await node.reload()
        finally:
            await node.stop()

    assert asyncio.run(scenario())
    assert node.calls.user_agent == "sbc-2"
