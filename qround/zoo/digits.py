"""Small real CNNs on real data: scikit-learn's 8x8 handwritten digits (1797 images, bundled with
scikit-learn, nothing downloaded), upsampled to 16x16.

Everything is deterministic for a seed and touches no global state: the split uses a
``np.random.Generator``, weights are initialised and batches shuffled with a local
``torch.Generator`` (modules are built on the ``meta`` device so their default initialisation
does not draw from torch's global RNG).  Trained weights may be cached (weights only, never data)
under ``$XDG_CACHE_HOME/qround`` (default ``~/.cache/qround``).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MAX_SEED, QroundError, check_int, check_real
from ._optional import require, torch_device

log = logging.getLogger(__name__)

ARCHS = ("plain", "residual", "deep", "deep-narrow", "mobile")
IMAGE_SIZE = 16
# Fractions of each class that go to calibration and test; the rest is the training set.
CALIB_FRACTION, TEST_FRACTION = 0.1, 0.2
# Bump when the data pipeline, architectures or training recipe change: it keys the weight cache.
# 2: training runs on one torch thread (float sums, and so the weights, depended on the
# caller's thread count; a saved model's float fingerprint then did not match a retrained one).
RECIPE_VERSION = 2


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DigitsData:
    """Fixed stratified split of the digits. Images (N, 1, 16, 16) float32, labels (N,) int64.

    Images are upsampled bilinearly from 8x8 and standardised with the training set's pixel
    ``mean``/``std`` (scalars), so the three splits share one normalisation.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    calib_images: torch.Tensor
    calib_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: float
    std: float
    seed: int


def load_digits_data(seed: int = 0) -> DigitsData:
    """The digits split into train (~70%) / calibration (~10%) / test (~20%), stratified per
    class with ``np.random.default_rng(seed)``."""
    seed = check_int(seed, "seed", 0, maximum=MAX_SEED)
    datasets = require("sklearn.datasets", "scikit-learn")
    raw = datasets.load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797,1,8,8)
    labels = torch.as_tensor(raw.target, dtype=torch.int64)

    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "calib": [], "test": []}
    for c in np.unique(raw.target):
        idx = rng.permutation(np.flatnonzero(raw.target == c))
        n_test, n_calib = round(TEST_FRACTION * idx.size), round(CALIB_FRACTION * idx.size)
        parts["test"].append(idx[:n_test])
        parts["calib"].append(idx[n_test:n_test + n_calib])
        parts["train"].append(idx[n_test + n_calib:])
    # Sorted so a split's order does not depend on the class loop; shuffling is the trainer's job.
    index = {k: torch.as_tensor(np.sort(np.concatenate(v))) for k, v in parts.items()}

    big = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                        align_corners=False)
    mean = float(big[index["train"]].mean())
    std = float(big[index["train"]].std())
    big = (big - mean) / std
    return DigitsData(big[index["train"]], labels[index["train"]],
                      big[index["calib"]], labels[index["calib"]],
                      big[index["test"]], labels[index["test"]], mean, std, seed)


# ----------------------------------------------------------------------------- models
class DigitsCNN(nn.Module):
    """Plain CNN: conv 1->16 (16x16), conv 16->32 s2 (8x8), conv 32->64 s2 (4x4), each 3x3 +
    ReLU, flatten, Linear 1024->10.  Input (N, 1, 16, 16), output logits (N, 10).

    Flattening rather than global pooling keeps where strokes are, which digits need (global
    average pooling cost about two points of test accuracy)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        kw = dict(device="meta")  # real values come from _init_weights with a local generator
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, **kw)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, **kw)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1, **kw)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(64 * 4 * 4, 10, **kw)
        _init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(x.flatten(1))


class ResidualBlock(nn.Module):
    """``relu(x + conv2(relu(conv1(x))))`` with 3x3 convs keeping channels and resolution.

    No BatchNorm on purpose: the block is quantised as it is, with nothing to fold."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, device="meta")
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, device="meta")
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(x + self.conv2(self.relu1(self.conv1(x))))


class ResidualDigitsCNN(nn.Module):
    """Stem conv 1->16 s2 + ReLU (8x8), ``block1`` (16 ch, 8x8), conv ``down`` 16->32 s2 + ReLU
    (4x4), ``block2`` (32 ch, 4x4), flatten, Linear 512->10.  Input (N, 1, 16, 16), logits
    (N, 10).  The stride-2 stem keeps it about as cheap as :class:`DigitsCNN`."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, stride=2, padding=1, device="meta")
        self.relu1 = nn.ReLU()
        self.block1 = ResidualBlock(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1, device="meta")
        self.relu2 = nn.ReLU()
        self.block2 = ResidualBlock(32)
        self.fc = nn.Linear(32 * 4 * 4, 10, device="meta")
        _init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.relu1(self.stem(x)))
        x = self.block2(self.relu2(self.down(x)))
        return self.fc(x.flatten(1))


class DeepResidualDigitsCNN(nn.Module):
    """Deeper residual CNN (``arch="deep"``), for studies along depth (reconstruction
    granularity): stem conv 1->16 s2 + ReLU (8x8), ``block1``, ``block2`` (16 ch, 8x8), conv
    ``down`` 16->32 s2 + ReLU (4x4), ``block3``, ``block4`` (32 ch, 4x4), 1x1 conv ``squeeze``
    32->16 + ReLU, flatten, Linear 256->10.  Input (N, 1, 16, 16), logits (N, 10).
    ``width`` scales every channel count (16 above; ``arch="deep-narrow"`` is width 8).

    Eight blocks or 12 layers along depth; the narrow ``squeeze`` after ``block4`` is a module
    of much smaller capacity than its predecessor, as a projection or bottleneck head is."""

    def __init__(self, seed: int = 0, width: int = 16):
        super().__init__()
        w = check_int(width, "width", 1, maximum=1024)
        self.stem = nn.Conv2d(1, w, 3, stride=2, padding=1, device="meta")
        self.relu1 = nn.ReLU()
        self.block1 = ResidualBlock(w)
        self.block2 = ResidualBlock(w)
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, device="meta")
        self.relu2 = nn.ReLU()
        self.block3 = ResidualBlock(2 * w)
        self.block4 = ResidualBlock(2 * w)
        self.squeeze = nn.Conv2d(2 * w, w, 1, device="meta")
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(w * 4 * 4, 10, device="meta")
        _init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.relu1(self.stem(x))))
        x = self.block4(self.block3(self.relu2(self.down(x))))
        return self.fc(self.relu3(self.squeeze(x)).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 ``expand`` conv (``expand_ratio`` x channels) + BatchNorm +
    ReLU6, 3x3 depthwise ``dw`` conv (``groups`` = its channels, ``stride``) + BatchNorm + ReLU6,
    1x1 ``project`` conv + BatchNorm (a linear bottleneck), and the identity added when the
    stride is 1 and the channels stay.  Convs have no bias (BatchNorm follows each, as in
    MobileNetV2; quantisation rounds the convs and leaves the BatchNorms in float).  Built on
    the ``meta`` device, as :class:`ResidualBlock`: the network that holds it materialises and
    initialises it (``to_empty`` and an initialisation, to use one alone)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int = 3):
        super().__init__()
        hidden = c_in * expand_ratio
        kw = dict(bias=False, device="meta")
        self.expand = nn.Conv2d(c_in, hidden, 1, **kw)
        self.bn1 = nn.BatchNorm2d(hidden, device="meta")
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, **kw)
        self.bn2 = nn.BatchNorm2d(hidden, device="meta")
        self.act2 = nn.ReLU6()
        self.project = nn.Conv2d(hidden, c_out, 1, **kw)
        self.bn3 = nn.BatchNorm2d(c_out, device="meta")
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.expand(x)))
        y = self.bn3(self.project(self.act2(self.bn2(self.dw(y)))))
        return x + y if self.residual else y


class DigitsMobileNet(nn.Module):
    """MobileNetV2-style CNN (``arch="mobile"``): depthwise convs, the classic hard case of
    post-training quantisation.  Stem conv 1->16 (16x16) + BatchNorm + ReLU6; inverted residual
    blocks ``block1`` 16->24 s2 (8x8), ``block2`` 24->24, ``block3`` 24->32 s2 (4x4),
    ``block4`` 32->32 (each :class:`InvertedResidual`, expansion 3); 1x1 ``head`` conv 32->64 +
    BatchNorm + ReLU6; flatten, Linear 1024->10.  Input (N, 1, 16, 16), logits (N, 10)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        kw = dict(device="meta")
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False, **kw)
        self.bn_stem = nn.BatchNorm2d(16, **kw)
        self.act_stem = nn.ReLU6()
        self.block1 = InvertedResidual(16, 24, 2)
        self.block2 = InvertedResidual(24, 24, 1)
        self.block3 = InvertedResidual(24, 32, 2)
        self.block4 = InvertedResidual(32, 32, 1)
        self.head = nn.Conv2d(32, 64, 1, bias=False, **kw)
        self.bn_head = nn.BatchNorm2d(64, **kw)
        self.act_head = nn.ReLU6()
        self.fc = nn.Linear(64 * 4 * 4, 10, **kw)
        _init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_stem(self.bn_stem(self.stem(x)))
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.fc(self.act_head(self.bn_head(self.head(x))).flatten(1))


def _init_weights(model: nn.Module, seed: int) -> None:
    """Materialise ``meta`` parameters on the CPU: He-uniform weights, zero biases, drawn from a
    local generator; BatchNorms start as the identity (weight 1, bias 0, running mean 0,
    variance 1).  The last conv of each residual block starts at a quarter scale so the
    blocks begin close to the identity (keeps the residual net trainable without BatchNorm)."""
    seed = check_int(seed, "seed", 0, maximum=MAX_SEED)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.reset_parameters()   # draws nothing: ones, zeros and the running stats
            if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                gain = 1.0 if isinstance(mod, nn.Linear) else math.sqrt(2.0)
                fan_in = mod.weight[0].numel()
                bound = gain * math.sqrt(3.0 / fan_in)
                if name.endswith("conv2") and "block" in name:
                    bound *= 0.25
                mod.weight.uniform_(-bound, bound, generator=gen)
                if mod.bias is not None:
                    mod.bias.zero_()


class DigitsAutoEncoder(nn.Module):
    """Conv autoencoder of the 16x16 digits, with a decoder of transposed convolutions:
    conv 1->16 s2 (8x8), conv 16->32 s2 (4x4), each 3x3 + ReLU; ConvTranspose2d 32->16 (4x4
    kernel, stride 2, padding 1: 8x8) + ReLU, ConvTranspose2d 16->1 (16x16).  Input and output
    (N, 1, 16, 16); see :func:`train_digits_autoencoder`."""

    def __init__(self, seed: int = 0):
        super().__init__()
        kw = dict(device="meta")  # real values come from _init_weights with a local generator
        self.encoder = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, **kw), nn.ReLU(),
                                     nn.Conv2d(16, 32, 3, 2, 1, **kw), nn.ReLU())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(32, 16, 4, 2, 1, **kw), nn.ReLU(),
                                     nn.ConvTranspose2d(16, 1, 4, 2, 1, **kw))
        _init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def reconstruction_error(model: nn.Module, images: torch.Tensor) -> float:
    """Mean squared error of ``model(images)`` against ``images`` (no gradients)."""
    with torch.no_grad():
        return float(((model(images) - images) ** 2).mean())


# ----------------------------------------------------------------------------- training
def train_digits_autoencoder(seed: int = 0, steps: int = 600, lr: float = 3e-3,
                             batch_size: int = 64) -> tuple[nn.Module, DigitsData]:
    """Train :class:`DigitsAutoEncoder` to reproduce the training split's images (Adam on the
    mean squared error, ``steps`` mini-batches drawn with replacement).  Initialisation and
    batches come from ``seed``; training runs on one torch thread (the caller's count is
    restored after), so the weights do not depend on it.  About 3 s on a CPU; not cached.
    Returns the model in eval mode and the data."""
    seed = check_int(seed, "seed", 0, maximum=MAX_SEED)
    steps = check_int(steps, "steps", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    lr = check_real(lr, "lr", 0, lo_open=True)
    data = load_digits_data()
    model = DigitsAutoEncoder(seed)
    gen = torch.Generator().manual_seed((seed + 1_000_003) % 2 ** 64)
    x = data.train_images
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            batch = x[torch.randint(len(x), (batch_size,), generator=gen)]
            loss = F.mse_loss(model(batch), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), data


def train_digits_cnn(arch: str = "plain", seed: int = 0, epochs: int = 20, device: str = "cpu",
                     cache: bool = True, batch_size: int = 64, lr: float = 3e-3
                     ) -> tuple[nn.Module, DigitsData]:
    """Train ``DigitsCNN`` (``arch="plain"``), ``ResidualDigitsCNN`` (``"residual"``),
    ``DeepResidualDigitsCNN`` (``"deep"``, or ``"deep-narrow"`` at width 8) or
    ``DigitsMobileNet`` (``"mobile"``) on the training split
    of ``load_digits_data()`` (split seed 0, fixed for every training seed).

    Adam with a cosine learning-rate decay, small random affine warps of the training images;
    initialisation, batch order and warps come from ``seed``.  Training runs on one torch
    thread (the caller's thread count is restored after), so the weights do not depend on it.
    With ``cache=True`` the trained weights are read from / written to the weight cache, keyed by
    arch, seed, epochs, batch size, lr, device type and the recipe version.  Returns the model
    in eval mode on ``device`` and the data (on the CPU).
    """
    if arch not in ARCHS:
        raise QroundError(f"arch must be one of {ARCHS}, got {arch!r}")
    seed = check_int(seed, "seed", 0, maximum=MAX_SEED)
    epochs = check_int(epochs, "epochs", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    lr = check_real(lr, "lr", 0, lo_open=True)
    device = torch_device(device)

    data = load_digits_data()
    model = {"plain": DigitsCNN, "residual": ResidualDigitsCNN, "deep": DeepResidualDigitsCNN,
             "deep-narrow": partial(DeepResidualDigitsCNN, width=8),
             "mobile": DigitsMobileNet}[arch](seed)
    path = _cache_path(arch, seed, epochs, batch_size, lr, device) if cache else None
    if path is not None and _load_cached(model, path):
        return model.to(device).eval(), data

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the same weights whatever the caller's thread count
    try:
        _fit(model.to(device), data, seed, epochs, batch_size, lr, device)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    if log.isEnabledFor(logging.INFO):
        log.info("trained %s digits CNN (seed %d, %d epochs) in %.2f s, test accuracy %.4f", arch,
                 seed, epochs, time.perf_counter() - start,
                 accuracy(model, data.test_images, data.test_labels))
    if path is not None:
        _save_cached(model, path)
    return model, data


def _fit(model: nn.Module, data: DigitsData, seed: int, epochs: int, batch_size: int, lr: float,
         device: torch.device) -> None:
    # A different stream from the initialisation's, still a function of the seed alone.  It lives
    # on the CPU so that the batch order and augmentation do not depend on the device.
    gen = torch.Generator().manual_seed((seed + 1_000_003) % 2 ** 64)   # torch's range
    x, y = data.train_images, data.train_labels
    background = -data.mean / data.std  # value of an empty pixel after standardisation
    steps_per_epoch = math.ceil(len(y) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            images = _augment(x[idx], gen, background).to(device)
            loss = F.cross_entropy(model(images), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def _augment(images: torch.Tensor, gen: torch.Generator, background: float,
             degrees: float = 10.0, shift: float = 0.15, zoom: float = 0.1) -> torch.Tensor:
    """Random small affine warps (N, 1, 16, 16) -> same: rotation +-``degrees``, scale
    1 +- ``zoom``, translation +-``shift`` of the half-width.  Without them the CNNs overfit the
    ~1260 training digits and stay near 95-96% test accuracy."""
    n = images.shape[0]

    def uniform() -> torch.Tensor:
        return torch.rand(n, generator=gen) * 2 - 1

    angle = uniform() * math.radians(degrees)
    scale = 1 + uniform() * zoom
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, uniform() * shift], 1),
                         torch.stack([sin, cos, uniform() * shift], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with zeros: shift so that the padding is an empty pixel
    return F.grid_sample(images - background, grid, align_corners=False) + background


def input_placement(model: nn.Module) -> dict:
    """``.to()`` arguments that put images where the model's first layer is, in its dtype: the
    weight of its first Linear/Conv2d (a quantised layer's wrapper keeps float32 rounding
    variables of its own beside a float64 or half weight), else its first parameter."""
    first = next((m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))),
                 None)
    p = first if first is not None else next(model.parameters())
    return dict(device=p.device, dtype=p.dtype) if p.is_floating_point() else dict(device=p.device)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on images (N, C, H, W) with labels (N,), in [0, 1].

    Runs in eval mode and puts every module back in the mode it was in."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise QroundError(f"images must be a 4-d tensor (N, C, H, W), got "
                          f"{getattr(images, 'shape', type(images).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1]:
        raise QroundError(f"labels must be a tensor of shape ({images.shape[0]},), got "
                          f"{getattr(labels, 'shape', type(labels).__name__)}")
    if len(labels) == 0:
        raise QroundError("images is empty: accuracy of nothing is undefined")
    batch_size = check_int(batch_size, "batch_size", 1)
    if not torch.isfinite(images).all():
        raise QroundError("images contain NaN or Inf")
    from ..calibrate import eval_mode

    # a float64 or half model gets its inputs in its own dtype
    to = input_placement(model)
    correct = 0
    with eval_mode(model):
        for i in range(0, len(labels), batch_size):
            logits = model(images[i:i + batch_size].to(**to))
            if not torch.isfinite(logits).all():
                raise QroundError(f"the model's outputs on images {i}..{i + len(logits) - 1} "
                                  f"contain NaN or Inf: its accuracy would be meaningless")
            correct += int((logits.argmax(dim=1).cpu() == labels[i:i + batch_size].cpu()).sum())
    return correct / len(labels)


# ----------------------------------------------------------------------------- weight cache
def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/qround`` (default ``~/.cache/qround``); not created here."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qround"


def _cache_path(arch: str, seed: int, epochs: int, batch_size: int, lr: float,
                device: torch.device) -> Path:
    # The device type is part of the key: CPU and GPU kernels round differently.
    # lr in full (repr): 6 significant digits let close learning rates share a file
    name = (f"digits-{arch}-seed{seed}-epochs{epochs}-bs{batch_size}-lr{float(lr)!r}-"
            f"{device.type}-v{RECIPE_VERSION}")
    return cache_dir() / "digits" / f"{name}.safetensors"


def _load_cached(model: nn.Module, path: Path) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        own = model.state_dict()
        # checked before anything is copied: load_state_dict copies the matching tensors of a
        # stale file before it raises, and training would then start from those
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise ValueError("its tensors do not match the model's")
        # a header that reads but data that were damaged since: the digest says so (files
        # written before the digest existed are checked for finite values only)
        if "blake2b" in meta and meta["blake2b"] != _state_digest(state):
            raise ValueError("its data do not match the digest written with them")
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in state.values()):
            raise ValueError("it holds NaN or Inf")
        model.load_state_dict(state)
    except Exception as exc:  # a corrupt or stale file is retrained over, not fatal
        log.warning("ignoring unreadable cached weights %s: %s", path, exc)
        return False
    log.info("loaded cached digits weights from %s", path)
    return True


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    """BLAKE2b of the names, dtypes, shapes and bytes of ``state``, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_cached(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target then rename, so a reader never sees a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        os.close(fd)
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, tmp, metadata={"blake2b": _state_digest(state)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:  # a read-only home must not break training
        log.warning("could not cache digits weights at %s: %s", path, exc)
