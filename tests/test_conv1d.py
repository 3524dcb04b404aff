"""transformers' Conv1D (GPT-2's projections, weight stored (in, out)) is rounded as the
nn.Linear it equals: statistics, problems, whole-model quantisation, save / load, baselines."""
import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="needs transformers (examples extra)")

from qround.calibrate import capture_hessians  # noqa: E402
from qround.errors import QroundError  # noqa: E402
from qround.export import load  # noqa: E402
from qround.grid import GridSpec  # noqa: E402
from qround.pipeline import QuantConfig, quantize_model  # noqa: E402
from qround.problems.layers import (is_hf_conv1d, layer_weight, linear_from_conv1d,  # noqa: E402
                                    linear_view, linearize_conv1d, problems_from_layer)
from qround.solvers import get_solver  # noqa: E402
from qround.writeback import apply_to_layer, quantized_weight  # noqa: E402

Conv1D = transformers.pytorch_utils.Conv1D


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (2, 12), generator=g) for _ in range(n)]


def logits(model, batch):
    return model(batch, use_cache=False).logits


CONV1D_NAMES = [f"transformer.h.{i}.{n}" for i in range(2)
                for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_linear_from_conv1d_is_the_same_layer():
    torch.manual_seed(0)
    conv = Conv1D(6, 4)                       # nf=6 outputs, nx=4 inputs: weight (4, 6)
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 5, 4)
    lin = linear_from_conv1d(conv)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (6, 4) and lin.weight.is_contiguous()
    torch.testing.assert_close(lin(x), conv(x))
    assert lin.weight.data_ptr() != conv.weight.data_ptr()   # a copy unless share=True
    shared = linear_from_conv1d(conv, share=True)
    assert shared.weight.data_ptr() == conv.weight.data_ptr() and shared.bias is conv.bias
    torch.testing.assert_close(shared(x), conv(x))
    assert is_hf_conv1d(conv) and not is_hf_conv1d(lin)
    np.testing.assert_array_equal(layer_weight(conv), conv.weight.detach().double().numpy().T)
    with pytest.raises(QroundError, match="needs a transformers Conv1D"):
        linear_from_conv1d(lin)


def test_linear_view_shares_tensors_and_leaves_the_model_alone():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view, names = linear_view(model)
    assert names == CONV1D_NAMES
    assert all(isinstance(dict(model.named_modules())[n], Conv1D) for n in names)
    vm = dict(view.named_modules())
    for n in names:
        assert isinstance(vm[n], nn.Linear)
        assert vm[n].weight.data_ptr() == dict(model.named_modules())[n].weight.data_ptr()
    b = batches(1)[0]
    torch.testing.assert_close(logits(view, b), logits(model, b))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plain = nn.Sequential(nn.Linear(3, 2))
    assert linear_view(plain) == (plain, [])   # nothing to convert: no copy
    root = Conv1D(3, 2)
    new, root_names = linearize_conv1d(root)
    assert isinstance(new, nn.Linear) and root_names == [""]


def test_capture_and_problems_read_conv1d_as_its_linear():
    model = tiny_gpt2()
    data = batches()
    fwd = logits
    stats = capture_hessians(model, data, forward=fwd)
    assert set(CONV1D_NAMES) <= set(stats)
    view, _ = linear_view(model)
    ref = capture_hessians(view, data, forward=fwd, layers=CONV1D_NAMES)
    for n in CONV1D_NAMES:
        np.testing.assert_allclose(stats[n], ref[n], rtol=1e-12, atol=0)
    conv = dict(model.named_modules())["transformer.h.0.mlp.c_fc"]
    [problem] = problems_from_layer(conv, stats["transformer.h.0.mlp.c_fc"], GridSpec(bits=3))
    assert problem.weight.shape == (conv.nf, conv.weight.shape[0])
    sol = get_solver("fast").solve(problem, seed=0)
    assert sol.total_cost <= problem.rtn_costs().sum() * (1 + 1e-12)
    with pytest.raises(QroundError, match="linear_from_conv1d"):
        apply_to_layer(conv, quantized_weight(problem, sol))
    with pytest.raises(QroundError, match="linear_from_conv1d"):
        quantized_weight(problem, sol, module=conv)
    lin = apply_to_layer(linear_from_conv1d(conv), quantized_weight(problem, sol))
    np.testing.assert_allclose(lin.weight.detach().double().numpy(),
                               problem.grid.dequantize(problem.codes(sol.choices)), rtol=1e-6)


def test_quantize_model_rounds_conv1d_layers_as_linear():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = batches()
    config = QuantConfig(wbits=3, solver="fast", progress=False)
    qm = quantize_model(model, data, config, forward=logits)
    # the float model is untouched, module types included
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(dict(model.named_modules())[n], Conv1D) for n in CONV1D_NAMES)
    assert [r.layer for r in qm.report] == CONV1D_NAMES
    assert {r.kind for r in qm.report} == {"Conv1D"}
    qmods = dict(qm.model.named_modules())
    for n in CONV1D_NAMES:
        qw = qm.layers[n]
        conv = dict(model.named_modules())[n]
        assert isinstance(qmods[n], nn.Linear) and qw.weight_shape == (conv.nf, conv.weight.shape[0])
        np.testing.assert_allclose(qmods[n].weight.detach().double().numpy(), qw.dequantized,
                                   rtol=1e-6, atol=1e-8)
        # floor or ceil of the float weight (transposed) on the layer's grid
        w = conv.weight.detach().double().numpy().T
        ratio = w / np.repeat(qw.scale, w.shape[1] // qw.scale.shape[1], axis=1)
        assert np.all((qw.codes == np.floor(ratio)) | (qw.codes == np.ceil(ratio))
                      | (qw.codes == qw.qmin) | (qw.codes == qw.qmax))
    # the same codes as quantising a model the user linearised first
    mine, _ = linearize_conv1d(tiny_gpt2())
    ref = quantize_model(mine, data, config, forward=logits)
    for n in CONV1D_NAMES:
        np.testing.assert_array_equal(qm.layers[n].codes, ref.layers[n].codes)
    b = data[0]
    torch.testing.assert_close(logits(qm.model, b), logits(ref.model, b))
    assert sum(r.cost for r in qm.report) < sum(r.rtn_cost for r in qm.report)


def test_conv1d_model_saves_and_loads(tmp_path):
    model = tiny_gpt2()
    data = batches()
    qm = quantize_model(model, data, QuantConfig(wbits=4, solver="fast", progress=False),
                        forward=logits)
    path = tmp_path / "gpt2.safetensors"
    qm.save(path)
    loaded = load(model, path)
    b = data[0]
    assert torch.equal(logits(loaded, b), logits(qm.model, b))
    assert all(isinstance(dict(model.named_modules())[n], Conv1D) for n in CONV1D_NAMES)
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0,
        eos_token_id=0))
    with pytest.raises(QroundError, match="weight shape"):
        load(other, path)


def test_inplace_replaces_the_users_conv1d_layers():
    model = tiny_gpt2()
    qm = quantize_model(model, batches(), QuantConfig(wbits=4, solver="fast", progress=False),
                        forward=logits, inplace=True)
    assert qm.model is model
    for n in CONV1D_NAMES:
        module = dict(model.named_modules())[n]
        assert isinstance(module, nn.Linear)
        np.testing.assert_allclose(module.weight.detach().double().numpy(),
                                   qm.layers[n].dequantized, rtol=1e-6, atol=1e-8)


def test_baselines_take_conv1d_models():
    from qround.baselines import gptq_model, rtn_model

    model = tiny_gpt2()
    data = batches()
    for copy in (gptq_model(model, data, QuantConfig(wbits=4), forward=logits)[0],
                 rtn_model(model, QuantConfig(wbits=4))[0]):
        mods = dict(copy.named_modules())
        assert all(isinstance(mods[n], nn.Linear) for n in CONV1D_NAMES)
        w = mods[CONV1D_NAMES[0]].weight.detach()
        float_w = dict(model.named_modules())[CONV1D_NAMES[0]].weight.detach().T
        assert not torch.equal(w, float_w) and torch.allclose(w, float_w, atol=0.1)
    assert all(isinstance(dict(model.named_modules())[n], Conv1D) for n in CONV1D_NAMES)


def test_reconstruction_refuses_a_key_value_cache_and_runs_without():
    from qround.reconstruct import ReconstructConfig

    model = tiny_gpt2()
    data = batches(2)
    config = QuantConfig(wbits=4, abits=8, solver="fast", progress=False, granularity="block",
                         reconstruction=ReconstructConfig(iterations=5))
    with pytest.raises(QroundError, match="use_cache=False"):
        quantize_model(model, data, config, forward=lambda m, b: m(b).logits)  # GPT-2 caches
    qm = quantize_model(model, data, config, forward=logits)
    assert qm.units.as_dict()["units"] == [["transformer.h.0"], ["transformer.h.1"]]
    assert torch.isfinite(logits(qm.model, data[0])).all()
