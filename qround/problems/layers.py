"""Rounding problems of torch layers: ``nn.Linear`` and ``nn.Conv2d`` (grouped included), and
the ``Conv1D`` of Hugging Face transformers (GPT-2 and its family), a Linear layer whose weight is
stored transposed, (in, out).

A conv weight (out, c_in/groups, kh, kw) is rounded as the matrix ``weight.reshape(out, -1)``,
whose columns follow the im2col patch order (c_in/groups, kh, kw) that ``qround.calibrate``
uses for ``H`` (AdaRound appendix eq. 5-8).  A grouped conv is one independent problem per
group: output channels of group ``j`` only see input channels of group ``j``, with their own
``H_j`` (groups, n_g, n_g).

torch is imported lazily so that ``qround.problems`` stays importable without loading it.
"""
from __future__ import annotations

import numpy as np

from ..errors import QroundError, as_float_array, copy_module
from ..grid import Grid, GridSpec
from .rounding import RoundingProblem


def is_hf_conv1d(module) -> bool:
    """Whether ``module`` is Hugging Face transformers' ``Conv1D`` (or a subclass): ``y = x W +
    b`` with ``W`` (in, out), the projections of GPT-2 and its family.  Recognised without
    importing transformers."""
    return any(c.__name__ == "Conv1D" and c.__module__.split(".")[0] == "transformers"
               for c in type(module).__mro__) and getattr(getattr(module, "weight", None),
                                                          "ndim", 0) == 2


def layer_kind(module) -> str:
    """``"linear"``, ``"conv2d"`` or ``"hf-conv1d"`` (transformers' Conv1D); QroundError naming
    the type for anything else."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if is_hf_conv1d(module):
        return "hf-conv1d"
    raise QroundError(f"unsupported layer type {type(module).__name__}: only nn.Linear, "
                      "nn.Conv2d and transformers' Conv1D can be rounded")


def linear_from_conv1d(module, share: bool = False):
    """The ``nn.Linear`` equal to a transformers ``Conv1D``: weight ``W^T`` (out, in), the same
    bias, device, dtype and ``requires_grad``, and the Conv1D's forward hooks.  ``share``: the
    Linear's weight is a transposed view of the Conv1D's and the bias the same parameter (no
    copy; for a read-only view of a model); else both are fresh contiguous copies."""
    from torch import nn

    if not is_hf_conv1d(module):
        raise QroundError(f"linear_from_conv1d needs a transformers Conv1D, got "
                          f"{type(module).__name__}")
    if weight_not_writable(module):
        raise QroundError(f"cannot round this Conv1D: {weight_not_writable(module)}")
    w, b = module.weight, module.bias
    linear = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device="meta")
    weight = w.detach().t() if share else w.detach().t().contiguous().clone()
    linear.weight = nn.Parameter(weight, requires_grad=w.requires_grad)
    if b is not None:
        linear.bias = b if share else nn.Parameter(b.detach().clone(),
                                                   requires_grad=b.requires_grad)
    linear.train(module.training)
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(module, hooks):
            setattr(linear, hooks, getattr(module, hooks).copy())
    return linear


def linearize_conv1d(model, share: bool = False):
    """Replace every transformers ``Conv1D`` inside ``model`` by its :func:`linear_from_conv1d`
    (in place: the parents' children change; a Conv1D held under two names is replaced once,
    under both).  Returns ``(model, names)``: the model (a new module when ``model`` itself is
    a Conv1D) and the names of the replaced layers, in ``named_modules`` order.  The outputs are
    those of the Conv1D layers (the same product, the weight read transposed)."""
    if is_hf_conv1d(model):
        return linear_from_conv1d(model, share), [""]
    names, done = [], {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not is_hf_conv1d(module):
            continue
        if id(module) not in done:
            done[id(module)] = linear_from_conv1d(module, share)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[child] = done[id(module)]
        names.append(name)
    return model, names


def linear_view(model):
    """``(view, names)``: ``model`` itself when it holds no transformers ``Conv1D``; else a copy
    of its structure that shares every parameter and buffer with it, with each Conv1D replaced
    by an ``nn.Linear`` over a transposed view of its weight.  ``model`` is not changed, and no
    weight is copied; the view is for reading (capturing statistics, checking shapes)."""
    if not any(is_hf_conv1d(m) for m in model.modules()):
        return model, []
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return linearize_conv1d(copy_module(model, memo=memo), share=True)


def contiguous_weights(model, names) -> None:
    """Make the weights of the layers ``names`` of ``model`` contiguous in place (the Linear
    layers a deep copy of a :func:`linear_view` holds are transposed views)."""
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        if not weight.is_contiguous():
            weight.data = weight.data.contiguous()


def weight_not_writable(module) -> str | None:
    """Why a layer's weight cannot be rounded and written back, or None when it can: a weight
    recomputed from other tensors on every access or forward (a parametrization such as
    ``weight_norm``, pruning's mask, the old ``weight_norm`` hook), or a lazy module's weight
    that no forward has initialised yet.  Writing into such a weight would be lost."""
    from torch import nn
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        return ("its weight is parametrized (weight_norm, spectral_norm...): remove that with "
                "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') first")
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "it is a lazy module whose weight is not initialised yet: run one forward first"
    if not isinstance(weight, nn.Parameter):
        return ("its weight is not a parameter but computed on every forward (pruning, the old "
                "weight_norm): make it permanent first (torch.nn.utils.prune.remove, "
                "torch.nn.utils.remove_weight_norm)")
    return None


def layer_groups(module) -> int:
    """Number of independent input groups: ``module.groups`` for a conv, 1 for a Linear."""
    return int(module.groups) if layer_kind(module) == "conv2d" else 1


def layer_weight(module) -> np.ndarray:
    """The weight as a float64 matrix (out, in); a conv's is (out, c_in/groups * kh * kw), a
    transformers Conv1D's its (in, out) weight transposed."""
    kind = layer_kind(module)
    w = module.weight.detach().to("cpu").double().numpy()
    if kind == "hf-conv1d":
        return w.T.copy()
    return w.reshape(w.shape[0], -1).copy()


def _per_group(arr, name: str, groups: int, out: int, n: int, allow_per_channel: bool):
    """Split statistics of a grouped layer into one array per group.

    Accepts (groups, n, n) (one matrix per group) and, when allowed, (out, n, n) (one per
    output channel, e.g. Fisher).  When ``groups == out`` both readings give the same problems.
    """
    if arr is None:
        return [None] * groups
    a = as_float_array(arr, name, ndim=(2, 3))
    out_g = out // groups
    if groups == 1:
        # (1, n, n) is the one group's matrix (and, if out == 1, the one channel's: the same)
        return [a[0] if a.ndim == 3 and a.shape[0] == 1 else a]
    if a.ndim == 3 and a.shape == (groups, n, n):
        return [a[j] for j in range(groups)]
    if allow_per_channel and a.ndim == 3 and a.shape == (out, n, n):
        return [a[j * out_g:(j + 1) * out_g] for j in range(groups)]
    want = f"({groups}, {n}, {n})" + (f" or ({out}, {n}, {n})" if allow_per_channel else "")
    raise QroundError(f"{name} of a conv with {groups} groups must have shape {want}, "
                      f"got {a.shape}")


def _slice_grid(grid: Grid, rows: slice) -> Grid:
    return Grid(grid.scale[rows], grid.zero_point[rows], grid.bits, grid.symmetric,
                grid.group_size, grid.in_features)


def problems_from_layer(module, hessian, grid: Grid | GridSpec = GridSpec(), name: str = "",
                        cross=None, float_hessian=None, damp: float = 0.0
                        ) -> list[RoundingProblem]:
    """The rounding problems of a layer: one, or one per group of a grouped conv.

    hessian: (n, n) or per channel (out, n, n); for a grouped conv (groups, n_g, n_g) or
    (out, n_g, n_g).  cross / float_hessian: asymmetric statistics ``C``, ``H`` of the same
    per-group shapes (see ``qround.calibrate.capture_asymmetric``).  grid: a GridSpec (fitted
    per problem) or a Grid fitted on the whole (out, n_g) weight matrix.
    Names: ``name`` for one problem, ``f"{name}/group{j}"`` per group.
    """
    w = layer_weight(module)
    groups = layer_groups(module)
    out, n = w.shape
    hs = _per_group(hessian, "hessian", groups, out, n, allow_per_channel=True)
    cs = _per_group(cross, "cross", groups, out, n, allow_per_channel=False)
    fs = _per_group(float_hessian, "float_hessian", groups, out, n, allow_per_channel=False)
    if isinstance(grid, Grid) and (grid.scale.shape[0] != out or grid.in_features != n):
        raise QroundError(f"grid fitted for {grid.scale.shape[0]} x {grid.in_features} weights, "
                          f"layer {name or type(module).__name__} is {out} x {n}")
    out_g = out // groups
    problems = []
    for j in range(groups):
        rows = slice(j * out_g, (j + 1) * out_g)
        g = _slice_grid(grid, rows) if isinstance(grid, Grid) else grid
        label = name if groups == 1 else f"{name}/group{j}"
        problems.append(RoundingProblem.from_weight(w[rows], hs[j], g, cross=cs[j],
                                                    float_hessian=fs[j], damp=damp, name=label))
    return problems
