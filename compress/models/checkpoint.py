"""Load weights into a built model: `.safetensors` or a torch file read with `weights_only=True`, strictly."""
from __future__ import annotations

from collections import OrderedDict

from pathlib import Path

import torch
from torch import nn

from compress.errors import UserError

_MAX_LISTED = 5


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not match the model's parameters and buffers."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (raw, or under a 'state_dict' / 'model' key) from a safetensors or torch file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # corrupt file, pickle with code objects, ...
        raise CheckpointError(f"checkpoint '{path}' cannot be read: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint '{path}' is not a state dict "
            "(expected name -> tensor, optionally under a 'state_dict' or 'model' key)"
        )
    return obj


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load `path` into `model` strictly; on any key or shape mismatch raise CheckpointError naming the keys."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    mis_typed = [
        f"{k} (checkpoint {str(state[k].dtype).removeprefix('torch.')} vs model {str(v.dtype).removeprefix('torch.')})"
        for k, v in expected.items()
        if k in state and state[k].dtype != v.dtype
        and not (state[k].is_floating_point() and v.is_floating_point())  # fp16/bf16/fp64 weights convert exactly enough
    ]
    not_finite = [k for k, v in state.items() if v.is_floating_point() and v.numel() and not bool(v.isfinite().all())]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", mis_shaped),
                        ("of the wrong dtype", mis_typed), ("holding NaN or inf", not_finite)):
        if keys:
            more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:_MAX_LISTED])}{more}")
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the model ({type(model).__name__}): " + "; ".join(problems)
        )
    load_state(model, state)
    return model


def load_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """`model.load_state_dict(state)`, giving a state without per-module versions (safetensors files keep none)
    the versions of the model's own code: modules that read theirs when loading (torchvision's MNASNet) fail
    without them."""
    if getattr(state, "_metadata", None) is None:
        state = OrderedDict(state)
        state._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=strict)
