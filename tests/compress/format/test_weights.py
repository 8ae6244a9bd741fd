import pytest
import torch
import torch.nn as nn

from compress.evaluate.size import count_params, storage_bytes
from compress.format.weights import (bits_per_weight, decode, encode_codebook, encode_nf4, formula_bits, row_groups,
                                    storage_bits)
from compress.format.layers import QuantConv2d, attach_quantized, detach_quantized


def test_bit_accounting_hand_computed() -> None:
    # W [8, 16], 2 bits, G = 2 per-group codebooks, group ids packed at 1 bit a row:
    #   indices 8 rows x 16 x 2 bits = 256 bits; codebooks 2 x 4 x 16 = 128 bits; group ids 8 x 1 = 8 bits
    #   -> 392 bits = 3.0625 bits per weight = the METHODS.md formula 2 + (2*4*16 + 8) / 128
    idx = torch.randint(0, 4, (8, 16))
    groups = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])
    codebook = torch.tensor([[-1.0, -0.5, 0.5, 1.0], [-2.0, -1.0, 1.0, 2.0]])
    layout, buffers = encode_codebook((8, 16), 2, idx, groups, 2, codebook)
    assert storage_bits(layout) == 392 and layout["packing"] == "rows"
    assert bits_per_weight(layout) == pytest.approx(3.0625)
    assert bits_per_weight(layout) == pytest.approx(formula_bits(2, 128, codebooks=2, map_bits=8))
    assert sum(t.numel() * t.element_size() * 8 for t in buffers.values()) == 392, "accounting = bytes actually held"
    # the same weight with the row order stored instead (int16 per row): 256 + 128 + 8*16 = 512 bits
    order = torch.argsort(groups, stable=True)
    layout_o, buffers_o = encode_codebook((8, 16), 2, idx, groups, 2, codebook, row_map="order", order=order)
    assert storage_bits(layout_o) == 512 and buffers_o["order"].dtype == torch.int16
    assert torch.equal(row_groups(layout_o, buffers_o), groups)
    # decoding: row r takes codebook[group of r][idx]
    dense = decode(layout, buffers)
    assert torch.equal(dense, codebook[groups][torch.arange(8)[:, None], idx])


def test_rtn_grid_accounting() -> None:
    # per-row affine int3 on [4, 10]: rows of 10 do not fill whole bytes, so the 40 indices are packed flat
    # (10 bytes of 2-bit plane + 5 bytes of 1-bit plane), plus 4 scales and 4 offsets in fp16
    idx = torch.randint(0, 8, (4, 10))
    layout, _ = encode_codebook((4, 10), 3, idx, torch.arange(4), 4, kind="grid", scale=torch.ones(4),
                                offset=torch.zeros(4), row_map="none")
    assert layout["packing"] == "flat"
    assert storage_bits(layout) == 15 * 8 + 4 * 16 + 4 * 16
    assert formula_bits(3, 40, codebooks=0, scales=4, offsets=4) == pytest.approx(3 + 128 / 40)


def test_quantized_conv_reports_exact_size_and_round_trips_state() -> None:
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # depthwise: rows of 9 weights
    idx = torch.randint(0, 4, (6, 9))
    codebook = torch.sort(torch.randn(3, 4), dim=1).values
    layout, buffers = encode_codebook(conv.weight.shape, 2, idx, torch.tensor([0, 1, 2, 0, 1, 2]), 3, codebook)
    x = torch.randn(2, 6, 5, 5)
    attach_quantized(conv, layout, buffers)
    assert isinstance(conv, QuantConv2d) and "weight" not in dict(conv.named_parameters())
    # 54 indices packed flat (rows of 9 would pad) 14 bytes + codebooks 3 x 4 x 2 bytes + group ids (2 bits x 6
    # rows = 2 bytes) + fp32 bias 6 x 4
    assert conv.quant_layout["packing"] == "flat"
    assert conv.storage_bytes() == 14 + 24 + 2 + 24 == storage_bytes(conv)
    assert count_params(conv) == 6 * 9 + 6
    y = conv(x)
    assert torch.equal(y, nn.functional.conv2d(x, decode(layout, buffers), conv.bias, padding=1, groups=6))
    fresh = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    attach_quantized(fresh, layout)  # empty tensors of the right shapes, as a checkpoint restorer does
    fresh.load_state_dict(conv.state_dict())
    assert torch.equal(fresh(x), y)
    # the CPU cache follows in-place changes of the stored tensors
    fresh.weight_codebook.mul_(2)
    assert torch.allclose(fresh.weight, 2 * conv.weight)
    detach_quantized(fresh)
    assert type(fresh) is nn.Conv2d and isinstance(fresh.weight, nn.Parameter)


def test_nf4_decodes_like_bitsandbytes_on_cpu() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(12, 50, generator=torch.Generator().manual_seed(0))
    for double in (False, True):
        layout, buffers = encode_nf4(w, 64, double)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type="nf4")
        assert torch.equal(decode(layout, buffers), bnbf.dequantize_4bit(packed, state)), f"double quant {double}"
    # 4 bits + one fp32 absmax per 64 weights: 4.5 bits per weight when nothing is padded
    layout, _ = encode_nf4(torch.randn(64, 64), 64, False)
    assert bits_per_weight(layout) == pytest.approx(4.5)
    layout, _ = encode_nf4(torch.randn(256, 256), 64, True)
    assert bits_per_weight(layout) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 65536, abs=1e-6)


def test_column_scales_multiply_decoded_columns_and_are_counted() -> None:
    idx = torch.randint(0, 4, (4, 18), generator=torch.Generator().manual_seed(0))
    codebook = torch.sort(torch.randn(2, 4), dim=1).values
    groups = torch.tensor([0, 1, 0, 1])
    plain = encode_codebook((4, 2, 3, 3), 2, idx, groups, 2, codebook)
    column_scale = torch.rand(18) + 0.5
    scaled = encode_codebook((4, 2, 3, 3), 2, idx, groups, 2, codebook, column_scale=column_scale)
    assert "column_scale" not in plain[0] and scaled[0]["column_scale"] is True
    factor = column_scale.half().float()  # stored as float16
    assert torch.equal(decode(*scaled).reshape(4, 18), decode(*plain).reshape(4, 18) * factor)
    assert storage_bits(scaled[0]) == storage_bits(plain[0]) + 18 * 16
    conv = nn.Conv2d(2, 4, 3, bias=False)
    attach_quantized(conv, *scaled)
    fresh = attach_quantized(nn.Conv2d(2, 4, 3, bias=False), scaled[0])  # a restorer's empty buffers
    fresh.load_state_dict(conv.state_dict())
    assert torch.equal(fresh.weight, decode(*scaled))
    assert fresh.kernel_fallback_reason() is None, "the layer applies the scales around the kernels"
