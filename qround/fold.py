"""BatchNorm folded into the convolution or Linear layer before it, so that the weights qround
rounds are the ones an integer accelerator runs.

An inference engine folds each BatchNorm that follows a conv into that conv's weight and bias:
``W' = W * gamma / sqrt(var + eps)`` per output channel, ``b' = (b - mean) * gamma /
sqrt(var + eps) + beta``.  Folding after rounding multiplies each row of codes by its own
factor: the weights stay on a per-channel grid only with the scales multiplied too, and the
saved codes, scales and bias are not the deployed layer's.  Rounding after folding gives them
directly.  Each channel's rounding cost only scales with its factor, so the choice is the same
problem either way: `nearest` and `gptq` chose identical codes on the digits MobileNet, and
the tabu-based solvers other ones on some channels, since the round-off of folding changes
their paths (benchmarks/fold_bn.py).

The graph comes from torch.fx's tracer, run on an eval-mode copy (qround's explicit forms are
leaves), only to find which layer each BatchNorm reads: the model returned is the user's own
class, not a GraphModule.  The arithmetic is torch's ``fuse_conv_bn_eval`` /
``fuse_linear_bn_eval`` (in float32 for half-precision layers).  A BatchNorm is folded when its
input is the output of an ``nn.Conv1d/2d/3d`` (BatchNorm1d/2d/3d to match) or an ``nn.Linear``
(BatchNorm1d) with as many outputs as it has features, that nothing else reads; the layer and
the BatchNorm are each called once, their parameters are not read directly by the forward, the
layer's weight is its own (not tied, not parametrized), and the BatchNorm tracks running
statistics.  A BatchNorm1d needs an example batch besides (:func:`fold_batchnorm`).  The
others stay, with a warning that says why.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from torch import nn

from ._warn import warn_user
from .errors import QroundError, copy_module, first_line

log = logging.getLogger(__name__)

__all__ = ["apply_pairs", "check_folded", "fold_batchnorm", "fold_with_pairs"]

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d),
          (nn.Conv3d, nn.BatchNorm3d), (nn.Linear, nn.BatchNorm1d))
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module, inplace: bool = False, example: Any = None,
                   forward: Callable | None = None) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace``), in eval mode, in which every
    BatchNorm that directly follows a conv or Linear layer is folded into that layer and
    replaced by ``nn.Identity``.  The model keeps its class, module names and everything else:
    only those layers' weights and biases change (a folded layer gets a bias).

    A BatchNorm1d normalises dim 1 of its input, which is the layer's features only for a
    Linear's 2-d output or a batched Conv1d's 3-d one: it is folded only with ``example``, a
    batch run through ``forward(model, batch)`` (default :func:`qround.calibrate.
    default_forward`) that shows its input's rank; with ``example`` the folded model's outputs
    are then checked against the model's (:func:`check_folded`).  QroundError when the model
    has no BatchNorm, when torch.fx cannot trace it, or when no BatchNorm can be folded; a
    warning names the BatchNorms left as they are, and why."""
    return fold_with_pairs(model, inplace, example, forward)[0]


def fold_with_pairs(model: nn.Module, inplace: bool = False, example: Any = None,
                    forward: Callable | None = None) -> tuple[nn.Module, dict[str, str]]:
    """:func:`fold_batchnorm`, and the BatchNorms it folded, each with its layer
    (``{"block1.bn1": "block1.conv1"}``): what a saved file records, and :func:`apply_pairs`
    repeats."""
    from torch import fx

    from .calibrate import default_forward

    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be a torch nn.Module, got {type(model).__name__}")
    norms = [n for n, m in model.named_modules() if isinstance(m, _NORMS)]
    if not norms:
        raise QroundError("model has no BatchNorm1d/2d/3d: nothing to fold")
    forward = forward or default_forward
    # an eval-mode copy is traced: the result runs in eval mode (a forward may branch on
    # self.training), and tracing may write proxies into the module it runs
    try:
        graph = _Tracer().trace(copy_module(model).eval())
    except Exception as exc:  # noqa: BLE001 (tracing fails in many ways on dynamic code)
        raise QroundError(f"torch.fx cannot trace the model ({type(exc).__name__}: "
                          f"{first_line(exc, 300)}), so the layer before each BatchNorm is "
                          "not known: fold them yourself with torch.nn.utils.fusion."
                          "fuse_conv_bn_eval and replace each BatchNorm by nn.Identity") \
            from None
    modules = dict(model.named_modules())
    tied = _shared(model)
    calls: dict[str, int] = {}
    read = set()   # modules whose parameters the forward reads directly (self.conv.weight)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            read.add(node.target.rpartition(".")[0])
    ranks = _input_ranks(model, [n for n in norms if isinstance(modules[n], nn.BatchNorm1d)],
                         example, forward) if example is not None else {}
    pairs, left = {}, {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _NORMS):
            continue
        source = node.args[0] if node.args else None
        layer = (modules.get(source.target) if isinstance(source, fx.Node)
                 and source.op == "call_module" else None)
        why = _refusal(modules[node.target], layer, source, calls, node.target)
        if why is None:
            why = _more_refusals(node.target, source.target, layer, modules[node.target],
                                 tied, read, ranks, example is not None)
        if why:
            left[node.target] = why
        else:
            pairs[node.target] = source.target
    for n in norms:
        if n not in pairs and n not in left:
            left[n] = "the forward does not call it"
    if not pairs:
        raise QroundError("no BatchNorm could be folded: " + "; ".join(
            f"{n!r}: {why}" for n, why in list(left.items())[:3]))
    # with an example the folded copy is checked against the model before the model itself
    # is changed (inplace)
    out = apply_pairs(model if inplace and example is None else copy_module(model), pairs)
    if example is not None:
        check_folded(model, out, example, forward)
        if inplace:
            out = apply_pairs(model, pairs)
    if left:
        warn_user(f"fold_batchnorm left {len(left)} BatchNorm(s) as they are: "
                  + "; ".join(f"{n!r}: {why}" for n, why in list(left.items())[:3])
                  + (" ..." if len(left) > 3 else ""))
    log.info("fold_batchnorm: %s", ", ".join(f"{b} into {c}" for b, c in pairs.items()))
    return out, dict(pairs)


def apply_pairs(model: nn.Module, pairs: dict[str, str]) -> nn.Module:
    """``model`` itself, in eval mode, with each BatchNorm of ``pairs`` folded into its layer
    (``{bn name: layer name}``, as :func:`fold_with_pairs` found them) and replaced by
    nn.Identity; every pair is computed before any module changes.  QroundError naming a pair
    whose modules are missing or of other kinds."""
    named = dict(model.named_modules())
    for bn_name, layer_name in pairs.items():
        layer, bn = named.get(layer_name), named.get(bn_name)
        if not isinstance(bn, _NORMS) or not any(isinstance(layer, a) and isinstance(bn, b)
                                                 for a, b in _PAIRS):
            raise QroundError(f"cannot fold {bn_name!r} into {layer_name!r}: the model has "
                              f"{type(bn).__name__} and {type(layer).__name__} there (was it "
                              "folded already? give the model before folding)")
    fused = {bn_name: _fuse(named[layer_name], named[bn_name])
             for bn_name, layer_name in pairs.items()}
    model.eval()
    for bn_name, layer_name in pairs.items():
        _replace(model, layer_name, fused[bn_name])
        _replace(model, bn_name, nn.Identity())
    return model


class _Tracer:
    """torch.fx's tracer with qround's explicit forms (which torch.fx cannot trace, and which
    hold no BatchNorm) as leaves."""

    def trace(self, model: nn.Module):
        from torch import fx

        from .attention import LinearMultiheadAttention
        from .conv3d import Conv3dAsConv2d
        from .conv_transpose import ConvTransposeAsConv

        leaves = (LinearMultiheadAttention, Conv3dAsConv2d, ConvTransposeAsConv)

        class Tracer(fx.Tracer):
            def is_leaf_module(self, m, qualname):
                return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

        return Tracer().trace(model)


def _input_ranks(model: nn.Module, names: list[str], example, forward) -> dict[str, int]:
    """The rank of each named module's input on ``example`` (run on an eval-mode copy)."""
    from .calibrate import run_forward

    if not names:
        return {}
    probe = copy_module(model).eval()
    named = dict(probe.named_modules())
    ranks: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            if args and isinstance(args[0], torch.Tensor):
                ranks.setdefault(name, args[0].dim())
        return record

    handles = [named[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            run_forward(probe, example, forward)
    finally:
        for h in handles:
            h.remove()
    return ranks


def _more_refusals(bn_name: str, layer_name: str, layer: nn.Module, bn: nn.Module, tied: set,
                   read: set, ranks: dict, have_example: bool) -> str | None:
    from torch.nn.utils import parametrize

    if layer_name in tied:
        return f"{layer_name!r} shares its weight with another module"
    if layer_name in read or bn_name in read:
        return "the forward reads its or its layer's parameters directly"
    if parametrize.is_parametrized(layer):
        return f"{layer_name!r}'s weight is parametrized (weight_norm, spectral_norm...)"
    features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != features:
        return (f"it has {bn.num_features} features and {layer_name!r} {features} outputs: it "
                "normalises another dimension")
    if isinstance(bn, nn.BatchNorm1d):
        want = 2 if isinstance(layer, nn.Linear) else 3
        if not have_example:
            return ("a BatchNorm1d normalises the layer's features only on a "
                    f"{want}-d input: pass example= (a batch) to check its input's rank")
        if ranks.get(bn_name) != want:
            return (f"its input is {ranks.get(bn_name)}-d, so it normalises dim 1, not "
                    f"{layer_name!r}'s features (that takes a {want}-d input)")
    return None


def _fuse(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """``layer`` with ``bn`` folded in (a new module), computed in float32 at least."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    dtype = layer.weight.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    layer_w = copy.deepcopy(layer).to(work).eval()
    bn_w = copy.deepcopy(bn).to(work).eval()
    if isinstance(layer, nn.Linear) and bn_w.weight is None:   # affine=False: torch's Linear
        # fusion reads the BatchNorm's weight and bias
        bn_w.weight = nn.Parameter(torch.ones_like(bn_w.running_mean), requires_grad=False)
        bn_w.bias = nn.Parameter(torch.zeros_like(bn_w.running_mean), requires_grad=False)
    fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
    with torch.no_grad():
        out = fuse(layer_w, bn_w).to(dtype)
    for p in out.parameters():
        p.requires_grad_(layer.weight.requires_grad)
    return out


def check_folded(model: nn.Module, folded: nn.Module, batch, forward) -> None:
    """QroundError unless ``folded`` gives ``model``'s outputs on ``batch`` (both in eval mode,
    without gradients, their buffers kept), up to the round-off of folding.  The graph cannot
    tell a BatchNorm1d after a Linear on (N, features) inputs, which normalises the Linear's
    output features and folds, from one after a Linear on (N, L, features), which normalises
    L and does not: this check can."""
    from .calibrate import eval_mode, kept_buffers, run_forward
    from .reconstruct import _main_tensor

    outputs = []
    for m, which in ((model, "the model"), (folded, "the folded model")):
        with eval_mode(m), kept_buffers(m), torch.no_grad():
            outputs.append(_main_tensor(run_forward(m, batch, forward, 0, which), which))
    y, f = (o.detach().double() for o in outputs)
    if y.shape != f.shape:
        raise QroundError(f"folding the BatchNorms changed the output's shape from "
                          f"{tuple(y.shape)} to {tuple(f.shape)}")
    eps = torch.finfo(outputs[0].dtype).eps if outputs[0].is_floating_point() else 0.0
    scale = float(y.abs().max()) if y.numel() else 0.0
    worst = float((f - y).abs().max()) if y.numel() else 0.0
    if not worst <= max(1e-4, 1000 * eps) * max(scale, 1e-12):
        raise QroundError(f"folding the BatchNorms changed the model's outputs on the first "
                          f"calibration batch (largest difference {worst:.3g}, outputs up to "
                          f"{scale:.3g}): a BatchNorm1d after a Linear that runs on (N, L, "
                          "features) normalises L, not the Linear's features, and cannot be "
                          "folded; leave fold_batchnorm off, or fold by hand what can be")


def _refusal(bn, layer, source, calls: dict, bn_name: str) -> str | None:
    """Why the BatchNorm ``bn`` cannot be folded into ``layer`` (its input's module), or
    None."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False)"
    if layer is None:
        return "its input is not the output of a conv or Linear layer"
    if not any(isinstance(layer, a) and isinstance(bn, b) for a, b in _PAIRS) \
            or type(layer).forward is not _base(layer).forward:
        return f"its input comes from a {type(layer).__name__}, which it does not fold into"
    if len(source.users) > 1:
        return f"the output of {source.target!r} is read elsewhere too"
    if calls.get(source.target, 0) > 1 or calls.get(bn_name, 0) > 1:
        return f"{source.target!r} or the BatchNorm is called more than once"
    if layer.weight.is_meta:
        return f"{source.target!r} has its weights on the meta device"
    return None


def _shared(model: nn.Module) -> set[str]:
    """Names of the modules whose weight another module holds too (tied weights): folding
    would give one of them a new weight and break the tie."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        w = m._parameters.get("weight")
        if w is not None:
            owners.setdefault(id(w), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def _base(layer: nn.Module) -> type:
    return next(t for t, _ in _PAIRS if isinstance(layer, t))


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
