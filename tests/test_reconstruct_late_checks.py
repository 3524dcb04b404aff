"""Block reconstruction of units that a later calibration batch reaches first (helper-142)."""
import pytest
import torch
from torch import nn

from qround import GridSpec, QroundError
from qround.activations import insert_act_quantizers
from qround.reconstruct import ReconstructConfig, Unit, plan_units, reconstruct

from .test_pipeline_machinery import SkipsUnreached, _late_expert_batches
from .test_reconstruct_checks import FAST, _Routed, _routed_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quantised(net, batches):
    return insert_act_quantizers(net, None, 3, calib_batches=batches,
                                 weights=GridSpec(bits=2, symmetric=False))


def test_without_the_capture_cache_a_unit_the_first_batch_skips_is_trained():
    net, batches = _Routed(), _routed_batches()
    q = _quantised(net, batches)
    config = ReconstructConfig(iterations=20, batch_size=8, seed=3, capture_cache_mb=0)
    result = reconstruct(net, q, batches, None, config)
    assert [r.block for r in result.blocks] == ["a", "b", "out"]
    with torch.no_grad():
        y = torch.cat([net.b(torch.relu(net.a(x))) for x in batches[1:]])
    assert result.blocks[1].target_power == pytest.approx(float((y.double() ** 2).mean()),
                                                          rel=1e-5)


@pytest.mark.parametrize("cache_mb", [1024.0, 0.0])
def test_a_unit_only_the_last_batch_reaches_is_ordered_and_trained(cache_mb):
    net, batches = _Routed(), _routed_batches()
    batches[1][:, 0] = -1.0                 # only batch 2 reaches b
    q = _quantised(net, batches)
    assert plan_units(net, q, batches, None) == [Unit(("a",)), Unit(("b",)), Unit(("out",))]
    config = ReconstructConfig(iterations=20, batch_size=8, seed=3, capture_cache_mb=cache_mb)
    result = reconstruct(net, q, batches, None, config)
    assert [r.block for r in result.blocks] == ["a", "b", "out"]
    with torch.no_grad():
        y = net.b(torch.relu(net.a(batches[2])))
    assert result.blocks[1].target_power == pytest.approx(float((y.double() ** 2).mean()),
                                                          rel=1e-5)


def test_reconstruct_refuses_parallel_experts_in_one_unit_when_the_first_batch_skips_one():
    model = SkipsUnreached()
    batches = _late_expert_batches(model)     # batch 0 reaches only e0
    q = insert_act_quantizers(model, ["e0", "e1"], 4, calib_batches=batches,
                              weights=GridSpec(bits=2))
    with pytest.raises(QroundError, match=r"the output of \['e0'\] does not reach 'e1'"):
        reconstruct(model, q, batches, [["e0", "e1"]], ReconstructConfig(iterations=2))


class _RoutedPair(nn.Module):
    """``sub`` (two layers) runs on a batch whose mean first feature is above ``threshold``."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
        self.sub = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.threshold = 0.0

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x[:, 0].mean() > self.threshold:
            h = torch.relu(self.sub(h))
        return self.out(h)


def test_a_joint_unit_the_quantised_copy_skips_on_a_batch_the_float_model_calls_warns(
        caplog):
    """The joint unit's input is taken at ``sub`` (its common ancestor), which the quantised
    copy skips on batch 1 while the float model calls it: weight-dependent routing, named."""
    torch.manual_seed(0)
    net, batches = _RoutedPair(), _routed_batches()     # feature 0: -1, 1, 2
    q = _quantised(net, batches)
    q.threshold = 1.5       # the copy calls sub on batch 2 only, the float model on 1 and 2
    with caplog.at_level("WARNING", logger="qround.reconstruct"):
        result = reconstruct(net, q, batches, [["sub.0", "sub.2"]], FAST)
    assert "calibration batches [1] call it in only one" in caplog.text
    with torch.no_grad():
        y = net.sub(torch.relu(net.a(batches[2])))
    joint = [r for r in result.blocks if r.block.startswith("sub")][0]
    assert joint.target_power == pytest.approx(float((y.double() ** 2).mean()), rel=1e-5)


class _TwiceOnNegative(nn.Module):
    """``a`` runs twice on a batch whose mean first feature is negative, once otherwise; ``b``
    only on a batch whose mean first feature is positive."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x[:, 0].mean() < 0:
            h = torch.relu(self.a(h))
        if x[:, 0].mean() > 0:
            h = torch.relu(self.b(h))
        return self.out(h)


def test_a_block_called_twice_on_the_first_batch_is_named_though_later_batches_call_it_once(
        caplog):
    torch.manual_seed(0)
    net, batches = _TwiceOnNegative(), _routed_batches()     # feature 0: -1, 1, 2
    q = _quantised(net, batches)
    with caplog.at_level("WARNING", logger="qround.reconstruct"):
        units = plan_units(net, q, batches, None)
    assert [u.name for u in units] == ["a", "b", "out"]
    assert "blocks ['a'] are called more than once per forward" in caplog.text
