"""Cross-entropy method (``cem``): the smart start, the update rule, the clamp, convergence and
the memory budget (tests from mutation testing, helper-123)."""
from __future__ import annotations

import numpy as np

from qround.grid import GridSpec, fit_grid
from qround.problems import RoundingProblem
from qround.solvers import CrossEntropy, _torch

from .test_cem import make_problem


def _near_ceiling(m=20, n=8, frac=0.97, seed=0):
    """Separable problem (diagonal H) whose weights all lie ``frac`` of a step above a grid
    point: rounding up (RTN) is the optimum of every channel."""
    rng = np.random.default_rng(seed)
    scale = np.full(m, 0.1)
    codes = rng.integers(-3, 3, size=(m, n))
    w = (codes + frac) * scale[:, None]
    grid = fit_grid(w, GridSpec(bits=3), scale=scale)
    h = np.diag(rng.uniform(0.5, 2.0, n))
    return RoundingProblem.from_weight(w, h, grid)


def test_first_samples_are_drawn_at_the_stochastic_rounding_probabilities():
    # AdaRound's smart start p = frac: with p = 0.97 two samples of 8 variables are all ones
    # (RTN, the optimum) on most channels; at p = 0.5 one in 256 is
    p = _near_ceiling()
    assert p.free.all()
    zeros = np.zeros(p.weight.shape, dtype=bool)
    sol = CrossEntropy(samples=2, iterations=1).solve(p, init=zeros, seed=0)
    hit = np.all(sol.choices == p.rtn_choices(), axis=1)
    assert hit.mean() >= 0.8


def test_a_small_alpha_converges_at_once_and_alpha_one_moves_all_the_way():
    # p <- alpha mean(elite) + (1 - alpha) p moves each probability by at most alpha: below
    # tol a channel has converged after its first iteration; alpha = 1 jumps to the elite mean
    p = make_problem(m=6, n=10, seed=3)
    slow = CrossEntropy(samples=16, iterations=30, alpha=1e-4, tol=1e-3).solve(p, seed=0)
    assert slow.info["iterations"] == 1 and slow.info["mean_iterations"] == 1.0
    fast = CrossEntropy(samples=16, iterations=30, alpha=1.0, tol=1e-3).solve(p, seed=0)
    assert fast.info["iterations"] > 1


def test_a_channel_stops_when_its_probabilities_stop_moving():
    # alpha = 1 and one elite: p becomes the best sample clamped to [p_min, 1 - p_min]; once
    # the best no longer changes, p does not move and the channel stops long before the limit
    p = make_problem(m=6, n=10, seed=3)
    sol = CrossEntropy(samples=32, iterations=200, alpha=1.0, elite=0.01).solve(p, seed=0)
    assert sol.info["iterations"] < 200


def test_probabilities_stay_clamped_so_nothing_freezes():
    # p_min = 0.45 keeps every probability in [0.45, 0.55]: no probability can move by more
    # than 0.1, below tol = 0.2, so every channel has converged after its first iteration;
    # unclamped, alpha = 1 with one elite would move p to the elite's 0s and 1s
    p = make_problem(m=6, n=10, seed=3)
    sol = CrossEntropy(samples=8, iterations=25, alpha=1.0, elite=0.01, p_min=0.45,
                       tol=0.2).solve(p, seed=0)
    assert sol.info["iterations"] == 1
    loose = CrossEntropy(samples=8, iterations=25, alpha=1.0, elite=0.01, p_min=0.01,
                         tol=0.2).solve(p, seed=0)
    assert loose.info["iterations"] > 1


def test_max_elements_sets_the_chunks_of_channels(monkeypatch):
    # (samples + 1) x n numbers a channel: max_elements = 3 channels' worth gives chunks of 3
    seen = []
    chunks = _torch.channel_chunks

    def spy(m, per_channel, budget):
        out = chunks(m, per_channel, budget)
        seen.append([(s.start, s.stop) for s in out])
        return out

    monkeypatch.setattr(_torch, "channel_chunks", spy)
    p = make_problem(m=7, n=10, seed=5)
    CrossEntropy(samples=16, iterations=2, max_elements=17 * 10 * 3).solve(p, seed=0)
    CrossEntropy(samples=16, iterations=2).solve(p, seed=0)
    assert seen == [[(0, 3), (3, 6), (6, 7)], [(0, 7)]]
