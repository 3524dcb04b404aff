"""qround.conv3d: nn.Conv3d as an nn.Conv2d over depth-stacked channels, and back."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qround.activations import QuantizedLayer
from qround.conv3d import Conv3dAsConv2d, explicit_conv3d, fuse_conv3d
from qround.errors import QroundError
from qround.export import load
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig

from .tiny_models import output_error_per_position

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


@pytest.mark.filterwarnings("ignore:Using padding='same'")   # torch's, on even kernels
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_the_explicit_module_computes_the_3d_convolution(mode):
    x = _x(2, 4, 6, 7, 5)
    checked = 0
    for k, s, p, d, g, b in itertools.product((1, 3, (3, 1, 2)), (1, (2, 1, 3)),
                                              (0, (2, 0, 1), "same", "valid"), (1, 2), (1, 2),
                                              (True, False)):
        torch.manual_seed(0)
        try:
            layer = nn.Conv3d(4, 6, k, stride=s, padding=p, dilation=d, groups=g, bias=b,
                              padding_mode=mode).double()
            want = layer(x)
        except (RuntimeError, ValueError):   # 'same' with a stride, padding beyond the input
            continue
        explicit = Conv3dAsConv2d(layer)
        got = explicit(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(explicit(x[0]), layer(x[0]), rtol=0, atol=1e-12)
        assert torch.equal(explicit.weight, layer.weight)
        checked += 1
    assert checked > 50


@settings(max_examples=40, deadline=None)
@given(c_in=st.integers(1, 3), groups=st.sampled_from([1, 2]), kd=st.integers(1, 3),
       sd=st.integers(1, 2), dd=st.integers(1, 2), depth=st.integers(4, 7))
def test_every_output_depth_reads_its_own_slices(c_in, groups, kd, sd, dd, depth):
    """stack: row (n, d) of conv's input holds, channel-major, the kd depth slices that output
    depth d of the 3-d convolution reads."""
    torch.manual_seed(0)
    layer = nn.Conv3d(c_in * groups, 2 * groups, (kd, 1, 1), stride=(sd, 1, 1),
                      dilation=(dd, 1, 1), groups=groups)
    x = _x(2, c_in * groups, depth, 3, 3)
    if depth < dd * (kd - 1) + 1:
        with pytest.raises(QroundError, match="depth span"):
            Conv3dAsConv2d(layer)(x)
        return
    stacked = Conv3dAsConv2d(layer).stack(x)
    d_out = (depth - dd * (kd - 1) - 1) // sd + 1
    assert stacked.shape == (2 * d_out, c_in * groups * kd, 3, 3)
    for n, d, c, t in itertools.product(range(2), range(d_out), range(c_in * groups), range(kd)):
        assert torch.equal(stacked[n * d_out + d, c * kd + t], x[n, c, d * sd + t * dd])


class _Video(nn.Module):
    """Two 3-d convs (one grouped, one with 'same' reflect padding) and a head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1, groups=1)
        self.c2 = nn.Conv3d(8, 6, (2, 3, 3), padding="same", padding_mode="reflect", groups=2,
                            bias=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.head(h.mean((2, 3, 4)))


def _video():
    torch.manual_seed(0)
    return _Video().double().eval()


def _batches():
    return [_x(4, 3, 4, 6, 6, seed=i) for i in range(3)]


def test_plain_quantize_model_names_the_way_to_round_them():
    qm = quantize_model(_video(), _batches(), QuantConfig(wbits=3, solver="nearest"))
    for name in ("c1", "c2"):
        assert "explicit_conv3d" in qm.skipped[name]
    assert [r.layer for r in qm.report] == ["head"]


def test_the_layer_cost_is_the_3d_layers_output_error(tmp_path):
    """Oracle independent of the explicit form: each layer's reported cost (float inputs) is
    the mean squared output error, per output position, of torch's own nn.Conv3d with the
    fused rounded weight; quality beats nearest; the fused model computes the quantised explicit
    one; save, load into the explicit form, fuse: the same model."""
    model, batches = _video(), _batches()
    explicit = explicit_conv3d(model)
    costs = {}
    for solver in ("nearest", "quality"):
        qm = quantize_model(explicit, batches, QuantConfig(wbits=3, solver=solver,
                                                            inputs="float", seed=0))
        fused = fuse_conv3d(qm.model)
        assert type(fused.c1) is nn.Conv3d and type(fused.c2) is nn.Conv3d
        costs[solver] = {r.layer: r.cost for r in qm.report}
        for name in ("c1", "c2"):
            error = output_error_per_position(model, getattr(model, name), getattr(fused, name),
                                              batches)
            assert costs[solver][f"{name}.conv"] == pytest.approx(error, rel=1e-9)
        with torch.no_grad():
            for b in batches:
                torch.testing.assert_close(fused(b), qm.model(b), rtol=0, atol=1e-12)
    for name in ("c1.conv", "c2.conv"):
        assert costs["quality"][name] < costs["nearest"][name]
    path = tmp_path / "video.safetensors"
    qm.save(path)
    loaded = fuse_conv3d(load(explicit_conv3d(model), path))
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(loaded(b), fused(b), rtol=0, atol=0)
    with pytest.raises(QroundError, match="explicit_conv3d"):
        load(model, path)
    assert type(model.c1) is nn.Conv3d   # the float model is untouched


def test_quantised_inputs_reconstruction_and_the_partial_fuse():
    """Quantised inputs with borders and reconstruction run on the explicit convs (5-d unit
    outputs are summed over channels); with first_last_bits the first conv's input stays in
    float, so it alone is fused; weight-only reconstruction fuses both."""
    model, batches = _video(), _batches()
    explicit = explicit_conv3d(model)
    acts = quantize_model(explicit, batches, QuantConfig(
        wbits=4, abits=6, borders="linear", first_last_bits=8, solver="fast", seed=0,
        reconstruction=ReconstructConfig(iterations=10, batch_size=4)))
    assert acts.model.c1.conv.act is None and acts.model.c2.conv.act is not None
    fused = fuse_conv3d(acts.model)
    assert type(fused.c1) is nn.Conv3d and type(fused.c2) is Conv3dAsConv2d
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(fused(b), acts.model(b), rtol=0, atol=1e-12)
    weight_only = quantize_model(explicit, batches, QuantConfig(
        wbits=3, solver="fast", seed=0, reconstruction=ReconstructConfig(iterations=10,
                                                                        batch_size=4)))
    assert isinstance(weight_only.model.c2.conv, QuantizedLayer)
    fused = fuse_conv3d(weight_only.model)
    assert type(fused.c1) is nn.Conv3d and type(fused.c2) is nn.Conv3d
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(fused(b), weight_only.model(b), rtol=0, atol=1e-12)


def test_the_5d_reconstruction_loss_sums_over_channels_of_3d_conv_outputs_only(loss_layouts):
    """A unit whose 5-d output is a 3-d conv's (N, C, D, H, W) sums its loss over channels; a
    unit of Linear layers on (B, T, H, W, C) tokens (a video transformer's MLP) over its last
    axis, the features (helper-149: a rule from the rank alone summed it over T)."""
    import qround.reconstruct as rec

    out, target = _x(2, 3, 4, 5, 6, seed=1), _x(2, 3, 4, 5, 6, seed=2)
    assert torch.equal(rec._rec_loss(out, target, channels_first=True),
                       ((out - target) ** 2).sum(1).mean())
    assert torch.equal(rec._rec_loss(out, target), ((out - target) ** 2).sum(-1).mean())
    seen = loss_layouts
    seen.clear()   # the direct calls above went through the spy too

    class Block3d(nn.Module):   # a residual 3-d block: the unit's output is (N, C, D, H, W)
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv3d(3, 3, 3, padding=1), nn.Conv3d(3, 3, 3, padding=1)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    blocks = nn.Sequential(Block3d(), Block3d()).double().eval()
    config = QuantConfig(wbits=3, solver="nearest", granularity="block",
                         reconstruction=ReconstructConfig(iterations=3, batch_size=4))
    quantize_model(explicit_conv3d(blocks), _batches(), config)
    assert seen[5] == {True}

    class VideoMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)

        def forward(self, x):   # (B, T, H, W, C)
            return x + self.fc2(torch.relu(self.fc1(x)))

    seen.clear()
    torch.manual_seed(0)
    mlp = nn.Sequential(VideoMlp(), VideoMlp()).double().eval()
    quantize_model(mlp, [_x(4, 2, 3, 3, 6, seed=i) for i in range(2)],
                   QuantConfig(wbits=3, solver="nearest", granularity="block",
                               reconstruction=ReconstructConfig(iterations=3, batch_size=4)))
    assert seen[5] == {None}   # no 3-d conv output: the last axis, a 5-d target's default


def test_ties_flags_and_refusals():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 2, 3, padding=1))
    model[2].weight = model[0].weight
    model[0].bias.requires_grad_(False)
    model.train()
    explicit = explicit_conv3d(model)
    assert explicit[0].conv.weight is explicit[2].conv.weight
    assert explicit[0].training and not explicit[0].conv.bias.requires_grad
    back = fuse_conv3d(explicit)
    assert back[0].weight is back[2].weight and back[0].training
    assert not back[0].bias.requires_grad
    tied = nn.Sequential(nn.Conv3d(2, 2, 1), nn.Module())
    tied[1].register_parameter("kernel", tied[0].weight)   # another module holds it
    with pytest.raises(QroundError, match="'0' shares its weight with '1' .*untie"):
        explicit_conv3d(tied)
    with pytest.raises(QroundError, match="no nn.Conv3d"):
        explicit_conv3d(nn.Sequential(nn.Conv2d(1, 1, 1)))
    hooked = nn.Conv3d(1, 1, 1)
    hooked.register_forward_hook(lambda *a: None)
    with pytest.raises(QroundError, match="forward hook"):
        explicit_conv3d(nn.Sequential(hooked))
    with pytest.raises(QroundError, match="lazy"):
        explicit_conv3d(nn.Sequential(nn.LazyConv3d(2, 1)))

    class Own(nn.Conv3d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(QroundError, match="own forward"):
        explicit_conv3d(nn.Sequential(Own(1, 1, 1)))
    empty = nn.Conv3d(2, 3, 3, padding=1)   # an empty batch (helper-149: a reshape error)
    x = torch.zeros(0, 2, 4, 5, 5)
    assert Conv3dAsConv2d(empty)(x).shape == empty(x).shape == (0, 3, 4, 5, 5)
    explicit = Conv3dAsConv2d(nn.Conv3d(3, 2, 3))
    with pytest.raises(QroundError, match="2 channels, the layer expects 3"):
        explicit(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(QroundError, match="4-d or 5-d input"):
        explicit(torch.zeros(3, 4, 4))
    with pytest.raises(QroundError, match="no Conv3dAsConv2d"):
        fuse_conv3d(nn.Sequential(nn.Conv3d(1, 1, 1)))
    from qround.problems.layers import problems_from_layer

    with pytest.raises(QroundError, match="Conv3d.*explicit_conv3d"):
        problems_from_layer(nn.Conv3d(2, 2, 1), torch.eye(2).numpy())


def test_a_3d_cnn_on_real_moving_digits():
    """Real data: clips of 4 frames in which a test digit moves one pixel per frame (as Moving
    MNIST), classified by a 3-d CNN trained here in about a second (fixed seed).  Made explicit
    and rounded at W2, quality's layer costs are below nearest's in every layer and its
    accuracy is above nearest's, within 3 points of float (measured here: float 0.936, nearest
    0.883, quality 0.936)."""
    pytest.importorskip("sklearn", reason="scikit-learn (the examples extra) loads the digits")
    from qround.zoo import load_digits_data

    def clips(images, frames=4):   # (N, 1, 16, 16) -> (N, 1, frames, 16, 16)
        return torch.stack([torch.roll(images, t - frames // 2, dims=-1)
                            for t in range(frames)], 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv3d(1, 8, 3, stride=(1, 2, 2), padding=1)
            self.c2 = nn.Conv3d(8, 16, 3, stride=2, padding=1)
            self.fc = nn.Linear(16 * 2 * 4 * 4, 10)

        def forward(self, x):
            return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))

    data = load_digits_data()
    gen = _gen(0)
    torch.manual_seed(0)
    model = Net()
    x, y = clips(data.train_images), data.train_labels
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        idx = torch.randint(len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = clips(data.test_images)

    def accuracy(m):
        with torch.no_grad():
            return float((m(test).argmax(1) == data.test_labels).float().mean())

    calib = list(clips(data.calib_images).split(60))
    explicit = explicit_conv3d(model)
    nearest = quantize_model(explicit, calib, QuantConfig(wbits=2, solver="nearest"))
    best = quantize_model(explicit, calib, QuantConfig(wbits=2, solver="quality", seed=0))
    rtn_cost = {r.layer: r.cost for r in nearest.report}
    assert {r.layer for r in best.report} == {"c1.conv", "c2.conv", "fc"}
    for r in best.report:
        assert r.cost < rtn_cost[r.layer], r.layer
    fused = fuse_conv3d(best.model)
    assert accuracy(fused) == accuracy(best.model)
    assert accuracy(nearest.model) < accuracy(fused)
    assert accuracy(fused) > accuracy(model) - 0.03
