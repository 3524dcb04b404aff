"""QroundSampler: qround's tabu search and annealing as dimod samplers on any BQM."""
import unittest
import warnings

import dimod
import dimod.testing
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qround.errors import QroundError
from qround.solvers import QroundSampler
from qround.solvers.sampler import dense_qubo


def random_bqm(n, seed, vartype="BINARY", density=0.6):
    rng = np.random.default_rng(seed)
    return dimod.generators.gnp_random_bqm(n, density, vartype, random_state=seed,
                                           bias_generator=lambda k: rng.normal(size=k))


@dimod.testing.load_sampler_bqm_tests(QroundSampler("tabu"), max_num_variables=12)
class TestTabuSamplerDimodSuite(unittest.TestCase):
    """dimod's own sampler tests (empty, single-variable, SPIN/BINARY, labelled BQMs...)."""


@dimod.testing.load_sampler_bqm_tests(QroundSampler("anneal"), max_num_variables=12)
class TestAnnealSamplerDimodSuite(unittest.TestCase):
    pass


@pytest.mark.parametrize("method", ["tabu", "anneal"])
def test_sampler_api(method):
    dimod.testing.assert_sampler_api(QroundSampler(method))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 10_000), spin=st.booleans(),
       data=st.data())
def test_dense_qubo_energy_equals_the_bqm(n, seed, spin, data):
    bqm = random_bqm(n, seed, "SPIN" if spin else "BINARY")
    bqm.offset = float(np.random.default_rng(seed).normal())
    variables = list(bqm.variables)
    h, g, offset = dense_qubo(bqm, variables)
    assert np.allclose(h, h.T) and np.all(np.diagonal(h) == 0)
    b = np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=float)
    sample = dict(zip(variables, (2 * b - 1) if spin else b))
    assert b @ h @ b + g @ b + offset == pytest.approx(bqm.energy(sample), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("method", ["tabu", "anneal"])
@pytest.mark.parametrize("vartype", ["BINARY", "SPIN"])
def test_finds_the_exact_ground_state_of_small_bqms(method, vartype):
    for seed in range(6):
        bqm = random_bqm(12, seed, vartype)
        ground = dimod.ExactSolver().sample(bqm).first.energy
        ss = QroundSampler(method).sample(bqm, num_reads=2, seed=seed)
        assert ss.first.energy == pytest.approx(ground, abs=1e-9), (method, seed)
        dimod.testing.assert_sampleset_energies(ss, bqm)
        assert ss.vartype is bqm.vartype


@pytest.mark.parametrize("method,kw", [("tabu", {"restarts": 0, "max_iter": 1}),
                                       ("anneal", {"num_sweeps": 1})])
def test_never_worse_than_each_start(method, kw):
    bqm = random_bqm(40, 3, "SPIN")
    starts = np.random.default_rng(0).choice([-1, 1], size=(8, 40))
    ss = QroundSampler(method).sample(bqm, initial_states=(starts, list(bqm.variables)),
                                      seed=1, **kw)
    start_e = bqm.energies((starts, list(bqm.variables)))
    # dimod sorts nothing here: rows come back in read order
    assert len(ss) == 8
    assert np.all(ss.record.energy <= start_e + 1e-9)


def test_a_start_that_is_already_optimal_comes_back():
    bqm = random_bqm(10, 7)
    ground = dimod.ExactSolver().sample(bqm).first
    ss = QroundSampler("tabu").sample(bqm, initial_states=ground.sample, num_reads=1, seed=0)
    assert ss.first.energy == pytest.approx(ground.energy)


def test_seeded_results_repeat_and_the_global_rng_is_untouched():
    bqm = random_bqm(60, 11)
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    a = QroundSampler("anneal").sample(bqm, num_reads=3, seed=5, num_sweeps=2)
    b = QroundSampler("anneal").sample(bqm, num_reads=3, seed=5, num_sweeps=2)
    assert np.array_equal(a.record.sample, b.record.sample)
    assert np.array_equal(np.random.get_state()[1], state)
    c = QroundSampler("anneal").sample(bqm, num_reads=3, seed=6, num_sweeps=2)
    assert not np.array_equal(a.record.sample, c.record.sample)


def test_labels_and_order_are_kept():
    bqm = dimod.BinaryQuadraticModel({"b": 1.0, ("x", 2): -2.0, 7: 0.5},
                                     {("b", ("x", 2)): -3.0, (7, "b"): 2.0}, 0.25, "SPIN")
    ss = QroundSampler().sample(bqm, num_reads=2, seed=0)
    assert set(ss.variables) == {"b", ("x", 2), 7}
    ground = dimod.ExactSolver().sample(bqm).first.energy
    assert ss.first.energy == pytest.approx(ground)
    assert set(np.unique(ss.record.sample)) <= {-1, 1}


def test_solver_parameters_reach_the_solver():
    bqm = random_bqm(30, 2)
    ss = QroundSampler("tabu").sample(bqm, num_reads=1, seed=0, restarts=0, max_iter=3,
                                      descent=False, tenure=2)
    assert len(ss) == 1
    assert "timing" in ss.info and ss.info["timing"]["search_s"] >= 0


@pytest.mark.parametrize("call,match", [
    (lambda s, q: s.sample(q, num_reads=0), "num_reads"),
    (lambda s, q: s.sample(q, num_sweeps=10), "does not take"),
    (lambda s, q: s.sample(q, restarts=-1), "restarts"),
    (lambda s, q: s.sample(q, seed=-3), "seed"),
    (lambda s, q: s.sample({"a": 1.0}), "BinaryQuadraticModel"),
    (lambda s, q: s.sample(q, initial_states=[[0, 1]]), "initial_states"),
    (lambda s, q: s.sample(q, initial_states=(np.zeros((1, 5), np.float16), list(q.variables))),
     "initial_states: .*integer, float32 or float64 dtype"),   # dimod's Cython says only that
])
def test_bad_input_gets_a_clear_error(call, match):
    bqm = random_bqm(5, 0)
    with pytest.raises(QroundError, match=match):
        call(QroundSampler("tabu"), bqm)


def test_non_finite_biases_and_unknown_method_are_refused():
    bqm = dimod.BinaryQuadraticModel({0: np.nan, 1: 1.0}, {(0, 1): 1.0}, 0.0, "BINARY")
    with pytest.raises(QroundError, match="NaN or infinite"):
        QroundSampler().sample(bqm)
    with pytest.raises(QroundError, match="method"):
        QroundSampler("greedy")


def test_a_rounding_channel_bqm_gets_the_tabu_solvers_energy():
    """The same kernels on the same QUBO: a channel's BQM sampled from RTN reaches an energy no
    higher than RTN's, and the dense matrix is the channel's S H S (off the diagonal)."""
    from qround.grid import GridSpec
    from qround.problems import RoundingProblem

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 24))
    problem = RoundingProblem.from_weight(rng.normal(size=(3, 24)), x.T @ x / 200,
                                          GridSpec(bits=2))
    bqm = problem.to_bqm(0)
    variables = sorted(bqm.variables)
    h, g, offset = dense_qubo(bqm, variables)
    s = problem.step[0, variables]
    sub = problem.hessian[np.ix_(variables, variables)]
    expect = s[:, None] * sub * s[None, :]
    np.fill_diagonal(expect, 0.0)
    assert np.allclose(h, expect)
    rtn = problem.rtn_choices()[0, variables].astype(np.int8)
    ss = QroundSampler("tabu").sample(bqm, initial_states=(rtn[None], variables), seed=0)
    assert ss.first.energy <= bqm.energy(dict(zip(variables, rtn))) + 1e-12


# ------------------------------------------------ found by the twelfth session's review
def test_anneal_temperatures_come_from_the_bqm_not_the_start():
    """From the all-zeros start of a QUBO without linear terms every flip costs nothing, so a
    schedule from the start's deltas had no scale (beta = 1 whatever the biases' units)."""
    base = random_bqm(14, 5)
    for v in base.variables:
        base.set_linear(v, 0.0)
    ground = dimod.ExactSolver().sample(base).first.energy
    zeros = {v: 0 for v in base.variables}
    for scale in (1e-4, 1.0, 1e4):
        bqm = base.copy()
        bqm.scale(scale)
        ss = QroundSampler("anneal").sample(bqm, initial_states=zeros, num_reads=1, seed=0,
                                            num_sweeps=300)
        assert ss.first.energy / scale == pytest.approx(ground, rel=1e-6), scale


def test_anneal_beta_range_is_taken_as_given():
    from dwave.samplers.sa.sampler import default_beta_range

    from qround.solvers import Anneal

    bqm = random_bqm(20, 1)
    hot = QroundSampler("anneal").sample(bqm, num_reads=2, seed=0, beta_range=(1e-9, 1e-9),
                                         num_sweeps=5)
    cold = QroundSampler("anneal").sample(bqm, num_reads=2, seed=0, num_sweeps=5)
    assert not np.array_equal(hot.record.sample, cold.record.sample)
    assert hot.info["beta_range"] == [1e-9, 1e-9] and hot.info["matrix"] == "dense"
    assert cold.info["beta_range"] == pytest.approx(list(default_beta_range(bqm)))
    with pytest.raises(QroundError, match="beta_range must grow"):
        Anneal(beta_range=(2.0, 1.0))
    with pytest.raises(QroundError, match=r"beta_range\[0\]"):
        Anneal(beta_range=(0.0, 1.0))


def test_object_biases_are_converted_and_overflow_is_refused():
    from decimal import Decimal
    from fractions import Fraction

    for num in (Decimal, Fraction):
        bqm = dimod.BinaryQuadraticModel({"a": num(1), "b": num(-1)}, {("a", "b"): num(-1)},
                                         num(0), "BINARY", dtype=object)
        for method in ("tabu", "anneal"):
            assert QroundSampler(method).sample(bqm, seed=0).first.energy == pytest.approx(-1.0)
    big = dimod.BinaryQuadraticModel({0: 10 ** 400, 1: 1}, {(0, 1): 1}, 0, "BINARY",
                                     dtype=object)
    with pytest.raises(QroundError, match="fit a float64"):
        QroundSampler().sample(big)
    huge = dimod.BinaryQuadraticModel({0: 1e308, 1: 1e308}, {(0, 1): 1e308}, 0.0, "BINARY")
    with pytest.raises(QroundError, match="too large"):
        QroundSampler().sample(huge)
    with pytest.raises(QroundError, match="overflow float64 when converted"):
        QroundSampler().sample(dimod.BinaryQuadraticModel({0: 1e308, 1: 1e308},
                                                          {(0, 1): 1e308}, 0.0, "SPIN"))


def test_empty_bqm_info_and_bad_descent():
    ss = QroundSampler("anneal").sample(dimod.BinaryQuadraticModel("SPIN"), num_reads=3)
    assert len(ss) == 3 and ss.info["method"] == "anneal"
    assert ss.info["descent_flips"] == [0, 0, 0]
    with pytest.raises(QroundError, match="descent must be True or False"):
        QroundSampler().sample(random_bqm(4, 0), descent="no")


def test_reads_run_in_parallel_with_the_same_result_as_one_thread():
    import numba

    bqm = random_bqm(50, 9, "SPIN")
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = QroundSampler("tabu").sample(bqm, num_reads=6, seed=3, restarts=1)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = QroundSampler("tabu").sample(bqm, num_reads=6, seed=3, restarts=1)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one.record.sample, two.record.sample)


def test_sparse_annealing_makes_the_dense_paths_decisions(monkeypatch):
    """Below SPARSE_BELOW density annealing runs on H in CSR form: the same seeds, visits and
    Metropolis draws as the dense kernel, so the same samples, where the start's fields come
    out the same (BLAS and scipy sum in other orders: exact for integer biases)."""
    from qround.solvers import sampler

    def integer_bqm(n, seed, vartype, density):
        rng = np.random.default_rng(seed)
        return dimod.generators.gnp_random_bqm(
            n, density, vartype, random_state=seed,
            bias_generator=lambda k: rng.integers(-100, 101, size=k).astype(float))

    for vartype, density, n in (("SPIN", 0.05, 70), ("BINARY", 0.15, 70), ("BINARY", 0.9, 70),
                                ("BINARY", 0.03, 800)):
        bqm = integer_bqm(n, 4, vartype, density)
        runs = {}
        for path, cut in (("dense", 0.0), ("sparse", 2.0)):
            monkeypatch.setattr(sampler, "SPARSE_BELOW", cut)
            runs[path] = QroundSampler("anneal").sample(bqm, num_reads=3, seed=2,
                                                        num_sweeps=60, restarts=2)
        assert np.array_equal(runs["dense"].record.sample, runs["sparse"].record.sample)
        assert np.allclose(runs["dense"].record.energy, runs["sparse"].record.energy)


@pytest.mark.parametrize("options", [
    dict(beta_schedule_type="linear", num_sweeps=40, num_sweeps_per_beta=4),
    dict(beta_schedule=np.geomspace(0.01, 3.0, 20), num_sweeps_per_beta=2),
])
def test_annealing_schedules_reach_both_kernels(monkeypatch, options):
    """dwave-samplers' schedule options: the dense and CSR kernels anneal at the same
    temperatures, and info reports the schedule as dwave's sampler does."""
    from qround.solvers import sampler

    rng = np.random.default_rng(1)
    bqm = dimod.generators.gnp_random_bqm(
        60, 0.1, "BINARY", random_state=1,
        bias_generator=lambda k: rng.integers(-50, 51, size=k).astype(float))
    runs = {}
    for path, cut in (("dense", 0.0), ("sparse", 2.0)):
        monkeypatch.setattr(sampler, "SPARSE_BELOW", cut)
        runs[path] = QroundSampler("anneal").sample(bqm, num_reads=3, seed=5, **options)
        assert runs[path].info["matrix"] == path
    assert np.array_equal(runs["dense"].record.sample, runs["sparse"].record.sample)
    info = runs["dense"].info
    if "beta_schedule" in options:
        assert info["beta_schedule_type"] == "custom"
        assert info["beta_range"] is None   # as dwave's sampler reports a custom schedule
    else:
        from dwave.samplers.sa.sampler import default_beta_range
        assert info["beta_schedule_type"] == "linear"
        assert info["beta_range"] == pytest.approx(list(default_beta_range(bqm)))
    plain = QroundSampler("anneal").sample(bqm, num_reads=3, seed=5, num_sweeps=40)
    assert not np.array_equal(plain.record.sample, runs["dense"].record.sample)


def test_annealing_schedule_errors_are_qround_errors():
    bqm = random_bqm(8, 2)
    for options, match in ((dict(beta_schedule_type="custom"), "needs beta_schedule"),
                           (dict(num_sweeps=10, num_sweeps_per_beta=4), "multiple"),
                           (dict(beta_schedule=[1, 2], num_sweeps=3), "disagrees")):
        with pytest.raises(QroundError, match=match):
            QroundSampler("anneal").sample(bqm, **options)
    with pytest.raises(QroundError, match="does not take"):
        QroundSampler("tabu").sample(bqm, beta_schedule_type="linear")
    with pytest.raises(QroundError, match="num_restarts is restarts here"):
        QroundSampler("tabu").sample(bqm, num_restarts=3)
    with pytest.raises(QroundError, match="randomize_order is order='random'"):
        QroundSampler("anneal").sample(bqm, randomize_order=True)


def test_sparse_bqms_too_large_for_a_dense_matrix_anneal():
    n = 40_000   # a dense matrix would take 12 GiB; the ring has n couplings
    bqm = dimod.BinaryQuadraticModel({i: 0.0 for i in range(n)},
                                     {(i, (i + 1) % n): -1.0 for i in range(n)}, 0.0, "SPIN")
    ss = QroundSampler("anneal").sample(bqm, num_reads=1, seed=0, num_sweeps=20)
    assert ss.first.energy <= -0.5 * n   # ferromagnetic ring: domains shrink under annealing
    with pytest.raises(QroundError, match="dense"):
        QroundSampler("tabu").sample(bqm, num_reads=1)   # tabu needs the dense matrix


def test_one_compiled_sparse_kernel_for_any_number_of_reads():
    """The inputs are C-ordered and writable whatever num_reads is: a second version of the
    kernel would cost a compilation (seconds) in the first call with another read count."""
    from qround.solvers import _kernels

    bqm = random_bqm(60, 2, density=0.05)
    for reads in (1, 2, 3):
        QroundSampler("anneal").sample(bqm, num_reads=reads, seed=0, num_sweeps=5)
    assert len(_kernels.anneal_sparse_kernel.signatures) == 1


def test_warm_up_takes_samplers_and_nan_spin_biases_are_named_as_such():
    from qround.solvers import warm_up

    warm_up(QroundSampler("tabu"), QroundSampler("anneal"))
    warm_up(QroundSampler("anneal"), num_sweeps=5)
    bad = dimod.BinaryQuadraticModel({0: np.nan, 1: 1.0}, {(0, 1): 1.0}, 0.0, "SPIN")
    with pytest.raises(QroundError, match="NaN or infinite"):
        QroundSampler().sample(bad)


def test_tabu_takes_dwave_samplers_timeout():
    """``timeout`` is dwave-samplers' (milliseconds per read, rounds until it is up); with
    ``restarts`` the rounds are bounded too, and a limit that never binds changes nothing."""
    from qround.solvers import sampler as sampler_module

    bqm = random_bqm(40, 3)
    ss = QroundSampler("tabu").sample(bqm, num_reads=2, seed=1, timeout=20)
    assert len(ss) == 2
    assert np.all(ss.record.energy <= QroundSampler("tabu").sample(
        bqm, num_reads=2, seed=1, restarts=0, iters_per_var=0.01).record.energy.max() + 1e-9)
    bounded = QroundSampler("tabu").sample(bqm, num_reads=2, seed=1, timeout=3.6e6, restarts=2)
    plain = QroundSampler("tabu").sample(bqm, num_reads=2, seed=1, restarts=2)
    assert np.array_equal(bounded.record.sample, plain.record.sample)
    assert sampler_module._from_timeout({"timeout": 250}) == {"time_limit": 0.25,
                                                               "restarts": None}
    for options, match in ((dict(timeout="fast"), "milliseconds"),
                           (dict(timeout=True), "milliseconds"),
                           (dict(timeout=-5), r"timeout \(milliseconds per read\) must lie"),
                           (dict(timeout=0), r"timeout \(milliseconds per read\) must lie"),
                           (dict(timeout=10, time_limit=0.01), "not both")):
        with pytest.raises(QroundError, match=match):
            QroundSampler("tabu").sample(bqm, **options)
    with pytest.raises(QroundError, match="does not take"):
        QroundSampler("anneal").sample(bqm, timeout=10)
    none = QroundSampler("tabu").sample(bqm, num_reads=2, seed=1, restarts=2, timeout=None)
    assert np.array_equal(none.record.sample, plain.record.sample)   # dwave's "no limit"


def test_the_timeout_is_spent_by_every_read():
    """Rounds run until each read's budget is up: the search lasts at least the budget (the
    reads share the threads, so up to reads x budget), and a generous bound shows it ends."""
    bqm = random_bqm(60, 4)
    ss = QroundSampler("tabu").sample(bqm, num_reads=4, seed=0, timeout=30)
    assert 0.03 <= ss.info["timing"]["search_s"] < 10.0


def test_tabu_tenure_defaults_to_dwaves_cap(monkeypatch):
    """Without ``tenure`` the sampler's tabu search uses min(20, n // 2), not the layer
    solver's 10; a given tenure is kept."""
    from qround.solvers import Tabu

    used = []
    solve = Tabu._solve

    def spy(self, problem, start, rng):
        used.append(self.tenure)
        return solve(self, problem, start, rng)

    monkeypatch.setattr(Tabu, "_solve", spy)
    for n, tenure, expected in ((100, None, 20), (30, None, 15), (100, 7, 7),
                                (100, "None", 20)):
        options = ({} if tenure is None else {"tenure": None} if tenure == "None"
                   else {"tenure": tenure})
        QroundSampler("tabu").sample(random_bqm(n, 1), num_reads=1, seed=0, restarts=0,
                                     **options)
        assert used[-1] == expected, (n, tenure)


def test_size_limits_are_checked_before_any_per_variable_work(monkeypatch):
    """A request whose search state cannot fit is refused by name before the starts, labels
    or matrix are built (it was a MemoryError deep in numpy's random)."""
    def fail(*args, **kwargs):
        raise AssertionError("per-variable work before the size check")

    monkeypatch.setattr(QroundSampler, "parse_initial_states", fail)
    line = dimod.BinaryQuadraticModel.from_numpy_vectors(np.ones(4000), ([], [], []), 0.0,
                                                          "BINARY")
    with pytest.raises(QroundError, match="reads of 4000 variables"):
        QroundSampler("anneal").sample(line, num_reads=10 ** 6, seed=0)
    big = dimod.BinaryQuadraticModel.from_numpy_vectors(np.ones(10 ** 6), ([], [], []), 0.0,
                                                         "BINARY")
    with pytest.raises(QroundError, match="dense matrix would take"):
        QroundSampler("tabu").sample(big, num_reads=1, seed=0)


def test_an_all_zero_bqm_anneals_at_beta_one_without_dwaves_warning():
    import warnings

    bqm = dimod.BinaryQuadraticModel({"a": 0.0, "b": 0.0}, {("a", "b"): 0.0}, 0.0, "BINARY")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ss = QroundSampler("anneal").sample(bqm, num_reads=2, seed=0)
    assert ss.info["beta_range"] == [1.0, 1.0]
    assert list(ss.record.energy) == [0.0, 0.0]
    # a model with any nonzero bias keeps dwave's range
    from dwave.samplers.sa.sampler import default_beta_range

    one = dimod.BinaryQuadraticModel({"a": 0.5, "b": 0.0}, {("a", "b"): 0.0}, 0.0, "BINARY")
    got = QroundSampler("anneal").sample(one, num_reads=1, seed=0).info["beta_range"]
    assert got == pytest.approx(list(default_beta_range(one)))


def test_a_warm_up_loads_kernels_without_spending_the_search_budget():
    """warm_up(sampler, **options) samples with each budget option capped (a 3 s timeout
    used to be spent twice before the first file); other options are passed as given."""
    from qround.solvers import warm_up
    from qround.solvers.base import _small_budget

    seen = []

    class Recorder:
        def sample(self, bqm, **kwargs):
            seen.append(kwargs)

    warm_up(Recorder(), timeout=3000, restarts=50, tenure=7, num_sweeps=10 ** 6,
            time_limit=5, max_iter=10 ** 5)
    assert len(seen) == 2
    for options in seen:
        assert options == {"num_reads": 2, "seed": 0, "timeout": 1, "restarts": 1, "tenure": 7,
                           "num_sweeps": 10, "time_limit": 1e-3, "max_iter": 100}
    assert _small_budget({"timeout": 0.5, "restarts": None}) == {"timeout": 0.5,
                                                                 "restarts": None}
    custom = {"beta_schedule": [0.1, 1.0], "num_sweeps": 2 ** 20}
    assert _small_budget(custom) == custom   # a custom schedule fixes the sweeps


def _one_flip_improvable(bqm, sampleset) -> int:
    """How many reads one flip improves (by more than round-off)."""
    count = 0
    for sample, energy in sampleset.data(["sample", "energy"]):
        for v in bqm.variables:
            flipped = dict(sample)
            flipped[v] = 1 - sample[v] if bqm.vartype is dimod.BINARY else -sample[v]
            if bqm.energy(flipped) < energy - 1e-9 * (1 + abs(energy)):
                count += 1
                break
    return count


@pytest.mark.parametrize("density", [0.05, 0.5])   # the CSR and the dense kernels
def test_annealing_reads_end_at_a_local_minimum(density):
    """The best state an anneal saw can lie one flip above a better state (it left uphill
    before visiting that flip); the final descent takes every read down to a local minimum,
    never up, from the same anneal (same seed)."""
    improvable = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        bqm = dimod.generators.gnp_random_bqm(
            200, density, "SPIN", random_state=seed,
            bias_generator=lambda k: rng.uniform(-1, 1, size=k))
        kept = QroundSampler("anneal").sample(bqm, num_reads=10, seed=seed, descent=False)
        down = QroundSampler("anneal").sample(bqm, num_reads=10, seed=seed)
        assert down.info["matrix"] == ("sparse" if density < 0.25 else "dense")
        assert kept.info["descent_flips"] is None
        flips = np.array(down.info["descent_flips"])
        assert _one_flip_improvable(bqm, down) == 0
        improvable += _one_flip_improvable(bqm, kept)
        # read by read: the descent starts from the kept state and only goes down
        assert np.all(down.record.energy <= kept.record.energy + 1e-9)
        assert np.array_equal(flips > 0, down.record.energy < kept.record.energy - 1e-12)
    assert improvable > 0   # these anneals do leave states one flip improves


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 10_000), density=st.sampled_from([0.1, 0.7]))
def test_the_final_descent_never_goes_up_and_both_matrix_forms_agree(n, seed, density):
    from qround.solvers import sampler

    bqm = random_bqm(n, seed, density=density)
    variables = list(bqm.variables)
    linear, rows, cols, quad, _ = sampler.qubo_vectors(bqm, variables)
    starts = np.random.default_rng(seed).integers(0, 2, size=(3, n)).astype(bool)
    thresh = -sampler.descent_tolerance(n, linear, rows, cols, quad)
    dense = sampler._dense(n, rows, cols, 0.5 * quad)
    csr, h = sampler._sparse(n, rows, cols, 0.5 * quad)
    down, (flips, done) = sampler._descend(starts, linear, thresh, dense=dense)
    down_csr, (flips_csr, done_csr) = sampler._descend(starts, linear, thresh, csr=csr, h=h)
    assert done.all() and done_csr.all()

    def energy(b):
        b = b.astype(float)
        return np.einsum("ri,ij,rj->r", b, dense, b) + b @ linear

    assert np.array_equal(down, down_csr) and np.array_equal(flips, flips_csr)
    assert np.all(energy(down) <= energy(starts) + 1e-9)
    # a local minimum: no single flip lowers the energy
    b = down.astype(float)
    deltas = (1 - 2 * b) * (2 * b @ dense + linear)
    assert np.all(deltas >= thresh - 1e-9)


# ------------------------------- found by the twenty-sixth session's review of the descent
def _counter_bqm(k, m, pad=0):
    """A chain y_1 .. y_k that the descent advances one link per sweep (y_k first in input
    order), and m variables z that flip after every link: k + k m improving flips from all
    zeros, with small integer biases (no round-off)."""
    big = 4 * m + 4
    bqm = dimod.BQM("BINARY")
    for v in ([f"y{t:03d}" for t in range(k, 0, -1)] + [f"z{j:03d}" for j in range(m)]
              + [f"p{i:03d}" for i in range(pad)]):
        bqm.add_variable(v, 0.0)
    bqm.add_linear("y001", -big)
    for t in range(2, k + 1):
        bqm.add_linear(f"y{t:03d}", big)
        bqm.add_quadratic(f"y{t - 1:03d}", f"y{t:03d}", -2 * big)
    for j in range(m):
        bqm.add_linear(f"z{j:03d}", 1)
        for t in range(1, k + 1):
            bqm.add_quadratic(f"z{j:03d}", f"y{t:03d}", -2 * (-1) ** (t + 1))
    return bqm


@pytest.mark.parametrize("k, m, pad, matrix", [(30, 30, 0, "dense"), (40, 40, 36, "sparse")])
def test_a_long_descent_goes_all_the_way_down(k, m, pad, matrix):
    """More than 10 flips per variable, no round-off and no cycle: a cap on flips stopped it
    above a local minimum (a flip then still gained up to 178)."""
    bqm = _counter_bqm(k, m, pad)
    zeros = {v: 0 for v in bqm.variables}
    ss = QroundSampler("anneal").sample(bqm, initial_states=zeros, num_reads=1, seed=0,
                                        beta_schedule=[1e6])
    assert ss.info["matrix"] == matrix
    assert ss.info["descent_flips"][0] > 10 * bqm.num_variables + 10
    assert _one_flip_improvable(bqm, ss) == 0


def test_a_descent_cut_short_by_the_sweep_limit_warns(monkeypatch):
    from qround.solvers import sampler

    bqm = _counter_bqm(30, 30)
    monkeypatch.setattr(sampler, "DESCENT_SWEEPS", 5 - 10 * bqm.num_variables)  # 5 sweeps
    zeros = {v: 0 for v in bqm.variables}
    with pytest.warns(UserWarning, match=r"final descent of 1 of 1 reads stopped after 5 "
                                         r"sweeps, before a local minimum"):
        ss = QroundSampler("anneal").sample(bqm, initial_states=zeros, num_reads=1, seed=0,
                                            beta_schedule=[1e6])
    assert _one_flip_improvable(bqm, ss) == 1


def test_the_descent_tolerance_is_each_variables_own_scale():
    """Variables whose biases are 1e-12 of the BQM's largest still reach their minimum: a
    tolerance from the largest bias left them where the anneal did."""
    rng = np.random.default_rng(0)
    bqm = dimod.generators.gnp_random_bqm(
        40, 0.5, "BINARY", random_state=0,
        bias_generator=lambda k: 1e12 * rng.integers(-5, 6, size=k).astype(float))
    for i in range(10):
        bqm.add_linear(f"s{i}", -0.5)   # independent: 1 lowers the energy by exactly 0.5
    ss = QroundSampler("anneal").sample(bqm, num_reads=4, seed=0, num_sweeps=20,
                                        beta_range=(1e-13, 1e-12))
    for sample in ss.samples():
        assert all(sample[f"s{i}"] == 1 for i in range(10))


# ------------------------------- found by the twenty-sixth session's review of the sampler
def test_a_time_limit_of_none_is_no_second_budget_and_restarts_none_names_timeout():
    bqm = random_bqm(12, 3)
    with_none = QroundSampler("tabu").sample(bqm, num_reads=2, seed=1, timeout=5,
                                             time_limit=None)
    plain = QroundSampler("tabu").sample(bqm, num_reads=2, seed=1, timeout=5)
    assert len(with_none) == len(plain) == 2
    with pytest.raises(QroundError, match=r"restarts=None .* needs a budget: timeout "
                                          r"\(milliseconds per read"):
        QroundSampler("tabu").sample(bqm, restarts=None)
    with pytest.raises(QroundError, match=r"its search parameters: \[.*\] \(and dimod's "):
        QroundSampler("tabu").sample(bqm, num_restarts=3)


# ------------------------------------------------ found by mutation testing (helper-118)
def test_spin_starts_are_read_as_given():   # P2
    # zero temperature, one sweep, no final descent: each read only moves down from its start
    # (reading -1/+1 as 1/0 turned every start into its complement, which the optimum as a
    # start hid: one hot sweep flips every variable back)
    bqm = random_bqm(12, 7, "SPIN")
    vs = list(bqm.variables)
    starts = np.random.default_rng(0).choice([-1, 1], size=(20, 12)).astype(np.int8)
    ss = QroundSampler("anneal").sample(bqm, initial_states=(starts, vs), seed=0,
                                        beta_schedule=[1e9], descent=False)
    assert np.all(ss.record.energy <= bqm.energies((starts, vs)) + 1e-9)
    ground = dimod.ExactSolver().sample(bqm).first
    ss = QroundSampler("anneal").sample(bqm, initial_states=ground.sample, num_reads=1, seed=0,
                                        beta_schedule=[1e9], descent=False)
    assert ss.first.energy == pytest.approx(ground.energy)


def test_start_in_other_variable_order():   # P29
    bqm = random_bqm(12, 7, "BINARY")
    ground = dimod.ExactSolver().sample(bqm).first
    vs = list(bqm.variables)[::-1]
    st = np.array([[ground.sample[v] for v in vs]])
    ss = QroundSampler("anneal").sample(bqm, initial_states=(st, vs), seed=0,
                                        beta_schedule=[1e-9], descent=False)
    assert ss.first.energy == pytest.approx(ground.energy)


def test_descent_no_warning_on_ties():   # P5
    for seed in range(4):
        rng = np.random.default_rng(seed)
        bqm = dimod.generators.gnp_random_bqm(30, 0.5, "BINARY", random_state=seed,
                  bias_generator=lambda k: rng.integers(-2, 3, size=k).astype(float))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ss = QroundSampler("anneal").sample(bqm, num_reads=4, seed=seed, num_sweeps=20)
        assert max(ss.info["descent_flips"]) < 10 * 30


def test_empty_descent_false():   # P8
    ss = QroundSampler("anneal").sample(dimod.BinaryQuadraticModel("SPIN"), num_reads=2,
                                        descent=False)
    assert ss.info["descent_flips"] is None


def test_partial_cut_short_warns(monkeypatch):   # P10, P11
    from qround.solvers import sampler
    bqm = _counter_bqm(30, 30)
    zeros = {v: 0 for v in bqm.variables}
    down = QroundSampler("anneal").sample(bqm, initial_states=zeros, num_reads=1, seed=0,
                                          beta_schedule=[1e6]).first.sample
    monkeypatch.setattr(sampler, "DESCENT_SWEEPS", 5 - 10 * bqm.num_variables)
    vs = list(bqm.variables)
    st = np.array([[zeros[v] for v in vs], [down[v] for v in vs]])
    with pytest.warns(UserWarning, match="final descent of 1 of 2 reads"):
        QroundSampler("anneal").sample(bqm, initial_states=(st, vs), seed=0, beta_schedule=[1e6])


def test_flip_overflow_refused():   # P14
    from qround.errors import QroundError
    bqm = dimod.BinaryQuadraticModel({0: 0.0, 1: 0.0, 2: 0.0},
                                     {(0, 1): 1e308, (0, 2): 1e308}, 0.0, "BINARY")
    with pytest.raises(QroundError, match="too large"):
        QroundSampler("anneal").sample(bqm)


def test_tabu_breaks_ties_at_random_by_default_and_first_on_request():
    """On integer biases many flips tie; taking the lowest index every time walked the same
    few variables (helper-168: -2236 against dwave's -2512 on a 3-regular spin glass).  The
    sampler's tabu picks among ties at random from its seeded stream; ties="first" is the
    layer solver's rule."""
    nx = pytest.importorskip("networkx", reason="the spin glass's graph needs networkx")
    from qround.solvers import Tabu

    bqm = dimod.generators.ran_r(1, nx.random_regular_graph(3, 200, seed=1), seed=1)
    sampler = QroundSampler("tabu")
    kw = dict(num_reads=2, restarts=1, max_iter=400)
    plain = sampler.sample(bqm, seed=5, **kw)
    assert np.array_equal(plain.record.sample, sampler.sample(bqm, seed=5, ties="random",
                                                              **kw).record.sample)
    first = sampler.sample(bqm, seed=5, ties="first", **kw)
    assert not np.array_equal(plain.record.sample, first.record.sample)
    dimod.testing.assert_sampleset_energies(plain, bqm)
    assert "ties" in sampler.parameters
    assert Tabu().ties == "first"
    with pytest.raises(QroundError, match="ties must be 'first' or 'random'"):
        Tabu(ties="lowest")


def test_tabu_on_a_large_sparse_bqm_points_at_annealing(monkeypatch):
    """Tabu search holds a BQM dense at O(n) per iteration: on 20k sparse variables it took
    183 s and 3.5 GB where annealing on CSR took 16 s (helper-168); it says so."""
    from qround.solvers import sampler as sampler_module

    monkeypatch.setattr(sampler_module, "SPARSE_TABU_WARN_BYTES", 8 * 50 ** 2)
    sparse = dimod.generators.gnp_random_bqm(60, 0.02, "BINARY", random_state=0)
    with pytest.warns(UserWarning, match="QroundSampler\\('anneal'\\) works on its couplings"):
        QroundSampler("tabu").sample(sparse, num_reads=1, seed=0, restarts=0)
    dense = dimod.generators.gnp_random_bqm(60, 0.5, "BINARY", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QroundSampler("tabu").sample(dense, num_reads=1, seed=0, restarts=0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), density=st.floats(0.0, 1.0),
       integer=st.booleans(), spin=st.booleans())
def test_default_beta_range_is_dwaves_computed_with_numpy(seed, n, density, integer, spin):
    # the numpy version of dwave-samplers' default_beta_range: the same numbers (exactly on
    # integer biases, whose sums are exact; up to round-off otherwise), also for SPIN BQMs
    # (converted to BINARY first) and for variables without any bias
    import warnings

    from dwave.samplers.sa.sampler import default_beta_range

    from qround.solvers.sampler import _default_beta_range, qubo_vectors

    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, n)) * (rng.uniform(size=(n, n)) < density)
    lin = rng.normal(size=n) * (rng.uniform(size=n) < 0.7)
    if integer:
        q, lin = np.round(3 * q), np.round(3 * lin)
    rows, cols = np.triu_indices(n, 1)
    keep = q[rows, cols] != 0
    bqm = dimod.BinaryQuadraticModel.from_numpy_vectors(
        lin, (rows[keep], cols[keep], q[rows, cols][keep]), 0.0,
        dimod.SPIN if spin else dimod.BINARY)
    got = _default_beta_range(*qubo_vectors(bqm, list(bqm.variables))[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # dwave warns on a BQM without biases
        want = [float(b) for b in default_beta_range(bqm.change_vartype(dimod.BINARY,
                                                                        inplace=False))]
    if not (np.any(lin != 0) or np.any(keep)):
        assert got == (1.0, 1.0)          # every state is optimal; dwave's says (0.1, 1)
    elif integer:
        assert list(got) == want
    else:
        assert list(got) == pytest.approx(want, rel=1e-12)
