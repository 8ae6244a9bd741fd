"""Model builders by spec string: `compress:NAME`, `timm:NAME`, `torchvision:NAME`, `file:path.py:function`.

Never downloads weights: timm gets `pretrained=False`, torchvision gets `weights=None, weights_backbone=None`.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from compress.errors import UserError, unknown_choice
from compress.registry import Registry

Builder = Callable[..., nn.Module]

PREFIXES = ("compress", "timm", "torchvision", "file")

class ModelSpecError(UserError):
    """A model spec that cannot be built: bad prefix, unknown name, missing file or function."""


_REGISTRY: Registry[Builder] = Registry("compress model", error=ModelSpecError)


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering `fn(num_classes, **kw) -> nn.Module` as `compress:<name>`; names are unique."""

    return _REGISTRY.register(name)


def registered_models() -> list[str]:
    """Names of the `compress:` builders, sorted."""
    return sorted(_REGISTRY)


def build_model(spec: str, num_classes: int, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """Build the model a spec names with `num_classes` outputs and random init, then load `checkpoint` if given."""
    prefix, sep, name = str(spec).partition(":")
    if sep and not name:
        raise ModelSpecError(f"model spec '{spec}' names no model after '{prefix}:'")
    if not sep:
        raise ModelSpecError(
            f"model spec '{spec}' has no prefix: write one of "
            + ", ".join(f"'{p}:NAME'" for p in PREFIXES[:3]) + " or 'file:path.py:function'"
        )
    if prefix not in PREFIXES:
        raise ModelSpecError(f"model spec '{spec}': " + unknown_choice("prefix", prefix, PREFIXES))
    model = _BUILDERS[prefix](spec, name, num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec '{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        from compress.models.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model


def _refuse_weights(spec: str, kwargs: dict, *names: str) -> None:
    """Drop falsy weight options and refuse truthy ones: builders never download weights (use `checkpoint`)."""
    for name in names:
        if kwargs.pop(name, None):
            raise ModelSpecError(
                f"model spec '{spec}': option {name} is not supported (weights are never downloaded); "
                "pass a local file as checkpoint instead"
            )


def _build_compress(spec: str, name: str, num_classes: int, **kwargs) -> nn.Module:
    """Our own builders, registered with `register_model`."""
    if name not in _REGISTRY:
        raise ModelSpecError(f"model spec '{spec}': " + unknown_choice("compress model", name, _REGISTRY))
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


def _build_timm(spec: str, name: str, num_classes: int, **kwargs) -> nn.Module:
    """timm architectures with random weights."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelSpecError(f"model spec '{spec}': unknown timm model '{name}'{hint} (see timm.list_models())")
    _refuse_weights(spec, kwargs, "pretrained")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _build_torchvision(spec: str, name: str, num_classes: int, **kwargs) -> nn.Module:
    """torchvision classifiers and detectors with random weights (detectors count background in num_classes)."""
    import torchvision

    known = torchvision.models.list_models()
    if name.lower() not in known:
        raise ModelSpecError(f"model spec '{spec}': " + unknown_choice("torchvision model", name, known))
    _refuse_weights(spec, kwargs, "weights", "weights_backbone")
    builder = torchvision.models.get_model_builder(name.lower())
    params = inspect.signature(builder).parameters
    extra = {"weights_backbone": None} if "weights_backbone" in params else {}
    return builder(weights=None, num_classes=num_classes, **extra, **kwargs)


def _build_file(spec: str, name: str, num_classes: int, **kwargs) -> nn.Module:
    """A function in a user's Python file, called as `function(num_classes=..., **kwargs)`."""
    path_str, sep, func_name = name.rpartition(":")
    if not sep or not path_str or not func_name:
        raise ModelSpecError(f"model spec '{spec}': write 'file:path/to/model.py:function'")
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"model spec '{spec}': file '{path}' does not exist")
    module_name = "_compress_user_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelSpecError(f"model spec '{spec}': cannot import '{path}' as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # lets dataclasses / pickling inside the file find their module
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(module_name, None)
        raise
    fn = getattr(module, func_name, None)
    if not callable(fn):
        functions = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise ModelSpecError(f"model spec '{spec}': " + unknown_choice(f"function in '{path}'", func_name, functions))
    return fn(num_classes=num_classes, **kwargs)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "compress": _build_compress,
    "timm": _build_timm,
    "torchvision": _build_torchvision,
    "file": _build_file,
}
