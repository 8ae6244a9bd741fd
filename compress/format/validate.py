"""Every field of a manifest (artifact) or of a stage checkpoint's metadata, checked before anything is built.

A checksum only says the file is the one that was written, not that its writer was honest: a forged file
with valid checksums must still never run code, read another file, allocate without bound, set arbitrary
module attributes or load into a model that then computes something else. So, before any module is built:

- the model spec names a registered builder family (`compress:`, `timm:`, `torchvision:`); a `file:` spec is
  rebuilt only from a file the caller names (and its hash must match); options are plain values and none
  of them may name a file, URL or pretrained weights;
- the prune manifest only sets size attributes, with positive bounded integers, and every tensor shape it
  asks for is the shape of a tensor present in the file (so nothing larger than the file is allocated);
- the quantization plan's layouts are well formed, and each stored tensor is present with exactly the
  shape and dtype the layout implies; group ids are < groups and a row order is a permutation;
- preprocessing, task, image size and batch size hold sensible values; float tensors are finite.
After building, every tensor must match the model's own name, shape and dtype (`check_against_model`), and
the modules the prune manifest touched must be self-consistent (a conv's weight matches its channels).
Every refusal is an ArtifactError naming the file and the field.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.format.header import FORMAT, READ_VERSIONS, ArtifactError, check_header, tensors_sha256

SPEC_PREFIXES = ("compress", "timm", "torchvision")
MAX_CLASSES = 100_000  # as the recipe schema
MAX_DIM = 1 << 28  # one dimension of a tensor or a size attribute
MAX_ITEMS = 100_000  # modules, layers or options listed in one manifest
MAX_IMAGE_SIZE = 8192
MAX_BATCH = 65536
OPTION_KEY_REFUSED = re.compile(r"path|file|checkpoint|ckpt|url|pretrained|weights|cfg|dir|hub|cache|download",
                                re.IGNORECASE)
TASKS = ("classification", "detection")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area", "lanczos", "box", "hamming", "random")
QUANT_ATTRS = ("weight", "in_proj_weight")


def _fail(where: str, message: str) -> ArtifactError:
    return ArtifactError(f"{where}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, where: str, field: str, low: int = 0, high: int = MAX_DIM) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise _fail(where, f"{field} must be an integer in [{low}, {high}] (got {_show(value)})")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dict(value: Any, where: str, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"{field} must be a JSON object (got {type(value).__name__})")
    if len(value) > MAX_ITEMS:
        raise _fail(where, f"{field} has {len(value):,} entries (limit {MAX_ITEMS:,})")
    return value


def _shape(value: Any, where: str, field: str, min_dims: int = 0) -> list[int]:
    if not isinstance(value, list) or not min_dims <= len(value) <= 8:
        raise _fail(where, f"{field} must be a list of {min_dims} to 8 sizes (got {_show(value)})")
    for dim in value:
        _int(dim, where, field, 0, MAX_DIM)
    return value


# -- the model spec --------------------------------------------------------------------------------------------

def check_options(options: Any, where: str, field: str = "model.options") -> dict[str, Any]:
    """Builder options read from a file: plain values only, none naming a file, URL or weights."""
    options = _dict(options if options is not None else {}, where, field)
    for key, value in options.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise _fail(where, f"{field}: {_show(key)} is not an option name")
        if OPTION_KEY_REFUSED.search(key) and value not in (None, False, "", 0):  # `pretrained: false` is harmless
            raise _fail(where, f"{field}.{key}: options that name files, URLs or weights are refused in a file "
                               "(a model is rebuilt from its stored tensors only)")
        values = value if isinstance(value, list) else [value]
        if len(values) > 64 or not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            raise _fail(where, f"{field}.{key}: only plain values (numbers, booleans, short strings, short lists of "
                               f"them) are accepted (got {_show(value)})")
        for v in values:
            if isinstance(v, str) and (len(v) > 100 or "/" in v or "\\" in v or ".." in v):
                raise _fail(where, f"{field}.{key}: string {_show(v)} looks like a path; refused in a file")
            if isinstance(v, float) and not math.isfinite(v):
                raise _fail(where, f"{field}.{key}: {v} is not a finite number")
    return options


def check_model_spec(spec: Any, where: str, model_file: str | Path | None = None) -> dict[str, Any]:
    """The `model` field: a builder spec of a known family, a class count, plain options. A `file:` spec is
    accepted only when the caller passes `model_file` (the file named by the user, not by the data)."""
    spec = _dict(spec, where, "model")
    build = spec.get("build")
    if not isinstance(build, str) or not build or len(build) > 1000:
        raise _fail(where, f"model.build must be a builder spec string (got {_show(build)})")
    prefix, sep, name = build.partition(":")
    if prefix == "file":
        if model_file is None:
            raise _fail(where, f"model.build is {build!r}: a model built from a Python file is rebuilt only from a "
                               "file you name yourself (compress.load(path, model_file=...) / --model-file); "
                               "a file named inside the data is never imported")
    elif prefix not in SPEC_PREFIXES or not sep or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise _fail(where, f"model.build {build!r} is not a builder spec (compress:NAME, timm:NAME, torchvision:NAME)")
    _int(spec.get("num_classes"), where, "model.num_classes", 1, MAX_CLASSES)
    check_options(spec.get("options"), where)
    unknown = sorted(set(spec) - {"build", "num_classes", "options", "file_sha256"})
    if unknown:
        raise _fail(where, f"model has unknown fields {unknown} (known: build, num_classes, options, file_sha256)")
    return spec


# -- model_meta: the prune manifest and the quantization plan ----------------------------------------------------

def _quant_layers(meta: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    plan = meta.get("quantization")
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), list):
        return {}
    return {(e["name"], e["attr"]): e["layout"] for e in plan["layers"]
            if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("attr"), str)
            and isinstance(e.get("layout"), dict)}


def check_prune_manifest(manifest: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> None:
    """Only size attributes, bounded; every shape is that of a tensor present (or of a quantized layout)."""
    from compress.format.prune_manifest import SIZE_ATTRS, VERSION

    field = "model_meta.prune"
    manifest = _dict(manifest, where, field)
    if manifest.get("version") != VERSION or not _is_int(manifest.get("version")):
        raise _fail(where, f"{field}.version {_show(manifest.get('version'))} is not supported (reads {VERSION})")
    unknown = sorted(set(manifest) - {"version", "modules"})
    if unknown:
        raise _fail(where, f"{field} has unknown fields {unknown}")
    quant = _quant_layers(meta)
    biggest = max((t.numel() for t in tensors.values()), default=0)
    for name, entry in _dict(manifest.get("modules"), where, f"{field}.modules").items():
        at = f"{field}.modules.{name}"
        if not isinstance(name, str) or len(name) > 500:
            raise _fail(where, f"{field}.modules: {_show(name)} is not a module path")
        entry = _dict(entry, where, at)
        unknown = sorted(set(entry) - {"type", "attrs", "params", "buffers"})
        if unknown or not isinstance(entry.get("type"), str):
            raise _fail(where, f"{at}: an entry holds type, attrs, params, buffers (got {sorted(entry)})")
        for attr, value in _dict(entry.get("attrs", {}), where, f"{at}.attrs").items():
            if attr not in SIZE_ATTRS:
                raise _fail(where, f"{at}.attrs.{attr}: only size attributes may change ({', '.join(SIZE_ATTRS)})")
            values = value if isinstance(value, list) else [value]
            if not values or len(values) > 8:
                raise _fail(where, f"{at}.attrs.{attr}: {_show(value)} is not a size")
            for v in values:
                _int(v, where, f"{at}.attrs.{attr}", 1, MAX_DIM)
        for kind in ("params", "buffers"):
            for tname, shape in _dict(entry.get(kind, {}), where, f"{at}.{kind}").items():
                if not isinstance(tname, str) or not tname.isidentifier():
                    raise _fail(where, f"{at}.{kind}: {_show(tname)} is not a tensor name")
                shape = _shape(shape, where, f"{at}.{kind}.{tname}")
                key = f"{name}.{tname}" if name else tname
                if key in tensors:
                    if list(tensors[key].shape) != shape:
                        raise _fail(where, f"{at}.{kind}.{tname}: shape {shape} but the file's tensor {key} is "
                                           f"{list(tensors[key].shape)}")
                elif (name, tname) in quant:
                    if quant[(name, tname)].get("shape") != shape:
                        raise _fail(where, f"{at}.{kind}.{tname}: shape {shape} but the quantized layout of {key} "
                                           f"is {_show(quant[(name, tname)].get('shape'))}")
                elif math.prod(shape) > biggest:
                    raise _fail(where, f"{at}.{kind}.{tname}: shape {shape} is larger than any tensor in the file")


def _check_layout(layout: Any, where: str, at: str) -> dict[str, Any]:
    from compress.format.weights import CODEBOOKS, ROW_MAPS, matrix_shape

    layout = _dict(layout, where, at)
    shape = _shape(layout.get("shape"), where, f"{at}.shape", 1)
    if any(d == 0 for d in shape):
        raise _fail(where, f"{at}.shape {shape} has an empty dimension")
    rows, cols = matrix_shape(shape)
    if rows * cols > MAX_DIM * 16:
        raise _fail(where, f"{at}.shape {shape} is too large")
    if layout.get("packing") not in ("rows", "flat"):
        raise _fail(where, f"{at}.packing must be 'rows' or 'flat' (got {_show(layout.get('packing'))})")
    fmt = layout.get("format")
    if fmt == "nf4":
        _int(layout.get("blocksize"), where, f"{at}.blocksize", 1, MAX_DIM)
        if not isinstance(layout.get("double_quant"), bool):
            raise _fail(where, f"{at}.double_quant must be true or false")
    elif fmt == "codebook":
        _int(layout.get("bits"), where, f"{at}.bits", 1, 8)
        _int(layout.get("groups"), where, f"{at}.groups", 1, MAX_DIM)  # may exceed rows (empty groups); the
        # stored codebook / scale tensors must still have exactly this many rows (checked against the file)
        if layout.get("codebook") not in CODEBOOKS:
            raise _fail(where, f"{at}.codebook must be one of {', '.join(CODEBOOKS)} (got {_show(layout.get('codebook'))})")
        if layout.get("row_map") not in ROW_MAPS:
            raise _fail(where, f"{at}.row_map must be one of {', '.join(ROW_MAPS)} (got {_show(layout.get('row_map'))})")
        for flag in ("scale", "offset"):
            if not isinstance(layout.get(flag), bool):
                raise _fail(where, f"{at}.{flag} must be true or false")
        if not isinstance(layout.get("column_scale", False), bool):
            raise _fail(where, f"{at}.column_scale must be true or false")
    else:
        raise _fail(where, f"{at}.format must be 'codebook' or 'nf4' (got {_show(fmt)})")
    return layout


def check_quantization(plan: Any, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Layouts well formed; every stored tensor present with the layout's shape and dtype; ids in range."""
    from compress.format.restorers import PLAN_FORMAT
    from compress.format.weights import buffer_specs, id_bits, matrix_shape
    from compress.format.packing import unpack_indices

    field = "model_meta.quantization"
    plan = _dict(plan, where, field)
    if plan.get("format") != PLAN_FORMAT or not _is_int(plan.get("format")):
        raise _fail(where, f"{field}.format {_show(plan.get('format'))} is not supported (reads {PLAN_FORMAT})")
    layers = plan.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_ITEMS:
        raise _fail(where, f"{field}.layers must be a list")
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(layers):
        at = f"{field}.layers.{i}"
        entry = _dict(entry, where, at)
        name, attr = entry.get("name"), entry.get("attr")
        if not isinstance(name, str) or not name or len(name) > 500:
            raise _fail(where, f"{at}.name must be a module path (got {_show(name)})")
        if attr not in QUANT_ATTRS:
            raise _fail(where, f"{at}.attr must be one of {', '.join(QUANT_ATTRS)} (got {_show(attr)})")
        if (name, attr) in seen:
            raise _fail(where, f"{at}: layer {name} is listed twice")
        seen.add((name, attr))
        layout = _check_layout(entry.get("layout"), where, f"{at}.layout")
        try:
            specs = buffer_specs(layout)
        except (KeyError, ValueError, TypeError) as exc:
            raise _fail(where, f"{at}.layout: {exc}") from None
        stored = {}
        for buf, (shape, dtype) in specs.items():
            key = f"{name}.{attr}_{buf}"
            tensor = tensors.get(key)
            if tensor is None:
                raise _fail(where, f"{at}: tensor {key} of its layout is not in the file")
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise _fail(where, f"{at}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')} "
                                   f"{list(tensor.shape)}, the layout needs {str(dtype).removeprefix('torch.')} {list(shape)}")
            stored[buf] = tensor
        if layout["format"] != "codebook":
            continue
        rows, _ = matrix_shape(layout["shape"])
        groups = layout["groups"]
        if layout["row_map"] == "group-ids":
            ids = unpack_indices(stored["group_ids"], id_bits(groups), rows)
            if rows and int(ids.max()) >= groups:
                raise _fail(where, f"{at}: group id {int(ids.max())} is out of range (the layout has {groups} groups)")
        elif layout["row_map"] == "order":
            order = stored["order"].long()
            if not torch.equal(torch.sort(order).values, torch.arange(rows)):
                raise _fail(where, f"{at}: the row order is not a permutation of 0..{rows - 1} "
                                   "(an entry is out of range or repeated)")


def check_model_meta(meta: Any, tensors: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    from compress.format.restorers import RESTORERS

    meta = _dict(meta if meta is not None else {}, where, "model_meta")
    unknown = sorted(k for k in meta if k not in RESTORERS)
    if unknown:
        raise _fail(where, f"model_meta has unknown keys {unknown} (known: {', '.join(sorted(RESTORERS))})")
    if "quantization" in meta:
        check_quantization(meta["quantization"], tensors, where)
    if "prune" in meta:
        check_prune_manifest(meta["prune"], tensors, meta, where)
    if "bn_fold" in meta:
        check_bn_fold(meta["bn_fold"], where)
    return meta


def check_bn_fold(fold: Any, where: str) -> None:
    """`model_meta.bn_fold`: {"pairs": [[conv, bn], ...]} of distinct module names (types are checked on build)."""
    field = "model_meta.bn_fold"
    fold = _dict(fold, where, field)
    if set(fold) != {"pairs"} or not isinstance(fold["pairs"], list) or len(fold["pairs"]) > MAX_DIM:
        raise _fail(where, f"{field} must be {{'pairs': [[conv, bn], ...]}} (got keys {sorted(fold)[:5]})")
    seen: set[str] = set()
    for i, pair in enumerate(fold["pairs"]):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) and 0 < len(n) < 1000
                                                                  for n in pair)):
            raise _fail(where, f"{field}.pairs.{i}: must be two module names, got {_show(pair)}")
        if pair[0] in seen or pair[1] in seen or pair[0] == pair[1]:
            raise _fail(where, f"{field}.pairs.{i}: module named twice ({_show(pair)})")
        seen.update(pair)


# -- the rest of the manifest ------------------------------------------------------------------------------------

def check_preprocessing(pre: Any, where: str, field: str = "preprocessing") -> dict[str, Any]:
    pre = _dict(pre, where, field)
    known = ("source", "image_size", "mean", "std", "crop_pct", "interpolation")
    unknown = sorted(set(pre) - set(known))
    if unknown:
        raise _fail(where, f"{field} has unknown fields {unknown} (known: {', '.join(known)})")
    if not isinstance(pre.get("source", ""), str) or len(pre.get("source", "")) > 1000:
        raise _fail(where, f"{field}.source must be a short string")
    if pre.get("image_size") is not None:
        _int(pre["image_size"], where, f"{field}.image_size", 1, MAX_IMAGE_SIZE)
    for key in ("mean", "std"):
        value = pre.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or len(value) not in (1, 3) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise _fail(where, f"{field}.{key} must be 1 or 3 finite numbers (got {_show(value)})")
        if key == "std" and any(v <= 0 for v in value):
            raise _fail(where, f"{field}.std must be > 0 (got {value}): dividing by it would give inf/NaN")
    crop = pre.get("crop_pct", 1.0)
    if not isinstance(crop, (int, float)) or isinstance(crop, bool) or not 0.05 <= crop <= 1.0:
        raise _fail(where, f"{field}.crop_pct must be in [0.05, 1] (got {_show(crop)})")
    if pre.get("interpolation", "bilinear") not in INTERPOLATIONS:
        raise _fail(where, f"{field}.interpolation must be one of {', '.join(INTERPOLATIONS)} "
                           f"(got {_show(pre.get('interpolation'))})")
    return pre


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise _fail(where, f"tensor {name} holds NaN or infinite values")


def check_manifest(manifest: Any, tensors: dict[str, torch.Tensor], where: str,
                   model_file: str | Path | None = None) -> dict[str, Any]:
    """Every field an artifact reader uses, before any module is built."""
    if not isinstance(manifest, dict):
        raise _fail(where, f"the manifest must be a JSON object (got {type(manifest).__name__})")
    if manifest.get("format") != FORMAT:
        raise _fail(where, f"manifest format {_show(manifest.get('format'))} is not '{FORMAT}'")
    if not _is_int(manifest.get("version")) or manifest["version"] not in READ_VERSIONS:
        raise _fail(where, f"manifest version {_show(manifest.get('version'))} is not supported (this compress reads "
                           f"versions {', '.join(map(str, READ_VERSIONS))})")
    check_model_spec(manifest.get("model"), where, model_file)
    check_model_meta(manifest.get("model_meta"), tensors, where)
    if manifest.get("task") is not None and manifest["task"] not in TASKS:
        raise _fail(where, f"task must be one of {', '.join(TASKS)} (got {_show(manifest['task'])})")
    if manifest.get("image_size") is not None:
        _int(manifest["image_size"], where, "image_size", 1, MAX_IMAGE_SIZE)
    if manifest.get("eval_batch_size") is not None:
        _int(manifest["eval_batch_size"], where, "eval_batch_size", 1, MAX_BATCH)
    metrics = _dict(manifest.get("metrics") or {}, where, "metrics")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise _fail(where, "metrics must map names to numbers")
    if manifest.get("preprocessing") is not None:
        check_preprocessing(manifest["preprocessing"], where)
    for key in ("recipe", "shrink", "versions"):
        if manifest.get(key) is not None:
            _dict(manifest[key], where, key)
    check_finite(tensors, where)
    return manifest


# -- after building ----------------------------------------------------------------------------------------------

def _weight_shape(module: nn.Module, attr: str = "weight") -> tuple[int, ...] | None:
    layout = getattr(module, "quant_layout", None)
    if isinstance(layout, dict) and getattr(module, "_quant_attr", attr) == attr:
        return tuple(layout["shape"])
    tensor = getattr(module, attr, None)
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None


def check_pruned_modules(model: nn.Module, meta: dict[str, Any], where: str) -> None:
    """Modules the prune manifest changed must agree with their own tensors (channels, groups, features)."""
    names = (meta.get("prune") or {}).get("modules", {})
    modules = dict(model.named_modules())
    for name in names:
        m = modules.get(name)
        at = f"model_meta.prune.modules.{name}"
        if m is None:
            continue
        w = _weight_shape(m)
        if isinstance(m, nn.modules.conv._ConvNd):
            ok = (m.groups >= 1 and m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
                  and w is not None and len(w) >= 2
                  and (w[0], w[1]) == ((m.in_channels, m.out_channels // m.groups) if m.transposed
                                       else (m.out_channels, m.in_channels // m.groups)))
        elif isinstance(m, nn.Linear):
            ok = w == (m.out_features, m.in_features)
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            stats = [t for t in (getattr(m, "running_mean", None), m.weight) if isinstance(t, torch.Tensor)]
            ok = all(t.numel() == m.num_features for t in stats)
        elif isinstance(m, nn.GroupNorm):
            ok = m.num_channels % m.num_groups == 0 and (m.weight is None or m.weight.numel() == m.num_channels)
        elif isinstance(m, nn.LayerNorm):
            ok = m.weight is None or tuple(m.weight.shape) == tuple(m.normalized_shape)
        else:
            ok = True
        if not ok:
            raise _fail(where, f"{at}: the size attributes do not agree with the module's weight {list(w or [])}")


def check_against_model(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Names, shapes and dtypes of the file's tensors against the rebuilt model's state dict."""
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    wrong = [k for k in state if k in tensors and tuple(state[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or wrong:
        raise _fail(where, f"the manifest does not match the tensors (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}, wrong shape {wrong[:3]})")
    for key, value in state.items():
        if tensors[key].dtype != value.dtype:
            raise _fail(where, f"tensor {key} is {str(tensors[key].dtype).removeprefix('torch.')}, the model "
                               f"needs {str(value.dtype).removeprefix('torch.')}")


# -- building, once every field is checked ------------------------------------------------------------


def build_validated(path: Path, spec: dict[str, Any], meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    model_file: str | Path | None = None) -> nn.Module:
    """The model of a validated spec and model_meta, checked against the tensors, which are then loaded."""
    from compress.format.restorers import apply_restorers
    from compress.models import build_model

    build = spec["build"]
    if build.startswith("file:"):
        build = _rebuild_file_spec(path, build, spec, model_file)
    try:
        model = build_model(build, num_classes=spec["num_classes"], **(spec.get("options") or {}))
        model = apply_restorers(model, meta)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ArtifactError(f"{path}: the manifest does not describe a buildable model ({reason})") from None
    check_pruned_modules(model, meta, str(path))
    check_against_model(model, tensors, str(path))
    from compress.models.checkpoint import load_state

    load_state(model, tensors)
    return model


def _rebuild_file_spec(path: Path, build: str, spec: dict[str, Any], model_file: str | Path | None) -> str:
    if model_file is None:
        raise ArtifactError(f"{path}: the model was built by {build!r}; pass that file again (model_file=...) "
                            "to rebuild it")
    if not Path(model_file).is_file():
        raise ArtifactError(f"{path}: model file {model_file} not found")
    if not isinstance(spec.get("file_sha256"), str):
        raise ArtifactError(f"{path}: model.file_sha256 is missing; the file cannot be matched to {model_file}")
    digest = hashlib.sha256(Path(model_file).read_bytes()).hexdigest()
    if digest != spec["file_sha256"]:
        raise ArtifactError(f"{path}: {model_file} is not the file the model was built from (sha256 differs)")
    return "file:" + str(model_file) + ":" + build.rsplit(":", 1)[1]


# -- stage checkpoints -------------------------------------------------------------------------------------------

CHECKPOINT_SHA_KEY = "compress.tensors_sha256"


def _json_field(metadata: dict[str, str], key: str, where: str, default: str | None = None) -> Any:
    import json

    raw = metadata.get(key, default)
    if not isinstance(raw, str):
        raise _fail(where, f"metadata {key} is missing; not a compress stage checkpoint")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _fail(where, f"metadata {key} is not valid JSON ({exc.__class__.__name__})") from None


def read_stage_checkpoint(path: str | Path, allow_build: str | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, model_spec, model_meta) of a stage checkpoint, with the artifact's checks: header layout,
    tensor checksum, spec (a `file:` spec only when it is exactly `allow_build`, the caller's own), meta."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise _fail(where, "file not found")
    raw = path.read_bytes()
    header, _ = check_header(path, raw)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or "compress.model_spec" not in metadata:
        raise _fail(where, "not a compress stage checkpoint (no 'compress.model_spec' metadata)")
    spec = _json_field(metadata, "compress.model_spec", where)
    meta = _json_field(metadata, "compress.model_meta", where, "{}")
    try:
        tensors = load_bytes(raw)
    except SafetensorError as exc:
        raise _fail(where, f"safetensors refused the file ({exc})") from None
    if metadata.get(CHECKPOINT_SHA_KEY) != tensors_sha256(tensors):
        state = "has no tensor checksum" if CHECKPOINT_SHA_KEY not in metadata else "tensor data checksum mismatch"
        raise _fail(where, f"{state}; the checkpoint is damaged or was not written by this compress")
    file_ok = isinstance(spec, dict) and allow_build is not None and allow_build in ("*", spec.get("build"))
    check_model_spec(spec, where, model_file="(the caller's own spec)" if file_ok else None)
    meta = check_model_meta(meta, tensors, where)
    check_finite(tensors, where)
    return tensors, spec, meta


def load_stage_checkpoint(path: str | Path, allow_build: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a stage checkpoint after every check of `read_stage_checkpoint`."""
    if allow_build == "*":
        raise ValueError("allow_build='*' only reads metadata; building needs the caller's own spec")
    tensors, spec, meta = read_stage_checkpoint(path, allow_build)
    if spec["build"].startswith("file:"):  # allowed above: exactly the caller's own spec
        model_file = spec["build"][len("file:"):].rsplit(":", 1)[0]
        model = build_validated(Path(path), {**spec, "file_sha256": _sha(model_file)}, meta, tensors, model_file)
    else:
        model = build_validated(Path(path), spec, meta, tensors)
    return model, meta


def _sha(file: str) -> str:
    import hashlib

    return hashlib.sha256(Path(file).read_bytes()).hexdigest() if Path(file).is_file() else ""
