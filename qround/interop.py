"""Quantised models in formats other tools load.

:func:`save_compressed_tensors` writes a transformers checkpoint folder in the
``compressed-tensors`` ``pack-quantized`` format (the format llm-compressor writes and
transformers and vLLM read): the integer codes packed into int32 words (``weight_packed``), the
scales (``weight_scale``, in the model's dtype), the weight shapes, and the scheme in
``config.json``'s ``quantization_config``.  With ``compressed-tensors`` installed,
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` gives back the quantised model:
for a float32 model its outputs equal qround's to float rounding (tested).  A bfloat16 or
float16 model's scales are stored in that dtype, as llm-compressor stores them, and the loader
multiplies in it: its weights then differ from qround's by that rounding (on a tiny bfloat16
Llama 8 % of the weights differed by a bfloat16 rounding step and the logits by up to 4e-3;
storing float32 scales did not change that).  Packing uses compressed-tensors' own
``pack_to_int32``.

What the format holds, and so what is refused with the reason: ``nn.Linear`` weights on a
symmetric grid (per channel or in groups), 2-8 bits, no activation quantisers.  transformers'
``Conv1D`` (GPT-2), ``nn.Conv2d`` and ``nn.Conv1d`` are not packed by compressed-tensors;
asymmetric grids (a packed zero point) did not load in transformers with compressed-tensors
0.20 (the loader allocates the unpacked zero-point shape), so they are refused rather than
written unreadable.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from .errors import QroundError
from .files import _umask

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import QuantizedModel

WEIGHTS_INDEX = "model.safetensors.index.json"


def _require_compressed_tensors():
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError as exc:
        raise QroundError("writing the compressed-tensors format needs the compressed-tensors "
                          f"package ({exc}); install it with: pip install compressed-tensors"
                          ) from None
    return compressed_tensors.__version__, pack_to_int32


def compressed_tensors_refusals(qmodel: "QuantizedModel") -> list[str]:
    """Why ``qmodel`` cannot be written as compressed-tensors (empty: it can)."""
    from .activations import QuantizedLayer

    model = qmodel.model
    why = []
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        why.append(f"the model is a {type(model).__name__}, not a transformers model "
                   "(save_pretrained and config are needed for a checkpoint folder)")
    if any(isinstance(m, QuantizedLayer) for m in model.modules()):
        why.append("its layers are wrapped by qround's activation stage (activation "
                   "quantisers or block reconstruction): the pack-quantized format holds plain "
                   "Linear weights only")
    elif hasattr(model, "config"):
        # a bias that bias correction created has no place in this architecture's config:
        # transformers would drop it as an unexpected key, silently
        try:
            with torch.device("meta"):
                fresh = type(model)(model.config)
            plain = dict(fresh.named_modules())
            new = [n for n, m in model.named_modules() if n in qmodel.layers and
                   getattr(m, "bias", None) is not None and
                   getattr(plain.get(n), "bias", 0) is None]
        except Exception:  # noqa: BLE001 (a class that cannot be rebuilt from its config)
            # then the biases the float model's layers did not have (helper-174: a fallback
            # that found none let them through, and transformers dropped them on loading)
            new = list(getattr(qmodel, "new_biases", ()))
        if new:
            why.append(f"bias correction gave {new[:3]} a bias that this architecture's config "
                       "has no place for (transformers would drop it on loading); quantise "
                       "without bias correction")
    kinds = {r.layer: r.kind for r in qmodel.report}
    other = [n for n, k in kinds.items() if k != "Linear"]
    if other:
        why.append(f"compressed-tensors packs nn.Linear weights only; {other[:3]} "
                   f"{'is' if len(other) == 1 else 'are'} {kinds[other[0]]}"
                   + (f" (and {len(other) - 3} more)" if len(other) > 3 else ""))
    asym = [n for n, qw in qmodel.layers.items() if not qw.symmetric]
    if asym:
        why.append("asymmetric grids (a zero point) are not written: transformers with "
                   "compressed-tensors 0.20 could not load them; quantise with a symmetric grid")
    return why


def _group_size(qw) -> int | None:
    """The layer's group size, None for one group per channel (also a group as wide as the
    layer or wider, which the grid treats as per channel)."""
    n = qw.weight_shape[1] if len(qw.weight_shape) == 2 else None
    return None if qw.group_size is None or n is None or qw.group_size >= n else qw.group_size


def _scheme(bits: int, group_size: int | None, names: list[str]) -> dict[str, Any]:
    return {"targets": names,
            "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                        "strategy": "group" if group_size else "channel",
                        "group_size": group_size, "dynamic": False, "actorder": None,
                        "block_structure": None, "observer": None, "observer_kwargs": {}},
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}


def save_compressed_tensors(qmodel: "QuantizedModel", folder: str | os.PathLike,
                            tokenizer: Any = None,
                            max_shard_size: str | int | None = None) -> None:
    """Write ``qmodel`` (from :func:`qround.pipeline.quantize_model` on a transformers model) as
    a compressed-tensors ``pack-quantized`` checkpoint folder, with ``tokenizer`` if given.

    One config group per (bits, group size) among the quantised layers; with one group its
    target is ``"Linear"`` and every Linear left in float is listed under ``ignore`` (the form
    llm-compressor writes), else each group names its layers.  The folder must not exist: it is
    written beside it and renamed into place, so a failure leaves nothing half-written (missing
    parent folders are made first, and stay).
    ``max_shard_size`` goes to ``save_pretrained``.
    """
    from .export import check_quantized_model

    check_quantized_model(qmodel)
    why = compressed_tensors_refusals(qmodel)
    if why:
        raise QroundError("cannot write this model as compressed-tensors: " + "; ".join(why))
    version, pack_to_int32 = _require_compressed_tensors()
    folder = Path(folder)
    if folder.exists():
        raise QroundError(f"{folder} exists: compressed-tensors output goes to a new folder")
    parent = folder.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise QroundError(f"cannot write {folder}: {parent} is a file")
    model = qmodel.model
    groups: dict[tuple[int, int | None], list[str]] = {}
    for name, qw in qmodel.layers.items():
        groups.setdefault((qw.bits, _group_size(qw)), []).append(name)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignore = [n for n in linear if n not in qmodel.layers]
    if len(groups) == 1:
        [(bits, group_size)] = groups
        config_groups = {"group_0": _scheme(bits, group_size, ["Linear"])}
    else:
        config_groups = {f"group_{i}": _scheme(bits, gs, names)
                         for i, ((bits, gs), names) in enumerate(groups.items())}
    try:
        parent.mkdir(parents=True, exist_ok=True)   # as qround's own files
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    except OSError as exc:
        raise QroundError(f"cannot write {folder}: {exc}") from None
    try:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(tmp, **kwargs)
        _pack_weights(tmp, qmodel, pack_to_int32)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {},
            "transform_config": {}, "version": version,
            "producer": "qround", "qround_solver": str(qmodel.config.solver)}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp's folder is private; a new one is not
        try:
            os.replace(tmp, folder)
        except OSError as exc:
            raise QroundError(f"cannot write {folder}: {exc} (did it appear meanwhile?)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pack_weights(folder: Path, qmodel: "QuantizedModel", pack_to_int32) -> None:
    """Replace every quantised layer's ``<name>.weight`` in the folder's safetensors files by
    ``weight_packed`` / ``weight_scale`` / ``weight_shape`` (and the shard index's entries)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QroundError("save_pretrained wrote no safetensors file (safe_serialization off?)")
    placed: dict[str, str] = {}    # new key -> its file
    packed: set[str] = set()
    total = 0                      # bytes of every tensor written
    for path in files:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            # copies: the tensors would keep the file mapped, and Windows refuses to write a
            # mapped file (safetensors#164)
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        for name, qw in qmodel.layers.items():
            weight = tensors.pop(f"{name}.weight", None)
            if weight is None:
                continue
            codes = torch.from_numpy(qw.codes.astype("int8"))   # signed, as the format's int
            tensors[f"{name}.weight_packed"] = pack_to_int32(codes, qw.bits).contiguous()
            tensors[f"{name}.weight_scale"] = torch.tensor(np.asarray(qw.scale)).to(weight.dtype)
            tensors[f"{name}.weight_shape"] = torch.tensor(list(qw.weight_shape))
            for key in ("weight_packed", "weight_scale", "weight_shape"):
                placed[f"{name}.{key}"] = path.name
            packed.add(name)
        safetensors.torch.save_file(tensors, str(path), metadata=metadata)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    missing = [n for n in qmodel.layers if n not in packed]
    if missing:
        raise QroundError(f"save_pretrained wrote no weight for {missing[:3]} (tied or renamed "
                          "parameters cannot be packed)")
    index = folder / WEIGHTS_INDEX
    if index.exists():
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = {k: v for k, v in data.get("weight_map", {}).items()
                      if not (k.endswith(".weight") and k[:-len(".weight")] in packed)}
        weight_map.update(placed)
        data["weight_map"] = dict(sorted(weight_map.items()))
        if isinstance(data.get("metadata"), dict) and "total_size" in data["metadata"]:
            data["metadata"]["total_size"] = total   # packed tensors are smaller
        index.write_text(json.dumps(data, indent=2), encoding="utf-8")
