"""sbc.config: schema, loader, error locations and messages."""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
from importlib import resources
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbc.config.loader import (
    MAX_CONFIG_BYTES,
    MAX_NESTING,
    MAX_NODES,
    ConfigError,
    ConfigProblem,
    check_config,
    default_config,
    default_config_text,
    load_config,
    load_config_text,
)
from sbc.config.schema import (
    Config,
    LogConfig,
    LogFormat,
    LogLevel,
    ManagementConfig,
    ManagementListen,
    SipConfig,
    SipListener,
    TlsConfig,
    Transport,
)
from sbc.firewall.config import FirewallConfig

BASE = Path("/etc/sbc")
LOOPBACK = IPv4Address("127.0.0.1")

EXAMPLE = """\
state_dir: ./state            # where generated TLS cert, SQLite etc. live
log:
  level: info                 # debug|info|warning|error
  format: text                # text|json
sip:
  listen:                     # list of SIP listeners
    - {transport: udp, address: 127.0.0.1, port: 5060}
    - {transport: tcp, address: 127.0.0.1, port: 5060}
    - {transport: tls, address: 127.0.0.1, port: 5061}
  tls:
    certificate: null         # PEM path; null = self-signed
    private_key: null
  tcp_idle_timeout: 600       # seconds an idle TCP/TLS connection is kept
  max_connections: 1024
  user_agent: sbc             # Server/User-Agent header value
management:
  listen: {address: 127.0.0.1, port: 8080}
"""

EXPECTED_EXAMPLE = Config(
    state_dir=BASE / "state",
    log=LogConfig(level=LogLevel.INFO, format=LogFormat.TEXT),
    sip=SipConfig(
        listen=(
            SipListener(Transport.UDP, LOOPBACK, 5060),
            SipListener(Transport.TCP, LOOPBACK, 5060),
            SipListener(Transport.TLS, LOOPBACK, 5061),
        ),
        tls=TlsConfig(certificate=None, private_key=None),
        tcp_idle_timeout=600,
        max_connections=1024,
        user_agent="sbc",
    ),
    management=ManagementConfig(listen=ManagementListen(LOOPBACK, 8080)),
    # Relative path defaults resolve against the file's directory, in missing sections too.
    firewall=FirewallConfig(state_file=BASE / "state" / "firewall-blacklist.json"),
)


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), "sbc.yaml", BASE)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return str(info.value).splitlines()


# --- what loads ------------------------------------------------------------------


def test_example_round_trips() -> None:
    assert load(EXAMPLE) == EXPECTED_EXAMPLE


def test_missing_keys_take_defaults() -> None:
    assert load("{}") == EXPECTED_EXAMPLE


def test_partial_section_keeps_other_defaults() -> None:
    config = load("log: {format: json}\nsip: {user_agent: 'Acme SBC/1.0'}\n")
    assert config.log == LogConfig(level=LogLevel.INFO, format=LogFormat.JSON)
    assert config.sip.user_agent == "Acme SBC/1.0"
    assert config.sip.listen == EXPECTED_EXAMPLE.sip.listen
    assert config.management == EXPECTED_EXAMPLE.management


def test_null_section_takes_all_defaults() -> None:
    config = load(
        """\
        log:
        #  level: debug
        sip:
          tls:
        """
    )
    assert config.log == LogConfig()
    assert config.sip.tls == TlsConfig()


@pytest.mark.parametrize(
    ("written", "address"),
    [
        ('"::1"', IPv6Address("::1")),
        ("'2001:db8::10'", IPv6Address("2001:db8::10")),
        # YAML 1.1 would read this as a base-60 integer; the text is still the address.
        ("'1:2:3:4:5:6:7:8'", IPv6Address("1:2:3:4:5:6:7:8")),
    ],
)
def test_ipv6_listen_address_in_flow_mapping(written: str, address: IPv6Address) -> None:
    config = load(f"sip: {{listen: [{{transport: udp, address: {written}, port: 5060}}]}}\n")
    assert config.sip.listen == (SipListener(Transport.UDP, address, 5060),)
    assert str(config.sip.listen[0]) == f"udp [{address}]:5060"


@pytest.mark.parametrize("written", ["::1", "1:2:3:4:5:6:7:8", "2001:db8::10"])
def test_ipv6_listen_address_unquoted_in_block(written: str) -> None:
    config = load(
        f"""\
        sip:
          listen:
            - transport: tls
              address: {written}
              port: 5061
        management:
          listen:
            address: {written}
        """
    )
    assert config.sip.listen[0].address == IPv6Address(written)
    assert config.management.listen == ManagementListen(IPv6Address(written), 8080)


def test_port_zero_means_ephemeral_and_may_repeat() -> None:
    config = load(
        """\
        sip:
          listen:
            - {transport: udp, address: 127.0.0.1, port: 0}
            - {transport: udp, address: 127.0.0.1, port: 0}
        management: {listen: {port: 0}}
        """
    )
    assert [listener.port for listener in config.sip.listen] == [0, 0]
    assert config.management.listen.port == 0


def test_udp_and_tcp_may_share_a_port() -> None:
    config = load(
        "sip: {listen: [{transport: udp, address: 10.0.0.1, port: 5060},"
        " {transport: tcp, address: 10.0.0.1, port: 5060}]}"
    )
    assert len(config.sip.listen) == 2


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    from tests.tls_pki import Authority

    (tmp_path / "tls").mkdir()
    issued = Authority(tmp_path / "pki", "lab").issue("sbc.example")
    (tmp_path / "tls" / "cert.pem").write_bytes(issued.cert.read_bytes())
    key = tmp_path / "secure.key"
    key.write_bytes(issued.key.read_bytes())
    text = f"state_dir: var/state\nsip:\n  tls: {{certificate: tls/cert.pem, private_key: {key}}}\n"
    config = load_config_text(text, "sbc.yaml", tmp_path)
    assert config.state_dir == tmp_path / "var" / "state"
    assert config.sip.tls == TlsConfig(tmp_path / "tls" / "cert.pem", key)


def test_tls_files_that_are_not_there_are_named() -> None:
    problems = errors("sip:\n  tls: {certificate: tls/cert.pem, private_key: /secure/key.pem}\n")
    assert problems == [
        "sbc.yaml:2: sip.tls.certificate: no such file: /etc/sbc/tls/cert.pem",
        "sbc.yaml:2: sip.tls.private_key: no such file: /secure/key.pem",
    ]


def test_absolute_state_dir_is_kept() -> None:
    assert load("state_dir: /var/lib/sbc\n").state_dir == Path("/var/lib/sbc")


def test_load_config_resolves_against_the_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "sbc.yaml").write_text("state_dir: ./state\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    # A relative path to the file still gives an absolute state_dir next to it.
    config = load_config(Path("etc/sbc.yaml"))
    assert config.state_dir == tmp_path / "etc" / "state"
    assert config.state_dir.is_absolute()


def test_embedded_default_loads_and_equals_a_file_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "sbc.yaml"
    with resources.as_file(resources.files("sbc.config") / "default.yaml") as embedded:
        shutil.copyfile(embedded, copy)
    monkeypatch.chdir(tmp_path)
    default = default_config()
    assert default == load_config(copy)
    assert default.state_dir == tmp_path / "state"
    # The schema's own defaults and the embedded file agree outside the realm, route
    # and listener lists, which the file fills in.
    listens = """
sip: {listen: []}
realms:
  - name: phones
    listen:
      - {transport: udp, address: 127.0.0.1, port: 5060}
      - {transport: tcp, address: 127.0.0.1, port: 5060}
      - {transport: tls, address: 127.0.0.1, port: 5061}
    media_address: 127.0.0.1
    registrar: true
    authenticate: [INVITE, MESSAGE]
routes: [{name: users, from_realm: phones, action: registered}]
"""
    assert default == load_config_text(listens, "minimal.yaml", tmp_path)
    assert copy.read_text(encoding="utf-8") == default_config_text()


def test_config_is_frozen_hashable_and_diffable() -> None:
    old = load(EXAMPLE)
    new = load(EXAMPLE.replace("level: info", "level: debug"))
    assert hash(old) == hash(load(EXAMPLE))
    assert {old, new} == {new, old} and len({old, new}) == 2
    assert old.sip == new.sip and old.log != new.log
    assert isinstance(old.sip.listen, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        old.log.level = LogLevel.DEBUG  # type: ignore[misc]


# --- error kinds, each with its exact message and line -----------------------------


def test_port_not_an_integer() -> None:
    text = EXAMPLE.replace(
        "{transport: tcp, address: 127.0.0.1, port: 5060}",
        "{transport: tcp, address: 127.0.0.1, port: abc}",
    )
    assert errors(text) == [
        "sbc.yaml:8: sip.listen[1].port: expected an integer 1..65535, got 'abc'"
    ]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("70000", "70000"),
        ("-1", "-1"),
        ("true", "true"),  # a bool is not an int
        ("05060", "05060"),  # YAML 1.1 octal: 2608, never what was meant
        ("0x13c4", "0x13c4"),
        ("5060.0", "5060.0"),
        ("null", "null"),
        ("'5060'", "'5060'"),
        ("[5060]", "a list"),
        ("{a: 1}", "a mapping"),
    ],
)
def test_port_wrong_type_or_range(value: str, shown: str) -> None:
    assert errors(f"management:\n  listen:\n    port: {value}\n") == [
        f"sbc.yaml:3: management.listen.port: expected an integer 1..65535, got {shown}"
    ]


def test_integer_range_of_other_fields() -> None:
    assert errors("sip:\n  tcp_idle_timeout: 0\n  max_connections: 1_000_001\n") == [
        "sbc.yaml:2: sip.tcp_idle_timeout: expected an integer 1..86400, got 0",
        "sbc.yaml:3: sip.max_connections: expected an integer 1..1000000, got 1_000_001",
    ]


def test_unknown_key_with_suggestion() -> None:
    assert errors("state_dir: /x\n\nlgo:\n  level: info\n") == [
        "sbc.yaml:3: unknown key 'lgo' (did you mean 'log'?)"
    ]


def test_unknown_nested_key_with_and_without_suggestion() -> None:
    assert errors("sip:\n  Listen: []\n  colour: blue\n") == [
        "sbc.yaml:2: sip: unknown key 'Listen' (did you mean 'listen'?)",
        "sbc.yaml:3: sip: unknown key 'colour'",
    ]


@pytest.mark.parametrize(
    ("text", "line"),
    [("- a\n- b\n", 1), ("just text\n", 1), ("", 1), ("# only a comment\n", 1), ("\n\n42\n", 3)],
)
def test_top_level_must_be_a_mapping(text: str, line: int) -> None:
    assert errors(text) == [f"sbc.yaml:{line}: top level must be a mapping"]


def test_yaml_syntax_error_has_its_line() -> None:
    assert errors("log:\n  level: info\n  format: [text\nsip: {}\n") == [
        "sbc.yaml:4: invalid YAML: expected ',' or ']', but got ':'"
        " (while parsing a flow sequence at line 3)"
    ]


def test_yaml_indentation_error() -> None:
    assert errors("log:\n  level: info\n format: text\n") == [
        "sbc.yaml:3: invalid YAML: expected <block end>, but found '<block mapping start>'"
        " (while parsing a block mapping at line 1)"
    ]


def test_more_than_one_document() -> None:
    assert errors("log: {}\n---\nsip: {}\n") == [
        "sbc.yaml:2: invalid YAML: expected a single document in the stream at line 1,"
        " but found another document"
    ]


def test_unacceptable_character() -> None:
    assert errors("log: {}\nsip: \x07\n") == [
        "sbc.yaml:2: invalid YAML: character 0x0007 is not allowed"
    ]


def test_duplicate_anchor() -> None:
    assert errors("log: &a {}\nsip: &a {}\n") == [
        "sbc.yaml:2: invalid YAML: found duplicate anchor 'a'; first occurrence at line 1,"
        " second occurrence"
    ]


def test_too_deep_nesting_is_a_config_error() -> None:
    text = "sip:\n  listen: " + "[" * (MAX_NESTING + 10) + "\n"
    assert errors(text) == [
        f"sbc.yaml:2: invalid YAML: collections nested deeper than {MAX_NESTING} levels"
    ]


def test_alias_expansion_is_bounded() -> None:
    # 2 kB that the validation would walk as 1.3 million values (realms x rules x
    # methods); a 1 MB file of the same shape is 10**15 and never finishes loading.
    many = 110
    text = "\n".join(
        [
            "sip: {listen: []}",
            "x: &m [" + ", ".join(["INVITE"] * many) + "]",
            "y: &h [" + ", ".join(["{action: strip, header: X-A, methods: *m}"] * many) + "]",
            "w: &r {name: a, listen: [{transport: udp, address: 127.0.0.1, port: 0}],"
            " media_address: 127.0.0.1, header_rules: *h}",
            "realms: [" + ", ".join(["*r"] * many) + "]",
            "",
        ]
    )
    assert errors(text) == [
        f"sbc.yaml:5: invalid YAML: aliases expand the file to more than {MAX_NODES} values"
    ]


def test_recursive_alias() -> None:
    assert errors("log: {}\nsip: &s\n  tls: {}\n  listen: [*s]\n") == [
        "sbc.yaml:4: invalid YAML: an alias refers to the collection it is in (line 2)"
    ]


def test_duplicate_keys() -> None:
    assert errors(
        """\
        log:
          level: info
        sip:
          user_agent: a
          user_agent: b
        log: {}
        """
    ) == [
        "sbc.yaml:5: sip: duplicate key 'user_agent' (first at line 4)",
        "sbc.yaml:6: duplicate key 'log' (first at line 1)",
    ]


def test_non_string_and_merge_keys() -> None:
    assert errors(
        """\
        defaults: &d {level: info}
        log:
          <<: *d
          1: x
        """
    ) == [
        "sbc.yaml:1: unknown key 'defaults'",
        "sbc.yaml:3: log: merge keys ('<<') are not supported",
        "sbc.yaml:4: log: keys must be strings, got 1",
    ]


def test_enum_values() -> None:
    assert errors("log:\n  level: INFO\n  format: xml\n") == [
        "sbc.yaml:2: log.level: expected one of debug, info, warning, error, got 'INFO'",
        "sbc.yaml:3: log.format: expected one of text, json, got 'xml'",
    ]


def test_bad_transport_address_and_missing_key() -> None:
    assert errors(
        """\
        sip:
          listen:
            - transport: sctp
              address: localhost
            - {transport: udp, address: 10.0.0.300, port: 5060}
        """
    ) == [
        "sbc.yaml:3: sip.listen[0].transport: expected one of udp, tcp, tls, got 'sctp'",
        "sbc.yaml:3: sip.listen[0]: missing required key 'port'",
        "sbc.yaml:4: sip.listen[0].address: expected an IPv4 or IPv6 address, got 'localhost'",
        "sbc.yaml:5: sip.listen[1].address: expected an IPv4 or IPv6 address, got '10.0.0.300'",
    ]


@pytest.mark.parametrize(
    ("text", "line", "key", "value"),
    [
        ("sip:\n  listen:\n    - {transport: udp, address: 'fe80::1%eth0', port: 5060}\n",
         3, "sip.listen[0].address: expected an IPv4 or IPv6 address", "'fe80::1%eth0'"),
        ("firewall:\n  trusted: ['fe80::%2/64']\n",
         2, "firewall.trusted[0]: expected an IPv4 or IPv6 network (address/prefix)",
         "'fe80::%2/64'"),
    ],
)  # fmt: skip
def test_ipv6_zone_ids_are_refused(text: str, line: int, key: str, value: str) -> None:
    # Python's ipaddress takes them, but a zone id is no part of a SIP host, an SDP
    # address or an nftables set: it would go out verbatim in Via and Contact.
    assert errors(text) == [
        f"sbc.yaml:{line}: {key}, got {value} (IPv6 zone ids are not supported)"
    ]


def test_listen_must_be_a_list_of_mappings_and_something_must_listen() -> None:
    assert errors("sip:\n  listen: []\n") == [
        "sbc.yaml:2: sip.listen: no SIP listener at all (here or in a realm)"
    ]
    assert errors("sip:\n  listen: udp\n") == ["sbc.yaml:2: sip.listen: expected a list, got 'udp'"]
    assert errors("sip:\n  listen:\n    -\n    - [udp]\n") == [
        "sbc.yaml:3: sip.listen[0]: expected a mapping, got null",
        "sbc.yaml:4: sip.listen[1]: expected a mapping, got a list",
    ]


def test_section_of_wrong_type() -> None:
    assert errors("log: debug\nmanagement: [8080]\n") == [
        "sbc.yaml:1: log: expected a mapping, got 'debug'",
        "sbc.yaml:2: management: expected a mapping, got a list",
    ]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("no", "no"),  # YAML 1.1 bool
        ("1.0", "1.0"),
        ("''", "''"),
        ('"sbc\\r\\nX-Injected: 1"', "'sbc\\r\\nX-Injected: 1'"),
        ("' sbc'", "' sbc'"),
        ("'" + "x" * 129 + "'", "'" + "x" * 37 + "...'"),
    ],
)
def test_user_agent_must_be_a_safe_header_value(value: str, shown: str) -> None:
    assert errors(f"sip:\n  user_agent: {value}\n") == [
        "sbc.yaml:2: sip.user_agent: expected 1..128 printable ASCII characters,"
        f" not starting or ending with a space, got {shown}"
    ]


def test_paths_must_be_non_empty_strings() -> None:
    assert errors("state_dir: ''\nsip:\n  tls: {certificate: 5, private_key: [a]}\n") == [
        "sbc.yaml:1: state_dir: expected a path, got ''",
        "sbc.yaml:3: sip.tls.certificate: expected a path or null, got 5",
        "sbc.yaml:3: sip.tls.private_key: expected a path or null, got a list",
    ]


def test_unsupported_tag() -> None:
    assert errors("sip:\n  user_agent: !secret agent\n  max_connections: !!str 10\n") == [
        "sbc.yaml:2: sip.user_agent: expected 1..128 printable ASCII characters,"
        " not starting or ending with a space, got !secret agent",
        "sbc.yaml:3: sip.max_connections: expected an integer 1..1000000, got '10'",
    ]


def test_explicit_int_tag_is_accepted() -> None:
    assert load("sip: {max_connections: !!int '10'}").sip.max_connections == 10


@pytest.mark.parametrize(
    ("tls", "reason"),
    [
        (
            "{certificate: cert.pem}",
            "certificate is set but private_key is not",
        ),
        (
            "{certificate: null, private_key: key.pem}",
            "private_key is set but certificate is not",
        ),
    ],
)
def test_tls_certificate_and_key_go_together(tls: str, reason: str) -> None:
    # (The file named is not there either: another line.)
    assert (
        f"sbc.yaml:3: sip.tls: {reason}: set both,"
        " or neither for a generated self-signed certificate"
    ) in errors(f"log: {{}}\nsip:\n  tls: {tls}\n")


def test_duplicate_listeners() -> None:
    assert errors(
        """\
        sip:
          listen:
            - {transport: udp, address: "::1", port: 5060}
            - {transport: tcp, address: 127.0.0.1, port: 5060}
            - {transport: udp, address: "0::1", port: 5060}
            - {transport: tls, address: 127.0.0.1, port: 5060}
        """
    ) == [
        "sbc.yaml:5: sip.listen[2]: duplicate listener udp [::1]:5060 (same as sip.listen[0])",
        "sbc.yaml:6: sip.listen[3]: tls 127.0.0.1:5060 uses the same TCP port as"
        " sip.listen[1] (tcp 127.0.0.1:5060)",
    ]


def test_management_port_clashes_with_a_sip_tcp_listener() -> None:
    assert errors(
        """\
        sip:
          listen:
            - {transport: udp, address: 127.0.0.1, port: 8080}
            - {transport: tls, address: 127.0.0.1, port: 8080}
        management:
          listen: {address: 127.0.0.1}
        """
    ) == [
        "sbc.yaml:6: management.listen: 127.0.0.1:8080 is already used by sip.listen[1]"
        " (tls 127.0.0.1:8080)"
    ]


def test_all_problems_are_collected_in_line_order() -> None:
    text = """\
        management:
          listen: {port: 0x50}
        lgo: {}
        log:
          level: loud
        sip:
          listen:
            - {transport: udp, address: 127.0.0.1, port: abc}
          max_connections: false
        """
    with pytest.raises(ConfigError) as info:
        load(text)
    assert [(p.line, p.key) for p in info.value.problems] == [
        (2, "management.listen.port"),
        (3, ""),
        (5, "log.level"),
        (8, "sip.listen[0].port"),
        (9, "sip.max_connections"),
    ]
    assert info.value.problems[3] == ConfigProblem(
        "sbc.yaml", 8, "sip.listen[0].port", "expected an integer 1..65535, got 'abc'"
    )
    assert len(str(info.value).splitlines()) == 5


# --- files and check-config ---------------------------------------------------------


def test_check_config_ok(tmp_path: Path) -> None:
    path = tmp_path / "sbc.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    assert check_config(path) == (0, [f"{path}: configuration OK"])


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "sbc.yaml"
    path.write_text("lgo: {}\nsip: {max_connections: 0}\n", encoding="utf-8")
    status, messages = check_config(path)
    assert status == 1
    assert messages == [
        f"{path}:1: unknown key 'lgo' (did you mean 'log'?)",
        f"{path}:2: sip.max_connections: expected an integer 1..1000000, got 0",
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    assert check_config(path) == (1, [f"{path}: cannot read: No such file or directory"])
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems[0].line is None


def test_a_tls_file_that_cannot_be_looked_up_is_a_config_error() -> None:
    # stat() fails with ENAMETOOLONG (or EACCES), not "no such file".
    name = "/" + "x" * 300 + "/ca.pem"
    assert errors(f"sip:\n  tls:\n    server_ca: {name}\n") == [
        f"sbc.yaml:3: sip.tls.server_ca: cannot look up {name}: File name too long"
    ]


def test_invalid_utf8_has_its_line(tmp_path: Path) -> None:
    path = tmp_path / "sbc.yaml"
    path.write_bytes(b"log: {}\nsip:\n  user_agent: caf\xe9\n")
    assert check_config(path) == (1, [f"{path}:3: not valid UTF-8 (byte 0xe9)"])


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "sbc.yaml"
    path.write_bytes(b"\xef\xbb\xbflog: {level: debug}\n")
    assert load_config(path).log.level is LogLevel.DEBUG


def test_oversized_file(tmp_path: Path) -> None:
    path = tmp_path / "sbc.yaml"
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    assert check_config(path) == (1, [f"{path}: larger than {MAX_CONFIG_BYTES} bytes"])


# --- nothing but ConfigError, whatever the input ------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["udp", "tcp", "tls", "::1", "127.0.0.1", "info", "json", "0", "5060"]),
)
_keys = st.sampled_from(
    [
        "state_dir", "log", "level", "format", "sip", "listen", "transport", "address",
        "port", "tls", "certificate", "private_key", "tcp_idle_timeout",
        "max_connections", "user_agent", "management", "lgo", "<<",
    ]
) | st.text(max_size=8)  # fmt: skip
_documents = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=6),
    max_leaves=30,
)


def _accepts_or_config_error(text: str) -> None:
    try:
        config = load_config_text(text, "fuzz.yaml", BASE)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert str(problem).startswith("fuzz.yaml")
            assert problem.line is None or problem.line >= 1
    else:
        assert isinstance(config, Config)
        hash(config)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_random_text_raises_only_config_error(text: str) -> None:
    _accepts_or_config_error(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents)
def test_random_yaml_raises_only_config_error(document: object) -> None:
    _accepts_or_config_error(yaml.safe_dump(document))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_example_raises_only_config_error(data: st.DataObject) -> None:
    lines = EXAMPLE.splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(lines) - 1))
        line = lines[index]
        head = line.split(":", 1)[0] + ":" if ":" in line else line
        kind = data.draw(st.sampled_from(["text value", "yaml value", "any line"]))
        if kind == "text value":
            lines[index] = f"{head} {data.draw(st.text(max_size=12))}"
        elif kind == "yaml value":
            lines[index] = f"{head} {yaml.safe_dump(data.draw(_scalars)).strip()}"
        else:
            lines[index] = data.draw(st.text(max_size=30))
    _accepts_or_config_error("\n".join(lines) + "\n")
