"""Measuring models: parameters, MACs, storage size."""
from compress.evaluate.size import count_macs, count_params, measure, storage_bytes

__all__ = ["count_macs", "count_params", "measure", "storage_bytes"]
