"""Read the YAML configuration into a `Config`, with `file:line: reason` errors.

Loading is all or nothing: `load_config`, `load_config_text` and `default_config`
either return a complete, validated `Config` or raise `ConfigError` listing every
problem found. Nothing is applied from a file that fails, so a reload with a broken
file leaves the running configuration untouched.

The YAML is composed into nodes (never constructed into Python objects first), so each
value keeps the line it was written on, duplicate keys can be seen (PyYAML's own
constructor silently keeps the last one) and no tag can instantiate anything. The
schema classes in `sbc.config.schema` drive the validation: their field types and
`spec(...)` metadata say what each key accepts; see that module to add a section.

Rules beyond the schema's types:

- unknown keys, duplicate keys, non-string keys and merge keys (`<<`) are errors;
- missing keys take the field's default; a section written as null (`log:` with every
  line under it commented out) takes all its defaults;
- a bool is not an integer, and integers are decimal only (YAML 1.1 reads `05060`
  as octal 2608);
- relative paths resolve against the configuration file's directory;
- aliases may not be recursive nor expand the file beyond `MAX_NODES` values, and
  IP addresses and networks take no IPv6 zone id (`fe80::1%eth0`).

Each problem renders as `path:line: key.path: reason`, e.g.
`sbc.yaml:7: sip.listen[1].port: expected an integer 1..65535, got 'abc'`. A problem
in what an alias repeats is placed at the alias, and says where it is written:
`sbc.yaml:12: realms[1].limits.max_calls: expected ..., got 0 (from line 7 via alias
*lim)`. The first `MAX_REPORTED_PROBLEMS` problems (by line) are reported, then
`sbc.yaml: ... and N more problems`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import enum
import functools
import heapq
import math
import operator
import re
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from importlib import resources
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any, Final, NamedTuple

import yaml
from yaml.composer import ComposerError
from yaml.constructor import SafeConstructor
from yaml.nodes import CollectionNode, MappingNode, Node, ScalarNode, SequenceNode

from sbc.config.schema import SPEC_KEY, Config, FieldSpec, IPAddress, IPNetwork, Section, key_path

#: Largest configuration file read, in bytes (and characters for text).
MAX_CONFIG_BYTES: Final = 1 << 20
#: Deepest nesting of YAML collections; the composer recurses once per level.
MAX_NESTING: Final = 64
#: Most values (nodes) a file may stand for once its aliases are expanded: more than
#: a file of MAX_CONFIG_BYTES can hold without aliases, so only an alias bomb (each
#: alias repeating a collection full of aliases) reaches it.
MAX_NODES: Final = MAX_CONFIG_BYTES
#: Longest value quoted back in an error message.
MAX_QUOTED: Final = 40
#: Most problems reported; a last line says how many more there were. A file of
#: MAX_CONFIG_BYTES with aliases can hold a million problems (MAX_NODES).
MAX_REPORTED_PROBLEMS: Final = 50

DEFAULT_CONFIG_RESOURCE: Final = "default.yaml"
DEFAULT_CONFIG_NAME: Final = "<embedded default.yaml>"

_TAG_NULL: Final = "tag:yaml.org,2002:null"
_TAG_BOOL: Final = "tag:yaml.org,2002:bool"
_TAG_INT: Final = "tag:yaml.org,2002:int"
_TAG_FLOAT: Final = "tag:yaml.org,2002:float"
_TAG_STR: Final = "tag:yaml.org,2002:str"
_TAG_MERGE: Final = "tag:yaml.org,2002:merge"

# Decimal only: the YAML 1.1 int resolver also reads 0x.., 0b.., 0.. (octal) and
# base-60 (1:30), which are never what an operator means by a port or a timeout.
_DECIMAL: Final = re.compile(r"[-+]?(?:0|[1-9][0-9_]*)")
_MAX_INT_CHARS: Final = 24


@dataclass(frozen=True)
class ConfigProblem:
    """One problem: where it is and what is wrong.

    `line` is 1-based, or None when the problem concerns the whole file (unreadable,
    too large). `key` is the dotted key path (`sip.listen[1].port`), "" at the top.
    """

    file: str
    line: int | None
    key: str
    reason: str

    @property
    def message(self) -> str:
        """`key: reason`, or the reason alone at the top level."""
        return f"{self.key}: {self.reason}" if self.key else self.reason

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; `problems` is what is reported, by line.

    That is the first `MAX_REPORTED_PROBLEMS` problems by line and, when there were
    more (`found` in all, when `problems` holds only some), a last one without a line
    that says how many: `file: ... and N more problems`. Every caller that prints
    the problems (`sbc check-config`, `sbc run`, a reload) prints that line too.
    """

    def __init__(self, problems: Sequence[ConfigProblem], found: int | None = None) -> None:
        ordered = sorted(problems, key=lambda p: p.line or 0)
        shown = ordered[:MAX_REPORTED_PROBLEMS]
        #: How many problems found are left out (the last line of `problems` says so).
        self.more = max(len(ordered), found or 0) - len(shown)
        if self.more:
            noun = "problem" if self.more == 1 else "problems"
            shown.append(ConfigProblem(shown[0].file, None, "", f"... and {self.more} more {noun}"))
        self.problems: tuple[ConfigProblem, ...] = tuple(shown)
        super().__init__("\n".join(str(p) for p in self.problems))


class CheckResult(NamedTuple):
    """What `sbc check-config FILE` prints and exits with."""

    status: int
    messages: list[str]


def load_config(path: Path) -> Config:
    """Load and validate the configuration file at `path`.

    Relative paths inside it resolve against the file's directory. Raises
    `ConfigError` (never a partial result) for an unreadable or invalid file.
    """
    name = str(path)
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(name, None, "", f"cannot read: {exc.strerror or exc}")]
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([_too_large(name)])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        reason = f"not valid UTF-8 (byte 0x{data[exc.start]:02x})"
        raise ConfigError([ConfigProblem(name, line, "", reason)]) from None
    return load_config_text(text, name, path.parent)


def load_config_text(text: str, filename: str, base_dir: Path) -> Config:
    """Validate configuration `text`; `filename` only names it in error messages.

    Relative paths resolve against `base_dir`. Raises `ConfigError` when invalid.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([_too_large(filename)])
    reader = _SchemaReader(filename, base_dir.absolute())
    config = reader.read(text)
    if reader.problems.found or not isinstance(config, Config):
        raise ConfigError(reader.problems.first(), reader.problems.found)
    return config


def default_config_text() -> str:
    """The embedded default configuration, as YAML (a template for operators)."""
    resource = resources.files("sbc.config").joinpath(DEFAULT_CONFIG_RESOURCE)
    return resource.read_text(encoding="utf-8")


def default_config() -> Config:
    """The embedded default configuration; its relative paths resolve against the cwd."""
    return load_config_text(default_config_text(), DEFAULT_CONFIG_NAME, Path.cwd())


def check_config(path: Path) -> CheckResult:
    """Validate the file at `path` for `sbc check-config`: status 0 and an OK line,
    or status 1 and one `file:line: reason` message per problem (the first
    `MAX_REPORTED_PROBLEMS`, then `file: ... and N more problems`)."""
    try:
        load_config(path)
    except ConfigError as exc:
        return CheckResult(1, [str(problem) for problem in exc.problems])
    return CheckResult(0, [f"{path}: configuration OK"])


def _too_large(filename: str) -> ConfigProblem:
    return ConfigProblem(filename, None, "", f"larger than {MAX_CONFIG_BYTES} bytes")


class _AliasUse(NamedTuple):
    """An alias (`*name`) and the anchored node it repeats."""

    name: str
    target: Node


class _NodeLoader(yaml.SafeLoader):
    """A SafeLoader that refuses nesting deep enough to exhaust the Python stack, and
    marks where each alias is written."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        #: The node of each alias, by id: a shallow copy of the anchored node (the
        #: children stay shared) marked where the alias is written, so that problems
        #: in it can be placed there. PyYAML returns the anchored node itself.
        self.aliases: dict[int, _AliasUse] = {}

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = super().compose_node(parent, index)
            assert isinstance(event, yaml.AliasEvent) and target is not None
            use = copy.copy(target)
            use.start_mark, use.end_mark = event.start_mark, event.end_mark
            self.aliases[id(use)] = _AliasUse(str(event.anchor), target)
            return use
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise ComposerError(
                    None,
                    None,
                    f"collections nested deeper than {MAX_NESTING} levels",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Document(NamedTuple):
    """A composed document: its root node, and the nodes that stand for aliases."""

    root: Node | None
    aliases: dict[int, _AliasUse]


def _compose(text: str, filename: str) -> tuple[_Document, list[ConfigProblem]]:
    nothing = _Document(None, {})
    try:
        # The reader checks every character up front, in the constructor.
        loader = _NodeLoader(text)
    except yaml.reader.ReaderError as exc:
        return nothing, [_reader_problem(exc, text, filename)]
    try:
        root = loader.get_single_node()
        if root is not None and loader.aliases:
            problem = _expansion_problem(root, filename, loader.aliases)
            if problem is not None:
                return nothing, [problem]
        return _Document(root, loader.aliases), []
    except yaml.MarkedYAMLError as exc:
        return nothing, [_yaml_problem(exc, filename)]
    except yaml.reader.ReaderError as exc:
        return nothing, [_reader_problem(exc, text, filename)]
    except yaml.YAMLError as exc:
        return nothing, [ConfigProblem(filename, None, "", f"invalid YAML: {exc}")]
    finally:
        loader.dispose()


def _expansion_problem(
    root: Node, filename: str, aliases: dict[int, _AliasUse]
) -> ConfigProblem | None:
    """A problem when aliases make the node graph recursive or expand it beyond
    `MAX_NODES` values; the validation walks every copy an alias stands for."""
    sizes: dict[int, int] = {}  # id(node) -> values it stands for, once expanded
    open_ids: set[int] = set()  # the node being expanded and its ancestors
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        # An alias's node is the anchored node's: the same children, expanded once.
        children = [
            aliases[id(child)].target if id(child) in aliases else child
            for child in _children(node)
        ]
        if expanded:
            open_ids.discard(id(node))
            size = sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if size > MAX_NODES:
                reason = f"invalid YAML: aliases expand the file to more than {MAX_NODES} values"
                return ConfigProblem(filename, _line(node), "", reason)
            continue
        if id(node) in sizes:
            continue
        open_ids.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_ids:
                reason = (
                    "invalid YAML: an alias refers to the collection it is in"
                    f" (line {_line(child)})"
                )
                return ConfigProblem(filename, _line(node), "", reason)
            stack.append((child, False))
    return None


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _reader_problem(exc: yaml.reader.ReaderError, text: str, filename: str) -> ConfigProblem:
    line = text.count("\n", 0, exc.position) + 1
    reason = f"invalid YAML: character {exc.character:#06x} is not allowed"
    return ConfigProblem(filename, line, "", reason)


def _yaml_problem(exc: yaml.MarkedYAMLError, filename: str) -> ConfigProblem:
    mark = exc.problem_mark or exc.context_mark
    reason = f"invalid YAML: {exc.problem or exc.context or 'syntax error'}"
    if exc.problem and exc.context:
        at = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        if exc.context.startswith("while "):
            # "expected ',' or ']', but got ':' (while parsing a flow sequence at line 3)"
            reason += f" ({exc.context}{at})"
        else:
            # "expected a single document in the stream at line 1, but found another ..."
            reason = f"invalid YAML: {exc.context}{at}, {exc.problem}"
    return ConfigProblem(filename, mark.line + 1 if mark else None, "", reason)


class _Invalid(enum.Enum):
    """Marks a value that failed validation (its problem is already recorded)."""

    INVALID = enum.auto()


_INVALID: Final = _Invalid.INVALID


class _Mismatch(Exception):
    """A scalar does not fit its field's type or range; an argument says why, when the
    expected type alone does not."""


@dataclass(frozen=True)
class _FieldInfo:
    name: str
    type: Any
    spec: FieldSpec | None
    default: Any  # MISSING when required


_SCHEMA_FIELDS: dict[type[Section], tuple[_FieldInfo, ...]] = {}


def _schema_fields(cls: type[Section]) -> tuple[_FieldInfo, ...]:
    """The fields of a section class with their resolved types (cached)."""
    cached = _SCHEMA_FIELDS.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    infos = []
    for f in fields(cls):  # type: ignore[arg-type]
        if f.default is not MISSING:
            default: Any = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        infos.append(_FieldInfo(f.name, hints[f.name], f.metadata.get(SPEC_KEY), default))
    _SCHEMA_FIELDS[cls] = result = tuple(infos)
    return result


def _split_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for `X | None`, else (False, tp)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args:
            rest = [arg for arg in args if arg is not type(None)]
            return True, functools.reduce(operator.or_, rest)
    return False, tp


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG_NULL


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _quote(text: str) -> str:
    if len(text) > MAX_QUOTED:
        text = text[: MAX_QUOTED - 3] + "..."
    return repr(text)


def _describe(node: Node, spec: FieldSpec | None) -> str:
    """How a value is shown after "got"; never the value of a secret."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if spec is not None and spec.secret:
        return "a hidden value"
    if node.tag == _TAG_NULL:
        return "null"
    value = str(node.value)
    if node.tag == _TAG_STR:
        return _quote(value)
    # Other scalars (numbers, bools, dates) as written, shortened and without controls.
    shown = _quote(value)[1:-1]
    return shown if node.tag.startswith("tag:yaml.org,2002:") else f"{node.tag} {shown}"


def _expectation(tp: Any, spec: FieldSpec | None) -> str:
    if spec is not None and spec.expect:
        return spec.expect
    if _is_section(tp):
        return "a mapping"
    if typing.get_origin(tp) is tuple:
        return "a list"
    if tp is bool:
        return "true or false"
    if tp is int or tp is float:
        noun = "an integer" if tp is int else "a number"
        low = spec.min if spec else None
        high = spec.max if spec else None
        if low is not None and high is not None:
            return f"{noun} {low}..{high}"
        if low is not None:
            return f"{noun} >= {low}"
        if high is not None:
            return f"{noun} <= {high}"
        return noun
    if tp is str:
        return "a string"
    if tp is Path:
        return "a path"
    if tp == IPAddress:
        return "an IPv4 or IPv6 address"
    if tp == IPNetwork:
        return "an IPv4 or IPv6 network (address/prefix)"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(member.value) for member in tp)
    raise TypeError(f"unsupported schema type {tp!r}")


def _in_range(value: float, spec: FieldSpec | None) -> bool:
    if spec is None:
        return True
    return (spec.min is None or value >= spec.min) and (spec.max is None or value <= spec.max)


class _Problems:
    """The problems found: how many, and the first `MAX_REPORTED_PROBLEMS` by line
    (in the order found within a line), whatever order they are found in."""

    def __init__(self) -> None:
        self.found = 0
        # A max-heap on (line, order found) by negating both: the root is the one
        # to drop when a problem on an earlier line comes.
        self._heap: list[tuple[int, int, ConfigProblem]] = []

    def add(self, problem: ConfigProblem) -> None:
        self.found += 1
        entry = (-(problem.line or 0), -self.found, problem)
        if len(self._heap) < MAX_REPORTED_PROBLEMS:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heappushpop(self._heap, entry)

    def first(self) -> list[ConfigProblem]:
        return [problem for _, _, problem in sorted(self._heap, reverse=True)]


#: Where a problem is reported: the line, and a note for the reason (empty, or where
#: the value is written when the line is that of an alias repeating it).
_Place = tuple[int, str]


def _via_note(written: int, alias: str) -> str:
    return f" (from line {written} via alias *{alias})"


class _SchemaReader:
    """One validation pass: converts nodes to schema values, collecting problems."""

    def __init__(self, filename: str, base_dir: Path) -> None:
        self.filename = filename
        self.base_dir = base_dir
        self.problems = _Problems()
        # Place of every key path seen, to place problems found by Section.check().
        self.lines: dict[str, _Place] = {}
        self.aliases: dict[int, _AliasUse] = {}
        # While reading what an alias repeats: the alias's line and the alias. Only
        # the outermost alias counts: its line is where the key path is in the file.
        self._via: tuple[int, _AliasUse] | None = None

    def read(self, text: str) -> Config | _Invalid:
        document, problems = _compose(text, self.filename)
        for problem in problems:
            self.problems.add(problem)
        if problems:
            return _INVALID
        root, self.aliases = document
        if not isinstance(root, MappingNode):
            self.report(1 if root is None else _line(root), "", "top level must be a mapping")
            return _INVALID
        self.lines[""] = (_line(root), "")
        config = self.section(Config, root, "", null_is_empty=False)
        return config if isinstance(config, Config) else _INVALID

    def place(self, line: int) -> _Place:
        """Where a problem found at `line` is reported."""
        if self._via is None:
            return line, ""
        at, alias = self._via
        # At the alias's own node: what it repeats is written at the anchor.
        written = _line(alias.target) if line == at else line
        return at, _via_note(written, alias.name)

    def report(self, line: int, key: str, reason: str) -> None:
        at, note = self.place(line)
        self.problems.add(ConfigProblem(self.filename, at, key, reason + note))

    def record(self, path: str, line: int, node: Node) -> None:
        """Remember where `path` (whose value is `node`) is, for Section.check()."""
        alias = self.aliases.get(id(node)) if self._via is None else None
        if alias is not None:
            self.lines[path] = (line, _via_note(_line(alias.target), alias.name))
        else:
            self.lines[path] = self.place(line)

    def through(self, node: Node) -> contextlib.AbstractContextManager[None]:
        """Read `node` inside this: when it is an alias, the problems found in what
        it repeats are placed at it."""
        alias = self.aliases.get(id(node)) if self._via is None else None
        if alias is None:
            return contextlib.nullcontext()
        return self._reading_alias(_line(node), alias)

    @contextlib.contextmanager
    def _reading_alias(self, line: int, alias: _AliasUse) -> Iterator[None]:
        self._via = (line, alias)
        try:
            yield
        finally:
            self._via = None

    def line_of(self, path: str) -> _Place:
        """The place of `path`, or of its nearest ancestor seen in the file."""
        while path not in self.lines and path:
            path = path[: max(path.rfind("."), path.rfind("["), 0)]
        return self.lines.get(path, (1, ""))

    def section(self, cls: type[Section], node: Node, path: str, *, null_is_empty: bool) -> Any:
        if null_is_empty and _is_null(node):
            pairs: list[tuple[Node, Node]] = []
        elif isinstance(node, MappingNode):
            pairs = node.value
        else:
            self.report(_line(node), path, f"expected a mapping, got {_describe(node, None)}")
            return _INVALID
        schema = {info.name: info for info in _schema_fields(cls)}
        given = self.keys(pairs, schema, path)
        values: dict[str, Any] = {}
        for info in schema.values():
            if info.name in given:
                field_path = key_path(path, info.name)
                value = self.value(info.type, info.spec, given[info.name], field_path)
            elif isinstance(info.default, Path):
                value = self.resolve(info.default)
            elif isinstance(info.default, Section):
                value = self.resolve_defaults(info.default)
            elif info.default is not MISSING:
                value = info.default
            else:
                self.report(_line(node), path, f"missing required key {info.name!r}")
                value = _INVALID
            values[info.name] = value
        if _INVALID in values.values():
            return _INVALID
        instance = cls(**values)
        for issue_path, reason in instance.check(path):
            # Placed when recorded: the alias being read now may not be the one
            # the issue's key path went through.
            at, note = self.line_of(issue_path)
            self.problems.add(ConfigProblem(self.filename, at, issue_path, reason + note))
        return instance

    def keys(
        self, pairs: list[tuple[Node, Node]], schema: dict[str, _FieldInfo], path: str
    ) -> dict[str, Node]:
        """The value node of each known key; reports bad, duplicate and unknown keys."""
        given: dict[str, Node] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in pairs:
            line = _line(key_node)
            if key_node.tag == _TAG_MERGE:
                self.report(line, path, "merge keys ('<<') are not supported")
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag != _TAG_STR:
                self.report(line, path, f"keys must be strings, got {_describe(key_node, None)}")
                continue
            key = str(key_node.value)
            if key in first_line:
                self.report(
                    line, path, f"duplicate key {_quote(key)} (first at line {first_line[key]})"
                )
                continue
            first_line[key] = line
            if key not in schema:
                self.report(line, path, f"unknown key {_quote(key)}{_suggest(key, schema)}")
                continue
            given[key] = value_node
            # A section or list is best placed at its key; a scalar where it is written.
            self.record(
                key_path(path, key),
                line if isinstance(value_node, CollectionNode) else _line(value_node),
                value_node,
            )
        return given

    def value(self, tp: Any, spec: FieldSpec | None, node: Node, path: str) -> Any:
        with self.through(node):
            return self._value(tp, spec, node, path)

    def _value(self, tp: Any, spec: FieldSpec | None, node: Node, path: str) -> Any:
        optional, tp = _split_optional(tp)
        if optional and _is_null(node):
            return None
        if _is_section(tp):
            return self.section(tp, node, path, null_is_empty=True)
        if typing.get_origin(tp) is tuple:
            return self.sequence(typing.get_args(tp)[0], spec, node, path)
        try:
            if not isinstance(node, ScalarNode):
                raise _Mismatch
            return self.scalar(tp, spec, node)
        except _Mismatch as exc:
            expected = _expectation(tp, spec) + (" or null" if optional else "")
            why = f" ({exc})" if exc.args else ""
            self.report(_line(node), path, f"expected {expected}, got {_describe(node, spec)}{why}")
            return _INVALID

    def sequence(self, item_tp: Any, spec: FieldSpec | None, node: Node, path: str) -> Any:
        if not isinstance(node, SequenceNode):
            self.report(_line(node), path, f"expected a list, got {_describe(node, None)}")
            return _INVALID
        min_items = spec.min_items if spec else 0
        if len(node.value) < min_items:
            self.report(
                _line(node), path, f"expected at least {min_items} item(s), got {len(node.value)}"
            )
            return _INVALID
        items = []
        for index, item_node in enumerate(node.value):
            item_path = f"{path}[{index}]"
            self.record(item_path, _line(item_node), item_node)
            if _is_section(item_tp):
                with self.through(item_node):
                    item = self.section(item_tp, item_node, item_path, null_is_empty=False)
                items.append(item)
            else:
                items.append(self.value(item_tp, spec, item_node, item_path))
        return _INVALID if _INVALID in items else tuple(items)

    def scalar(self, tp: Any, spec: FieldSpec | None, node: ScalarNode) -> Any:
        """The value of `node` as a `tp`; raises `_Mismatch`."""
        tag, text = node.tag, str(node.value)
        if tp is bool:
            if tag == _TAG_BOOL and text.lower() in SafeConstructor.bool_values:
                return SafeConstructor.bool_values[text.lower()]
            raise _Mismatch
        if tp is int or tp is float:
            number: float
            if tag == _TAG_INT and len(text) <= _MAX_INT_CHARS and _DECIMAL.fullmatch(text):
                number = int(text.replace("_", ""))
            elif tp is float and tag == _TAG_FLOAT:
                try:
                    number = SafeConstructor().construct_yaml_float(node)
                except ValueError:
                    raise _Mismatch from None
                if not math.isfinite(number):
                    raise _Mismatch
            else:
                raise _Mismatch
            if not _in_range(number, spec):
                raise _Mismatch
            return float(number) if tp is float else number
        if tp is str:
            if tag != _TAG_STR:
                raise _Mismatch
            if spec is not None and spec.pattern and not re.fullmatch(spec.pattern, text):
                raise _Mismatch
            return text
        if tp is Path:
            if tag != _TAG_STR or not text or "\0" in text:
                raise _Mismatch
            return self.resolve(Path(text))
        if tp in (IPAddress, IPNetwork):
            # Plain numbers too: YAML 1.1 reads some IPv6 literals (1:2:3:4:5:6:7:8)
            # as base-60 integers, but the text as written is still the address.
            if tag not in (_TAG_STR, _TAG_INT, _TAG_FLOAT):
                raise _Mismatch
            if "%" in text:
                # ipaddress takes fe80::1%eth0, but a zone id is no part of a SIP host,
                # an SDP address or an nftables set.
                raise _Mismatch("IPv6 zone ids are not supported")
            try:
                return ip_address(text) if tp == IPAddress else ip_network(text)
            except ValueError:
                raise _Mismatch from None
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            # A plain `off` (or on, yes, no) is a YAML 1.1 boolean; where the schema
            # wants a word, the word as written is meant (`srtp: off`).
            if tag in (_TAG_STR, _TAG_BOOL):
                for member in tp:
                    if member.value == text:
                        return member
            raise _Mismatch
        raise TypeError(f"unsupported schema type {tp!r}")

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.base_dir / path

    def resolve_defaults(self, section: Section) -> Section:
        """A missing section's default, its relative paths resolved as in a present one."""
        changes: dict[str, Any] = {}
        for f in fields(section):  # type: ignore[arg-type]
            value = getattr(section, f.name)
            if isinstance(value, Path):
                changes[f.name] = self.resolve(value)
            elif isinstance(value, Section):
                changes[f.name] = self.resolve_defaults(value)
        return replace(section, **changes) if changes else section  # type: ignore[type-var]


def _suggest(key: str, schema: dict[str, _FieldInfo]) -> str:
    by_lower = {name.lower(): name for name in schema}
    matches = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[matches[0]]!r}?)" if matches else ""
