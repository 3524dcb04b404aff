"""Block reconstruction by gradient descent (BRECQ, QDrop; AQuant Algorithm 1).

Blocks are taken one at a time in forward order.  For block ``k``:

1. cache its inputs ``x_hat`` from the quantised model (blocks before ``k`` already final) and
   its float outputs ``y`` from the float model, on the whole calibration set;
2. minimise ``E || f_k(x_hat; W_hat, s, B) - y ||^2`` (squared error summed over the
   feature/channel axis, averaged over samples and positions, as BRECQ) plus AdaRound's
   regulariser ``lambda * sum_i (1 - |2 h(V_i) - 1|^beta)`` with Adam, over

   - the soft weight rounding ``h(V)`` of every :class:`~qround.activations.QuantizedLayer` in
     the block (``beta`` annealed 20 -> 2 after a warm-up without the regulariser),
   - the LSQ steps of their input quantisers, and their AQuant borders (lr 1e-3 per the paper),

   each parameter kind with its own learning rate.  QDrop (Wei et al. 2022): while training,
   each quantised input element keeps its float value with probability ``qdrop``;
3. harden the rounding, ``b = [h(V) >= 0.5]``.  If the hardened block is worse on the cached
   calibration data than the block before training, the block's initial state is restored and
   the report says so (``reverted``).

Memory: the cache holds one block's inputs and float outputs for the whole calibration set (the
small calibration sets of PTQ, 1k images or the digits' 179); ``cache_mb`` bounds it.  Before
the first unit trains, one forward per batch measures every unit's share
(:func:`cache_bytes`) and a unit above the bound is refused with :class:`QroundError`
(``quantize_model`` does this before its weight stage); the capture also stops when the bound
is passed (a mixture of experts routes tokens by the rounded weights).  Capture passes stop at
the block (an exception from a hook), so the rest of the model does not run.

Randomness (mini-batch choice, QDrop masks) comes from one local ``torch.Generator`` seeded with
``config.seed`` (when it is None, as by default: ``QuantConfig.seed`` in quantize_model, 0
here); the global RNG is never touched, and a run is reproducible for a seed.

Units of several modules (MRECG's joint reconstruction, :mod:`qround.granularity`).  A
:class:`Unit` is a run of modules that are consecutive in forward order, e.g. ``("block1",
"down")``.  It is reconstructed as one block whose input is taken at the lowest common ancestor
(LCA) module of its modules that the forward calls, and whose output is the LAST module's
output: step 1 caches the LCA's inputs from the quantised model and the float model's output of
the last module; every training step runs the LCA's forward on the cached input and stops it (an
exception from a forward hook carrying the tensor) at the last module's output.  Only the
QuantizedLayers inside the unit's modules are trained (and get QDrop); everything else in the
LCA runs frozen at its final state, so skip connections that bypass or enter the unit are
handled exactly by the model's own forward.  A unit of one module takes the single-block path
above unchanged.
"""
from __future__ import annotations

import dataclasses

import copy
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ._orders import merge_orders
from .activations import ActQuantizer, QuantizedLayer, qdrop, quantized_layers
from .calibrate import _TOKEN_MASK, ForwardFn, default_forward, eval_mode, kept_buffers
from .errors import MAX_SEED, QroundError, check_real
from .prefix_cache import PrefixCache, budget_bytes, check_budget, disabled, trace_spans

log = logging.getLogger(__name__)

# residual blocks by class name: ResNet's BasicBlock / Bottleneck, transformer layers, MobileNet's
# InvertedResidual (MNASNet's _InvertedResidual), EfficientNet's MBConv / FusedMBConv
# (torchvision, timm).  Not any "...Residual": that is as often a wrapper x + fn(x) around part
# of a block, or around a whole body of blocks, or shared and called twice (helper-154)
_BLOCK_CLASS = re.compile(r"(Block|Bottleneck|Layer|InvertedResidual|MBConv)$")
_BLOCK_NAME = re.compile(r"(^|\.)(layer|layers|block|blocks|h)\.\d+$")


@dataclass(frozen=True)
class ReconstructConfig:
    """iterations: Adam steps per block.  batch_size: samples per step (when the block takes a
    single tensor; otherwise one cached calibration batch per step).  lr_rounding/lr_step/
    lr_border: Adam learning rates of V, the LSQ steps and the borders.  reg_weight: lambda of
    the rounding regulariser; beta: its (start, end) exponent; warmup: fraction of the steps
    without it.  qdrop: probability of keeping a float activation while training (0 = off).
    train_weights / train_steps / train_borders: whether the soft weight rounding, the LSQ
    steps and the borders are trained (the others stay as they start).  cache_mb: bound on one
    block's cached data.  capture_cache_mb: bound per model on the recorded outputs of finished
    modules replayed in the capture passes (:mod:`qround.prefix_cache`; 0 runs every capture pass
    whole).  seed: of the mini-batch and QDrop draws; None takes ``QuantConfig.seed`` inside
    ``quantize_model``, and 0 when :func:`reconstruct` is called directly."""

    iterations: int = 500
    batch_size: int = 32
    lr_rounding: float = 1e-2
    lr_step: float = 1e-3
    lr_border: float = 1e-3
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    qdrop: float = 0.5
    train_weights: bool = True
    train_steps: bool = True
    train_borders: bool = True
    cache_mb: float = 1024.0
    seed: int | None = None
    capture_cache_mb: float = 1024.0

    def __post_init__(self):
        # numpy scalars become Python ones: the config is saved as JSON with the model
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.generic):
                object.__setattr__(self, f.name, v.item())
            elif isinstance(v, (tuple, list)):
                object.__setattr__(self, f.name, type(v)(
                    x.item() if isinstance(x, np.generic) else x for x in v))
        for name in ("iterations", "batch_size", "seed"):
            v = getattr(self, name)
            if name == "seed" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seed" else 1) \
                    or (name == "seed" and v > MAX_SEED):
                raise QroundError(f"ReconstructConfig.{name} must be an integer >= "
                                  f"{0 if name == 'seed' else 1}"
                                  + (" and < 2**64" if name == "seed" else "") + f", got {v!r}")
        for name in ("lr_rounding", "lr_step", "lr_border", "cache_mb"):
            check_real(getattr(self, name), f"ReconstructConfig.{name}", lo=0, lo_open=True)
        check_real(self.reg_weight, "ReconstructConfig.reg_weight", lo=0)
        if not isinstance(self.beta, (tuple, list)) or len(self.beta) != 2:
            raise QroundError(f"ReconstructConfig.beta must be two positive numbers, got "
                              f"{self.beta!r}")
        for i, b in enumerate(self.beta):
            check_real(b, f"ReconstructConfig.beta[{i}]", lo=0, lo_open=True)
        if self.beta[0] < self.beta[1]:
            log.warning("ReconstructConfig.beta=%r rises: beta anneals from its first value to "
                        "its second, and AdaRound's falls (20 -> 2), so that the regulariser "
                        "first lets the rounding move and then pushes it to 0/1", self.beta)
        check_budget(self.capture_cache_mb, "ReconstructConfig.capture_cache_mb")
        check_real(self.warmup, "ReconstructConfig.warmup", lo=0, hi=1, hi_open=True)
        check_real(self.qdrop, "ReconstructConfig.qdrop", lo=0, hi=1)
        for name in ("train_weights", "train_steps", "train_borders"):
            if not isinstance(getattr(self, name), bool):   # "False" would be taken as true
                raise QroundError(f"ReconstructConfig.{name} must be True or False, got "
                                  f"{getattr(self, name)!r}")


@dataclass(frozen=True)
class Unit:
    """A reconstruction unit: module names (``""`` = the whole model) that run consecutively
    in forward order, reconstructed jointly against the float output of the last one."""

    modules: tuple[str, ...]

    def __post_init__(self):
        mods = self.modules
        if (isinstance(mods, str) or not isinstance(mods, (tuple, list)) or not mods
                or not all(isinstance(m, str) for m in mods)):
            raise QroundError(f"a Unit needs a non-empty tuple of module names, got {mods!r}")
        if len(set(mods)) != len(mods):
            raise QroundError(f"Unit names a module twice: {list(mods)}")
        object.__setattr__(self, "modules", tuple(mods))

    @property
    def name(self) -> str:
        """``"a+b"`` for modules ``("a", "b")``; a single module's own name."""
        return "+".join(self.modules)

    def __str__(self) -> str:
        return self.name or "<model>"


@dataclass(frozen=True)
class BlockReport:
    """One unit: its name (``"a+b"`` for a joint unit), layers, per-element MSE of the unit's
    output on the calibration data before (initial state, hard weights) and after
    reconstruction, Adam steps run, seconds, whether the initial state was kept because
    training made it worse, the unit's modules, the mean square of its float target, and the
    MSE training reached (``loss_trained``: equal to ``loss_after`` unless reverted, when
    ``loss_after`` is ``loss_before``)."""

    block: str
    layers: tuple[str, ...]
    loss_before: float
    loss_after: float
    iterations: int
    seconds: float
    reverted: bool = False
    modules: tuple[str, ...] = ()
    target_power: float = float("nan")
    loss_trained: float = float("nan")

    @property
    def relative_loss(self) -> float:
        """``loss_after`` over the float target's mean square: comparable across units whose
        outputs have different scales (pre-/post-ReLU, residual branch or sum)."""
        if self.target_power > 0:
            return self.loss_after / self.target_power
        # a unit whose float output is identically zero: exact is 0, anything else undefined
        return 0.0 if self.loss_after == 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["modules"] = list(self.modules)
        return d


@dataclass
class ReconstructResult:
    """The reconstructed model (hard weights), the per-unit reports in forward order, and total
    seconds."""

    model: nn.Module
    blocks: list[BlockReport]
    seconds: float

    @property
    def units(self) -> list[Unit]:
        """The units reconstructed, in forward order."""
        return [Unit(b.modules or (b.block,)) for b in self.blocks]

    @property
    def losses(self) -> list[float]:
        """Loss along depth: each unit's MSE after reconstruction, in forward order."""
        return [b.loss_after for b in self.blocks]

    @property
    def relative_losses(self) -> list[float]:
        """Each unit's MSE after reconstruction over its float target's mean square."""
        return [b.relative_loss for b in self.blocks]

    def table(self) -> str:
        from .report import format_table
        rows = [{"block": b.block, "layers": len(b.layers), "mse_before": b.loss_before,
                 "mse_after": b.loss_after, "ratio": b.loss_after / b.loss_before
                 if b.loss_before > 0 else float("nan"), "seconds": b.seconds,
                 # what training reached, shown where it was undone
                 "reverted": f"yes (trained {b.loss_trained:.4g})" if b.reverted else ""}
                for b in self.blocks]
        return format_table(rows)


# ------------------------------------------------------------------------------ blocks
def _has_layers(module: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLayer) for m in module.modules())


def find_blocks(model: nn.Module) -> list[str]:
    """Auto-detected reconstruction blocks of a model with :class:`QuantizedLayer` modules, in
    ``named_modules`` order: residual-block-like modules (class names ending in Block,
    Bottleneck, Layer, InvertedResidual or MBConv, e.g. ``qround.zoo.ResidualBlock``,
    torchvision's ``BasicBlock``, HF's ``BertLayer``, MobileNetV2's ``InvertedResidual``,
    EfficientNet's ``MBConv``), modules named like ``encoder.layer.N`` / ``blocks.N``, and
    children of an ``nn.Sequential`` unless they hold blocks of the first two kinds (a
    SentenceTransformer's ``0`` holds BertLayers: those are the blocks); a quantised layer
    outside all of them is a block by itself."""
    found: list[str] = []

    def is_block(module: nn.Module, name: str) -> bool:
        return not isinstance(module, QuantizedLayer) and bool(
            _BLOCK_CLASS.search(type(module).__name__) or _BLOCK_NAME.search(name))

    def holds_blocks(module: nn.Module, prefix: str) -> bool:
        return any(is_block(m, f"{prefix}.{n}") for n, m in module.named_modules() if n)

    def visit(module: nn.Module, prefix: str) -> None:
        in_sequential = isinstance(module, nn.Sequential)
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if not _has_layers(child):
                continue
            if (isinstance(child, QuantizedLayer) or is_block(child, full)
                    or (in_sequential and not holds_blocks(child, full))):
                found.append(full)
            else:
                visit(child, full)

    if isinstance(model, QuantizedLayer):
        return [""]
    visit(model, "")
    return found


def _as_unit(item) -> Unit:
    if isinstance(item, Unit):
        return item
    if isinstance(item, str):
        return Unit((item,))
    if isinstance(item, (tuple, list)):
        return Unit(tuple(item))
    raise QroundError(f"a block must be a module name, a Unit or a list of module names, got "
                      f"{item!r}")


def _resolve_blocks(quant_model: nn.Module, float_model: nn.Module, blocks) -> list[Unit]:
    """The units to reconstruct (not yet in forward order), checked against both models;
    QuantizedLayers outside all of them are appended as units of their own."""
    qnamed = dict(quant_model.named_modules())
    layers = quantized_layers(quant_model)
    if not layers:
        raise QroundError("quant_model has no QuantizedLayer: build it with "
                          "insert_act_quantizers first")
    if blocks == "auto":
        units = [Unit((n,)) for n in find_blocks(quant_model)]
    elif blocks is None:
        units = [Unit((n,)) for n in layers]
    else:
        if isinstance(blocks, str) or not isinstance(blocks, Sequence):
            raise QroundError(f"blocks must be 'auto', None or a list of module names / Units, "
                              f"got {blocks!r}")
        if not blocks:
            raise QroundError("blocks is an empty list: name at least one unit")
        units = [_as_unit(b) for b in blocks]
        names = [m for u in units for m in u.modules]
        missing = [b for b in names if b not in qnamed]
        if missing:
            raise QroundError(f"blocks name modules that do not exist in quant_model: {missing}")
        # a joint unit may hold modules without a QuantizedLayer (conv, BN, ReLU: its output is
        # the ReLU's); a unit with none has nothing to train
        empty = [u.modules[0] if len(u.modules) == 1 else "+".join(u.modules) for u in units
                 if not any(_has_layers(qnamed[b]) for b in u.modules if b in qnamed)]
        if empty:
            raise QroundError(f"blocks contain no QuantizedLayer: {empty}")
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if a == b or a == "" or b == "" or b.startswith(a + ".") or a.startswith(b + "."):
                    raise QroundError(f"blocks {a!r} and {b!r} overlap")
        covered = [n for n in layers if any(n == b or b == "" or n.startswith(b + ".")
                                            for b in names)]
        units += [Unit((n,)) for n in layers if n not in covered]  # left-over layers alone
    fnamed = dict(float_model.named_modules())
    missing = [m for u in units for m in u.modules if m not in fnamed]
    if missing:
        raise QroundError(f"blocks {missing} exist in quant_model but not in float_model")
    return units


# ------------------------------------------------------------------------------ capture
class _Stop(BaseException):
    """Raised by a capture hook to end a forward pass at the block (a BaseException: a forward
    function's own ``except Exception`` must not swallow it)."""


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _kv_cache(args, kwargs) -> str | None:
    """The type name of a key-value cache among a block's inputs (an object of transformers'
    Cache API, which a decoder layer appends to on every call), or None."""
    for value in (*args, *kwargs.values()):
        if hasattr(value, "get_seq_length") and hasattr(value, "update") \
                and not isinstance(value, (torch.Tensor, Mapping)):
            return type(value).__name__
    return None


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    return 0


def _main_tensor(out, name: str) -> torch.Tensor:
    """The tensor a block's output is compared on: itself, or the first floating-point tensor
    of a tuple / mapping (HF layers return ``(hidden_states, ...)``; a whole sentence model
    returns a dict that starts with the integer ``input_ids``), or a dataclass's fields."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        items = list(out.values())
    elif isinstance(out, (tuple, list)):
        items = list(out)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [getattr(out, f.name) for f in dataclasses.fields(out)]
    else:
        items = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            return item
    raise QroundError(f"block {name!r} returned {type(out).__name__} without a floating-point "
                      "tensor")


def _target_mask(mask: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor | None:
    """The token mask (:func:`qround.calibrate.token_mask`, e.g. (batch, tokens)) as it applies
    to a block's output: itself where the output's leading dims are the mask's, flattened where
    the output is 2-D with one row per token, else None (the output is not per token)."""
    if mask is None:
        return None
    if target.dim() > mask.dim() and tuple(target.shape[:mask.dim()]) == tuple(mask.shape):
        return mask.to(target.device)
    if target.dim() == 2 and target.shape[0] == mask.numel():
        return mask.reshape(-1).to(target.device)
    return None


class _BlockData:
    """Cached block inputs (args, kwargs), float targets and the targets' token masks (None
    where the calibration has none), per calibration batch.  channels_first: where the
    targets' features are (see :func:`_rec_loss`): True for (N, C, L) or (N, C, D, H, W) laid
    out as the output of an nn.Conv1d or a 3-d conv inside the unit, False for a channels-last
    (N, H, W, C) of a Linear's, None for the shape's default."""

    def __init__(self, inputs: list, targets: list[torch.Tensor],
                 masks: list[torch.Tensor | None] | None = None,
                 channels_first: bool | None = None):
        self.inputs, self.targets = inputs, targets
        self.channels_first = channels_first
        masks = [None] * len(targets) if masks is None else masks
        if any(m is None for m in masks):   # padding is masked in every batch or in none
            masks = [None] * len(targets)
        self.masks = masks
        simple = all(len(a) == 1 and isinstance(a[0], torch.Tensor) and not k
                     for a, k in inputs)
        # rows are drawn along dim 0 of input and target together: only where it is the same
        # samples axis in both (a block that flattens tokens, (N, T, F) -> (N*T, C), is not)
        # (a 1-D input is one sample: whole batches are drawn then)
        aligned = simple and all(a[0].dim() >= 2 and t.dim() >= 1
                                 and a[0].shape[0] == t.shape[0]
                                 for (a, _), t in zip(inputs, targets))
        if aligned and len({a[0].shape[1:] for a, _ in inputs}) == 1 \
                and len({t.shape[1:] for t in targets}) == 1:
            self.x = torch.cat([a[0] for a, _ in inputs])
            self.y = torch.cat(targets)
            self.m = None if masks[0] is None else torch.cat(masks)
            if self.m is None:
                # the per-batch lists become views of the concatenation: one copy in memory,
                # as cache_mb counts it (with a token mask the drawn rows are a subset, and the
                # lists keep the whole batches)
                sizes = [a[0].shape[0] for a, _ in inputs]
                self.inputs = [((x,), {}) for x in torch.split(self.x, sizes)]
                self.targets = list(torch.split(self.y, sizes))
            if self.m is not None and self.m.dim() == 1:
                # one row per token (flattened): mini-batches are drawn from the real rows
                keep = self.m.to(self.x.device)
                self.x, self.y, self.m = self.x[keep], self.y[keep.to(self.y.device)], None
        else:
            self.x = self.y = self.m = None

    def sample(self, gen: torch.Generator, batch_size: int):
        """(args, kwargs, target, target's token mask or None) of a random mini-batch."""
        if self.x is not None:
            idx = torch.randperm(self.x.shape[0], generator=gen)[:batch_size].to(self.x.device)
            return (self.x[idx],), {}, self.y[idx], None if self.m is None else self.m[idx]
        i = int(torch.randint(len(self.inputs), (1,), generator=gen))
        args, kwargs = self.inputs[i]
        return args, kwargs, self.targets[i], self.masks[i]


def _channels_first(module: nn.Module) -> bool:
    """Whether the module's output is laid out (N, C, ...) with more than one spatial axis
    read as features elsewhere: an nn.Conv1d's (N, C, L), or a module marked
    ``_qround_channels_first`` (qround.conv3d's Conv3dAsConv2d: (N, C, D, H, W))."""
    return isinstance(module, nn.Conv1d) or getattr(module, "_qround_channels_first", False)


def _capture(float_model, quant_model, fblock, qblock, name, batches, forward, budget_mb,
             caches: tuple | None = None, joint: bool = False):
    """The block's inputs from the quantised model and its float outputs, per batch that calls
    the block in both models (an expert a batch routes no row to has no data from it).
    caches: ((quant PrefixCache, event the entry starts at), (float PrefixCache, event the
    unit starts at)), or None: every pass runs from the model's first module.  joint: ``qblock``
    is a joint unit's common ancestor (its input taken there), ``fblock`` its last module."""
    inputs: dict[int, tuple] = {}
    targets: dict[int, torch.Tensor] = {}
    masks: dict[int, torch.Tensor | None] = {}
    # per batch: whether the target has the (N, C, L) shape of a Conv1d output in the unit, or
    # the (N, C, D, H, W) one of a 3-d conv's (a module marked _qround_channels_first)
    conv_shapes: dict[int, set] = {}
    # and the 4-d output shapes of the unit's nn.Linear and nn.Conv2d modules: a 4-d target a
    # Linear gives and no Conv2d does is channels-last (N, H, W, C) (Swin, ConvNeXt's MLP)
    shapes_4d: dict[tuple, set] = {}
    channels: dict[int, bool | None] = {}
    used = [0]
    index = [0]   # the batch being run

    def account(obj):
        used[0] += _nbytes(obj)
        if used[0] > budget_mb * 2 ** 20:
            raise QroundError(f"block {name!r}: cached inputs and outputs exceed cache_mb="
                              f"{budget_mb} MB; use fewer calibration samples or raise cache_mb")

    def pre(module, args, kwargs):
        cache = _kv_cache(args, kwargs)
        if cache is not None:
            raise QroundError(
                f"block {name!r} is called with a key-value cache ({cache}): reconstruction "
                "calls the block many times on its recorded inputs, and the cache would grow "
                "with every call. Calibrate without one: forward=lambda model, batch: "
                "qround.calibrate.default_forward(model, batch, use_cache=False) (it keeps "
                "masking a tokeniser's padding)")
        item = (_detach(tuple(args)), _detach(dict(kwargs)))
        account(item)
        inputs[index[0]] = item
        raise _Stop

    def conv_out(module, args, out):
        if isinstance(out, torch.Tensor):
            conv_shapes.setdefault(index[0], set()).add(tuple(out.shape))

    def out_4d(module, args, out):
        if not isinstance(out, torch.Tensor):
            return
        if out.dim() == 4:
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            shapes_4d.setdefault((index[0], kind), set()).add(tuple(out.shape))
        elif out.dim() == 3 and isinstance(module, nn.Linear):
            # (B, L, C) tokens that the unit may reshape to (B, H, W, C) (timm's Swin MLP)
            shapes_4d.setdefault((index[0], "tokens"), set()).add(tuple(out.shape))

    def post(module, args, out):
        y = _main_tensor(out, name).detach()
        account(y)
        targets[index[0]] = y
        # padded tokens (a forward inside qround.calibrate.token_mask) stay out of the losses
        mask = _target_mask(_TOKEN_MASK.get(), y)
        # a Conv1d's (N, C, L) layout: the unit is a Conv1d, or its output has the shape of a
        # Conv1d output inside it and is not (batch, tokens, ...) under a token mask (a
        # Conformer-style conv module transposes back to tokens: with T == F both shapes fit,
        # and the tokens win)
        first = y.dim() in (3, 5) and (_channels_first(module) or (
            mask is None and tuple(y.shape) in conv_shapes.get(index[0], ())))
        channels[index[0]] = True if first else _layout_4d(module, y, index[0], shapes_4d)
        masks[index[0]] = None if first else mask
        raise _Stop

    off = (disabled(), 0)
    passes = ((quant_model, qblock, pre), (float_model, fblock, post))
    for (model, module, hook), (cache, before) in zip(passes, caches or (off, off)):
        if hook is pre:
            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            handle = module.register_forward_hook(hook)
            inner = [m.register_forward_hook(conv_out) for m in module.modules()
                     if _channels_first(m) and m is not module]
            inner += [m.register_forward_hook(out_4d) for m in module.modules()
                      if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not module]
            handle = _Handles([handle, *inner])
        cache.prepare(before)
        try:
            with torch.no_grad():
                for j, batch in enumerate(batches):
                    index[0] = j
                    try:
                        with cache.batch(j, batch):
                            forward(model, batch)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        cache.finish()
    both = sorted(set(inputs) & set(targets))
    if not both:
        which = ("the model's forward" if not inputs and not targets else
                 "the float model's forward" if inputs else "the quantised model's forward")
        raise QroundError(f"block {name!r} was not called by {which} on any calibration batch"
                          + ("" if not inputs and not targets else
                             " that the other model calls it on (routing that depends on the "
                             "weights?)"))
    odd = sorted(set(inputs) ^ set(targets))
    if odd and joint and set(targets) <= set(inputs):
        # the common ancestor runs on every batch: the last module does not (both models?)
        log.debug("unit %s: its last module is not called on calibration batches %s in the "
                  "float model: left out of its loss", name, odd)
    elif odd:
        log.warning("block %s: calibration batches %s call it in only one of the float and "
                    "the quantised model (routing that depends on the weights?): left out of "
                    "its loss", name, odd)
    return _BlockData([inputs[j] for j in both], [targets[j] for j in both],
                      [masks[j] for j in both], _one_layout([channels[j] for j in both]))


def _layout_4d(module: nn.Module, y: torch.Tensor, j: int, shapes: dict) -> bool | None:
    """False where the 4-d target ``y`` of batch ``j`` is channels-last: the unit is an
    nn.Linear, or a Linear inside it gave ``y``'s shape, or the (B, H*W, C) tokens that ``y``
    reshapes (a Swin block's MLP runs on tokens and the block reshapes them back), and no
    Conv2d gave ``y``'s shape (a Conv2d's NCHW wins a tie); None (the default, NCHW for 4-d)
    otherwise."""
    if y.dim() != 4:
        return None
    if isinstance(module, nn.Linear):
        return False
    shape = tuple(y.shape)
    if shape in shapes.get((j, "conv"), ()):
        return None
    b, h, w, c = shape
    if shape in shapes.get((j, "linear"), ()) or (b, h * w, c) in shapes.get((j, "tokens"), ()):
        return False
    return None


def _one_layout(values: list) -> bool | None:
    """The layout of every batch's target where they agree, else None (each shape's
    default)."""
    return values[0] if values and all(v is values[0] for v in values) else None


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


def cache_bytes(model: nn.Module, units: Sequence[Unit], lca: dict, batches, forward
                ) -> dict[str, int]:
    """Bytes the capture of each unit holds over ``batches``, as ``cache_mb`` counts them: the
    inputs of its entry module (the unit's module, or ``lca[unit]`` for a joint unit) and the
    main output of its last module, at their first call per batch.  Measured by one forward per
    batch of ``model`` (without gradients, hooks removed afterwards); the real capture takes
    the outputs from the float model, whose shapes are the same unless routing depends on the
    weights (a mixture of experts)."""
    named = dict(model.named_modules())
    need = {u.name: 0 for u in units}
    seen: set = set()
    handles = []

    def pre(name):
        def hook(module, args, kwargs):
            if ("in", name) not in seen:
                seen.add(("in", name))
                need[name] += _nbytes((args, kwargs))
        return hook

    def post(name):
        def hook(module, args, out):
            if ("out", name) not in seen:
                seen.add(("out", name))
                need[name] += _nbytes(_main_tensor(out, name))
        return hook

    try:
        for u in units:
            entry = lca[u] if len(u.modules) > 1 else u.name
            handles.append(named[entry].register_forward_pre_hook(pre(u.name),
                                                                  with_kwargs=True))
            handles.append(named[u.modules[-1]].register_forward_hook(post(u.name)))
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return need


def check_cache(need: dict[str, int], cache_mb: float, n_batches: int,
                setting: str = "cache_mb") -> None:
    """QroundError naming the unit that needs most, when any unit's capture (``need``, from
    :func:`cache_bytes`) is above ``cache_mb``; raised before any reconstruction."""
    over = {n: b for n, b in need.items() if b > cache_mb * 2 ** 20}
    if over:
        name = max(over, key=over.__getitem__)
        raise QroundError(
            f"reconstruction unit {name!r} would cache {over[name] / 2 ** 20:.4g} MB of inputs "
            f"and float outputs over the {n_batches} calibration batches, above "
            f"{setting}={cache_mb:.4g} MB ({len(over)} of {len(need)} units are over); use "
            f"fewer calibration samples or raise {setting}")


def _call_order(model: nn.Module, batch, forward) -> tuple[list[str], dict[str, int]]:
    """The names of the modules one forward of ``batch`` calls, in the order of their first
    calls, and how often each is called."""
    seen: list[str] = []
    calls: dict[str, int] = {}

    def note(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                seen.append(name)
        return hook

    handles = [m.register_forward_pre_hook(note(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen, calls


def _order_units(quant_model, units: list[Unit], batch, forward, later: Sequence = (),
                 traced: tuple[list[str], dict[str, int]] | None = None
                 ) -> tuple[list[Unit], dict, dict[str, int]]:
    """Units sorted by forward order (each unit's modules too), checked to be consecutive: no
    module of another unit runs between a unit's first and last module.  Returns the units,
    for each unit of several modules the name of its lowest common ancestor that the forward
    calls (where its input is taken), and every called module's rank in call order.  Runs one
    forward pass of ``batch`` (none when ``traced`` gives its :func:`_call_order`), and when
    it does not call a unit's module (an expert of a mixture that no row of the first batch
    was routed to), one of each of the ``later`` batches: the call order is then all of theirs
    merged (:func:`qround._orders.merge_orders`)."""
    seen, calls = traced if traced is not None else _call_order(quant_model, batch, forward)
    calls = dict(calls)
    wanted = [m for u in units for m in u.modules]
    if not set(wanted) <= set(seen) and later:
        # every later batch: a module first seen there goes after what it follows on any batch
        # that calls it (the one first calling it may skip the module before it)
        orders = [seen]
        for extra in later:
            order, extra_calls = _call_order(quant_model, extra, forward)
            orders.append(order)
            for m in order:
                calls.setdefault(m, extra_calls[m])
        seen = merge_orders(orders)
    marked = set(seen)
    missing = [m for m in wanted if m not in marked]
    if missing:
        where = " on any calibration batch" if later else ""
        raise QroundError(f"blocks {missing} are not called by the model's forward{where} (a "
                          "module whose parent calls its children directly is no block of its "
                          "own): "
                          "give units of called modules (a scheme), or granularity='layer'")
    again = [m for m in wanted if calls[m] > 1]
    if again:
        log.warning("blocks %s are called more than once per forward: a block is reconstructed "
                    "on its first call's input and output only (its later calls are not in "
                    "the loss)", again)
    rank = {n: i for i, n in enumerate(n for n in seen if n in set(wanted))}
    ordered = sorted((Unit(tuple(sorted(u.modules, key=rank.__getitem__))) for u in units),
                     key=lambda u: rank[u.modules[0]])
    flat = sorted(rank, key=rank.__getitem__)
    lca: dict[Unit, str] = {}
    for u in ordered:
        first, last = rank[u.modules[0]], rank[u.modules[-1]]
        between = [m for m in flat[first:last + 1] if m not in u.modules]
        if between:
            raise QroundError(f"unit {u.name!r} is not consecutive in forward order: "
                              f"{between} (of other units) run between its modules")
        if len(u.modules) > 1:
            parts = [m.split(".") for m in u.modules]
            common = []
            for level in zip(*parts):
                if len(set(level)) > 1:
                    break
                common.append(level[0])
            while common and ".".join(common) not in marked:
                common.pop()  # e.g. a ModuleList, which has no forward of its own
            lca[u] = ".".join(common)
            if lca[u] not in marked:
                raise QroundError(f"unit {u.name!r}: no common ancestor module of its modules "
                                  "is called by the forward (the model itself is not called?)")
    return ordered, lca, {n: i for i, n in enumerate(seen)}


def _check_connected(model: nn.Module, units: Sequence[Unit], batch, forward,
                     later: Sequence = ()) -> None:
    """QroundError for a joint unit with a module whose output does not reach its last one."""
    for u, missing in disconnected_modules(model, units, batch, forward, later).items():
        raise QroundError(f"unit {u.name!r}: the output of {missing} does not reach "
                          f"{u.modules[-1]!r}, the unit's last module (parallel modules, like "
                          "q_proj and k_proj); a joint unit is trained on its last module's "
                          "output, so their rounding would go unseen: give them separate units")


def _first_float(out):
    """(the first floating tensor of a module's output (a tensor, or in a plain tuple/list), a
    function that puts a replacement for it back), or (None, None): other containers
    (named tuples, model outputs) are not taken apart, and their modules are not checked."""
    if isinstance(out, torch.Tensor):
        return (out, lambda t: t) if out.is_floating_point() else (None, None)
    if type(out) in (tuple, list):
        for i, x in enumerate(out):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                return x, lambda t, i=i: type(out)([*out[:i], t, *out[i + 1:]])
    return None, None


def disconnected_modules(model: nn.Module, units: Sequence[Unit], batch,
                         forward: ForwardFn, later: Sequence = ()) -> dict[Unit, list[str]]:
    """For each unit of several modules, the modules before its last one whose output does
    not reach the last one's output (parallel modules, like q_proj and k_proj: a joint unit is
    trained on its last module's output, so their rounding would go unseen).  One forward of
    ``batch`` with autograd on: a zero scalar that requires grad is added to each earlier
    module's output, and the last output's graph is asked for it.  A unit that ``batch`` does
    not wholly call (an expert no row of it was routed to) is checked on the first of the
    ``later`` batches that does.  An output that is no floating tensor is not checked; a
    forward that autograd cannot trace gives {} (a debug log), as the check is advisory to the
    training that follows."""
    joint = [u for u in units if len(u.modules) > 1]
    named = dict(model.named_modules())
    found: dict[Unit, list[str]] = {}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)  # the graph then starts at the taps only
        for one in [batch, *later]:
            if not joint:
                break
            called = _connections(named, joint, one, forward, model, found)
            joint = [u for u in joint if not all(m in called for m in u.modules)]
    except (RuntimeError, _Carry) as exc:
        log.debug("joint-unit connectivity not checked: %s", exc)
        return {}
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return found


def _connections(named: dict[str, nn.Module], joint: Sequence[Unit], batch, forward, model,
                 found: dict[Unit, list[str]]) -> set[str]:
    """One forward of :func:`disconnected_modules` on ``batch``: adds to ``found`` the units
    it calls wholly with a disconnected module; returns the units' modules it calls."""
    taps: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    called: set[str] = set()

    def tap(name):
        def hook(module, args, out):
            called.add(name)
            first, put = _first_float(out)
            if name in taps or first is None:
                return None
            leaf = torch.zeros((), dtype=first.dtype, device=first.device, requires_grad=True)
            taps[name] = leaf
            return put(first + leaf)
        return hook

    def keep(name):
        def hook(module, args, out):
            called.add(name)
            first, _ = _first_float(out)
            if first is not None:
                outs.setdefault(name, first)
        return hook

    handles = []
    try:
        for u in joint:
            handles += [named[m].register_forward_hook(tap(m)) for m in u.modules[:-1]]
            handles.append(named[u.modules[-1]].register_forward_hook(keep(u.modules[-1])))
        with torch.enable_grad():
            forward(model, batch)
            for u in joint:
                if not all(m in called for m in u.modules):
                    continue    # a later batch that calls all of them checks it
                earlier = [m for m in u.modules[:-1] if m in taps]
                last = outs.get(u.modules[-1])
                if not earlier or last is None:
                    continue
                if not last.requires_grad:
                    found[u] = earlier
                    continue
                grads = torch.autograd.grad(last.sum(), [taps[m] for m in earlier],
                                            allow_unused=True, retain_graph=True)
                missing = [m for m, g in zip(earlier, grads) if g is None]
                if missing:
                    found[u] = missing
    finally:
        for h in handles:
            h.remove()
    return called


class _Carry(Exception):
    """Raised by a hook to end a forward pass at a unit's last module, carrying its output."""

    def __init__(self, out):
        super().__init__()
        self.out = out


class _UnitForward:
    """The forward of a joint unit: the LCA module run on its (cached) inputs, stopped at the
    unit's last module, whose output it returns.  ``parameters()`` are the LCA's."""

    def __init__(self, lca: nn.Module, last: nn.Module, name: str):
        self.lca, self.last, self.name = lca, last, name

    def parameters(self):
        return self.lca.parameters()

    def __call__(self, *args, **kwargs):
        def hook(module, inputs, out):
            raise _Carry(out)

        handle = self.last.register_forward_hook(hook)
        try:
            self.lca(*args, **kwargs)
        except _Carry as carried:
            return carried.out
        finally:
            handle.remove()
        raise QroundError(f"unit {self.name!r}: its last module was not called")


# ------------------------------------------------------------------------------ training
def _rec_loss(out: torch.Tensor, target: torch.Tensor,
              mask: torch.Tensor | None = None, channels_first: bool | None = None
              ) -> torch.Tensor:
    """Squared error summed over features (axis 1 when ``channels_first`` is True: (N, C, L)
    and (N, C, D, H, W), a Conv1d's or a 3-d conv's output layout; the last axis when it is
    False; when None, the channels of a 4-d NCHW and the last axis of any other), mean over
    the rest
    (BRECQ's reconstruction loss); with a token ``mask`` (the target's leading dims,
    :func:`_target_mask`) the mean is over the real tokens only."""
    err = (out - target) ** 2
    if mask is not None:
        per_token = err.reshape(*mask.shape, -1).sum(-1)
        keep = mask.bool()
        # where, not a product: padding may hold NaN (a fully masked softmax), and 0 * NaN is NaN
        return torch.where(keep, per_token, 0).sum() / keep.sum().clamp_min(1)
    if err.dim() < 2:
        return err.mean()
    if channels_first is None:
        channels_first = err.dim() == 4
    return err.sum(1 if channels_first else -1).mean()


@torch.no_grad()
def _same_shape(out: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """``out``, checked to have the float target's shape."""
    if out.shape != target.shape:
        raise QroundError(f"unit {name!r} gave an output of shape {tuple(out.shape)} where the "
                          f"float model's is {tuple(target.shape)}: the rows it sees changed "
                          "with the rounding (an expert whose tokens the router now sends "
                          "elsewhere?); reconstruct the block that holds the router as one "
                          "unit (granularity='block' or a scheme), or leave it out")
    return out


@torch.no_grad()
def _mse(block, data: _BlockData, name: str) -> float:
    """Mean squared error of the block's output over every element of the targets (over the
    real tokens' elements where the calibration masks padding)."""
    total, count = 0.0, 0
    for (args, kwargs), y, mask in zip(data.inputs, data.targets, data.masks):
        err = (_same_shape(_main_tensor(block(*args, **kwargs), name), y, name) - y) ** 2
        if mask is None:
            total += float(err.sum())
            count += y.numel()
        else:
            per_token = err.reshape(*mask.shape, -1).sum(-1)
            total += float(torch.where(mask.bool(), per_token, 0).sum())
            count += int(mask.sum()) * (y.numel() // max(mask.numel(), 1))
    return total / max(count, 1)


def _beta(t: int, config: ReconstructConfig) -> float | None:
    """Exponent of the rounding regulariser at step ``t``; None during the warm-up."""
    start = int(config.warmup * config.iterations)
    if t < start:
        return None
    rel = (t - start) / max(config.iterations - start, 1)
    b0, b1 = config.beta
    return b1 + (b0 - b1) * max(0.0, 1.0 - rel)


def _train_block(block, layers: dict[str, QuantizedLayer], data: _BlockData,
                 config: ReconstructConfig, gen: torch.Generator, name: str) -> int:
    rounding = [m for m in layers.values() if m.weight_spec is not None] \
        if config.train_weights else []
    steps = [m.act.step for m in layers.values() if m.act is not None
             and m.act_mode != "float"] if config.train_steps else []
    borders = [p for m in layers.values() if m.act is not None and m.act_mode == "border"
               for p in (m.act.b0, m.act.b1, m.act.b2) if p is not None] \
        if config.train_borders else []
    groups = [g for g in ({"params": [m.w_round for m in rounding], "lr": config.lr_rounding},
                          {"params": steps, "lr": config.lr_step},
                          {"params": borders, "lr": config.lr_border}) if g["params"]]
    if not groups:
        return 0
    trainable = {id(p) for g in groups for p in g["params"]}
    flags = [(p, p.requires_grad) for p in block.parameters()]
    opt = torch.optim.Adam(groups)
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in trainable)
        for m in rounding:
            m.weight_mode = "soft"
        with torch.enable_grad():
            for t in range(config.iterations):
                args, kwargs, y, mask = data.sample(gen, config.batch_size)
                with qdrop(layers.values(), config.qdrop, gen):
                    out = _main_tensor(block(*args, **kwargs), name)
                _same_shape(out, y, name)
                if not out.requires_grad:
                    raise QroundError(f"unit {name!r}: its output does not depend on the "
                                      "parameters being trained (does its forward run under "
                                      "torch.no_grad() or inference_mode, or detach?); "
                                      "reconstruction needs gradients through it")
                loss = _rec_loss(out, y, mask, data.channels_first)
                beta = _beta(t, config)
                if rounding and beta is not None and config.reg_weight > 0:
                    reg = sum((1 - (2 * m.soft_weight_fraction() - 1).abs().pow(beta)).sum()
                              for m in rounding)
                    loss = loss + config.reg_weight * reg
                opt.zero_grad(set_to_none=True)
                try:
                    loss.backward()
                except RuntimeError as exc:
                    _backward_error(exc, name)
                opt.step()
    finally:
        for m in rounding:
            m.harden()
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    return config.iterations


def _backward_error(exc: RuntimeError, name: str):
    """Re-raise torch's error of a unit's backward as a QroundError where it has a known
    cause (as :func:`qround.calibrate._fisher_error` does for Fisher passes)."""
    text = str(exc)
    if "inplace operation" in text:
        raise QroundError(
            f"unit {name!r}: reconstruction trains through its forward, which changes in place "
            "a tensor the backward needs (e.g. x += f(x) after a layer that saved x): write it "
            "out of place (x = x + f(x)), or reconstruct layer by layer "
            f"(granularity='layer') ({text[:200]})") from exc
    raise exc


def plan_units(float_model: nn.Module, quant_model: nn.Module, calibration: Iterable,
               blocks: Sequence | str | None = "auto", *,
               forward: ForwardFn | None = None) -> list[Unit]:
    """The units :func:`reconstruct` would run, in forward order, with every check it makes
    before any training (names, overlaps, consecutiveness); one forward pass of the first
    calibration batch, and of each later one while a unit is still unseen (an expert no row
    of the batches before was routed to).  ``quant_model`` is not modified."""
    batches = _check_inputs(float_model, quant_model, calibration)
    units = _resolve_blocks(quant_model, float_model, blocks)
    with eval_mode(quant_model):
        ordered = _order_units(quant_model, units, batches[0], forward or default_forward,
                               later=batches[1:])[0]
        _check_connected(quant_model, ordered, batches[0], forward or default_forward,
                         batches[1:])
        return ordered


def _check_inputs(float_model, quant_model, calibration) -> list:
    for arg, value in (("float_model", float_model), ("quant_model", quant_model)):
        if not isinstance(value, nn.Module):
            raise QroundError(f"{arg} must be an nn.Module, got {type(value).__name__}")
    if isinstance(calibration, torch.Tensor):
        raise QroundError("calibration must be an iterable of batches; wrap a tensor in a list")
    batches = list(calibration)
    if not batches:
        raise QroundError("calibration is empty")
    return batches


def reconstruct(float_model: nn.Module, quant_model: nn.Module, calibration: Iterable,
                blocks: Sequence | str | None = "auto",
                config: ReconstructConfig = ReconstructConfig(), *,
                forward: ForwardFn | None = None, inplace: bool = False) -> ReconstructResult:
    """Reconstruct ``quant_model`` (from :func:`~qround.activations.insert_act_quantizers`)
    unit by unit against ``float_model`` on the calibration batches.

    blocks: "auto" (:func:`find_blocks`), None (layer-wise: every QuantizedLayer alone), or a
    list whose items are a module name, a :class:`Unit` or a list/tuple of module names (one
    unit of consecutive modules reconstructed jointly; see the module docstring).
    QuantizedLayers outside all units are reconstructed alone.  ``forward(model, batch)`` runs
    one batch (default ``model(batch)`` / ``model(*batch)`` / ``model(**batch)``).
    Returns the model (a deep copy unless ``inplace``) with hard weights and per-unit reports
    in forward order; ``float_model`` is never modified (buffers its forward writes included).
    """
    start = time.perf_counter()
    if not isinstance(config, ReconstructConfig):
        raise QroundError(f"config must be a ReconstructConfig, got {type(config).__name__}")
    batches = _check_inputs(float_model, quant_model, calibration)
    units = _resolve_blocks(quant_model, float_model, blocks)
    forward = forward or default_forward
    model = quant_model if inplace else copy.deepcopy(quant_model)
    qnamed, fnamed = dict(model.named_modules()), dict(float_model.named_modules())
    gen = torch.Generator().manual_seed(0 if config.seed is None else config.seed)
    reports: list[BlockReport] = []
    # buffers the forwards write (a counter, a running average) keep their values, in the
    # float model and in the model returned (qround's own wrappers hold results: theirs stay)
    with eval_mode(model), eval_mode(float_model), kept_buffers(float_model), \
            kept_buffers(model, skip=(QuantizedLayer, ActQuantizer)):
        for m in quantized_layers(model).values():
            if m.weight_spec is not None:
                m.weight_mode = "hard"
        if config.capture_cache_mb > 0:
            found: list = []
            q_spans, q_starts = trace_spans(model, lambda: found.append(
                _call_order(model, batches[0], forward)))
            # the spans of the first batch's forward only: later ones, traced for a unit it
            # does not call, would count every module's calls twice
            units, lca, call_rank = _order_units(model, units, batches[0], forward,
                                                 later=batches[1:], traced=found[0])
            with torch.no_grad():
                f_spans, f_starts = trace_spans(float_model,
                                                lambda: forward(float_model, batches[0]))
            budget = budget_bytes(config.capture_cache_mb)
            trained = list(quantized_layers(model))
            q_cache = PrefixCache(model, q_spans, budget, trained, q_starts)
            f_cache = PrefixCache(float_model, f_spans, budget, [], f_starts)
        else:
            units, lca, call_rank = _order_units(model, units, batches[0], forward,
                                                 later=batches[1:])
        _check_connected(model, units, batches[0], forward, batches[1:])
        # every unit's cached data within cache_mb, before the first unit trains
        check_cache(cache_bytes(model, units, lca, batches, forward), config.cache_mb,
                    len(batches))
        for unit in units:
            t0 = time.perf_counter()
            name, last = unit.name, unit.modules[-1]
            if len(unit.modules) == 1:
                block = qnamed[name]
                layers = quantized_layers(block)
                full = tuple(f"{name}.{n}".strip(".") for n in layers)
                entry = block
            else:  # joint unit: inputs at the LCA, output at the last module
                layers = {}
                for mod in unit.modules:
                    inner = quantized_layers(qnamed[mod])
                    layers.update({f"{mod}.{n}".strip("."): m for n, m in inner.items()})
                full = tuple(layers)
                block = _UnitForward(qnamed[lca[unit]], qnamed[last], name)
                entry = qnamed[lca[unit]]
            # the unit's layers in the order the forward calls them (the loss plot's x axis)
            full = tuple(sorted(full, key=lambda n: call_rank.get(n, len(call_rank))))
            entry_name = lca.get(unit, name) if len(unit.modules) > 1 else name
            caches = None
            if config.capture_cache_mb > 0:
                first = unit.modules[0]
                caches = ((q_cache, q_starts.get(entry_name, 0)),
                          (f_cache, f_starts.get(first, f_starts.get(entry_name, 0))))
            data = _capture(float_model, model, fnamed[last], entry, name, batches, forward,
                            config.cache_mb, caches, joint=len(unit.modules) > 1)
            before = _mse(block, data, name)
            saved = {m: copy.deepcopy(qnamed[m].state_dict()) for m in unit.modules}
            iterations = _train_block(block, layers, data, config, gen, name)
            prefix = name if len(unit.modules) == 1 else ""   # joint units: full names
            broken = [".".join(x for x in (prefix, n, k) if x)
                      for n, m in layers.items() for k, p in m.named_parameters()
                      if p.is_floating_point() and not torch.isfinite(p).all()]
            if broken:
                for m, state in saved.items():
                    qnamed[m].load_state_dict(state)
                raise QroundError(
                    f"unit {name!r}: block reconstruction turned {broken[:3]} into NaN/Inf. "
                    "Its gradients were not finite: a NaN or Inf inside the block, even at "
                    "padded positions (a fully masked softmax) that the loss leaves out, "
                    "reaches the weights' gradients. Make the block's values finite there "
                    "(e.g. mask with a large negative number instead of -inf), or quantise "
                    "without reconstruction")
            after = trained = _mse(block, data, name)
            reverted = after > before
            if reverted:
                for m, state in saved.items():
                    qnamed[m].load_state_dict(state)
                after = before
            power = sum(float((y.double() ** 2).sum()) for y in data.targets) / max(
                sum(y.numel() for y in data.targets), 1)
            del data
            report = BlockReport(name, full, before, after, iterations,
                                 time.perf_counter() - t0, reverted, unit.modules, power, trained)
            log.info("unit %s: mse %.4g -> %.4g in %.2f s%s", unit, before, after,
                     report.seconds, f" (reverted: training reached {trained:.4g})"
                     if reverted else "")
            reports.append(report)
    if reports and config.iterations > 0 and all(r.iterations == 0 for r in reports):
        log.warning("block reconstruction trained nothing: no unit has parameters to train "
                    "(train_weights=%s, train_steps=%s: activation steps need abits, "
                    "train_borders=%s: borders need borders=); the model is left as it was",
                    config.train_weights, config.train_steps, config.train_borders)
    return ReconstructResult(model, reports, time.perf_counter() - start)
