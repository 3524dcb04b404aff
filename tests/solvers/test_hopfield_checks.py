"""The continuous relaxations: Adam as torch's, the best seen kept, the last steps evaluated, the
schedules, scales and defaults (tests from mutation testing, helper-127)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qround import QroundError, get_solver
from qround.solvers import HopfieldClassic, Relaxation, _torch
from qround.solvers.hopfield import ADAM_BETAS, ADAM_EPS, _energy_scale, rectified_sigmoid

from ..conftest import make_problem

CPU = torch.device("cpu")


def _bad_start(p):
    return ~p.rtn_choices() & p.free


@pytest.mark.parametrize("cls", [Relaxation, HopfieldClassic])
def test_the_written_out_adam_is_torchs_adam(cls):
    """K steps of the solver equal K steps of torch.optim.Adam on ``loss`` (autograd), then the
    rounding of V, kept per channel where it beats the start."""
    p = make_problem(m=5, n=9, seed=7)
    solver = cls(iterations=40, eval_every=40, lr=0.05)
    tp = _torch.to_torch(p, CPU, torch.float64)
    free = tp.free.to(torch.float64)
    kappa = _energy_scale(tp, free)
    weight = solver._reg_weight(tp, free, kappa)
    sched = solver._full_schedule(torch.float64, CPU)
    v = solver._init_v(tp.frac).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=solver.lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=False)
    for t in range(solver.iterations):
        opt.zero_grad()
        solver.loss(v, tp, kappa, weight, {k: a[t:t + 1] for k, a in sched.items()}).backward()
        opt.step()
    b = (solver._hard(v.detach()) * free).numpy().astype(bool)
    start = _bad_start(p)
    wins = p.energies(b) < p.energies(start)
    assert wins.sum() >= 3
    want = np.where(wins[:, None], b, start)
    got = solver._solve(p, start.copy(), np.random.default_rng(0))[0]
    np.testing.assert_array_equal(got, want)


class _Scripted(Relaxation):
    """Rounds V to the given choices, one per evaluation, whatever V is."""

    def __init__(self, script, **kwargs):
        super().__init__(**kwargs)
        self._script = list(script)

    def _hard(self, v):
        return torch.as_tensor(self._script.pop(0), dtype=v.dtype)


def test_the_best_rounding_seen_is_returned_not_the_last():
    p = make_problem(m=6, n=9, seed=8)
    start = _bad_start(p)
    good = get_solver("greedy").solve(p).choices
    rtn = p.rtn_choices()
    solver = _Scripted([good, rtn, start], iterations=30, eval_every=10)
    got = solver._solve(p, start.copy(), np.random.default_rng(0))[0]
    cands = np.stack([start, good, rtn])
    energies = np.stack([p.energies(c) for c in cands])
    want = cands[np.argmin(energies, axis=0), np.arange(p.num_channels)]
    assert not np.array_equal(want, rtn)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("cls", [Relaxation, HopfieldClassic])
@pytest.mark.parametrize("iterations, eval_every", [(5, 100), (12, 5)])
def test_the_last_steps_are_evaluated(cls, iterations, eval_every):
    """The steps after the last multiple of eval_every (all of them, when fewer) are rounded and
    evaluated: from a bad start the result is never the start itself."""
    p = make_problem(m=5, n=9, seed=9)
    start = _bad_start(p)
    calls = []
    solver = cls(iterations=iterations, eval_every=eval_every)
    hard = solver._hard
    solver._hard = lambda v: calls.append(1) or hard(v)
    got = solver._solve(p, start.copy(), np.random.default_rng(0))[0]
    assert len(calls) == -(-iterations // eval_every)
    assert np.all(p.energies(got) <= p.energies(start)) and not np.array_equal(got, start)


def test_curvature_weighting_is_the_default_and_uniform_is_adarounds():
    p = make_problem(m=4, n=7, seed=10)
    tp = _torch.to_torch(p, CPU, torch.float64)
    free = tp.free.to(torch.float64)
    kappa = _energy_scale(tp, free)
    curv = (p.step ** 2 * p.hessian_diag[None]) / kappa.numpy()[:, None]
    np.testing.assert_allclose(Relaxation()._reg_weight(tp, free, kappa).numpy(), curv)
    np.testing.assert_array_equal(
        Relaxation(reg_weighting="uniform")._reg_weight(tp, free, kappa).numpy(), p.free)


def test_energy_scale_is_the_mean_curvature_over_free_inputs():
    p = make_problem(m=4, n=7, seed=11)
    assert (~p.free).any()
    tp = _torch.to_torch(p, CPU, torch.float64)
    kappa = _energy_scale(tp, tp.free.to(torch.float64)).numpy()
    curv = p.step ** 2 * p.hessian_diag[None]       # step is 0 where a weight is fixed
    want = curv.sum(1) / p.free.sum(1)
    np.testing.assert_allclose(kappa, want, rtol=1e-12)


def test_warmup_ends_at_the_ceiling_of_its_fraction():
    r = Relaxation(iterations=10, warmup=0.25)     # 2.5 steps: the regulariser starts at 3
    assert r.beta_at(2) is None and r.beta_at(3) == pytest.approx(20.0)
    assert np.count_nonzero(r._schedule()["reg"]) == 7


def test_classic_starts_at_the_fractional_parts_whatever_the_temperature():
    p = make_problem(m=4, n=7, seed=12)
    frac = torch.as_tensor(np.array(p.frac))
    c = HopfieldClassic(temperature=(4.0, 0.1))
    v = c._init_v(frac)
    inside = (frac > 1e-6) & (frac < 1 - 1e-6)
    np.testing.assert_allclose(torch.sigmoid(v / 4.0)[inside].numpy(), frac[inside].numpy(),
                               rtol=1e-9)


def test_rectified_sigmoid_is_clipped_to_zero_and_one():
    out = rectified_sigmoid(torch.tensor([-30.0, -3.0, 0.0, 3.0, 30.0], dtype=torch.float64))
    assert out[0] == 0.0 and out[-1] == 1.0 and out[2] == pytest.approx(0.5)
    assert bool(((out >= 0) & (out <= 1)).all())


@pytest.mark.parametrize("make, match", [
    (lambda: Relaxation(beta=(1e9, 2.0)), r"beta must lie in \[1, 1e8\]"),
    (lambda: HopfieldClassic(temperature=(1e9, 1.0)), r"temperature must lie in"),
])
def test_out_of_range_schedules_are_refused(make, match):
    with pytest.raises(QroundError, match=match):
        make()


def test_defaults():
    assert Relaxation().parameters == dict(
        iterations=2000, lr=0.02, eval_every=25, device="cpu", dtype=None, graph=True,
        reg_weighting="curvature", reg=0.3, beta=(20.0, 2.0), warmup=0.2)
    assert HopfieldClassic().parameters == dict(
        iterations=1000, lr=0.05, eval_every=25, device="cpu", dtype=None, graph=True,
        temperature=(1.0, 0.02))
