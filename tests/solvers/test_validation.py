"""Solver arguments are checked when the solver is built: a clear QroundError naming the
argument, never a raw error from numpy, numba or torch at solve time, and never a value taken
for something it does not mean (``act_order='False'`` as True)."""
from __future__ import annotations

import numpy as np
import pytest

from qround import GridSpec, QroundError, RoundingProblem, get_solver
from qround.errors import check_bool, check_int, check_real
from qround.solvers import (GPTQ, Anneal, BestOf, Chain, CrossEntropy, DimodSolver, Exact,
                            HopfieldClassic, MeanField, QroundSampler, Relaxation, Stochastic, Tabu)

from ..conftest import make_problem


@pytest.mark.parametrize("value", [-(2 ** 2000), 10 ** 400])
def test_check_real_refuses_integers_too_large_for_a_float(value):
    with pytest.raises(QroundError, match="x must be a finite number"):
        check_real(value, "x")
    assert check_real(2 ** 70, "x") == float(2 ** 70)   # large, but a float64


def test_check_bool_and_check_int_maximum():
    assert check_bool(np.bool_(True), "flag") is True
    assert check_bool(0, "flag") is False and check_bool(1, "flag") is True   # old configs
    for bad in ("False", "x", 2, -1, 0.0, None, [True]):
        with pytest.raises(QroundError, match="flag must be True or False"):
            check_bool(bad, "flag")
    assert check_int(5, "k", 1, maximum=5) == 5
    with pytest.raises(QroundError, match="k=6 is too large: at most 5"):
        check_int(6, "k", 1, maximum=5)


@pytest.mark.parametrize("make, match", [
    (lambda: GPTQ(act_order="False"), "act_order must be True or False"),
    (lambda: GPTQ(act_order=None), "act_order must be True or False"),
    (lambda: Relaxation(graph="no"), "graph must be True or False"),
    (lambda: HopfieldClassic(graph=2), "graph must be True or False"),
    (lambda: GPTQ(damp=10 ** 400), "damp must be a finite number"),
    (lambda: Tabu(iters_per_var=2 ** 70), "iters_per_var must lie in"),
    (lambda: CrossEntropy(tol=1.5), "tol must lie in"),
    (lambda: CrossEntropy(tol=0.5), "tol must lie in"),
    (lambda: CrossEntropy(p_min=0), "p_min must lie in"),
    (lambda: CrossEntropy(samples=10 ** 9), "samples=.* is too large"),
    (lambda: Relaxation(iterations=10 ** 9), "iterations=.* is too large"),
    (lambda: HopfieldClassic(iterations=2 ** 70), "iterations=.* is too large"),
    (lambda: MeanField(iterations=10 ** 9), "iterations=.* is too large"),
    (lambda: Relaxation(beta=(2.0, 20.0)), "start >= end >= 1"),
    (lambda: Relaxation(beta=(0.5, 0.01)), "start >= end >= 1"),
    (lambda: HopfieldClassic(temperature=(0.02, 1.0)), "temperature anneals"),
    (lambda: Stochastic(batch=2 ** 40), "batch=.* is too large"),
    (lambda: Exact(block_bits=30), "block_bits=.* is too large"),
    (lambda: Anneal(beta_schedule=[True, False]), "booleans"),
])
def test_meaningless_values_are_refused_when_built(make, match):
    with pytest.raises(QroundError, match=match):
        make()


@pytest.mark.parametrize("cls", [CrossEntropy, GPTQ, Relaxation, HopfieldClassic, MeanField])
@pytest.mark.parametrize("kwargs, match", [
    (dict(device="cdua"), "not a torch device"),
    (dict(device="cpu:5"), "one CPU device"),
    (dict(device="tpu"), "not a torch device|not supported"),
    (dict(dtype="float16"), "dtype='float16' is not supported"),
    (dict(dtype="x"), "not supported"),
])
def test_torch_solvers_check_device_and_dtype_when_built(cls, kwargs, match):
    with pytest.raises(QroundError, match=match):
        cls(**kwargs)


def test_cuda_is_refused_when_built_where_there_is_none():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    for cls in (CrossEntropy, GPTQ, Relaxation, HopfieldClassic, MeanField):
        with pytest.raises(QroundError, match="asked for CUDA"):
            cls(device="cuda")
    with pytest.raises(QroundError, match="asked for CUDA"):
        get_solver("gptq", device="cuda")


def test_cpu_device_spellings_still_work():
    import torch

    p = make_problem(m=2, n=6, seed=0)
    reference = GPTQ().solve(p, seed=0).choices
    for device in ("cpu", "cpu:0", torch.device("cpu")):
        np.testing.assert_array_equal(GPTQ(device=device).solve(p, seed=0).choices, reference)
    for dtype in (None, "float64", torch.float32, np.float64):
        sol = MeanField(dtype=dtype).solve(p, seed=0)
        assert np.all(sol.energy <= p.rtn_energies() + 1e-12)


def test_cem_runs_a_channel_above_its_budget_alone_and_refuses_absurd_batches(monkeypatch):
    from qround.solvers import cem

    p = make_problem(m=3, n=16, seed=1, per_channel=True)   # 65 x 16 numbers a channel
    small = CrossEntropy(samples=64, max_elements=100, iterations=5).solve(p, seed=0)
    large = CrossEntropy(samples=64, iterations=5).solve(p, seed=0)
    assert small.ratio <= 1.0 and large.ratio <= 1.0
    monkeypatch.setattr(cem, "MAX_CHANNEL_BYTES", 10_000)   # 4 x 65 x 16 x 8 bytes = 33280
    with pytest.raises(QroundError, match=r"4 x \(samples \+ 1\) x n numbers"):
        CrossEntropy(samples=64).solve(p, seed=0)
    monkeypatch.setattr(cem, "MAX_CHANNEL_BYTES", 40_000)
    assert CrossEntropy(samples=64, iterations=2).solve(p, seed=0).ratio <= 1.0


def test_cem_takes_a_per_channel_hessian_without_copying_it_per_sample():
    """A per-channel H was counted (and, for chunks of two or more channels, copied) once per
    sample: n = 3000 with 128 samples was refused at 8 GiB; it needs a few MB."""
    import torch

    from qround.problems import energy

    rng = np.random.default_rng(0)
    h = torch.as_tensor(rng.normal(size=(3, 5, 5)))
    y = torch.as_tensor(rng.normal(size=(7, 3, 5)))
    want = torch.einsum("mij,kmj->kmi", h, y)
    torch.testing.assert_close(energy.hessian_times(y, h), want)
    np.testing.assert_allclose(energy.hessian_times(y.numpy(), h.numpy()), want.numpy())
    big = RoundingProblem.from_weight(rng.normal(size=(1, 3000)), np.eye(3000)[None],
                                      GridSpec(bits=3))
    assert CrossEntropy(iterations=1).solve(big, seed=0).ratio <= 1.0


def test_anneal_refuses_a_schedule_too_large_to_hold(monkeypatch):
    # channels run in chunks whose schedules fit; one channel's schedule alone must fit
    from qround.solvers import anneal

    p = make_problem(m=3, n=4, seed=2)
    monkeypatch.setattr(anneal, "MAX_SCHEDULE_BYTES", 8 * 100 - 1)
    with pytest.raises(QroundError, match="1 channels x num_sweeps=100 inverse temperatures take"):
        Anneal(num_sweeps=100).solve(p, seed=0)


@pytest.mark.parametrize("make, match", [
    (lambda: DimodSolver(sampler=1), "sampler must be a name"),
    (lambda: DimodSolver(sampler=None), "sampler must be a name"),
    (lambda: DimodSolver(sampler="nael"), "unknown dimod sampler 'nael'"),
    (lambda: DimodSolver("neal", foo=1), r"does not take \['foo'\]"),
    # dimod's ExactSolver declares no parameters: it takes none (it ignored them with a warning)
    (lambda: DimodSolver("exact-dimod", num_reads=3), r"does not take \['num_reads'\]"),
    (lambda: DimodSolver("neal", num_reads=-1), "num_reads must be an integer >= 1"),
    (lambda: DimodSolver("neal", num_reads="x"), "num_reads must be an integer >= 1"),
    (lambda: DimodSolver("neal", num_reads=2 ** 70), "num_reads=.* is too large"),
    (lambda: DimodSolver("neal", channels=slice("a")), "a slice of integers"),
    (lambda: DimodSolver("neal", channels=slice(0, 4, 0)), "step cannot be zero"),
])
def test_dimod_solver_arguments_are_checked_when_built(make, match):
    with pytest.raises(QroundError, match=match):
        make()


def test_exact_dimod_refuses_a_channel_too_wide_to_enumerate():
    """dimod.ExactSolver keeps all 2^n states: a 40-input channel failed inside numpy."""
    wide = make_problem(m=2, n=40, seed=1, clip_some=False)
    with pytest.raises(QroundError, match=r"a channel here has \d\d free variables, at most 22"):
        DimodSolver("exact-dimod").solve(wide)
    small = make_problem(m=3, n=8, seed=1)
    with pytest.raises(QroundError, match="channel 7"):
        DimodSolver("exact-dimod", channels=[7]).solve(small)
    got = DimodSolver("exact-dimod").solve(small, seed=0)
    np.testing.assert_allclose(got.energy, Exact().solve(small).energy, rtol=1e-9, atol=1e-12)


def test_dimod_solver_refuses_an_empty_channel_selection():
    p = make_problem(m=4, n=5, seed=3)
    with pytest.raises(QroundError, match="selects none of the problem's 4 channels"):
        DimodSolver("neal", channels=slice(5, 9), num_sweeps=10).solve(p, seed=0)
    sol = DimodSolver("neal", channels=slice(2, 9), num_sweeps=10).solve(p, seed=0)
    assert sol.info["channels"] == 2


@pytest.mark.parametrize("make, match", [
    (lambda: Chain(GPTQ(), "tabu"), "Chain's member 1 is not a Solver.*get_solver"),
    (lambda: BestOf(Tabu(), None), "BestOf's member 1 is not a Solver"),
    (lambda: Chain(1), "Chain's member 0 is not a Solver"),
    (lambda: Chain(Tabu(), label=5), "label must be a non-empty string"),
    (lambda: BestOf(Tabu(), label=""), "label must be a non-empty string"),
])
def test_composites_check_their_members_and_label(make, match):
    with pytest.raises(QroundError, match=match):
        make()


def test_best_of_keeps_the_label_it_is_given():
    assert BestOf(Tabu(), Anneal(), label="mine").label == "mine"
    assert BestOf(Tabu(), Anneal()).label == "tabu|anneal"


def test_sampler_bounds_reads_and_their_memory():
    import dimod

    bqm = dimod.BinaryQuadraticModel({0: 1.0, 1: -1.0}, {(0, 1): 0.5}, 0.0, "BINARY")
    with pytest.raises(QroundError, match="num_reads=.* is too large"):
        QroundSampler("tabu").sample(bqm, num_reads=2 ** 70)


def test_an_unquoted_string_in_a_spec_gets_a_hint():
    with pytest.raises(QroundError, match="strings need quotes: order='sequential'"):
        get_solver("anneal(order=sequential)")
    # a name that Python reads as a subtraction, not a bare name
    with pytest.raises(QroundError, match="strings need quotes: sampler='exact-dimod'"):
        get_solver("dimod(sampler=exact-dimod)")
    with pytest.raises(QroundError) as refused:   # an expression is not a word to quote
        get_solver("tabu(restarts=2+3)")
    assert "quotes" not in str(refused.value)
    assert get_solver("anneal(order='sequential', beta_schedule=[0.1, 1.0])").num_sweeps == 2


def test_stochastic_refuses_a_batch_too_large_to_hold(monkeypatch):
    from qround.solvers import reference

    p = make_problem(m=4, n=8, seed=5)
    monkeypatch.setattr(reference, "MAX_BATCH_BYTES", 8 * 4 * 8 - 1)    # not one sample
    with pytest.raises(QroundError, match="one sample of this 4x8 layer"):
        Stochastic(batch=16).solve(p, seed=0)
    monkeypatch.setattr(reference, "MAX_BATCH_BYTES", 8 * 16 * 4 * 8 - 1)   # batch 15 fits
    assert Stochastic(batch=16).solve(p, seed=0).ratio <= 1.0


def test_a_factory_that_returns_no_solver_is_named(monkeypatch):
    """A plugin whose factory returns something else (a dimod sampler, None) is a one-line
    QroundError, alone and inside a composite, not an AttributeError."""
    from qround.solvers import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_DESCRIPTIONS", dict(registry._DESCRIPTIONS))
    registry.register("broken", lambda: None, "returns None")
    for spec in ("broken", "gptq+broken"):
        with pytest.raises(QroundError, match="'broken': its factory returned NoneType, not a "
                                              "qround Solver"):
            get_solver(spec)


def test_a_solver_that_returns_codes_instead_of_choices_is_stopped():
    """A custom _solve that returns integer codes (not 0/1 choices) is an error, not choices
    read as 'nonzero rounds up' and then hidden by the no-worse-than-start guard."""
    from qround.solvers import Solver

    class Codes(Solver):
        name = "codes"

        def _solve(self, problem, start, rng):
            return problem.codes(start)

    p = make_problem(2, 8, bits=3, seed=0)
    with pytest.raises(RuntimeError, match="returned values other than 0 and 1"):
        Codes().solve(p)

    class ZeroOne(Solver):   # 0/1 integers are choices: accepted
        name = "zero-one"

        def _solve(self, problem, start, rng):
            return start.astype(np.int64)

    assert ZeroOne().solve(p).ratio == 1.0


def test_dimod_solver_rebuilds_from_its_parameters():
    # parameters lists the constructor's arguments (as dimod samplers do): the sampler's
    # keywords flat, not packed in a sample_kwargs the constructor does not take
    s = get_solver("neal(num_reads=2, num_sweeps=50)")
    assert s.parameters == {"sampler": "neal", "channels": None, "num_reads": 2,
                            "num_sweeps": 50}
    again = type(s)(**s.parameters)
    assert again.parameters == s.parameters and repr(again) == repr(s)
    assert repr(s) == "DimodSolver(sampler='neal', channels=None, num_reads=2, num_sweeps=50)"


# ------------------------------ found by the twenty-sixth session's review of custom solvers
def test_dimod_solver_reads_a_spin_sample_set_and_refuses_one_without_the_variables():
    import dimod
    from dwave.samplers import SteepestDescentSolver

    class Spin(dimod.Sampler):   # returns its samples as spins (-1 read as "up" before)
        parameters, properties = {"num_reads": [], "seed": [], "initial_states": []}, {}

        def sample(self, bqm, seed=None, initial_states=None, **kwargs):
            return SteepestDescentSolver().sample(
                bqm, seed=seed, initial_states=initial_states, **kwargs).change_vartype(
                "SPIN", inplace=False)

    class Relabelled(dimod.Sampler):   # its own labels 0..k-1, not the free inputs'
        parameters, properties = {}, {}

        def sample(self, bqm, **kwargs):
            n = bqm.num_variables
            return dimod.SampleSet.from_samples(
                (np.zeros((1, n), dtype=np.int8), list(range(100, 100 + n))), "BINARY", 0.0)

    p = make_problem(4, 10, bits=3, seed=2)
    spin = DimodSolver(Spin()).solve(p, seed=0)
    binary = DimodSolver(SteepestDescentSolver()).solve(p, seed=0)
    assert np.array_equal(spin.choices, binary.choices)
    assert spin.ratio < 1 and "channels_kept_start" not in spin.info
    with pytest.raises(QroundError, match=r"returned samples without the BQM's variables"):
        DimodSolver(Relabelled()).solve(p)


def test_exact_solver_as_an_object_gets_the_size_guard():
    import dimod

    p = make_problem(1, 24, bits=3, seed=0)   # one over the guard: 2^23 states, were it to go
    assert int(p.free.sum()) == 23             # through (a few seconds, not 14.5 GiB at 29)
    with pytest.raises(QroundError, match=r"ExactSolver \(dimod.ExactSolver\) lists all 2\^n "
                                          r"states of a channel: a channel here has \d+ free"):
        DimodSolver(dimod.ExactSolver()).solve(p)


def test_a_solvers_broken_contract_is_a_solver_error_not_trusted():
    from qround import SolverError
    from qround.solvers import Solver

    p = make_problem(3, 10, bits=3, seed=1)

    class Claims(Solver):   # a third item: energies it made up
        name = "claims"

        def _solve(self, problem, start, rng):
            return ~start & problem.free, {}, np.full(problem.num_channels, -1e9)

    class BadInfo(Solver):
        name = "bad-info"

        def _solve(self, problem, start, rng):
            return start, "info"

    with pytest.raises(SolverError, match=r"solver 'claims' returned a tuple of 3 items"):
        Claims().solve(p)
    with pytest.raises(SolverError, match=r"info of type str"):
        BadInfo().solve(p)
    assert issubclass(SolverError, RuntimeError) and issubclass(SolverError, QroundError)


def test_the_pipeline_names_a_broken_solver_without_linear_algebra_advice():
    import torch
    from torch import nn

    from qround.pipeline import QuantConfig, quantize_model
    from qround.solvers import Solver, register, registry

    class Short(Solver):
        name = "short"

        def _solve(self, problem, start, rng):
            return start[:, :-1]

    class Wide(Solver):   # refuses the warm-up's 16 inputs, fine on the user's layer
        name = "wide"

        def _solve(self, problem, start, rng):
            if problem.num_inputs < 20:
                raise ValueError("only for wide layers")
            return start

    saved = dict(registry._REGISTRY), dict(registry._DESCRIPTIONS)
    try:
        register("short", Short)
        register("wide", Wide)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 8))
        batches = [torch.randn(32, 24)]
        with pytest.raises(QroundError) as info:
            quantize_model(model, batches, QuantConfig(wbits=3, solver="short", progress=False))
        assert "solver 'short' returned shape" in str(info.value)
        assert "damping" not in str(info.value)

        from qround.solvers import warm_up
        warm_up(get_solver("wide"))   # the warm-up's refusal is not the user's error
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved[0])
        registry._DESCRIPTIONS.clear()
        registry._DESCRIPTIONS.update(saved[1])
