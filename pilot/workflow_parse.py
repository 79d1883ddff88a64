"""Text to Python data for workflow files: JSON on a fast path, YAML with line numbers.

The YAML loader builds :class:`LineDict` / :class:`LineList` so that later checks can
name the line of a key or item. Every parse failure becomes one :class:`UserError` line
of the form ``FILE:LINE: message``.
"""

from __future__ import annotations

import json

import yaml

from pilot.errors import UserError

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LineDict(dict):
    """A mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    lines: dict


class LineList(list):
    """A sequence that remembers its own line and the line of each item (1-based)."""

    line: int = 0
    lines: list


def line_of(where, key=None) -> int | None:
    """Line of ``where[key]`` (or of ``where`` itself); None for data without lines."""
    if isinstance(where, LineDict):
        return where.lines.get(key, where.line) if _hashable(key) else where.line
    if isinstance(where, LineList):
        if isinstance(key, int) and 0 <= key < len(where.lines):
            return where.lines[key]
        return where.line
    return None


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


class _LineLoader(_BaseLoader):
    """Safe loader that records lines and rejects duplicate keys."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as err:  # e.g. int('9'*5000), a bad date
            raise yaml.constructor.ConstructorError(
                None, None, f"bad value: {str(err).split(';')[0]}", node.start_mark) from None


def _construct_mapping(loader, node):
    _check_unique_keys(loader, node)
    loader.flatten_mapping(node)  # merge keys (<<) come first; explicit keys override them
    result = LineDict()
    result.line, result.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


def _check_unique_keys(loader, node) -> None:
    """Plain, unique keys among those written in this mapping (not merged ones)."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if not _hashable(key):
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (also at line {seen[key]})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1


def _construct_sequence(loader, node):
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


def read_text(stream, name: str) -> str:
    """The whole stream as text; bytes must be UTF-8."""
    data = stream.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{name}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def parse_yaml(text: str, name: str):
    """YAML text to LineDict/LineList data; UserError ``FILE:LINE: problem`` on bad YAML."""
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as err:
        raise UserError(one_line(f"{name}{_yaml_problem(err)}")) from None
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        raise UserError(one_line(f"{name}:{line}: {err.reason} character {err.character!r}")) from None
    except yaml.YAMLError as err:
        raise UserError(one_line(f"{name}: malformed YAML: {err}")) from None
    except RecursionError:
        raise UserError(f"{name}: nesting too deep") from None


def _yaml_problem(err: yaml.MarkedYAMLError) -> str:
    """``:LINE: context (at line N): problem`` from a PyYAML error."""
    mark, start = err.problem_mark or err.context_mark, err.context_mark
    line = f":{mark.line + 1}" if mark is not None else ""
    context = err.context or ""
    if context and start is not None and mark is not None and start.line != mark.line:
        context += f" (at line {start.line + 1})"
    words = ": ".join(w for w in (context, err.problem) if w) or "malformed YAML"
    return f"{line}: {words}"


def parse_json(text: str, name: str):
    """JSON text to plain data, or None when the text is not JSON (then try YAML)."""
    if text.lstrip()[:1] not in ("{", "["):
        return None
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(f"{name}: nesting too deep") from None
    except ValueError:  # not JSON (maybe YAML flow style); YAML gives the error if any
        return None


def one_line(text: str) -> str:
    """Collapse any line breaks so that an error stays one line."""
    return " ".join(text.splitlines())
