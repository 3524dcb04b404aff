"""Rounding problems of torch layers: ``nn.Linear`` and ``nn.Conv2d`` (grouped included).

A conv weight (out, c_in/groups, kh, kw) is rounded as the matrix ``weight.reshape(out, -1)``,
whose columns follow the im2col patch order (c_in/groups, kh, kw) that ``qround.calibrate``
uses for ``H`` (AdaRound appendix eq. 5-8).  A grouped conv is one independent problem per
group: output channels of group ``j`` only see input channels of group ``j``, with their own
``H_j`` (groups, n_g, n_g).

torch is imported lazily so that ``qround.problems`` stays importable without loading it.
"""
from __future__ import annotations

import numpy as np

from ..errors import QroundError, as_float_array
from ..grid import Grid, GridSpec
from .rounding import RoundingProblem


def layer_kind(module) -> str:
    """``"linear"`` or ``"conv2d"``; QroundError naming the type for anything else."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    raise QroundError(f"unsupported layer type {type(module).__name__}: only nn.Linear and "
                      "nn.Conv2d can be rounded")


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
    """The weight as a float64 matrix (out, in); a conv's is (out, c_in/groups * kh * kw)."""
    layer_kind(module)
    w = module.weight.detach().to("cpu").double().numpy()
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
