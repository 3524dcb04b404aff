"""Behaviours of qround.activations that no other test protected (mutation testing, helper 125):
argument checks, the LSQ step's clamp and gradient scale, empty Linear batches, weight rounding
ties and clipping, harden, the wrapper's training mode and frozen layer, and the calibration of
insert_act_quantizers (true min/max kept, init honoured, eval mode, re-wrapping)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qround import GridSpec, QroundError, fit_grid
from qround.activations import (ActQuantizer, QuantizedLayer, insert_act_quantizers,
                                quantized_layers)

torch.set_num_threads(1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def quantizer(bits=4, borders="linear", elements=6, fusion_size=1, step=0.25):
    q = ActQuantizer(bits, borders, elements, fusion_size)
    q.calibrate(torch.tensor([0.0, 3.0]), "minmax")
    with torch.no_grad():
        q.step.fill_(step)
    return q


# ------------------------------------------------------------------------ argument checks
@pytest.mark.parametrize("kwargs, match", [
    (dict(borders="linear", elements=0), "elements"),
    (dict(borders="quadratic", elements=-3), "elements"),
    (dict(borders="linear", elements=6, fusion_size=0), "fusion_size"),
    (dict(borders="linear", elements=6, fusion_size=4), "fusion_size"),   # 4 does not divide 6
])
def test_act_quantizer_refuses_bad_sizes(kwargs, match):
    with pytest.raises(QroundError, match=match):
        ActQuantizer(4, **kwargs)


def test_borders_need_a_quantised_input_on_a_single_layer():
    with pytest.raises(QroundError, match="no quantised input"):
        QuantizedLayer(nn.Linear(4, 2), abits=None, borders="linear")


@pytest.mark.parametrize("shape", [(2, 4), (3, 1)])
def test_codes_refuse_an_input_of_another_length_than_the_borders(shape):
    q = quantizer(elements=6)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(QroundError, match="6"):
            q.codes(torch.rand(shape))


def test_patch_border_refuses_a_kernel_of_another_size_than_the_fusion():
    q = quantizer(elements=12, fusion_size=6)
    vp = torch.rand(1, 3, 5, 5)
    with pytest.raises(QroundError, match="patch_border"):
        q.patch_border(vp, (2, 2), (1, 1), (1, 1))    # 3 * 2 * 2 == 12, but 4 != 6


# ------------------------------------------------------------------------ step
def test_calibration_step_is_the_minmax_step_of_the_grid_kind():
    q = ActQuantizer(4)
    q.calibrate(torch.tensor([0.0, 1.0, 3.0]), "minmax")        # unsigned [0, 15]
    assert (q.qmin, q.qmax) == (0, 15)
    assert float(q.step.detach()) == pytest.approx(3.0 / 15)
    q.calibrate(torch.tensor([-1.0, 3.0]), "minmax")            # signed [-8, 7]
    assert (q.qmin, q.qmax) == (-8, 7)
    assert float(q.step.detach()) == pytest.approx(3.0 / 7)


@pytest.mark.parametrize("step", [0.0, -0.5])
def test_a_non_positive_step_is_clamped_in_the_forward(step):
    q = quantizer(borders="none", step=step)
    assert float(q.scale(6).detach()) == pytest.approx(1e-12)
    x = torch.tensor([[0.0, 0.5, 1.0, 2.0, 3.0, 0.0]])
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out = q(x)
        assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 15e-12).all()


@pytest.mark.parametrize("borders", ["none", "linear"])
def test_linear_layer_takes_an_empty_batch(borders):
    layer = QuantizedLayer(nn.Linear(6, 3), abits=4, borders=borders)
    layer.act.calibrate(torch.rand(10, 6), "minmax")
    x = torch.zeros(0, 6)
    assert layer(x).shape == (0, 3)
    with torch.no_grad():
        assert layer(x).shape == (0, 3)


def test_linear_step_gradient_scale_counts_all_elements_of_a_sample():
    """LSQ's g = 1/sqrt(N_F qmax), N_F the input elements of one sample: 2 * 4 for (5, 2, 4)."""
    layer = QuantizedLayer(nn.Linear(4, 3), abits=3)
    x = torch.rand(5, 2, 4, generator=gen(1)) * 3
    layer.act.calibrate(x, "minmax")
    layer(x).sum().backward()
    got = layer.act.step.grad.clone()
    layer.act.step.grad = None
    ref = F.linear(layer.act(x, features=8), layer.layer.weight, layer.layer.bias)
    ref.sum().backward()
    assert float(got) == pytest.approx(float(layer.act.step.grad), rel=1e-5)
    assert float(got) != 0


# ------------------------------------------------------------------------ weights
def test_weight_ties_round_up_as_the_grid_does():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.75, 0.125]]))          # scale 0.25: 0.125 is a tie
    spec = GridSpec(bits=3, symmetric=True, scale_method="minmax")
    layer = QuantizedLayer(lin, abits=None, weight=spec)
    assert float(layer.w_scale[0, 0]) == 0.25
    assert layer.w_codes.tolist() == [[3, 1]]
    grid = fit_grid(lin.weight.detach().double().numpy(), spec)
    assert np.array_equal(layer.w_codes.numpy(), grid.quantize(lin.weight.detach().double()
                                                               .numpy()))


def test_clipped_weights_start_on_the_grid():
    lin = nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 64, generator=gen(2)))
        lin.weight[:, 0] = 3.0                                   # outliers: mse clips them
    spec = GridSpec(bits=2, symmetric=False, scale_method="mse")
    layer = QuantizedLayer(copy.deepcopy(lin), abits=None, weight=spec)
    w = lin.weight.detach().double().numpy()
    grid = fit_grid(w, spec)
    scale, zero = grid.expand()
    unclipped = np.floor(w / scale + 0.5) + zero
    assert (unclipped > grid.qmax).any() and (unclipped < grid.qmin).any()
    codes = layer.w_codes.numpy()
    assert codes.min() >= 0 and codes.max() <= 3
    assert np.array_equal(codes, grid.quantize(w))


def test_harden_rounds_an_undecided_weight_up():
    layer = QuantizedLayer(nn.Linear(5, 2), abits=None,
                           weight=GridSpec(bits=4, symmetric=True, scale_method="minmax"))
    with torch.no_grad():
        layer.w_round.zero_()                                    # h(V) = 0.5 exactly
    assert bool((layer.soft_weight_fraction() == 0.5).all())
    layer.harden()
    assert torch.equal(layer.w_codes, (layer.w_floor + 1).clamp(-8, 7).int())


def test_harden_on_a_float_weight_does_nothing():
    lin = nn.Linear(4, 2)
    layer = QuantizedLayer(copy.deepcopy(lin), abits=None)
    layer.harden()
    assert layer.weight_mode == "float"
    x = torch.rand(3, 4, generator=gen(3))
    assert torch.equal(layer(x), lin(x))


# ------------------------------------------------------------------------ wrapper state
def test_the_wrapper_follows_the_layers_mode_and_freezes_it():
    conv = nn.Conv2d(3, 4, 3).eval()
    layer = QuantizedLayer(conv, abits=4, borders="linear", weight=GridSpec(bits=4))
    assert not layer.training and not layer.act.training
    assert not any(p.requires_grad for p in conv.parameters())
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"act.step", "act.b0", "act.b1", "w_round"}
    assert QuantizedLayer(nn.Linear(2, 2).train(), abits=4).training


def test_nearest_conv_has_no_fusion():
    layer = QuantizedLayer(nn.Conv2d(3, 4, 3), abits=4, borders="none", fusion=True)
    assert layer.act.fusion_size == 1 and layer.act_mode == "nearest"


# ------------------------------------------------------------------------ insertion
def test_calibration_keeps_the_true_minimum_and_maximum_beyond_the_subsample():
    x = torch.rand(64, 4, generator=gen(4)) + 0.5
    x.view(-1)[1] = -0.25           # odd positions leave the subsample of max_samples=16
    x.view(-1)[3] = 6.0
    q = insert_act_quantizers(nn.Linear(4, 2), None, 4, init="minmax", calib_batches=[x],
                              max_samples=16)
    assert bool(q.act.signed)
    assert float(q.act.step.detach()) == pytest.approx(6.0 / 7)


@pytest.mark.parametrize("bad", [8, 15, 16.0, None])
def test_max_samples_is_checked(bad):
    with pytest.raises(QroundError, match="max_samples"):
        insert_act_quantizers(nn.Linear(4, 2), None, 4, calib_batches=[torch.rand(2, 4)],
                              max_samples=bad)


def test_init_chooses_the_initial_step():
    x = torch.rand(256, 4, generator=gen(5)) * 3
    x[0, 0] = 12.0                                   # an outlier: mse shrinks the range
    steps = {init: float(insert_act_quantizers(nn.Linear(4, 2), None, 4, init=init,
                                               calib_batches=[x]).act.step.detach())
             for init in ("minmax", "mse")}
    assert steps["minmax"] == pytest.approx(12.0 / 15)
    assert steps["mse"] < 0.9 * steps["minmax"]


def test_calibration_runs_the_model_in_eval_mode_and_restores_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2)).train()
    x = torch.rand(64, 4, generator=gen(6)) * 3
    q = insert_act_quantizers(model, ["1"], 4, init="minmax", calib_batches=[x])
    # no dropout scaling
    assert float(q[1].act.step.detach()) == pytest.approx(float(x.max()) / 15)
    assert model.training and model[0].training


def test_a_quantised_model_is_not_wrapped_twice():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.rand(8, 4, generator=gen(7))]
    q = insert_act_quantizers(model, ["0"], 4, calib_batches=batches)
    q2 = insert_act_quantizers(q, None, 4, calib_batches=batches)
    assert list(quantized_layers(q2)) == ["0", "2"]
    assert isinstance(q2[0].layer, nn.Linear)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("borders", ["none", "linear"])
def test_a_half_precision_input_is_rounded_in_float32(dtype, borders):
    q = quantizer(borders=borders, elements=64, step=0.0371)
    x = (torch.rand(50, 64, generator=gen(8)) * 0.6).to(dtype)
    ref = q(x.float()).to(dtype)                   # the same values, rounded in float32
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out = q(x)
        assert out.dtype == dtype
        assert torch.equal(out, ref)


@pytest.mark.parametrize("batch", [torch.rand(8, 4), np.random.default_rng(0).random((8, 4))])
def test_a_single_tensor_is_not_taken_for_a_list_of_batches(batch):
    with pytest.raises(QroundError, match="wrap a single"):
        insert_act_quantizers(nn.Linear(4, 2), None, 4, calib_batches=batch)


def test_an_unbatched_linear_input_has_the_step_gradient_of_a_batch_of_one():
    layer = QuantizedLayer(nn.Linear(4, 3), abits=3)
    x = torch.rand(4, generator=gen(9)) * 3
    layer.act.calibrate(x, "minmax")
    layer(x).sum().backward()
    single = layer.act.step.grad.clone()
    layer.act.step.grad = None
    layer(x[None]).sum().backward()
    assert float(single) == pytest.approx(float(layer.act.step.grad), rel=1e-6)


def test_a_0d_tensor_is_refused_with_a_clear_error():
    q = ActQuantizer(4)
    q.calibrate(torch.tensor([0.0, 3.0]), "minmax")
    with pytest.raises(QroundError, match="0-d tensor"):
        q(torch.tensor(1.3))
