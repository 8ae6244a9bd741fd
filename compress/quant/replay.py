"""Replay: the layer-by-layer walk of quantization costs about one forward in all instead of one per layer.

The modules that returned before the first layer changed since the last pass give back their recorded outputs.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from compress.models.protocol import map_tensors as _nested, tensors_in as _tensors
from compress.quant.sites import no_fastpath

__all__ = ["Replay"]


class _Mismatch(Exception):
    """A replayed module was called twice in one pass: the forward does not follow the probed call order."""


def _close(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            scale = float(y.abs().max()) if y.numel() else 0.0
            if x.numel() and float((x - y).abs().max()) > 1e-4 * scale + 1e-6:
                return False
        elif not torch.equal(x, y):
            return False
    return True


class Replay:
    """Skips what an earlier forward already computed. A probe pass records the order in which the model's
    modules are called (each module's first call and last return). A module called once per forward that
    returned before the first call of every layer changed since (see `invalidate`) gives the same output
    again, so its recorded output (per batch) is returned instead of running it; only the code around the
    modules runs. Passes record the outermost modules that return before their `cutoff` (the first layer
    they need), cloned, within `budget_bytes` (entries that save the most time per byte are kept). A replay
    hands the record itself over, not a copy; one that the forward then changes in place is dropped, and that
    module is handed copies from then on.

    Modules that alias or modify their inputs in place, are called twice, or return other objects than
    tensors (in tuples, lists, dicts) are never replayed; the first pass that replays anything is checked
    against a plain one, and any mismatch turns replay off (then every pass runs the whole model).
    """

    def __init__(self, model: nn.Module, batch: Any, budget_bytes: int) -> None:
        self.model, self.budget = model, budget_bytes
        self.entries: dict[str, dict[int, Any]] = {}
        self.sizes: dict[tuple[str, int], int] = {}
        self.used = 0
        self.blocked: set[str] = set()
        self.cloned: set[str] = set()  # modules whose replayed output the forward changes in place: handed a copy
        self.enabled = budget_bytes > 0
        self.verified = False
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        if self.enabled:
            self._probe(batch)

    def _probe(self, batch: Any) -> None:
        counter = [0]
        begun: dict[str, list[float]] = {}
        handles = []
        for name, module in self.model.named_modules():
            if not name:
                continue

            def pre(_m: nn.Module, _a: tuple, name: str = name) -> None:
                counter[0] += 1
                self.start.setdefault(name, counter[0])
                self.calls[name] = self.calls.get(name, 0) + 1
                begun.setdefault(name, []).append(time.perf_counter())

            def post(_m: nn.Module, _a: tuple, _o: Any, name: str = name) -> None:
                counter[0] += 1
                self.end[name] = counter[0]
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begun[name].pop()

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            with torch.no_grad(), no_fastpath():
                self.model(batch)
        finally:
            for h in handles:
                h.remove()

    def cutoff(self, names: Sequence[str]) -> float:
        """The first call, in the probed order, of any of the modules `names` (inf: none was called)."""
        return min((self.start[n] for n in names if n in self.start), default=math.inf)

    def invalidate(self, name: str) -> None:
        """Module `name` changed: drop the outputs of every module that returned after its first call."""
        first = self.start.get(name)
        if first is None:
            return
        for module in [m for m in self.entries if self.end[m] >= first]:
            self._drop(module)

    def disable(self) -> None:
        self.enabled = False
        for module in list(self.entries):
            self._drop(module)

    def _drop(self, module: str, index: int | None = None) -> None:
        batches = self.entries.get(module, {})
        for i in list(batches) if index is None else [index]:
            if i in batches:
                del batches[i]
                self.used -= self.sizes.pop((module, i))
        if not batches:
            self.entries.pop(module, None)

    def _outermost(self, cutoff: float) -> set[str]:
        """Modules called once that returned before `cutoff` and have no such ancestor."""
        ok = {n for n, e in self.end.items() if e < cutoff and self.calls.get(n) == 1 and n not in self.blocked}
        out = set()
        for name in ok:
            parts = name.split(".")
            if not any(".".join(parts[:i]) in ok for i in range(1, len(parts))):
                out.add(name)
        return out

    def _worth(self, module: str, size: int) -> float:
        return self.seconds.get(module, 0.0) / max(size, 1)

    def _store(self, module: str, index: int, output: Any) -> None:
        size = sum(t.numel() * t.element_size() for t in _tensors(output))
        worth = self._worth(module, size)
        if self.used + size > self.budget:
            cheaper = sorted((self._worth(m, self.sizes[(m, i)]), m, i) for m, e in self.entries.items() for i in e)
            free = sum(self.sizes[(m, i)] for w, m, i in cheaper if w < worth)
            if self.used - free + size > self.budget:
                return
            for w, m, i in cheaper:
                if self.used + size <= self.budget or w >= worth:
                    break
                self._drop(m, i)
        self.entries.setdefault(module, {})[index] = _nested(output, torch.Tensor.clone)
        self.sizes[(module, index)] = size
        self.used += size

    @contextlib.contextmanager
    def _active(self, index: int, cutoff: float) -> Iterator[list[str]]:
        """Replay the recorded outputs of batch `index`; record the outermost modules that return before `cutoff`."""
        replayed = [m for m, e in self.entries.items() if index in e]
        saved = {m: self.entries[m][index] for m in replayed}  # entries evicted during the pass still replay in it
        record = self._outermost(cutoff) - set(replayed)
        calls: dict[str, int] = {}
        handles, patched, recorded = [], [], []
        handed: dict[str, list[tuple[torch.Tensor, int]]] = {}

        def count(name: str) -> int:
            calls[name] = calls.get(name, 0) + 1
            return calls[name]

        for name in replayed:
            module = self.model.get_submodule(name)

            def forward(*_a: Any, name: str = name, **_k: Any) -> Any:
                if count(name) > 1:
                    raise _Mismatch(name)
                if name in self.cloned:
                    return _nested(saved[name], torch.Tensor.clone)
                handed[name] = [(t, t._version) for t in _tensors(saved[name])]
                return saved[name]  # no copy: a change in place after this is caught when the pass ends

            patched.append((module, module.__dict__.get("forward")))
            module.forward = forward
        versions: dict[str, list[tuple[torch.Tensor, int]]] = {}
        for name in record:
            module = self.model.get_submodule(name)

            def pre(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                versions[name] = [(t, t._version) for t in _tensors((args, kwargs))]

            def post(_m: nn.Module, _a: tuple, _k: dict, output: Any, name: str = name) -> None:
                if count(name) > 1:  # called again: not the probed order
                    self.blocked.add(name)
                    self._drop(name)
                    return
                inputs = versions.pop(name, [])
                try:
                    outs = _tensors(_nested(output, lambda t: t))
                except TypeError:
                    self.blocked.add(name)
                    return
                in_place = any(t._version != v for t, v in inputs)
                ptrs = {t.untyped_storage().data_ptr() for t, _ in inputs}
                if in_place or any(o.untyped_storage().data_ptr() in ptrs for o in outs):
                    self.blocked.add(name)  # aliases or changes its inputs: replaying it would skip that
                    return
                self._store(name, index, output)
                recorded.append(name)

            handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                        module.register_forward_hook(post, with_kwargs=True)]
        try:
            yield replayed
        finally:
            for h in handles:
                h.remove()
            for module, before in patched:
                if before is None:
                    del module.forward
                else:
                    module.forward = before
            for name, tensors in handed.items():
                if any(t._version != v for t, v in tensors):  # changed in place downstream: its record is spoilt
                    self.cloned.add(name)
                    self._drop(name, index)
            for name in recorded:  # an ancestor's output now stands for its descendants'
                for inner in [m for m in self.entries if m.startswith(name + ".")]:
                    self._drop(inner, index)

    def run(self, index: int, cutoff: float, forward: Callable[[], Any]) -> Any:
        """`forward()` (a pass of the model over batch number `index`) with replay; the first pass that replays
        anything is checked against a plain run."""
        if not self.enabled:
            return forward()
        try:
            with self._active(index, cutoff) as replayed:
                out = forward()
        except _Mismatch as exc:
            warnings.warn(f"quantize: module '{exc}' was called twice in a forward (not in the probed order); "
                          "calibration passes run the whole model from now on", stacklevel=2)
            self.disable()
            return forward()
        if replayed and not self.verified:
            self.verified = True
            plain = forward()
            if not _close(out, plain):
                warnings.warn("quantize: replayed module outputs changed a forward (a module with side effects?); "
                              "calibration passes run the whole model from now on", stacklevel=2)
                self.disable()
                return plain
        return out

