"""Quantized modules: the stock module, its weight stored compactly and dequantized on the fly.

`attach_quantized(module, layout, buffers)` turns e.g. an `nn.Conv2d` into a `QuantConv2d` in place: the
weight parameter is removed, the stored tensors become buffers `weight_packed`, `weight_codebook`, ...
(so `state_dict` holds exactly what the artifact stores) and `weight` becomes a property that decodes them.
Because the module keeps its class's own `forward` (the quantized class is a subclass made by
`quantized_class`), any layer that reads `self.weight` works unchanged: depthwise and grouped convs, timm's
padded convs, `nn.MultiheadAttention` (its `in_proj_weight`, and `out_proj.weight` read directly by the
attention function). On CPU the dense weight is cached after first use and rebuilt when a stored tensor
changes (in place or replaced); on other devices it is decoded at each call.

Decoding goes through `compress.kernels` (backend: `compress.kernels.set_backend` / `kernel_backend` or the
environment variable COMPRESS_KERNELS=auto|torch|triton; "auto" = Triton on CUDA tensors, torch elsewhere):
- Triton: the weight (of a conv, of a Linear at large batch, of attention) is written by the dequantize kernel
  at each call, then the stock forward runs (F.conv2d, F.linear, ...); a plain `nn.Linear` fed at most
  `FUSED_MAX_TOKENS` rows of input that wants no gradient runs the fused dequant-GEMV kernel instead, which
  never materialises the dense weight. Layouts the kernels do not take (the nf4 format, a float64 module)
  fall back to torch, with the reason logged once per process;
- torch: `formats.decode`, cached on CPU as above.
The kernels' arguments (codebooks with scale and offset folded in, a group per row, flat packing re-packed
by rows) are cached per layer until a stored tensor changes. Triton is imported only when a Triton call runs.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.kernels import dispatch as kernels  # imports no triton (the Triton modules load on first use)
from compress.format.weights import bits_per_weight, buffer_specs, decode, empty_buffers, storage_bits

__all__ = ["QuantizedWeight", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantMultiheadAttention",
           "quantized_class", "attach_quantized", "detach_quantized", "quantized_modules", "WEIGHT_ATTRS",
           "FUSED_MAX_TOKENS", "KERNEL_DTYPES", "materialize"]

_LOG = logging.getLogger(__name__)
FUSED_MAX_TOKENS = kernels.MAX_FUSED_BATCH  # rows of input (tokens) up to which a Linear runs the fused kernel
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # weight dtypes the Triton kernels write
_FALLBACKS_LOGGED: set[str] = set()


def _log_fallback_once(reason: str) -> None:
    if reason not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(reason)
        _LOG.warning("quantized layers: %s; such weights are decoded with torch, not the Triton kernels", reason)


def _state_of(buffers: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]] | None:
    """The stored tensors and their version counters (None for inference tensors, which have none: no cache)."""
    tensors = tuple(buffers.values())
    try:
        return tensors, tuple(t._version for t in tensors)
    except RuntimeError:
        return None


def _same_state(a: tuple | None, b: tuple | None) -> bool:
    """Same tensor objects (identity, not values) at the same versions."""
    return a is not None and b is not None and len(a[0]) == len(b[0]) and \
        all(x is y for x, y in zip(a[0], b[0])) and a[1] == b[1]


def _tracing() -> bool:
    """Inside torch.jit / ONNX export / torch.compile tracing: decode with traceable torch ops, not Triton."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or (compiling is not None and compiling()))


def _autocast_on(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if x.device.type == "cuda" else False


# which parameter of a module type holds its quantizable weight
WEIGHT_ATTRS: dict[type[nn.Module], str] = {nn.Linear: "weight", nn.Conv1d: "weight", nn.Conv2d: "weight",
                                            nn.MultiheadAttention: "in_proj_weight"}


class QuantizedWeight:
    """Mixin of a module whose weight `_quant_attr` is stored as `quant_layout` + buffers `<attr>_<name>`."""

    _quant_attr: ClassVar[str] = "weight"
    _quant_base: ClassVar[type[nn.Module]]
    quant_layout: dict[str, Any]
    _dense_dtype: torch.dtype
    _dense_cache: tuple | None  # (stored tensors + versions, (device, dtype), dense weight), CPU only
    _kernel_cache: tuple | None  # (stored tensors + versions, None, kernel arguments)

    def quant_buffers(self) -> dict[str, torch.Tensor]:
        """The stored tensors of the weight, by their layout name."""
        return {name: getattr(self, f"{self._quant_attr}_{name}") for name in buffer_specs(self.quant_layout)}

    def dequantize(self) -> torch.Tensor:
        """The dense weight (module dtype): the Triton dequantize kernel when the backend picks Triton for the
        weight's device (see the module docstring), else `formats.decode`, cached on CPU until a stored
        tensor changes."""
        device = getattr(self, f"{self._quant_attr}_packed").device
        if self._kernels_apply(device):
            column_scale = self.column_scale()
            if column_scale is None:
                w = kernels.dequantize(**self.kernel_args(), dtype=self._dense_dtype, backend="triton")
            else:  # decoded in float32 and scaled as formats.decode does, then rounded once
                w = kernels.dequantize(**self.kernel_args(), dtype=torch.float32, backend="triton")
                w = (w * column_scale.float()[None, :]).to(self._dense_dtype)
            return w.reshape(self.quant_layout["shape"])
        return self._cached("_dense_cache", (device, self._dense_dtype),
                            lambda buffers: decode(self.quant_layout, buffers).to(self._dense_dtype),
                            keep=device.type == "cpu")

    def kernel_args(self) -> dict[str, Any]:
        """Arguments of `compress.kernels.dequantize` / `fused_linear` for this weight (packed by rows,
        codebooks with scale and offset folded in, a group per row), cached until a stored tensor changes.
        Raises ValueError for a layout the kernels do not take (see `kernel_fallback_reason`)."""
        return self._cached("_kernel_cache", None,
                            lambda buffers: kernels.codebook_kernel_args(self.quant_layout, buffers,
                                                                          column_scale_by_caller=True), keep=True)

    def column_scale(self) -> torch.Tensor | None:
        """The stored factor of every column of the decoded matrix (float16 [cols]), None when the layout has none."""
        return getattr(self, f"{self._quant_attr}_column_scale") if self.quant_layout.get("column_scale") else None

    def kernel_fallback_reason(self) -> str | None:
        """Why the Triton kernels cannot decode this weight (None: they can)."""
        layout = self.quant_layout
        if layout["format"] != "codebook":
            return f"the '{layout['format']}' format has no kernel (the kernels take the 'codebook' format)"
        if self._dense_dtype not in KERNEL_DTYPES:
            return f"a {self._dense_dtype} weight (the kernels write float16, bfloat16 and float32)"
        return None

    def _kernels_apply(self, device: torch.device) -> bool:
        """Whether this weight, on `device`, is decoded by the Triton kernels (logs a fallback once)."""
        if not kernels.use_triton(device) or _tracing():
            return False
        reason = self.kernel_fallback_reason()
        if reason is not None:
            _log_fallback_once(reason)
            return False
        return True

    def _cached(self, slot: str, extra: Any, build: Callable[[dict[str, torch.Tensor]], Any], keep: bool) -> Any:
        """`build(buffers)`, kept in `slot` (when `keep`) until a stored tensor changes or `extra` differs."""
        buffers = self.quant_buffers()
        state = _state_of(buffers)
        cache = self.__dict__.get(slot)
        if cache is not None and cache[1] == extra and _same_state(cache[0], state):
            return cache[2]
        value = build(buffers)
        self.__dict__[slot] = (state, extra, value) if keep and state is not None else None
        return value

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
        stored = {name: self._buffers.get(f"{self._quant_attr}_{name}")  # type: ignore[attr-defined]
                  for name in buffer_specs(self.quant_layout)}
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        # the stored tensors follow device moves but keep their dtypes (.half() / .bfloat16() / .float() would
        # round fp16 codebooks or change what is stored and counted)
        for name, old in stored.items():
            key = f"{self._quant_attr}_{name}"
            new = self._buffers.get(key)  # type: ignore[attr-defined]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[key] = old.to(device=new.device)  # type: ignore[attr-defined]
        # follow .half() / .to(dtype): the dense weight takes the dtype the original parameter would have
        self._dense_dtype = fn(torch.empty(0, dtype=self._dense_dtype)).dtype
        self._dense_cache = None
        self._kernel_cache = None
        return out

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles leave the caches behind (a deepcopy rebuilds them on first use)
        return {**super().__getstate__(), "_dense_cache": None, "_kernel_cache": None}  # type: ignore[misc]

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        layout = self.quant_layout
        desc = (f"nf4 blocksize={layout['blocksize']}" if layout["format"] == "nf4" else
                f"{layout['bits']}-bit {layout['codebook']} G={layout['groups']}")
        return ", ".join(part for part in (base, f"quant={desc} ({self.bits_per_weight():.3f} bits/weight)") if part)


def _dense_getter(self: QuantizedWeight) -> torch.Tensor:
    return self.dequantize()


def _quant_linear_forward(self: Any, input: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward, with the fused dequant-GEMV kernel for small inputs on the Triton path."""
    device = self.weight_packed.device
    # a subclass that makes its weight another way (e.g. the ONNX exporter's traceable decoder) keeps it
    own_weight = getattr(getattr(type(self), "weight", None), "fget", None) is _dense_getter
    if (own_weight and input.dtype == self._dense_dtype and input.device == device
            and kernels.fused_applies(input, FUSED_MAX_TOKENS) and not _autocast_on(input)
            and self._kernels_apply(device)):
        column_scale = self.column_scale()
        if column_scale is not None:  # x . (q * s) = (x * s) . q
            input = input * column_scale.to(input.dtype)
        return kernels.fused_linear(input, **self.kernel_args(), bias=self.bias)
    return F.linear(input, self.weight, self.bias)


_CLASSES: dict[tuple[type, str], type] = {}


def quantized_class(base: type[nn.Module], attr: str = "weight") -> type:
    """The quantized subclass of `base` whose `attr` is decoded from buffers (made once per base class)."""
    if issubclass(base, QuantizedWeight):
        raise TypeError(f"{base.__name__} is already quantized")
    key = (base, attr)
    if key not in _CLASSES:
        name = f"Quant{base.__name__}" + ("" if attr in ("weight", "in_proj_weight") else f"_{attr}")
        body: dict[str, Any] = {"_quant_attr": attr, "_quant_base": base, attr: property(_dense_getter),
                                "__module__": __name__, "__doc__": f"{base.__name__} with its `{attr}` stored "
                                                                   "quantized (see compress.format.layers)."}
        if issubclass(base, nn.Linear) and attr == "weight" and base.forward is nn.Linear.forward:
            body["forward"] = _quant_linear_forward  # the stock forward otherwise (any subclass's own forward)
        cls = type(name, (QuantizedWeight, base), body)
        if name not in globals():  # importable by name, so pickling by reference works
            globals()[name] = cls
        _CLASSES[key] = cls
    return _CLASSES[key]


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
    module._kernel_cache = None
    return module


def detach_quantized(module: nn.Module) -> nn.Module:
    """Back to the stock class with a dense parameter (the decoded weight), in place."""
    if not isinstance(module, QuantizedWeight):
        return module
    attr = module._quant_attr
    dense = module.dequantize().detach().clone()
    for name in buffer_specs(module.quant_layout):
        delattr(module, f"{attr}_{name}")
    for name in ("quant_layout", "_dense_dtype", "_dense_cache", "_kernel_cache"):
        module.__dict__.pop(name, None)
    module.__class__ = module._quant_base
    module.register_parameter(attr, nn.Parameter(dense))
    return module


def quantized_modules(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Name -> quantized module of every quantized layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}


def materialize(model: nn.Module) -> nn.Module:
    """Replace every quantized layer of `model` by its plain dense form (in place); returns the model."""
    for module in list(quantized_modules(model).values()):
        detach_quantized(module)
    return model
