"""Write-back: codes on the grid, floor/ceil of every weight, modules copied unless inplace."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qround import GridSpec, QroundError, RoundingProblem, get_solver
from qround.problems import layer_weight, problems_from_layer
from qround.writeback import QuantizedWeight, apply_to_layer, quantized_weight, weight_from_codes

torch.set_num_threads(1)


def psd(n, rng):
    a = rng.normal(size=(2 * n, n))
    return a.T @ a / (2 * n)


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 4), groups=st.integers(1, 3), gs=st.integers(1, 4),
       bits=st.integers(2, 5), symmetric=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_codes_are_floor_or_ceil_and_on_the_grid(out, groups, gs, bits, symmetric, seed):
    rng = np.random.default_rng(seed)
    n = groups * gs
    w = rng.normal(size=(out, n)) * rng.uniform(0.1, 3)
    spec = GridSpec(bits=bits, symmetric=symmetric, group_size=gs if groups > 1 else None)
    problem = RoundingProblem.from_weight(w, psd(n, rng), spec)
    b = rng.random(w.shape) < 0.5
    qw = quantized_weight(problem, b)
    assert qw.codes.dtype == np.int64 and qw.weight_shape == (out, n)
    assert qw.scale.shape == (out, groups) and qw.group_size == problem.grid.group_size
    s, z = problem.grid.expand()
    deq = qw.dequantized
    # on the grid: integer codes in range, and s * (q - z) is exactly what is written back
    assert np.all((qw.codes >= qw.qmin) & (qw.codes <= qw.qmax))
    np.testing.assert_allclose(deq / s + z, qw.codes, atol=1e-9)
    # each code is the floor or the ceil of w/s (+z), clipped to the range
    lo = np.clip(np.floor(w / s) + z, qw.qmin, qw.qmax)
    hi = np.clip(np.floor(w / s) + z + 1, qw.qmin, qw.qmax)
    assert np.all((qw.codes == lo) | (qw.codes == hi))
    np.testing.assert_array_equal(deq, problem.dequantize(b))


def test_apply_to_linear_copies_unless_inplace():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    before = lin.weight.detach().clone()
    rng = np.random.default_rng(0)
    problem = problems_from_layer(lin, psd(6, rng), GridSpec(bits=3))[0]
    sol = get_solver("greedy").solve(problem, seed=0)
    qw = quantized_weight([problem], [sol], module=lin)
    new = apply_to_layer(lin, qw)
    assert new is not lin
    torch.testing.assert_close(lin.weight.detach(), before)          # original untouched
    torch.testing.assert_close(new.weight.detach(),
                               torch.as_tensor(qw.dequantized, dtype=torch.float32))
    torch.testing.assert_close(new.bias, lin.bias)
    same = apply_to_layer(lin, qw, inplace=True)
    assert same is lin
    torch.testing.assert_close(lin.weight.detach(), new.weight.detach())


def test_apply_keeps_dtype():
    lin = nn.Linear(4, 2).to(torch.bfloat16)
    problem = problems_from_layer(lin, np.eye(4), GridSpec(bits=4))[0]
    qw = quantized_weight(problem, problem.rtn_choices(), module=lin)
    new = apply_to_layer(lin, qw)
    assert new.weight.dtype == torch.bfloat16 and new.weight.device == lin.weight.device
    assert isinstance(new.weight, nn.Parameter)


def test_grouped_conv_write_back_matches_functional_conv():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    before = conv.weight.detach().clone()
    rng = np.random.default_rng(1)
    h = np.stack([psd(18, rng) for _ in range(2)])
    problems = problems_from_layer(conv, h, GridSpec(bits=4), name="c")
    sols = [get_solver("greedy").solve(p, seed=0) for p in problems]
    qw = quantized_weight(problems, sols, module=conv)
    assert qw.weight_shape == (6, 2, 3, 3) and qw.codes.shape == (6, 18)
    np.testing.assert_array_equal(qw.codes[3:], sols[1].codes)
    new = apply_to_layer(conv, qw)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    want = F.conv2d(x, torch.as_tensor(qw.dequantized), conv.bias, padding=1, groups=2)
    torch.testing.assert_close(new(x), want)
    torch.testing.assert_close(conv.weight.detach(), before)
    # every weight with a choice ends within one grid step of its float value
    free = np.concatenate([p.free for p in problems])
    err = np.abs(qw.dequantized.reshape(6, -1) - layer_weight(conv))
    assert np.all(err[free] <= np.repeat(qw.scale, 18, axis=1)[free] + 1e-12)


def test_shape_mismatches_are_errors():
    lin = nn.Linear(4, 2)
    problem = problems_from_layer(lin, np.eye(4))[0]
    b = problem.rtn_choices()
    qw = quantized_weight(problem, b)
    with pytest.raises(QroundError, match="shape"):
        apply_to_layer(nn.Linear(4, 3), qw)
    with pytest.raises(QroundError, match="does not match"):
        quantized_weight(problem, b, module=nn.Linear(5, 2))
    with pytest.raises(QroundError, match="one solution per problem"):
        quantized_weight([problem, problem], [b])
    with pytest.raises(QroundError, match="shape"):
        quantized_weight(problem, b[:, :3])
    with pytest.raises(QroundError, match="ReLU"):
        apply_to_layer(nn.ReLU(), qw)
    assert isinstance(qw, QuantizedWeight)


def test_restricted_problems_and_unpaired_solutions_are_refused():
    # a problem over other inputs than its layer's (restrict) has codes in its own column
    # order: written back, they landed in the wrong columns
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(3, 8)), rng.normal(size=(100, 8))
    p = RoundingProblem.from_weight(w, x.T @ x / 100, GridSpec(bits=4))
    r = p.restrict(np.arange(8)[::-1], p.rtn_choices())
    assert r.restricted
    with pytest.raises(QroundError, match="restricted to other inputs"):
        quantized_weight(r, get_solver("nearest").solve(r))
    with pytest.raises(QroundError, match="restricted to other inputs"):
        weight_from_codes(r, r.codes(r.rtn_choices()))
    # the same columns in the same order are the layer's: written back as usual
    same = p.restrict(np.arange(8), p.rtn_choices())
    assert not same.restricted
    qw = quantized_weight(same, get_solver("nearest").solve(same))
    assert np.array_equal(qw.codes, p.codes(p.rtn_choices()))
    with pytest.raises(QroundError, match="one solution per problem in a list"):
        quantized_weight([p], get_solver("nearest").solve(p))
    for bad in ("p", None, {"a": 1}):
        with pytest.raises(QroundError, match="must be RoundingProblems"):
            weight_from_codes([bad], [np.zeros((3, 8), dtype=int)])
        with pytest.raises(QroundError, match="must be RoundingProblems"):
            quantized_weight([bad], [p.rtn_choices()])
