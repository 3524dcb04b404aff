"""More of what the user owns and passes (session 35): tests from helper-158's mutation review
of own_rng, run_forward, default_forward's kwargs, the batch checks and the spec parser."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from qround.calibrate import (_check_materialised, capture_asymmetric, capture_fisher,
                              capture_hessians, default_forward, own_rng)
from qround.errors import QroundError
from qround.evaluate import input_ranges, output_metrics
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig

from .test_user_owned_checks import FAST, NoBias, Noisy, gen, mlp, scheme_run
from .test_user_owned_checks import TokenModel as Scaled

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NumpyNoisy(Noisy):
    """Draws its noise from numpy's global generator."""

    def forward(self, x):
        noise = torch.from_numpy(np.random.standard_normal(tuple(x.shape)).astype(np.float32))
        return self.b(torch.relu(self.a(x + 0.1 * noise)))


def xs():
    return [torch.randn(8, 6, generator=gen(5)), torch.randn(8, 6, generator=gen(6))]


# ------------------------------------------------------------------ own_rng: numpy, seeds
def test_a_forward_drawing_from_numpy_follows_the_seed_not_the_callers_state():
    m = NumpyNoisy()
    np.random.seed(1)
    a = capture_hessians(m, xs())["a"]
    np.random.seed(2)
    b = capture_hessians(m, xs())["a"]
    np.testing.assert_array_equal(a, b)
    with own_rng(7, m):
        first = np.random.random()
    with own_rng(7, m):
        assert np.random.random() == first


def test_capture_asymmetric_and_fisher_draw_from_their_seed():
    m, q = Noisy(), Noisy(2)
    loss = lambda out, b: out.square().sum()  # noqa: E731
    a0 = capture_asymmetric(m, q, xs(), ["a"])["a"].cross
    a1 = capture_asymmetric(m, q, xs(), ["a"], seed=1)["a"].cross
    assert not np.array_equal(a0, a1)
    f0 = capture_fisher(m, xs(), loss, ["a"])["a"]
    f1 = capture_fisher(m, xs(), loss, ["a"], seed=1)["a"]
    assert not np.array_equal(f0, f1)
    for bad in (-1, 1.5, "0"):
        with pytest.raises(QroundError, match="seed"):
            capture_fisher(m, xs(), loss, ["a"], seed=bad)
        with pytest.raises(QroundError, match="seed"):
            capture_asymmetric(m, q, xs(), ["a"], seed=bad)
        with pytest.raises(QroundError, match="seed"):
            input_ranges(m, xs(), seed=bad)
        with pytest.raises(QroundError, match="seed"):
            output_metrics(m, q, xs(), seed=bad)


def test_input_ranges_and_output_metrics_follow_their_seed():
    m, q = Noisy(), Noisy(2)
    assert input_ranges(m, xs(), seed=0) == input_ranges(m, xs(), seed=0)
    assert input_ranges(m, xs(), seed=0) != input_ranges(m, xs(), seed=1)
    assert output_metrics(m, q, xs(), seed=0) != output_metrics(m, q, xs(), seed=1)


# ------------------------------------------------------------------ default_forward kwargs
class ScaledT(nn.Module):
    def forward(self, x, y=None, scale=1.0):
        return x * scale


@pytest.mark.parametrize("padded", [True, False])
def test_default_forward_passes_its_kwargs_for_dict_batches(padded):
    ids = torch.randint(0, 20, (2, 5), generator=gen(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    if padded:
        mask[:, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    m = Scaled()
    torch.testing.assert_close(default_forward(m, batch, scale=3.0),
                               3.0 * default_forward(m, batch))


def test_default_forward_passes_its_kwargs_for_tuple_and_tensor_batches():
    x = torch.randn(2, 3, generator=gen(2))
    torch.testing.assert_close(default_forward(ScaledT(), (x, x), scale=2.0), 2 * x)
    torch.testing.assert_close(default_forward(ScaledT(), x, scale=2.0), 2 * x)


# ------------------------------------------------------------------ batches
def test_a_non_iterable_collection_of_batches_is_named():
    f = mlp()
    for run in (lambda: output_metrics(f, f, 5), lambda: input_ranges(f, 5),
                lambda: capture_hessians(f, 5)):
        with pytest.raises(QroundError, match="iterable of batches .*got int"):
            run()


def test_input_ranges_names_a_model_that_is_not_a_module():
    with pytest.raises(QroundError, match="model must be a torch nn.Module, got str"):
        input_ranges("m", [torch.randn(3, 6)])


def test_a_tuple_of_numpy_arrays_is_named_as_such():
    f = mlp()
    with pytest.raises(QroundError, match="numpy arrays: make them torch tensors"):
        quantize_model(f, [(np.ones((4, 6), np.float32),)], QuantConfig(**FAST),
                       forward=lambda m, b: m(b[0]))


def test_an_in_place_change_nested_in_the_batch_is_named_with_its_path():
    def fwd(model, b):
        b[0][1].mul_(2)
        return model(b[0][0])

    with pytest.raises(QroundError, match=r"changed the first calibration batch\[0\]\[1\]"):
        quantize_model(mlp(), [((torch.randn(8, 6), torch.randn(8, 6)), 0)],
                       QuantConfig(**FAST), forward=fwd)


def test_a_layer_with_only_its_weight_on_the_meta_device_is_named():
    with torch.device("meta"):
        lin = nn.Linear(6, 6)
    lin.bias = nn.Parameter(torch.zeros(6))
    with pytest.raises(QroundError, match="meta device"):
        _check_materialised({"fc": lin}, ["fc"])


# ------------------------------------------------------------------ warnings
def test_bias_correction_on_a_plain_model_does_not_warn_about_transformers(caplog):
    with caplog.at_level(logging.WARNING, logger="qround.pipeline"):
        quantize_model(NoBias(), [torch.randn(8, 6, generator=gen(9))],
                       QuantConfig(**FAST, bias_correction=True))
    assert "without a bias" not in caplog.text


def test_a_constant_beta_is_not_called_rising(caplog):
    with caplog.at_level(logging.WARNING, logger="qround.reconstruct"):
        ReconstructConfig(beta=(5.0, 5.0))
    assert "rises" not in caplog.text


def test_an_override_of_a_tied_layer_the_forward_never_calls_says_why_it_stays_in_float():
    """The layers are chosen again when a tied weight went to an uncalled layer; the override
    check after that names the layer left in float too."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.fc2.weight = self.fc1.weight

        def forward(self, x):
            return self.out(torch.relu(self.fc2(x)))

    with pytest.raises(QroundError, match=r"it matches 'fc1', which stays in float: shares"):
        quantize_model(Tied(), [torch.randn(8, 6, generator=gen(1))],
                       QuantConfig(**FAST, overrides={"fc1": {"wbits": 4}}))


def test_a_scheme_unit_whose_quantised_layer_is_not_its_first_module_is_accepted():
    _, qm = scheme_run(["0", "1+2+3+4", "6"], iterations=2)
    assert [u.modules for u in qm.units.units] == [("0",), ("1", "2", "3", "4"), ("6",)]


def test_many_groups_one_after_another_are_not_counted_as_nesting():
    from qround.solvers.registry import normalize_spec

    spec = "+".join(["(tabu|gptq)"] * 40)
    assert normalize_spec(spec) == spec
