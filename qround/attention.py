"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` layers, so they are rounded.

``nn.MultiheadAttention`` (torchvision's ViT, ``nn.TransformerEncoderLayer``, CLIP) keeps its
q/k/v projections in one bare parameter (``in_proj_weight``, or ``q_proj_weight``...) and reads
its ``out_proj`` weight directly: no Linear layer is called, so ``quantize_model`` sees nothing
to round there and leaves attention in float.  :func:`explicit_attention` gives a copy of a model
in which every such module is a :class:`LinearMultiheadAttention`: the same function, with
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as nn.Linear layers that its forward calls.
Quantise that copy; :func:`fuse_attention` turns the rounded layers back into
``nn.MultiheadAttention`` modules where no input quantiser wraps them.

The attention itself is torch's own ``F.multi_head_attention_forward`` (masks, ``is_causal``,
``bias_k``/``bias_v``, ``add_zero_attn``, dropout, attention weights), run on the projected
inputs with identity projections: outputs equal ``nn.MultiheadAttention``'s up to float
round-off (the packed and the separate products sum in other orders), at the cost of four
products with an identity per call (about 1.7-2.2 times the attention's time for ViT-B sizes on
one CPU thread).  torch's fused inference paths are not taken: at the padded positions of an
``nn.TransformerEncoder`` with nested tensors, whose outputs torch's paths already disagree on,
the explicit module gives the layer-by-layer path's values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .errors import QroundError, copy_module
from .problems.layers import forward_hooks, weight_not_writable

__all__ = ["LinearMultiheadAttention", "explicit_attention", "fuse_attention"]


class LinearMultiheadAttention(nn.Module):
    """What an ``nn.MultiheadAttention`` computes, with its four projections as nn.Linear
    layers (``q_proj``, ``k_proj``, ``v_proj``: ``E x E``, ``E x kdim``, ``E x vdim``;
    ``out_proj``: ``E x E``), made from ``mha`` (its weights copied).  Same ``forward``
    signature and results (up to float round-off)."""

    # read by nn.TransformerEncoderLayer's fused path, which this module does not take
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        why = _refusal(mha)
        if why:
            raise QroundError(f"cannot make this nn.MultiheadAttention explicit: {why}")
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self.add_zero_attn = mha.add_zero_attn
        w, b = mha.out_proj.weight, mha.in_proj_bias
        kw = {"device": w.device, "dtype": w.dtype}
        self.q_proj = skip_init(nn.Linear, e, e, bias=b is not None, **kw)
        self.k_proj = skip_init(nn.Linear, mha.kdim, e, bias=b is not None, **kw)
        self.v_proj = skip_init(nn.Linear, mha.vdim, e, bias=b is not None, **kw)
        self.out_proj = skip_init(nn.Linear, e, e, bias=mha.out_proj.bias is not None, **kw)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = b.chunk(3) if b is not None else (None,) * 3
            for proj, weight, bias in zip((self.q_proj, self.k_proj, self.v_proj), weights,
                                          biases):
                proj.weight.copy_(weight)
                if bias is not None:
                    proj.bias.copy_(bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        # bias_k / bias_v (appended to the projected keys and values) stay parameters
        self.bias_k = None if mha.bias_k is None else nn.Parameter(mha.bias_k.detach().clone())
        self.bias_v = None if mha.bias_v is None else nn.Parameter(mha.bias_v.detach().clone())
        self.train(mha.training)
        # each new parameter is trainable as the one it comes from
        for proj, weight in zip((self.q_proj, self.k_proj, self.v_proj), weights):
            proj.weight.requires_grad_(weight.requires_grad)
            if proj.bias is not None:
                proj.bias.requires_grad_(b.requires_grad)
        for mine, theirs in ((self.out_proj.weight, mha.out_proj.weight),
                             (self.out_proj.bias, mha.out_proj.bias),
                             (self.bias_k, mha.bias_k), (self.bias_v, mha.bias_v)):
            if mine is not None:
                mine.requires_grad_(theirs.requires_grad)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        for name, x, dim in (("query", query, self.embed_dim), ("key", key, self.kdim),
                             ("value", value, self.vdim)):
            if x.shape[-1] != dim:
                raise QroundError(f"attention {name} has {x.shape[-1]} features, the module "
                                  f"expects {dim} (input shape {tuple(x.shape)})")
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
            target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype,
                                      check_other=False)
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.batch_first and is_batched:
            q, k, v = (t.transpose(1, 0) for t in (q, k, v))
        eye = torch.eye(self.embed_dim, device=q.device, dtype=q.dtype)
        out, weights = F.multi_head_attention_forward(
            q, k, v, self.embed_dim, self.num_heads, None, None, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, eye, None, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
            v_proj_weight=eye, average_attn_weights=average_attn_weights, is_causal=is_causal)
        out = self.out_proj(out)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}")


def _refusal(mha: nn.Module) -> str | None:
    """Why an nn.MultiheadAttention cannot be made explicit (None when it can)."""
    if type(mha).forward is not nn.MultiheadAttention.forward:
        return f"{type(mha).__name__} subclasses it with its own forward"
    for m, where in ((mha, "it"), (mha.out_proj, "its out_proj")):
        if forward_hooks(m):
            return (f"{where} has a {' and a '.join(forward_hooks(m))}, which the new module "
                    "would not carry: remove it, or register it on a parent module")
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
        p = getattr(mha, name, None)
        if p is not None and not isinstance(p, nn.Parameter):
            return f"its {name} is not a parameter (recomputed on every forward?)"
    why = weight_not_writable(mha.out_proj)
    return f"its out_proj: {why}" if why else None


def _tie_refusal(model: nn.Module) -> str | None:
    """Why an nn.MultiheadAttention of ``model`` cannot be made explicit because a parameter of
    it is shared with another module (its projections would be copies, untied), or None."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules():   # a module held under two names: once
        for p in m._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append((name or "<model>", m))
    names: dict[int, list[str]] = {}   # module -> every name it is held under
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    for name, m in model.named_modules():
        if not isinstance(m, nn.MultiheadAttention):
            continue
        mine = set(names[id(m)])   # an out_proj held elsewhere than in this attention
        foreign = [n or "<model>" for n in names.get(id(m.out_proj), ())
                   if n.rpartition(".")[0] not in mine]
        if foreign:
            return (f"attention {name or '<model>'!r} shares its out_proj with {foreign[0]!r}; "
                    "the explicit module's out_proj is a copy, which would not stay tied: "
                    "give each attention its own")
        own = {id(m), id(m.out_proj)}
        for pname, p in m.named_parameters():
            others = [n for n, o in holders.get(id(p), ()) if id(o) not in own]
            if others:
                return (f"attention {name or '<model>'!r} shares its {pname} with "
                        f"{others[0]!r}; the explicit module's Linear layers hold copies, which "
                        "would not stay tied: untie them first (a clone of the parameter)")
    return None


def _replace(model: nn.Module, kind: type, make) -> tuple[nn.Module, int]:
    """Replace every ``kind`` child (under every name it has) by ``make(child)``."""
    made: dict[int, nn.Module] = {}
    if isinstance(model, kind):
        return make(model), 1
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, kind):
                if id(child) not in made:
                    made[id(child)] = make(child)
                parent._modules[name] = made[id(child)]
    return model, len(made)


def explicit_attention(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace``) whose nn.MultiheadAttention
    modules are :class:`LinearMultiheadAttention`, so quantize_model rounds their projections.
    Every module is checked before anything changes; QroundError names one that cannot be made
    explicit (a subclass with its own forward, a recomputed weight, hooks of its own, a
    parameter shared with another module: the copies would not stay tied).  An
    nn.TransformerEncoder around them takes its layer-by-layer path (``use_nested_tensor =
    False``; :func:`fuse_attention` gives the setting back).  A model that is itself an
    nn.MultiheadAttention comes back as a new module, ``inplace`` or not."""
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be an nn.Module, got {type(model).__name__}")
    why = _explicit_refusal(model)
    if why:
        raise QroundError(why)
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        raise QroundError("model has no nn.MultiheadAttention")
    return _explicit(model if inplace else copy_module(model))


def _explicit_refusal(model: nn.Module) -> str | None:
    """Why ``model``'s attention cannot be made explicit (the whole message), or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and _refusal(m):
            return f"cannot make attention {name or '<model>'!r} explicit: {_refusal(m)}"
    why = _tie_refusal(model)
    return f"cannot make the attention explicit: {why}" if why else None


def _explicit(new: nn.Module) -> nn.Module:
    """:func:`explicit_attention` on a checked model, in place."""
    new, _ = _replace(new, nn.MultiheadAttention, LinearMultiheadAttention)
    for m in new.modules():
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            m._qround_nested = True   # fuse_attention gives it back
            m.use_nested_tensor = False
    return new


def _fused(lin: LinearMultiheadAttention) -> nn.MultiheadAttention:
    same = lin.kdim == lin.embed_dim and lin.vdim == lin.embed_dim
    w = lin.out_proj.weight
    projs = (lin.q_proj, lin.k_proj, lin.v_proj)
    # one bias flag for all four: a projection without a bias gets zeros (bias correction may
    # have given some of a bias-free attention's projections one)
    biased = any(p.bias is not None for p in (*projs, lin.out_proj))
    mha = skip_init(nn.MultiheadAttention, lin.embed_dim, lin.num_heads, dropout=lin.dropout,
                    bias=biased, add_bias_kv=lin.bias_k is not None,
                    add_zero_attn=lin.add_zero_attn, kdim=lin.kdim, vdim=lin.vdim,
                    batch_first=lin.batch_first, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        if same:
            mha.in_proj_weight.copy_(torch.cat([p.weight for p in projs]))
        else:
            for p, name in zip(projs, ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                getattr(mha, name).copy_(p.weight)
        if biased:
            mha.in_proj_bias.copy_(torch.cat([_bias(p) for p in projs]))
            mha.out_proj.bias.copy_(_bias(lin.out_proj))
        mha.out_proj.weight.copy_(lin.out_proj.weight)
        if lin.bias_k is not None:
            mha.bias_k.copy_(lin.bias_k)
            mha.bias_v.copy_(lin.bias_v)
    mha.train(lin.training)
    flags = {"in_proj_weight": lin.q_proj.weight, "q_proj_weight": lin.q_proj.weight,
             "k_proj_weight": lin.k_proj.weight, "v_proj_weight": lin.v_proj.weight,
             "in_proj_bias": lin.q_proj.bias, "out_proj.weight": lin.out_proj.weight,
             "out_proj.bias": lin.out_proj.bias, "bias_k": lin.bias_k, "bias_v": lin.bias_v}
    for name, p in mha.named_parameters():
        p.requires_grad_(flags[name] is not None and flags[name].requires_grad
                         or flags[name] is None and w.requires_grad)
    return mha


def _bias(lin: nn.Linear) -> torch.Tensor:
    """A Linear's bias, zeros where it has none."""
    return lin.bias if lin.bias is not None else torch.zeros_like(lin.weight[:, 0])


def _unwrapped(m: nn.Module) -> nn.Module:
    """A projection wrapped by quantize_model without an input quantiser (weight-only block
    reconstruction) is its Linear, which holds the rounded weight."""
    from .activations import QuantizedLayer

    return m.layer if isinstance(m, QuantizedLayer) and m.act is None else m


def _quantised_input(m: LinearMultiheadAttention) -> bool:
    """Whether an input quantiser wraps one of the projections (the module stays explicit)."""
    from .activations import QuantizedLayer

    return any(isinstance(_unwrapped(p), QuantizedLayer)
               for p in (m.q_proj, m.k_proj, m.v_proj, m.out_proj))


def fuse_attention(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Undo :func:`explicit_attention`: a copy of ``model`` (itself with ``inplace``) whose
    :class:`LinearMultiheadAttention` modules are nn.MultiheadAttention again, holding their
    (rounded) weights.  A projection without a bias gets zeros when another has one (bias
    correction on a bias-free attention): the fused module has one bias flag for all four.
    An attention whose projection an input quantiser wraps stays explicit
    (nn.MultiheadAttention could not quantise its input), the others are fused; QroundError
    when every one has one.  A wrapper without an input quantiser (weight-only block
    reconstruction) gives its Linear.  An
    nn.TransformerEncoderLayer whose fused fast path would read a bias it lacks (built with
    bias=False, its attention given biases) takes its layer-by-layer path, which computes the
    same function; an nn.TransformerEncoder gets back the nested-tensor setting that
    :func:`explicit_attention` turned off."""
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be an nn.Module, got {type(model).__name__}")
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, LinearMultiheadAttention)]
    if not found:
        raise QroundError("model has no LinearMultiheadAttention (from explicit_attention)")
    quantised = _quantised_input
    if all(quantised(m) for _, m in found):
        raise QroundError(f"attention {found[0][0] or '<model>'!r} has quantised inputs "
                          "(QuantizedLayer projections with input quantisers), as every "
                          "explicit attention here: nn.MultiheadAttention could not compute "
                          "them; keep the explicit modules")
    new = model if inplace else copy_module(model)
    for m in new.modules():
        if isinstance(m, LinearMultiheadAttention) and not quantised(m):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                m._modules[proj] = _unwrapped(m._modules[proj])
    new, _ = _replace(new, LinearMultiheadAttention, lambda m: m if quantised(m) else _fused(m))
    for m in new.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and isinstance(
                m.self_attn, nn.MultiheadAttention) and m.self_attn.in_proj_bias is not None \
                and any(t is None for t in (m.norm1.bias, m.norm2.bias, m.linear1.bias,
                                            m.linear2.bias, m.self_attn.out_proj.bias)):
            m.activation_relu_or_gelu = 0   # torch's flag: 0 takes the layer-by-layer path
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "_qround_nested", False) and all(
                isinstance(layer.self_attn, nn.MultiheadAttention) for layer in m.layers):
            m.use_nested_tensor = True
            del m._qround_nested
    return new
