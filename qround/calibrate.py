"""Streaming layer statistics from forward hooks.

For each chosen ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv1d`` (read as the Conv2d with kernel
(1, k) that it equals) and transformers' ``Conv1D`` (read as its Linear)
the input vectors ``x`` of the layer are streamed into float64 sums, one batch at a time, and
divided by the number of vectors at the end:

- ``capture_hessians``: ``H = E[x x^T]`` (AdaRound eq. 20/21).
- ``capture_asymmetric``: ``H_hat = E[x_hat x_hat^T]``, ``C = E[x_hat x^T]``, ``H = E[x x^T]``
  with ``x`` from the float model and ``x_hat`` from a (partly) quantised copy (AdaRound eq. 25).
- ``capture_fisher``: per channel ``H_c = E[g_c^2 x x^T]``, ``g_c = dL/dz_c`` (eq. 13,
  appendix eq. 3-5).

``x`` is the input feature vector of a Linear (every leading dim, batch and tokens, flattened)
and the im2col patch of a conv, one per spatial position and sample, in the order
(c_in/groups, kh, kw) of ``weight.reshape(out, -1)``; a grouped conv has one block per group,
returned as (groups, n_g, n_g).  Memory per layer is O(n^2) (O(out n^2) for Fisher): inputs are
unfolded in chunks of bounded size and never kept beyond the batch.

Hooks are registered in one place, :func:`layer_hooks`, which always removes them; the model is
put in eval mode while capturing and every module's train/eval flag is restored afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._warn import gathering, warn_gathered
from .errors import MAX_SEED, QroundError, check_int, first_line
from .problems.layers import conv2d_view, is_hf_conv1d

log = logging.getLogger(__name__)

LayerFilter = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
ForwardFn = Callable[[nn.Module, Any], Any]

_CHUNK_BYTES = 64 * 2 ** 20  # bound on one unfolded float64 chunk: im2col is kh*kw times the input
_TOKEN_MASK: ContextVar = ContextVar("qround_token_mask", default=None)
_MASK_USES = [0]   # token_mask contexts entered so far (does a forward of the user's mask?)


@contextmanager
def token_mask(mask: torch.Tensor) -> Iterator[None]:
    """Count only the real tokens: inside this context, a Linear layer whose input has leading
    dims equal to ``mask.shape`` (e.g. (batch, tokens)), or is 2-D with one row per token (the
    tokens flattened in order), contributes only the rows where ``mask`` is true.  A
    ``forward`` function wraps its model call in it to keep padding out of ``H`` (padded
    positions never reach a masked attention or a masked mean pooling).  The activation stage
    reads it too: the inputs that start the activation steps (such a Linear's rows) and the
    block outputs that reconstruction compares (outputs whose leading dims are the mask's, or
    one row per token) count only the real tokens.

    Activations are taken as batch-first, (batch, tokens, features), as in transformers.  A
    sequence-first input (tokens, batch, features) is not masked, with a warning; when batch
    and tokens are equal the two layouts cannot be told apart and the mask is applied as if
    batch-first."""
    tok = _TOKEN_MASK.set(mask.detach().bool())
    _MASK_USES[0] += 1
    try:
        yield
    finally:
        _TOKEN_MASK.reset(tok)


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a Linear-like layer: nn.Linear, or transformers' Conv1D (weight (in, out));
    None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_hf_conv1d(module):
        return tuple(module.weight.shape)
    return None


def _out_channels(module: nn.Module) -> int:
    """Output channels of a layer (a Conv1D's weight is (in, out))."""
    dims = _linear_dims(module)
    return dims[1] if dims is not None else int(module.weight.shape[0])


def _sequence_first(names: list[str]) -> str:
    return (f"the inputs of {_some(names, 'Linear layer')} look sequence-first (tokens, batch, "
            "features) against the (batch, tokens) token mask: their padding is counted "
            "(token_mask takes batch-first activations)")


def _some(names: list[str], what: str, shown: int = 8) -> str:
    """``"layer 'a'"``, ``"layers ['a', 'b']"`` or ``"layers ['a', ...] and 5 more"`` (the
    whole list then goes to the log at INFO: ``qround -v``)."""
    if len(names) == 1:
        return f"{what} {names[0]!r}"
    more = ""
    if len(names) > shown:
        more = f" and {len(names) - shown} more (logged at INFO)"
        log.info("all %d %ss of the warning below: %s", len(names), what, names)
    return f"{what}s {names[:shown]}{more}"


def _active_mask(module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor | None:
    """The flattened token mask that applies to this Linear input (layer ``name``), or None."""
    mask = _TOKEN_MASK.get()
    if mask is None or _linear_dims(module) is None:
        return None
    # (B, T, in), or the tokens flattened in order, (B * T, in) (OPT's MLP)
    if tuple(x.shape[:-1]) != tuple(mask.shape) and not (
            x.dim() == 2 and x.shape[0] == mask.numel()):
        if mask.dim() == 2 and tuple(x.shape[:-1]) == tuple(mask.shape)[::-1]:
            warn_gathered("sequence-first", name, _sequence_first)
        return None
    return mask.reshape(-1).to(x.device)


# ---------------------------------------------------------------------------------- hooks
@contextmanager
def layer_hooks(modules: Mapping[str, nn.Module],
                hook: Callable[[str, nn.Module, tuple, Any], Any],
                pre: bool = False) -> Iterator[None]:
    """Call ``hook(name, module, inputs, output)`` after every forward of each named module.

    A hook that returns a value replaces the module's output (as in torch).  With ``pre``, the
    hook runs before each forward instead, with output None, and its value is ignored (a
    hook that only reads the inputs, or stops the pass, saves the module's own forward).  The
    hooks are removed on exit, also when the body raises.
    """
    handles = []

    def before(name):
        def call(mod, args):
            hook(name, mod, args, None)
        return call

    try:
        for name, module in modules.items():
            if pre:
                handles.append(module.register_forward_pre_hook(before(name)))
            else:
                handles.append(module.register_forward_hook(
                    lambda mod, args, out, _name=name: hook(_name, mod, args, out)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode; restore each module's own flag on exit."""
    flags = [(m, m.training) for m in model.modules()]   # pre-order: parents first
    try:
        model.eval()
        yield model
    finally:
        # through train(), as model.train(flag) would: a module that overrides it (LoRA merges
        # its update on eval and unmerges it on train) gets its own flag by its own method
        if len({t for _, t in flags}) == 1:
            model.train(flags[0][1])
        else:
            for m, training in flags:   # each call sets a subtree; children come later
                m.train(training)


_SCALAR_TYPES = (int, float, complex, str, bytes, bool, type(None))
_MISSING = object()


# ------------------------------------------------------------------------------ what the user owns
@contextmanager
def own_rng(seed: int, models: nn.Module | Sequence[nn.Module], device: str = "cpu",
            keep_buffers: bool = True) -> Iterator[None]:
    """Random draws inside (a model's own forward that samples) come from torch's, numpy's and
    ``random``'s global generators seeded with ``seed``, so a run depends on the seed, not on
    the caller's state; the caller's states (torch CPU and CUDA, numpy, ``random``) are restored
    afterwards.  With ``keep_buffers``, buffers of ``models`` that their forwards write
    (counters, observers) get their values back too (:func:`kept_buffers`).  ``device``: a CUDA
    device whose generator is seeded too.  The generators are the process's: calls from several
    threads run here one at a time (an RLock), or each would restore what another had seeded."""
    import random

    models = [models] if isinstance(models, nn.Module) else list(models)
    with _RNG_LOCK, contextlib.ExitStack() as stack:
        if keep_buffers:
            for model in models:
                stack.enter_context(kept_buffers(model))
        stack.enter_context(_seeded(seed, models, device, random))
        yield


_RNG_LOCK = threading.RLock()


def _after_fork_in_child() -> None:
    global _RNG_LOCK
    _RNG_LOCK = threading.RLock()   # another thread of the parent may have held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def seed_numpy(seed: int) -> None:
    """Seed numpy's global generator with every bit of ``seed`` (up to 2**64 - 1): it takes
    32-bit words, and a seed below 2**32 seeds it as ``np.random.seed(seed)`` does."""
    np.random.seed(seed if seed < 2 ** 32 else [seed & 0xFFFFFFFF, seed >> 32])


@contextmanager
def _seeded(seed: int, models: list[nn.Module], device: str, random) -> Iterator[None]:
    devices = {p.device.index for model in models for p in model.parameters()
               if p.device.type == "cuda"}
    if device.startswith("cuda"):
        index = torch.device(device).index
        devices.add(torch.cuda.current_device() if index is None else index)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices |= set(range(torch.cuda.device_count()))
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=sorted(devices)):
        torch.default_generator.manual_seed(seed)
        seed_numpy(seed)   # a forward drawing from these follows the seed too
        random.seed(seed)
        for d in sorted(devices):
            torch.cuda.default_generators[d].manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextmanager
def kept_buffers(model: nn.Module, skip: tuple[type, ...] = ()) -> Iterator[nn.Module]:
    """On exit, every buffer of ``model`` holds its value from entry again (the same tensor
    object, refilled), and buffers registered meanwhile in its modules are gone: a forward that
    writes a buffer (a counter, an observer's statistics, a cache) leaves no trace in a model
    qround only reads.  Dense buffers are cloned once on entry, to the CPU; a sparse or meta
    buffer gets only its tensor object back.  Modules the forward creates keep their buffers,
    and so do modules of the types ``skip`` (qround's own, whose buffers hold results).  Plain
    attributes holding a number, string, bool or None get their values back too: a lazy cache
    that re-registers a longer buffer also counts its length in one (``max_seq_len_cached``),
    and the two must stay in step."""
    saved, scalars = [], []
    for m in model.modules():
        if isinstance(m, skip):
            continue
        if not isinstance(m, torch.jit.ScriptModule):
            scalars.append((m, {k: v for k, v in m.__dict__.items()
                                if k != "training" and isinstance(v, _SCALAR_TYPES)}))
        for key, t in m._buffers.items():
            dense = t is not None and t.layout == torch.strided and not t.is_meta
            # on the CPU: a model's large buffers (a static cache) need no second copy on its GPU
            saved.append((m, key, t, t.detach().to("cpu", copy=True) if dense else None))
    # a TorchScript module's buffers are refilled in place only (its attributes are fixed)
    keys = {id(m): (m, set(m._buffers.keys())) for m in model.modules()
            if not isinstance(m, (torch.jit.ScriptModule, *skip))}
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, attrs in scalars:
                for k, v in attrs.items():
                    # only a value that is still a plain attribute: a name that became a
                    # parameter, buffer or module (bias correction's new bias over a `bias =
                    # None` attribute) left __dict__, and writing it back would hide it
                    now = m.__dict__.get(k, _MISSING)
                    if now is not _MISSING and now is not v \
                            and not (type(now) is type(v) and now == v):
                        m.__dict__[k] = v
            for m, had in keys.values():
                for key in [k for k in m._buffers if k not in had]:
                    del m._buffers[key]
                    m._non_persistent_buffers_set.discard(key)
            for m, key, t, value in saved:
                if id(m) in keys:
                    m._buffers[key] = t
                if value is None:
                    continue
                if t.shape == value.shape and t.dtype == value.dtype:
                    if not torch.equal(t.detach().cpu(), value):
                        t.copy_(value)
                else:
                    t.data = value.to(t.device)


def select_layers(model: nn.Module, layers: LayerFilter = None,
                  conv1d: bool = True) -> dict[str, nn.Module]:
    """The Linear/Conv2d/Conv1d modules (and transformers' Conv1D unless ``conv1d`` is False) to
    capture, by name: in ``named_modules`` order for None or a predicate, in the given order
    for names.

    layers: None (all), a name or list of names, or a predicate ``(name, module) -> bool``.
    """
    def supported(m):
        return isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)) or (conv1d and is_hf_conv1d(m))

    if layers is None or callable(layers):
        chosen = {n: m for n, m in model.named_modules()
                  if supported(m) and (layers is None or layers(n, m))}
        if not chosen:
            raise QroundError("layers selected no nn.Linear, nn.Conv2d or nn.Conv1d module of "
                              "the model"
                              + (" (nor a transformers Conv1D)" if conv1d else ""))
        _check_materialised(chosen, chosen)
        return chosen
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise QroundError("layers is an empty list")
    modules = dict(model.named_modules())
    chosen = {}
    for n in names:
        if n not in modules:
            raise QroundError(f"layer {n!r} does not exist in the model")
        if not supported(modules[n]):
            raise QroundError(f"layer {n!r} is a {type(modules[n]).__name__}, not nn.Linear, "
                              "nn.Conv2d or nn.Conv1d"
                              + (" or transformers' Conv1D" if conv1d else ""))
        chosen[n] = modules[n]
    _check_materialised(chosen, chosen)
    return chosen


def _check_materialised(modules: Mapping[str, nn.Module], names: Iterable[str]) -> None:
    """QroundError naming the first of ``names`` whose parameters are on the meta device."""
    for name in names:
        if any(p.is_meta for p in modules[name].parameters()):
            raise QroundError(f"layer {name!r} has its weights on the meta device (shapes only, "
                              "no values): load the weights first, e.g. model.to_empty(device="
                              "'cpu') then model.load_state_dict(...), or from_pretrained "
                              "without a meta device")


def _padding_mask(batch: Mapping) -> torch.Tensor | None:
    """The (batch, tokens) padding mask of a tokenised dict batch, or None (see
    :func:`default_forward`)."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.is_floating_point() \
            or mask.is_complex() or any(isinstance(k, str) and k.startswith("decoder_")
                                        for k in batch):
        return None
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        return None
    if bool(mask.all()):  # no padding: nothing to leave out
        return None
    return mask


def default_forward(model: nn.Module, batch, **kwargs) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple/list, else ``model(batch)``;
    ``kwargs`` are passed to the model too (``default_forward(model, batch, use_cache=False)``
    in a forward of your own keeps what this one does).

    A tokenised batch, a dict whose ``attention_mask`` is a (batch, tokens) tensor of 0/1 or
    booleans with some padding (zeros), runs inside :func:`token_mask`: padded positions stay
    out of the statistics, as with the CLI's forward for transformers folders (they used to
    count, and move every layer's H toward padding).  Masks of other kinds are left alone: a
    float (additive, -inf for padding) mask, and any batch with ``decoder_*`` inputs (the
    decoder's tokens are not the mask's).  A forward of your own can call :func:`token_mask`."""
    if isinstance(batch, Mapping):
        mask = _padding_mask(batch)
        if mask is not None:
            with token_mask(mask):
                return model(**batch, **kwargs)
        return model(**batch, **kwargs)
    if isinstance(batch, (tuple, list)):
        try:
            return model(*batch, **kwargs)
        except TypeError as exc:
            if "positional argument" not in str(exc):
                raise
            raise QroundError(
                f"a calibration batch of {len(batch)} items was passed as model(*batch), and the "
                f"model refused it ({exc}). For (inputs, labels) batches, pass "
                "forward=lambda model, batch: model(batch[0])") from exc
    return model(batch, **kwargs)


def _check_batches(batches) -> Iterable:
    """``batches``, or QroundError for one batch (a tensor, array or dict) or a non-iterable."""
    if isinstance(batches, (torch.Tensor, np.ndarray, Mapping, str, bytes)):
        raise QroundError(f"batches must be an iterable of batches (a list or DataLoader), got "
                          f"one {type(batches).__name__}; wrap a single batch in a list")
    try:
        iter(batches)
    except TypeError:
        raise QroundError(f"batches must be an iterable of batches (a list or DataLoader), got "
                          f"{type(batches).__name__}") from None
    return batches


def _batch_tensors(batch, path: str = "", depth: int = 0
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(where, tensor) for every tensor a batch holds, in lists, tuples and mappings; where is
    the index path, ``""`` for the batch itself, ``"[0]['x']"`` inside it."""
    if isinstance(batch, torch.Tensor):
        yield path, batch
    elif depth < 4 and isinstance(batch, (list, tuple)):
        for i, item in enumerate(batch):
            yield from _batch_tensors(item, f"{path}[{i}]", depth + 1)
    elif depth < 4 and isinstance(batch, Mapping):
        for key, item in batch.items():
            yield from _batch_tensors(item, f"{path}[{key!r}]", depth + 1)


def run_forward(model: nn.Module, batch, forward: ForwardFn, index: int = 0,
                which: str = "the model") -> Any:
    """``forward(model, batch)``, with the user's errors named: a failure of the model or the
    forward (a batch of the wrong shape, dtype or device) is a QroundError naming the batch,
    and so is a forward that changes a tensor of the batch in place (``x.sub_(mean)``): qround
    runs each batch more than once, and every run would see other data."""
    versions = [(where, t, t._version) for where, t in _batch_tensors(batch)
                if not t.is_inference()]
    name = "the first calibration batch" if index == 0 else f"calibration batch {index}"
    masks = _MASK_USES[0]
    try:
        out = forward(model, batch)
    except QroundError:
        raise
    except Exception as exc:  # noqa: BLE001 (any error of the user's forward)
        arrays = isinstance(batch, np.ndarray) or (isinstance(batch, (list, tuple)) and any(
            isinstance(b, np.ndarray) for b in batch))
        raise QroundError(f"{which}'s forward failed on {name} "
                          f"({type(exc).__name__}: {first_line(exc, 300)}); "
                          + ("the batch holds numpy arrays: make them torch tensors "
                             "(torch.from_numpy)" if arrays else
                             "check that the batches fit the model (shape, dtype, device) and, "
                             "for batches that are not the model's positional input, the "
                             "forward function")) from exc
    if forward is not default_forward and _MASK_USES[0] == masks and \
            isinstance(batch, Mapping) and _padding_mask(batch) is not None:
        warn_gathered("unmasked", "", lambda _: (
            "the calibration batches are padded (their attention_mask has zeros), and the "
            "forward of your own does not mask: padded tokens count in every layer's "
            "statistics. Run the model inside qround.calibrate.token_mask(batch["
            "'attention_mask']), as the default forward does; for extra arguments, "
            "forward=lambda model, batch: qround.calibrate.default_forward(model, batch, "
            "use_cache=False) masks too"))
    changed = [(where, t) for where, t, version in versions if t._version != version]
    if changed:
        # an idempotent change (an in-place ReLU on the input) gives every later run the same
        # data: a second run that leaves the values as they are is accepted
        after = [t.detach().clone() for _, t in changed]
        forward(model, batch)
        moved = [where for (where, t), was in zip(changed, after) if not _same(t, was)]
        if moved:
            raise QroundError(f"{which}'s forward changed {name}{moved[0]} in place, and "
                              "changes it again on every run: qround runs every batch more "
                              "than once, and each run would see other data (your batch has "
                              "been changed by two runs already). Change a copy instead (x = x "
                              "- mean, not x.sub_(mean) or x -= mean, in the forward or the "
                              "model)")
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN."""
    a = a.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


# ---------------------------------------------------------------------------------- input vectors
def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that nn.Conv2d applies before convolving."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads = []  # 'same': total d*(k-1), the odd pixel on the right/bottom, as torch does
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _layer_input(name: str, module: nn.Module, args: tuple) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        raise QroundError(f"layer {name!r} was called without a tensor as first positional input")
    x = args[0].detach()
    dims = _linear_dims(module)
    if dims is not None:
        mask = _active_mask(module, x, name)
        x = x.reshape(-1, dims[0])
        if mask is not None:   # padding may hold anything (NaN after a fully masked softmax)
            x = x[mask]
    else:                      # conv: (N, C, H, W), unbatched made batched
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-2)  # (N, C, L) -> (N, C, 1, L): the Conv2d of conv2d_view
        if x.dim() != 4:
            x = x.unsqueeze(0)
    if not torch.isfinite(x).all():
        raise QroundError(f"layer {name!r} received non-finite (NaN/Inf) inputs (from the "
                          "calibration data, or a NaN/Inf parameter of a layer before it?)")
    return x


def _chunks(module: nn.Module, x: torch.Tensor) -> Iterator[slice]:
    """Slices along dim 0 whose unfolded float64 vectors stay under ``_CHUNK_BYTES``."""
    per_row = x.numel() // max(x.shape[0], 1) * 8
    conv = conv2d_view(module)
    if conv is not None:
        per_row *= conv.kernel_size[0] * conv.kernel_size[1]
    step = max(1, _CHUNK_BYTES // max(per_row, 1))
    for start in range(0, x.shape[0], step):
        yield slice(start, start + step)


def _vectors(module: nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    """Input vectors (groups, rows, n_g) float64 of a chunk of layer inputs.

    Linear: x (rows, in) -> (1, rows, in).  Conv2d: x (N, C, H, W) -> im2col patches, row
    ``i * L + l`` = sample i at output position l, entries ordered (c_in/groups, kh, kw).
    Conv1d: x (N, C, 1, L) (from :func:`_layer_input`), as its :func:`conv2d_view`.
    """
    x = x.to(device=device, dtype=torch.float64)
    if _linear_dims(module) is not None:
        return x.unsqueeze(0)
    module = conv2d_view(module)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pads = _conv_padding(module)
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    n, _, length = cols.shape  # (N, C*kh*kw, L), channel-major: groups are contiguous blocks
    g = module.groups
    return cols.reshape(n, g, -1, length).permute(1, 0, 3, 2).reshape(g, n * length, -1)


def _output_rows(module: nn.Module, grad: torch.Tensor, device) -> torch.Tensor:
    """Output gradients (rows, out) float64 in the row order of :func:`_vectors`."""
    grad = grad.to(device=device, dtype=torch.float64)
    dims = _linear_dims(module)
    if dims is not None:
        return grad.reshape(-1, dims[1])
    batched = 4 if isinstance(module, nn.Conv2d) else 3   # a Conv1d's output is (N, out, L)
    grad = grad if grad.dim() == batched else grad.unsqueeze(0)
    return grad.flatten(2).transpose(1, 2).reshape(-1, grad.shape[1])


def _block_shape(module: nn.Module) -> tuple[int, int]:
    """(groups, n_g): number of blocks and length of the input vector of each."""
    dims = _linear_dims(module)
    if dims is not None:
        return 1, dims[0]
    kh, kw = conv2d_view(module).kernel_size
    return module.groups, module.in_channels // module.groups * kh * kw


def _geometry(module: nn.Module) -> tuple | None:
    """What fixes a layer's input vectors: type and shapes (stride, padding ... of a conv).  A
    Linear's are its inputs alone, whatever its width: q, k and v of grouped-query attention
    (k and v narrower) read the same vectors."""
    dims = _linear_dims(module)
    if dims is not None:  # a Conv1D reads its input as the Linear it equals
        return ("linear", dims[0])
    if isinstance(module, (nn.Conv2d, nn.Conv1d)):
        return ("conv2d" if isinstance(module, nn.Conv2d) else "conv1d", module.in_channels,
                module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.padding_mode)
    return None


class _Moment:
    """Streams ``E[a b^T]`` per block: float64 sums (groups, n, n) and a row count."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.rows = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        prod = a.transpose(1, 2) @ b
        self.total = prod if self.total is None else self.total + prod
        self.rows += a.shape[1]

    def mean(self, name: str, symmetric: bool) -> np.ndarray:
        if self.rows == 0:
            raise QroundError(f"layer {name!r} saw no inputs during calibration (is it called "
                              "by the model's forward?)")
        m = self.total / self.rows
        if symmetric:
            m = 0.5 * (m + m.transpose(1, 2))
        m = m.cpu().numpy()
        return m[0] if m.shape[0] == 1 else m


def _run(batches: Iterable, step: Callable[[Any], None]) -> int:
    """Call ``step(batch)`` for every batch; QroundError when there are none."""
    count = 0
    for batch in _check_batches(batches):
        step(batch)
        count += 1
    if count == 0:
        raise QroundError("calibration data is empty: batches yielded no batch")
    return count


# ---------------------------------------------------------------------------------- H = E[x x^T]
@gathering
def capture_hessians(model: nn.Module, batches: Iterable, layers: LayerFilter = None,
                     forward: ForwardFn | None = None, device=None, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """``H = E[x x^T]`` of each chosen layer over the calibration batches.

    Returns name -> float64 (n, n), or (groups, n_g, n_g) for a grouped conv.  ``forward(model,
    batch)`` runs one batch (default :func:`default_forward`); it runs under ``torch.no_grad()``
    in eval mode.  ``device``: where the sums are accumulated (default: each input's device).
    A forward that draws random numbers draws them from ``seed`` (:func:`own_rng`): the
    caller's generators and the model's buffers are left as they were.
    """
    check_int(seed, "seed", 0, maximum=MAX_SEED)
    with own_rng(seed, model, str(device) if device is not None else "cpu"):
        return _capture_hessians(model, batches, layers, forward, device)


def _capture_hessians(model, batches, layers, forward, device) -> dict[str, np.ndarray]:
    modules = select_layers(model, layers)
    forward = forward or default_forward
    moments = {name: _Moment() for name in modules}

    def hook(name, module, args, out):
        x = _layer_input(name, module, args)
        dev = device if device is not None else x.device
        for rows in _chunks(module, x):
            v = _vectors(module, x[rows], dev)
            moments[name].add(v, v)

    with eval_mode(model), torch.no_grad(), layer_hooks(modules, hook):
        _run(batches, lambda batch: forward(model, batch))
    return {name: moments[name].mean(name, symmetric=True) for name in modules}


# ---------------------------------------------------------------------------------- asymmetric
@dataclass(frozen=True, eq=False)
class AsymmetricStats:
    """Statistics of asymmetric reconstruction ``E||W x - W_hat x_hat||^2`` (AdaRound eq. 25).

    hessian_hat ``E[x_hat x_hat^T]``, cross ``E[x_hat x^T]``, hessian ``E[x x^T]``: each (n, n),
    or (groups, n_g, n_g) for a grouped conv.  Use as
    ``RoundingProblem.from_weight(w, hessian_hat, cross=cross, float_hessian=hessian)``.
    """

    hessian_hat: np.ndarray
    cross: np.ndarray
    hessian: np.ndarray


@gathering
def capture_asymmetric(float_model: nn.Module, quant_model: nn.Module, batches: Iterable,
                       layers: LayerFilter, forward: ForwardFn | None = None,
                       device=None, seed: int = 0) -> dict[str, AsymmetricStats]:
    """Asymmetric statistics of each chosen layer: ``x`` from ``float_model``, ``x_hat`` from
    ``quant_model`` on the same batch (the same module names must exist in both).

    Both models run batch by batch; one batch's inputs of the chosen layers are held between
    the two passes.  Returns name -> :class:`AsymmetricStats`.  Random draws of the forwards
    come from ``seed``, as in :func:`capture_hessians`.
    """
    check_int(seed, "seed", 0, maximum=MAX_SEED)
    with own_rng(seed, (float_model, quant_model),
                 str(device) if device is not None else "cpu"):
        return _capture_asymmetric(float_model, quant_model, batches, layers, forward, device)


def _capture_asymmetric(float_model, quant_model, batches, layers, forward, device
                        ) -> dict[str, AsymmetricStats]:
    float_modules = select_layers(float_model, layers)
    quant_named = dict(quant_model.named_modules())
    quant_modules = {}
    for name, fm in float_modules.items():
        qm = quant_named.get(name)
        if qm is None or _geometry(qm) != _geometry(fm) or \
                tuple(qm.weight.shape) != tuple(fm.weight.shape):
            raise QroundError(f"layer {name!r} of quant_model does not match the float model's "
                              f"{fm}")
        quant_modules[name] = qm
    forward = forward or default_forward
    stats = {name: (_Moment(), _Moment(), _Moment()) for name in float_modules}
    pending: dict[str, list[torch.Tensor]] = {}

    def store(name, module, args, out):
        # a copy: it is read after the float forward, which may change the tensor in place
        # later (h += f(h)) and so rewrite a view of the layer's input
        pending[name].append(_layer_input(name, module, args).clone())

    def pair(name, module, args, out):
        x_hat = _layer_input(name, module, args)
        if not pending[name]:
            raise QroundError(f"layer {name!r} ran more often in quant_model than in float_model")
        x = pending[name].pop(0)
        if x.shape != x_hat.shape:
            raise QroundError(f"layer {name!r}: float input {tuple(x.shape)} and quantised input "
                              f"{tuple(x_hat.shape)} differ in shape")
        dev = device if device is not None else x_hat.device
        h_hat, cross, h = stats[name]
        for rows in _chunks(module, x):
            v, v_hat = _vectors(module, x[rows], dev), _vectors(module, x_hat[rows], dev)
            h_hat.add(v_hat, v_hat)
            cross.add(v_hat, v)
            h.add(v, v)

    def step(batch):
        pending.update({name: [] for name in float_modules})
        with layer_hooks(float_modules, store):
            forward(float_model, batch)
        with layer_hooks(quant_modules, pair):
            forward(quant_model, batch)
        left = [name for name, xs in pending.items() if xs]
        if left:
            raise QroundError(f"layers {left} ran more often in float_model than in quant_model")

    with eval_mode(float_model), eval_mode(quant_model), torch.no_grad():
        _run(batches, step)
    return {name: AsymmetricStats(h_hat.mean(name, True), cross.mean(name, False),
                                  h.mean(name, True))
            for name, (h_hat, cross, h) in stats.items()}


# ---------------------------------------------------------------------------------- Fisher
class _ChannelMoment:
    """Streams per channel ``E[g_c^2 x x^T]``: sums (out, n_g, n_g) float64 and a row count."""

    def __init__(self, module: nn.Module):
        self.groups, _ = _block_shape(module)
        self.out_g = _out_channels(module) // self.groups
        self.total: torch.Tensor | None = None
        self.rows = 0

    def add(self, v: torch.Tensor, g2: torch.Tensor) -> None:
        """v: (groups, rows, n_g) input vectors; g2: (rows, out) squared output gradients."""
        groups, rows, n = v.shape
        if self.total is None:
            self.total = v.new_zeros((groups * self.out_g, n, n))
        # (channels, rows, n) weighted copies of the vectors, a bounded number of channels at once
        per = max(1, _CHUNK_BYTES // max(rows * n * 8, 1))
        for j in range(groups):
            for c0 in range(j * self.out_g, (j + 1) * self.out_g, per):
                c1 = min(c0 + per, (j + 1) * self.out_g)
                weighted = g2[:, c0:c1].T[:, :, None] * v[j][None]
                self.total[c0:c1] += weighted.transpose(1, 2) @ v[j]
        self.rows += rows

    def mean(self, name: str) -> np.ndarray:
        if self.rows == 0:
            raise QroundError(f"layer {name!r} received no gradient during Fisher capture (does "
                              "the loss depend on its output?)")
        m = self.total / self.rows
        return (0.5 * (m + m.transpose(1, 2))).cpu().numpy()


def fisher_bytes(module: nn.Module) -> int:
    """Memory of a layer's per-channel Fisher blocks: ``out * n_g * n_g * 8`` bytes."""
    _, n = _block_shape(module)
    return int(_out_channels(module)) * n * n * 8


def _fisher_error(exc: RuntimeError):
    """Re-raise torch's error of a Fisher pass as a QroundError where it has a known cause."""
    text = str(exc)
    if "inplace operation" in text:
        raise QroundError(
            "Fisher statistics differentiate the model, and its forward changes in place a "
            "tensor the backward needs (e.g. x += f(x) on a normalisation's input, or an "
            "in-place activation of a saved output): write it out of place (x = x + f(x)), or "
            f"use statistics='covariance' ({text[:200]})") from exc
    if "nference tensor" in text:
        raise QroundError(
            "Fisher statistics differentiate the model, and tensors of this forward were made "
            "under torch.inference_mode (the calibration batches, or the model's buffers): "
            f"make them outside it, or use statistics='covariance' ({text[:200]})") from exc
    raise exc


@gathering
def capture_fisher(model: nn.Module, batches: Iterable, loss_fn: Callable[[Any, Any], torch.Tensor],
                   layers: LayerFilter, memory_budget_mb: float = 1024.0,
                   forward: ForwardFn | None = None, device=None, seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """Per-channel Fisher blocks ``H_c = E[g_c^2 x x^T]`` of each chosen layer: (out, n_g, n_g).

    ``g_c = dL/dz_c`` at the position (token / pixel) of ``x``, ``L = loss_fn(output, batch)``
    (a scalar tensor).  Its scale weighs its batch: with a mean-reduced loss, the samples of a
    smaller batch (or of one with fewer label tokens) weigh more, by the square of the factor;
    a sum-reduced loss (``reduction="sum"``, or a mean times its count) weighs every sample
    alike, as ``E`` says.  With batches of one size either gives the same codes.  Each layer's
    blocks must fit ``memory_budget_mb``, checked before any forward.  Each chosen layer reads
    a private copy of its input, so an in-place change of that tensor later in the forward
    (``h += f(h)``) leaves the gradients intact; another in-place change of a tensor the
    backward needs is a QroundError.
    Gradients are taken with ``torch.autograd.grad`` on the chosen weights, so no ``.grad`` of the
    model is written; weights with ``requires_grad=False`` are switched on and restored.  A
    layer called only with empty inputs (an expert no token reached) maps to None.  Random draws
    of the forward come from ``seed``, as in :func:`capture_hessians`.
    """
    check_int(seed, "seed", 0, maximum=MAX_SEED)
    with own_rng(seed, model, str(device) if device is not None else "cpu"):
        return _capture_fisher(model, batches, loss_fn, layers, memory_budget_mb, forward,
                               device)


def _capture_fisher(model, batches, loss_fn, layers, memory_budget_mb, forward, device
                    ) -> dict[str, np.ndarray]:
    """:func:`capture_fisher` in the caller's random state (quantize_model's own)."""
    modules = select_layers(model, layers)
    for name, module in modules.items():
        need = fisher_bytes(module) / 2 ** 20
        if need > memory_budget_mb:
            raise QroundError(f"Fisher blocks of layer {name!r} need {need:.3g} MB "
                              f"(out x n x n float64), over memory_budget_mb={memory_budget_mb}")
    forward = forward or default_forward
    moments = {name: _ChannelMoment(module) for name, module in modules.items()}
    inputs = dict.fromkeys(modules, 0)     # input rows seen per layer

    def private(module, args):
        # the layer saves (for its weight's gradient) and the hook reads a copy of its input,
        # which a later in-place op of the forward (h += f(h)) cannot rewrite
        if args and isinstance(args[0], torch.Tensor):
            return (args[0].clone(), *args[1:])
        return None

    def hook(name, module, args, out):
        x = _layer_input(name, module, args)
        inputs[name] += x.shape[0]
        if x.shape[0] == 0:   # an empty call (an expert no token reached): nothing to add
            return None
        mask = _active_mask(module, args[0], name)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            raise QroundError(f"layer {name!r}: output does not require grad (is the forward "
                              "run under no_grad or inference_mode?)")

        def on_grad(grad, _x=x, _name=name, _module=module, _mask=mask):
            g = grad.detach()
            if not torch.isfinite(g).all():
                raise QroundError(f"layer {_name!r}: non-finite gradient of the loss")
            dev = device if device is not None else g.device
            g2 = _output_rows(_module, g, dev) ** 2
            if _mask is not None:
                g2 = g2[_mask.to(g2.device)]
            per_sample = g2.shape[0] // _x.shape[0]  # positions per sample (1 for a Linear)
            for rows in _chunks(_module, _x):
                v = _vectors(_module, _x[rows], dev)
                start = rows.start * per_sample
                moments[_name].add(v, g2[start:start + v.shape[1]])
        out.register_hook(on_grad)
        # Downstream in-place ops (ReLU(inplace=True)) may rewrite the output and then the hook
        # never fires or sees another tensor's gradient; handing on a copy keeps ``out`` intact.
        return out.clone()

    weights = [m.weight for m in modules.values()]
    flags = [w.requires_grad for w in weights]

    def step(batch):
        try:
            output = forward(model, batch)
        except RuntimeError as exc:
            _fisher_error(exc)
        loss = loss_fn(output, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise QroundError("loss_fn must return a scalar tensor")
        if not torch.isfinite(loss.detach()).all():
            empty = isinstance(output, torch.Tensor) and output.numel() == 0
            raise QroundError(f"loss_fn returned a non-finite loss {float(loss.detach()):g}" + (
                " on an empty output (an empty batch? a mean over no elements is nan)"
                if empty else ""))
        if not loss.requires_grad:
            raise QroundError("the loss does not depend on the chosen layers' weights")
        try:
            torch.autograd.grad(loss, weights, allow_unused=True)
        except RuntimeError as exc:
            _fisher_error(exc)

    inference = [n for n, w in zip(modules, weights) if w.is_inference()]
    if inference:
        raise QroundError(f"the weights of {inference[:3]} are inference tensors (the model was "
                          "built or loaded under torch.inference_mode): Fisher statistics need "
                          "their gradients; build it outside inference_mode, or use "
                          "statistics='covariance'")
    pre = [m.register_forward_pre_hook(private) for m in modules.values()]
    try:
        for w in weights:
            w.requires_grad_(True)
        with eval_mode(model), torch.enable_grad(), layer_hooks(modules, hook):
            _run(batches, step)
    finally:
        for h in pre:
            h.remove()
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    blocks = {name: moments[name].mean(name) if inputs[name] else None for name in modules}
    for name, b in blocks.items():
        if b is not None and not np.any(b):
            warn_gathered("fisher-zero", name, _zero_fisher)
    return blocks


def _zero_fisher(names: list[str]) -> str:
    return (f"the Fisher blocks of {_some(names, 'layer')} are all zero (the loss's gradient at "
            "their outputs is zero on every calibration input): their rounding stays at "
            "nearest, since every choice costs the same there")
