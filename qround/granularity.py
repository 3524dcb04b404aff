"""Reconstruction granularity: which modules are reconstructed together (MRECG, Ma et al. 2023).

Reconstructing module by module makes the reconstruction loss oscillate along depth.  Theorem 1
of MRECG: for two adjacent equivalent modules the later one's loss is not lower,
``L_i <= L_{i+1}``, because quantisation error accumulates; a unit whose loss IS lower than its
predecessor's is an *oscillation point* (:func:`oscillation_points`).  Corollary 1: when the
later module has a smaller capacity, the accumulated error grows.  MRECG reconstructs such
adjacent modules jointly.  Units (:class:`~qround.reconstruct.Unit`) are runs of consecutive
modules; granularities (:func:`select_units`):

- ``layer``: every QuantizedLayer alone (AdaRound);  ``block``: BRECQ's blocks
  (:func:`~qround.reconstruct.find_blocks`: residual blocks, transformer layers, children of an
  ``nn.Sequential``; quantised layers outside them alone);
- ``modcap``: base units (``base="block"`` or ``"layer"``) in forward order; unit ``i`` is merged
  with its successor when ``capacity(u_{i+1}) < capacity(u_i)``, with

      capacity(u) = sum over the QuantizedLayers l in u of  numel(W_l) * b_l,

  ``b_l`` the weight bits of ``l`` (32 for a float weight; biases stay float and are not
  counted).  Why: MRECG's module capacity is parameters x bit-width, and its Corollary 1 proof
  takes a 32-bit module as "no quantisation", i.e. the bits multiply the parameter count: the
  capacity is the number of bits the module's weights can hold.  Activation bits are left out:
  they have no parameter count to multiply, and they are the same for every inner layer here.
  The comparison is strict: equal capacities (Theorem 1's equivalent modules) are not merged.
- ``loss``: a quick reconstruction of the base units (``search_iterations`` steps, default a
  fifth of ``config.iterations``, on the first ``search_batches`` calibration batches) gives the
  loss distribution ``L_1..L_n`` (``metric="mse"``: per-element MSE of each unit's output after
  reconstruction, the paper's loss; ``"relative"``: that MSE over the float output's mean
  square, which compares units whose outputs differ in scale, e.g. a pre-ReLU conv output and
  a residual block's post-ReLU sum, as Theorem 1's "equivalent modules" presume); the ``k``
  oscillation points with the largest drop ``L_{i-1} - L_i`` are merged, unit ``i`` with
  unit ``i-1``.  ``k`` must lie in ``[1, n-1]`` (there are ``n-1`` adjacent pairs); when fewer
  than ``k`` points oscillate, all of them are merged.
- ``scheme``: the user's list of units (MRECG's config), each a list of module names or a string
  ``"a+b"``; quantised layers left out are reconstructed alone.

Chained merges: a merge is an edge between two neighbours; the final units are the maximal runs
joined by edges, so merging (a, b) and (b, c) gives one unit a+b+c (:func:`merge_runs`).

Joint reconstruction of a unit is :func:`qround.reconstruct.reconstruct` with the units as
``blocks``; :func:`reconstruct_with_granularity` does selection and reconstruction in one call.
:func:`loss_along_depth` and :func:`plot_losses` give MRECG's Figure 1 (loss along depth, every
layer carrying its unit's loss, oscillation points marked) as data and as a PNG.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .activations import quantized_layers
from .calibrate import ForwardFn, default_forward, eval_mode
from .errors import QroundError
from .reconstruct import (ReconstructConfig, ReconstructResult, Unit, _call_order,
                          disconnected_modules, find_blocks, plan_units, reconstruct)

log = logging.getLogger(__name__)

GRANULARITIES = ("layer", "block", "modcap", "loss", "scheme")
LEVELS = ("layer", "block")
METRICS = ("mse", "relative")

__all__ = ["GRANULARITIES", "LEVELS", "METRICS", "Selection", "Unit", "base_units", "capacity",
           "loss_along_depth", "loss_units", "merge_runs", "modcap_units", "oscillation_points",
           "parse_scheme", "plot_losses", "reconstruct_with_granularity", "select_units"]


# ------------------------------------------------------------------------------ units
def base_units(model: nn.Module, level: str = "layer") -> list[Unit]:
    """One-module units of a model with QuantizedLayers, in ``named_modules`` order (forward
    order is fixed by :func:`~qround.reconstruct.plan_units`): every QuantizedLayer
    (``"layer"``) or every auto-detected block (``"block"``)."""
    if level not in LEVELS:
        raise QroundError(f"level must be one of {LEVELS}, got {level!r}")
    names = list(quantized_layers(model)) if level == "layer" else find_blocks(model)
    if not names:
        raise QroundError("model has no QuantizedLayer: build it with insert_act_quantizers "
                          "first")
    return [Unit((n,)) for n in names]


def parse_scheme(scheme) -> list[Unit]:
    """A user's units: a list of :class:`Unit`, of lists of module names, or of strings
    ``"a+b"`` (one string = one unit); a single string is split on commas first."""
    if isinstance(scheme, str):
        items = [s.strip() for s in scheme.split(",")]
        if scheme.strip() and any(not s for s in items):
            raise QroundError(f"scheme {scheme!r} has an empty unit: name the modules of each "
                              "unit, units separated by single commas")
        scheme = [s for s in items if s]
    if scheme is None or not isinstance(scheme, Sequence) or len(scheme) == 0:
        raise QroundError(f"scheme must be a non-empty list of units, got {scheme!r}")
    units = []
    for item in scheme:
        if isinstance(item, str):
            parts = [p.strip() for p in item.split("+")]
            if any(p == "" for p in parts) and len(parts) > 1:
                raise QroundError(f"scheme unit {item!r} has an empty module name")
            units.append(Unit(tuple(parts)))
        elif isinstance(item, Unit):
            units.append(item)
        elif isinstance(item, (list, tuple)):
            units.append(Unit(tuple(item)))
        else:
            raise QroundError(f"scheme items must be Units, lists of module names or 'a+b' "
                              f"strings, got {item!r}")
    return units


def merge_runs(units: Sequence[Unit], merges: Iterable[int]) -> list[Unit]:
    """Units after merging unit ``i`` into unit ``i-1`` for every ``i`` in ``merges``
    (1 <= i < len(units)); chains join into one run: merges {1, 2} of a, b, c give a+b+c."""
    merges = set(merges)
    bad = sorted(i for i in merges if not (isinstance(i, int) and 1 <= i < len(units)))
    if bad:
        raise QroundError(f"merge indices {bad} out of range [1, {len(units) - 1}]")
    out: list[list[str]] = []
    for i, u in enumerate(units):
        if i in merges:
            out[-1].extend(u.modules)
        else:
            out.append(list(u.modules))
    return [Unit(tuple(m)) for m in out]


# ------------------------------------------------------------------------------ ModCap
_LAYERS = (nn.Linear, nn.Conv2d, nn.Conv1d)


def capacity(module: nn.Module, wbits: int | None = None) -> int:
    """Module capacity ``sum_l numel(W_l) * b_l`` over the module's QuantizedLayers (``b_l``
    their weight bits, 32 for float weights; ``wbits`` overrides the bits of every layer with
    a quantised weight) and its other Linear/Conv2d/Conv1d layers (left in float: 32 bits).  A
    module without QuantizedLayers counts those layers' weights at ``wbits`` (default 32)."""
    if wbits is not None and (isinstance(wbits, bool) or not isinstance(wbits, int)
                              or not 1 <= wbits <= 32):
        raise QroundError(f"wbits must be an integer in [1, 32] or None, got {wbits!r}")
    layers = list(quantized_layers(module).values())
    if layers:
        wrapped = {id(m.layer) for m in layers}
        floats = [m for m in module.modules()
                  if isinstance(m, _LAYERS) and id(m) not in wrapped]
        return (sum(m.layer.weight.numel() * (32 if m.weight_spec is None
                                              else (wbits or m.weight_spec.bits))
                    for m in layers)
                + sum(m.weight.numel() * 32 for m in floats))
    return sum(m.weight.numel() * (wbits or 32) for m in module.modules()
               if isinstance(m, _LAYERS))


def _unit_capacity(model: nn.Module, unit: Unit, wbits: int | None) -> int:
    named = dict(model.named_modules())
    missing = [m for m in unit.modules if m not in named]
    if missing:
        raise QroundError(f"unit {unit.name!r} names modules that do not exist: {missing}")
    return sum(capacity(named[m], wbits) for m in unit.modules)


def modcap_units(units: Sequence[Unit], model: nn.Module,
                 wbits: int | None = None) -> list[Unit]:
    """ModCap MRECG: ``units`` (forward order) with unit ``i`` merged with unit ``i+1``
    whenever ``capacity(u_{i+1}) < capacity(u_i)`` (see the module docstring)."""
    caps = [_unit_capacity(model, u, wbits) for u in units]
    return merge_runs(units, _modcap_merges(caps))


def _modcap_merges(caps: Sequence[float]) -> list[int]:
    return [i for i in range(1, len(caps)) if caps[i] < caps[i - 1]]


# ------------------------------------------------------------------------------ loss
def _check_losses(losses) -> list[float]:
    if isinstance(losses, (str, bytes)) or not isinstance(losses, Sequence):
        raise QroundError(f"losses must be a sequence of numbers, got {type(losses).__name__}")
    out = []
    for v in losses:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise QroundError(f"losses must be finite numbers, got {v!r}")
        out.append(float(v))
    return out


def oscillation_points(losses: Sequence[float]) -> list[int]:
    """Indices ``i > 0`` with ``losses[i] < losses[i-1]``: where the loss along depth drops,
    against Theorem 1 (a unit's loss is not lower than its predecessor's)."""
    values = _check_losses(losses)
    return [i for i in range(1, len(values)) if values[i] < values[i - 1]]


def _check_k(k, n_units: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise QroundError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= n_units - 1:
        raise QroundError(f"k={k} must lie in [1, {n_units - 1}]: {n_units} units have "
                          f"{n_units - 1} adjacent pairs to merge")
    return k


def _loss_merges(losses: Sequence[float], k: int) -> list[int]:
    values = _check_losses(losses)
    points = oscillation_points(values)
    # largest drop first; equal drops: the shallower point first
    ranked = sorted(points, key=lambda i: (-(values[i - 1] - values[i]), i))
    if not points:   # a loss that never drops along depth: Theorem 1's ideal, not a problem
        log.info("loss granularity: the losses along depth have no oscillation point; the "
                 "units stay as they were")
    elif len(points) < k:   # k >= 2 was asked for (the default is 1): fewer merges were made
        log.warning("loss granularity: k=%d, but the losses along depth have %d oscillation "
                    "point(s): merging those %d", k, len(points), len(points))
    return sorted(ranked[:k])


def loss_units(losses: Sequence[float], units: Sequence[Unit], k: int) -> list[Unit]:
    """Loss MRECG: merge the ``k`` oscillation points of ``losses`` (one per unit, forward
    order) with the largest drops ``losses[i-1] - losses[i]``, unit ``i`` into unit ``i-1``."""
    if len(losses) != len(units):
        raise QroundError(f"{len(losses)} losses for {len(units)} units")
    _check_k(k, len(units))
    return merge_runs(units, _loss_merges(losses, k))


# ------------------------------------------------------------------------------ selection
@dataclass(frozen=True)
class Selection:
    """A chosen granularity: the final ``units`` (forward order), the ``base_units`` they were
    built from and the ``merges`` (indices of base units joined to their predecessor), the
    base units' ``capacities`` (modcap) or quick-pass losses ``base_losses`` (loss), ``k``, and
    the seconds the selection took (``search_seconds``: the quick pass for ``loss``)."""

    granularity: str
    units: tuple[Unit, ...]
    base_units: tuple[Unit, ...]
    merges: tuple[int, ...] = ()
    capacities: tuple[int, ...] | None = None
    base_losses: tuple[float, ...] | None = None
    k: int | None = None
    search_seconds: float = 0.0

    def as_dict(self) -> dict:
        """JSON-able, e.g. for the quantised model's metadata."""
        d = dataclasses.asdict(self)
        d["units"] = [list(u.modules) for u in self.units]
        d["base_units"] = [list(u.modules) for u in self.base_units]
        for key in ("merges", "capacities", "base_losses"):
            d[key] = None if d[key] is None else list(d[key])
        d["oscillation_points"] = (None if self.base_losses is None
                                   else oscillation_points(self.base_losses))
        return d

    def table(self) -> str:
        """One row per base unit: its final unit, capacity / quick-pass loss, merged or not."""
        from .report import format_table
        owner = {m: u.name for u in self.units for m in u.modules}
        osc = set(oscillation_points(self.base_losses)) if self.base_losses else set()
        rows = []
        for i, u in enumerate(self.base_units):
            row = {"base_unit": str(u), "unit": owner.get(u.modules[0], "") or "<model>",
                   "merged": "yes" if i in self.merges else ""}
            if self.capacities is not None:
                row["capacity"] = self.capacities[i]
            if self.base_losses is not None:
                row["quick_loss"] = self.base_losses[i]
                row["oscillates"] = "yes" if i in osc else ""
            rows.append(row)
        return format_table(rows)


def _connected_merges(quant_model: nn.Module, units: Sequence[Unit], merges: Sequence[int],
                      batches: Sequence, forward: ForwardFn | None) -> list[int]:
    """``merges`` without those whose run would hold a module that does not feed the run's
    last one (parallel modules such as q_proj and k_proj, with ``base="layer"``): a joint unit
    is trained on its last module's output only (a warning names what was left apart)."""
    merged = merge_runs(units, merges)
    with eval_mode(quant_model):
        bad = disconnected_modules(quant_model, merged, batches[0], forward or default_forward,
                                   batches[1:])
    if not bad:
        return list(merges)
    runs: list[list[int]] = []
    for i in range(len(units)):
        if i in set(merges):
            runs[-1].append(i)
        else:
            runs.append([i])
    dropped = {i for run, unit in zip(runs, merged) if unit in bad for i in run[1:]}
    log.warning("not merged, since a module's output does not reach the merged unit's last "
                "module (a joint unit is trained on that output only): %s",
                ", ".join(str(u) for u in merged if u in bad))
    return [i for i in merges if i not in dropped]


def select_units(float_model: nn.Module, quant_model: nn.Module, calibration: Iterable,
                 granularity: str = "block", *, k: int | None = None, scheme=None,
                 base: str = "block", config: ReconstructConfig = ReconstructConfig(),
                 search_iterations: int | None = None, search_batches: int | None = None,
                 metric: str = "mse", wbits: int | None = None,
                 forward: ForwardFn | None = None) -> Selection:
    """Choose the reconstruction units of ``quant_model`` (from
    :func:`~qround.activations.insert_act_quantizers`) by ``granularity`` (see the module
    docstring).  ``k``: oscillation points merged by ``loss`` (ignored otherwise); ``scheme``:
    the units of ``scheme`` (only there); ``base``: the units ``modcap``/``loss`` start from;
    ``config``: the reconstruction settings of the quick ``loss`` pass, run for
    ``search_iterations`` steps (default ``max(1, config.iterations // 5)``) on the first
    ``search_batches`` batches (default all), its loss distribution measured by ``metric``
    ("mse" | "relative"); ``wbits``: override of the weight bits in the capacities of
    ``modcap``.  Every argument is checked before the quick pass;
    ``quant_model`` is not modified."""
    start = time.perf_counter()
    if granularity not in GRANULARITIES:
        raise QroundError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if base not in LEVELS:
        raise QroundError(f"base must be one of {LEVELS}, got {base!r}")
    if metric not in METRICS:
        raise QroundError(f"metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(config, ReconstructConfig):
        raise QroundError(f"config must be a ReconstructConfig, got {type(config).__name__}")
    if scheme is not None and granularity != "scheme":
        raise QroundError(f"scheme is given but granularity is {granularity!r}: use "
                          "granularity='scheme'")
    for arg, value in (("search_iterations", search_iterations),
                       ("search_batches", search_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise QroundError(f"{arg} must be a positive integer or None, got {value!r}")
    if wbits is not None:
        capacity(nn.Identity(), wbits)  # checks wbits
    if isinstance(calibration, torch.Tensor):
        raise QroundError("calibration must be an iterable of batches; wrap a tensor in a list")
    batches = list(calibration)
    if granularity == "scheme":
        blocks = parse_scheme(scheme)
    elif granularity == "layer":
        blocks = None
    elif granularity == "block":
        blocks = "auto"
    else:
        blocks = base_units(quant_model, base)
    if granularity == "loss":
        if k is None:
            raise QroundError("granularity='loss' needs k, the number of oscillation points to "
                              "merge (MRECG uses 2, 4, 7 for ResNet-18, ResNet-50, MobileNetV2)")
        _check_k(k, len(blocks))  # base units cover every quantised layer: their final count
    units = plan_units(float_model, quant_model, batches, blocks, forward=forward)
    if granularity in ("layer", "block", "scheme"):
        return Selection(granularity, tuple(units), tuple(units),
                         search_seconds=time.perf_counter() - start)
    if granularity == "modcap":
        caps = [_unit_capacity(quant_model, u, wbits) for u in units]
        merges = _connected_merges(quant_model, units, _modcap_merges(caps), batches, forward)
        return Selection(granularity, tuple(merge_runs(units, merges)), tuple(units),
                         tuple(merges), capacities=tuple(caps),
                         search_seconds=time.perf_counter() - start)
    if search_batches is not None and search_batches < len(batches):
        # a unit first called by a later batch (an expert) has no data in the quick pass
        seen: set[str] = set()
        with eval_mode(quant_model):
            for batch in batches[:search_batches]:
                seen.update(_call_order(quant_model, batch, forward or default_forward)[0])
        missing = [u.name for u in units if not all(m in seen for m in u.modules)]
        if missing:
            raise QroundError(f"units {missing} are not called on the first search_batches="
                              f"{search_batches} calibration batches, which the quick "
                              "reconstruction of granularity='loss' runs on (a later batch "
                              "calls them): raise search_batches")
    quick = dataclasses.replace(
        config, iterations=search_iterations or max(1, config.iterations // 5))
    result = reconstruct(float_model, quant_model, batches[:search_batches or len(batches)],
                         units, quick, forward=forward)
    losses = result.losses if metric == "mse" else result.relative_losses
    undefined = [b.block for b, x in zip(result.blocks, losses) if not math.isfinite(x)]
    if undefined:
        raise QroundError(f"metric={metric!r}: units {undefined} have a float output that is "
                          "identically zero and a nonzero error, so their relative loss is "
                          "undefined; use metric='mse'")
    merges = _connected_merges(quant_model, units, _loss_merges(losses, k), batches, forward)
    return Selection(granularity, tuple(merge_runs(units, merges)), tuple(units), tuple(merges),
                     base_losses=tuple(losses), k=k, search_seconds=time.perf_counter() - start)


def reconstruct_with_granularity(float_model: nn.Module, quant_model: nn.Module,
                                 calibration: Iterable, granularity: str = "block", *,
                                 k: int | None = None, scheme=None, base: str = "block",
                                 config: ReconstructConfig = ReconstructConfig(),
                                 search_iterations: int | None = None,
                                 search_batches: int | None = None, metric: str = "mse",
                                 forward: ForwardFn | None = None, inplace: bool = False
                                 ) -> tuple[ReconstructResult, Selection]:
    """:func:`select_units` then :func:`~qround.reconstruct.reconstruct` on the chosen units
    (from the same initial ``quant_model``; the quick ``loss`` pass works on a copy)."""
    if isinstance(calibration, torch.Tensor):
        raise QroundError("calibration must be an iterable of batches; wrap a tensor in a list")
    batches = list(calibration)
    selection = select_units(float_model, quant_model, batches, granularity, k=k,
                             scheme=scheme, base=base, config=config,
                             search_iterations=search_iterations,
                             search_batches=search_batches, metric=metric,
                             forward=forward)
    result = reconstruct(float_model, quant_model, batches, list(selection.units), config,
                         forward=forward, inplace=inplace)
    return result, selection


# ------------------------------------------------------------------------------ loss along depth
def loss_along_depth(result: ReconstructResult, metric: str = "mse") -> dict:
    """The loss distribution of a reconstruction as JSON-able data: per unit (forward order)
    its name, modules, layers, MSE before and after, relative MSE after, ``loss`` (the MSE or
    the relative MSE, by ``metric``) and the oscillation points of ``loss`` (indices)."""
    if not isinstance(result, ReconstructResult):
        raise QroundError(f"result must be a ReconstructResult, got {type(result).__name__}")
    if metric not in METRICS:
        raise QroundError(f"metric must be one of {METRICS}, got {metric!r}")
    losses = result.losses if metric == "mse" else result.relative_losses
    return {"metric": metric, "units": [b.block for b in result.blocks],
            "modules": [list(b.modules or (b.block,)) for b in result.blocks],
            "layers": [list(b.layers) for b in result.blocks],
            "loss_before": [b.loss_before for b in result.blocks],
            "mse": result.losses, "relative": result.relative_losses,
            "loss": losses, "oscillation": oscillation_points(losses)}


def plot_losses(curves: Mapping[str, dict | ReconstructResult], path: str,
                title: str = "reconstruction loss along depth", log_scale: bool = True) -> None:
    """MRECG's Figure 1 as a PNG at ``path`` (written atomically): for each labelled curve
    (a :func:`loss_along_depth` dict or a result) every quantised layer, in depth order,
    carries the loss of its unit (a unit's layers share its loss); oscillation points are
    marked with a triangle at their unit's first layer."""
    if not isinstance(curves, Mapping) or not curves:
        raise QroundError("curves must be a non-empty mapping label -> loss_along_depth dict")
    profiles = {label: loss_along_depth(c) if isinstance(c, ReconstructResult) else c
                for label, c in curves.items()}
    for label, p in profiles.items():
        if not isinstance(p, Mapping) or not {"layers", "loss", "oscillation"} <= set(p):
            raise QroundError(f"curve {label!r} is not a loss_along_depth dict")
        if len(p["layers"]) != len(p["loss"]):
            raise QroundError(f"curve {label!r}: {len(p['layers'])} units in 'layers' but "
                              f"{len(p['loss'])} values in 'loss'; they pair up one to one")
        bad = [i for i in p["oscillation"] if isinstance(i, (bool, np.bool_))
               or not isinstance(i, (int, np.integer)) or not 0 <= i < len(p["loss"])]
        if bad:
            raise QroundError(f"curve {label!r}: oscillation points {bad[:3]} are not unit "
                              f"indices in [0, {len(p['loss'])})")
    order: list[str] = []
    for p in profiles.values():
        order += [layer for unit in p["layers"] for layer in unit if layer not in order]
    x_of = {layer: i for i, layer in enumerate(order)}

    from .report import new_figure, save_figure_atomic

    fig = new_figure(figsize=(max(6.0, 0.45 * len(order) + 2), 4.5))
    ax = fig.subplots()
    for n, (label, p) in enumerate(profiles.items()):
        xs, ys = [], []
        for unit_layers, loss in zip(p["layers"], p["loss"]):
            for layer in unit_layers:
                xs.append(x_of[layer])
                ys.append(loss)
        pairs = sorted(zip(xs, ys))
        # overlapping curves (equal units) stay visible through their line styles
        line, = ax.plot([a for a, _ in pairs], [b for _, b in pairs],
                        marker="osD^v<>"[n % 7], ms=3, ls=("-", "--", "-.", ":")[n % 4],
                        label=f"{label} ({len(p['oscillation'])} osc.)")
        osc = [(x_of[p["layers"][i][0]], p["loss"][i]) for i in p["oscillation"]
               if p["layers"][i]]
        if osc:
            ax.scatter([a for a, _ in osc], [b for _, b in osc], marker="v", s=90,
                       facecolors="none", edgecolors=line.get_color(), linewidths=1.8,
                       zorder=3)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=60, ha="right", fontsize=7)
    metrics = {p.get("metric", "mse") for p in profiles.values()}
    ax.set_ylabel("unit MSE / target mean square" if metrics == {"relative"}
                  else "unit MSE after reconstruction")
    ax.set_title(f"{title}\n(triangles: oscillation points, loss below the previous unit's)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, what="loss plot")
