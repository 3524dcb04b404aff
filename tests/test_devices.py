"""Solvers and the pipeline on a device: ``get_solver(spec, device=)``, ``place``, ``--device``;
the CUDA paths themselves run only where torch sees a GPU (skipped with a reason elsewhere)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qround import QroundError
from qround.cli import main
from qround.pipeline import QuantConfig, quantize_model
from qround.solvers import (GPTQ, CrossEntropy, HopfieldClassic, MeanField, Relaxation, get_solver,
                            place)

from .conftest import make_problem
from .test_cli import layer_file  # noqa: F401  (fixture)
from .test_pipeline import FAST, build, state

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: torch.cuda.is_available() is False")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")


def devices_of(solver):
    out, stack = [], [solver]
    while stack:
        s = stack.pop()
        stack.extend(getattr(s, "solvers", []))
        if "device" in vars(s):
            out.append(s.device)
    return out


# ------------------------------------------------------------------- placement (any machine)
@pytest.mark.parametrize("spec, torch_parts", [("cem", 1), ("hopfield+greedy", 1),
                                               ("gptq+tabu|hopfield", 2), ("fast", 1),
                                               ("quality", 2),
                                               ("greedy", 0)])
def test_get_solver_device_reaches_every_torch_part(spec, torch_parts):
    solver = get_solver(spec, device="cpu")
    assert devices_of(solver) == ["cpu"] * torch_parts
    sol = solver.solve(make_problem(m=4, n=10, seed=3), seed=0)
    assert sol.total_cost <= sol.total_rtn_cost * (1 + 1e-12)


def test_place_moves_a_built_chain_and_checks_the_device():
    chain = get_solver("hopfield+greedy")
    assert place(chain, "cpu") is chain and devices_of(chain) == ["cpu"]
    with pytest.raises(QroundError, match="device"):
        place(chain, "tpu")
    with pytest.raises(QroundError, match="Solver instance"):
        get_solver(CrossEntropy(), device="cpu")


@no_cuda
def test_cuda_without_cuda_is_a_clear_error(layer_file, capsys):  # noqa: F811
    with pytest.raises(QroundError, match="CUDA"):
        get_solver("hopfield+greedy", device="cuda")
    assert main(["solve", str(layer_file), "--solver", "cem", "--device", "cuda"]) == 2
    assert "CUDA" in capsys.readouterr().err


@no_cuda
def test_bench_on_a_missing_device_stops_before_any_work(capsys):
    argv = ["bench", "--device", "cuda", "--minilm-layers", "", "--cnn-layers", "0",
            "--no-progress"]
    assert main(argv) == 2
    assert "CUDA" in capsys.readouterr().err


def test_cli_solve_device_cpu(layer_file, capsys):  # noqa: F811
    assert main(["solve", str(layer_file), "--solver", "gptq+greedy", "--device", "cpu",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ratio"] < 1.0


# ------------------------------------------------------------------------- CUDA (GPU only)
@needs_cuda
@pytest.mark.parametrize("spec", ["cem", "hopfield", "hopfield-classic", "meanfield", "gptq",
                                  "gptq+tabu", "hopfield+greedy", "fast"])
def test_solver_on_cuda_is_valid_and_never_worse_than_its_start(spec):
    p = make_problem(m=12, n=40, seed=5)
    start = p.rtn_choices()
    sol = get_solver(spec, device="cuda").solve(p, init=start, seed=0)
    assert sol.choices.shape == p.weight.shape and sol.choices.dtype == bool
    e0 = p.energies(start)
    assert np.all(sol.energy <= e0 + 1e-9 * np.abs(e0).max())
    np.testing.assert_allclose(sol.energy, p.energies(sol.choices), rtol=1e-12)  # host float64
    assert sol.total_cost < sol.total_rtn_cost


@needs_cuda
@pytest.mark.parametrize("cls, kwargs", [(Relaxation, dict(iterations=300)),
                                         (HopfieldClassic, dict(iterations=300)),
                                         (MeanField, {}), (GPTQ, {})])
def test_deterministic_solvers_agree_across_devices_in_float64(cls, kwargs):
    p = make_problem(m=10, n=32, seed=9)
    a = cls(device="cpu", dtype="float64", **kwargs).solve(p, seed=0)
    b = cls(device="cuda", dtype="float64", **kwargs).solve(p, seed=0)
    # no randomness: the same arithmetic up to the order of floating-point sums
    assert (a.choices == b.choices).all(axis=1).mean() >= 0.9
    assert b.total_cost == pytest.approx(a.total_cost, rel=1e-2)


@needs_cuda
def test_cem_on_cuda_is_deterministic_with_a_seed():
    p = make_problem(m=10, n=32, seed=4)
    a = CrossEntropy(device="cuda", samples=64, iterations=40).solve(p, seed=7)
    b = CrossEntropy(device="cuda", samples=64, iterations=40).solve(p, seed=7)
    np.testing.assert_array_equal(a.choices, b.choices)


@needs_cuda
@pytest.mark.parametrize("kind", ["branchy", "cnn"])
def test_pipeline_on_cuda_leaves_the_float_model_and_writes_floor_or_ceil(kind):
    model, data = build(kind)
    before = state(model)
    qm = quantize_model(model, data, QuantConfig(**FAST, solver="fast", device="cuda"))
    ref = quantize_model(model, data, QuantConfig(**FAST, solver="fast", device="cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for row, cpu_row in zip(qm.report, ref.report):
        assert row.layer == cpu_row.layer
        assert row.cost <= row.rtn_cost * (1 + 1e-9)
        # statistics accumulated on the GPU (float64) are the CPU's up to summation order
        assert row.rtn_cost == pytest.approx(cpu_row.rtn_cost, rel=1e-6)
    for name, qw in qm.layers.items():
        w = dict(qm.model.named_modules())[name].weight
        assert w.device.type == "cpu"
        assert torch.equal(w, torch.as_tensor(qw.dequantized, dtype=torch.float32))


@needs_cuda
@pytest.mark.parametrize("cls", [Relaxation, HopfieldClassic])
def test_cuda_graph_replay_equals_eager_steps(cls):
    p = make_problem(m=10, n=32, seed=6)
    a = cls(iterations=230, eval_every=20, device="cuda", graph=True).solve(p, seed=0)
    b = cls(iterations=230, eval_every=20, device="cuda", graph=False).solve(p, seed=0)
    np.testing.assert_array_equal(a.choices, b.choices)
    assert a.total_cost <= a.total_rtn_cost


@needs_cuda
def test_model_on_cuda_weights_only_with_bias_correction():
    model, data = build("cnn")
    model = model.cuda()
    data = [b.cuda() for b in data]
    before = state(model)
    qm = quantize_model(model, data, QuantConfig(**FAST, solver="fast", device="cuda",
                                                 bias_correction=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cuda" for p in qm.model.parameters())
    for row in qm.report:
        assert np.isfinite(row.cost) and row.cost <= row.rtn_cost * (1 + 1e-9)
    with torch.no_grad():
        assert torch.isfinite(qm.model(data[0])).all()


@needs_cuda
def test_model_on_cuda_with_borders_reconstruction_and_reload(tmp_path):
    from qround import export
    from qround.activations import QuantizedLayer
    from qround.reconstruct import ReconstructConfig

    from .tiny_models import BATCHES, TinyResNet

    net = TinyResNet().cuda()
    batches = [b.cuda() for b in BATCHES]
    rec = ReconstructConfig(iterations=20, batch_size=8, seed=1)
    cfg = QuantConfig(wbits=2, symmetric=False, solver="greedy", progress=False, abits=3,
                      borders="quadratic", reconstruction=rec, device="cuda")
    result = quantize_model(net, batches, cfg)
    assert all(b.loss_after <= b.loss_before for b in result.reconstruction.blocks)
    path = tmp_path / "q.safetensors"
    result.save(path)
    loaded = export.load(net, path)
    assert isinstance(dict(loaded.named_modules())["block.conv1"], QuantizedLayer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[1]), result.model(batches[1]),
                                   rtol=1e-5, atol=1e-5)


# Paths of the pipeline that the tests above do not take, each on a model that lives on CUDA.
CUDA_PIPELINES = {
    "fisher-refits-widen-bias-groups": dict(statistics="fisher", refits=1, widen=True,
                                            bias_correction=True, group_size=2),
    "asymmetric-damp-first-last": dict(inputs="asymmetric", damp=0.01, first_last_bits=8),
    "linear-borders-qdrop-loss-granularity": dict(abits=4, borders="linear", granularity="loss",
                                                  k=1),
    "nearest-acts-modcap": dict(abits=4, granularity="modcap"),
}


@needs_cuda
@pytest.mark.parametrize("name", sorted(CUDA_PIPELINES))
def test_pipeline_paths_on_cuda(name):
    import torch.nn.functional as F

    from qround.reconstruct import ReconstructConfig

    from .test_pipeline import batches, mlp2

    model = mlp2().cuda()
    data = [b.cuda() for b in batches((16, 10))]
    gen = torch.Generator().manual_seed(3)
    pairs = [(b, torch.randn(b.shape[0], 6, generator=gen).cuda()) for b in data]
    before = state(model)
    options = dict(CUDA_PIPELINES[name])
    if "abits" in options:
        options["reconstruction"] = ReconstructConfig(iterations=20, batch_size=8, seed=1,
                                                      qdrop=0.5)
    qm = quantize_model(model, pairs, QuantConfig(**FAST, solver="fast", device="cuda", **options),
                        forward=lambda m, b: m(b[0]),
                        loss_fn=lambda out, b: F.mse_loss(out, b[1]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.device.type == "cuda" for p in qm.model.parameters())
    assert list(qm.layers) == ["0", "2"]
    with torch.no_grad():
        assert torch.isfinite(qm.model(data[0])).all()


@needs_cuda
def test_conv1d_model_on_cuda():
    transformers = pytest.importorskip("transformers", reason="GPT-2's Conv1D is transformers'")
    from .test_conv1d import CONV1D_NAMES, batches, tiny_gpt2

    model = tiny_gpt2().cuda()
    data = [b.cuda() for b in batches()]
    qm = quantize_model(model, data, QuantConfig(**FAST, solver="fast", device="cuda"),
                        forward=lambda m, b: m(b, use_cache=False))
    conv1d = transformers.pytorch_utils.Conv1D
    modules = dict(qm.model.named_modules())
    assert set(CONV1D_NAMES) <= set(qm.layers)
    assert all(isinstance(modules[n], conv1d) and modules[n].weight.is_cuda for n in CONV1D_NAMES)
    for n in CONV1D_NAMES:
        qw = qm.layers[n]
        assert np.allclose(modules[n].weight.detach().double().cpu().numpy().T, qw.dequantized,
                           rtol=1e-6, atol=1e-8)


@needs_cuda
def test_baselines_on_cuda():
    from qround.baselines import gptq_model, rtn_model

    from .test_pipeline import build

    model, data = build("cnn")
    model = model.cuda()
    data = [b.cuda() for b in data]
    before = state(model)
    cfg = QuantConfig(**FAST, device="cuda")
    for quantized in (rtn_model(model, cfg)[0], gptq_model(model, data, cfg)[0]):
        assert all(p.device.type == "cuda" for p in quantized.parameters())
        with torch.no_grad():
            assert torch.isfinite(quantized(data[0])).all()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
