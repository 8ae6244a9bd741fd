import torch

from compress.quant.stats import LayerStats, quadratic_loss


def _both(groups: int, rows: int, cols: int, input_groups: int | None = None) -> tuple[LayerStats, LayerStats, torch.Tensor]:
    """The same batches accumulated as full moments (M, F) and for a known weight (P, energy)."""
    gen = torch.Generator().manual_seed(groups * 100 + rows)
    w = torch.randn(rows, cols, generator=gen)
    full, kept = LayerStats.zeros(groups, cols), LayerStats.zeros(groups, cols, weight=w)
    for _ in range(3):
        xf = torch.randn(groups, 40, cols, generator=gen)
        xq = xf + 0.1 * torch.randn(groups, 40, cols, generator=gen)
        full.add(xq, xf)
        kept.add(xq, xf)
    expand = input_groups or groups
    return full.finalize().expand(expand), kept.finalize().expand(expand), w


def test_weight_form_scores_like_full_moments() -> None:
    # one input group, grouped rows (a grouped conv) and one input shared by 3 row groups (q, k, v)
    for groups, rows, cols, expand in ((1, 4, 6, None), (2, 6, 4, None), (1, 6, 8, 3)):
        full, kept, w = _both(groups, rows, cols, expand)
        assert kept.M is None and kept.F is None, "fewer rows than columns per group: the P form"
        assert torch.allclose(full.target(w), kept.target(w), atol=1e-5)
        assert torch.allclose(full.output_energy(w), kept.output_energy(w), rtol=1e-5)
        wq = w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(quadratic_loss(wq, w, full), quadratic_loss(wq, w, kept), rtol=1e-4)
        # the ridge toward the float weights is the same in both forms
        d_full, d_kept = full.damped(0.3), kept.damped(0.3)
        assert torch.allclose(quadratic_loss(wq, w, d_full), quadratic_loss(wq, w, d_kept), rtol=1e-4)
        assert quadratic_loss(wq, w, d_kept) != quadratic_loss(wq, w, kept)


def test_full_moments_kept_where_cheaper() -> None:
    # as many rows as columns: M and F cost 2 n C^2, less than the 2 n R C of the P form
    assert LayerStats.zeros(1, 4, weight=torch.randn(8, 4)).M is not None
    assert LayerStats.zeros(2, 4, weight=torch.randn(8, 4)).M is not None
    assert LayerStats.zeros(2, 4, weight=torch.randn(6, 4)).M is None


def test_scaled_columns_leave_every_loss_unchanged() -> None:
    # moments of x / s scored for W * s: the same loss as the original moments for W (both forms)
    for full, kept, w in (_both(1, 4, 6), _both(2, 6, 4)):
        s = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(2)) * 3 + 0.2
        wq = w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
        for stats in (full, kept):
            scaled = stats.scaled_columns(s)
            assert torch.allclose(quadratic_loss(wq * s, w * s, scaled), quadratic_loss(wq, w, stats), rtol=1e-4)
