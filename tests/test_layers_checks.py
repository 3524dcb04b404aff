"""Behaviours of qround.problems.layers that no other test pinned (found by mutation testing)."""
import numpy as np
import pytest
import torch
from torch import nn

from qround import GridSpec, QroundError, RoundingProblem, fit_grid
from qround.problems import layer_weight, problems_from_layer
from qround.problems.layers import (bias_not_writable, conv1d_refusals, forward_hooks,
                                    is_hf_conv1d, linear_from_conv1d, linearize_conv1d,
                                    restore_conv1d)

torch.set_num_threads(1)


def spd(n, seed):
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a @ a.T + n * np.eye(n)


# ------------------------------------------------------------------------ problems
def test_layer_weight_is_a_copy_of_a_float64_weight():
    lin = nn.Linear(3, 2).double()
    before = lin.weight.detach().clone()
    w = layer_weight(lin)
    w[:] = 7.0
    assert torch.equal(lin.weight.detach(), before)


def test_a_one_block_hessian_of_a_linear_is_its_shared_hessian():
    lin = nn.Linear(3, 2)
    h = spd(3, 0)
    [p] = problems_from_layer(lin, h[None])
    assert p.shared_hessian
    np.testing.assert_allclose(p.hessian, h)


def test_a_grid_fitted_for_other_input_widths_is_refused():
    lin = nn.Linear(4, 2)
    grid = fit_grid(np.ones((2, 3)), GridSpec(bits=4))
    with pytest.raises(QroundError, match="2 x 3 weights.* is 2 x 4"):
        problems_from_layer(lin, spd(4, 1), grid)


def test_damp_reaches_every_problem_of_the_layer():
    conv = nn.Conv2d(2, 2, 1, groups=2)
    h = np.stack([spd(1, 2), spd(1, 3)])
    damped = problems_from_layer(conv, h, damp=0.5)
    w = layer_weight(conv)
    for j, p in enumerate(damped):
        want = RoundingProblem.from_weight(w[j:j + 1], h[j], GridSpec(), damp=0.5)
        np.testing.assert_allclose(p.hessian, want.hessian)
        assert not np.allclose(p.hessian, h[j])


# ------------------------------------------------------------------------ writability, hooks
def test_a_bias_that_is_not_a_parameter_is_named():
    lin = nn.Linear(2, 2)
    del lin.bias
    lin.bias = torch.zeros(2)            # a plain tensor attribute, recomputed by its owner
    assert "not a parameter" in bias_not_writable(lin)
    assert bias_not_writable(nn.Linear(2, 2)) is None
    assert bias_not_writable(nn.Linear(2, 2, bias=False)) is None


def test_forward_hooks_names_backward_hooks_too():
    lin = nn.Linear(2, 2)
    assert forward_hooks(lin) == []
    lin.register_full_backward_hook(lambda *a: None)
    assert forward_hooks(lin) == ["backward hook"]
    lin.register_full_backward_pre_hook(lambda *a: None)
    assert forward_hooks(lin) == ["backward pre-hook", "backward hook"]


# ------------------------------------------------------------------------ transformers Conv1D
try:
    from transformers.pytorch_utils import Conv1D
except ImportError:   # the examples extra
    Conv1D = None
needs_transformers = pytest.mark.skipif(Conv1D is None, reason="needs transformers")


def conv(nf, nx, seed=0):
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.bias)
    return layer




@needs_transformers
def test_a_conv1d_without_a_matrix_weight_is_not_taken_for_one():
    c = conv(3, 4)
    c.weight = None
    assert not is_hf_conv1d(c)


@needs_transformers
def test_a_conv1d_tied_to_an_embedding_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 6)
            self.proj = conv(6, 6)
            self.proj.weight = self.emb.weight

    refused = conv1d_refusals(Tied())
    assert "'emb'" in refused["proj"] and "tied" in refused["proj"]


@needs_transformers
def test_linear_from_conv1d_copies_flags_parameters_and_hooks():
    c = conv(3, 4).eval()
    c.weight.requires_grad_(False)
    seen = []
    c.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    lin = linear_from_conv1d(c)
    assert not lin.weight.requires_grad and lin.bias.requires_grad
    assert not lin.training
    assert lin.bias is not c.bias and lin.weight.data_ptr() != c.weight.data_ptr()
    with torch.no_grad():
        lin.bias.add_(1.0)
    assert not torch.equal(lin.bias, c.bias)           # a fresh copy: the Conv1D is unchanged
    x = torch.randn(5, 4)
    torch.testing.assert_close(lin(x), c(x) + 1.0)
    assert seen == [(5, 3), (5, 3)]                    # the Conv1D's hook ran for the Linear
    shared = linear_from_conv1d(c, share=True)
    assert shared.bias is c.bias and shared.weight.data_ptr() == c.weight.data_ptr()


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = conv(4, 4, 1), conv(4, 4, 2), conv(4, 4, 3)
        self.c.weight = self.b.weight

    def forward(self, x):
        return self.c(self.b(self.a(x)))


@needs_transformers
def test_linearize_keeps_shared_weights_shared_and_replaces_only_the_named():
    model, replaced = linearize_conv1d(_Two())
    assert model.b.weight is model.c.weight and type(model.b) is nn.Linear
    model, replaced = linearize_conv1d(_Two(), names=["a"])
    assert list(replaced) == ["a"]
    assert type(model.a) is nn.Linear and isinstance(model.b, Conv1D) and isinstance(model.c,
                                                                                    Conv1D)


@needs_transformers
def test_restore_conv1d_writes_the_linear_weight_and_bias_back():
    model = nn.Sequential(conv(3, 4))
    model[0].bias = None
    original = model[0]
    model, replaced = linearize_conv1d(model)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    model[0].bias = nn.Parameter(torch.arange(3.0))     # bias correction added a bias
    want_w = model[0].weight.detach().t().clone()
    model = restore_conv1d(model, replaced)
    assert model[0] is original
    torch.testing.assert_close(original.weight.detach(), want_w)
    torch.testing.assert_close(original.bias.detach(), torch.arange(3.0))


@needs_transformers
def test_restore_conv1d_keeps_a_wrapper_that_subclasses_linear():
    class Wrapped(nn.Linear):
        pass

    model, replaced = linearize_conv1d(nn.Sequential(conv(3, 4)))
    wrapper = Wrapped(4, 3)
    model[0] = wrapper
    assert restore_conv1d(model, replaced)[0] is wrapper
