import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compress.distill import attention_loss, attention_map
from compress.distill.layers import auto_layers
from compress.stages.distill import AttentionDistillHook, DistillConfig
from compress.models import build_model
from compress.pipeline import RunContext, make_accelerator
from compress.recipe import load_recipe
from compress.tasks import get_task
from compress.train import fit


def test_attention_map_on_known_tensor() -> None:
    feature = torch.zeros(1, 2, 2, 2)
    feature[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    feature[0, 1] = torch.tensor([[-1.0, 2.0], [0.0, 0.0]])
    # mean over channels of A^2: [[1, 2], [0, 0]] -> flattened [1, 2, 0, 0] / sqrt(5)
    expected = torch.tensor([[1.0, 2.0, 0.0, 0.0]]) / math.sqrt(5)
    assert torch.allclose(attention_map(feature), expected)
    assert torch.allclose(attention_map(torch.randn(3, 5, 4, 4)).norm(dim=1), torch.ones(3)), "L2-normalised per image"


def test_attention_ignores_channel_count_and_resizes() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 16, 8, 8)
    assert attention_loss(teacher[:, :4].repeat(1, 4, 1, 1), teacher) < attention_loss(torch.randn(2, 4, 8, 8), teacher)
    assert attention_loss(teacher, teacher) == 0
    assert attention_loss(torch.randn(2, 3, 4, 4), teacher).ndim == 0, "a smaller student map is resized"


def _ctx(tiny_recipe_path: Path, tmp_path: Path) -> RunContext:
    recipe = load_recipe(tiny_recipe_path)
    tmp_path.mkdir(exist_ok=True)
    ctx = RunContext(recipe=recipe, run_dir=tmp_path, accelerator=make_accelerator(), task=get_task("classification"))
    ctx.stage_index, ctx.stage_name = 0, "distill"
    return ctx


def test_distill_hook_trains_student_leaves_teacher_and_removes_hooks(tiny_recipe_path: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ctx = _ctx(tiny_recipe_path, tmp_path)
    teacher = build_model("compress:digits-cnn", num_classes=10).eval().requires_grad_(False)
    student = build_model("compress:digits-cnn", num_classes=10, widths=(8, 16, 32))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    layers = auto_layers(student, torch.rand(1, 3, 32, 32))
    assert [l.name for l in layers] == ["stage2", "stage3"]
    config = DistillConfig(epochs=3, lr=3e-3, warmup_epochs=0, output_kd={"weight": 1.0})
    hook = AttentionDistillHook(student, teacher, layers, config, ctx)
    seen: list[float] = []

    class Record(nn.Module):
        pass

    original = hook.extra_loss

    def recording(model, batch):
        terms = original(model, batch)
        seen.append(terms["attention"].item())
        return terms

    hook.extra_loss = recording
    fit(student, ctx, config, hooks=[hook])
    hook.remove()
    per_epoch = len(seen) // 3
    first, last = sum(seen[:per_epoch]) / per_epoch, sum(seen[-per_epoch:]) / per_epoch
    assert last < first, f"attention loss should decrease: {first:.4g} -> {last:.4g}"
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher {key} changed"
    for module in list(student.modules()) + list(teacher.modules()):
        assert not module._forward_hooks, f"hook left on {type(module).__name__}"


def test_before_prune_teacher_needs_a_prune_stage(tiny_recipe_path: Path, tmp_path: Path) -> None:
    from compress.stages.teacher import load_teacher
    from compress.errors import UserError

    ctx = _ctx(tiny_recipe_path, tmp_path)
    ctx.finished = [{"name": "finetune", "checkpoint": "x"}]
    with pytest.raises(UserError, match="needs a prune stage earlier"):
        load_teacher("before-prune", ctx)


def test_per_layer_betas_override_roles_and_balance_evens_the_first_terms(tiny_recipe_path: Path,
                                                                          tmp_path: Path) -> None:
    from compress.errors import UserError
    from compress.stages.distill import AttentionConfig, fixed_betas, initial_attention_losses

    torch.manual_seed(0)
    ctx = _ctx(tiny_recipe_path, tmp_path)
    teacher = build_model("compress:digits-cnn", num_classes=10).eval().requires_grad_(False)
    student = build_model("compress:digits-cnn", num_classes=10, widths=(8, 16, 32)).train()
    x = torch.rand(8, 3, 32, 32)
    layers = auto_layers(student, x)
    roles = {l.name: l.role for l in layers}
    config = AttentionConfig(weights={"backbone": 3.0, "coarsest": 5.0}, layer_weights={"stage2": 7.0})
    assert fixed_betas(layers, config) == {"stage2": 7.0, "stage3": 5.0 if roles["stage3"] == "coarsest" else 3.0}
    with pytest.raises(UserError, match="'stage9' is not a distilled layer; these are stage2, stage3"):
        fixed_betas(layers, AttentionConfig(layer_weights={"stage9": 1.0}))
    with pytest.raises(ValueError, match="a weight is >= 0"):
        AttentionConfig(layer_weights={"stage2": -1.0})

    student.eval()
    buffers = {k: v.clone() for k, v in student.state_dict().items()}
    start = initial_attention_losses(student, teacher, layers, 2.0, [x])
    assert not student.training and not teacher.training, "modes are restored"
    assert all(torch.equal(v, buffers[k]) for k, v in student.state_dict().items()), "BN statistics are restored"
    assert set(start) == {"stage2", "stage3"} and all(v > 0 for v in start.values())
    betas = {name: 0.25 / loss for name, loss in start.items()}
    hook = AttentionDistillHook(student, teacher, layers, DistillConfig(attention={"balance": 0.25}), ctx, betas)
    try:
        with torch.no_grad():
            student.train()(x)
            terms = hook.extra_loss(student, (x, torch.zeros(8, dtype=torch.long)))
    finally:
        hook.remove()
    assert terms["attention"].item() == pytest.approx(0.25 * len(layers), rel=1e-4), "each layer starts at `balance`"
    from compress.stages.distill import balanced_betas

    assert balanced_betas({"a": 0.5, "b": 0.0}, 1.0) == {"a": 2.0, "b": 1.0 / 0.0025}, "an untouched layer: no huge beta"
