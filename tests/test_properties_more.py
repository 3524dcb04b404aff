"""Property tests for the variants of the QUBO identities that the other files leave out.

Every reference here is computed from the data (calibration rows x, x_hat) or from the grid
arithmetic directly, not from the package's energy code: grouped and asymmetric grids,
per-channel (Fisher-like) Hessians, the asymmetric objective (cross / float_hessian), damping,
weights clipped or sitting exactly at the grid's ends, restricted problems, the dimod / .qubo
exports, polishers from random starts, write-back into convs (im2col), transformers Conv1D and
float32 layers, the lattice (widen) descent, and scale refits.
"""
from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import dimod
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from qround import GridSpec, RoundingProblem
from qround.calibrate import capture_hessians
from qround.grid import fit_grid
from qround.lattice import grid_descent
from qround.problems import problems_from_layer
from qround.problems.qubo_files import export_qubos, read_qubo, read_qubo_bqm, write_qubo
from qround.scales import refit_scales, solve_refitting
from qround.solvers import Exact, get_solver
from qround.writeback import apply_to_layer, quantized_weight, weight_from_codes

torch.set_num_threads(1)
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- the test layer
class Case:
    """A random layer with its calibration data, and a direct (data) cost of any choices."""

    def __init__(self, seed, m, groups, gs, bits, symmetric, per_channel, grouped, cross, damp,
                 ends, dead=False, rows=40):
        rng = self.rng = np.random.default_rng(seed)
        n = self.n = groups * gs
        self.m = m
        mix = rng.normal(size=(n, n)) / np.sqrt(n) + np.eye(n)
        x = rng.standard_t(df=4, size=(rows, n)) @ mix
        if dead:   # an input that is always zero (H row and column 0), and few rows: H singular
            x[:, rng.integers(n)] = 0.0
            x = x[: max(1, n // 2)]
            rows = x.shape[0]
        self.x = x
        self.x_hat = x + 0.1 * rng.normal(size=x.shape)
        self.per_channel = per_channel and not cross
        self.cross = cross
        self.g2 = rng.uniform(0.2, 2.0, size=(rows, m)) ** 2        # Fisher-like weights
        w = rng.normal(size=(m, n)) * rng.uniform(0.05, 5)
        sign = rng.integers(3)   # all-positive / all-negative rows put the zero point at an end
        if sign:
            w = np.abs(w) * (1 if sign == 1 else -1)
        spec = GridSpec(bits=bits, symmetric=symmetric,
                        group_size=gs if grouped and groups > 1 else None)
        grid = fit_grid(w, spec)
        if ends:   # weights exactly at the ends, beyond them, and exactly on an interior point
            s, z = grid.expand()
            qmin, qmax = grid.qmin, grid.qmax
            for c in range(m):
                j = rng.permutation(n)
                w[c, j[0]] = s[c, j[0]] * (qmax - z[c, j[0]])
                if n > 1:
                    w[c, j[1]] = s[c, j[1]] * (qmin - z[c, j[1]] - rng.uniform(0, 3))
                if n > 2:
                    w[c, j[2]] = s[c, j[2]] * (qmax - z[c, j[2]] + rng.uniform(0, 3))
                if n > 3:
                    w[c, j[3]] = s[c, j[3]] * (qmin - z[c, j[3]])
                if n > 4:
                    w[c, j[4]] = s[c, j[4]] * (int(rng.integers(qmin, qmax + 1)) - z[c, j[4]])
        self.w = w
        self.grid = grid
        self.damp = damp
        kw = {}
        if cross:
            h = self.x_hat.T @ self.x_hat / rows
            kw = dict(cross=self.x_hat.T @ x / rows, float_hessian=x.T @ x / rows)
        elif self.per_channel:
            h = np.einsum("rc,ri,rj->cij", self.g2, x, x) / rows
        else:
            h = x.T @ x / rows
        self.h_given = h
        self.problem = RoundingProblem.from_weight(w, h, grid, damp=damp, **kw)

    def codes(self, b):
        """Codes of choices from the grid arithmetic: clip(floor(w/s) + z + b)."""
        s, z = self.grid.expand()
        g = self.grid
        return np.clip(np.floor(self.w / s) + z + np.asarray(b, dtype=float), g.qmin, g.qmax)

    def w_hat(self, b=None, codes=None, scale=None):
        s, z = self.grid.expand()
        if scale is not None:
            s = scale
        q = self.codes(b) if codes is None else np.asarray(codes, dtype=float)
        return s * (q - z)

    def cost_of_w_hat(self, w_hat):
        """The layer cost from the data: E||W x - W_hat x_hat||^2 (or the H-weighted local error)
        plus damping lambda ||w_hat - w||^2, per channel."""
        d = w_hat - self.w
        if self.cross:
            cost = np.mean((self.x @ self.w.T - self.x_hat @ w_hat.T) ** 2, axis=0)
        elif self.per_channel:
            cost = np.mean(self.g2 * (self.x @ d.T) ** 2, axis=0)
        else:
            cost = np.mean((self.x @ d.T) ** 2, axis=0)
        if self.damp:
            diag = np.diagonal(self.h_given, axis1=-2, axis2=-1)
            lam = self.damp * np.mean(diag, axis=-1)
            cost = cost + lam * np.sum(d * d, axis=1)
        return cost

    def cost(self, b=None, codes=None, scale=None):
        return self.cost_of_w_hat(self.w_hat(b, codes, scale))

    def tol(self):
        """Absolute tolerance per channel: round-off of the cancelling sums."""
        big = np.abs(self.w).max() + np.abs(self.w_hat(np.ones((self.m, self.n)))).max() + 1
        return 1e-9 * big ** 2 * (np.abs(self.x).max() + 1) ** 2 * self.n

    def random_choices(self, shape=None):
        return self.rng.integers(0, 2, size=shape or (self.m, self.n)).astype(bool)


case_args = dict(seed=st.integers(0, 2 ** 16), m=st.integers(1, 3), groups=st.integers(1, 3),
                 gs=st.integers(1, 3), bits=st.integers(2, 4), symmetric=st.booleans(),
                 per_channel=st.booleans(), grouped=st.booleans(), cross=st.booleans(),
                 damp=st.sampled_from([0.0, 0.0, 0.05]), ends=st.booleans(),
                 dead=st.booleans())


def brute_force_costs(cost_fn, m, k):
    """Per channel the least cost over all 2^k choices, cost_fn(b (m, k)) -> (m,)."""
    best = np.full(m, np.inf)
    for bits in itertools.product([0, 1], repeat=k):
        b = np.broadcast_to(np.array(bits, dtype=bool), (m, k))
        best = np.minimum(best, cost_fn(b))
    return best


# ------------------------------------------------------------------ (1) energy == direct cost
@SETTINGS
@given(**case_args)
def test_energy_is_the_data_cost_on_every_variant(seed, m, groups, gs, bits, symmetric,
                                                  per_channel, grouped, cross, damp, ends, dead):
    """Grouped and asymmetric grids, per-channel H, cross objective, damping, clipped weights:
    energy + const is the cost measured on the calibration data, and the codes/dequantised
    weights are the grid arithmetic's."""
    k = Case(seed, m, groups, gs, bits, symmetric, per_channel, grouped, cross, damp, ends, dead)
    p = k.problem
    for _ in range(3):
        b = k.random_choices()
        np.testing.assert_array_equal(p.codes(b), k.codes(b))
        np.testing.assert_allclose(p.dequantize(b), k.w_hat(b), rtol=0, atol=0)
        np.testing.assert_allclose(p.costs(b), k.cost(b), rtol=1e-8, atol=k.tol())
        # fixed (clipped) inputs: their bit changes nothing
        b2 = b ^ ~p.free
        np.testing.assert_array_equal(p.codes(b2), p.codes(b))
        np.testing.assert_allclose(p.energies(b2), p.energies(b), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(p.cost_of_codes(p.codes(b)), p.costs(b), rtol=1e-8,
                                   atol=k.tol())
    assert p.codes(np.ones((m, k.n))).max() <= p.qmax
    assert p.codes(np.zeros((m, k.n))).min() >= p.qmin
    if ends and k.n > 1:   # a weight beyond an end has no choice
        assert (~p.free).any()
    # RTN is the grid's own quantize
    np.testing.assert_array_equal(p.codes(p.rtn_choices()), p.grid.quantize(k.w))
    if cross:   # without float_hessian the costs are relative: differences still the data's
        rel = RoundingProblem.from_weight(k.w, k.h_given, k.grid, damp=damp,
                                          cross=k.x_hat.T @ k.x / k.x.shape[0])
        b1, b2 = k.random_choices(), k.random_choices()
        np.testing.assert_allclose(rel.costs(b1) - rel.costs(b2), k.cost(b1) - k.cost(b2),
                                   rtol=1e-8, atol=k.tol())


# ------------------------------------------------------------------ (2) exact == brute force
@SETTINGS
@given(**case_args)
def test_exact_equals_brute_force_of_the_data_cost(seed, m, groups, gs, bits, symmetric,
                                                   per_channel, grouped, cross, damp, ends, dead):
    k = Case(seed, m, groups, gs, bits, symmetric, per_channel, grouped, cross, damp, ends, dead)
    sol = Exact(block_bits=2).solve(k.problem)
    best = brute_force_costs(lambda b: k.cost(b), m, k.n)
    np.testing.assert_allclose(sol.cost, best, rtol=1e-8, atol=k.tol())
    via_dimod = get_solver("dimod", sampler="exact-dimod").solve(k.problem)
    np.testing.assert_allclose(via_dimod.cost, best, rtol=1e-8, atol=k.tol())
    np.testing.assert_allclose(sol.cost, k.cost(sol.choices), rtol=1e-8, atol=k.tol())
    # dimod's ExactSolver on each channel's BQM finds the same optimum (the absolute cost)
    for c in range(m):
        bqm = k.problem.to_bqm(c)
        if bqm.num_variables == 0:
            assert bqm.offset == pytest.approx(sol.cost[c], rel=1e-8, abs=k.tol())
            continue
        ground = dimod.ExactSolver().sample(bqm).first.energy
        assert ground == pytest.approx(sol.cost[c], rel=1e-8, abs=k.tol())


# ------------------------------------------------------------------ restricted sub-problems
@SETTINGS
@given(**case_args, data=st.data())
def test_restricted_problems_keep_costs_and_exact_optima(seed, m, groups, gs, bits, symmetric,
                                                         per_channel, grouped, cross, damp,
                                                         ends, dead, data):
    k = Case(seed, m, groups, gs, bits, symmetric, per_channel, grouped, cross, damp, ends, dead)
    p = k.problem
    held = k.random_choices() & p.free
    size = data.draw(st.integers(1, k.n))
    inputs = np.array(data.draw(st.permutations(range(k.n)))[:size])
    sub = p.restrict(inputs, held)

    def full(bsub):
        b = held.copy()
        b[:, inputs] = bsub
        return b

    for _ in range(3):
        bs = k.random_choices((m, size))
        np.testing.assert_allclose(sub.costs(bs), k.cost(full(bs)), rtol=1e-8, atol=k.tol())
        np.testing.assert_allclose(sub.cost_of_codes(sub.codes(bs)), sub.costs(bs), rtol=1e-8,
                                   atol=k.tol())
    # nested restriction: the same costs
    if size > 1:
        inner = np.arange(size)[::-1][: size - 1]
        bs = k.random_choices((m, size)) & sub.free
        sub2 = sub.restrict(inner, bs)
        np.testing.assert_allclose(sub2.costs(bs[:, inner]), k.cost(full(bs)), rtol=1e-8,
                                   atol=k.tol())
    sol = Exact(block_bits=2).solve(sub)
    best = brute_force_costs(lambda b: k.cost(full(b)), m, size)
    np.testing.assert_allclose(sol.cost, best, rtol=1e-8, atol=k.tol())


# ------------------------------------------------------------------ exports: qubo, BQM, files
@SETTINGS
@given(**case_args, restricted=st.booleans())
def test_exports_give_the_problems_energies(seed, m, groups, gs, bits, symmetric, per_channel,
                                            grouped, cross, damp, ends, dead, restricted):
    k = Case(seed, m, groups, gs, bits, symmetric, per_channel, grouped, cross, damp, ends, dead)
    p = k.problem
    if restricted:
        inputs = k.rng.permutation(k.n)[: max(1, k.n - 1)]
        p = p.restrict(inputs, k.random_choices() & p.free)
    n = p.num_inputs
    b = k.random_choices((m, n))
    e, cost = p.energies(b), p.costs(b)
    sol = get_solver("greedy").solve(p, init=b)
    with tempfile.TemporaryDirectory() as folder:
        manifest = export_qubos(Path(folder) / "q", p, known={"greedy": sol.choices})
        assert manifest["restricted"] == bool(p.restricted)
        for c in range(m):
            q = p.qubo(c)
            bc = b[c].astype(float)
            assert bc @ q @ bc == pytest.approx(e[c], rel=1e-9, abs=1e-9 * (1 + np.abs(q).sum()))
            bqm = p.to_bqm(c)
            assert set(bqm.variables) == set(np.flatnonzero(p.free[c]).tolist())
            sample = {v: int(b[c, v]) for v in bqm.variables}
            assert bqm.energy(sample) == pytest.approx(cost[c], rel=1e-9, abs=k.tol())
            path = Path(folder) / f"c{c}.qubo"
            write_qubo(path, p, c)
            f = read_qubo(path)
            assert f.energy(b[c]) + f.offset == pytest.approx(cost[c], rel=1e-9, abs=k.tol())
            sparse = read_qubo_bqm(path)
            assert sparse.energy(dict(enumerate(b[c].astype(int)))) == pytest.approx(
                cost[c], rel=1e-9, abs=k.tol())
            row = manifest["channels"][c]
            g = read_qubo(Path(folder) / "q" / row["file"])
            for label, ch in (("rtn", p.rtn_choices()), ("greedy", sol.choices)):
                x = row["solutions"][label]["x"]
                assert x == "".join("1" if v else "0" for v in (ch[c] & p.free[c]))
                assert row["solutions"][label]["energy"] == pytest.approx(
                    p.energies(ch)[c], rel=1e-9, abs=k.tol())
                assert g.energy(x) + row["offset"] == pytest.approx(
                    p.costs(ch)[c], rel=1e-9, abs=k.tol())
        loaded = json.loads((Path(folder) / "q" / "manifest.json").read_text())
        assert loaded["channels"][0]["offset"] == pytest.approx(float(p.const[0]))


# ------------------------------------------------------------------ (3) polishers from a start
POLISHERS = ["greedy", "tabu(restarts=1, max_iter=30)", "anneal(num_sweeps=30)",
             "anneal(num_sweeps=20, restarts=2, order='sequential')",
             "anneal(num_sweeps=20)+tabu(restarts=0)", "greedy|tabu(restarts=0)",
             "tabu(restarts=0, descent=False)", "gptq+greedy", "meanfield+greedy",
             "dwave-steepest", "neal(num_reads=2, num_sweeps=20)"]


@SETTINGS
@given(**case_args, solver=st.sampled_from(POLISHERS), restricted=st.booleans())
def test_polishers_never_worse_than_a_random_start(seed, m, groups, gs, bits, symmetric,
                                                   per_channel, grouped, cross, damp, ends,
                                                   dead, solver, restricted):
    k = Case(seed, m, groups, gs, bits, symmetric, per_channel, grouped, cross, damp, ends, dead)
    p = k.problem
    inputs = None
    held = k.random_choices() & p.free
    if restricted:
        inputs = k.rng.permutation(k.n)[: max(1, k.n - 1)]
        p = p.restrict(inputs, held)
    start = k.random_choices((m, p.num_inputs))

    def data_cost(b):
        if inputs is None:
            return k.cost(b)
        full = held.copy()
        full[:, inputs] = b
        return k.cost(full)

    sol = get_solver(solver).solve(p, init=start, seed=seed)
    start_cost = data_cost(start & p.free)
    assert not (sol.choices & ~p.free).any()
    assert np.all(sol.energy <= p.energies(start) + 1e-12 * (1 + np.abs(p.energies(start))))
    assert np.all(sol.cost <= start_cost + k.tol())
    np.testing.assert_allclose(sol.energy, p.energies(sol.choices), rtol=1e-9,
                               atol=1e-9 * (1 + np.abs(sol.energy).max()))
    np.testing.assert_allclose(sol.cost, data_cost(sol.choices), rtol=1e-8, atol=k.tol())
    np.testing.assert_array_equal(sol.codes, p.codes(sol.choices))
    np.testing.assert_allclose(sol.rtn_cost, data_cost(p.rtn_choices()), rtol=1e-8,
                               atol=k.tol())


# ------------------------------------------------------------------ lattice / widen descent
@SETTINGS
@given(**case_args, restricted=st.booleans(), start=st.sampled_from(["rtn", "random", "solver"]))
def test_grid_descent_never_raises_the_data_cost(seed, m, groups, gs, bits, symmetric,
                                                 per_channel, grouped, cross, damp, ends,
                                                 dead, restricted, start):
    k = Case(seed, m, groups, gs, bits, symmetric, per_channel, grouped, cross, damp, ends, dead)
    p = k.problem
    inputs = None
    held_codes = None
    if restricted:
        held = k.random_choices() & p.free
        inputs = k.rng.permutation(k.n)[: max(1, k.n - 1)]
        held_codes = p.codes(held)
        p = p.restrict(inputs, held)
    if start == "rtn":
        q0 = p.codes(p.rtn_choices())
    elif start == "random":
        q0 = k.rng.integers(p.qmin, p.qmax + 1, size=p.weight.shape)
    else:
        q0 = get_solver("greedy").solve(p, seed=0).codes

    def data_cost(q):
        if inputs is None:
            return k.cost(codes=q)
        full = held_codes.astype(float).copy()
        full[:, inputs] = q
        return k.cost(codes=full)

    r = grid_descent(p, q0)
    assert r.codes.min() >= p.qmin and r.codes.max() <= p.qmax
    np.testing.assert_allclose(r.cost, data_cost(r.codes), rtol=1e-8, atol=k.tol())
    np.testing.assert_allclose(r.start_cost, data_cost(q0), rtol=1e-8, atol=k.tol())
    assert np.all(r.cost <= r.start_cost)
    # beyond counts the codes that are neither floor nor ceil
    b = r.codes - p.floor_codes
    assert r.beyond == int(np.sum((b != 0) & ~((b == 1) & p.free)))
    if not restricted:   # such codes write back onto the grid
        qw = weight_from_codes(p, r.codes)
        np.testing.assert_allclose(qw.dequantized, k.w_hat(codes=r.codes), rtol=0, atol=0)


# ------------------------------------------------------------------ scale refits
@SETTINGS
@given(**case_args, solver=st.sampled_from(["greedy", "nearest", "tabu(restarts=0)"]),
       rounds=st.integers(1, 3))
def test_scale_refits_never_raise_the_data_cost(seed, m, groups, gs, bits, symmetric,
                                                per_channel, grouped, cross, damp, ends, dead,
                                                solver, rounds):
    k = Case(seed, m, groups, gs, bits, symmetric, per_channel, grouped, cross, damp, ends, dead)
    p = k.problem
    codes = p.codes(k.random_choices())
    grid = refit_scales(p, codes)
    np.testing.assert_array_equal(grid.zero_point, p.grid.zero_point)
    before, after = k.cost(codes=codes), k.cost(codes=codes, scale=grid.expand()[0])
    assert np.all(after <= before + k.tol())
    # solve_refitting: never worse than its first solve, costs are those of its final grid
    first = get_solver(solver).solve(p, seed=np.random.default_rng(seed))
    final, sol = solve_refitting(p, get_solver(solver), rounds=rounds, seed=seed)
    assert np.all(sol.cost <= first.cost + k.tol())
    s_final = final.grid.expand()[0]
    np.testing.assert_allclose(sol.cost, k.cost(codes=sol.codes, scale=s_final), rtol=1e-8,
                               atol=k.tol())
    np.testing.assert_allclose(sol.rtn_cost, p.rtn_costs(), rtol=1e-12, atol=1e-12)
    # the final codes are floor or ceil on the final grid
    z = final.grid.expand()[1]
    fl = np.clip(np.floor(k.w / s_final) + z, p.qmin, p.qmax)
    ce = np.clip(np.floor(k.w / s_final) + z + 1, p.qmin, p.qmax)
    assert np.all((sol.codes == fl) | (sol.codes == ce))


# ------------------------------------------------------------------ (4) write-back: conv, dtypes
def _gen(seed):
    return torch.Generator().manual_seed(seed)


@SETTINGS
@given(groups=st.integers(1, 2), cin_g=st.integers(1, 2), out_g=st.integers(1, 3),
       k=st.integers(1, 2), bits=st.integers(2, 4), symmetric=st.booleans(),
       grouped=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       widen=st.booleans(), fisher=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_conv_write_back_is_on_the_grid_in_im2col_order(groups, cin_g, out_g, k, bits,
                                                        symmetric, grouped, dtype, widen, fisher,
                                                        seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(groups * cin_g, groups * out_g, k, padding=1, groups=groups).to(dtype)
    batches = [torch.randn(2, groups * cin_g, 4, 5, generator=_gen(seed + i), dtype=dtype)
               for i in range(2)]
    h = capture_hessians(conv, batches, layers=[""])[""]
    n_g = cin_g * k * k
    if fisher:   # per output channel (out, n_g, n_g): its group's H times a channel weight
        hg = h if h.ndim == 3 else h[None]
        per_out = np.repeat(hg, out_g, axis=0)
        h = per_out * np.random.default_rng(seed).uniform(0.5, 2, size=(len(per_out), 1, 1))
    gs = k * k if grouped and cin_g > 1 else None
    problems = problems_from_layer(conv, h, GridSpec(bits=bits, symmetric=symmetric,
                                                     group_size=gs))
    rng = np.random.default_rng(seed)
    sols = [get_solver("greedy").solve(p, init=rng.random(p.weight.shape) < 0.5)
            for p in problems]
    if widen:
        results = [grid_descent(p, s.codes) for p, s in zip(problems, sols)]
        qw = weight_from_codes(problems, [r.codes for r in results], module=conv)
        costs = np.concatenate([r.cost for r in results])
        before = np.concatenate([s.cost for s in sols])
        assert np.all(costs <= before + 1e-12 * (1 + np.abs(before)))
    else:
        qw = quantized_weight(problems, sols, module=conv)
        costs = np.concatenate([s.cost for s in sols])
    new = apply_to_layer(conv, qw)
    assert new.weight.dtype == dtype and tuple(new.weight.shape) == tuple(conv.weight.shape)
    flat = new.weight.detach().double().reshape(conv.out_channels, n_g).numpy()
    # the module holds s (q - z) in its dtype, codes in im2col order (c_in/groups, kh, kw)
    want = torch.as_tensor(qw.dequantized.reshape(conv.out_channels, n_g)).to(dtype).double()
    np.testing.assert_array_equal(flat, want.numpy())
    grid = qw.grid
    np.testing.assert_array_equal(grid.quantize(flat), qw.codes)     # exactly back on the grid
    assert qw.codes.min() >= qw.qmin and qw.codes.max() <= qw.qmax
    w = conv.weight.detach().double().reshape(conv.out_channels, n_g).numpy()
    s, z = grid.expand()
    fl = np.clip(np.floor(w / s) + z, qw.qmin, qw.qmax)
    ce = np.clip(np.floor(w / s) + z + 1, qw.qmin, qw.qmax)
    if not widen:
        assert np.all((qw.codes == fl) | (qw.codes == ce))
    # the solved cost is the conv's output error on the calibration data (float64 layers)
    if fisher:
        d = qw.dequantized.reshape(w.shape) - w       # float64 values the solver scored
        direct = np.einsum("mi,mij,mj->m", d, h, d)
        np.testing.assert_allclose(costs, direct, rtol=1e-7, atol=1e-10)
    elif dtype == torch.float64:
        dw = new.weight.detach() - conv.weight.detach()
        y = torch.cat([F.conv2d(t, dw, None, conv.stride, conv.padding, conv.dilation, groups)
                       for t in batches])
        direct = (y ** 2).mean(dim=(0, 2, 3)).numpy()
        np.testing.assert_allclose(costs, direct, rtol=1e-7, atol=1e-10)


@SETTINGS
@given(nx=st.integers(1, 6), nf=st.integers(1, 4), bits=st.integers(2, 4),
       symmetric=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       widen=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_conv1d_write_back_round_trips(nx, nf, bits, symmetric, dtype, widen, seed):
    transformers = pytest.importorskip("transformers", reason="Conv1D is transformers' (examples extra)")
    from qround.problems.layers import linearize_conv1d, restore_conv1d

    Conv1D = transformers.pytorch_utils.Conv1D
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx).to(dtype)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    batches = [torch.randn(3, 2, nx, generator=_gen(seed + i), dtype=dtype) for i in range(2)]
    model = nn.Sequential(layer)
    h = capture_hessians(model, batches, layers=["0"])["0"]
    [p] = problems_from_layer(layer, h, GridSpec(bits=bits, symmetric=symmetric))
    np.testing.assert_array_equal(p.weight, layer.weight.detach().double().numpy().T)
    rng = np.random.default_rng(seed)
    sol = get_solver("greedy").solve(p, init=rng.random(p.weight.shape) < 0.5)
    codes, cost = sol.codes, sol.cost
    if widen:
        r = grid_descent(p, sol.codes)
        codes, cost = r.codes, r.cost
    model, replaced = linearize_conv1d(model)
    qw = weight_from_codes(p, codes, module=model[0])
    apply_to_layer(model[0], qw, inplace=True)
    model = restore_conv1d(model, replaced)
    assert isinstance(model[0], Conv1D) and model[0] is layer
    got = layer.weight.detach().double().numpy().T
    want = torch.as_tensor(qw.dequantized).to(dtype).double().numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(qw.grid.quantize(got), codes)
    if dtype == torch.float64:
        x = torch.cat([t.reshape(-1, nx) for t in batches])
        dw = torch.as_tensor(qw.dequantized - p.weight)
        direct = ((x @ dw.T) ** 2).mean(dim=0).numpy()
        np.testing.assert_allclose(cost, direct, rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------------ whole model, widen
class _Net(nn.Module):
    def __init__(self, kind, n):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.a = nn.Conv2d(2, 3, 2)
            self.b = nn.Linear(3 * 2 * 2, 2)
        elif kind == "conv1d":   # transformers' Conv1D (GPT-2), weight stored (in, out)
            from transformers.pytorch_utils import Conv1D
            self.a = Conv1D(4, n)
            self.b = Conv1D(3, 4)
        else:
            self.a = nn.Linear(n, 4)
            self.b = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y.flatten(1) if self.kind == "conv" else y)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kind=st.sampled_from(["linear", "conv", "conv1d"]), bits=st.integers(2, 4),
       symmetric=st.booleans(), grouped=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), refits=st.integers(0, 1),
       damp=st.sampled_from([0.0, 0.02]), seed=st.integers(0, 2 ** 16))
def test_quantize_model_widen_stays_on_the_grid_and_never_costs_more(kind, bits, symmetric,
                                                                     grouped, dtype, refits,
                                                                     damp, seed):
    """The whole pipeline (inputs="float", so both runs see the same statistics): written
    weights are s (q - z) in the layer's dtype (transposed back for a Conv1D), codes on the
    grid and at floor/ceil without widen, the report's cost is the damped H-norm of the error,
    and widen never costs more."""
    if kind == "conv1d":
        pytest.importorskip("transformers", reason="Conv1D is transformers' (examples extra)")
    from qround.pipeline import QuantConfig, quantize_model

    torch.manual_seed(seed)
    n = 4
    model = _Net(kind, n).to(dtype)
    shape = (5, 2, 3, 3) if kind == "conv" else (5, n)
    data = [torch.randn(*shape, generator=_gen(seed + i), dtype=dtype) for i in range(2)]
    hs = capture_hessians(model, data)
    qms = {}
    for widen in (False, True):
        qms[widen] = quantize_model(model, data, QuantConfig(
            wbits=bits, symmetric=symmetric, group_size=4 if grouped else None,
            solver="greedy", inputs="float", widen=widen, refits=refits, damp=damp,
            progress=False))
    mods = dict(model.named_modules())
    for name in ("a", "b"):
        float_w = mods[name].weight.detach().double()
        float_w = (float_w.T if kind == "conv1d" else float_w.reshape(len(float_w), -1)).numpy()
        cost = {}
        for widen, qm in qms.items():
            qw = qm.layers[name]
            assert qw.codes.min() >= qw.qmin and qw.codes.max() <= qw.qmax
            layer = dict(qm.model.named_modules())[name]
            assert type(layer) is type(mods[name])
            written = layer.weight.detach()
            assert written.dtype == dtype
            want = torch.as_tensor(qw.dequantized).to(dtype)
            if kind == "conv1d":
                want = want.reshape(float_w.shape).T
            assert torch.equal(written.reshape(want.shape), want)
            s, z = qw.grid.expand()
            fl = np.clip(np.floor(float_w / s) + z, qw.qmin, qw.qmax)
            ce = np.clip(np.floor(float_w / s) + z + 1, qw.qmin, qw.qmax)
            if not widen:
                assert np.all((qw.codes == fl) | (qw.codes == ce))
            # the report's cost is (w_hat - w)^T H (w_hat - w) with the float model's H
            d = qw.dequantized.reshape(float_w.shape) - float_w
            h = hs[name] + damp * np.mean(np.diag(hs[name])) * np.eye(len(hs[name]))
            direct = float(np.einsum("mi,ij,mj->", d, h, d))
            [row] = [r for r in qm.report if r.layer == name]
            assert row.cost == pytest.approx(direct, rel=1e-7, abs=1e-10)
            cost[widen] = row.cost
        assert cost[True] <= cost[False] + 1e-12 * (1 + abs(cost[False]))
