"""``RoundingProblem``: the per-output-channel QUBOs of rounding one layer (AdaRound).

A problem holds the layer's weights ``W`` (m, n), its grid (per-weight scale and zero point), the
second-moment statistics (``H`` shared (n, n) or per channel (m, n, n)) and the target ``r``
of the objective

    cost_c(w_hat) = w_hat^T H w_hat - 2 w_hat^T r_c + k_c,

with ``r = H w, k = w^T H w`` for local MSE ``(w_hat - w)^T H (w_hat - w)``, or ``r = C w`` and
``k = w^T H_float w`` for asymmetric reconstruction ``E||W x - W_hat x_hat||^2`` (AdaRound eq. 25,
where ``H`` is then ``H_hat = E[x_hat x_hat^T]`` and ``C = E[x_hat x^T]``).

Each weight chooses floor (b=0) or ceil (b=1) of ``w/s``; a weight whose floor and ceil clip to
the same code has no choice (``free == False``, always b=0 with its clipped code as the floor).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np

from ..errors import QroundError, as_float_array, check_psd, to_numpy
from ..grid import Grid, GridSpec, fit_grid
from . import energy as _energy


@dataclass(frozen=True, eq=False)
class RoundingProblem:
    """The rounding QUBOs of one layer (or one group of a grouped conv), one per output channel.

    Build with :meth:`from_weight`; attributes are read-only arrays:

    - ``weight`` (m, n) float64: the float weights, ``hessian`` (n, n) or (m, n, n) float64.
    - ``scale``, ``zero_point`` (m, n): the grid expanded per weight; ``qmin``, ``qmax``.
    - ``floor_codes`` (m, n) int64: codes of b=0; ``free`` (m, n) bool: weights with a choice.
    - ``step`` (m, n): ``s`` where free, 0 where fixed; ``grad`` (m, n): ``2 (H u - r)``;
      ``const`` (m,): energy + const = absolute cost.
    - ``frac`` (m, n): fractional part of ``w/s`` in [0, 1) (0 where fixed): P(up) of stochastic
      rounding and the start of relaxations.
    - ``restricted``: made by :meth:`restrict` over other inputs than the layer's, in its
      order: ``grid`` still describes the whole layer, not these columns.
    """

    weight: np.ndarray
    hessian: np.ndarray
    grid: Grid
    scale: np.ndarray
    zero_point: np.ndarray
    floor_codes: np.ndarray
    free: np.ndarray
    step: np.ndarray
    grad: np.ndarray
    const: np.ndarray
    frac: np.ndarray
    name: str = ""
    restricted: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weight(cls, weight, hessian, grid: Grid | GridSpec | None = None, *,
                    cross=None, float_hessian=None, damp: float = 0.0, check: bool = True,
                    name: str = "") -> "RoundingProblem":
        """Build the problem of a weight matrix.

        weight: (m, n); hessian: (n, n) shared or (m, n, n) per channel (e.g. Fisher-weighted).
        grid: a fitted :class:`Grid`, or a :class:`GridSpec` to fit one (default 4-bit symmetric,
        MSE scales).  cross: ``C = E[x_hat x^T]`` (n, n) for asymmetric reconstruction, with
        ``float_hessian = E[x x^T]`` (n, n) to make the cost absolute (optional: without it the
        constant omits ``w^T H_float w``).
        damp: add ``lambda ||w_hat - w||^2`` to the cost, ``lambda = damp * mean(diag H)`` (per
        channel for a per-channel H): H becomes ``H + lambda I``.  A few thousand calibration
        vectors estimate the low-variance directions of H poorly, and an exact solver exploits
        them; this is GPTQ's damping written as a trust region around the float weights.
        check: verify that H is symmetric positive semi-definite (a QroundError otherwise);
        False skips the whole check, for a caller that built H itself: a non-symmetric H is then
        replaced by its symmetric part ``(H + H^T) / 2``, which has the same quadratic form.
        name: a label shown in the problem's repr, carried into its sub-problems and into
        exported QUBO files (their comments and manifest); solutions do not carry it.
        """
        # private copies: the arrays are frozen below, and the user's own must stay writeable
        w = as_float_array(weight, "weight", ndim=2).copy()
        m, n = w.shape
        if m == 0 or n == 0:
            raise QroundError(f"weight must be non-empty, got shape {w.shape}")
        h = as_float_array(hessian, "hessian", ndim=(2, 3)).copy()
        if h.shape[-2:] != (n, n) or (h.ndim == 3 and h.shape[0] != m):
            want = f"({n}, {n}) or ({m}, {n}, {n})"
            raise QroundError(f"hessian shape {h.shape} does not match weight shape {w.shape}: "
                              f"expected {want}")
        if check:
            check_psd(h, "hessian")
        ht = np.swapaxes(h, -1, -2)
        if not np.array_equal(h, ht):  # within check_psd's tolerance: the energy code needs exact
            h = 0.5 * (h + ht)
        if isinstance(damp, (bool, np.bool_)) or not isinstance(
                damp, (int, float, np.integer, np.floating)) or not (
                np.isfinite(damp) and damp >= 0):
            raise QroundError(f"damp must be a finite number >= 0, got {damp!r}")
        lam = None
        if damp > 0:
            lam = damp * np.mean(np.diagonal(h, axis1=-2, axis2=-1), axis=-1)   # () or (m,)
            h = h + np.multiply.outer(np.atleast_1d(lam), np.eye(n)).reshape(h.shape)
        if cross is None:
            if float_hessian is not None:
                raise QroundError("float_hessian is only used together with cross (C)")
            with np.errstate(over="ignore", invalid="ignore"):  # refused in _assemble
                r = _energy.hessian_times(w, h)
                k = np.sum(w * r, axis=1)
        else:
            if h.ndim != 2:
                raise QroundError("asymmetric reconstruction (cross=) needs a shared (n, n) "
                                  "hessian")
            c = as_float_array(cross, "cross", ndim=2)
            if c.shape != (n, n):
                raise QroundError(f"cross shape {c.shape} does not match weight shape {w.shape}")
            r = w @ c.T  # r_c = C w_c
            if float_hessian is None:
                k = np.zeros(m)
            else:
                hf = as_float_array(float_hessian, "float_hessian", ndim=2)
                if hf.shape != (n, n):
                    raise QroundError(f"float_hessian shape {hf.shape} does not match {w.shape}")
                k = np.sum((w @ hf) * w, axis=1)

        if lam is not None and cross is not None:
            # lambda ||w_hat - w||^2: the quadratic part is in H already; local MSE's r = H w
            # and k = w^T H w include the rest, the asymmetric target needs it added
            lam_c = np.broadcast_to(lam, (m,))
            r = r + lam_c[:, None] * w
            k = k + lam_c * np.sum(w * w, axis=1)
        if grid is None:
            grid = GridSpec()
        if isinstance(grid, GridSpec):
            # mse-output scores on the problem's own cost: with cross= that is the target's
            grid = fit_grid(w, grid, hessian=h, target=None if cross is None else r)
        if not isinstance(grid, Grid):
            raise QroundError(f"grid must be a Grid or GridSpec, got {type(grid).__name__}")
        if grid.scale.shape[0] != m or grid.in_features != n:
            raise QroundError(f"grid fitted for {grid.scale.shape[0]} x {grid.in_features} "
                              f"weights, layer is {m} x {n}")
        return cls._assemble(w, h, grid, r, k, name)

    @classmethod
    def _assemble(cls, w, h, grid: Grid, r, k, name: str) -> "RoundingProblem":
        """The problem of weights ``w`` on ``grid`` for the objective with target ``r``, ``k``."""
        s, z = grid.expand()
        if np.any(~np.isfinite(s)) or np.any(s <= 0):
            raise QroundError("grid scale must be positive and finite (a zero scale cannot "
                              "represent any weight)")
        scaled = w / s
        fl = np.floor(scaled)
        frac = scaled - fl
        lo = np.clip(fl + z, grid.qmin, grid.qmax)
        hi = np.clip(fl + z + 1, grid.qmin, grid.qmax)
        free = lo != hi
        u = s * (lo - z)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
            hu = _energy.hessian_times(u, h)
            grad = 2.0 * (hu - r)
            const = np.sum(u * hu, axis=1) - 2.0 * np.sum(u * r, axis=1) + k
            overflow = not (np.isfinite(grad).all() and np.isfinite(const).all())
        if overflow:
            raise QroundError(f"the cost of {'layer ' + repr(name) if name else 'this layer'} "
                              "overflows float64: weights or hessian entries are too large "
                              f"(max |w| {np.abs(w).max():.3g}, max |H| {np.abs(h).max():.3g}); "
                              "rescale them")
        arrays = dict(weight=w, hessian=h, scale=s, zero_point=z, floor_codes=lo.astype(np.int64),
                      free=free, step=np.where(free, s, 0.0), grad=grad, const=const,
                      frac=np.where(free, frac, 0.0))
        return cls(grid=grid, name=name, **_frozen(arrays))

    # ------------------------------------------------------------------ shapes
    @property
    def num_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def num_inputs(self) -> int:
        return self.weight.shape[1]

    @property
    def shared_hessian(self) -> bool:
        return self.hessian.ndim == 2

    @property
    def hessian_diag(self) -> np.ndarray:
        """(n,) for a shared H, (m, n) per channel."""
        return np.diagonal(self.hessian, axis1=-2, axis2=-1)

    @property
    def qmin(self) -> int:
        return self.grid.qmin

    @property
    def qmax(self) -> int:
        return self.grid.qmax

    # ------------------------------------------------------------------ energies
    def check_choices(self, choices, name: str = "choices") -> np.ndarray:
        """Validate candidate choices (..., m, n) of 0/1 (or bool) and return them as float64."""
        b = to_numpy(choices)
        if b.shape[-2:] != self.weight.shape:
            raise QroundError(f"{name} must have shape (..., {self.num_channels}, "
                              f"{self.num_inputs}), got {b.shape}")
        if b.dtype != bool and not np.all((b == 0) | (b == 1)):
            raise QroundError(f"{name} must be binary (0/1), got other values")
        return b.astype(np.float64)

    def energies(self, choices) -> np.ndarray:
        """QUBO energies ``b^T Q_c b`` of choices (..., m, n) -> (..., m)."""
        b = self.check_choices(choices)
        return _energy.energies(b, self.step, self.grad, self.hessian)

    def costs(self, choices) -> np.ndarray:
        """Absolute costs ``(w_hat - w)^T H (w_hat - w)`` (local MSE): (..., m)."""
        return self.energies(choices) + self.const

    def local_fields(self, choices) -> np.ndarray:
        return _energy.local_fields(self.check_choices(choices), self.step, self.hessian)

    def flip_deltas(self, choices, fields=None) -> np.ndarray:
        """Energy change of each single flip (..., m, n); ``fields`` as from
        :meth:`local_fields`."""
        b = self.check_choices(choices)
        if fields is None:
            fields = _energy.local_fields(b, self.step, self.hessian)
        else:
            fields = as_float_array(fields, "fields")
            if fields.shape != b.shape:
                raise QroundError(f"fields must have the shape of choices {b.shape} (from "
                                  f"local_fields(choices)), got {fields.shape}")
        return _energy.flip_deltas(b, self.step, self.grad, fields, self.hessian_diag)

    # ------------------------------------------------------------------ solutions
    def rtn_choices(self) -> np.ndarray:
        """Rounding-to-nearest (ties up), (m, n) bool."""
        return (self.frac >= 0.5) & self.free

    def rtn_energies(self) -> np.ndarray:
        """QUBO energies (m,) of :meth:`rtn_choices`, computed once (read-only)."""
        if "rtn_energies" not in self._cache:
            e = self.energies(self.rtn_choices())
            e.flags.writeable = False
            self._cache["rtn_energies"] = e
        return self._cache["rtn_energies"]

    def rtn_costs(self) -> np.ndarray:
        """Absolute costs (m,) of :meth:`rtn_choices`, computed once (read-only)."""
        if "rtn_costs" not in self._cache:
            c = self.rtn_energies() + self.const
            c.flags.writeable = False
            self._cache["rtn_costs"] = c
        return self._cache["rtn_costs"]

    def codes(self, choices) -> np.ndarray:
        """Integer codes (m, n) of choices (m, n); fixed weights keep their clipped code."""
        b = self.check_choices(choices).astype(bool) & self.free
        return self.floor_codes + b

    def choices_from_codes(self, codes) -> np.ndarray:
        """Inverse of :meth:`codes`; raises if a code is not the floor or ceil of its weight."""
        q = as_float_array(codes, "codes", ndim=2)
        if q.shape != self.weight.shape:
            raise QroundError(f"codes must have shape {self.weight.shape}, got {q.shape}")
        b = q - self.floor_codes
        if np.any((b != 0) & (b != 1)) or np.any((b == 1) & ~self.free):
            raise QroundError("codes are not floor or ceil of the weights on this grid")
        return b.astype(bool)

    def dequantize(self, choices) -> np.ndarray:
        """Dequantised weights ``s (q - z)`` (m, n)."""
        return self.scale * (self.codes(choices) - self.zero_point)

    # ------------------------------------------------------------------ other grids
    def target(self) -> tuple[np.ndarray, np.ndarray]:
        """``(r, k)`` of the objective ``cost_c(w_hat) = w_hat^T H w_hat - 2 w_hat^T r_c + k_c``:
        (m, n) and (m,).  They do not depend on the grid (see :meth:`with_grid`)."""
        if "target" not in self._cache:
            u = self.scale * (self.floor_codes - self.zero_point)
            hu = _energy.hessian_times(u, self.hessian)
            r = hu - 0.5 * self.grad
            k = self.const - np.sum(u * hu, axis=1) + 2.0 * np.sum(u * r, axis=1)
            for a in (r, k):   # cached, and read by cost_of_codes and with_grid: read-only
                a.flags.writeable = False
            self._cache["target"] = (r, k)
        return self._cache["target"]

    def with_grid(self, grid: Grid) -> "RoundingProblem":
        """The same weights and objective on another grid (e.g. refitted scales): costs of the
        two problems are comparable, both being the absolute cost of the dequantised weights."""
        if not isinstance(grid, Grid):
            raise QroundError(f"grid must be a Grid, got {type(grid).__name__}")
        if self.restricted:
            raise QroundError("with_grid needs a whole layer's problem: a restricted one's "
                              "columns are not the layer grid's")
        if grid.scale.shape[0] != self.num_channels or grid.in_features != self.num_inputs:
            raise QroundError(f"grid fitted for {grid.scale.shape[0]} x {grid.in_features} "
                              f"weights, problem is {self.num_channels} x {self.num_inputs}")
        r, k = self.target()
        return type(self)._assemble(self.weight, self.hessian, grid, r, k, self.name)

    def cost_of_codes(self, codes, scale=None) -> np.ndarray:
        """Absolute cost (m,) of integer codes (m, n) on this grid, or with the scale ``scale``
        (m, n) per weight in its place; codes need not be floor or ceil."""
        q = as_float_array(codes, "codes", ndim=2)
        if q.shape != self.weight.shape:
            raise QroundError(f"codes must have shape {self.weight.shape}, got {q.shape}")
        if scale is None:
            s = self.scale
        else:
            s = as_float_array(scale, "scale", ndim=2)
            if s.shape != self.weight.shape:
                raise QroundError(f"scale must have shape {self.weight.shape} (one per weight), "
                                  f"got {s.shape}")
        w_hat = s * (q - self.zero_point)
        r, k = self.target()
        hw = _energy.hessian_times(w_hat, self.hessian)
        return np.sum(w_hat * hw, axis=1) - 2.0 * np.sum(w_hat * r, axis=1) + k

    def lower_bound(self, *, shift: str = "eigen", max_iter: int = 3000, rtol: float = 1e-3,
                    check_every: int = 25, precision: str = "float32"):
        """A certified lower bound on every channel's optimal cost (a
        :class:`~qround.problems.bounds.LowerBound`): the convex relaxation over ``[0, 1]^n``,
        shifted by H's smallest eigenvalue, solved by projected gradient; see
        :mod:`qround.problems.bounds`.  ``bound.certified_gap(solution.cost)`` says how much
        of RTN's excess a solution may still leave; weak where few weights clip."""
        from .bounds import lower_bound

        return lower_bound(self, shift=shift, max_iter=max_iter, rtol=rtol,
                           check_every=check_every, precision=precision)

    # ------------------------------------------------------------------ exports
    def qubo(self, channel: int) -> np.ndarray:
        """The dense symmetric ``Q_c`` (n, n) with ``E_c(b) = b^T Q_c b``."""
        c = self._channel(channel)
        s = self.step[c]
        h = self.hessian if self.shared_hessian else self.hessian[c]
        q = s[:, None] * h * s[None, :]
        q[np.diag_indices_from(q)] += s * self.grad[c]
        return q

    def to_bqm(self, channel: int):
        """A dimod ``BinaryQuadraticModel`` of channel ``c`` over its free variables.

        Variables are labelled by input index; the offset is ``const_c``, so the BQM energy of a
        sample is the absolute cost of the channel.  Fixed (clipped) weights are not variables.
        """
        import dimod

        c = self._channel(channel)
        idx = np.flatnonzero(self.free[c])
        q = self.qubo(c)[np.ix_(idx, idx)]
        lin = np.diag(q).copy()
        # off-diagonal pairs counted once: b^T Q b = sum_i Q_ii b_i + sum_{i<j} 2 Q_ij b_i b_j
        iu, ju = np.triu_indices(len(idx), k=1)
        quad = 2.0 * q[iu, ju]
        bqm = dimod.BinaryQuadraticModel.from_numpy_vectors(
            lin, (iu, ju, quad), float(self.const[c]), dimod.BINARY,
            variable_order=list(map(int, idx)))
        return bqm

    def _channel(self, channel: int) -> int:
        if isinstance(channel, (bool, np.bool_)) or not isinstance(channel, (int, np.integer)):
            raise QroundError(f"channel must be an integer index, got {channel!r}")
        if not -self.num_channels <= int(channel) < self.num_channels:
            raise QroundError(f"channel {channel} out of range for {self.num_channels} channels")
        return int(channel) % self.num_channels

    def subproblem(self, channels) -> "RoundingProblem":
        """The problem restricted to some channels: a slice, integer indices (in the order
        given, each at most once) or an (m,) boolean mask."""
        idx = _select(channels, self.num_channels, "channels")
        g = self.grid
        grid = Grid(g.scale[idx], g.zero_point[idx], g.bits, g.symmetric, g.group_size,
                    g.in_features)
        arrays = {k: getattr(self, k)[idx] for k in ("weight", "scale", "zero_point", "floor_codes",
                                                       "free", "step", "grad", "const", "frac")}
        arrays["hessian"] = self.hessian if self.shared_hessian else self.hessian[idx]
        return RoundingProblem(grid=grid, name=self.name, restricted=self.restricted,
                               **_frozen(arrays))

    def restrict(self, inputs, held) -> "RoundingProblem":
        """The problem over a subset of inputs, every other variable held at ``held``.

        inputs: (k,) input indices, the same for every channel, in the order the restricted
        problem's variables take (each at most once), or an (n,) boolean mask; held: (m, n)
        choices of the others.  Costs stay absolute: ``restrict(I, b).costs(b[:, I]) == costs(b)``.
        Useful for small real instances (exact optima, dimod's ExactSolver) cut from a real layer.
        """
        idx = _select(inputs, self.num_inputs, "inputs")
        held = self.check_choices(held, "held")
        if held.ndim != 2:
            raise QroundError("held must be one (m, n) choice matrix")
        rest = np.ones(self.num_inputs, dtype=bool)
        rest[idx] = False
        y_rest = np.where(rest, held * self.step, 0.0)          # steps of the held variables
        f_rest = _energy.hessian_times(y_rest, self.hessian)    # their field on everything
        e_rest = np.sum(y_rest * (f_rest + self.grad), axis=1)  # their own energy
        h = self.hessian[np.ix_(idx, idx)] if self.shared_hessian else \
            self.hessian[:, idx][:, :, idx]
        g = self.grid
        grid = Grid(g.scale, g.zero_point, g.bits, g.symmetric, g.group_size, g.in_features)
        arrays = {k: getattr(self, k)[:, idx] for k in ("weight", "scale", "zero_point",
                                                        "floor_codes", "free", "step", "frac")}
        arrays["grad"] = self.grad[:, idx] + 2.0 * f_rest[:, idx]
        arrays["const"] = self.const + e_rest
        arrays["hessian"] = np.ascontiguousarray(h)
        # the grid object keeps describing the full layer; a restricted problem has no layer
        # grid (unless it keeps every input in order)
        restricted = self.restricted or not np.array_equal(idx, np.arange(self.num_inputs))
        return RoundingProblem(grid=grid, name=f"{self.name}[{idx.size} inputs]",
                               restricted=restricted, **_frozen(arrays))

    def __repr__(self) -> str:
        kind = "shared" if self.shared_hessian else "per-channel"
        return (f"RoundingProblem({self.name + ', ' if self.name else ''}{self.num_channels}x"
                f"{self.num_inputs}, {self.grid.bits}-bit, {kind} H, "
                f"{int(self.free.sum())} free variables)")


def _frozen(arrays: dict) -> dict:
    """The problem's own arrays, made read-only (its caches, RTN energies for one, rely on it)."""
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


def _slice_bound(part, index: slice, what: str) -> int | None:
    """A slice's start, stop or step as a Python int (anything with ``__index__``: numpy and
    0-d torch integers too) or None; a float, a string or a bool is a QroundError."""
    if part is None:
        return None
    is_bool = isinstance(part, (bool, np.bool_)) or str(getattr(part, "dtype", "")) in (
        "bool", "torch.bool")   # a 0-d bool array or tensor has an __index__ too
    if not is_bool:
        try:
            return operator.index(part)
        except TypeError:
            pass
    raise QroundError(f"{what}: a slice takes integers or None, got {index!r}")


def _select(index, size: int, what: str) -> np.ndarray:
    """Integer positions (k,) of a non-empty selection of ``range(size)``: a slice, integer
    indices (negative ones count from the end; each at most once) or a boolean mask of length
    ``size``.  Anything else is a :class:`QroundError` naming ``what``."""
    if isinstance(index, slice):
        bounds = [_slice_bound(part, index, what) for part in (index.start, index.stop,
                                                               index.step)]
        if bounds[2] == 0:
            raise QroundError(f"{what}: a slice step cannot be zero")
        idx = np.arange(size)[slice(*bounds)]
    else:
        arr = np.asarray(index)
        if arr.size == 0:
            raise QroundError(f"{what} select nothing")
        if arr.dtype == bool:
            if arr.shape != (size,):
                raise QroundError(f"{what}: a boolean mask must have shape ({size},), got "
                                  f"{arr.shape}")
            idx = np.flatnonzero(arr)
        elif arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
            raise QroundError(f"{what} must be integer indices, a slice or a boolean mask, got "
                              f"dtype {arr.dtype} and shape {arr.shape}")
        else:
            idx = arr.reshape(-1).astype(np.int64)
            if idx.size and (idx.min() < -size or idx.max() >= size):
                raise QroundError(f"{what} must lie in [0, {size}), got {idx.min()}..{idx.max()}")
            idx = idx % size
            values, counts = np.unique(idx, return_counts=True)
            if (counts > 1).any():
                raise QroundError(f"{what} must not repeat an index; repeated: "
                                  f"{values[counts > 1].tolist()}")
    if idx.size == 0:
        raise QroundError(f"{what} select nothing of the {size}")
    return idx
