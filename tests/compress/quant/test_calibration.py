import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.quant.calibration import FloatInputs, call_order, collect_stats, find_sites, matches, sample_patches


def test_patches_match_unfold_for_every_conv_shape() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 11)
    for conv in (nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=6),
                 nn.Conv2d(6, 4, (3, 1), padding=(1, 0), groups=2), nn.Conv2d(6, 4, 3, padding="same"),
                 nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")):
        got = sample_patches(conv, x, None, gen)  # [g, n, C/g * kh * kw], positions in (batch, y, x) order
        mode = "reflect" if conv.padding_mode == "reflect" else "constant"
        padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        want = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # [B, C*k, L]
        want = want.transpose(1, 2).reshape(-1, conv.groups, want.shape[1] // conv.groups).transpose(0, 1)
        assert torch.allclose(got, want), conv
        # the patches reproduce the conv: y = W x per output position
        y = conv(x)
        w = conv.weight.reshape(conv.groups, conv.out_channels // conv.groups, -1)
        rebuilt = torch.bmm(got, w.transpose(1, 2)).transpose(0, 1).reshape(y.shape[0], y.shape[2], y.shape[3], -1)
        assert torch.allclose(rebuilt.permute(0, 3, 1, 2) + conv.bias[None, :, None, None], y, atol=1e-5), conv
    conv1 = nn.Conv1d(4, 3, 3, padding=1)
    patches = sample_patches(conv1, torch.randn(2, 4, 7), 5, gen)
    assert patches.shape == (1, 5, 12)


def test_cached_float_inputs_give_the_same_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 36, 5)).eval()
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    sites, counts = call_order(model, find_sites(model), batches[0])
    cache = FloatInputs(model, sites, batches, counts, max_samples=50, seed=3, budget_bytes=1 << 12)
    for site in sites:
        direct = collect_stats(model, None, [site], batches, counts, 50, seed=3)[site.name]
        cached = collect_stats(model, None, [site], batches, counts, 50, seed=3,
                               float_inputs={site.name: cache.get(site)})[site.name]
        assert torch.allclose(direct.H, cached.H) and torch.allclose(direct.M, cached.M), site.name
        # 50 rows per layer: 17 sampled positions per batch for convs; the linear layer sees 4 rows a batch
        assert direct.samples == cached.samples == (12 if site.kind == "linear" else 51)
    assert cache.passes >= 2, "a small budget caches a few layers per float pass"


def test_name_patterns() -> None:
    assert matches("head.fc", ["head.*"]) and matches("blocks.3.conv", [r"re:blocks\.\d+\.conv"])
    assert not matches("blocks.3.conv.bn", [r"re:blocks\.\d+\.conv"]) and matches("stem", ["stem"])
