"""The QUBO energy of a layer's rounding problem, batched over channels and candidates.

The arithmetic that solvers share (the numba kernels of ``anneal`` and ``tabu`` update the
same fields and deltas incrementally; tests hold them to these).  All functions take numpy
arrays or torch tensors alike (only ``@``, ``*`` and ``.sum`` are used), so CPU and GPU
solvers share it.

Notation.  Per channel ``c`` the choice ``b in {0,1}^n`` moves the
dequantised weight from its floor ``u`` to ``w_hat = u + s*b``.  With ``y = s*b`` (the step taken)
and ``g = 2 (H u - r)`` (the cost gradient at the floor),

    E(b) = y^T H y + g^T y  =  b^T Q b,   Q = S H S + diag(s * g),

and ``E(b) + const == (w_hat - w)^T H (w_hat - w)`` for the local-MSE target ``r = H w``.
The local field is ``f = H y``; flipping ``b_i`` changes ``y_i`` by ``d = s_i (1 - 2 b_i)`` and the
energy by ``d (2 f_i + g_i) + d^2 H_ii``.

Shapes: ``hessian`` is (n, n) shared by all channels or (m, n, n) per channel; ``step``, ``grad``
are (m, n); candidate choices are (..., m, n) with any leading batch dimensions.
"""
from __future__ import annotations


def hessian_times(y, hessian):
    """``H y`` for every channel: y (..., m, n) -> (..., m, n)."""
    if hessian.ndim == 2:
        return y @ hessian  # H is symmetric, so y H == (H y)^T
    if y.ndim > 2 and hasattr(y, "permute"):
        # torch: one batched product per channel, (m, n, n) @ (m, n, L); a broadcast
        # (m, n, n) @ (..., m, n, 1) would copy every channel's H once per leading index
        m, n = y.shape[-2:]
        flat = y.reshape(-1, m, n).permute(1, 2, 0)
        return (hessian @ flat).permute(2, 0, 1).reshape(y.shape)
    return (hessian @ y[..., None])[..., 0]


def energies(choices, step, grad, hessian):
    """QUBO energies ``b^T Q b`` of candidate choices (..., m, n) -> (..., m)."""
    y = choices * step
    return (y * (hessian_times(y, hessian) + grad)).sum(-1)


def local_fields(choices, step, hessian):
    """Local fields ``f = H (s*b)``: (..., m, n)."""
    return hessian_times(choices * step, hessian)


def flip_deltas(choices, step, grad, fields, hessian_diag):
    """Energy change of flipping each single variable: (..., m, n).

    ``hessian_diag`` is (n,) for a shared H or (m, n) per channel.
    """
    d = step * (1 - 2 * choices)
    return d * (2 * fields + grad) + d * d * hessian_diag
