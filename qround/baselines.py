"""Baselines a user would otherwise run: rounding-to-nearest and the real GPTQ.

:func:`gptq_quantize` is GPTQ (Frantar et al. 2022; IST-DASLab/gptq ``GPTQ.fasterquant``): the
inputs are rounded one at a time, in order of decreasing ``diag(H)`` with act-order, and each
rounding error is spread over the inputs not yet rounded through the upper Cholesky factor
``U`` of ``(H + lambda I)^-1``:

    q_i = RTN(w_i)  on the grid,     err = (w_i - q_i) / U_ii,     w_j <- w_j - err * U_ij  (j > i)

with lazy block updates (columns beyond the current block are updated once per block).  Unlike
the ``gptq`` *solver* (``qround.solvers.gptq``), ``q_i`` is the nearest grid point of the
error-updated weight, so codes may move more than one step from the original weight: this is
the algorithm as published, with the grid (per-channel or grouped scales) fitted beforehand
(GPTQ's ``static_groups``).

:func:`gptq_model` and :func:`rtn_model` quantise whole models (the chosen Linear, Conv2d and
Conv1d layers) and time it; GPTQ runs layer by layer in forward order with each layer's ``H``
captured from the partly quantised model (GPTQ's sequential mode); a grouped conv is one GPTQ
problem per group (its output channels, its inputs' H).  Both take a
``qround.pipeline.QuantConfig`` and choose the same layers as ``quantize_model``; GPTQ reuses the
pipeline's capture plan.
"""
from __future__ import annotations

import time
import warnings
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .calibrate import ForwardFn, default_forward, eval_mode, kept_buffers, layer_hooks
from .fold import fold_batchnorm
from .errors import QroundError, as_float_array, check_int, check_real, copy_module
from .grid import Grid, GridSpec, fit_grid
from .pipeline import (QuantConfig, _add_late, _check_calibration, _check_overrides_match,
                       _conv1d_selection, _mark_varying, _own_rng, _reselect, _run_first,
                       _select, _stream, _trace, check_group_sizes, same_passes)
from .problems.layers import layer_groups, layer_weight, linearize_conv1d, restore_conv1d
from .solvers.gptq import inverse_cholesky
from .writeback import QuantizedWeight, apply_to_layer


# ----------------------------------------------------------------------------- one layer
def gptq_quantize(weight, hessian, grid: Grid, act_order: bool = True, percdamp: float = 0.01,
                  blocksize: int = 128, retries: int = 4) -> np.ndarray:
    """GPTQ integer codes (out, in) int64 of ``weight`` (out, in) on ``grid`` for the layer
    objective ``(w_hat - w)^T H (w_hat - w)`` with ``hessian`` ``H`` (in, in) = ``E[x x^T]``.

    percdamp: damping ``lambda = percdamp * mean(diag H)``, grown tenfold up to ``retries``
    times while the Cholesky factorisation fails (then QroundError).  Dead inputs (``H_ii = 0``)
    get ``H_ii = 1`` and keep the nearest code of their weight: the cost does not see them.
    Computed in float64 on the CPU.
    """
    w = as_float_array(weight, "weight", ndim=2)
    h = as_float_array(hessian, "hessian", ndim=2)
    out, n = w.shape
    if h.shape != (n, n):
        raise QroundError(f"hessian must have shape ({n}, {n}) for weight {w.shape}, "
                          f"got {h.shape}")
    if not isinstance(grid, Grid):
        raise QroundError(f"grid must be a qround.grid.Grid, got {type(grid).__name__}")
    if grid.scale.shape[0] != out or grid.in_features != n:
        raise QroundError(f"grid was fitted for {grid.scale.shape[0]} x {grid.in_features} "
                          f"weights, weight is {out} x {n}")
    check_real(percdamp, "percdamp", 0)
    check_int(blocksize, "blocksize", 1)
    check_int(retries, "retries", 0)
    if not isinstance(act_order, (bool, np.bool_)):
        raise QroundError(f"act_order must be True or False, got {act_order!r}")

    scale, zero = grid.expand()
    order = (np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n))
    dead = np.diag(h)[order] == 0
    hp = torch.from_numpy(np.ascontiguousarray(h[np.ix_(order, order)]))
    try:
        upper, _, _ = inverse_cholesky(hp, float(percdamp), retries, dead_diagonal=1.0)
    except QroundError as exc:
        raise QroundError(f"gptq_quantize (percdamp={percdamp}): {exc}") from exc
    codes = _fasterquant(w.T[order].copy(), upper.numpy(), scale.T[order].copy(),
                         zero.T[order].copy(), grid.qmin, grid.qmax, int(blocksize)).T
    if dead.any():  # an always-zero input: the updates never reach it; keep its own RTN code
        codes[:, dead] = grid.quantize(w)[:, order][:, dead]
    result = np.empty_like(codes)
    result[:, order] = codes
    return result.astype(np.int64)


def _fasterquant(w: np.ndarray, upper: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                 qmin: int, qmax: int, blocksize: int) -> np.ndarray:
    """GPTQ's loop on transposed matrices: w, scale, zero (n, out), row i = input i in
    processing order, and upper (n, n); ``w`` is updated in place.  Returns codes (n, out).

    numpy rather than torch: the loop is many small element-wise steps, which torch spreads
    over its threads at a cost far above the work when cores are shared."""
    n, out = w.shape
    codes = np.empty_like(w)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        errors = np.empty((i2 - i1, out))
        for i in range(i1, i2):
            q = np.clip(np.floor(w[i] / scale[i] + 0.5) + zero[i], qmin, qmax)
            codes[i] = q
            err = (w[i] - scale[i] * (q - zero[i])) / upper[i, i]
            w[i:i2] -= upper[i, i:i2, None] * err[None, :]
            errors[i - i1] = err
        w[i2:] -= upper[i1:i2, i2:].T @ errors  # the columns after the block, once per block
    return codes


def layer_cost(weight, dequantized, hessian) -> float:
    """``sum_c (w_hat_c - w_c)^T H (w_hat_c - w_c)`` over the rows of (out, in) matrices."""
    d = np.asarray(dequantized, dtype=np.float64) - np.asarray(weight, dtype=np.float64)
    return float(np.sum((d @ np.asarray(hessian, dtype=np.float64)) * d))


# ----------------------------------------------------------------------------- whole models
def _layer_grid(config, name: str, end: bool) -> GridSpec:
    """The grid of layer ``name``; ``end``: it is (or reads the input of) the first layer, or
    it is the last: ``first_last_bits`` there, and the layer's ``overrides`` (which win over
    it), as quantize_model has it."""
    return config.grid_spec(int(config.layer_bits(name, end)), name)


def _write(module: nn.Module, codes: np.ndarray, grid: Grid) -> None:
    qweight = QuantizedWeight(codes=codes, scale=grid.scale, zero_point=grid.zero_point,
                              bits=grid.bits, symmetric=grid.symmetric,
                              group_size=grid.group_size, weight_shape=tuple(module.weight.shape))
    apply_to_layer(module, qweight, inplace=True)


def _check_config(config) -> QuantConfig:
    if not isinstance(config, QuantConfig):
        raise QroundError(f"config must be a qround.pipeline.QuantConfig, got "
                          f"{type(config).__name__}")
    return config


def rtn_model(model: nn.Module, config: QuantConfig, example=None,
              forward: ForwardFn | None = None, *,
              calibration: Iterable | None = None) -> tuple[nn.Module, float]:
    """Rounding-to-nearest of the layers ``quantize_model`` would choose for ``config`` (a
    ``QuantConfig``: wbits, symmetric, group_size, scale_method ``minmax`` or ``mse``, layers,
    exclude, first_last_bits, and the grid settings of ``overrides``) on a deep copy of
    ``model``.  Returns (quantised copy, seconds).

    With one ``example`` batch (``forward(model, example)``, default
    :func:`qround.calibrate.default_forward`, random draws from ``config.seed``) the choice
    is ``quantize_model``'s: layers the forward never calls stay in float, and with
    ``first_last_bits`` the first layer the forward calls, with every layer reading the same
    input (q, k and v), and the last one get those bits.  Without an example every selected
    layer is rounded and first/last follow module order (only the first module, not its
    siblings; a warning says so when ``first_last_bits`` is set).  With ``calibration`` (the
    batches ``quantize_model`` gets) instead of ``example``, the choice follows all of them, as
    ``quantize_model``'s: an expert the first batch routes no row to is rounded too (with one
    example it stays in float).  As in ``quantize_model``, a layer called only with empty
    inputs (an expert no row reaches) stays in float, and QroundError says so when every chosen
    layer is such a layer (nothing would be rounded)."""
    _check_config(config)
    start = time.perf_counter()
    batches = None
    if calibration is not None:
        if example is not None:
            raise QroundError("rtn_model: give example (one batch) or calibration (the "
                              "batches), not both")
        example = _check_calibration(calibration)
        batches = same_passes(calibration)   # a pass that yields other batches is refused
    # transformers' Conv1D layers are rounded as Linear views of their weights, then restored
    forward = forward or default_forward
    if config.fold_batchnorm:   # the rounded weights are the folded ones, as quantize_model's
        model = fold_batchnorm(model, example=example, forward=forward)
    with _own_rng(config, model):   # the example's forwards draw from config.seed, not yours
        if example is not None:
            convert, conv_skipped = _conv1d_selection(model, config, example, forward,
                                                      batches)
        else:
            convert, conv_skipped = None, {}
        qmodel, replaced = linearize_conv1d(copy_module(model), share=True, names=convert)
        names, _ = _select(qmodel, config, float_conv1d=conv_skipped)
        _check_overrides_match(config, names)
        modules = dict(qmodel.named_modules())
        check_group_sizes(modules, names, config)
        output = [n for n in names if config.layer_options(n)["scale_method"] == "mse-output"]
        if output:
            raise QroundError(f"rtn_model: scale_method='mse-output' (layer {output[0]!r}) "
                              "needs calibration data; use 'minmax' or 'mse'")
        ends = {names[0], names[-1]}
        if example is not None:
            nonempty: set[str] = set()
            with torch.no_grad(), kept_buffers(qmodel):
                plan = _trace(qmodel, example, forward, names, nonempty=nonempty)
                again = _reselect(qmodel, qmodel, config, conv_skipped,
                                  [example] if batches is None else batches, forward, names,
                                  {x.name for x in plan})
                if again is not None:     # a tied weight went to a layer never called
                    names = again[0]
                    _check_overrides_match(config, names)
                    check_group_sizes(modules, names, config)
                    plan = _trace(qmodel, example, forward, names, nonempty=nonempty)
                if batches is not None:     # experts the first batch skipped
                    plan = _add_late(qmodel, batches, forward, names, plan)
                    if not isinstance(batches, (list, tuple)):
                        # a second pass: a one-shot stream, which ran dry in the first and
                        # hid its later batches, is refused (pipeline._SamePasses)
                        for _ in batches:
                            pass
                # as quantize_model: a layer called only with empty inputs (an expert no row
                # reached) stays in float; the later batches run only while one seems so
                empty = [x.name for x in plan if x.name not in nonempty]
                if empty and batches is not None:
                    empty = _only_empty(qmodel, batches, forward, empty)
            if not plan:
                raise QroundError("none of the chosen layers is called by the forward")
            # as quantize_model: layers the forward never calls stay in float
            names = [layer.name for layer in plan if layer.name not in empty]
            if not names:
                raise QroundError(_all_empty(empty))
            ends = {layer.name for layer in plan if layer.group == plan[0].group}
            ends.add(plan[-1].name)
        elif config.first_last_bits is not None:
            warnings.warn("rtn_model: first_last_bits without an example batch takes the first "
                          "and last layers in module order (not the layers sharing the first "
                          "one's input, as quantize_model does); pass example=a_batch",
                          stacklevel=2)
    for name in names:
        w = layer_weight(modules[name])
        grid = fit_grid(w, _layer_grid(config, name, name in ends))
        _write(modules[name], grid.quantize(w), grid)
    return restore_conv1d(qmodel, replaced), time.perf_counter() - start


def _only_empty(model: nn.Module, batches, forward, names: list[str]) -> list[str]:
    """Of ``names`` (layers the first batch called only with empty inputs), those that the
    later batches also call with empty inputs only, or not at all: one forward per later batch
    while one of them remains (the forwards stop there)."""
    left = set(names)
    modules = dict(model.named_modules())

    def hook(name, module, args, out):
        if args and isinstance(args[0], torch.Tensor) and args[0].numel() > 0:
            left.discard(name)

    with eval_mode(model), torch.no_grad(), kept_buffers(model), layer_hooks(
            {n: modules[n] for n in names}, hook):
        for j, batch in enumerate(batches):
            if not left:
                break
            if j > 0:
                _run_first(model, batch, forward, j)
    return [n for n in names if n in left]


def gptq_model(model: nn.Module, calibration: Iterable, config: QuantConfig,
               forward: ForwardFn | None = None, act_order: bool = True,
               percdamp: float = 0.01, blocksize: int = 128) -> tuple[nn.Module, float]:
    """GPTQ of the layers ``quantize_model`` would choose for ``config`` (a ``QuantConfig``;
    its solver, asymmetric and statistics fields are not used) on a deep copy of ``model``.

    Layers run in forward order, each one's ``H = E[x_hat x_hat^T]`` captured from the partly
    quantised copy (GPTQ's sequential mode) over ``calibration`` (a re-iterable list of batches,
    ``forward(model, batch)``); grids are fitted first with ``config.scale_method``
    (``mse-output`` uses that H).  Selection, call order, shared-input groups (one capture for
    q/k/v) and early-stopping capture passes are the pipeline's.  Returns (copy, seconds).
    """
    _check_config(config)
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if config.fold_batchnorm:   # the rounded weights are the folded ones, as quantize_model's
        model = fold_batchnorm(model, example=_check_calibration(calibration), forward=forward)
    with _own_rng(config, model):  # as quantize_model: the forward's draws follow config.seed
        return _gptq_model(model, calibration, config, forward, act_order, percdamp, blocksize)


def _gptq_model(model, calibration, config, forward, act_order, percdamp, blocksize):
    start = time.perf_counter()
    forward = forward or default_forward
    first_batch = _check_calibration(calibration)
    calibration = same_passes(calibration)
    # the Conv1D layers the forward calls are rounded as Linear views of their weights
    convert, conv_skipped = _conv1d_selection(model, config, first_batch, forward, calibration)
    qmodel, replaced = linearize_conv1d(copy_module(model), share=True, names=convert)
    names, _ = _select(qmodel, config, float_conv1d=conv_skipped)
    _check_overrides_match(config, names)
    modules = dict(qmodel.named_modules())
    check_group_sizes(modules, names, config)
    with kept_buffers(qmodel):   # buffers the forwards write keep the float model's values
        return _gptq_passes(qmodel, replaced, modules, names, conv_skipped, first_batch,
                            calibration, config, forward, act_order, percdamp, blocksize, start)


def _gptq_passes(qmodel, replaced, modules, names, conv_skipped, first_batch, calibration,
                 config, forward, act_order, percdamp, blocksize, start):
    plan = _trace(qmodel, first_batch, forward, names)
    again = _reselect(qmodel, qmodel, config, conv_skipped, calibration, forward, names,
                      {x.name for x in plan})
    if again is not None:     # a tied weight went to a layer the forward never calls
        names = again[0]
        _check_overrides_match(config, names)
        check_group_sizes(modules, names, config)
        plan = _trace(qmodel, first_batch, forward, names)
    plan = _add_late(qmodel, calibration, forward, names, plan)   # experts batch 0 skipped
    if not plan:
        raise QroundError("none of the chosen layers is called by the forward")
    _mark_varying(qmodel, calibration, forward, plan)
    groups: dict[int, list] = {}
    for layer in plan:
        groups.setdefault(layer.group, []).append(layer)
    position = {layer.name: i for i, layer in enumerate(plan)}
    device = torch.device(config.device)
    empty = []
    for group in groups.values():
        leaders = [layer for layer in group if layer.leader == layer.name]
        stats = _stream(leaders, qmodel, None, calibration, forward, device, second=True)
        for layer in group:
            if stats[layer.leader] is None:   # only empty inputs (an unused expert): float
                empty.append(layer.name)
                continue
            # the first layer with every layer that reads its input (q, k and v), and the
            # last one, as quantize_model has them
            end = layer.group == plan[0].group or position[layer.name] == len(plan) - 1
            module = modules[layer.name]
            codes, grid = _gptq_layer(layer_weight(module), stats[layer.leader]["hessian"],
                                      _layer_grid(config, layer.name, end), layer_groups(module),
                                      act_order, percdamp, blocksize)
            _write(module, codes, grid)
    if len(empty) == len(plan):
        raise QroundError(_all_empty(empty))
    return restore_conv1d(qmodel, replaced), time.perf_counter() - start


def _gptq_layer(w: np.ndarray, h: np.ndarray, spec: GridSpec, groups: int, act_order: bool,
                percdamp: float, blocksize: int) -> tuple[np.ndarray, Grid]:
    """GPTQ codes (out, in) and grid of one layer's weight ``w`` (out, in) with its captured
    ``h``: (in, in), or (groups, in, in) for a conv with ``groups`` groups, whose output
    channels ``j * out/groups ...`` read only group ``j``'s inputs; each group is then its own
    GPTQ problem (grid fitted on its rows with its H, errors spread over its inputs only)."""
    if groups == 1:
        grid = fit_grid(w, spec, hessian=h)
        return gptq_quantize(w, h, grid, act_order=act_order, percdamp=percdamp,
                             blocksize=blocksize), grid
    out_g = w.shape[0] // groups
    parts = [_gptq_layer(w[j * out_g:(j + 1) * out_g], h[j], spec, 1, act_order, percdamp,
                         blocksize) for j in range(groups)]
    first = parts[0][1]
    grid = Grid(scale=np.concatenate([g.scale for _, g in parts]),
                zero_point=np.concatenate([g.zero_point for _, g in parts]), bits=first.bits,
                symmetric=first.symmetric, group_size=first.group_size,
                in_features=first.in_features)
    return np.concatenate([c for c, _ in parts]), grid


def _all_empty(names: list[str]) -> str:
    """The error of a run whose chosen layers were all called only with empty inputs: as
    quantize_model, nothing would be rounded."""
    shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more"
                                                   if len(names) > 3 else "")
    return ("no chosen layer received a non-empty input during calibration: "
            f"{shown} called only with empty inputs (experts no row reached?)")
