"""Bias correction after quantizing: remove the mean shift that quantization leaves at each layer's output.

A quantized layer computes W^ x_q instead of W x_f; besides noise, the difference has a mean per output channel
(E[W^ x_q - W x_f]) that every later layer sees as a shifted input. On calibration images, the mean of each
quantized layer's output per channel is measured in the float and the quantized model, and the difference is
taken out where a per-channel constant can go without changing the model's structure: the layer's own bias,
or else the running mean of the BatchNorm that reads the layer's output (found as in compress.quant.fold).
Corrections of earlier layers change later layers' shifts, so layers are corrected in the order they run,
during one forward of the quantized model over all the inputs joined in one batch (each layer's correction
is applied to its output before the next layer runs); `passes` such forwards (the float means are measured
once). Inputs that cannot be joined (not tensors) get every layer corrected from the same forward, `passes`
times.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.quant.sites import Site, no_fastpath

__all__ = ["correct_bias"]


def _channel_dim(site: Site, out: torch.Tensor) -> int:
    return 1 if site.kind in ("conv", "conv3d", "conv_transpose") else out.dim() - 1


def _run_hooked(model: nn.Module, batches: list[Any], handles: list[Any]) -> None:
    """Run `batches` through `model` (fused attention paths off, so the hooks see every layer), then remove the
    hooks `handles`, whatever happens."""
    try:
        with no_fastpath():
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _means(model: nn.Module, sites: list[Site], batches: list[Any]) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for site in sites:
        def hook(_m: nn.Module, _a: tuple, out: Any, site: Site = site) -> None:
            if not torch.is_tensor(out):
                return
            dim = _channel_dim(site, out)
            flat = out.detach().float().movedim(dim, -1).reshape(-1, out.shape[dim])
            sums[site.name] = sums.get(site.name, 0) + flat.sum(0).double()
            counts[site.name] = counts.get(site.name, 0) + flat.shape[0]
        handles.append(model.get_submodule(site.name).register_forward_hook(hook))
    _run_hooked(model, batches, handles)
    return {name: (s / counts[name]).float() for name, s in sums.items()}


@torch.no_grad()
def correct_bias(float_model: nn.Module, quant_model: nn.Module, sites: list[Site], batches: list[Any],
                 passes: int = 2) -> int:
    """Shift biases (or the next BatchNorm's running mean) of `sites` in `quant_model` so that each layer's mean
    output per channel on `batches` matches `float_model`'s; returns how many layers were corrected."""
    from compress.quant.fold import find_conv_bn_pairs

    sites = [s for s in sites if s.kind in ("conv", "linear", "conv3d", "conv_transpose")]
    if not sites or not batches or passes <= 0:
        return 0
    next_bn = dict(find_conv_bn_pairs(quant_model, batches[0]))
    targets = {}
    for site in sites:
        module = quant_model.get_submodule(site.name)
        if getattr(module, "bias", None) is not None:
            targets[site.name] = ("bias", module, None)
        elif site.name in next_bn:
            bn = quant_model.get_submodule(next_bn[site.name])
            targets[site.name] = ("bn", bn, bn.running_mean.clone())
    sites = [s for s in sites if s.name in targets]
    if not sites:
        return 0
    want = _means(float_model.eval(), sites, batches)
    if all(torch.is_tensor(b) for b in batches):  # one pass over all inputs at once, layer after layer
        joined = [torch.cat(batches)]
        for _ in range(passes):
            _sequential_pass(quant_model.eval(), sites, joined, want, targets)
        return len(sites)
    for _ in range(passes):  # inputs that cannot be joined: every layer corrected from the same pass
        got = _means(quant_model.eval(), sites, batches)
        for site in sites:
            if site.name in want and site.name in got:
                _apply(targets[site.name], got[site.name] - want[site.name])
    return len(sites)


def _apply(target: tuple[str, nn.Module, torch.Tensor | None], shift: torch.Tensor) -> None:
    """A bias takes the shift away (its output changes, so later passes measure what is left); a BN reading the
    layer's output gets its running mean set to the original one plus the shift (the layer's output itself
    does not change, so each pass measures the whole shift again)."""
    kind, module, base = target
    if kind == "bias":
        module.bias.sub_(shift.to(module.bias.dtype))
    else:
        module.running_mean.copy_((base + shift).to(module.running_mean.dtype))


@torch.no_grad()
def _sequential_pass(model: nn.Module, sites: list[Site], batches: list[torch.Tensor], want: dict[str, torch.Tensor],
                     targets: dict[str, tuple[str, nn.Module, torch.Tensor | None]]) -> None:
    """One forward over one batch that corrects each layer as it runs, so later layers see corrected inputs (a
    layer's own bias shifts its output in the hook too; a BN target has not run yet when its running mean moves)."""
    handles = []
    for site in sites:
        if site.name not in want:
            continue

        def hook(_m: nn.Module, _a: tuple, out: Any, site: Site = site) -> Any:
            if not torch.is_tensor(out):
                return None
            dim = _channel_dim(site, out)
            mean = out.detach().float().movedim(dim, -1).reshape(-1, out.shape[dim]).mean(0)
            shift = mean - want[site.name]
            _apply(targets[site.name], shift)
            if targets[site.name][0] == "bias":
                shape = [1] * out.dim()
                shape[dim] = -1
                return out - shift.to(out.dtype).view(shape)
            return None

        handles.append(model.get_submodule(site.name).register_forward_hook(hook))
    _run_hooked(model, batches, handles)
