"""raw_forward of two-stage torchvision detectors: the ROI heads run on fixed boxes, the same for any model."""
import torch

from compress.models import build_model
from compress.models.protocol import flat_tensors, proposal_grid, raw_forward


def test_proposal_grid_lies_inside_the_image_and_has_area():
    boxes = proposal_grid(48, 80)
    assert boxes.shape == (144, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 48).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_two_stage_raw_forward_gives_rpn_and_roi_head_tensors():
    torch.manual_seed(0)
    model = build_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, min_size=64,
                        max_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = raw_forward(model, x)
        again = raw_forward(model, x)
    assert {"objectness", "rpn_deltas", "class_logits", "box_regression"} == set(out)
    assert out["class_logits"].shape == (2 * 144, 3) and out["box_regression"].shape == (2 * 144, 12)
    assert all(torch.equal(a, b) for a, b in zip(flat_tensors(out), flat_tensors(again))), "fixed boxes: deterministic"
    out["class_logits"].sum()  # a plain tensor: differentiable outputs for distillation
    x.requires_grad_(True)
    raw_forward(model, x)["class_logits"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "the ROI heads are connected to the input"
