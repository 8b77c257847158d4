"""Safe YAML loading that remembers where every key and value came from.

Specs are data, never code: the YAML is only *composed* (with a restricted :class:`yaml.SafeLoader`),
never constructed. Plain scalars are resolved by the YAML 1.2 core schema (``1e-3`` is a number,
``yes``/``on`` and dates stay strings), only the core tags are accepted, anchors and aliases are refused
(no billion laughs), and every value keeps its file position so that errors can point at it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Sequence

import yaml

from opdsl.errors import Location, Problem, SpecError

__all__ = ["MAX_SPEC_BYTES", "MAX_NESTING", "LocatedDocument", "load_yaml_text", "load_yaml_file"]

#: Larger spec files are refused before parsing.
MAX_SPEC_BYTES: int = 1_000_000
#: Deeper nesting of mappings/lists is refused (it only ever comes from a broken or hostile file).
MAX_NESTING: int = 64

_Path = tuple[Any, ...]
_TAG = "tag:yaml.org,2002:"
_STR, _SEQ, _MAP = _TAG + "str", _TAG + "seq", _TAG + "map"
_DIGITS = r"[0-9](?:_?[0-9])*"


def _to_float(text: str) -> float:
    lowered = text.lower()
    if lowered.lstrip("+-") in (".inf", ".nan"):
        return float(lowered.replace(".", ""))
    return float(text)


#: Scalar tag -> (what a value of that tag looks like, its conversion). Plain scalars take the first
#: tag whose pattern matches, so the order matters (int before float, str last).
_SCALARS: dict[str, tuple[re.Pattern[str], Callable[[str], Any]]] = {
    _TAG + "null": (re.compile(r"~|null|Null|NULL|"), lambda text: None),
    _TAG + "bool": (re.compile(r"true|True|TRUE|false|False|FALSE"), lambda text: text.lower() == "true"),
    _TAG + "int": (re.compile(rf"[-+]?{_DIGITS}"), int),
    _TAG + "float": (
        re.compile(
            rf"[-+]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
        ),
        _to_float,
    ),
    _STR: (re.compile(r".*", re.DOTALL), str),
}


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


def _location(file: str, mark: yaml.Mark) -> Location:
    return Location(file, mark.line + 1, mark.column + 1)


#: What YAML (and PyYAML's marks) count as a line break.
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def _offset_location(file: str, before: str) -> Location:
    """The location just after ``before``, the text of the file up to some point."""
    lines = _LINE_BREAK.split(before)
    return Location(file, len(lines), len(lines[-1]) + 1)


class _Refusal(Exception):
    """Something the YAML may say but a spec may not (raised while composing)."""

    def __init__(self, mark: yaml.Mark, message: str):
        super().__init__(message)
        self.mark = mark
        self.message = message


class _SpecLoader(yaml.SafeLoader):
    """A SafeLoader that resolves plain scalars by the core schema and refuses anchors, aliases and deep nesting."""

    _depth = 0

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        if kind is yaml.ScalarNode and implicit[0]:
            return next(tag for tag, (pattern, _) in _SCALARS.items() if pattern.fullmatch(value))
        return super().resolve(kind, value, implicit)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if event.anchor is not None:
            sigil, what = ("*", "alias") if isinstance(event, yaml.AliasEvent) else ("&", "anchor")
            raise _Refusal(
                event.start_mark,
                f"{what} '{sigil}{event.anchor}' is not allowed: specs refuse anchors and aliases; write the value out",
            )
        if self._depth >= MAX_NESTING:
            raise _Refusal(event.start_mark, f"nested more than {MAX_NESTING} levels deep")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Builder:
    """Turns a composed node tree into plain Python data, recording positions and collecting problems."""

    def __init__(self, file: str):
        self.file = file
        self.values: dict[_Path, Location] = {}
        self.keys: dict[_Path, Location] = {}
        self.strings: dict[_Path, yaml.ScalarNode] = {}
        self.problems: list[Problem] = []

    def problem(self, node: yaml.Node, message: str) -> None:
        self.problems.append(Problem(_location(self.file, node.start_mark), message))

    def tag_allowed(self, node: yaml.Node) -> bool:
        """Whether the node's tag is a core tag fitting its kind; records the problem if not."""
        if isinstance(node, yaml.MappingNode):
            allowed, kind = (_MAP,), "a mapping"
        elif isinstance(node, yaml.SequenceNode):
            allowed, kind = (_SEQ,), "a list"
        else:
            allowed, kind = tuple(_SCALARS), "a scalar"
        if node.tag in allowed:
            return True
        if node.tag in (*_SCALARS, _SEQ, _MAP):
            self.problem(node, f"tag '{_short_tag(node.tag)}' cannot be used on {kind}")
        else:
            self.problem(node, f"tag '{_short_tag(node.tag)}' is not allowed: specs are data, never code")
        return False

    def value(self, node: yaml.Node, path: _Path) -> Any:
        self.values[path] = _location(self.file, node.start_mark)
        if not self.tag_allowed(node):
            return None
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, path + (index,)) for index, item in enumerate(node.value)]
        if node.tag == _STR:
            self.strings[path] = node
        return self.scalar(node)

    def scalar(self, node: yaml.ScalarNode) -> Any:
        pattern, convert = _SCALARS[node.tag]
        if pattern.fullmatch(node.value):
            try:
                return convert(node.value)
            except ValueError:  # an int with more digits than Python converts (4300 by default)
                self.problem(node, f"the number {node.value[:12]}... has {len(node.value)} digits; that is too long")
                return None
        self.problem(node, f"{node.value[:40]!r} is not a valid {_short_tag(node.tag)}")
        return None

    def mapping(self, node: yaml.MappingNode, path: _Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node)
            if key is None:
                continue
            child = path + (key,)
            if key in out:
                self.problem(key_node, f"duplicate key {key!r} (first at line {self.keys[child].line})")
                continue
            self.keys[child] = _location(self.file, key_node.start_mark)
            out[key] = self.value(value_node, child)
        return out

    def key(self, node: yaml.Node) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.value == "<<" and node.style is None:
            self.problem(node, "merge keys (<<) are not supported: write the fields out")
            return None
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            return node.value
        if self.tag_allowed(node):
            if isinstance(node, yaml.ScalarNode):
                got = f"the {_short_tag(node.tag)[2:]} {node.value}"
            else:
                got = "a mapping" if isinstance(node, yaml.MappingNode) else "a list"
            self.problem(node, f"keys must be strings, got {got}; quote the key to use it as text")
        return None


class LocatedDocument:
    """A loaded spec document: plain Python ``data`` plus the file position of every key and value."""

    data: Any
    file: str

    def __init__(
        self,
        data: Any,
        file: str,
        values: dict[_Path, Location],
        keys: dict[_Path, Location],
        text: str = "",
        strings: dict[_Path, yaml.ScalarNode] | None = None,
    ):
        self.data = data
        self.file = file
        self._values = values
        self._keys = keys
        self._text = text
        self._strings = strings or {}

    def where(self, path: Sequence[str | int]) -> Location:
        """Location of the value at ``path`` (e.g. ``("nodes", "m", "beta")`` or ``("groups", 0, "match")``).

        Falls back to the nearest known ancestor; ``()`` is the start of the document's content.
        """
        known = tuple(path)
        while known and known not in self._values:
            known = known[:-1]
        return self._values.get(known, Location(self.file))

    def where_in(self, path: Sequence[str | int], offset: int) -> Location | None:
        """Location of character ``offset`` (0-based) of the string value at ``path``, through quotes and
        the line folding of multi-line strings; None where the value's text cannot be followed in the file
        (an escape sequence before ``offset``)."""
        node = self._strings.get(tuple(path))
        if node is None or not 0 <= offset <= len(node.value):
            return None
        position = _source_index(self._text, node, offset)
        return None if position is None else _offset_location(self.file, self._text[:position])

    def key_where(self, path: Sequence[str | int]) -> Location:
        """Location of the *key* of the mapping entry at ``path``; falls back to :meth:`where`."""
        return self._keys.get(tuple(path)) or self.where(path)


def _source_index(text: str, node: yaml.ScalarNode, offset: int) -> int | None:
    """Index in ``text`` of character ``offset`` of the string ``node`` holds.

    YAML turns line breaks and indentation inside a string into single spaces (or keeps them, in a
    ``|`` block), so the value and its source agree on everything but whitespace: the n-th non-space
    character of the value is the n-th of the source, after its opening quote or block header. An
    offset at a space or at the end goes just after the non-space character before it. None where the
    two disagree before that point (an escape sequence).
    """
    source = text[node.start_mark.index : node.end_mark.index]
    if node.style in ("|", ">"):
        header_end = _LINE_BREAK.search(source)
        if header_end is None:
            return None
        start = header_end.end()
    else:
        start = 1 if node.style in ("'", '"') else 0
    value = node.value
    visible = [c for c in value if not c.isspace()]
    wanted = sum(not c.isspace() for c in value[:offset])  # non-space characters before the offset
    after_previous = wanted > 0 and (offset == len(value) or value[offset].isspace())
    seen = 0
    for index in range(start, len(source)):
        char = source[index]
        if char.isspace():
            continue
        if seen >= len(visible) or char != visible[seen]:
            return None
        seen += 1
        if seen == wanted + (0 if after_previous else 1):
            return node.start_mark.index + index + (1 if after_previous else 0)
    return None


def _too_big(file: str, size: int) -> SpecError:
    return SpecError([Problem(Location(file), f"spec is {size:,} bytes; the limit is {MAX_SPEC_BYTES:,} bytes")])


def _yaml_problem(file: str, err: yaml.MarkedYAMLError) -> Problem:
    mark = err.problem_mark or err.context_mark
    location = _location(file, mark) if mark else Location(file)
    if err.context == "expected a single document in the stream":
        return Problem(location, "a spec file holds one YAML document, but a second one starts here")
    message = "invalid YAML: " + " ".join((err.problem or err.context or "syntax error").split())
    if err.problem and err.context and err.context_mark:
        message += f" ({' '.join(err.context.split())} at line {err.context_mark.line + 1})"
    return Problem(location, message)


def load_yaml_text(text: str, file: str = "<string>") -> LocatedDocument:
    """Load a spec document from a string; ``file`` is the name used in error locations."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise _too_big(file, size)
    try:
        root = yaml.compose(text, Loader=_SpecLoader)
    except _Refusal as err:
        raise SpecError([Problem(_location(file, err.mark), err.message)]) from None
    except yaml.MarkedYAMLError as err:
        raise SpecError([_yaml_problem(file, err)]) from None
    except yaml.reader.ReaderError as err:
        where = _offset_location(file, text[: err.position])
        raise SpecError([Problem(where, f"character #x{err.character:04x} is not allowed in YAML")]) from None
    builder = _Builder(file)
    data = None if root is None else builder.value(root, ())
    if builder.problems:
        raise SpecError(builder.problems)
    if data is None:
        raise SpecError([Problem(Location(file), "empty spec")])
    return LocatedDocument(data, file, builder.values, builder.keys, text, builder.strings)


def load_yaml_file(path: str | os.PathLike) -> LocatedDocument:
    """Load a spec document from a UTF-8 file of at most :data:`MAX_SPEC_BYTES` bytes."""
    file = str(os.fspath(path))
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
            if len(raw) > MAX_SPEC_BYTES:
                raise _too_big(file, max(len(raw), os.fstat(handle.fileno()).st_size))
    except FileNotFoundError:
        raise SpecError([Problem(Location(file), "no such file")]) from None
    except OSError as err:
        raise SpecError([Problem(Location(file), f"cannot read the file: {err.strerror or err}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = _offset_location(file, raw[: err.start].decode("utf-8"))
        raise SpecError([Problem(where, f"not valid UTF-8 (byte 0x{raw[err.start]:02x}); save the spec as UTF-8")]) from None
    return load_yaml_text(text, file)
