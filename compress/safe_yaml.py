"""YAML for files a user (or anyone) hands us: safe types only, duplicate keys refused, aliases bounded.

`yaml.safe_load` accepts `seed: 0` twice (the last wins, silently) and expands aliases without limit: a
"billion laughs" document of a few hundred bytes becomes 10^9 nodes once something walks or dumps it.
`load` refuses both with a `YAMLInputError` (a UserError) whose message names the file and the line.
"""
from __future__ import annotations

from typing import Any

import yaml

from compress.errors import UserError

MAX_ALIASES = 100  # alias uses in one document (recipes use none)
MAX_NODES = 100_000  # nodes of the document with every alias expanded


class YAMLInputError(UserError):
    """A YAML document we refuse: invalid, duplicate keys, or aliases that expand too far."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and bounds alias expansion."""

    def compose_document(self) -> Any:  # type: ignore[override]
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # type: ignore[override]
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node | None) -> None:
    """Count the nodes of the fully expanded document (memoised per node, so the count itself is cheap)."""
    if root is None:
        return
    sizes: dict[int, int] = {}
    aliases = 0
    seen_ids: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        nonlocal aliases
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > 200:
            raise yaml.composer.ComposerError(None, None, "document nested more than 200 levels", node.start_mark)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            if id(child) in seen_ids:  # the same node object again: an alias use
                aliases += 1
                if aliases > MAX_ALIASES:
                    raise yaml.composer.ComposerError(
                        None, None, f"more than {MAX_ALIASES} alias uses (*name); write the values out",
                        child.start_mark)
            seen_ids.add(id(child))
            total += size(child, depth + 1)
            if total > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand the document past {MAX_NODES:,} nodes", child.start_mark)
        sizes[key] = total
        return total

    seen_ids.add(id(root))
    size(root, 0)


def load(text: str | bytes, where: str) -> Any:
    """Parse one YAML document strictly; every problem is one YAMLInputError line naming `where`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise YAMLInputError(f"{where}: not a UTF-8 text file (byte {exc.start} is 0x{text[exc.start]:02x}); "
                                 "a recipe is a YAML text file") from None
    if "\x00" in text:
        raise YAMLInputError(f"{where}: holds NUL bytes; a recipe is a YAML text file")
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise YAMLInputError(f"{where}: not valid YAML ({_describe(exc)})") from None
    except RecursionError:
        raise YAMLInputError(f"{where}: YAML nested too deeply") from None


def _describe(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "error"
        mark = exc.problem_mark or exc.context_mark
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
    return " ".join(str(exc).split())[:200]
