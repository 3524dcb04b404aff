"""Write a solved rounding back into a layer: integer codes, scales, and dequantised weights.

``quantized_weight`` gathers the solutions of a layer's problems (one per group of a grouped
conv) into a :class:`QuantizedWeight` (the export format: codes + grid), and ``apply_to_layer``
puts its dequantised weight ``s * (q - z)`` into the module, on a copy unless asked otherwise.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .errors import QroundError, to_numpy
from .grid import Grid
from .problems.layers import layer_kind, weight_not_writable
from .problems.rounding import RoundingProblem
from .solvers.base import Solution


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A layer's rounded weight.

    codes (out, n) int64 in ``[qmin, qmax]``; scale, zero_point (out, groups) where groups is the
    number of input groups of ``group_size`` (1 for per-channel); weight_shape: the module's
    weight shape, e.g. (out, c_in/groups, kh, kw) for a conv.  A transformers ``Conv1D``, which
    stores its weight transposed (in, out), is described as the ``nn.Linear`` it equals:
    ``weight_shape`` is (out, in) and ``dequantized`` is the transpose of ``module.weight``.
    The arrays are read-only.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    symmetric: bool
    group_size: int | None
    weight_shape: tuple[int, ...]

    @property
    def grid(self) -> Grid:
        """The grid of the codes (one row of scales per output channel)."""
        return Grid(self.scale, self.zero_point, self.bits, self.symmetric, self.group_size,
                    self.codes.shape[1])

    @property
    def qmin(self) -> int:
        return self.grid.qmin

    @property
    def qmax(self) -> int:
        return self.grid.qmax

    @property
    def dequantized(self) -> np.ndarray:
        """``s * (q - z)`` float64 in ``weight_shape``."""
        return self.grid.dequantize(self.codes).reshape(self.weight_shape)


def _check_layer(module: nn.Module) -> None:
    """QroundError for a module whose weight this module cannot write: not a Linear or conv.
    A transformers Conv1D stores its weight transposed; the rounding of its problems (made by
    ``problems_from_layer``, on ``W^T``) goes into the nn.Linear it equals."""
    if layer_kind(module) == "hf-conv1d":
        raise QroundError("a transformers Conv1D stores its weight transposed (in, out): write "
                          "the rounding into the nn.Linear it equals, "
                          "qround.problems.layers.linear_from_conv1d(module) (and "
                          "linearize_conv1d(model) for a whole model; quantize_model does this)")


def _check_problems(problems: list) -> None:
    bad = [p for p in problems if not isinstance(p, RoundingProblem)]
    if bad:
        raise QroundError(f"problems must be RoundingProblems, got {type(bad[0]).__name__}")


def _choices(problem: RoundingProblem, solution) -> np.ndarray:
    b = solution.choices if isinstance(solution, Solution) else to_numpy(solution)
    if b.shape != problem.weight.shape:
        raise QroundError(f"solution for {problem.name or 'problem'} has shape {b.shape}, the "
                          f"problem is {problem.weight.shape}")
    return b


def quantized_weight(problems: RoundingProblem | Sequence[RoundingProblem],
                     solutions: Solution | np.ndarray | Sequence, module: nn.Module | None = None
                     ) -> QuantizedWeight:
    """Codes and grid of a layer from its problems and their solutions (Solution or (m, n) 0/1
    choices), one per conv group, concatenated along the output channels.

    module: the layer, for ``weight_shape`` (default: the (out, n) matrix).
    """
    if isinstance(problems, RoundingProblem):
        problems, solutions = [problems], [solutions]
    if isinstance(solutions, Solution):
        raise QroundError(f"problems is a list of {len(list(problems))}: give one solution per "
                          "problem in a list too")
    problems, solutions = list(problems), list(solutions)
    if not problems or len(problems) != len(solutions):
        raise QroundError(f"need one solution per problem, got {len(problems)} problems and "
                          f"{len(solutions)} solutions")
    _check_problems(problems)
    codes = [p.codes(_choices(p, s)) for p, s in zip(problems, solutions)]
    return weight_from_codes(problems, codes, module)


def weight_from_codes(problems: RoundingProblem | Sequence[RoundingProblem], codes,
                      module: nn.Module | None = None) -> QuantizedWeight:
    """Like :func:`quantized_weight`, from integer codes (m, n) per problem in ``[qmin, qmax]``
    on each problem's grid, not necessarily floor or ceil (e.g. from
    :func:`qround.lattice.grid_descent`)."""
    if isinstance(problems, RoundingProblem):
        problems, codes = [problems], [codes]
    problems, codes = list(problems), [to_numpy(c) for c in codes]
    if not problems or len(problems) != len(codes):
        raise QroundError(f"need one code matrix per problem, got {len(problems)} problems and "
                          f"{len(codes)} code matrices")
    _check_problems(problems)
    first = problems[0].grid
    for p, c in zip(problems, codes):
        if p.restricted:
            raise QroundError(f"{p.name or 'problem'} is restricted to other inputs than its "
                              "layer's (RoundingProblem.restrict): its codes are not a layer's "
                              "weight; solve the whole problem to write it back")
        g = p.grid
        if (g.bits, g.symmetric, g.group_size, g.in_features, g.groups) != (
                first.bits, first.symmetric, first.group_size, first.in_features, first.groups):
            raise QroundError("the problems of one layer must share bits, symmetry, group size "
                              "and number of inputs")
        if c.shape != p.weight.shape:
            raise QroundError(f"codes for {p.name or 'problem'} have shape {c.shape}, the "
                              f"problem is {p.weight.shape}")
        if not np.issubdtype(c.dtype, np.integer) or (c.size and (c.min() < g.qmin
                                                                  or c.max() > g.qmax)):
            raise QroundError(f"codes must be integers in [{g.qmin}, {g.qmax}]")
    codes = np.concatenate(codes).astype(np.int64)
    scale = np.concatenate([p.grid.scale for p in problems])
    zero = np.concatenate([p.grid.zero_point for p in problems])
    shape = tuple(codes.shape)
    if module is not None:
        _check_layer(module)
        shape = tuple(module.weight.shape)
        if int(np.prod(shape)) != codes.size or shape[0] != codes.shape[0]:
            raise QroundError(f"module weight {shape} does not match the problems' "
                              f"{codes.shape[0]} x {codes.shape[1]} weights")
    for a in (codes, scale, zero):
        a.flags.writeable = False
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero,
                           bits=first.bits, symmetric=first.symmetric,
                           group_size=first.group_size, weight_shape=shape)


def apply_to_layer(module: nn.Module, qweight: QuantizedWeight, inplace: bool = False) -> nn.Module:
    """Return the layer with its weight set to ``qweight.dequantized`` (in the weight's own dtype
    and device): a deep copy, or ``module`` itself when ``inplace=True``.  Bias is unchanged."""
    _check_layer(module)
    if not isinstance(qweight, QuantizedWeight):
        raise QroundError(f"qweight must be a QuantizedWeight (from quantized_weight or "
                          f"weight_from_codes), got {type(qweight).__name__}")
    why = weight_not_writable(module)
    if why:
        raise QroundError(f"cannot write a rounded weight into this {type(module).__name__}: "
                          f"{why}")
    if tuple(module.weight.shape) != tuple(qweight.weight_shape):
        raise QroundError(f"quantised weight has shape {tuple(qweight.weight_shape)}, layer "
                          f"weight is {tuple(module.weight.shape)}")
    target = module if inplace else copy.deepcopy(module)
    w = target.weight
    with torch.no_grad():
        w.copy_(torch.as_tensor(qweight.dequantized, dtype=w.dtype, device=w.device))
    return target
