"""sensitivity_proxy: one forward per layer at the middle width, the other widths scaled by their weight error."""
from __future__ import annotations

import torch
import torch.nn as nn

from compress.quant.api import plan_bits


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_proxy_measures_the_middle_width_and_scales_the_others() -> None:
    batches = [torch.randn(16, 16)]
    opts = dict(allocation="mixed", bits=4, bit_choices=(1, 2, 3, 4, 8), float_choice=False, sensitivity_metric="mse")
    counts = []

    def run(**extra: object) -> dict:
        model, calls = _model(), [0]
        model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        out = plan_bits(model, batches, "jlcm", **opts, **extra)["sensitivity"]
        counts.append(calls[0])
        return out

    exact, proxy = run(), run(sensitivity_proxy=True)
    for name in exact:
        assert proxy[name][2]["error"] == exact[name][2]["error"]  # the measured width (middle of 1, 2, 3, 4)
        assert proxy[name][8]["error"] == exact[name][8]["error"] == 0.0  # 8 bits taken as lossless, as before
        assert all(proxy[name][b]["bits"] == exact[name][b]["bits"] for b in exact[name])
        errors = [proxy[name][b]["error"] for b in (1, 2, 3, 4)]
        assert errors == sorted(errors, reverse=True) and errors[0] > 0  # fewer bits, larger scaled error
    assert counts[0] - counts[1] == len(exact) * 3  # one forward per layer instead of four
