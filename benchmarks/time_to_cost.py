"""Cost against time on the same channels: our tabu search with more and more restarts, and
dwave-samplers' tabu with longer and longer timeouts.

The `quality` target of the solver issue compares a fixed setting of each (dwave tabu at 4 reads
of 100 ms); this script shows how both trade time for cost, so the two can be compared at equal
time.  On the first ``--channels`` channels of each layer (the benchmark's layers,
``qround.bench.load_layers``, or a ``--layers-file`` written by ``solvers_gpu.py
--save-layers``), with torch, numba and BLAS at ``--threads``:

- ``quality`` as registered;
- ``gptq+tabu rN``: GPTQ, then iterated tabu search with N restarts (each round ends after 4000
  steps without a new best, as in ``quality``'s branches);
- ``dwave-tabu Tms``: dwave-samplers' ``TabuSampler`` through dimod, 4 reads of T ms per
  channel, from rounding-to-nearest.

Each solver gets one untimed call on a small problem first (numba and dimod load).  Reports
cost / RTN and seconds per channel.

    python benchmarks/time_to_cost.py --layers-file .gpu/layers.npz --json results/time_to_cost.json
"""
from __future__ import annotations

import argparse

from _common import first_channels_runs, int_list, write_results  # noqa: E402 (benchmarks/ is on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="2", help="weight bit widths (default: %(default)s)")
    p.add_argument("--layers", default="query,intermediate,conv2,conv3",
                   help="substrings of the layer names to run (default: %(default)s)")
    p.add_argument("--layers-file", help="read (W, H) from this .npz (solvers_gpu.py "
                                         "--save-layers) instead of building the layers")
    p.add_argument("--channels", type=int, default=16, help="first channels of each layer")
    p.add_argument("--restarts", default="2,8,32", help="tabu restarts (default: %(default)s)")
    p.add_argument("--timeouts", default="5,25,100",
                   help="dwave tabu timeouts in ms, 4 reads each (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    args.bits = int_list(args.bits, "--bits", p, 2, 8)
    args.restarts = int_list(args.restarts, "--restarts", p, 0)
    args.timeouts = int_list(args.timeouts, "--timeouts", p, 1)
    return args


def solvers(args) -> dict:
    from qround.solvers import GPTQ, Chain, DimodSolver, Tabu, get_solver

    out = {"quality": get_solver("quality")}
    for r in args.restarts:
        out[f"gptq+tabu r{r}"] = Chain(GPTQ(), Tabu(stall=4000, restarts=r))
    for t in args.timeouts:
        out[f"dwave-tabu {t}ms"] = DimodSolver("dwave-tabu", timeout=t, num_reads=4)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import numba
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from qround.grid import GridSpec
    from qround.problems import RoundingProblem
    from qround.report import format_table

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    if args.layers_file:
        from solvers_gpu import read_layers

        layers = read_layers(args.layers_file)
    else:
        from qround.bench import BenchConfig, load_layers

        layers = load_layers(BenchConfig(seed=args.seed))
    wanted = [s.strip() for s in args.layers.split(",") if s.strip()]
    layers = [entry for entry in layers if any(s in entry[0] for s in wanted)]
    todo = solvers(args)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16))
    tiny = RoundingProblem.from_weight(rng.normal(size=(2, 16)), x.T @ x / 64, GridSpec(bits=2))
    with threadpool_limits(limits=args.threads):
        for solver in todo.values():
            solver.solve(tiny, seed=args.seed)  # warm-up, not timed
        runs = first_channels_runs(
            layers, args.bits, args.channels, todo, args.seed,
            log=lambda r: print(f"{r['layer']} W{r['bits']} {r['solver']}: {r['ratio']:.4f} "
                                f"of RTN, {r['seconds'] / r['channels']:.4g} s/ch", flush=True))
    rows = [{"layer": r["layer"], "bits": r["bits"], "solver": r["solver"], "ratio": r["ratio"],
             "s_per_ch": r["seconds"] / r["channels"]} for r in runs]
    table = format_table(rows, ["layer", "bits", "solver", "ratio", "s_per_ch"])
    print(table)
    if args.json:
        write_results(args.json, "time_to_cost", table.splitlines()[0], args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
