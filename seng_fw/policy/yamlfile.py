"""YAML files validated by pydantic models, with errors that name file, line and field.

PyYAML's composer keeps the position of every node; we convert the node tree ourselves
(instead of `yaml.safe_load`) so that each value's line is remembered, and so that
duplicate mapping keys, which `safe_load` silently overwrites, are reported.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from seng_fw.system.cli_toolkit import os_error_text

Path_ = tuple[str | int, ...]
ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)
# libyaml's composer when PyYAML was built with it (Debian's and PyPI's wheels are):
# several times faster on large policies, same nodes and marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class ConfigError(Exception):
    """One or more problems in configuration files; each names file, line and field."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


class YamlDocument:
    """A parsed file. The line of every value is worked out only when asked for (an error
    to report): keeping a mark for each node of a large policy cost more than the rest of
    loading it."""

    def __init__(
        self,
        file: str,
        data: Any,
        lines: dict[Path_, int] | None,
        text: str | None = None,
        source: str | None = None,
    ) -> None:
        self.file = file
        self.data = data
        self.text = text  # kept for a document read from standard input
        self._lines = lines
        self._source = source  # the text parsed, to find lines in later

    @property
    def lines(self) -> dict[Path_, int]:
        if self._lines is None:
            self._lines = {(): 1}
            if self._source is not None:
                try:
                    node = yaml.compose(self._source, Loader=_LOADER)
                    if node is not None:
                        constructor = yaml.constructor.SafeConstructor()
                        _convert(node, (), self, [], constructor)
                except (yaml.YAMLError, RecursionError):
                    pass  # (it parsed once: cannot happen)
        return self._lines

    def line_of(self, path: Path_) -> int:
        """Line of the deepest node on `path` that exists (1-based)."""
        lines = self.lines
        for end in range(len(path), -1, -1):
            if path[:end] in lines:
                return lines[path[:end]]
        return 1

    def issue(self, path: Path_, message: str) -> ConfigIssue:
        return ConfigIssue(self.file, self.line_of(path), format_path(path), message)


def format_path(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _convert(
    node: yaml.Node,
    path: Path_,
    doc: YamlDocument,
    issues: list[ConfigIssue],
    scalars: yaml.constructor.SafeConstructor,
) -> Any:
    doc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _convert(key_node, (*path, "<key>"), doc, issues, scalars)
            if not isinstance(key, str | int):
                issues.append(doc.issue(path, f"mapping key {key!r} is not a string"))
                continue
            child = (*path, str(key))
            if key in result:
                doc.lines[child] = key_node.start_mark.line + 1
                issues.append(doc.issue(child, "duplicate key"))
                continue
            result[key] = _convert(value_node, child, doc, issues, scalars)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _convert(item, (*path, i), doc, issues, scalars) for i, item in enumerate(node.value)
        ]
    # Scalars: PyYAML's safe constructor resolves the tag (int, bool, null, str, ...).
    # An explicit tag can make it fail, and PyYAML's constructors raise whatever their
    # code hits (`!!int 0x` ValueError, `!!bool maybe` KeyError, `!!timestamp 2020-1`
    # AttributeError, an unknown `!tag` ConstructorError): all found by fuzzing. For one
    # scalar any exception means a bad value in the file, not a crash.
    try:
        value = scalars.construct_object(node, deep=True)
    except Exception as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        issues.append(doc.issue(path, f"bad value {node.value!r} ({node.tag}): {problem}"))
        return None
    if isinstance(value, int) and not isinstance(value, bool) and len(node.value) > 20:
        # A 64-digit MRENCLAVE made only of decimal digits would become a (lossy) int;
        # no integer setting is that long, so keep the text.
        return node.value
    return value


_SLOW = object()  # _fast_load's answer for a document it leaves to the careful path
_NO_KEY = object()
_STR = "tag:yaml.org,2002:str"
_MAX_DEPTH = 100  # deeper documents take the careful path, which says whether it is too deep


def _fast_load(text: str) -> Any:
    """The document's data as `_convert` makes it, built straight from libyaml's events:
    no node tree (790 MB for 10,000 apps) and no lines. `_SLOW` for anything that would
    be reported (a syntax error, a duplicate key, a bad scalar, more than one document)
    or that it does not handle (anchors, aliases, explicit tags): the careful path does."""
    loader = _LOADER(text)
    try:
        return _build(loader)
    except Exception:  # (the careful path says what, or fails the same way)
        return _SLOW
    finally:
        loader.dispose()


def _build(loader: Any) -> Any:
    get = loader.get_event
    resolver = yaml.resolver.Resolver()
    constructor = yaml.constructor.SafeConstructor()
    plain: dict[str, Any] = {}  # plain scalar -> its value (each resolved once)
    events = yaml.events
    scalar_event, mapping_start = events.ScalarEvent, events.MappingStartEvent
    sequence_start, mapping_end = events.SequenceStartEvent, events.MappingEndEvent
    sequence_end = events.SequenceEndEvent
    if not isinstance(get(), events.StreamStartEvent):
        return _SLOW
    first = get()
    if isinstance(first, events.StreamEndEvent):
        return {}  # (an empty file, as `_convert`'s caller makes it)
    if not isinstance(first, events.DocumentStartEvent):
        return _SLOW
    # The container being filled, whether it is a mapping, and its pending key; and the
    # same for the enclosing ones.
    current: Any = None
    is_map = False
    key: Any = _NO_KEY
    outer: list[tuple[Any, bool, Any]] = []
    while True:
        event = get()
        kind = type(event)
        if kind is scalar_event:
            if event.anchor is not None or event.tag is not None:
                return _SLOW
            value: Any = event.value
            if event.implicit[0]:  # plain: PyYAML's resolver says what it is
                text = value
                if text in plain:
                    value = plain[text]
                else:
                    tag = resolver.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
                    if tag != _STR:
                        node = yaml.ScalarNode(tag, text)
                        value = constructor.construct_object(node, deep=True)
                        is_int = isinstance(value, int) and not isinstance(value, bool)
                        if is_int and len(text) > 20:
                            value = text  # as `_convert` does
                    plain[text] = value
        elif kind is mapping_start or kind is sequence_start:
            if event.anchor is not None or event.tag is not None or len(outer) > _MAX_DEPTH:
                return _SLOW
            outer.append((current, is_map, key))
            is_map = kind is mapping_start
            current, key = ({} if is_map else []), _NO_KEY
            continue
        elif kind is mapping_end or kind is sequence_end:
            value = current
            current, is_map, key = outer.pop()
            if not outer:  # the document's root
                if not isinstance(get(), events.DocumentEndEvent):
                    return _SLOW
                return value if isinstance(get(), events.StreamEndEvent) else _SLOW
        else:
            return _SLOW  # an alias (or something unexpected)
        if current is None:  # a scalar document
            if not isinstance(get(), events.DocumentEndEvent):
                return _SLOW
            return value if isinstance(get(), events.StreamEndEvent) else _SLOW
        if not is_map:
            current.append(value)
        elif key is _NO_KEY:
            if not isinstance(value, str | int) or value in current:
                return _SLOW
            key = value
        else:
            current[key] = value
            key = _NO_KEY


def load_yaml(path: Path, text: str | None = None) -> YamlDocument:
    """Parse one YAML file (or `text`, named `path`), remembering the line of every value.
    Raises ConfigError."""
    name = str(path)
    keep = text
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            reason = os_error_text(name, exc).removeprefix(f"{name}: ")
            raise ConfigError([ConfigIssue(name, 1, "", f"cannot read: {reason}")]) from None
        except UnicodeDecodeError:
            raise ConfigError([ConfigIssue(name, 1, "", "cannot read: not UTF-8 text")]) from None
    data = _fast_load(text)
    if data is not _SLOW:
        return YamlDocument(name, data, None, keep, source=text)
    # Something to report (or unusual): again, with every node's line.
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError([ConfigIssue(name, line, "", f"invalid YAML: {exc}")]) from exc
    if node is None:
        return YamlDocument(name, {}, {(): 1}, keep)
    doc = YamlDocument(name, {}, {(): 1}, keep)
    issues: list[ConfigIssue] = []
    # A constructor per file: it keeps every node it constructed (a module-wide one kept
    # every policy's whole node tree, 400 MB for 10,000 apps, and more on each reload).
    try:
        doc.data = _convert(node, (), doc, issues, yaml.constructor.SafeConstructor())
    except RecursionError:  # found by fuzzing: libyaml composes deeper trees than we walk
        raise ConfigError([ConfigIssue(name, 1, "", "invalid YAML: nested too deeply")]) from None
    if issues:
        raise ConfigError(issues)
    return doc


# Patterns of constrained strings, in words (models register theirs: NAME_PATTERN, ...).
PATTERN_WORDS: dict[str, str] = {}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'sdk-nginx'?)`, or nothing when no choice is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: object) -> str:
    """The offending value, short enough for one line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_of(annotation: object) -> type[pydantic.BaseModel] | None:
    """The first pydantic model inside an annotation (list[App], App | None, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _keys_at(model: type[pydantic.BaseModel] | None, loc: Path_) -> list[str]:
    """The keys the model allows at `loc` (field names, or their aliases)."""
    current = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        field = next(
            (f for name, f in current.model_fields.items() if (f.alias or name) == part), None
        )
        current = None if field is None else _model_of(field.annotation)
    if current is None:
        return []
    return [field.alias or name for name, field in current.model_fields.items()]


def _words(item: Any, model: type[pydantic.BaseModel] | None, loc: Path_) -> str:
    """One pydantic error in an administrator's words, with the offending value."""
    kind: str = item["type"]
    value = item.get("input")
    ctx = item.get("ctx") or {}
    message: str = item["msg"]
    if kind == "missing":
        return "missing: this key is required"
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        known = _keys_at(model, loc[:-1])
        hint = did_you_mean(key, known)
        if not hint and known:
            hint = f" (known keys: {', '.join(known)})"
        return f"unknown key {key!r}{hint}"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind == "assertion_error":
        return message.removeprefix("Assertion failed, ")
    if kind in ("dict_type", "model_type", "model_attributes_type", "dataclass_type"):
        return f"must be a mapping (key: value), got {_show(value)}"
    if kind in ("list_type", "tuple_type", "set_type"):
        return f"must be a list, got {_show(value)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number, got {_show(value)}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, got {_show(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {_show(value)}"
    if kind in ("string_type", "str_type"):
        return f"must be text, got {_show(value)}"
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("more than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}, got {_show(value)}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = did_you_mean(str(value), choices) if isinstance(value, str) else ""
        return f"must be one of {', '.join(choices)}; got {_show(value)}{hint}"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return f"{_show(value)} is not valid: {PATTERN_WORDS.get(pattern, 'unexpected format')}"
    if kind == "too_short":
        if ctx.get("min_length") == 1:
            return "must not be empty"
        return f"needs at least {ctx.get('min_length')} items, has {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"has {ctx.get('actual_length')} items, at most {ctx.get('max_length')} allowed"
    if kind == "ip_v4_network":
        return f"{_show(value)} is not an IPv4 address or prefix (e.g. 10.0.0.0/24)"
    if kind == "ip_v4_address":
        return f"{_show(value)} is not an IPv4 address (e.g. 10.0.0.1)"
    if kind == "ip_v4_interface":
        return f"{_show(value)} is not an IPv4 address with prefix (e.g. 10.0.0.1/24)"
    return f"{message}, got {_show(value)}" if value is not None else message


def validation_issues(
    doc: YamlDocument,
    error: pydantic.ValidationError,
    prefix: Path_ = (),
    model: type[pydantic.BaseModel] | None = None,
) -> list[ConfigIssue]:
    """Map pydantic's errors back to the file and line of the offending field, in an
    administrator's words (`_words`); `model` (the document's) for did-you-mean keys."""
    issues = []
    for item in error.errors(include_url=False):
        # pydantic adds the union member or validator name to `loc` for some errors;
        # keep only the parts that exist in the document for line lookup and display.
        loc = (*prefix, *(part for part in item["loc"] if isinstance(part, str | int)))
        issues.append(doc.issue(loc, _words(item, model, loc[len(prefix) :])))
    return issues


def load_model(path: Path, model: type[ModelT]) -> ModelT:
    """Load `path` and validate it as `model`. Raises ConfigError naming file, line, field."""
    doc = load_yaml(path)
    try:
        return model.model_validate(doc.data)
    except pydantic.ValidationError as exc:
        raise ConfigError(validation_issues(doc, exc, model=model)) from exc
