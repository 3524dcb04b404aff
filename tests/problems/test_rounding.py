"""The QUBO identities of a rounding problem and the checks on bad input."""
from __future__ import annotations

import dimod
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qround import GridSpec, QroundError, RoundingProblem
from qround.grid import fit_grid

from ..conftest import correlated_hessian, make_problem


def direct_cost(p: RoundingProblem, b):
    d = p.dequantize(b) - p.weight
    if p.shared_hessian:
        return np.einsum("mi,ij,mj->m", d, p.hessian, d)
    return np.einsum("mi,mij,mj->m", d, p.hessian, d)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 5), n=st.integers(1, 12), bits=st.integers(2, 8),
       symmetric=st.booleans(), per_channel=st.booleans(), seed=st.integers(0, 10_000),
       method=st.sampled_from(["minmax", "mse", "mse-output"]))
def test_energy_plus_constant_is_direct_cost(m, n, bits, symmetric, per_channel, seed, method):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(m, n)) * rng.uniform(0.01, 10)
    h = (np.stack([correlated_hessian(n, rng, rows=32) for _ in range(m)]) if per_channel
         else correlated_hessian(n, rng, rows=32))
    p = RoundingProblem.from_weight(w, h, GridSpec(bits=bits, symmetric=symmetric,
                                                   scale_method=method))
    b = rng.integers(0, 2, size=(3, m, n))
    costs = p.costs(b)
    for k in range(3):
        np.testing.assert_allclose(costs[k], direct_cost(p, b[k]), rtol=1e-9,
                                   atol=1e-9 * (1 + np.abs(costs[k]).max()))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), per_channel=st.booleans())
def test_flip_deltas_qubo_and_bqm_agree_with_energies(seed, per_channel):
    p = make_problem(m=3, n=7, seed=seed, per_channel=per_channel)
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    e0 = p.energies(b)
    deltas = p.flip_deltas(b)
    for c in range(p.num_channels):
        q = p.qubo(c)
        bc = b[c].astype(float)
        assert np.isclose(bc @ q @ bc, e0[c])
        bqm = p.to_bqm(c)
        assert set(bqm.variables) == set(np.flatnonzero(p.free[c]).tolist())
        sample = {v: int(b[c, v]) for v in bqm.variables}
        assert np.isclose(bqm.energy(sample), e0[c] + p.const[c])
        for i in np.flatnonzero(p.free[c]):
            b2 = b.copy()
            b2[c, i] = ~b2[c, i]
            assert np.isclose(p.energies(b2)[c] - e0[c], deltas[c, i], atol=1e-10)


def test_asymmetric_cost_matches_data():
    rng = np.random.default_rng(0)
    n, m, rows = 8, 4, 500
    x = rng.normal(size=(rows, n))
    x_hat = x + 0.1 * rng.normal(size=(rows, n))
    w = rng.normal(size=(m, n))
    h_hat, c, h = x_hat.T @ x_hat / rows, x_hat.T @ x / rows, x.T @ x / rows
    p = RoundingProblem.from_weight(w, h_hat, GridSpec(bits=3), cross=c, float_hessian=h)
    b = rng.integers(0, 2, size=(m, n))
    direct = np.mean((x @ w.T - x_hat @ p.dequantize(b).T) ** 2, axis=0)
    np.testing.assert_allclose(p.costs(b), direct, rtol=1e-9)


def test_rtn_and_codes_lie_on_grid(problem):
    b = problem.rtn_choices()
    grid_codes = problem.grid.quantize(problem.weight)
    np.testing.assert_array_equal(problem.codes(b), grid_codes)
    q = problem.codes(np.ones_like(b))
    assert q.min() >= problem.qmin and q.max() <= problem.qmax
    assert np.array_equal(problem.choices_from_codes(q), np.ones_like(b) & problem.free)
    assert (~problem.free).any(), "fixture should clip some weights"


def test_fixed_variables_do_not_change_energy(problem):
    b = problem.rtn_choices()
    b2 = b | ~problem.free
    np.testing.assert_allclose(problem.energies(b2), problem.energies(b))
    np.testing.assert_array_equal(problem.codes(b2), problem.codes(b))


def test_subproblem_matches_rows(problem):
    sub = problem.subproblem([1, 3])
    b = problem.rtn_choices()
    np.testing.assert_allclose(sub.costs(b[[1, 3]]), problem.costs(b)[[1, 3]])


@pytest.mark.parametrize("bad, match", [
    (dict(weight=np.full((2, 3), np.nan)), "NaN"),
    (dict(hessian=np.eye(4)), "does not match"),
    (dict(hessian=np.array([[1.0, 2.0, 0], [0, 1.0, 0], [0, 0, 1.0]])), "not symmetric"),
    (dict(hessian=-np.eye(3)), "positive semi-definite"),
    (dict(hessian=np.eye(3)[None]), "does not match"),
    (dict(weight=np.zeros((0, 3))), "non-empty"),
    (dict(weight=np.array(["a", "b"])), "numeric"),
    (dict(weight=np.ones(3)), "dimensions"),
])
def test_bad_input_is_named(bad, match):
    args = dict(weight=np.ones((2, 3)), hessian=np.eye(3))
    args.update(bad)
    with pytest.raises(QroundError, match=match):
        RoundingProblem.from_weight(args["weight"], args["hessian"], GridSpec(bits=4))


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, True])
def test_bits_out_of_range(bits):
    with pytest.raises(QroundError, match="bits"):
        GridSpec(bits=bits)


def test_zero_or_negative_scale_rejected():
    w = np.ones((2, 3))
    with pytest.raises(QroundError, match="positive"):
        fit_grid(w, GridSpec(bits=4), scale=np.array([0.1, 0.0]))


@pytest.mark.parametrize("scale_w, scale_h", [(1e160, 1.0), (1e100, 1e120)])
def test_a_cost_that_overflows_is_refused(scale_w, scale_h):
    """Finite inputs whose cost w^T H w overflows float64 would give NaN costs (and a ratio
    of 1) from every solver: refused when the problem is built, naming the layer."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 6)) * scale_w
    h = correlated_hessian(6, rng) * scale_h
    with pytest.raises(QroundError, match="cost of layer 'big' overflows float64"):
        RoundingProblem.from_weight(w, h, GridSpec(bits=4), name="big")


def test_bad_choices_rejected(problem):
    with pytest.raises(QroundError, match="shape"):
        problem.energies(np.zeros((3, 3)))
    with pytest.raises(QroundError, match="binary"):
        problem.energies(np.full(problem.weight.shape, 2))
    with pytest.raises(QroundError, match="floor or ceil"):
        problem.choices_from_codes(problem.floor_codes + 2)
    with pytest.raises(QroundError, match="out of range"):
        problem.qubo(problem.num_channels)


def test_arrays_are_read_only(problem):
    with pytest.raises(ValueError):
        problem.hessian[0, 0] = 1.0
    # target()'s arrays are cached and read by cost_of_codes and with_grid: changing them
    # changed every later cost
    q = problem.codes(problem.rtn_choices())
    before = problem.cost_of_codes(q)
    r, k = problem.target()
    with pytest.raises(ValueError):
        k += 100
    with pytest.raises(ValueError):
        r[0, 0] = 1.0
    assert np.array_equal(problem.cost_of_codes(q), before)


def test_codes_that_are_no_numbers_are_named(problem):
    with pytest.raises(QroundError, match="codes"):
        problem.choices_from_codes(np.full(problem.weight.shape, "a"))
    with pytest.raises(QroundError, match="codes"):
        problem.choices_from_codes(np.full(problem.weight.shape, np.nan))


def test_user_arrays_untouched():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 5))
    h = correlated_hessian(5, rng)
    w0, h0 = w.copy(), h.copy()
    RoundingProblem.from_weight(w, h, GridSpec(bits=3))
    assert np.array_equal(w, w0) and np.array_equal(h, h0)
    assert w.flags.writeable and h.flags.writeable


def test_bqm_is_a_dimod_model(problem):
    bqm = problem.to_bqm(0)
    assert isinstance(bqm, dimod.BinaryQuadraticModel)
    assert bqm.vartype is dimod.BINARY


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), per_channel=st.booleans(), k=st.integers(1, 9))
def test_restrict_keeps_absolute_costs(seed, per_channel, k):
    p = make_problem(m=3, n=10, seed=seed, per_channel=per_channel)
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 2, size=p.weight.shape).astype(bool) & p.free
    inputs = rng.choice(p.num_inputs, size=k, replace=False)
    sub = p.restrict(inputs, b)
    idx = inputs  # the restricted variables keep the caller's order
    np.testing.assert_allclose(sub.costs(b[:, idx]), p.costs(b), rtol=1e-9, atol=1e-12)
    b2 = b.copy()
    b2[:, idx] = rng.integers(0, 2, size=(3, k)).astype(bool) & p.free[:, idx]
    np.testing.assert_allclose(sub.costs(b2[:, idx]), p.costs(b2), rtol=1e-9, atol=1e-12)
    with pytest.raises(QroundError):
        p.restrict([p.num_inputs], b)


@pytest.mark.parametrize("inputs, message", [
    ([1, 1, 2], "repeat an index"), ([1.5], "integer indices"), ([], "select nothing"),
    (np.ones(3, dtype=bool), "boolean mask must have shape"), ([-11], r"\[0, 10\)"),
    (slice(0, 10, 0), "slice step cannot be zero"),
    (slice(True, 5), "a slice takes integers or None"),
    (slice(0, np.bool_(True)), "a slice takes integers or None"),
    (slice(0.5, 5), "a slice takes integers or None"),
    ([-1, 9], "must not repeat an index"), ([0, -10], "must not repeat an index"),
])
def test_restrict_rejects_bad_inputs(inputs, message):
    p = make_problem(m=3, n=10, seed=0)
    with pytest.raises(QroundError, match=message):
        p.restrict(inputs, p.rtn_choices())


def test_restrict_and_subproblem_accept_masks_slices_and_negative_indices():
    p = make_problem(m=4, n=10, seed=1)
    b = p.rtn_choices()
    mask = np.arange(10) % 3 == 0
    for inputs in (mask, slice(0, 10, 3), [0, 3, 6, -1]):
        np.testing.assert_allclose(p.restrict(inputs, b).costs(b[:, [0, 3, 6, 9]]), p.costs(b))
    np.testing.assert_array_equal(p.subproblem([3, 1]).weight, p.weight[[3, 1]])
    with pytest.raises(QroundError, match="channels must not repeat"):
        p.subproblem([1, 1])
    for channel in ("a", 1.7, True):
        with pytest.raises(QroundError, match="channel must be an integer"):
            p.qubo(channel)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), damp=st.floats(0.001, 1.0), asym=st.booleans())
def test_damping_adds_trust_region(seed, damp, asym):
    rng = np.random.default_rng(seed)
    n, m = 8, 3
    x = rng.normal(size=(50, n))
    x_hat = x + 0.1 * rng.normal(size=(50, n))
    w = rng.normal(size=(m, n))
    h, h_hat, c = x.T @ x / 50, x_hat.T @ x_hat / 50, x_hat.T @ x / 50
    grid = fit_grid(w, GridSpec(bits=3))
    kw = dict(cross=c, float_hessian=h) if asym else {}
    plain = RoundingProblem.from_weight(w, h_hat if asym else h, grid, **kw)
    damped = RoundingProblem.from_weight(w, h_hat if asym else h, grid, damp=damp, **kw)
    lam = damp * np.mean(np.diag(h_hat if asym else h))
    b = rng.integers(0, 2, size=(m, n))
    d = damped.dequantize(b) - w
    np.testing.assert_allclose(damped.costs(b), plain.costs(b) + lam * np.sum(d * d, axis=1),
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(QroundError, match="damp"):
        RoundingProblem.from_weight(w, h, grid, damp=-1.0)


def test_a_stack_of_hessians_is_checked_matrix_by_matrix():
    """The tolerance is each matrix's own: a small negative-definite channel beside a large
    PSD one used to pass, and its solvers then maximised the error."""
    w = np.random.default_rng(0).standard_normal((2, 4))
    eye = np.eye(4)
    with pytest.raises(QroundError, match=r"not positive semi-definite \(channel 1\)"):
        RoundingProblem.from_weight(w, np.stack([eye, -1e-7 * eye]))
    skew = np.stack([eye, 1e-7 * (eye + np.triu(np.ones((4, 4)), 1))])
    with pytest.raises(QroundError, match=r"not symmetric \(channel 1\)"):
        RoundingProblem.from_weight(w, skew)
    p = RoundingProblem.from_weight(w, np.stack([eye, 0 * eye]))   # an all-zero channel is PSD
    assert p.rtn_costs()[1] == 0 and p.rtn_costs()[0] > 0
    with pytest.raises(QroundError, match=r"not positive semi-definite: smallest"):
        RoundingProblem.from_weight(w, -eye)   # one shared matrix: no channel named


def test_a_restricted_problem_in_another_order_keeps_no_layer_grid():
    from qround.scales import refit_scales

    p = make_problem(3, 8, bits=3, group_size=4, seed=2)
    b = p.rtn_choices()
    perm = p.restrict(np.r_[4:8, 0:4], b)   # every input, other order: groups swapped
    assert perm.restricted and perm.subproblem([0, 1]).restricted
    with pytest.raises(QroundError, match="restricted"):
        perm.with_grid(perm.grid)
    with pytest.raises(QroundError, match="restricted"):
        refit_scales(perm, perm.codes(b[:, np.r_[4:8, 0:4]]))
    same = p.restrict(np.arange(8), b)   # the layer itself, in order
    assert not same.restricted
    assert np.allclose(same.with_grid(same.grid).rtn_costs(), p.rtn_costs())
    with pytest.raises(QroundError, match="ridge"):
        refit_scales(p, p.codes(b), ridge=-1)
    with pytest.raises(QroundError, match="ridge"):
        refit_scales(p, p.codes(b), ridge=float("nan"))


def test_a_layer_without_outputs_is_named():
    import torch

    from qround.problems import problems_from_layer

    with pytest.warns(UserWarning, match="zero-element"):   # torch's, on construction
        layers = [(torch.nn.Linear(3, 0), 3), (torch.nn.Conv2d(4, 0, 3), 36)]
    for layer, n in layers:
        with pytest.raises(QroundError, match="weight is empty"):
            problems_from_layer(layer, np.eye(n), GridSpec())
