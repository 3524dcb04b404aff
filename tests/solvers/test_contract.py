"""The contract every registered solver passes (as dimod's sampler conformance suite does)."""
from __future__ import annotations

import numpy as np
import pytest

from qround import QroundError, available_solvers, get_solver
from qround.solvers import BestOf, Chain, Solution, Solver

from ..conftest import make_problem

# Solvers that need a sampler argument or are aliases are still built from their registry name.
SOLVERS = sorted(available_solvers())
# Start from the given solution and only ever keep the best seen: their own result is never worse
# (the base class's guard, which keeps a channel's start where a result is worse, never acts).
DESCENT = {"greedy", "tabu", "tabu-fast", "dwave-steepest"}


@pytest.mark.parametrize("name", SOLVERS)
def test_contract(name, small_problem):
    p = small_problem
    solver = get_solver(name)
    rng = np.random.default_rng(7)
    bad_start = rng.integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    for start in (None, bad_start):
        sol = solver.solve(p, init=start, seed=3)
        assert isinstance(sol, Solution)
        assert sol.choices.shape == p.weight.shape and sol.choices.dtype == bool
        # valid codes on the grid, floor or ceil of each weight
        assert sol.codes.min() >= p.qmin and sol.codes.max() <= p.qmax
        np.testing.assert_array_equal(p.choices_from_codes(sol.codes), sol.choices)
        # fixed variables respected
        assert not np.any(sol.choices & ~p.free)
        # energies and costs match a recomputation
        np.testing.assert_allclose(sol.energy, p.energies(sol.choices), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sol.cost, p.costs(sol.choices), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sol.rtn_cost, p.rtn_costs())
        # never worse than the start, channel by channel
        s = p.rtn_choices() if start is None else start
        assert np.all(sol.energy <= p.energies(s) + 1e-12)
        if name in DESCENT:
            assert sol.info.get("channels_kept_start", 0) == 0, sol.info
        assert sol.seconds >= 0
    # seeded determinism
    a = solver.solve(p, seed=11)
    b = solver.solve(p, seed=11)
    np.testing.assert_array_equal(a.choices, b.choices)


@pytest.mark.parametrize("name", SOLVERS)
def test_global_rng_untouched(name):
    import torch

    p = make_problem(m=3, n=8, seed=5)
    np_state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state().clone()
    get_solver(name).solve(p, seed=0)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_composition_specs(problem):
    chain = get_solver("stochastic+greedy")
    assert isinstance(chain, Chain) and chain.label == "stochastic+greedy"
    sol = chain.solve(problem, seed=0)
    first = get_solver("stochastic").solve(problem, seed=0)
    assert np.all(sol.energy <= first.energy + 1e-12)
    best = get_solver("nearest|greedy|stochastic").solve(problem, seed=0)
    for name in ("nearest", "greedy"):
        assert np.all(best.energy <= get_solver(name).solve(problem, seed=0).energy + 1e-12)


def test_registry_errors():
    with pytest.raises(QroundError, match="unknown solver"):
        get_solver("nope")
    with pytest.raises(QroundError, match="composition"):
        get_solver("greedy+nearest", max_iter=3)
    with pytest.raises(QroundError, match="RoundingProblem"):
        get_solver("greedy").solve(np.eye(3))
    with pytest.raises(QroundError, match="shape"):
        get_solver("greedy").solve(make_problem(), init=np.zeros((2, 2)))


@pytest.mark.parametrize("name", SOLVERS)
def test_label_is_the_registry_name(name):
    assert get_solver(name).label == name


def test_named_defaults_never_worse_than_their_parts():
    # fast and quality start from GPTQ; quality keeps, per channel, the best of its tabu branch,
    # its anneal + tabu branch and its mean-field + tabu branch, so it is never worse than GPTQ
    # then its tabu branch alone with the same seed (the branch draws first), nor than GPTQ then
    # mean-field annealing (deterministic); its stall limit of 4000 iterations cannot fire on 40
    # inputs: a round has 400
    from qround.solvers import GPTQ, MeanField, Tabu

    problem = make_problem(m=12, n=40, bits=2, seed=3)
    gptq = get_solver("gptq").solve(problem, seed=0)
    for name in ("fast", "quality"):
        assert np.all(get_solver(name).solve(problem, seed=0).energy <= gptq.energy + 1e-12)
    quality = get_solver("quality").solve(problem, seed=0)
    for part in (Chain(GPTQ(), Tabu(restarts=2)), Chain(GPTQ(), MeanField())):
        assert np.all(quality.energy <= part.solve(problem, seed=0).energy + 1e-12)


# ------------------------------------------------------------------------------ BLAS threads
def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


class _RecordBlasThreads(Solver):
    """Returns its start; records the BLAS thread counts seen inside ``_solve``."""

    name = "record-blas"

    def __init__(self):
        self.seen = []

    def _solve(self, problem, start, rng):
        self.seen.append(_blas_threads())
        return start


def _two_blas_threads():
    """threadpoolctl limit giving BLAS 2 threads, or a skip where that cannot be set."""
    from threadpoolctl import threadpool_limits

    # a first solve loads every BLAS a solve uses (scipy brings its own OpenBLAS): one loaded
    # after the limit would start at its own default, 1 under OMP_NUM_THREADS=1
    _RecordBlasThreads().solve(make_problem(m=2, n=4, seed=0))
    limit = threadpool_limits(limits=2, user_api="blas")
    if not _blas_threads() or min(_blas_threads()) < 2:
        limit.restore_original_limits()
        pytest.skip("numpy's BLAS cannot run 2 threads here (one core, or no BLAS library "
                    "visible to threadpoolctl)")
    return limit


def test_solve_holds_blas_to_one_thread_on_small_layers_and_restores_it():
    limit = _two_blas_threads()
    try:
        inner, outer = _RecordBlasThreads(), _RecordBlasThreads()
        problem = make_problem(m=4, n=12, seed=0)
        inner.solve(problem)
        Chain(outer, Chain(inner)).solve(problem)          # nested: still one thread inside
        assert inner.seen == [[1] * len(inner.seen[0])] * 2 and outer.seen == inner.seen[:1]
        assert min(_blas_threads()) == 2                    # restored after each solve
    finally:
        limit.restore_original_limits()


import threading  # noqa: E402


class _Step(Solver):
    """Sets ``entered`` inside ``_solve``, then waits for ``leave`` (an event or a thread)."""

    name = "step"

    def __init__(self, entered, leave):
        self.entered, self.leave = entered, leave

    def _solve(self, problem, start, rng):
        self.entered.set()
        self.leave.wait(timeout=10) if isinstance(self.leave, threading.Event) \
            else self.leave.join(timeout=10)
        return start


def test_overlapping_solves_in_two_threads_restore_blas_threads():
    """The limit is the process's: with a per-thread count, a solve that started while another
    held BLAS at 1 and ended last restored that 1 for good."""
    before = _blas_threads()  # the process's own setting: a threadpool_limits made in this
    # thread would hide the bug (OpenBLAS then reads the count per thread)
    if not before or min(before) < 2:
        pytest.skip("numpy's BLAS runs one thread here (one core, or no BLAS visible)")
    problem = make_problem(m=4, n=12, seed=0)
    a_in, b_in = threading.Event(), threading.Event()
    a = threading.Thread(target=_Step(a_in, b_in).solve, args=(problem,))
    a.start()
    assert a_in.wait(timeout=10)                       # a holds the limit
    b = threading.Thread(target=_Step(b_in, a).solve, args=(problem,))
    b.start()                                          # b enters, lets a go, leaves last
    b.join(timeout=20)
    assert not a.is_alive() and not b.is_alive()
    assert _blas_threads() == before


def test_solve_leaves_blas_threads_alone_on_large_layers():
    from qround.solvers.base import BLAS_LIMIT_BELOW

    limit = _two_blas_threads()
    try:
        n = 128
        m = -(-BLAS_LIMIT_BELOW // n ** 2)                  # m n^2 just at the threshold
        problem = make_problem(m=m, n=n, seed=0)
        rec = _RecordBlasThreads()
        rec.solve(problem)
        assert min(rec.seen[0]) == 2
        small = make_problem(m=m - 1, n=n, seed=0)
        rec.solve(small)
        assert rec.seen[1] == [1] * len(rec.seen[1])
    finally:
        limit.restore_original_limits()


# ------------------------------------------------------------------------------ energies
class _FlipFirst(Solver):
    """Flips variable 0 of every channel (free or not): a move that is better or worse."""

    name = "flip-first"

    def _solve(self, problem, start, rng):
        out = start.copy()
        out[:, 0] ^= True
        return out


def test_composites_pass_each_stages_exact_energies_on(monkeypatch):
    """A solve makes one product with H per stage result (plus what the stages compute inside),
    and one for its start unless that is RTN (cached on the problem); not two per stage and two
    more per composite.  Results and energies are those of solving stage by stage."""
    import qround.problems.energy as energy

    problem = make_problem(m=5, n=9, seed=2)
    problem.rtn_costs()                                # RTN energies: cached once, not counted
    other_start = ~problem.rtn_choices() & problem.free
    calls = []
    real = energy.hessian_times
    monkeypatch.setattr(energy, "hessian_times", lambda *a: calls.append(1) or real(*a))

    def products(solver, init=None):
        calls.clear()
        sol = solver.solve(problem, init=init, seed=0)
        return len(calls), sol

    a, b = _FlipFirst(), get_solver("greedy")
    alone = {s: products(s)[0] for s in (a, b)}      # result + inside, from RTN
    assert alone[a] == 1
    for spec in (Chain(a, b, a), BestOf(a, b), Chain(a, BestOf(b, Chain(a, b)))):
        count, sol = products(spec)
        assert count == sum(alone[s] for s in _leaves(spec)), spec.label
        assert np.allclose(sol.energy, problem.energies(sol.choices), rtol=1e-12, atol=1e-12)
        count, _ = products(spec, init=other_start)
        assert count == 1 + sum(alone[s] for s in _leaves(spec)), spec.label
    monkeypatch.undo()
    stepwise = a.solve(problem, init=b.solve(problem, init=a.solve(problem).choices))
    chained = Chain(a, b, a).solve(problem)
    assert np.array_equal(chained.choices, stepwise.choices)
    assert np.array_equal(chained.energy, stepwise.energy)


def _leaves(solver):
    subs = getattr(solver, "solvers", None)
    return [solver] if subs is None else [leaf for s in subs for leaf in _leaves(s)]


def test_blas_loaded_after_the_first_solve_is_held_too():
    """A library loaded after the first solve (scipy's own OpenBLAS) is held as well: run in a
    fresh process, where scipy is not imported yet."""
    import subprocess
    import sys

    code = """
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
from qround.solvers.base import Solver
from tests.conftest import make_problem

class Rec(Solver):
    name = "rec"
    seen = []
    def _solve(self, problem, start, rng):
        self.seen.append([l["num_threads"] for l in threadpool_info() if l["user_api"] == "blas"])
        return start

problem = make_problem(m=3, n=8, seed=0)
Rec().solve(problem)
import scipy.linalg  # noqa: F401  (its OpenBLAS is loaded now)
with threadpool_limits(limits=2, user_api="blas"):
    before = [l["num_threads"] for l in threadpool_info() if l["user_api"] == "blas"]
    Rec().solve(problem)
print(len(before), min(before), Rec.seen[-1])
"""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]          # the repository: tests.conftest imports
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         check=True).stdout.split(maxsplit=2)
    libraries, least = int(out[0]), int(out[1])
    if least < 2:
        pytest.skip("numpy's BLAS cannot run 2 threads here")
    assert out[2].strip() == str([1] * libraries)


def test_spec_options_reach_the_solver_and_the_label(problem):
    from qround.solvers import Anneal, Tabu

    spec = "gptq+tabu(restarts=3, tenure=2, descent=False)|anneal(num_sweeps=20,cold_accept=1e-7)"
    solver = get_solver(spec)
    assert isinstance(solver, BestOf) and solver.label == "".join(spec.split())
    chain, anneal = solver.solvers
    tabu = chain.solvers[1]
    assert isinstance(tabu, Tabu) and (tabu.restarts, tabu.tenure, tabu.descent) == (3, 2, False)
    assert tabu.label == "tabu(restarts=3,tenure=2,descent=False)"
    assert isinstance(anneal, Anneal) and anneal.num_sweeps == 20 and anneal.cold_accept == 1e-7
    # the options are the keyword arguments: same choices as the solver built in Python
    a = get_solver("tabu(restarts=1,max_iter=50)").solve(problem, seed=4)
    b = get_solver("tabu", restarts=1, max_iter=50).solve(problem, seed=4)
    assert np.array_equal(a.choices, b.choices)
    assert a.solver == "tabu(restarts=1,max_iter=50)"
    tup = get_solver("meanfield(beta=(1.0, 50.0), iterations=20)")
    assert tup.beta == (1.0, 50.0) and tup.iterations == 20


@pytest.mark.parametrize("spec,match", [
    ("tabu(8)", "key=value"),
    ("tabu(restarts=8", "unclosed parenthesis"),
    ("tabu)", "never opened"),
    ("tabu(restarts=x)", "literal"),
    ("tabu(restarts=8)(tenure=2)", "key=value"),
    ("tabu(foo=1)", "does not take"),
    ("tabu(restarts=-1)", "restarts"),
    ("nope(restarts=1)", "unknown solver 'nope'"),
    ("gptq+(restarts=1)", "NAME or NAME"),
    ("gptq++tabu", "empty part"),
    ("tabu(**{'restarts': 1})", "key=value"),
])
def test_spec_option_errors_name_the_problem(spec, match):
    with pytest.raises(QroundError, match=match):
        get_solver(spec)


def test_spec_options_and_keyword_arguments_do_not_collide():
    with pytest.raises(QroundError, match="both in the spec"):
        get_solver("tabu(restarts=2)", restarts=3)
    assert get_solver("tabu(restarts=2)", tenure=4).tenure == 4


def test_split_specs_keeps_options_whole():
    from qround.solvers.registry import spec_names, split_specs

    assert split_specs("gptq, tabu(restarts=8,tenure=20) ,,quality") == [
        "gptq", "tabu(restarts=8,tenure=20)", "quality"]
    assert split_specs("meanfield(beta=(1,50)),fast") == ["meanfield(beta=(1,50))", "fast"]
    assert spec_names("gptq+tabu(restarts=8)|anneal(order='sequential')") == [
        "gptq", "tabu", "anneal"]
    with pytest.raises(QroundError, match="unclosed"):
        split_specs("tabu(restarts=8,")


# ------------------------------------------------ found by the twelfth session's review
def test_spec_whitespace_is_kept_inside_strings():
    from qround.solvers.registry import normalize_spec

    assert normalize_spec("gptq + tabu( restarts = 8 )") == "gptq+tabu(restarts=8)"
    assert normalize_spec("dimod(sampler='neal', note='two words')") == \
        "dimod(sampler='neal',note='two words')"
    with pytest.raises(QroundError, match="'seq uential'"):
        get_solver("anneal(order='seq uential')")
    # an escaped quote inside a string does not end it
    with pytest.raises(QroundError, match="order must be"):
        get_solver("anneal(order='it\\'s')")


def test_spec_option_names_and_values_are_told_apart():
    with pytest.raises(QroundError, match="given twice"):
        get_solver("tabu(restarts=1, restarts=7)")
    with pytest.raises(QroundError, match=r"does not take \['nope'\]; it takes \[.*'restarts'"):
        get_solver("tabu(restarts=1, nope=2)")
    with pytest.raises(QroundError, match="hot_accept must be a finite number"):
        get_solver("anneal(hot_accept='0.5')")


def test_pathological_specs_get_a_short_clear_error():
    for spec in ("tabu(restarts=" + "1+" * 500 + "1)", "tabu(restarts=" + "-" * 3000 + "1)",
                 "tabu(restarts=" + "9" * 5000 + ")", "tabu(restarts=1 if 1 else 2)"):
        with pytest.raises(QroundError) as info:
            get_solver(spec)
        assert len(str(info.value)) < 400


def test_a_device_in_the_spec_must_agree_with_the_device_argument():
    assert get_solver("gptq(device='cpu')", device="cpu").device == "cpu"
    with pytest.raises(QroundError, match="give the device in one place"):
        get_solver("gptq(device='meta')", device="cpu")
    with pytest.raises(QroundError, match="give the device in one place"):
        get_solver("gptq+cem(device='cuda:3')", device="cpu")


def test_split_specs_normalises_and_drops_repeats():
    from qround.solvers.registry import split_specs

    assert split_specs("tabu(restarts=0, max_iter=5),tabu(restarts=0,max_iter=5), gptq") == [
        "tabu(restarts=0,max_iter=5)", "gptq"]


def test_warm_up_solves_a_small_problem_with_each_solver():
    from qround.solvers import warm_up

    seen = []

    class Spy(Solver):
        name = "spy"

        def _solve(self, problem, start, rng):
            seen.append(problem.weight.shape)
            return start

    warm_up(Spy(), Spy())
    assert seen == [(2, 16), (2, 16)]
    # a solver the small problem does not fit is skipped: its real call reports the error
    warm_up(get_solver("dimod(sampler='dwave-steepest', channels=[5])"))


def test_weights_already_on_the_grid_have_ratio_one():
    # costs are energy + const; on-grid weights cancel to about -3e-17, and ratio was NaN
    from qround import GridSpec, RoundingProblem
    from qround.grid import fit_grid

    w = np.array([[0.2, -0.2, -0.3]])
    p = RoundingProblem.from_weight(w, np.eye(3), fit_grid(w, GridSpec(bits=3),
                                                           scale=np.array([0.1])))
    sol = get_solver("nearest").solve(p)
    assert abs(sol.total_rtn_cost) < 1e-15
    assert sol.ratio == 1.0
    from qround.solvers.base import make_solution
    worse = make_solution(p, ~p.rtn_choices() & p.free, 0.0, "flipped")
    assert worse.total_cost > 0.01 and worse.ratio == float("inf")     # not 1.0
    rng = np.random.default_rng(0)
    for _ in range(50):                                   # random layers already quantised
        s = rng.uniform(0.01, 1.0, size=4)
        w = s[:, None] * rng.integers(-4, 4, size=(4, 6))
        x = rng.normal(size=(30, 6))
        p = RoundingProblem.from_weight(w, x.T @ x, fit_grid(w, GridSpec(bits=3), scale=s))
        for name in ("nearest", "greedy"):
            assert get_solver(name).solve(p).ratio == 1.0


def test_relative_costs_keep_a_nan_ratio():
    from qround import GridSpec, RoundingProblem

    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 5))
    x = rng.normal(size=(40, 5))
    h = x.T @ x / 40
    p = RoundingProblem.from_weight(w, h, GridSpec(bits=4), cross=h)    # no float_hessian
    sol = get_solver("nearest").solve(p)
    assert sol.total_rtn_cost < 0 and np.isnan(sol.ratio)
