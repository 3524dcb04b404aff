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

The graph comes from ``torch.fx.symbolic_trace``, only to find which layer each BatchNorm
reads: the model returned is the user's own class, not a GraphModule.  The arithmetic is
torch's ``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``.  A BatchNorm is folded when its input
is the output of an ``nn.Conv1d/2d/3d`` (BatchNorm1d/2d/3d to match) or an ``nn.Linear``
(BatchNorm1d) that nothing else reads, the layer and the BatchNorm are each called once, the
layer's weight is its own (not tied), and the BatchNorm tracks running statistics.  The others
stay, with a warning that says why.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ._warn import warn_user
from .errors import QroundError, copy_module, first_line

log = logging.getLogger(__name__)

__all__ = ["check_folded", "fold_batchnorm"]

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d),
          (nn.Conv3d, nn.BatchNorm3d), (nn.Linear, nn.BatchNorm1d))
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace``), in eval mode, in which every
    BatchNorm that directly follows a conv or Linear layer is folded into that layer and
    replaced by ``nn.Identity``.  The model keeps its class, module names and everything else:
    only those layers' weights and biases change (a folded layer gets a bias).  QroundError when
    the model has no BatchNorm, when torch.fx cannot trace it, or when no BatchNorm can be
    folded; a warning names the BatchNorms left as they are, and why."""
    from torch import fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be a torch nn.Module, got {type(model).__name__}")
    norms = [n for n, m in model.named_modules() if isinstance(m, _NORMS)]
    if not norms:
        raise QroundError("model has no BatchNorm1d/2d/3d: nothing to fold")
    try:   # the graph tells which layer each BatchNorm reads, and who else reads that layer
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 (tracing fails in many ways on dynamic code)
        raise QroundError(f"torch.fx cannot trace the model ({type(exc).__name__}: "
                          f"{first_line(exc, 300)}), so the layer before each BatchNorm is "
                          "not known: fold them yourself with torch.nn.utils.fusion."
                          "fuse_conv_bn_eval and replace each BatchNorm by nn.Identity") \
            from None
    modules = dict(model.named_modules())
    tied = _shared(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, left = {}, {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _NORMS):
            continue
        source = node.args[0] if node.args else None
        layer = (modules.get(source.target) if isinstance(source, fx.Node)
                 and source.op == "call_module" else None)
        why = _refusal(modules[node.target], layer, source, calls, node.target)
        if why is None and source.target in tied:
            why = f"{source.target!r} shares its weight with another module"
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
    out = model if inplace else copy_module(model)
    out.eval()
    named = dict(out.named_modules())
    for bn_name, layer_name in pairs.items():
        layer, bn = named[layer_name], named[bn_name]
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        with torch.no_grad():
            _replace(out, layer_name, fuse(layer, bn))
        _replace(out, bn_name, nn.Identity())
    if left:
        warn_user(f"fold_batchnorm left {len(left)} BatchNorm(s) as they are: "
                  + "; ".join(f"{n!r}: {why}" for n, why in list(left.items())[:3])
                  + (" ..." if len(left) > 3 else ""))
    log.info("fold_batchnorm: %s", ", ".join(f"{b} into {c}" for b, c in pairs.items()))
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
