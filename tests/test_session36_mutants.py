"""Tests that kill the survivors of helper-169's mutation testing of session 36's changes."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from qround.errors import QroundError
from qround.grid import GridSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_layer_stats_cross_target_is_c_times_w_for_a_non_symmetric_cross():
    """LayerStats.from_module scores mse-output scales on the target r = C w (w @ C^T), the
    one RoundingProblem.from_weight builds; a clearly non-symmetric C tells w @ C from
    w @ C^T (the existing test's C = E[x_hat x^T] is nearly symmetric)."""
    import torch

    from qround.problems.io import LayerStats
    from qround.problems.rounding import RoundingProblem

    rng = np.random.default_rng(7)
    n, m = 12, 16
    x = rng.normal(size=(400, n))
    xh = x @ (np.eye(n) + 0.6 * np.triu(rng.normal(size=(n, n)), 1))   # skewed quantised input
    hh, c = xh.T @ xh / len(x), xh.T @ x / len(x)
    assert np.abs(c - c.T).max() > 0.3
    torch.manual_seed(0)
    layer = torch.nn.Linear(n, m)
    spec = GridSpec(bits=2, scale_method="mse-output", shrink_steps=40, min_shrink=0.2)
    w = layer.weight.detach().double().numpy()
    want = RoundingProblem.from_weight(w, hh, spec, cross=c).grid.scale
    # the two targets lead to different scales here, or the test could not tell them apart
    from qround.grid import fit_grid
    assert not np.allclose(fit_grid(w, spec, hessian=hh, target=w @ c).scale, want)
    stats = LayerStats.from_module(layer, hh, spec, cross=c)
    np.testing.assert_allclose(stats.scale, want, rtol=1e-12)


def test_evaluate_seed_message_names_the_files_own_seed(monkeypatch):
    """The seed in the refusal is the file's (its metadata's config.seed), not a default 0."""
    from qround import cli

    class FakeExport:
        @staticmethod
        def read_metadata(path):
            return {"config": {"seed": 3}, "source": "abc"}

        @staticmethod
        def load(model, path, check_source=True):
            raise QroundError("f.safetensors was made from another float model")

    args = argparse.Namespace(model="digits-cnn", seed=0, quantized="f.safetensors")
    with pytest.raises(QroundError) as info:
        cli._load_onto_digits(FakeExport, object(), args, True)
    msg = str(info.value)
    assert "trained with seed 3" in msg and "--seed 0 trains another" in msg


def test_summary_of_a_negative_stride_and_a_read_only_view():
    """prefix_cache._summary fingerprints a reversed (negative-stride) view, which torch cannot
    share, and a read-only broadcast view, like their contiguous copies."""
    from qround.prefix_cache import _summary

    x = np.arange(12.0).reshape(3, 4)
    rev = x[::-1, ::-1]
    assert _summary(rev) == _summary(rev.copy())
    ro = np.broadcast_to(np.arange(4.0), (3, 4))
    assert not ro.flags.writeable
    assert _summary(ro) == _summary(ro.copy())
    frozen = x.copy()
    frozen.flags.writeable = False
    assert _summary(frozen) == _summary(x)
    assert not frozen.flags.writeable   # the user's array stays as it was


def test_trained_nothing_warning_only_when_no_unit_trained(caplog, monkeypatch):
    """One unit without steps (here: its training skipped) among trained ones is no 'trained
    nothing' case: the warning needs every unit at 0 iterations."""
    from qround import reconstruct as rec
    from qround.activations import insert_act_quantizers

    from .tiny_models import BATCHES, TinyResNet

    real, calls = rec._train_block, []

    def first_untrained(*args, **kwargs):
        calls.append(1)
        return 0 if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(rec, "_train_block", first_untrained)
    net = TinyResNet()
    q = insert_act_quantizers(net, None, 3, borders="quadratic", calib_batches=BATCHES,
                              weights=GridSpec(bits=2, symmetric=False))
    cfg = rec.ReconstructConfig(iterations=4, batch_size=8, seed=3)
    with caplog.at_level("WARNING", logger="qround"):
        res = rec.reconstruct(net, q, BATCHES, config=cfg)
    its = [b.iterations for b in res.blocks]
    assert its[0] == 0 and all(i > 0 for i in its[1:]), its
    assert "trained nothing" not in caplog.text



def _one_flip(ties, seed):
    import dimod

    from qround.solvers.sampler import QroundSampler

    # eight independent variables of bias -1: from all zeros every flip ties at delta -1
    bqm = dimod.BinaryQuadraticModel({i: -1.0 for i in range(8)}, {}, 0.0, "BINARY")
    kw = {} if ties is None else {"ties": ties}
    res = QroundSampler("tabu").sample(bqm, initial_states=np.zeros((1, 8), int), num_reads=1,
                                       seed=seed, restarts=0, max_iter=1, descent=False, **kw)
    return tuple(int(v) for v in res.record.sample[0])


def test_tabu_ties_first_takes_the_lowest_index_and_random_varies():
    first = {_one_flip("first", seed) for seed in range(6)}
    assert first == {(1, 0, 0, 0, 0, 0, 0, 0)}
    rand = [_one_flip("random", seed) for seed in range(6)]
    assert all(sum(r) == 1 for r in rand)
    assert len(set(rand)) >= 3
    assert [_one_flip(None, seed) for seed in range(6)] == rand   # the sampler's default


def test_tabu_warns_on_a_real_sized_sparse_bqm_without_patched_threshold():
    """Without monkeypatching SPARSE_TABU_WARN_BYTES: a 6000-variable chain (a 0.27 GiB dense
    matrix) warns.  The warning turned into an error stops the call before the dense matrix is
    built."""
    import warnings

    import dimod

    from qround.solvers.sampler import QroundSampler

    n = 6000
    bqm = dimod.BinaryQuadraticModel({i: 1.0 for i in range(n)},
                                     {(i, i + 1): -1.0 for i in range(n - 1)}, 0.0, "BINARY")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="works on its couplings"):
            QroundSampler("tabu").sample(bqm, num_reads=1, seed=0, restarts=0, max_iter=1)


def _picks(delta, tabu_until, it, e=0.0, best_e=0.0, draws=40):
    from qround.solvers._kernels import _pick_random_tie

    out = []
    for s in range(draws):
        state = np.array([s * 7919 + 1], dtype=np.uint64)
        out.append(_pick_random_tie(np.asarray(delta, float), np.asarray(tabu_until, np.int64),
                                    it, e, best_e, state))
    return out


def test_pick_random_tie_none_allowed_is_minus_one():
    """Only fixed variables (delta +inf): no pick, (-1, inf), as the docstring says."""
    for pick, d in _picks([np.inf, np.inf, np.inf], [0, 0, 0], 5):
        assert pick == -1 and d == np.inf


def test_pick_random_tie_never_takes_a_tabu_tie():
    """A tabu flip tied with the allowed lowest delta (and no new best) is not taken."""
    picks = {p for p, d in _picks([0.0, 0.0, 0.0, 0.0], [10, 0, 10, 10], 5)}
    assert picks == {1}
    # aspiration: a tabu flip that gives a new best is allowed, and ties with the others
    picks = {p for p, d in _picks([-1.0, -1.0, -1.0], [10, 0, 10], 5, e=0.0, best_e=0.5)}
    assert picks == {0, 1, 2}


def test_pick_random_tie_spreads_over_the_ties():
    picks = [p for p, d in _picks([1.0, 0.0, 0.0, 2.0, 0.0, 0.0], [0] * 6, 5, draws=200)]
    counts = np.bincount(picks, minlength=6)
    assert counts[0] == counts[3] == 0
    assert all(c > 25 for c in counts[[1, 2, 4, 5]]), counts


def test_layer_stats_from_module_refuses_cross_with_a_per_channel_hessian_at_once():
    """It fitted the grid and stored the file's arrays; the refusal came only at .problem()
    (helper-169)."""
    import torch

    from qround.problems.io import LayerStats

    layer = torch.nn.Linear(4, 3)
    with pytest.raises(QroundError, match="needs a shared \\(n, n\\) hessian"):
        LayerStats.from_module(layer, np.stack([np.eye(4)] * 3), GridSpec(bits=3),
                               cross=np.eye(4))
