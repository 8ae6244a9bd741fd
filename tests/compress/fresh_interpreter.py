"""One fresh interpreter for the import checks of several tests (each start-up costs seconds of CPU).

In order, each step only adding modules, so each check is at least as strict as in a process of its own:
1. `compress.load` of the version-1 digits artifact and a forward: none of HEAVY imported
   (tests/compress/test_architecture.py);
2. `import compress, compress.format.artifact`: no triton (tests/compress/format/test_artifact.py);
3. `import compress.kernels` and its dispatchers: no triton (tests/compress/kernels/test_kernels_reference.py);
4. the CLI, the pipeline, the stage registry and `compress.prune`: no torch-pruning, timm or torchvision
   (tests/compress/test_architecture.py);
5. the digest of a small `digits-detect` build, made under this process's own hash seed
   (tests/calib/test_calib_digits_detect.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OLD_ARTIFACT = ROOT / "tests" / "compress" / "format" / "data" / "digits_cls_v1.safetensors"
HEAVY = ("torch_pruning", "timm", "torchmetrics", "matplotlib", "onnx", "accelerate", "triton", "torchvision",
         "compress.stages", "compress.pipeline", "compress.recipe", "compress.train", "compress.prune",
         "compress.sparse", "compress.distill", "compress.quant", "compress.shrink")

PROBE = f"""
import json, sys, torch, compress
model = compress.load({str(OLD_ARTIFACT)!r})
torch.manual_seed(0)
with torch.no_grad():
    y = model(torch.rand(2, 3, 32, 32))
heavy = [n for n in {HEAVY!r} if n in sys.modules]
import compress.format.artifact
artifact_triton = 'triton' in sys.modules
import compress.kernels
from compress.kernels import dequantize, quantized_linear
kernels_triton = 'triton' in sys.modules
import compress.cli, compress.pipeline, compress.stages, compress.prune
cli = [n for n in ('torch_pruning', 'timm', 'torchvision') if n in sys.modules]
import hashlib, numpy as np
from calib.digits_detect import build_split
a = build_split('train', 128, 6)
h = hashlib.sha256()
[h.update(np.ascontiguousarray(a[k]).tobytes()) for k in sorted(a)]
print(json.dumps({{'heavy': heavy, 'artifact_triton': artifact_triton, 'kernels_triton': kernels_triton, 'cli': cli,
                  'logits': y.tolist(), 'digits_detect_train_6': h.hexdigest()}}))
"""


def probe() -> dict:
    """{"returncode", "stderr", "result": the probe's JSON (None when it failed)}."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    return {"returncode": done.returncode, "stderr": done.stderr, "result": result}
