"""Assignment, loss and postprocessing for the YOLO tensor protocol; depends only on num_classes and strides.

Each output map is [B, 4 + nc, h, w]: raw (l, t, r, b) distances (pixels = softplus(raw) * stride) from the
cell centre ((j + 0.5) * stride, (i + 0.5) * stride), then class logits.

Assignment (FCOS / YOLOX centre sampling): location p is positive for GT box g when p's centre is inside g,
within `CENTRE_RADIUS * stride` of g's centre, and g's longer side fits p's level size range; a location claimed
by several boxes takes the smallest; a box that got no location takes the one nearest its centre on a level it
fits. Loss: GIoU on the positives' decoded boxes + quality focal loss on the classes (target = IoU of the
predicted box with its GT for the assigned class, 0 elsewhere), both divided by the number of positives.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CENTRE_RADIUS = 2.5  # in strides
BOX_WEIGHT = 2.0
CLS_WEIGHT = 1.0
QFL_BETA = 2.0
PRE_NMS_TOPK = 1000


def level_size_ranges(strides: tuple[int, ...]) -> list[tuple[float, float]]:
    """Box sizes (longer side, pixels) each level learns: [4s, 16s], open at both ends; neighbours overlap 2x."""
    ranges = []
    for i, s in enumerate(strides):
        lo = 0.0 if i == 0 else 4.0 * s
        hi = math.inf if i == len(strides) - 1 else 16.0 * s
        ranges.append((lo, hi))
    return ranges


def flatten_outputs(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Per-level maps [B, C, h, w] -> one [B, P, C] tensor, P = sum of h*w, levels in order, row-major."""
    return torch.cat([o.flatten(2) for o in outputs], dim=2).transpose(1, 2).float()


def make_points(
    outputs: list[torch.Tensor], strides: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cell centres [P, 2] (x, y pixels), stride per point [P] and size range per point [P, 2]."""
    centres, point_strides, ranges = [], [], []
    for out, s, (lo, hi) in zip(outputs, strides, level_size_ranges(strides)):
        h, w = out.shape[-2:]
        ys, xs = torch.meshgrid(
            torch.arange(h, device=out.device, dtype=torch.float32),
            torch.arange(w, device=out.device, dtype=torch.float32),
            indexing="ij",
        )
        centres.append(torch.stack([(xs + 0.5) * s, (ys + 0.5) * s], dim=-1).reshape(-1, 2))
        point_strides.append(torch.full((h * w,), float(s), device=out.device))
        ranges.append(torch.tensor([[lo, hi]], device=out.device).expand(h * w, 2))
    return torch.cat(centres), torch.cat(point_strides), torch.cat(ranges)


def decode_boxes(raw: torch.Tensor, centres: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Raw ltrb [..., P, 4] -> xyxy pixels [..., P, 4] around the cell centres."""
    dist = F.softplus(raw) * strides[:, None]
    return torch.cat([centres - dist[..., :2], centres + dist[..., 2:]], dim=-1)


def assign(
    centres: torch.Tensor,
    strides: torch.Tensor,
    ranges: torch.Tensor,
    gt_boxes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives of one image: (fg mask [P] bool, index of the assigned GT box [P] long)."""
    num_points, num_gt = centres.shape[0], gt_boxes.shape[0]
    if num_gt == 0:
        return (torch.zeros(num_points, dtype=torch.bool, device=centres.device),
                torch.zeros(num_points, dtype=torch.long, device=centres.device))
    x, y = centres[:, 0:1], centres[:, 1:2]  # [P, 1]
    x1, y1, x2, y2 = gt_boxes.unbind(-1)  # [N] each
    inside = torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=-1).amin(-1) > 0  # [P, N]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    radius = CENTRE_RADIUS * strides[:, None]  # [P, 1]
    near = ((x - cx).abs() < radius) & ((y - cy).abs() < radius)  # [P, N]
    size = torch.maximum(x2 - x1, y2 - y1)  # [N]
    fits = (size >= ranges[:, 0:1]) & (size <= ranges[:, 1:2])  # [P, N]
    valid = inside & near & fits

    # every box gets at least one location: the one nearest its centre on a level whose range it fits
    unmatched = (~valid.any(0)).nonzero().squeeze(1)
    if unmatched.numel():
        dist2 = ((x - cx) ** 2 + (y - cy) ** 2).masked_fill(~fits, math.inf)  # [P, N]
        nearest = dist2[:, unmatched].argmin(0)
        valid[nearest, unmatched] = True

    area = ((x2 - x1) * (y2 - y1))[None].expand(num_points, num_gt)
    cost = torch.where(valid, area, torch.full_like(area, math.inf))
    min_cost, gt_index = cost.min(dim=1)  # ties -> smallest box
    return torch.isfinite(min_cost), gt_index


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of a[i] with b[i] for xyxy boxes [N, 4] -> [N]."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def quality_focal_loss(logits: torch.Tensor, target: torch.Tensor, beta: float = QFL_BETA) -> torch.Tensor:
    """Sum over elements of BCE(logits, soft target) * |sigmoid(logits) - target|^beta (GFL, Li et al. 2020)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * (logits.sigmoid() - target).abs().pow(beta)).sum()


def detection_loss(
    outputs: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
    num_classes: int,
    strides: tuple[int, ...],
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch: (CLS_WEIGHT * QFL + BOX_WEIGHT * GIoU) / num positives, and its parts as floats."""
    preds = flatten_outputs(outputs)  # [B, P, 4 + nc]
    centres, point_strides, ranges = make_points(outputs, strides)
    boxes = decode_boxes(preds[..., :4], centres, point_strides)  # [B, P, 4]
    logits = preds[..., 4:]  # [B, P, nc]

    batch_idx, point_idx, gt_boxes, gt_labels = [], [], [], []
    for b, target in enumerate(targets):
        tb = target["boxes"].to(preds.device, torch.float32).reshape(-1, 4)
        tl = target["labels"].to(preds.device, torch.long).reshape(-1)
        fg, gt_index = assign(centres, point_strides, ranges, tb)
        pos = fg.nonzero().squeeze(1)
        batch_idx.append(torch.full_like(pos, b))
        point_idx.append(pos)
        gt_boxes.append(tb[gt_index[pos]])
        gt_labels.append(tl[gt_index[pos]])
    batch_idx, point_idx = torch.cat(batch_idx), torch.cat(point_idx)
    gt_boxes, gt_labels = torch.cat(gt_boxes), torch.cat(gt_labels)
    num_pos = max(int(point_idx.numel()), 1)

    pos_boxes = boxes[batch_idx, point_idx]  # [Npos, 4]
    if point_idx.numel():
        from torchvision.ops import generalized_box_iou_loss  # torchvision loads torch._dynamo: only when training

        loss_box = generalized_box_iou_loss(pos_boxes, gt_boxes, reduction="sum") / num_pos
    else:
        loss_box = boxes.sum() * 0.0  # keeps the graph connected
    cls_target = torch.zeros_like(logits)
    iou = paired_iou(pos_boxes.detach(), gt_boxes)
    cls_target[batch_idx, point_idx, gt_labels] = iou.clamp(min=0.0, max=1.0)
    loss_cls = quality_focal_loss(logits, cls_target) / num_pos

    loss = CLS_WEIGHT * loss_cls + BOX_WEIGHT * loss_box
    parts = {
        "cls": float(loss_cls.detach()),
        "box": float(loss_box.detach()),
        "iou": float(iou.mean()) if iou.numel() else 0.0,
        "num_pos": float(point_idx.numel()) / max(len(targets), 1),
    }
    return loss, parts


@torch.no_grad()
def postprocess(
    outputs: list[torch.Tensor],
    num_classes: int,
    strides: tuple[int, ...],
    conf_threshold: float = 0.001,
    iou_threshold: float = 0.6,
    max_det: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Decode boxes, keep (location, class) pairs above conf_threshold (top PRE_NMS_TOPK), class-wise NMS."""
    preds = flatten_outputs(outputs)
    centres, point_strides, _ = make_points(outputs, strides)
    height = outputs[0].shape[-2] * strides[0]
    width = outputs[0].shape[-1] * strides[0]
    boxes = decode_boxes(preds[..., :4], centres, point_strides)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, width)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, height)
    scores = preds[..., 4:].sigmoid()  # [B, P, nc]

    results = []
    for b in range(preds.shape[0]):
        flat = scores[b].flatten()  # [P * nc], index = point * nc + class
        idx = (flat > conf_threshold).nonzero().squeeze(1)
        if idx.numel() > PRE_NMS_TOPK:
            idx = idx[flat[idx].topk(PRE_NMS_TOPK).indices]
        point, label = idx // num_classes, idx % num_classes
        det_boxes, det_scores = boxes[b, point], flat[idx]
        from torchvision.ops import batched_nms

        keep = batched_nms(det_boxes, det_scores, label, iou_threshold)[:max_det]
        results.append({"boxes": det_boxes[keep], "scores": det_scores[keep], "labels": label[keep]})
    return results
