"""The reference YOLO: shapes, determinism, loss, assignment, postprocess, pruning graph, size."""
from __future__ import annotations

import math

import pytest
import torch

from compress.models import build_model
from compress.models import yolo_loss
from compress.models.yolo import YOLO

NC = 10


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [34.0, 30.0, 60.0, 58.0]]), "labels": torch.tensor([3, 7])},
        {"boxes": torch.tensor([[10.0, 12.0, 28.0, 30.0]]), "labels": torch.tensor([0])},
    ]


@pytest.fixture(scope="module")
def yolo_n() -> YOLO:
    torch.manual_seed(0)
    return build_model("compress:yolo-n", num_classes=NC)


@pytest.mark.parametrize("size", [128, 160])
def test_forward_shapes(yolo_n: YOLO, size: int) -> None:
    with torch.no_grad():
        outs = yolo_n.eval()(torch.rand(2, 3, size, size))
    assert isinstance(outs, list) and yolo_n.strides == (8, 16, 32)
    assert [tuple(o.shape) for o in outs] == [(2, 4 + NC, size // s, size // s) for s in yolo_n.strides]


def test_deterministic_given_seed() -> None:
    x = torch.rand(1, 3, 64, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            outs.append(build_model("compress:yolo-n", num_classes=NC).eval()(x))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_loss_finite_and_decreasing_when_overfitting() -> None:
    torch.manual_seed(0)
    model = build_model("compress:yolo-n", num_classes=NC).train()
    images, targets = torch.rand(2, 3, 64, 64), _targets()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        loss, parts = model.detection_loss(model(images), targets)
        assert torch.isfinite(loss) and set(parts) >= {"cls", "box"}
        assert all(isinstance(v, float) for v in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_loss_without_boxes_is_finite_and_differentiable(yolo_n: YOLO) -> None:
    outs = yolo_n.train()(torch.rand(2, 3, 64, 64))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    loss, parts = yolo_n.detection_loss(outs, [empty, empty])
    loss.backward()
    assert torch.isfinite(loss) and parts["num_pos"] == 0.0


def test_postprocess_boxes_inside_image_and_labels_in_range(yolo_n: YOLO) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        outs = yolo_n.eval()(torch.rand(3, 3, 96, 128))
        # push some raw distances far out so clipping is exercised
        outs[0][:, :4] += 5.0
    dets = yolo_n.postprocess(outs, conf_threshold=0.001, iou_threshold=0.6, max_det=50)
    assert len(dets) == 3
    for d in dets:
        n = d["boxes"].shape[0]
        assert 0 < n <= 50 and d["scores"].shape == (n,) and d["labels"].shape == (n,)
        b = d["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 128).all() and (b[:, 3] <= 96).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert d["labels"].dtype == torch.int64 and ((d["labels"] >= 0) & (d["labels"] < NC)).all()
        assert (d["scores"] >= 0.001).all() and (d["scores"][:-1] >= d["scores"][1:]).all()
    assert yolo_n.postprocess(outs, conf_threshold=1.1)[0]["boxes"].shape == (0, 4)


def test_loss_and_postprocess_ignore_channel_widths() -> None:
    """A narrower model (as after pruning) still trains and decodes: only num_classes and strides are read."""
    torch.manual_seed(0)
    model = YOLO(num_classes=NC, widths=(8, 8, 12, 20, 40))
    outs = model(torch.rand(2, 3, 64, 64))
    loss, _ = model.detection_loss(outs, _targets())
    loss.backward()
    assert len(model.postprocess([o.detach() for o in outs])) == 2


def test_assignment_rules() -> None:
    outs = [torch.zeros(1, 4 + NC, 64 // s, 64 // s) for s in (8, 16, 32)]
    centres, strides, ranges = yolo_loss.make_points(outs, (8, 16, 32))
    big = torch.tensor([0.0, 0.0, 48.0, 48.0])
    small = torch.tensor([12.0, 12.0, 28.0, 28.0])  # inside `big`
    tiny = torch.tensor([41.0, 49.0, 43.0, 51.0])  # 2 px: contains no cell centre
    fg, idx = yolo_loss.assign(centres, strides, ranges, torch.stack([big, small, tiny]))
    # the shared location (20, 20) goes to the smaller box
    p = ((centres[:, 0] == 20) & (centres[:, 1] == 20) & (strides == 8)).nonzero().item()
    assert fg[p] and idx[p] == 1
    assert set(idx[fg].tolist()) == {0, 1, 2}  # every box has a positive, even the tiny one
    # positives are inside their box and within 2.5 strides of its centre
    boxes = torch.stack([big, small, tiny])[idx[fg]]
    c = centres[fg]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert ((c - centre).abs() <= 2.5 * strides[fg, None] + 8).all()
    assert yolo_loss.level_size_ranges((8, 16, 32)) == [(0.0, 128.0), (64.0, 256.0), (128.0, math.inf)]


def test_torch_pruning_dependency_graph_builds(yolo_n: YOLO) -> None:
    tp = pytest.importorskip("torch_pruning")
    graph = tp.DependencyGraph().build_dependency(yolo_n.eval(), example_inputs=torch.randn(1, 3, 128, 128))
    assert len(list(graph.get_all_groups())) > 10


def test_sizes_yolo_s_bigger_than_yolo_n() -> None:
    counts = {}
    for name in ("yolo-n", "yolo-s"):
        model = build_model(f"compress:{name}", num_classes=NC)
        counts[name] = sum(p.numel() for p in model.parameters())
        print(f"{name}: {counts[name]:,} parameters")
    assert counts["yolo-s"] > 2.5 * counts["yolo-n"]
