"""Per-layer sensitivity and bit allocation: which layers to give more bits.

:func:`layer_sensitivity` rounds one layer at a time to nearest at each candidate width, the
rest of the model in float, and measures how far the model's output moves: the relative squared
error ``sum ||f_q(x) - f(x)||^2 / sum ||f(x)||^2`` over the calibration batches and every
floating tensor the forward returns (of a tokenised batch, at its real tokens: a (B, T, ...)
output is masked with the batch's ``attention_mask``).  That is the measurement of AIMET's per-layer
sensitivity analysis (AMP), on the model's output instead of a task metric, so it needs no labels.

:meth:`Sensitivity.allocate` then chooses a width per layer for a mean number of bits per weight
(weighted by the layers' weight counts, as ``qround evaluate``'s ``mean_wbits``).  It assumes
that the layers' output errors add up and picks the widths of least summed error within the
budget, exactly: a multiple-choice knapsack solved as an integer program, as HAWQ-V3 does.  The
result is a set of ``overrides`` for :class:`qround.pipeline.QuantConfig`: ``allocation.config`` is
the measured config with them, ready for ``quantize_model``.  RTN at a layer is a proxy for what the
solver will leave there; the ranking of the layers is what the allocation uses.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .calibrate import ForwardFn, _padding_mask, default_forward, eval_mode, seed_numpy
from ._warn import warn_user
from .fold import fold_batchnorm
from .errors import QroundError, check_bits, copy_module
from .grid import fit_grid
from .pipeline import (QuantConfig, _add_late, _check_calibration, _check_overrides_match,
                       _conv1d_selection, _own_rng, _reselect, _samples, _select,
                       _trace, check_group_sizes)
from .prefix_cache import PrefixCache, budget_bytes, disabled, trace_spans
from .problems.layers import layer_weight, linearize_conv1d

DEFAULT_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One layer: its weight count and the model's relative output error with only this layer
    rounded to nearest, per width (``errors[bits]``); ``held``: the config fixes its width
    (an override's ``wbits``, or ``first_last_bits`` at the first or last layer), so it was not
    measured (``errors`` is empty) and the allocation keeps it at ``held``; ``input_of``: the
    first layer (in forward order) that reads the same input tensor, where that is another
    layer (``k_proj`` and ``v_proj`` have ``q_proj``'s), else None.  ``allocate(...,
    tie_inputs=True)`` gives such layers one width."""
    name: str
    weights: int
    errors: Mapping[int, float]
    held: int | None = None
    input_of: str | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "weights": self.weights, "held": self.held,
                "input_of": self.input_of,
                "errors": {str(b): e for b, e in self.errors.items()}}


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Widths chosen by :meth:`Sensitivity.allocate`.

    bits: layer name -> weight bits (held layers included); mean_bits: their mean per weight;
    predicted_error: the sum of the chosen widths' measured errors (held layers, and layers
    tied to one, not counted); overrides: the config's ``overrides`` that give these widths (one
    pattern per group of layers with the same options, the config's own patterns merged in);
    config: the measured config with them; tied: with ``tie_inputs``, the groups of two or more
    layers that read the same input and were given one width (in forward order), else empty.
    """
    bits: Mapping[str, int]
    mean_bits: float
    predicted_error: float
    overrides: tuple
    config: QuantConfig
    tied: tuple[tuple[str, ...], ...] = ()

    def cli_args(self) -> list[str]:
        """``qround quantize`` arguments that give the same overrides."""
        out = []
        for pattern, options in self.overrides:
            out += ["--override", pattern]
            for key, value in options.items():
                if key == "group_size" and value is None:
                    value = "none"
                elif isinstance(value, bool):
                    value = str(value).lower()
                elif not isinstance(value, (int, float, str)):
                    raise QroundError(f"override {pattern!r} has a {key} that the shell cannot "
                                      f"give ({type(value).__name__})")
                out.append(f"{key}={value}")
        return out

    def as_dict(self) -> dict:
        return {"bits": dict(self.bits), "mean_bits": self.mean_bits,
                "predicted_error": self.predicted_error,
                "overrides": [[p, dict(o)] for p, o in self.overrides],
                "tied": [list(t) for t in self.tied]}


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """The result of :func:`layer_sensitivity`: ``layers`` in forward order, the widths
    measured, the config measured with, and the seconds it took."""
    layers: tuple[LayerSensitivity, ...]
    bits: tuple[int, ...]
    config: QuantConfig
    seconds: float

    def table(self) -> str:
        head = ["layer", "weights"] + [f"W{b}" for b in self.bits]
        rows = [[s.name, str(s.weights)]
                + ([f"held at W{s.held}"] + [""] * (len(self.bits) - 1) if s.held is not None
                   else [f"{s.errors[b]:.3e}" for b in self.bits]) for s in self.layers]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join(["relative output error with one layer rounded to nearest "
                          "(the rest in float)", line(head)] + [line(r) for r in rows])

    def as_dict(self) -> dict:
        return {"bits": list(self.bits), "seconds": self.seconds,
                "layers": [s.as_dict() for s in self.layers]}

    def allocate(self, mean_bits: float, tie_inputs: bool = False) -> Allocation:
        """Widths from ``self.bits`` for a mean of at most ``mean_bits`` per weight (see the
        module docstring); QroundError when even the narrowest widths exceed it.

        tie_inputs: give the layers that read the same input one width (``input_of``): q/k/v
        projections, gate/up.  Serving engines that fuse them into one matrix (vLLM's
        QKVParallelLinear and MergedColumnParallelLinear) need one scheme for the fused
        matrix.  A tied group is allocated as one unit (its weights and measured errors
        summed); a group with a held layer is held at its width (the config must not hold
        its layers at different widths)."""
        # numpy's scalars too (np.int64, np.float32, np.bool_)
        real = not isinstance(mean_bits, (bool, np.bool_)) and isinstance(
            mean_bits, (numbers.Real, np.integer, np.floating))
        try:
            real = real and math.isfinite(float(mean_bits))
        except OverflowError:   # an int beyond float's range
            real = False
        if not real:
            raise QroundError(f"mean_bits must be a finite number, got {mean_bits!r}")
        if not isinstance(tie_inputs, (bool, np.bool_)):
            raise QroundError(f"tie_inputs must be True or False, got {tie_inputs!r}")
        tie_inputs = bool(tie_inputs)
        units = self._units(tie_inputs)
        bits, free = {}, []
        for unit in units:
            held = sorted({s.held for s in unit if s.held is not None})
            if len(held) > 1:
                raise QroundError(
                    "tie_inputs: layers " + ", ".join(repr(s.name) for s in unit)
                    + " read the same input, but the config holds them at different widths ("
                    + ", ".join(f"{s.name!r} at W{s.held}" for s in unit if s.held is not None)
                    + "): give them one wbits, or allocate without tie_inputs "
                    "(--tie-inputs)")
            if held:
                bits.update({s.name: held[0] for s in unit})
            else:
                bits.update({s.name: self.bits[0] for s in unit})
                free.append(unit)
        total = sum(s.weights for s in self.layers)
        # weight-bits are integers: the budget is floored once, with a tolerance for the
        # rounding of mean_bits itself (a mean read back from an allocation fits again)
        budget = math.floor(float(mean_bits) * total * (1 + 1e-12))
        used = sum(bits[s.name] * s.weights for s in self.layers)
        if used > budget:
            raise QroundError(f"mean_bits={mean_bits} is below the narrowest allocation: "
                              f"{used / total:.4g} bits per weight with every layer at "
                              f"W{self.bits[0]} (and the held layers"
                              + (", and the layers tied to them," if tie_inputs else "")
                              + " at their widths)")
        if free:
            # a unit is allocated as one layer: its weights and its errors summed (one layer
            # alone: the layer itself)
            merged = [LayerSensitivity(u[0].name, sum(s.weights for s in u),
                                       {b: sum(s.errors[b] for s in u) for b in self.bits})
                      for u in free]
            chosen = _knapsack(merged, self.bits, budget - used + self.bits[0] * sum(
                m.weights for m in merged))
            bits.update({s.name: chosen[u[0].name] for u in free for s in u})
            used = sum(bits[s.name] * s.weights for s in self.layers)
        error = float(sum(s.errors[bits[s.name]] for u in free for s in u))
        overrides = self._overrides(bits)
        config = dataclasses.replace(self.config, overrides=overrides or None)
        return Allocation(bits=bits, mean_bits=used / total, predicted_error=error,
                          overrides=overrides, config=config,
                          tied=tuple(tuple(s.name for s in u) for u in units if len(u) > 1))

    def _units(self, tie_inputs: bool) -> list[list[LayerSensitivity]]:
        """The layers as allocation units, in forward order: each alone, or with
        ``tie_inputs`` grouped by the input they read."""
        if not tie_inputs:
            return [[s] for s in self.layers]
        units: dict[str, list[LayerSensitivity]] = {}
        for s in self.layers:
            units.setdefault(s.input_of or s.name, []).append(s)
        return list(units.values())

    def _overrides(self, bits: Mapping[str, int]) -> tuple:
        """One exact-name pattern per group of free layers with equal options (each with the
        options of the config's own pattern for it, plus its width; a free layer tied to a
        held one has the held width), then the config's patterns that still match a held
        layer."""
        groups: dict[tuple, list[str]] = {}
        for s in self.layers:
            if s.held is None:
                options = {**self.config.override(s.name)[1], "wbits": bits[s.name]}
                groups.setdefault(tuple(options.items()), []).append(s.name)
        out = [(f"^(?:{'|'.join(re.escape(n) for n in names)})$", dict(key))
               for key, names in sorted(groups.items(), key=lambda kv: -dict(kv[0])["wbits"])]
        held = [s.name for s in self.layers if s.held is not None]
        out += [(p, o) for p, o in self.config.overrides or ()
                if any(self.config.override(n)[0] == p for n in held)]
        return tuple(out)


def _knapsack(layers, widths, budget: int) -> dict[str, int]:
    """The widths (one per layer, from ``widths``) of least summed error whose weight-bits
    stay within ``budget``: a multiple-choice knapsack, solved as an integer program (HiGHS via
    scipy.optimize.milp; HAWQ-V3's formulation).  Exact in integer weight-bits: the budget row
    holds each width's weight-bits above the layer's narrowest, divided by their gcd (integers),
    and the answer is checked in integers.  One that HiGHS's feasibility tolerance let exceed
    the budget (or no answer) falls back to a dynamic programme over the layers (exact), where
    its table stays small, else to re-solving within a budget lowered by the overshoot, and to
    upgrading greedily from the narrowest widths (which fit).  The objective is in units of the
    smallest error, so that HiGHS's absolute optimality gap (1e-6) stays below every
    difference that matters, with no relative gap; where the dynamic programme stays small it
    also runs after HiGHS, and its answer is taken when its error is lower (a near-tie within
    that gap)."""
    nl = len(layers)
    cost = np.array([[b * s.weights for b in widths] for s in layers], dtype=np.int64)
    error = np.array([[s.errors[b] for b in widths] for s in layers], dtype=float)
    finite = np.isfinite(error)
    if not finite.all():  # a width whose output overflowed: chosen only when nothing else fits
        top = float(np.max(error[finite])) if finite.any() else 1.0
        if top > 0:   # in units of the largest finite error: the stand-in cannot overflow
            error = error / top
        error = np.where(finite, error, 2.0 * nl)
    # weight-bits are integers: above each layer's narrowest width, in units of their gcd
    extra = cost - cost.min(axis=1, keepdims=True)
    room = int(budget) - int(cost.min(axis=1).sum())
    if room < 0:
        raise QroundError("the bit allocation cannot meet the budget")
    step = math.gcd(*extra.ravel().tolist()) or 1
    extra, room = extra // step, room // step
    allowed = extra <= room
    rows = np.arange(nl)

    def fits(c) -> bool:
        return c is not None and int(extra[rows, c].sum()) <= room

    choice = _milp_choice(error, extra, room, allowed)
    if fits(choice):
        # HiGHS stops within its absolute gap (1e-6 of the smallest error): where the exact
        # programme stays small, it settles such near-ties (a hypothesis run found one)
        exact = _pareto_choice(error, extra, room, allowed)
        if exact is not None and fits(exact) and \
                float(error[rows, exact].sum()) < float(error[rows, choice].sum()):
            choice = exact
    else:
        exact = _pareto_choice(error, extra, room, allowed)
        if exact is not None:
            choice = exact
        else:
            found = [_greedy_choice(error, extra, room, allowed)]
            limit = room
            for _ in range(8):   # the solver's overshoot, taken off the budget
                if choice is None or fits(choice):
                    break
                limit -= int(extra[rows, choice].sum()) - limit
                choice = (_milp_choice(error, extra, limit, allowed & (extra <= limit))
                          if limit >= 0 else None)
            if fits(choice):
                found.append(choice)
            choice = min(found, key=lambda c: float(error[rows, c].sum()))
    return {s.name: int(widths[c]) for s, c in zip(layers, choice)}


def _milp_choice(error, extra, limit: int, allowed):
    """The knapsack as an integer program (one binary per layer and width); None when HiGHS
    finds no solution.  Its answer may exceed ``limit`` by its feasibility tolerance."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    nl, nb = error.shape
    positive = error[allowed & (error > 0)]
    # (at most 12 decades below the largest: HiGHS takes coefficients from 1e20 as infinite)
    unit = max(float(positive.min()), float(positive.max()) * 1e-12) if positive.size else 1.0
    one = np.kron(np.eye(nl), np.ones(nb))                        # each layer: one width
    rows = [LinearConstraint(one, 1, 1),
            LinearConstraint(extra.ravel()[None].astype(float), -np.inf, float(limit))]
    res = milp(error.ravel() / unit, constraints=rows, integrality=np.ones(nl * nb),
               bounds=Bounds(0, allowed.ravel().astype(float)), options={"mip_rel_gap": 0.0})
    if res.x is None:
        return None
    return np.round(res.x).reshape(nl, nb).argmax(axis=1)


def _pareto_choice(error, extra, limit: int, allowed, max_states: int = 200_000,
                   max_kept: int = 5_000_000):
    """The exact optimum by dynamic programming over the layers: after each, the (weight-bits,
    error) sums that no other sum beats in both; None when they grow past ``max_states`` at
    once or ``max_kept`` in all."""
    costs, errs, back, kept = np.zeros(1, np.int64), np.zeros(1), [], 0
    for i in range(error.shape[0]):
        js = np.flatnonzero(allowed[i])
        c = (costs[:, None] + extra[i, js][None]).ravel()
        e = (errs[:, None] + error[i, js][None]).ravel()
        order = np.flatnonzero(c <= limit)
        order = order[np.lexsort((e[order], c[order]))]
        # in order of weight-bits: those of less error than every cheaper one
        before = np.minimum.accumulate(np.concatenate([[np.inf], e[order][:-1]]))
        order = order[e[order] < before]
        kept += order.size
        if order.size > max_states or kept > max_kept:
            return None
        back.append((order // js.size, js[order % js.size]))
        costs, errs = c[order], e[order]
    k, choice = int(np.argmin(errs)), np.empty(error.shape[0], dtype=np.int64)
    for i in reversed(range(error.shape[0])):
        parent, js = back[i]
        choice[i], k = js[k], int(parent[k])
    return choice


def _greedy_choice(error, extra, limit: int, allowed):
    """From the narrowest widths (which fit) up: the upgrade of most error saved per
    weight-bit that still fits, while one does."""
    rows = np.arange(error.shape[0])
    choice = extra.argmin(axis=1)
    while True:
        more = extra - extra[rows, choice][:, None]
        saved = error[rows, choice][:, None] - error
        ok = allowed & (more > 0) & (more <= limit - int(extra[rows, choice].sum())) & (saved > 0)
        if not ok.any():
            return choice
        rate = np.where(ok, saved / np.maximum(more, 1), -np.inf)
        i, j = np.unravel_index(int(np.argmax(rate)), rate.shape)
        choice[i] = j


def _float_tensors(out: Any, path: str = "output") -> list[tuple[str, torch.Tensor]]:
    """The floating tensors of a forward's output (tensors, tuples/lists, dicts and
    ModelOutputs, nested), with where they are."""
    if isinstance(out, torch.Tensor):
        return [(path, out)] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for k, v in out.items() for t in _float_tensors(v, f"{path}[{k!r}]")]
    if isinstance(out, (tuple, list)):
        return [t for i, v in enumerate(out) for t in _float_tensors(v, f"{path}[{i}]")]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out)
                for t in _float_tensors(getattr(out, f.name), f"{path}.{f.name}")]
    return []


MAX_REFERENCE_BYTES = 2 << 30


def _token_mask(batch) -> torch.Tensor | None:
    """A tokenised batch's padding mask (B, T) as booleans, or None: the mask the default
    forward keeps padding out of the statistics with (:func:`qround.calibrate._padding_mask`)."""
    mask = _padding_mask(batch) if isinstance(batch, Mapping) else None
    return None if mask is None else mask.to("cpu").bool()


def _reseed(model: nn.Module, seed: int) -> None:
    """Seed torch's generators of the CPU and of the model's CUDA devices (all forked by
    ``_own_rng``), and numpy's and ``random``'s global ones (restored by ``_own_rng`` too): a
    forward that draws random numbers draws the same in every pass."""
    import random

    torch.default_generator.manual_seed(seed)
    seed_numpy(seed)
    random.seed(seed)
    for d in {p.device.index for p in model.parameters() if p.device.type == "cuda"}:
        torch.cuda.default_generators[d or 0].manual_seed(seed)


def _outputs(model: nn.Module, calibration, forward, seed: int = 0,
             cache: PrefixCache | None = None) -> list[list[torch.Tensor]]:
    """Per batch, the floating tensors of the forward's output, on the CPU (float32, or
    float64 as they are); a tokenised batch's (B, T, ...) outputs at its real tokens only.
    The generators are seeded with ``seed`` first, as for every pass; ``cache`` (prepared)
    replays recorded modules."""
    _reseed(model, seed)
    cache = cache or disabled()
    outs, size = [], 0
    for j, batch in enumerate(calibration):
        with cache.batch(j, batch):
            out = forward(model, batch)
        tensors = _float_tensors(out)
        if not tensors:
            raise QroundError("the forward returns no floating tensor to compare: give a "
                              "forward(model, batch) that returns the model's output tensor")
        mask, kept = _token_mask(batch), []
        for _, t in tensors:
            t = t.detach().to("cpu")
            if mask is not None and t.ndim >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
                t = t[mask]  # padding's outputs are not the model's
            kept.append(t if t.dtype == torch.float64 else t.float())
            size += kept[-1].numel() * kept[-1].element_size()
        if size > MAX_REFERENCE_BYTES:
            raise QroundError(f"the model's outputs on the calibration take more than "
                              f"{MAX_REFERENCE_BYTES >> 30} GiB (a language model's logits?): "
                              "use fewer calibration batches, or a forward that returns a "
                              "smaller tensor (e.g. the last hidden state)")
        outs.append(kept)
    return outs


def layer_sensitivity(model: nn.Module, calibration: Iterable, config: QuantConfig = QuantConfig(),
                      bits: Sequence[int] = DEFAULT_BITS,
                      forward: ForwardFn | None = None) -> Sensitivity:
    """Per-layer sensitivity to rounding-to-nearest at each of ``bits`` (see the module
    docstring), for the layers ``quantize_model`` would choose with ``config`` (its
    ``layers``, ``exclude``, grid settings, ``first_last_bits`` and ``overrides``; the widths
    come from ``bits``).  ``calibration``: a re-iterable list of batches, run with
    ``forward(model, batch)`` (default ``model(batch)``, ``model(**batch)``, ``model(*batch)``).
    Works on a copy: ``model`` is not changed.  One forward over the calibration per layer and
    width; the modules that run before the rounded layer are replayed from records
    (``config.capture_cache_mb``, as quantize_model's capture passes; 0 turns it off)."""
    if not isinstance(config, QuantConfig):
        raise QroundError(f"config must be a qround.pipeline.QuantConfig, got "
                          f"{type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if isinstance(bits, (int, str)) or not isinstance(bits, Sequence) or not bits:
        raise QroundError(f"bits must be a non-empty sequence of widths, e.g. (2, 3, 4), "
                          f"got {bits!r}")
    widths = tuple(sorted({check_bits(b) for b in bits}))
    if config.activation_stage:   # the measurement rounds weights only
        ignored = [name for name, on in (("abits", config.abits is not None),
                                         ("reconstruction", config.reconstruction is not None))
                   if on]
        warn_user(f"layer_sensitivity measures each layer's weight rounding alone: the "
                  f"config's {' and '.join(ignored)} do not enter the measurement (quantize_model "
                  "applies them)")
    if config.fold_batchnorm:   # the layers measured are the folded ones quantize_model rounds
        model = fold_batchnorm(model, example=_check_calibration(calibration), forward=forward)
    with _own_rng(config, model):
        return _measure(model, calibration, config, widths, forward or default_forward)


def _measure(model, calibration, config, widths, forward) -> Sensitivity:
    start = time.perf_counter()
    _check_calibration(calibration)
    # every pass must see the same samples in the same order (a shuffling DataLoader would
    # compare different ones): the batches are read once and kept
    calibration = list(calibration)
    first_batch = calibration[0]
    empty = [i for i, b in enumerate(calibration) if _samples(b) == 0]
    if empty:
        raise QroundError(f"calibration batch {empty[0]} holds no samples (its first dimension "
                          "is 0): drop it")
    convert, conv_skipped = _conv1d_selection(model, config, first_batch, forward, calibration)
    qmodel, _ = linearize_conv1d(copy_module(model), share=True, names=convert)
    names, _ = _select(qmodel, config, float_conv1d=conv_skipped)
    _check_overrides_match(config, names)
    plan = []
    spans, starts = trace_spans(qmodel, lambda: plan.extend(_trace(qmodel, first_batch,
                                                                   forward, names)))
    again = _reselect(qmodel, qmodel, config, conv_skipped, calibration, forward, names,
                      {x.name for x in plan})
    if again is not None:   # a tied weight went to a layer never called: as quantize_model
        names = again[0]
        _check_overrides_match(config, names)
        plan = []
        spans, starts = trace_spans(qmodel, lambda: plan.extend(_trace(qmodel, first_batch,
                                                                       forward, names)))
    # an expert the first batch routed no row to, reached by a later one, as quantize_model
    plan = _add_late(qmodel, calibration, forward, names, plan)
    if not plan:
        raise QroundError("none of the chosen layers is called by the forward on any "
                          "calibration batch")
    order = [layer.name for layer in plan]
    output = [n for n in order if config.layer_options(n)["scale_method"] == "mse-output"]
    if output:
        raise QroundError(f"layer_sensitivity rounds to nearest without statistics: "
                          f"scale_method='mse-output' (layer {output[0]!r}) needs them; use "
                          "'minmax' or 'mse'")
    modules = dict(qmodel.named_modules())
    check_group_sizes(modules, order, config)
    held = {}
    for index, layer in enumerate(plan):
        # the first layer with every layer that reads its input, and the last, as
        # quantize_model has them
        end = layer.group == plan[0].group or index == len(plan) - 1
        if "wbits" in config.override(layer.name)[1] or (end and config.first_last_bits
                                                         is not None):
            held[layer.name] = config.layer_bits(layer.name, end)
    layers = []
    # the modules that finish before the rounded layer starts give the float outputs in every
    # pass: recorded once and replayed (qround.prefix_cache), within capture_cache_mb
    cache = (PrefixCache(qmodel, spans, budget_bytes(config.capture_cache_mb), order, starts)
             if config.capture_cache_mb > 0 else disabled())
    with eval_mode(qmodel), torch.no_grad():
        reference = _outputs(qmodel, calibration, forward, config.seed)
        norm = sum(float(torch.sum(t.double() ** 2)) for ts in reference for t in ts)
        if not np.isfinite(norm):
            raise QroundError("the model's outputs on the calibration are not finite (NaN or "
                              "Inf) before any rounding")
        if not norm > 0:
            raise QroundError("the model's outputs on the calibration are all zero: a relative "
                              "output error is undefined")
        # per input group, the first layer reading it (the group's others name it)
        first_of = {}
        for layer in plan:
            first_of.setdefault(layer.group, layer.name)
        input_of = {layer.name: (None if first_of[layer.group] == layer.name
                                 else first_of[layer.group]) for layer in plan}
        for name in order:
            module = modules[name]
            count = int(module.weight.numel())
            if name in held:
                layers.append(LayerSensitivity(name, count, {}, held[name], input_of[name]))
                continue
            w = layer_weight(module)
            original = module.weight.detach().clone()
            errors = {}
            try:
                for b in widths:
                    grid = fit_grid(w, config.grid_spec(b, name))
                    deq = grid.dequantize(grid.quantize(w))
                    # a conv's weight is (out, c, kh, kw) or (out, c, k); a Conv1D is a Linear
                    # view here
                    module.weight.copy_(torch.as_tensor(deq.reshape(tuple(module.weight.shape)),
                                                        dtype=module.weight.dtype))
                    cache.prepare(starts.get(name, 0))   # the root: not hooked, first
                    outs = _outputs(qmodel, calibration, forward, config.seed, cache)
                    cache.finish()
                    if len(outs) != len(reference) or any(
                            len(a) != len(r) or any(x.shape != y.shape for x, y in zip(a, r))
                            for a, r in zip(outs, reference)):
                        raise QroundError("the forward's outputs changed shape between passes "
                                          "over the calibration: it must be re-iterable in the "
                                          "same order")
                    errors[b] = sum(float(torch.sum((x.double() - y.double()) ** 2))
                                    for a, r in zip(outs, reference) for x, y in zip(a, r)) / norm
            finally:
                module.weight.copy_(original)
            layers.append(LayerSensitivity(name, count, errors, input_of=input_of[name]))
    return Sensitivity(tuple(layers), widths, config, time.perf_counter() - start)


__all__ = ["layer_sensitivity", "Sensitivity", "LayerSensitivity", "Allocation", "DEFAULT_BITS"]
