"""rtn_model(calibration=) follows every batch, as quantize_model (helper-142)."""
import pytest
import torch

from qround.baselines import rtn_model
from qround.pipeline import QuantConfig

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
