"""Behaviours of qround.calibrate that no other test pinned (found by mutation testing)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qround import QroundError
from qround.calibrate import (capture_asymmetric, capture_fisher, capture_hessians,
                              default_forward, kept_buffers, select_layers, token_mask)

torch.set_num_threads(1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def conv_output_energy(conv, batches, dw):
    """E over samples and positions of (dW x)^2 per output channel, from the real conv."""
    ys = [F.conv2d(b, dw, None, conv.stride, conv.padding, conv.dilation, conv.groups)
          for b in batches]
    return torch.cat([(y ** 2).permute(1, 0, 2, 3).reshape(y.shape[1], -1) for y in ys],
                     dim=1).mean(dim=1).numpy()


def quadratic(h, dw):
    """diag(dW H dW^T) for a single-group conv's H."""
    d = dw.reshape(dw.shape[0], -1).numpy()
    return np.einsum("oi,ij,oj->o", d, h, d)


# ------------------------------------------------------------------------ token mask
def test_flattened_token_rows_are_masked():
    """A Linear fed (B * T, in), the tokens flattened in order (OPT's MLP), counts only the
    rows the (B, T) mask keeps, as a (B, T, in) input does."""
    lin = nn.Linear(5, 3)
    x = torch.randn(2, 4, 5, generator=gen(0))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)

    def forward(model, batch):
        with token_mask(mask):
            return model(batch.reshape(-1, 5))

    h = capture_hessians(lin, [x], forward=forward)[""]
    rows = x[mask].double()
    np.testing.assert_allclose(h, (rows.T @ rows / 5).numpy(), rtol=1e-12)


def test_fisher_counts_only_the_real_tokens_of_a_masked_batch():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(2, 4, 5, generator=gen(1), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    loss_fn = lambda out, batch: (out ** 2).sum() + out.sum()  # noqa: E731

    def forward(model, batch):
        with token_mask(mask):
            return model(batch)

    fisher = capture_fisher(lin, [x], loss_fn, None, forward=forward)[""]
    z = lin(x).detach().requires_grad_()
    g, = torch.autograd.grad(loss_fn(z, x), z)
    xr, gr = x[mask], g[mask]
    want = torch.einsum("rc,ri,rj->cij", gr ** 2, xr, xr) / len(xr)
    np.testing.assert_allclose(fisher, want.numpy(), rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------ modes and buffers
def test_a_model_in_eval_mode_stays_in_eval_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).eval()
    capture_hessians(model, [torch.randn(2, 3, generator=gen(0))])
    assert not any(m.training for m in model.modules())


class _Cache(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.extra = None          # a plain attribute a forward may turn into a parameter
        self.length = 3            # a plain counter a lazy cache keeps in step with a buffer
        self.register_buffer("seen", torch.zeros(2))


def test_kept_buffers_gives_plain_attributes_back_and_keeps_new_parameters():
    m = _Cache()
    with kept_buffers(m):
        m.length = 10
        m.extra = nn.Parameter(torch.ones(2))   # leaves __dict__ for _parameters
        m.seen += 1
    assert m.length == 3
    assert isinstance(m.extra, nn.Parameter) and torch.equal(m.extra, torch.ones(2))
    assert torch.equal(m.seen, torch.zeros(2))


def test_kept_buffers_leaves_the_skipped_types_alone():
    m = nn.Sequential(nn.BatchNorm1d(2), _Cache())
    with kept_buffers(m, skip=(nn.BatchNorm1d,)):
        m[0].running_mean += 2.0
        m[1].seen += 1
    assert torch.equal(m[0].running_mean, torch.full((2,), 2.0))   # skipped: kept
    assert torch.equal(m[1].seen, torch.zeros(2))                   # restored


# ------------------------------------------------------------------------ inputs
def test_an_empty_list_of_layers_is_refused():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(QroundError, match="empty list"):
        select_layers(model, [])
    with pytest.raises(QroundError, match="empty list"):
        capture_hessians(model, [torch.randn(2, 3)], layers=[])


def test_select_layers_can_leave_transformers_conv1d_out():
    transformers = pytest.importorskip("transformers")
    model = nn.Sequential(transformers.pytorch_utils.Conv1D(4, 3), nn.Linear(4, 2))
    assert list(select_layers(model)) == ["0", "1"]
    assert list(select_layers(model, conv1d=False)) == ["1"]
    with pytest.raises(QroundError, match="'0' is a Conv1D"):
        select_layers(model, ["0"], conv1d=False)


def test_a_tuple_batch_the_model_refuses_names_the_fix():
    model = nn.Linear(3, 2)
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(QroundError, match=r"forward=lambda model, batch: model\(batch\[0\]\)"):
        capture_hessians(model, [(x, y)])

    def bad(a):
        raise TypeError("something else")

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, a, b):
            return bad(a)

    with pytest.raises(TypeError, match="something else"):   # other TypeErrors pass unchanged
        default_forward(Other(), (x, x))


def test_a_numpy_array_is_not_taken_for_a_list_of_batches():
    with pytest.raises(QroundError, match="iterable of batches"):
        capture_hessians(nn.Linear(3, 2), np.zeros((4, 3), dtype=np.float32))


# ------------------------------------------------------------------------ conv patches
@pytest.mark.parametrize("padding", [(1, 2), (0, 2), "valid"])
def test_conv_hessian_gives_the_real_output_error_for_uneven_and_valid_padding(padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 2), padding=padding).double()
    batches = [torch.randn(2, 2, 5, 6, generator=gen(i), dtype=torch.float64) for i in range(2)]
    h = capture_hessians(conv, batches)[""]
    dw = torch.randn(conv.weight.shape, generator=gen(9), dtype=torch.float64)
    np.testing.assert_allclose(quadratic(h, dw), conv_output_energy(conv, batches, dw),
                               rtol=1e-10)


def test_fisher_of_an_unbatched_conv_input_equals_the_batched_one():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 2, padding=1), nn.Tanh()).double()
    x = torch.randn(2, 4, 5, generator=gen(3), dtype=torch.float64)
    loss_fn = lambda out, batch: (out ** 2).sum()  # noqa: E731
    unbatched = capture_fisher(model, [x], loss_fn, None)["0"]
    batched = capture_fisher(model, [x[None]], loss_fn, None)["0"]
    assert unbatched.shape == (3, 8, 8)
    np.testing.assert_allclose(unbatched, batched, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------ asymmetric
class _Twice(nn.Module):
    """fc is called twice per forward, on a(x) and then on 2x; ``calls`` and ``drop`` make
    the quantised copy call it another number of times or with fewer rows."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Linear(4, 4), nn.Linear(4, 3)
        self.calls, self.drop = 2, 0

    def forward(self, x):
        out = self.fc(self.a(x))
        for _ in range(self.calls - 1):
            out = out + self.fc(2 * x[self.drop:]).sum(0)
        return out


def test_asymmetric_pairs_the_calls_of_a_layer_in_order():
    torch.manual_seed(0)
    model = _Twice().double()
    quant = copy.deepcopy(model)
    with torch.no_grad():
        quant.a.weight.copy_(torch.round(quant.a.weight * 4) / 4)
    batches = [torch.randn(5, 4, generator=gen(i), dtype=torch.float64) for i in range(2)]
    s = capture_asymmetric(model, quant, batches, ["fc"])["fc"]
    with torch.no_grad():
        x = torch.cat([torch.cat([model.a(b), 2 * b]) for b in batches])
        xh = torch.cat([torch.cat([quant.a(b), 2 * b]) for b in batches])
    np.testing.assert_allclose(s.cross, (xh.T @ x / len(x)).numpy(), rtol=1e-10)
    np.testing.assert_allclose(s.hessian_hat, (xh.T @ xh / len(x)).numpy(), rtol=1e-10)


def test_asymmetric_refuses_models_whose_layers_run_differently():
    model = _Twice()
    data = [torch.randn(5, 4, generator=gen(0))]
    more = copy.deepcopy(model)
    more.calls = 3
    with pytest.raises(QroundError, match="'fc' ran more often in quant_model"):
        capture_asymmetric(model, more, data, ["fc"])
    fewer = copy.deepcopy(model)
    fewer.calls = 1
    with pytest.raises(QroundError, match=r"\['fc'\] ran more often in float_model"):
        capture_asymmetric(model, fewer, data, ["fc"])
    short = copy.deepcopy(model)
    short.drop = 1
    with pytest.raises(QroundError, match=r"'fc'.*\(5, 4\).*\(4, 4\) differ in shape"):
        capture_asymmetric(model, short, data, ["fc"])


def test_asymmetric_refuses_a_conv_with_another_padding_mode():
    float_model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    quant = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(QroundError, match="'0' of quant_model does not match"):
        capture_asymmetric(float_model, quant, [torch.randn(1, 1, 4, 4)], None)


# ------------------------------------------------------------------------ Fisher
class _Experts(nn.Module):
    """Rows with a positive first feature go to e1, the others to e2 (none in the data)."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        pick = x[:, 0] > 0
        return self.e1(x[pick]).sum() + self.e2(x[~pick]).sum()


def test_fisher_of_an_expert_no_token_reached_is_none():
    x = torch.rand(4, 3, generator=gen(0)) + 0.1      # every row goes to e1
    blocks = capture_fisher(_Experts(), [x, x[:0]], lambda out, b: out ** 2, None)
    assert blocks["e2"] is None
    assert blocks["e1"].shape == (2, 3, 3) and np.all(np.isfinite(blocks["e1"]))
    # g = 2 * out for every row of e1, out = sum of e1's outputs of that batch
    model = _Experts()
    blocks = capture_fisher(model, [x], lambda out, b: out ** 2, None)
    with torch.no_grad():
        g = 2 * model.e1(x).sum()
    want = (g ** 2 * x.double().T @ x.double() / len(x)).numpy()
    np.testing.assert_allclose(blocks["e1"][0], want, rtol=1e-5)


def test_fisher_refuses_a_non_finite_gradient_and_a_loss_without_the_weights():
    model = nn.Sequential(nn.Linear(3, 2))
    x = [torch.randn(4, 3, generator=gen(0))]
    # sqrt at 0: the loss is 0, its gradient at the output inf
    with pytest.raises(QroundError, match="'0': non-finite gradient"):
        capture_fisher(model, x, lambda out, b: torch.sqrt(out - out.detach()).sum(), None)
    with pytest.raises(QroundError, match="does not depend on the chosen layers"):
        capture_fisher(model, x, lambda out, b: out.detach().sum(), None)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
