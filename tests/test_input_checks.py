"""Bad input that used to pass silently or fail deep inside numpy/torch: each gets a clear
QroundError naming the problem (found by an adversarial audit of the public API)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("conv", [False, True])
def test_half_precision_models_take_borders_and_reconstruction(dtype, conv, tmp_path):
    """The quantisers' step and borders stay float32: a float16/bfloat16 input is rounded there
    and cast back (mat1/mat2 and conv bias dtype errors before)."""
    g = torch.Generator().manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3))
        x = torch.randn(8, 3, 6, 6, generator=g)
    else:
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        x = torch.randn(32, 8, generator=g)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.5
    cfg = QuantConfig(wbits=4, abits=4, borders="linear", solver="greedy", progress=False,
                      reconstruction=ReconstructConfig(iterations=5))
    with torch.no_grad():
        reference = quantize_model(model, [x], cfg).model(x)
        half = model.to(dtype)
        q = quantize_model(half, [x.to(dtype)], cfg)
        out = q.model(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    # the same rounding up to the half-precision inputs and products: close to float32's run
    scale = float(reference.abs().max())
    assert float((out.float() - reference).abs().max()) < 0.15 * scale
    q.save(tmp_path / "h.safetensors")
    loaded = export.load(half, tmp_path / "h.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x.to(dtype)), out)


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
    (lambda: ReconstructConfig(beta=(True, 2.0)), r"beta\[0\] must be a finite number, got the "
     "bool True"),
    (lambda: ReconstructConfig(warmup="0.1"), "warmup must be a finite number, got '0.1'"),
    (lambda: ReconstructConfig(warmup=1.0), r"warmup must lie in \[0, 1\), got 1.0"),
    (lambda: ReconstructConfig(warmup=10 ** 400), r"warmup must be a finite number, got "
     r"10{56}\.\.\.$"),   # not all 401 digits
    (lambda: ReconstructConfig(qdrop=None), "qdrop must be a finite number, got None"),
    (lambda: ReconstructConfig(qdrop=False), "qdrop must be a finite number, got the bool False"),
    (lambda: ReconstructConfig(qdrop=float("nan")), "qdrop must be a finite number"),
    (lambda: ReconstructConfig(qdrop=-0.5), r"qdrop must lie in \[0, 1\], got -0.5"),
    (lambda: ReconstructConfig(reg_weight=True), "reg_weight must be a finite number, got the "
     "bool"),
    (lambda: ReconstructConfig(beta=(20.0, 0)), r"beta\[1\] must lie in \(0, inf\), got 0"),
    # a string is true: "False" would have trained the weights
    (lambda: ReconstructConfig(train_weights="False"), "train_weights must be True or False"),
    (lambda: ReconstructConfig(train_borders=1), "train_borders must be True or False"),
    (lambda: make_problem(m=4, n=6).subproblem(slice("a", None)), "a slice takes integers"),
    (lambda: make_problem(m=4, n=6).restrict(slice(0, 2.5), np.zeros((4, 6))),
     "a slice takes integers"),
    (lambda: make_problem(m=4, n=6).subproblem(slice(0, torch.tensor(True))),
     "a slice takes integers"),
    (lambda: make_problem(m=4, n=6).subproblem(slice(np.True_, None)), "a slice takes integers"),
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


# ------------------------------------------- found by the eleventh session's reviews (helpers)
def _quick(**kw):
    return QuantConfig(wbits=2, solver="greedy", progress=False, **kw)


@pytest.mark.parametrize("wrap, match", [
    (lambda m: torch.nn.utils.parametrizations.weight_norm(m), "parametrized"),
    (lambda m: torch.nn.utils.parametrizations.spectral_norm(m), "parametrized"),
    (lambda m: prune.l1_unstructured(m, "weight", 0.5), "not a parameter"),
])
def test_weights_computed_from_other_tensors_are_refused(wrap, match):
    """Writing into a recomputed weight is lost: the model kept its float weights while the
    report said they were rounded."""
    torch.manual_seed(0)
    model = nn.Sequential(wrap(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QroundError, match=match):
        quantize_model(model, [torch.randn(16, 8)], _quick())
    # leaving it out works, where the model can be copied (pruning's weight cannot)
    if match == "parametrized":
        q = quantize_model(model, [torch.randn(16, 8)], _quick(exclude=r"^0$"))
        assert list(q.layers) == ["2"]
    else:
        with pytest.raises(QroundError, match="cannot copy the model.*prune.remove"):
            quantize_model(model, [torch.randn(16, 8)], _quick(exclude=r"^0$"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_lazy_layer_is_refused_before_any_work():
    model = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(QroundError, match="lazy module"):
        quantize_model(model, [torch.randn(8, 6)], _quick())


@pytest.mark.parametrize("batch", [{"x": torch.randn(4, 8)}, "text"])
def test_a_single_batch_that_is_not_a_list_is_named(batch):
    with pytest.raises(QroundError, match="wrap a single batch in a list"):
        quantize_model(nn.Sequential(nn.Linear(8, 4)), batch, _quick())


class _Tied(nn.Module):
    def __init__(self, embed: bool):
        super().__init__()
        self.emb = nn.Embedding(10, 8) if embed else None
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 10, bias=False)
        if embed:
            self.head.weight = self.emb.weight   # as a language model's tied head

    def forward(self, x):
        x = self.emb(x).mean(1) if self.emb is not None else x
        return self.head(self.b(torch.relu(self.a(x))))


def test_tied_weights_are_rounded_once_and_never_behind_a_float_module():
    torch.manual_seed(0)
    model = _Tied(embed=False)
    q = quantize_model(model, [torch.randn(16, 8)], _quick())
    assert list(q.layers) == ["a", "head"] and "tied" in q.skipped["b"]
    assert q.model.b.weight is q.model.a.weight
    assert torch.equal(q.model.a.weight,
                       torch.as_tensor(q.layers["a"].dequantized, dtype=torch.float32))
    assert model.b.weight is model.a.weight and not torch.equal(model.a.weight,
                                                                q.model.a.weight)
    # a head tied to an embedding (which is left in float) stays in float too
    model = _Tied(embed=True)
    before = model.emb.weight.clone()
    q = quantize_model(model, [torch.randint(0, 10, (16, 3))], _quick())
    assert "head" not in q.layers and "stays in float" in q.skipped["head"]
    assert torch.equal(q.model.emb.weight, before) and torch.equal(model.emb.weight, before)
    # choosing only that head leaves nothing, and the error gives the head's reason first
    with pytest.raises(QroundError, match=r"tied weights\): 'head': shares its weight with "
                                          r"'emb'"):
        quantize_model(model, [torch.randint(0, 10, (16, 3))], _quick(layers="head"))


class _Noisy(nn.Module):
    """A model that samples in its forward (noise injection, a VAE's latent)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.a(x) + 0.3 * torch.randn(x.shape[0], 8))


def test_random_draws_of_the_forward_use_the_config_seed_not_the_callers_state():
    import random

    torch.manual_seed(0)
    model, calib = _Noisy(), [torch.randn(16, 8) for _ in range(2)]
    codes = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        random.seed(global_seed)
        states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        q = quantize_model(model, calib, _quick())
        assert torch.equal(torch.get_rng_state(), states[0])
        assert np.array_equal(np.random.get_state()[1], states[1])
        assert random.getstate() == states[2]
        codes.append({k: v.codes for k, v in q.layers.items()})
    assert codes[0].keys() == codes[1].keys()
    assert all(np.array_equal(codes[0][k], codes[1][k]) for k in codes[0])


def test_a_torch_device_in_the_config_is_saved_as_text(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4))
    q = quantize_model(model, [torch.randn(8, 8)], _quick(device=torch.device("cpu")))
    assert q.config.device == "cpu"
    q.save(tmp_path / "m.safetensors")
    assert export.read_metadata(tmp_path / "m.safetensors")["config"]["device"] == "cpu"


_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, match", [
    ("Stochastic(samples=2.5)", "samples must be an integer"),
    ("Exact(block_bits=-1)", "block_bits must be an integer >= 1"),
    ("Exact(max_free=31)", "max_free must lie in 1..30"),
    ("DimodSolver('dwave-steepest', channels=3)", "channels must be None or a non-empty list"),
    ("Tabu(iters_per_var=_INF)", "iters_per_var must be a finite number"),
    ("GPTQ(damp=_NAN)", "damp must be a finite number"),
    ("GPTQ(block='3')", "block must be an integer"),
    ("Relaxation(beta=(_NAN, 2.0))", r"beta\[0\] must be a finite number"),
    ("Relaxation(beta=3)", "beta must be a .start, end. pair"),
    ("Relaxation(lr=-1)", r"lr must lie in \(0, 1000.0\]"),
    ("HopfieldClassic(temperature=(1.0, _INF))", r"temperature\[1\] must be a finite number"),
    ("CrossEntropy(tol=_NAN)", "tol must be a finite number"),
    ("CrossEntropy(elite=0)", r"elite must lie in \(0, 1\]"),
    ("Greedy(max_iter='3')", "max_iter must be an integer >= 1 or None"),
    ("MeanField(beta=(10.0, 1.0))", "beta must grow"),
    ("MeanField(damping=_NAN)", "damping must be a finite number"),
    ("get_solver('fast', x=1)", "solver 'fast' does not take \\['x'\\]"),
    ("Grid(np.ones((2, 1)), np.full((2, 1), 0.5), 3, False, None, 4)", "zero_point must be "
                                                                        "integers"),
    ("Grid(np.ones((2, 1)), np.ones((2, 1)), 3, True, None, 4)", "symmetric Grid has zero_point 0"),
    ("Grid(np.zeros((2, 1)), np.zeros((2, 1)), 3, True, None, 4)", "scale must be finite and "
                                                                    "positive"),
])
def test_bad_solver_and_grid_parameters_are_named_when_built(make, match):
    """Each used to fail later, inside solve(), with a raw error, or to be accepted silently
    (NaN damping fell back to a default; a NaN schedule did nothing)."""
    from qround.solvers import (GPTQ, CrossEntropy, DimodSolver, Exact, Greedy,  # noqa: F401
                                HopfieldClassic, MeanField, Relaxation, Stochastic, Tabu)
    with pytest.raises(QroundError, match=match):
        eval(make)  # noqa: S307 (the test's own expressions)


def test_integer_codes_as_a_start_get_a_hint():
    p = make_problem(m=4, n=6)
    with pytest.raises(QroundError, match="choices_from_codes"):
        get_solver("greedy").solve(p, init=p.codes(p.rtn_choices()))
    sol = get_solver("greedy").solve(p, init=p.choices_from_codes(p.codes(p.rtn_choices())))
    assert sol.ratio <= 1.0


def test_a_composite_reports_every_part_even_with_equal_labels():
    from qround.solvers import BestOf, Chain, Greedy, Stochastic

    p = make_problem(m=5, n=8, seed=1)
    chain = Chain(Stochastic(), Greedy(), Stochastic(), Greedy()).solve(p, seed=0)
    assert list(chain.info["steps"]) == ["stochastic", "greedy", "stochastic#3", "greedy#4"]
    best = BestOf(Stochastic(), Stochastic()).solve(p, seed=0)
    assert list(best.info["channels_won"]) == ["stochastic", "stochastic#2"]


def test_a_nearly_symmetric_hessian_is_made_exactly_symmetric():
    """Within check_psd's tolerance an asymmetric H passed; the energy code assumes symmetry,
    so flip deltas and the restrict identity were off by 1e-4 (relative)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6))
    h = x.T @ x / 64
    h_bad = h + 2e-6 * np.abs(h).max() * np.triu(rng.uniform(-1, 1, size=(6, 6)), 1)
    p = RoundingProblem.from_weight(rng.normal(size=(3, 6)), h_bad, GridSpec(bits=3))
    np.testing.assert_array_equal(p.hessian, p.hessian.T)
    b = rng.integers(0, 2, size=(3, 6)).astype(bool)
    flipped = b.copy()
    flipped[:, 2] ^= True
    np.testing.assert_allclose(p.flip_deltas(b)[:, 2], p.energies(flipped) - p.energies(b),
                               rtol=1e-10, atol=1e-14)
    exact = RoundingProblem.from_weight(np.ones((2, 6)), h, GridSpec(bits=3))
    assert np.array_equal(exact.hessian, h)  # an exactly symmetric H is kept as it is


@pytest.mark.parametrize("kwargs, match", [
    ({"damp": True}, "damp must be a finite number"),
    ({"fisher_budget_mb": float("inf")}, "fisher_budget_mb must be a finite number"),
    ({"refits": 1.0}, "refits must be an integer"),
])
def test_config_numbers_are_checked(kwargs, match):
    with pytest.raises(QroundError, match=match):
        QuantConfig(**kwargs)


def test_sub_and_restricted_problems_are_read_only_like_their_parent():
    p = make_problem(m=4, n=6)
    for q in (p.subproblem([2, 0]), p.restrict([1, 3], p.rtn_choices())):
        for name in ("weight", "step", "grad", "const", "free", "frac", "hessian"):
            assert not getattr(q, name).flags.writeable, name


def test_a_spec_may_hold_any_whitespace():
    assert get_solver("gptq +\ttabu |\nanneal").label == "gptq+tabu|anneal"


def test_a_forward_that_catches_every_exception_still_stops_at_the_capture():
    """The capture ends a forward by raising from a hook; a forward function with its own
    ``except Exception`` used to swallow that and run on, feeding the statistics twice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    calib = [torch.randn(16, 8) for _ in range(2)]

    def forgiving(m, batch):
        try:
            return m(batch)
        except Exception:  # noqa: BLE001 (what some user code does)
            return m(batch)

    plain = quantize_model(model, calib, _quick(inputs="quantized"))
    caught = quantize_model(model, calib, _quick(inputs="quantized"), forward=forgiving)
    for name in plain.layers:
        np.testing.assert_array_equal(plain.layers[name].codes, caught.layers[name].codes)
        assert [r.cost for r in plain.report] == [r.cost for r in caught.report]


def test_json_keeps_numpy_integers_integers(tmp_path):
    import json

    from qround.report import write_json_atomic

    write_json_atomic(tmp_path / "a.json", {"n": np.int64(5), "x": np.float32(0.5),
                                            "v": np.arange(2), "device": torch.device("cpu")})
    assert json.loads((tmp_path / "a.json").read_text()) == {"n": 5, "x": 0.5, "v": [0, 1],
                                                             "device": "cpu"}


def test_fisher_statistics_with_asymmetric_inputs_are_refused():
    """Under Fisher statistics the asymmetric target was dropped silently (the codes equalled
    those of inputs='quantized') while bias correction still followed the asymmetric error."""
    with pytest.raises(QroundError, match="no asymmetric objective"):
        QuantConfig(statistics="fisher", inputs="asymmetric")


class _OwnState(nn.Module):
    """A module with state the capture cache cannot see by identity alone."""

    def __init__(self, kind):
        super().__init__()
        self.fc, self.kind = nn.Linear(6, 6), kind
        self.gen = torch.Generator().manual_seed(0)
        self.count = torch.zeros(())
        self.meta = {"calls": 0}

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "generator":
            return h + 0.1 * torch.randn(h.shape, generator=self.gen)
        if self.kind == "tensor":
            self.count += 1
            return h * self.count
        if self.kind == "dict":
            self.meta["calls"] += 1
            return h * self.meta["calls"]
        return h, h  # "aliased": two outputs, one storage


class _StateNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.kind = _OwnState(kind), kind
        self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        if self.kind == "aliased":
            h, skip = h
            h = h.mul_(2) + skip  # in place on one output: the other sees it too
        return self.c(torch.relu(self.b(torch.relu(h))))


@pytest.mark.parametrize("kind", ["generator", "tensor", "dict", "aliased"])
def test_the_capture_cache_sees_state_a_module_keeps(kind):
    """Replaying such a module gave other codes than running it (found by review)."""
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 6, generator=gen) for _ in range(3)]
    runs = [quantize_model(_StateNet(kind), data, _quick(capture_cache_mb=mb))
            for mb in (0, 1024)]
    for name in runs[0].layers:
        np.testing.assert_array_equal(runs[0].layers[name].codes, runs[1].layers[name].codes)
    assert [r.cost for r in runs[0].report] == [r.cost for r in runs[1].report]


def test_cache_replays_modules_with_empty_or_disjoint_outputs():
    """Outputs that share a storage without overlapping (chunk) or hold no memory (an empty
    tensor) are not aliases; the first review's fix refused them too (found by a second)."""
    from qround.prefix_cache import _overlapping

    x = torch.randn(4, 6)
    a, b = x.chunk(2, dim=0)
    assert not _overlapping([a, b]) and not _overlapping([x, x.new_zeros(0)])
    assert _overlapping([x, x[1:]]) and _overlapping([x, x.t()])


def test_state_of_a_huge_container_is_cheap():
    import time

    from qround.prefix_cache import _value_state

    big, bag = list(range(1_000_000)), set(range(300_000))
    t0 = time.perf_counter()
    for _ in range(10):
        _value_state(big), _value_state(bag)
    assert time.perf_counter() - t0 < 1.0  # about 0.4 s per call before (copy and sort)


def test_copy_errors_other_than_computed_tensors_keep_their_type():
    from qround.errors import copy_module

    class Boom(nn.Module):
        def __deepcopy__(self, memo):
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        copy_module(Boom())


def test_a_wrapped_layer_names_its_own_missing_attributes():
    from qround.activations import QuantizedLayer

    q = QuantizedLayer(nn.Linear(4, 3), abits=4)
    assert q.in_features == 4
    with pytest.raises(AttributeError, match="QuantizedLayer"):
        q.nonexistent
    assert not hasattr(QuantizedLayer.__new__(QuantizedLayer), "anything")


def test_messages_a_new_user_met():
    from qround.solvers import DimodSolver, register
    from qround.solvers.reference import Nearest

    with pytest.raises(QroundError, match="overwrite=True"):
        register("fast", Nearest)
    with pytest.raises(QroundError, match=r"select nothing of the 6"):
        make_problem(m=6, n=8).subproblem(slice(70, 80))
    with pytest.raises(QroundError, match=r"k \(the number of merges\).*the default"):
        QuantConfig(k=2, reconstruction=ReconstructConfig(iterations=3), abits=4)
    p = make_problem(m=6, n=8)
    sol = DimodSolver("dwave-steepest", channels=slice(0, 2)).solve(p, seed=0)
    assert np.array_equal(sol.choices[2:], p.rtn_choices()[2:])
    assert np.all(sol.energy[:2] <= p.rtn_energies()[:2] + 1e-12)


def test_a_model_file_whose_class_cannot_be_imported_gets_a_hint(tmp_path, capsys):
    import subprocess
    import sys

    from qround.cli import main

    # a model saved from a module that the loading process cannot import
    (tmp_path / "mymodel.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 2)\n"
        "    def forward(self, x):\n        return self.fc(x)\n")
    code = ("import torch, mymodel; torch.save(mymodel.Net(), 'm.pt'); "
            "torch.save(torch.randn(8, 4), 'c.pt')")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert main(["quantize", "--model", str(tmp_path / "m.pt"), "--calibration",
                 str(tmp_path / "c.pt"), "--no-progress"]) == 2
    assert "PYTHONPATH" in capsys.readouterr().err


# ----------------------------------------------------------------- second quantisation review
class _ScaledLinear(nn.Linear):
    """A Linear whose forward uses 4 W: not x W^T + b."""

    def forward(self, x):
        return nn.functional.linear(x, 4 * self.weight, self.bias)


class _StdConv(nn.Conv2d):
    """timm's StdConv2d pattern: the conv standardises its weight in _conv_forward."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3),
                                                                           keepdim=True) + 1e-6)
        return super()._conv_forward(x, w, bias)


class _Plain(nn.Linear):
    """A subclass that keeps nn.Linear's forward (like MultiheadAttention's out_proj)."""


def test_subclasses_with_their_own_forward_stay_in_float():
    torch.manual_seed(0)
    model = nn.Sequential(_StdConv(2, 4, 3), nn.Flatten(), _Plain(4 * 4 * 4, 8), nn.ReLU(),
                          _ScaledLinear(8, 3))
    batches = [torch.randn(4, 2, 6, 6) for _ in range(2)]
    qm = quantize_model(model, batches, QuantConfig(wbits=3, solver="greedy", progress=False))
    assert [r.layer for r in qm.report] == ["2"]
    for name, kind in (("0", "_StdConv"), ("4", "_ScaledLinear")):
        assert f"{kind} subclasses" in qm.skipped[name] and "own forward" in qm.skipped[name]
    with pytest.raises(QroundError,
                       match="no nn.Linear, nn.Conv2d or nn.Conv1d layer.*own forward"):
        quantize_model(nn.Sequential(_ScaledLinear(4, 2)), [torch.randn(3, 4)],
                       QuantConfig(progress=False))


def test_seed_range():
    QuantConfig(seed=2 ** 64 - 1)
    ReconstructConfig(seed=2 ** 64 - 1)
    with pytest.raises(QroundError, match="seed"):
        QuantConfig(seed=2 ** 64)
    with pytest.raises(QroundError, match="seed"):
        ReconstructConfig(seed=2 ** 64)
    model = nn.Sequential(nn.Linear(4, 3))
    qm = quantize_model(model, [torch.randn(5, 4)], QuantConfig(seed=2 ** 64 - 1,
                                                                progress=False))
    assert len(qm.report) == 1


@pytest.mark.parametrize("batch,kind", [(torch.randn(8, 15), "shapes cannot be multiplied"),
                                        (torch.ones(8, 16, dtype=torch.int64), "dtype"),
                                        (np.ones((8, 16), dtype=np.float32), "TypeError")])
def test_a_batch_that_does_not_fit_the_model_is_named(batch, kind):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(QroundError, match=f"forward failed on the first calibration batch.*{kind}"):
        quantize_model(model, [batch], QuantConfig(progress=False))


class _BatchEncodingLike(dict):
    """As transformers' BatchEncoding: a missing attribute raises a bare AttributeError."""

    def __getattr__(self, name):
        raise AttributeError


def test_an_error_without_a_message_is_named_by_where_it_was_raised():
    model = nn.Sequential(nn.Linear(4, 3))
    batch = _BatchEncodingLike(x=torch.randn(2, 4))
    with pytest.raises(QroundError, match=r"\(AttributeError: no message; raised in __getattr__ "
                                          r"at .*test_input_checks.py:\d+\)"):
        quantize_model(model, [batch], QuantConfig(progress=False),
                       forward=lambda m, b: m(b.input_ids))


def test_an_empty_batch_is_refused_before_the_activation_stage(monkeypatch):
    import qround.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_solve_layer", lambda *a, **k: pytest.fail("solved"))
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    batches = [torch.randn(4, 1, 6, 6), torch.empty(0, 1, 6, 6)]
    with pytest.raises(QroundError, match="calibration batch 1 holds no samples"):
        quantize_model(model, batches, QuantConfig(abits=4, progress=False))
    for batch in ({"input_ids": torch.empty(0, 5, dtype=torch.long)},
                  (torch.empty(0, 3), torch.ones(0))):
        assert pipeline._samples(batch) == 0
    assert pipeline._samples({"x": torch.ones(2, 3)}) == 2 and pipeline._samples(1.0) is None


def test_unbatched_conv_samples_are_refused_by_reconstruction_before_any_work(monkeypatch):
    """Reconstruction drew its mini-batches along the first axis: of channels for unbatched
    (C, H, W) samples (a crash, or training on shuffled channels)."""
    import qround.pipeline

    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    calib = [torch.randn(4, 8, 8) for _ in range(3)]
    quantize_model(model, calib, QuantConfig(wbits=4, solver="greedy", progress=False))

    def no_solve(*args, **kwargs):
        raise AssertionError("a layer was solved")

    monkeypatch.setattr(qround.pipeline, "_capture", no_solve)
    with pytest.raises(QroundError, match="conv layer '0' received an unbatched"):
        quantize_model(model, calib, QuantConfig(wbits=4, abits=8, solver="greedy",
                                                 progress=False,
                                                 reconstruction=ReconstructConfig(iterations=5)))


class _LearnedQuery(nn.Module):
    """Attention pooling with a learned query vector: q_proj reads a 1-D input in a batched
    model."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(16))
        self.q_proj, self.k_proj, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):                      # x: (B, T, 16)
        weights = torch.softmax(self.k_proj(x) @ self.q_proj(self.query), dim=1)
        return self.out((weights.unsqueeze(-1) * x).sum(1))


def test_one_dimensional_linear_inputs_are_reconstructed_batch_by_batch(monkeypatch):
    """A 1-D input (a learned query, or unbatched samples) is one sample: reconstruction draws
    whole cached batches for it, not rows of its features."""
    import qround.reconstruct

    drawn = []
    original = qround.reconstruct._BlockData.sample

    def spy(self, gen, batch_size):
        args, kwargs, target, mask = original(self, gen, batch_size)
        drawn.append((self.x is None, tuple(args[0].shape)))
        return args, kwargs, target, mask

    monkeypatch.setattr(qround.reconstruct._BlockData, "sample", spy)
    torch.manual_seed(0)
    config = QuantConfig(wbits=4, abits=8, solver="greedy", progress=False, granularity="layer",
                         reconstruction=ReconstructConfig(iterations=4, batch_size=2))
    quantize_model(_LearnedQuery(), [torch.randn(8, 5, 16) for _ in range(2)], config)
    assert (True, (16,)) in drawn                 # q_proj: whole batches of its one vector
    assert (False, (2, 16)) in drawn              # out: rows of (B, 16)
    drawn.clear()
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    quantize_model(model, [torch.randn(16) for _ in range(3)], config)   # unbatched samples
    assert drawn and all(whole and shape == (16,) for whole, shape in drawn)


def test_block_data_draws_rows_only_along_a_batch_axis():
    from qround.reconstruct import _BlockData

    vectors = _BlockData([((torch.randn(8),), {}) for _ in range(3)],
                         [torch.randn(8) for _ in range(3)])
    assert vectors.x is None     # one sample per batch: whole batches are drawn
    rows = _BlockData([((torch.randn(5, 8),), {}) for _ in range(3)],
                      [torch.randn(5, 2) for _ in range(3)])
    assert rows.x.shape == (15, 8) and rows.y.shape == (15, 2)
    scalars = _BlockData([((torch.randn(5, 8),), {}) for _ in range(3)],   # a (N,) output
                         [torch.randn(5) for _ in range(3)])
    args, _, target, _ = scalars.sample(torch.Generator().manual_seed(0), 4)
    assert args[0].shape == (4, 8) and target.shape == (4,)


def test_two_parameters_over_one_memory_are_refused():
    """Tied through .data, not as one Parameter: a copy unties them, and writing both in place
    kept only the second rounding."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = nn.Parameter(model[0].weight.data)
    for inplace in (False, True):
        with pytest.raises(QroundError, match="weight of layer '0' overlaps the memory of "
                                              "'2.weight'"):
            quantize_model(model, [torch.randn(4, 8)], QuantConfig(wbits=4, solver="greedy",
                                                                   progress=False),
                           inplace=inplace)
    model[2].weight = model[0].weight       # one Parameter: rounded once
    qm = quantize_model(model, [torch.randn(4, 8)], QuantConfig(wbits=4, solver="greedy",
                                                                progress=False))
    assert "2" in qm.skipped and qm.model[0].weight is qm.model[2].weight
    # disjoint slices of one tensor (torch's vector_to_parameters) are not tied
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    flat = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    vector_to_parameters(parameters_to_vector(flat.parameters()).clone(), flat.parameters())
    qm = quantize_model(flat, [torch.randn(4, 8)], QuantConfig(wbits=4, solver="greedy",
                                                               progress=False), inplace=True)
    assert not qm.skipped
    for name in ("0", "2"):
        assert torch.equal(flat[int(name)].weight.detach(),
                           torch.as_tensor(qm.layers[name].dequantized, dtype=torch.float32))


class _OneShot(torch.utils.data.IterableDataset):
    """Re-iterable in form, one-shot in fact: __iter__ hands back one stored generator."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.it = (torch.randn(8, generator=g) for _ in range(n))

    def __iter__(self):
        return self.it


@pytest.mark.parametrize("entry", ["quantize_model", "gptq_model"])
def test_a_stream_that_runs_dry_on_a_later_pass_is_named(entry):
    from qround.baselines import gptq_model

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    run = quantize_model if entry == "quantize_model" else gptq_model
    with pytest.raises(QroundError, match="calibration yielded 0 batches on this pass and 3 "
                                          "on the first full one"):
        run(model, DataLoader(_OneShot(64), batch_size=16),
            QuantConfig(wbits=4, solver="greedy", progress=False))
    # a DataLoader over a map-style dataset gives the same batches every pass
    data = DataLoader(TensorDataset(torch.randn(64, 8)), batch_size=16)
    run(model, data, QuantConfig(wbits=4, solver="greedy", progress=False),
        forward=lambda m, b: m(b[0]))


def test_a_float64_model_keeps_float64_scales_through_the_activation_stage(tmp_path):
    """The wrappers held float32 scales: a float64 model's weights left the solver's grid by
    about 1e-8 relative, and its saved scales were float32's."""
    from qround.activations import quantized_layers

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    data = [torch.randn(32, 8, generator=g, dtype=torch.float64)]
    weights_only = quantize_model(model, data, QuantConfig(wbits=4, solver="greedy",
                                                           progress=False))
    qm = quantize_model(model, data, QuantConfig(wbits=4, abits=8, solver="greedy",
                                                 progress=False))
    for name, layer in quantized_layers(qm.model).items():
        assert layer.w_scale.dtype == torch.float64
        assert np.array_equal(qm.layers[name].scale, weights_only.layers[name].scale)
        assert torch.equal(layer.quantized_weight(), torch.as_tensor(
            qm.layers[name].dequantized).reshape(layer.layer.weight.shape))
    qm.save(tmp_path / "d.safetensors")
    with torch.no_grad():
        assert torch.equal(export.load(model, tmp_path / "d.safetensors")(data[0]),
                           qm.model(data[0]))


def test_slices_take_any_integer_python_can_index_with():
    # numpy and 0-d torch integers have __index__, and Python's slicing takes them
    p = make_problem(m=4, n=6)
    for index in (slice(0, torch.tensor(2)), slice(np.int64(0), np.array(2)),
                  slice(None, None, np.int32(2))):
        sub = p.subproblem(index)
        assert np.array_equal(sub.weight, p.weight[range(4)[slice(*map(_as_int, (
            index.start, index.stop, index.step)))]])
    assert p.restrict(slice(0, torch.tensor(3)), np.zeros((4, 6))).weight.shape == (4, 3)


def _as_int(x):
    return None if x is None else int(x)


def test_choices_codes_and_starts_take_any_torch_tensor():
    # requires_grad and bfloat16 tensors are taken as the weights are (they raised deep inside
    # numpy or torch: "Can't call numpy() on Tensor that requires grad", "unsupported ScalarType")
    from qround.lattice import grid_descent
    from qround.writeback import quantized_weight, weight_from_codes

    p = make_problem(m=4, n=6, seed=3)
    b = np.random.default_rng(0).integers(0, 2, size=(4, 6)).astype(bool) & p.free
    codes = p.codes(b)
    for t in (torch.tensor(b, dtype=torch.float32).requires_grad_(),
              torch.tensor(b, dtype=torch.bfloat16), torch.tensor(b)):
        np.testing.assert_array_equal(p.energies(t), p.energies(b))
        np.testing.assert_array_equal(p.flip_deltas(t), p.flip_deltas(b))
        np.testing.assert_array_equal(p.codes(t), codes)
        sol = get_solver("greedy").solve(p, init=t)
        np.testing.assert_array_equal(sol.choices, get_solver("greedy").solve(p, init=b).choices)
        np.testing.assert_array_equal(quantized_weight(p, t).codes, quantized_weight(p, b).codes)
    np.testing.assert_array_equal(weight_from_codes(p, torch.tensor(codes)).codes, codes)
    for t in (torch.tensor(codes, dtype=torch.float32).requires_grad_(),
              torch.tensor(codes, dtype=torch.bfloat16)):
        np.testing.assert_array_equal(grid_descent(p, t).codes, grid_descent(p, codes).codes)
        with pytest.raises(QroundError, match="codes must be integers"):   # not a deep TypeError
            weight_from_codes(p, t)


def test_flip_deltas_checks_the_fields_it_is_given():
    p = make_problem(m=4, n=6, seed=1)
    b = np.zeros((4, 6))
    b[:, ::2] = 1
    fields = p.local_fields(b)
    np.testing.assert_allclose(p.flip_deltas(b, fields=fields.tolist()), p.flip_deltas(b))
    np.testing.assert_allclose(p.flip_deltas(b, fields=torch.tensor(fields)), p.flip_deltas(b))
    with pytest.raises(QroundError, match=r"fields must have the shape of choices \(4, 6\)"):
        p.flip_deltas(b, fields=fields[:1])   # was broadcast: row 0's fields for every channel

