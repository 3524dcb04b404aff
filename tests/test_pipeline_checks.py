"""Mutation-testing kills for qround.pipeline's configuration and selection side: override
matching, config checks and conversions, RNG handling, inplace vs copy, the report."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from qround import QroundError
from qround.pipeline import QuantConfig, quantize_model
from qround.solvers import Solver

from .test_pipeline import build

torch.set_num_threads(1)
BASE = dict(wbits=2, progress=False, solver="greedy")


# ----------------------------------------------------------------------------- the config
def test_an_override_pattern_is_searched_anywhere_in_the_name():
    # re.search, as documented: a pattern anchored at the end matches a layer whose name
    # starts otherwise
    config = QuantConfig(wbits=3, overrides={"_a$": {"wbits": 8}})
    assert config.override("head_a") == ("_a$", {"wbits": 8})
    assert config.layer_bits("head_a", end=False) == 8
    model, data = build("branchy")
    qm = quantize_model(model, data, QuantConfig(**BASE, overrides={"_a$": {"wbits": 8}}))
    assert {r.layer: r.bits for r in qm.report} == {"inp": 2, "head_a": 8, "head_b": 2,
                                                     "out": 2}


def test_numpy_bools_become_python_bools():
    config = QuantConfig(symmetric=np.bool_(False), bias_correction=np.bool_(True),
                         widen=np.bool_(False), progress=np.bool_(False))
    for name in ("symmetric", "bias_correction", "widen", "progress"):
        assert type(getattr(config, name)) is bool
    assert config.symmetric is False and config.bias_correction is True
    json.dumps(config.as_dict())   # saved with the model


def test_a_bool_seed_is_refused():
    with pytest.raises(QroundError, match="seed must be"):
        QuantConfig(seed=True)


@pytest.mark.parametrize("name", ["layers", "exclude"])
def test_a_layer_pattern_that_is_not_a_string_is_named(name):
    with pytest.raises(QroundError, match=f"{name} must be a regex string"):
        QuantConfig(**{name: 5})


def test_progress_must_be_a_bool():
    with pytest.raises(QroundError, match="progress must be True or False"):
        QuantConfig(progress=1)


def test_a_group_size_that_covers_every_input_is_accepted():
    # group_size >= a layer's inputs: one group over them all (check_group_sizes' "or covers
    # them all"); branchy's layers have 12 and 16 inputs
    model, data = build("branchy")
    qm = quantize_model(model, data, QuantConfig(**BASE, group_size=32))
    assert list(qm.layers) == ["inp", "head_a", "head_b", "out"]


# ----------------------------------------------------------------------------- the run
class Draws(Solver):
    """Rounding-to-nearest that records the first draw of the generator each problem gets."""

    name = "draws"

    def __init__(self):
        self.draws = {}

    def _solve(self, problem, start, rng):
        self.draws[problem.name] = rng.random()
        return start


def _draws(seed):
    model, data = build("branchy")
    solver = Draws()
    quantize_model(model, data, QuantConfig(**{**BASE, "solver": solver}, seed=seed))
    return solver.draws


def test_config_seed_reaches_every_layers_solver():
    a, again, b = _draws(0), _draws(0), _draws(1)
    assert list(a) == ["inp", "head_a", "head_b", "out"]
    assert a == again                        # the seed decides the draws...
    assert all(a[k] != b[k] for k in a)      # ...and another seed changes them
    assert len(set(a.values())) == len(a)    # each layer has a stream of its own


def test_totals_count_the_skipped_modules():
    model, data = build("branchy")
    qm = quantize_model(model, data, QuantConfig(**BASE, exclude="_b$"))
    t = qm.totals()
    assert (t["layers"], t["skipped"]) == (3, 1)
    assert t["ratio"] == pytest.approx(t["cost"] / t["rtn_cost"])
    assert "3 layers quantised, 1 left in float" in qm.table()


def test_weights_on_the_grid_report_a_ratio_of_one():
    """RTN is exact on weights already on the grid: the costs are round-off, which the report
    reads as Solution.ratio does (within cost_noise: 1.0, never 0.0 for 0 / 6e-16)."""
    rng = np.random.default_rng(5)
    codes = rng.integers(-3, 4, size=(6, 12))
    codes[:, 0] = 3                       # every row reaches qmax: min-max finds the scales
    lin = nn.Linear(12, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(codes * rng.uniform(0.05, 0.2, size=(6, 1))))
    data = [torch.randn(16, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    qm = quantize_model(nn.Sequential(lin), data,
                        QuantConfig(**{**BASE, "wbits": 3, "scale_method": "minmax"}))
    [row] = qm.report
    assert row.ratio == 1.0 and qm.totals()["ratio"] == 1.0
    assert abs(row.rtn_cost) <= row.cost_noise and row.as_dict()["cost_noise"] > 0
    assert "cost_noise" not in qm.table()     # data for the ratio, not a column to read
    # summed round-off: 0 against 6e-16 is no improvement over RTN
    exact = dataclasses.replace(row, cost=0.0, rtn_cost=6e-16)
    assert dataclasses.replace(qm, report=[exact, exact]).totals()["ratio"] == 1.0
    relative = dataclasses.replace(row, cost=-2.0, rtn_cost=-1.0, cost_noise=0.0)
    assert np.isnan(dataclasses.replace(qm, report=[relative]).totals()["ratio"])


def test_inplace_asymmetric_statistics_come_from_a_float_copy():
    # inplace=True writes into the given model: the float inputs of the asymmetric target must
    # come from a copy taken before, so the codes are those of a run on a copy
    model, data = build("branchy")
    config = QuantConfig(**BASE, inputs="asymmetric")
    ref = quantize_model(model, data, config)
    qm = quantize_model(model, data, config, inplace=True)
    assert qm.model is model
    for name, qw in ref.layers.items():
        np.testing.assert_array_equal(qm.layers[name].codes, qw.codes)


def test_a_forward_drawing_from_torch_follows_the_config_seed():
    model = nn.Linear(8, 4)
    data = [torch.randn(6, 8, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    seen = []

    def forward(m, batch):   # draws from torch's global generator, as a noisy model would
        seen.append(torch.rand(()).item())
        return m(batch)

    runs = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        state = torch.get_rng_state()
        seen.clear()
        quantize_model(model, data, QuantConfig(**BASE, seed=5), forward=forward)
        assert torch.equal(torch.get_rng_state(), state)     # the caller's, restored
        runs.append(list(seen))
    assert runs[0] and runs[0] == runs[1]
    assert runs[0][0] == torch.rand((), generator=torch.Generator().manual_seed(5)).item()


def test_a_config_that_is_not_a_quantconfig_is_named():
    model, data = build("branchy")
    with pytest.raises(QroundError, match="config must be a QuantConfig"):
        quantize_model(model, data, {"wbits": 4})


def test_an_older_files_asymmetric_setting_must_be_a_bool():
    assert QuantConfig.from_dict({"asymmetric": True}).inputs == "asymmetric"
    assert QuantConfig.from_dict({"asymmetric": False}).inputs == "float"
    with pytest.raises(QroundError, match="'asymmetric'.*must be one of"):
        QuantConfig.from_dict({"asymmetric": 1})


def test_a_forward_drawing_from_numpy_follows_every_bit_of_the_seed():
    """numpy's legacy seed takes 32-bit words: seeds 0 and 2**32 must not give the same draws,
    and a seed below 2**32 gives np.random.seed(seed)'s draws as before."""
    model = nn.Linear(8, 4)
    data = [torch.randn(6, 8, generator=torch.Generator().manual_seed(0))]
    seen = []

    def forward(m, batch):
        seen.append(float(np.random.rand()))
        return m(batch)

    firsts = {}
    for seed in (0, 2 ** 32, 2 ** 64 - 1):
        seen.clear()
        quantize_model(model, data, QuantConfig(**BASE, seed=seed), forward=forward)
        firsts[seed] = seen[0]
    assert len(set(firsts.values())) == 3
    assert firsts[0] == np.random.RandomState(0).rand()


def test_a_group_size_refusal_names_every_layer_it_fails_and_the_override_that_fixes_it():
    """Depthwise convs (9 inputs) refuse a group size of 8 one layer after another unless the
    message names them all (helper-152); the one override it shows, in Python and for the
    shell, makes the run work, also for dotted names (helper-153: the shell form was the
    pattern's repr, whose doubled backslashes matched nothing)."""
    import re as _re
    import shlex

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(4, 8, 3, groups=4)),
                          nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))
    batches = [torch.randn(4, 4, 8, 8)]
    config = QuantConfig(wbits=4, group_size=8, progress=False, solver="nearest")
    with pytest.raises(QroundError) as info:
        quantize_model(model, batches, config)
    text = str(info.value)
    assert "group_size=8 does not divide the 9 inputs of layer '0.0'; nor those of 1 more: " \
           "'1' (9)" in text
    python = _re.search(r"overrides=\[\((.*?), \{'group_size': None\}\)\]", text).group(1)
    shell = shlex.split(_re.search(r"shell: (--override .*? group_size=none)\)", text).group(1))
    assert shell[0] == "--override" and shell[1] == eval(python)
    fixed = dataclasses.replace(config, overrides=[(shell[1], {"group_size": None})])
    assert set(quantize_model(model, batches, fixed).layers) == {"0.0", "1", "3"}


@pytest.mark.parametrize("inputs", ["float", "asymmetric"])
def test_a_depthwise_conv_is_solved_as_one_problem_with_the_per_group_answer(inputs,
                                                                            monkeypatch):
    """quantize_model merges a depthwise conv's groups into one problem (merge_groups='auto'):
    with a deterministic solver the codes are the per-group problems' codes; asymmetric
    statistics (a shared H needed) keep one problem per group and still run."""
    from qround.calibrate import capture_hessians
    from qround.problems import problems_from_layer
    from qround.solvers import get_solver
    from qround.writeback import quantized_weight
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 12, 1), nn.Conv2d(12, 12, 3, groups=12, padding=1)
                          ).double()
    batches = [torch.randn(8, 12, 6, 6, dtype=torch.float64) for _ in range(2)]
    for b in batches:
        b[:, 1:] += 0.6 * b[:, :-1].clone()
    import qround.pipeline as pipeline
    made = []
    real = pipeline.problems_from_layer

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pipeline, "problems_from_layer", spy)
    config = QuantConfig(wbits=3, solver="gptq", inputs=inputs, progress=False)
    qm = quantize_model(model, batches, config)
    # the second layer's statistics pair float and quantised inputs when asymmetric
    assert [len(m) for m in made] == [1, 12 if inputs == "asymmetric" else 1]
    if inputs == "asymmetric":
        assert qm.layers["1"].codes.shape == (12, 9)
        return
    h = capture_hessians(model, batches, layers=["1"])["1"]
    apart = problems_from_layer(model[1], h, config.grid_spec(3), "1")
    assert len(apart) == 12
    solver = get_solver("gptq")
    expect = quantized_weight(apart, [solver.solve(p, seed=0) for p in apart], model[1])
    np.testing.assert_array_equal(qm.layers["1"].codes, expect.codes)
    np.testing.assert_array_equal(qm.layers["1"].scale, expect.scale)


def test_bias_correction_takes_a_group_whose_inputs_are_constant():
    """Centred statistics of a group whose inputs never vary are round-off (helper-154): they
    failed the PSD check against their own tiny scale.  Now they are zeros, and the bias takes
    the group's error, which is all mean."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2))
    batches = [torch.randn(16, 4, 6, 6) for _ in range(2)]
    for b in batches:
        b[:, 2], b[:, 3] = 0.3, 0.7
    qm = quantize_model(model, batches, QuantConfig(wbits=2, solver="greedy",
                                                    bias_correction=True, progress=False))
    assert not torch.equal(qm.model[0].weight[2:], model[0].weight[2:])   # really rounded
    with torch.no_grad():
        err = qm.model(batches[0]) - model(batches[0])
    assert float(err[:, 2:].abs().max()) < 1e-6          # the constant group: bias took it all
    assert float(err[:, :2].abs().max()) > 1e-3          # the other group: a real error left
