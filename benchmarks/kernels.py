"""Speed of the numba local-search kernels (``tabu``, ``anneal``) and of ``quality``, with a
digest of their choices, so that a kernel change can be checked for speed and for unchanged
results against another commit.

On the benchmark's layers (``qround.bench.load_layers``: MiniLM layer 0 query and intermediate,
the digits CNN's conv2 and conv3; or a ``--layers-file`` written by ``solvers_gpu.py``), per bit
width, from the ``gptq`` solution: ``tabu`` as in ``quality`` (``Tabu(stall=4000)``), ``anneal``
as in ``quality`` (``Anneal(order="sequential")``) and ``quality`` itself, each on the whole
layer, 1 thread, best of ``--repeats`` wall times.  ``digest`` is the first 12 hex digits of the
SHA-1 of the choices: equal digests mean bit-identical results.  To compare with an older commit,
run this script against that commit's package:

    git worktree add /tmp/qround-old <commit>
    PYTHONPATH=/tmp/qround-old python benchmarks/kernels.py --json old.json
    python benchmarks/kernels.py --json new.json
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time

import numpy as np

from _common import int_list, write_results  # noqa: E402 (benchmarks/ is on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="2,3,4", help="weight bit widths (default: %(default)s)")
    p.add_argument("--layers", default="query,intermediate,conv2,conv3",
                   help="substrings of the layer names to run (default: %(default)s)")
    p.add_argument("--layers-file", help="read (W, H) from this .npz (solvers_gpu.py --save-layers)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.bits = int_list(args.bits, "--bits", p, 2, 8)
    args.layers = [t for t in args.layers.split(",") if t.strip()]
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def digest(choices: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(np.asarray(choices, dtype=bool)).tobytes()).hexdigest()[:12]


def main(argv=None) -> int:
    args = parse_args(argv)
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    import qround
    from qround.grid import GridSpec
    from qround.problems.rounding import RoundingProblem
    from qround.solvers import Anneal, Tabu, get_solver

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    if args.layers_file:
        from solvers_gpu import read_layers
        layers = read_layers(args.layers_file)
    else:
        from qround.bench import BenchConfig, load_layers
        layers = load_layers(BenchConfig())
    layers = [x for x in layers if any(s in x[0] for s in args.layers)]
    solvers = {"tabu": Tabu(stall=4000), "anneal": Anneal(order="sequential"),
               "quality": get_solver("quality")}
    header = (f"numba kernels from the gptq start, qround at {qround.__file__}; 1 thread, best of "
              f"{args.repeats}")
    print(header, flush=True)
    rows = []
    with threadpool_limits(limits=1):
        for name, w, h in layers:
            for bits in args.bits:
                problem = RoundingProblem.from_weight(w, h, GridSpec(bits=bits), name=name)
                start = get_solver("gptq").solve(problem, seed=0)
                warm = problem.subproblem(slice(0, 2))
                for label, solver in solvers.items():
                    solver.solve(warm, seed=0)   # compile / load the cached kernels
                    times, sol = [], None
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        sol = solver.solve(problem, init=None if label == "quality" else start,
                                           seed=0)
                        times.append(time.perf_counter() - t0)
                    m = problem.num_channels
                    rows.append({"layer": name, "bits": bits, "solver": label,
                                 "seconds": min(times), "ms_per_channel": 1e3 * min(times) / m,
                                 "ratio": sol.ratio, "digest": digest(sol.choices)})
                    print(f"  {name} W{bits} {label}: {min(times):.3f} s, cost/RTN "
                          f"{sol.ratio:.4f}, digest {rows[-1]['digest']}", file=sys.stderr,
                          flush=True)
    from qround.report import format_table
    print(format_table(rows, ["layer", "bits", "solver", "seconds", "ms_per_channel", "ratio",
                              "digest"]))
    if args.json:
        write_results(args.json, "kernels", header, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
