"""Bad input that used to pass silently or fail deep inside numpy/torch: each gets a clear
QroundError naming the problem (found by an adversarial audit of the public API)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qround import GridSpec, RoundingProblem, export, fit_grid, get_solver
from qround.errors import QroundError
from qround.grid import Grid
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig
from qround.scales import solve_refitting

from .conftest import make_problem


def test_solution_arrays_are_its_own():
    """Editing one solution's arrays must not change the problem's cached RTN costs."""
    p = make_problem(seed=3)
    a = get_solver("greedy").solve(p, seed=0)
    before = p.rtn_costs().copy()
    a.rtn_cost[:] = 0.0
    a.energy[:] = 0.0
    np.testing.assert_array_equal(p.rtn_costs(), before)
    b = get_solver("greedy").solve(p, seed=0)
    assert b.ratio < 1.0 and np.array_equal(b.rtn_cost, before)
    assert not p.rtn_costs().flags.writeable


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_reload(dtype, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).to(dtype)
    calib = [torch.randn(4, 16, dtype=dtype) for _ in range(2)]
    q = quantize_model(model, calib, QuantConfig(wbits=3, solver="greedy", progress=False))
    q.save(tmp_path / "h.safetensors")
    loaded = export.load(model, tmp_path / "h.safetensors")
    assert loaded[0].weight.dtype == dtype
    torch.testing.assert_close(loaded[0].weight, q.model[0].weight, rtol=0, atol=0)
    assert model[0].weight.dtype == dtype  # the float model is untouched


def test_config_numpy_scalars_become_python_ones_and_save(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8))
    cfg = QuantConfig(wbits=np.int64(3), seed=np.int64(2), refits=np.int64(1),
                      damp=np.float32(0.01), solver="greedy", progress=False)
    assert type(cfg.wbits) is int and type(cfg.seed) is int and type(cfg.damp) is float
    q = quantize_model(model, [torch.randn(8, 16)], cfg)
    q.save(tmp_path / "q.safetensors")
    assert export.read_metadata(tmp_path / "q.safetensors")["config"]["wbits"] == 3


@pytest.mark.parametrize("kwargs", [dict(granularity="modcap"), dict(granularity="loss", k=1),
                                    dict(granularity="scheme", scheme=("a", "b"))])
def test_unit_options_without_reconstruction_fail_when_built(kwargs):
    with pytest.raises(QroundError, match="reconstruction, which is off"):
        QuantConfig(**kwargs)
    QuantConfig(**kwargs, reconstruction=ReconstructConfig(iterations=3))


def test_labelled_dataloader_gets_a_hint():
    loader = DataLoader(TensorDataset(torch.randn(8, 16), torch.zeros(8)), batch_size=4)
    model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(QroundError, match=r"forward=lambda model, batch: model\(batch\[0\]\)"):
        quantize_model(model, loader, QuantConfig(solver="greedy", progress=False))
    q = quantize_model(model, loader, QuantConfig(solver="greedy", progress=False),
                       forward=lambda m, batch: m(batch[0]))
    assert q.model is not model


@pytest.mark.parametrize("seed", [-1, 1.5, "a", True])
def test_bad_seeds_are_named(seed):
    with pytest.raises(QroundError, match="seed must be"):
        get_solver("greedy").solve(make_problem(), seed=seed)


@pytest.mark.parametrize("make, match", [
    (lambda: GridSpec(symmetric="no"), "symmetric must be True or False"),
    (lambda: GridSpec(group_size=True), "group_size"),
    (lambda: GridSpec(shrink_steps=2.5), "shrink_steps"),
    (lambda: GridSpec(min_shrink="a"), "min_shrink"),
    (lambda: fit_grid(np.ones((8, 16)), GridSpec(symmetric=False), scale=np.ones(8),
                      zero_point=np.zeros((2, 4))), "zero_point must have shape"),
    (lambda: fit_grid(np.ones((8, 16)), GridSpec(symmetric=False), scale=np.ones(8),
                      zero_point=np.zeros(3)), "zero_point must have shape"),
    (lambda: fit_grid(np.ones((8, 16)), GridSpec(scale_method="mse-output"),
                      hessian=np.ones((5, 16))), "hessian shape"),
    (lambda: Grid(np.ones(8), np.zeros(8), 4, True, None, 16), r"\(out, groups\)"),
    (lambda: Grid(np.ones((8, 3)), np.zeros((8, 3)), 4, True, None, 16), "multiple of its 3"),
    (lambda: RoundingProblem.from_weight(np.ones((4, 6)), np.eye(6), damp="0.1"), "damp"),
    (lambda: RoundingProblem.from_weight(np.ones((4, 6)), np.eye(6), damp=None), "damp"),
    (lambda: make_problem(m=4, n=6).cost_of_codes(np.zeros((4, 6)), scale=np.ones(3)),
     "scale must have"),
    (lambda: ReconstructConfig(beta=3), "beta must be two positive numbers"),
    (lambda: get_solver("greedy+"), "empty part"),
    (lambda: get_solver("a++b"), "empty part"),
    (lambda: get_solver("|"), "empty part"),
])
def test_bad_arguments_are_named(make, match):
    with pytest.raises(QroundError, match=match):
        make()


def test_bfloat16_weights_are_read():
    w = torch.randn(4, 6).to(torch.bfloat16)
    p = RoundingProblem.from_weight(w, np.eye(6))
    np.testing.assert_array_equal(p.weight, w.double().numpy())


def test_solve_refitting_takes_a_registry_name():
    p = make_problem(seed=5)
    _, by_name = solve_refitting(p, "greedy", rounds=1, seed=0)
    _, by_solver = solve_refitting(p, get_solver("greedy"), rounds=1, seed=0)
    np.testing.assert_array_equal(by_name.codes, by_solver.codes)
    with pytest.raises(QroundError, match="Solver or a registry name"):
        solve_refitting(p, 3)
