"""What the user owns and what they pass, in the free functions that run a model and at the
edges of quantize_model (helper-156 and helper-157, session 35): batches checked as
quantize_model checks them, forwards that change their batch in place refused, random draws
and buffers kept, meta weights, NaN biases, padding under a forward of the user's own."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from qround import export
from qround.calibrate import (capture_asymmetric, capture_fisher, capture_hessians,
                              default_forward)
from qround.errors import QroundError
from qround.evaluate import input_ranges, output_metrics
from qround.files import atomic_write
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = dict(wbits=3, solver="greedy", progress=False)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


class Noisy(nn.Module):
    """A forward that draws from the global generator and counts its calls in a buffer."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.b(torch.relu(self.a(x + 0.1 * torch.randn_like(x))))


# ------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("bad", [torch.randn(10, 6), np.ones((10, 6), np.float32),
                                 {"x": torch.randn(10, 6)}, "batches"])
def test_the_metrics_refuse_one_batch_as_the_collection(bad):
    """A bare tensor used to be read as 10 batches of one row each (40 'samples')."""
    f = mlp()
    with pytest.raises(QroundError, match="wrap a single batch in a list"):
        output_metrics(f, f, bad)
    with pytest.raises(QroundError, match="wrap a single batch in a list"):
        input_ranges(f, bad)
    with pytest.raises(QroundError, match="wrap a single batch in a list"):
        capture_hessians(f, bad)


def test_the_metrics_name_models_that_are_not_modules_and_failing_forwards():
    f = mlp()
    with pytest.raises(QroundError, match="float_model must be a torch nn.Module, got str"):
        output_metrics("f", f, [torch.randn(3, 6)])
    with pytest.raises(QroundError, match="quant_model must be a torch nn.Module"):
        output_metrics(f, None, [torch.randn(3, 6)])
    with pytest.raises(QroundError, match="the float model's forward failed on the first "
                                          r"calibration batch \(RuntimeError"):
        output_metrics(f, f, [torch.randn(3, 5)])
    with pytest.raises(QroundError, match="calibration batch 1 .*RuntimeError"):
        input_ranges(f, [torch.randn(3, 6), torch.randn(3, 5)])
    with pytest.raises(QroundError, match="0-d tensor"):
        output_metrics(f, f, [torch.randn(3, 6)], forward=lambda m, b: m(b).sum())


def test_a_numpy_batch_is_named_as_such():
    f = mlp()
    with pytest.raises(QroundError, match="numpy arrays: make them torch tensors"):
        quantize_model(f, [np.ones((4, 6), np.float32)], QuantConfig(**FAST))


def test_output_metrics_on_one_model_against_itself_are_exact_under_random_draws():
    """Both forwards of a batch draw the same numbers, so a model that samples compares equal
    to itself."""
    m = Noisy()
    out = output_metrics(m, m, [torch.randn(5, 6, generator=gen(0))])
    assert out["relative_error"] == 0.0 and out["cosine"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ in place
class Centring(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        x.sub_(0.5)    # changes the caller's batch
        return self.b(torch.relu(self.a(x)))


def test_a_forward_that_changes_its_batch_in_place_is_refused_at_the_first_batch():
    """It used to run on data shifted once per pass (-2.0 after four passes, not -0.5), with
    only a warning about a shuffling DataLoader."""
    x = torch.randn(8, 6, generator=gen(3))
    batch = x.clone()
    with pytest.raises(QroundError, match=r"changed the first calibration batch in place.*"
                                          r"x = x - mean"):
        quantize_model(Centring(), [batch], QuantConfig(**FAST))

    def fwd(model, b):
        b["x"].mul_(2)
        return model(b["x"])

    with pytest.raises(QroundError, match=r"changed the first calibration batch\['x'\]"):
        quantize_model(mlp(), [{"x": torch.randn(8, 6)}], QuantConfig(**FAST), forward=fwd)
    with pytest.raises(QroundError, match="changed the first calibration batch in place"):
        output_metrics(Centring(), Centring(), [torch.randn(8, 6)])


def test_an_out_of_place_forward_is_not_refused():
    class OutOfPlace(Centring):
        def forward(self, x):
            x = x - 0.5
            return self.b(torch.relu(self.a(x)))

    qm = quantize_model(OutOfPlace(), [torch.randn(8, 6, generator=gen(4))],
                        QuantConfig(**FAST))
    assert set(qm.layers) == {"a", "b"}


# ------------------------------------------------------------------------------ RNG, buffers
def _state():
    import random

    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_state(a, b) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_the_capture_functions_keep_the_callers_generators_and_the_models_buffers():
    """capture_hessians advanced the global generators and left the buffers written; it now
    draws from its seed, as quantize_model does."""
    m, q = Noisy(), Noisy()
    xs = [torch.randn(8, 6, generator=gen(5)), torch.randn(8, 6, generator=gen(6))]
    torch.manual_seed(123)
    before = _state()
    h = capture_hessians(m, xs)
    asym = capture_asymmetric(m, q, xs, ["a"])
    fisher = capture_fisher(m, xs, lambda out, b: out.square().sum(), ["a"])
    ranges = input_ranges(m, xs)
    output_metrics(m, q, xs)
    assert _same_state(before, _state())
    assert float(m.calls) == 0 and float(q.calls) == 0
    # the seed decides the draws: the same seed repeats, another one differs
    np.testing.assert_array_equal(capture_hessians(m, xs)["a"], h["a"])
    assert not np.array_equal(capture_hessians(m, xs, seed=1)["a"], h["a"])
    np.testing.assert_array_equal(capture_asymmetric(m, q, xs, ["a"])["a"].cross,
                                  asym["a"].cross)
    np.testing.assert_array_equal(
        capture_fisher(m, xs, lambda out, b: out.square().sum(), ["a"])["a"], fisher["a"])
    assert input_ranges(m, xs) == ranges
    with pytest.raises(QroundError, match="seed"):
        capture_hessians(m, xs, seed=-1)


# ------------------------------------------------------------------------------ the model
def test_a_model_on_the_meta_device_is_named_before_any_work():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    for run in (lambda: quantize_model(m, [torch.randn(8, 6)], QuantConfig(**FAST)),
                lambda: capture_hessians(m, [torch.randn(8, 6)]),
                lambda: capture_hessians(m, [torch.randn(8, 6)], layers=["2"])):
        with pytest.raises(QroundError, match="meta device .*load the weights first"):
            run()


def test_a_nan_bias_is_named_with_its_layer_before_any_solve():
    """It used to surface as non-finite inputs of the next layer."""
    m = mlp()
    with torch.no_grad():
        m[0].bias[1] = float("nan")
    with pytest.raises(QroundError, match=r"layer '0': its bias contains 1 NaN/Inf"):
        quantize_model(m, [torch.randn(8, 6)], QuantConfig(**FAST))
    m = mlp()
    with torch.no_grad():
        m[2].weight[0, 0] = float("inf")
    with pytest.raises(QroundError, match=r"layer '2': its weight contains 1 NaN/Inf"):
        quantize_model(m, [torch.randn(8, 6)], QuantConfig(**FAST))


def test_a_model_with_only_explicit_form_layers_is_pointed_to_explicit_layers():
    m = nn.Sequential(nn.ConvTranspose2d(2, 2, 3))
    with pytest.raises(QroundError, match=r"'0' \(ConvTranspose2d\) .*"
                                          r"qround.explicit.explicit_layers\(model\)"):
        quantize_model(m, [torch.randn(2, 2, 5, 5)], QuantConfig(**FAST))


# ------------------------------------------------------------------------------ saving
def test_saving_wants_the_quantized_model_and_a_file_name(tmp_path):
    f = mlp()
    with pytest.raises(QroundError, match="expected a QuantizedModel .*not its .model"):
        export.save(f, tmp_path / "m.safetensors")
    qm = quantize_model(f, [torch.randn(8, 6)], QuantConfig(**FAST))
    with pytest.raises(QroundError, match="is a directory; give a file name"):
        qm.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []    # no temp file left behind
    with pytest.raises(QroundError, match="is a directory"):
        with atomic_write(tmp_path) as fh:
            fh.write(b"x")


def test_save_compressed_tensors_wants_the_quantized_model(tmp_path):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from qround.interop import save_compressed_tensors

    with pytest.raises(QroundError, match="expected a QuantizedModel"):
        save_compressed_tensors(mlp(), tmp_path / "out")


# ------------------------------------------------------------------------------ units, beta
def scheme_run(scheme, iterations: int = 4):
    """A conv-BN-ReLU-conv-ReLU-Linear model quantised with block reconstruction over the
    given scheme units: (model, its QuantizedModel)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    data = [torch.randn(8, 2, 4, 4, generator=gen(7))]
    rec = ReconstructConfig(iterations=iterations, batch_size=4)
    return m, quantize_model(m, data, QuantConfig(**FAST, granularity="scheme",
                                                  reconstruction=rec, scheme=scheme))


def test_a_scheme_unit_may_hold_bn_and_relu_between_its_layers():
    """'0+1+2' (conv, BN, ReLU) was refused because BN and ReLU hold no quantised layer; a
    unit with no quantised layer at all still is."""
    _, qm = scheme_run(["0+1+2", "3+4", "6"])
    assert [u.modules for u in qm.units.units] == [("0", "1", "2"), ("3", "4"), ("6",)]
    assert [b.block for b in qm.reconstruction.blocks] == ["0+1+2", "3+4", "6"]
    with pytest.raises(QroundError, match=r"scheme units hold no quantised layer: \['1\+2'\]"):
        scheme_run(["0", "1+2", "6"])


def test_a_rising_beta_gets_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="qround.reconstruct"):
        ReconstructConfig(beta=(20.0, 2.0))
        assert "rises" not in caplog.text
        ReconstructConfig(beta=(2.0, 20.0))
    assert "beta=(2.0, 20.0) rises" in caplog.text


# ------------------------------------------------------------------------------ padding
class TokenModel(nn.Module):
    """Token ids and a mask in, per-token features out (masked positions are never read)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb, self.fc = nn.Embedding(100, 8), nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None, scale=1.0):
        return self.fc(self.emb(input_ids)) * scale


def _padded(pad: int) -> list[dict]:
    ids = torch.randint(1, 100, (4, 6), generator=gen(8))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, 4:] = 0
    ids[:, 4:] = pad
    return [{"input_ids": ids, "attention_mask": mask}]


def test_a_forward_of_ones_own_over_padded_batches_is_warned_and_default_forward_masks():
    """A custom forward counted padding in the statistics silently."""
    own = lambda model, batch: model(**batch, scale=1.0)     # noqa: E731
    with pytest.warns(UserWarning, match="padded .*does not mask"):
        quantize_model(TokenModel(), _padded(0), QuantConfig(**FAST), forward=own)
    kept = lambda model, batch: default_forward(model, batch, scale=1.0)   # noqa: E731
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        a = quantize_model(TokenModel(), _padded(0), QuantConfig(**FAST), forward=kept)
    b = quantize_model(TokenModel(), _padded(77), QuantConfig(**FAST), forward=kept)
    np.testing.assert_array_equal(a.layers["fc"].codes, b.layers["fc"].codes)


# ------------------------------------------------------------------------------ new biases
class NoBias(nn.Module):
    """A first layer without a bias, which bias correction gives one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.a, self.b = nn.Linear(6, 6, bias=False), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_bias_correction_on_a_transformers_model_says_that_new_biases_need_qround_to_load(
        caplog):
    class Pretrained(NoBias):
        def save_pretrained(self, folder):   # what transformers models have
            raise NotImplementedError

    data = [torch.randn(8, 6, generator=gen(9))]
    with caplog.at_level(logging.WARNING, logger="qround.pipeline"):
        quantize_model(Pretrained(), data, QuantConfig(**FAST, bias_correction=True))
    assert "gave 1 layers without a bias one (a)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qround.pipeline"):
        quantize_model(Pretrained(), data, QuantConfig(**FAST))
    assert "without a bias" not in caplog.text


def test_an_override_that_matches_only_a_layer_left_in_float_says_why_it_is():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.emb, self.fc = nn.Embedding(10, 6), nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.fc(self.emb(x))))

    config = QuantConfig(**FAST, overrides={"head": {"wbits": 4}})
    with pytest.raises(QroundError, match=r"matches none of the 1 layers .*it matches 'head', "
                                          r"which stays in float: shares its weight"):
        quantize_model(Tied(), [torch.randint(0, 10, (4, 5), generator=gen(10))], config)


class NumpyNoisy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x + torch.from_numpy(np.random.standard_normal(tuple(x.shape))
                                            .astype(np.float32)))


class RandomNoisy(NumpyNoisy):
    def forward(self, x):
        return self.fc(x + random.random())


@pytest.mark.parametrize("cls", [NumpyNoisy, RandomNoisy])
def test_output_metrics_resets_every_generator_between_the_two_forwards(cls):
    """The docstring: 'Both forwards of a batch draw random numbers from the same state'; only
    torch's CPU generator is reset (not numpy, random, nor CUDA's)."""
    m = cls()
    out = output_metrics(m, m, [torch.randn(5, 6)])
    assert out["relative_error"] == 0.0


@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.Hardtanh(inplace=True)])
def test_an_idempotent_in_place_op_on_the_input_is_not_refused(act):
    """nn.ReLU(inplace=True) as the first module changes the batch, but a second run sees the
    same data (helper-158): accepted, with the codes of the out-of-place model."""
    x = torch.randn(8, 6, generator=gen(11)) * 2
    torch.manual_seed(0)
    inplace = nn.Sequential(act, nn.Linear(6, 3))
    torch.manual_seed(0)
    plain = nn.Sequential(type(act)(), nn.Linear(6, 3))
    a = quantize_model(inplace, [x.clone()], QuantConfig(**FAST))
    b = quantize_model(plain, [x.clone()], QuantConfig(**FAST))
    np.testing.assert_array_equal(a.layers["1"].codes, b.layers["1"].codes)


def test_a_forward_that_changes_its_batch_differently_on_each_run_is_still_refused():
    x = torch.randn(8, 6, generator=gen(12))
    batch = x.clone()
    with pytest.raises(QroundError, match=r"changed the first calibration batch in place, and "
                                          r"changes it again on every run"):
        quantize_model(Centring(), [batch], QuantConfig(**FAST))
    assert torch.allclose(batch, x - 1.0)     # the refused run and the one that checked


def test_input_ranges_of_an_activation_quantised_model_names_the_wrappers():
    qm = quantize_model(mlp(), [torch.randn(8, 6, generator=gen(13))],
                        QuantConfig(**FAST, abits=8))
    with pytest.raises(QroundError, match=r"'0.layer' sits in one of qround's QuantizedLayer "
                                          r"wrappers"):
        input_ranges(qm.model, [torch.randn(8, 6)])
