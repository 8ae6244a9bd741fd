"""The product's output: one .safetensors file that rebuilds the compressed model without pickle.

Spec: docs/FORMAT.md. Writer and reader live in `io`; `load` is re-exported as `compress.load`.
"""
from compress.artifact.io import FORMAT, FORMAT_VERSION, ArtifactError, load, read_artifact, write_artifact

__all__ = ["FORMAT", "FORMAT_VERSION", "ArtifactError", "load", "read_artifact", "write_artifact"]
