"""A grouped conv's problems solved one group at a time, or merged into one problem.

    python benchmarks/grouped_merge.py --threads 1 --json benchmarks/results/grouped_merge.json

``problems_from_layer(layer, H, spec, merge_groups=False)`` gives a grouped conv one problem per
group, each with its group's shared H; ``merge_groups=True`` gives one problem whose H is per
channel (each output channel its group's), the same cost per channel.  ``quantize_model`` merges
(``merge_groups="auto"``) when the groups have at most 4 output channels.  This times both on one
layer per case, with statistics of correlated random inputs (no model is run): problem builds
(grid fits, checks) plus solves, for each solver, one thread by default, in the same run; the
solvers' kernels are loaded before timing.  Reported: seconds apart and merged, their ratio, and
the merged cost over the per-group cost (1 for deterministic solvers).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn

from qround.grid import GridSpec
from qround.problems import problems_from_layer
from qround.solvers import get_solver, warm_up

from _common import report  # noqa: E402 (benchmarks/ is on sys.path)

# name, groups, output channels per group, input channels per group, kernel
CASES = [
    ("depthwise 960 (MobileNetV2's widest)", 960, 1, 1, 3),
    ("depthwise 144, multiplier 2", 144, 2, 1, 3),
    ("64 groups of 4", 64, 4, 4, 3),
    ("32 groups of 8 (ResNeXt-like)", 32, 8, 4, 3),
    ("16 groups of 16", 16, 16, 8, 3),
    ("4 groups of 64", 4, 64, 16, 3),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--solvers", default="fast,quality,gptq",
                   help="comma-separated solver specs (default: %(default)s)")
    p.add_argument("--bits", type=int, default=3, help="weight bits (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch and numba threads (default 1)")
    p.add_argument("--json", help="write the table to this JSON file")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be a positive integer")
    args.solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    if not args.solvers:
        p.error("--solvers names no solver")
    return args


def statistics(groups: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(groups, n, n) second moments of correlated inputs, one per group."""
    x = rng.standard_normal((groups, 4 * n + 64, n))
    x[:, :, 1:] += 0.5 * x[:, :, :-1]
    return np.einsum("gsi,gsj->gij", x, x) / x.shape[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import numba
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    solvers = {spec: get_solver(spec) for spec in args.solvers}
    warm_up(*solvers.values())
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    spec = GridSpec(bits=args.bits)
    rows = []
    for name, groups, out_g, in_g, k in CASES:
        layer = nn.Conv2d(groups * in_g, groups * out_g, k, groups=groups)
        h = statistics(groups, in_g * k * k, rng)
        for label, solver in solvers.items():
            result = {}
            for merge in (False, True):   # merged second: warm caches favour it, if anything
                t0 = time.perf_counter()
                problems = problems_from_layer(layer, h, spec, name, merge_groups=merge)
                cost = sum(solver.solve(p, seed=0).total_cost for p in problems)
                result[merge] = (time.perf_counter() - t0, cost, len(problems))
            (ta, ca, na), (tm, cm, nm) = result[False], result[True]
            rows.append({"layer": name, "solver": label, "problems": f"{na} -> {nm}",
                         "apart_s": ta, "merged_s": tm, "speed_up": ta / tm,
                         "cost_ratio": cm / ca})
    header = (f"one grouped conv per case, synthetic statistics, W{args.bits}; problem builds + "
              f"solves; torch and numba threads {args.threads}")
    report(args, "grouped_merge", header, rows,
           ["layer", "solver", "problems", "apart_s", "merged_s", "speed_up", "cost_ratio"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
