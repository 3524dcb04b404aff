"""Cases of qround.evaluate the first tests left open (found by mutation testing, helper-121)."""
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from qround.errors import QroundError
from qround.evaluate import (activation_grid, digits_accuracy, embedding_metrics,
                             fake_quantized_inputs, input_ranges)

torch.set_num_threads(1)


def test_fewer_than_three_embeddings_are_refused_even_with_k_1():
    x = np.random.default_rng(0).normal(size=(3, 4))
    embedding_metrics(x, x, k=1)                     # 3 rows, k=1: fine
    with pytest.raises(QroundError, match="at least"):
        embedding_metrics(x[:2], x[:2], k=1)


@pytest.mark.parametrize("k", [True, 2.0, "3", np.float64(2)])
def test_k_must_be_a_positive_integer(k):
    x = np.random.default_rng(0).normal(size=(12, 4))
    with pytest.raises(QroundError, match="k must be a positive integer"):
        embedding_metrics(x, x, k=k)


def test_a_constant_similarity_matrix_counts_as_no_agreement():
    rng = np.random.default_rng(0)
    ref = np.zeros((12, 5))
    ref[:, 0] = 2.0                  # every sentence the same direction: all similarities 1
    other = rng.normal(size=(12, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # handled here: no scipy ConstantInputWarning either
        assert embedding_metrics(ref, other)["spearman"] == 0.0
        assert embedding_metrics(other, ref)["spearman"] == 0.0


def test_activation_grid_of_a_positive_range_starts_at_zero():
    scale, zero, qmax = activation_grid(1.0, 2.55, 8)
    assert (zero, qmax) == (0, 255) and scale == pytest.approx(0.01)
    scale, zero, qmax = activation_grid(-3.0, -1.0, 2)   # all negative: [lo, 0]
    assert (zero, qmax) == (3, 3) and scale == pytest.approx(1.0)


def test_fake_quantised_inputs_clip_to_the_calibrated_range():
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ranges = {"": (-1.0, 2.0)}                        # 2 bits: scale 1, zero 1, codes 0..3
    x = torch.tensor([[-5.0], [-1.0], [0.4], [2.0], [9.0]])
    with fake_quantized_inputs(lin, ranges, bits=2):
        y = lin(x)
    torch.testing.assert_close(y, torch.tensor([[-1.0], [-1.0], [0.0], [2.0], [2.0]]))


def test_input_ranges_name_no_batches_and_layers_without_input():
    net = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(QroundError, match="yielded no batch"):
        input_ranges(net, [])

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(QroundError, match="saw no input"):
        input_ranges(Skips(), [torch.ones(2, 3)])


def test_input_ranges_run_in_eval_mode_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.9), nn.Linear(4, 2))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(16, 4)
    first = input_ranges(net, [x])
    assert first == input_ranges(net, [x])            # dropout off: the same ranges
    with torch.no_grad():
        h = net[1].eval()(net[0](x))                   # eval-mode BN, no dropout
    net.train()
    assert first["3"] == pytest.approx((float(h.min()), float(h.max())))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and all(m.training for m in net.modules())


def _tiny_digits(n_calib=11, n_test=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    calib = torch.rand(n_calib, 1, 4, 4, generator=gen)           # in [0, 1]
    test = 16 * torch.rand(n_test, 1, 4, 4, generator=gen)        # in [0, 16]
    return model, calib, test


def test_digits_accuracy_calibrates_on_the_calibration_images_all_of_them():
    model, calib, test = _tiny_digits()
    calib[-1] = 3.0     # the 11th image (alone in the last batch of 10) widens the range
    ranges = input_ranges(model, [calib])
    assert ranges["1"] == (0.0, 3.0) or ranges["1"][1] == 3.0
    with torch.no_grad(), fake_quantized_inputs(model, ranges, 4):
        labels = model(test).argmax(1)
    # labels are what the model predicts with ranges from every calibration image
    data = SimpleNamespace(calib_images=calib, test_images=test, test_labels=labels)
    assert digits_accuracy(model, data, abits=4, batch_size=10) == 1.0
    # without fake quantisation the predictions differ: the check has teeth
    assert digits_accuracy(model, data) < 1.0


@pytest.mark.parametrize("batch_size", [0, -5, 2.5])
@pytest.mark.parametrize("abits", [None, 8])
def test_digits_accuracy_checks_batch_size_before_cutting_the_calibration(abits, batch_size):
    # with abits, the calibration was cut first: range() raised a ValueError for 0, -5 gave
    # "yielded no batch: need calibration data", 2.5 a TypeError
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    d = SimpleNamespace(calib_images=torch.rand(8, 1, 4, 4), test_images=torch.rand(8, 1, 4, 4),
                        test_labels=torch.zeros(8, dtype=torch.long))
    with pytest.raises(QroundError, match="batch_size must be an integer >= 1"):
        digits_accuracy(m, d, abits=abits, batch_size=batch_size)

