"""Solver benchmark on real layers: cost relative to RTN, gap to the best found, gap to the exact
optimum on small sub-problems, and wall time; one run, one table, JSON and a plot.

Layers: by default MiniLM (all-MiniLM-L6-v2, H on the packaged calibration sentences) of three
shapes and two conv layers of the digits CNN (trained with a fixed seed), at 2, 3 and 4 bits.
Your own layers: layer statistics files (``qround export-layer``,
:func:`qround.problems.io.save_layer_stats`), each at its own grid unless ``--bits`` is given:

    qround bench mine.npz other.npz --references neal,dwave-tabu --json mine.json

For each layer and bit width:

- ``full``: every fast solver on every output channel of the layer (ratio = summed cost / RTN,
  seconds = wall time of the whole layer);
- ``subset``: every solver, the dimod references included, on the same first
  ``ref_channels`` channels (dense dimod BQMs are too slow for whole layers), with seconds per
  channel, so ours and the references are compared on identical channels;
- ``exact``: 8 channels cut down to 16 inputs (the rest held at RTN,
  :meth:`RoundingProblem.restrict`; ``BenchConfig.exact_channels`` and ``exact_inputs`` in
  Python), where enumeration gives the optimum.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from .cliargs import PLOT_SUFFIXES, bits_list, check_format, check_paths, int_at_least
from .errors import QroundError
from .grid import GridSpec
from .problems.io import LayerStats, load_layer_stats
from .problems.rounding import RoundingProblem
from .report import environment, format_table, require_pyplot, write_json_atomic
from .solvers.base import cost_noise, cost_ratio, prepare, warm_up, warm_up_problem

log = logging.getLogger(__name__)

MINILM_LAYERS = (
    "0.model.encoder.layer.0.attention.self.query",   # 384 x 384
    "0.model.encoder.layer.0.intermediate.dense",     # 1536 x 384
    "0.model.encoder.layer.0.output.dense",           # 384 x 1536
)
# fast enough to run on every channel of every layer
OURS = ("nearest", "stochastic", "greedy", "gptq", "anneal", "tabu-fast", "tabu", "gptq+greedy",
        "fast", "quality")
# gradient / sampling methods whose per-channel cost makes whole wide layers slow here: they run
# on the same channel subset as the dimod references
SUBSET_ONLY = ("cem", "hopfield", "hopfield-10k", "hopfield-classic", "hopfield+greedy",
               "meanfield")


def extra_solvers(sweeps_factor: int = 10) -> dict:
    """Solvers with explicit parameters: the outside references (dimod samplers), AdaRound's
    relaxation at 10k iterations, ``quality-v1``, the ``quality`` of the fourth to ninth
    sessions (GPTQ, then the better of iterated tabu and anneal + tabu), and ``quality-t20`` /
    ``fast-t20``, the named defaults with a tabu tenure of 20 in every tabu stage instead of
    the default min(10, nfree // 2) (tried in the thirteenth session, BENCHMARKS.md 1m), to
    compare with."""
    from .solvers import (GPTQ, Anneal, BestOf, Chain, DimodSolver, MeanField, Relaxation,
                          Tabu)

    def quality(tenure=None):
        def tabu():
            return Tabu(stall=4000, restarts=2, tenure=tenure)
        return BestOf(tabu(), Chain(Anneal(order="sequential"), tabu()),
                      Chain(MeanField(), tabu()))

    return {
        "hopfield-10k": Relaxation(iterations=10_000),
        "quality-v1": Chain(GPTQ(), BestOf(Tabu(stall=4000), Chain(Anneal(order="sequential"),
                                                                   Tabu(stall=4000))),
                            label="quality-v1"),
        "quality-t20": Chain(GPTQ(), quality(tenure=20), label="quality-t20"),
        "fast-t20": Chain(GPTQ(), Tabu(restarts=0, iters_per_var=1.0, descent=False, tenure=20),
                          label="fast-t20"),
        "neal": DimodSolver("neal"),
        f"neal-{sweeps_factor}x": DimodSolver("neal", num_sweeps=1000 * sweeps_factor),
        "dwave-tabu": DimodSolver("dwave-tabu", timeout=100, num_reads=4),
    }


DEFAULT_BITS = (2, 3, 4)  # the packaged layers' widths when ``bits`` is not given


@dataclass
class BenchConfig:
    """What to benchmark.  ``bits=None``: the packaged layers at 2, 3 and 4 bits, each layer file
    at its own grid (its bits, and its stored scales if it has them).  ``layer_files`` come in
    addition to the packaged layers: set ``minilm_layers=()`` and ``cnn_layers=0`` for your
    layers alone (the CLI does that when it is given files)."""

    bits: tuple[int, ...] | None = None
    minilm_layers: tuple[str, ...] = MINILM_LAYERS
    cnn_layers: int = 2
    layer_files: tuple[str, ...] = ()
    solvers: tuple[str, ...] = OURS
    subset_solvers: tuple[str, ...] = SUBSET_ONLY
    references: tuple[str, ...] = ("neal", "neal-10x", "dwave-tabu")
    ref_channels: int = 16
    slow_ref_channels: int = 4     # for neal-10x
    slow_ref_max_inputs: int = 384  # neal-10x only on layers up to this many inputs
    exact_channels: int = 8
    exact_inputs: int = 16
    sentences: int = 256
    threads: int = 1
    device: str = "cpu"             # where the torch solvers run (cem, hopfield, gptq)
    seed: int = 0
    gptq_reference: bool = True  # time and cost of unrestricted GPTQ (qround.baselines)
    lower_bound: bool = True     # the certified lower bound (qround.problems.bounds) per layer


def load_layers(cfg: BenchConfig) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, weight (out, in), H (in, in)) for the configured real layers."""
    import torch

    from . import zoo
    from .calibrate import capture_hessians
    from .problems.layers import layer_weight

    out = []
    if cfg.minilm_layers:
        model = zoo.load_minilm()
        batches = zoo.minilm_batches(model, zoo.sentences("calibration", n=cfg.sentences))
        hs = capture_hessians(model, batches, layers=list(cfg.minilm_layers),
                              forward=zoo.minilm_forward)
        mods = dict(model.named_modules())
        for name in cfg.minilm_layers:
            out.append((f"minilm:{name.split('encoder.')[-1]}", layer_weight(mods[name]), hs[name]))
    if cfg.cnn_layers:
        model, data = zoo.train_digits_cnn("plain", seed=cfg.seed)
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
                 and m.weight[0].numel() > 9]  # skip the 1-input-channel stem (n = 9)
        convs = convs[:cfg.cnn_layers]
        calib = data.calib_images
        hs = capture_hessians(model, [calib[i:i + 128] for i in range(0, len(calib), 128)],
                              layers=convs)
        mods = dict(model.named_modules())
        for name in convs:
            h = hs[name]
            out.append((f"digits-cnn:{name}", layer_weight(mods[name]), h[0] if h.ndim == 3 else h))
    return out


def load_layer_files(cfg: BenchConfig) -> list[tuple[str, LayerStats]]:
    """(label, statistics) of ``cfg.layer_files``, read and checked before any work: a file
    with stored scales is only benchmarked at the width they were fitted for.  The label is the
    file's layer name (its stem if it has none), made unique with the path."""
    out, seen = [], set()
    for path in cfg.layer_files:
        stats = load_layer_stats(path)
        if cfg.bits and stats.scale is not None and set(cfg.bits) != {stats.bits}:
            raise QroundError(
                f"layer statistics file {str(path)!r} holds scales fitted for {stats.bits} bits, "
                f"so it cannot be benchmarked at bits {list(cfg.bits)}: leave out --bits (or "
                "bits=) to use its own width, or save it without scales")
        label = stats.name or os.path.splitext(os.path.basename(path))[0]
        if label in seen:
            label = f"{label} ({path})"
        base, copy = label, 1
        while label in seen:  # the same file given twice
            copy += 1
            label = f"{base} #{copy}"
        seen.add(label)
        out.append((label, stats))
    return out


def _work(cfg, layers, files) -> list[tuple]:
    """(label, bits, problem factory, weight, H for the GPTQ reference or a reason why none)."""
    work = []
    for name, w, h in layers:
        for bits in cfg.bits or DEFAULT_BITS:
            work.append((name, bits, partial(RoundingProblem.from_weight, w, h,
                                             GridSpec(bits=bits), name=name), w, h))
    for label, stats in files:
        if stats.hessian.ndim == 3:
            ref = "the file has a per-channel hessian; unrestricted GPTQ needs a shared one"
        elif stats.cross is not None:
            ref = "the file has an asymmetric target (cross); unrestricted GPTQ has the local one"
        else:
            ref = stats.hessian
        for bits in cfg.bits or (stats.bits,):
            work.append((label, bits, partial(stats.problem, bits=bits), stats.weight, ref))
    return work


def _solve(solver, problem, seed):
    """(solution, None) or (None, why); the solution's ``seconds`` is the wall time of the whole
    ``solve`` call (start setup and the final energy check included, the same for a bare solver
    and a composite; ``Solution.seconds`` alone leaves those out of a bare solver's time)."""
    t0 = time.perf_counter()
    try:
        sol = solver.solve(problem, seed=seed)
    except QroundError as exc:
        return None, str(exc)
    return dataclasses.replace(sol, seconds=time.perf_counter() - t0), None


def check_solvers(cfg: BenchConfig) -> None:
    """Every solver spec of ``cfg`` names registered solvers (or an extra one: ``neal-10x``,
    ``hopfield-10k``, ``quality-v1``...), and there is at least one; QroundError otherwise.
    A known solver whose optional package is missing is skipped later, with the reason."""
    from .solvers import available_solvers, get_solver
    from .solvers.registry import spec_names

    specs = (*cfg.solvers, *cfg.subset_solvers, *cfg.references)
    if not specs:
        raise QroundError("no solver to benchmark: give --solvers, --subset-solvers or "
                          "--references")
    seen: dict[str, str] = {}
    for flag, group in (("--solvers", cfg.solvers), ("--subset-solvers", cfg.subset_solvers),
                        ("--references", cfg.references)):
        for spec in group:
            if spec in seen:
                raise QroundError(f"{spec!r} is given twice ({seen[spec]} and {flag}): each "
                                  "solver has one row per layer; give it once")
            seen[spec] = flag
    extra, known = extra_solvers(), available_solvers()
    for spec in specs:
        if spec in extra:
            continue
        names = spec_names(spec)
        fixed = [name for name in names if name in extra and name not in known]
        if fixed:
            raise QroundError(f"{fixed[0]!r} in {spec!r}: the benchmark's own solvers "
                              f"({', '.join(sorted(extra))}) take no options and do not "
                              "compose; write out what they stand for (see "
                              "qround.bench.extra_solvers)")
        unknown = [name for name in names if name not in known]
        if unknown:
            where = "" if unknown[0] == spec else f" in {spec!r}"
            raise QroundError(f"unknown solver {unknown[0]!r}{where}; `qround solvers` lists "
                              f"them, and the benchmark adds {', '.join(sorted(extra))}")
        get_solver(spec)  # options the solver does not take, or bad values: stop here too


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    import torch
    from tqdm.auto import tqdm

    import numba

    # Both thread pools are pinned: small matrix products on a contended 2-core machine can be
    # 100x slower with 2 threads than with 1, and numba's prange otherwise takes every core.
    # numpy's BLAS too (energies, local fields): 10x slower under load with its default pool.
    from threadpoolctl import threadpool_limits

    prev = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(cfg.threads)
    numba.set_num_threads(min(cfg.threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(limits=cfg.threads):
            return _run(cfg, progress, tqdm)
    finally:
        torch.set_num_threads(prev[0])
        numba.set_num_threads(prev[1])


def _run(cfg, progress, tqdm):
    from .solvers import get_solver, place
    from .solvers._torch import resolve_device

    resolve_device(cfg.device)  # a device that is not there stops the run, not each solver
    check_solvers(cfg)
    extra = extra_solvers()
    skipped: list[dict] = []   # this run's, in its result

    def build(specs):
        out = {}
        for spec in specs:
            try:
                out[spec] = place(extra[spec] if spec in extra else get_solver(spec),
                                  cfg.device)
            except QroundError as exc:
                skipped.append({"solver": spec, "reason": str(exc)})
                log.warning("skipping %s: %s", spec, exc)
        return out

    ours = build(cfg.solvers)
    refs = {**build(cfg.subset_solvers), **build(cfg.references)}
    kinds = {**{k: "subset" for k in cfg.subset_solvers},
             **{k: "reference" for k in cfg.references}}

    files = load_layer_files(cfg)  # a bad file stops the run before the packaged layers load
    t_load = time.perf_counter()
    layers = load_layers(cfg)
    load_s = time.perf_counter() - t_load
    work = _work(cfg, layers, files)
    if work:
        # warm-up, not timed: on its first call a solver compiles (or loads the cached) numba
        # kernels and torch / dimod load their libraries; without this the first row of each
        # solver carried that (a fresh cache once put 8 s on `fast`'s first layer)
        warm_up(*{**ours, **refs}.values())
        if cfg.gptq_reference:
            from .baselines import gptq_quantize

            tiny = warm_up_problem()
            gptq_quantize(tiny.weight, tiny.hessian, tiny.grid)
    rows, exact_rows = [], []
    for name, bits, make_problem, w, ref_h in tqdm(work, desc="bench", disable=not progress):
        problem = make_problem()
        m, n = problem.weight.shape
        sub = problem.subproblem(slice(0, min(cfg.ref_channels, m)))
        slow_sub = problem.subproblem(slice(0, min(cfg.slow_ref_channels, m)))
        for p in (problem, sub, slow_sub):   # no solver's time carries the shared setup
            prepare(p)
        results = {}
        for label, solver in ours.items():
            full, err = _solve(solver, problem, cfg.seed)
            if err:
                skipped.append({"layer": name, "bits": bits, "solver": label, "reason": err})
                continue
            part, _ = _solve(solver, sub, cfg.seed)
            part_slow, _ = _solve(solver, slow_sub, cfg.seed)
            results[label] = dict(full=full, sub=part, slow=part_slow, kind="ours")
        if cfg.gptq_reference and isinstance(ref_h, str):
            skipped.append({"layer": name, "bits": bits, "solver": "gptq-reference",
                                "reason": ref_h})
        elif cfg.gptq_reference:
            rows.append(_gptq_reference_row(name, bits, problem, w, ref_h))
        for label, solver in refs.items():
            slow = label.startswith("neal-")
            if slow and n > cfg.slow_ref_max_inputs:
                skipped.append({"layer": name, "bits": bits, "solver": label,
                                    "reason": f"n={n} > {cfg.slow_ref_max_inputs} (too slow)"})
                continue
            part, err = _solve(solver, slow_sub if slow else sub, cfg.seed)
            if err:
                skipped.append({"layer": name, "bits": bits, "solver": label, "reason": err})
                continue
            results[label] = dict(full=None, sub=None if slow else part,
                                  slow=part if slow else None, kind=kinds[label])
        rows += _layer_rows(name, bits, (m, n), results, cfg)
        if cfg.lower_bound:
            rows.append(_bound_row(name, bits, problem, sub))
        exact_rows += _exact_gaps(name, problem, {**ours, **refs}, cfg)
    return {"config": dict(vars(cfg)), "environment": environment(),
            "rows": rows, "exact": exact_rows, "skipped": skipped, "load_seconds": load_s}


def direct_cost(problem: RoundingProblem, weight, hessian, codes) -> float:
    """``sum_c (w_hat_c - w_c)^T H (w_hat_c - w_c)`` of any integer ``codes`` (out, in) on the
    problem's grid, for a problem with the local-MSE target and shared ``hessian`` (in, in)."""
    d = problem.grid.dequantize(codes) - np.asarray(weight, dtype=np.float64)
    return float(np.einsum("ci,ij,cj->", d, np.asarray(hessian, dtype=np.float64), d))


def _gptq_reference_row(name, bits, problem, weight, hessian) -> dict:
    """GPTQ as its users run it (``qround.baselines.gptq_quantize``: unrestricted codes,
    act-order, 1 % damping, blocks of 128) on the whole layer: its cost ``sum_c (w_hat_c -
    w_c)^T H (w_hat_c - w_c)`` relative to RTN's, and its wall time; the time reference of
    the ``fast`` target.  Not a floor/ceil choice, so it is left out of the best-found gaps."""
    from .baselines import gptq_quantize

    t0 = time.perf_counter()
    codes = gptq_quantize(weight, hessian, problem.grid)
    seconds = time.perf_counter() - t0
    cost = direct_cost(problem, weight, hessian, codes)
    rtn = float(problem.rtn_costs().sum())
    return {"layer": name, "bits": bits, "shape": list(problem.weight.shape),
            "solver": "gptq-reference", "kind": "reference", "seconds": seconds,
            "ratio": cost_ratio(cost, rtn, cost_noise(problem))}


def _bound_row(name, bits, problem, sub) -> dict:
    """The certified lower bound (``RoundingProblem.lower_bound``) on the whole layer and on
    the ``sub`` sample, as bound/RTN: no solver's ratio on the same channels can be lower."""
    full, part = problem.lower_bound(), sub.lower_bound()
    return {"layer": name, "bits": bits, "shape": list(problem.weight.shape),
            "solver": "lower-bound", "kind": "bound", "ratio": full.ratio,
            "seconds": full.seconds, "converged": full.converged and part.converged,
            "sub_ratio": part.ratio, "sub_s_per_ch": part.seconds / sub.num_channels}


def _gap(cost: float, best: float, rtn: float) -> float:
    """``cost / best - 1``, the relative gap to the best found; 0 when both are 0 (a layer
    whose every rounding costs nothing) and inf when only ``best`` is.  Where costs are
    relative (a file with ``cross`` but no ``float_hessian``: the best is negative), the
    shift-free ``(cost - best) / (rtn - best)``, RTN's cost on the same channels."""
    if best > 0:
        return cost / best - 1
    if best < 0:
        return (cost - best) / (rtn - best) if rtn > best else 0.0
    return 0.0 if cost <= best else float("inf")


def _layer_rows(name, bits, shape, results, cfg):
    def best(key):
        vals = [r[key].total_cost for r in results.values() if r[key] is not None]
        return min(vals) if vals else np.nan

    best_full, best_sub, best_slow = best("full"), best("sub"), best("slow")
    rows = []
    for label, r in results.items():
        row = {"layer": name, "bits": bits, "shape": list(shape), "solver": label,
               "kind": r["kind"]}
        if r["full"] is not None:
            f = r["full"]
            row.update(ratio=f.ratio, gap_best=_gap(f.total_cost, best_full, f.total_rtn_cost),
                       seconds=f.seconds)
        if r["sub"] is not None:
            s = r["sub"]
            row.update(sub_ratio=s.ratio, sub_gap_best=_gap(s.total_cost, best_sub,
                                                            s.total_rtn_cost),
                       sub_s_per_ch=s.seconds / s.choices.shape[0])
        if r["slow"] is not None:
            s = r["slow"]
            row.update(slow_ratio=s.ratio, slow_gap_best=_gap(s.total_cost, best_slow,
                                                              s.total_rtn_cost),
                       slow_s_per_ch=s.seconds / s.choices.shape[0])
        rows.append(row)
    return rows


def _exact_gaps(name, problem, solvers, cfg):
    """Gap of each solver to the exact optimum on sub-problems cut from the real layer."""
    from .solvers import Exact

    rng = np.random.default_rng(cfg.seed)
    m, n = problem.weight.shape
    k = min(cfg.exact_inputs, n)
    chans = np.sort(rng.choice(m, size=min(cfg.exact_channels, m), replace=False))
    base = problem.subproblem(chans)
    small = base.restrict(np.sort(rng.choice(n, size=k, replace=False)), base.rtn_choices())
    opt = Exact(max_free=max(k, 1)).solve(small)
    rows = []
    span = max(opt.total_rtn_cost - opt.total_cost, 1e-300)
    tol = 1e-9 * np.abs(opt.energy).max()
    for label, solver in solvers.items():
        sol, err = _solve(solver, small, cfg.seed)
        if err:
            continue
        gap = (sol.total_cost - opt.total_cost) / span
        rows.append({"layer": name, "bits": problem.grid.bits, "solver": label,
                     "ratio": sol.ratio, "exact_ratio": opt.ratio,
                     "optimal_channels": int(np.sum(sol.energy <= opt.energy + tol)),
                     "channels": len(chans), "gap_of_rtn_gap": gap})
    if cfg.lower_bound:
        # how tight the bound is: its channels that reach the optimum, and its (negative) gap
        bound = small.lower_bound()
        rows.append({"layer": name, "bits": problem.grid.bits, "solver": "lower-bound",
                     "ratio": bound.ratio, "exact_ratio": opt.ratio,
                     "optimal_channels": int(np.sum(bound.cost >= opt.cost - tol)),
                     "channels": len(chans),
                     "gap_of_rtn_gap": (bound.total_cost - opt.total_cost) / span})
    return rows


def summarise(result: dict) -> str:
    cols = ["layer", "bits", "solver", "ratio", "gap_best", "seconds", "sub_ratio", "sub_gap_best",
            "sub_s_per_ch", "slow_ratio", "slow_s_per_ch"]
    if not any("slow_ratio" in r and r["kind"] != "ours" for r in result["rows"]):
        cols = cols[:-2]  # the slow-subset columns compare with neal-10x; none ran (JSON has them)
    rows = [{c: r.get(c, "") for c in cols} for r in result["rows"]]
    out = [format_table(rows, cols)]
    ex = {}
    for r in result["exact"]:
        ex.setdefault(r["solver"], []).append(r)
    erows = [{"solver": s, "optimal": f"{sum(x['optimal_channels'] for x in v)}/"
                                      f"{sum(x['channels'] for x in v)}",
              "mean_gap": float(np.mean([x["gap_of_rtn_gap"] for x in v]))}
             for s, v in ex.items()]
    if erows:
        out.append("\nexact sub-problems (gap = (cost - opt) / (rtn - opt), 0 = optimal; "
                   "lower-bound's is below 0, by how far the bound is from the optimum):")
        out.append(format_table(erows, ["solver", "optimal", "mean_gap"]))
    if result["skipped"]:
        out.append("\nskipped:")
        out += [f"  {s}" for s in result["skipped"]]
    return "\n".join(out)


def plot(result: dict, path: str) -> None:
    """cost/RTN against seconds per channel (log x), per layer and bit width, for every solver
    on the same channels: the ``sub`` sample (the first ``ref_channels``), where ours, the
    relaxations and the dimod references all ran.  The whole-layer results of ours, and
    neal-10x's smaller sample, are in the table and the JSON, not here: points from different
    channels would not be comparable."""
    from .report import new_figure, save_figure_atomic

    rows = [r for r in result["rows"] if "sub_ratio" in r]
    keys = sorted({(r["layer"], r["bits"]) for r in rows})
    if not keys:
        raise QroundError("the benchmark has no rows to plot (no solver ran on the shared "
                          "channel sample)")
    ref_channels = result.get("config", {}).get("ref_channels")
    cols = min(3, len(keys))
    rows_n = int(np.ceil(len(keys) / cols))
    fig = new_figure(figsize=(5.5 * cols, 4.2 * rows_n))
    axes = fig.subplots(rows_n, cols, squeeze=False)
    for ax, (layer, bits) in zip(axes.flat, keys):
        mine = [r for r in rows if (r["layer"], r["bits"]) == (layer, bits)]
        out = mine[0]["shape"][0] if mine and mine[0].get("shape") else None
        channels = (min(ref_channels, out) if ref_channels and out else
                    ref_channels or "the first")
        ax.set_title(f"{layer} W{bits}, {channels} channels", fontsize=9)
        finite = [r for r in mine if r["sub_ratio"] is not None
                  and np.isfinite(r["sub_ratio"])]
        if not finite:  # relative costs (cross without float_hessian): no ratio to RTN
            ax.text(0.5, 0.5, "no cost / RTN ratio:\nthe costs are relative", ha="center",
                    va="center", transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for r in [r for r in finite if r["kind"] == "bound"]:
            ax.axhline(r["sub_ratio"], color="0.4", linestyle="--", linewidth=1)
            ax.annotate("certified lower bound", (0.01, r["sub_ratio"]), fontsize=7,
                        xycoords=("axes fraction", "data"), xytext=(0, 2),
                        textcoords="offset points")
        for r in [r for r in finite if r["kind"] != "bound"]:
            x, y = max(r["sub_s_per_ch"], 1e-6), r["sub_ratio"]
            ours = r["kind"] == "ours"
            ax.scatter([x], [y], facecolors=None if ours else "none",
                       edgecolors=None if ours else "k")
            ax.annotate(r["solver"], (x, y), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per channel (filled: batched solvers; hollow: the others)")
        ax.set_ylabel("cost / RTN")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure_atomic(fig, path, what="solver plot")


def main(argv=None) -> int:
    """``qround bench``: parse ``argv`` and run the benchmark."""
    return run_args(parse_args(argv))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of ``qround bench``; loads no solver (``--help`` stays fast)."""
    p = argparse.ArgumentParser(prog="qround bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", metavar="FILE.npz",
                   help="layer statistics files (qround export-layer) to benchmark instead of "
                        "the packaged layers (add --minilm-layers / --cnn-layers for both)")
    p.add_argument("--bits", type=bits_list, default=None,
                   help="comma-separated weight bits (default: 2,3,4 for the packaged layers, "
                        "a file's own width)")
    p.add_argument("--solvers", default=",".join(OURS),
                   help="comma-separated solver specs, e.g. 'gptq,gptq+tabu(restarts=16)' "
                        "(default: %(default)s)")
    p.add_argument("--subset-solvers", default=",".join(SUBSET_ONLY),
                   help="slower solvers, run on the first --ref-channels channels only "
                        "(default: %(default)s; 'none' for none)")
    p.add_argument("--references", default="neal,neal-10x,dwave-tabu",
                   help="outside references (dimod samplers) on the first --ref-channels "
                        "channels; neal-10x on --slow-ref-channels (default: %(default)s)")
    p.add_argument("--minilm-layers", default=None,
                   help="comma-separated MiniLM layer names (default without files: "
                        "layer 0's query, intermediate and output)")
    p.add_argument("--cnn-layers", type=int_at_least(0), default=None,
                   help="digits CNN convs, the first N after the stem (default without files: 2)")
    p.add_argument("--ref-channels", type=int_at_least(1), default=16,
                   help="channels for --subset-solvers and --references (default: %(default)s)")
    p.add_argument("--slow-ref-channels", type=int_at_least(1), default=4,
                   help="channels for neal-10x (default: %(default)s)")
    p.add_argument("--threads", type=int_at_least(1, 1024), default=1,
                   help="torch, numba and numpy's BLAS threads (default: %(default)s, for "
                        "timings that do not depend on the machine's core count)")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda: where the torch solvers (cem, hopfield, meanfield, gptq) "
                        "run")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="solver seed; dwave-tabu stops on a timeout, so its results vary from "
                        "run to run whatever the seed (default: %(default)s)")
    p.add_argument("--no-lower-bound", action="store_true",
                   help="skip the certified lower bound per layer (row lower-bound: no rounding "
                        "costs less; qround.problems.bounds)")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--plot", help="write the cost/RTN-vs-time plot (PNG)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run_args(a: argparse.Namespace) -> int:
    """Run the benchmark that :func:`parse_args` read."""
    split = lambda s: tuple(x for x in s.split(",") if x and x.strip().lower() != "none")
    from .solvers._torch import resolve_device
    from .solvers.registry import split_specs

    resolve_device(a.device)  # a missing GPU stops here, before any work
    minilm = (() if a.files else MINILM_LAYERS) if a.minilm_layers is None \
        else split(a.minilm_layers)
    cnn = (0 if a.files else 2) if a.cnn_layers is None else a.cnn_layers
    if not a.files and not minilm and not cnn:
        raise QroundError("no layers to benchmark: give layer files, --minilm-layers or "
                          "--cnn-layers N > 0")
    check_paths({"--json": a.json, "--plot": a.plot}, {f"FILE {f}": f for f in a.files})
    check_format("--json", a.json, "JSON", (".json",))
    check_format("--plot", a.plot, "a PNG image", PLOT_SUFFIXES)
    if a.plot:
        require_pyplot()   # before the benchmark, not after it
    specs = lambda s: tuple(x for x in split_specs(s) if x.lower() != "none")
    cfg = BenchConfig(bits=a.bits, solvers=specs(a.solvers),
                      subset_solvers=specs(a.subset_solvers),
                      references=specs(a.references), minilm_layers=minilm, cnn_layers=cnn,
                      layer_files=tuple(a.files), ref_channels=a.ref_channels,
                      slow_ref_channels=a.slow_ref_channels, threads=a.threads, seed=a.seed,
                      device=a.device, lower_bound=not a.no_lower_bound)
    result = run(cfg, progress=not a.no_progress)
    print(summarise(result))
    if a.json:  # first: the results are kept whatever happens to the plot
        write_json_atomic(a.json, result)
    if a.plot:
        plot(result, a.plot)
    return 0
