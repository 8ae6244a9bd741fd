"""sensitivity_proxy: one forward per layer at the middle width, the other widths scaled by their weight error."""
from __future__ import annotations

import torch
import torch.nn as nn

from compress.quant.api import plan_bits


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _sensitivity(bit_choices: tuple[int, ...], counts: list[int], **extra: object) -> dict:
    """plan_bits' sensitivity table of the tiny model on one fixed batch; appends the model's forward count."""
    model, calls = _model(), [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    batches = [torch.randn(16, 16, generator=torch.Generator().manual_seed(1))]
    out = plan_bits(model, batches, "jlcm", allocation="mixed", bits=4, bit_choices=bit_choices, float_choice=False,
                    sensitivity_metric="mse", **extra)["sensitivity"]
    counts.append(calls[0])
    return out


def test_proxy_measures_the_middle_width_and_scales_the_others() -> None:
    counts: list[int] = []
    widths = (1, 2, 3, 4, 8)
    exact, proxy = _sensitivity(widths, counts), _sensitivity(widths, counts, sensitivity_proxy=True)
    for name in exact:
        assert proxy[name][2]["error"] == exact[name][2]["error"]  # the measured width (middle of 1, 2, 3, 4)
        assert proxy[name][8]["error"] == exact[name][8]["error"] == 0.0  # 8 bits taken as lossless, as before
        assert all(proxy[name][b]["bits"] == exact[name][b]["bits"] for b in exact[name])
        errors = [proxy[name][b]["error"] for b in (1, 2, 3, 4)]
        assert errors == sorted(errors, reverse=True) and errors[0] > 0  # fewer bits, larger scaled error
    assert counts[0] - counts[1] == len(exact) * 3  # one forward per layer instead of four


def test_estimated_widths_are_scaled_from_the_measured_width_below() -> None:
    counts: list[int] = []
    widths = (2, 4, 5, 6, 8)
    exact, estimated = _sensitivity(widths, counts, estimated_bits=()), _sensitivity(widths, counts)  # default: 5, 6
    for name in exact:
        for b in (2, 4, 8):
            assert estimated[name][b] == exact[name][b]
        e4, e5, e6 = (estimated[name][b]["error"] for b in (4, 5, 6))
        assert 0 <= e6 <= e5 < e4 and e5 != exact[name][5]["error"]
    assert counts[0] - counts[1] == len(exact) * 2  # two forwards per layer fewer
