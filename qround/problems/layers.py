"""Rounding problems of torch layers: ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` (grouped
included), and the ``Conv1D`` of Hugging Face transformers (GPT-2 and its family), a Linear layer
whose weight is stored transposed, (in, out).

A conv weight (out, c_in/groups, kh, kw) is rounded as the matrix ``weight.reshape(out, -1)``,
whose columns follow the im2col patch order (c_in/groups, kh, kw) that ``qround.calibrate``
uses for ``H`` (AdaRound appendix eq. 5-8).  An ``nn.Conv1d`` (out, c_in/groups, k) is the
Conv2d with kernel (1, k) on inputs (N, C, 1, L) (:func:`conv2d_view`): same matrix, same
patch order.  A grouped conv is one independent problem per
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
    """``"linear"``, ``"conv2d"``, ``"conv1d"`` (torch's nn.Conv1d) or ``"hf-conv1d"``
    (transformers' Conv1D); QroundError naming the type for anything else."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if is_hf_conv1d(module):
        return "hf-conv1d"
    native = type(module).forward in (nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward,
                                      nn.Conv3d.forward)   # a subclass's own is not rounded
    hint = "" if not native else (
        " (qround.conv_transpose.explicit_conv_transpose(model) makes each transposed "
        "convolution the nn.Conv2d/Conv1d it equals, its `conv`)"
        if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else
        " (qround.conv3d.explicit_conv3d(model) makes each an nn.Conv2d over depth-stacked "
        "channels, its `conv`)")
    raise QroundError(f"unsupported layer type {type(module).__name__}: only nn.Linear, "
                      f"nn.Conv2d, nn.Conv1d and transformers' Conv1D can be rounded{hint}")


def conv2d_view(module):
    """The ``nn.Conv2d`` that computes a conv layer: the module itself for an nn.Conv2d; for an
    nn.Conv1d, a Conv2d on the meta device (no storage) with kernel, stride, padding and
    dilation ``(1, k)``, ``(1, s)``, ``(0, p)``, ``(1, d)``, the same groups and padding mode.
    ``conv1d(x)`` equals ``view._conv_forward(x.unsqueeze(-2), w.unsqueeze(-2), b).squeeze(-2)``
    and its im2col patches are the Conv2d's, so the code written for Conv2d serves both.
    None for any other module."""
    from torch import nn

    if isinstance(module, nn.Conv2d):
        return module
    if not isinstance(module, nn.Conv1d):
        return None
    padding = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
    return nn.Conv2d(module.in_channels, module.out_channels, (1, module.kernel_size[0]),
                     stride=(1, module.stride[0]), padding=padding,
                     dilation=(1, module.dilation[0]), groups=module.groups,
                     bias=False, padding_mode=module.padding_mode, device="meta")


def _conv1d_class(module):
    """The transformers ``Conv1D`` class in ``module``'s MRO (None if it has none)."""
    return next((c for c in type(module).__mro__ if c.__name__ == "Conv1D"
                 and c.__module__.split(".")[0] == "transformers"), None)


def conv1d_refusals(model) -> dict[str, str]:
    """The transformers ``Conv1D`` layers of ``model`` that cannot be rounded as an nn.Linear,
    by name (every name of a layer held under two), with the reason:

    - a subclass with its own ``forward`` (the Linear would compute something else);
    - a weight that cannot be written (:func:`weight_not_writable`);
    - a weight shared with a module that is not a Conv1D (tied: the Linear holds the transposed
      weight, so the tie could not be kept)."""
    owners: dict[int, list] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, module))
    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not is_hf_conv1d(module):
            continue
        base = _conv1d_class(module)
        why = weight_not_writable(module)
        others = [n for n, m in owners.get(id(module.weight), []) if not is_hf_conv1d(m)]
        if type(module).forward is not base.forward:
            out[name] = (f"{type(module).__name__} subclasses transformers' Conv1D with its own "
                         "forward: left in float")
        elif why:
            out[name] = f"cannot round this Conv1D: {why}"
        elif others:
            out[name] = (f"shares its weight with {others[0]!r}, which is not a Conv1D (tied "
                         "weights): left in float")
    return out


def linear_from_conv1d(module, share: bool = False):
    """The ``nn.Linear`` equal to a transformers ``Conv1D``: weight ``W^T`` (out, in), the same
    bias, device, dtype and ``requires_grad``, and the Conv1D's forward hooks (the same hook
    dicts: a handle of the Conv1D removes its hook from both).  ``share``: the Linear's weight is
    a transposed view of the Conv1D's and the bias the same parameter (no copy; for a read-only
    view of a model); else both are fresh contiguous copies."""
    return _linear_from_conv1d(module, share, {})


def _linear_from_conv1d(module, share: bool, made: dict):
    """:func:`linear_from_conv1d`; ``made`` ({id(old parameter): new parameter}) keeps a weight
    or bias that two Conv1D layers share shared by their Linear layers too."""
    import torch
    from torch import nn

    if not is_hf_conv1d(module):
        raise QroundError(f"linear_from_conv1d needs a transformers Conv1D, got "
                          f"{type(module).__name__}")
    why = conv1d_refusals(module).get("")
    if why:
        raise QroundError(why)
    w, b = module.weight, module.bias
    linear = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device="meta")
    if id(w) not in made:
        weight = w.detach().t() if share else w.detach().t().clone(
            memory_format=torch.contiguous_format)
        made[id(w)] = nn.Parameter(weight, requires_grad=w.requires_grad)
        if share:   # a view: tied-weight checks see the Conv1D's own Parameter through it
            made[id(w)]._qround_conv1d_source = w
    linear.weight = made[id(w)]
    if b is not None:
        if id(b) not in made:
            made[id(b)] = b if share else nn.Parameter(b.detach().clone(),
                                                       requires_grad=b.requires_grad)
        linear.bias = made[id(b)]
    linear.train(module.training)
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(module, hooks):
            setattr(linear, hooks, getattr(module, hooks))
    return linear


def linearize_conv1d(model, share: bool = False, names=None):
    """Replace transformers ``Conv1D`` layers inside ``model`` by their
    :func:`linear_from_conv1d`, in place (the parents' children change).

    names: the layers to replace (None: every Conv1D that :func:`conv1d_refusals` does not
    refuse; a refused one named here is an error).  A layer held under two names is replaced
    under both, and Conv1D layers that share a weight become Linear layers that share one.
    Returns ``(model, replaced)``: the model (a new module when ``model`` itself is a Conv1D)
    and ``{name: the Conv1D it replaced}`` for every name (aliases included), in
    ``named_modules`` order; :func:`restore_conv1d` puts them back.  The outputs are those of
    the Conv1D layers (the same product, the weight read transposed)."""
    refused = conv1d_refusals(model)
    if names is not None:
        names = set(names)
        bad = sorted(names & set(refused))
        if bad:
            raise QroundError(f"{bad[0]!r}: {refused[bad[0]]}")
    made_params: dict = {}
    if is_hf_conv1d(model):
        if names is not None and "" not in names or "" in refused:
            return model, {}
        return _linear_from_conv1d(model, share, made_params), {"": model}
    chosen = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_hf_conv1d(module) and name not in refused and (names is None or name in names):
            chosen[name] = module
    # every name of a chosen layer is replaced, the aliases not asked for too (one module)
    ids = {id(m) for m in chosen.values()}
    replaced, made = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in ids:
            continue
        if id(module) not in made:
            made[id(module)] = _linear_from_conv1d(module, share, made_params)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[child] = made[id(module)]
        replaced[name] = module
    return model, replaced


def restore_conv1d(model, replaced: dict):
    """Undo :func:`linearize_conv1d`: every name of ``replaced`` ({name: Conv1D}) that holds a
    plain ``nn.Linear`` again holds its Conv1D, with the Linear's weight (transposed) and bias
    copied into the Conv1D's own parameters.  A name whose module is something else (a wrapper
    of the activation stage) keeps it.  Returns the model (the Conv1D when the model itself was
    one)."""
    import torch
    from torch import nn

    for name, conv in replaced.items():
        current = model.get_submodule(name) if name else model
        if type(current) is not nn.Linear:
            continue
        with torch.no_grad():
            src = current.weight.t()
            if not (src.data_ptr() == conv.weight.data_ptr() and src.stride() ==
                    conv.weight.stride()):   # a view of the Conv1D's weight is already there
                conv.weight.copy_(src)
            if current.bias is not None and current.bias is not conv.bias:
                if conv.bias is None:
                    conv.bias = nn.Parameter(torch.zeros_like(current.bias),
                                             requires_grad=current.bias.requires_grad)
                conv.bias.copy_(current.bias)
        if not name:
            return conv
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[child] = conv
    return model


def conv1d_source(param):
    """The Conv1D weight Parameter that ``param`` (the weight of a Linear made by
    :func:`linearize_conv1d` with ``share=True``) is a transposed view of, else ``param``."""
    return getattr(param, "_qround_conv1d_source", param)


def linear_view(model, names=None):
    """``(view, replaced)``: ``model`` itself and {} when it has no Conv1D to replace; else a
    copy of its structure that shares every parameter, buffer and tensor attribute with it, with
    the transformers Conv1D layers (``names``, None: every one :func:`conv1d_refusals` allows)
    replaced by nn.Linear layers over transposed views of their weights.  ``model`` is not
    changed, and no weight is copied; the view is for reading (capturing statistics, checking
    shapes)."""
    import torch

    if not any(is_hf_conv1d(m) for m in model.modules()) or (names is not None and not names):
        return model, {}
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value
    view, replaced = linearize_conv1d(copy_module(model, memo=memo), share=True, names=names)
    if not replaced:
        return model, {}
    return view, replaced


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
        params = dict(module.named_parameters(recurse=False))
        buffers = dict(module.named_buffers(recurse=False))
        fix = ("torch.nn.utils.prune.remove(module, 'weight')" if "weight_mask" in buffers else
               "torch.nn.utils.remove_spectral_norm(module)" if "weight_u" in buffers else
               "torch.nn.utils.remove_weight_norm(module)" if "weight_g" in params else
               "torch.nn.utils.prune.remove, torch.nn.utils.remove_weight_norm or "
               "remove_spectral_norm")
        return ("its weight is not a parameter but computed on every forward (pruning, the old "
                f"weight_norm or spectral_norm): make it permanent first ({fix})")
    return None


def bias_not_writable(module) -> str | None:
    """Why bias correction cannot add to a layer's bias, or None when it can (a parameter, or
    no bias: one is added): a parametrized or computed bias would lose the addition."""
    from torch import nn
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "bias"):
        return ("its bias is parametrized, so bias correction's addition would be lost: remove "
                "that with torch.nn.utils.parametrize.remove_parametrizations(module, 'bias'), "
                "or turn bias_correction off")
    bias = getattr(module, "bias", None)
    if bias is not None and not isinstance(bias, nn.Parameter):
        return ("its bias is not a parameter but computed on every forward, so bias "
                "correction's addition would be lost: turn bias_correction off")
    return None


def forward_hooks(module) -> list[str]:
    """The kinds of hooks registered on ``module`` itself (forward, forward pre-, backward,
    backward pre-hooks), which a wrapper calling its weight directly would not run."""
    kinds = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
             "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}
    return [label for attr, label in kinds.items() if getattr(module, attr, None)]


def layer_groups(module) -> int:
    """Number of independent input groups: ``module.groups`` for a conv, 1 for a Linear."""
    return int(module.groups) if layer_kind(module) in ("conv2d", "conv1d") else 1


def layer_weight(module) -> np.ndarray:
    """The weight as a float64 matrix (out, in); a conv's is (out, c_in/groups * kh * kw), a
    transformers Conv1D's its (in, out) weight transposed."""
    kind = layer_kind(module)
    w = module.weight.detach().to("cpu").double().numpy()
    if w.size == 0:
        raise QroundError(f"the layer's weight is empty (shape {tuple(w.shape)}): nothing to "
                          "round")
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


# merge_groups="auto": groups of at most this many output channels (depthwise convs: 1), and
# per-channel statistics of at most this many bytes.  benchmarks/grouped_merge.py: merged is
# 3-25x faster for groups of 1-2 channels, 1.3-2.2x for 4, and 0.7-1.3x for 8 (the per-group
# problems share H, which the solvers batch); 4 groups of 64 channels: 0.04-0.24x
_MERGE_CHANNELS, _MERGE_BYTES = 4, 64 * 2 ** 20


def problems_from_layer(module, hessian, grid: Grid | GridSpec = GridSpec(), name: str = "",
                        cross=None, float_hessian=None, damp: float = 0.0,
                        merge_groups: bool | str = False) -> list[RoundingProblem]:
    """The rounding problems of a layer: one, or one per group of a grouped conv.

    hessian: (n, n) or per channel (out, n, n); for a grouped conv (groups, n_g, n_g) or
    (out, n_g, n_g).  cross / float_hessian: asymmetric statistics ``C``, ``H`` of the same
    per-group shapes (see ``qround.calibrate.capture_asymmetric``).  grid: a GridSpec (fitted
    per problem) or a Grid fitted on the whole (out, n_g) weight matrix.
    Names: ``name`` for one problem, ``f"{name}/group{j}"`` per group.

    merge_groups: True gives a grouped conv one problem named ``name`` whose H is per channel
    (each output channel its group's): the same cost and grid per channel as the per-group
    problems, solved in one batch (a depthwise conv's groups have one channel each; solving
    them one at a time costs a solver call per channel).  A solver sees one problem: a budget
    it sets per problem (tabu's iterations, from the largest count of free variables) then
    covers the whole layer, so its codes may differ from the per-group ones.  Not with
    ``cross`` (asymmetric problems need a shared H).  ``"auto"`` (as ``quantize_model``
    does): merge when the groups have at most 4 output channels, there is no ``cross``, and
    the per-channel H takes at most 64 MiB.
    """
    w = layer_weight(module)
    groups = layer_groups(module)
    out, n = w.shape
    if merge_groups not in (True, False, "auto"):
        raise QroundError(f"merge_groups must be True, False or 'auto', got {merge_groups!r}")
    hs = _per_group(hessian, "hessian", groups, out, n, allow_per_channel=True)
    cs = _per_group(cross, "cross", groups, out, n, allow_per_channel=False)
    fs = _per_group(float_hessian, "float_hessian", groups, out, n, allow_per_channel=False)
    if isinstance(grid, Grid) and (grid.scale.shape[0] != out or grid.in_features != n):
        raise QroundError(f"grid fitted for {grid.scale.shape[0]} x {grid.in_features} weights, "
                          f"layer {name or type(module).__name__} is {out} x {n}")
    out_g = out // groups
    if merge_groups is True and cross is not None:
        raise QroundError("merge_groups=True gives the merged problem a per-channel H, and "
                          "asymmetric statistics (cross=) need a shared one: leave "
                          "merge_groups False (one problem per group)")
    if merge_groups == "auto":
        merge_groups = (groups > 1 and out_g <= _MERGE_CHANNELS and cross is None
                        and out * n * n * 8 <= _MERGE_BYTES)
    if groups > 1 and merge_groups:
        h = np.concatenate([np.broadcast_to(hj, (out_g, n, n)) if hj.ndim == 2 else hj
                            for hj in hs])
        return [RoundingProblem.from_weight(w, h, grid, damp=damp, name=name)]
    problems = []
    for j in range(groups):
        rows = slice(j * out_g, (j + 1) * out_g)
        g = _slice_grid(grid, rows) if isinstance(grid, Grid) else grid
        label = name if groups == 1 else f"{name}/group{j}"
        problems.append(RoundingProblem.from_weight(w[rows], hs[j], g, cross=cs[j],
                                                    float_hessian=fs[j], damp=damp, name=label))
    return problems
