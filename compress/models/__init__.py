"""Model builders by spec (`compress:`, `timm:`, `torchvision:`, `file:`), checkpoint loading, our own models."""
from compress.models.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from compress.models.registry import ModelSpecError, build_model, register_model, registered_models

# our own builders register themselves on import
from compress.models import digits_cnn as _digits_cnn  # noqa: E402,F401
from compress.models import yolo as _yolo  # noqa: E402,F401

__all__ = [
    "build_model",
    "register_model",
    "registered_models",
    "load_checkpoint",
    "read_state_dict",
    "ModelSpecError",
    "CheckpointError",
]
