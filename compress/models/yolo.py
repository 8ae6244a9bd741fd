"""`compress:yolo-n` / `compress:yolo-s`: a reference YOLOv8-style anchor-free detector, written to be read.

Layout (yolo-n widths, 128x128 input):

    input [B, 3, 128, 128] float in [0, 1]
    backbone   stem  Conv s2              -> [B, 16, 64, 64]   P1
               Conv s2 + C2f              -> [B, 16, 32, 32]   P2
               Conv s2 + C2f              -> [B, 32, 16, 16]   P3  (stride 8)
               Conv s2 + C2f              -> [B, 64,  8,  8]   P4  (stride 16)
               Conv s2 + C2f + SPPF       -> [B,128,  4,  4]   P5  (stride 32)
    neck (PAN) top-down:  up(P5) ++ P4 -> C2f -> N4 [B, 64, 8, 8];  up(N4) ++ P3 -> C2f -> N3 [B, 32, 16, 16]
               bottom-up: down(N3) ++ N4 -> C2f -> N4' [B, 64, 8, 8]; down(N4') ++ P5 -> C2f -> N5 [B,128,4,4]
    head       per level, decoupled: box branch -> 4 maps, class branch -> num_classes maps
    output     list of 3 maps [B, 4 + num_classes, H/s, W/s] for s in (8, 16, 32)

Output layout per location: channels 0..3 are raw (left, top, right, bottom) distances from the cell centre,
decoded as softplus(raw) * stride pixels; channels 4.. are class logits (sigmoid, one-vs-all).
`detection_loss` and `postprocess` read only `num_classes` and `strides`, never parameter shapes, so they keep
working after channel pruning changes conv widths.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from compress.models import yolo_loss
from compress.models.registry import register_model

BOX_CHANNELS = 4


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> SiLU: the basic unit of the whole network."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, with a residual add when `shortcut` (channels unchanged)."""

    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block, YOLOv8 style: 1x1 conv, split in two halves, chain n Bottlenecks on the second half,
    concatenate every intermediate map, 1x1 conv back to `c_out`.

        x [B, c_in, H, W] -> cv1 -> [B, 2c, H, W] -> chunk -> a, b  (each [B, c, H, W])
        b -> m[0] -> b1 -> m[1] -> b2 ...
        cat(a, b, b1, ..., bn) [B, (2 + n) c, H, W] -> cv2 -> [B, c_out, H, W]
    """

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = c_out // 2  # hidden width of each half
        self.cv1 = Conv(c_in, 2 * self.c, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))
        self.cv2 = Conv((2 + n) * self.c, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, dim=1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools, concat with the input, 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, k: int = 5) -> None:
        super().__init__()
        c = c_in // 2
        self.cv1 = Conv(c_in, c, 1)
        self.pool = nn.MaxPool2d(k, stride=1, padding=k // 2)
        self.cv2 = Conv(4 * c, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)  # [B, c, H, W]
        y1 = self.pool(x)
        y2 = self.pool(y1)
        y3 = self.pool(y2)
        return self.cv2(torch.cat([x, y1, y2, y3], dim=1))  # [B, 4c, H, W] -> [B, c_out, H, W]


class Backbone(nn.Module):
    """Five stride-2 stages; returns P3, P4, P5 (strides 8, 16, 32)."""

    def __init__(self, widths: tuple[int, int, int, int, int], depth: int) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.stem = Conv(3, c1, 3, 2)  # /2
        self.stage2 = nn.Sequential(Conv(c1, c2, 3, 2), C2f(c2, c2, depth))  # /4
        self.stage3 = nn.Sequential(Conv(c2, c3, 3, 2), C2f(c3, c3, depth))  # /8
        self.stage4 = nn.Sequential(Conv(c3, c4, 3, 2), C2f(c4, c4, depth))  # /16
        self.stage5 = nn.Sequential(Conv(c4, c5, 3, 2), C2f(c5, c5, depth), SPPF(c5, c5))  # /32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3 = self.stage3(self.stage2(self.stem(x)))
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        return p3, p4, p5


class PAN(nn.Module):
    """Path-aggregation neck: top-down (upsample + concat) then bottom-up (stride-2 conv + concat)."""

    def __init__(self, c3: int, c4: int, c5: int, depth: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.td4 = C2f(c5 + c4, c4, depth, shortcut=False)
        self.td3 = C2f(c4 + c3, c3, depth, shortcut=False)
        self.down3 = Conv(c3, c3, 3, 2)
        self.bu4 = C2f(c3 + c4, c4, depth, shortcut=False)
        self.down4 = Conv(c4, c4, 3, 2)
        self.bu5 = C2f(c4 + c5, c5, depth, shortcut=False)

    def forward(self, p3: torch.Tensor, p4: torch.Tensor, p5: torch.Tensor) -> list[torch.Tensor]:
        n4 = self.td4(torch.cat([self.up(p5), p4], dim=1))  # [B, c4, H/16, W/16]
        n3 = self.td3(torch.cat([self.up(n4), p3], dim=1))  # [B, c3, H/8,  W/8]
        n4 = self.bu4(torch.cat([self.down3(n3), n4], dim=1))  # [B, c4, H/16, W/16]
        n5 = self.bu5(torch.cat([self.down4(n4), p5], dim=1))  # [B, c5, H/32, W/32]
        return [n3, n4, n5]


class HeadLevel(nn.Module):
    """Decoupled head of one level: box branch (2 Convs + 1x1 -> 4) and class branch (2 Convs + 1x1 -> nc)."""

    def __init__(self, c_in: int, c_box: int, c_cls: int, num_classes: int) -> None:
        super().__init__()
        self.box = nn.Sequential(Conv(c_in, c_box, 3), Conv(c_box, c_box, 3), nn.Conv2d(c_box, BOX_CHANNELS, 1))
        self.cls = nn.Sequential(Conv(c_in, c_cls, 3), Conv(c_cls, c_cls, 3), nn.Conv2d(c_cls, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.box(x), self.cls(x)], dim=1)  # [B, 4 + nc, h, w]

    def init_biases(self) -> None:
        """Start with boxes of about one stride per side and a 1% class prior (stable first steps)."""
        nn.init.constant_(self.box[-1].bias, math.log(math.e - 1.0))  # softplus(b) = 1
        nn.init.constant_(self.cls[-1].bias, -math.log((1 - 0.01) / 0.01))


class YOLO(nn.Module):
    """YOLOv8-style detector following the tensor protocol: forward returns raw per-level maps."""

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int, int, int] = (16, 16, 32, 64, 128),
        depth: int = 1,
        strides: tuple[int, int, int] = (8, 16, 32),
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.strides = tuple(int(s) for s in strides)
        c3, c4, c5 = widths[2:]
        self.backbone = Backbone(widths, depth)
        self.neck = PAN(c3, c4, c5, depth)
        c_box = max(16, c3 // 2)
        c_cls = max(c3, min(self.num_classes, 100))
        self.head = nn.ModuleList(HeadLevel(c, c_box, c_cls, self.num_classes) for c in (c3, c4, c5))
        for level in self.head:
            level.init_biases()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] in [0, 1] (H, W multiples of 32) -> [B, 4 + nc, H/s, W/s] for s in strides."""
        feats = self.neck(*self.backbone(x))
        return [head(f) for head, f in zip(self.head, feats)]

    def detection_loss(
        self, outputs: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Centre-sampling assignment + GIoU box loss + IoU-aware quality focal class loss."""
        return yolo_loss.detection_loss(outputs, targets, self.num_classes, self.strides)

    @torch.no_grad()
    def postprocess(
        self,
        outputs: list[torch.Tensor],
        conf_threshold: float = 0.001,
        iou_threshold: float = 0.6,
        max_det: int = 100,
    ) -> list[dict[str, torch.Tensor]]:
        """Decode, threshold and class-wise NMS: one dict(boxes xyxy pixels, scores, labels) per image."""
        return yolo_loss.postprocess(
            outputs, self.num_classes, self.strides, conf_threshold, iou_threshold, max_det
        )


def _yolo(num_classes: int, widths: tuple[int, ...], depth: int, **kwargs) -> YOLO:
    """Build a YOLO with given widths unless the caller overrides them."""
    kwargs.setdefault("widths", widths)
    kwargs.setdefault("depth", depth)
    return YOLO(num_classes=num_classes, **kwargs)


@register_model("yolo-n")
def yolo_n(num_classes: int = 80, **kwargs) -> YOLO:
    """Nano: widths 16-16-32-64-128 (P1..P5), C2f depth 1; trains on CPU at 128x128."""
    return _yolo(num_classes, (16, 16, 32, 64, 128), 1, **kwargs)


@register_model("yolo-s")
def yolo_s(num_classes: int = 80, **kwargs) -> YOLO:
    """Small: twice the widths of yolo-n (32-32-64-128-256), same depth."""
    return _yolo(num_classes, (32, 32, 64, 128, 256), 1, **kwargs)
