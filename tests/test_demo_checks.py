"""qround.demo's run_demo on a tiny stand-in for MiniLM (the zoo's loader, batches and forward
replaced), so the demo's own choices (channels, bits, seed, journey, header) are checked fast."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qround.zoo
from qround import demo
from qround.errors import QroundError
from qround.solvers import available_solvers

LAYERS = ("net.encoder.0", "net.encoder.2")     # 6 and 10 output channels


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Module()
        self.net.encoder = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 10))

    def forward(self, x):
        return self.net.encoder(x)


@pytest.fixture
def tiny(monkeypatch):
    torch.manual_seed(0)
    model = _Tiny().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 8, generator=gen) for _ in range(3)]
    monkeypatch.setattr(qround.zoo, "load_minilm", lambda *a, **k: model, raising=False)
    monkeypatch.setattr(qround.zoo, "minilm_batches", lambda m, texts, *a, **k: batches,
                        raising=False)
    monkeypatch.setattr(qround.zoo, "minilm_forward", lambda m, b: m(b), raising=False)
    return model, batches


@pytest.fixture
def spy(monkeypatch):
    """Every solve of a demo layer's problem: (solver name, problem, seed)."""
    calls = []
    real = demo.get_solver

    class Spy:
        def __init__(self, name):
            self.name, self.inner = name, real(name)

        def solve(self, problem, *args, **kwargs):
            if problem.name in LAYERS:
                calls.append((self.name, problem, kwargs.get("seed")))
            return self.inner.solve(problem, *args, **kwargs)

        def __getattr__(self, item):
            return getattr(self.inner, item)

    monkeypatch.setattr(demo, "get_solver", Spy)
    return calls


def _run(**kwargs):
    options = dict(channels=4, solvers="nearest", layers=LAYERS, sentences=8, threads=1,
                   progress=False, journey=None)
    options.update(kwargs)
    return demo.run_demo(**options)


def test_demo_solvers_are_the_registered_ones_but_the_dimod_alias():
    names = demo.demo_solvers()
    assert "dimod" in available_solvers() and "dimod" not in names
    assert names == [n for n in available_solvers() if n != "dimod"]


@pytest.mark.parametrize("channels, says", [
    (5, "first 5 output channels per layer;"),
    (6, "first 6 output channels per layer (all of a narrower one);"),
    (10, "every output channel;"),
])
def test_header_names_the_channels_solved(tiny, channels, says):
    result = _run(channels=channels)
    assert says in result["table"]
    assert [r["shape"][0] for r in result["records"]] == [min(channels, 6), min(channels, 10)]


def test_zero_channels_are_refused(tiny):
    with pytest.raises(QroundError, match="channels must be >= 1"):
        _run(channels=0)


def test_each_solver_gets_the_first_channels_at_the_given_bits_and_seed(tiny, spy):
    model, _ = tiny
    result = _run(channels=3, bits=3, seed=7, solvers="nearest,greedy")
    assert [(name, p.name) for name, p, _ in spy] == [(s, layer) for layer in LAYERS
                                                      for s in ("nearest", "greedy")]
    modules = dict(model.named_modules())
    for _, problem, seed in spy:
        assert seed == 7 and problem.grid.bits == 3
        np.testing.assert_array_equal(
            problem.weight, modules[problem.name].weight.detach().double().numpy()[:3])
    assert result["bits"] == 3 and "3-bit per-channel" in result["table"]
    assert [r["layer"] for r in result["records"]] == ["0", "0", "2", "2"]


@pytest.mark.parametrize("journey", [None, "none"])
def test_no_journey_stops_after_the_table(tiny, journey, monkeypatch):
    monkeypatch.setattr(demo, "run_journey", lambda *a, **k: pytest.fail("journey ran"))
    assert "journey" not in _run(journey=journey)


def test_the_journey_gets_the_demos_seed(tiny, monkeypatch):
    seen = {}

    def journey(model_name, **kwargs):
        seen.update(kwargs, model=model_name)
        return {"table": "\nJOURNEY", "metrics": {}, "report": []}

    monkeypatch.setattr(demo, "run_journey", journey)
    result = _run(journey="digits-cnn", seed=5)
    assert seen["model"] == "digits-cnn" and seen["seed"] == 5
    assert result["table"].endswith("\nJOURNEY") and result["journey"]["model"] == "digits-cnn"


def test_the_demo_times_the_whole_solve_call_on_a_prepared_problem(tiny, monkeypatch):
    """Solution.seconds leaves a bare solver's setup and final check out and a composite's
    inner ones in; the demo now takes the whole call, as qround bench does (helper-160)."""
    import time as _time

    real = demo.get_solver

    class Slow:
        def __init__(self, name):
            self.inner = real(name)

        def solve(self, problem, *args, **kwargs):
            assert {"rtn_energies", "rtn_costs", "cost_noise"} <= set(problem._cache)
            sol = self.inner.solve(problem, *args, **kwargs)
            _time.sleep(0.05)         # after the solver's own clock has stopped
            return sol

        def __getattr__(self, item):
            return getattr(self.inner, item)

    monkeypatch.setattr(demo, "get_solver", Slow)
    result = _run(solvers="nearest")
    seconds = [r["seconds"] for r in result["records"]]
    assert len(seconds) == len(LAYERS) and min(seconds) >= 0.05
