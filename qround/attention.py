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
products with an identity per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QroundError, copy_module
from .problems.layers import weight_not_writable

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
        self.q_proj = nn.Linear(e, e, bias=b is not None, **kw)
        self.k_proj = nn.Linear(mha.kdim, e, bias=b is not None, **kw)
        self.v_proj = nn.Linear(mha.vdim, e, bias=b is not None, **kw)
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None, **kw)
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
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
        p = getattr(mha, name, None)
        if p is not None and not isinstance(p, nn.Parameter):
            return f"its {name} is not a parameter (recomputed on every forward?)"
    why = weight_not_writable(mha.out_proj)
    return f"its out_proj: {why}" if why else None


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
    explicit (a subclass with its own forward, a recomputed weight).  An nn.TransformerEncoder
    around them takes its layer-by-layer path (``use_nested_tensor = False``), which computes
    the same function."""
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and _refusal(m):
            raise QroundError(f"cannot make attention {name or '<model>'!r} explicit: "
                              f"{_refusal(m)}")
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        raise QroundError("model has no nn.MultiheadAttention")
    new = model if inplace else copy_module(model)
    new, _ = _replace(new, nn.MultiheadAttention, LinearMultiheadAttention)
    for m in new.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
    return new


def _fused(lin: LinearMultiheadAttention) -> nn.MultiheadAttention:
    same = lin.kdim == lin.embed_dim and lin.vdim == lin.embed_dim
    w = lin.out_proj.weight
    mha = nn.MultiheadAttention(lin.embed_dim, lin.num_heads, dropout=lin.dropout,
                                bias=lin.q_proj.bias is not None,
                                add_bias_kv=lin.bias_k is not None,
                                add_zero_attn=lin.add_zero_attn, kdim=lin.kdim, vdim=lin.vdim,
                                batch_first=lin.batch_first, device=w.device, dtype=w.dtype)
    if mha.out_proj.bias is not None and lin.out_proj.bias is None:
        mha.out_proj.bias = None
    with torch.no_grad():
        projs = (lin.q_proj, lin.k_proj, lin.v_proj)
        if same:
            mha.in_proj_weight.copy_(torch.cat([p.weight for p in projs]))
        else:
            for p, name in zip(projs, ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                getattr(mha, name).copy_(p.weight)
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.copy_(torch.cat([p.bias for p in projs]))
        mha.out_proj.weight.copy_(lin.out_proj.weight)
        if lin.out_proj.bias is not None:
            mha.out_proj.bias.copy_(lin.out_proj.bias)
        if lin.bias_k is not None:
            mha.bias_k.copy_(lin.bias_k)
            mha.bias_v.copy_(lin.bias_v)
    mha.train(lin.training)
    flags = {"in_proj_weight": lin.q_proj.weight, "q_proj_weight": lin.q_proj.weight,
             "k_proj_weight": lin.k_proj.weight, "v_proj_weight": lin.v_proj.weight,
             "in_proj_bias": lin.q_proj.bias, "out_proj.weight": lin.out_proj.weight,
             "out_proj.bias": lin.out_proj.bias, "bias_k": lin.bias_k, "bias_v": lin.bias_v}
    for name, p in mha.named_parameters():
        p.requires_grad_(flags[name].requires_grad)
    return mha


def fuse_attention(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Undo :func:`explicit_attention`: a copy of ``model`` (itself with ``inplace``) whose
    :class:`LinearMultiheadAttention` modules are nn.MultiheadAttention again, holding their
    (rounded) weights.  QroundError when one of them cannot be fused: a projection wrapped by
    an input quantiser (its input is quantised, which the fused module could not do) or one
    that gained a bias the fused module has no place for (bias correction on a bias-free
    attention)."""
    from .activations import QuantizedLayer

    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if not isinstance(m, LinearMultiheadAttention):
            continue
        where = name or "<model>"
        projs = (m.q_proj, m.k_proj, m.v_proj)
        if any(isinstance(p, QuantizedLayer) for p in (*projs, m.out_proj)):
            raise QroundError(f"attention {where!r} has quantised inputs (QuantizedLayer "
                              "projections): nn.MultiheadAttention could not compute them; "
                              "keep the explicit module")
        if len({p.bias is None for p in projs}) > 1:
            raise QroundError(f"attention {where!r}: some of q/k/v_proj have a bias and some "
                              "not (bias correction on a bias-free attention?): "
                              "nn.MultiheadAttention holds one bias for all three or none")
        if m.out_proj.bias is not None and projs[0].bias is None:
            raise QroundError(f"attention {where!r}: out_proj has a bias but q/k/v_proj have "
                              "none; nn.MultiheadAttention has both or neither")
    if not any(isinstance(m, LinearMultiheadAttention) for m in model.modules()):
        raise QroundError("model has no LinearMultiheadAttention (from explicit_attention)")
    new = model if inplace else copy_module(model)
    new, _ = _replace(new, LinearMultiheadAttention, _fused)
    return new
