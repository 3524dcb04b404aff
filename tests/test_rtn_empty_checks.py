"""rtn_model and layers called with empty inputs (mutation testing, helper-145): a weight tied
to a layer never called goes to the called one and is rounded there; a layer whose first call
of a forward is empty and a later one is not is rounded; the later batches run only while a
layer still seems empty."""
import pytest
import torch
from torch import nn

from qround.baselines import rtn_model
from qround.calibrate import default_forward
from qround.pipeline import QuantConfig, quantize_model

from .test_baselines_late_checks import _EmptyCalls
from .test_pipeline_machinery import SkipsUnreached

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _x(rows, cols, seed=1):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


class _TiedToCalled(SkipsUnreached):
    """``spare``, never called and first in module order, holds e0's weight (tied)."""

    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(16, 4)
        self.spare.weight = self.e0.weight
        self._modules = {k: self._modules[k] for k in ("spare", "gate", "e0", "e1")}


def test_rtn_model_with_an_example_rounds_a_tied_weight_at_the_layer_that_calls_it():
    model = _TiedToCalled().eval()
    x = _x(16, 6)
    qm = quantize_model(model, [x], QuantConfig(wbits=3, solver="nearest", progress=False))
    assert "e0" in qm.layers and "tied" in qm.skipped["spare"]
    out, _ = rtn_model(model, QuantConfig(wbits=3), example=x)
    assert not torch.equal(out.e0.weight, model.e0.weight)
    assert max(len(row.unique()) for row in out.e0.weight) <= 8
    assert out.spare.weight is out.e0.weight     # still tied


class _EmptyThenFull(nn.Module):
    """``b`` is called twice per forward: first with no rows, then with all of them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = self.a(x)
        return self.b(h[:0]).sum() + self.b(h)


def test_a_layer_whose_first_call_is_empty_but_a_later_one_is_not_is_rounded():
    torch.manual_seed(0)
    model = _EmptyThenFull().eval()
    x = _x(16, 6)
    qm = quantize_model(model, [x], QuantConfig(wbits=3, solver="nearest", progress=False))
    assert "b" in qm.layers
    for kwargs in ({"example": x}, {"calibration": [x, _x(8, 6, 2)]}):
        out, _ = rtn_model(model, QuantConfig(wbits=3), **kwargs)
        assert not torch.equal(out.b.weight, model.b.weight), kwargs.keys()
        assert max(len(row.unique()) for row in out.b.weight) <= 8


def test_rtn_model_stops_forwarding_once_no_layer_seems_empty():
    """Batch 1 reaches the experts the first batch left empty: batches 2 and 3 are never
    forwarded (the docstring: the later batches run only while such a layer remains)."""
    torch.manual_seed(0)
    model = _EmptyCalls()
    batches = [_x(16, 8, seed) for seed in range(4)]
    batches[0][:, 0] = 0.0                                    # expert 0 only
    batches[1][:, 0] = (torch.arange(16) % 3).float()         # every expert
    seen = []

    def forward(m, batch):
        seen.append(next(i for i, b in enumerate(batches) if b is batch))
        return default_forward(m, batch)

    out, _ = rtn_model(model, QuantConfig(wbits=3), calibration=batches, forward=forward)
    assert all(not torch.equal(out.experts[i].weight, model.experts[i].weight)
               for i in range(3))
    assert 1 in seen and 2 not in seen and 3 not in seen, seen


def test_baselines_refuse_when_every_chosen_layer_gets_only_empty_inputs():
    """As quantize_model (helper-145: rtn_model and gptq_model returned the float model)."""
    from qround.baselines import gptq_model
    from qround.errors import QroundError

    from .test_pipeline_machinery import NeverRouted

    model, x = NeverRouted(), _x(16, 6)
    config = QuantConfig(wbits=3, layers="expert")
    match = "no chosen layer received a non-empty input.*'expert' called only with empty"
    with pytest.raises(QroundError, match=match):
        rtn_model(model, config, example=x)
    with pytest.raises(QroundError, match=match):
        rtn_model(model, config, calibration=[x, _x(16, 6, seed=2)])
    with pytest.raises(QroundError, match=match):
        gptq_model(model, [x], config)
    with pytest.raises(QroundError, match="no chosen layer received a non-empty input"):
        quantize_model(model, [x], QuantConfig(wbits=3, solver="nearest", layers="expert"))
