"""How much a quantised model still behaves like its float original.

- Sentence embeddings (MiniLM): :func:`embedding_metrics` compares two embedding matrices of the
  same sentences; :func:`minilm_metrics` embeds the sentences with both models first.
  ``cosine``: mean cosine similarity of each quantised embedding to its float one;
  ``spearman``: Spearman rank correlation of the upper triangles of the two pairwise
  cosine-similarity matrices (does the quantised model order sentence pairs the same way?);
  ``top10``: mean over sentences of the overlap of the 10 nearest neighbours (self excluded)
  under both models, as a fraction of 10.
- Any model: :func:`output_metrics` compares the two models' outputs on the same batches
  (relative squared error, per-sample cosine, largest difference, and for (N, classes) outputs
  how often the top class agrees).
- Image classifiers (digits CNN): :func:`digits_accuracy`, optionally with every Conv2d/Linear
  input fake-quantised to ``abits`` bits (uniform per-tensor grid over the min-max range seen on
  the calibration split), through forward pre-hooks that :func:`fake_quantized_inputs` always
  removes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ._warn import gathering
from .calibrate import (ForwardFn, LayerFilter, _check_batches, _layer_input, default_forward,
                        eval_mode, layer_hooks, own_rng, run_forward, select_layers)
from .errors import MAX_SEED, QroundError, as_float_array, check_bits, check_int

TOP_K = 10


# ----------------------------------------------------------------------------- embeddings
def embedding_metrics(reference, other, k: int = TOP_K) -> dict[str, float]:
    """``cosine``, ``spearman`` and ``top{k}`` of embeddings ``other`` (N, d) against
    ``reference`` (N, d), row i of both being sentence i.  Rows need not be normalised.

    Needs N > k (the neighbours exclude the sentence itself) and N >= 3.
    """
    from scipy.stats import spearmanr

    ref = as_float_array(reference, "reference", ndim=2)
    oth = as_float_array(other, "other", ndim=2)
    if ref.shape != oth.shape:
        raise QroundError(f"reference {ref.shape} and other {oth.shape} must have the same shape")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise QroundError(f"k must be a positive integer, got {k!r}")
    n = ref.shape[0]
    if n < 3 or n <= k:
        raise QroundError(f"need at least max(3, k + 1) = {max(3, k + 1)} embeddings, got {n}")
    ref, oth = _normalised(ref, "reference"), _normalised(oth, "other")

    cosine = float(np.mean(np.sum(ref * oth, axis=1)))
    sim_ref, sim_oth = ref @ ref.T, oth @ oth.T
    upper = np.triu_indices(n, k=1)
    # A constant similarity matrix has no ranking; call that no agreement rather than NaN
    # (and without scipy's ConstantInputWarning, since it is handled here).
    a, b = sim_ref[upper], sim_oth[upper]
    constant = np.ptp(a) == 0 or np.ptp(b) == 0
    rho = np.nan if constant else spearmanr(a, b).statistic
    spearman = float(rho) if np.isfinite(rho) else 0.0
    overlap = _neighbours(sim_ref, k) & _neighbours(sim_oth, k)
    return {"cosine": cosine, "spearman": spearman,
            f"top{k}": float(overlap.sum(axis=1).mean() / k)}


def _normalised(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise QroundError(f"{name} has {int(np.sum(norms == 0))} all-zero embedding(s): cosine "
                          "similarity is undefined")
    return x / norms


def _neighbours(sim: np.ndarray, k: int) -> np.ndarray:
    """Boolean (N, N): row i marks the k most similar other rows (ties broken by index)."""
    sim = sim.copy()
    np.fill_diagonal(sim, -np.inf)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    mask = np.zeros(sim.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    return mask


def minilm_metrics(float_model: nn.Module, quant_model: nn.Module, texts: Sequence[str],
                   batch_size: int = 64) -> dict[str, float]:
    """:func:`embedding_metrics` of ``quant_model``'s sentence embeddings of ``texts`` against
    ``float_model``'s (both SentenceTransformer MiniLMs, see ``qround.zoo.embed``).

    Returns ``{"cosine", "spearman", "top10"}``; needs more than 10 texts."""
    from .zoo import embed

    if len(texts) <= TOP_K:
        raise QroundError(f"texts must hold more than {TOP_K} sentences, got {len(texts)}")
    reference = embed(float_model, texts, batch_size=batch_size)
    other = embed(quant_model, texts, batch_size=batch_size)
    return embedding_metrics(reference, other)


# ----------------------------------------------------------------------------- activations
@gathering
def input_ranges(model: nn.Module, batches: Iterable, layers: LayerFilter = None,
                 forward: ForwardFn | None = None, seed: int = 0
                 ) -> dict[str, tuple[float, float]]:
    """Per-tensor ``(min, max)`` of the input of each chosen Linear/conv over ``batches``
    (run without gradients, in eval mode).  Returns name -> (lo, hi) in module order.  A
    forward's random draws come from ``seed``; the caller's generators and the model's buffers
    are left as they were (:func:`qround.calibrate.own_rng`)."""
    _check_model(model, "model")
    check_int(seed, "seed", 0, maximum=MAX_SEED)
    batches = _check_batches(batches)
    with own_rng(seed, model):
        return _input_ranges(model, batches, layers, forward)


def _check_model(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise QroundError(f"{what} must be a torch nn.Module, got {type(model).__name__}")


def _input_ranges(model, batches, layers, forward) -> dict[str, tuple[float, float]]:
    modules = select_layers(model, layers)
    forward = forward or default_forward
    seen: dict[str, tuple[float, float]] = {}

    def hook(name, module, args, out):
        x = _layer_input(name, module, args)  # QroundError for a missing or non-finite input
        lo, hi = float(x.min()), float(x.max())
        old = seen.get(name, (lo, hi))
        seen[name] = (min(old[0], lo), max(old[1], hi))

    count = 0
    with eval_mode(model), torch.no_grad(), layer_hooks(modules, hook):
        for batch in batches:
            run_forward(model, batch, forward, count)
            count += 1
    if count == 0:
        raise QroundError("batches yielded no batch: input ranges need calibration data")
    missing = [name for name in modules if name not in seen]
    if missing:
        from .activations import QuantizedLayer

        named = dict(model.named_modules())
        wrapped = [n for n in missing if isinstance(named.get(n.rpartition(".")[0]),
                                                    QuantizedLayer)]
        raise QroundError(f"layers {missing} saw no input during range calibration"
                          + (f"; {wrapped[0]!r} sits in one of qround's QuantizedLayer "
                             "wrappers, which compute without calling it (the model is "
                             "activation-quantised: measure the float model's ranges)"
                             if wrapped else ""))
    return {name: seen[name] for name in modules}


def activation_grid(lo: float, hi: float, bits: int) -> tuple[float, int, int]:
    """``(scale, zero_point, qmax)`` of a uniform ``bits``-bit grid on codes ``[0, qmax]``.

    Unsigned (zero point 0, range ``[0, hi]``) when ``lo >= 0``, e.g. after a ReLU; otherwise
    asymmetric over ``[min(lo, 0), max(hi, 0)]``, with an integer zero point so 0 is exact."""
    bits = check_bits(bits, "abits")
    qmax = 2 ** bits - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise QroundError(f"activation range [{lo}, {hi}] is not finite")
    scale = (hi - lo) / qmax
    if scale <= 0:  # an input that is always zero: any grid represents it
        return 1.0, 0, qmax
    return scale, int(np.clip(round(-lo / scale), 0, qmax)), qmax


@contextmanager
def fake_quantized_inputs(model: nn.Module, ranges: Mapping[str, tuple[float, float]],
                          bits: int) -> Iterator[nn.Module]:
    """Within the block, every named module's first input is replaced by its fake-quantised
    value ``s * (clamp(round(x / s) + z, 0, qmax) - z)`` on the grid of :func:`activation_grid`.
    Forward pre-hooks on ``model`` itself (nothing is copied); always removed on exit."""
    modules = dict(model.named_modules())
    grids = {}
    for name, (lo, hi) in ranges.items():
        if name not in modules:
            raise QroundError(f"ranges names layer {name!r}, which the model does not have")
        grids[name] = activation_grid(lo, hi, bits)

    def make_hook(name: str, scale: float, zero: int, qmax: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            if not args or not isinstance(args[0], torch.Tensor):
                raise QroundError(f"layer {name!r} was called without a tensor as first "
                                  "positional input: cannot fake-quantise it")
            x = args[0]
            q = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
            return ((q - zero) * scale,) + tuple(args[1:])
        return hook

    handles = []
    try:
        for name, grid in grids.items():
            handles.append(modules[name].register_forward_pre_hook(make_hook(name, *grid)))
        yield model
    finally:
        for h in handles:
            h.remove()


def digits_accuracy(model: nn.Module, data: Any, abits: int | None = None,
                    batch_size: int = 256) -> float:
    """Test accuracy in [0, 1] of a digits classifier on ``data`` (``qround.zoo.DigitsData``).

    abits: None for float activations; else the input of every Conv2d/Linear is fake-quantised
    to ``abits`` bits with per-tensor min-max ranges measured on ``data.calib_images``."""
    from .zoo import accuracy
    from .zoo.digits import input_placement

    for field in ("calib_images", "test_images", "test_labels"):
        if not isinstance(getattr(data, field, None), torch.Tensor):
            raise QroundError(f"data must be a qround.zoo.DigitsData (no tensor {field!r})")
    check_int(batch_size, "batch_size", 1)   # before the calibration batches are cut with it
    if abits is None:
        return accuracy(model, data.test_images, data.test_labels, batch_size=batch_size)
    check_bits(abits, "abits")
    to = input_placement(model)
    calib = [data.calib_images[i:i + batch_size].to(**to)
             for i in range(0, len(data.calib_images), batch_size)]
    ranges = input_ranges(model, calib)
    with fake_quantized_inputs(model, ranges, abits):
        return accuracy(model, data.test_images, data.test_labels, batch_size=batch_size)


def output_metrics(float_model: nn.Module, quant_model: nn.Module, batches: Iterable,
                   forward: ForwardFn | None = None, seed: int = 0) -> dict[str, float]:
    """How close ``quant_model``'s outputs stay to ``float_model``'s on ``batches`` (each run
    through ``forward(model, batch)``, default ``model(batch)``; both in eval mode, their own
    modes restored after).  The output is the model's tensor, or the first floating-point
    tensor of a tuple, mapping or dataclass it returns.

    ``relative_error``: ``sum ||y_q - y||^2 / sum ||y||^2`` over every batch; ``cosine``: mean
    over samples (the first axis) of the cosine of the flattened outputs; ``max_abs_error``;
    ``samples``; and ``top1_agreement`` (the fraction of samples whose largest output is the
    same) where the outputs are (N, classes).  Both forwards of a batch draw random numbers
    from the same state, seeded with ``seed``; the caller's generators and the models' buffers
    are left as they were.
    """
    _check_model(float_model, "float_model")
    _check_model(quant_model, "quant_model")
    check_int(seed, "seed", 0, maximum=MAX_SEED)
    batches = _check_batches(batches)
    with own_rng(seed, (float_model, quant_model)), torch.no_grad():
        return _output_metrics(float_model, quant_model, batches, forward or default_forward)


def _output(model: nn.Module, batch, forward: ForwardFn, index: int, which: str
            ) -> torch.Tensor:
    """The main output tensor of ``model`` on ``batch``, with at least a batch axis."""
    from .reconstruct import _main_tensor

    y = _main_tensor(run_forward(model, batch, forward, index, which), which)
    if y.dim() == 0:
        raise QroundError(f"{which} returned a 0-d tensor (a loss?): the metrics compare "
                          "outputs per sample, so the output needs a batch axis; pass a "
                          "forward that returns the model's outputs")
    return y.double()


def _rng_states() -> tuple:
    """The global generators' states: torch's CPU and CUDA ones, numpy's and ``random``'s."""
    import random

    cuda = (torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    return torch.random.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _set_rng_states(states: tuple) -> None:
    import random

    cpu, cuda, numpy_state, python_state = states
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def _output_metrics(float_model, quant_model, batches, forward) -> dict[str, float]:
    err = ref = 0.0
    cosines, agree, biggest, samples, classes = [], 0, 0.0, 0, True
    with eval_mode(float_model), eval_mode(quant_model):
        for j, batch in enumerate(batches):
            state = _rng_states()
            y = _output(float_model, batch, forward, j, "the float model")
            _set_rng_states(state)
            q = _output(quant_model, batch, forward, j, "the quantised model")
            if q.shape != y.shape:
                raise QroundError(f"the quantised model's output has shape {tuple(q.shape)}, "
                                  f"the float model's {tuple(y.shape)}: not the same model")
            if not (torch.isfinite(y).all() and torch.isfinite(q).all()):
                raise QroundError("an output contains NaN or Inf: the metrics would be "
                                  "meaningless")
            d = q - y
            err += float(d.square().sum())
            ref += float(y.square().sum())
            biggest = max(biggest, float(d.abs().max()) if d.numel() else 0.0)
            flat_y, flat_q = y.reshape(len(y), -1), q.reshape(len(q), -1)
            cosines.append(torch.nn.functional.cosine_similarity(flat_q, flat_y, dim=1))
            samples += len(y)
            classes = classes and y.dim() == 2 and y.shape[1] > 1
            if classes:
                agree += int((y.argmax(1) == q.argmax(1)).sum())
    if samples == 0:
        raise QroundError("batches is empty: there is nothing to compare")
    out = {"relative_error": err / ref if ref > 0 else float("inf") if err > 0 else 0.0,
           "cosine": float(torch.cat(cosines).mean()), "max_abs_error": biggest,
           "samples": samples}
    if classes:
        out["top1_agreement"] = agree / samples
    return out
