"""transformers' Conv1D (GPT-2's projections, weight stored (in, out)) is rounded as the
nn.Linear it equals and comes back as a Conv1D: statistics, problems, whole-model quantisation,
save / load, baselines, and the layers that must stay in float (tied to another kind, a
subclass with its own forward, never called, parametrized)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="needs transformers (examples extra)")

from qround.activations import QuantizedLayer, insert_act_quantizers  # noqa: E402
from qround.calibrate import capture_fisher, capture_hessians, fisher_bytes  # noqa: E402
from qround.errors import QroundError  # noqa: E402
from qround.export import load  # noqa: E402
from qround.grid import GridSpec  # noqa: E402
from qround.pipeline import QuantConfig, quantize_model  # noqa: E402
from qround.problems.layers import (is_hf_conv1d, layer_weight, linear_from_conv1d,  # noqa: E402
                                    linear_view, linearize_conv1d, problems_from_layer,
                                    restore_conv1d)
from qround.solvers import Solver, get_solver  # noqa: E402
from qround.writeback import apply_to_layer, quantized_weight  # noqa: E402

Conv1D = transformers.pytorch_utils.Conv1D
FAST = dict(solver="fast", progress=False)


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


def conv(nf, nx, seed=0):
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.bias)
    return layer


def on_grid_transposed(conv_weight, qw):
    """The Conv1D's weight is W_hat^T, W_hat = the codes' dequantised values (out, in)."""
    return np.allclose(conv_weight.detach().double().numpy().T, qw.dequantized, rtol=1e-6,
                       atol=1e-8)


def test_linear_from_conv1d_is_the_same_layer():
    layer = conv(6, 4)                       # nf=6 outputs, nx=4 inputs: weight (4, 6)
    x = torch.randn(3, 5, 4)
    lin = linear_from_conv1d(layer)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (6, 4) and lin.weight.is_contiguous()
    torch.testing.assert_close(lin(x), layer(x))
    assert lin.weight.data_ptr() != layer.weight.data_ptr()   # a copy unless share=True
    shared = linear_from_conv1d(layer, share=True)
    assert shared.weight.data_ptr() == layer.weight.data_ptr() and shared.bias is layer.bias
    torch.testing.assert_close(shared(x), layer(x))
    assert is_hf_conv1d(layer) and not is_hf_conv1d(lin)
    np.testing.assert_array_equal(layer_weight(layer), layer.weight.detach().double().numpy().T)
    with pytest.raises(QroundError, match="needs a transformers Conv1D"):
        linear_from_conv1d(lin)


def test_linear_view_shares_tensors_and_leaves_the_model_alone():
    model = tiny_gpt2()
    model.transformer.extra = torch.ones(3)           # a plain tensor attribute: shared too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view, replaced = linear_view(model)
    assert list(replaced) == CONV1D_NAMES
    mods = dict(model.named_modules())
    assert all(isinstance(mods[n], Conv1D) for n in CONV1D_NAMES)
    assert view.transformer.extra is model.transformer.extra
    vm = dict(view.named_modules())
    for n in CONV1D_NAMES:
        assert isinstance(vm[n], nn.Linear)
        assert vm[n].weight.data_ptr() == mods[n].weight.data_ptr()
    b = batches(1)[0]
    torch.testing.assert_close(logits(view, b), logits(model, b))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plain = nn.Sequential(nn.Linear(3, 2))
    assert linear_view(plain) == (plain, {})   # nothing to convert: no copy
    root = conv(3, 2)
    new, root_replaced = linearize_conv1d(root)
    assert isinstance(new, nn.Linear) and root_replaced == {"": root}
    assert restore_conv1d(new, root_replaced) is root


def test_capture_and_problems_read_conv1d_as_its_linear():
    model = tiny_gpt2()
    data = batches()
    stats = capture_hessians(model, data, forward=logits)
    assert set(CONV1D_NAMES) <= set(stats)
    view, _ = linear_view(model)
    ref = capture_hessians(view, data, forward=logits, layers=CONV1D_NAMES)
    for n in CONV1D_NAMES:
        np.testing.assert_allclose(stats[n], ref[n], rtol=1e-12, atol=0)
    layer = dict(model.named_modules())["transformer.h.0.mlp.c_fc"]
    [problem] = problems_from_layer(layer, stats["transformer.h.0.mlp.c_fc"], GridSpec(bits=3))
    assert problem.weight.shape == (layer.nf, layer.weight.shape[0])
    sol = get_solver("fast").solve(problem, seed=0)
    assert sol.total_cost <= problem.rtn_costs().sum() * (1 + 1e-12)
    with pytest.raises(QroundError, match="linear_from_conv1d"):
        apply_to_layer(layer, quantized_weight(problem, sol))
    with pytest.raises(QroundError, match="linear_from_conv1d"):
        quantized_weight(problem, sol, module=layer)
    lin = apply_to_layer(linear_from_conv1d(layer), quantized_weight(problem, sol))
    np.testing.assert_allclose(lin.weight.detach().double().numpy(),
                               problem.grid.dequantize(problem.codes(sol.choices)), rtol=1e-6)


def test_fisher_statistics_of_conv1d_layers():
    model = tiny_gpt2()
    data = batches(2)

    def loss(out, batch):
        return out.pow(2).mean()

    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"]
    ours = capture_fisher(model, data, loss, names, forward=logits)
    view, _ = linear_view(model)
    ref = capture_fisher(view, data, loss, names, forward=logits)
    mods, vmods = dict(model.named_modules()), dict(view.named_modules())
    for n in names:
        assert ours[n].shape == (mods[n].nf, mods[n].weight.shape[0], mods[n].weight.shape[0])
        np.testing.assert_allclose(ours[n], ref[n], rtol=1e-10, atol=1e-30)
        assert fisher_bytes(mods[n]) == fisher_bytes(vmods[n])


def test_quantize_model_rounds_conv1d_layers_and_gives_them_back():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = batches()
    config = QuantConfig(wbits=3, **FAST)
    qm = quantize_model(model, data, config, forward=logits)
    # the float model is untouched, module types included
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(dict(model.named_modules())[n], Conv1D) for n in CONV1D_NAMES)
    assert [r.layer for r in qm.report] == CONV1D_NAMES
    assert {r.kind for r in qm.report} == {"Conv1D"}
    qmods = dict(qm.model.named_modules())
    for n in CONV1D_NAMES:
        qw = qm.layers[n]
        float_layer = dict(model.named_modules())[n]
        assert isinstance(qmods[n], Conv1D) and qmods[n].weight.is_contiguous()
        assert qw.weight_shape == (float_layer.nf, float_layer.weight.shape[0])
        assert on_grid_transposed(qmods[n].weight, qw)
        w = float_layer.weight.detach().double().numpy().T
        ratio = w / np.repeat(qw.scale, w.shape[1] // qw.scale.shape[1], axis=1)
        assert np.all((qw.codes == np.floor(ratio)) | (qw.codes == np.ceil(ratio))
                      | (qw.codes == qw.qmin) | (qw.codes == qw.qmax))
    # the same codes as quantising a model the user linearised first
    mine, _ = linearize_conv1d(tiny_gpt2())
    ref = quantize_model(mine, data, config, forward=logits)
    for n in CONV1D_NAMES:
        np.testing.assert_array_equal(qm.layers[n].codes, ref.layers[n].codes)
    torch.testing.assert_close(logits(qm.model, data[0]), logits(ref.model, data[0]))
    assert sum(r.cost for r in qm.report) < sum(r.rtn_cost for r in qm.report)


def test_conv1d_model_saves_and_loads(tmp_path):
    model = tiny_gpt2()
    data = batches()
    qm = quantize_model(model, data, QuantConfig(wbits=4, **FAST), forward=logits)
    path = tmp_path / "gpt2.safetensors"
    qm.save(path)
    loaded = load(model, path)
    assert all(isinstance(dict(loaded.named_modules())[n], Conv1D) for n in CONV1D_NAMES)
    assert torch.equal(logits(loaded, data[0]), logits(qm.model, data[0]))
    assert all(isinstance(dict(model.named_modules())[n], Conv1D) for n in CONV1D_NAMES)
    # transformers' own save / load of the quantised model (its architecture is GPT-2's)
    qm.model.save_pretrained(tmp_path / "hf")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(logits(again, data[0]), logits(qm.model, data[0]))
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0,
        eos_token_id=0))
    with pytest.raises(QroundError, match="weight shape"):
        load(other, path)


def test_activation_stage_wraps_the_linear_and_round_trips(tmp_path):
    from qround.reconstruct import ReconstructConfig

    model = tiny_gpt2()
    data = batches(2)
    config = QuantConfig(wbits=4, abits=8, **FAST, granularity="block",
                         reconstruction=ReconstructConfig(iterations=5))
    qm = quantize_model(model, data, config, forward=logits)
    qmods = dict(qm.model.named_modules())
    assert all(isinstance(qmods[n], QuantizedLayer) and type(qmods[n].layer) is nn.Linear
               for n in CONV1D_NAMES)
    assert qm.units.as_dict()["units"] == [["transformer.h.0"], ["transformer.h.1"]]
    path = tmp_path / "w4a8.safetensors"
    qm.save(path)
    loaded = load(model, path)
    torch.testing.assert_close(logits(loaded, data[0]), logits(qm.model, data[0]))


def test_inplace_rounds_the_users_own_conv1d_layers():
    model = tiny_gpt2()
    layers = {n: dict(model.named_modules())[n] for n in CONV1D_NAMES}
    seen = []
    handle = layers[CONV1D_NAMES[0]].register_forward_hook(lambda m, a, o: seen.append(1))
    qm = quantize_model(model, batches(), QuantConfig(wbits=4, **FAST), forward=logits,
                        inplace=True)
    assert qm.model is model and seen   # the user's hook ran during calibration
    for n, layer in layers.items():
        assert dict(model.named_modules())[n] is layer     # the same module objects
        assert on_grid_transposed(layer.weight, qm.layers[n])
    handle.remove()
    seen.clear()
    logits(model, batches(1)[0])
    assert not seen                                       # the user's handle still works
    root = conv(4, 6)
    qroot = quantize_model(root, [torch.randn(5, 6)], QuantConfig(wbits=4, **FAST),
                           inplace=True)
    assert qroot.model is root and on_grid_transposed(root.weight, qroot.layers[""])


class TwoNames(nn.Module):
    """One Conv1D under two names, and two Conv1D layers sharing one weight."""

    def __init__(self):
        super().__init__()
        self.a = conv(8, 8, seed=1)
        self.alias = self.a
        self.b = conv(8, 8, seed=2)
        self.c = conv(8, 8, seed=3)
        self.c.weight = self.b.weight

    def forward(self, x):
        return self.c(self.b(self.alias(self.a(x))))


def test_aliased_and_tied_conv1d_layers_are_rounded_once():
    model = TwoNames()
    data = [torch.randn(16, 8) for _ in range(2)]
    qm = quantize_model(model, data, QuantConfig(wbits=4, **FAST))
    assert [r.layer for r in qm.report] == ["a", "b"]
    assert "rounded once" in qm.skipped["c"]
    assert qm.model.alias is qm.model.a and qm.model.c.weight is qm.model.b.weight
    assert on_grid_transposed(qm.model.a.weight, qm.layers["a"])
    assert on_grid_transposed(qm.model.c.weight, qm.layers["b"])
    assert model.c.weight is model.b.weight and isinstance(model.alias, Conv1D)


def test_a_conv1d_tied_to_an_excluded_one_stays_in_float():
    """The Linear view of b has a Parameter of its own over b's memory: the tie to the excluded
    c was once missed (c rounded silently), then taken for a .data tie and refused."""
    model = TwoNames()
    data = [torch.randn(16, 8) for _ in range(2)]
    before = model.c.weight.detach().clone()
    qm = quantize_model(model, data, QuantConfig(wbits=4, exclude="^c$", **FAST))
    assert "stays in float" in qm.skipped["b"] and "b" not in qm.layers
    assert torch.equal(qm.model.c.weight, before) and qm.model.b.weight is qm.model.c.weight


class Special(Conv1D):
    def forward(self, x):
        return super().forward(x) * 2


class Odd(nn.Module):
    """A Conv1D tied to an embedding, a subclass with its own forward, one whose weight its
    parent reads directly (never called), and a plain one."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 8)
        self.tied = conv(8, 8, seed=1)
        self.tied.weight = self.emb.weight
        self.special = Special(8, 8)
        self.direct = conv(8, 8, seed=2)
        self.plain = conv(8, 8, seed=3)

    def forward(self, x):
        return self.plain(self.special(self.tied(x)) @ self.direct.weight)


def test_conv1d_layers_that_stay_in_float():
    model = Odd()
    data = [torch.randn(16, 8) for _ in range(2)]
    qm = quantize_model(model, data, QuantConfig(wbits=4, **FAST))
    assert [r.layer for r in qm.report] == ["plain"]
    assert "tied" in qm.skipped["tied"] and "'emb'" in qm.skipped["tied"]
    assert "own forward" in qm.skipped["special"]
    assert "never called" in qm.skipped["direct"]
    for name in ("tied", "special", "direct"):
        kept = getattr(qm.model, name)
        assert type(kept) is type(getattr(model, name))
        assert torch.equal(kept.weight, getattr(model, name).weight)
    # the quantised model is the float one with only `plain` rounded
    expected = copy.deepcopy(model)
    with torch.no_grad():
        expected.plain.weight.copy_(torch.as_tensor(qm.layers["plain"].dequantized.T))
    torch.testing.assert_close(qm.model(data[0]), expected(data[0]))


def test_parametrized_conv1d_is_refused_unless_excluded():
    model = nn.Sequential(conv(8, 8, seed=1), conv(8, 8, seed=2))
    torch.nn.utils.parametrizations.weight_norm(model[1])
    data = [torch.randn(16, 8)]
    with pytest.raises(QroundError, match="'1'.*parametrized"):
        quantize_model(model, data, QuantConfig(wbits=4, **FAST))
    qm = quantize_model(model, data, QuantConfig(wbits=4, **FAST, exclude="^1$"))
    assert [r.layer for r in qm.report] == ["0"] and qm.skipped["1"] == "excluded by exclude='^1$'"


def test_act_quantizers_leave_conv1d_layers_alone():
    model = tiny_gpt2()
    wrapped = insert_act_quantizers(model, None, abits=8, calib_batches=batches(1),
                                    forward=logits)
    mods = dict(wrapped.named_modules())
    assert isinstance(mods["lm_head"], QuantizedLayer)
    assert all(isinstance(mods[n], Conv1D) for n in CONV1D_NAMES)
    with pytest.raises(QroundError, match="not nn.Linear, nn.Conv2d or nn.Conv1d"):
        insert_act_quantizers(model, [CONV1D_NAMES[0]], abits=8)


class Refuses(Solver):
    name = "refuses"

    def _solve(self, problem, start, rng):
        raise AssertionError("a solve started")


def test_a_key_value_cache_is_refused_before_any_solve():
    from qround.reconstruct import ReconstructConfig

    config = QuantConfig(wbits=4, abits=8, solver=Refuses(), progress=False, granularity="block",
                         reconstruction=ReconstructConfig(iterations=5))
    with pytest.raises(QroundError, match="use_cache=False"):
        quantize_model(tiny_gpt2(), batches(2), config, forward=lambda m, b: m(b).logits)


def test_baselines_give_conv1d_models_back():
    from qround.baselines import gptq_model, rtn_model

    model = tiny_gpt2()
    data = batches()
    for quantised in (gptq_model(model, data, QuantConfig(wbits=4), forward=logits)[0],
                 rtn_model(model, QuantConfig(wbits=4))[0]):
        mods = dict(quantised.named_modules())
        assert all(isinstance(mods[n], Conv1D) for n in CONV1D_NAMES)
        w = mods[CONV1D_NAMES[0]].weight.detach()
        float_w = dict(model.named_modules())[CONV1D_NAMES[0]].weight.detach()
        assert not torch.equal(w, float_w) and torch.allclose(w, float_w, atol=0.1)
        assert torch.isfinite(logits(quantised, data[0])).all()
    assert all(isinstance(dict(model.named_modules())[n], Conv1D) for n in CONV1D_NAMES)


class GroupedQuery(nn.Module):
    """q, k and v read one input; k and v are narrower (grouped-query attention)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.o = nn.Linear(16, 8)

    def forward(self, x):
        return self.o(torch.cat([self.q(x), self.k(x), self.v(x)], -1))


def test_first_last_bits_cover_narrower_k_and_v():
    qm = quantize_model(GroupedQuery(), [torch.randn(32, 8)],
                        QuantConfig(wbits=3, first_last_bits=8, **FAST))
    assert {r.layer: r.bits for r in qm.report} == {"q": 8, "k": 8, "v": 8, "o": 8}
    qm = quantize_model(nn.Sequential(GroupedQuery(), nn.ReLU(), nn.Linear(8, 8)),
                        [torch.randn(32, 8)], QuantConfig(wbits=3, first_last_bits=8, **FAST))
    assert {r.layer: r.bits for r in qm.report} == {"0.q": 8, "0.k": 8, "0.v": 8, "0.o": 3,
                                                    "2": 8}


def test_a_pattern_that_matches_nothing_shows_conv1d_names():
    with pytest.raises(QroundError, match=r"look like \['transformer.h.0.attn.c_attn'"):
        quantize_model(tiny_gpt2(), batches(1), QuantConfig(wbits=4, layers="nomatch", **FAST),
                       forward=logits)


def test_rtn_model_with_an_example_leaves_the_callers_rng_and_uncalled_layers_alone():
    """With an example batch, rtn_model runs the forward (Conv1D selection, the trace) under
    config.seed, so a forward that samples does not move the caller's RNG; and, as
    quantize_model, it leaves layers the forward never calls in float."""
    from qround.baselines import rtn_model

    model = tiny_gpt2()
    data = batches(1)
    spare = nn.Linear(32, 32)      # a layer the forward never calls
    model.spare = spare

    def noisy(m, b):
        return m(b + 0 * torch.randint(0, 2, b.shape), use_cache=False).logits

    torch.manual_seed(123)
    before = torch.get_rng_state()
    quantised, _ = rtn_model(model, QuantConfig(wbits=4), example=data[0], forward=noisy)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(quantised.spare.weight, spare.weight)   # never called: float
    mods = dict(quantised.named_modules())
    assert not torch.equal(mods[CONV1D_NAMES[0]].weight,
                           dict(model.named_modules())[CONV1D_NAMES[0]].weight)
    without, _ = rtn_model(model, QuantConfig(wbits=4))       # no example: every layer
    assert not torch.equal(without.spare.weight, spare.weight)


@pytest.mark.parametrize("fail_at", [2, 4])
def test_a_failed_inplace_run_gives_the_users_conv1d_layers_back(fail_at):
    # an interruption left nn.Linear views in the user's model: its state_dict was transposed
    model = tiny_gpt2()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    calls = [0]

    def forward(m, batch):
        calls[0] += 1
        if calls[0] == fail_at:
            raise KeyboardInterrupt
        return m(batch, use_cache=False)

    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, batches(), QuantConfig(wbits=4, **FAST), forward=forward,
                       inplace=True)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    transformers.GPT2LMHeadModel(model.config).load_state_dict(model.state_dict())


class Conv1DExperts(nn.Module):
    """A router over two Conv1D experts that calls only the experts some row reaches."""

    def __init__(self):
        super().__init__()
        self.gate = conv(8, 6, seed=5)
        self.e0, self.e1 = conv(4, 8, seed=6), conv(4, 8, seed=7)
        with torch.no_grad():
            self.gate.bias[0] = 0.0     # the router's output 0 takes both signs

    def forward(self, x):
        h = self.gate(x)
        out = [e(h[m]) for e, m in ((self.e0, h[:, 0] > 0), (self.e1, h[:, 0] <= 0)) if m.any()]
        return torch.cat(out)


def test_a_conv1d_expert_first_reached_on_a_later_batch_is_rounded():
    model = Conv1DExperts().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        rows = torch.randn(96, 6, generator=g)
        to_e0 = model.gate(rows)[:, 0] > 0
        assert 8 <= int(to_e0.sum()) <= 88
        # batch 0 reaches e0 only, the later ones both experts
        data = [rows[to_e0][:8], rows[8:48], rows[48:]]
        assert all((model.gate(b)[:, 0] <= 0).any() for b in data[1:])
    qm = quantize_model(model, data, QuantConfig(wbits=3, solver="greedy", progress=False))
    assert list(qm.layers) == ["gate", "e0", "e1"] and not qm.skipped
    assert isinstance(qm.model.e1, Conv1D)
    assert on_grid_transposed(qm.model.e1.weight, qm.layers["e1"])
