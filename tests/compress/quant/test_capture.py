import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.quant.capture import FloatInputs, collect_stats, sample_patches
from compress.quant.sites import call_order, find_sites, matches


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


def _unfolded(conv: nn.Conv2d, x: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """Reference patches [g, n, C/g * kh * kw]: F.unfold of the padded input at the positions sample_patches
    draws (randperm of every output position with the generator seeded `seed`)."""
    mode = "reflect" if conv.padding_mode == "reflect" else "constant"
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    full = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # [B, C*k, L]
    full = full.transpose(1, 2).reshape(-1, conv.groups, full.shape[1] // conv.groups).transpose(0, 1)
    total = full.shape[1]
    if count is None or count >= total:
        return full.contiguous()
    return full[:, torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]]


def test_every_gather_gives_the_unfolded_patches_exactly() -> None:
    """Channels-last and NCHW inputs, depthwise and dense, few positions of a large input and all of a small
    one go through different gathers; each must equal the unfolded patches bit for bit (statistics, and so
    artifacts, stay the same whatever memory format a model runs in)."""
    for shape in ((3, 6, 9, 11), (2, 6, 30, 30)):
        x = torch.randn(*shape)
        for conv in (nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=6),
                     nn.Conv2d(6, 4, (3, 1), padding=(1, 0), groups=2), nn.Conv2d(6, 4, 1),
                     nn.Conv2d(6, 4, (2, 3), stride=(2, 1), padding=(0, 2)), nn.Conv2d(6, 6, 5, padding=2, groups=6),
                     nn.Conv2d(6, 12, 3, padding=1, groups=6), nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")):
            for count in (None, 7, 40):
                want = _unfolded(conv, x, count, 3)
                for layout in (torch.contiguous_format, torch.channels_last):
                    got = sample_patches(conv, x.contiguous(memory_format=layout), count,
                                         torch.Generator().manual_seed(3))
                    assert got.shape == want.shape and got.is_contiguous(), (conv, count, layout)
                    assert torch.equal(got, want), (conv, count, layout)
    x1 = torch.randn(2, 6, 40)  # Conv1d: the patches of the same conv as a 2-D conv of height 1
    for conv1, conv2 in ((nn.Conv1d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, (1, 3), padding=(0, 1), groups=6)),
                         (nn.Conv1d(6, 4, 5, stride=2, padding=2, groups=2),
                          nn.Conv2d(6, 4, (1, 5), stride=(1, 2), padding=(0, 2), groups=2))):
        for count in (None, 7):
            got = sample_patches(conv1, x1, count, torch.Generator().manual_seed(3))
            assert torch.equal(got, _unfolded(conv2, x1.unsqueeze(2), count, 3)), (conv1, count)


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
        assert torch.allclose(direct.H, cached.H) and torch.allclose(direct.P, cached.P), site.name
        # 50 rows per layer: 17 sampled positions per batch for convs; the linear layer sees 4 rows a batch
        assert direct.samples == cached.samples == (12 if site.kind == "linear" else 51)
    assert cache.passes >= 2, "a small budget caches a few layers per float pass"


def test_name_patterns() -> None:
    assert matches("head.fc", ["head.*"]) and matches("blocks.3.conv", [r"re:blocks\.\d+\.conv"])
    assert not matches("blocks.3.conv.bn", [r"re:blocks\.\d+\.conv"]) and matches("stem", ["stem"])


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv2(self.act(self.conv1(x)))
        out += identity
        return self.act(out)


class _Mutate(nn.Module):
    """Changes its input in place and returns something else: replaying it would skip the change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(0.5)
        return x.mean(dim=1, keepdim=True)


class _Awkward(nn.Module):
    """Residuals, in-place activations, a module called twice, one that mutates its input, one called a
    number of times that depends on the batch, and a tuple-returning submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block1, self.block2 = _Block(8), _Block(8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.mutate = _Mutate()
        self.dynamic = nn.Hardswish()
        self.split = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeats = 1 + int(float(x.detach().mean()) > 0.5)
        x = self.stem(x)
        skip = x
        x = self.block1(x)
        x = self.shared(self.shared(x))
        x = x + self.mutate(x)
        for _ in range(repeats):
            x = self.dynamic(x)
        a, b = self.split(x).chunk(2, dim=1)
        x = self.block2(a * torch.sigmoid(b)) + skip
        return self.head(x.mean(dim=(2, 3)))


def test_replay_gives_the_same_quantized_model_and_skips_work() -> None:
    import copy

    import compress.quant as cq

    torch.manual_seed(0)
    model = _Awkward().eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.2, 0.2)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.rand(4, 3, 10, 10, generator=gen) * s for s in (0.2, 3.0, 0.5)]
    results = {}
    for replay_mb in (0, 64):
        quantized = copy.deepcopy(model)
        calls = [0]
        quantized.stem[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        cq.quantize(quantized, batches, method="jlcm", bits=2.5, calib_steps=5, groups=2, replay_mb=replay_mb)
        results[replay_mb] = (quantized, calls[0])
    (plain, plain_calls), (replayed, replayed_calls) = results[0], results[64]
    assert [e["error"] for e in plain.quantization_plan["layers"]] == \
        [e["error"] for e in replayed.quantization_plan["layers"]]
    assert [e["sensitivity"] for e in plain.quantization_plan["layers"]] == \
        [e["sensitivity"] for e in replayed.quantization_plan["layers"]]
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(plain(x), replayed(x))
    assert replayed_calls < plain_calls / 2, f"the stem ran {replayed_calls} times with replay, {plain_calls} without"


def test_replay_within_a_tiny_budget_stays_exact() -> None:
    from compress.quant.replay import Replay

    torch.manual_seed(0)
    model = _Awkward().eval()
    batches = [torch.rand(4, 3, 10, 10) for _ in range(3)]
    sites, counts = call_order(model, find_sites(model), batches[0])
    for budget in (0, 3000, 1 << 20):
        replay = Replay(model, batches[0], budget)
        for site in sites:
            direct = collect_stats(model, model, [site], batches, counts, 40, seed=2)
            replayed = collect_stats(model, model, [site], batches, counts, 40, seed=2, replay=replay)
            assert direct.keys() == replayed.keys()
            for name in direct:
                assert torch.equal(direct[name].H, replayed[name].H), (budget, name)
        assert replay.used <= budget


class _Halve(nn.Module):
    """Halves its input in place and returns it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(0.5)


def test_replayed_output_changed_in_place_downstream_is_not_spoilt() -> None:
    """Replayed outputs are handed over without a copy; a module after them that changes them in place must
    not leak into the next pass (the record is dropped, and that module is handed copies from then on)."""
    from compress.quant.replay import Replay

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Block(4), _Halve(), nn.Conv2d(4, 4, 1)).eval()
    batch = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        want = model(batch)
        replay = Replay(model, batch, 1 << 20)
        cutoff = replay.cutoff(["3"])
        outs = [replay.run(0, cutoff, lambda: model(batch)) for _ in range(4)]
    assert all(torch.equal(o, want) for o in outs)
    assert "1" in replay.cloned and replay.entries, "block 1 is replayed, as a copy once its output was changed"
