"""`export_onnx`: an artifact as one ONNX file that keeps the compressed weights compressed.

Each quantized layer's stored tensors (packed uint8 indices, fp16 codebooks, scales, offsets, NF4 absmax;
a row -> group map packed in big layers, one byte per row in small ones, see
`compress.onnx.decode.graph_tensors`) are initializers of the graph, and the graph
decodes them into the dense weight in front of the layer's Conv / Gemm / MatMul: BitShift + BitwiseAnd (or
integer Div + Mod below opset 18) unpack the indices, Gather / GatherElements read the codebooks. The file
is about the size of the artifact rather than of the dense model. A runtime that constant-folds
(onnxruntime does, at session creation) decodes the weights once when it loads the model, so inference then
costs what a dense export costs. `dense=True` writes the plain dense model.

How the graph is made: the TorchScript exporter, `torch.onnx.export(..., dynamo=False)`, traces a wrapper
whose forward takes the image AND the stored tensors as arguments; the quantized layers' weight property is
swapped for `decode_traceable`, fed from those arguments. As graph inputs the stored tensors are not
constants, so the exporter's constant folding (on: it folds the shape arithmetic around the decoder) cannot
fold the decoding into dense weights; afterwards the inputs become initializers holding the stored values.

The exporter writes every layer's decoding out in full (~16 nodes a layer): for a small model that
bookkeeping would weigh as much as the weights. So the exported graph is rewritten with ONNX model-local
functions (FunctionProto, IR version 8; onnxruntime inlines them when it loads the model, then folds as
before), in the domain FUNCTION_DOMAIN:
- `_functionize`: the layers whose decodings have the same structure (the same stored form, up to sizes)
  share one decode function "d<i>"; each layer is one call node, its sizes (shapes, slice bounds, bit
  widths) the call's attributes;
- `_shared_chains`: node chains that recur in the decode functions (one bit plane's unpacking, the
  codebook lookup) become functions "u<i>" that those call;
- `_layer_functions`: where a decode function feeds a Conv (and a SiLU after it) in at least
  LAYER_FUNCTION_MIN layers, a layer function "l<i>" (decode call + Conv + SiLU) makes each such layer one
  node;
- `_half_where_exact`: float32 initializers that hold float16 values (what an artifact stores in fp16, e.g.
  biases, loads as float32) are stored in fp16 and cast back by the graph;
- small constants are shared, every value and initializer gets a short name, attributes that say the
  default are dropped. The initializers' names are therefore not the artifact's tensor names: a layer's
  stored tensors are the initializer inputs of its call node.
Why not the dynamo exporter (torch 2.14's default): it needs onnxscript, which compress does not depend on,
and it runs onnxscript's optimizer, whose constant folding may fold initializer-only subgraphs (small
layers' whole decoders) back into dense constants. The TorchScript exporter's limits: opsets up to 20,
files below 2 GB (one protobuf, no external data).
"""
from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.errors import UserError
from compress.onnx.decode import BITOPS_MIN_OPSET, decode_traceable, graph_tensors

__all__ = ["OnnxExportError", "export_onnx", "export_module", "DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET"]

DEFAULT_OPSET = 18  # the first opset with BitwiseAnd/BitwiseOr; read by onnxruntime >= 1.14
MIN_OPSET = 13  # the oldest opset the tests run (integer Div/Mod decoding; Unsqueeze/Slice with tensor inputs)
MAX_OPSET = 20  # the TorchScript exporter's newest opset (torch.onnx._constants)
INPUT_NAME = "images"


class OnnxExportError(UserError):
    """The artifact cannot be written as ONNX (onnx missing, an unsupported layer or model, a bad option)."""


def _require_onnx() -> Any:
    try:
        onnx = importlib.import_module("onnx")
        importlib.import_module("onnx.numpy_helper")
        return onnx
    except ImportError:
        raise OnnxExportError("ONNX export needs the 'onnx' package: pip install 'compress[onnx]' "
                              "(or pip install onnx onnxruntime)") from None


def _manifest(path: Path) -> dict[str, Any]:
    """The manifest of an artifact (any format version; compress.load has validated the whole file before)."""
    from compress.format.artifact import read_artifact

    return read_artifact(path)[1]


def _describe(layout: dict[str, Any]) -> str:
    if layout.get("format") == "nf4":
        return f"nf4 blocksize={layout.get('blocksize')}"
    return (f"{layout.get('format')} {layout.get('bits')}-bit {layout.get('codebook')} G={layout.get('groups')} "
            f"{layout.get('packing')} row_map={layout.get('row_map')}")


def _onnx_class(cls: type) -> type:
    """`cls` (a quantized layer class) whose weight property runs the traceable decoder, uncached, on the
    stored tensors the export wrapper hands it (graph inputs while tracing)."""
    attr = cls._quant_attr

    def weight(self: nn.Module) -> torch.Tensor:
        tensors = self.__dict__.get("_onnx_stored") or graph_tensors(self.quant_layout, self.quant_buffers())
        dense = decode_traceable(self.quant_layout, tensors, self._onnx_bitops)
        return dense if self._dense_dtype == torch.float32 else dense.to(self._dense_dtype)

    return type(f"Onnx{cls.__name__}", (cls,), {attr: property(weight), "__module__": __name__})


def _prepare_quantized(model: nn.Module, path: str | Path, bitops: bool) -> dict[str, nn.Module]:
    """Check every quantized layer's traceable decoding against `formats.decode`, then switch the layer to it."""
    from compress.format.weights import decode
    from compress.format.layers import quantized_modules

    classes: dict[type, type] = {}
    layers = quantized_modules(model)
    for name, module in layers.items():
        layout, buffers = module.quant_layout, module.quant_buffers()
        try:
            ours = decode_traceable(layout, graph_tensors(layout, buffers), bitops)
            reference = decode(layout, buffers)
        except Exception as exc:  # noqa: BLE001  (any failure here is "this layout cannot be exported")
            raise OnnxExportError(f"{path}: layer {name!r} ({_describe(layout)}) cannot be exported to ONNX: "
                                  f"{exc.__class__.__name__}: {exc}") from None
        if ours.shape != reference.shape or not torch.equal(ours, reference):
            raise OnnxExportError(f"{path}: layer {name!r} ({_describe(layout)}) cannot be exported to ONNX: "
                                  "the graph's decoding does not reproduce the stored weight")
        cls = type(module)
        if cls not in classes:
            classes[cls] = _onnx_class(cls)
        module.__class__ = classes[cls]
        module._onnx_bitops = bitops
    return layers


class _StoredAsInputs(nn.Module):
    """The model, with the quantized layers' stored tensors passed as forward arguments.

    Traced this way the stored tensors are graph inputs, not parameters, so the exporter's constant folding
    (which folds everything computed from parameters) cannot fold the decoding into dense weights, while it
    still folds the shape arithmetic around it; `_stored_to_initializers` then turns those inputs into
    initializers holding the stored values.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.model = model
        # (module, key, graph name, tensor): a plain list, not submodules; names follow the artifact's
        self.slots = [(module, key, f"{name}.{module._quant_attr}_{key}", tensor)
                      for name, module in layers.items()
                      for key, tensor in graph_tensors(module.quant_layout, module.quant_buffers()).items()]

    def stored(self) -> list[torch.Tensor]:
        return [tensor for *_, tensor in self.slots]

    def forward(self, images: torch.Tensor, *stored: torch.Tensor) -> Any:
        for module, *_ in self.slots:
            module._onnx_stored = {}
        for (module, key, *_), tensor in zip(self.slots, stored):
            module._onnx_stored[key] = tensor
        try:
            return self.model(images)
        finally:
            for module, *_ in self.slots:
                module._onnx_stored = None


def _output_names(outputs: Any, path: str | Path) -> list[str]:
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, (list, tuple)) and outputs and all(isinstance(t, torch.Tensor) for t in outputs):
        return [f"output{i}" for i in range(len(outputs))]
    raise OnnxExportError(f"{path}: the model returns {type(outputs).__name__}; ONNX export supports models that "
                          "return a tensor or a list/tuple of tensors")


@contextlib.contextmanager
def _exporter_log_silenced() -> Iterator[None]:
    """Discard what the TorchScript exporter writes to the process's stdout.

    torch 2.14's `setup_onnx_logging` tests the function `_jit_is_onnx_log_enabled` instead of calling it,
    so ONNX logging is always on during export, and a failing export prints the whole TorchScript graph
    (hundreds of kB for a small detector) through C++ std::cout. The error itself is raised as usual.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (embedded interpreters): nothing to silence
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """nn.MultiheadAttention's inference fast path (`aten::_native_multi_head_attention`) has no ONNX
    symbolic; with it off, the layer traces as the plain matmul/softmax ops."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _failure(artifact: str | Path, exc: Exception) -> str:
    """One readable line for an exporter error (whose text can hold the whole graph: tens of MB), naming the
    module whose op failed when the exporter says (its "scope: Type::name/Type::name/..." trace)."""
    text = str(exc)[:100_000]
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first if len(first) <= 240 else first[:240] + " ..."
    where = ""
    scope = re.search(r"scope: (\S+)", text)
    if scope:
        names: list[str] = []
        for part in scope.group(1).split("/"):
            name = part.split("::", 1)[1] if "::" in part else ""
            if not name:
                continue
            if names and name.startswith(names[-1] + "."):  # children of containers: "stage2" -> "stage2.0"
                names[-1] = name
            else:
                names.append(name)
        if names and names[0] == "model":  # the export wrapper's attribute
            names = names[1:]
        if names:
            where = f" in module {'.'.join(names)!r}"
    return f"{artifact}: ONNX export failed{where} ({exc.__class__.__name__}: {first})"


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = digits[n % 36]
    while n >= 36:
        n //= 36
        out = digits[n % 36] + out
    return out


def _stored_to_initializers(proto: Any, onnx: Any, wrapper: _StoredAsInputs) -> None:
    """Graph inputs that carry stored tensors become initializers with the stored values."""
    values = {name: tensor for _, _, name, tensor in wrapper.slots}
    graph = proto.graph
    inputs = [v for v in graph.input if v.name not in values]
    for name, tensor in values.items():
        if any(v.name == name for v in graph.input):
            graph.initializer.append(onnx.numpy_helper.from_array(tensor.detach().cpu().numpy(), name))
    del graph.input[:]
    graph.input.extend(inputs)


def _compact(proto: Any, onnx: Any, prefix: str = "model.") -> set[str]:
    """The first pass over the exported graph; returns the names of the small constants.

    The exporter names values and nodes after module paths and writes small constants (shapes, axes,
    shifts, masks) as Constant nodes or as one initializer per use. Small constants become initializers,
    one per distinct value (`_functionize` reads them); intermediate values get short names; node names and
    doc strings are dropped; the wrapper's `prefix` is taken off the model's tensor names (`_short_names`
    renames everything at the end).
    """
    graph = proto.graph
    renamed: dict[str, str] = {}
    constants: dict[tuple, str] = {}

    def small_constant(tensor: Any) -> str:
        array = onnx.numpy_helper.to_array(tensor)
        key = (tensor.data_type, tuple(tensor.dims), array.tobytes())
        if key not in constants:
            constants[key] = f"_c{len(constants)}"
            kept.append(onnx.numpy_helper.from_array(array, constants[key]))
        return constants[key]

    kept: list[Any] = []
    for tensor in graph.initializer:
        if tensor.name.startswith(prefix):
            renamed[tensor.name] = tensor.name = tensor.name[len(prefix):]
            kept.append(tensor)
        elif "." not in tensor.name and len(tensor.raw_data or b"") <= 256 and math.prod(tensor.dims) <= 64:
            renamed[tensor.name] = small_constant(tensor)  # exporter-made (folded) constant
        else:
            kept.append(tensor)
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in kept}
    short = (name for name in map(_base36, itertools.count()) if name not in keep)
    nodes = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value" \
                and node.output[0] not in keep:
            renamed[node.output[0]] = small_constant(node.attribute[0].t)
            continue
        node.doc_string = ""
        node.name = ""
        for i, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = node.output[i] = next(short)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for info in graph.value_info:
        if info.name in renamed:
            info.name = renamed[info.name]
    proto.doc_string = ""
    graph.doc_string = ""
    return set(constants.values())


FUNCTION_DOMAIN = "c"  # the model-local decode functions' domain (a short name: each call writes it)


def _attribute_value(onnx: Any, array: Any) -> tuple[int, str, Any]:
    """(attribute type, Constant attribute name, value) that makes a Constant node of `array` compactly:
    int64 and float32 scalars and vectors as value_int(s) / value_float(s), other tensors as a TensorProto."""
    A = onnx.AttributeProto
    if array.dtype.name == "int64" and array.ndim <= 1:
        return (A.INTS, "value_ints", array.tolist()) if array.ndim else (A.INT, "value_int", int(array))
    if array.dtype.name == "float32" and array.ndim <= 1:
        return (A.FLOATS, "value_floats", array.tolist()) if array.ndim else (A.FLOAT, "value_float", float(array))
    return A.TENSOR, "value", onnx.numpy_helper.from_array(array)


def _same(arrays: list[Any]) -> bool:
    first = arrays[0]
    return all(a.dtype == first.dtype and a.shape == first.shape and a.tobytes() == first.tobytes() for a in arrays)


# a layer function's Conv: its attributes -> the call's attribute names (upper case: the decode
# functions' attribute names are lower-case base 36) and types
_CONV_REF_TYPES = {"pads": ("P", 7), "strides": ("S", 7), "dilations": ("D", 7), "group": ("G", 2)}


def _fused_consumers(weight: str, consumers: dict[str, list[Any]], graph_outputs: set[str],
                     inits: set[str]) -> list[Any]:
    """The nodes that can join a layer's decoding in its layer function: the Conv that alone consumes the
    decoded `weight` (with only the attributes of `_CONV_REF_TYPES`; no bias, or an initializer), then the
    SiLU after it (Sigmoid + Mul) when nothing else reads the Conv's output. [] when the weight goes
    elsewhere."""
    if weight in graph_outputs or len(consumers.get(weight, [])) != 1:
        return []
    conv = consumers[weight][0]
    if conv.op_type != "Conv" or conv.domain or list(conv.input[1:2]) != [weight] or conv.input[0] == weight \
            or any(a.name not in _CONV_REF_TYPES for a in conv.attribute) or len(conv.output) != 1 \
            or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits):
        return []
    y = conv.output[0]
    users = consumers.get(y, [])
    if y in graph_outputs or len(users) != 2:
        return [conv]
    sig = [n for n in users if n.op_type == "Sigmoid" and not n.domain and list(n.input) == [y]]
    mul = [n for n in users if n.op_type == "Mul" and not n.domain]
    if len(sig) != 1 or len(mul) != 1 or sorted(mul[0].input) != sorted([y, sig[0].output[0]]) \
            or sig[0].output[0] in graph_outputs or len(consumers.get(sig[0].output[0], [])) != 1:
        return [conv]
    return [conv, sig[0], mul[0]]


LAYER_FUNCTION_MIN = 4  # layers that a layer function must serve to weigh less than their Conv (+ SiLU) nodes


def _layer_functions(proto: Any, onnx: Any) -> int:
    """Fold each decode call's Conv (and the SiLU after it) into one call of a layer function; returns the
    number of layer functions.

    A layer function's body is the decode call (its attributes passed through), the Conv (strides, pads,
    dilations and group from the call; absent ones keep their defaults) and the Sigmoid + Mul of a SiLU;
    one is written per decode function and ending (with or without SiLU) that serves at least
    LAYER_FUNCTION_MIN layers. The call takes the Conv's input, the stored tensors and the bias (convs with
    and without one get different layer functions: onnxruntime does not fuse a BatchNormalization into a
    Conv whose bias input is given as "").
    """
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    graph_outputs = {v.name for v in graph.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    candidates: dict[tuple[str, int], list[tuple[Any, list[Any]]]] = {}
    for node in graph.node:
        if node.domain == FUNCTION_DOMAIN and len(node.output) == 1:
            fused = _fused_consumers(node.output[0], consumers, graph_outputs, inits)
            if fused:
                # with and without bias apart: a Conv given an empty bias input is not fused with a
                # BatchNormalization after it by onnxruntime
                bias = len(fused[0].input) > 2 and bool(fused[0].input[2])
                candidates.setdefault((node.op_type, len(fused), bias), []).append((node, fused))
    replaced: dict[int, Any] = {}
    removed: set[int] = set()
    functions = []
    A = onnx.AttributeProto
    for (decoder, length, has_bias), members in candidates.items():
        if len(members) < LAYER_FUNCTION_MIN:
            continue
        fname = f"l{len(functions)}"
        first = members[0][0]
        names = map(_base36, itertools.count())
        x, stored = next(names), [next(names) for _ in first.input]
        bias = [next(names)] if has_bias else []
        w, y = next(names), next(names)
        inner = onnx.helper.make_node(decoder, stored, [w], domain=FUNCTION_DOMAIN)
        inner.attribute.extend(A(name=a.name, ref_attr_name=a.name, type=a.type) for a in first.attribute)
        conv = onnx.helper.make_node("Conv", [x, w, *bias], [y])
        conv.attribute.extend(A(name=name, ref_attr_name=ref, type=kind) for name, (ref, kind) in _CONV_REF_TYPES.items())
        nodes = [inner, conv]
        out = y
        if length == 3:
            sig, out = next(names), next(names)
            nodes += [onnx.helper.make_node("Sigmoid", [y], [sig]), onnx.helper.make_node("Mul", [y, sig], [out])]
        functions.append(onnx.helper.make_function(
            FUNCTION_DOMAIN, fname, [x, *stored, *bias], [out], nodes,
            [onnx.helper.make_opsetid("", proto.opset_import[0].version), onnx.helper.make_opsetid(FUNCTION_DOMAIN, 1)],
            attributes=[a.name for a in first.attribute] + [ref for ref, _ in _CONV_REF_TYPES.values()]))
        for call, fused in members:
            layer_conv = fused[0]
            b = [layer_conv.input[2]] if has_bias else []
            new = onnx.helper.make_node(fname, [layer_conv.input[0], *call.input, *b], [fused[-1].output[0]],
                                        domain=FUNCTION_DOMAIN)
            new.attribute.extend(call.attribute)
            new.attribute.extend(onnx.helper.make_attribute(_CONV_REF_TYPES[a.name][0],
                                                            onnx.helper.get_attribute_value(a), attr_type=a.type)
                                 for a in layer_conv.attribute)
            replaced[id(layer_conv)] = new
            removed.update(id(n) for n in [call, *fused])
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in removed or id(n) in replaced]
    del graph.node[:]
    graph.node.extend(nodes)
    proto.functions.extend(functions)
    return len(functions)


def _functionize(proto: Any, onnx: Any, layers: list[list[str]], constants: set[str]) -> int:
    """Replace every layer's decoding subgraph by one call of a model-local function; returns the number of
    functions.

    A layer's decoding is the set of nodes computed from its stored tensors (`layers[i]`, initializer names)
    and small constants (`constants`, initializer names) alone. Layers whose decodings have the same
    structure (same ops, attributes and wiring: the same stored form up to sizes) share one FunctionProto:
    a constant input that is the same in all of them is a Constant node of the body, one that differs
    (shapes, slice bounds, shifts of another bit width) is a Constant node taking its value from an
    attribute of the call. The TorchScript exporter inlines everything, so this is done on the exported
    graph; runtimes inline model-local functions when they load the model (onnxruntime then folds the
    decoding as before).
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {name for name in constants if name in inits}
    layer_of = {name: i for i, names in enumerate(layers) for name in names}
    owner: dict[str, int] = {}
    cones: dict[int, list[Any]] = {}
    for node in graph.node:
        found: set[int] = set()
        for name in node.input:
            if not name or name in consts:
                continue
            layer = layer_of.get(name, owner.get(name))
            if layer is None:
                found = set()
                break
            found.add(layer)
        if len(found) == 1:
            layer = found.pop()
            cones.setdefault(layer, []).append(node)
            owner.update({o: layer for o in node.output if o})
    in_cone = {id(n) for cone in cones.values() for n in cone}
    used_outside = {v.name for v in graph.output}
    for node in graph.node:
        if id(node) not in in_cone:
            used_outside.update(node.input)

    # structure key -> [(layer, the constant of every slot (one per constant input of a node), outputs)]
    groups: dict[tuple, list[tuple[int, list[str], list[str]]]] = {}
    for layer, cone in cones.items():
        local: dict[str, tuple] = {name: ("i", k) for k, name in enumerate(layers[layer])}
        slots: list[str] = []
        body = []
        for j, node in enumerate(cone):
            ins: list[tuple] = []
            for name in node.input:
                if not name:
                    ins.append(("",))
                elif name in consts:
                    ins.append(("c", len(slots)))
                    slots.append(name)
                else:
                    ins.append(local[name])
            local.update({o: ("v", j, m) for m, o in enumerate(node.output)})
            body.append((node.op_type, node.domain, tuple(a.SerializeToString() for a in node.attribute),
                         tuple(ins), len(node.output)))
        outs = [o for n in cone for o in n.output if o in used_outside]
        if not outs:
            continue
        key = (tuple(body), len(layers[layer]), tuple(local[o] for o in outs))
        groups.setdefault(key, []).append((layer, slots, outs))

    replaced: dict[int, Any] = {}  # id(first node of a cone) -> its call node
    functions = []
    for f, (key, members) in enumerate(groups.items()):
        body, ninputs, outputs = key
        fname = f"d{f}"
        names = map(_base36, itertools.count())
        inputs = [next(names) for _ in range(ninputs)]
        nodes = []
        call_attrs: list[list[Any]] = [[] for _ in members]
        slot_value: list[str] = []
        made: dict[tuple, str] = {}  # a constant's values in every member -> its value name in the body
        refs = map(_base36, itertools.count())  # the call's attribute names
        for k in range(len(members[0][1])):
            arrays = [onnx.numpy_helper.to_array(inits[slots[k]]) for _, slots, *_ in members]
            fixed = _same(arrays)
            ident = (fixed,) + tuple((a.dtype.str, a.shape, a.tobytes()) for a in (arrays[:1] if fixed else arrays))
            if ident not in made:
                made[ident] = next(names)
                node = onnx.helper.make_node("Constant", [], [made[ident]])
                if fixed:
                    kind, field, value = _attribute_value(onnx, arrays[0])
                    node.attribute.append(onnx.helper.make_attribute(field, value, attr_type=kind))
                else:
                    ref = next(refs)
                    # small integers of another type (uint8 shifts and masks): int64 in the call, cast here
                    cast = arrays[0].dtype.kind in "iu" and arrays[0].dtype.name != "int64" \
                        and len({(a.dtype, a.ndim) for a in arrays}) == 1 and arrays[0].ndim <= 1
                    kinds = {_attribute_value(onnx, a.astype("int64") if cast else a)[:2] for a in arrays}
                    if len(kinds) > 1:  # e.g. some scalars, some vectors: all as tensors
                        kinds, cast = {(onnx.AttributeProto.TENSOR, "value")}, False
                    (kind, field), = kinds
                    node.attribute.append(onnx.AttributeProto(name=field, ref_attr_name=ref, type=kind))
                    for m, array in enumerate(arrays):
                        value = onnx.numpy_helper.from_array(array) if kind == onnx.AttributeProto.TENSOR \
                            else _attribute_value(onnx, array.astype("int64") if cast else array)[2]
                        call_attrs[m].append(onnx.helper.make_attribute(ref, value, attr_type=kind))
                    if cast:
                        wide = next(names)
                        node.output[0] = wide
                        nodes.append(node)
                        node = onnx.helper.make_node("Cast", [wide], [made[ident]], to=onnx.helper.np_dtype_to_tensor_dtype(arrays[0].dtype))
                nodes.append(node)
            slot_value.append(made[ident])
        values: dict[tuple, str] = {("i", k): n for k, n in enumerate(inputs)}
        values.update({("c", k): n for k, n in enumerate(slot_value)})
        values[("",)] = ""
        for j, (op, domain, attrs, ins, nout) in enumerate(body):
            outs = [next(names) for _ in range(nout)]
            values.update({("v", j, m): o for m, o in enumerate(outs)})
            node = onnx.NodeProto(op_type=op, domain=domain, input=[values[i] for i in ins], output=outs)
            for blob in attrs:
                attr = onnx.AttributeProto()
                attr.ParseFromString(blob)
                node.attribute.append(attr)
            nodes.append(node)
        functions.append(onnx.helper.make_function(
            FUNCTION_DOMAIN, fname, inputs, [values[ref] for ref in outputs], nodes,
            [onnx.helper.make_opsetid("", proto.opset_import[0].version)],
            attributes=[a.name for a in call_attrs[0]]))
        for m, (layer, _, outs) in enumerate(members):
            call = onnx.helper.make_node(fname, list(layers[layer]), outs, domain=FUNCTION_DOMAIN)
            call.attribute.extend(call_attrs[m])
            replaced[id(cones[layer][0])] = call
    done = {id(n) for members in groups.values() for layer, *_ in members for n in cones[layer]}
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in done or id(n) in replaced]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    proto.functions.extend(functions)
    if functions:
        proto.opset_import.append(onnx.helper.make_opsetid(FUNCTION_DOMAIN, 1))
        proto.ir_version = max(proto.ir_version, 8)  # model-local functions
    return len(functions)


CHAIN_NESTING = False  # whether a shared chain may call another: ~30 bytes smaller here, but one more level
# of nested functions for onnxruntime to inline (session creation ~0.1 s CPU slower on the demo detector)


def _chains(function: Any) -> list[list[Any]]:
    """The maximal chains of a function body: nodes (no Constants, no function calls) each of whose single
    output is read only by the next one, as its first input."""
    uses: dict[str, int] = {}
    for node in function.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for name in function.output:
        uses[name] = uses.get(name, 0) + 1
    links = [n for n in function.node if n.op_type != "Constant" and (CHAIN_NESTING or n.domain != FUNCTION_DOMAIN)]
    by_first_input = {node.input[0]: node for node in links if node.input}

    def next_of(node: Any) -> Any:
        if len(node.output) != 1 or uses.get(node.output[0]) != 1:
            return None
        return by_first_input.get(node.output[0])

    continued = {id(n) for n in (next_of(node) for node in links) if n}
    chains = []
    for node in links:
        if id(node) in continued:
            continue
        chain = [node]
        while (following := next_of(chain[-1])) is not None:
            chain.append(following)
        chains.append(chain)
    return chains


def _shared_chains(proto: Any, onnx: Any, prefix: str = "d") -> int:
    """Chains of nodes that recur in the decode functions (the unpacking of one bit plane: Unsqueeze,
    BitShift, BitwiseAnd, Flatten, Slice, Cast) become functions of their own, called from the decode
    functions; greedily, while that makes the file smaller. Returns how many."""
    made = 0
    while True:
        functions = [f for f in proto.functions if f.name.startswith(prefix)]
        candidates: dict[tuple, list[tuple[Any, list[Any], list[str]]]] = {}
        for function in functions:
            literal = {n.output[0]: n.attribute[0].SerializeToString() for n in function.node
                       if n.op_type == "Constant" and len(n.attribute) == 1 and not n.attribute[0].ref_attr_name}
            for chain in _chains(function):
                # two forms: the body's literal constants built into the shared function, or all passed in
                for generic in (False, True):
                    signature: list[tuple] = []
                    sides: list[str] = []
                    for k, node in enumerate(chain):
                        ins = tuple(("k", literal[i]) if i in literal and not generic else ("s",)
                                    for i in node.input[1:])
                        sides += [i for i in node.input[1:] if generic or i not in literal]
                        signature.append((node.op_type, node.domain, tuple(a.SerializeToString() for a in node.attribute),
                                          ins))
                        if k >= 2:
                            candidates.setdefault(tuple(signature), []).append((function, chain[:k + 1], list(sides)))
        best, best_gain = None, 0
        for signature, places in candidates.items():
            if len({id(chain[0]) for _, chain, _ in places}) < 2:
                continue
            # bytes of the chains replaced - bytes of the calls - bytes of the new body (about)
            body = sum(n.ByteSize() + 2 for n in places[0][1]) + 40 \
                + sum(len(k[1]) + 12 for k in {i for sig in signature for i in sig[3] if i[0] == "k"})
            gain = sum(sum(n.ByteSize() + 2 for n in chain) - (14 + 4 * len(sides)) for _, chain, sides in places) - body
            if gain > best_gain:
                best, best_gain = signature, gain
        if best is None:
            return made
        places = candidates[best]
        fname = f"u{made}"
        _, chain, sides = places[0]
        names = map(_base36, itertools.count())
        inputs = [next(names)] + [next(names) for _ in sides]
        body: list[Any] = []
        literal_names: dict[bytes, str] = {}
        current, side_iter = inputs[0], iter(inputs[1:])
        for op, domain, attrs, ins in best:
            node_inputs = [current]
            for kind in ins:
                if kind[0] == "k":
                    if kind[1] not in literal_names:
                        literal_names[kind[1]] = next(names)
                        const = onnx.NodeProto(op_type="Constant", output=[literal_names[kind[1]]])
                        attr = onnx.AttributeProto()
                        attr.ParseFromString(kind[1])
                        const.attribute.append(attr)
                        body.insert(0, const)
                    node_inputs.append(literal_names[kind[1]])
                else:
                    node_inputs.append(next(side_iter))
            current = next(names)
            node = onnx.NodeProto(op_type=op, domain=domain, input=node_inputs, output=[current])
            for blob in attrs:
                attr = onnx.AttributeProto()
                attr.ParseFromString(blob)
                node.attribute.append(attr)
            body.append(node)
        opsets = [onnx.helper.make_opsetid("", proto.opset_import[0].version)]
        if any(n.domain == FUNCTION_DOMAIN for n in body):  # a chain that calls an earlier shared chain
            opsets.append(onnx.helper.make_opsetid(FUNCTION_DOMAIN, 1))
        proto.functions.append(onnx.helper.make_function(FUNCTION_DOMAIN, fname, inputs, [current], body, opsets))
        # one rebuild of each body (its nodes are copied, so every chain of it is replaced in the same pass)
        per_function: dict[int, tuple[Any, dict[int, Any], set[int]]] = {}
        for function, chain, sides in places:
            _, calls, drop = per_function.setdefault(id(function), (function, {}, set()))
            if any(id(n) in drop for n in chain):
                continue
            # at the chain's last node: every input of the chain is there
            calls[id(chain[-1])] = onnx.helper.make_node(fname, [chain[0].input[0], *sides], [chain[-1].output[0]],
                                                        domain=FUNCTION_DOMAIN)
            drop.update(id(n) for n in chain)
        for function, calls, drop in per_function.values():
            nodes = [calls.get(id(n), n) for n in function.node if id(n) not in drop or id(n) in calls]
            used = {i for n in nodes for i in n.input} | set(function.output)
            nodes = [n for n in nodes if n.op_type != "Constant" or n.output[0] in used]
            del function.node[:]
            function.node.extend(nodes)
            if not any(o.domain == FUNCTION_DOMAIN for o in function.opset_import):
                function.opset_import.append(onnx.helper.make_opsetid(FUNCTION_DOMAIN, 1))
        made += 1


HALF_MIN_VALUES = 16  # an N-d float32 initializer stored as float16 + Cast saves 2 bytes a value; a Cast ~20


def _half_where_exact(proto: Any, onnx: Any) -> int:
    """float32 initializers whose values are all float16 values (an artifact that stores them in fp16, e.g.
    biases, loads them as float32) are stored as float16 and cast back in the graph; runtimes fold the casts
    at load, and the values are unchanged, bit for bit. Returns how many.

    The vectors (biases) are concatenated into one float16 initializer, cast once and split into them (a
    few bytes each); bigger tensors of HALF_MIN_VALUES values or more get a Cast each.
    """
    import numpy as np

    graph = proto.graph
    kept, vectors, nodes = [], [], []
    for tensor in graph.initializer:
        array = onnx.numpy_helper.to_array(tensor) if tensor.data_type == onnx.TensorProto.FLOAT else None
        half = None if array is None else array.astype(np.float16)
        if half is None or not np.array_equal(half.astype(np.float32), array, equal_nan=True) \
                or not np.array_equal(np.signbit(half), np.signbit(array)) or array.size == 0 \
                or (array.ndim != 1 and array.size < HALF_MIN_VALUES):
            kept.append(tensor)
        elif array.ndim == 1:
            vectors.append((tensor.name, half))
        else:
            kept.append(onnx.numpy_helper.from_array(half, tensor.name + "_h"))
            nodes.append(onnx.helper.make_node("Cast", [tensor.name + "_h"], [tensor.name], to=onnx.TensorProto.FLOAT))
    if len(vectors) == 1 and vectors[0][1].size < HALF_MIN_VALUES:
        kept.append(onnx.numpy_helper.from_array(vectors[0][1].astype(np.float32), vectors[0][0]))
        vectors = []
    if len(vectors) == 1:
        (name, half), = vectors
        kept.append(onnx.numpy_helper.from_array(half, name + "_h"))
        nodes.append(onnx.helper.make_node("Cast", [name + "_h"], [name], to=onnx.TensorProto.FLOAT))
    elif vectors:
        kept.append(onnx.numpy_helper.from_array(np.concatenate([h for _, h in vectors]), "_halves"))
        nodes.append(onnx.helper.make_node("Constant", [], ["_halves_n"], value_ints=[h.size for _, h in vectors]))
        nodes.append(onnx.helper.make_node("Cast", ["_halves"], ["_halves_f"], to=onnx.TensorProto.FLOAT))
        nodes.append(onnx.helper.make_node("Split", ["_halves_f", "_halves_n"], [name for name, _ in vectors]))
    if nodes:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes += list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return len(vectors) + sum(n.op_type == "Cast" for n in nodes) - (len(vectors) > 0)


def _short_names(proto: Any) -> None:
    """Every initializer and intermediate value gets a short name (graph inputs and outputs keep theirs)."""
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names = (name for name in map(_base36, itertools.count()) if name not in keep)
    renamed: dict[str, str] = {}
    for tensor in graph.initializer:
        renamed[tensor.name] = tensor.name = next(names)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for i, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = node.output[i] = next(names)
    del graph.value_info[:]


# attributes that say their op's default, dropped (the exporter writes some of them explicitly)
_DEFAULTS = {"Reshape": {"allowzero": 0}, "Gather": {"axis": 0}, "GatherElements": {"axis": 0},
             "Flatten": {"axis": 1}, "Split": {"axis": 0}, "Cast": {"saturate": 1}, "Concat": {},
             "Conv": {"group": 1}}


def _drop_default_attributes(proto: Any, onnx: Any) -> None:
    """Drop attributes that say the default, in the graph and in the functions: those of `_DEFAULTS`, and
    Conv's unit strides and dilations, zero pads and kernel shape (which the spec infers from the weight)."""
    for node in itertools.chain(proto.graph.node, (n for f in proto.functions for n in f.node)):
        if node.domain or node.op_type not in _DEFAULTS:
            continue
        defaults = _DEFAULTS[node.op_type]
        kept = []
        for attr in node.attribute:
            if attr.ref_attr_name:
                kept.append(attr)
                continue
            value = onnx.helper.get_attribute_value(attr)
            if attr.name in defaults and value == defaults[attr.name]:
                continue
            if node.op_type == "Conv" and (attr.name == "kernel_shape" or (attr.name == "pads" and not any(value))
                                           or (attr.name in ("strides", "dilations") and all(v == 1 for v in value))):
                continue
            kept.append(attr)
        del node.attribute[:]
        node.attribute.extend(kept)


def _has_subgraphs(proto: Any) -> bool:
    """Whether a node holds a subgraph (If, Loop, Scan): the rewriting passes only read the top-level graph,
    so such a graph keeps the exporter's decoding as it is."""
    return any(a.type in (a.GRAPH, a.GRAPHS) for n in proto.graph.node for a in n.attribute)


def _check_opset(opset: int | None) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxExportError(f"ONNX opset {opset!r} is not supported: use {MIN_OPSET}..{MAX_OPSET} "
                              f"(default {DEFAULT_OPSET})")
    return opset


def export_module(model: nn.Module, example: torch.Tensor, out: str | Path, *, opset: int | None = None,
                  metadata: dict[str, str] | None = None, source: str | Path = "model") -> dict:
    """Write `model` (eval mode; quantized layers are exported packed, dense ones dense) as the ONNX file `out`,
    traced with the image batch `example` (its batch axis is dynamic). `source` names the model in errors.
    Returns {"path", "bytes", "opset", "quantized_layers", "outputs"}.

    Quantized layers are switched in place to the exporter's decoder: pass a model you can discard.
    """
    onnx = _require_onnx()
    opset = _check_opset(opset)
    out = Path(out)
    layers = _prepare_quantized(model, source, bitops=opset >= BITOPS_MIN_OPSET)
    wrapper = _StoredAsInputs(model, layers).eval()
    args = (example, *wrapper.stored())
    with torch.no_grad():
        names = _output_names(wrapper(*args), source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad(), _exporter_log_silenced(), _mha_fastpath_off():
            warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings
            torch.onnx.export(wrapper, args, str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME, *(name for _, _, name, _ in wrapper.slots)], output_names=names,
                              dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *names]},
                              do_constant_folding=True, export_params=True)
        proto = onnx.load(str(tmp))
        _stored_to_initializers(proto, onnx, wrapper)
        constants = _compact(proto, onnx)
        if layers and not _has_subgraphs(proto):  # a dense model (dense=True) is written as before
            stored: dict[int, list[str]] = {}
            for module, _, name, _ in wrapper.slots:
                stored.setdefault(id(module), []).append(name)
            _drop_default_attributes(proto, onnx)
            _functionize(proto, onnx, list(stored.values()), constants)
            _shared_chains(proto, onnx)
            _layer_functions(proto, onnx)
            _half_where_exact(proto, onnx)
            _short_names(proto)
            _drop_default_attributes(proto, onnx)
        for key, value in (metadata or {}).items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    except Exception as exc:  # noqa: BLE001  (the exporter raises many types; the user needs the message)
        raise OnnxExportError(_failure(source, exc)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out), "bytes": out.stat().st_size, "opset": opset, "quantized_layers": len(layers),
            "outputs": names}


def export_onnx(artifact: str | Path, out: str | Path, *, dense: bool = False, opset: int | None = None) -> dict:
    """Write the model of `artifact` as the ONNX file `out`; returns a summary for the CLI.

    The packed export keeps the quantized weights in their stored form and decodes them inside the graph
    (see the module docstring); `dense=True` stores dense float weights. The graph has one input
    "images" [batch, 3, S, S] (S = the artifact's image_size, batch dynamic) and outputs "output" (one tensor)
    or "output0", "output1", ... (a list, e.g. the per-level maps of a detector).
    Returns {"path", "bytes", "artifact_bytes", "ratio", "opset", "dense", "quantized_layers", "outputs"}.
    """
    _require_onnx()
    from compress.format.artifact import load

    artifact = Path(artifact)
    opset = _check_opset(opset)
    if Path(out).resolve() == artifact.resolve():
        raise OnnxExportError(f"{artifact}: the ONNX output path is the artifact itself; choose another path")
    model = load(artifact, materialize=dense)
    manifest = _manifest(artifact)
    size = manifest.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise OnnxExportError(f"{artifact}: the artifact records no image_size; cannot choose the ONNX input shape")
    if manifest.get("task") == "detection":
        from compress.tasks.detection import is_tensor_protocol

        if not is_tensor_protocol(model):
            raise OnnxExportError(f"{artifact}: detector {type(model).__name__} takes a list of images; ONNX export "
                                  "supports models that take one [B, 3, H, W] tensor")
    spec = manifest.get("model") or {}
    meta = {"compress_artifact": artifact.name, "compress_form": "dense" if dense else "packed",
            "task": str(manifest.get("task", "")), "image_size": str(size),
            "num_classes": str(spec.get("num_classes", "")), "build": str(spec.get("build", ""))}
    strides = getattr(model, "strides", None)
    if isinstance(strides, (list, tuple)):
        meta["strides"] = ",".join(str(int(s)) for s in strides)
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    info = export_module(model, example, out, opset=opset, metadata=meta, source=artifact)
    artifact_bytes = artifact.stat().st_size
    return {"path": info["path"], "bytes": info["bytes"], "artifact_bytes": artifact_bytes,
            "ratio": round(info["bytes"] / artifact_bytes, 4), "opset": opset, "dense": dense,
            "quantized_layers": info["quantized_layers"], "outputs": info["outputs"]}
