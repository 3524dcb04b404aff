"""Shared fixtures: small problems with the shape of real layers (correlated inputs, outliers)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qround import GridSpec, RoundingProblem


def correlated_hessian(n: int, rng: np.random.Generator, rows: int = 256,
                       outliers: int = 1) -> np.ndarray:
    """E[x x^T] of heavy-tailed correlated features with a few outlier dimensions, like
    transformer activations."""
    mix = rng.normal(size=(n, n)) / np.sqrt(n) + np.eye(n)
    x = rng.standard_t(df=4, size=(rows, n)) @ mix
    x[:, :outliers] *= 8.0
    return x.T @ x / rows


def make_problem(m: int = 6, n: int = 10, bits: int = 3, seed: int = 0, symmetric: bool = True,
                 group_size=None, per_channel: bool = False, clip_some: bool = True):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(m, n))
    if clip_some:  # a few large weights so that the mse grid clips them (fixed variables)
        w[0, 0] = 6.0
        w[-1, -1] = -6.0
    if per_channel:
        h = np.stack([correlated_hessian(n, rng, rows=64) for _ in range(m)])
    else:
        h = correlated_hessian(n, rng)
    spec = GridSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    return RoundingProblem.from_weight(w, h, spec, name=f"toy{seed}")


@pytest.fixture
def problem():
    return make_problem()


@pytest.fixture(params=["shared", "per-channel", "asymmetric-grid"])
def small_problem(request):
    if request.param == "shared":
        return make_problem(m=5, n=9, seed=1)
    if request.param == "per-channel":
        return make_problem(m=4, n=8, seed=2, per_channel=True)
    return make_problem(m=4, n=8, seed=3, symmetric=False, bits=2)


@pytest.fixture
def loss_layouts(monkeypatch):
    """The layouts reconstruction's loss is called with, by target rank: {ndim: {channels_first
    values}} (``qround.reconstruct._rec_loss`` spied on for one test)."""
    import qround.reconstruct as rec
    seen: dict[int, set] = {}
    real = rec._rec_loss

    def spy(out, target, mask=None, channels_first=None):
        seen.setdefault(out.dim(), set()).add(channels_first)
        return real(out, target, mask, channels_first)

    monkeypatch.setattr(rec, "_rec_loss", spy)
    return seen


@pytest.fixture(scope="module")
def one_torch_thread():
    """The test machines are small and shared: one intra-op thread for a module's tests,
    the caller's count restored afterwards (``pytestmark = usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
