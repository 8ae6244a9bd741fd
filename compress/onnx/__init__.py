"""ONNX export of compress artifacts: quantized weights stay packed and are decoded inside the graph.

    from compress.onnx import export_onnx
    export_onnx("run/model.safetensors", "model.onnx")              # packed (about the artifact's size)
    export_onnx("run/model.safetensors", "dense.onnx", dense=True)  # plain dense weights

Needs the `onnx` package (`pip install 'compress[onnx]'`); onnxruntime only to run the result.
"""
from __future__ import annotations

from compress.onnx.export import DEFAULT_OPSET, OnnxExportError, export_module, export_onnx

__all__ = ["DEFAULT_OPSET", "OnnxExportError", "export_module", "export_onnx"]
