"""Mutation-killing tests for qround/solvers/dimod_backend.py (DimodSolver)."""
from __future__ import annotations

import numpy as np
import pytest

from qround import QroundError, SolverError
from qround.solvers import DimodSolver, Exact

from ..conftest import make_problem

dimod = pytest.importorskip("dimod")


class Recorder(dimod.Sampler):
    """Declares seed and initial states; records each call; answers with dimod's ExactSolver."""

    properties = {}
    parameters = {}      # (dimod.Sampler's abstract property) set per instance below

    def __init__(self, parameters=("num_reads", "seed", "initial_states",
                                   "initial_states_generator")):
        self.parameters = {k: [] for k in parameters}
        self.calls = []

    def sample(self, bqm, **kwargs):
        self.calls.append(kwargs)
        return dimod.ExactSolver().sample(bqm)


def test_the_start_seed_and_reads_reach_a_sampler_that_declares_them():
    p = make_problem(m=3, n=6, seed=3)
    start = np.random.default_rng(1).integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    rec = Recorder()
    sol = DimodSolver(rec, num_reads=3).solve(p, init=start, seed=7)
    assert len(rec.calls) == 3
    seeds = []
    for c, kw in enumerate(rec.calls):
        idx = np.flatnonzero(p.free[c])
        states, labels = kw["initial_states"]
        assert labels == [int(i) for i in idx]
        assert np.asarray(states).shape == (3, idx.size)          # one row per read
        np.testing.assert_array_equal(states, np.tile(start[c, idx].astype(np.int8), (3, 1)))
        assert kw["initial_states_generator"] == "tile"
        assert kw["num_reads"] == 3
        seeds.append(kw["seed"])
    assert len(set(seeds)) == 3                  # each channel its own seed from the rng
    again = Recorder()
    DimodSolver(again, num_reads=3).solve(p, init=start, seed=7)
    assert [kw["seed"] for kw in again.calls] == seeds        # equal seeds, equal sampler seeds
    other = Recorder()
    DimodSolver(other, num_reads=3).solve(p, init=start, seed=8)
    assert [kw["seed"] for kw in other.calls] != seeds
    np.testing.assert_allclose(sol.energy, Exact().solve(p).energy, atol=1e-9)


def test_a_given_seed_and_initial_states_are_not_overridden():
    p = make_problem(m=2, n=5, seed=2)
    rec = Recorder()
    DimodSolver(rec, seed=123).solve(p, seed=0)
    assert [kw["seed"] for kw in rec.calls] == [123, 123]


def test_a_sampler_that_declares_no_start_gets_none():
    p = make_problem(m=2, n=5, seed=2)
    rec = Recorder(parameters=("num_reads",))
    DimodSolver(rec).solve(p, seed=0)
    assert rec.calls and all("initial_states" not in kw and "seed" not in kw
                             for kw in rec.calls)


def test_dwave_steepest_descends_from_the_given_start():
    pytest.importorskip("dwave.samplers")
    from dwave.samplers import SteepestDescentSolver

    p = make_problem(m=4, n=10, seed=5)
    start = np.random.default_rng(2).integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    sol = DimodSolver("dwave-steepest").solve(p, init=start, seed=0)
    descended = start.copy()
    for c in range(p.num_channels):
        idx = np.flatnonzero(p.free[c])
        ref = SteepestDescentSolver().sample(
            p.to_bqm(c), initial_states=(start[c, idx].astype(np.int8)[None], list(map(int, idx))))
        descended[c, idx] = [ref.first.sample[int(i)] for i in idx]
    expected = np.minimum(p.energies(descended), p.energies(start))
    np.testing.assert_allclose(sol.energy, expected, rtol=1e-9, atol=1e-9)
    # from RTN the descent ends elsewhere: the start did matter
    assert not np.allclose(DimodSolver("dwave-steepest").solve(p, seed=0).energy, sol.energy)


def test_the_lowest_energy_sample_is_taken_not_the_first_row():
    class WorstFirst(dimod.Sampler):
        parameters, properties = {}, {}

        def sample(self, bqm, **kwargs):
            ss = dimod.ExactSolver().sample(bqm)
            order = np.argsort(-ss.record.energy)                 # highest energy first
            return dimod.SampleSet.from_samples_bqm(
                (ss.record.sample[order], list(ss.variables)), bqm)

    p = make_problem(m=3, n=6, seed=4)
    sol = DimodSolver(WorstFirst()).solve(p)
    np.testing.assert_allclose(sol.energy, Exact().solve(p).energy, atol=1e-9)


@pytest.mark.parametrize("answer, match", [
    (lambda bqm: dimod.SampleSet.from_samples(([], list(bqm.variables)), "BINARY", []),
     "returned no sample"),
    (lambda bqm: {v: 0 for v in bqm.variables}, "not a dimod.SampleSet"),
])
def test_a_bad_answer_from_a_sampler_is_a_solver_error(answer, match):
    class Bad(dimod.Sampler):
        parameters, properties = {}, {}

        def sample(self, bqm, **kwargs):
            return answer(bqm)

    with pytest.raises(SolverError, match=match):
        DimodSolver(Bad()).solve(make_problem(m=2, n=5, seed=1))


def test_a_sampler_raising_type_error_is_wrapped():
    class Picky(dimod.Sampler):
        parameters, properties = {}, {}

        def sample(self, bqm, **kwargs):
            raise TypeError("no thanks")

    with pytest.raises(QroundError, match="sampler 'Picky' refused the BQM: no thanks"):
        DimodSolver(Picky()).solve(make_problem(m=2, n=5, seed=1))


def test_options_are_checked_again_when_a_sampler_object_changes():
    rec = Recorder(parameters=("num_reads", "flavour"))
    s = DimodSolver(rec, flavour=1)
    rec.parameters = {"num_reads": []}
    with pytest.raises(QroundError, match=r"does not take \['flavour'\]"):
        s.solve(make_problem(m=2, n=5, seed=1))
    assert rec.calls == []


def test_an_undeclaring_sampler_object_takes_any_option():
    class Open(dimod.Sampler):
        parameters, properties = {}, {}

        def sample(self, bqm, **kwargs):
            return dimod.ExactSolver().sample(bqm)

    p = make_problem(m=2, n=5, seed=1)
    assert DimodSolver(Open(), anything=3).solve(p).ratio <= 1.0


def test_a_channel_list_solves_only_those_and_counts_them():
    p = make_problem(m=4, n=6, seed=6)
    rec = Recorder()
    sol = DimodSolver(rec, channels=[1, 3]).solve(p, seed=0)
    assert sol.info["channels"] == 2 and len(rec.calls) == 2
    np.testing.assert_array_equal(sol.choices[[0, 2]], p.rtn_choices()[[0, 2]])
    np.testing.assert_allclose(sol.energy[[1, 3]], Exact().solve(p).energy[[1, 3]], atol=1e-9)
    rec = Recorder()
    sol = DimodSolver(rec, channels=slice(None, None, 2)).solve(p, seed=0)
    assert sol.info["channels"] == 2 and len(rec.calls) == 2
    np.testing.assert_array_equal(sol.choices[[1, 3]], p.rtn_choices()[[1, 3]])


@pytest.mark.parametrize("make, match", [
    (lambda: DimodSolver("neal", channels=[]), "non-empty list"),
    (lambda: DimodSolver("neal", channels=np.array([], dtype=np.int64)), "non-empty list"),
    (lambda: DimodSolver("neal", num_reads=0), "num_reads must be an integer >= 1"),
    (lambda: DimodSolver("neal", num_sweeps_per_beta=-1), "num_sweeps_per_beta must not be"),
    (lambda: DimodSolver("neal", num_sweeps=-1), "num_sweeps must not be negative"),
    (lambda: DimodSolver("neal", beta_range=(0, 1.0)), "beta_range must be two positive"),
    (lambda: DimodSolver("neal", beta_range=(True, 1.0)), "beta_range must be two positive"),
    (lambda: DimodSolver("neal", beta_schedule_type="custom",
                         beta_schedule=[0.1, float("nan")]), "beta_schedule must be finite"),
    (lambda: DimodSolver("neal", beta_range=[(0.1,), (float("inf"),)]), "must be finite"),
])
def test_dimod_options_are_refused_when_built(make, match):
    pytest.importorskip("dwave.samplers")
    with pytest.raises(QroundError, match=match):
        make()


def test_boolean_and_none_options_are_not_numbers():
    pytest.importorskip("dwave.samplers")
    s = DimodSolver("dwave-tabu", timeout=None, num_reads=None)
    assert s.parameters["timeout"] is None


def test_exact_dimod_takes_a_channel_of_exactly_the_limit(monkeypatch):
    from qround.solvers import dimod_backend

    p = make_problem(m=2, n=6, seed=0, clip_some=False)
    k = int(p.free.sum(axis=1).max())
    monkeypatch.setattr(dimod_backend, "EXACT_DIMOD_MAX_FREE", k)
    np.testing.assert_allclose(DimodSolver("exact-dimod").solve(p).energy,
                               Exact().solve(p).energy, atol=1e-9)
    monkeypatch.setattr(dimod_backend, "EXACT_DIMOD_MAX_FREE", k - 1)
    with pytest.raises(QroundError, match=f"has {k} free variables, at most {k - 1}"):
        DimodSolver("exact-dimod").solve(p)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_schedule_type="custom", beta_schedule=np.array([0.1, np.nan])), "finite"),
    (dict(num_sweeps=np.array(-1)), "must not be negative"),
])
def test_option_values_given_as_arrays_are_checked_like_lists(kwargs, match):
    with pytest.raises(QroundError, match=match):
        DimodSolver("neal", **kwargs)


def test_beta_range_may_be_an_array():
    p = make_problem(m=2, n=6, seed=0, bits=3)
    sol = DimodSolver("neal", beta_range=np.array([0.1, 1.0]), num_reads=2).solve(p, seed=0)
    assert sol.choices.shape == p.weight.shape


def test_a_channel_named_twice_is_refused():
    p = make_problem(m=3, n=6, seed=0, bits=3)
    for channels in ([-1, -1], [0, 2, -1]):
        with pytest.raises(QroundError, match="more than once"):
            DimodSolver("exact-dimod", channels=channels).solve(p)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_range=[0.1, float("nan")]), "finite"),
    (dict(beta_range=[0.0, 1.0]), "two positive numbers"),
    (dict(beta_schedule_type="custom", beta_schedule=[0.1, float("inf")]), "finite"),
    (dict(timeout=-1), "positive number of milliseconds"),
    (dict(num_sweeps=-1), "must not be negative"),
])
def test_option_values_given_as_torch_tensors_are_checked(kwargs, match):
    torch = pytest.importorskip("torch")
    tensors = {k: v if isinstance(v, str) else torch.tensor(v) for k, v in kwargs.items()}
    with pytest.raises(QroundError, match=match):
        DimodSolver("dwave-tabu" if "timeout" in kwargs else "neal", **tensors)


def test_beta_range_may_be_a_torch_tensor():
    torch = pytest.importorskip("torch")
    p = make_problem(m=2, n=6, seed=0, bits=3)
    sol = DimodSolver("neal", beta_range=torch.tensor([0.1, 1.0]), num_reads=2).solve(p, seed=0)
    assert sol.choices.shape == p.weight.shape


def test_bfloat16_tensor_options_are_checked():
    torch = pytest.importorskip("torch")
    with pytest.raises(QroundError, match="finite"):
        DimodSolver("neal", beta_range=torch.tensor([0.1, float("nan")], dtype=torch.bfloat16))
    DimodSolver("neal", beta_range=torch.tensor([0.1, 5.0], dtype=torch.bfloat16))
