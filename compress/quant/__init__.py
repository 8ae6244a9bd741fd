"""Codebook quantization: JLCM (jointly learnable codebooks and mappings) and the baselines it must beat.

    import compress.quant as cq
    cq.quantize(model, calib_batches, method="jlcm", bits=2.0)       # mixed precision, 2.0 bits/weight in all
    cq.quantize(model, calib_batches, method="rtn", bits=4)          # uniform 4-bit per-row round-to-nearest
    model.quantization_plan["summary"], model.quantization_plan["layers"]   # what was done, per layer

Methods (a registry; add one with `register_method(name, ConfigClass)(fn)`): `jlcm` (ours, jlcm.py),
`kmeans` (one codebook per tensor, Deep Compression), `rtn` (uniform per-row, asymmetric), `nf4`
(bitsandbytes NF4, blocksize 64). Options are each method's pydantic config (unknown keys refused).
Quantized layers keep packed indices + codebooks as buffers and dequantize on the fly (layers.py); the
stored form and its exact size are in formats.py; the `quantize` recipe stage and its checkpoint restorer
in stage.py (imported by the stage registry, not here, so `import compress.quant` registers no stage).
"""
from __future__ import annotations

import torch.nn as nn

from compress.quant import baselines as _baselines  # noqa: F401  (registers kmeans, rtn, nf4)
from compress.quant import jlcm as _jlcm  # noqa: F401  (registers jlcm)
from compress.quant.api import plan_bits, quantize
from compress.quant.baselines import KMeansConfig, NF4Config, RTNConfig
from compress.quant.formats import bits_per_weight, formula_bits, storage_bits
from compress.quant.jlcm import JLCMConfig
from compress.quant.layers import (QuantConv1d, QuantConv2d, QuantizedWeight, QuantLinear, QuantMultiheadAttention,
                                   attach_quantized, detach_quantized, quantized_modules)
from compress.quant.packing import pack_indices, unpack_indices
from compress.quant.registry import METHODS, QuantConfig, get_method, register_method

__all__ = ["quantize", "plan_bits", "register_method", "get_method", "METHODS", "QuantConfig", "JLCMConfig",
           "KMeansConfig", "RTNConfig", "NF4Config", "QuantizedWeight", "QuantLinear", "QuantConv1d", "QuantConv2d",
           "QuantMultiheadAttention", "attach_quantized", "detach_quantized", "quantized_modules", "pack_indices",
           "unpack_indices", "bits_per_weight", "storage_bits", "formula_bits", "materialize"]


def materialize(model: nn.Module) -> nn.Module:
    """Replace every quantized layer of `model` by its plain dense form (in place); returns the model."""
    for module in list(quantized_modules(model).values()):
        detach_quantized(module)
    return model
