"""The certified lower bound (``RoundingProblem.lower_bound``) on the solver benchmark's real
layers, in one run: how much of RTN's cost it proves unavoidable, and how far from optimal that
leaves the best solutions found.

Layers: ``qround bench``'s packaged ones (MiniLM layer 0's query, intermediate and output
projections with H from 256 packaged sentences; the first two 3x3 convs after the stem of the
digits CNN trained with seed 0), whole layers, at 2, 3 and 4 bits (mse scales).  Per layer and
width: bound/RTN with the eigenvalue shift and without (the plain box relaxation of DESIGN
section 2), its seconds and iterations; ``fast`` and ``quality``'s cost/RTN; the certified gap
of the better of the two, ``(cost - bound) / (RTN - bound)``: the share of RTN's excess over
the bound that the solution may still leave (0 would prove it optimal).

A second table checks the bound against exact optima: ``exact_channels`` channels x
``exact_inputs`` inputs cut from each layer as ``qround bench`` cuts them (the other inputs
held at RTN): bound/RTN, optimum/RTN, and the bound's gap ``(bound - opt) / (RTN - opt)``
(0: tight, -1: no better than RTN's cost minus the whole RTN-to-optimum span).

    python benchmarks/lower_bound.py --threads 1 --json benchmarks/results/lower_bound.json

``--compare-precision`` also runs the eigen bound with float64 iterations (the default iterates
in float32 and certifies in float64) and reports both times from the same run.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="2,3,4", help="weight bits (default: %(default)s)")
    p.add_argument("--cnn-layers", type=int, default=2,
                   help="digits CNN convs after the stem (default: %(default)s)")
    p.add_argument("--minilm", action=argparse.BooleanOptionalAction, default=True,
                   help="include the three MiniLM layers (default: yes)")
    p.add_argument("--exact-channels", type=int, default=8)
    p.add_argument("--exact-inputs", type=int, default=16)
    p.add_argument("--threads", type=int, default=1,
                   help="torch, numba and BLAS threads (default: %(default)s)")
    p.add_argument("--layers", default="",
                   help="only layers whose name holds one of these comma-separated substrings "
                        "(default: all)")
    p.add_argument("--compare-precision", action="store_true",
                   help="also time the eigen bound with float64 iterations (columns bound64, "
                        "bound64_s, speedup: float64 seconds over the default float32's)")
    p.add_argument("--json", help="write both tables to this JSON file")
    args = p.parse_args(argv)
    from _common import int_list
    args.bits = int_list(args.bits, "--bits", p, 2, 8)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    from _common import report, set_threads
    from threadpoolctl import threadpool_limits

    from qround.bench import MINILM_LAYERS, BenchConfig, load_layers
    from qround.grid import GridSpec
    from qround.problems import RoundingProblem
    from qround.solvers import Exact, get_solver, warm_up
    from qround.solvers.base import prepare

    set_threads(args.threads)
    threadpool_limits(args.threads)
    cfg = BenchConfig(minilm_layers=MINILM_LAYERS if args.minilm else (),
                      cnn_layers=args.cnn_layers)
    layers = load_layers(cfg)
    solvers = {name: get_solver(name) for name in ("fast", "quality")}
    warm_up(*solvers.values())
    rows, exact_rows = [], []
    wanted = [s for s in args.layers.split(",") if s]
    layers = [x for x in layers if not wanted or any(s in x[0] for s in wanted)]
    if not layers:
        raise SystemExit(f"no layer name holds any of {wanted}")
    for name, w, h in layers:
        for bits in args.bits:
            p = prepare(RoundingProblem.from_weight(w, h, GridSpec(bits=bits), name=name))
            eigen, plain = p.lower_bound(), p.lower_bound(shift="none")
            extra = {}
            if args.compare_precision:
                double = p.lower_bound(precision="float64")
                extra = {"bound64": double.ratio, "bound64_s": double.seconds,
                         "iterations64": double.iterations,
                         "speedup": double.seconds / eigen.seconds}
            sols = {k: s.solve(p, seed=0) for k, s in solvers.items()}
            best = min(sols.values(), key=lambda s: s.total_cost)
            rows.append({"layer": name, "bits": bits, "shape": list(p.weight.shape),
                         "bound": eigen.ratio, "bound_none": plain.ratio,
                         "bound_s": eigen.seconds, "iterations": eigen.iterations,
                         "converged": eigen.converged and plain.converged,
                         "fast": sols["fast"].ratio, "quality": sols["quality"].ratio,
                         "certified_gap": eigen.certified_gap(best.cost),
                         "fast_s": sols["fast"].seconds, "quality_s": sols["quality"].seconds,
                         **extra})
            rng = np.random.default_rng(0)   # the cut of qround.bench._exact_gaps, seed 0
            m, n = p.weight.shape
            k = min(args.exact_inputs, n)
            chans = np.sort(rng.choice(m, size=min(args.exact_channels, m), replace=False))
            base = p.subproblem(chans)
            small = base.restrict(np.sort(rng.choice(n, size=k, replace=False)),
                                  base.rtn_choices())
            opt = Exact(max_free=max(k, 1)).solve(small)
            b = small.lower_bound()
            span = opt.total_rtn_cost - opt.total_cost
            exact_rows.append({"layer": name, "bits": bits, "channels": len(chans),
                               "inputs": k, "bound": b.ratio, "optimum": opt.ratio,
                               "bound_gap": (b.total_cost - opt.total_cost) / span
                               if span > 0 else 0.0})
            print(f"{name} W{bits}: bound {eigen.ratio:.4f} in {eigen.seconds:.1f} s",
                  file=sys.stderr, flush=True)
    header = (f"certified lower bound, whole layers (torch, numba and BLAS threads "
              f"{args.threads}); ratios are cost / RTN's cost")
    report(argparse.Namespace(**{**vars(args), "json": None}), "lower_bound", header, rows,
           ["layer", "bits", "shape", "bound", "bound_none", "bound_s", "iterations",
            "converged", "fast", "quality", "certified_gap"]
           + (["bound64", "bound64_s", "speedup"] if args.compare_precision else []))
    print(f"\nagainst exact optima ({args.exact_channels} channels x {args.exact_inputs} inputs "
          "per layer, the rest held at RTN):")
    from qround.report import format_table
    print(format_table(exact_rows, ["layer", "bits", "channels", "inputs", "bound", "optimum",
                                    "bound_gap"]))
    if args.json:
        from _common import write_results
        write_results(args.json, "lower_bound", header, args,
                      [{**r, "table": "layers"} for r in rows] +
                      [{**r, "table": "exact"} for r in exact_rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
