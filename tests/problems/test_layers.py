"""Layer problems: energy + const equals the real layer's output MSE on the calibration data."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qround import GridSpec, QroundError, fit_grid
from qround.calibrate import capture_hessians
from qround.problems import layer_weight, problems_from_layer

torch.set_num_threads(1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_choices(problems, seed):
    rng = np.random.default_rng(seed)
    return [rng.random(p.weight.shape) < 0.5 for p in problems]


def test_layer_weight_shapes_and_errors():
    lin = nn.Linear(5, 3)
    np.testing.assert_array_equal(layer_weight(lin), lin.weight.detach().double().numpy())
    conv = nn.Conv2d(4, 6, (3, 2), groups=2)
    w = layer_weight(conv)
    assert w.shape == (6, 2 * 3 * 2) and w.dtype == np.float64
    np.testing.assert_array_equal(w[4], conv.weight.detach().double()[4].flatten().numpy())
    with pytest.raises(QroundError, match="ReLU"):
        layer_weight(nn.ReLU())
    with pytest.raises(QroundError, match="unsupported layer type Conv3d"):
        problems_from_layer(nn.Conv3d(2, 2, 3), np.eye(54))
    conv1d = nn.Conv1d(4, 6, 3, groups=2)   # (out, c/groups * k) per group, as its Conv2d
    [a, b] = problems_from_layer(conv1d, np.stack([np.eye(6)] * 2))
    np.testing.assert_array_equal(a.weight, conv1d.weight.detach().double()[:3].reshape(3, 6))
    assert b.weight.shape == (3, 6)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4)), min_size=1, max_size=2),
       n_in=st.integers(1, 6), n_out=st.integers(1, 4), bits=st.integers(2, 4),
       symmetric=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_linear_energy_plus_const_is_output_mse(sizes, n_in, n_out, bits, symmetric, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out).double()
    batches = [torch.randn(b, t, n_in, generator=gen(seed + i), dtype=torch.float64)
               for i, (b, t) in enumerate(sizes)]
    h = capture_hessians(lin, batches, layers=[""])[""]
    [problem] = problems_from_layer(lin, h, GridSpec(bits=bits, symmetric=symmetric), name="fc")
    assert problem.name == "fc"
    [b] = random_choices([problem], seed)
    dw = torch.as_tensor(problem.dequantize(b) - problem.weight)
    x = torch.cat([t.reshape(-1, n_in) for t in batches])
    direct = ((x @ dw.T) ** 2).mean(dim=0).numpy()        # E ||(W_hat - W) x||^2 per channel
    np.testing.assert_allclose(problem.energies(b) + problem.const, direct,
                               rtol=1e-8, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(groups=st.integers(1, 3), cin_g=st.integers(1, 2), out_g=st.integers(1, 3),
       k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), n=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_conv_energy_plus_const_is_output_mse(groups, cin_g, out_g, k, stride, padding, dilation,
                                              n, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(groups * cin_g, groups * out_g, k, stride=stride, padding=padding,
                     dilation=dilation, groups=groups).double()
    size = dilation * (k - 1) + 3
    batches = [torch.randn(n, groups * cin_g, size, size + 1, generator=gen(seed + i),
                           dtype=torch.float64) for i in range(2)]
    h = capture_hessians(conv, batches, layers=[""])[""]
    problems = problems_from_layer(conv, h, GridSpec(bits=3), name="conv1")
    assert len(problems) == groups
    if groups > 1:
        assert [p.name for p in problems] == [f"conv1/group{j}" for j in range(groups)]
    choices = random_choices(problems, seed)
    costs = np.concatenate([p.energies(b) + p.const for p, b in zip(problems, choices)])
    w_hat = np.concatenate([p.dequantize(b) for p, b in zip(problems, choices)])
    dw = torch.as_tensor(w_hat).reshape(conv.weight.shape) - conv.weight.detach()
    y = torch.cat([F.conv2d(t, dw, None, conv.stride, conv.padding, conv.dilation, groups)
                   for t in batches])                     # the real conv on the calibration data
    direct = (y ** 2).mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(costs, direct, rtol=1e-8, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(2, 4), cin_g=st.integers(1, 2), out_g=st.integers(1, 3),
       per_channel=st.booleans(), damp=st.sampled_from([0.0, 0.1]),
       scales=st.sampled_from(["mse", "mse-output", "given"]), seed=st.integers(0, 2 ** 16))
def test_merged_groups_are_the_per_group_problems_in_one(groups, cin_g, out_g, per_channel,
                                                         damp, scales, seed):
    """merge_groups=True: one problem whose per-channel H is each channel's group's; its grid,
    RTN cost and cost of any choices equal the per-group problems' channel for channel."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(groups * cin_g, groups * out_g, 2, groups=groups).double()
    rng = np.random.default_rng(seed)
    n = cin_g * 4
    a = rng.normal(size=(groups * out_g if per_channel else groups, n, n + 2))
    h = a @ a.transpose(0, 2, 1)
    grid = (fit_grid(layer_weight(conv), GridSpec(bits=3)) if scales == "given"
            else GridSpec(bits=3, scale_method=scales))
    apart = problems_from_layer(conv, h, grid, name="c", damp=damp)
    [merged] = problems_from_layer(conv, h, grid, name="c", damp=damp, merge_groups=True)
    assert len(apart) == groups and merged.name == "c" and not merged.shared_hessian
    np.testing.assert_array_equal(merged.grid.scale, np.concatenate([p.grid.scale
                                                                      for p in apart]))
    choices = rng.random(merged.weight.shape) < 0.5
    out_rows = np.split(choices, groups)
    np.testing.assert_allclose(
        merged.energies(choices) + merged.const,
        np.concatenate([p.energies(b) + p.const for p, b in zip(apart, out_rows)]),
        rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.rtn_costs(), np.concatenate([p.rtn_costs() for p in apart]),
                               rtol=1e-10, atol=1e-12)


def test_merge_groups_auto_takes_small_groups_and_never_asymmetric_statistics():
    rng = np.random.default_rng(0)

    def stats(groups, n):
        a = rng.normal(size=(groups, n, n + 1))
        return a @ a.transpose(0, 2, 1)

    depthwise = nn.Conv2d(16, 16, 3, groups=16)
    assert len(problems_from_layer(depthwise, stats(16, 9), merge_groups="auto")) == 1
    assert len(problems_from_layer(depthwise, stats(16, 9))) == 16        # default: apart
    four, five = nn.Conv2d(4, 16, 1, groups=4), nn.Conv2d(4, 20, 1, groups=4)   # the bound: 4
    assert len(problems_from_layer(four, stats(4, 1), merge_groups="auto")) == 1
    assert len(problems_from_layer(five, stats(4, 1), merge_groups="auto")) == 4
    wide = nn.Conv2d(4, 36, 1, groups=2)                                  # 18 channels a group
    assert len(problems_from_layer(wide, stats(2, 2), merge_groups="auto")) == 2
    assert len(problems_from_layer(wide, stats(2, 2), merge_groups=True)) == 1
    h = stats(16, 9)
    assert len(problems_from_layer(depthwise, h, cross=h, merge_groups="auto")) == 16
    with pytest.raises(QroundError, match="cross=.* need a shared one"):
        problems_from_layer(depthwise, h, cross=h, merge_groups=True)
    with pytest.raises(QroundError, match="merge_groups must be True, False or 'auto'"):
        problems_from_layer(depthwise, h, merge_groups="yes")
    import qround.problems.layers as layers_module
    big = nn.Conv2d(8, 8, 3, groups=8)    # 8 x 9 x 9 x 8 bytes over a lowered bound: apart
    old = layers_module._MERGE_BYTES
    try:
        layers_module._MERGE_BYTES = 8 * 9 * 9 * 8 - 1
        assert len(problems_from_layer(big, stats(8, 9), merge_groups="auto")) == 8
    finally:
        layers_module._MERGE_BYTES = old


def test_grouped_conv_problems_split_weights_and_statistics():
    conv = nn.Conv2d(4, 6, 2, groups=2).double()
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 8, 8))
    h = a @ a.transpose(0, 2, 1)
    problems = problems_from_layer(conv, h, name="c")
    w = layer_weight(conv)
    for j, p in enumerate(problems):
        np.testing.assert_array_equal(p.weight, w[3 * j:3 * j + 3])
        np.testing.assert_allclose(p.hessian, h[j])
    # per-channel (Fisher) statistics: channel c's block goes to its group's problem
    f = rng.normal(size=(6, 8, 8))
    f = f @ f.transpose(0, 2, 1)
    problems = problems_from_layer(conv, f, name="c")
    np.testing.assert_allclose(problems[1].hessian, f[3:])
    # a Grid fitted on the whole layer is split by rows
    grid = fit_grid(w, GridSpec(bits=4, scale_method="minmax"))
    problems = problems_from_layer(conv, h, grid)
    np.testing.assert_allclose(problems[1].grid.scale, grid.scale[3:])
    with pytest.raises(QroundError, match=r"\(2, 8, 8\) or \(6, 8, 8\)"):
        problems_from_layer(conv, h[:1].repeat(3, axis=0))
    with pytest.raises(QroundError, match="cross"):
        problems_from_layer(conv, h, cross=f)


def test_linear_problem_accepts_per_channel_hessian_and_checks_shape():
    lin = nn.Linear(3, 2)
    f = np.stack([np.eye(3), 2 * np.eye(3)])
    [p] = problems_from_layer(lin, f)
    assert not p.shared_hessian
    with pytest.raises(QroundError, match="hessian shape"):
        problems_from_layer(lin, np.eye(4))
