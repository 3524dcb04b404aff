"""The capture cache's checks one at a time: each test builds a case where only one check can
fire (found by mutation testing, helper-120; the existing cases were caught by several at once)."""
import logging

import numpy as np
import torch
from torch import nn

from qround.pipeline import QuantConfig, quantize_model
from qround.prefix_cache import PrefixCache, budget_bytes, trace_spans
from qround.sensitivity import layer_sensitivity

from .test_prefix_cache import _filled

torch.set_num_threads(1)

X = [torch.randn(4, 8, generator=torch.Generator().manual_seed(40 + i)) for i in range(3)]


def _errors(model, data, mb):
    sens = layer_sensitivity(model, data, QuantConfig(capture_cache_mb=mb), bits=(2, 3))
    return [(s.name, s.errors) for s in sens.layers]


def _same_with_and_without_cache(make, data=X):
    assert _errors(make(), data, 0) == _errors(make(), data, 1024)


def _passes(net, batches_per_pass, before, budget=2 ** 20):
    """Run the cache by hand: one pass per list of batches; the outputs of the last pass."""
    with torch.no_grad():
        spans, starts = trace_spans(net, lambda: net(batches_per_pass[0][0]))
    cache = PrefixCache(net, spans, budget, [], starts)
    outs = []
    for batches in batches_per_pass:
        cache.prepare(starts[before])
        outs = []
        for j, b in enumerate(batches):
            with cache.batch(j, b), torch.no_grad():
                outs.append(net(b))
        cache.finish()
    return cache, outs


# ---------------------------------------------------------------- fingerprints (P4, P5)
class Cast(nn.Module):
    def forward(self, x):
        return (x * 0.1).float()          # computed in the input's dtype


def test_a_batch_in_another_dtype_is_not_replayed():
    net = _filled(nn.Sequential(Cast(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), 1)
    x32 = torch.arange(32, dtype=torch.float32).reshape(4, 8) + 0.3
    x64 = x32.double()
    with torch.no_grad():
        assert not torch.equal(net(x32), net(x64))    # the dtype matters here
        want = net(x64)
    _, outs = _passes(net, [[x32], [x64]], "3")
    assert torch.equal(outs[0], want)


class Pick(nn.Module):
    def forward(self, a=None, b=None):
        return a.clone() if b is None else b * 2


class PickNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pick, self.fc = Pick(), nn.Linear(8, 4)
        self.key = "a"

    def forward(self, x):
        return self.fc(self.pick(**{self.key: x}))


def test_a_call_with_other_keyword_names_is_not_replayed():
    net = _filled(PickNet(), 2)
    with torch.no_grad():
        spans, starts = trace_spans(net, lambda: net(X[0]))
    cache = PrefixCache(net, spans, 2 ** 20, [], starts)
    for key in ("a", "a", "b"):       # records with a=, then the call changes to b=
        net.key = key
        cache.prepare(starts["fc"])
        with cache.batch(0, X[0]), torch.no_grad():
            out = net(X[0])
        cache.finish()
    with torch.no_grad():
        assert torch.equal(out, net.fc(X[0] * 2))


# ------------------------------------------------- side effects the cache must see (P10, P17)
class GlobalNoise(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.randn_like(x)       # torch's global generator


def test_a_module_drawing_from_the_global_generator_is_not_replayed():
    def make():
        return _filled(nn.Sequential(nn.Linear(8, 8), GlobalNoise(), nn.Linear(8, 8),
                                     GlobalNoise(), nn.Linear(8, 8), GlobalNoise(),
                                     nn.Linear(8, 4)), 3)
    _same_with_and_without_cache(make)


class Bump(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, xs):
        t = xs[0][0]
        y = self.fc(t)
        t.add_(1.0)                    # in place, on a tensor nested in lists
        return y


class BumpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bump, self.mid, self.head = Bump(), nn.Linear(8, 8), nn.Linear(8, 4)
        _filled(self, 4)

    def forward(self, x):
        t = x.clone()
        y = self.bump([[t]])
        return self.head(torch.relu(self.mid(y)) + t)


def test_an_in_place_change_of_a_deeply_nested_input_is_seen():
    _same_with_and_without_cache(BumpNet)


# ---------------------------------------------------- outputs sharing memory (P12)
class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y, y                     # one tensor twice


class PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair, self.mid, self.head = Pair(), nn.Linear(8, 8), nn.Linear(8, 4)
        _filled(self, 5)

    def forward(self, x):
        a, b = self.pair(x)
        a.mul_(2.0)                     # changes b too
        return self.head(torch.relu(self.mid(b)))


def test_outputs_that_share_memory_are_not_replayed_as_separate_copies():
    _same_with_and_without_cache(PairNet)


# ------------------------------------------------------------- hooks (P13, P14)
STORE: dict = {}


class TapNet(nn.Module):
    def __init__(self, hook_child=True):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.dec, self.head = nn.Linear(16, 8), nn.Linear(8, 4)
        _filled(self, 6)
        self.enc[1].tap = True
        if hook_child:   # stores the child's output outside every module
            self.enc[1].register_forward_hook(lambda m, i, o: STORE.__setitem__("t", o))

    def forward(self, x):
        h = self.enc(x)
        return self.head(torch.relu(self.dec(torch.cat([h, STORE["t"]], -1))))


def test_a_child_hook_with_an_effect_outside_the_modules_keeps_running():
    STORE.clear()
    _same_with_and_without_cache(TapNet)


def test_a_global_hook_switches_the_cache_off():
    STORE.clear()

    def tap(m, i, o):
        if getattr(m, "tap", False):
            STORE["t"] = o

    handle = torch.nn.modules.module.register_module_forward_hook(tap)
    try:
        _same_with_and_without_cache(lambda: TapNet(hook_child=False))
    finally:
        handle.remove()


# --------------------------------------------------------- budget and batches (P15, P21, P22)
def test_the_records_never_pass_the_budget_even_with_one_batch():
    net = _filled(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), 7)
    record = 4 * 8 * 4                      # one (4, 8) float32 output
    cache, _ = _passes(net, [[X[0][:4]]], "2", budget=record + record // 2)
    assert 0 < cache.size <= cache.budget


def test_more_batches_than_recorded_run_whole(caplog):
    net = _filled(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), 8)
    with caplog.at_level(logging.WARNING, logger="qround.prefix_cache"):
        _, outs = _passes(net, [X[:2], X[:2], X], "2")
    with torch.no_grad():
        for o, x in zip(outs, X):
            assert torch.equal(o, net(x))
    assert len(outs) == 3 and "more calibration batches" in caplog.text


def test_budget_is_in_mebibytes():
    assert budget_bytes(1) == 2 ** 20 and budget_bytes(0.5) == 2 ** 19


# ------------------------------------------ record bookkeeping (P25, P28) and sparse inputs (P27)
def _check_books(cache):
    """The bytes counted are those of the records kept, and no record is kept beside one of
    an ancestor (which replaces it)."""
    from qround.prefix_cache import _ancestors
    held = sum(t.numel() * t.element_size() for recs in cache.ready.values()
               for _, out in recs for t in ([out] if torch.is_tensor(out) else out))
    assert cache.size == held
    assert not [n for n in cache.ready if any(a in cache.ready for a in _ancestors(n))]


def test_a_finished_parent_replaces_its_childrens_records():
    net = _filled(nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)),
                                nn.ReLU(), nn.Linear(8, 4)), 9)
    with torch.no_grad():
        spans, starts = trace_spans(net, lambda: net(X[0]))
    cache = PrefixCache(net, spans, 2 ** 20, [], starts)
    for before in ("0.2", "2", "2"):     # inside the block, then after it
        cache.prepare(starts[before])
        for j, b in enumerate(X):
            with cache.batch(j, b), torch.no_grad():
                net(b)
        cache.finish()
        _check_books(cache)
    assert set(cache.ready) == {"0", "1"}


def test_stale_tied_records_free_their_bytes():
    from .test_prefix_cache import XB, TiedNet
    net = TiedNet()
    with torch.no_grad():
        spans, starts = trace_spans(net, lambda: net(XB[0]))
    cache = PrefixCache(net, spans, 2 ** 20, ["mid.0", "last", "late"], starts)
    for before, write in (("last", False), ("late", True), ("late", False)):
        if write:
            with torch.no_grad():
                net.last.weight.mul_(0.5)
        cache.prepare(starts[before])
        for j, b in enumerate(XB):
            with cache.batch(j, b), torch.no_grad():
                net(b)
        cache.finish()
        _check_books(cache)


class GCN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, adj):
        return torch.relu(torch.sparse.mm(adj, self.fc(x)))


class GCNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.g1, self.head = GCN(), nn.Linear(8, 4)
        _filled(self, 10)

    def forward(self, batch):
        x, adj = batch
        return self.head(self.g1(x, adj))


def _adj(seed, n=6):
    """A permutation matrix: n ones at distinct places (the values do not tell two apart)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.sparse_coo_tensor(torch.stack([torch.arange(n), perm]), torch.ones(n),
                                   (n, n), check_invariants=True).coalesce()


def test_a_sparse_input_with_other_indices_is_not_replayed():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    a1, a2 = _adj(1), _adj(2)
    assert a1._nnz() == a2._nnz() and not torch.equal(a1.to_dense(), a2.to_dense())
    net = GCNNet()
    _, outs = _passes(net, [[(x, a1)], [(x, a2)]], "head")
    with torch.no_grad():
        assert torch.equal(outs[0], net((x, a2)))


class _Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, ctx):
        h = torch.relu(self.fc(x))
        ctx["feats"].append(h)          # a context dict holding a list of feature maps
        return h


class _ContextNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.s1, self.s2, self.mix, self.head = _Stage(), _Stage(), nn.Linear(8, 8), nn.Linear(8, 4)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        ctx = {"feats": []}
        h = self.s2(self.s1(x, ctx), ctx)
        return self.head(torch.relu(self.mix(h)) + sum(ctx["feats"][:-1], torch.zeros(())))


def test_a_module_adding_to_a_list_inside_a_dict_argument_is_not_replayed():
    # the change of a list two levels inside the call's arguments was compared by identity
    # only, so s1 was replayed, its append skipped, and head saw other inputs: other codes
    # and other sensitivities than without the cache, without an error
    codes = {}
    for mb in (0, 1024):
        q = quantize_model(_ContextNet(), X, QuantConfig(wbits=3, solver="greedy",
                                                         progress=False, capture_cache_mb=mb))
        codes[mb] = {n: w.codes for n, w in q.layers.items()}
    assert codes[0].keys() == codes[1024].keys() == {"s1.fc", "s2.fc", "mix", "head"}
    for name in codes[0]:
        np.testing.assert_array_equal(codes[0][name], codes[1024][name], err_msg=name)
    _same_with_and_without_cache(_ContextNet)

