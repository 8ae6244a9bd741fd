"""Kernels for codebook-quantized weights: dequantize, and a fused dequant-GEMV/GEMM for Linear at small batch.

`dequantize` / `quantized_linear` run the Triton kernels on CUDA tensors and the torch references on CPU
(`compress.kernels.dispatch`); `codebook_kernel_args` maps a stored layout (`compress.format.weights`) to their
arguments. The backend is picked per call, or process-wide by `set_backend` / `kernel_backend` / the
environment variable COMPRESS_KERNELS=auto|torch|triton (see `dispatch`). The Triton modules (`triton_dequant`,
`triton_gemv`, `triton_common`) import triton and are only imported on the Triton path: importing this package
does not import triton.
"""
from __future__ import annotations

from compress.kernels.dispatch import (BACKENDS, FORCE_TRITON_ENV, KERNELS_ENV, MAX_FUSED_BATCH, codebook_kernel_args,
                                       configured_backend, dequantize, fused_linear, kernel_backend,
                                       quantized_linear, set_backend, use_triton)
from compress.kernels.reference import dequantize_ref, gemv_ref, unpack_ref
from compress.kernels.torch_dequant import dequantize_torch

__all__ = ["dequantize", "quantized_linear", "codebook_kernel_args", "use_triton", "dequantize_ref", "gemv_ref",
           "unpack_ref", "dequantize_torch", "FORCE_TRITON_ENV", "KERNELS_ENV", "MAX_FUSED_BATCH", "BACKENDS",
           "set_backend", "configured_backend", "kernel_backend", "fused_linear"]
