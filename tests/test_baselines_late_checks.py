"""rtn_model(calibration=) follows every batch, as quantize_model (helper-142)."""
import pytest
import torch
from torch import nn

from qround.baselines import rtn_model
from qround.pipeline import QuantConfig, quantize_model

from .test_pipeline_machinery import TiedToLate, _late_expert_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rtn_model_with_the_calibration_rounds_a_weight_tied_to_a_late_expert():
    """spare (never called) holds e1's weight; only later batches call e1: the weight is
    rounded at e1, as quantize_model does."""
    model = TiedToLate()
    batches = _late_expert_batches(model)
    quantised, _ = rtn_model(model, QuantConfig(wbits=3, progress=False), calibration=batches)
    assert not torch.equal(quantised.e1.weight, model.e1.weight)
    assert max(len(row.unique()) for row in quantised.e1.weight) <= 8


class _ConvExperts(torch.nn.Module):
    """A router over two transformers Conv1D experts; e1 runs only on a batch that routes a
    row to it."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D
        super().__init__()
        self.gate = torch.nn.Linear(6, 16)
        self.e0, self.e1 = Conv1D(4, 16), Conv1D(4, 16)     # (nf=out, nx=in)
        g = torch.Generator().manual_seed(29)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, x):
        h = self.gate(x)
        out = [e(h[m]) for e, m in ((self.e0, h[:, 0] > 0), (self.e1, h[:, 0] <= 0)) if m.any()]
        return torch.cat(out)


def test_rtn_model_with_the_calibration_rounds_a_conv1d_expert_the_first_batch_skips():
    pytest.importorskip("transformers")
    model = _ConvExperts().eval()
    batches = _late_expert_batches(model)
    quantised, _ = rtn_model(model, QuantConfig(wbits=3, progress=False), calibration=batches)
    w = quantised.e1.weight.detach()          # (in, out): an output channel is a column
    assert not torch.equal(w, model.e1.weight)
    assert all(len(col.unique()) <= 8 for col in w.T)


class _EmptyCalls(nn.Module):
    """Experts called on the rows routed to them, even when there are none: expert 2 gets only
    empty inputs on every batch below, expert 1 only on the first."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        route = x[:, 0].round().clamp(0, 2).long()
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            y[route == e] = expert(h[route == e])
        return self.out(y)


def test_rtn_model_leaves_a_layer_called_only_with_empty_inputs_in_float():
    """As quantize_model (helper-144: rtn_model rounded it)."""
    torch.manual_seed(0)
    model = _EmptyCalls()
    g = torch.Generator().manual_seed(0)
    first, later = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    first[:, 0] = 0.0                      # expert 0 only
    later[:, 0] = (torch.arange(16) % 2).float()   # experts 0 and 1
    config = QuantConfig(wbits=3)
    qm = quantize_model(model, [first, later], QuantConfig(wbits=3, solver="nearest"))
    assert "empty inputs" in qm.skipped["experts.2"] and "experts.1" in qm.layers
    for kwargs, rounded in (({"example": first}, {"experts.0"}),
                            ({"calibration": [first, later]}, {"experts.0", "experts.1"})):
        out, _ = rtn_model(model, config, **kwargs)
        for i in range(3):
            name = f"experts.{i}"
            same = torch.equal(out.experts[i].weight, model.experts[i].weight)
            assert same == (name not in rounded), (kwargs.keys(), name)
        assert not torch.equal(out.inp.weight, model.inp.weight)
