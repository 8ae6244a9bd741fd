"""The compact container of format version 2: a whole artifact in two flat U8 tensors of a safetensors file.

A safetensors header spends ~100 bytes of JSON per tensor (name, dtype, shape, offsets); a quantized detector
has hundreds of small tensors, so the header was most of the file's overhead. Version 2 stores

- `manifest` (U8 [m], first in the file): the manifest JSON, zlib-compressed, holding the tensor index
  (`INDEX_KEY`);
- `tensors` (U8 [n]): every tensor's bytes, back to back in index order, raw little-endian or, for packed
  codebook indices, entropy-coded (rANS, `constriction`) when that is smaller;

and `__metadata__` only `format` (`compress-artifact/2`), `manifest_encoding` (`zlib`) and `manifest_sha256`.
The file stays a plain safetensors file (any reader opens the two U8 tensors).

Index (`manifest["index"]`): `{"version": 1, "tensors": [[name, dtype, shape, length(, codec)], ...]}`, in name
order. Offsets are not stored: tensor i starts in `tensors` where tensor i-1 ends (the first at 0) and the lengths
must add up to the size of `tensors` exactly, so a gap or an overlap cannot even be written down (and the index
compresses ~1.7 KB smaller on the demo detector than with explicit offsets). A raw entry's length is
numel * itemsize. A coded entry (U8 [rows, packed_cols]) has codec
`{"codec": "rans", "bits": b, "cols": c, "counts": [2^b ints]}`: rows * c symbols of b bits (the unpacked
indices, row-major), coded with a stack rANS coder (`constriction.stream.stack.AnsCoder`, the stream stored
as little-endian uint32 words) under the categorical model whose probabilities are `counts / sum(counts)`
(float64, `perfect=False`); on reading the symbols are re-packed with `packing.pack_indices`, so layers and
kernels see the usual packed tensor. `sum(counts)` must equal rows * c, and a coded stream may stand for at
most `MAX_EXPANSION` times its own bytes (so a tiny forged stream cannot ask for gigabytes).

A float32 tensor whose every value is exactly a float16 value (the export stage rounds biases and other float
tensors so, see `stages/export.py`) is stored in half the bytes with codec `{"codec": "f16"}` (length numel * 2)
and widened back to the same float32 values on reading: a lossless narrowing.

Everything is checked before any tensor is built; every refusal is an ArtifactError naming the file and field.
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch

from compress.format.coding import MAX_EXPANSION, worth_coding
from compress.format.header import DTYPES, MAX_MANIFEST_BYTES, ArtifactError, inflate_text
from compress.format.packing import pack_indices, packed_cols, unpack_indices

__all__ = ["DATA", "MANIFEST", "INDEX_KEY", "pack_container", "unpack_container", "coding_plan", "dtype_name"]

DATA = "tensors"  # sorts after "manifest": the manifest comes first in the file
MANIFEST = "manifest"
INDEX_KEY = "index"
INDEX_VERSION = 1
CODEC = "rans"
F16 = "f16"  # float32 values stored as float16 (every value exactly representable)
MAX_TENSORS = 100_000
MAX_DIM = 1 << 28
DECODE_CHUNK = 1 << 20  # symbols decoded at a time (bounded temporary memory)
NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return NAMES[dtype]


def _itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=DTYPES[dtype]).element_size()


# -- entropy coding ----------------------------------------------------------------------------------------------

def _model(counts: list[int]):
    import constriction  # the stream classes are attributes of the native module, not importable submodules
    import numpy as np

    probabilities = np.asarray(counts, dtype=np.float64)
    return constriction.stream.model.Categorical(probabilities / probabilities.sum(), perfect=False)


def encode_stream(packed: torch.Tensor, bits: int, cols: int) -> tuple[bytes, list[int]] | None:
    """(rANS stream, symbol counts) of a packed index tensor [rows, packed_cols(cols, bits)], or None when the
    tensor is not the canonical packing of rows * cols indices (then it is stored raw)."""
    import constriction
    import numpy as np

    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[0] * cols == 0 \
            or packed.shape[1] != packed_cols(cols, bits):
        return None
    symbols = unpack_indices(packed, bits, cols)
    if not torch.equal(pack_indices(symbols, bits), packed):  # nonzero padding bits: keep the bytes as they are
        return None
    flat = symbols.reshape(-1).to(torch.int32).numpy()
    counts = np.bincount(flat, minlength=1 << bits).astype(np.int64).tolist()
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(flat, _model(counts))
    stream = coder.get_compressed().astype("<u4").tobytes()
    return stream, counts


def decode_stream(path: Path, name: str, stream: bytes, codec: dict[str, Any], shape: list[int]) -> torch.Tensor:
    """The packed U8 tensor [shape] a validated coded entry stands for; a damaged stream is an ArtifactError."""
    import numpy as np

    bits, cols = codec["bits"], codec["cols"]
    rows = shape[0]
    total = rows * cols
    try:
        import constriction

        coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, dtype="<u4").astype(np.uint32))
        model = _model(codec["counts"])
        parts, done = [], 0
        while done < total:
            amount = min(DECODE_CHUNK, total - done)
            parts.append(np.asarray(coder.decode(model, amount)).astype(np.uint8))
            done += amount
        empty = coder.is_empty()
    except ImportError:
        raise ArtifactError(f"{path}: tensor {name} is entropy-coded; reading it needs the 'constriction' package "
                            "(pip install constriction)") from None
    except Exception as exc:  # noqa: BLE001 (a foreign library's error on damaged data becomes ours)
        raise ArtifactError(f"{path}: index entry {name}: the entropy-coded stream cannot be decoded "
                            f"({exc.__class__.__name__}); the file is damaged") from None
    if not empty:
        raise ArtifactError(f"{path}: index entry {name}: the entropy-coded stream has data left after "
                            f"{total} symbols; the file is damaged")
    symbols = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.uint8))
    if symbols.numel() and int(symbols.max()) >= 1 << bits:
        raise ArtifactError(f"{path}: index entry {name}: a decoded symbol does not fit in {bits} bits; damaged")
    return pack_indices(symbols.reshape(rows, cols), bits)


def coding_plan(manifest: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Tensor name -> (bits, symbols per packed row) of every packed index tensor the manifest's quantization
    plan describes (the candidates for entropy coding)."""
    from compress.format.weights import matrix_shape

    meta = manifest.get("model_meta")
    plan = meta.get("quantization") if isinstance(meta, dict) else None
    out = {}
    for entry in plan.get("layers", []) if isinstance(plan, dict) else []:
        try:  # a plan the writer was handed; anything odd in it just stays raw (the reader checks the rest)
            layout = entry["layout"]
            bits = 4 if layout.get("format") == "nf4" else layout.get("bits")
            if not isinstance(bits, int) or not 1 <= bits <= 8:
                continue
            rows, cols = matrix_shape(layout["shape"])
            out[f"{entry['name']}.{entry['attr']}_packed"] = (bits, cols if layout.get("packing") == "rows" else rows * cols)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            continue
    return out


# -- writing -----------------------------------------------------------------------------------------------------

def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _exact_in_f16(tensor: torch.Tensor) -> bool:
    t = tensor.detach().cpu()
    return bool(t.isfinite().all()) and torch.equal(t.half().float(), t)


def pack_container(tensors: dict[str, torch.Tensor], manifest: dict[str, Any],
                   coding: dict[str, tuple[int, int]] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(safetensors tensors, metadata) of a version-2 file: `tensors` back to back in name order, those named in
    `coding` entropy-coded when the stream (plus its counts in the manifest) is smaller than the raw bytes."""
    coding = coding or {}
    entries, blobs = [], []
    for name in sorted(tensors):
        tensor = tensors[name]
        raw = _raw_bytes(tensor)
        entry: list[Any] = [name, dtype_name(tensor.dtype), list(tensor.shape), len(raw)]
        if tensor.dtype == torch.float32 and tensor.numel() and name not in coding and _exact_in_f16(tensor):
            raw = _raw_bytes(tensor.half())
            entry[3] = len(raw)
            entry.append({"codec": F16})
        if name in coding:
            bits, cols = coding[name]
            coded = encode_stream(tensor, bits, cols)
            if coded is not None:
                stream, counts = coded
                if worth_coding(len(stream), counts, len(raw)):
                    raw = stream
                    entry[3] = len(raw)
                    entry.append({"codec": CODEC, "bits": bits, "cols": cols, "counts": counts})
        entries.append(entry)
        blobs.append(raw)
    stored = {**manifest, INDEX_KEY: {"version": INDEX_VERSION, "tensors": entries}}
    text = json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()
    packed_manifest = zlib.compress(text, 9)
    data = b"".join(blobs)
    out = {DATA: torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8),
           MANIFEST: torch.frombuffer(bytearray(packed_manifest), dtype=torch.uint8)}
    metadata = {"manifest_encoding": "zlib", "manifest_sha256": hashlib.sha256(text).hexdigest()}
    return out, metadata


# -- reading -----------------------------------------------------------------------------------------------------

def _fail(path: Path, message: str) -> ArtifactError:
    return ArtifactError(f"{path}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_codec(path: Path, at: str, codec: Any, dtype: str, shape: list[int], length: int) -> dict[str, Any]:
    if codec == {"codec": F16}:
        if dtype != "F32" or length != math.prod(shape) * 2:
            raise _fail(path, f"{at}: an f16-stored tensor is F32 in {math.prod(shape) * 2} bytes (got {dtype}, {length})")
        return codec
    if not isinstance(codec, dict) or codec.get("codec") != CODEC or set(codec) != {"codec", "bits", "cols", "counts"}:
        raise _fail(path, f"{at}.codec must be {{codec: '{CODEC}', bits, cols, counts}} (got {str(codec)[:80]})")
    bits, cols, counts = codec["bits"], codec["cols"], codec["counts"]
    if not _is_int(bits) or not 1 <= bits <= 8:
        raise _fail(path, f"{at}.codec.bits must be an integer in [1, 8] (got {str(bits)[:40]})")
    if not _is_int(cols) or not 1 <= cols <= MAX_DIM:
        raise _fail(path, f"{at}.codec.cols must be an integer in [1, {MAX_DIM}] (got {str(cols)[:40]})")
    if dtype != "U8" or len(shape) != 2 or shape[1] != packed_cols(cols, bits):
        raise _fail(path, f"{at}: a coded tensor is U8 [rows, {packed_cols(cols, bits)}] ({cols} indices of {bits} "
                          f"bits a row); got {dtype} {shape}")
    if not isinstance(counts, list) or len(counts) != 1 << bits \
            or not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != shape[0] * cols or not sum(counts):
        raise _fail(path, f"{at}.codec.counts must be {1 << bits} counts summing to {shape[0] * cols} symbols")
    if length % 4 or not length or math.prod(shape) > MAX_EXPANSION * length:
        raise _fail(path, f"{at}: a coded stream of {length} bytes cannot stand for {math.prod(shape)} packed bytes "
                          f"(whole 32-bit words, at most {MAX_EXPANSION}x expansion)")
    return codec


def check_index(path: Path, index: Any, data_len: int) -> list[tuple[str, str, list[int], int, int, dict | None]]:
    """Every index entry well formed: names unique, dtypes known, shapes bounded, spans contiguous over the `tensors` blob."""
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION or not isinstance(index.get("tensors"), list):
        raise _fail(path, f"manifest.{INDEX_KEY} must be {{version: {INDEX_VERSION}, tensors: [...]}}; the file is damaged")
    raw_entries = index["tensors"]
    if len(raw_entries) > MAX_TENSORS:
        raise _fail(path, f"manifest.{INDEX_KEY} lists {len(raw_entries):,} tensors (limit {MAX_TENSORS:,})")
    entries, names, covered = [], set(), 0
    for i, entry in enumerate(raw_entries):
        at = f"manifest.{INDEX_KEY}.tensors.{i}"
        if not isinstance(entry, list) or len(entry) not in (4, 5):
            raise _fail(path, f"{at} must be [name, dtype, shape, length(, codec)] (got {str(entry)[:80]})")
        name, dtype, shape, length = entry[:4]
        if not isinstance(name, str) or not name or len(name) > 1000 or name in names:
            raise _fail(path, f"{at}.name must be a new, non-empty tensor name (got {json.dumps(name)[:60]})")
        names.add(name)
        at = f"{at} ({name})"
        if dtype not in DTYPES:
            raise _fail(path, f"{at}.dtype {str(dtype)[:20]!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
            raise _fail(path, f"{at}.shape {str(shape)[:60]} is not a list of at most 8 sizes")
        if not _is_int(length) or length < 0:
            raise _fail(path, f"{at}.length must be a non-negative integer (got {json.dumps(length)[:20]})")
        if covered + length > data_len:
            raise _fail(path, f"{at}: length {str(length)[:20]} from byte {covered} runs past the {data_len} data "
                              "bytes; truncated or damaged")
        codec = None
        if len(entry) == 5:
            codec = _check_codec(path, at, entry[4], dtype, shape, length)
        elif length != math.prod(shape) * _itemsize(dtype):
            raise _fail(path, f"{at}: {length} bytes do not hold {dtype} {shape}")
        entries.append((name, dtype, shape, covered, length, codec))
        covered += length
    if covered != data_len:
        raise _fail(path, f"{data_len - covered} data bytes after the last indexed tensor; truncated or damaged")
    return entries


def unpack_container(path: Path, header: dict[str, Any], raw: bytes, start: int
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, manifest without the index, index) of a version-2 file whose safetensors header `check_header`
    accepted; `start` is the data section's offset in `raw`."""
    metadata = header.get("__metadata__") or {}
    names = sorted(k for k in header if k != "__metadata__")
    if names != sorted([DATA, MANIFEST]):
        raise _fail(path, f"a version-2 artifact holds exactly the tensors '{DATA}' and '{MANIFEST}' (got "
                          f"{[n[:40] for n in names[:4]]}); the file is damaged")
    spans = {}
    for name in (DATA, MANIFEST):
        info = header[name]
        if info["dtype"] != "U8" or len(info["shape"]) != 1:
            raise _fail(path, f"tensor '{name}' must be U8 [n] (got {info['dtype']} {info['shape']})")
        spans[name] = (start + info["data_offsets"][0], start + info["data_offsets"][1])
    if metadata.get("manifest_encoding") != "zlib":
        raise _fail(path, f"unknown manifest encoding {str(metadata.get('manifest_encoding'))[:30]!r} (reads 'zlib')")
    text = inflate_text(path, raw[slice(*spans[MANIFEST])], "the manifest", MAX_MANIFEST_BYTES)
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("manifest_sha256"):
        raise _fail(path, "manifest checksum mismatch; the manifest is damaged")
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"the manifest is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise _fail(path, f"the manifest must be a JSON object (got {type(manifest).__name__})")
    index = manifest.pop(INDEX_KEY, None)
    data_begin, data_end = spans[DATA]
    entries = check_index(path, index, data_end - data_begin)
    if len(entries) != manifest.get("tensor_count"):
        raise _fail(path, f"the index lists {len(entries)} tensors, tensor_count says {str(manifest.get('tensor_count'))[:20]}")
    tensors = {}
    for name, dtype, shape, offset, length, codec in entries:
        chunk = raw[data_begin + offset: data_begin + offset + length]
        if codec is not None and codec["codec"] == F16:
            tensors[name] = torch.frombuffer(bytearray(chunk), dtype=torch.float16).float().reshape(shape)
        elif codec is not None:
            tensors[name] = decode_stream(path, name, chunk, codec, shape)
        elif length == 0:
            tensors[name] = torch.zeros(shape, dtype=DTYPES[dtype])
        else:
            tensors[name] = torch.frombuffer(bytearray(chunk), dtype=DTYPES[dtype]).reshape(shape)
    return tensors, manifest, index
