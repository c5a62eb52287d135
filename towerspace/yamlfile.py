"""YAML documents read with safe_load within bounds (size, nesting, aliases): files and --set
values, refused in one line that says where."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from towerspace.errors import ConfigError
from towerspace.schema import show

# what a YAML document (file or --set value) may be: small, shallow, and not an alias bomb
YAML_MAX_BYTES = 2**20
YAML_MAX_DEPTH = 32  # nested mappings and lists
YAML_MAX_NODES = 10_000  # values once aliases are expanded (a document that uses aliases)


class _Refused(Exception):
    """A YAML document outside the bounds of _BoundedLoader: what, and where it starts."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """safe_load's loader, refusing deep nesting, alias bombs and recursive aliases while the
    node graph is composed, before any Python object is built from it."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open: dict[str, yaml.Node | None] = {}  # anchors whose node is being composed
        self._aliased = False

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliased = True
            if event.anchor in self._open:  # `&a [*a]`: the node would contain itself
                raise _Refused(f"recursive alias *{event.anchor} inside &{event.anchor}",
                               event.start_mark)  # fmt: skip
            return super().compose_node(parent, index)
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        if self._depth == YAML_MAX_DEPTH:
            raise _Refused(f"nesting deeper than {YAML_MAX_DEPTH} levels", event.start_mark)
        self._depth += 1
        anchor = event.anchor
        if anchor is not None:
            self._open[anchor] = None
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.pop(anchor, None)

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        if self._aliased:  # without aliases the composed graph is the document as written
            _expanded_size(node, 1, {})
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than int() reads (sys.get_int_max_str_digits)
            digits = sys.get_int_max_str_digits()
            raise _Refused(f"an integer of more than {digits} digits", node.start_mark) from None


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _expanded_size(node: yaml.Node, depth: int, seen: dict[int, tuple[int, int]]) -> int:
    """How many nodes `node` stands for once aliases are expanded; refuses more than
    YAML_MAX_NODES, or nesting past YAML_MAX_DEPTH through aliases. seen: id → (size, height),
    so each shared node is counted once however often it is referred to."""
    if not isinstance(node, yaml.CollectionNode):
        return 1
    if id(node) not in seen:
        if depth > YAML_MAX_DEPTH:
            raise _Refused(f"nesting deeper than {YAML_MAX_DEPTH} levels once aliases are "
                           f"expanded", node.start_mark)  # fmt: skip
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            part for pair in node.value for part in pair)  # fmt: skip
        size, height = 1, 1
        for child in children:
            size += _expanded_size(child, depth + 1, seen)
            if isinstance(child, yaml.CollectionNode):
                height = max(height, 1 + seen[id(child)][1])
        seen[id(node)] = (size, height)
    size, height = seen[id(node)]
    if depth + height - 1 > YAML_MAX_DEPTH:
        raise _Refused(f"nesting deeper than {YAML_MAX_DEPTH} levels once aliases are "
                       f"expanded", node.start_mark)  # fmt: skip
    if size > YAML_MAX_NODES:
        raise _Refused(f"aliases expand to more than {YAML_MAX_NODES:,} values",
                       node.start_mark)  # fmt: skip
    return size


def load_yaml(text: str | bytes, where: str, *, lines: bool = True) -> Any:
    """yaml.safe_load within bounds: a refused document is a ConfigError naming `where`; bad
    YAML raises yaml.YAMLError as safe_load does. lines: say where in the text it starts."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > YAML_MAX_BYTES:
        raise ConfigError(f"{where}: not accepted: {size:,} bytes is more than the limit of "
                          f"1 MiB ({YAML_MAX_BYTES:,} bytes)")  # fmt: skip
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as err:
        line = f" (line {err.mark.line + 1})" if lines and err.mark else ""
        raise ConfigError(f"{where}: not accepted: {err.problem}{line}") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> Any:
    """A YAML file's document, refused in one line when missing, too large or not YAML."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    size = path.stat().st_size
    if size > YAML_MAX_BYTES:  # before reading it
        raise ConfigError(f"{path}: not accepted: {size:,} bytes is more than the limit of "
                          f"1 MiB ({YAML_MAX_BYTES:,} bytes)")  # fmt: skip
    with path.open("rb") as file:
        text = file.read(YAML_MAX_BYTES + 1)  # a file that grew since is refused by load_yaml
    try:
        return load_yaml(text, str(path))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join((err.problem or "unreadable").split())
        if "could not determine a constructor" in problem:
            problem = "tags like !!python/... are not allowed (files are read with safe_load)"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def _kind_of(value: Any) -> str:
    """What a top-level document is, in words."""
    if value is None:
        return "an empty file"
    if isinstance(value, list):
        return "a list"
    return show(value)


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping of fields."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top, got {_kind_of(raw)}")
    return raw
