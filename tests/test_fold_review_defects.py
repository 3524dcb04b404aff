"""Defects of qround.fold.fold_batchnorm found by helper-161 (session 35), each failing on the
first version (f523077).  A fold that refuses (QroundError) or leaves the BatchNorm (a warning)
passes; a fold that returns a model whose eval outputs differ, or a raw torch error, fails."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from qround.errors import QroundError
from qround.fold import fold_batchnorm

from .test_fold_review import trained

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _faithful(model, x, refused: str | None = None) -> str:
    """Fold ``model`` with ``x`` as the example: "refused" when a QroundError matching
    ``refused`` says no BatchNorm can be folded, "folded" when the folded model gives the
    model's outputs (anything else fails inside)."""
    model = trained(model)
    with torch.no_grad():
        want = model(x)
    if refused is not None:
        with pytest.raises(QroundError, match=refused):
            fold_batchnorm(model, example=x)
        return "refused"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fold_batchnorm(model, example=x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)
    return "folded"


def test_linear_batchnorm1d_on_3d_input_with_seq_len_equal_to_out_features():
    # BatchNorm1d on (N, L, C) normalises dim 1 (L), not the Linear's output features
    torch.manual_seed(0)
    assert _faithful(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), torch.randn(5, 6, 4),
                     refused="its input is 3-d, so it normalises dim 1") == "refused"


def test_linear_batchnorm1d_on_3d_input_other_length_is_no_raw_assertion():
    torch.manual_seed(0)
    assert _faithful(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(7)), torch.randn(5, 7, 4),
                     refused="it has 7 features and '0' 6 outputs") == "refused"


def test_unbatched_conv1d_batchnorm1d():
    torch.manual_seed(0)
    assert _faithful(nn.Sequential(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)), torch.randn(4, 6),
                     refused="its input is 2-d") == "refused"


def test_linear_batchnorm1d_without_affine():
    torch.manual_seed(0)
    assert _faithful(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False)),
                     torch.randn(5, 4)) == "folded"


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_parametrized_conv_is_no_raw_keyerror(kind):
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    conv = getattr(parametrizations, kind)(nn.Conv2d(3, 4, 3))
    assert _faithful(nn.Sequential(conv, nn.BatchNorm2d(4)), torch.randn(2, 3, 5, 5),
                     refused="weight is parametrized") == "refused"


class _EvalBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y)
        if not self.training:     # eval also reads the pre-BatchNorm features
            out = out + y
        return out


def test_a_model_in_train_mode_is_traced_as_it_runs_in_eval():
    torch.manual_seed(0)
    model = trained(_EvalBranch())
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = model(x)
    # traced as it runs in eval mode, where the conv's output is read twice: not folded (it
    # used to be folded from the train-mode graph, and the eval outputs moved by 3.0)
    with pytest.raises(QroundError, match="'bn': the output of 'conv' is read elsewhere too"):
        fold_batchnorm(model.train())
    assert model.training
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), want)


class _Tied(nn.Module):
    """A conv whose weight the forward also reads directly (a tied decoder)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return nn.functional.conv_transpose2d(self.bn(self.conv(x)), self.conv.weight)


class _ReadsNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight.view(1, -1, 1, 1)


@pytest.mark.parametrize("cls", [_Tied, _ReadsNorm])
def test_parameters_read_outside_the_call_are_not_folded_away(cls):
    torch.manual_seed(0)
    assert _faithful(cls(), torch.randn(2, 3, 4, 4),
                     refused="the forward reads its or its layer's parameters directly") \
        == "refused"


def test_tracing_does_not_write_into_the_given_model():
    class Keeps(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.last = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), None

        def forward(self, x):
            self.last = y = self.conv(x)
            return self.bn(y)

    model = trained(Keeps())
    fold_batchnorm(model)
    assert model.last is None     # f523077: a torch.fx Proxy (torch.save(model) then fails)


def test_explicit_forms_are_leaves_of_the_trace():
    """qround's explicit forms cannot be traced by torch.fx; the whole fold was refused on an
    explicit model (the CLI's --explicit --fold-bn)."""
    from qround.explicit import explicit_layers

    torch.manual_seed(0)
    model = trained(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4),
                                  nn.ConvTranspose2d(4, 2, 2, stride=2)))
    explicit = explicit_layers(model)
    folded = fold_batchnorm(explicit)
    assert isinstance(folded[1], nn.Identity)
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), explicit.eval()(x), rtol=1e-5, atol=1e-5)


def test_loading_onto_a_model_folded_already_says_so(tmp_path):
    from qround import export
    from qround.pipeline import QuantConfig, quantize_model

    torch.manual_seed(0)
    model = trained(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(36, 3)))
    data = [torch.randn(4, 2, 5, 5)]
    qm = quantize_model(model, data, QuantConfig(wbits=4, solver="greedy", progress=False,
                                                 fold_batchnorm=True))
    path = tmp_path / "q.safetensors"
    qm.save(path)
    with pytest.raises(QroundError, match="was it folded already"):
        export.load(fold_batchnorm(model), path, check_source=False)
