"""Simulated annealing (``anneal``) and the compiled kernels shared with ``tabu``."""
from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qround import QroundError, get_solver
from qround.solvers import _kernels
from qround.solvers.anneal import Anneal, beta_schedule

from ..conftest import make_problem


@settings(max_examples=200, deadline=None)
@given(x=st.one_of(st.floats(1e-15, 45.0), st.floats(1e-12, 1e-3), st.floats(35.0, 45.0)),
       seed=st.integers(0, 2**63 - 1))
def test_metropolis_test_is_u_below_exp(x, seed):
    # the Taylor bounds only skip the exp: same draw, same decision as u < exp(-x)
    state = np.array([seed], dtype=np.uint64)
    mirror = state.copy()
    got = _kernels._metropolis(x, state)
    if x > 40.0:
        assert not got and state[0] == mirror[0]  # rejected without a draw
    else:
        u = _kernels._next(mirror)
        assert got == (u < np.exp(-x)) and state[0] == mirror[0]


def test_metropolis_accepts_at_the_expected_rate():
    state = np.array([12345], dtype=np.uint64)
    for x in (0.01, 0.7, 3.0, 9.0):
        rate = np.mean([_kernels._metropolis(x, state) for _ in range(20000)])
        assert rate == pytest.approx(np.exp(-x), abs=4 * np.sqrt(np.exp(-x) / 20000) + 1e-4)


def _kernel_state(p, b):
    """Arrays the kernels work on, for choices b (m, n) float."""
    return b.copy(), np.ascontiguousarray(p.local_fields(b)), np.diagonal(p.hessian, 0, -2, -1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), per_channel=st.booleans())
def test_kernel_flip_matches_energy_module(seed, n, per_channel):
    # the compiled delta / field update are exactly energy.flip_deltas / energy.local_fields
    p = make_problem(m=3, n=n, seed=seed, per_channel=per_channel, clip_some=False)
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 2, size=p.weight.shape).astype(np.float64) * p.free
    want = p.flip_deltas(b)
    for c in range(p.num_channels):
        bc, f, diag = _kernel_state(p, b)
        h = p.hessian if p.shared_hessian else p.hessian[c]
        hd = diag if diag.ndim == 1 else diag[c]
        i = int(rng.integers(n))
        got = _kernels._delta(i, bc[c], f[c], p.step[c], p.grad[c], hd)
        np.testing.assert_allclose(got, want[c, i], rtol=1e-10, atol=1e-12)
        _kernels._flip(i, bc[c], f[c], p.step[c], h)
        np.testing.assert_allclose(f[c], p.local_fields(bc)[c], rtol=1e-10, atol=1e-12)
        new_e = p.energies(b)[c] + want[c, i]
        assert p.energies(bc)[c] == pytest.approx(new_e, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_kernel_tracked_energy_is_the_true_energy(per_channel, compact):
    # a hot schedule makes many uphill and downhill moves; the incrementally tracked best
    # energy must still equal energy.energies of the returned state
    p = make_problem(m=5, n=12, seed=4, per_channel=per_channel)
    start = p.rtn_choices()
    args = _kernels.kernel_inputs(p, start, np.random.default_rng(0))
    betas = beta_schedule(p, start, 50, hot_accept=0.9, cold_accept=0.5)
    best, best_e = _kernels.anneal_kernel(
        args["hess"], args["step"], args["grad"], args["start"], args["fields"], args["energy"],
        args["free_idx"], args["nfree"], betas, 2, True, args["seeds"], compact, _kernels.NO_CSR)
    np.testing.assert_allclose(best_e, p.energies(best), rtol=1e-9, atol=1e-12)
    assert np.all(best_e <= p.energies(start) + 1e-12)


def test_beta_schedule_follows_its_definition():
    p = make_problem(m=4, n=10, seed=1)
    start = p.rtn_choices()
    betas = beta_schedule(p, start, 30, hot_accept=0.5, cold_accept=1e-3, cold_quantile=0.1)
    assert betas.shape == (4, 30) and np.all(np.diff(betas, axis=1) > 0)
    ratio = betas[:, 1:] / betas[:, :-1]
    np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-9)  # geometric
    d = np.abs(p.flip_deltas(start))
    for c in range(4):
        dc = d[c][p.free[c] & (d[c] > 0)]
        assert np.exp(-betas[c, 0] * np.median(dc)) == pytest.approx(0.5)
        assert np.exp(-betas[c, -1] * np.quantile(dc, 0.1)) == pytest.approx(1e-3)


@pytest.mark.parametrize("per_channel", [False, True])
def test_reaches_exact_optimum_on_small_problems(per_channel):
    for seed in (8, 9):
        p = make_problem(m=6, n=12, seed=seed, per_channel=per_channel)
        exact = get_solver("exact").solve(p)
        sol = Anneal(num_sweeps=1000, restarts=2).solve(p, seed=0)
        np.testing.assert_allclose(sol.energy, exact.energy, rtol=1e-9, atol=1e-12)


def test_returns_best_seen_and_never_worse_than_start():
    # an always-hot run ends on a random state; the best state seen must be returned, and the
    # kernel itself (not only the base class safety net) must never end worse than its start
    p = make_problem(m=6, n=14, seed=3)
    rng = np.random.default_rng(1)
    for start in (None, rng.integers(0, 2, size=p.weight.shape).astype(bool) & p.free):
        for solver in (Anneal(num_sweeps=20, hot_accept=0.99, cold_accept=0.98), Anneal(50)):
            sol = solver.solve(p, init=start, seed=2)
            assert sol.info.get("channels_kept_start", 0) == 0
            s = p.rtn_choices() if start is None else start
            assert np.all(sol.energy <= p.energies(s) + 1e-12)
    bad = rng.integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    assert np.all(Anneal(200).solve(p, init=bad, seed=0).energy < p.energies(bad))


@pytest.mark.parametrize("compact", [False, True])
def test_fixed_variables_are_never_flipped(compact):
    p = make_problem(m=4, n=10, seed=0)
    assert not p.free.all()
    start = p.rtn_choices() | ~p.free  # fixed variables set to 1 in the kernel's input
    args = _kernels.kernel_inputs(p, start, np.random.default_rng(0))
    betas = beta_schedule(p, p.rtn_choices(), 40, hot_accept=0.9, cold_accept=0.5)
    best, _ = _kernels.anneal_kernel(
        args["hess"], args["step"], args["grad"], args["start"], args["fields"], args["energy"],
        args["free_idx"], args["nfree"], betas, 1, True, args["seeds"], compact, _kernels.NO_CSR)
    assert np.all(best[~p.free] == 1.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), per_channel=st.booleans(),
       random_order=st.booleans())
def test_kernel_on_the_free_sub_problem_gives_the_same_result(seed, n, per_channel, random_order):
    # compact=True gathers H[free][:, free] per channel: the same moves in the same order
    p = make_problem(m=4, n=n, seed=seed, per_channel=per_channel)
    start = p.rtn_choices()
    args = _kernels.kernel_inputs(p, start, np.random.default_rng(seed))
    betas = beta_schedule(p, start, 30, hot_accept=0.7, cold_accept=1e-3)
    out = [_kernels.anneal_kernel(
        args["hess"], args["step"], args["grad"], args["start"], args["fields"], args["energy"],
        args["free_idx"], args["nfree"], betas, 2, random_order, args["seeds"], compact,
        _kernels.NO_CSR)
        for compact in (False, True)]
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_seeded_and_thread_count_independent():
    p = make_problem(m=8, n=12, seed=5)
    solver = Anneal(num_sweeps=30, hot_accept=0.5, cold_accept=1e-3)
    a = solver.solve(p, seed=7)
    np.testing.assert_array_equal(a.choices, solver.solve(p, seed=7).choices)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = solver.solve(p, seed=7)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(a.choices, single.choices)
    for order in ("random", "sequential"):
        b = Anneal(num_sweeps=30, order=order).solve(p, seed=np.random.default_rng(3))
        np.testing.assert_array_equal(b.choices, Anneal(num_sweeps=30, order=order)
                                      .solve(p, seed=np.random.default_rng(3)).choices)


def test_per_channel_hessian_equals_shared_when_identical():
    p = make_problem(m=5, n=10, seed=6)
    stacked = type(p).from_weight(p.weight, np.broadcast_to(p.hessian, (5, 10, 10)), p.grid)
    a = Anneal(num_sweeps=40).solve(p, seed=1)
    b = Anneal(num_sweeps=40).solve(stacked, seed=1)
    np.testing.assert_array_equal(a.choices, b.choices)


def test_single_input_and_channel_without_free_variables():
    p1 = make_problem(m=3, n=1, seed=2, clip_some=False)
    np.testing.assert_allclose(Anneal(10).solve(p1, seed=0).energy,
                               get_solver("exact").solve(p1).energy, atol=1e-12)
    p = make_problem(m=3, n=6, seed=2, clip_some=False)
    w = p.weight.copy()
    w[1] = 100.0 * np.abs(p.scale[1]) * np.sign(w[1] + 0.5)  # the whole channel clips
    q = type(p).from_weight(w, p.hessian, p.grid)
    assert not q.free[1].any() and q.free[0].any()
    sol = Anneal(20).solve(q, seed=0)
    np.testing.assert_allclose(sol.energy, get_solver("exact").solve(q).energy, atol=1e-12)


def test_registered_and_bad_arguments():
    assert isinstance(get_solver("anneal", num_sweeps=5), Anneal)
    for kwargs, word in [(dict(num_sweeps=0), "num_sweeps"), (dict(restarts=1.5), "restarts"),
                         (dict(order="zigzag"), "order"), (dict(hot_accept=2.0), "hot_accept"),
                         (dict(cold_accept=0.0), "cold_accept"),
                         (dict(cold_quantile=-1), "cold_quantile")]:
        with pytest.raises(QroundError, match=word):
            Anneal(**kwargs)


def test_schedule_types_follow_dwave_samplers():
    """geometric / linear interpolation over beta_range with ``num_sweeps // num_sweeps_per_beta``
    inverse temperatures, each held for ``num_sweeps_per_beta`` sweeps; one temperature is
    the range's end (dwave-samplers' conventions)."""
    lo, hi = 0.1, 30.0
    geo = Anneal(beta_range=(lo, hi), num_sweeps=40, num_sweeps_per_beta=4).steps(3)
    assert geo.shape == (3, 40)
    np.testing.assert_allclose(geo[1], np.repeat(np.geomspace(lo, hi, 10), 4), rtol=1e-12)
    lin = Anneal(beta_range=(lo, hi), num_sweeps=30, beta_schedule_type="linear").steps(2)
    np.testing.assert_allclose(lin[0], np.linspace(lo, hi, 30), rtol=1e-12)
    one = Anneal(beta_range=(lo, hi), num_sweeps=5, num_sweeps_per_beta=5).steps(1)
    np.testing.assert_array_equal(one, np.full((1, 5), hi))
    custom = Anneal(beta_schedule=[0.0, 1.0, 2.5], num_sweeps_per_beta=2)
    assert custom.beta_schedule_type == "custom" and custom.num_sweeps == 6
    np.testing.assert_array_equal(custom.steps(2), [[0, 0, 1, 1, 2.5, 2.5]] * 2)


def test_linear_schedule_uses_each_channels_range_from_its_start():
    q = make_problem(m=3, n=10, seed=4)
    start = q.rtn_choices()
    geo = Anneal(num_sweeps=25).betas(q, start)
    lin = Anneal(num_sweeps=25, beta_schedule_type="linear").betas(q, start)
    np.testing.assert_allclose(geo[:, [0, -1]], lin[:, [0, -1]], rtol=1e-12)
    np.testing.assert_allclose(np.diff(lin, 2, axis=1), 0, atol=1e-9 * lin.max())
    np.testing.assert_array_equal(geo, beta_schedule(q, start, 25))


def test_the_kernel_anneals_at_the_schedule_given():
    """A custom schedule equal to a range's geometric schedule gives the same run, and holding
    each temperature twice is the same as listing it twice."""
    q = make_problem(m=4, n=12, seed=7)
    ranged = Anneal(beta_range=(0.05, 20.0), num_sweeps=30)
    custom = Anneal(beta_schedule=ranged.steps(1)[0])
    np.testing.assert_array_equal(ranged.solve(q, seed=1).choices,
                                  custom.solve(q, seed=1).choices)
    betas = np.geomspace(0.05, 20.0, 15)
    held = Anneal(beta_schedule=betas, num_sweeps_per_beta=2).solve(q, seed=2)
    listed = Anneal(beta_schedule=np.repeat(betas, 2)).solve(q, seed=2)
    np.testing.assert_array_equal(held.choices, listed.choices)
    assert not np.array_equal(ranged.solve(q, seed=1).choices,
                              Anneal(beta_schedule=np.zeros(30)).solve(q, seed=1).choices)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_schedule_type="cosine"), "beta_schedule_type must be one of"),
    (dict(beta_schedule_type="custom"), "needs beta_schedule"),
    (dict(beta_schedule=[1.0, 2.0], beta_schedule_type="linear"), "beta_schedule is for"),
    (dict(beta_schedule=[1.0, 2.0], beta_range=(1.0, 2.0)), "not both"),
    (dict(beta_schedule=[]), "beta_schedule is empty"),
    (dict(beta_schedule=[1.0, -2.0]), "must be >= 0"),
    (dict(beta_schedule=[1.0, float("nan")]), "NaN"),
    (dict(beta_schedule=[[1.0, 2.0]]), "dimension"),
    (dict(beta_schedule=["hot"]), "beta_schedule"),
    (dict(beta_schedule=[1.0, 2.0], num_sweeps=5), "disagrees with beta_schedule"),
    (dict(num_sweeps=10, num_sweeps_per_beta=3), "multiple of num_sweeps_per_beta"),
    (dict(num_sweeps_per_beta=0), "num_sweeps_per_beta"),
    (dict(num_sweeps=2 ** 70), "num_sweeps=.* is too large"),
    (dict(restarts=2 ** 70), "restarts=.* is too large"),
])
def test_schedule_options_are_checked(kwargs, match):
    with pytest.raises(QroundError, match=match):
        Anneal(**kwargs)


def test_every_restart_runs_and_the_best_is_kept():
    """With few sweeps a single run ends above what more runs find on some channel; the first
    run is the same in both (one seeded stream), so more restarts are never worse."""
    p = make_problem(m=12, n=32, seed=8)
    one = Anneal(num_sweeps=3, restarts=1).solve(p, seed=5)
    many = Anneal(num_sweeps=3, restarts=8).solve(p, seed=5)
    assert np.all(many.energy <= one.energy + 1e-12)
    assert np.any(many.energy < one.energy - 1e-9)


def test_a_schedule_over_the_memory_bound_runs_in_chunks_with_the_same_codes(monkeypatch):
    # the bound used to stop a whole-model run at the first wide layer, after the others
    from qround.solvers import anneal as anneal_module

    p = make_problem(m=9, n=12, seed=4)
    want = get_solver("anneal(num_sweeps=100)").solve(p, seed=3).choices
    monkeypatch.setattr(anneal_module, "MAX_SCHEDULE_BYTES", 8 * 100 * 2)   # 2 channels
    got = get_solver("anneal(num_sweeps=100)").solve(p, seed=3).choices
    np.testing.assert_array_equal(got, want)
    per_channel = make_problem(m=5, n=8, seed=5, per_channel=True)
    monkeypatch.setattr(anneal_module, "MAX_SCHEDULE_BYTES", 2 ** 31)
    want = get_solver("anneal(num_sweeps=50)").solve(per_channel, seed=1).choices
    monkeypatch.setattr(anneal_module, "MAX_SCHEDULE_BYTES", 8 * 50 * 3)
    np.testing.assert_array_equal(get_solver("anneal(num_sweeps=50)").solve(
        per_channel, seed=1).choices, want)


def test_stochastic_shrinks_its_batch_under_the_memory_bound(monkeypatch):
    from qround.solvers import reference

    p = make_problem(m=6, n=10, seed=2)
    want = get_solver("stochastic(samples=20)").solve(p, seed=5).choices
    monkeypatch.setattr(reference, "MAX_BATCH_BYTES", 8 * 6 * 10 * 3)   # 3 samples a batch
    np.testing.assert_array_equal(get_solver("stochastic(samples=20)").solve(p, seed=5).choices,
                                  want)
    monkeypatch.setattr(reference, "MAX_BATCH_BYTES", 8 * 6 * 10 - 1)
    with pytest.raises(QroundError, match="one sample of this 6x10 layer"):
        get_solver("stochastic").solve(p)
