"""A systematic sweep of qround's public API for changes to state the user owns (helper-164).

Every entry point runs on tiny inputs; afterwards the process-wide state (random generators,
thread counts, default dtype, grad mode, deterministic flag, warnings filters, logging, the
environment, numba's and the BLAS libraries' threads, the working directory, torch's global
module hooks) and everything the user passed (the model: modules, their types, training
flags, hooks, parameters and buffers with their values, dtypes, devices, requires_grad and
.grad, the Parameter objects themselves; the batches, arrays and problems) must be as they
were.  The same seed twice must give bit-identical results (the same objects again, and fresh
copies); another seed may differ; ``seed=None`` behaves as documented.
"""
from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import random
import warnings
from contextlib import redirect_stderr, redirect_stdout

import numba
import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info
from torch import nn

import qround
from qround import GridSpec, RoundingProblem, fit_grid, get_solver
from qround import baselines, calibrate, evaluate, export, fold, granularity, interop
from qround import reconstruct as rec
from qround import sensitivity
from qround.pipeline import QuantConfig, quantize_model
from qround.reconstruct import ReconstructConfig

pytestmark = pytest.mark.usefixtures("sweep_threads")

# Imports whose side effects belong to torch and scipy, not qround, done before any snapshot:
# torch.optim.Adam imports torch._dynamo, which adds a sympy warnings filter and sets
# TORCHINDUCTOR_CACHE_DIR; scipy.optimize and scipy.stats add filters of their own.
import scipy.optimize  # noqa: E402,F401
import scipy.stats  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401


# ----------------------------------------------------------------------------- snapshots
def _np_state_eq(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


def global_state() -> dict:
    from torch.nn.modules import module as tm
    return {
        "torch rng": torch.random.get_rng_state(),
        "numpy rng": np.random.get_state(),
        "python rng": random.getstate(),
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "grad enabled": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "anomaly": torch.is_anomaly_enabled(),
        "matmul precision": torch.get_float32_matmul_precision(),
        "numpy errstate": np.geterr(),
        "numpy printoptions": np.get_printoptions(),
        "torch interop threads": torch.get_num_interop_threads(),
        "warnings.filters": list(warnings.filters),
        "logging": {name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled)
                    for name, lg in [("root", logging.getLogger()),
                                     ("qround", logging.getLogger("qround"))]},
        "logging.disable": logging.root.manager.disable,
        "os.environ": dict(os.environ),
        "numba threads": numba.get_num_threads(),
        "blas threads": {i["filepath"]: i["num_threads"] for i in threadpool_info()},
        "cwd": os.getcwd(),
        "global module hooks": (dict(tm._global_forward_hooks),
                                dict(tm._global_forward_pre_hooks),
                                dict(tm._global_backward_hooks)),
    }


def global_diff(before: dict, after: dict) -> list[str]:
    out = []
    for key, a in before.items():
        b = after[key]
        if key in ("torch rng",):
            same = torch.equal(a, b)
        elif key == "numpy rng":
            same = _np_state_eq(a, b)
        elif key == "blas threads":    # libraries loaded meanwhile are not a change
            same = all(b.get(k, v) == v for k, v in a.items())
        else:
            same = a == b
        if not same:
            if key == "os.environ":
                changed = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
                out.append(f"{key}: {changed}")
            elif "rng" in key:
                out.append(f"{key} changed")
            else:
                out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _tensor_record(t: torch.Tensor | None):
    if t is None:
        return None
    return (t.detach().cpu().clone(), t.dtype, t.device, t.requires_grad,
            None if t.grad is None else t.grad.detach().clone())


def model_state(model: nn.Module) -> dict:
    mods = {}
    for name, m in model.named_modules(remove_duplicate=False):
        mods[name] = (type(m), m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks),
                      dict(m._backward_hooks), dict(getattr(m, "_forward_hooks_with_kwargs", {})),
                      dict(getattr(m, "_forward_pre_hooks_with_kwargs", {})),
                      dict(getattr(m, "_state_dict_hooks", {})),
                      tuple(m._parameters), tuple(m._buffers), tuple(m._modules))
    tensors = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tensors["param " + name] = (id(p),) + _tensor_record(p)
    for name, b in model.named_buffers(remove_duplicate=False):
        tensors["buffer " + name] = (id(b),) + (_tensor_record(b) or ())
    return {"modules": mods, "tensors": tensors}


def _same_record(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x.isnan(), y.isnan())
                    and torch.equal(x.nan_to_num(), y.nan_to_num())):
                return False
        elif x != y:
            return False
    return True


def model_diff(before: dict, after: dict) -> list[str]:
    out = []
    if list(before["modules"]) != list(after["modules"]):
        out.append(f"module names: {list(before['modules'])} -> {list(after['modules'])}")
    labels = ("type", "training", "forward hooks", "forward pre-hooks", "backward hooks",
              "forward hooks with kwargs", "pre-hooks with kwargs", "state_dict hooks",
              "parameter names", "buffer names", "child names")
    for name, rec_b in before["modules"].items():
        rec_a = after["modules"].get(name)
        if rec_a is None:
            continue
        for label, x, y in zip(labels, rec_b, rec_a):
            if x != y:
                out.append(f"module {name!r} {label}: {x!r} -> {y!r}")
    if list(before["tensors"]) != list(after["tensors"]):
        out.append(f"tensor names: {list(before['tensors'])} -> {list(after['tensors'])}")
    labels = ("object", "value", "dtype", "device", "requires_grad", "grad")
    for name, x in before["tensors"].items():
        y = after["tensors"].get(name)
        if y is None:
            continue
        for i, label in enumerate(labels):
            if not _same_record((x[i],) if i < len(x) else (None,),
                                (y[i],) if i < len(y) else (None,)):
                out.append(f"{name} {label} changed")
    return out


def data_copy(obj):
    """A deep copy of what the user passes (tensors cloned with their flags; numpy arrays keep
    their writeable flag, which deepcopy drops)."""
    c = copy.deepcopy(obj)
    _copy_flags(obj, c)
    return c


def _copy_flags(a, b, depth=0):
    if depth > 8:
        return
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if not a.flags.writeable:
            b.flags.writeable = False
    elif isinstance(a, dict):
        for k in a:
            _copy_flags(a[k], b[k], depth + 1)
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b):
            _copy_flags(x, y, depth + 1)
    elif isinstance(a, RoundingProblem) or hasattr(a, "__dataclass_fields__"):
        for k, v in vars(a).items():
            _copy_flags(v, vars(b)[k], depth + 1)


def data_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.device == b.device and a.requires_grad == b.requires_grad
                and torch.equal(a.detach(), b.detach()))
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
                and a.flags.writeable == b.flags.writeable)
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(data_equal(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(data_equal(x, y) for x, y in zip(a, b)))
    if isinstance(a, RoundingProblem):
        return (type(a) is type(b) and
                all(data_equal(v, vars(b)[k]) for k, v in vars(a).items() if k != "_cache"))
    if hasattr(a, "__dataclass_fields__"):
        return all(data_equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def digest(obj, skip=("seconds", "capture_seconds", "timing", "search_s", "total_s")) -> str:
    """A hash of a result: tensors, arrays, numbers, strings, dicts, lists, dataclasses and
    modules (their state_dict), timings left out."""
    h = hashlib.sha256()

    def walk(o, depth=0):
        if depth > 12:
            return
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                     if t.numel() and t.dtype != torch.bool else t.numpy().tobytes())
        elif isinstance(o, np.ndarray):
            h.update(str((o.dtype, o.shape)).encode())
            h.update(np.ascontiguousarray(o).tobytes() if o.dtype != object else repr(o).encode())
        elif isinstance(o, nn.Module):
            walk(o.state_dict(), depth + 1)
        elif isinstance(o, dict):
            for k in o:
                if k in skip:
                    continue
                h.update(repr(k).encode())
                walk(o[k], depth + 1)
        elif isinstance(o, (list, tuple)):
            for x in o:
                walk(x, depth + 1)
        elif hasattr(o, "__dataclass_fields__"):
            for f in o.__dataclass_fields__:
                if f in skip or f in ("config",):
                    continue
                walk(getattr(o, f), depth + 1)
        elif isinstance(o, float):
            h.update(np.float64(o).tobytes())
        elif isinstance(o, (int, str, bool, type(None), np.generic)):
            h.update(repr(o).encode())
        else:
            h.update(type(o).__name__.encode())

    walk(obj)
    return h.hexdigest()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sweep_threads():
    """One torch and one numba thread, both off their defaults on this machine (2), so that
    a call that sets either to one of those defaults is seen."""
    t, n = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(t)
    numba.set_num_threads(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(seed=0) -> nn.Module:
    g = gen(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    m.train()                 # the user's model in training mode: qround must not leave it in eval
    m[2].eval()               # and one module in eval mode: must not be put back to train
    return m


class Noisy(nn.Module):
    """A forward that draws from the global generators (torch, numpy, random) and writes a
    buffer, with a BatchNorm (running statistics) and dropout."""

    def __init__(self, seed=1):
        super().__init__()
        g = gen(seed)
        self.a = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.b = nn.Linear(8, 3)
        with torch.no_grad():
            for p in (self.a.weight, self.b.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        noise = 0.01 * (torch.randn_like(x) + float(np.random.standard_normal())
                        + random.random())
        return self.b(self.drop(torch.relu(self.bn(self.a(x + noise)))))


def cnn(seed=2) -> nn.Module:
    g = gen(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        m[1].running_mean.copy_(torch.randn(4, generator=g) * 0.1)
        m[1].running_var.copy_(torch.rand(4, generator=g) + 0.5)
    m.eval()
    return m


def batches(n=2, rows=12, width=6, seed=10):
    return [torch.randn(rows, width, generator=gen(seed + i)) for i in range(n)]


def images(n=2, seed=20):
    return [torch.randn(8, 1, 5, 5, generator=gen(seed + i)) for i in range(n)]


def problem(seed=0, m=4, n=8, bits=3) -> RoundingProblem:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(m, n))
    x = rng.normal(size=(64, n))
    return RoundingProblem.from_weight(w, x.T @ x / 64, GridSpec(bits=bits), name="p")


def hook_model(m: nn.Module) -> nn.Module:
    """The user's own hooks on every module (a profiler, a feature extractor)."""
    for mod in m.modules():
        mod.register_forward_hook(lambda *a: None)
        mod.register_forward_pre_hook(lambda *a: None)
    return m


def loss_fn(out, batch):
    return out.square().sum()


FAST = dict(wbits=3, solver="greedy", progress=False)


# ----------------------------------------------------------------------------- the cases
# Each case: setup() -> (owned, call), where ``owned`` is a dict of what the user owns (models
# are checked with model_state, everything else with data_equal) and ``call(seed)`` runs the
# entry point on them and returns a result to digest.  ``seeded``: whether call() takes a seed
# at all (deterministic functions are checked for repeatability only).
CASES: dict[str, tuple] = {}


def case(name, seeded=True, differs=False):
    def deco(f):
        CASES[name] = (f, seeded, differs)
        return f
    return deco


def _qm(model, data, seed, forward=None, loss=None, **kw):
    qm = quantize_model(model, data, QuantConfig(**{**FAST, **kw, "seed": seed}),
                        forward=forward, loss_fn=loss)
    return (qm.model, qm.layers, [r.as_dict() for r in qm.report], qm.skipped)


for _name, _kw in {
        "default": {},
        "fast-solver": {"solver": "fast"},
        "float-inputs": {"inputs": "float"},
        "asymmetric": {"inputs": "asymmetric"},
        "bias-correction+refits+widen": {"bias_correction": True, "refits": 1, "widen": True},
        "first-last+overrides": {"first_last_bits": 8, "overrides": {r"^2$": {"wbits": 4}}},
        "groups+damp": {"group_size": 2, "damp": 0.1, "symmetric": False},
        "anneal": {"solver": "anneal(num_sweeps=50)"},
}.items():
    def _make(kw=_kw):
        def setup():
            m, b = hook_model(mlp()), batches()
            return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed, **kw)
        return setup
    case(f"quantize_model[{_name}]")(_make())


@case("quantize_model[noisy-forward]")
def _():
    m, b = Noisy(), batches()
    m.train()
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed)


@case("quantize_model[fisher]")
def _():
    m, b = mlp(), batches()
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed, statistics="fisher",
                                                        loss=loss_fn)


@case("quantize_model[dict-batches+forward]")
def _():
    m = mlp()
    b = [{"x": t} for t in batches()]
    fwd = lambda model, batch: model(batch["x"])  # noqa: E731
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed, forward=fwd)


@case("quantize_model[abits+borders+reconstruction]")
def _():
    m, b = cnn(), images()
    cfg = dict(abits=4, borders="quadratic", granularity="layer",
               reconstruction=ReconstructConfig(iterations=4, batch_size=4))
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed, **cfg)


@case("quantize_model[granularity=loss]")
def _():
    m, b = cnn(), images()
    cfg = dict(granularity="loss", k=1, reconstruction=ReconstructConfig(iterations=3,
                                                                         batch_size=4))
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed, **cfg)


@case("quantize_model[fold_batchnorm]")
def _():
    m, b = cnn(), images()
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed, fold_batchnorm=True)


@case("quantize_model[cnn-train-mode]")
def _():
    m, b = cnn(), images()
    m.train()
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed)


@case("quantize_model[frozen+grads+fisher]")
def _():
    m, b = mlp(), batches()
    m[0].weight.requires_grad_(False)            # a frozen layer
    m(b[0]).square().sum().backward()            # the user's own gradients, mid-training
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed, statistics="fisher",
                                                        loss=loss_fn)


@case("quantize_model[frozen+grads+reconstruction]")
def _():
    m, b = cnn(), images()
    m[0].requires_grad_(False)
    m(b[0]).square().sum().backward()
    cfg = dict(abits=4, granularity="layer",
               reconstruction=ReconstructConfig(iterations=3, batch_size=4))
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed, **cfg)


@case("quantize_model[shuffling DataLoader]")
def _():
    from torch.utils.data import DataLoader
    m = mlp()
    x = torch.randn(24, 6, generator=gen(3))
    loader = DataLoader(x, batch_size=8, shuffle=True, generator=gen(4))
    gstate = loader.generator.get_state()

    def call(seed):
        loader.generator.set_state(gstate)       # the same order in every call
        return _qm(m, loader, seed)
    return {"model": m, "x": x}, call


@case("quantize_model[numpy batches]")
def _():
    m = mlp()
    b = [np.random.default_rng(i).normal(size=(10, 6)).astype(np.float32) for i in range(2)]
    b[1].flags.writeable = False
    fwd = lambda model, x: model(torch.from_numpy(np.array(x)))  # noqa: E731 (copied)
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed, forward=fwd)


@case("quantize_model[float64 model]")
def _():
    m, b = mlp().double(), [t.double() for t in batches()]
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed, refits=1)


@case("quantize_model[bfloat16 model]")
def _():
    m, b = mlp().bfloat16(), [t.bfloat16() for t in batches()]
    return {"model": m, "batches": b}, lambda seed: _qm(m, b, seed)


@case("quantize_model[inplace=True]")
def _():
    b = batches()
    models = [mlp() for _ in range(4)]   # a fresh model each call: inplace changes it, as asked

    def call(seed):
        return quantize_model(models.pop(), b, QuantConfig(**{**FAST, "seed": seed}),
                              inplace=True).model
    return {"batches": b}, call


# --- solvers
for _spec in ["nearest", "stochastic", "greedy", "anneal(num_sweeps=30)",
              "tabu(restarts=1)", "tabu-fast", "cem", "gptq", "meanfield",
              "hopfield(iterations=30)", "hopfield-classic", "fast", "gptq+(tabu|anneal)",
              "exact", "neal", "dwave-tabu(timeout=1)"]:
    def _make(spec=_spec):
        def setup():
            p = problem(m=12, n=16, bits=2)
            solver = get_solver(spec)
            return {"problem": p}, lambda seed: solver.solve(p, seed=seed)
        return setup
    case(f"solve[{_spec}]", differs=_spec.split("(")[0] in ("stochastic", "anneal", "cem"))(
        _make())


@case("QroundSampler[tabu]")
def _():
    import dimod
    from qround.solvers import QroundSampler
    bqm = dimod.generators.gnp_random_bqm(20, 0.5, "BINARY", random_state=1)
    before = bqm.copy()
    s = QroundSampler("tabu")

    def call(seed):
        assert bqm == before
        ss = s.sample(bqm, num_reads=2, seed=seed, restarts=1)
        return ss.record.sample, ss.record.energy
    return {"bqm linear": dict(bqm.linear)}, call


@case("QroundSampler[anneal]", differs=True)
def _():
    import dimod
    from qround.solvers import QroundSampler
    bqm = dimod.generators.gnp_random_bqm(20, 0.5, "SPIN", random_state=2)
    s = QroundSampler("anneal")

    def call(seed):
        ss = s.sample(bqm, num_reads=2, seed=seed, num_sweeps=20)
        return ss.record.sample, ss.record.energy
    return {"bqm linear": dict(bqm.linear), "bqm quadratic": dict(bqm.quadratic)}, call


@case("warm_up", seeded=False)
def _():
    from qround.solvers import warm_up
    return {}, lambda seed: warm_up(get_solver("tabu"), get_solver("anneal"))


@case("steepest_descent", seeded=False)
def _():
    from qround.solvers import steepest_descent
    p = problem()
    start = p.rtn_choices() if hasattr(p, "rtn_choices") else np.zeros(p.weight.shape, bool)
    return {"problem": p, "start": start}, lambda seed: steepest_descent(p, start)


@case("lower_bound", seeded=False)
def _():
    p = problem()
    return {"problem": p}, lambda seed: (p.lower_bound(), p.lower_bound(shift="none"))


@case("from_weight+fit_grid", seeded=False)
def _():
    rng = np.random.default_rng(3)
    w, x = rng.normal(size=(4, 8)), rng.normal(size=(32, 8))
    h = x.T @ x
    wt = torch.from_numpy(w.copy()).float()

    def call(seed):
        p = RoundingProblem.from_weight(w, h, GridSpec(bits=3, group_size=4), name="x")
        g = fit_grid(wt, GridSpec(bits=3))
        g2 = fit_grid(w, GridSpec(bits=2, symmetric=False))
        return p.qubo(0), p.to_bqm(1).to_numpy_vectors()[0], g, g2
    return {"w": w, "h": h, "wt": wt}, call


@case("scales.solve_refitting", seeded=True)
def _():
    from qround.scales import solve_refitting
    p = problem()
    return {"problem": p}, lambda seed: solve_refitting(p, get_solver("greedy"), rounds=2,
                                                       seed=seed)


@case("lattice.grid_descent", seeded=False)
def _():
    from qround.lattice import grid_descent
    p = problem()
    sol = get_solver("greedy").solve(p, seed=0)
    return {"problem": p, "codes": sol.codes}, lambda seed: grid_descent(p, sol.codes)


@case("problem files", seeded=False)
def _(tmp=None):
    import tempfile
    from qround.problems import io as pio
    from qround.problems import qubo_files
    p = problem()
    rng = np.random.default_rng(4)
    w, x = rng.normal(size=(3, 5)), rng.normal(size=(16, 5))
    h = x.T @ x

    def call(seed):
        with tempfile.TemporaryDirectory() as d:
            qubo_files.write_qubo(os.path.join(d, "c0.qubo"), p, 0)
            q = qubo_files.read_qubo(os.path.join(d, "c0.qubo"))
            pio.save_layer_stats(os.path.join(d, "l.npz"), w, h, bits=3)
            lp = pio.load_layer_stats(os.path.join(d, "l.npz")).problem()
            qubo_files.export_qubos(os.path.join(d, "out"), p)
            return q, lp.qubo(0)
    return {"problem": p, "w": w, "h": h}, call


# --- calibrate / evaluate
@case("capture_hessians")
def _():
    m, b = hook_model(Noisy()), batches()
    m.train()
    return {"model": m, "batches": b}, lambda seed: calibrate.capture_hessians(m, b, seed=seed)


@case("capture_asymmetric")
def _():
    m, q, b = Noisy(), Noisy(2), batches()
    return ({"model": m, "quant": q, "batches": b},
            lambda seed: {k: (v.cross, v.hessian) if hasattr(v, "cross") else v for k, v in
                          calibrate.capture_asymmetric(m, q, b, ["a", "b"], seed=seed).items()})


@case("capture_fisher")
def _():
    m, b = Noisy(), batches()
    m.train()
    return ({"model": m, "batches": b},
            lambda seed: calibrate.capture_fisher(m, b, loss_fn, ["a", "b"], seed=seed))


@case("input_ranges")
def _():
    m, b = Noisy(), batches()
    return {"model": m, "batches": b}, lambda seed: evaluate.input_ranges(m, b, seed=seed)


@case("output_metrics")
def _():
    m, q, b = Noisy(), Noisy(2), batches()
    m.train()
    return ({"model": m, "quant": q, "batches": b},
            lambda seed: evaluate.output_metrics(m, q, b, seed=seed))


@case("fake_quantized_inputs", seeded=False)
def _():
    m, b = hook_model(mlp()), batches()
    ranges = evaluate.input_ranges(m, b)

    def call(seed):
        with evaluate.fake_quantized_inputs(m, ranges, 4) as fq:
            with torch.no_grad():
                return fq(b[0])
    return {"model": m, "batches": b, "ranges": ranges}, call


@case("eval_mode+layer_hooks+select_layers", seeded=False)
def _():
    m, b = hook_model(mlp()), batches()

    def call(seed):
        seen = []
        layers = calibrate.select_layers(m)
        with calibrate.eval_mode(m), calibrate.layer_hooks(
                layers, lambda name, mod, i, o: seen.append(name)):
            with torch.no_grad():
                m(b[0])
        return seen
    return {"model": m, "batches": b}, call


@case("default_forward+token_mask", seeded=False)
def _():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, input_ids, attention_mask=None):
            return self.fc(input_ids.float()[..., None].expand(-1, -1, 4))
    m = Tok()
    batch = {"input_ids": torch.arange(12).reshape(2, 6),
             "attention_mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3])}

    def call(seed):
        out = calibrate.default_forward(m, batch)
        with calibrate.token_mask(batch["attention_mask"]):
            h = calibrate.capture_hessians(m, [batch])
        return out, h
    return {"model": m, "batch": batch}, call


@case("digits_accuracy", seeded=False)
def _():
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    torch.nn.init.normal_(m[1].weight, generator=gen(3))
    m.train()
    x = torch.randn(20, 1, 8, 8, generator=gen(4))
    y = torch.randint(0, 10, (20,), generator=gen(5))
    data = type("D", (), {"test_images": x, "test_labels": y, "calib_images": x})()
    return {"model": m, "x": x, "y": y}, lambda seed: evaluate.digits_accuracy(
        m, data, abits=4)


# --- baselines, sensitivity, fold, export, interop, reconstruct, granularity
@case("rtn_model", seeded=False)
def _():
    m, b = hook_model(mlp()), batches()
    return {"model": m, "batches": b}, lambda seed: baselines.rtn_model(
        m, QuantConfig(**FAST, first_last_bits=8), calibration=b)[0]


@case("gptq_model")
def _():
    m, b = Noisy(), batches()
    m.train()
    return {"model": m, "batches": b}, lambda seed: baselines.gptq_model(
        m, b, QuantConfig(**{**FAST, "seed": seed}))[0]


@case("gptq_model[fold_bn]")
def _():
    m, b = cnn(), images()
    return {"model": m, "batches": b}, lambda seed: baselines.gptq_model(
        m, b, QuantConfig(**{**FAST, "seed": seed, "fold_batchnorm": True}))[0]


@case("gptq_quantize+layer_cost", seeded=False)
def _():
    p = problem()
    w, h = p.weight.copy(), p.hessian.copy()

    def call(seed):
        q = baselines.gptq_quantize(w, h, p.grid)
        return q, baselines.layer_cost(w, q, h)
    return {"w": w, "h": h}, call


@case("layer_sensitivity+allocate")
def _():
    m, b = Noisy(), batches()
    m.train()

    def call(seed):
        s = sensitivity.layer_sensitivity(m, b, QuantConfig(**{**FAST, "seed": seed}),
                                          bits=(2, 4))
        plan = s.allocate(mean_bits=3)
        return s.table(), plan.bits
    return {"model": m, "batches": b}, call


@case("fold_batchnorm", seeded=False)
def _():
    m, b = hook_model(cnn()), images()
    m.train()

    def call(seed):
        f = fold.fold_batchnorm(m, example=b[0])
        f2, pairs = fold.fold_with_pairs(m, example=b[0])
        return f, pairs
    return {"model": m, "batches": b}, call


@case("export.save+load")
def _():
    import tempfile
    m, b = mlp(), batches()
    target = mlp()

    def call(seed):
        qm = quantize_model(m, b, QuantConfig(**{**FAST, "seed": seed}))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "q.safetensors")
            export.save(qm, path)
            meta = export.read_metadata(path)
            codes = export.load_codes(path)
            export.verify_source(m, path)
            fp = export.fingerprint(m)
            loaded = export.load(target, path)
            return meta["layers"] if "layers" in meta else None, codes, fp, loaded
    return {"model": m, "batches": b, "target": target}, call


@case("export.load[fold_batchnorm+abits+borders]", seeded=False)
def _():
    import tempfile
    m, b = cnn(), images()
    qm = quantize_model(m, b, QuantConfig(**FAST, fold_batchnorm=True, abits=4,
                                          borders="linear", granularity="layer",
                                          reconstruction=ReconstructConfig(iterations=2,
                                                                           batch_size=4)))
    d = tempfile.mkdtemp()
    path = os.path.join(d, "q.safetensors")
    export.save(qm, path)
    target = cnn()
    target.train()

    def call(seed):
        loaded = export.load(target, path)
        with torch.no_grad():
            return loaded, loaded(b[0])
    return {"target": target, "batches": b}, call


@case("interop.save_compressed_tensors")
def _():
    import tempfile
    m, b = mlp(), batches()
    qm = quantize_model(m, b, QuantConfig(**FAST))

    def call(seed):
        refusals = interop.compressed_tensors_refusals(qm)
        with tempfile.TemporaryDirectory() as d:
            try:
                interop.save_compressed_tensors(qm, os.path.join(d, "out"))
            except qround.QroundError as e:
                return refusals, str(e)
            return refusals, sorted(os.listdir(os.path.join(d, "out")))
    return {"model": m, "qm.model": qm.model}, call


def _act_model(m, b):
    from qround.activations import insert_act_quantizers
    return insert_act_quantizers(m, abits=4, borders="linear", calib_batches=b,
                                 weights=GridSpec(bits=3))


@case("insert_act_quantizers", seeded=False)
def _():
    m, b = cnn(), images()
    m.register_forward_hook(lambda *a: None)     # on the root: layers' own hooks are refused
    m.train()
    return {"model": m, "batches": b}, lambda seed: _act_model(m, b)


@case("reconstruct")
def _():
    m, b = cnn(), images()
    q = _act_model(m, b)

    def call(seed):
        units = rec.plan_units(m, q, b, "auto")
        r = rec.reconstruct(m, q, b, "auto", ReconstructConfig(iterations=3, batch_size=4,
                                                                seed=seed))
        return [u.name for u in units], r.model if hasattr(r, "model") else r
    return {"model": m, "quant": q, "batches": b}, call


@case("granularity.reconstruct_with_granularity")
def _():
    m, b = cnn(), images()
    q = _act_model(m, b)

    def call(seed):
        cfg = ReconstructConfig(iterations=3, batch_size=4, seed=seed)
        sel = granularity.select_units(m, q, b, "loss", k=1, config=cfg, search_iterations=2)
        r, s = granularity.reconstruct_with_granularity(m, q, b, "modcap", config=cfg)
        return [u.name for u in sel.units], [u.name for u in s.units]
    return {"model": m, "quant": q, "batches": b}, call


def _explicit_model():
    m = nn.ModuleDict({"up": nn.ConvTranspose2d(2, 2, 2, stride=2),
                       "att": nn.MultiheadAttention(4, 2, batch_first=True),
                       "vol": nn.Conv3d(2, 2, (2, 1, 1))})
    m.register_forward_hook(lambda *a: None)
    m.train()
    m.att.eval()
    return m


def _explicit_cases():
    from qround import attention, conv3d, conv_transpose, explicit
    return {"explicit_layers": (explicit.explicit_layers, explicit.fuse_layers),
            "explicit_attention": (attention.explicit_attention, attention.fuse_attention),
            "explicit_conv_transpose": (conv_transpose.explicit_conv_transpose,
                                        conv_transpose.fuse_conv_transpose),
            "explicit_conv3d": (conv3d.explicit_conv3d, conv3d.fuse_conv3d)}


for _name in ("explicit_layers", "explicit_attention", "explicit_conv_transpose",
              "explicit_conv3d"):
    def _make(name=_name):
        def setup():
            m = _explicit_model()
            make, _ = _explicit_cases()[name]
            return {"model": m}, lambda seed: make(m)
        return setup

    def _make_fuse(name=_name):
        def setup():
            make, fuse = _explicit_cases()[name]
            e = make(_explicit_model())
            return {"explicit model": e}, lambda seed: fuse(e)
        return setup
    case(_name, seeded=False)(_make())
    case(_name.replace("explicit_", "fuse_").replace("fuse_layers", "fuse_layers"),
         seeded=False)(_make_fuse())


# ----------------------------------------------------------------------------- CLI
def _cli(argv):
    from qround.cli import main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    from qround.problems import io as pio
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(4, 8)), rng.normal(size=(32, 8))
    pio.save_layer_stats(str(d / "l.npz"), w, x.T @ x / 32, bits=3)
    torch.save(mlp(), d / "model.pt")
    torch.save(batches(), d / "cal.pt")
    from qround.problems import qubo_files
    qubo_files.write_qubo(str(d / "c.qubo"), problem(), 0)
    _cli(["-q", "quantize", "--model", str(d / "model.pt"), "--calibration", str(d / "cal.pt"),
          "--wbits", "3", "--solver", "greedy", "--out", str(d / "q.safetensors")])
    return d


_COUNTER = iter(range(10 ** 6))
CLI_CASES = {
    "solve": lambda d, s: ["solve", str(d / "l.npz"), "--solver", "greedy", "--json"],
    "solve -v --threads 2": lambda d, s: ["-v", "solve", str(d / "l.npz"), "--solver",
                                          "anneal", "--threads", "2", "--seed", str(s)],
    "quantize": lambda d, s: ["-q", "quantize", "--model", str(d / "model.pt"),
                              "--calibration", str(d / "cal.pt"), "--wbits", "3",
                              "--solver", "greedy", "--seed", str(s),
                              "--out", str(d / f"q{s}.safetensors")],
    "export-qubo": lambda d, s: ["export-qubo", str(d / "l.npz"), "--out",
                                 str(d / f"qubos{s}_{next(_COUNTER)}"), "--solver", "greedy"],
    "solvers": lambda d, s: ["solvers"],
    "error: missing file": lambda d, s: ["-vv", "solve", str(d / "missing.npz")],
    "error: bad solver": lambda d, s: ["-v", "solve", str(d / "l.npz"), "--solver", "nope",
                                       "--threads", "2"],
    "error: bad option": lambda d, s: ["-q", "quantize", "--wbits", "99"],
    "error: forward fails": lambda d, s: ["-vv", "quantize", "--model", str(d / "model.pt"),
                                          "--calibration", str(d / "l.npz"), "--threads", "2",
                                          "--out", str(d / "x.safetensors")],
    "sample": lambda d, s: ["sample", str(d / "c.qubo"), "--method", "anneal(num_sweeps=20)",
                            "--seed", str(s)],
    "sensitivity": lambda d, s: ["sensitivity", "--model", str(d / "model.pt"),
                                 "--calibration", str(d / "cal.pt"), "--bits", "2,4",
                                 "--mean-bits", "3"],
    "evaluate": lambda d, s: ["evaluate", "--model", str(d / "model.pt"), "--inputs",
                              str(d / "cal.pt"), "--quantized", str(d / "q.safetensors")],
    "--version": lambda d, s: ["--version"],
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_main_leaves_process_state(name, cli_files):
    logging.getLogger("qround").setLevel(logging.ERROR)   # the user's own configuration
    try:
        before = global_state()
        try:
            _cli(CLI_CASES[name](cli_files, 0))
        except SystemExit:
            pass
        diff = global_diff(before, global_state())
        assert not diff, f"qround.cli.main({name}) changed: {diff}"
    finally:
        logging.getLogger("qround").setLevel(logging.NOTSET)


# ----------------------------------------------------------------------------- the sweep
def _snapshot(owned):
    out = {}
    for k, v in owned.items():
        out[k] = model_state(v) if isinstance(v, nn.Module) else data_copy(v)
    return out


def _owned_diff(owned, snap) -> list[str]:
    diffs = []
    for k, v in owned.items():
        if isinstance(v, nn.Module):
            diffs += [f"{k}: {d}" for d in model_diff(snap[k], model_state(v))]
        elif not data_equal(snap[k], v):
            diffs.append(f"{k} changed")
    return diffs


def _quiet(call, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(seed)


def _seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("name", list(CASES))
def test_entry_point_leaves_user_state(name):
    setup, seeded, _ = CASES[name]
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    owned, call = setup()
    snap = _snapshot(owned)
    before = global_state()
    call(0)     # warnings shown, so that the filters and logging are exercised as a user sees
    diffs = global_diff(before, global_state()) + _owned_diff(owned, snap)
    assert not diffs, f"{name} changed: {diffs}"


@pytest.mark.parametrize("name", [n for n in CASES])
def test_same_seed_twice_is_bit_identical(name):
    setup, seeded, differs = CASES[name]
    _seed_all(99)        # the setups build modules with torch's default initialisation
    owned, call = setup()
    a = digest(_quiet(call, 0))
    _seed_all(5)         # the caller's own generators must not matter
    b = digest(_quiet(call, 0))                   # the same objects again
    _seed_all(99)
    fresh = setup()[1]
    _seed_all(7)
    c = digest(_quiet(fresh, 0))                  # fresh ones
    assert a == b == c, f"{name}: same seed, different results ({a[:8]} {b[:8]} {c[:8]})"
    if seeded and differs:
        d = digest(_quiet(call, 1))
        assert d != a, f"{name}: seed 1 gave the same result as seed 0"


class _Draw(qround.Solver):
    """Keeps its start and reports one draw of the rng solve() hands it."""
    name = "draw"

    def _solve(self, problem, start, rng):
        return start.copy(), {"draw": int(rng.integers(2 ** 62))}


def test_solve_seed_none_is_fresh_seed_int_is_fixed_generator_is_advanced():
    p = problem(m=4, n=6)
    before = global_state()
    draw = lambda seed: _Draw().solve(p, seed=seed).info["draw"]  # noqa: E731
    assert draw(None) != draw(None), "seed=None gave the same draws twice"
    assert draw(3) == draw(3) != draw(4)
    g = np.random.default_rng(0)
    assert draw(g) != draw(g), "a Generator seed was not advanced"
    import dimod
    from qround.solvers import QroundSampler
    bqm = dimod.generators.gnp_random_bqm(30, 0.5, "SPIN", random_state=2)
    sample = lambda seed: QroundSampler("anneal").sample(  # noqa: E731
        bqm, num_reads=3, seed=seed, num_sweeps=5).record.sample
    assert not np.array_equal(sample(None), sample(None))
    assert np.array_equal(sample(1), sample(1))
    assert not global_diff(before, global_state())


@pytest.mark.parametrize("bad", [None, -1, 1.5, "0", True])
def test_quantconfig_seed_none_or_bad_is_refused_clearly(bad):
    with pytest.raises(qround.QroundError, match="seed"):
        QuantConfig(**FAST, seed=bad)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "float64", "deterministic",
                                  "grad-enabled"])
def test_quantize_model_keeps_the_callers_modes(mode):
    """The caller's grad mode, default dtype and deterministic flag are theirs: kept on exit,
    whatever the run does inside."""
    m, b = cnn(), images()
    cfg = QuantConfig(**FAST, abits=4, granularity="layer",
                      reconstruction=ReconstructConfig(iterations=2, batch_size=4))
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "grad-enabled": torch.enable_grad}.get(mode)
    old_dtype = torch.get_default_dtype()
    old_det = (torch.are_deterministic_algorithms_enabled(),
               torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if mode == "float64":
            torch.set_default_dtype(torch.float64)
        if mode == "deterministic":
            torch.use_deterministic_algorithms(True, warn_only=True)
        before = global_state()
        if ctx is not None:
            with ctx():
                before = global_state()
                try:
                    quantize_model(m, b, cfg)
                except qround.QroundError:
                    pass          # refused clearly is fine; the state is what is checked
                after = global_state()
        else:
            quantize_model(m, b, cfg)
            after = global_state()
        diff = global_diff(before, after)
        assert not diff, f"{mode}: {diff}"
    finally:
        torch.set_default_dtype(old_dtype)
        torch.use_deterministic_algorithms(old_det[0], warn_only=old_det[1])


# ----------------------------------------------------------------------------- failures
class Breaks(nn.Module):
    """Noisy's forward (global draws, a buffer written) that raises on its ``at``-th call,
    as a user's forward can (an out-of-memory, a bad batch, a KeyboardInterrupt)."""

    def __init__(self, at: int, exc=RuntimeError):
        super().__init__()
        _seed_all(11)
        self.inner = Noisy()
        self.at, self.n, self.exc = at, 0, exc

    def forward(self, x):
        self.n += 1
        if self.n == self.at:
            raise self.exc("boom")
        return self.inner(x)


FAILING = {
    "quantize_model": lambda m, b: quantize_model(m, b, QuantConfig(**FAST)),
    "quantize_model[reconstruction]": lambda m, b: quantize_model(
        m, b, QuantConfig(**FAST, abits=4, granularity="layer",
                          reconstruction=ReconstructConfig(iterations=3, batch_size=4))),
    "quantize_model[fisher]": lambda m, b: quantize_model(
        m, b, QuantConfig(**FAST, statistics="fisher"), loss_fn=loss_fn),
    "capture_hessians": lambda m, b: calibrate.capture_hessians(m, b),
    "input_ranges": lambda m, b: evaluate.input_ranges(m, b),
    "output_metrics": lambda m, b: evaluate.output_metrics(m, m, b),
    "layer_sensitivity": lambda m, b: sensitivity.layer_sensitivity(
        m, b, QuantConfig(**FAST), bits=(2,)),
    "gptq_model": lambda m, b: baselines.gptq_model(m, b, QuantConfig(**FAST)),
}


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("at", [2, 7])
@pytest.mark.parametrize("name", list(FAILING))
def test_a_failing_forward_leaves_user_state(name, at, exc):
    m, b = Breaks(at, exc), batches(n=3)
    m.train()
    snap, data = model_state(m), data_copy(b)
    _seed_all(1234)
    before = global_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            FAILING[name](m, b)
    except (qround.QroundError, RuntimeError, KeyboardInterrupt):
        pass
    diffs = global_diff(before, global_state()) + model_diff(snap, model_state(m))
    if not data_equal(data, b):
        diffs.append("batches changed")
    assert not diffs, f"{name}, forward raising {exc.__name__} on call {at}: {diffs}"


@pytest.mark.parametrize("name", ["solve[fast]", "quantize_model[default]",
                                  "quantize_model[abits+borders+reconstruction]",
                                  "layer_sensitivity+allocate", "QroundSampler[tabu]"])
def test_thread_counts_kept_at_other_values(name):
    """The sweep runs at one thread each; here torch and numba run at 2 (this machine's
    default) and the BLAS libraries at 1, so that a call setting any of them to 1 is seen."""
    from threadpoolctl import threadpool_limits
    t, n = torch.get_num_threads(), numba.get_num_threads()
    setup = CASES[name][0]
    owned, call = setup()
    try:
        torch.set_num_threads(2)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        with threadpool_limits(limits=1, user_api="blas"):
            before = global_state()
            _quiet(call, 0)
            diff = global_diff(before, global_state())
        assert not diff, f"{name}: {diff}"
    finally:
        torch.set_num_threads(t)
        numba.set_num_threads(n)


def test_cli_threads_option_is_restored(cli_files):
    before = global_state()
    _cli(["solve", str(cli_files / "l.npz"), "--solver", "tabu", "--threads", "2"])
    _cli(["-q", "quantize", "--model", str(cli_files / "model.pt"), "--calibration",
          str(cli_files / "cal.pt"), "--wbits", "3", "--solver", "greedy", "--threads", "2",
          "--out", str(cli_files / "t.safetensors")])
    assert not global_diff(before, global_state())


# ----------------------------------------------------------------------------- the defects
@pytest.mark.parametrize("name", ["explicit_layers", "explicit_attention",
                                  "explicit_conv_transpose", "explicit_conv3d"])
def test_explicit_forms_do_not_draw_from_the_global_generator(name):
    """The explicit forms and their fuse_* inverses built new layers with torch's default
    initialisation, which drew from the global generator before the weights were overwritten:
    the caller's later random draws changed (helper-164). They are built with skip_init."""
    make, fuse = _explicit_cases()[name]
    model = _explicit_model()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    explicit = make(model)
    assert torch.equal(torch.rand(3), expected), f"{name} drew from torch's generator"
    torch.manual_seed(0)
    fuse(explicit)
    assert torch.equal(torch.rand(3), expected), f"{name}: its fuse drew from torch's generator"


def test_read_only_numpy_batches_do_not_spend_torchs_warn_once():
    """Fingerprinting a read-only numpy batch (prefix_cache._summary) called torch.as_tensor on
    it, which gave torch's 'NumPy array is not writable' warning, attributed to qround, and
    torch then suppresses that warning for the rest of the process: the user's own
    torch.from_numpy of a read-only array no longer warned (helper-164)."""
    import subprocess
    import sys
    code = """if True:
        import warnings, numpy as np, torch
        from qround.prefix_cache import _summary
        x = np.ones((3, 4), np.float32); x.flags.writeable = False
        with warnings.catch_warnings(record=True) as qround_warned:
            warnings.simplefilter("always")
            _summary(x)
        with warnings.catch_warnings(record=True) as user_warned:
            warnings.simplefilter("always")
            torch.from_numpy(x)
        print(len(qround_warned), len(user_warned))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(
                             os.path.dirname(qround.__file__))}, timeout=120)
    assert out.stdout.split() == ["0", "1"], out.stdout + out.stderr[-2000:]
