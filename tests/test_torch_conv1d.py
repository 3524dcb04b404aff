"""torch's nn.Conv1d is rounded as the Conv2d with kernel (1, k) that it equals.

The oracle: a 1-D conv net and its twin, the same net with every Conv1d replaced by that Conv2d
(weights (out, c, 1, k), inputs (N, C, 1, L)), give the same statistics, the same codes and the
same outputs through every path (weights only, quantised inputs with borders, block
reconstruction, GPTQ, save and load).  (transformers' ``Conv1D``, a Linear, is
tests/test_conv1d.py.)
"""
import numpy as np
import pytest
import torch
from torch import nn

from qround.calibrate import capture_hessians
from qround.errors import QroundError
from qround.pipeline import QuantConfig, quantize_model
from qround.problems.layers import conv2d_view, layer_kind, problems_from_layer
from qround.reconstruct import ReconstructConfig

from .tiny_models import digit_rows_accuracy, fit_digit_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Net(nn.Module):
    """conv (padding 2) -> ReLU -> grouped strided conv (reflect padding) -> ReLU -> dilated
    'same' conv -> mean over length -> Linear.  ``twin``: each Conv1d as its Conv2d."""

    def __init__(self, twin: bool = False):
        super().__init__()
        conv = nn.Conv2d if twin else nn.Conv1d

        def k(n):   # a Conv1d's kernel n, its twin's (1, n)
            return (1, n) if twin else n

        self.twin = twin
        self.c1 = conv(3, 8, k(5), padding=(0, 2) if twin else 2)
        self.c2 = conv(8, 8, k(3), stride=(1, 2) if twin else 2, padding=(0, 1) if twin else 1,
                       groups=2, padding_mode="reflect")
        self.c3 = conv(8, 6, k(3), dilation=(1, 2) if twin else 2, padding="same")
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        if self.twin:
            x = x.unsqueeze(-2)
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = self.c3(x)
        return self.fc(x.flatten(2).mean(-1))


def _pair(seed=0):
    torch.manual_seed(seed)
    net = Net()
    twin = Net(twin=True)
    with torch.no_grad():
        for name in ("c1", "c2", "c3"):
            getattr(twin, name).weight.copy_(getattr(net, name).weight.unsqueeze(-2))
            getattr(twin, name).bias.copy_(getattr(net, name).bias)
        twin.fc.load_state_dict(net.fc.state_dict())
    return net, twin


def _batches(seed=1, n=3, length=17):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, length, generator=g) for _ in range(n)]


def copy_into_twin(net, twin):
    """Give ``twin`` (``net`` with each Conv1d as its Conv2d) ``net``'s weights and biases."""
    with torch.no_grad():
        mods = dict(twin.named_modules())
        for name, m in net.named_modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                mods[name].weight.copy_(m.weight.reshape(mods[name].weight.shape))
                if m.bias is not None:
                    mods[name].bias.copy_(m.bias)


def _same_weights(a, b):
    for name in ("c1", "c2", "c3"):
        wa, wb = getattr(a, name).weight, getattr(b, name).weight
        assert torch.equal(wa.unsqueeze(-2), wb), name
        assert torch.equal(getattr(a, name).bias, getattr(b, name).bias), name
    assert torch.equal(a.fc.weight, b.fc.weight)


def test_view_computes_the_conv1d():
    net, _ = _pair()
    x = torch.randn(2, 8, 13)
    for name in ("c1", "c2", "c3"):
        m = getattr(net, name)
        if m.in_channels != x.shape[1]:
            continue
        view = conv2d_view(m)
        assert view.weight.is_meta and not list(view.children())
        want = m(x)
        got = view._conv_forward(x.unsqueeze(-2), m.weight.unsqueeze(-2), m.bias).squeeze(-2)
        torch.testing.assert_close(got, want)
    assert layer_kind(net.c1) == "conv1d" and conv2d_view(net.fc) is None
    assert conv2d_view(Net(twin=True).c1) is not None


def test_hessians_and_problems_equal_the_twins():
    net, twin = _pair()
    batches = _batches()
    h = capture_hessians(net, batches, layers=["c1", "c2", "c3"])
    h2 = capture_hessians(twin, [x for x in batches], layers=["c1", "c2", "c3"])
    for name in h:
        assert h[name].shape == h2[name].shape
        np.testing.assert_allclose(h[name], h2[name], rtol=1e-12, atol=1e-12)
    # c2 is grouped: one problem per group, with the twin's weights and H
    problems = problems_from_layer(net.c2, h["c2"], name="c2")
    twin_problems = problems_from_layer(twin.c2, h2["c2"], name="c2")
    assert len(problems) == 2
    for p, q in zip(problems, twin_problems):
        np.testing.assert_array_equal(p.weight, q.weight)
        np.testing.assert_allclose(p.hessian, q.hessian, rtol=1e-12, atol=1e-12)


def test_unbatched_conv1d_input_counts_as_one_sample():
    net, _ = _pair()
    x = torch.randn(3, 11)
    h1 = capture_hessians(net.c1, [x])[""]
    h2 = capture_hessians(net.c1, [x.unsqueeze(0)])[""]
    np.testing.assert_allclose(h1, h2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["nearest", "quality"])
def test_quantize_model_rounds_like_the_twin(solver):
    net, twin = _pair()
    batches = _batches()
    config = QuantConfig(wbits=3, solver=solver, seed=0)
    qa = quantize_model(net, batches, config)
    qb = quantize_model(twin, batches, config)
    assert [r.kind for r in qa.report] == ["Conv1d", "Conv1d", "Conv1d", "Linear"]
    assert not qa.skipped
    _same_weights(qa.model, qb.model)
    for ra, rb in zip(qa.report, qb.report):
        assert ra.shape == rb.shape and ra.cost == pytest.approx(rb.cost, rel=1e-9)
    # the float model is untouched, and the codes lie on the grid
    fresh, _ = _pair()
    assert torch.equal(net.c1.weight, fresh.c1.weight)
    for name, qw in qa.layers.items():
        w = dict(qa.model.named_modules())[name].weight
        np.testing.assert_allclose(qw.dequantized, w.detach().double().numpy(), atol=1e-6)
    x = batches[0]
    torch.testing.assert_close(qa.model(x), qb.model(x))
    if solver == "quality":
        rtn = quantize_model(net, batches, QuantConfig(wbits=3, solver="nearest", seed=0))
        assert sum(r.cost for r in qa.report) < sum(r.cost for r in rtn.report)


def test_quantised_inputs_borders_and_reconstruction_like_the_twin(tmp_path):
    from qround.export import load, save

    net, twin = _pair()
    batches = _batches()
    config = QuantConfig(wbits=3, abits=4, borders="linear", solver="tabu", seed=0,
                         inputs="quantized",
                         reconstruction=ReconstructConfig(iterations=100, batch_size=8))
    qa = quantize_model(net, batches, config)
    qb = quantize_model(twin, batches, config)
    # the 1-D conv units trained (not reverted) and lost what the twin's did
    trained = {r.block for r in qa.reconstruction.blocks if not r.reverted}
    assert {"c1", "c2", "c3"} <= trained
    for a, b in zip(qa.reconstruction.blocks, qb.reconstruction.blocks):
        assert a.block == b.block and a.iterations == b.iterations == 100
        assert a.loss_after == pytest.approx(b.loss_after, rel=1e-4)
        assert a.loss_before == pytest.approx(b.loss_before, rel=1e-6)
    x = batches[1]
    out = qa.model(x)
    torch.testing.assert_close(out, qb.model(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(qa.report, qb.report):
        assert a.cost == pytest.approx(b.cost, rel=1e-6)
    # the inference path (sparse border conv, no gradient) and the training path agree
    wrapped = dict(qa.model.named_modules())["c1"]
    assert type(wrapped).__name__ == "QuantizedLayer" and wrapped.act_mode == "border"
    with torch.no_grad():
        fast = wrapped(torch.relu(x))
    wrapped.force_unfold = True
    with torch.no_grad():
        slow = wrapped(torch.relu(x))
    wrapped.force_unfold = False
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    # an unbatched (C, L) input gives the batched result's row
    torch.testing.assert_close(qa.model.c1(x[0]), qa.model.c1(x[:1])[0])
    # saved and loaded: the same outputs
    path = tmp_path / "net.safetensors"
    save(qa, path)
    loaded = load(net, path)
    torch.testing.assert_close(loaded(x), out)


def test_gptq_and_rtn_model_take_conv1d():
    from qround.baselines import gptq_model, rtn_model

    net, twin = _pair()
    batches = _batches()
    config = QuantConfig(wbits=3, seed=0)   # c2 grouped: one GPTQ problem per group
    ga, gb = gptq_model(net, batches, config), gptq_model(twin, batches, config)
    for name in ("c1", "c2", "c3"):
        torch.testing.assert_close(getattr(ga[0], name).weight.unsqueeze(-2),
                                   getattr(gb[0], name).weight)
        assert not torch.equal(getattr(ga[0], name).weight, getattr(net, name).weight)
    config = QuantConfig(wbits=3, seed=0, exclude="c2")
    ga = gptq_model(net, batches, config)
    assert torch.equal(ga[0].c2.weight, net.c2.weight)   # excluded: float
    ra, _ = rtn_model(net, QuantConfig(wbits=3), example=batches[0])
    rb, _ = rtn_model(twin, QuantConfig(wbits=3), example=batches[0])
    _same_weights(ra, rb)
    assert not torch.equal(ra.c2.weight, net.c2.weight)


def test_bad_conv1d_input_is_named():
    net, _ = _pair()
    q = quantize_model(net, _batches(), QuantConfig(wbits=4, abits=8, solver="nearest"))
    with pytest.raises(QroundError, match=r"\(N, C, L\) or \(C, L\)"):
        q.model.c1(torch.randn(2, 3, 1, 9))
    with pytest.raises(QroundError, match="expects 3 input channels"):
        q.model.c1(torch.randn(2, 4, 9))
    # an input shorter than the kernel is named in the layer's terms, not its Conv2d view's
    from qround.activations import QuantizedLayer
    from qround.grid import GridSpec

    short = QuantizedLayer(nn.Conv1d(2, 3, 5, dilation=2, padding=1), weight=GridSpec(bits=4))
    with pytest.raises(QroundError, match=r"Conv1d input is smaller than its kernel: 8 after "
                                          r"padding, the dilated kernel spans 9"):
        short(torch.randn(1, 2, 6))
    assert short(torch.randn(2, 7)).shape == (3, 1)
    flat = QuantizedLayer(nn.Conv2d(2, 3, (3, 5)))
    with pytest.raises(QroundError, match=r"Conv2d input is smaller than its kernel: \(2, 5\) "
                                          r"after padding, the dilated kernel spans \(3, 5\)"):
        flat(torch.randn(1, 2, 2, 5))



class SEBlock(nn.Module):
    """A Conv1d gated by two Linear layers (squeeze-excitation): output (N, C, L)."""

    def __init__(self, conv):
        super().__init__()
        self.conv, self.fc1, self.fc2 = conv, nn.Linear(8, 4), nn.Linear(4, 8)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.flatten(2).mean(-1)))))
        return y * s.view(*s.shape, *([1] * (y.dim() - 2)))


class SENet(nn.Module):
    """A Conv1d stem, an :class:`SEBlock`, a Linear head; ``twin``: each Conv1d as its
    Conv2d."""

    def __init__(self, twin: bool = False):
        super().__init__()
        conv = nn.Conv2d if twin else nn.Conv1d
        self.twin = twin
        self.stem = conv(3, 8, (1, 5) if twin else 5, padding=(0, 2) if twin else 2)
        self.block = SEBlock(conv(8, 8, (1, 3) if twin else 3, padding=(0, 1) if twin else 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        if self.twin:
            x = x.unsqueeze(-2)
        return self.head(self.block(torch.relu(self.stem(x))).flatten(2).mean(-1))


def test_a_unit_mixing_conv1d_and_linear_sums_its_loss_over_channels():
    """The block's output is (N, C, L) from its Conv1d, gated by Linear layers: its loss sums
    over the channels, as the twin's (N, C, 1, L) (helper-140: it summed over L)."""
    torch.manual_seed(0)
    net, twin = SENet(), SENet(twin=True)
    copy_into_twin(net, twin)
    batches = [torch.randn(16, 3, 64, generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    config = QuantConfig(wbits=3, solver="nearest", seed=0, granularity="scheme",
                         scheme=("stem", "block", "head"),
                         reconstruction=ReconstructConfig(iterations=300, batch_size=16))
    qa, qb = quantize_model(net, batches, config), quantize_model(twin, batches, config)
    a, b = qa.reconstruction.blocks[1], qb.reconstruction.blocks[1]
    assert a.block == "block" and not a.reverted
    assert a.loss_after == pytest.approx(b.loss_after, rel=1e-4)
    wa = qa.model.block.conv.layer.weight
    assert torch.equal(wa.unsqueeze(-2), qb.model.block.conv.layer.weight)


def test_a_channels_first_target_is_not_masked_as_tokens():
    """A Conv1d's (N, C, L) output under a (batch, tokens) token mask with C == L: the mask is
    not applied to the channels (helper-140: 12 of 16 channels were left out of the loss)."""
    from qround.calibrate import token_mask
    from qround.reconstruct import _capture

    class TextCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.c1 = nn.Conv1d(16, 16, 3, padding=1)

        def forward(self, ids):
            return self.c1(self.emb(ids).transpose(1, 2))

    def forward(model, batch):
        with token_mask(batch["mask"]):
            return model(batch["ids"])

    torch.manual_seed(0)
    model = TextCNN()
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :5] = True
    batches = [{"ids": torch.randint(0, 50, (4, 16)), "mask": mask}]
    data = _capture(model, model, model.c1, model.c1, "c1", batches, forward, 100)
    assert data.channels_first and data.masks == [None]
    # a Linear's (N, T, F) output under the same mask keeps it
    lin = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16))
    data = _capture(lin, lin, lin[1], lin[1], "1", [{"ids": batches[0]["ids"], "mask": mask}],
                    lambda m, b: forward(lambda ids: m(ids), b), 100)
    assert not data.channels_first and torch.equal(data.masks[0], mask)


def test_a_1d_cnn_on_real_digits():
    """Real data: the digits' 16 rows as channels of a 16-step sequence, a 1-D CNN trained
    here in a second (fixed seed).  At W3, `quality` rounds every layer with a lower cost than
    rounding to nearest, keeps the float accuracy within 3 points and beats nearest's."""
    pytest.importorskip("sklearn", reason="scikit-learn (the examples extra) loads the digits")
    from qround.zoo import load_digits_data

    data = load_digits_data()
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv1d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv1d(32, 32, 3, padding=1, groups=4), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.0))
    fit_digit_rows(model, data, 80, 0.01, gen)

    def acc(m):
        return digit_rows_accuracy(m, data)

    calib = list(data.calib_images.squeeze(1).split(60))
    rtn = quantize_model(model, calib, QuantConfig(wbits=3, solver="nearest"))
    best = quantize_model(model, calib, QuantConfig(wbits=3, solver="quality", seed=0))
    assert [r.kind for r in best.report] == ["Conv1d", "Conv1d", "Linear"]
    cost = {r.layer: r.cost for r in best.report}
    for r in rtn.report:
        assert cost[r.layer] < r.cost
    assert acc(model) > 0.85
    # measured here: float 0.922, nearest 0.883, quality 0.919
    assert acc(best.model) >= acc(model) - 0.03
    assert acc(best.model) > acc(rtn.model)
