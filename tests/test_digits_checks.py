"""Behaviours of qround.zoo.digits no other test protected (found by mutation testing)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qround.errors import QroundError
from qround.zoo import (DigitsCNN, ResidualDigitsCNN, accuracy, load_digits_data,
                        train_digits_cnn)
from qround.zoo import digits as digits_module
from qround.zoo.digits import DeepResidualDigitsCNN, ResidualBlock

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    pytest.importorskip("sklearn", reason="the digits data come from scikit-learn")
    return load_digits_data()


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_load_digits_data_refuses_a_bad_seed(seed):
    pytest.importorskip("sklearn")
    with pytest.raises(QroundError, match="seed"):
        load_digits_data(seed=seed)


def test_splits_are_in_data_set_order_not_grouped_by_class(data):
    """The first images of a split (a calibration prefix) hold every class, not all zeros."""
    for labels in (data.train_labels, data.calib_labels, data.test_labels):
        assert len(set(labels[:40].tolist())) >= 6
        assert not bool((labels[1:] >= labels[:-1]).all())    # not sorted by class


def test_mean_std_and_seed_fields_undo_the_standardisation(data):
    """``images * std + mean`` gives back the bilinear 16x16 upsampling of pixels / 16."""
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16
    big = F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False)
    restored = data.train_images * data.std + data.mean
    assert float(restored.min()) == pytest.approx(0.0, abs=1e-5)
    assert float(restored.max()) <= 1 + 1e-5
    # every restored training image is one of the upsampled originals
    flat = big.flatten(1)
    for image in restored[:5]:
        assert float((flat - image.flatten()).abs().amax(1).min()) < 1e-5
    assert data.seed == 0 and load_digits_data(seed=2).seed == 2


# ----------------------------------------------------------------------------- models


def test_residual_block_adds_its_input():
    block = ResidualBlock(4).to_empty(device="cpu")   # built on "meta", like the models
    with torch.no_grad():
        for conv in (block.conv1, block.conv2):
            conv.weight.normal_(generator=torch.Generator().manual_seed(1))
            conv.bias.zero_()
        block.conv2.weight.zero_()
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(block(x), torch.relu(x))   # conv2 = 0: the identity path alone


@pytest.mark.parametrize("cls", [DigitsCNN, ResidualDigitsCNN, DeepResidualDigitsCNN])
def test_every_layer_runs_once_in_the_forward(cls):
    model = cls(seed=0)
    calls: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model(torch.zeros(2, 1, 16, 16))
    for h in handles:
        h.remove()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert calls == {n: 1 for n in layers}


@pytest.mark.parametrize("cls", [DigitsCNN, ResidualDigitsCNN, DeepResidualDigitsCNN])
def test_initialisation_is_he_uniform_with_zero_biases(cls):
    model = cls(seed=0)
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        gain = 1.0 if isinstance(mod, nn.Linear) else math.sqrt(2.0)
        bound = gain * math.sqrt(3.0 / mod.weight[0].numel())
        if "block" in name and name.endswith("conv2"):
            bound *= 0.25     # residual branches start near the identity
        top = float(mod.weight.detach().abs().max())
        assert 0.8 * bound < top <= bound, name
        assert torch.count_nonzero(mod.bias) == 0, name


@pytest.mark.parametrize("arch, cls, width", [("deep", DeepResidualDigitsCNN, 16),
                                              ("deep-narrow", DeepResidualDigitsCNN, 8),
                                              ("residual", ResidualDigitsCNN, 16),
                                              ("plain", DigitsCNN, 16)])
def test_each_arch_builds_its_own_model(arch, cls, width, monkeypatch, data):
    monkeypatch.setattr(digits_module, "_fit", lambda *a, **k: None)   # the build alone
    model, _ = train_digits_cnn(arch, seed=0, epochs=1, cache=False)
    assert type(model) is cls
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.out_channels == width
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(batch_size=2.0), dict(lr=0.0),
                                    dict(lr=float("inf")), dict(lr=-1e-3), dict(seed=True),
                                    dict(epochs=True), dict(lr=True), dict(seed=2 ** 64)])
def test_train_refuses_bad_arguments_before_training(kwargs, monkeypatch, data):
    monkeypatch.setattr(digits_module, "_fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(QroundError):
        train_digits_cnn(cache=False, **kwargs)


def test_fit_order_and_warps_follow_the_training_seed(data):
    """Two training seeds from the same initial weights give different weights."""
    small = dataclasses.replace(data, train_images=data.train_images[:48],
                                train_labels=data.train_labels[:48])
    weights = []
    for seed in (0, 1, 0):
        model = DigitsCNN(seed=0)
        digits_module._fit(model, small, seed, 1, 16, 3e-3, torch.device("cpu"))
        weights.append(model.fc.weight.detach().clone())
    assert torch.equal(weights[0], weights[2])
    assert not torch.equal(weights[0], weights[1])


def test_the_largest_seed_trains(data):
    """The CLI takes seeds up to 2**64 - 1; the training stream's offset wraps around instead
    of overflowing torch's seed (it was a raw ValueError from manual_seed)."""
    small = dataclasses.replace(data, train_images=data.train_images[:16],
                                train_labels=data.train_labels[:16])
    model = DigitsCNN(seed=2 ** 64 - 1)
    digits_module._fit(model, small, 2 ** 64 - 1, 1, 16, 3e-3, torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_numpy_numbers_are_taken_as_arguments(monkeypatch, data):
    seen = {}
    monkeypatch.setattr(digits_module, "_fit", lambda *a: seen.update(args=a[2:6]))
    train_digits_cnn(seed=np.int64(3), epochs=np.int64(2), batch_size=np.int64(8),
                     lr=np.float32(0.5), cache=False)
    assert seen["args"] == (3, 2, 8, 0.5)
    assert all(type(v) in (int, float) for v in seen["args"])


@pytest.mark.parametrize("make", [lambda: DigitsCNN(seed=2 ** 64),
                                  lambda: DeepResidualDigitsCNN(width=0),
                                  lambda: load_digits_data(seed=2 ** 64)])
def test_models_and_data_refuse_out_of_range_arguments(make):
    with pytest.raises(QroundError, match="seed|width"):
        make()


def test_augment_pads_with_empty_pixels_and_keeps_the_shape():
    background = -0.7
    images = torch.full((6, 1, 16, 16), background)
    gen = torch.Generator().manual_seed(0)
    out = digits_module._augment(images, gen, background, degrees=30.0, shift=0.5)
    assert out.shape == images.shape
    assert torch.allclose(out, images, atol=1e-5)


# ----------------------------------------------------------------------------- weight cache


def test_cache_key_names_every_setting():
    cpu = torch.device("cpu")
    base = ("plain", 0, 20, 64, 3e-3, cpu)
    other = [("residual", 0, 20, 64, 3e-3, cpu), ("plain", 1, 20, 64, 3e-3, cpu),
             ("plain", 0, 21, 64, 3e-3, cpu), ("plain", 0, 20, 32, 3e-3, cpu),
             ("plain", 0, 20, 64, 1e-3, cpu), ("plain", 0, 20, 64, 3e-3, torch.device("meta"))]
    paths = {digits_module._cache_path(*key) for key in [base, *other]}
    assert len(paths) == 1 + len(other)


def test_a_cached_model_comes_back_in_eval_mode(tmp_path, monkeypatch, data):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    monkeypatch.setattr(digits_module, "_fit", lambda *a, **k: pytest.fail("retrained"))
    model, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    assert not any(m.training for m in model.modules())


def _write_cache(tmp_path, monkeypatch, state):
    from safetensors.torch import save_file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = digits_module._cache_path("plain", 0, 1, 64, 3e-3, torch.device("cpu"))
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))   # no digest


def test_a_cache_file_without_digest_holding_nan_is_retrained_over(tmp_path, monkeypatch, data):
    state = dict(DigitsCNN(seed=7).state_dict())
    state["fc.weight"] = state["fc.weight"].clone()
    state["fc.weight"][0, 0] = float("nan")
    _write_cache(tmp_path, monkeypatch, state)
    model, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    reference, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=False)
    assert torch.equal(model.fc.weight, reference.fc.weight)


def test_a_cache_file_with_a_wrong_shape_leaves_no_trace(tmp_path, monkeypatch, data):
    """Same names, one shape differs: load_state_dict would copy the others before raising."""
    state = dict(DigitsCNN(seed=7).state_dict())
    state["conv1.weight"] = torch.zeros(16, 1, 5, 5)
    _write_cache(tmp_path, monkeypatch, state)
    model, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    reference, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=False)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(),
                                                   reference.state_dict().values()))


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_refuses_empty_input_and_a_bad_batch_size(data):
    model = DigitsCNN(seed=0)
    with pytest.raises(QroundError, match="empty"):
        accuracy(model, data.test_images[:0], data.test_labels[:0])
    for bad in (0, -1, 2.5):
        with pytest.raises(QroundError, match="batch_size"):
            accuracy(model, data.test_images[:8], data.test_labels[:8], batch_size=bad)


def test_accuracy_does_not_depend_on_the_batch_size(data):
    model = DigitsCNN(seed=0)
    images, labels = data.test_images[:50], data.test_labels[:50]
    want = accuracy(model, images, labels)
    assert accuracy(model, images, labels, batch_size=7) == want
    assert accuracy(model, images, labels, batch_size=50) == want
