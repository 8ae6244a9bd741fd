"""One-command shrink of a checkpoint: prune, label-free recovery, quantize, export (`compress shrink`).

    from compress.shrink import shrink
    shrink("model.pt", "timm:resnet18", "r18.safetensors", num_classes=10, bits=3, calib="digits")

Importing this package registers the `recover` stage.
"""
from compress.shrink.preprocess import Preprocessing
from compress.stages.recover import RecoverConfig
from compress.shrink.run import shrink

__all__ = ["Preprocessing", "RecoverConfig", "shrink"]
