"""Acceptance check for `compress:yolo-n`: train on digits-detect (CPU) and report mAP@0.5 on val.

    python tools/train_yolo_check.py                           # yolo-n, 20 epochs, batch 32, AdamW 8e-3 cosine
    python tools/train_yolo_check.py --model compress:yolo-s --epochs 10 --threads 1

A plain loop on purpose (no augmentation, no EMA), so the number measures the model and its loss; the project's
own training loop should do at least as well. Training time excludes evaluation.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch.utils.data import DataLoader

from compress.models import build_model


@torch.no_grad()
def evaluate(model, loader) -> dict[str, float]:
    """mAP@0.5 and mAP@0.5:0.95 with torchmetrics (COCO-style)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox")
    model.eval()
    for images, targets in loader:
        preds = model.postprocess(model(images))
        metric.update(preds, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    res = metric.compute()
    model.train()
    return {"map_50": float(res["map_50"]), "map": float(res["map"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="compress:yolo-n")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import calib

    t0 = time.time()
    train, val = calib.get_dataset("digits-detect", "train"), calib.get_dataset("digits-detect", "val")
    collate_fn, data_name = calib.collate_detection, "digits-detect"
    print(f"data {data_name}: train {len(train)} val {len(val)} ({time.time() - t0:.1f}s)")
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate_fn,
                              drop_last=True, generator=gen)
    val_loader = DataLoader(val, batch_size=64, collate_fn=collate_fn)

    model = build_model(args.model, num_classes=10)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    total = args.epochs * len(train_loader)

    def lr_at(step: int) -> float:
        """Linear warmup then cosine to 1% of the peak."""
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        t = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history = []
    t_train = time.time()
    for epoch in range(1, args.epochs + 1):
        sums: dict[str, float] = {}
        for images, targets in train_loader:
            loss, parts = model.detection_loss(model(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            for k, v in {"loss": loss.item(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
        n = len(train_loader)
        line = {k: round(v / n, 4) for k, v in sums.items()}
        line.update(epoch=epoch, train_s=round(time.time() - t_train, 1))
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            t_eval = time.time()
            line.update(evaluate(model, val_loader))
            line["eval_s"] = round(time.time() - t_eval, 1)
            t_train += time.time() - t_eval  # report training time without evaluation
        history.append(line)
        print(json.dumps(line), flush=True)
    wall = time.time() - t_train
    print(json.dumps({"model": args.model, "data": data_name, "epochs": args.epochs, "batch_size": args.batch_size,
                      "lr": args.lr, "threads": args.threads, "train_wall_s": round(wall, 1),
                      "final_map_50": history[-1].get("map_50")}))


if __name__ == "__main__":
    main()
