"""Saved quantised models: one safetensors file of codes, grids and dequantised weights.

For each quantised layer ``<name>`` the file holds ``<name>.weight`` (dequantised, in the
layer's dtype; always in nn.Linear's (out, in) layout, also for a transformers Conv1D, whose own
``state_dict`` holds the transpose under that key: read such a file with :func:`load`, not with
``load_state_dict``), ``<name>.codes`` (int8 symmetric / uint8 asymmetric), ``<name>.scale``
(float64, (out, groups)), ``<name>.zero_point`` (int32, asymmetric grids only) and
``<name>.bias`` when the layer has one (bias correction may have changed or created it). A layer
whose input is quantised also has ``<name>.act.step`` and, with borders,
``<name>.act.b0``/``b1``/``b2``.  The header metadata (str -> str, JSON where structured)
records the format, the qround version, the config, the layers with their bits and shapes (and
input quantisers), the report, the layers left in float, the reconstruction units (``units``)
and ``source``: a fingerprint of the float model the file was made from (every tensor of its
``state_dict``: dtype, shape and an 8-byte BLAKE2b digest of its bytes, :func:`fingerprint`).
:func:`load` takes the rest of the model (embeddings, norms, layers left in float) from the
model it is given, so it checks that model against ``source`` and refuses another checkpoint of
the same architecture, which would give a model that runs and is silently wrong.

Files are written atomically (temp file in the same folder, then ``os.replace``): a failed save
leaves any earlier file as it was.  A run repeated with the same seed writes the same bytes,
except for the wall-clock times in the report (``seconds``, ``capture_seconds``, and
``search_seconds`` of the units).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from .activations import QuantizedLayer, replace_module
from .errors import QroundError, copy_module
from .files import atomic_write, safetensors_bytes
from .problems.layers import (is_hf_conv1d, linear_view, linearize_conv1d, restore_conv1d,
                              weight_not_writable)
from .writeback import QuantizedWeight

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import QuantizedModel

log = logging.getLogger(__name__)

FORMAT = "qround.quantized-model"
FORMAT_VERSION = "1"


def save(qmodel: "QuantizedModel", path: str | os.PathLike) -> None:
    """Write ``qmodel`` (a :class:`qround.pipeline.QuantizedModel`) to one safetensors file."""
    from . import __version__

    check_quantized_model(qmodel)
    modules = dict(qmodel.model.named_modules())
    # Conv1D layers the activation stage wrapped hold the nn.Linear they were rounded as
    from_conv1d = {r.layer for r in qmodel.report if r.kind == "Conv1D"}
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, qw in qmodel.layers.items():
        module = modules.get(name)
        wrapper = module if isinstance(module, QuantizedLayer) else None
        if wrapper is not None:  # from the activation stage: the weight is its hard codes
            module = wrapper.layer
        # a transformers Conv1D holds W^T; its codes and saved weight are those of the Linear
        conv1d = module is not None and is_hf_conv1d(module)
        shape = None if module is None else tuple(module.weight.shape)[::-1 if conv1d else 1]
        if shape != tuple(qw.weight_shape):
            raise QroundError(f"layer {name!r} of the report does not match qmodel.model")
        codes_dtype = np.int8 if qw.symmetric else np.uint8  # bits <= 8 fit either way
        weight = (module.weight.t() if conv1d else module.weight) if wrapper is None \
            else _hard_weight(wrapper)
        weight = weight.detach().cpu().contiguous().clone()
        if not _on_codes(qw.dequantized, weight):
            raise QroundError(f"the weight of {name!r} is no longer its codes' dequantised value "
                              "(was the quantised model changed after quantising?): the file "
                              "would not load; quantise again, or save before changing it")
        tensors[f"{name}.weight"] = weight
        tensors[f"{name}.codes"] = torch.from_numpy(qw.codes.astype(codes_dtype))
        tensors[f"{name}.scale"] = torch.from_numpy(np.array(qw.scale, dtype=np.float64))
        if not qw.symmetric:
            tensors[f"{name}.zero_point"] = torch.from_numpy(qw.zero_point.astype(np.int32))
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().cpu().contiguous().clone()
        layers[name] = {"kind": "Conv1D" if conv1d or name in from_conv1d
                        else _kind(module),
                        "bits": qw.bits, "symmetric": qw.symmetric, "group_size": qw.group_size,
                        "weight_shape": list(qw.weight_shape), "bias": module.bias is not None}
        if wrapper is not None and wrapper.act is not None:
            act = wrapper.act
            layers[name]["act"] = {"bits": act.bits, "signed": bool(act.signed),
                                   "borders": act.borders, "fusion_size": act.fusion_size,
                                   "mode": wrapper.act_mode}
            for key in ("step", "b0", "b1", "b2"):
                value = getattr(act, key, None)
                if value is not None:
                    tensors[f"{name}.act.{key}"] = value.detach().cpu().reshape(-1).clone()
    config = qmodel.config.as_dict()
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "qround_version": __version__,
        "bits": str(config["wbits"]), "symmetric": json.dumps(config["symmetric"]),
        "group_size": json.dumps(config["group_size"]), "solver": str(config["solver"]),
        "config": json.dumps(config), "layers": json.dumps(layers),
        "report": json.dumps([r.as_dict() for r in qmodel.report]),
        "skipped": json.dumps(qmodel.skipped),
        "units": json.dumps(None if qmodel.units is None else qmodel.units.as_dict()),
    }
    if qmodel.source is not None:
        metadata["source"] = json.dumps(qmodel.source)
    if qmodel.folded:
        metadata["folded"] = json.dumps(qmodel.folded)
    with atomic_write(path, what="quantised model", make_folder=True) as f:
        f.write(safetensors_bytes(tensors, metadata))


def check_quantized_model(qmodel) -> None:
    """QroundError unless ``qmodel`` is what quantize_model returned (not the model in it)."""
    from .pipeline import QuantizedModel

    if not isinstance(qmodel, QuantizedModel):
        hint = (": pass what quantize_model returned, not its .model" if
                isinstance(qmodel, nn.Module) else "")
        raise QroundError(f"expected a QuantizedModel (from quantize_model), got "
                          f"{type(qmodel).__name__}{hint}")


def _folded_pairs(meta: dict, path) -> dict[str, str]:
    """The file's folded BatchNorms ``{bn: layer}`` (none for a file without)."""
    raw = meta.get("folded")
    if raw is None:
        return {}
    try:
        pairs = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        pairs = None
    if not isinstance(pairs, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in pairs.items()):
        raise QroundError(f"{path}: its 'folded' metadata is damaged")
    return pairs


def _kind(module: nn.Module) -> str:
    """The saved ``kind`` of an nn.Linear, nn.Conv2d or nn.Conv1d (its class name)."""
    return next(t.__name__ for t in (nn.Linear, nn.Conv2d, nn.Conv1d) if isinstance(module, t))


def _on_codes(deq: np.ndarray, weight: torch.Tensor) -> bool:
    """Whether ``weight`` is the dequantised value ``deq`` rounded to the weight's dtype (float16
    and bfloat16 too): a few of that dtype's ulps are allowed."""
    if tuple(weight.shape) != tuple(np.shape(deq)):
        return False
    eps = max(float(torch.finfo(weight.dtype).eps), 1e-7) if weight.dtype.is_floating_point \
        else 1e-7
    return bool(np.allclose(deq, weight.double().numpy(), rtol=4 * eps,
                            atol=4 * eps * float(np.abs(deq).max(initial=0.0))))


_SOURCE_VALUE = re.compile(r"(buffer )?[A-Za-z0-9_.]+ \[[0-9, ]*\] ([0-9a-f]{16}|-)")


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Every tensor of ``model.state_dict()`` by name: ``"<dtype> <shape> <digest>"`` for a
    parameter, ``"buffer <dtype> <shape> <digest>"`` for a buffer; the digest is an 8-byte
    BLAKE2b of the tensor's bytes (on the CPU, contiguous).  Tensors whose bytes cannot be read
    (meta, sparse, quantised) get ``-`` as digest and are compared by dtype and shape only.
    Tied tensors are hashed once.  Reads every byte of the model once (0.18 s for MiniLM's
    91 MB on the development machine: about 2 s per GB)."""
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be a torch nn.Module, got {type(model).__name__}")
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    out: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or nn.parameter.is_lazy(t):
            continue   # extra state (get_extra_state), or a lazy module's uninitialised tensor
        t = t.detach()
        head = ("" if name in params else "buffer ") + \
            f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
        digest = "-"
        if t.layout == torch.strided and not t.is_meta and not t.is_quantized:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(),
                   tuple(t.stride()), t.dtype, tuple(t.shape))
            if key not in seen:
                plain = t.resolve_conj().resolve_neg().cpu().contiguous()
                data = plain.reshape(-1).view(torch.uint8).numpy()
                seen[key] = hashlib.blake2b(data, digest_size=8).hexdigest()
            digest = seen[key]
        out[name] = f"{head} {digest}"
    return out


def _read_source(meta: dict, path) -> tuple[dict[str, str] | None, str | None]:
    """The header's ``source`` fingerprint and, where it is damaged, why (else None)."""
    raw = meta.get("source")
    if raw is None:
        return None, None   # written before qround recorded one
    try:
        source = json.loads(raw)
    except ValueError as exc:
        return None, f"is not valid JSON ({exc})"
    if not isinstance(source, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _SOURCE_VALUE.fullmatch(v)
            for k, v in source.items()):
        return None, "must map tensor names to '[buffer ]<dtype> <shape> <digest>'"
    return source, None


def verify_source(model: nn.Module, path: str | os.PathLike) -> None:
    """QroundError unless ``model`` is the float model the file at ``path`` was made from (its
    header's ``source`` fingerprint, :func:`fingerprint`): a recorded tensor with other values,
    dtype or shape, or a parameter missing or new, is refused.  Buffers that only appear or
    disappear (transformers has moved buffers such as BERT's ``position_ids`` in and out of
    the state dict between versions) are logged, not refused.  Files written before qround
    recorded the fingerprint have none: nothing to check, and a warning says so."""
    meta = read_metadata(path)
    if meta.get("source_damaged"):
        raise QroundError(f"{path}: header field 'source' {meta['source_damaged']} (the file is "
                          "damaged or was edited); to load it without checking the model, pass "
                          "check_source=False (shell: --no-source-check)")
    source = meta.get("source")
    if source is None:
        log.warning("%s holds no fingerprint of the float model it was made from (written by "
                    "an older qround, or saved without one): the model it is loaded onto is not "
                    "checked to be that model", path)
        return
    now = fingerprint(model)

    def split(value: str) -> tuple[str, str]:
        head, digest = value.rsplit(" ", 1)
        return head.removeprefix("buffer "), digest

    def same(a: str, b: str) -> bool:
        (ha, da), (hb, db) = split(a), split(b)
        return ha == hb and (da == db or "-" in (da, db))  # unreadable bytes: dtype and shape

    def describe(name: str) -> str:
        here, there = split(now[name])[0], split(source[name])[0]
        return (f"{name!r} ({here} here, {there} in the file)" if here != there
                else f"{name!r} (other values)")

    def buffer(value: str) -> bool:
        return value.startswith("buffer ")

    differ = [describe(n) for n in source if n in now and not same(now[n], source[n])]
    missing = [n for n in source if n not in now]
    extra = [n for n in now if n not in source]
    moved = [n for n in missing if buffer(source[n])] + [n for n in extra if buffer(now[n])]
    missing = [repr(n) for n in missing if not buffer(source[n])]
    extra = [repr(n) for n in extra if not buffer(now[n])]
    if moved and not (differ or missing or extra):
        log.warning("%s: the model's tensors match the file's, but the buffers %s are in the "
                    "state dict on one side only (another transformers version?)", path,
                    moved[:3])
    if not (differ or missing or extra):
        return
    parts = []
    for label, items in (("differs", differ), ("is missing from the model", missing),
                         ("is new in the model", extra)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            verb = label if len(items) == 1 else label.replace("differs", "differ").replace(
                "is ", "are ")
            parts.append(f"{len(items)} {verb}: " + ", ".join(items[:3]) + more)
    raise QroundError(
        f"{path} was made from another float model than the one given ({len(source)} tensors "
        f"recorded; " + "; ".join(parts) + "). Load it onto the float model it was quantised "
        "from; to load it anyway, pass check_source=False (shell: --no-source-check)")


def _hard_weight(layer: QuantizedLayer) -> torch.Tensor:
    """The dequantised hard weight of a wrapped layer, whatever mode it was left in."""
    mode = layer.weight_mode
    try:
        layer.weight_mode = "hard"
        with torch.no_grad():
            return layer.quantized_weight()
    finally:
        layer.weight_mode = mode


def read_metadata(path: str | os.PathLike) -> dict:
    """The header of a saved model, JSON fields decoded (config, layers, report, skipped)."""
    meta = _open(path, lambda f: f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise QroundError(f"{path} is not a qround quantised model (format="
                          f"{meta.get('format')!r})")
    out = dict(meta)
    keys = ("config", "layers", "report", "skipped", "symmetric", "group_size")
    missing = [key for key in (*keys, "bits", "solver") if key not in meta]
    if missing:
        raise QroundError(f"{path} is marked as a qround quantised model but its header lacks "
                          f"{missing} (the file is damaged or was written by another tool)")
    if str(meta.get("format_version", "1")) != FORMAT_VERSION:
        raise QroundError(f"{path} has format version {meta.get('format_version')!r}; this "
                          f"qround reads version {FORMAT_VERSION}")
    out["source"], damaged = _read_source(meta, path)
    if damaged:
        out["source_damaged"] = damaged   # refused by verify_source, ignored without the check
    meta = {"units": "null", **meta}  # files before the activation stage have no units
    for key in (*keys, "units"):
        try:
            out[key] = json.loads(meta[key])
        except ValueError as exc:
            raise QroundError(f"{path}: header field {key!r} is not valid JSON ({exc})") from None
    _check_layers(out["layers"], path)
    return out


_LAYER_FIELDS = {"kind": str, "bits": int, "symmetric": bool, "weight_shape": list, "bias": bool}
# a layer entry's ``act`` (its input's quantiser), as :func:`save` writes it
_ACT_FIELDS = {"bits": (int,), "signed": (bool,), "borders": (str, type(None)),
               "fusion_size": (int,), "mode": (str,)}


def _check_layers(layers, path) -> None:
    """The header's ``layers`` entry: a dict of layer name -> dict with the fields that
    :func:`load` and :func:`load_codes` read, of the right types (a hand-edited or damaged
    header gets a QroundError naming the field, not a KeyError later)."""
    def bad(why):
        return QroundError(f"{path}: header field 'layers' {why} (the file is damaged or was "
                           "edited)")

    if not isinstance(layers, dict):
        raise bad(f"must map layer names to their entries, got {type(layers).__name__}")
    for name, info in layers.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not a dict")
        for key, kind in _LAYER_FIELDS.items():
            value = info.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise bad(f"entry {name!r} lacks {key!r} of type {kind.__name__} "
                          f"(got {value!r})")
        if info["kind"] not in ("Linear", "Conv2d", "Conv1d", "Conv1D"):
            raise bad(f"entry {name!r} has kind {info['kind']!r}")
        shape = info["weight_shape"]
        rank = {"Conv2d": 4, "Conv1d": 3}.get(info["kind"], 2)
        if len(shape) != rank or not all(isinstance(d, int) and not isinstance(d, bool)
                                         and d > 0 for d in shape):
            raise bad(f"entry {name!r} has weight_shape {shape!r}")
        if "group_size" not in info:
            raise bad(f"entry {name!r} lacks 'group_size' (an int, or null for per-channel)")
        gs = info["group_size"]
        if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs < 1):
            raise bad(f"entry {name!r} has group_size {gs!r}")
        if "act" in info:
            act = info["act"]
            if not isinstance(act, dict):
                raise bad(f"entry {name!r} has 'act' that is not a dict")
            for key, kinds in _ACT_FIELDS.items():
                value = act.get(key)
                if key not in act or not isinstance(value, kinds) or (
                        isinstance(value, bool) and bool not in kinds):
                    types = " or ".join("null" if k is type(None) else k.__name__
                                        for k in kinds)
                    raise bad(f"entry {name!r} 'act' lacks {key!r} of type {types} "
                              f"(got {value!r})")


def load_codes(path: str | os.PathLike) -> dict[str, QuantizedWeight]:
    """The integer codes and grids of every layer of a saved model, by module name."""
    layers = read_metadata(path)["layers"]

    def read(f):
        out = {}
        for name, info in layers.items():
            raw = f.get_tensor(f"{name}.codes")
            shape = tuple(info["weight_shape"])
            want = (shape[0], int(np.prod(shape[1:])))
            if raw.is_floating_point() or tuple(raw.shape) != want:
                raise QroundError(f"{path}: {name}.codes must be integers of shape {want}, got "
                                  f"{raw.dtype} {tuple(raw.shape)} (the file is damaged)")
            codes = raw.numpy().astype(np.int64)
            scale = f.get_tensor(f"{name}.scale").numpy().astype(np.float64)
            zero = (f.get_tensor(f"{name}.zero_point").numpy().astype(np.float64)
                    if not info["symmetric"] else np.zeros_like(scale))
            for a in (codes, scale, zero):
                a.flags.writeable = False
            qw = QuantizedWeight(codes, scale, zero, int(info["bits"]), bool(info["symmetric"]),
                                 info["group_size"], shape)
            try:
                grid = qw.grid  # checks the scales and zero points
            except QroundError as exc:
                raise QroundError(f"{path}: the grid of {name!r} is damaged: {exc}") from None
            if codes.size and (codes.min() < grid.qmin or codes.max() > grid.qmax):
                raise QroundError(f"{path}: codes of {name!r} leave [{grid.qmin}, {grid.qmax}] "
                                  "(the file is damaged)")
            out[name] = qw
        return out

    return _open(path, read)


def load(model: nn.Module, path: str | os.PathLike, check_source: bool = True) -> nn.Module:
    """A runnable quantised model: a deep copy of the float ``model`` (left untouched) with the
    saved weights and biases of the file at ``path``.

    ``model`` must be the float model the file was made from: the file holds only the quantised
    layers, the rest comes from ``model``.  With ``check_source`` (default) a model whose tensors
    differ from the file's fingerprint (:func:`verify_source`; another checkpoint of the same
    architecture, a model converted to another dtype, or one already quantised in place) is
    refused before anything is loaded; ``check_source=False`` loads it anyway.

    The architecture must match: every saved layer must exist in ``model`` as a Linear, Conv2d
    or Conv1d of the same weight shape (a transformers Conv1D where the file has one, its weight
    (in, out)), else QroundError listing the mismatches.  A file quantised with
    ``fold_batchnorm`` is loaded into ``model`` folded the same way
    (:func:`qround.fold.fold_batchnorm`), after the unfolded model's fingerprint is checked.
    Conv1D layers stay Conv1D, except those
    whose inputs the file quantises: they are the nn.Linear inside the input quantiser, as in
    the quantised model.
    """
    if not isinstance(model, nn.Module):
        raise QroundError(f"model must be a torch nn.Module, got {type(model).__name__}")
    meta = read_metadata(path)
    layers = meta["layers"]
    if not isinstance(check_source, bool):
        raise QroundError(f"check_source must be True or False, got {check_source!r}")
    folded = _folded_pairs(meta, path)
    if folded:
        # quantised with its BatchNorms folded: the fingerprint is the float model's as given
        if check_source:
            verify_source(model, path)
            check_source = False
        from .fold import apply_pairs

        model = apply_pairs(copy_module(model), folded)
    # transformers' Conv1D layers were rounded (and saved) as the nn.Linear they equal: the
    # checks read a view of the model with those Linear layers
    conv1d = [name for name, info in layers.items() if info.get("kind") == "Conv1D"]
    float_model = model
    model, view_replaced = linear_view(model, names=[
        n for n in conv1d if is_hf_conv1d(dict(model.named_modules()).get(n))])
    modules = dict(model.named_modules())
    problems = []
    for name, info in layers.items():
        module = modules.get(name)
        want = tuple(info["weight_shape"])
        if module is None:
            parent = modules.get(name.rpartition(".")[0])
            problems.append(f"{name!r} is missing from the model" + (
                " (its nn.MultiheadAttention was quantised in the form of "
                "qround.attention.explicit_attention(model): load into that)"
                if isinstance(parent, nn.MultiheadAttention) else
                f" (its {type(parent).__name__} was quantised in the form of "
                "qround.conv_transpose.explicit_conv_transpose(model): load into that)"
                if isinstance(parent, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else
                " (its nn.Conv3d was quantised in the form of "
                "qround.conv3d.explicit_conv3d(model): load into that)"
                if isinstance(parent, nn.Conv3d) else ""))
        elif not isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)) or info["kind"] != (
                "Conv1D" if name in view_replaced else _kind(module)):
            problems.append(f"{name!r} is a {type(module).__name__}, the file has a "
                            f"{info['kind']}")
        elif tuple(module.weight.shape) != want:
            problems.append(f"{name!r} has weight shape {tuple(module.weight.shape)}, the file "
                            f"{want}")
        elif weight_not_writable(module):
            problems.append(f"{name!r}: {weight_not_writable(module)}")
        elif module.bias is not None and not info["bias"]:
            problems.append(f"{name!r} has a bias, the file's layer has none")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise QroundError(f"the model's architecture does not match {path}: "
                          + "; ".join(problems[:5]) + more)
    if check_source:
        verify_source(float_model, path)
    codes = load_codes(path)
    # the loaded weights go through Linear views into the copy's own Conv1D layers, which come
    # back at the end (those wrapped with input quantisers stay the Linear inside the wrapper)
    new, replaced = linearize_conv1d(copy_module(float_model), share=True,
                                     names=list(view_replaced))
    new_modules = dict(new.named_modules())

    def fill(f):
        with torch.no_grad():
            for name, info in layers.items():
                module = new_modules[name]
                weight = f.get_tensor(f"{name}.weight")
                if not _on_codes(codes[name].dequantized, weight):
                    raise QroundError(f"{path}: weight of {name!r} is not its codes' dequantised "
                                      "value (the file is corrupt)")
                module.weight.copy_(weight)
                if info["bias"]:
                    bias = f.get_tensor(f"{name}.bias")
                    if module.bias is None:  # bias correction created one
                        w = module.weight
                        module.bias = nn.Parameter(torch.zeros_like(bias, dtype=w.dtype,
                                                                    device=w.device),
                                                   requires_grad=w.requires_grad)
                    elif module.bias.shape != bias.shape:
                        raise QroundError(f"bias of {name!r} has shape "
                                          f"{tuple(module.bias.shape)}, the file "
                                          f"{tuple(bias.shape)}")
                    module.bias.copy_(bias)

    _open(path, fill)
    acts = {name: info["act"] for name, info in layers.items() if "act" in info}
    if acts:
        new = _wrap_act_quantizers(new, acts, path)
    return restore_conv1d(new, replaced)


def _wrap_act_quantizers(model: nn.Module, acts: dict[str, dict], path) -> nn.Module:
    """Wrap the saved layers whose inputs were quantised in :class:`QuantizedLayer` (float
    weight = the loaded dequantised weight) with the saved steps and borders."""
    modules = dict(model.named_modules())

    def fill(f):
        for name, info in acts.items():
            module = modules[name]
            kk = 1 if isinstance(module, nn.Linear) else math.prod(module.kernel_size)
            fused = info["fusion_size"] > 1
            if fused and info["fusion_size"] != kk:
                raise QroundError(f"{path}: fusion size {info['fusion_size']} of {name!r} does "
                                  f"not match its {kk}-element kernel")
            wrapped = QuantizedLayer(module, info["bits"], info["borders"], fused)
            wrapped.act.to(module.weight.device)  # its steps and borders live by the layer
            wrapped.act_mode = info["mode"]
            with torch.no_grad():
                wrapped.act.set_calibrated(bool(info["signed"]))
                for key in ("step", "b0", "b1", "b2"):
                    target = getattr(wrapped.act, key, None)
                    if target is None:
                        continue
                    value = f.get_tensor(f"{name}.act.{key}")
                    if value.numel() != target.numel():
                        raise QroundError(f"{path}: {name}.act.{key} has {value.numel()} values, "
                                          f"the layer needs {target.numel()}")
                    target.copy_(value.reshape(target.shape))
            if name == "":  # the model is this one layer: the wrapper is the model
                wrapped_root[0] = wrapped
            else:
                replace_module(model, module, wrapped)

    wrapped_root = [model]
    _open(path, fill)
    return wrapped_root[0]


def _open(path, read):
    """Run ``read(handle)`` on a safetensors file; QroundError when it cannot be read."""
    if Path(path).is_dir():
        raise QroundError(f"{path} is a folder, not a saved model")
    if not Path(path).is_file():
        raise QroundError(f"no such file: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return read(f)
    except QroundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise QroundError(f"{path} could not be read as a qround safetensors file: {exc}") \
            from exc
