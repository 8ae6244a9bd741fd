import pytest
import torch

from compress.quant.baselines import encode_kmeans, encode_rtn
from compress.format.weights import decode
from compress.quant.jlcm import JLCMConfig, group_rows, jlcm_learn, nearest_rows, proximal_step, quantize_jlcm
from compress.quant.kmeans import kmeans_1d
from compress.quant.stats import LayerStats, quadratic_loss


def _layer(rows: int = 64, cols: int = 96, samples: int = 2048, seed: int = 0) -> tuple[torch.Tensor, LayerStats]:
    """A trained-looking layer: rows of different scales, heavy tails, correlated inputs of uneven energy."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(samples, cols, generator=gen) @ mix * (torch.rand(cols, generator=gen) * 2 + 0.1)
    tails = torch.randn(rows, cols, generator=gen) ** 3
    w = tails / tails.std() * (torch.rand(rows, 1, generator=gen) * 2 + 0.2)
    stats = LayerStats.zeros(1, cols)
    stats.add(x[None])
    return w, stats.finalize()


def _error(encoded: tuple, w: torch.Tensor, stats: LayerStats) -> float:
    return float(quadratic_loss(decode(*encoded).reshape(w.shape), w, stats))


def test_proximal_step_moves_only_to_neighbours() -> None:
    gen = torch.Generator().manual_seed(0)
    rows, cols, k = 16, 40, 8
    tables = torch.sort(torch.randn(rows, k, generator=gen), dim=1).values
    idx = torch.randint(0, k, (rows, cols), generator=gen)
    curvature = torch.rand(rows, cols, generator=gen) * 0.1
    for scale in (0.01, 1.0, 100.0):  # even huge scores move one codeword at most
        score = torch.randn(rows, cols, generator=gen) * scale
        new, moved = proximal_step(idx, score, tables, curvature)
        step = new - idx
        assert step.abs().max() <= 1, "an index moved more than one codeword"
        assert ((step != 0) == moved).all() and new.min() >= 0 and new.max() < k
        # a move goes against the score (down the loss): up only where the score is negative
        assert (score[step > 0] < 0).all() and (score[step < 0] > 0).all()
        # and only when the first-order gain beats the curvature cost of the jump
        d = torch.gather(tables, 1, new) - torch.gather(tables, 1, idx)
        assert (-score * d - 0.5 * curvature * d * d)[moved].min() > 0
    capped, moved = proximal_step(idx, torch.randn(rows, cols, generator=gen) * 100, tables, curvature, max_moves=10)
    assert int(moved.sum()) <= 10


def test_group_rows_cuts_sorted_rows_into_equal_groups() -> None:
    stat = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 0.0, 7.0, 6.0])
    groups, order = group_rows(stat, 4)
    assert torch.equal(order, torch.argsort(stat))
    assert groups.tolist() == [2, 0, 1, 1, 2, 0, 3, 3], "rows of similar statistic share a group"
    assert torch.bincount(groups).tolist() == [2, 2, 2, 2]


def test_jlcm_beats_kmeans_and_rtn_at_2_bits() -> None:
    w, stats = _layer()
    rtn = _error(encode_rtn(w, 2), w, stats)
    kmeans = _error(encode_kmeans(w, 2), w, stats)
    init = _error(quantize_jlcm(w, stats, 2, JLCMConfig(bits=2, calib_steps=0)), w, stats)
    jlcm = _error(quantize_jlcm(w, stats, 2, JLCMConfig(bits=2, calib_steps=100)), w, stats)
    assert init < kmeans, f"grouped k-means init {init:.4f} should beat one codebook {kmeans:.4f}"
    assert jlcm < 0.8 * init, f"joint learning {jlcm:.4f} should clearly improve on its init {init:.4f}"
    assert jlcm < kmeans < rtn, f"jlcm {jlcm:.4f}, kmeans {kmeans:.4f}, rtn {rtn:.4f}"


@pytest.mark.parametrize("options", [{"variant": "shared-codebook-scale"}, {"mapping": "ste"}, {"mapping": "frozen"},
                                     {"row_map": "order"}, {"statistic": "range"}])
def test_variants_and_ablations_run_and_improve_on_kmeans(options: dict) -> None:
    w, stats = _layer(rows=32, cols=48, samples=512, seed=1)
    kmeans = _error(encode_kmeans(w, 2), w, stats)
    got = _error(quantize_jlcm(w, stats, 2, JLCMConfig(bits=2, calib_steps=40, **options)), w, stats)
    assert got < kmeans, f"{options}: {got:.4f} vs kmeans {kmeans:.4f}"


def test_learning_never_ends_worse_than_its_start_and_keeps_codebooks_sorted() -> None:
    w, stats = _layer(rows=32, cols=48, samples=64, seed=2)  # fewer samples than columns: correlated, rank-deficient
    rows, cols = w.shape
    groups, _ = group_rows(w.std(dim=1), 4)
    tables = torch.stack([kmeans_1d(w[groups == g], 8) for g in range(4)])
    idx = nearest_rows(w, tables[groups])
    start = float(quadratic_loss(torch.gather(tables[groups], 1, idx), w, stats))
    unit = torch.stack([w[groups == g].std() for g in range(4)])
    history: list[float] = []
    new_idx, new_tables, _, loss = jlcm_learn(w, stats, idx, groups, tables, unit, JLCMConfig(bits=3, calib_steps=60),
                                              history=history)
    assert loss <= start + 1e-6 and len(history) == 60
    assert abs(loss - float(quadratic_loss(torch.gather(new_tables[groups], 1, new_idx), w, stats))) < 1e-4
    assert (new_tables[:, 1:] > new_tables[:, :-1]).all()


def test_depthwise_rows_of_nine_work_where_per_row_rtn_cannot() -> None:
    # a depthwise 3x3 conv: 96 rows of 9 weights, channel scales spread over two orders of magnitude
    gen = torch.Generator().manual_seed(3)
    channels = 96
    scales = torch.logspace(-2, 0, channels)[torch.randperm(channels, generator=gen)]
    w = torch.randn(channels, 9, generator=gen) * scales[:, None]
    x = torch.randn(channels, 4096, 9, generator=gen) * (torch.rand(channels, 1, 1, generator=gen) + 0.5)
    stats = LayerStats.zeros(channels, 9)
    stats.add(x)
    stats = stats.finalize()
    from compress.format.weights import bits_per_weight

    def run(encoded: tuple) -> tuple[float, float]:
        return bits_per_weight(encoded[0]), _error(encoded, w, stats)

    # per-row scale + offset cost 32 bits per 9 weights: 2-bit rtn stores 5.6 bits a weight
    rtn_bits, rtn_err = run(encode_rtn(w, 2))
    # 4 group codebooks shared by 24 rows each; indices packed flat (no padding of 9-weight rows)
    jlcm3_bits, jlcm3_err = run(quantize_jlcm(w, stats, 3, JLCMConfig(bits=3, groups=4, calib_steps=60)))
    jlcm4_bits, jlcm4_err = run(quantize_jlcm(w, stats, 4, JLCMConfig(bits=4, groups=4, calib_steps=60)))
    assert rtn_bits == pytest.approx(2 + 32 / 9) and jlcm3_bits < 4 and jlcm4_bits < rtn_bits
    assert jlcm3_err < 0.6 * rtn_err, f"3-bit jlcm {jlcm3_err:.4f} ({jlcm3_bits:.2f} b/w), rtn {rtn_err:.4f} ({rtn_bits:.2f})"
    assert jlcm4_err < 0.2 * rtn_err, f"4-bit jlcm {jlcm4_err:.4f} ({jlcm4_bits:.2f} b/w), rtn {rtn_err:.4f} ({rtn_bits:.2f})"
    kmeans_bits, kmeans_err = run(encode_kmeans(w, 3))
    assert jlcm3_err < 0.7 * kmeans_err, f"one codebook for all channels fails on spread scales ({kmeans_err:.4f})"


def test_learning_stops_early_once_converged() -> None:
    w, stats = _layer(rows=32, cols=48, samples=512, seed=4)
    rows, cols = w.shape
    groups, _ = group_rows(w.std(dim=1), 4)
    tables = torch.stack([kmeans_1d(w[groups == g], 4) for g in range(4)])
    idx = nearest_rows(w, tables[groups])
    unit = torch.stack([w[groups == g].std() for g in range(4)])
    full: list[float] = []
    short: list[float] = []
    *_, loss_full = jlcm_learn(w, stats, idx, groups, tables, unit, JLCMConfig(bits=2, calib_steps=300), history=full)
    *_, loss_short = jlcm_learn(w, stats, idx, groups, tables, unit,
                                JLCMConfig(bits=2, calib_steps=300, converge_steps=20, converge_tol=1e-3), history=short)
    assert len(full) == 300 and 20 < len(short) < 300, len(short)
    assert loss_short <= full[0] and loss_short < 1.1 * loss_full


@pytest.mark.parametrize("options", [{}, {"variant": "shared-codebook-scale"}, {"groups": 64}, {"init_points": 16}])
def test_widths_at_once_encode_what_each_width_encodes(options: dict) -> None:
    from compress.quant.jlcm import quantize_jlcm_widths

    w, stats = _layer(rows=64, cols=40, samples=256)
    config = JLCMConfig(**options).quick()
    many = quantize_jlcm_widths(w, [1, 3, 2, 8, 6], config)
    assert sorted(many) == [1, 2, 3, 6, 8]
    for bits, (layout, buffers) in many.items():
        one_layout, one_buffers = quantize_jlcm(w, None, bits, config)
        assert layout == one_layout and buffers.keys() == one_buffers.keys()
        assert all(torch.equal(buffers[k], one_buffers[k]) for k in buffers), (bits, options)
    learned = quantize_jlcm_widths(w, [2], JLCMConfig(calib_steps=5, **options), stats)[2]
    assert torch.equal(decode(*learned), decode(*quantize_jlcm(w, stats, 2, JLCMConfig(calib_steps=5, **options))))


def test_underdetermined_layers_learn_for_fewer_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """scale_underdetermined_steps: fewer calibration rows than inputs -> calib_steps x rows / inputs steps."""
    import compress.quant.jlcm as jlcm

    steps: list[int] = []
    learn = jlcm.jlcm_learn

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        steps.append(args[6].calib_steps)
        return learn(*args, **kwargs)

    monkeypatch.setattr(jlcm, "jlcm_learn", counting)
    w, _ = _layer(rows=16, cols=64)
    for samples in (16, 256):
        _, stats = _layer(rows=16, cols=64, samples=samples)
        for scale in (True, False):
            quantize_jlcm(w, stats, 2, JLCMConfig(calib_steps=40, scale_underdetermined_steps=scale))
    assert steps == [10, 40, 40, 40], "16 rows for 64 inputs: a quarter of the steps; 256 rows: all of them"


def test_column_scales_follow_the_input_energy_and_decode_what_was_learned() -> None:
    w, stats = _layer()
    layout, buffers = quantize_jlcm(w, stats, 2, JLCMConfig(bits=2, calib_steps=50, column_scale=0.5))
    factor = buffers["column_scale"].float()  # 1 / s, s = rms(x)^0.5 over the columns, geometric mean 1
    rms = torch.diagonal(stats.H[0]).sqrt()
    product = factor * rms.pow(0.5)
    assert torch.allclose(product, product.mean().expand_as(product), rtol=2e-3), "one constant: the normalisation"
    assert factor.log().mean().abs() < 1e-2
    scaled = _error((layout, buffers), w, stats)
    assert scaled < _error(encode_kmeans(w, 2), w, stats), "learned on the scaled columns, scored on the real ones"
