"""Fidelity to the original model, without labels: how often the compressed model gives the same answers.

Classifiers (softmax of the logits of both models on the same images):
- `agreement`: share of images where the compressed top-1 equals the original top-1;
- `confident_agreement`: the same on the images where the original's top probability is >= 0.5
  (`confident_images` of them): the answers a user relies on;
- `top5_overlap`: mean |top-5 original & top-5 compressed| / 5;
- `kl`: mean KL(original || compressed) in nats.
Detectors: boxes with score >= 0.3 of both models are matched greedily (original boxes by decreasing score,
same label, IoU >= 0.5); `box_f1` = 2 matched / (original boxes + compressed boxes), with `box_precision` and
`box_recall` beside it (1.0 when neither model finds a box anywhere).

`load_reference` reads the original: an artifact, or a checkpoint with its builder spec; a missing file,
a checkpoint that does not fit the builder, or another number of classes is refused in one line that names
the file.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import UserError

__all__ = ["CONFIDENT", "SCORE_THRESHOLD", "IOU_THRESHOLD", "ClassificationAgreement", "DetectionAgreement",
           "load_reference", "fidelity", "match_boxes"]

CONFIDENT = 0.5
SCORE_THRESHOLD = 0.3
IOU_THRESHOLD = 0.5


class ClassificationAgreement:
    """Accumulates agreement figures over batches of logits [B, C] of the original and the compressed model."""

    def __init__(self, confident: float = CONFIDENT) -> None:
        self.confident = confident
        self.images = self.agree = self.conf_images = self.conf_agree = 0
        self.top5 = self.kl = 0.0

    def update(self, original: torch.Tensor, compressed: torch.Tensor) -> None:
        if original.shape != compressed.shape:
            raise UserError(f"the original gives outputs of shape {tuple(original.shape)}, the compressed model "
                            f"{tuple(compressed.shape)}: not the same classes")
        lo, lc = original.float().flatten(1), compressed.float().flatten(1)
        log_po, log_pc = F.log_softmax(lo, 1), F.log_softmax(lc, 1)
        po = log_po.exp()
        top_o, top_c = lo.argmax(1), lc.argmax(1)
        same = top_o == top_c
        conf = po.max(1).values >= self.confident
        k = min(5, lo.shape[1])
        t5o, t5c = lo.topk(k, 1).indices, lc.topk(k, 1).indices
        overlap = (t5o[:, :, None] == t5c[:, None, :]).any(2).float().sum(1) / k
        self.images += lo.shape[0]
        self.agree += int(same.sum())
        self.conf_images += int(conf.sum())
        self.conf_agree += int((same & conf).sum())
        self.top5 += float(overlap.sum())
        self.kl += float((po * (log_po - log_pc)).sum(1).clamp_min(0).sum())

    def compute(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {"confident_agreement": self.conf_agree / self.conf_images if self.conf_images else float("nan"),
                "agreement": self.agree / n, "top5_overlap": self.top5 / n, "kl": self.kl / n,
                "confident_images": float(self.conf_images), "images": float(self.images)}


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes a [N, 4] and b [M, 4] (xyxy) -> [N, M]."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-9)


def match_boxes(original: dict[str, torch.Tensor], compressed: dict[str, torch.Tensor],
                score: float = SCORE_THRESHOLD, iou: float = IOU_THRESHOLD) -> tuple[int, int, int]:
    """(matched, original boxes, compressed boxes) of one image: boxes with score >= `score`; each original box,
    by decreasing score, takes the unmatched compressed box of its label with the highest IoU >= `iou`."""
    keep_o, keep_c = original["scores"] >= score, compressed["scores"] >= score
    bo, lo, so = original["boxes"][keep_o].float(), original["labels"][keep_o], original["scores"][keep_o]
    bc, lc = compressed["boxes"][keep_c].float(), compressed["labels"][keep_c]
    if not len(bo) or not len(bc):
        return 0, len(bo), len(bc)
    ious = box_iou(bo, bc)
    ious[lo[:, None] != lc[None, :]] = -1.0
    taken = torch.zeros(len(bc), dtype=torch.bool)
    matched = 0
    for i in torch.argsort(so, descending=True).tolist():
        row = ious[i].masked_fill(taken, -1.0)
        j = int(row.argmax())
        if row[j] >= iou:
            taken[j] = True
            matched += 1
    return matched, len(bo), len(bc)


class DetectionAgreement:
    """Accumulates box matches of the compressed model's detections against the original's."""

    def __init__(self, score: float = SCORE_THRESHOLD, iou: float = IOU_THRESHOLD) -> None:
        self.score, self.iou = score, iou
        self.matched = self.n_original = self.n_compressed = self.images = 0

    def update(self, original: list[dict[str, torch.Tensor]], compressed: list[dict[str, torch.Tensor]]) -> None:
        for o, c in zip(original, compressed):
            m, no, nc = match_boxes({k: v.cpu() for k, v in o.items()}, {k: v.cpu() for k, v in c.items()},
                                    self.score, self.iou)
            self.matched += m
            self.n_original += no
            self.n_compressed += nc
            self.images += 1

    def compute(self) -> dict[str, float]:
        total = self.n_original + self.n_compressed
        return {"box_f1": 2 * self.matched / total if total else 1.0,
                "box_precision": self.matched / self.n_compressed if self.n_compressed else float(self.n_original == 0),
                "box_recall": self.matched / self.n_original if self.n_original else float(self.n_compressed == 0),
                "original_boxes": float(self.n_original), "compressed_boxes": float(self.n_compressed),
                "images": float(self.images)}


@torch.no_grad()
def fidelity(compressed: nn.Module, original: nn.Module, batches: Iterable[Any], task: str,
             original_batches: Iterable[Any] | None = None) -> dict[str, float]:
    """Agreement of `compressed` with `original` over `batches` (the task's batches; labels unused).
    `original_batches`: the same images prepared for the original, when it takes another preprocessing."""
    from compress.tasks import get_task

    runner = get_task(task)
    compressed.eval()
    original.eval()
    device = next(compressed.parameters()).device
    acc: ClassificationAgreement | DetectionAgreement
    acc = ClassificationAgreement() if task == "classification" else DetectionAgreement()
    pairs = zip(batches, original_batches) if original_batches is not None else ((b, b) for b in batches)
    for batch_c, batch_o in pairs:
        xc, xo = runner.inputs(batch_c).to(device), runner.inputs(batch_o).to(device)
        if task == "classification":
            acc.update(original(xo), compressed(xc))
        else:
            acc.update(runner.predict(original, xo), runner.predict(compressed, xc))
    return acc.compute()


def _classes_of(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[str, int, int] | None:
    """(key, classes in the checkpoint, classes of the model) of the last Linear's weight when they differ."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        return None
    key = f"{last}.weight" if last else "weight"
    if key in state and state[key].ndim == 2:
        want = model.get_submodule(last).weight.shape[0]
        if state[key].shape[0] != want:
            return key, int(state[key].shape[0]), int(want)
    return None


def load_reference(against: str | Path, num_classes: int, model_spec: str | None = None,
                   reference_classes: int | None = None) -> tuple[nn.Module, dict[str, Any] | None]:
    """The original model to compare with, and its preprocessing (None: use the compressed model's).

    against: an artifact (.safetensors with a compress manifest), or a checkpoint (a state dict, torch file or
    .safetensors) built with `model_spec` and `reference_classes` (default: `num_classes`, the compressed
    model's). Raises UserError in one line naming `against` when it cannot be the original.
    """
    from compress.format.artifact import ArtifactError, load, read_artifact
    from compress.models import CheckpointError, build_model, read_state_dict

    path = Path(against).expanduser()
    where = f"--against {against}"
    if not path.is_file():
        raise UserError(f"{where}: file not found")
    manifest = None
    if path.suffix == ".safetensors":
        try:
            _, manifest = read_artifact(path)
        except ArtifactError:
            manifest = None  # a plain safetensors state dict: a checkpoint
    if manifest is not None:
        classes = (manifest.get("model") or {}).get("num_classes")
        if classes is not None and int(classes) != int(num_classes):
            raise UserError(f"{where}: the original has {classes} classes, the compressed model {num_classes}; "
                            "compare models with the same classes")
        try:
            model = load(path)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        return model.eval(), manifest.get("preprocessing")
    if model_spec is None:
        raise UserError(f"{where}: a checkpoint needs its builder: pass --model SPEC (e.g. torchvision:mobilenet_v2)")
    try:
        state = read_state_dict(path)
    except CheckpointError as exc:
        raise UserError(f"{where}: {exc}") from None
    classes = reference_classes or num_classes
    try:
        model = build_model(model_spec, num_classes=classes)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    differ = _classes_of(state, model)
    if differ is not None:
        key, have, want = differ
        raise UserError(f"{where}: the checkpoint has {have} classes ({key}), the compressed model {want}; "
                        "compare models with the same classes")
    from compress.models.checkpoint import load_checkpoint

    try:
        load_checkpoint(model, path)
    except CheckpointError as exc:
        raise UserError(f"{where} is not a {model_spec} checkpoint: {exc}") from None
    return model.eval(), None
