"""qround.fold.fold_batchnorm: BatchNorms folded into the conv or Linear before them, the
model's class and names kept, the refusals named, and the folded weights quantised."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from qround.errors import QroundError
from qround.fold import fold_batchnorm
from qround.pipeline import QuantConfig, quantize_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _trained_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from their initial values (an untrained
    BatchNorm is the identity up to eps, and folding it would prove nothing)."""
    g = gen(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            c = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(torch.relu(self.bn1d(self.fc(y))))

    def extra_method(self):
        return "kept"


def test_conv_and_linear_batchnorms_are_folded_into_a_copy_with_the_same_outputs():
    model = _trained_norms(Net())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3, 6, 6, generator=gen(1))
    with pytest.warns(UserWarning, match="'bn1d': a BatchNorm1d normalises the layer's "
                                         "features only on a 2-d input: pass example="):
        without = fold_batchnorm(model)
    assert isinstance(without.bn, nn.Identity) and isinstance(without.bn1d, nn.BatchNorm1d)
    folded = fold_batchnorm(model, example=x)    # the example shows bn1d's input is 2-d
    assert type(folded) is Net and folded.extra_method() == "kept"
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.bn1d, nn.Identity)
    assert folded.conv.bias is not None and not folded.training
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # the model given is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.bn, nn.BatchNorm2d)
    # the folded weight is the documented product, per output channel
    bn = model.bn
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded.conv.weight, model.conv.weight * factor[:, None, None, None])
    torch.testing.assert_close(folded.conv.bias, bn.bias - bn.running_mean * factor)


def test_inplace_folds_the_model_itself():
    model = _trained_norms(Net())
    x = torch.randn(2, 3, 6, 6, generator=gen(2))
    with torch.no_grad():
        want = model(x)
    assert fold_batchnorm(model, inplace=True, example=x) is model
    assert isinstance(model.bn, nn.Identity) and isinstance(model.bn1d, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_the_digits_mobilenet_keeps_its_blocks_and_outputs():
    from qround.reconstruct import find_blocks
    from qround.zoo.digits import DigitsMobileNet

    model = _trained_norms(DigitsMobileNet(0), seed=2)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert find_blocks(folded) == find_blocks(model)
    x = torch.randn(6, 1, 16, 16, generator=gen(3))   # the zoo upsamples the digits to 16x16
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


class Refusals(nn.Module):
    """BatchNorms that cannot be folded: after a ReLU, after a conv whose output is also
    read by a skip, without running statistics; and one that can."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_skip = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 1)
        self.bn_no_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.d = nn.Conv2d(4, 4, 1)
        self.bn_ok = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn_after_relu(torch.relu(self.a(x)))
        y = self.b(x)
        x = self.bn_skip(y) + y
        x = self.bn_no_stats(self.c(x))
        return self.bn_ok(self.d(x))


def test_batchnorms_that_cannot_be_folded_stay_with_a_warning_that_says_why():
    model = _trained_norms(Refusals())
    with pytest.warns(UserWarning, match=r"left 3 BatchNorm\(s\).*'bn_after_relu': its input is "
                                         r"not the output of a conv.*'bn_skip': the output of "
                                         r"'b' is read elsewhere too.*'bn_no_stats': it has no "
                                         r"running statistics"):
        folded = fold_batchnorm(model)
    assert isinstance(folded.bn_ok, nn.Identity)
    for name in ("bn_after_relu", "bn_skip", "bn_no_stats"):
        assert isinstance(getattr(folded, name), nn.BatchNorm2d)
    x = torch.randn(2, 4, 5, 5, generator=gen(4))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_tied_or_twice_called_layers_are_not_folded():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
            self.other = nn.Conv2d(2, 2, 1)
            self.bn2 = nn.BatchNorm2d(2)
            self.other.weight = self.conv.weight

        def forward(self, x):
            return self.bn(self.conv(self.conv(x))) + self.bn2(self.other(x))

    with pytest.raises(QroundError, match=r"no BatchNorm could be folded: 'bn': 'conv' or the "
                                          r"BatchNorm is called more than once; 'bn2': 'other' "
                                          r"shares its weight"):
        fold_batchnorm(_trained_norms(Twice()))


def test_models_without_batchnorm_or_that_torch_fx_cannot_trace_are_refused():
    with pytest.raises(QroundError, match="no BatchNorm1d/2d/3d: nothing to fold"):
        fold_batchnorm(nn.Sequential(nn.Linear(2, 2)))

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:       # data-dependent control flow
                x = -x
            return self.bn(self.conv(x))

    with pytest.raises(QroundError, match="torch.fx cannot trace the model"):
        fold_batchnorm(Dynamic())
    with pytest.raises(QroundError, match="must be a torch nn.Module"):
        fold_batchnorm("model")


def test_a_folded_model_quantises_onto_the_grid_of_its_deployed_weights():
    """The saved codes and scales are those of the folded weight, which the accelerator runs."""
    model = _trained_norms(Net())
    data = [torch.randn(8, 3, 6, 6, generator=gen(i)) for i in range(2)]
    folded = fold_batchnorm(model, example=data[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = quantize_model(folded, data, QuantConfig(wbits=3, solver="greedy", progress=False))
    assert set(qm.layers) == {"conv", "fc", "head"}
    for name, qw in qm.layers.items():
        w = dict(qm.model.named_modules())[name].weight.detach().double().numpy()
        np.testing.assert_allclose(w.reshape(len(w), -1), qw.dequantized.reshape(len(w), -1),
                                   rtol=1e-6, atol=1e-7)
        assert qw.codes.min() >= -4 and qw.codes.max() <= 3


# ------------------------------------------------------------------- QuantConfig(fold_batchnorm)
def test_quantize_model_folds_first_and_load_folds_the_float_model_it_is_given(tmp_path):
    from qround import export

    model = _trained_norms(Net())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(8, 3, 6, 6, generator=gen(i)) for i in range(2)]
    config = QuantConfig(wbits=3, solver="greedy", progress=False, fold_batchnorm=True)
    qm = quantize_model(model, data, config)
    assert isinstance(qm.model.bn, nn.Identity) and isinstance(model.bn, nn.BatchNorm2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the same codes as quantising the folded copy by hand
    by_hand = quantize_model(fold_batchnorm(model, example=data[0]), data, QuantConfig(
        wbits=3, solver="greedy", progress=False))
    for name in qm.layers:
        np.testing.assert_array_equal(qm.layers[name].codes, by_hand.layers[name].codes)
    path = tmp_path / "q.safetensors"
    qm.save(path)
    assert export.read_metadata(path)["config"]["fold_batchnorm"] is True
    loaded = export.load(model, path)      # the unfolded float model, as given to quantize
    x = torch.randn(4, 3, 6, 6, generator=gen(9))
    with torch.no_grad():
        assert torch.equal(loaded(x), qm.model(x))
    other = _trained_norms(Net(), seed=5)   # another checkpoint: its fingerprint differs
    with pytest.raises(QroundError, match="differ"):
        export.load(other, path)


def test_the_baselines_and_the_sensitivity_measure_the_folded_layers():
    from qround.baselines import gptq_model, rtn_model
    from qround.sensitivity import layer_sensitivity

    model = _trained_norms(Net())
    data = [torch.randn(8, 3, 6, 6, generator=gen(i)) for i in range(2)]
    config = QuantConfig(wbits=3, progress=False, fold_batchnorm=True)
    for quantised, _ in (rtn_model(model, config, data[0]), gptq_model(model, data, config)):
        assert isinstance(quantised.bn, nn.Identity) and isinstance(model.bn, nn.BatchNorm2d)
    folded = layer_sensitivity(model, data, config, bits=(2,))
    by_hand = layer_sensitivity(fold_batchnorm(model, example=data[0]), data,
                                QuantConfig(wbits=3), bits=(2,))
    assert [s.errors for s in folded.layers] == [s.errors for s in by_hand.layers]
    plain = layer_sensitivity(model, data, QuantConfig(wbits=3), bits=(2,))
    assert [s.errors for s in folded.layers] != [s.errors for s in plain.layers]


def test_the_cli_folds_with_fold_bn_and_evaluate_reads_it_from_the_file(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits data come from scikit-learn (examples extra)")
    from qround.cli import main

    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", "digits-mobilenet", "--fold-bn", "--wbits", "4",
                 "--solver", "nearest", "--threads", "1", "--no-progress", "--out",
                 str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", "digits-mobilenet", "--quantized", str(out),
                 "--threads", "1", "--json"]) == 0
    import json

    metrics = json.loads(capsys.readouterr().out)
    assert metrics["quantized_accuracy"] > metrics["float_accuracy"] - 0.05


def test_a_batchnorm1d_over_tokens_after_a_linear_is_caught_by_the_output_check():
    """BatchNorm1d on a Linear's (N, L, C) output normalises L; with L equal to the Linear's
    features the graph looks foldable, and folding would be silently wrong: quantize_model,
    gptq_model and layer_sensitivity compare the outputs on the first batch and refuse."""
    from qround.baselines import gptq_model
    from qround.sensitivity import layer_sensitivity

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.bn, self.out = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)

        def forward(self, x):            # x: (N, 5 tokens, 4)
            return self.out(self.bn(self.fc(x)))

    model = _trained_norms(Tokens())
    data = [torch.randn(3, 5, 4, generator=gen(i)) for i in range(2)]
    config = QuantConfig(wbits=3, solver="greedy", progress=False, fold_batchnorm=True)
    for run in (lambda: quantize_model(model, data, config),
                lambda: gptq_model(model, data, config),
                lambda: layer_sensitivity(model, data, config, bits=(2,))):
        with pytest.raises(QroundError, match=r"no BatchNorm could be folded: 'bn': its input "
                                              r"is 3-d, so it normalises dim 1"):
            run()
    assert isinstance(model.bn, nn.BatchNorm1d)


def test_check_folded_refuses_outputs_that_moved_and_accepts_round_off():
    from qround.fold import check_folded

    model = _trained_norms(Net())
    x = torch.randn(4, 3, 6, 6, generator=gen(5))
    check_folded(model, fold_batchnorm(model, example=x), x, None or (lambda m, b: m(b)))
    other = _trained_norms(Net(), seed=7)
    with pytest.raises(QroundError, match="changed the model's outputs on the first"):
        check_folded(model, other, x, lambda m, b: m(b))
