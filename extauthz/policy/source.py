"""Read YAML documents while keeping the line of every mapping key and list item.

Validation messages must name `FILE:LINE`, so documents are built from PyYAML's node
tree instead of `safe_load`: mappings become `LocatedMap` and lists `LocatedList`,
both carrying 1-based line numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml


class LocatedMap(dict):  # type: ignore[type-arg]
    """A YAML mapping with the line of the mapping and of each key."""

    line: int
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LocatedList(list):  # type: ignore[type-arg]
    """A YAML sequence with the line of the sequence and of each item."""

    line: int
    item_lines: list[int]

    def line_of(self, index: int) -> int:
        if 0 <= index < len(self.item_lines):
            return self.item_lines[index]
        return self.line


class YamlSyntaxError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Document:
    """One YAML document of a file; `index` counts documents from 0."""

    index: int
    line: int
    value: Any


# libyaml's parser is about ten times faster than the pure-Python one; PyYAML wheels ship it.
_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Constructor(_BaseLoader):  # type: ignore[misc, valid-type]
    """The safe loader, used to compose nodes and to turn scalar nodes into Python values."""


def _build(node: yaml.Node, loader: Any) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        result = LocatedMap()
        result.line = line
        result.key_lines = {}
        for key_node, value_node in node.value:
            key = _build(key_node, loader)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise YamlSyntaxError(key_line, f"mapping key {key!r} is not a string")
            if key in result:
                raise YamlSyntaxError(key_line, f"duplicate key {key!r}: each key may appear once")
            result[key] = _build(value_node, loader)
            result.key_lines[key] = key_line
        return result
    if isinstance(node, yaml.SequenceNode):
        items = LocatedList()
        items.line = line
        items.item_lines = []
        for item in node.value:
            items.append(_build(item, loader))
            items.item_lines.append(item.start_mark.line + 1)
        return items
    return loader.construct_object(node, deep=True)


def _describe_syntax_error(exc: yaml.MarkedYAMLError, text: str) -> tuple[int, str]:
    """Return the line and message of a YAML syntax error, with its column and context."""
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    message = f"invalid YAML: {exc.problem or exc.context}"
    if mark is not None:
        message += f" (column {mark.column + 1})"
    if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
        message += f", {exc.context} at line {exc.context_mark.line + 1}"
    lines = text.splitlines()
    if mark is not None and mark.line < len(lines) and "\t" in lines[mark.line][: mark.column + 1]:
        message += "; YAML does not allow tabs for indentation, use spaces"
    return line, message


def read_documents(text: str) -> list[Document]:
    """Parse every document of a YAML stream; empty documents are dropped.

    Raises YamlSyntaxError with the line of the first syntax error.
    """
    loader = _Constructor(text)
    documents: list[Document] = []
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                value = _build(node, loader)
                if value is not None:
                    documents.append(Document(index, node.start_mark.line + 1, value))
            index += 1
    except yaml.MarkedYAMLError as exc:
        raise YamlSyntaxError(*_describe_syntax_error(exc, text)) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(1, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    return documents
