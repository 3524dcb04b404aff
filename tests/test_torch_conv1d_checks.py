"""Behaviours of torch's nn.Conv1d support that tests/test_torch_conv1d.py leaves open (mutation
testing, helper-141): Fisher statistics, capture sharing between layers of one input,
own-forward subclasses, unbatched inputs under reconstruction, hook clean-up, capacity,
saved-file checks, the token layout of a Conformer-style conv module."""
import json

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from qround.calibrate import capture_fisher
from qround.errors import QroundError
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig

from .test_torch_conv1d import copy_into_twin

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batches(n=3, c=3, length=17, size=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, c, length, generator=g) for _ in range(n)]


class Stack(nn.Module):
    def __init__(self, twin=False):
        super().__init__()
        conv = nn.Conv2d if twin else nn.Conv1d
        k = (lambda n: (1, n)) if twin else (lambda n: n)
        p = (lambda n: (0, n)) if twin else (lambda n: n)
        self.twin = twin
        self.c1 = conv(3, 6, k(3), padding=p(1))
        self.c2 = conv(6, 4, k(3), stride=(1, 2) if twin else 2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if self.twin:
            x = x.unsqueeze(-2)
        return self.fc(self.c2(torch.tanh(self.c1(x))).flatten(2).mean(-1))


def test_fisher_of_a_conv1d_equals_its_conv2d_twin():
    """The output gradient of a Conv1d (N, out, L) is read per position as its twin's."""
    torch.manual_seed(0)
    net, twin = Stack().double(), Stack(twin=True).double()
    copy_into_twin(net, twin)
    batches = [b.double() for b in _batches()]
    loss_fn = lambda out, batch: (out ** 2).sum()  # noqa: E731
    fa = capture_fisher(net, batches, loss_fn, ["c1", "c2"])
    fb = capture_fisher(twin, batches, loss_fn, ["c1", "c2"])
    for name in ("c1", "c2"):
        assert fa[name].shape == fb[name].shape
        np.testing.assert_allclose(fa[name], fb[name], rtol=1e-10, atol=1e-14)
    # an unbatched (C, L) input counts as one sample
    conv = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh()).double()
    x = torch.randn(2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    one = capture_fisher(conv, [x], loss_fn, None)["0"]
    batch = capture_fisher(conv, [x[None]], loss_fn, None)["0"]
    assert one.shape == (3, 6, 6)
    np.testing.assert_allclose(one, batch, rtol=1e-12, atol=1e-15)


class Branches(nn.Module):
    """Two Conv1d reading one tensor, alike but for the dilation: their statistics differ."""

    def __init__(self, twin=False):
        super().__init__()
        conv = nn.Conv2d if twin else nn.Conv1d
        self.twin = twin
        self.a = conv(3, 4, (1, 3) if twin else 3, padding=(0, 1) if twin else 1)
        self.b = conv(3, 4, (1, 3) if twin else 3, padding=(0, 2) if twin else 2,
                      dilation=(1, 2) if twin else 2)

    def forward(self, x):
        if self.twin:
            x = x.unsqueeze(-2)
        return (self.a(x) * self.b(x)).flatten(1)


def test_conv1d_layers_of_one_input_but_other_geometry_keep_their_own_statistics():
    torch.manual_seed(0)
    net, twin = Branches(), Branches(twin=True)
    copy_into_twin(net, twin)
    batches = _batches(length=12)
    for inputs in ("float", "quantized"):
        config = QuantConfig(wbits=3, solver="nearest", seed=0, inputs=inputs, progress=False)
        qa, qb = quantize_model(net, batches, config), quantize_model(twin, batches, config)
        costs = {r.layer: r.cost for r in qb.report}
        assert {r.layer for r in qa.report} == {"a", "b"}
        for r in qa.report:
            assert r.cost == pytest.approx(costs[r.layer], rel=1e-9), (inputs, r.layer)


class _StdConv1d(nn.Conv1d):
    """A Conv1d that standardises its weight in _conv_forward (timm's StdConv pattern)."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean((1, 2), keepdim=True)) / (weight.std((1, 2), keepdim=True)
                                                            + 1e-6)
        return super()._conv_forward(x, w, bias)


def test_a_conv1d_subclass_with_its_own_conv_forward_stays_in_float():
    torch.manual_seed(0)
    model = nn.Sequential(_StdConv1d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 15, 2))
    qm = quantize_model(model, _batches(), QuantConfig(wbits=3, solver="nearest",
                                                       progress=False))
    assert [r.layer for r in qm.report] == ["2"]
    assert "_StdConv1d subclasses" in qm.skipped["0"] and "own forward" in qm.skipped["0"]
    assert torch.equal(qm.model[0].weight, model[0].weight)


def test_unbatched_conv1d_samples_are_refused_by_reconstruction():
    """(C, L) samples: reconstruction would draw its mini-batches along the channels."""
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 3))
    calib = [torch.randn(4, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    quantize_model(model, calib, QuantConfig(wbits=4, solver="nearest", progress=False))
    with pytest.raises(QroundError, match=r"conv layer '0' received an unbatched .*\(C, L\)"):
        quantize_model(model, calib, QuantConfig(wbits=4, solver="nearest", progress=False,
                                                 reconstruction=ReconstructConfig(iterations=5)))


class _SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(6, 6, 3, padding=1), nn.Linear(6, 6)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return y * torch.sigmoid(self.fc(y.mean(-1)))[..., None]


class _SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv1d(3, 6, 3, padding=1), _SE(), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean(-1))


def _hooks(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks}


def test_reconstruction_of_a_unit_holding_a_conv1d_leaves_no_hooks_behind():
    torch.manual_seed(0)
    net = _SENet()
    config = QuantConfig(wbits=3, solver="nearest", seed=0, granularity="scheme",
                         scheme=("stem", "block", "head"), progress=False,
                         reconstruction=ReconstructConfig(iterations=5, batch_size=8))
    qm = quantize_model(net, _batches(), config)
    assert "block" in {b.block for b in qm.reconstruction.blocks}
    assert _hooks(net) == {} and _hooks(qm.model) == {}


def test_capacity_counts_conv1d_weights():
    from qround.activations import QuantizedLayer
    from qround.granularity import capacity
    from qround.grid import GridSpec

    conv = nn.Conv1d(4, 6, 3)
    assert capacity(conv) == 72 * 32 and capacity(conv, wbits=4) == 72 * 4
    mixed = nn.Sequential(QuantizedLayer(nn.Linear(4, 4), weight=GridSpec(bits=3)),
                          nn.Conv1d(4, 2, 5))
    assert capacity(mixed) == 16 * 3 + 40 * 32       # the float Conv1d at 32 bits
    wrapped = nn.Sequential(QuantizedLayer(nn.Conv1d(4, 2, 5), weight=GridSpec(bits=2)))
    assert capacity(wrapped) == 40 * 2


def _saved_conv1d(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 15, 2))
    qm = quantize_model(model, _batches(), QuantConfig(wbits=4, solver="nearest",
                                                       progress=False))
    path = tmp_path / "m.safetensors"
    qm.save(path)
    return model, path


def _with_layer(path, out, name, **changes):
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    layers = json.loads(meta["layers"])
    layers[name].update(changes)
    meta["layers"] = json.dumps(layers)
    safetensors.torch.save_file(tensors, out, metadata=meta)
    return out


@pytest.mark.parametrize("name, kind, shape", [
    ("0", "Conv1d", [4, 9]),          # a Conv1d's weight is (out, c_in/groups, k)
    ("0", "Conv1d", [4, 3, 1, 3]),    # ... not a Conv2d's
    ("2", "Linear", [2, 15, 4]),
    ("0", "Conv2d", [4, 3, 3]),
])
def test_a_weight_shape_of_another_rank_than_its_kind_is_refused(tmp_path, name, kind, shape):
    from qround.export import load_codes, read_metadata

    _, path = _saved_conv1d(tmp_path)
    assert read_metadata(path)["layers"]["0"]["kind"] == "Conv1d"
    bad = _with_layer(path, tmp_path / "bad.safetensors", name, kind=kind, weight_shape=shape)
    for read in (read_metadata, load_codes):
        with pytest.raises(QroundError, match=f"entry '{name}' has weight_shape"):
            read(bad)


def test_loading_a_conv1d_layer_into_another_layer_type_names_both(tmp_path):
    from qround.export import load

    model, path = _saved_conv1d(tmp_path)
    other = nn.Sequential(nn.Linear(3, 4), nn.Flatten(), nn.Linear(4 * 15, 2))
    with pytest.raises(QroundError, match="'0' is a Linear, the file has a Conv1d"):
        load(other, path, check_source=False)
    other = nn.Sequential(nn.Conv2d(3, 4, (1, 3)), nn.Flatten(), nn.Linear(4 * 15, 2))
    with pytest.raises(QroundError, match="'0' is a Conv2d, the file has a Conv1d"):
        load(other, path, check_source=False)


def test_a_token_output_of_a_unit_with_a_transposed_conv1d_keeps_its_mask_when_t_equals_f():
    """(N, T, F) with T == F has the shape of the inner Conv1d's (N, C, L) output too: under a
    token mask that fits it, the output is read as tokens (helper-141)."""
    from qround.calibrate import token_mask
    from qround.reconstruct import _capture

    class ConvModule(nn.Module):   # Conformer-style: (N, T, F) -> Conv1d over T -> (N, T, F)
        def __init__(self):
            super().__init__()
            self.conv, self.proj = nn.Conv1d(16, 16, 3, padding=1), nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(self.conv(x.transpose(1, 2)).transpose(1, 2))

    model = nn.Sequential(nn.Embedding(50, 16), ConvModule())
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :5] = True

    def forward(m, batch):
        with token_mask(batch["mask"]):
            return m(batch["ids"])

    batches = [{"ids": torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0)),
                "mask": mask}]
    data = _capture(model, model, model[1], model[1], "1", batches, forward, 100)
    assert not data.channels_first and torch.equal(data.masks[0], mask)
