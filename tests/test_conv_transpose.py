"""qround.conv_transpose: nn.ConvTranspose1d/2d as the convolution they equal, and back."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from qround.activations import QuantizedLayer
from qround.conv_transpose import (ConvTransposeAsConv, conv_weight, explicit_conv_transpose,
                                   fuse_conv_transpose, transposed_weight)
from qround.errors import QroundError
from qround.export import load
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig

from .tiny_models import output_error_per_position

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layer(dims, seed=0, **kw):
    torch.manual_seed(seed)
    kind = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
    layer = kind(4, 6, **kw).double()
    if layer.bias is not None:
        with torch.no_grad():   # a clearly nonzero bias, so a lost one shows
            layer.bias.add_(1.0)
    return layer.eval()


def _options():
    """Every kernel/stride/padding/output padding/dilation/groups/bias combination torch
    accepts, in a grid small enough to run in a second."""
    for k, s, p, op, d, g, b in itertools.product((1, 3), (1, 2, 3), (0, 2), (0, 1), (1, 2),
                                                  (1, 2), (True, False)):
        if op < max(s, d):   # torch's rule for output_padding
            yield {"kernel_size": k, "stride": s, "padding": p, "output_padding": op,
                   "dilation": d, "groups": g, "bias": b}


@pytest.mark.parametrize("dims", [1, 2])
def test_the_explicit_module_computes_the_transposed_convolution(dims):
    x = torch.randn(2, 4, *([5] * dims), generator=_gen(1), dtype=torch.float64)
    checked = 0
    for options in _options():
        layer = _layer(dims, **options)
        try:
            want = layer(x)
        except RuntimeError:   # an output of size < 1 (large padding, small kernel)
            with pytest.raises(RuntimeError):
                ConvTransposeAsConv(layer)(x)
            continue
        explicit = ConvTransposeAsConv(layer)
        got = explicit(x)
        assert got.shape == want.shape, options
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(explicit(x[0]), layer(x[0]), rtol=0, atol=1e-12)  # unbatched
        if options["stride"] > 1:   # the other output size the stride allows, asked for
            op = options["output_padding"]
            size = [n + 1 if op == 0 else n - op for n in want.shape[2:]]
            torch.testing.assert_close(explicit(x, output_size=size),
                                       layer(x, output_size=size), rtol=0, atol=1e-12)
        checked += 1
    assert checked > 100


@settings(max_examples=60, deadline=None)
@given(dims=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2, 3]),
       c_in=st.integers(1, 3), c_out=st.integers(1, 3), k=st.integers(1, 4))
def test_the_weight_maps_are_inverse_permutations(dims, groups, c_in, c_out, k):
    w = torch.randn(c_in * groups, c_out, *([k] * dims), generator=_gen(k), dtype=torch.float64)
    conv = conv_weight(w, groups)
    assert conv.shape == (c_out * groups, c_in, *([k] * dims))
    assert torch.equal(transposed_weight(conv, groups), w)
    # a permutation: the same values, each once
    assert torch.equal(conv.flatten().sort().values, w.flatten().sort().values)
    # output channel o of the transposed layer is row o of the conv
    for o in range(c_out * groups):
        g, j = divmod(o, c_out)
        mine = w[g * c_in:(g + 1) * c_in, j].flip(list(range(1, dims + 1)))
        assert torch.equal(conv[o], mine)


class _Decoder(nn.Module):
    """A 1-d and a 2-d transposed convolution (grouped, dilated, output padding)."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose1d(8, 6, 3, stride=2, padding=1, output_padding=1,
                                      groups=2)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=2, dilation=2, bias=False)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):   # x (N, 8, L)
        y = torch.relu(self.up1(x))                              # (N, 6, 2L)
        return self.head(torch.relu(self.up2(y.unsqueeze(-2).expand(-1, -1, 3, -1))))


def _decoder():
    torch.manual_seed(0)
    return _Decoder().double().eval()


def _batches():
    return [torch.randn(6, 8, 7, generator=_gen(i), dtype=torch.float64) for i in range(3)]


def test_plain_quantize_model_names_the_way_to_round_them():
    qm = quantize_model(_decoder(), _batches(), QuantConfig(wbits=3, solver="nearest"))
    for name in ("up1", "up2"):
        assert "explicit_conv_transpose" in qm.skipped[name]
    assert [r.layer for r in qm.report] == ["head"]


def test_the_layer_cost_is_the_transposed_layers_output_error(tmp_path):
    """Oracle independent of the conv form: each layer's reported cost (inputs="float") is the
    mean squared output error, per output position, of torch's own transposed convolution with
    the fused rounded weight; quality beats nearest; the fused model computes the quantised
    explicit one; save, load into the explicit form, fuse: the same model."""
    model, batches = _decoder(), _batches()
    explicit = explicit_conv_transpose(model)
    assert [type(m) for m in (model.up1, model.up2)] == [nn.ConvTranspose1d, nn.ConvTranspose2d]
    costs = {}
    for solver in ("nearest", "quality"):
        qm = quantize_model(explicit, batches, QuantConfig(wbits=3, solver=solver,
                                                            inputs="float", seed=0))
        fused = fuse_conv_transpose(qm.model)
        assert [type(m) for m in (fused.up1, fused.up2)] == [nn.ConvTranspose1d,
                                                             nn.ConvTranspose2d]
        costs[solver] = {r.layer: r.cost for r in qm.report}
        assert set(costs[solver]) == {"up1.conv", "up2.conv", "head"}
        for name in ("up1", "up2"):
            error = output_error_per_position(model, getattr(model, name), getattr(fused, name),
                                              batches)
            assert costs[solver][f"{name}.conv"] == pytest.approx(error, rel=1e-9)
        with torch.no_grad():
            for b in batches:
                torch.testing.assert_close(fused(b), qm.model(b), rtol=0, atol=1e-12)
    for name in ("up1.conv", "up2.conv"):
        assert costs["quality"][name] < costs["nearest"][name]
    path = tmp_path / "decoder.safetensors"
    qm.save(path)
    loaded = load(explicit_conv_transpose(model), path)
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(fuse_conv_transpose(loaded)(b), fused(b), rtol=0,
                                       atol=0)
    with pytest.raises(QroundError, match="explicit_conv_transpose"):
        load(model, path)
    assert type(model.up1) is nn.ConvTranspose1d   # the float model is untouched


def test_quantised_inputs_and_reconstruction_round_the_explicit_conv():
    model, batches = _decoder(), _batches()
    explicit = explicit_conv_transpose(model)
    for borders in ("none", "linear"):   # borders: the sparse inference path included
        acts = quantize_model(explicit, batches, QuantConfig(
            wbits=4, abits=6, borders=borders, solver="fast", seed=0,
            reconstruction=ReconstructConfig(iterations=10, batch_size=8)))
        assert isinstance(acts.model.up2.conv, QuantizedLayer)
        assert acts.model.up2.conv.act is not None
        with torch.no_grad():
            out = acts.model(batches[0])
            assert torch.isfinite(out).all()
            assert not torch.equal(out, model(batches[0]))
        with pytest.raises(QroundError, match="quantised input"):
            fuse_conv_transpose(acts.model)
    weight_only = quantize_model(explicit, batches, QuantConfig(
        wbits=3, solver="fast", seed=0, granularity="layer",
        reconstruction=ReconstructConfig(iterations=10, batch_size=8)))
    assert isinstance(weight_only.model.up2.conv, QuantizedLayer)
    fused = fuse_conv_transpose(weight_only.model)
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(fused(b), weight_only.model(b), rtol=0, atol=1e-12)


def test_parameters_flags_and_mode_survive_the_round_trip():
    layer = _layer(2, kernel_size=3, stride=2, groups=2).train()
    layer.bias.requires_grad_(False)
    explicit = explicit_conv_transpose(nn.Sequential(layer))
    assert explicit[0].training and explicit[0].conv.weight.requires_grad
    assert not explicit[0].conv.bias.requires_grad
    back = fuse_conv_transpose(explicit)[0]
    assert type(back) is nn.ConvTranspose2d and back.training
    assert back.weight.requires_grad and not back.bias.requires_grad
    assert torch.equal(back.weight, layer.weight) and torch.equal(back.bias, layer.bias)
    for attr in ("stride", "padding", "output_padding", "dilation", "groups"):
        assert getattr(back, attr) == getattr(layer, attr)
    # a bias that bias correction gave a bias-free layer is kept
    plain = explicit_conv_transpose(nn.Sequential(_layer(1, kernel_size=2, bias=False)))
    plain[0].conv.bias = nn.Parameter(torch.ones(6, dtype=torch.float64))
    assert torch.equal(fuse_conv_transpose(plain)[0].bias, torch.ones(6, dtype=torch.float64))
    # inplace changes the model given; the default leaves it alone
    model = nn.Sequential(_layer(1, kernel_size=2))
    assert type(explicit_conv_transpose(model)[0]) is ConvTransposeAsConv
    assert type(model[0]) is nn.ConvTranspose1d
    assert explicit_conv_transpose(model, inplace=True) is model
    assert type(model[0]) is ConvTransposeAsConv


def test_refusals():
    with pytest.raises(QroundError, match="no nn.ConvTranspose1d"):
        explicit_conv_transpose(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(QroundError, match="3-d"):
        explicit_conv_transpose(nn.Sequential(nn.ConvTranspose3d(1, 1, 1)))

    class Own(nn.ConvTranspose2d):
        def forward(self, x, output_size=None):
            return super().forward(x) * 2

    with pytest.raises(QroundError, match="own forward"):
        explicit_conv_transpose(nn.Sequential(Own(1, 1, 1)))
    hooked = nn.ConvTranspose2d(1, 1, 1)
    hooked.register_forward_hook(lambda *a: None)
    with pytest.raises(QroundError, match="forward hook"):
        explicit_conv_transpose(nn.Sequential(hooked))
    normed = torch.nn.utils.parametrizations.weight_norm(nn.ConvTranspose2d(2, 2, 1))
    with pytest.raises(QroundError, match="parametrized"):
        explicit_conv_transpose(nn.Sequential(normed))
    with pytest.raises(QroundError, match="lazy"):
        explicit_conv_transpose(nn.Sequential(nn.LazyConvTranspose2d(2, 1)))
    explicit = ConvTransposeAsConv(nn.ConvTranspose2d(3, 2, 3, stride=2))
    with pytest.raises(QroundError, match="2 channels, the layer expects 3"):
        explicit(torch.zeros(1, 2, 4, 4))
    with pytest.raises(QroundError, match="3-d or 4-d input"):
        explicit(torch.zeros(3, 4))
    with pytest.raises(QroundError, match="output_size .* can be 9 to 10"):
        explicit(torch.zeros(1, 3, 4, 4), output_size=[12, 9])
    with pytest.raises(QroundError, match="3 sizes"):
        explicit(torch.zeros(1, 3, 4, 4), output_size=[9, 9, 9])
    with pytest.raises(QroundError, match="no ConvTransposeAsConv"):
        fuse_conv_transpose(nn.Sequential(nn.ConvTranspose2d(1, 1, 1)))
    with pytest.raises(QroundError, match="must be an nn.Module"):
        explicit_conv_transpose("model")
    from qround.problems.layers import problems_from_layer

    with pytest.raises(QroundError, match="ConvTranspose2d.*explicit_conv_transpose"):
        problems_from_layer(nn.ConvTranspose2d(2, 2, 1), torch.eye(2).numpy())


def test_an_autoencoder_on_real_digits():
    """Real data: qround.zoo's conv autoencoder of the 16x16 digits, whose decoder is two
    nn.ConvTranspose2d, trained here in seconds (fixed seed).  Made explicit and rounded at W3,
    quality's layer costs are below nearest's in every layer, its reconstruction error on the
    test digits is below half of nearest's, and the fused model computes the explicit one
    (BENCHMARKS.md, "A conv autoencoder of the digits", has the numbers)."""
    pytest.importorskip("sklearn", reason="scikit-learn (the examples extra) loads the digits")
    from qround.zoo import reconstruction_error, train_digits_autoencoder

    model, data = train_digits_autoencoder(seed=0)

    def error(m):
        return reconstruction_error(m, data.test_images)

    calib = list(data.calib_images.split(60))
    explicit = explicit_conv_transpose(model)
    nearest = quantize_model(explicit, calib, QuantConfig(wbits=3, solver="nearest"))
    best = quantize_model(explicit, calib, QuantConfig(wbits=3, solver="quality", seed=0))
    rtn_cost = {r.layer: r.cost for r in nearest.report}
    assert {r.layer for r in best.report} == {"encoder.0", "encoder.2", "decoder.0.conv",
                                              "decoder.2.conv"}
    for r in best.report:
        assert r.cost < rtn_cost[r.layer], r.layer
    fused = fuse_conv_transpose(best.model)
    assert error(fused) == pytest.approx(error(best.model), rel=1e-5)
    assert error(model) < error(fused) < 0.5 * error(nearest.model)


def test_the_baselines_and_the_sensitivity_take_the_explicit_form():
    """rtn_model, gptq_model and layer_sensitivity see the transposed layers as their convs:
    rtn_model's rounding is nearest's, GPTQ's fused model computes its explicit one, and the
    sensitivity measures the convs."""
    from qround.baselines import gptq_model, rtn_model
    from qround.sensitivity import layer_sensitivity

    model, batches = _decoder(), _batches()
    explicit = explicit_conv_transpose(model)
    config = QuantConfig(wbits=3, solver="nearest", inputs="float")
    rtn, _ = rtn_model(explicit, config, example=batches[0])
    nearest = quantize_model(explicit, batches, config)
    for name in ("up1", "up2"):
        rounded = getattr(rtn, name).conv.weight
        assert torch.equal(rounded, getattr(nearest.model, name).conv.weight)
        assert not torch.equal(rounded, getattr(explicit, name).conv.weight)
    gptq, _ = gptq_model(explicit, batches, QuantConfig(wbits=3))   # up1 grouped
    for name in ("up1", "up2"):
        assert not torch.equal(getattr(gptq, name).conv.weight, getattr(explicit, name).conv.weight)
    fused = fuse_conv_transpose(gptq)
    with torch.no_grad():
        torch.testing.assert_close(fused(batches[0]), gptq(batches[0]), rtol=0, atol=1e-12)
    sens = layer_sensitivity(explicit, batches, config, bits=(2, 4))
    errors = {s.name: s.errors for s in sens.layers}
    assert {"up1.conv", "up2.conv"} <= set(errors)
    assert errors["up2.conv"][2] > errors["up2.conv"][4] > 0


def test_tied_weights_stay_tied_and_are_rounded_once():
    """Two transposed layers sharing one weight (helper-146): the explicit convs share one
    parameter, quantize_model rounds it once (as two tied nn.Conv2d), and the fused layers
    share one weight again.  A weight tied to a layer of another kind (a tied autoencoder's
    encoder) cannot keep the tie through the flip: refused, with the way to untie."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, 2, 1, 1), nn.ReLU(),
                          nn.ConvTranspose2d(4, 4, 3, 2, 1, 1)).double().eval()
    model[2].weight = model[0].weight
    explicit = explicit_conv_transpose(model)
    assert explicit[0].conv.weight is explicit[2].conv.weight
    assert explicit[0].conv.bias is not explicit[2].conv.bias
    batches = [torch.randn(4, 4, 5, 5, generator=_gen(i), dtype=torch.float64)
               for i in range(2)]
    qm = quantize_model(explicit, batches, QuantConfig(wbits=3, solver="fast", seed=0))
    assert [r.layer for r in qm.report] == ["0.conv"]
    assert "tied" in qm.skipped["2.conv"]
    fused = fuse_conv_transpose(qm.model)
    assert fused[0].weight is fused[2].weight
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel()
                                                             for p in model.parameters())
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(fused(b), qm.model(b), rtol=0, atol=1e-12)

    class TiedAutoEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(1, 4, 3, 2, 1)
            self.dec = nn.ConvTranspose2d(4, 1, 3, 2, 1, 1)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))

    with pytest.raises(QroundError, match="'dec' shares its weight with 'enc' .*untie"):
        explicit_conv_transpose(TiedAutoEncoder())
    with pytest.raises(QroundError, match="other groups"):
        other = nn.Sequential(nn.ConvTranspose2d(4, 4, 1), nn.ConvTranspose2d(4, 8, 1, groups=2))
        other[1].weight = other[0].weight
        explicit_conv_transpose(other)


def test_the_explicit_module_answers_for_its_weight_bias_and_padding_mode():
    """A parent forward that reads the layer's weight, bias or padding_mode (x.to(up.weight
    .dtype)) runs on the explicit form too (helper-146)."""
    layer = _layer(2, kernel_size=3, stride=2, groups=2)
    explicit = ConvTransposeAsConv(layer)
    assert torch.equal(explicit.weight, layer.weight) and explicit.bias is explicit.conv.bias
    assert torch.equal(explicit.bias, layer.bias) and explicit.padding_mode == "zeros"
    assert not any(n in dict(explicit.named_parameters()) for n in ("weight", "bias"))


@pytest.mark.filterwarnings("ignore::FutureWarning")   # the old weight_norm is deprecated
@pytest.mark.parametrize("make, remedy", [
    (lambda m: torch.nn.utils.spectral_norm(m), r"remove_spectral_norm\(module\)"),
    (lambda m: torch.nn.utils.weight_norm(m), r"remove_weight_norm\(module\)"),
    (lambda m: prune.l1_unstructured(m, "weight", 0.5),
     r"prune.remove\(module, 'weight'\)"),
])
def test_a_weight_computed_by_a_hook_gets_its_own_remedy(make, remedy):
    layer = nn.ConvTranspose2d(4, 4, 4, 2)
    make(layer)
    with pytest.raises(QroundError, match=remedy):
        explicit_conv_transpose(nn.Sequential(layer))
