"""Replaying the outputs of finished modules in later capture passes.

With ``inputs="quantized"`` (GPTQ's sequential statistics) every group of layers gets its own
pass over the calibration data, and each pass runs the model from its first module.  The
modules that run before a group's first layer hold only layers that are already quantised, so
their outputs are the same in every later pass.  GPTQ's scripts keep the inputs of the next
transformer layer by hand; here the modules to keep are found from one traced forward:

- a **span trace** records, for every module, the events at which its forward starts and ends
  (one counter over all modules) and how often it runs per forward;
- before a pass whose first hooked layer starts at event ``s``, the **cache points** are the
  largest modules (no ancestor also qualifies) that run once per forward and end before ``s``;
- a cache point's outputs are recorded (cloned, per calibration batch) in the first pass after
  it qualifies; in later passes its ``forward`` is replaced by a lookup that returns a fresh
  clone, so nothing that the caller does in place can change the record.

A module's inputs and output may be tensors, plain Python scalars, and tuples, lists and dicts
of them.  A module that takes or returns anything else (a key-value cache object it may update,
say) is never cached, and neither is one that changes an input tensor in place (an
``inplace=True`` activation whose caller reads the input again).  The calibration batches must
come in the same order in every pass; each batch's fingerprint is checked, and a change
switches the cache off (with a warning) before any replayed value is used.  The records are
bounded by ``budget`` bytes; modules beyond it run as before.  The result equals a run without
the cache; a test compares the codes.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

_SCALARS = (type(None), bool, int, float, str)


class _Uncacheable(Exception):
    """A module output that the cache cannot clone faithfully."""


def _clone(value: Any) -> tuple[Any, int]:
    """A detached deep copy of a module output and its tensor bytes."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone(), value.numel() * value.element_size()
    if isinstance(value, _SCALARS):
        return value, 0
    if type(value) in (tuple, list):
        parts = [_clone(v) for v in value]
        return type(value)(p[0] for p in parts), sum(p[1] for p in parts)
    if type(value) is dict:
        parts = {k: _clone(v) for k, v in value.items()}
        return {k: p[0] for k, p in parts.items()}, sum(p[1] for p in parts.values())
    raise _Uncacheable(type(value).__name__)


def _plain(value: Any) -> list[torch.Tensor] | None:
    """The tensors inside a module's inputs, or None if they hold anything but tensors, plain
    scalars, tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, _SCALARS):
        return []
    if type(value) in (tuple, list) or type(value) is dict:
        out = []
        for v in (value.values() if type(value) is dict else value):
            inner = _plain(v)
            if inner is None:
                return None
            out += inner
        return out
    return None


def _fingerprint(batch: Any) -> Any:
    """A cheap summary of a calibration batch: shapes, dtypes and two sums per tensor."""
    if isinstance(batch, torch.Tensor):
        t = batch.detach()
        f = t.abs().double() if t.is_complex() else t.double()
        return (tuple(t.shape), str(t.dtype), float(f.sum()), float((f * f).sum()))
    if isinstance(batch, Mapping):
        return tuple((k, _fingerprint(batch[k])) for k in sorted(batch, key=repr))
    if isinstance(batch, (tuple, list)):
        return tuple(_fingerprint(v) for v in batch)
    return repr(batch)


def trace_spans(model: nn.Module, run: Callable[[], Any]) -> tuple[dict[str, tuple[int, int]],
                                                                    dict[str, int]]:
    """Run ``run()`` once with hooks on every submodule.

    Returns ``spans``: name -> (start event, end event) of the modules that ran exactly once
    (the root excluded), and ``starts``: name -> start event of the first call of every module
    that ran."""
    events = [0]
    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    calls: dict[str, int] = {}
    handles = []

    def pre(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            starts.setdefault(name, events[0])
            events[0] += 1
        return hook

    def post(name):
        def hook(module, args, out):
            ends.setdefault(name, events[0])
            events[0] += 1
        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(pre(name)))
                handles.append(module.register_forward_hook(post(name)))
        run()
    finally:
        for h in handles:
            h.remove()
    spans = {n: (starts[n], ends[n]) for n in starts if calls[n] == 1 and n in ends}
    return spans, starts


class PrefixCache:
    """Recorded outputs of finished modules of one model, replayed in later passes.

    spans, starts: from :func:`trace_spans`; budget: bytes of records kept at most (0: off);
    layers: the names of the layers being quantised.

    Tied weights: a module that holds a parameter of one of ``layers`` (not the layer itself)
    changes its output when that layer is written back.  A cache point that ends after such a
    module starts is recorded only once the layer is finished (its first call starts before the
    pass's first layer).  Parameters used without being held (``F.linear(x, other.weight)``)
    are not seen; set ``capture_cache_mb=0`` for such models."""

    def __init__(self, model: nn.Module, spans: dict[str, tuple[int, int]], budget: int,
                 layers: list[str] = (), starts: dict[str, int] | None = None):
        self.modules = dict(model.named_modules())
        owner = {id(p): name for name in layers
                 for p in self.modules[name].parameters(recurse=False)}
        starts = starts or {}
        # (start of the module holding a layer's parameter, start of that layer)
        self.tied = [(starts[m], starts.get(owner[id(p)], -1))
                     for m, module in self.modules.items() if m in starts
                     for p in module.parameters(recurse=False)
                     if id(p) in owner and owner[id(p)] != m]
        self.spans = spans
        self.budget = int(budget)
        self.enabled = self.budget > 0 and bool(spans)
        self.ready: dict[str, list] = {}       # name -> record per batch
        self.recording: dict[str, list] = {}
        self.bytes: dict[str, int] = {}
        self.excluded: set[str] = set()
        self.versions: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.prints: list = []
        self.batches = 0

    @property
    def size(self) -> int:
        return sum(self.bytes.values())

    def prepare(self, before: int) -> None:
        """Choose the cache points for a pass whose first hooked layer starts at ``before``."""
        self.recording = {}
        if not self.enabled:
            return
        fit = {n for n, (_, end) in self.spans.items() if end < before and n not in self.excluded
               and all(held > end or layer < before for held, layer in self.tied)}
        tops = {n for n in fit if not any(n.startswith(a + ".") for a in fit)}
        for name in list(self.ready):
            if name not in tops and any(name.startswith(a + ".") for a in tops):
                del self.ready[name]  # an ancestor's record replaces it: never called again
                self.bytes.pop(name, None)
        self.recording = {n: [] for n in tops if n not in self.ready}
        self.batches = 0

    def finish(self) -> None:
        """After a pass: the records that cover every batch become ready."""
        for name, records in self.recording.items():
            if name in self.excluded:
                continue
            if len(records) == self.batches and records:
                self.ready[name] = records
            else:
                self.bytes.pop(name, None)
        self.recording = {}
        if self.ready:
            log.debug("capture cache: %d modules, %.1f MB", len(self.ready), self.size / 2**20)

    def _drop(self, why: str) -> None:
        log.warning("capture cache switched off: %s; every pass runs the whole model", why)
        self.enabled = False
        self.ready.clear()
        self.recording.clear()
        self.bytes.clear()

    @contextmanager
    def batch(self, index: int, batch: Any) -> Iterator[None]:
        """Around the forward of calibration batch ``index``: replay and record."""
        if not self.enabled:
            yield
            return
        fp = _fingerprint(batch)
        if index < len(self.prints):
            if self.prints[index] != fp:
                self._drop(f"calibration batch {index} differs from the previous pass "
                           "(a shuffling DataLoader?)")
                yield
                return
        else:
            self.prints.append(fp)
        self.batches = max(self.batches, index + 1)
        if any(index >= len(records) for records in self.ready.values()):
            self._drop("more calibration batches than in the pass that recorded them")
            yield
            return
        patched, handles = [], []
        try:
            for name, records in self.ready.items():
                module = self.modules[name]
                patched.append((module, module.__dict__.get("forward")))
                module.forward = _replay(records[index])
            for name in self.recording:
                module = self.modules[name]
                handles.append(module.register_forward_pre_hook(self._inputs(name),
                                                                with_kwargs=True))
                handles.append(module.register_forward_hook(self._recorder(name)))
            yield
        finally:
            self.versions.clear()
            for h in handles:
                h.remove()
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own

    def _exclude(self, name: str, why: str, level: int = logging.DEBUG) -> None:
        log.log(level, "capture cache: %s %s; not cached", name, why)
        self.excluded.add(name)
        self.recording.pop(name, None)
        self.bytes.pop(name, None)

    def _inputs(self, name: str):
        def hook(module, args, kwargs):
            if name in self.excluded or name not in self.recording:
                return
            tensors = _plain((args, kwargs))
            if tensors is None:
                self._exclude(name, "takes an input that is not tensors or plain values")
                return
            self.versions[name] = [(t, t._version) for t in tensors]
        return hook

    def _recorder(self, name: str):
        def hook(module, args, out):
            if name in self.excluded or name not in self.recording:
                return
            if any(t._version != v for t, v in self.versions.pop(name, ())):
                self._exclude(name, "changes an input in place")
                return
            try:
                copy, size = _clone(out)
            except _Uncacheable as exc:
                self._exclude(name, f"returns a {exc}")
                return
            if self.size + size > self.budget:
                self._exclude(name, f"would pass the {self.budget / 2**20:.0f} MB budget",
                              logging.INFO)
                return
            self.recording[name].append(copy)
            self.bytes[name] = self.bytes.get(name, 0) + size
        return hook


def _replay(record: Any) -> Callable[..., Any]:
    def forward(*args, **kwargs):
        return _clone(record)[0]
    return forward
