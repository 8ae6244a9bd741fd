"""The entropy coder's size decisions, shared by the writer (container.pack_container) and the size budget
(weights.stored_bits): when a packed index tensor is stored rANS-coded, and how many bits it then takes."""
from __future__ import annotations

import json
import math

import torch

__all__ = ["MAX_EXPANSION", "counts_bytes", "worth_coding", "stored_index_bits"]

MAX_EXPANSION = 16  # packed bytes a coded stream may stand for, per stream byte (writer and reader agree; real
# streams of 1-8 bit indices stay far below: b / entropy)


def counts_bytes(counts: list[int]) -> int:
    return len(json.dumps(counts)) // 2  # the counts, roughly, once zlib has them


def worth_coding(stream_bytes: int, counts: list[int], raw_bytes: int) -> bool:
    """pack_container's choice: code when the stream and its counts take fewer bytes than the raw tensor."""
    return stream_bytes + counts_bytes(counts) < raw_bytes and raw_bytes <= MAX_EXPANSION * stream_bytes


def stored_index_bits(symbols: torch.Tensor, bits: int, raw_bytes: int) -> int:
    """Bits a packed index tensor of these symbols (raw_bytes packed) takes in the file, estimated without coding:
    the rANS stream at the symbols' order-0 entropy (plus a flush word) and its counts when pack_container would
    code it, else the raw bytes. What a size budget should charge for indices."""
    flat = symbols.reshape(-1).long()
    if not flat.numel():
        return 8 * raw_bytes
    counts = torch.bincount(flat, minlength=1 << bits)
    p = counts[counts > 0].double() / flat.numel()
    stream_bytes = 4 * (math.ceil(float(-(p * p.log2()).sum()) * flat.numel() / 32) + 1)
    if worth_coding(stream_bytes, counts.tolist(), raw_bytes):
        return 8 * (stream_bytes + counts_bytes(counts.tolist()))
    return 8 * raw_bytes
