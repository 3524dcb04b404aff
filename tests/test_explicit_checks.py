"""explicit._explicit_children and the CLI's --explicit: behaviours found unguarded by
mutation testing (helper-153)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qround.cli import main
from qround.errors import QroundError
from qround.explicit import _explicit_children, explicit_layers

from .test_cli import ExplicitNet, _explicit_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_explicit_children_of_a_model_that_is_itself_a_native_module():
    """A bare nn.ConvTranspose2d / nn.MultiheadAttention (module name ''): its explicit
    layers are 'conv' and 'q_proj' ..., as explicit_layers names them, not '.conv'."""
    for native in (nn.ConvTranspose2d(4, 4, 3), nn.MultiheadAttention(4, 2)):
        children, why = _explicit_children(native)
        assert why is None
        names = {n for n, m in explicit_layers(native).named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
        assert set(children) == {""} and set(children[""]) <= names
    assert _explicit_children(nn.ConvTranspose2d(4, 4, 3))[0] == {"": ["conv"]}


def test_explicit_children_refuses_what_explicit_layers_refuses_for_every_kind():
    """A Conv3d that cannot be made explicit (a forward hook) next to a transposed conv that
    can: explicit_layers refuses the model, so _explicit_children gives no layers and the same
    reason (the CLI's note must not promise layers --explicit would refuse)."""
    torch.manual_seed(0)
    model = ExplicitNet()
    model.c3.register_forward_hook(lambda m, a, o: None)
    with pytest.raises(QroundError) as info:
        explicit_layers(model)
    assert _explicit_children(model) == ({}, str(info.value))
    assert "Conv3d" in str(info.value)


def _base(tmp_path):
    return ["quantize", "--model", str(tmp_path / "model.pt"), "--calibration",
            str(tmp_path / "calib.pt"), "--no-progress", "--threads", "1", "--solver",
            "nearest", "--inputs", "float"]


def test_the_explicit_note_counts_only_the_layers_that_layers_chooses(tmp_path, capsys):
    """--layers matching the native modules' names but none of their explicit layers' ('c3',
    not 'c3.conv'): --explicit would round nothing more, so no note."""
    _explicit_files(tmp_path)
    assert main(_base(tmp_path) + ["--layers", "^(c3|up|attn|head)$"]) == 0
    assert "--explicit would" not in capsys.readouterr().out
    assert main(_base(tmp_path) + ["--layers", "^(c3|up|head)"]) == 0
    assert "--explicit would round 2 more layer(s) ('c3.conv' and 1 more)" in \
        capsys.readouterr().out


def test_a_quantize_json_records_explicit_and_overrides_from_checks_it(tmp_path, capsys):
    """quantize --json writes "explicit"; --overrides-from that file refuses a run without
    --explicit (its patterns name the explicit layers) and accepts one with it."""
    _explicit_files(tmp_path)
    made = tmp_path / "q.json"
    assert main(_base(tmp_path) + ["--explicit", "--override", "q_proj", "wbits=8", "--json",
                                   str(made)]) == 0
    assert json.loads(made.read_text())["explicit"] is True
    capsys.readouterr()
    assert main(_base(tmp_path) + ["--overrides-from", str(made)]) == 2
    assert "was made with --explicit" in capsys.readouterr().err
    report = tmp_path / "again.json"
    assert main(_base(tmp_path) + ["--explicit", "--overrides-from", str(made), "--json",
                                   str(report)]) == 0
    assert "--explicit" not in capsys.readouterr().err
    widths = {r["layer"]: r["bits"] for r in json.loads(report.read_text())["layers"]}
    assert widths["attn.q_proj"] == 8
    plain = tmp_path / "plain.json"
    assert main(_base(tmp_path) + ["--override", "head", "wbits=8", "--json", str(plain)]) == 0
    assert json.loads(plain.read_text())["explicit"] is False
