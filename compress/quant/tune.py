"""End-to-end codebook tuning: once every layer is quantized, the mapping stays fixed and the few continuous
numbers left (every layer's codebook entries, and the per-channel scales and shifts of norms and biases) are
trained together to match the float model's outputs on the calibration inputs.

Each layer's own fit (jlcm) minimises its output error alone, so errors that add up across layers are never
seen; a whole-model objective sees them (the idea of BRECQ's block reconstruction and AQLM's global codebook
fine-tuning). What is trained is tiny (G x 2^b numbers a layer, plus the per-channel vectors: about 25 k on a
MobileNetV2 against its 3.4 M weights), so a few hundred calibration images do not overfit it the way they
would a weight-level fine-tune. The loss is that of the mixed allocation's sensitivity: KL(float || quantized)
of 2-D outputs (classifier logits), else the relative squared error of every floating output. Codebooks keep
their stored precision (float16) when written back, and a tuned model that lost to the untuned one on the
calibration loss is rolled back.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from compress.format.layers import QuantizedWeight, attach_quantized, detach_quantized, quantized_modules
from compress.format.weights import _unpack, matrix_shape, row_groups
from compress.models.protocol import float_outputs
from compress.quant.fold import is_plain_bias
from compress.quant.sites import no_fastpath

__all__ = ["output_loss", "tunable_codebooks", "tune_codebooks"]


def output_loss(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """Differentiable form of `plan.output_error` (metric "kl") for one batch: mean KL(softmax(ref) ||
    softmax(out)) when every output is 2-D, else the relative squared error summed over the outputs."""
    if all(o.dim() == 2 for o in outputs):
        return sum(F.kl_div(F.log_softmax(o.float(), 1), F.log_softmax(r.float(), 1), log_target=True,
                            reduction="batchmean") for o, r in zip(outputs, reference))
    num = sum(((o.float() - r.float()) ** 2).sum() for o, r in zip(outputs, reference))
    den = sum((r.float() ** 2).sum() for r in reference)
    return num / den.clamp_min(1e-30)


class _CodebookWeight(nn.Module):
    """Parametrization: the dense weight decoded from a trainable codebook [G, K] and a fixed mapping."""

    def __init__(self, layout: dict[str, Any], buffers: dict[str, torch.Tensor]) -> None:
        super().__init__()
        rows, cols = matrix_shape(layout["shape"])
        self.shape = tuple(layout["shape"])
        self.register_buffer("idx", _unpack(buffers["packed"], layout["bits"], rows, cols, layout["packing"]).long())
        self.register_buffer("groups", row_groups(layout, buffers))
        shared = layout["codebook"] == "shared"
        self.codebook = nn.Parameter(buffers["codebook"].float().clone())
        self.register_buffer("row_scale", buffers["scale"].float()[self.groups][:, None] if layout["scale"] else None)
        self.register_buffer("row_offset", buffers["offset"].float()[self.groups][:, None] if layout["offset"] else None)
        self.register_buffer("column_scale", buffers["column_scale"].float()[None, :]
                             if layout.get("column_scale", False) else None)
        self.shared = shared

    def forward(self, _dense: torch.Tensor) -> torch.Tensor:
        rows = self.idx.shape[0]
        table = self.codebook[0].expand(rows, -1) if self.shared else self.codebook[self.groups]
        w = torch.gather(table, 1, self.idx)
        if self.row_scale is not None:
            w = w * self.row_scale
        if self.row_offset is not None:
            w = w + self.row_offset
        if self.column_scale is not None:
            w = w * self.column_scale
        return w.reshape(self.shape)


def tunable_codebooks(model: nn.Module) -> dict[str, QuantizedWeight]:
    """The quantized layers whose codebook can be tuned (the 'codebook' format with a stored codebook)."""
    return {name: m for name, m in quantized_modules(model).items()
            if m.quant_layout["format"] == "codebook" and m.quant_layout["codebook"] != "grid"}


def _per_channel_params(model: nn.Module, tuned: set[nn.Module]) -> list[nn.Parameter]:
    """Norm scales and shifts, and the biases of the tuned layers: per-channel vectors, few numbers each. A
    BatchNorm that `fold_bn` reduced to a bias keeps its scale of 1, so export can still fold it into the
    quantized conv before it."""
    out = []
    for module in model.modules():
        if module in tuned:
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                out.append(bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and is_plain_bias(module):
            out.extend([module.bias] if isinstance(module.bias, nn.Parameter) else [])
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
            out.extend(p for p in module.parameters(recurse=False))
    return out


def tune_codebooks(float_model: nn.Module, model: nn.Module, batches: list[Any], steps: int, lr: float = 1e-3,
                   advance: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Train the codebooks of `model`'s quantized layers and its per-channel parameters for `steps` Adam steps
    (cycling `batches`, eval mode) toward `float_model`'s outputs; in place. Codebook learning rates are in
    units of each codebook's spread (lr x its std), the others plain. Returns {"steps", "loss_before",
    "loss_after", "kept", "codebooks", "parameters", "first_losses", "last_losses"} (the training losses of the
    first and the last 5 steps): `kept` is False when the tuned state did not lower the loss on the calibration
    batches, and the model was rolled back."""
    layers = tunable_codebooks(model)
    if not layers or steps <= 0 or not batches:
        return {"steps": 0, "kept": False, "codebooks": 0, "parameters": 0}
    float_model.eval()
    with torch.no_grad(), no_fastpath():
        targets = [[t.detach() for t in float_outputs(float_model(b))] for b in batches]
    channel = _per_channel_params(model, set(layers.values()))
    channel_saved = [p.detach().clone() for p in channel]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    # what re-attaches each layer afterwards: its layout and stored tensors (only the codebook will change)
    stored = {name: (dict(m.quant_layout), m.quant_buffers()) for name, m in layers.items()}
    attrs = {name: m._quant_attr for name, m in layers.items()}
    saved_codebooks = {name: buffers["codebook"].clone() for name, (_, buffers) in stored.items()}
    was_training = model.training
    model.eval()
    decoders: dict[str, _CodebookWeight] = {}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for name, module in layers.items():  # stock class, its weight decoded from a trainable codebook
            decoders[name] = _CodebookWeight(*stored[name]).to(stored[name][1]["packed"].device)
            attr = attrs[name]
            detach_quantized(module).get_parameter(attr).requires_grad_(False)
            parametrize.register_parametrization(module, attr, decoders[name], unsafe=True)
        for p in channel:
            p.requires_grad_(True)
        groups = [{"params": [d.codebook], "lr": lr * float(d.codebook.detach().std().clamp_min(1e-8))}
                  for d in decoders.values()]
        groups.append({"params": channel, "lr": lr})
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        before = _mean_loss(model, batches, targets)
        losses = []
        with no_fastpath():
            for i in itertools.islice(itertools.cycle(range(len(batches))), steps):
                loss = output_loss(float_outputs(model(batches[i])), targets[i])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if advance is not None:
                    advance(losses[-1])
    finally:
        for name, module in layers.items():
            attr = attrs[name]
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            if not isinstance(module, QuantizedWeight):
                attach_quantized(module, *stored[name], attr)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    for name, decoder in decoders.items():
        codebook = stored[name][1]["codebook"]  # the layer's own buffer again
        codebook.copy_(decoder.codebook.detach().to(codebook.dtype))
    after = _mean_loss(model, batches, targets)
    kept = after < before
    if not kept:
        with torch.no_grad():
            for name, codebook in saved_codebooks.items():
                stored[name][1]["codebook"].copy_(codebook)
            for p, value in zip(channel, channel_saved):
                p.copy_(value)
    return {"steps": steps, "loss_before": before, "loss_after": after, "kept": kept,
            "codebooks": len(layers), "parameters": sum(d.codebook.numel() for d in decoders.values())
            + sum(p.numel() for p in channel), "first_losses": losses[:1], "last_losses": losses[-5:]}


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: list[Any], targets: list[list[torch.Tensor]]) -> float:
    with no_fastpath():
        return sum(float(output_loss(float_outputs(model(b)), t)) for b, t in zip(batches, targets)) / len(batches)
