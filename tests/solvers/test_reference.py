from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qround import GridSpec, QroundError, RoundingProblem, get_solver
from qround.solvers import Exact, Greedy, Stochastic

from ..conftest import make_problem


def brute_force(p):
    best = np.zeros(p.num_channels)
    for c in range(p.num_channels):
        q = p.qubo(c)
        vals = [np.array(bits) @ q @ np.array(bits)
                for bits in itertools.product([0.0, 1.0], repeat=p.num_inputs)]
        best[c] = min(vals)
    return best


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), per_channel=st.booleans(),
       bits=st.integers(2, 4))
def test_exact_equals_brute_force(seed, n, per_channel, bits):
    p = make_problem(m=3, n=n, seed=seed, per_channel=per_channel, bits=bits, clip_some=n > 1)
    sol = Exact(block_bits=3).solve(p)  # small blocks exercise the blocked enumeration
    np.testing.assert_allclose(sol.energy, brute_force(p), atol=1e-10)


def test_exact_refuses_large_channels():
    p = make_problem(m=2, n=24, clip_some=False)
    with pytest.raises(QroundError, match="max_free"):
        Exact(max_free=20).solve(p)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), per_channel=st.booleans())
def test_greedy_is_a_local_minimum_and_never_worse(seed, per_channel):
    p = make_problem(m=4, n=12, seed=seed, per_channel=per_channel)
    start = np.random.default_rng(seed).integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    sol = Greedy().solve(p, init=start)
    assert np.all(sol.energy <= p.energies(start) + 1e-12)
    deltas = p.flip_deltas(sol.choices)
    assert np.all(deltas[p.free] >= -1e-9 * np.abs(sol.energy).max())
    # info["iterations"] counts passes: flips + 1 (the pass that found none), so at least one
    # more than the most inputs a channel changed, and 1 from a local minimum
    assert sol.info["iterations"] >= 1 + (sol.choices != start).sum(axis=1).max()
    assert Greedy().solve(p, init=sol.choices).info["iterations"] == 1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), per_channel=st.booleans(), symmetric=st.booleans(),
       bits=st.integers(2, 4), n=st.integers(1, 40), max_iter=st.one_of(st.none(), st.integers(1, 6)),
       random_start=st.booleans())
def test_compiled_descent_flips_as_the_numpy_loop(seed, per_channel, symmetric, bits, n, max_iter,
                                                  random_start):
    """``greedy`` runs a compiled kernel per channel; it makes exactly the flips of the batched
    numpy loop it replaced (same choices bit for bit, same pass count), limits included."""
    from qround.solvers.local import steepest_descent, steepest_descent_numpy

    p = make_problem(m=5, n=n, seed=seed, per_channel=per_channel, symmetric=symmetric, bits=bits,
                     clip_some=n > 1)
    rng = np.random.default_rng(seed)
    start = (rng.integers(0, 2, size=p.weight.shape).astype(bool) if random_start
             else np.zeros(p.weight.shape, dtype=bool)) & p.free
    start0 = start.copy()
    b, it = steepest_descent(p, start, max_iter)
    np.testing.assert_array_equal(start, start0)        # neither writes into the caller's start
    b_ref, it_ref = steepest_descent_numpy(p, start, max_iter)
    np.testing.assert_array_equal(start, start0)
    np.testing.assert_array_equal(b, b_ref)
    assert it == it_ref


def test_polishers_never_worse_than_any_solution():
    p = make_problem(m=6, n=14, seed=4)
    for name in ("stochastic", "nearest"):
        base = get_solver(name).solve(p, seed=0)
        polished = get_solver("greedy").solve(p, init=base)
        assert np.all(polished.energy <= base.energy + 1e-12)
        # by its own descent, not by the guard that keeps a start a solver made worse
        assert polished.info.get("channels_kept_start", 0) == 0


def test_stochastic_more_samples_not_worse():
    p = make_problem(m=6, n=14, seed=5)
    few = Stochastic(samples=2).solve(p, seed=0)
    many = Stochastic(samples=256).solve(p, seed=0)
    assert many.total_cost <= few.total_cost + 1e-12
    assert many.ratio <= 1.0 + 1e-12


def test_dimod_solvers_reach_optimum_on_tiny_problem():
    pytest.importorskip("dwave.samplers", reason="dwave-samplers not installed")
    p = make_problem(m=3, n=8, seed=6)
    opt = Exact().solve(p)
    for name in ("neal", "dwave-tabu"):
        sol = get_solver(name).solve(p, seed=1)
        np.testing.assert_allclose(sol.energy, opt.energy, atol=1e-9)


def test_dimod_solvers_keep_the_start_of_a_channel_with_no_bias(recwarn):
    # a channel no input reaches (H zero there): every state costs the same, and dwave's SA
    # warned "All bqm biases are zero ... this is likely a value error"
    pytest.importorskip("dwave.samplers", reason="dwave-samplers not installed")
    w = np.random.default_rng(0).normal(size=(3, 6))
    h = np.zeros((3, 6, 6))
    h[1] = np.eye(6)   # only channel 1 has a cost
    p = RoundingProblem.from_weight(w, h)
    start = np.ones((3, 6), dtype=bool) & p.free
    sol = get_solver("neal(num_reads=2, num_sweeps=20)").solve(p, init=start, seed=0)
    np.testing.assert_array_equal(sol.choices[[0, 2]], start[[0, 2]])
    np.testing.assert_allclose(sol.energy[1], Exact().solve(p).energy[1], atol=1e-9)
    assert not [w for w in recwarn if "biases are zero" in str(w.message)]


def test_dimod_any_sampler_object():
    import dimod

    p = make_problem(m=2, n=6, seed=8)
    sol = get_solver("dimod", sampler=dimod.ExactSolver()).solve(p)
    np.testing.assert_allclose(sol.energy, Exact().solve(p).energy, atol=1e-9)
    subset = get_solver("neal", channels=[1]).solve(p, seed=0)
    np.testing.assert_array_equal(subset.choices[0], p.rtn_choices()[0])


# ------------------------------------------------ found by the twelfth session's walkthrough
def test_dimod_samplers_refuse_misspelt_options_and_wrap_their_errors():
    pytest.importorskip("dwave.samplers", reason="needs dwave-samplers")
    from qround import QroundError, get_solver

    p = make_problem(m=2, n=8, seed=1)
    # dwave's samplers take **kwargs and ignore a misspelt name: qround refuses it
    with pytest.raises(QroundError, match=r"does not take \['num_sweep'\]"):
        get_solver("neal(num_sweep=50)").solve(p, seed=0)
    with pytest.raises(QroundError, match=r"does not take \['timeot'\]"):
        get_solver("dwave-tabu(timeot=1)").solve(p, seed=0)
    # the sampler's own refusal of a value comes as a QroundError naming the sampler
    with pytest.raises(QroundError, match=r"beta_schedule_type='bogus'.* refused"):
        get_solver("neal(beta_schedule_type='bogus')").solve(p, seed=0)
    # values dwave takes and then hangs on, does nothing with, or overflows on: refused first
    for spec, message in (("neal(num_sweeps=-5)", "num_sweeps must not be negative"),
                          ("dwave-tabu(timeout=-1)", "positive number of milliseconds"),
                          ("dwave-tabu(timeout=0)", "positive number of milliseconds"),
                          ("dwave-tabu(timeout=1e400)", "timeout must be finite"),
                          ("neal(beta_range=(1.0, 1e400))", "beta_range must be finite"),
                          ("neal(beta_range=(0, 2))", "two positive numbers")):
        with pytest.raises(QroundError, match=message):
            get_solver(spec)
    with pytest.raises(QroundError, match="beta_range must be finite"):
        get_solver("neal", beta_range=(float("nan"), 1.0))
    with pytest.raises(QroundError, match="num_reads must be an integer >= 1"):   # ours, first
        get_solver("neal(num_reads=0)")
    assert get_solver("neal(num_sweeps=50)").solve(p, seed=0).ratio <= 1.0


def test_cli_solve_reports_a_dimod_samplers_refusal_in_one_line(tmp_path, capsys):
    pytest.importorskip("dwave.samplers", reason="needs dwave-samplers")
    from qround.cli import main
    from qround.problems.io import save_layer_stats

    p = make_problem(m=3, n=10, seed=2)
    path = tmp_path / "l.npz"
    save_layer_stats(path, p.weight, p.hessian, bits=4, name="toy")
    assert main(["solve", str(path), "--solver", "neal(beta_schedule_type='bogus')"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err
    assert main(["solve", str(path), "--solver", "neal(num_sweeps=-5)"]) == 2
    err = capsys.readouterr().err
    assert "num_sweeps must not be negative" in err and "Traceback" not in err


@pytest.mark.parametrize("start_up", [False, True])
def test_greedy_leaves_an_input_the_cost_cannot_see_alone(start_up):
    """A dead input's flips change nothing: accepting them (a threshold of +tol instead of
    -tol) cycled until the iteration limit."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((30, 8))
    a[:, 5] = 0.0
    p = RoundingProblem.from_weight(rng.standard_normal((4, 8)), a.T @ a / 30, GridSpec(bits=3))
    start = np.full(p.weight.shape, start_up) & p.free
    sol = get_solver("greedy").solve(p, init=start)
    np.testing.assert_array_equal(sol.choices[:, 5], start[:, 5])
