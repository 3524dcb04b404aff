"""The solver contract of the base class: the start's handling, the keep-the-better guard, seeds,
composites and Solution's ratio (tests from mutation testing, helper-127)."""
from __future__ import annotations

import numpy as np
import pytest

from qround import QroundError, get_solver
from qround.solvers import BestOf, Chain, Solver
from qround.solvers.base import cost_noise, make_solution

from ..conftest import make_problem


class _Worse(Solver):
    """Flips every free variable of the channels in ``channels`` (all by default), writing into
    its start: on an RTN start each flipped channel gets worse."""

    name = "worse"

    def __init__(self, channels=None):
        self.channels = channels

    def _solve(self, problem, start, rng):
        rows = slice(None) if self.channels is None else list(self.channels)
        start[rows] ^= problem.free[rows]      # in place, as a careless solver might
        return start


class _Record(Solver):
    """Returns its start unchanged; records a copy of each start it is given."""

    name = "record"

    def __init__(self):
        self.starts = []

    def _solve(self, problem, start, rng):
        self.starts.append(start.copy())
        return start


def test_a_worse_result_keeps_the_start_and_says_how_many_channels():
    p = make_problem(m=5, n=9, seed=1)
    sol = _Worse(channels=[1, 3]).solve(p)
    assert sol.info["channels_kept_start"] == 2
    np.testing.assert_array_equal(sol.choices, p.rtn_choices())
    np.testing.assert_allclose(sol.energy, p.rtn_energies(), rtol=0, atol=0)


def test_the_start_is_kept_even_when_the_solver_wrote_into_it():
    """The guard compares with the start as given, not with the solver's scratch copy."""
    p = make_problem(m=4, n=8, seed=2)
    init = p.rtn_choices().copy()
    sol = _Worse().solve(p, init=init)
    np.testing.assert_array_equal(init, p.rtn_choices())          # the caller's array
    np.testing.assert_array_equal(sol.choices, p.rtn_choices())   # the start, not the flips
    assert sol.info["channels_kept_start"] == 4


def test_make_solution_masks_fixed_variables():
    p = make_problem(m=4, n=8, seed=3)
    assert (~p.free).any()
    sol = make_solution(p, np.ones(p.weight.shape, dtype=bool), 0.0, "all-up")
    assert not np.any(sol.choices & ~p.free)
    assert sol.codes.min() >= p.qmin and sol.codes.max() <= p.qmax
    np.testing.assert_allclose(sol.energy, p.energies(sol.choices))


def test_make_solution_owns_its_info():
    p = make_problem(m=2, n=4, seed=0)
    info = {"k": 1}
    sol = make_solution(p, p.rtn_choices(), 0.0, "x", info)
    info["k"] = 2
    assert sol.info == {"k": 1}


def test_a_start_with_fixed_variables_set_reaches_the_solver_masked():
    p = make_problem(m=4, n=8, seed=3)
    rec = _Record()
    sol = rec.solve(p, init=np.ones(p.weight.shape, dtype=bool))
    assert not np.any(rec.starts[0] & ~p.free)
    np.testing.assert_array_equal(rec.starts[0], p.free)
    np.testing.assert_array_equal(sol.choices, p.free)


def test_a_solution_is_a_start():
    p = make_problem(m=4, n=8, seed=4)
    first = get_solver("stochastic").solve(p, seed=0)
    rec = _Record()
    rec.solve(p, init=first)
    np.testing.assert_array_equal(rec.starts[0], first.choices)


@pytest.mark.parametrize("seed", [-1, True, np.bool_(False), 1.0, "0"])
def test_a_bad_seed_is_a_qround_error(seed):
    with pytest.raises(QroundError, match="seed must be None, a non-negative integer"):
        get_solver("stochastic").solve(make_problem(m=2, n=4), seed=seed)


def test_a_generator_seed_is_used_and_advanced():
    p = make_problem(m=4, n=8, seed=5)
    gen = np.random.default_rng(123)
    before = gen.bit_generator.state
    a = get_solver("stochastic").solve(p, seed=gen)
    assert gen.bit_generator.state != before
    b = get_solver("stochastic").solve(p, seed=np.random.default_rng(123))
    np.testing.assert_array_equal(a.choices, b.choices)
    # the generator's own stream, not one fixed stream whatever the generator
    streams = {get_solver("stochastic").solve(p, seed=np.random.default_rng(s)).choices.tobytes()
               for s in range(6)}
    assert len(streams) > 1


def test_best_of_counts_only_strict_wins():
    p = make_problem(m=5, n=8, seed=1)
    sol = BestOf(get_solver("nearest"), get_solver("nearest")).solve(p)
    assert sol.info["channels_won"] == {"nearest": 0, "nearest#2": 0}
    sol = BestOf(get_solver("nearest"), get_solver("greedy")).solve(p)
    won = sol.info["channels_won"]["greedy"]
    assert won == int(np.sum(sol.energy < p.rtn_energies()))


def test_best_of_runs_every_member_from_the_same_start():
    p = make_problem(m=4, n=8, seed=6)
    rec = _Record()
    BestOf(get_solver("greedy"), rec).solve(p)
    np.testing.assert_array_equal(rec.starts[0], p.rtn_choices())
    # a chain, by contrast, starts each stage from the previous one's result
    rec2 = _Record()
    greedy = get_solver("greedy").solve(p)
    Chain(get_solver("greedy"), rec2).solve(p)
    np.testing.assert_array_equal(rec2.starts[0], greedy.choices)


def test_ratio_of_a_small_but_real_rounding_error():
    """Weights a little off the grid: the ratio is the cost over RTN's, not taken for round-off
    (cost_noise is far below a real cost)."""
    from qround import GridSpec, RoundingProblem
    from qround.grid import fit_grid

    rng = np.random.default_rng(0)
    s = np.full(3, 0.1)
    w = s[:, None] * rng.integers(-3, 3, size=(3, 8)) + 1e-4 * rng.normal(size=(3, 8))
    x = rng.normal(size=(40, 8))
    p = RoundingProblem.from_weight(w, x.T @ x / 40, fit_grid(w, GridSpec(bits=3), scale=s))
    assert p.free.all()
    flipped = p.rtn_choices().copy()
    flipped[0, 0] ^= True
    sol = make_solution(p, flipped, 0.0, "flipped")
    assert 0 < sol.total_rtn_cost < 1e-6 and cost_noise(p) < 1e-3 * sol.total_rtn_cost
    assert sol.ratio == pytest.approx(sol.total_cost / sol.total_rtn_cost, rel=1e-9)
    assert sol.ratio > 10


def test_best_of_credits_each_channel_to_the_part_whose_solution_is_kept():
    """The wins used to count every improvement on the best so far, so a channel improved by
    two parts counted twice (12 channels, {'greedy': 12, 'gptq': 3}, helper-155)."""
    p = make_problem(m=12, n=10, seed=4)
    parts = [get_solver("nearest"), get_solver("gptq"), get_solver("greedy"), get_solver("gptq")]
    sol = BestOf(*parts).solve(p, seed=0)
    won = sol.info["channels_won"]
    assert list(won) == ["nearest", "gptq", "greedy", "gptq#4"]
    energies = [s.solve(p, seed=0).energy for s in parts]
    start = p.rtn_energies()
    expect = {key: 0 for key in won}
    for c in range(len(start)):
        lowest = min(e[c] for e in energies)
        if lowest < start[c]:   # the earliest part that reaches the lowest energy keeps it
            expect[list(won)[next(i for i, e in enumerate(energies) if e[c] == lowest)]] += 1
    assert won == expect
    assert sum(won.values()) <= len(start) and won["gptq#4"] == 0
