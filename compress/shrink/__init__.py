"""One-command shrink of a checkpoint: prune, label-free recovery, quantize, export (`compress shrink`).

    import compress
    compress.shrink("model.pt", "timm:resnet18", "r18.safetensors", num_classes=10, bits=3, calib="digits")
    compress.shrink(ShrinkConfig(model="timm:resnet18", checkpoint="model.pt", num_classes=10), out="r18.safetensors")

The package itself is callable (`compress.shrink(...)` is `compress.shrink.shrink(...)`), so the name means one
thing whether or not the package has been imported yet.
"""
import sys
import types
from typing import Any

from compress.shrink.config import ShrinkConfig
from compress.shrink.preprocess import Preprocessing
from compress.shrink.run import run_shrink, shrink

__all__ = ["Preprocessing", "ShrinkConfig", "run_shrink", "shrink"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return shrink(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
