"""Forward hooks that record chosen modules' outputs, removed when the recorder closes."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn


class FeatureRecorder:
    """Records the output of each named module on every forward; use as a context manager or call remove()."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        modules = dict(model.named_modules())
        self.names = list(names)
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing[0]!r} in {type(model).__name__} "
                             f"(layer names come from `compress inspect`)")
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._recorder(n)) for n in self.names]

    def _recorder(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self.features[name] = output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features.clear()

    def __enter__(self) -> FeatureRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
