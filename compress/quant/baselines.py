"""The baselines JLCM is compared with, in the same API: k-means (Deep Compression), round-to-nearest, NF4."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.format.weights import encode_codebook, encode_nf4, matrix_shape
from compress.quant.kmeans import assign_nearest, kmeans_1d
from compress.quant.registry import Encoded, QuantConfig, register_method
from compress.quant.stats import LayerStats

__all__ = ["KMeansConfig", "RTNConfig", "NF4Config", "encode_rtn", "encode_kmeans", "encode_8bit"]


class KMeansConfig(QuantConfig):
    """Deep Compression: one k-means codebook (2^b entries) per tensor, every weight on its nearest entry."""

    weighting: Literal["none", "hessian"] = Field("none", description="k-means weights: none (plain, as in Deep "
                                                  "Compression) or the input second moment of each weight's column")

    def needs_stats(self) -> bool:
        return self.weighting == "hessian"


class RTNConfig(QuantConfig):
    """Uniform per-output-channel (row) round-to-nearest, asymmetric: w = scale * q + min, q in 0..2^b-1."""


class NF4Config(QuantConfig):
    """bitsandbytes NF4: 16 normal-quantile levels times one absmax per block of `blocksize` weights."""

    bits: float = Field(4.0, description="NF4 is 4 bits per index (4.5 bits per weight with fp32 absmax per 64)")
    blocksize: int = Field(64, description="weights per absmax block (bitsandbytes: 64, 128, ... 4096)")
    double_quant: bool = Field(False, description="quantize the absmax values to 8 bits too (about 4.127 bits/weight)")

    @model_validator(mode="after")
    def _four_bits(self) -> NF4Config:
        if self.bits != 4 or self.allocation != "uniform":
            raise ValueError(f"nf4 is 4 bits, uniform (got bits {self.bits}, allocation {self.allocation})")
        return self


def encode_rtn(weight: torch.Tensor, bits: int) -> Encoded:
    """Per-row asymmetric uniform quantization; scale and offset stored in fp16 (rounded before use)."""
    rows, cols = matrix_shape(weight.shape)
    w = weight.detach().float().reshape(rows, cols)
    levels = (1 << bits) - 1
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    offset = lo.half().float()
    scale = ((hi - offset) / levels).clamp_min(1e-8).half().float()
    idx = torch.round((w - offset[:, None]) / scale[:, None]).clamp(0, levels)
    return encode_codebook(weight.shape, bits, idx, torch.arange(rows, device=w.device), rows, kind="grid", scale=scale,
                           offset=offset, row_map="none")


def encode_kmeans(weight: torch.Tensor, bits: int, weights: torch.Tensor | None = None) -> Encoded:
    """One codebook for the whole tensor (k-means of all its values), nearest-entry assignment."""
    rows, cols = matrix_shape(weight.shape)
    w = weight.detach().float().reshape(rows, cols)
    codebook = kmeans_1d(w, 1 << bits, weights).half().float()
    idx = assign_nearest(w, codebook)
    return encode_codebook(weight.shape, bits, idx, torch.zeros(rows, dtype=torch.long, device=w.device), 1,
                           codebook[None], kind="per-group", row_map="none")


def encode_8bit(weight: torch.Tensor) -> Encoded:
    """8 bits, the cheaper to store of per-row int8 (32 bits of scale+offset a row) and one 256-entry codebook."""
    rows, _ = matrix_shape(weight.shape)
    return encode_rtn(weight, 8) if rows * 32 <= 256 * 16 else encode_kmeans(weight, 8)


def column_weights(stats: LayerStats | None, rows: int) -> torch.Tensor | None:
    """Input second moment E[x_j^2] of every weight's column, [R, C] (the diagonal of H, per input group)."""
    if stats is None:
        return None
    diag = torch.diagonal(stats.H, dim1=1, dim2=2)  # [g, C]
    return diag.repeat_interleave(rows // diag.shape[0], dim=0).clamp_min(0)


@register_method("kmeans", KMeansConfig)
def quantize_kmeans(weight: torch.Tensor, stats: LayerStats | None, bits: int, config: KMeansConfig) -> Encoded:
    rows, _ = matrix_shape(weight.shape)
    weights = column_weights(stats, rows) if config.weighting == "hessian" else None
    return encode_kmeans(weight, bits, weights)


@register_method("rtn", RTNConfig)
def quantize_rtn(weight: torch.Tensor, stats: LayerStats | None, bits: int, config: RTNConfig) -> Encoded:
    return encode_rtn(weight, bits)


@register_method("nf4", NF4Config)
def quantize_nf4(weight: torch.Tensor, stats: LayerStats | None, bits: int, config: NF4Config) -> Encoded:
    return encode_nf4(weight, config.blocksize, config.double_quant)
