"""Layer groups: contiguous parts of a network with one feature scale and one kind of module.

Group channel pruning (Chu et al. 2022) gives each group its own threshold. The paper's groups for YOLOv4
were set by hand; here they come from a traced model (our reading, not the paper's):

    key = "stride{S}/{family}"

- `S` is the layer's output stride (input side / feature-map side, from one traced forward pass; layers
  on tokens or pooled vectors inherit the stride of the last feature map before them);
- `family` is the module path without its leaf, numeric parts dropped, the first `family_depth` names
  kept, trailing digits stripped: `backbone.stage3.1.cv1.bn` -> `backbone.stage`, `neck.td4.m.0.cv1.bn`
  -> `neck.td`, `head.0.cls.1.bn` -> `head.cls`, timm `layer2.0.bn1` -> `layer`.

A recipe can instead name groups by module-name patterns (`groups: {name: [patterns]}`), each pattern an
fnmatch glob (`backbone.stage3.*`) or a regular expression after `re:`; the first matching group wins and
layers no pattern matches keep their automatic key.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence

from compress.errors import RecipeError


def family(name: str, depth: int = 2) -> str:
    """Module family of a layer path (see the module docstring)."""
    parts = name.split(".")
    parents = [p for p in parts[:-1] if not p.isdigit()][:depth]
    if not parents:
        parents = [parts[-1]]
    return ".".join(p.rstrip("0123456789_") or p for p in parents)


def auto_key(name: str, stride: int | None, depth: int = 2) -> str:
    scale = f"stride{stride}" if stride is not None else "global"
    return f"{scale}/{family(name, depth)}"


def compile_pattern(pattern: str) -> re.Pattern:
    """`re:REGEX` (full match) or an fnmatch glob, as a compiled regular expression."""
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise RecipeError(f"pattern {pattern!r}: not a valid regular expression ({exc})") from None
    return re.compile(fnmatch.translate(pattern))


def matches(name: str, patterns: Iterable[re.Pattern]) -> bool:
    return any(p.fullmatch(name) for p in patterns)


def match_any(name: str, patterns: Sequence[str]) -> bool:
    return matches(name, [compile_pattern(p) for p in patterns])


class GroupAssigner:
    """Maps a layer (name, stride) to its group key: explicit patterns first, else the automatic key."""

    def __init__(self, groups: str | Mapping[str, Sequence[str]] = "auto", family_depth: int = 2) -> None:
        self.depth = family_depth
        self.explicit: list[tuple[str, list[re.Pattern]]] = []
        if isinstance(groups, Mapping):
            for key, patterns in groups.items():
                if isinstance(patterns, str):
                    patterns = [patterns]
                self.explicit.append((key, [compile_pattern(p) for p in patterns]))
        elif groups != "auto":
            raise RecipeError(f"groups: expected 'auto' or a mapping of group name -> patterns, got {groups!r}")

    def __call__(self, name: str, stride: int | None) -> str:
        for key, patterns in self.explicit:
            if matches(name, patterns):
                return key
        return auto_key(name, stride, self.depth)


def ratio_for(group: str, ratios: Mapping[str, float]) -> float | None:
    """The p_g a recipe gives a group: exact key first, then the first glob / `re:` key that matches."""
    if group in ratios:
        return float(ratios[group])
    for key, value in ratios.items():
        if compile_pattern(key).fullmatch(group):
            return float(value)
    return None
