"""Spatial-attention distillation (Chu et al. 2022, stage 3): the unpruned model teaches the pruned one."""
from compress.distill.attention import attention_loss, attention_map
from compress.distill.hooks import FeatureRecorder
from compress.distill.layers import auto_layers

__all__ = ["attention_map", "attention_loss", "FeatureRecorder", "auto_layers"]
