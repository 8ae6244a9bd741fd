"""Output distillation: how far a student's outputs are from its teacher's, for any model output."""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from compress.models.protocol import flat_tensors


def output_distillation_loss(student: Any, teacher: Any, task: str, temperature: float,
                             dense: Literal["relative", "yolo"] = "relative") -> torch.Tensor:
    """Classification logits: KL(teacher || student) at a temperature (x T^2). Other outputs, by `dense`:
    "relative" sums the relative squared error of every floating raw output tensor (any detector);
    "yolo" takes tensor-protocol maps [B, 4 + classes, H, W]: box L2 + class BCE to the teacher's probabilities."""
    if task == "classification" and torch.is_tensor(student):
        t = temperature
        return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    if dense == "yolo":
        loss = student[0].new_zeros(())
        for s, te in zip(student, teacher):
            loss = loss + F.mse_loss(s[:, :4], te[:, :4]) + F.binary_cross_entropy_with_logits(s[:, 4:], te[:, 4:].sigmoid())
        return loss
    loss = None
    for s, te in zip(flat_tensors(student), flat_tensors(teacher)):
        if not s.is_floating_point():
            continue
        term = F.mse_loss(s, te) / te.pow(2).mean().clamp_min(1e-8)
        loss = term if loss is None else loss + term
    if loss is None:
        raise ValueError("output distillation: the model returns no floating-point tensor to distill")
    return loss
