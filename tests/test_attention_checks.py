"""qround.attention: behaviours the round-trip and equality tests leave open (mutation testing,
helper-145): dropout and train/eval mode carried both ways, no aliasing of the user's
attention, batch_first with unbatched inputs, refusals for hooks on out_proj and recomputed
weights, shared attention modules, a bare attention module as the model, inplace, and the
packed/separate layout of the fused module."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from qround.attention import LinearMultiheadAttention, explicit_attention, fuse_attention
from qround.errors import QroundError
from qround.pipeline import QuantConfig, quantize_model

from .test_attention import _gen, _mha

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(shape, seed=5):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64)


def test_dropout_and_the_training_mode_are_carried_both_ways():
    mha = _mha(dropout=0.4)
    lin = LinearMultiheadAttention(mha)
    assert lin.dropout == 0.4 and not lin.training          # mha is in eval mode
    assert LinearMultiheadAttention(mha.train()).training
    lin.train()
    q = _inputs((5, 3, 8))
    torch.manual_seed(7)
    want, want_w = mha(q, q, q)
    torch.manual_seed(7)
    got, got_w = lin(q, q, q)
    # training: the same dropout draws drop the same attention weights
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert not torch.allclose(got, lin.eval()(q, q, q)[0])  # the dropout did act
    model = nn.Sequential(nn.Identity())
    model.attn = _mha(dropout=0.4)       # eval
    back = fuse_attention(explicit_attention(model)).attn
    assert back.dropout == 0.4 and not back.training


def test_the_explicit_module_does_not_alias_the_users_attention():
    mha = _mha(add_bias_kv=True)
    before = {k: v.clone() for k, v in mha.state_dict().items()}
    lin = LinearMultiheadAttention(mha)
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    for k, v in mha.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batch_first_with_an_unbatched_input():
    mha = _mha(batch_first=True)
    lin = LinearMultiheadAttention(mha)
    q, k = _inputs((5, 8)), _inputs((4, 8), 6)
    with torch.no_grad():
        want, want_w = mha(q, k, k)
        got, got_w = lin(q, k, k)
    assert got.shape == (5, 8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-10, atol=1e-12)


def test_refusals_of_out_proj_hooks_and_recomputed_weights():
    hooked = nn.Sequential(nn.Identity())
    hooked.attn = nn.MultiheadAttention(8, 2)
    hooked.attn.out_proj.register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(QroundError, match="'attn' explicit: its out_proj has a forward "
                                          "pre-hook"):
        explicit_attention(hooked)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    for name in ("in_proj_weight", "out_proj"):
        model = nn.Sequential(nn.Identity())
        model.attn = nn.MultiheadAttention(8, 2)
        if name == "in_proj_weight":
            parametrize.register_parametrization(model.attn, "in_proj_weight", Double())
            match = "its in_proj_weight is not a parameter"
        else:
            parametrize.register_parametrization(model.attn.out_proj, "weight", Double())
            match = "its out_proj: its weight is parametrized"
        with pytest.raises(QroundError, match=match):
            explicit_attention(model)
        with pytest.raises(QroundError, match=match):
            LinearMultiheadAttention(model.attn)


def test_an_attention_module_under_two_names_stays_one_module():
    mha = _mha()
    model = nn.ModuleDict({"a": mha, "b": nn.Sequential(mha)})
    explicit = explicit_attention(model)
    assert isinstance(explicit.a, LinearMultiheadAttention) and explicit.b[0] is explicit.a
    back = fuse_attention(explicit)
    assert type(back.a) is nn.MultiheadAttention and back.b[0] is back.a


def test_a_bare_attention_module_and_inplace():
    mha = _mha()
    lin = explicit_attention(mha)
    assert isinstance(lin, LinearMultiheadAttention)
    back = fuse_attention(lin)
    assert type(back) is nn.MultiheadAttention
    assert torch.equal(back.in_proj_weight, mha.in_proj_weight)
    # inplace: the model itself changes, and is returned
    model = nn.Sequential(nn.Identity())
    model.attn = mha
    assert explicit_attention(model, inplace=True) is model
    assert isinstance(model.attn, LinearMultiheadAttention)
    explicit = model.attn
    assert fuse_attention(model, inplace=True) is model
    assert type(model.attn) is nn.MultiheadAttention
    assert isinstance(explicit, LinearMultiheadAttention)    # not changed itself


@pytest.mark.parametrize("kdim, vdim", [(8, 3), (5, 8)])
def test_one_foreign_dimension_fuses_to_separate_weights(kdim, vdim):
    mha = _mha(kdim=kdim, vdim=vdim)
    model = nn.Sequential(nn.Identity())
    model.attn = mha
    back = fuse_attention(explicit_attention(model)).attn
    assert back.in_proj_weight is None and torch.equal(back.k_proj_weight, mha.k_proj_weight)
    q, k, v = _inputs((5, 3, 8)), _inputs((4, 3, kdim), 6), _inputs((4, 3, vdim), 7)
    with torch.no_grad():
        torch.testing.assert_close(back(q, k, v)[0], mha(q, k, v)[0])


def test_a_bias_added_to_a_bias_free_attention_is_trainable_after_fusing():
    lin = LinearMultiheadAttention(_mha(bias=False))
    lin.out_proj.bias = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    back = fuse_attention(nn.ModuleList([lin]))[0]
    assert back.in_proj_bias is not None and back.in_proj_bias.requires_grad
    assert back.out_proj.bias.requires_grad
    lin.out_proj.weight.requires_grad_(False)
    lin.q_proj.weight.requires_grad_(False)
    back = fuse_attention(nn.ModuleList([lin]))[0]
    assert not back.in_proj_bias.requires_grad and not back.in_proj_weight.requires_grad


def test_an_attention_sharing_a_parameter_or_its_out_proj_is_refused():
    """The explicit module holds copies of the projections: a parameter (or the out_proj)
    shared with another module would be untied silently, so it is refused before any change;
    the same attention under two names stays allowed (it is replaced once)."""
    a, b = nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2)
    b.out_proj = a.out_proj
    with pytest.raises(QroundError, match="'0' shares its out_proj with '1.out_proj'"):
        explicit_attention(nn.ModuleList([a, b]))
    c, lin = nn.MultiheadAttention(8, 2), nn.Linear(8, 24)
    c.in_proj_weight = lin.weight
    with pytest.raises(QroundError, match="'0' shares its in_proj_weight with '1'"):
        explicit_attention(nn.ModuleList([c, lin]))
    d = nn.MultiheadAttention(8, 2)
    with pytest.raises(QroundError, match="'att' shares its out_proj with 'proj'"):
        explicit_attention(nn.ModuleDict({"att": d, "proj": d.out_proj}))
    model = nn.ModuleList([d, d])
    new = explicit_attention(model)
    assert new[0] is new[1] and isinstance(new[0], LinearMultiheadAttention)
    assert isinstance(explicit_attention(d), LinearMultiheadAttention)


def test_fuse_keeps_only_the_attentions_with_quantised_inputs_explicit():
    """An attention whose projections are not wrapped by input quantisers is fused while
    another, quantised, stays explicit; the model computes the quantised one's outputs."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.MultiheadAttention(4, 2), nn.MultiheadAttention(4, 2)

        def forward(self, x):
            return self.b(*(self.a(x, x, x)[0],) * 3)[0]

    torch.manual_seed(0)
    model = explicit_attention(Two().eval())
    batches = [torch.randn(5, 3, 4, generator=_gen(i)) for i in range(2)]
    qm = quantize_model(model, batches, QuantConfig(wbits=4, abits=8, solver="nearest",
                                                    layers=r"^b\."))
    fused = fuse_attention(qm.model)
    assert type(fused.a) is nn.MultiheadAttention and type(fused.b) is LinearMultiheadAttention
    with torch.no_grad():
        for x in batches:
            torch.testing.assert_close(fused(x), qm.model(x), rtol=1e-6, atol=1e-6)
