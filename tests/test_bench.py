"""qround.bench helpers: the GPTQ reference row's cost is on the same scale as the solvers'."""
import numpy as np

from qround.bench import _gptq_reference_row, direct_cost
from qround.grid import GridSpec
from qround.problems import RoundingProblem

from .conftest import correlated_hessian


def _problem(seed=0, bits=3):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 12))
    h = correlated_hessian(12, rng)
    return RoundingProblem.from_weight(w, h, GridSpec(bits=bits)), w, h


def test_direct_cost_of_solver_codes_is_the_problem_cost():
    problem, w, h = _problem()
    rtn = problem.rtn_choices()
    assert np.isclose(direct_cost(problem, w, h, problem.codes(rtn)), problem.rtn_costs().sum(),
                      rtol=1e-9)
    b = np.random.default_rng(1).integers(0, 2, size=rtn.shape)
    assert np.isclose(direct_cost(problem, w, h, problem.codes(b)), problem.costs(b).sum(),
                      rtol=1e-9)


def test_gptq_reference_row_beats_rtn():
    problem, w, h = _problem(seed=2, bits=2)
    row = _gptq_reference_row("toy", 2, problem, w, h)
    assert row["solver"] == "gptq-reference" and row["seconds"] > 0
    assert 0 < row["ratio"] < 1
