"""The read side: everything needed to store a compressed model and rebuild it, and nothing that trains.

`artifact` (the product's file, docs/FORMAT.md), `container` (its version-2 layout), `breakdown` (its
bytes by kind), `checkpoint` (stage checkpoints and atomic writers), `weights`
(quantized weight formats: encode / decode / bit counts), `packing` (bit-packed indices), `layers` (quantized
modules), `prune_manifest` (pruned shapes as JSON) and `restorers` (re-applying both to a stock model). It imports
no stage, runner, recipe, training, pruning, timm or plotting code; `compress.kernels` imports only this package.
"""
