"""The activation stage of :func:`qround.pipeline.quantize_model`.

After the weight stage has rounded every chosen layer with the configured solver, and when the
config asks for it (``abits`` or ``reconstruction``), this stage

1. wraps every quantised layer in a :class:`~qround.activations.QuantizedLayer`: its input is
   quantised to ``abits`` bits (LSQ step initialised from calibration inputs by ``act_init``,
   AQuant ``borders`` with ``fusion`` in convs), its weight holds the solver's integer codes on
   the solver's grid (scale and zero point are taken over, not refitted);
2. optionally reconstructs the model unit by unit (:func:`qround.reconstruct.reconstruct`:
   soft weight rounding, activation steps and borders trained together, QDrop), with the
   reconstruction units chosen by ``granularity`` (:mod:`qround.granularity`: layer, block,
   MRECG's modcap and loss, or the user's scheme);
3. reads the final codes back, so that the QuantizedModel's codes, the saved file and the model
   agree (the report's per-layer costs stay the solver's, for the codes it chose; the
   reconstruction's own losses are in ``QuantizedModel.reconstruction``).

First and last layer: with ``first_last_bits`` set, the first quantised layer's input (the raw
data: image pixels, token embeddings) stays in float and the last layer's input is quantised to
``first_last_bits`` bits, as BRECQ, QDrop and AQuant keep the first and last layers.

Start of the soft weight rounding (``weight_start``): "solver" puts AdaRound's relaxed choice
``h(V)`` at 0.9 where the solver rounded up and 0.1 where it rounded down, so reconstruction
refines the solver's rounding (and a block that reconstruction makes worse is reverted to it);
"float" is AdaRound's own start, ``h(V)`` = the fractional part of ``w / s`` (the soft weight
equals the float weight and the solver's rounding is discarded).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from .activations import ActQuantizer, QuantizedLayer, insert_act_quantizers, quantized_layers
from .calibrate import ForwardFn, default_forward, eval_mode, kept_buffers
from .errors import QroundError, copy_module
from .granularity import base_units, parse_scheme, reconstruct_with_granularity
from .grid import GridSpec
from .solvers.hopfield import inverse_rectified_sigmoid
from .writeback import QuantizedWeight

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import QuantConfig, QuantizedModel

log = logging.getLogger(__name__)

WEIGHT_STARTS = ("solver", "float")
SOLVER_CONFIDENCE = 0.9  # h(V) of the solver's choice when reconstruction starts from it


def input_bits(order: list[str], config: "QuantConfig",
               first: list[str] | None = None) -> dict[str, int | None]:
    """Activation bits of every quantised layer's input, in forward order (see module doc).
    first: the layers that read the first layer's input (default: the first alone); with
    ``first_last_bits`` their inputs stay in float."""
    bits: dict[str, int | None] = {n: config.abits for n in order}
    if config.first_last_bits is not None and order:
        if len(order) > 1:
            bits[order[-1]] = config.first_last_bits
        for n in (first or order[:1]):
            if n in bits:
                bits[n] = None
    return bits


@torch.no_grad()
def load_weight_codes(layer: QuantizedLayer, qweight: QuantizedWeight, float_weight: torch.Tensor,
                      start: str = "solver") -> None:
    """Put the solver's rounding ``qweight`` into ``layer`` (hard codes and the grid), and set
    the soft rounding's ``V`` from ``start`` ("solver" or "float", see the module doc).

    float_weight: the layer's original float weight (its floor on the grid is the soft
    rounding's base), shaped like ``layer.layer.weight``.
    """
    if start not in WEIGHT_STARTS:
        raise QroundError(f"weight_start must be one of {WEIGHT_STARTS}, got {start!r}")
    n_out = qweight.codes.shape[0]
    if tuple(layer.w_codes.shape) != tuple(qweight.codes.shape):
        raise QroundError(f"codes of shape {qweight.codes.shape} do not fit a layer with "
                          f"{tuple(layer.w_codes.shape)}")
    device = layer.w_codes.device
    scale = torch.tensor(qweight.scale, dtype=torch.float64)
    zero = torch.tensor(qweight.zero_point, dtype=torch.float64)
    reps = qweight.codes.shape[1] // scale.shape[1]
    w = float_weight.detach().reshape(n_out, -1).double().cpu()
    ratio = w / scale.repeat_interleave(reps, dim=1)
    floor = torch.floor(ratio) + zero.repeat_interleave(reps, dim=1)
    codes = torch.tensor(qweight.codes, dtype=torch.float64)
    layer.w_qmin, layer.w_qmax, layer.w_group_size = qweight.qmin, qweight.qmax, qweight.group_size
    dt = layer.w_scale.dtype   # float32, or float64 for a float64 layer
    layer.w_scale = scale.to(dt).to(device)
    layer.w_zero = zero.to(dt).to(device)
    layer.w_floor = floor.to(dt).to(device)
    layer.w_codes = codes.to(torch.int32).to(device)
    if start == "solver":
        # A clipped weight keeps one code: its choice is whatever lies in [floor, floor + 1].
        up = (codes - floor).clamp(0, 1)
        h = SOLVER_CONFIDENCE * up + (1 - SOLVER_CONFIDENCE) * (1 - up)
    else:
        h = ratio - torch.floor(ratio)
    layer.w_round.data = inverse_rectified_sigmoid(h.float()).to(device)
    layer.weight_mode = "hard"


def quantize_activations(result: "QuantizedModel", float_model: nn.Module, calibration: list,
                         forward: ForwardFn, config: "QuantConfig",
                         call_order: list[str] | None = None, first: list[str] | None = None):
    """Run the activation stage on ``result`` (the weight stage's output): ``result.model``
    and ``result.layers`` are replaced by the wrapped model and its final codes.  Returns
    (ReconstructResult, granularity.Selection), both None without reconstruction.
    call_order: the quantised layers in the order the forward calls them (the first and last
    of ``first_last_bits``, as the weight stage chose them); default: the report's order.
    first: the layers that read the first layer's input (their inputs stay in float with
    ``first_last_bits``)."""
    order = [r.layer for r in result.report]
    if call_order is not None:
        order = [n for n in call_order if n in result.layers]
    bits = input_bits(order, config, first)
    weights = {n: GridSpec(bits=result.layers[n].bits, symmetric=result.layers[n].symmetric,
                           group_size=result.layers[n].group_size, scale_method="minmax")
               for n in order}
    wrapped = insert_act_quantizers(result.model, order, bits, borders=config.borders,
                                    fusion=config.fusion, init=config.act_init,
                                    calib_batches=calibration, weights=weights, forward=forward)
    f_modules = dict(float_model.named_modules())
    layers = quantized_layers(wrapped)
    for name in order:
        load_weight_codes(layers[name], result.layers[name], f_modules[name].weight,
                          config.weight_start)
    rec = selection = None
    if config.reconstruction is not None:
        rec_config = config.reconstruction
        if rec_config.seed is None:   # one seed for the whole run
            rec_config = dataclasses.replace(rec_config, seed=int(config.seed))
        # buffers the forwards write get their values back; the wrappers' own hold the codes
        with kept_buffers(wrapped, skip=(QuantizedLayer, ActQuantizer)):
            rec, selection = reconstruct_with_granularity(
                float_model, wrapped, calibration, config.granularity, k=_k(config),
                scheme=None if config.scheme is None else list(config.scheme),
                config=rec_config, forward=forward, inplace=True)
        wrapped = rec.model
    layers = quantized_layers(wrapped)
    with torch.no_grad():   # the wrapped layers' own weights are the final ones, so that a
        for name in order:  # layer tied to one of them (left unwrapped) uses them too
            inner = layers[name].layer.weight
            inner.copy_(layers[name].quantized_weight())
    result.model = wrapped
    result.layers = {n: layers[n].quantized_weight_codes() for n in order}
    return rec, selection


def _k(config: "QuantConfig") -> int | None:
    if config.granularity != "loss":
        return None
    return 1 if config.k is None else config.k


def check_units(model: nn.Module, names: list[str], config: "QuantConfig", batch=None,
                forward: ForwardFn | None = None, calibration=None) -> None:
    """The model-dependent checks of the activation stage, before any solve: some layer has a
    quantised input where borders are asked for, the scheme's modules exist, hold quantised
    layers and do not overlap, and ``k`` is below the number of base units.  With ``batch``
    (and ``forward``), one forward of it also checks that each scheme unit is consecutive in
    forward order.  names: the quantised layers the forward calls, in call order.  With
    ``calibration`` (all batches) and a reconstruction, one forward per batch checks that the
    units it will certainly train (the final ones, or the base units of ``modcap``/``loss``)
    keep their cached data within ``cache_mb``.  Works on a cheap stand-in (a copy of
    ``model`` with those layers wrapped, nothing calibrated)."""
    bits = input_bits(names, config)
    if config.borders != "none" and all(b is None for b in bits.values()):
        raise QroundError(f"borders={config.borders!r} need a quantised input, and none is left: "
                          f"first_last_bits keeps the input of the first layer ({names[0]!r}) "
                          "in float")
    # The stand-in shares the model's parameters (no memory for a third copy of a large
    # model; buffers, which a forward may write, are copied); wrapping a layer freezes its
    # parameters, so their flags are restored.
    params = list(model.parameters())
    flags = [(p, p.requires_grad) for p in params]
    try:
        _check_units_on(copy_module(model, memo={id(p): p for p in params}), model, names,
                        config, batch, forward, calibration)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_units_on(shadow, model, names, config, batch, forward, calibration=None) -> None:
    modules = dict(shadow.named_modules())
    # the later batches, traced while a unit is not called yet (an expert the first batch
    # routed no row to)
    later = list(calibration)[1:] if calibration is not None else ()
    for n in names:
        if n == "":  # the model is a single layer: the stand-in is that layer, wrapped
            shadow = QuantizedLayer(shadow)
            break
        parent, _, child = n.rpartition(".")
        setattr(modules[parent] if parent else shadow, child, QuantizedLayer(modules[n]))
    if config.granularity == "loss":
        n_units = len(base_units(shadow, "block"))
        if n_units < 2:
            raise QroundError(f"granularity='loss' merges adjacent reconstruction blocks; the "
                              f"model has {n_units}, so there is nothing to merge: use "
                              "granularity='block' or 'layer'")
        if not 1 <= _k(config) <= n_units - 1:
            raise QroundError(f"k={_k(config)} must lie in [1, {n_units - 1}]: the model has "
                              f"{n_units} reconstruction blocks, {n_units - 1} adjacent pairs")
    if config.scheme is not None:
        named = dict(shadow.named_modules())
        units = parse_scheme(list(config.scheme))
        missing = [m for u in units for m in u.modules if m not in named]
        if missing:
            raise QroundError(f"scheme names modules that do not exist in the model: {missing}")
        # a unit's modules between its quantised ones (BN, ReLU) are welcome; a unit without
        # any quantised layer has nothing to train
        empty = ["+".join(u.modules) for u in units
                 if not any(isinstance(x, QuantizedLayer) for m in u.modules
                            for x in named[m].modules())]
        if empty:
            raise QroundError(f"scheme units hold no quantised layer: {empty}")
        from .reconstruct import _check_connected, _order_units, _resolve_blocks

        units = _resolve_blocks(shadow, model, units)  # overlaps
        if batch is not None:
            with eval_mode(shadow):
                with torch.no_grad():
                    units = _order_units(shadow, units, batch, forward or default_forward,
                                         later)[0]
                _check_connected(shadow, units, batch, forward or default_forward, later)
    elif batch is not None and config.granularity in ("block", "modcap", "loss"):
        from .reconstruct import _order_units

        # the blocks found by name must be called by the forward (checked here, before the
        # solves, instead of when the reconstruction starts)
        with eval_mode(shadow), torch.no_grad():
            _order_units(shadow, base_units(shadow, "block"), batch, forward or default_forward,
                         later)
    if calibration is not None and batch is not None and config.reconstruction is not None:
        from .reconstruct import _order_units, _resolve_blocks, cache_bytes, check_cache

        blocks = (parse_scheme(list(config.scheme)) if config.scheme is not None
                  else None if config.granularity == "layer" else "auto")
        forward = forward or default_forward
        with eval_mode(shadow), torch.no_grad():
            units, lca, _ = _order_units(shadow, _resolve_blocks(shadow, model, blocks), batch,
                                         forward, later)
            batches = list(calibration)
            check_cache(cache_bytes(shadow, units, lca, batches, forward),
                        config.reconstruction.cache_mb, len(batches),
                        "ReconstructConfig.cache_mb")
