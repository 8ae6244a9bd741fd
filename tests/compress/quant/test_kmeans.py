import itertools

import torch

from compress.quant.kmeans import assign_nearest, kmeans_1d, kmeans_1d_widths, kmeans_sse


def _brute_force_sse(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """Best weighted SSE over every assignment of the points to k clusters."""
    best = float("inf")
    n = x.numel()
    for labels in itertools.product(range(k), repeat=n):
        if len(set(labels)) != k:
            continue
        lab = torch.tensor(labels)
        sse = 0.0
        for c in range(k):
            m = lab == c
            mean = (w[m] * x[m]).sum() / w[m].sum()
            sse += float((w[m] * (x[m] - mean) ** 2).sum())
        best = min(best, sse)
    return best


def test_kmeans_is_optimal_on_toys() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        x = torch.randn(6, generator=gen, dtype=torch.float64) * (1 + trial)
        w = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
        k = 2 + trial % 2
        centroids = kmeans_1d(x, k, w)
        got = kmeans_sse(x.float(), centroids, w.float())
        best = _brute_force_sse(x, w, k)
        assert abs(got - best) <= 1e-4 * max(best, 1e-6), f"trial {trial}: k-means SSE {got} vs optimum {best}"
        assert torch.all(centroids[1:] > centroids[:-1]), "codebook must be sorted and distinct"


def test_kmeans_beats_lloyd_trap() -> None:
    # three tight clusters, one far away: Lloyd from a bad start merges clusters, the exact DP does not
    x = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 5.2, 10.0, 10.1, 10.2, 100.0])
    c = kmeans_1d(x, 4)
    assert torch.allclose(c, torch.tensor([0.1, 5.1, 10.1, 100.0]), atol=1e-5), c


def test_large_input_is_close_to_optimal_and_few_values_fill_the_codebook() -> None:
    x = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    c = kmeans_1d(x, 4)
    # Lloyd-Max optimum for a unit Gaussian at 4 levels has MSE 0.1175
    assert abs(kmeans_sse(x, c) / x.numel() - 0.1175) < 0.01
    few = kmeans_1d(torch.tensor([1.0, 1.0, 2.0]), 4)
    assert few.numel() == 4 and torch.all(few[1:] > few[:-1]), few
    expected = torch.tensor([int((few == 1).nonzero()), int((few == 2).nonzero())])
    assert torch.equal(assign_nearest(torch.tensor([1.0, 2.0]), few), expected)


def test_several_widths_at_once_give_what_each_width_gives() -> None:
    """One sort, summary and dynamic programme for every k: the centroids of each k must be those of a call for
    that k alone, bit for bit (the sensitivity measurement relies on it)."""
    gen = torch.Generator().manual_seed(0)
    for n, max_points in ((7, 256), (300, 64), (2000, 256)):
        x = torch.randn(n, generator=gen) ** 3
        w = torch.rand(n, generator=gen)
        for weights in (None, w):
            many = kmeans_1d_widths(x, [8, 2, 32, 4], weights, max_points=max_points)
            assert sorted(many) == [2, 4, 8, 32]
            for k, centroids in many.items():
                assert torch.equal(centroids, kmeans_1d(x, k, weights, max_points=max_points)), (n, k)
