"""Hugging Face transformers checkpoints in a local folder (``save_pretrained``'s: a
``config.json``, the weights and the tokenizer files), loaded offline, with text batches, a
forward function for calibration, and the metrics ``qround evaluate`` reports for them.

A causal language model (a ``...ForCausalLM`` / ``...LMHeadModel`` architecture in the config)
is loaded with ``AutoModelForCausalLM`` and evaluated by perplexity; any other model with
``AutoModel`` and evaluated by its mean-pooled last hidden state (cosine, Spearman, top-10 of
:func:`qround.evaluate.embedding_metrics`).  transformers comes with the ``examples`` extra.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import QroundError, first_line
from ._optional import require, torch_device
from .text import _quiet_transformers

MAX_LENGTH = 128   # tokens per text in batches, at most (and at most the model's positions)


def is_hf_folder(path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a transformers checkpoint)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and os.path.isfile(
        os.path.join(path, "config.json"))


@dataclass
class HFModel:
    """A checkpoint loaded by :func:`load_hf`: the model (eval mode), its tokenizer, whether it
    is a causal language model, and the longest input it takes (tokens)."""

    model: nn.Module
    tokenizer: Any
    causal: bool
    max_length: int

    def batches(self, texts: Sequence[str], batch_size: int = 32) -> list[dict]:
        """:func:`hf_batches` of ``texts`` for this model; QroundError where the tokenizer
        makes token ids the model has no embedding for (a tokenizer of another model)."""
        out = hf_batches(self.tokenizer, texts, batch_size, self.max_length)
        embeddings = self.model.get_input_embeddings()
        size = getattr(embeddings, "num_embeddings", None)
        top = max(int(b["input_ids"].max()) for b in out)
        if size is not None and top >= size:
            raise QroundError(f"the tokenizer makes token id {top}, but the model embeds only "
                              f"{size} tokens: the folder's tokenizer belongs to another model")
        return out

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """:func:`hf_forward` (the model may be a quantised copy)."""
        return hf_forward(model, batch, self.causal)


def load_hf(path, device: str = "cpu", max_length: int | None = None) -> HFModel:
    """The checkpoint in the folder ``path``, offline (``local_files_only``; ``HF_HUB_OFFLINE``
    and ``TRANSFORMERS_OFFLINE`` are set when unset).  A tokenizer without a padding token pads
    with its end-of-text token (or unknown token).  max_length: tokens per text in
    :meth:`HFModel.batches` (None: ``MAX_LENGTH`` = 128, or the model's positions if fewer;
    more than the model's positions is refused).  QroundError when the folder is not a
    checkpoint, or its model or tokenizer cannot be loaded."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(
            max_length, int) or max_length < 1):
        raise QroundError(f"max_length must be a positive integer, got {max_length!r}")
    torch_device(device)   # before loading: a device that is not there stops here
    if not is_hf_folder(path):
        raise QroundError(f"{path!r} is not a transformers checkpoint folder (no config.json)")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    transformers = require("transformers", "transformers")
    try:
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 (transformers raises many types for a bad folder)
        raise QroundError(f"transformers could not load the model in {path} "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    positions = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")]
    known = [p for p in positions if isinstance(p, int) and p > 0]
    limit = min(known or [MAX_LENGTH])
    if max_length is not None and known and max_length > limit:
        raise QroundError(f"max_length={max_length}: the model in {path} takes at most {limit} "
                          "positions")
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if getattr(config, "is_encoder_decoder", False):
        raise QroundError(f"{path} holds an encoder-decoder model ({', '.join(architectures)}): "
                          "the checkpoint-folder path takes causal language models and "
                          "encoders; quantise it from Python with quantize_model and your own "
                          "forward")
    if not causal and any(not a.endswith("Model") for a in architectures):
        raise QroundError(f"{path} holds a {architectures[0]}: the checkpoint-folder path takes "
                          "causal language models (...ForCausalLM, ...LMHeadModel) and bare "
                          "encoders (...Model), whose last hidden state it evaluates; a task "
                          "head would be lost. Quantise it from Python with quantize_model")
    try:
        with _quiet_transformers():
            auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
            model, info = auto.from_pretrained(path, local_files_only=True,
                                               output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 (transformers raises many types for a bad folder)
        raise QroundError(f"transformers could not load the model in {path} "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise QroundError(f"the weights in {path} lack {', '.join(missing[:3])}{more}: "
                          "transformers would start them at random")
    try:
        with _quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise QroundError(f"transformers could not load a tokenizer from {path} "
                          f"({type(exc).__name__}: {_first_line(exc)}); qround tokenises its "
                          "calibration text with the checkpoint's own tokenizer") from None
    # transformers builds an empty tokenizer where the folder has no tokenizer files: every text
    # would become zero tokens, or only special and unknown ones (a BERT vocabulary of its 5
    # special tokens)
    ids = tokenizer("The rounding of a layer.")["input_ids"]
    special = set(tokenizer.all_special_ids) | ({tokenizer.unk_token_id}
                                                - {None})
    if not ids or all(i in special for i in ids):
        raise QroundError(f"the tokenizer loaded from {path} turns text into no tokens, or only "
                          "special and unknown ones: the folder lacks the tokenizer files (save "
                          "the tokenizer there too, tokenizer.save_pretrained)")
    tokenizer.padding_side = "right"   # left padding would shift absolute positions (GPT-2)
    if tokenizer.pad_token is None:
        fill = tokenizer.eos_token or tokenizer.unk_token
        if fill is None:
            raise QroundError(f"the tokenizer in {path} has no padding, end-of-text or unknown "
                              "token to pad batches with")
        tokenizer.pad_token = fill
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length is not None and max_length <= specials:
        raise QroundError(f"max_length={max_length} leaves no room for text: the tokenizer in "
                          f"{path} adds {specials} special tokens to every text")
    try:
        model = model.to(device).eval()
    except (RuntimeError, TypeError) as exc:
        raise QroundError(f"device={device!r}: {_first_line(exc)}") from None
    hf = HFModel(model, tokenizer, causal, min(MAX_LENGTH, limit) if max_length is None
                 else max_length)
    _check_length(hf, path, given=max_length is not None)
    return hf


def _check_length(hf: HFModel, path, given: bool) -> None:
    """Run the model once on ``hf.max_length`` tokens: the positions a config names are not
    always the tokens a model takes (RoBERTa's positions start after its padding index, so
    514 positions take 512 tokens).  A length the user gave that does not fit is refused; the
    default steps down (at most 8 tokens) to one that fits."""
    ids = hf.tokenizer("the", add_special_tokens=False)["input_ids"] or [0]
    size = getattr(hf.model.get_input_embeddings(), "num_embeddings", None)
    if size is not None and ids[0] >= size:   # not a question of length
        raise QroundError(f"the tokenizer makes token id {ids[0]}, but the model embeds only "
                          f"{size} tokens: the folder's tokenizer belongs to another model")
    for length in range(hf.max_length, max(hf.max_length - 9, 0), -1):
        batch = {"input_ids": torch.full((1, length), ids[0], dtype=torch.long,
                                         device=_device(hf.model)),
                 "attention_mask": torch.ones((1, length), dtype=torch.long,
                                              device=_device(hf.model))}
        try:
            with torch.no_grad():
                hf_forward(hf.model, batch, hf.causal)
        except Exception as exc:  # noqa: BLE001 (any error of the model's forward)
            if given:
                raise QroundError(f"the model in {path} cannot take {length} tokens "
                                  f"({type(exc).__name__}: {_first_line(exc)}); give a smaller "
                                  "max_length") from None
            error = exc
            continue
        hf.max_length = length
        return
    raise QroundError(f"the model in {path} does not run on {hf.max_length} tokens or a few "
                      f"fewer ({type(error).__name__}: {_first_line(error)})")


def _first_line(exc: BaseException) -> str:
    return first_line(exc)


def hf_batches(tokenizer, texts: Sequence[str], batch_size: int = 32,
               max_length: int = MAX_LENGTH) -> list[dict]:
    """Tokenised batches of ``texts``, in order: dicts of ``input_ids`` and ``attention_mask``
    (and ``token_type_ids`` where the tokenizer makes them), (B, T) int64, padded to the longest
    text of the batch, at most ``max_length`` tokens."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip()
                                                      for t in texts):
        raise QroundError("texts must be a non-empty list of non-empty strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QroundError(f"batch_size must be a positive integer, got {batch_size!r}")
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        out.append({k: v for k, v in enc.items()
                    if k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def _takes_use_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def hf_forward(model: nn.Module, batch: dict, causal: bool) -> torch.Tensor:
    """Run ``model`` on a batch of :func:`hf_batches` and return its logits (causal) or last
    hidden state, (B, T, ...).  Padding stays out of the weight statistics (the H of each
    layer), the activation quantisers' initial steps and block reconstruction's losses
    (:func:`qround.calibrate.token_mask`), and no key-value cache is built (``use_cache=False``
    where the model takes it: block reconstruction replays the layers many times)."""
    from ..calibrate import token_mask

    kwargs = {"use_cache": False} if _takes_use_cache(model) else {}
    with token_mask(batch["attention_mask"]):
        out = model(**batch, **kwargs)
    return out.logits if causal else out.last_hidden_state


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def perplexity(model: nn.Module, batches: Sequence[dict]) -> float:
    """exp of the mean next-token cross-entropy over the real (unpadded) tokens of ``batches``
    (a causal language model)."""
    from ..calibrate import eval_mode

    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            logits = hf_forward(model, batch, causal=True).double()
            target = batch["input_ids"][:, 1:]
            keep = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                reduction="none").reshape(target.shape)
            total += float(nll[keep].sum())
            count += int(keep.sum())
    if count == 0:
        raise QroundError("perplexity needs texts of at least two tokens")
    return math.exp(total / count)


def pooled(model: nn.Module, batches: Sequence[dict]) -> torch.Tensor:
    """Mean of the last hidden state over each text's real tokens, (N, d) float64 (CPU)."""
    from ..calibrate import eval_mode

    rows = []
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            hidden = hf_forward(model, batch, causal=False).double()
            mask = batch["attention_mask"].to(hidden.dtype)[..., None]
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(rows).cpu()


def hf_metrics(hf: HFModel, quant_model: nn.Module, texts: Sequence[str],
               batch_size: int = 32) -> dict[str, float]:
    """How ``quant_model`` (a quantised copy of ``hf.model``) compares with the float model on
    ``texts``: perplexity of both and their ratio for a causal language model, else
    :func:`qround.evaluate.embedding_metrics` of the mean-pooled last hidden states."""
    batches = hf.batches(texts, batch_size)
    if hf.causal:
        ref, ours = perplexity(hf.model, batches), perplexity(quant_model, batches)
        return {"float_perplexity": ref, "quantized_perplexity": ours,
                "perplexity_ratio": ours / ref}
    from ..evaluate import embedding_metrics

    return embedding_metrics(pooled(hf.model, batches).numpy(),
                             pooled(quant_model, batches).numpy())
