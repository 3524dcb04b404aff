"""Sensitivity allocation cases the first tests left open (found by mutation testing,
helper-120)."""
import numpy as np
import pytest
import torch
from torch import nn

from qround import QroundError
from qround.pipeline import QuantConfig, quantize_model
from qround.sensitivity import LayerSensitivity, Sensitivity, layer_sensitivity

from .test_sensitivity import _Tokens, fake

torch.set_num_threads(1)


class _TwoIn(torch.nn.Module):
    """Two first layers read the model's input; then a middle and a last layer."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(6, 8)
        self.mid, self.out = torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], -1)
        return self.out(torch.relu(self.mid(h)))


def test_first_last_bits_hold_every_layer_reading_the_first_input():
    """quantize_model holds the first layer *and every layer reading its input* at
    first_last_bits: the measurement must hold the same layers (not allocate `b`)."""
    model = _TwoIn()
    cal = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    config = QuantConfig(first_last_bits=8, wbits=2, solver="greedy", progress=False)
    sens = layer_sensitivity(model, cal, config, bits=(2, 3))
    assert {s.name: s.held for s in sens.layers} == {"a": 8, "b": 8, "mid": None, "out": 8}
    qm = quantize_model(model, cal, config)
    report = {r.layer: r.bits for r in qm.report}
    assert all(report[s.name] == s.held for s in sens.layers if s.held is not None)


def test_a_tokenised_b_t_output_is_scored_at_its_real_tokens():
    """A (B, T) output (one score per token) is masked too: padding must not count."""
    gen = torch.Generator().manual_seed(1)
    model = _Tokens()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cal = [{"x": torch.randn(2, 5, 6, generator=gen), "attention_mask": mask}]

    def fwd(m, b):
        return m(**b)[..., 0]          # (B, T)

    with pytest.warns(UserWarning, match="padded .*does not mask"):   # in the statistics
        sens = layer_sensitivity(model, cal, QuantConfig(), bits=(2,), forward=fwd)
    ref = fwd(model, cal[0]).double().detach()
    ref_real = ref[mask.bool()]
    # reference computed by hand for the layer "b"
    import copy
    from qround.grid import fit_grid
    from qround.problems.layers import layer_weight
    for s in sens.layers:
        q = copy.deepcopy(model)
        mod = dict(q.named_modules())[s.name]
        w = layer_weight(mod)
        grid = fit_grid(w, QuantConfig().grid_spec(2, s.name))
        with torch.no_grad():
            mod.weight.copy_(torch.as_tensor(grid.dequantize(grid.quantize(w))))
            out = fwd(q, cal[0]).double()
        expected = float(((out[mask.bool()] - ref_real) ** 2).sum() / (ref_real ** 2).sum())
        assert s.errors[2] == pytest.approx(expected, rel=1e-6)


def test_outputs_that_change_count_between_passes_are_refused():
    """A forward whose outputs change between passes is refused, not compared pairwise by
    zip (which would drop the extra tensors silently)."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    cal = [torch.randn(5, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calls = [0]

    def fwd(m, b):
        calls[0] += 1
        y = m(b)
        return (y,) if calls[0] % 2 else (y, y * 2)

    with pytest.raises(QroundError, match="changed shape between passes"):
        layer_sensitivity(model, cal, QuantConfig(capture_cache_mb=0), bits=(2,), forward=fwd)


def test_layer_names_with_regex_characters_get_their_width():
    """The allocation's patterns name the layers exactly (re.escape): a ModuleDict key such as
    'w+' or 'x(1)' must still get its width from allocation.config."""
    bits = (2, 4)
    names = ["w+", "x(1)", "a.b"]
    layers = tuple(LayerSensitivity(n, 100, {2: e, 4: e / 10})
                   for n, e in zip(names, (0.5, 0.4, 0.3)))
    sens = Sensitivity(layers, bits, QuantConfig(), 0.0)
    alloc = sens.allocate(3.4)
    assert len(set(alloc.bits.values())) == 2
    for n in names:
        pattern, options = alloc.config.override(n)
        assert pattern is not None and options["wbits"] == alloc.bits[n], (n, pattern)
    # and no pattern matches a name it does not list ('a.b' must not match 'aXb')
    for pattern, options in alloc.overrides:
        import re
        assert not re.search(pattern, "aXb") and not re.search(pattern, "ww")


def test_config_patterns_of_free_layers_are_not_repeated():
    """Only the config's patterns that still apply to a held layer are kept after the exact
    patterns (the others are shadowed: repeating them in the printed command is noise)."""
    config = QuantConfig(overrides={"^l0$": {"wbits": 8}, "l[12]": {"group_size": None}})
    sens = fake([None, [0.5, 0.2, 0.1, 0.0], [0.5, 0.45, 0.3, 0.0]], [100, 100, 100],
                held={0: 8}, config=config)
    alloc = sens.allocate(5.0)
    patterns = [p for p, _ in alloc.overrides]
    assert "l[12]" not in patterns and patterns[-1] == "^l0$"


def test_greedy_fallback_uses_an_upgrade_that_fits_exactly(monkeypatch):
    """When HiGHS and the dynamic programme give nothing, the greedy fallback may spend the
    budget to the last weight-bit."""
    import qround.sensitivity as sensitivity

    monkeypatch.setattr(sensitivity, "_milp_choice", lambda *a: None)
    monkeypatch.setattr(sensitivity, "_pareto_choice", lambda *a, **k: None)
    sens = fake([[0.5, 0.2, 0.1, 0.01]], [100])
    assert sens.allocate(4.0).bits == {"l0": 4}
    assert sens.allocate(8.0).bits == {"l0": 8}


def test_passes_reseed_numpy_with_every_bit_of_the_seed():
    from qround.sensitivity import _reseed

    state = np.random.get_state()
    try:
        draws = []
        for seed in (0, 2 ** 32, 2 ** 64 - 1):
            _reseed(nn.Linear(2, 2), seed)
            draws.append(float(np.random.rand()))
    finally:
        np.random.set_state(state)
    assert len(set(draws)) == 3
    assert draws[0] == np.random.RandomState(0).rand()


def test_settings_the_measurement_leaves_out_are_warned():
    """abits and reconstruction do not enter the measurement: said, not ignored silently
    (helper-159)."""
    from qround.reconstruct import ReconstructConfig

    model = _TwoIn()
    cal = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.warns(UserWarning, match="abits and reconstruction do not enter"):
        a = layer_sensitivity(model, cal, QuantConfig(abits=4, reconstruction=ReconstructConfig(
            iterations=2)), bits=(2,))
    b = layer_sensitivity(model, cal, QuantConfig(), bits=(2,))
    assert [s.errors for s in a.layers] == [s.errors for s in b.layers]
