"""Codebook quantization: JLCM (jointly learnable codebooks and mappings) and the baselines it must beat.

    import compress.quant as cq
    cq.quantize(model, calib_batches, method="jlcm", bits=2.0)       # mixed precision, 2.0 bits/weight in all
    cq.quantize(model, calib_batches, method="rtn", bits=4)          # uniform 4-bit per-row round-to-nearest
    model.quantization_plan["summary"], model.quantization_plan["layers"]   # what was done, per layer

Methods (a registry; add one with `register_method(name, ConfigClass)(fn)`): `jlcm` (ours, jlcm.py),
`kmeans` (one codebook per tensor, Deep Compression), `rtn` (uniform per-row, asymmetric), `nf4`
(bitsandbytes NF4, blocksize 64). Options are each method's pydantic config (unknown keys refused).
Quantized layers keep packed indices + codebooks as buffers and dequantize on the fly, and the stored form and
its exact size, live on the read side (`compress.format.layers`, `compress.format.weights`); the `quantize`
recipe stage is `compress.stages.quantize`. This package knows nothing of recipes or runs.
"""
from __future__ import annotations

from compress.quant import baselines as _baselines  # noqa: F401  (registers kmeans, rtn, nf4)
from compress.quant import jlcm as _jlcm  # noqa: F401  (registers jlcm)
from compress.quant.api import plan_bits, quantize
from compress.quant.baselines import KMeansConfig, NF4Config, RTNConfig
from compress.format.weights import bits_per_weight, formula_bits, storage_bits
from compress.quant.jlcm import JLCMConfig
from compress.format.layers import (QuantConv1d, QuantConv2d, QuantizedWeight, QuantLinear, QuantMultiheadAttention,
                                    attach_quantized, detach_quantized, materialize, quantized_modules)
from compress.format.packing import pack_indices, unpack_indices
from compress.quant.registry import METHODS, QuantConfig, get_method, register_method

__all__ = ["quantize", "plan_bits", "register_method", "get_method", "METHODS", "QuantConfig", "JLCMConfig",
           "KMeansConfig", "RTNConfig", "NF4Config", "QuantizedWeight", "QuantLinear", "QuantConv1d", "QuantConv2d",
           "QuantMultiheadAttention", "attach_quantized", "detach_quantized", "quantized_modules", "pack_indices",
           "unpack_indices", "bits_per_weight", "storage_bits", "formula_bits", "materialize"]

