"""Iterated tabu search (``tabu``) and its compiled kernel."""
from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qround import QroundError, get_solver
from qround.solvers import _kernels
from qround.solvers.tabu import Tabu, _round_off

from ..conftest import make_problem


def _run_kernel(p, start, rounds=3, perturb=2, tenure=3, max_iter=40, descent=True, reset_every=2,
                seed=0, compact=False):
    args = _kernels.kernel_inputs(p, start, np.random.default_rng(seed))
    m = p.num_channels
    return _kernels.tabu_kernel(
        args["hess"], args["step"], args["grad"], args["start"], args["fields"], args["energy"],
        args["free_idx"], args["nfree"], np.full(m, tenure), max_iter, max_iter, rounds,
        np.full(m, perturb), reset_every, descent, _round_off(p), args["seeds"], compact,
        _kernels.NO_TIME_LIMIT, False)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), per_channel=st.booleans())
def test_kernel_delta_update_matches_energy_module(seed, n, per_channel):
    # after a flip the kernel refreshes fields and all deltas in one pass: they must equal
    # energy.local_fields / energy.flip_deltas of the new state (+inf on fixed variables)
    p = make_problem(m=2, n=n, seed=seed, per_channel=per_channel)
    rng = np.random.default_rng(seed)
    b = (rng.integers(0, 2, size=p.weight.shape).astype(np.float64) * p.free)
    f = np.ascontiguousarray(p.local_fields(b))
    diag = np.diagonal(p.hessian, 0, -2, -1)
    diag = np.broadcast_to(diag, p.weight.shape)
    for c in range(p.num_channels):
        h = p.hessian if p.shared_hessian else p.hessian[c]
        d = p.step[c] * (1 - 2 * b[c])
        curv = np.where(p.free[c], p.step[c] ** 2 * diag[c], np.inf)
        delta = np.empty(n)
        i = int(rng.integers(n))
        _kernels._flip_update_deltas(i, b[c], d, f[c], p.grad[c], curv, h[i], delta)
        np.testing.assert_allclose(f[c], p.local_fields(b)[c], rtol=1e-10, atol=1e-12)
        want = np.where(p.free[c], p.flip_deltas(b)[c], np.inf)
        np.testing.assert_allclose(delta, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_kernel_tracked_energy_is_the_true_energy(per_channel, compact):
    p = make_problem(m=5, n=12, seed=4, per_channel=per_channel)
    start = p.rtn_choices()
    best, best_e = _run_kernel(p, start, rounds=4, perturb=4, compact=compact)
    np.testing.assert_allclose(best_e, p.energies(best), rtol=1e-9, atol=1e-12)
    assert np.all(best_e <= p.energies(start) + 1e-12)


@pytest.mark.parametrize("per_channel", [False, True])
def test_reaches_exact_optimum_on_small_problems(per_channel):
    for seed in (8, 9):
        p = make_problem(m=6, n=12, seed=seed, per_channel=per_channel)
        sol = Tabu().solve(p, seed=0)
        np.testing.assert_allclose(sol.energy, get_solver("exact").solve(p).energy,
                                   rtol=1e-9, atol=1e-12)


def test_best_state_is_a_local_minimum_and_beats_steepest_descent():
    # from its best state tabu always takes an improving flip (non-tabu, or tabu by
    # aspiration), so the best state has none; with tenure 0 and no descent its first moves
    # are exactly steepest descent, so it ends no worse than greedy
    p = make_problem(m=8, n=14, seed=11)
    for solver in (Tabu(), Tabu(restarts=0, descent=False, tenure=0)):
        sol = solver.solve(p, seed=0)
        assert np.all(p.flip_deltas(sol.choices)[p.free] >= -1e-9)
    greedy = get_solver("greedy").solve(p)
    plain = Tabu(restarts=0, descent=False, tenure=0).solve(p, seed=0)
    assert np.all(plain.energy <= greedy.energy + 1e-9 * np.abs(greedy.energy))


def test_never_worse_than_start_even_from_a_bad_start():
    p = make_problem(m=6, n=14, seed=3)
    bad = np.random.default_rng(1).integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    for solver in (Tabu(max_iter=1, restarts=0, descent=False), Tabu(max_iter=3, stall=1), Tabu()):
        for start in (None, bad):
            sol = solver.solve(p, init=start, seed=2)
            assert sol.info.get("channels_kept_start", 0) == 0   # the kernel itself, not the net
            s = p.rtn_choices() if start is None else start
            assert np.all(sol.energy <= p.energies(s) + 1e-12)
    assert np.all(Tabu().solve(p, init=bad, seed=0).energy < p.energies(bad))


@pytest.mark.parametrize("compact", [False, True])
def test_fixed_variables_are_never_flipped(compact):
    p = make_problem(m=4, n=10, seed=0)
    assert not p.free.all()
    start = p.rtn_choices() | ~p.free  # fixed variables set to 1 in the kernel's input
    best, _ = _run_kernel(p, start, rounds=5, perturb=20, tenure=2, compact=compact)
    assert np.all(best[~p.free] == 1.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), per_channel=st.booleans(),
       descent=st.booleans())
def test_kernel_on_the_free_sub_problem_gives_the_same_result(seed, n, per_channel, descent):
    # compact=True gathers H[free][:, free] per channel: the same moves in the same order
    p = make_problem(m=4, n=n, seed=seed, per_channel=per_channel)
    out = [_run_kernel(p, p.rtn_choices(), rounds=4, perturb=3, descent=descent, seed=seed,
                       compact=compact) for compact in (False, True)]
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_compacting_is_chosen_by_the_work_it_saves():
    # k^2 to gather against (n - k) saved in each O(n) pass
    assert not _kernels.compact_pays(100, np.full(4, 100), 1e9)     # nothing fixed
    assert not _kernels.compact_pays(100, np.full(4, 80), 200)      # `fast`: ~2 n passes
    assert _kernels.compact_pays(100, np.full(4, 80), 10_000)       # `quality`: ~100 n passes


def test_seeded_and_thread_count_independent():
    p = make_problem(m=8, n=12, seed=5)
    solver = Tabu(restarts=6, max_iter=20)
    a = solver.solve(p, seed=7)
    np.testing.assert_array_equal(a.choices, solver.solve(p, seed=7).choices)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = solver.solve(p, seed=7)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(a.choices, single.choices)


def test_per_channel_hessian_equals_shared_when_identical():
    p = make_problem(m=5, n=10, seed=6)
    stacked = type(p).from_weight(p.weight, np.broadcast_to(p.hessian, (5, 10, 10)), p.grid)
    a = Tabu(restarts=3).solve(p, seed=1)
    np.testing.assert_array_equal(a.choices, Tabu(restarts=3).solve(stacked, seed=1).choices)


def test_single_input_and_channel_without_free_variables():
    p1 = make_problem(m=3, n=1, seed=2, clip_some=False)
    np.testing.assert_allclose(Tabu().solve(p1, seed=0).energy,
                               get_solver("exact").solve(p1).energy, atol=1e-12)
    p = make_problem(m=3, n=6, seed=2, clip_some=False)
    w = p.weight.copy()
    w[1] = 100.0 * np.abs(p.scale[1]) * np.sign(w[1] + 0.5)  # the whole channel clips
    q = type(p).from_weight(w, p.hessian, p.grid)
    assert not q.free[1].any() and q.free[0].any()
    sol = Tabu(tenure=50, perturb=50).solve(q, seed=0)  # both capped to the channel's size
    np.testing.assert_allclose(sol.energy, get_solver("exact").solve(q).energy, atol=1e-12)


def test_registered_and_bad_arguments():
    assert isinstance(get_solver("tabu", restarts=0), Tabu)
    for kwargs, word in [(dict(max_iter=0), "max_iter"), (dict(restarts=-1), "restarts"),
                         (dict(tenure=2.5), "tenure"), (dict(stall=0), "stall"),
                         (dict(perturb=True), "perturb"), (dict(iters_per_var=0), "iters_per_var"),
                         (dict(reset_every="2"), "reset_every")]:
        with pytest.raises(QroundError, match=word):
            Tabu(**kwargs)


@pytest.mark.parametrize("per_channel", [False, True])
def test_kernel_inputs_energy_is_the_problem_energy(per_channel):
    # kernel_inputs takes the energies from the local fields it already has (one product with H)
    p = make_problem(m=6, n=15, seed=12, per_channel=per_channel, symmetric=False)
    b = np.random.default_rng(0).integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    args = _kernels.kernel_inputs(p, b, np.random.default_rng(0))
    np.testing.assert_allclose(args["energy"], p.energies(b), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(args["fields"], p.local_fields(b), rtol=1e-12, atol=1e-12)


def test_a_time_limit_that_never_binds_changes_nothing():
    """The clock checks make no decision of their own: a limit far above the search's time
    gives the same result as none."""
    p = make_problem(m=5, n=30, seed=11)
    plain = Tabu(restarts=3).solve(p, seed=4)
    limited = Tabu(restarts=3, time_limit=3600.0).solve(p, seed=4)
    np.testing.assert_array_equal(plain.choices, limited.choices)
    assert limited.info["time_limit"] == 3600.0


def test_unbounded_rounds_end_when_the_time_is_up():
    """restarts=None runs rounds until time_limit; the search then returns a valid state never
    worse than its start (a generous bound on the wall time checks it did stop)."""
    import time

    p = make_problem(m=3, n=40, seed=12)
    start = p.rtn_choices()
    t0 = time.perf_counter()
    sol = Tabu(restarts=None, time_limit=0.05).solve(p, init=start, seed=0)
    assert time.perf_counter() - t0 < 30.0
    # ten million rounds take many minutes: the limit, not the count, must end this one
    t0 = time.perf_counter()
    Tabu(restarts=10 ** 7, time_limit=0.05).solve(p, init=start, seed=0)
    assert 0.05 <= time.perf_counter() - t0 < 30.0
    assert np.all(sol.energy <= p.energies(start) + 1e-12)
    np.testing.assert_allclose(sol.energy, p.energies(sol.choices), rtol=1e-9, atol=1e-12)
    tiny = Tabu(restarts=None, time_limit=1e-9).solve(p, init=start, seed=0)
    assert np.all(tiny.energy <= p.energies(start) + 1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(restarts=None), "restarts=None .* needs a time_limit"),
    (dict(time_limit=0), "time_limit"),
    (dict(time_limit=-1.0), "time_limit"),
    (dict(time_limit=float("nan")), "time_limit"),
    (dict(time_limit="1s"), "time_limit"),
    (dict(time_limit=1e12), "time_limit"),
    (dict(restarts=2 ** 70), "restarts=.* is too large"),
    (dict(max_iter=2 ** 70), "max_iter=.* is too large"),
    (dict(iters_per_var=1e30), "iters_per_var"),
])
def test_time_limit_and_sizes_are_checked(kwargs, match):
    with pytest.raises(QroundError, match=match):
        Tabu(**kwargs)


def test_a_time_limit_is_refused_without_a_clock(monkeypatch):
    monkeypatch.setattr(_kernels, "HAS_CLOCK", False)
    with pytest.raises(QroundError, match="clock_gettime"):
        Tabu(time_limit=1.0)
    Tabu(restarts=2)   # without a limit nothing needs the clock



def _with_dead_inputs(per_channel=False, dead=12, seed=0):
    """A 3-bit layer of 40 correlated inputs plus ``dead`` inputs that are always zero."""
    from qround import GridSpec, RoundingProblem
    from qround.grid import fit_grid

    rng = np.random.default_rng(seed)
    m, nl = 16, 40
    x = rng.normal(size=(200, nl)) @ (np.eye(nl) + rng.normal(size=(nl, nl)) / 6)
    h = np.zeros((nl + dead, nl + dead))
    h[:nl, :nl] = x.T @ x / 200
    w = rng.normal(size=(m, nl + dead))
    grid = fit_grid(w, GridSpec(bits=3), scale=np.abs(w).max(1) / 3.5)
    if per_channel:
        h = np.repeat(h[None], m, axis=0)
    p = RoundingProblem.from_weight(w, h, grid)
    return p, p.restrict(np.arange(nl), p.rtn_choices())


@pytest.mark.parametrize("spec", ["tabu(restarts=0,descent=False)", "tabu", "fast", "anneal"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_dead_inputs_do_not_trap_the_search(spec, per_channel):
    # every flip of a dead input changes the energy by 0; tabu picked those at each local
    # minimum and cycled among them (12 > tenure 10): the round ended where greedy did, 30.69
    # against 23.15 without the dead inputs
    p, live = _with_dead_inputs(per_channel)
    with_dead = get_solver(spec).solve(p, seed=0)
    without = get_solver(spec).solve(live, seed=0)
    np.testing.assert_allclose(with_dead.total_cost, without.total_cost, rtol=1e-10)
    assert with_dead.total_cost < get_solver("greedy").solve(p, seed=0).total_cost
    start = p.rtn_choices()
    assert np.array_equal(with_dead.choices[:, 40:], start[:, 40:])   # left where they were


def test_kernel_inputs_leave_invisible_variables_out_of_the_search():
    p, _ = _with_dead_inputs(dead=3)
    args = _kernels.kernel_inputs(p, p.rtn_choices(), np.random.default_rng(0))
    assert np.all(args["nfree"] == p.free[:, :40].sum(axis=1))
    assert np.all(args["step"][:, 40:] == 0) and np.all(args["step"][:, :40] == p.step[:, :40])
    for c in range(p.num_channels):
        assert np.all(args["free_idx"][c, :args["nfree"][c]] < 40)
