"""The capture cache (qround.prefix_cache): finished modules replayed in later capture passes
give the same statistics, hence the same codes, as running every pass whole."""
from __future__ import annotations

import logging
import types
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qround.activations import QuantizedLayer
from qround.errors import QroundError
from qround.pipeline import QuantConfig, quantize_model
from qround.prefix_cache import PrefixCache, trace_spans

from .tiny_models import BATCHES, KwargsNet, TinyResNet, gen


RUNS: dict[int, int] = {}


class Counted(nn.Module):
    """Counts how often its forward really runs (hooks would also fire on a replay), outside
    the module: a change of its own attributes would keep it from being replayed."""

    def __init__(self, module):
        super().__init__()
        self.inner = module

    def forward(self, x):
        RUNS[id(self)] = RUNS.get(id(self), 0) + 1
        return self.inner(x)


class InPlaceNet(nn.Module):
    """Modifies a module's output in place, and has a block returning a non-tensor object."""

    class Odd:
        def __init__(self, t):
            self.t = t

    class OddBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return InPlaceNet.Odd(torch.tanh(self.fc(x)))

    def __init__(self):
        super().__init__()
        self.first = Counted(nn.Sequential(nn.Linear(6, 6), nn.ReLU()))
        self.odd = self.OddBlock()
        self.second = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.head = nn.Linear(6, 3)
        g = gen(7)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)

    def forward(self, x):
        h = self.first(x)
        h += 1.0                      # in place, on what `first` returned
        h = self.odd(h).t
        return self.head(self.second(h))


def codes_and_costs(model, batches, **kw):
    q = quantize_model(model, batches, QuantConfig(wbits=3, solver="greedy", progress=False, **kw))
    return {n: w.codes for n, w in q.layers.items()}, np.array([r.cost for r in q.report])


def assert_same(a, b):
    assert a[0].keys() == b[0].keys()
    for name in a[0]:
        np.testing.assert_array_equal(a[0][name], b[0][name], err_msg=name)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12)


KB = [{"x": torch.randn(4, 3, 5, generator=gen(i)), "mask": torch.ones(4, 3)} for i in range(3)]
XB = [torch.randn(8, 6, generator=gen(10 + i)) for i in range(3)]


@pytest.mark.parametrize("inputs", ["quantized", "float", "asymmetric"])
@pytest.mark.parametrize("make, batches", [(TinyResNet, BATCHES), (lambda: KwargsNet(3), KB),
                                           (InPlaceNet, XB)])
def test_cache_gives_the_same_codes(make, batches, inputs):
    off = codes_and_costs(make(), batches, inputs=inputs, capture_cache_mb=0)
    on = codes_and_costs(make(), batches, inputs=inputs)
    assert_same(off, on)


def test_cache_skips_finished_modules_and_restores_forward():
    runs = {}
    for mb in (0, 1024):
        RUNS.clear()
        q = quantize_model(InPlaceNet(), XB, QuantConfig(wbits=3, solver="greedy", progress=False,
                                                         capture_cache_mb=mb))
        runs[mb] = RUNS.get(id(q.model.first), 0)
        assert all("forward" not in m.__dict__ for m in q.model.modules())  # nothing patched
    n = len(XB)
    # the plan's trace (1 batch), then 4 capture passes (first's Linear, odd.fc, second's
    # Linear, head) over every batch, each running `first`
    assert runs[0] == 1 + 4 * n
    # with the cache (the spans come from the same traced batch): `first`'s own pass and the
    # pass that records its output; the last two passes replay it
    assert runs[1024] == 1 + 2 * n


class Reshuffled:
    """The same batches in another order on every pass (as a shuffling DataLoader)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        k = self.passes % len(self.batches)
        return iter(self.batches[k:] + self.batches[:k])


def test_batches_in_another_order_switch_the_cache_off(caplog):
    off = codes_and_costs(TinyResNet(), Reshuffled(BATCHES + [BATCHES[0] * 0.5]),
                          capture_cache_mb=0)
    with caplog.at_level(logging.WARNING, logger="qround.prefix_cache"):
        on = codes_and_costs(TinyResNet(), Reshuffled(BATCHES + [BATCHES[0] * 0.5]))
    assert "capture cache switched off" in caplog.text
    for name in off[0]:  # sums in another order: equal up to float rounding
        np.testing.assert_array_equal(off[0][name], on[0][name])
    np.testing.assert_allclose(off[1], on[1], rtol=1e-9)


def test_budget_bounds_the_records():
    net = KwargsNet(3)
    with torch.no_grad():
        spans, starts = trace_spans(net, lambda: net(**KB[0]))
    assert {"layer.0", "layer.1", "layer.2"} <= spans.keys()
    last = starts["layer.2.fc1"]
    tiny = PrefixCache(net, spans, budget=1)
    big = PrefixCache(net, spans, budget=2 ** 20)
    for cache in (tiny, big):
        for _ in range(2):  # the first pass records, the second replays
            cache.prepare(last)
            for j, batch in enumerate(KB):
                with cache.batch(j, batch), torch.no_grad():
                    net(**batch)
            cache.finish()
    assert tiny.ready == {} and tiny.size == 0
    assert set(big.ready) == {"layer.0", "layer.1"} and 0 < big.size <= 2 ** 20


def test_bad_cache_budget():
    with pytest.raises(QroundError, match="capture_cache_mb"):
        QuantConfig(capture_cache_mb=-1)


class TiedNet(nn.Module):
    """An early module that reads the weight of a later quantised layer (tied weights)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.early = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.last = nn.Linear(6, 6)
        self.late = nn.Linear(6, 3)
        self.early[0].weight = self.last.weight        # tied: `last` is quantised after `early`
        g = gen(3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)

    def forward(self, x):
        h = self.early(x)
        return self.late(self.last(self.mid(h)) + h)


def test_modules_tied_to_a_later_layer_are_not_cached():
    net = TiedNet()
    with torch.no_grad():
        spans, starts = trace_spans(net, lambda: net(XB[0]))
    cache = PrefixCache(net, spans, 2 ** 20, ["mid.0", "last", "late"], starts)
    assert cache.tied == [(starts["early.0"], starts["last"])]

    def one_pass(before):
        cache.prepare(before)
        recording = set(cache.recording)
        for j, batch in enumerate(XB):
            with cache.batch(j, batch), torch.no_grad():
                net(batch)
        cache.finish()
        return recording

    assert one_pass(starts["last"]) == {"early", "mid"}   # taken while `last` is float
    assert set(cache.ready) == {"early", "mid"}
    with torch.no_grad():
        net.last.weight.mul_(0.5)                          # `last` written back
    # both records saw the tied weight before the write-back: dropped and taken again
    assert one_pass(starts["late"]) == {"early", "mid", "last"}
    # the layers must be quantisable in any grouping: `early.0` and `last` share a weight, so
    # quantise only the others and compare with and without the cache
    for inputs in ("quantized", "asymmetric"):
        kw = dict(inputs=inputs, layers=r"^(mid\.0|last|late)$")
        assert_same(codes_and_costs(TiedNet(), XB, capture_cache_mb=0, **kw),
                    codes_and_costs(TiedNet(), XB, **kw))


class InPlaceInputNet(nn.Module):
    """An inplace activation whose input the caller reads again (as a residual)."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        g = gen(5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)

    def forward(self, x):
        h = self.a(x)
        g = self.act(h)                      # changes h too
        return self.head(self.b(g) - h)      # reads h again


class Notes:
    def __init__(self):
        self.items = []


class Writer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, notes):
        y = self.fc(x)
        notes.items.append(y.abs().mean())   # a side effect a later module reads
        return y


class NotesNet(nn.Module):
    """A module that updates an object passed to it (as a key-value cache would)."""

    def __init__(self):
        super().__init__()
        self.w, self.mid, self.head = Writer(), nn.Linear(6, 6), nn.Linear(6, 3)
        g = gen(6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)

    def forward(self, x):
        notes = Notes()
        h = self.w(x, notes)
        return self.head(torch.relu(self.mid(h)) * notes.items[0])


@pytest.mark.parametrize("make, skipped", [(InPlaceInputNet, "act"), (NotesNet, "w")])
def test_modules_with_side_effects_run_every_pass(make, skipped, caplog):
    """Replaying a module skips its side effects, so a module that changes an input in place or
    takes an object it may update is never cached; the codes stay those of a run without."""
    with caplog.at_level(logging.DEBUG, logger="qround.prefix_cache"):
        on = codes_and_costs(make(), XB)
    assert f"capture cache: {skipped} " in caplog.text
    assert_same(codes_and_costs(make(), XB, capture_cache_mb=0), on)


# ------------------------------------------------- cases from an adversarial review of the cache
def _filled(module, seed):
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


X8 = [torch.randn(4, 8, generator=gen(20 + i)) for i in range(3)]


class UserHookNet(nn.Module):
    """A user hook that changes a module's output (it must act once, not on a record of itself)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 4)
        _filled(self, 1)
        self.a.register_forward_hook(lambda m, i, o: o * 2 + 1)

    def forward(self, x):
        return self.c(torch.tanh(self.b(self.a(x))))


class ChildHookNet(nn.Module):
    """A hook on a child stores its output for a later module (fastai's U-Net, FPN taps)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.dec, self.head = nn.Linear(16, 8), nn.Linear(8, 4)
        _filled(self, 2)
        self.enc[1].register_forward_hook(lambda m, i, o: setattr(m, "tapped", o))

    def forward(self, x):
        h = self.enc(x)
        return self.head(torch.relu(self.dec(torch.cat([h, self.enc[1].tapped], -1))))


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.last = nn.Linear(8, 8), None

    def forward(self, x):
        h = self.fc(x)
        self.last = torch.sigmoid(h)                    # read by the parent later
        return h


class GateNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.mid, self.head = Gate(), nn.Linear(8, 8), nn.Linear(8, 4)
        _filled(self, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.gate(x))) * self.gate.last)


class AliasNet(nn.Module):
    """Eval-mode dropout returns its input; the caller edits the result in place."""

    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b, self.c = nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 8), \
            nn.Linear(8, 4)
        _filled(self, 9)

    def forward(self, x):
        h = self.a(x)
        y = self.drop(h)
        y.mul_(0.5)                                     # halves h as well
        return self.c(torch.relu(self.b(y)) + h)


class ForceNet(nn.Module):
    """The forward differentiates itself (energy -> forces)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mid, self.energy, self.out = (nn.Linear(8, 8), nn.Linear(8, 8),
                                                       nn.Linear(8, 1), nn.Linear(8, 4))
        _filled(self, 7)

    def forward(self, pos):
        with torch.enable_grad():
            pos = pos.detach().requires_grad_(True)
            e = self.energy(torch.tanh(self.mid(torch.tanh(self.embed(pos))))).sum()
            force = -torch.autograd.grad(e, pos)[0]
        return self.out(force)


class DirectForwardNet(nn.Module):
    """A module called once through __call__ and once more through .forward."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b, self.c = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), \
            nn.Linear(8, 4)
        _filled(self, 10)

    def forward(self, x):
        h = self.norm(self.a(x))
        return self.c(self.norm.forward(self.b(h)) + h)


class LoopNet(nn.Module):
    """A refinement module run a data-dependent number of times (1, 2, 0 over the batches)."""

    def __init__(self):
        super().__init__()
        self.a, self.ref = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 4)
        _filled(self, 11)

    def forward(self, x):
        h = torch.relu(self.a(x))
        for _ in range(int(x[0, 0] > 0) + int(x[0, 1] > 0)):
            h = self.ref(h)
        return self.c(torch.relu(self.b(h)))


LOOP_XB = [x.clone() for x in X8]
for _x, (_u, _v) in zip(LOOP_XB, [(1, -1), (1, 1), (-1, -1)]):
    _x[0, 0], _x[0, 1] = _u, _v


class TimeNet(nn.Module):
    """Diffusion-style: the forward function draws t, a module embeds it."""

    def __init__(self):
        super().__init__()
        self.temb = nn.Sequential(nn.Linear(1, 8), nn.SiLU(), nn.Linear(8, 8))
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        _filled(self, 13)

    def forward(self, x, t):
        e = self.temb(t[:, None])
        return self.c(torch.relu(self.b(torch.relu(self.a(x) + e)) + e))


def noisy_forward(model, x0):
    t = torch.rand(len(x0), generator=NOISE)
    return model(x0 + t[:, None] * torch.randn(x0.shape, generator=NOISE), t)


NOISE = torch.Generator()


def scripted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
        gelu = torch.jit.script(nn.GELU())
    return _filled(nn.Sequential(nn.Linear(8, 8), gelu, nn.Linear(8, 8), nn.ReLU(),
                                 nn.Linear(8, 4)), 14)


@pytest.mark.parametrize("make, data, inputs", [
    (UserHookNet, X8, "quantized"), (ChildHookNet, X8, "quantized"), (GateNet, X8, "quantized"),
    (AliasNet, X8, "quantized"), (AliasNet, X8, "asymmetric"), (ForceNet, X8, "quantized"),
    (DirectForwardNet, X8, "quantized"), (LoopNet, LOOP_XB, "asymmetric"),
    (scripted, X8, "quantized"),
])
def test_reviewed_cases_give_the_same_codes(make, data, inputs):
    assert_same(codes_and_costs(make(), data, inputs=inputs, capture_cache_mb=0),
                codes_and_costs(make(), data, inputs=inputs))


def test_randomness_before_a_module_switches_the_cache_off(caplog):
    runs = []
    for mb in (0, 1024):
        NOISE.manual_seed(0)
        with caplog.at_level(logging.WARNING, logger="qround.prefix_cache"):
            q = quantize_model(TimeNet(), X8, QuantConfig(wbits=3, solver="greedy", progress=False,
                                                          capture_cache_mb=mb),
                               forward=noisy_forward)
        runs.append(({n: w.codes for n, w in q.layers.items()}, np.array([r.cost for r in q.report])))
    assert "the inputs of 'temb" in caplog.text
    assert_same(*runs)


def test_rows_reordered_inside_a_batch_are_seen(caplog):
    x = torch.randn(16, 8, generator=gen(30))
    perm = torch.randperm(16, generator=gen(31))
    net = _filled(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), 3)

    class Rows:
        """One batch whose rows come in another order on every pass."""
        passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([x if self.passes % 2 else x[perm]])

    with caplog.at_level(logging.WARNING, logger="qround.prefix_cache"):
        codes_and_costs(net, Rows(), inputs="asymmetric")
    assert "calibration batch 0 differs" in caplog.text


# ------------------------------------------------------------------- block reconstruction
@pytest.mark.parametrize("granularity, k, abits, make, batches", [
    ("layer", None, 3, TinyResNet, BATCHES), ("block", None, 3, TinyResNet, BATCHES),
    ("loss", 1, 3, TinyResNet, BATCHES), ("layer", None, 4, lambda: KwargsNet(3), KB),
    ("block", None, None, lambda: KwargsNet(3), KB),
])
def test_reconstruction_captures_give_the_same_result(granularity, k, abits, make, batches):
    """Block reconstruction replays finished units in its capture passes: the same codes,
    activation steps and losses as running every pass whole."""
    from qround.reconstruct import ReconstructConfig

    out = []
    for mb in (0, 1024):
        rec = ReconstructConfig(iterations=15, batch_size=8, seed=1, capture_cache_mb=mb)
        q = quantize_model(make(), batches, QuantConfig(
            wbits=2, symmetric=False, solver="greedy", progress=False, abits=abits,
            reconstruction=rec, granularity=granularity, k=k, capture_cache_mb=mb))
        steps = {n: m.act.step.detach().clone() for n, m in q.model.named_modules()
                 if isinstance(m, QuantizedLayer) and m.act is not None}
        out.append(({n: w.codes for n, w in q.layers.items()}, steps,
                    [(b.loss_before, b.loss_after) for b in q.reconstruction.blocks]))
    (codes0, steps0, losses0), (codes1, steps1, losses1) = out
    assert codes0.keys() == codes1.keys() and steps0.keys() == steps1.keys()
    for name in codes0:
        np.testing.assert_array_equal(codes0[name], codes1[name], err_msg=name)
    for name in steps0:
        torch.testing.assert_close(steps0[name], steps1[name], rtol=0, atol=0)
    np.testing.assert_allclose(losses0, losses1, rtol=1e-12)
    assert len(losses0) >= 2


def test_reconstruction_capture_cache_runs_fewer_forwards():
    from qround.reconstruct import ReconstructConfig

    runs = {}
    for mb in (0, 1024):
        RUNS.clear()
        net = InPlaceNet()
        rec = ReconstructConfig(iterations=2, batch_size=8, seed=1, capture_cache_mb=mb)
        q = quantize_model(net, XB, QuantConfig(wbits=3, solver="greedy", progress=False, abits=4,
                                                reconstruction=rec, granularity="layer",
                                                capture_cache_mb=mb))
        runs[mb] = sum(RUNS.values())
        assert all("forward" not in m.__dict__ for m in q.model.modules())
    assert runs[1024] < runs[0]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 9), cols=st.integers(2, 9), seed=st.integers(0, 2 ** 16),
       chunk=st.sampled_from([1, 3, 7, 1 << 22]))
def test_fingerprint_sees_a_changed_element_and_swapped_rows_or_columns(rows, cols, seed, chunk):
    import qround.prefix_cache as pc

    t = torch.as_tensor(np.random.default_rng(seed).normal(size=(rows, cols)), dtype=torch.float32)
    old, pc._CHUNK = pc._CHUNK, chunk   # row blocks of at most `chunk` elements (1: one row each)
    try:
        base = pc._array_print(t)
        assert pc._array_print(t.clone()) == base
        changed = t.clone()
        changed[rows // 2, cols // 2] += 1.0
        swapped_rows, swapped_cols = t[[1, 0, *range(2, rows)]], t[:, [1, 0, *range(2, cols)]]
        for other in (changed, swapped_rows, swapped_cols):
            assert pc._array_print(other) != base
    finally:
        pc._CHUNK = old


# ------------------------------------------- cases from a second review (hidden state, inputs)
class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, feats: list):
        h = torch.relu(self.fc(x))
        feats.append(h)               # collects its feature map for a head (FPN, U-Net)
        return h


class ListNet(nn.Module):
    """A stage appends to a list it is given; a replay must not skip the append."""

    def __init__(self):
        super().__init__()
        self.s1, self.s2, self.mix, self.head = Stage(), Stage(), nn.Linear(8, 8), nn.Linear(8, 4)
        _filled(self, 1)

    def forward(self, x):
        feats: list = []
        h = self.s2(self.s1(x, feats), feats)
        return self.head(torch.relu(self.mix(h)) + sum(feats[:-1], torch.zeros(())))


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.cfg = types.SimpleNamespace(gen=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.fc(x) + 0.5 * torch.randn(x.shape, generator=self.cfg.gen)


class NoisyNet(nn.Module):
    """A generator held inside a plain object attribute."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = Noisy(), nn.Linear(8, 8), nn.Linear(8, 4)
        _filled(self, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class Temp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.t = nn.Linear(8, 8), 1.0

    def forward(self, x):
        return self.fc(x) / self.t


class TempNet(nn.Module):
    """The parent sets a child's attribute from a counter before calling it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.n = Temp(), nn.Linear(8, 8), nn.Linear(8, 4), 0
        _filled(self, 2)

    def forward(self, x):
        self.n += 1
        self.a.t = 1.0 + 0.1 * self.n
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class Reader(nn.Module):
    def __init__(self, buf):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("scale", buf)

    def forward(self, x):
        return self.fc(x) * self.scale


class Observer(nn.Module):
    def __init__(self, buf):
        super().__init__()
        self.register_buffer("scale", buf)

    def forward(self, x):
        self.scale.mul_(0.5).add_(0.5 * x.abs().mean())
        return x


class ObserverNet(nn.Module):
    """A buffer shared by a reader and a later observer that updates it (an EMA)."""

    def __init__(self):
        super().__init__()
        buf = torch.ones(())
        self.r, self.b, self.obs, self.c = Reader(buf), nn.Linear(8, 8), Observer(buf), \
            nn.Linear(8, 4)
        _filled(self, 4)

    def forward(self, x):
        return self.c(self.obs(torch.relu(self.b(torch.relu(self.r(x))))))


class TimeEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.t = nn.Linear(8, 8), nn.Linear(8, 8), None

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x))) * self.t[:, None]


class Denoiser(nn.Module):
    """Conditioning set as an attribute by the forward function (a set_timestep API)."""

    def __init__(self):
        super().__init__()
        self.temb, self.a, self.b = TimeEmbed(), nn.Linear(8, 8), nn.Linear(8, 4)
        _filled(self, 13)

    def set_timestep(self, t):
        self.temb.t = t

    def forward(self, x):
        return self.b(torch.relu(self.a(self.temb(x))))


def timestep_forward(model, x0):
    model.set_timestep(torch.rand(len(x0)))   # the global RNG, seeded by config.seed
    return model(x0)


class GraphNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        _filled(self, 1)

    def forward(self, x, adj):
        h = torch.relu(torch.sparse.mm(adj, self.l1(x)))
        return self.l3(torch.relu(torch.sparse.mm(adj, self.l2(h))))


def _adjacency(n, seed):
    i = torch.randint(0, n, (2, 3 * n), generator=gen(seed))
    return torch.sparse_coo_tensor(i, torch.ones(3 * n), (n, n), check_invariants=True).coalesce()


GRAPHS = [(torch.randn(10, 8, generator=gen(i)), _adjacency(10, i)) for i in range(3)]
TEXT_ROWS = [{"x": np.random.default_rng(i).normal(size=(4, 8)).astype(np.float32),
              "text": np.array(["a b", "c", "d e f", "g"])} for i in range(3)]


@pytest.mark.parametrize("make, data, forward", [
    (ListNet, X8, None), (NoisyNet, X8, None), (TempNet, X8, None), (ObserverNet, X8, None),
    (Denoiser, X8, timestep_forward), (GraphNet, GRAPHS, None),
    (lambda: _filled(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                   nn.Linear(8, 4)), 5), TEXT_ROWS,
     lambda m, b: m(torch.as_tensor(b["x"]))),
])
def test_hidden_state_and_odd_batches_give_the_same_codes(make, data, forward):
    """List arguments a module appends to, attributes set from outside between passes, a
    generator inside a plain object, a shared buffer an observer updates; sparse tensors and
    numpy string columns in the batches (the fingerprint crashed on them)."""
    def run(mb):
        q = quantize_model(make(), data, QuantConfig(wbits=3, solver="greedy", progress=False,
                                                     capture_cache_mb=mb), forward=forward)
        return {n: w.codes for n, w in q.layers.items()}, np.array([r.cost for r in q.report])
    assert_same(run(0), run(1024))


def test_the_weight_stages_records_are_freed_before_the_activation_stage(monkeypatch):
    """Kept alive, they doubled the memory budget while reconstruction made its own."""
    import gc
    import weakref

    from qround import pipeline
    alive: list = []
    made = pipeline._plan_and_caches

    def tracked(*args, **kwargs):
        plan, caches, starts = made(*args, **kwargs)
        alive.extend(weakref.ref(c) for c in caches.values())
        return plan, caches, starts

    def check(*args, **kwargs):
        gc.collect()
        seen.append(sum(r() is not None for r in alive))
        return real(*args, **kwargs)

    seen: list[int] = []
    real = pipeline.quantize_activations
    monkeypatch.setattr(pipeline, "_plan_and_caches", tracked)
    monkeypatch.setattr(pipeline, "quantize_activations", check)
    quantize_model(TinyResNet(), BATCHES, QuantConfig(wbits=3, solver="greedy", abits=8,
                                                      progress=False))
    assert len(alive) == 2 and seen == [0]


def test_state_takes_loggers_locks_and_raising_dicts_by_identity():
    """A logger's level cache is cleared by any setLevel in the process (the cache switched
    itself off); a proxy whose __dict__ raises crashed the run."""
    from qround.prefix_cache import _state

    class Proxy:
        @property
        def __dict__(self):
            raise RuntimeError("no context")

    m = nn.Linear(2, 2)
    m.log = logging.getLogger("qround.test.holder")
    m.lock = __import__("threading").Lock()
    m.proxy = Proxy()
    m.log.isEnabledFor(logging.INFO)            # fills the logger's cache
    before = _state(m)
    logging.getLogger("qround.test.other").setLevel(logging.DEBUG)   # clears every cache
    assert _state(m) == before
    m.cfg = types.SimpleNamespace(scale=1.0)
    before = _state(m)
    m.cfg.scale = 2.0                           # a plain object is still looked into
    assert _state(m) != before
