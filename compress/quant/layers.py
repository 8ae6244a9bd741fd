"""Quantized modules: the stock module, its weight stored compactly and dequantized on the fly.

`attach_quantized(module, layout, buffers)` turns e.g. an `nn.Conv2d` into a `QuantConv2d` in place: the
weight parameter is removed, the stored tensors become buffers `weight_packed`, `weight_codebook`, ...
(so `state_dict` holds exactly what the artifact stores) and `weight` becomes a property that decodes them.
Because the module keeps its class's own `forward` (the quantized class is a subclass made by
`quantized_class`), any layer that reads `self.weight` works unchanged: depthwise and grouped convs, timm's
padded convs, `nn.MultiheadAttention` (its `in_proj_weight`, and `out_proj.weight` read directly by the
attention function). On CPU the dense weight is cached after first use and rebuilt when a stored tensor
changes (in place or replaced); on other devices it is decoded at each call (kernels come later).
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any, ClassVar

import torch
import torch.nn as nn

from compress.quant.formats import bits_per_weight, buffer_specs, decode, empty_buffers, storage_bits

__all__ = ["QuantizedWeight", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantMultiheadAttention",
           "quantized_class", "attach_quantized", "detach_quantized", "quantized_modules", "WEIGHT_ATTRS"]

# which parameter of a module type holds its quantizable weight
WEIGHT_ATTRS: dict[type[nn.Module], str] = {nn.Linear: "weight", nn.Conv1d: "weight", nn.Conv2d: "weight",
                                            nn.MultiheadAttention: "in_proj_weight"}


class QuantizedWeight:
    """Mixin of a module whose weight `_quant_attr` is stored as `quant_layout` + buffers `<attr>_<name>`."""

    _quant_attr: ClassVar[str] = "weight"
    _quant_base: ClassVar[type[nn.Module]]
    quant_layout: dict[str, Any]
    _dense_dtype: torch.dtype
    _dense_cache: tuple[tuple, torch.Tensor] | None

    def quant_buffers(self) -> dict[str, torch.Tensor]:
        """The stored tensors of the weight, by their layout name."""
        return {name: getattr(self, f"{self._quant_attr}_{name}") for name in buffer_specs(self.quant_layout)}

    def dequantize(self) -> torch.Tensor:
        """The dense weight (module dtype); cached on CPU until a stored tensor changes."""
        buffers = self.quant_buffers()
        device = buffers["packed"].device
        key = (device, self._dense_dtype, tuple((t.data_ptr(), t._version) for t in buffers.values()))
        cache = self.__dict__.get("_dense_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        dense = decode(self.quant_layout, buffers).to(self._dense_dtype)
        self._dense_cache = (key, dense) if device.type == "cpu" else None
        return dense

    def storage_bytes(self) -> int:
        """Exact bytes of the stored weight plus the module's other own parameters (bias, ...)."""
        own = sum(p.numel() * p.element_size() for p in self.parameters(recurse=False))
        return storage_bits(self.quant_layout) // 8 + own

    def dense_param_count(self) -> int:
        """Weights the module represents: the dense weight plus its other own parameters."""
        return math.prod(self.quant_layout["shape"]) + sum(p.numel() for p in self.parameters(recurse=False))

    def bits_per_weight(self) -> float:
        """Stored bits of the weight per weight, codebooks, scales and row maps included (bias excluded)."""
        return bits_per_weight(self.quant_layout)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        # follow .half() / .to(dtype): the dense weight takes the dtype the original parameter would have
        self._dense_dtype = fn(torch.empty(0, dtype=self._dense_dtype)).dtype
        self._dense_cache = None
        return out

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        layout = self.quant_layout
        desc = (f"nf4 blocksize={layout['blocksize']}" if layout["format"] == "nf4" else
                f"{layout['bits']}-bit {layout['codebook']} G={layout['groups']}")
        return ", ".join(part for part in (base, f"quant={desc} ({self.bits_per_weight():.3f} bits/weight)") if part)


def _dense_getter(self: QuantizedWeight) -> torch.Tensor:
    return self.dequantize()


_CLASSES: dict[tuple[type, str], type] = {}


def quantized_class(base: type[nn.Module], attr: str = "weight") -> type:
    """The quantized subclass of `base` whose `attr` is decoded from buffers (made once per base class)."""
    if issubclass(base, QuantizedWeight):
        raise TypeError(f"{base.__name__} is already quantized")
    key = (base, attr)
    if key not in _CLASSES:
        name = f"Quant{base.__name__}" + ("" if attr in ("weight", "in_proj_weight") else f"_{attr}")
        cls = type(name, (QuantizedWeight, base), {"_quant_attr": attr, "_quant_base": base, attr: property(_dense_getter),
                                                    "__module__": __name__, "__doc__": f"{base.__name__} with its "
                                                    f"`{attr}` stored quantized (see compress.quant.layers)."})
        if name not in globals():  # importable by name, so pickling by reference works
            globals()[name] = cls
        _CLASSES[key] = cls
        _count_macs_like(cls, base)
    return _CLASSES[key]


def _count_macs_like(cls: type, base: type) -> None:
    """Let torch-pruning's op counter (it looks types up exactly) count a quantized layer like its base."""
    if importlib.util.find_spec("torch_pruning") is None:
        return
    from torch_pruning.utils import op_counter

    if base in op_counter.MODULES_MAPPING:
        op_counter.MODULES_MAPPING[cls] = op_counter.MODULES_MAPPING[base]


QuantLinear = quantized_class(nn.Linear)
QuantConv1d = quantized_class(nn.Conv1d)
QuantConv2d = quantized_class(nn.Conv2d)
QuantMultiheadAttention = quantized_class(nn.MultiheadAttention, "in_proj_weight")


def attach_quantized(module: nn.Module, layout: dict[str, Any], buffers: dict[str, torch.Tensor] | None = None,
                     attr: str = "weight") -> nn.Module:
    """Store `module.<attr>` as `layout` + `buffers` (zeros of the right shapes when None, for loading)."""
    dense = getattr(module, attr)
    if tuple(dense.shape) != tuple(layout["shape"]):
        raise ValueError(f"{type(module).__name__}.{attr} has shape {tuple(dense.shape)}, the layout "
                         f"{tuple(layout['shape'])}")
    device, dtype = dense.device, dense.dtype
    buffers = empty_buffers(layout, device) if buffers is None else buffers
    del module._parameters[attr]
    module.__class__ = quantized_class(type(module), attr)
    for name, tensor in buffers.items():
        module.register_buffer(f"{attr}_{name}", tensor.to(device))
    module.quant_layout = dict(layout)
    module._dense_dtype = dtype
    module._dense_cache = None
    return module


def detach_quantized(module: nn.Module) -> nn.Module:
    """Back to the stock class with a dense parameter (the decoded weight), in place."""
    if not isinstance(module, QuantizedWeight):
        return module
    attr = module._quant_attr
    dense = module.dequantize().detach().clone()
    for name in buffer_specs(module.quant_layout):
        delattr(module, f"{attr}_{name}")
    for name in ("quant_layout", "_dense_dtype", "_dense_cache"):
        module.__dict__.pop(name, None)
    module.__class__ = module._quant_base
    module.register_parameter(attr, nn.Parameter(dense))
    return module


def quantized_modules(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Name -> quantized module of every quantized layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}
