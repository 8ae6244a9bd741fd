"""The L1 rate schedule: dynamic protects the largest |gamma| after the switch point; constant never does."""
import pytest
import torch

from compress.sparse import l1_rates, l1_subgradient

S = 1e-3


def test_constant_schedule_is_flat_everywhere():
    gamma = torch.rand(100)
    for progress in (0.0, 0.39, 0.4, 0.99):
        assert torch.all(l1_rates(gamma, progress, S, "constant") == S)


def test_dynamic_before_the_switch_is_flat():
    assert torch.all(l1_rates(torch.rand(100), 0.399, S, "dynamic") == S)


def test_dynamic_after_the_switch_protects_the_largest_share():
    gamma = torch.rand(200)
    rates = l1_rates(gamma, 0.4, S, "dynamic", switch_at=0.4, protected_share=0.35, protected_factor=0.01)
    protected = rates == 0.01 * S
    assert int(protected.sum()) == 70, "35 % of 200 channels"
    assert torch.all(rates[~protected] == S)
    assert gamma[protected].min() >= gamma[~protected].max(), "the protected ones are the largest |gamma|"


def test_dynamic_reranks_at_every_call():
    gamma = torch.arange(10.0)
    first = l1_rates(gamma, 0.9, S, "dynamic", protected_share=0.3) < S
    second = l1_rates(gamma.flip(0), 0.9, S, "dynamic", protected_share=0.3) < S
    assert first.nonzero().flatten().tolist() == [7, 8, 9] and second.nonzero().flatten().tolist() == [0, 1, 2]


def test_subgradient_is_rate_times_sign():
    gamma = torch.tensor([0.5, -0.2, 0.0])
    assert l1_subgradient(gamma, torch.full((3,), S)).tolist() == pytest.approx([S, -S, 0.0])


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        l1_rates(torch.rand(3), 0.5, S, "cosine")
