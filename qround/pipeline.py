"""Full-model quantisation: ``quantize_model(model, data, config)``.

Layers are visited in forward order.  For each, its input statistics are streamed from hooks
(layer inputs are never stored), from the source ``config.inputs`` names:

- "float": ``H = E[x x^T]`` of the float model's inputs; the target is ``W x``;
- "quantized": ``H = E[x_hat x_hat^T]`` of the partly quantised copy's inputs, target ``W x_hat``
  (GPTQ's sequential statistics: each layer sees the earlier layers' rounding but does not try
  to undo it);
- "asymmetric" (AdaRound eq. 25): ``H_hat = E[x_hat x_hat^T]`` and ``C = E[x_hat x^T]`` pair the
  copy's input ``x_hat`` with the float model's ``x`` on the same batch, target ``W x``, and
  ``H = E[x x^T]`` makes the cost absolute: each layer also corrects the earlier layers' error.

The layer's problems (one per group of a grouped conv) are solved, the rounding is written back
into the copy, and the next layer sees its effect.  The default is "quantized": on MiniLM W3
(BENCHMARKS.md section 2) it beats "float", and the asymmetric target over-corrects badly.

Cost control: a first forward of one batch records the call order and which layers read the
same input tensor (q, k, v of an attention block); those share one capture and one set of
statistics.  Every capture forward stops (a private exception raised from the hook) as soon as
the layers it waits for have been seen.  With ``inputs="float"`` the source never changes, so
consecutive groups are captured together in one pass, within a memory bound.  Otherwise the
outputs of modules that hold only finished layers are recorded once and replayed in the later
passes (:mod:`qround.prefix_cache`, ``capture_cache_mb``), with identical results.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shlex
import time
import weakref
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .activation_stage import WEIGHT_STARTS, check_units, quantize_activations
from .activations import BORDERS, INITS
from ._warn import gathering
from ._orders import merge_orders
from .calibrate import (ForwardFn, _chunks, _geometry, _layer_input, _Moment, _vectors,
                        _capture_fisher, default_forward, eval_mode, fisher_bytes, kept_buffers,
                        _check_materialised, layer_hooks, own_rng, run_forward)
from .errors import MAX_SEED, QroundError, check_bits, check_int, check_real, copy_module
from .export import fingerprint
from .fold import fold_with_pairs
from .granularity import GRANULARITIES, Selection
from .grid import GridSpec
from .lattice import grid_descent
from .prefix_cache import PrefixCache, budget_bytes, check_budget, disabled, trace_spans
from .problems.layers import (bias_not_writable, conv1d_refusals, conv1d_source,
                              forward_hooks, is_hf_conv1d, layer_weight, linear_view,
                              linearize_conv1d, problems_from_layer, restore_conv1d,
                              weight_not_writable)
from .reconstruct import ReconstructConfig, ReconstructResult, _kv_cache
from .report import format_table
from .scales import solve_refitting
from .solvers import Solver, get_solver
from .solvers._torch import resolve_device
from .solvers.base import cost_ratio
from .solvers.registry import DEFAULT_SOLVER
from .writeback import QuantizedWeight, apply_to_layer, quantized_weight, weight_from_codes

log = logging.getLogger(__name__)

SUPPORTED = (nn.Linear, nn.Conv2d, nn.Conv1d)
# Normalisation layers hold weights too but are conventionally kept in float: not "skipped".
_NORMS = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                           getattr(nn, "RMSNorm", None)) if t is not None)
INPUTS = ("float", "quantized", "asymmetric")
_PASS_BYTES = 1 << 30  # float64 statistic sums held by one capture pass without `asymmetric`


class _StopForward(BaseException):
    """Raised from a hook once the layers a capture waits for have run: ends the forward.  A
    BaseException, so that a forward function's own ``except Exception`` does not swallow it
    and run on (its layers would then add inputs to the statistics twice)."""


# ---------------------------------------------------------------------------------- config
OVERRIDE_KEYS = ("wbits", "group_size", "symmetric", "scale_method", "damp", "solver")


def _check_overrides(config) -> tuple[tuple[str, dict], ...] | None:
    """``config.overrides`` as ((pattern, options), ...) in matching order, every pattern and
    value checked as the config's own fields are (QroundError naming the pattern)."""
    value = config.overrides
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise QroundError("overrides must be a dict {regex: {option: value}} or a sequence of "
                          f"(regex, {{option: value}}) pairs, got {type(value).__name__}")
    if not items:
        return None
    out, seen = [], set()
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise QroundError(f"overrides: each entry is a (regex, {{option: value}}) pair, got "
                              f"{item!r}")
        pattern, options = item
        if not isinstance(pattern, str) or not pattern:
            raise QroundError(f"overrides: a pattern must be a non-empty regex string, got "
                              f"{pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise QroundError(f"overrides: {pattern!r} is not a valid regex: {exc}") from None
        if pattern in seen:
            raise QroundError(f"overrides: pattern {pattern!r} is given twice")
        seen.add(pattern)
        where = f"overrides[{pattern!r}]"
        if not isinstance(options, Mapping) or not options:
            raise QroundError(f"{where} must be a non-empty dict of options "
                              f"({', '.join(OVERRIDE_KEYS)}), got {options!r}")
        unknown = [k for k in options if k not in OVERRIDE_KEYS]
        if unknown:
            raise QroundError(f"{where}: unknown option {unknown[0]!r}; a layer override sets "
                              f"{', '.join(OVERRIDE_KEYS)}")
        options = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in options.items()}
        merged = {key: getattr(config, key) for key in OVERRIDE_KEYS} | options
        try:
            check_bits(merged["wbits"], "wbits")
            if not isinstance(merged["symmetric"], bool):
                raise QroundError(f"symmetric must be True or False, got {merged['symmetric']!r}")
            GridSpec(bits=merged["wbits"], symmetric=merged["symmetric"],
                     group_size=merged["group_size"], scale_method=merged["scale_method"])
            check_real(merged["damp"], "damp", 0, 1e6)
            if "solver" in options:
                if not isinstance(options["solver"], (str, Solver)):
                    raise QroundError(f"solver must be a registry spec or a Solver, got "
                                      f"{options['solver']!r}")
                try:
                    get_solver(options["solver"])
                except TypeError as exc:
                    raise QroundError(f"solver {options['solver']!r} cannot be built from its "
                                      f"name alone: {exc}") from None
        except QroundError as exc:
            raise QroundError(f"{where}: {exc}") from None
        out.append((pattern, options))
    return tuple(out)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantise and how; checked when built (model-dependent checks in quantize_model).

    Weights:
        wbits: weight bits, 2..8.  symmetric: a grid symmetric around zero, or an
        asymmetric one with a zero point per scale.  group_size: inputs per scale (None: one
        scale per output channel).  scale_method: "minmax", "mse" (weight error) or
        "mse-output" (output error under the layer's statistics) for the scales.
        solver: a registry spec ("fast", "quality", "gptq", "greedy", "tabu(restarts=8)",
        "gptq+tabu"...) or a Solver; the solve's target is described in the module docstring.
        layers / exclude: regular expressions (``re.search``) on module names: the layers to
        quantise (None: every supported layer) and those to leave in float.
        first_last_bits: e.g. 8: the first and the last quantised layer at these weight bits;
        with ``abits`` also the activations: the first layer's input stays in float and the
        last layer's input gets ``first_last_bits`` bits.
        overrides: ``{regex: {"wbits": 8, "solver": "quality", ...}}`` per-layer settings; the
        first pattern that ``re.search``-es a layer's name wins.
        fold_batchnorm: fold every BatchNorm that follows a conv or Linear into it first
        (:func:`qround.fold.fold_batchnorm`), so that the rounded weights are the deployed
        ones; the result's model is the folded one, and ``export.load`` folds the float model
        it is given the same way before loading.
    Statistics:
        inputs: "quantized" (default), "float" or "asymmetric": whose layer inputs make the
        statistics (see the module docstring).  statistics: "covariance" (E[x x^T]) or
        "fisher" (per output channel ``H_c = E[g_c^2 x x^T]``; needs ``loss_fn`` in
        :func:`quantize_model`, and a layer's matrices must fit in ``fisher_budget_mb`` MB).
        capture_cache_mb: memory for the outputs of finished modules replayed in later
        capture passes (0: every pass runs whole).
        device: where statistics are accumulated and the torch solvers run ("cpu", "cuda").
    After the solver:
        bias_correction: zero the mean of the rounding error (Nagel et al. 2019) through the
        bias; the solver then minimises what remains.  damp: lambda in
        ``+ lambda ||w_hat - w||^2``, lambda = damp x mean(diag H).  refits: rounds of scale
        refitting, each followed by another solve (:mod:`qround.scales`).  widen: then descend on
        the whole grid (:mod:`qround.lattice`): codes may leave floor/ceil, a channel's cost
        never rises.  correction: with inputs="asymmetric", the share of the earlier layers'
        error corrected (1: all of it).
    Activations and reconstruction (:mod:`qround.activation_stage`; off while ``abits`` and
    ``reconstruction`` are None):
        abits: bits of the quantised layers' inputs, 2..8 (LSQ steps; see first_last_bits).
        act_init: "mse" or "minmax", the steps' initial values.  borders: "none", "linear" or
        "quadratic" (AQuant's learned rounding borders; needs reconstruction).  fusion: fuse a
        conv's borders over its kernel window.  reconstruction: a ReconstructConfig (block
        reconstruction of the soft weight rounding, steps and borders), or None.
        weight_start: "solver" (the soft rounding starts at the solver's choice) or "float".
        granularity: the reconstruction units, "layer", "block", "modcap", "loss" (``k``
        oscillation points merged, 1 when None) or "scheme" (``scheme``: units such as
        "conv1+conv2", in forward order).
    Run:
        seed: every random draw (solvers, reconstruction); the caller's global RNG states are
        restored afterwards.  progress: a progress bar per stage (tqdm).
    """

    wbits: int = 4                      # 2..8
    symmetric: bool = True
    group_size: int | None = None       # None = per channel
    scale_method: str = "mse"           # minmax | mse | mse-output
    solver: str | Solver = DEFAULT_SOLVER  # any registry spec: "greedy", "gptq", "quality"...
    layers: str | None = None           # regex on module names (re.search); None = all
    exclude: str | None = None          # regex of names to leave in float
    first_last_bits: int | None = None  # e.g. 8: first and last quantised layer at 8 bits
    overrides: Any = None               # per-layer settings, {regex: {"wbits": 8, ...}}: the
                                        # first pattern that re.search-es a layer's name wins
    inputs: str = "quantized"           # statistics source: float | quantized | asymmetric
    statistics: str = "covariance"      # covariance | fisher  (fisher needs loss_fn)
    fisher_budget_mb: float = 1024.0
    capture_cache_mb: float = 1024.0    # outputs of finished modules replayed in later capture
                                        # passes (qround.prefix_cache); 0 = run every pass whole
    bias_correction: bool = False       # Nagel et al. 2019: zero the mean of the solved error;
                                        # the solver then minimises what remains (covariances)
    damp: float = 0.0                   # lambda ||w_hat - w||^2, lambda = damp * mean(diag H)
    refits: int = 0                     # rounds of scale refitting after the solver (qround.scales)
    widen: bool = False                 # then descend on the whole grid (qround.lattice): codes
                                        # may leave floor/ceil; never raises a channel's cost
    correction: float = 1.0             # inputs="asymmetric": share of earlier error corrected
    device: str = "cpu"                 # where statistics are accumulated and solvers run
    seed: int = 0
    progress: bool = True
    # activation stage (qround.activation_stage); off while abits and reconstruction are None
    abits: int | None = None            # bits of the quantised layers' inputs, 2..8
    borders: str = "none"               # none | linear | quadratic (AQuant; needs reconstruction)
    fusion: bool = True                 # AQuant border fusion in convs (eq. 9)
    act_init: str = "mse"               # mse | minmax: initial activation steps
    reconstruction: ReconstructConfig | None = None  # block reconstruction after the solver
    granularity: str = "block"          # units: layer | block | modcap | loss | scheme
    k: int | None = None                # loss granularity: oscillation points merged (1)
    scheme: tuple[str, ...] | None = None  # scheme granularity: units "a+b", in forward order
    weight_start: str = "solver"        # soft rounding starts at the solver's choice | float
    fold_batchnorm: bool = False        # fold BatchNorms into the layer before them first

    def __post_init__(self):
        # numpy scalars become Python ones: the config is saved as JSON with the model
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.bool_):
                object.__setattr__(self, f.name, bool(value))
            elif isinstance(value, np.integer):
                object.__setattr__(self, f.name, int(value))
            elif isinstance(value, np.floating):
                object.__setattr__(self, f.name, float(value))
        check_bits(self.wbits, "wbits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.inputs not in INPUTS:
            raise QroundError(f"inputs must be one of {INPUTS}, got {self.inputs!r}")
        for name in ("symmetric", "bias_correction", "progress", "widen", "fold_batchnorm"):
            if not isinstance(getattr(self, name), bool):
                raise QroundError(f"{name} must be True or False, got {getattr(self, name)!r}")
        GridSpec(bits=self.wbits, symmetric=self.symmetric, group_size=self.group_size,
                 scale_method=self.scale_method)  # checks group_size and scale_method
        object.__setattr__(self, "overrides", _check_overrides(self))
        for name in ("layers", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                if not isinstance(pattern, str):
                    raise QroundError(f"{name} must be a regex string or None, got {pattern!r}")
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise QroundError(f"{name}={pattern!r} is not a valid regex: {exc}") from None
        if self.statistics not in ("covariance", "fisher"):
            raise QroundError(f"statistics must be 'covariance' or 'fisher', got "
                              f"{self.statistics!r}")
        if self.statistics == "fisher" and self.inputs == "asymmetric":
            raise QroundError("statistics='fisher' has no asymmetric objective (it would run the "
                              "'quantized' one while bias correction followed the asymmetric "
                              "error): use inputs='quantized' or 'float' with it")
        check_real(self.damp, "damp", 0, 1e6)
        check_real(self.correction, "correction", 0, 1)
        if self.correction != 1.0 and self.inputs != "asymmetric":
            raise QroundError("correction only applies with inputs='asymmetric' (it blends the "
                              "float target into the quantized one)")
        check_int(self.refits, "refits", 0)
        check_real(self.fisher_budget_mb, "fisher_budget_mb", 0, lo_open=True)
        check_budget(self.capture_cache_mb, "capture_cache_mb")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or not 0 <= self.seed <= MAX_SEED:
            raise QroundError(f"seed must be an integer in [0, 2**64 - 1] (torch's generators "
                              f"take no more), got {self.seed!r}")
        resolve_device(self.device)
        if not isinstance(self.device, str):  # torch.device, or a CUDA index: saved as JSON
            object.__setattr__(self, "device", str(torch.device(
                f"cuda:{self.device}" if isinstance(self.device, int) else self.device)))
        self._check_activation_stage()
        get_solver(self.solver)

    def _check_activation_stage(self) -> None:
        if self.abits is not None:
            check_bits(self.abits, "abits")
        if self.borders not in BORDERS:
            raise QroundError(f"borders must be one of {BORDERS}, got {self.borders!r}")
        if self.borders != "none":
            if self.abits is None:
                raise QroundError(f"borders={self.borders!r} needs quantised inputs: set abits")
            if self.reconstruction is None or not self.reconstruction.train_borders:
                raise QroundError(f"borders={self.borders!r} are learned by block "
                                  "reconstruction: set reconstruction=ReconstructConfig(...) "
                                  "with train_borders=True")
        if not isinstance(self.fusion, bool):
            raise QroundError(f"fusion must be True or False, got {self.fusion!r}")
        if self.act_init not in INITS:
            raise QroundError(f"act_init must be one of {INITS}, got {self.act_init!r}")
        if self.reconstruction is not None and not isinstance(self.reconstruction,
                                                              ReconstructConfig):
            raise QroundError(f"reconstruction must be a ReconstructConfig or None, got "
                              f"{type(self.reconstruction).__name__}")
        if self.granularity not in GRANULARITIES:
            raise QroundError(f"granularity must be one of {GRANULARITIES}, got "
                              f"{self.granularity!r}")
        if self.reconstruction is None and (self.granularity != "block" or self.k is not None
                                            or self.scheme is not None):
            raise QroundError(f"granularity={self.granularity!r}, k and scheme choose the units "
                              "of block reconstruction, which is off: set "
                              "reconstruction=ReconstructConfig(...)")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int)
                                   or self.k < 1):
            raise QroundError(f"k must be a positive integer, got {self.k!r}")
        if self.k is not None and self.granularity != "loss":
            raise QroundError(f"k (the number of merges) applies to granularity='loss'; "
                              f"granularity is {self.granularity!r}"
                              + (" (the default)" if self.granularity == "block" else "")
                              + ": set granularity='loss' too")
        if (self.scheme is None) != (self.granularity != "scheme"):
            raise QroundError("granularity='scheme' and scheme=(units...) go together: "
                              f"got granularity={self.granularity!r}, scheme={self.scheme!r}")
        if self.scheme is not None:
            if isinstance(self.scheme, str) or not all(isinstance(u, str) and u.strip()
                                                       for u in self.scheme) or not self.scheme:
                raise QroundError(f"scheme must be a non-empty tuple of unit strings like "
                                  f"('block1', 'block2+down'), got {self.scheme!r}")
            object.__setattr__(self, "scheme", tuple(self.scheme))
        if self.weight_start not in WEIGHT_STARTS:
            raise QroundError(f"weight_start must be one of {WEIGHT_STARTS}, got "
                              f"{self.weight_start!r}")
        if self.widen and self.reconstruction is not None and self.reconstruction.train_weights:
            raise QroundError("widen=True cannot be combined with a reconstruction that trains "
                              "the weight rounding: its soft rounding chooses floor or ceil "
                              "only, so the widened codes would be lost; use "
                              "ReconstructConfig(train_weights=False) or widen=False")

    @property
    def activation_stage(self) -> bool:
        """Whether quantize_model runs the activation stage (abits or reconstruction set)."""
        return self.abits is not None or self.reconstruction is not None

    def override(self, name: str) -> tuple[str | None, dict]:
        """The first ``overrides`` pattern that matches layer ``name`` (re.search) and its
        options, or (None, {})."""
        for pattern, options in self.overrides or ():
            if re.search(pattern, name):
                return pattern, options
        return None, {}

    def layer_options(self, name: str) -> dict:
        """The settings ``overrides`` may change (wbits, group_size, symmetric, scale_method,
        damp, solver) as they apply to layer ``name``.  ``wbits`` is the override's or the
        config's; ``first_last_bits`` is applied by quantize_model, and an override's ``wbits``
        wins over it."""
        options = {key: getattr(self, key) for key in OVERRIDE_KEYS}
        options.update(self.override(name)[1])
        return options

    def layer_bits(self, name: str, end: bool) -> int:
        """Weight bits of layer ``name``; ``end``: it is the first or last quantised layer."""
        options = self.override(name)[1]
        if "wbits" in options:
            return options["wbits"]
        return self.first_last_bits if end and self.first_last_bits is not None else self.wbits

    def grid_spec(self, bits: int, name: str | None = None) -> GridSpec:
        """The grid of a layer at ``bits``; with ``name``, that layer's overrides apply."""
        options = self.layer_options(name) if name is not None else vars(self)
        return GridSpec(bits=bits, symmetric=options["symmetric"],
                        group_size=options["group_size"], scale_method=options["scale_method"])

    @classmethod
    def from_dict(cls, d: Mapping, **changes) -> "QuantConfig":
        """The config that :meth:`as_dict` described, e.g. a saved file's
        ``export.read_metadata(path)["config"]``: ``QuantConfig.from_dict(c.as_dict()) == c``
        for a config whose solver is a registry spec.  A Solver instance is saved as its label
        (``solver_repr`` holds its parameters); its label is taken as the spec here, so a
        solver built with options that the label does not show comes back with defaults.
        ``changes`` replace settings, e.g. ``device="cpu"`` for a run made on a GPU."""
        if not isinstance(d, Mapping):
            raise QroundError(f"QuantConfig.from_dict takes a dict (as_dict's), got "
                              f"{type(d).__name__}")
        names = {f.name for f in fields(cls)}
        d = _migrate_config(d)
        unknown = sorted(set(d) - names - {"solver_repr"})
        if unknown:
            raise QroundError(f"QuantConfig.from_dict: unknown settings {unknown}; known: "
                              f"{sorted(names)}")
        bad = sorted(set(changes) - names)
        if bad:
            raise QroundError(f"QuantConfig.from_dict: unknown settings {bad} among the changes")
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.update(changes)
        rec = kwargs.get("reconstruction")
        if isinstance(rec, Mapping):
            rnames = {f.name for f in fields(ReconstructConfig)}
            bad = sorted(set(rec) - rnames)
            if bad:
                raise QroundError(f"QuantConfig.from_dict: unknown reconstruction settings "
                                  f"{bad}; known: {sorted(rnames)}")
            rec = dict(rec)
            if isinstance(rec.get("beta"), list):
                rec["beta"] = tuple(rec["beta"])
            kwargs["reconstruction"] = ReconstructConfig(**rec)
        if isinstance(kwargs.get("scheme"), list):
            kwargs["scheme"] = tuple(kwargs["scheme"])
        if isinstance(kwargs.get("overrides"), list):
            kwargs["overrides"] = [tuple(item) if isinstance(item, list) else item
                                   for item in kwargs["overrides"]]
        return cls(**kwargs)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.reconstruction is not None:
            d["reconstruction"]["beta"] = list(self.reconstruction.beta)
        if not isinstance(self.solver, str):
            d["solver"] = self.solver.label
            # a Solver instance: its parameters too (without the memory addresses of objects
            # among them, which change from run to run)
            d["solver_repr"] = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(self.solver))
        if self.overrides is not None:  # JSON: [pattern, options] pairs, in matching order
            d["overrides"] = [[pattern, {k: (v if isinstance(v, str) or k != "solver"
                                             else v.label) for k, v in options.items()}]
                              for pattern, options in self.overrides]
        return d


# settings renamed since files were first written: (old key, new key, old value -> new value)
_RENAMED_SETTINGS = (
    # the first saved files (before the activation stage) had `asymmetric`: True took the
    # statistics from the partly quantised copy paired with the float model (now
    # inputs="asymmetric"), False from the float model alone (inputs="float")
    ("asymmetric", "inputs", {True: "asymmetric", False: "float"}),
)


def _migrate_config(d: Mapping) -> Mapping:
    """A saved config with the names of an older qround, in today's names (the meaning kept),
    so that an older file's settings rebuild its run."""
    for old, new, values in _RENAMED_SETTINGS:
        if old not in d:
            continue
        if new in d:
            raise QroundError(f"QuantConfig.from_dict: {old!r} (an older qround's name) and "
                              f"{new!r} (today's) are both given; keep {new!r}")
        value = d[old]
        if not isinstance(value, bool) or value not in values:
            raise QroundError(f"QuantConfig.from_dict: {old!r} (an older qround's setting, "
                              f"now {new!r}) must be one of {sorted(values)}, got {value!r}")
        log.info("QuantConfig.from_dict: an older qround's %s=%r read as %s=%r", old, value,
                 new, values[value])
        d = {**{k: v for k, v in d.items() if k != old}, new: values[value]}
    return d


# ---------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LayerReport:
    """One quantised layer: summed costs over channels (and conv groups), times in seconds.

    kind: Linear, Conv2d, Conv1d (torch's) or Conv1D (transformers', rounded as the nn.Linear
    it equals); shape: the rounded matrix (out, in) (a conv's in = c_in/groups * kh * kw, a
    Conv1d's c_in/groups * k); seconds: solver
    time; capture_seconds: this layer's share of the capture pass it took part in.
    """

    layer: str
    kind: str
    shape: tuple[int, int]
    bits: int
    solver: str
    cost: float
    rtn_cost: float
    ratio: float
    seconds: float
    capture_seconds: float
    cost_noise: float = 0.0   # round-off of the summed costs (Solution.cost_noise)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class QuantizedModel:
    """A quantised copy of a model, its codes per layer, and the per-layer report."""

    model: nn.Module
    config: QuantConfig
    layers: dict[str, QuantizedWeight]
    report: list[LayerReport]
    skipped: dict[str, str]
    seconds: float
    reconstruction: ReconstructResult | None = None  # the activation stage's, when it ran
    units: Selection | None = None    # its reconstruction units (granularity), when it ran
    # the float model's fingerprint (qround.export.fingerprint): saved files record it, and
    # qround.export.load checks the model it is given against it
    source: dict[str, str] | None = None
    # fold_batchnorm: the BatchNorms folded into their layers, {bn: layer}; saved, and folded
    # the same way by qround.export.load
    folded: dict[str, str] | None = None
    # the layers that bias correction gave a bias the float model's layer did not have
    new_biases: tuple[str, ...] = ()

    def totals(self) -> dict:
        cost = sum(r.cost for r in self.report)
        rtn = sum(r.rtn_cost for r in self.report)
        return {"layers": len(self.report), "skipped": len(self.skipped), "cost": cost,
                "rtn_cost": rtn,
                "ratio": cost_ratio(cost, rtn, sum(r.cost_noise for r in self.report)),
                "solve_seconds": sum(r.seconds for r in self.report),
                "capture_seconds": sum(r.capture_seconds for r in self.report),
                "seconds": self.seconds}

    def table(self) -> str:
        """The per-layer report as a text table, then a line of totals."""
        t = self.totals()
        columns = [f.name for f in dataclasses.fields(LayerReport) if f.name != "cost_noise"]
        return (format_table([r.as_dict() for r in self.report], columns) +
                f"\ntotal: {t['layers']} layers quantised, {t['skipped']} left in float; cost "
                f"{t['cost']:.4g} vs RTN {t['rtn_cost']:.4g} (ratio {t['ratio']:.4f}); solve "
                f"{t['solve_seconds']:.2f} s, capture {t['capture_seconds']:.2f} s, "
                f"wall {t['seconds']:.2f} s" + self._skipped_lines() + (
                    "" if self.reconstruction is None else
                    f"\nreconstruction units ({self.units.granularity}): "
                    + ", ".join(u.name or "<model>" for u in self.units.units)
                    + f"\nreconstruction ({self.reconstruction.seconds:.2f} s):\n"
                    + self.reconstruction.table()))

    def _skipped_lines(self, limit: int = 8) -> str:
        """The modules left in float and why, a line each (the first ``limit``)."""
        if not self.skipped:
            return ""
        items = list(self.skipped.items())
        lines = [f"  {name or '<model>'}: {why}" for name, why in items[:limit]]
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more (QuantizedModel.skipped)")
        return "\nleft in float:\n" + "\n".join(lines)

    def save(self, path) -> None:
        """Write codes, scales and dequantised weights to one safetensors file (qround.export)."""
        from .export import save
        save(self, path)


# ---------------------------------------------------------------------------------- plan
@dataclass
class _Layer:
    name: str
    kind: str
    bits: int
    leader: str          # the layer whose capture (same input tensor, same geometry) it shares
    calls: int           # forward calls per batch, from the order pass
    group: int
    unbatched: bool = False   # a conv whose first input had no batch axis: (C, H, W), (C, L)
    varies: bool = False      # called another number of times on some batch than on the first


def _base(m: nn.Module) -> type:
    return next(t for t in SUPPORTED if isinstance(m, t))


def _own_forward(m: nn.Module) -> bool:
    """A subclass of nn.Linear / nn.Conv2d / nn.Conv1d that computes its own output (timm's
    StdConv2d, a scaled Linear): its forward (or a conv's ``_conv_forward``) is not the base
    class's."""
    base, kind = _base(m), type(m)
    return kind.forward is not base.forward or (
        base is not nn.Linear and kind._conv_forward is not base._conv_forward)


def _run_first(model: nn.Module, batch, forward: ForwardFn, index: int = 0) -> None:
    """``forward(model, batch)`` on the first calibration batch (or batch ``index``): an error
    of the user's model or forward (a batch of the wrong shape, dtype or device), or a forward
    that changes the batch in place, is a QroundError naming it
    (:func:`qround.calibrate.run_forward`)."""
    run_forward(model, batch, forward, index)


def _explicit_hint(m: nn.Module) -> str:
    """Where a layer qround rounds in an explicit form is pointed to it (not a subclass with its
    own forward, which that form would not compute)."""
    for base, hint in ((nn.MultiheadAttention, "qround.attention.explicit_attention(model) "
                        "gives a copy whose attention projections are Linear layers"),
                       (nn.ConvTranspose1d, _TRANSPOSED_HINT), (nn.ConvTranspose2d,
                                                                _TRANSPOSED_HINT),
                       (nn.Conv3d, "qround.conv3d.explicit_conv3d(model) gives a copy in which "
                        "it is an nn.Conv2d over depth-stacked channels")):
        if isinstance(m, base) and type(m).forward is base.forward:
            return f" ({hint})"
    return ""


_TRANSPOSED_HINT = ("qround.conv_transpose.explicit_conv_transpose(model) gives a copy in which "
                    "it is the convolution it equals")


def _select(model: nn.Module, config: QuantConfig, float_conv1d=(), called=None, untie=True
            ) -> tuple[list[str], dict[str, str]]:
    """Names of the Linear/Conv2d/Conv1d layers to quantise, and the weight-holding modules left
    out.  float_conv1d: transformers Conv1D layers left in float for their own reasons, which the
    ``layers`` / ``exclude`` patterns may match (a pattern must match some layer).  called: the
    layers the forward calls, when known (:func:`_untie` gives a tied weight to one of them);
    untie=False: every chosen layer, tied or not."""
    candidates, skipped = [], {}
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, SUPPORTED) and _own_forward(m):
            skipped[name] = (f"{type(m).__name__} subclasses {_base(m).__name__} with its own "
                             "forward: its output need not be x W^T + b, so its rounding cost "
                             "would be another layer's; left in float")
        elif isinstance(m, SUPPORTED):
            candidates.append(name)
        elif not isinstance(m, _NORMS) and any(True for _ in m.parameters(recurse=False)):
            skipped[name] = (f"{type(m).__name__} is not an nn.Linear, nn.Conv2d or "
                             "nn.Conv1d: its own parameters stay in float")
            skipped[name] += _explicit_hint(m)
    if not candidates:
        own = [f"{n!r}: {why}" for n, why in skipped.items() if "own forward" in why]
        explicit = [n for n, m in modules.items() if _explicit_hint(m)]
        raise QroundError("model has no nn.Linear, nn.Conv2d or nn.Conv1d layer to quantise"
                          + (f" ({own[0]})" if own else "")
                          + (f"; its {explicit[0]!r} ({type(modules[explicit[0]]).__name__}) "
                             "and the like are rounded in their explicit form: "
                             "qround.explicit.explicit_layers(model) gives a copy in which they are"
                             if explicit else ""))
    chosen = candidates
    for field_name, keep in (("layers", True), ("exclude", False)):
        pattern = getattr(config, field_name)
        if pattern is None:
            continue
        hits = {n for n in candidates if re.search(pattern, n)}
        if not hits and not any(re.search(pattern, n) for n in float_conv1d):
            known = set(candidates) | set(float_conv1d)
            raise QroundError(f"{field_name}={pattern!r} matches no nn.Linear/Conv2d/Conv1d "
                              "layer; "
                              f"layer names look like "
                              f"{[n for n in modules if n in known][:3]}")
        for n in chosen:
            if (n in hits) != keep:
                skipped[n] = (f"excluded by exclude={pattern!r}" if not keep
                              else f"not matched by layers={pattern!r}")
        chosen = [n for n in chosen if (n in hits) == keep]
    if not chosen:
        raise QroundError(f"exclude={config.exclude!r} leaves no layer to quantise")
    refused = [f"{n!r}: {why}" for n in chosen
               if (why := weight_not_writable(modules[n]) or (
                   bias_not_writable(modules[n]) if config.bias_correction else None))
               is not None]
    if refused:
        computed = any("not a parameter" in r for r in refused)  # no copy of the model works
        raise QroundError("cannot round these layers' weights: " + "; ".join(refused[:3])
                          + (f" (and {len(refused) - 3} more)" if len(refused) > 3 else "")
                          + ("" if computed else "; or leave them out with config.exclude"))
    _check_materialised(modules, chosen)
    if not untie:
        return chosen, skipped
    wanted = chosen
    chosen = _untie(model, chosen, skipped, called)
    if not chosen:   # the reasons of the chosen layers, not of the modules never chosen
        why = "; ".join(f"{n!r}: {skipped[n]}" for n in wanted[:3])
        raise QroundError("nothing to quantise: every chosen layer shares its weight with a "
                          f"module that stays in float (tied weights): {why}")
    return chosen, skipped


def _check_names(model: nn.Module, names: list[str], config: QuantConfig,
                 skipped: Mapping[str, str] | None = None) -> None:
    """The checks of the chosen layers that run before any forward (``skipped``: the layers
    left in float, and why)."""
    if config.activation_stage:
        _check_single_names(model, names)
    if config.reconstruction is not None:  # bad schemes and k fail before any forward...
        check_units(model, names, config)
    modules = dict(model.named_modules())
    _check_overrides_match(config, names, skipped)
    check_group_sizes(modules, names, config)
    for name in names:
        module = modules[name]
        for key in ("weight", "bias"):
            t = getattr(module, key, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point() \
                    and not bool(torch.isfinite(t.detach()).all()):
                bad = int((~torch.isfinite(t.detach())).sum())
                raise QroundError(f"layer {name!r}: its {key} contains {bad} NaN/Inf value(s)")
        if config.statistics == "fisher" and fisher_bytes(module) > config.fisher_budget_mb * 2**20:
            raise QroundError(f"Fisher blocks of layer {name!r} need "
                              f"{fisher_bytes(module) / 2**20:.3g} MB, over fisher_budget_mb="
                              f"{config.fisher_budget_mb}; exclude it or use 'covariance'")


def _reselect(model: nn.Module, traced: nn.Module, config: QuantConfig, conv_skipped: dict,
              batches, forward: ForwardFn, names: list[str], called: set[str]):
    """(names, skipped) chosen again when a tied weight went to a layer the forward never
    calls (:func:`_tied_to_uncalled`), now giving it to one it calls; None when no weight did.
    ``model`` is what :func:`_select` chose on, ``traced`` the copy one forward of each of
    ``batches`` runs on to see which layers are called (an expert the first batch skips is
    called by a later one)."""
    if len(called) == len(names) or not _tied_to_uncalled(model, names, called):
        return None
    everything, _ = _select(model, config, float_conv1d=conv_skipped, untie=False)
    calls = {x.name for j, batch in enumerate(batches)
             for x in _trace(traced, batch, forward, everything, j)}
    names, skipped = _select(model, config, float_conv1d=conv_skipped, called=calls)
    skipped.update(conv_skipped)
    return names, skipped


def _tied_to_uncalled(model: nn.Module, names: list[str], called: set[str]) -> bool:
    """Whether a chosen layer the forward does not call holds a weight that another module
    shares (tied weights: that module may be called, and its weight would stay in float)."""
    modules = dict(model.named_modules())
    holders: dict[int, int] = {}
    for m in modules.values():
        for p in m._parameters.values():
            if p is not None:
                holders[id(conv1d_source(p))] = holders.get(id(conv1d_source(p)), 0) + 1
    return any(holders.get(id(conv1d_source(modules[n].weight)), 0) > 1
               for n in names if n not in called)


def _check_single_names(model: nn.Module, names: list[str]) -> None:
    """The activation stage wraps a layer and reconstructs it by its name: a layer object
    registered under several names (``self.tail = nn.Sequential(act, self.fc)``) is refused,
    and so is a layer with hooks of its own (the wrapper would not run them)."""
    modules = dict(model.named_modules())
    hooked = [(n, kinds) for n in names if (kinds := forward_hooks(modules[n]))]
    if hooked:
        name, kinds = hooked[0]
        raise QroundError(f"layer {name!r} has a {' and a '.join(kinds)} of its own, which the "
                          "activation-quantised wrapper would not run (it computes the layer "
                          "itself): remove the hooks, register them on a parent module, or "
                          "leave the layer out with config.exclude"
                          + (f" ({len(hooked) - 1} more layers have hooks)"
                             if len(hooked) > 1 else ""))
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    aliased = [paths[id(modules[n])] for n in names if len(paths[id(modules[n])]) > 1]
    if aliased:
        raise QroundError(f"layer {aliased[0][0]!r} is registered under several names "
                          f"{aliased[0]}: activation quantisation and reconstruction need one "
                          "name per layer (weights alone work); register it once, or leave it "
                          "out with config.exclude")


def _untie(model: nn.Module, chosen: list[str], skipped: dict[str, str], called=None
           ) -> list[str]:
    """The chosen layers less those whose weight is shared (tied weights, e.g. a language-model
    head tied to the embedding): a weight is rounded once, by the first chosen layer holding it
    (the first one the forward calls, when ``called`` says which), and not at all when a module
    left in float holds it too.  The others go to ``skipped``."""
    modules = dict(model.named_modules())
    holders: dict[int, list[str]] = {}
    spans: dict[int, tuple[int, int, str]] = {}   # parameter -> its memory [start, end), a name
    for name, m in modules.items():
        for key, p in m._parameters.items():
            if p is None:
                continue
            p = conv1d_source(p)   # a Linear view's weight is its Conv1D's
            holders.setdefault(id(p), []).append(name)
            span = _memory_span(p)
            if span is not None:
                spans.setdefault(id(p), (*span, f"{name}.{key}" if name else key))
    for name in chosen:
        weight = conv1d_source(modules[name].weight)
        mine = spans.get(id(weight))
        if mine is None:
            continue
        other = next((n for i, (lo, hi, n) in spans.items()
                      if i != id(weight) and lo < mine[1] and mine[0] < hi), None)
        if other is not None:
            raise QroundError(f"the weight of layer {name!r} overlaps the memory of {other!r}, "
                              "another Parameter (tied through .data): writing one would "
                              "change the other, and a copy of the model may untie them; tie "
                              "them as one Parameter (b.weight = a.weight), or clone one")
    keep, owner = [], {}
    chosen_set = set(chosen)
    first = chosen if called is None else sorted(chosen, key=lambda n: n not in called)
    for name in first:
        weight = conv1d_source(modules[name].weight)
        others = [h for h in holders[id(weight)] if h != name]
        floats = [h for h in others if h not in chosen_set]
        if floats:
            skipped[name] = (f"shares its weight with {floats[0]!r}, which stays in float (tied "
                             "weights): left in float")
        elif id(weight) in owner:
            skipped[name] = (f"shares its weight with {owner[id(weight)]!r} (tied weights): "
                             "rounded once, there")
        else:
            owner[id(weight)] = name
            keep.append(name)
    return [n for n in chosen if n in keep]     # model order


def _memory_span(t: torch.Tensor) -> tuple[int, int] | None:
    """The bytes ``[start, end)`` a strided tensor's elements lie in; None for an empty, meta
    or sparse one."""
    if t.layout != torch.strided or t.is_meta or t.numel() == 0:
        return None
    start = t.data_ptr()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


def _trace(model: nn.Module, batch, forward: ForwardFn, names: list[str], index: int = 0,
           nonempty: set | None = None) -> list[_Layer]:
    """Run one batch with hooks: the chosen layers in call order, grouped by shared input.

    A layer reads the same input as an earlier one if its first input is the same tensor object
    at the same version (no in-place change in between).  Layers called more than once per
    forward stay alone.  Layers never called are left out.  ``nonempty``: a set that receives
    the layers called with a non-empty input at least once.
    """
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    owner: dict[str, str | None] = {}
    inputs: list[tuple[weakref.ref, int, str]] = []  # weak refs: nothing is kept alive
    unbatched: set[str] = set()

    def hook(name, module, args, out):
        calls[name] = calls.get(name, 0) + 1
        if nonempty is not None and args and isinstance(args[0], torch.Tensor) \
                and args[0].numel() > 0:
            nonempty.add(name)
        if calls[name] > 1:
            return
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None:   # the capture reads the first positional input: fail before any work
            raise QroundError(f"layer {name!r} was called without a tensor as first positional "
                              "input (called with a keyword, input=x?); qround reads a layer's "
                              "input from its first positional argument")
        owner[name] = None
        if x is not None and not isinstance(module, nn.Linear) and x.dim() == (
                3 if isinstance(module, nn.Conv2d) else 2):
            unbatched.add(name)
        if x is not None:
            # an inference tensor has no version counter: the same object is taken as the
            # same input (an in-place change inside torch.inference_mode would go unseen)
            version = None if x.is_inference() else x._version
            for ref, seen, other in inputs:
                if ref() is x and version == seen:
                    owner[name] = other
                    break
            else:
                inputs.append((weakref.ref(x), version, name))

    with eval_mode(model), torch.no_grad(), layer_hooks({n: modules[n] for n in names}, hook):
        _run_first(model, batch, forward, index)
    plan: dict[str, _Layer] = {}
    for name in owner:  # dicts keep insertion order: the order of first calls
        kind = _base(modules[name]).__name__
        layer = _Layer(name, kind, 0, name, calls[name], len(plan), name in unbatched)
        first = owner[name]
        if first is not None and calls[name] == 1 and calls[first] == 1:
            layer.group = plan[first].group
            geometry = _geometry(modules[name])
            layer.leader = next((o.name for o in plan.values() if o.group == layer.group
                                 and _geometry(modules[o.name]) == geometry), name)
        plan[name] = layer
    return list(plan.values())


class _InputKeys:
    """Which chosen layers read one input, batch by batch, from hooks on them (the first call
    of each per batch): a layer's key is the first layer that read the same tensor at the same
    version, as :func:`_trace` groups them."""

    def __init__(self):
        self.batches: list[tuple[dict[str, str], dict[str, int]]] = []

    def start(self) -> None:
        """A new batch."""
        self.inputs: list[tuple[weakref.ref, Any, str]] = []
        self.key: dict[str, str] = {}
        self.calls: dict[str, int] = {}
        self.batches.append((self.key, self.calls))

    def see(self, name: str, args) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] > 1:
            return
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.key[name] = name
        if x is None:
            return
        version = None if x.is_inference() else x._version
        for ref, seen, other in self.inputs:
            if ref() is x and version == seen:
                self.key[name] = self.key[other]
                return
        self.inputs.append((weakref.ref(x), version, name))

    def unshare(self, plan: list[_Layer]) -> list[str]:
        """Make every follower whose leader reads another input on some batch (or is called
        another number of times there) its own leader; their names."""
        broken = []
        for x in plan:
            if x.leader == x.name:
                continue
            for key, calls in self.batches:
                n, m = calls.get(x.name, 0), calls.get(x.leader, 0)
                if n != m or n > 1 or (n == 1 and key[x.name] != key[x.leader]):
                    broken.append(x.name)
                    x.leader = x.name
                    break
        if broken:
            log.debug("layers %s read their leader's input on the first batch but not on "
                      "every batch: captured on their own", broken)
        return broken


def _add_late(model: nn.Module, calibration, forward: ForwardFn, names: list[str],
              plan: list[_Layer]) -> list[_Layer]:
    """The plan of the first batch completed from the later ones, each traced (one forward)
    when the first batch does not call every chosen layer.

    - A layer the first batch did not call but a later one does (an expert of a mixture that
      no row of the first batch was routed to) joins with ``calls=0``: its capture passes run
      whole (``varies``).
    - The order is every batch's call order merged (:func:`qround._orders.merge_orders`): a
      late layer comes after the layers it follows on the batches that call it.
    - Groups (layers reading one input: the first group's members get the first layer's
      bits) hold layers that read one input on some batch and another on none; a layer
      shares its leader's capture only when it reads the leader's input on every batch (it
      is called on the same batches), else it is its own leader."""
    names_in = {x.name for x in plan}
    if all(n in names_in for n in names):
        return plan   # a follower's sharing is checked on every batch by the first capture
    traces = [plan]
    # a list's batch 0 is the traced first batch; another iterable's may be another batch (a
    # shuffling DataLoader), which may be the only one to call a late layer: traced too
    again = not isinstance(calibration, (list, tuple))
    for j, batch in enumerate(calibration):
        if j > 0 or again:
            traces.append(_trace(model, batch, forward, names, j))
    order = merge_orders([[x.name for x in t] for t in traces])
    # per layer and batch: the first layer of its input group there, or None (not called)
    keys: dict[str, list[str | None]] = {n: [None] * len(traces) for n in order}
    for t, trace in enumerate(traces):
        first_of: dict[int, str] = {}
        for x in trace:
            keys[x.name][t] = first_of.setdefault(x.group, x.name)
    by_name = {x.name: x for x in plan}
    for trace in traces[1:]:
        for x in trace:
            if x.name not in by_name:   # late: its first trace's kind and input rank
                by_name[x.name] = _Layer(x.name, x.kind, 0, x.name, 0, -1, x.unbatched,
                                         varies=True)
    modules = dict(model.named_modules())
    groups: list[list[str]] = []
    near: dict[tuple[int, str], list[int]] = {}   # (batch, input) -> groups reading it there
    for name in order:
        mine = keys[name]

        def fits(g):    # never another input where both are called
            return all(a is None or b is None or a == b for m in groups[g]
                       for a, b in zip(mine, keys[m]))
        # a group reading this layer's input on some batch
        candidates = sorted({g for t, key in enumerate(mine) if key is not None
                             for g in near.get((t, key), ())})
        g = next((g for g in candidates if fits(g)), None)
        if g is None:
            g = len(groups)
            groups.append([])
        groups[g].append(name)
        for t, key in enumerate(mine):
            if key is not None and g not in near.setdefault((t, key), []):
                near[(t, key)].append(g)
    group_of = {n: i for i, g in enumerate(groups) for n in g}
    out = []
    for name in order:
        layer = by_name[name]
        layer.group = group_of[name]
        geometry = _geometry(modules[name])
        layer.leader = next((m for m in groups[layer.group] if keys[m] == keys[name]
                             and _geometry(modules[m]) == geometry), name)
        out.append(layer)
    return out


def _units(plan: list[_Layer], modules: dict[str, nn.Module], config: QuantConfig
           ) -> list[list[_Layer]]:
    """Layers grouped by capture pass: one group of shared input per pass when asymmetric (each
    depends on the layers before it), else consecutive groups packed within a memory bound."""
    groups: dict[int, list[_Layer]] = {}
    for layer in plan:
        groups.setdefault(layer.group, []).append(layer)
    if config.inputs != "float":  # each group's inputs depend on the groups before it
        return list(groups.values())

    def size(group):
        if config.statistics == "fisher":
            return sum(fisher_bytes(modules[x.name]) for x in group)
        return sum(_stat_bytes(modules[x.name]) for x in group if x.leader == x.name)

    budget = config.fisher_budget_mb * 2 ** 20 if config.statistics == "fisher" else _PASS_BYTES
    units, current, used = [], [], 0
    for group in groups.values():
        if current and used + size(group) > budget:
            units.append(current)
            current, used = [], 0
        current += group
        used += size(group)
    return units + [current]


def _stat_bytes(module: nn.Module) -> int:
    n = layer_weight(module).shape[1]
    groups = 1 if isinstance(module, nn.Linear) else module.groups
    return groups * n * n * 8


# ---------------------------------------------------------------------------------- capture
class _Sums:
    """Streamed sums of one layer input: second moments (optional) and means of x_hat and x."""

    def __init__(self, module: nn.Module, device, second: bool):
        self.module, self.device, self.second = module, device, second
        self.h_hat, self.cross, self.h = _Moment(), _Moment(), _Moment()
        self.sum_hat = self.sum_x = None
        self.rows = 0
        self.paired = False

    def add(self, x_hat: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Layer inputs of one call: x_hat from the quantised copy, x from the float model
        (None when the two are the same)."""
        self.paired = x is not None
        for rows in _chunks(self.module, x_hat):
            v_hat = _vectors(self.module, x_hat[rows], self.device)
            v = v_hat if x is None else _vectors(self.module, x[rows], self.device)
            if self.second:
                self.h_hat.add(v_hat, v_hat)
                if x is not None:
                    self.cross.add(v_hat, v)
                    self.h.add(v, v)
            s_hat, s = v_hat.sum(1), v.sum(1)
            self.sum_hat = s_hat if self.sum_hat is None else self.sum_hat + s_hat
            self.sum_x = s if self.sum_x is None else self.sum_x + s
            self.rows += v_hat.shape[1]

    def result(self, name: str) -> dict[str, Any] | None:
        """hessian (H_hat, or H when unpaired), cross / float_hessian (None when unpaired),
        mean_x, mean_xhat (groups, n); None when the layer was only ever called with empty
        inputs (an expert no token was routed to)."""
        if self.rows == 0:
            return None
        out = {"mean_x": (self.sum_x / self.rows).cpu().numpy(),
               "mean_xhat": (self.sum_hat / self.rows).cpu().numpy(),
               "hessian": None, "cross": None, "float_hessian": None}
        if self.second:
            out["hessian"] = self.h_hat.mean(name, symmetric=True)
            if self.paired:
                out["cross"] = self.cross.mean(name, symmetric=False)
                out["float_hessian"] = self.h.mean(name, symmetric=True)
        return out


def _mark_varying(model: nn.Module, calibration, forward: ForwardFn, plan: list[_Layer]) -> None:
    """Set ``varies`` on the plan's layers that the forward calls another number of times on
    some calibration batch than on the first (a loop over a sequence's length, an expert
    reached once or twice): their capture passes must run whole (:func:`_run_until`); and
    make a follower whose leader reads another input on some batch its own leader.  One
    forward of every batch, with hooks on the plan's layers."""
    modules = dict(model.named_modules())
    want = {x.name: modules[x.name] for x in plan}
    first = {x.name: x.calls for x in plan}
    keys = _InputKeys()
    varies: set[str] = set()

    def hook(name, module, args, out):
        keys.see(name, args)

    with eval_mode(model), torch.no_grad(), layer_hooks(want, hook):
        for batch in calibration:
            keys.start()
            forward(model, batch)
            varies |= {n for n in want if keys.calls.get(n, 0) != first[n]}
    for x in plan:
        x.varies = x.name in varies
    keys.unshare(plan)


def _run_until(model, batch, forward, modules: dict[str, nn.Module], hook,
               calls: dict[str, int], whole: bool = False) -> None:
    """One forward with ``hook`` on ``modules``, stopped once each has run ``calls[name]`` times
    (the calls of the first batch).  A module called more than once per batch (a cell of a
    loop, a layer shared across positions) may be called another number of times on another
    batch (a longer sequence): then the forward runs whole, every call counted, and so it does
    with ``whole`` (a module whose count varied between batches, :func:`_mark_varying`)."""
    if whole or any(v > 1 for v in calls.values()):
        with layer_hooks(modules, hook):
            forward(model, batch)
        return
    left = dict(calls)

    def counted(name, module, args, out):
        if all(v <= 0 for v in left.values()):  # the stop was swallowed after all: stop again
            raise _StopForward
        hook(name, module, args, out)
        left[name] -= 1
        if all(v <= 0 for v in left.values()):
            raise _StopForward

    # before each call: the pass stops ahead of the last one's own forward, whose output
    # nothing reads
    with layer_hooks(modules, counted, pre=True):
        try:
            forward(model, batch)
        except _StopForward:
            pass


def _stream(leaders: list[_Layer], float_model: nn.Module, quant_model: nn.Module | None,
            calibration: Iterable, forward: ForwardFn, device, second: bool,
            caches: dict[int, PrefixCache] | None = None, before: int = 0,
            plan: list[_Layer] | None = None) -> dict[str, dict[str, Any]]:
    """Statistics of the leaders' inputs, streamed batch by batch.

    quant_model None: inputs from ``float_model`` only (x_hat = x).  Otherwise each batch runs
    the float model (holding this batch's inputs of the leaders) and then the quantised copy.
    caches: a PrefixCache per model (by id), prepared for a pass whose first layer starts at
    event ``before``; models without one run whole.  plan (the first capture, unpaired): its
    forwards run whole and count every plan layer's calls per batch, setting ``varies``
    (:func:`_mark_varying`'s work, without a pass of its own), and make a follower whose
    leader reads another input on some batch its own leader (:meth:`_InputKeys.unshare`):
    the caller captures it.
    """
    f_mods = dict(float_model.named_modules())
    f_mods = {x.name: f_mods[x.name] for x in leaders}
    calls = {x.name: x.calls for x in leaders}
    whole = any(x.varies for x in leaders)
    sums = {n: _Sums(m, device, second) for n, m in f_mods.items()}
    pending: dict[str, list[torch.Tensor]] = {}

    def single(name, module, args, out):
        sums[name].add(_layer_input(name, module, args))

    def store(name, module, args, out):
        # a copy: it is read after the float forward, which may change the tensor in place
        # later (h += f(h) around a layer called more than once) and so rewrite a view of it
        pending[name].append(_layer_input(name, module, args).clone())

    def pair(name, module, args, out):
        x_hat = _layer_input(name, module, args)
        if not pending[name]:
            raise QroundError(f"layer {name!r} ran more often in the quantised copy than in the "
                              "float model: is the forward deterministic?")
        x = pending[name].pop(0)
        if x.shape != x_hat.shape:
            raise QroundError(f"layer {name!r}: float input {tuple(x.shape)} and quantised input "
                              f"{tuple(x_hat.shape)} differ in shape")
        sums[name].add(x_hat, x)

    off = disabled()
    f_cache = (caches or {}).get(id(float_model), off)
    q_cache = off if quant_model is None else (caches or {}).get(id(quant_model), off)
    for cache in {id(f_cache): f_cache, id(q_cache): q_cache}.values():
        cache.prepare(before)
    with eval_mode(float_model), torch.no_grad():
        if quant_model is None:
            counting = contextlib.ExitStack()
            keys = _InputKeys()
            varies: set[str] = set()
            if plan is not None:
                every = dict(float_model.named_modules())
                counting.enter_context(layer_hooks(
                    {x.name: every[x.name] for x in plan},
                    lambda name, module, args, out: keys.see(name, args)))
            with counting:
                for j, batch in enumerate(calibration):
                    keys.start()
                    with f_cache.batch(j, batch):
                        _run_until(float_model, batch, forward, f_mods, single, calls,
                                   whole or plan is not None)
                    if plan is not None:
                        varies |= {x.name for x in plan
                                   if keys.calls.get(x.name, 0) != x.calls}
            for x in plan or ():
                x.varies = x.name in varies
            if plan is not None:
                keys.unshare(plan)   # the caller captures those now leading on their own
        else:
            q_mods = dict(quant_model.named_modules())
            q_mods = {n: q_mods[n] for n in f_mods}
            with eval_mode(quant_model):
                for j, batch in enumerate(calibration):
                    pending.update({n: [] for n in f_mods})
                    with f_cache.batch(j, batch):
                        _run_until(float_model, batch, forward, f_mods, store, calls, whole)
                    with q_cache.batch(j, batch):
                        _run_until(quant_model, batch, forward, q_mods, pair, calls, whole)
        pending.clear()
    for cache in {id(f_cache): f_cache, id(q_cache): q_cache}.values():
        cache.finish()
    return {n: s.result(n) for n, s in sums.items()}


def _capture(unit: list[_Layer], float_model, quant_model, paired: bool, calibration, forward,
             loss_fn, config: QuantConfig, caches: dict[int, PrefixCache] | None = None,
             before: int = 0, plan: list[_Layer] | None = None) -> dict[str, dict[str, Any]]:
    """Statistics of every layer of a capture unit; followers share their leader's.  plan: for
    the first unit, every layer's calls are counted on the way (:func:`_stream`)."""
    device = torch.device(config.device)
    leaders = [x for x in unit if x.leader == x.name]
    source = float_model if config.inputs == "float" else quant_model
    second = config.statistics == "covariance"
    need_means = second or config.bias_correction
    stats = {}
    if need_means:
        stats = _stream(leaders, float_model if paired else source,
                        quant_model if paired else None, calibration, forward, device, second,
                        caches, before, None if paired else plan)
        # followers that the first capture found reading another input on some batch
        alone = [x for x in unit if x.leader == x.name and x.name not in stats]
        if alone:
            stats.update(_stream(alone, float_model if paired else source,
                                 quant_model if paired else None, calibration, forward, device,
                                 second, caches, before))
    out = {x.name: (None if need_means and stats[x.leader] is None
                    else dict(stats.get(x.leader, {}))) for x in unit}
    wanted = [x.name for x in unit if out[x.name] is not None]
    if not second and wanted:
        # per-channel Fisher blocks of the layers' actual inputs (the copy when asymmetric)
        fisher = _capture_fisher(source, calibration, loss_fn, wanted,
                                 config.fisher_budget_mb, forward, device)
        for name, h in fisher.items():
            if h is None:
                out[name] = None          # only empty inputs: left in float by the caller
            else:
                out[name].update(hessian=h, cross=None, float_hessian=None)
    return out


# ---------------------------------------------------------------------------------- solve
def _blend_target(stats: dict, alpha: float) -> dict:
    """Statistics of the target ``W x_a`` with ``x_a = x_hat + alpha (x - x_hat)``: the
    asymmetric objective corrects a share ``alpha`` of the earlier layers' error (1: all of it,
    AdaRound eq. 25; 0: none, the quantized-input objective).  ``cross`` becomes
    ``E[x_hat x_a^T]`` and ``float_hessian`` ``E[x_a x_a^T]``."""
    if stats["cross"] is None or alpha == 1.0:
        return stats
    h, c, hf = stats["hessian"], stats["cross"], stats["float_hessian"]
    d_cross = c - h                                  # E[x_hat d^T], d = x - x_hat
    d_d = hf - c - np.swapaxes(c, -1, -2) + h        # E[d d^T]
    return {**stats, "cross": h + alpha * d_cross,
            "float_hessian": h + alpha * (d_cross + np.swapaxes(d_cross, -1, -2))
            + alpha * alpha * d_d}


def _centered(stats: dict, alpha: float) -> dict:
    """Statistics of the error that remains after bias correction: covariances in place of
    second moments.

    With target input ``x_t = x_hat + alpha (x - x_hat)`` (``x_t = x_hat`` unpaired) the layer
    error is ``e = W x_t - W_hat x_hat``, and :func:`_correct_bias` removes its mean, leaving
    ``E||e - E e||^2``.  That is the same objective with ``H_hat - mu_hat mu_hat^T``, ``C -
    mu_hat mu_t^T`` and ``H_t - mu_t mu_t^T``, so the solver spends nothing on the mean error,
    which the bias absorbs exactly.  Expects :func:`_blend_target`'s output; means (groups, n).
    """
    h = stats["hessian"]
    mu_hat = stats["mean_xhat"]

    def outer(a, b):
        o = np.einsum("gi,gj->gij", a, b)
        return o[0] if h.ndim == 2 else o

    out = {**stats, "hessian": _covariance(h, outer(mu_hat, mu_hat))}
    if stats["cross"] is not None:
        mu_t = mu_hat + alpha * (stats["mean_x"] - mu_hat)
        out["cross"] = stats["cross"] - outer(mu_hat, mu_t)
        out["float_hessian"] = _covariance(stats["float_hessian"], outer(mu_t, mu_t))
    return out


def _covariance(second: np.ndarray, mean_outer: np.ndarray) -> np.ndarray:
    """``second - mean_outer`` per matrix, with a matrix left as round-off of the subtraction
    (inputs constant over the calibration data: a padding-free grouped conv on a constant
    plane, a saturated ReLU6) set to exact zeros: its small negative eigenvalues would fail
    the PSD check against its own tiny scale, and a constant input's error is all mean, which
    the bias takes."""
    c = second - mean_outer
    scale = np.max(np.abs(second), axis=(-2, -1), keepdims=True)
    tiny = np.max(np.abs(c), axis=(-2, -1), keepdims=True) <= 1e-9 * scale
    return np.where(tiny, 0.0, c)


def _solve_layer(layer: _Layer, module: nn.Module, stats: dict, solver: Solver,
                 config: QuantConfig):
    """Problems of one layer, solved: (QuantizedWeight, cost, rtn_cost, seconds, cost_noise)."""
    stats = _blend_target(stats, config.correction)
    if config.bias_correction and config.statistics == "covariance":
        stats = _centered(stats, config.correction)
    rng = np.random.default_rng([config.seed, zlib.crc32(layer.name.encode())])
    try:
        problems = problems_from_layer(module, stats["hessian"],
                                       config.grid_spec(layer.bits, layer.name), layer.name,
                                       cross=stats["cross"], float_hessian=stats["float_hessian"],
                                       damp=config.layer_options(layer.name)["damp"],
                                       merge_groups="auto")
        if config.refits:
            pairs = [solve_refitting(p, solver, rounds=config.refits, seed=rng) for p in problems]
            problems = [p for p, _ in pairs]
            solutions = [s for _, s in pairs]
        else:
            solutions = [solver.solve(p, seed=rng) for p in problems]
    except QroundError as exc:
        raise QroundError(f"layer {layer.name!r}: {exc}") from exc
    except (np.linalg.LinAlgError, torch.linalg.LinAlgError) as exc:   # a factorisation failed
        raise QroundError(f"layer {layer.name!r}: solver {solver.label!r} failed ({exc}); use more "
                          "calibration batches (a better conditioned H), more damping (e.g. "
                          "solver=GPTQ(damp=0.1)), or a solver without a factorisation such as "
                          "'greedy'") from exc
    for p, s in zip(problems, solutions):
        log.debug("%s: %s ratio %.4f in %.3f s %s", p.name, s.solver, s.ratio, s.seconds, s.info)
    rtn = sum(s.total_rtn_cost for s in solutions)
    seconds = sum(s.seconds for s in solutions)
    noise = sum(s.cost_noise for s in solutions)
    if not config.widen:
        qweight = quantized_weight(problems, solutions, module)
        return qweight, sum(s.total_cost for s in solutions), rtn, seconds, noise
    t0 = time.perf_counter()
    results = [grid_descent(p, s.codes) for p, s in zip(problems, solutions)]
    seconds += time.perf_counter() - t0
    for p, r in zip(problems, results):
        log.debug("%s: widened %.6g -> %.6g, %d codes beyond floor/ceil", p.name,
                  r.start_cost.sum(), r.cost.sum(), r.beyond)
        if r.stopped.any():
            log.warning("%s: widening stopped at its move bound in %d channels, before a local "
                        "minimum", p.name, int(r.stopped.sum()))
    qweight = weight_from_codes(problems, [r.codes for r in results], module)
    return qweight, float(sum(r.cost.sum() for r in results)), rtn, seconds, noise


def _correct_bias(module: nn.Module, weight: np.ndarray, qweight: QuantizedWeight,
                  stats: dict, alpha: float) -> None:
    """Add the mean of the error the solver minimised, ``E[W x_t] - E[W_hat x_hat]``, to the
    layer's bias (Nagel et al. 2019), so that this error has mean zero on the calibration data.

    ``x_t`` is the solver's target input: ``x_hat`` for ``inputs="quantized"`` (the layer's own
    rounding error, ``(W - W_hat) E[x_hat]``), ``x`` for ``"float"`` (``x_hat = x`` there), and
    ``x_hat + alpha (x - x_hat)`` for ``"asymmetric"`` with ``correction=alpha``.  Matching the
    objective matters: on MiniLM, zeroing the mean of the whole error (earlier layers' included)
    at every layer, with quantised-input statistics, wrecks the model, while zeroing each
    layer's own error helps (BENCHMARKS.md, section 2, "Bias correction").  With covariance
    statistics the solver has already minimised the error that remains after this step
    (:func:`_centered`).

    weight (out, n) float; means (groups, n) of the inputs.  A layer without bias gets one.
    """
    w_hat = qweight.dequantized.reshape(weight.shape)
    groups = stats["mean_x"].shape[0]
    out_g = weight.shape[0] // groups
    target = stats["mean_xhat"] + alpha * (stats["mean_x"] - stats["mean_xhat"])
    corr = np.concatenate([weight[j * out_g:(j + 1) * out_g] @ target[j]
                           - w_hat[j * out_g:(j + 1) * out_g] @ stats["mean_xhat"][j]
                           for j in range(groups)])
    w = module.weight
    with torch.no_grad():
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                       requires_grad=w.requires_grad)
        module.bias.add_(torch.as_tensor(corr, dtype=module.bias.dtype, device=w.device))


def _build_solver(config: QuantConfig, solver=None) -> Solver:
    solver = config.solver if solver is None else solver
    if isinstance(solver, str):  # built here, so ours to place on config.device
        return get_solver(solver, device=config.device)
    return solver


def _build_solvers(config: QuantConfig) -> dict[str | None, Solver]:
    """The solver of every ``overrides`` pattern (its own, or the config's), and of the layers
    no pattern matches (key None)."""
    default = _build_solver(config)
    return {None: default, **{pattern: _build_solver(config, options["solver"])
                              if "solver" in options else default
                              for pattern, options in config.overrides or ()}}


def check_group_sizes(modules: dict, names, config: "QuantConfig") -> None:
    """Every chosen layer's ``group_size`` (the config's, or its override's) divides its inputs
    (or covers them all); else a QroundError naming the layers, before any work."""
    bad = []
    for name in names:
        n = layer_weight(modules[name]).shape[1]
        group_size = config.layer_options(name)["group_size"]
        if group_size is not None and group_size < n and n % group_size:
            bad.append((name, n, group_size))
    if not bad:
        return
    name, n, group_size = bad[0]
    source = config.override(name)[0]
    where = (f" (from overrides[{source!r}])"
             if source is not None and "group_size" in config.override(name)[1] else "")
    names = [m for m, _, _ in bad]   # one pattern for them all: one override fixes the run
    pattern = ("^" + re.escape(name) + "$" if len(names) == 1 else
               "^(?:" + "|".join(re.escape(m) for m in names) + ")$")
    more = "" if len(bad) == 1 else (
        f"; nor those of {len(bad) - 1} more: " + ", ".join(f"{m!r} ({k})" for m, k, _ in bad[1:4])
        + (f" and {len(bad) - 4} others" if len(bad) > 4 else ""))
    raise QroundError(f"group_size={group_size}{where} does not divide the {n} inputs of layer "
                      f"{name!r}{more}. Give them a size that divides their inputs, or one "
                      f"scale per channel, with overrides (e.g. overrides=[({pattern!r}, "
                      f"{{'group_size': None}})]; shell: --override {shlex.quote(pattern)} "
                      "group_size=none)")


def _check_overrides_match(config: QuantConfig, names: list[str],
                           skipped: Mapping[str, str] | None = None) -> None:
    """Every ``overrides`` pattern matches a layer being quantised, and is the first to match
    at least one (a pattern shadowed by earlier ones would never apply).  ``skipped``: the
    layers left in float and why, named where a pattern matches only those."""
    for pattern, _ in config.overrides or ():
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            floats = [(n, why) for n, why in (skipped or {}).items() if re.search(pattern, n)]
            raise QroundError(f"overrides[{pattern!r}] matches none of the {len(names)} layers "
                              f"being quantised; their names look like {names[:3]}"
                              + (f"; it matches {floats[0][0]!r}, which stays in float: "
                                 f"{floats[0][1]}" if floats else ""))
        if not any(config.override(n)[0] == pattern for n in hits):
            raise QroundError(f"overrides[{pattern!r}] never applies: every layer it matches "
                              f"({hits[:3]}) is matched by an earlier pattern first (the first "
                              "match wins)")


def _plan_and_caches(qmodel: nn.Module, float_model: nn.Module, first_batch, forward: ForwardFn,
                     names: list[str], config: QuantConfig
                     ) -> tuple[list[_Layer], dict[int, PrefixCache], dict[str, int]]:
    """The layer plan (:func:`_trace`), capture caches for the quantised copy and the float
    model (qround.prefix_cache; each within ``capture_cache_mb``, none when it is 0), and the
    start event of every module's first call, all from one forward of the first batch."""
    if config.capture_cache_mb == 0:
        return _trace(qmodel, first_batch, forward, names), {}, {}
    plan = []
    spans, starts = trace_spans(qmodel, lambda: plan.extend(_trace(qmodel, first_batch,
                                                                   forward, names)))
    budget = budget_bytes(config.capture_cache_mb)
    caches = {id(m): PrefixCache(m, spans, budget, [x.name for x in plan], starts)
              for m in (qmodel, float_model)}
    return plan, caches, starts


def _check_calibration(calibration) -> Any:
    """The first batch; QroundError for a tensor, a one-shot iterator, or no batch."""
    if isinstance(calibration, (torch.Tensor, np.ndarray, Mapping, str, bytes)):
        raise QroundError(f"calibration must be a list of batches, got one "
                          f"{type(calibration).__name__}; wrap a single batch in a list")
    try:
        it = iter(calibration)
    except TypeError:
        raise QroundError(f"calibration must be an iterable of batches, got "
                          f"{type(calibration).__name__}") from None
    if it is calibration:
        raise QroundError("calibration must be re-iterable (a list or DataLoader): it is read "
                          "once per capture pass, and a one-shot iterator would run dry")
    first = next(it, _StopForward)
    if first is _StopForward:
        raise QroundError("calibration is empty: it yielded no batch")
    return first


class _SamePasses:
    """A calibration that is not a list or tuple, read pass after pass: a full pass that yields
    another number of batches than the first (a DataLoader over a one-shot stream yields none
    the second time) is an error that says so, not a layer that "saw no inputs"."""

    def __init__(self, calibration):
        self.calibration, self.batches = calibration, None

    def __iter__(self):
        n = 0
        for batch in self.calibration:
            n += 1
            yield batch
        if self.batches is None:
            self.batches = n
        elif n != self.batches:
            raise QroundError(f"calibration yielded {n} batches on this pass and "
                              f"{self.batches} on the first full one: it is read once per "
                              "capture pass and must yield the same batches each time (a list, "
                              "or a DataLoader over a map-style dataset; a one-shot stream "
                              "runs dry, after losing the batch first read to check it)")


def same_passes(calibration):
    """``calibration`` itself when it is a list or tuple, else :class:`_SamePasses` over it."""
    return calibration if isinstance(calibration, (list, tuple)) else _SamePasses(calibration)


# ---------------------------------------------------------------------------------- pipeline
@gathering
def quantize_model(model: nn.Module, calibration: Iterable, config: QuantConfig = QuantConfig(),
                   *, forward: ForwardFn | None = None,
                   loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                   inplace: bool = False) -> QuantizedModel:
    """Quantise every chosen nn.Linear / nn.Conv2d / nn.Conv1d of ``model`` (and transformers'
    Conv1D, as the nn.Linear it equals), sequentially in forward order.

    calibration: a re-iterable collection of batches; ``forward(model, batch)`` runs one
    (default ``model(batch)`` / ``model(**batch)`` / ``model(*batch)``).  ``loss_fn(output,
    batch)``: scalar loss, for ``statistics="fisher"``.  The float model is not modified unless
    ``inplace=True`` (then a float copy is kept while running, and a failure halfway leaves it
    partly quantised, with its own Conv1D layers and its buffers' values back).  Returns the
    quantised model, codes per layer and the per-layer report.

    With the activation stage (``config.abits`` or ``config.reconstruction``), the returned
    model is a new module whose quantised layers are :class:`~qround.activations.
    QuantizedLayer` wrappers (``inplace=True`` then writes the final codes, after
    reconstruction, into the given model's weights, and the wrappers live in the returned model
    only); the report's costs are the solver's, and
    ``layers`` holds the final codes after reconstruction.
    """
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise QroundError(f"config must be a QuantConfig, got {type(config).__name__}")
    undo: list = []
    with _own_rng(config, model):
        try:
            return _quantize_model(model, calibration, config, forward, loss_fn, inplace, undo)
        except BaseException:
            for step in reversed(undo):   # inplace: the given model's own Conv1D layers back
                step()
            raise


@contextmanager
def _own_rng(config: QuantConfig, model: nn.Module, keep_buffers: bool = True):
    """:func:`qround.calibrate.own_rng` with ``config``'s seed and device."""
    with own_rng(config.seed, model, config.device, keep_buffers):
        yield


def _samples(batch) -> int | None:
    """The number of samples of a batch: the first dimension of its tensor, of the first tensor
    of a tuple/list, or of a dict's ``input_ids`` (else its first tensor); None if unknown."""
    if isinstance(batch, Mapping):
        values = [batch["input_ids"]] if "input_ids" in batch else list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        values = [batch]
    first = next((v for v in values if isinstance(v, torch.Tensor) and v.ndim >= 1), None)
    return None if first is None else int(first.shape[0])


def _check_no_empty_batch(calibration) -> None:
    """The activation stage (steps, borders, reconstruction) averages over every batch's
    samples: a batch of none is refused before any work (the weight stage just skips it)."""
    empty = [i for i, b in enumerate(calibration) if _samples(b) == 0]
    if empty:
        raise QroundError(f"calibration batch {empty[0]} holds no samples (its first dimension "
                          "is 0): drop it; activation quantisation and reconstruction average "
                          "over every batch's samples")


def _quantize_model(model, calibration, config, forward, loss_fn, inplace, undo: list
                    ) -> QuantizedModel:
    """:func:`quantize_model` inside :func:`_own_rng`; ``undo`` receives what a failure must
    undo in the given model (its Conv1D layers, swapped for Linear views when ``inplace``)."""
    t_start = time.perf_counter()
    forward = forward or default_forward
    first_batch = _check_calibration(calibration)
    if config.activation_stage and isinstance(calibration, (list, tuple)):
        _check_no_empty_batch(calibration)
    calibration = same_passes(calibration)
    if config.statistics == "fisher" and loss_fn is None:
        raise QroundError("statistics='fisher' needs loss_fn(output, batch) -> scalar loss")
    if config.statistics == "fisher" and isinstance(calibration, (list, tuple)):
        sizes = sorted({n for n in map(_samples, calibration) if n is not None})
        if len(sizes) > 1:
            log.warning("statistics='fisher': the calibration batches hold %d to %d samples; if "
                        "loss_fn is mean-reduced, the samples of a smaller batch weigh more (the "
                        "Fisher blocks add squared gradients): use a sum-reduced loss, e.g. "
                        "reduction='sum' (nothing to do if yours is; this is not checked)",
                        sizes[0], sizes[-1])
    if loss_fn is not None and config.statistics != "fisher":
        log.warning("loss_fn is only used with statistics='fisher'; ignoring it")
    # transformers' Conv1D layers (GPT-2) are rounded as the nn.Linear they equal: every check
    # and the float model's captures read a view with Linear layers over the same tensors
    target = model
    source = fingerprint(target)   # before any forward (which may write buffers) or write
    folded = None
    if config.fold_batchnorm:   # the given model's fingerprint: export.load folds it again
        target, folded = fold_with_pairs(model, inplace, first_batch, forward)
        model = target
    convert, conv_skipped = _conv1d_selection(model, config, first_batch, forward, calibration)
    model, _ = linear_view(model, names=convert)
    names, skipped = _select(model, config, float_conv1d=conv_skipped)
    skipped.update(conv_skipped)
    _check_names(model, names, config, skipped)
    solvers = _build_solvers(config)
    _check_no_kv_cache(model, config, first_batch, forward)

    float_model = copy_module(model) if inplace else model
    # the layers being rounded are Linear views of the Conv1D weights (written through), and
    # get their Conv1D back at the end
    qmodel, replaced = linearize_conv1d(target if inplace else copy_module(target), share=True,
                                        names=convert)
    if inplace:
        undo.append(lambda: restore_conv1d(qmodel, replaced))
    # the copy's buffers that the calibration forwards write (a counter, an average) get the
    # float model's values back after the weight stage, as the float model's do
    restore = contextlib.ExitStack()
    restore.enter_context(kept_buffers(qmodel))
    bar = caches = None   # a failure in the planning below closes ``restore`` too: left
    # open, its generator would write the buffers back whenever the traceback is freed
    try:
        # the plan's traced forward also gives every module's span for the capture caches
        plan, caches, starts = _plan_and_caches(qmodel, float_model, first_batch, forward, names,
                                                config)
        called = {x.name for x in plan}
        again = _reselect(model, qmodel, config, conv_skipped, calibration, forward, names,
                          called)
        if again is not None:
            names, skipped = again
            _check_names(model, names, config, skipped)
            plan, caches, starts = _plan_and_caches(qmodel, float_model, first_batch, forward,
                                                    names, config)
            called = {x.name for x in plan}
        plan = _add_late(qmodel, calibration, forward, names, plan)
        called = {x.name for x in plan}
        for name in names:
            if name in skipped:
                continue
            if name not in called:
                skipped[name] = ("never called by the forward on any calibration batch (its "
                                 "weight may be used directly by its parent module): left in "
                                 "float")
        if not plan:
            raise QroundError("none of the chosen layers is called by the forward on any "
                              "calibration batch")
        unbatched = next((x.name for x in plan if x.unbatched), None)
        if config.reconstruction is not None and unbatched is not None:
            raise QroundError(f"conv layer {unbatched!r} received an unbatched input (no batch "
                              "axis: (C, H, W), or (C, L) for a Conv1d): "
                              "block reconstruction draws its mini-batches along the first "
                              "axis, which would be channels; give the conv batched (N, C, H, "
                              "W) inputs (e.g. calibration batches with a leading batch axis, "
                              "x.unsqueeze(0))")
        if config.reconstruction is not None:
            # ...and again on the layers the forward calls (fewer units: k may not fit any more),
            # with one forward that checks a scheme's units are consecutive and connected, or
            # that the blocks found by name are called, and one forward per batch that checks the
            # units' cached data fit cache_mb (before the solves, not after them)
            check_units(model, [x.name for x in plan], config, batch=first_batch, forward=forward,
                        calibration=calibration)
        for i, layer in enumerate(plan):
            # the first layer (with every layer that reads its input: q, k and v) and the last one
            ends = layer.group == plan[0].group or i == len(plan) - 1
            layer.bits = config.layer_bits(layer.name, ends)
        q_modules = dict(qmodel.named_modules())

        layers: dict[str, QuantizedWeight] = {}
        report: list[LayerReport] = []
        new_biases: list[str] = []   # layers bias correction gave their first bias
        done = 0
        bar = tqdm(total=len(plan), desc="quantize", unit="layer", disable=not config.progress)
        for unit in _units(plan, q_modules, config):
            t0 = time.perf_counter()
            # before any write-back x_hat == x
            paired = done > 0 and config.inputs == "asymmetric"
            stats = _capture(unit, float_model, qmodel, paired, calibration, forward, loss_fn,
                             config, caches, min(starts.get(x.name, 0) for x in unit),
                             plan=plan if done == 0 else None)
            capture_share = (time.perf_counter() - t0) / len(unit)
            for layer in unit:
                bar.set_postfix_str(layer.name)
                if stats[layer.name] is None:
                    skipped[layer.name] = ("called only with empty inputs during calibration "
                                           "(an expert no token was routed to?): no statistics "
                                           "to round it by, left in float")
                    log.warning("layer %s: %s", layer.name, skipped[layer.name])
                    bar.update(1)
                    continue
                module = q_modules[layer.name]
                weight = layer_weight(module)
                solver = solvers[config.override(layer.name)[0]]
                qweight, cost, rtn, seconds, noise = _solve_layer(
                    layer, module, stats[layer.name], solver, config)
                apply_to_layer(module, qweight, inplace=True)
                if config.bias_correction:
                    if module.bias is None:
                        new_biases.append(layer.name)
                    _correct_bias(module, weight, qweight, stats[layer.name], config.correction)
                layers[layer.name] = qweight
                label = (f"{solver.label} ({config.refits} refits)" if config.refits
                         else solver.label) + (" + widen" if config.widen else "")
                kind = "Conv1D" if layer.name in replaced else layer.kind
                row = LayerReport(layer.name, kind, tuple(weight.shape), layer.bits,
                                  label, cost, rtn, cost_ratio(cost, rtn, noise),
                                  seconds, capture_share, noise)
                report.append(row)
                log.info("%s: %d-bit %s, cost %.4g vs RTN %.4g (ratio %.4f), solve %.2f s, "
                         "capture %.2f s", row.layer, row.bits, row.solver, row.cost,
                         row.rtn_cost, row.ratio, row.seconds, row.capture_seconds)
                done += 1
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        # the recorded outputs are of no use to the activation stage, which records its own:
        # kept, they would double the memory budget the user set
        if caches is not None:
            caches.clear()
        restore.close()
    if not layers:
        raise QroundError("no chosen layer received a non-empty input during calibration: "
                          + "; ".join(f"{n!r}: {why}" for n, why in list(skipped.items())[:2]))
    if new_biases and hasattr(model, "save_pretrained"):
        log.warning("bias correction gave %d layers without a bias one (%s): transformers' "
                    "from_pretrained drops biases its architecture does not have, so a "
                    "save_pretrained checkpoint of this model loads without them; "
                    "qround.export.save / load keep them", len(new_biases),
                    ", ".join(new_biases[:3]) + (" ..." if len(new_biases) > 3 else ""))
    result = QuantizedModel(qmodel, config, layers, report, skipped, 0.0, source=source,
                            folded=folded, new_biases=tuple(new_biases))
    if config.activation_stage:
        result.reconstruction, result.units = quantize_activations(
            result, float_model, list(calibration), forward, config,
            call_order=[x.name for x in plan],
            first=[x.name for x in plan if x.group == plan[0].group])
        reverted = [b.block for b in (result.reconstruction.blocks
                                      if result.reconstruction is not None else []) if b.reverted]
        if reverted:
            log.warning("block reconstruction kept the start of %d of %d units (training did "
                        "not lower their loss): %s; more iterations may help",
                        len(reverted), len(result.reconstruction.blocks),
                        ", ".join(reverted[:5]) + (" ..." if len(reverted) > 5 else ""))
        if inplace:   # the given model holds the final codes too, and its own Conv1D layers
            for name, qweight in result.layers.items():
                apply_to_layer(q_modules[name], qweight, inplace=True)
            restore_conv1d(qmodel, replaced)
    # the Conv1D layers back, holding their rounded weights (those an activation stage wrapped
    # stay the nn.Linear inside the wrapper)
    result.model = restore_conv1d(result.model, replaced)
    result.seconds = time.perf_counter() - t_start
    undo.clear()
    return result


def _conv1d_selection(model: nn.Module, config: QuantConfig, first_batch, forward,
                      calibration=None) -> tuple[list[str], dict[str, str]]:
    """The transformers Conv1D layers to round, and why the others stay in float: a Conv1D is
    rounded when it is selected (``layers``/``exclude``),
    :func:`~qround.problems.layers.conv1d_refusals` allows it, and the forward calls it (one
    forward of the first batch, only for a model with Conv1D layers; then of the later batches
    of ``calibration`` while a selected one has not been called).  A selected Conv1D whose
    weight cannot be written is an error, as for a Linear."""
    convs = [n for n, m in model.named_modules() if is_hf_conv1d(m)]
    if not convs:
        return [], {}
    refused = conv1d_refusals(model)
    modules = dict(model.named_modules())
    skipped, chosen = {}, []
    for n in convs:
        if config.layers is not None and not re.search(config.layers, n):
            skipped[n] = f"not matched by layers={config.layers!r}"
        elif config.exclude is not None and re.search(config.exclude, n):
            skipped[n] = f"excluded by exclude={config.exclude!r}"
        elif weight_not_writable(modules[n]):   # as for a Linear: an error, before any work
            raise QroundError(f"cannot round these layers' weights: {n!r}: "
                              f"{weight_not_writable(modules[n])}; or leave them out with "
                              "config.exclude")
        elif n in refused:
            skipped[n] = refused[n]
        else:
            chosen.append(n)
    called = _called(model, chosen, first_batch, forward)
    for j, batch in enumerate(calibration or ()):
        if len(called) == len(chosen):
            break
        if j > 0:   # an expert the first batch routed no row to
            called |= _called(model, [n for n in chosen if n not in called], batch, forward,
                              index=j)
    for n in chosen:
        if n not in called:
            skipped[n] = ("never called by the forward (its weight may be used directly by its "
                          "parent module): left in float")
    return [n for n in chosen if n in called], skipped


def _called(model: nn.Module, names, batch, forward, check=None, index: int = 0) -> set[str]:
    """The modules among ``names`` that one forward of ``batch`` calls (without gradients, in
    eval mode); ``check(name, args, kwargs)`` runs on each call."""
    modules = dict(model.named_modules())
    called = set()

    def pre(name):
        def hook(module, args, kwargs):
            called.add(name)
            if check is not None:
                check(name, args, kwargs)
        return hook

    handles = [modules[n].register_forward_pre_hook(pre(n), with_kwargs=True) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            _run_first(model, batch, forward, index)
    finally:
        for h in handles:
            h.remove()
    return called


def _check_no_kv_cache(model: nn.Module, config: QuantConfig, first_batch, forward) -> None:
    """With block reconstruction of units larger than a layer: QroundError, before any solve,
    when one forward of the first batch passes a key-value cache to a module (the
    reconstruction's replays of a unit would grow it)."""
    if config.reconstruction is None or config.granularity == "layer":
        return
    found = {}

    def check(name, args, kwargs):
        kind = _kv_cache(args, kwargs)
        if kind is not None:
            found.setdefault(name, kind)

    _called(model, [n for n, _ in model.named_modules()], first_batch, forward, check)
    if found:
        name, kind = next(iter(found.items()))
        raise QroundError(
            f"module {name or 'model'!r} is called with a key-value cache ({kind}): block "
            "reconstruction calls its units many times on their recorded inputs, and the cache "
            "would grow with every call. Calibrate without one: forward=lambda model, batch: "
            "qround.calibrate.default_forward(model, batch, use_cache=False) (it keeps "
            "masking a tokeniser's padding)")
