"""The model protocol helpers every package shares: which forward a model takes, and nested tensors.

- torchvision detectors take a list of images and return boxes after NMS; `raw_forward` runs their backbone and
  head (two-stage: RPN head and ROI heads on fixed boxes) on a batch tensor (raw maps), so tracing, pruning,
  quantization and recovery see plain tensors;
- model outputs and batches are nested tuples / lists / dicts of tensors: `flat_tensors`, `float_outputs`,
  `to_device`, `map_tensors` walk them.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from compress.errors import PruneError

__all__ = ["is_torchvision_detector", "is_detector", "detector_stages", "proposal_grid", "eval_forward_with_hooks", "eval_raw_forward_batches", "raw_forward", "RawForward", "raw_outputs", "example_batch",
           "as_batch", "flat_tensors", "float_outputs", "to_device", "map_tensors", "tensors_in"]


def is_torchvision_detector(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models.detection")


UNSUPPORTED_DETECTOR = ("a torchvision detector needs backbone + head (one-stage) or backbone + rpn + roi_heads "
                        "(two-stage) for the raw tensor protocol")


def detector_stages(model: nn.Module) -> int | None:
    """1 for a torchvision detector with backbone + head, 2 with backbone + rpn + roi_heads, None otherwise."""
    if not hasattr(model, "backbone"):
        return None
    if hasattr(model, "rpn") and hasattr(model, "roi_heads"):
        return 2
    return 1 if hasattr(model, "head") else None


def raw_forward(model: nn.Module, x: torch.Tensor) -> Any:
    """Forward `x [B, 3, H, W]` through the layers that carry weights, returning tensors (no post-processing).

    torchvision detectors take a list of images, resize them and return boxes after NMS, which hides the
    layers from a trace; here they run backbone + head on the batch directly (their raw maps). A detector whose
    transform resizes to a fixed size (SSD, SSDlite: `fixed_size`) gets the batch resized to it, as its own forward
    would: SSD300's last extra layers cannot run on a smaller map. Two-stage detectors (RPN + ROI heads) run the
    RPN head and their ROI heads on `proposal_grid` boxes: fixed regions instead of the RPN's data-dependent
    picks, so that any two models (student and teacher, float and quantized) see the same regions.
    """
    if is_torchvision_detector(model):
        stages = detector_stages(model)
        if stages == 2:
            return _two_stage_raw(model, x)
        if stages is None:
            raise PruneError(f"{type(model).__name__}: {UNSUPPORTED_DETECTOR}")
        fixed = getattr(getattr(model, "transform", None), "fixed_size", None)
        if fixed and tuple(x.shape[-2:]) != tuple(fixed):  # SSD: its layers need the size its transform gives
            x = torch.nn.functional.interpolate(x, size=tuple(fixed), mode="bilinear", align_corners=False)
        feats = model.backbone(x)
        feats = list(feats.values()) if isinstance(feats, dict) else [feats]
        return model.head(feats)
    return model(x)


def proposal_grid(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Fixed boxes [K, 4] (x1, y1, x2, y2) over a height x width image: squares and 2:1 / 1:2 boxes of 1/4, 1/2
    and 3/4 of the short side, centred on a 4 x 4 grid, clipped to the image (K = 144)."""
    side = min(height, width)
    centres = [(height * (i + 0.5) / 4, width * (j + 0.5) / 4) for i in range(4) for j in range(4)]
    boxes = []
    for frac in (0.25, 0.5, 0.75):
        for ratio in (1.0, 2.0, 0.5):
            bh, bw = side * frac * ratio ** 0.5, side * frac / ratio ** 0.5
            for cy, cx in centres:
                boxes.append((max(cx - bw / 2, 0.0), max(cy - bh / 2, 0.0), min(cx + bw / 2, width), min(cy + bh / 2, height)))
    return torch.tensor(boxes, dtype=torch.float32, device=device)


def _two_stage_raw(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Faster / Mask / Keypoint R-CNN: backbone, RPN head, and each ROI head on `proposal_grid` boxes."""
    feats = model.backbone(x)
    objectness, rpn_deltas = model.rpn.head(list(feats.values()))
    shapes = [tuple(x.shape[-2:])] * x.shape[0]
    boxes = [proposal_grid(*x.shape[-2:], device=x.device).to(x.dtype)] * x.shape[0]
    heads = model.roi_heads

    def roi_head(kind: str) -> Any:
        pool = getattr(heads, f"{kind}_roi_pool", None)
        if pool is None:
            return None
        return getattr(heads, f"{kind}_predictor")(getattr(heads, f"{kind}_head")(pool(feats, boxes, shapes)))

    class_logits, box_regression = roi_head("box")
    out = {"objectness": objectness, "rpn_deltas": rpn_deltas, "class_logits": class_logits,
           "box_regression": box_regression}
    for kind in ("mask", "keypoint"):
        logits = roi_head(kind)
        if logits is not None:
            out[f"{kind}_logits"] = logits
    return out


class RawForward(nn.Module):
    """`raw_forward` as a module, for op counters that call `model(x)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return raw_forward(self.model, x)


def example_batch(model: nn.Module, image_size: int, batch: int = 2) -> torch.Tensor:
    """Random images `[batch, 3, S, S]` on the model's device (batch 2: channel constancy is measurable)."""
    device = next(model.parameters()).device
    return torch.rand(batch, 3, image_size, image_size, device=device)


def as_batch(example_input: Any) -> torch.Tensor:
    """Accept a batch tensor, one image `[3, H, W]` or a list of images (torchvision's protocol)."""
    if isinstance(example_input, (list, tuple)):
        example_input = torch.stack(list(example_input))
    if not isinstance(example_input, torch.Tensor):
        raise PruneError(f"example input must be an image tensor or a list of them, got {type(example_input).__name__}")
    return example_input[None] if example_input.ndim == 3 else example_input


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor inside nested lists / tuples / dicts, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_tensors(v)]
    return []


@contextlib.contextmanager
def _eval_with_hooks(model: nn.Module, handles: list[Any]) -> Iterator[None]:
    """Eval mode inside; afterwards the mode is restored and the hooks `handles` removed, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def eval_forward_with_hooks(model: nn.Module, x: Any, handles: list[Any]) -> Any:
    """One `model(x)` in eval mode, for the forward hooks `handles` to observe; the mode is restored and the hooks
    removed whatever happens. Returns the output."""
    with _eval_with_hooks(model, handles):
        return model(x)


@torch.no_grad()
def eval_raw_forward_batches(model: nn.Module, hooks: dict[nn.Module, Callable], batches: Any) -> None:
    """`raw_forward` of every batch in eval mode, with the forward hooks {module: hook(module, inputs, output)}
    registered for the pass only (calibration statistics)."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    with _eval_with_hooks(model, handles):
        for batch in batches:
            raw_forward(model, batch)


def is_detector(model: nn.Module) -> bool:
    """A detector of ours (tensor protocol: `detection_loss` + `postprocess`) or of torchvision."""
    inner = getattr(model, "module", model)
    return (hasattr(inner, "detection_loss") and hasattr(inner, "postprocess")) or is_torchvision_detector(model)


def _raw_detector_forward(self: nn.Module, images: Any) -> Any:
    """A torchvision detector's transform (normalise + resize) then backbone + head: raw tensors out."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    image_list, _ = self.transform(images)
    return raw_forward(self, image_list.tensors)


@contextlib.contextmanager
def raw_outputs(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, a torchvision detector returns its raw head outputs for a batch tensor (fixed
    shapes, differentiable) instead of post-processed boxes; other models are left as they are. The forward
    is bound to the model, so a deepcopy taken inside the block (quantize's float copy) runs itself."""
    if not is_torchvision_detector(model) or not hasattr(model, "transform") or "forward" in vars(model):
        yield model  # not a torchvision detector, or already inside a raw_outputs block (nested use is a no-op)
        return
    model.forward = types.MethodType(_raw_detector_forward, model)
    try:
        yield model
    finally:
        vars(model).pop("forward", None)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (tensor, tuple, list or dict of them) to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch





def float_outputs(output: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensor, list/tuple/dict of them, nested), flattened in order."""
    if torch.is_tensor(output):
        return [output] if output.is_floating_point() else []
    if isinstance(output, (list, tuple)):
        return [t for o in output for t in float_outputs(o)]
    if isinstance(output, dict):
        return [t for k in sorted(output) for t in float_outputs(output[k])]
    return []


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """obj with fn applied to its tensors (tensors, tuples, lists, dicts of them, None, numbers, strings)."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(type(obj).__name__)


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors `map_tensors` would visit, in order ([] when the object holds something else)."""
    found: list[torch.Tensor] = []
    try:
        map_tensors(obj, found.append)
    except TypeError:
        pass
    return found
