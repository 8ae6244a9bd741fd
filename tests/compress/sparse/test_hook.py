"""The sparse hook adds the L1 sub-gradient to prunable BN channels, exactly once per optimiser step."""
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml

from compress.pipeline import RunContext, make_accelerator
from compress.recipe import parse_recipe
from compress.sparse import SparseHook
from compress.stages.sparse import SparseConfig, sparse as sparse_stage
from compress.tasks import get_task
from compress.train import TrainConfig, fit

S = 1e-2


def _bn_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    model[1].weight.data = torch.tensor([0.5, -0.75, 0.25, 1.0])
    return model


def test_after_backward_adds_rate_times_sign_on_prunable_channels_only():
    model = _bn_model()
    hook = SparseHook({"1": np.array([True, True, False, True])}, {"1": "g"}, "constant", rate=S)
    hook.on_train_start(model, total_steps=10)
    model[1].weight.grad = torch.full((4,), 0.1)
    hook.after_backward(model, step=0, epoch=0)
    assert torch.allclose(model[1].weight.grad, torch.tensor([0.1 + S, 0.1 - S, 0.1, 0.1 + S]))
    assert model[3].weight.grad is None, "a BN that is not prunable is left alone"
    assert hook.applied == 1


def test_dynamic_hook_protects_after_switch():
    model = _bn_model()
    hook = SparseHook({"1": np.ones(4, bool)}, {"1": "g"}, "dynamic", rate=S, switch_at=0.5, protected_share=0.5)
    hook.on_train_start(model, total_steps=10)
    hook.after_backward(model, step=4, epoch=0)
    assert torch.allclose(model[1].weight.grad.abs(), torch.full((4,), S))
    model[1].weight.grad = None
    hook.after_backward(model, step=5, epoch=0)
    assert torch.allclose(model[1].weight.grad, torch.tensor([S, -0.01 * S, S, 0.01 * S])), \
        "the two largest |gamma| (1.0 and -0.75) get 0.01 s, with their sign"
    figures = hook.on_epoch_end(model, 0)
    assert figures == {"small_gamma": 0.0, "small_gamma[g]": 0.0}


def _ctx(tmp_path: Path, tiny_recipe_path: Path, samples: int = 32) -> RunContext:
    data = yaml.safe_load(tiny_recipe_path.read_text())
    data["data"]["train"]["samples"] = samples  # one batch of 32: one optimiser step per epoch
    recipe = parse_recipe(data)
    (tmp_path / "run").mkdir()
    return RunContext(recipe=recipe, run_dir=tmp_path / "run", accelerator=make_accelerator(),
                      task=get_task("classification"), stage_index=0, stage_name="sparse")


def test_subgradient_reaches_the_update_once_per_step(tmp_path: Path, tiny_recipe_path: Path):
    """One SGD step with and without the hook from the same start: the BN scales differ by exactly
    lr * (1 + momentum) * s * sign(gamma) (Nesterov's first step), i.e. the term was added once."""
    from compress.models import build_model

    cfg = TrainConfig(epochs=1, lr=0.1, optimizer="sgd", momentum=0.9, warmup_epochs=0, grad_clip=None,
                      weight_decay=0.0, schedule="constant")
    ctx = _ctx(tmp_path, tiny_recipe_path)
    torch.manual_seed(0)
    start = build_model("compress:digits-cnn", num_classes=10)
    plain = fit(_copy(start), ctx, cfg)
    channels = {"stem.1": np.ones(16, bool), "stage1.conv2.1": np.r_[np.ones(8, bool), np.zeros(8, bool)]}
    hook = SparseHook(channels, {}, "constant", rate=S)
    sparse = fit(_copy(start), ctx, cfg, [hook])
    assert hook.applied == hook.total_steps == 1
    expected = -0.1 * 1.9 * S * torch.sign(start.stem[1].weight)
    delta = sparse.stem[1].weight - plain.stem[1].weight
    assert torch.allclose(delta, expected, atol=1e-6), (delta, expected)
    delta2 = sparse.stage1.conv2[1].weight - plain.stage1.conv2[1].weight
    assert torch.allclose(delta2[:8], torch.full((8,), -0.1 * 1.9 * S), atol=1e-6)
    assert torch.allclose(delta2[8:], torch.zeros(8), atol=1e-6), "channels outside the mask get nothing"


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_sparse_stage_targets_the_prune_stages_bns(tmp_path: Path, tiny_recipe_path: Path):
    ctx = _ctx(tmp_path, tiny_recipe_path, samples=64)
    from compress.models import build_model

    model = build_model("compress:digits-cnn", num_classes=10)
    config = SparseConfig(epochs=1, warmup_epochs=0, sparsity_rate=1e-3, ignore=["stage3.*"])
    out = sparse_stage(model, config, ctx)
    log = (ctx.run_dir / "log.txt").read_text()
    assert "sparse: L1 (dynamic, s=0.001) on" in log and "small_gamma[stride" in log, log
    assert "small_gamma" in ctx.stage_metrics
    assert isinstance(out, nn.Module)


def _sparsify(schedule: str, steps: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Train a conv-BN-head regressor whose target reads only channels 0-3 of 16, with the L1 hook under AdamW."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16, 1))
    hook = SparseHook({"1": np.ones(16, dtype=bool)}, {"1": "g"}, schedule, rate=1e-2, protected_share=0.25)
    hook.on_train_start(model, total_steps=steps)
    opt = torch.optim.AdamW([{"params": model[1].weight, "weight_decay": 0.0},
                             {"params": [p for n, p in model.named_parameters() if n != "1.weight"]}], lr=1e-2)
    for step in range(steps):
        x = torch.randn(64, 16, 1, 1)
        loss = (model(x).squeeze(1) - x[:, :4].sum((1, 2, 3))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        hook.after_backward(model, step, 0)
        opt.step()
    return model[1].weight.detach().abs(), loss.detach()


def test_l1_zeroes_the_channels_the_task_does_not_need():
    gamma, loss = _sparsify("dynamic")
    assert gamma[4:].median() < 1e-2, f"unneeded channels should be near zero, got {gamma[4:]}"
    assert set(gamma.topk(4).indices.tolist()) == {0, 1, 2, 3}, f"the channels the target reads must survive: {gamma}"
    assert gamma[:4].min() > 10 * gamma[4:].max()
    assert loss < 0.2  # the target has variance 4: losing a needed channel costs about 1


def test_dynamic_schedule_keeps_protected_channels_larger_than_constant():
    dynamic, _ = _sparsify("dynamic")
    constant, _ = _sparsify("constant")
    assert dynamic[:4].sum() > constant[:4].sum()
