"""BatchNorm folding, from helper-161's mutation review (session 35): the pairs and checks of
qround/fold.py and the fold_batchnorm settings of pipeline and cli that tests/test_fold.py did
not hold."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qround.errors import QroundError
from qround.fold import fold_batchnorm
from qround.pipeline import QuantConfig, quantize_model

from .test_fold import _trained_norms, gen

pytestmark = pytest.mark.usefixtures("one_torch_thread")

trained = _trained_norms   # the defects' tests import it from here


def _same_outputs(model, folded, x):
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv, norm, shape", [
    (nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), (4, 3, 9)),
    (nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3), (2, 2, 5, 5, 5)),
])
def test_conv1d_and_conv3d_batchnorms_are_folded(conv, norm, shape):
    torch.manual_seed(0)
    model = trained(nn.Sequential(conv, norm))
    x = torch.randn(*shape, generator=gen(1))
    folded = fold_batchnorm(model, example=x)   # a BatchNorm1d folds with an example only
    assert isinstance(folded[1], nn.Identity)
    _same_outputs(model, folded, x)


def test_a_batchnorm_called_after_two_layers_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    with pytest.raises(QroundError, match="called more than once"):
        fold_batchnorm(trained(Shared()))


def test_a_layer_on_the_meta_device_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).to("meta")
    with pytest.raises(QroundError, match="meta device"):
        fold_batchnorm(model)


def test_a_batchnorm_not_tracking_running_stats_is_refused_even_with_buffers():
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                                  nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model[1].track_running_stats = False     # buffers kept, flag off
    with pytest.warns(UserWarning, match="'1': it has no running statistics"):
        folded = fold_batchnorm(model)
    assert isinstance(folded[1], nn.BatchNorm2d) and isinstance(folded[3], nn.Identity)


def test_a_model_in_train_mode_is_folded_in_eval_mode_and_left_training():
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    folded = fold_batchnorm(model)
    assert not folded.training and model.training
    _same_outputs(model, folded, torch.randn(2, 3, 6, 6, generator=gen(2)))


def test_an_uncalled_batchnorm_is_named_in_the_warning():
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.unused = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), \
                nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    with pytest.warns(UserWarning, match="'unused': the forward does not call it"):
        fold_batchnorm(trained(Spare()))


def test_quantize_model_inplace_folds_and_quantises_the_given_model():
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(16, 2)))
    data = [torch.randn(8, 3, 4, 4, generator=gen(i)) for i in range(2)]
    qm = quantize_model(model, data, QuantConfig(wbits=3, solver="greedy", progress=False,
                                                 fold_batchnorm=True), inplace=True)
    assert isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model[0].weight, qm.model[0].weight, rtol=0, atol=0)


def test_fold_batchnorm_must_be_a_bool():
    with pytest.raises(QroundError, match="fold_batchnorm must be True or False"):
        QuantConfig(fold_batchnorm=1)


def _files(tmp_path):
    torch.manual_seed(0)
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(),
                                  nn.Linear(6, 2)))
    torch.save(model, tmp_path / "m.pt")
    torch.save(torch.randn(32, 3, 4, 4, generator=gen(0)), tmp_path / "cal.pt")
    return ["--model", str(tmp_path / "m.pt"), "--calibration", str(tmp_path / "cal.pt"),
            "--threads", "1"]


def test_cli_quantize_fold_bn_records_it_in_the_file(tmp_path, capsys):
    from qround import export
    from qround.cli import main

    out = tmp_path / "q.safetensors"
    assert main(["quantize", *_files(tmp_path), "--fold-bn", "--wbits", "4", "--solver",
                 "greedy", "--no-progress", "--out", str(out)]) == 0
    meta = export.read_metadata(out)
    assert meta["config"]["fold_batchnorm"] is True
    assert meta["layers"]["0"]["bias"]     # the folded conv got the BatchNorm's bias


def test_cli_sensitivity_fold_bn_measures_folded_and_suggests_fold_bn(tmp_path, capsys):
    from qround.cli import main

    out = tmp_path / "s.json"
    assert main(["sensitivity", *_files(tmp_path), "--fold-bn", "--bits", "2,8",
                 "--mean-bits", "5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert json.loads(out.read_text())["config"]["fold_batchnorm"] is True
    suggestions = [line for line in text.splitlines() if "qround quantize" in line]
    assert suggestions and all("--fold-bn" in line for line in suggestions)


def test_overrides_from_notes_a_differing_fold_batchnorm(capsys):
    from qround.cli import _note_other_settings

    _note_other_settings("run.json", {"fold_batchnorm": True}, QuantConfig())
    assert "fold_batchnorm=True (here False)" in capsys.readouterr().err


def test_a_torch_conv_subclass_with_its_own_forward_is_not_folded_into():
    """torch.ao.nn.qat.Conv2d fake-quantises its weight in forward: a torch.fx leaf that is an
    nn.Conv2d, but folding into it would change what its forward computes."""
    from torch.ao.nn.qat import Conv2d as QATConv2d
    from torch.ao.quantization import default_qat_qconfig

    torch.manual_seed(0)
    model = trained(nn.Sequential(QATConv2d(3, 4, 1, qconfig=default_qat_qconfig),
                                  nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    with pytest.warns(UserWarning, match="'1': its input comes from a Conv2d, which it does "
                                         "not fold into"):
        folded = fold_batchnorm(model)
    assert isinstance(folded[1], nn.BatchNorm2d) and isinstance(folded[3], nn.Identity)
