"""Solver wall time at the machine's thread counts, with and without numpy's BLAS held to one
thread during a solve (``qround.solvers.base.single_threaded_blas``, on by default).

OpenBLAS's idle workers spin for a while after each call and take cores from a numba kernel
that follows; ``Solver.solve`` therefore holds BLAS to one thread while it runs.  This script
measures what that changes, on the benchmark's layers (``qround.bench.load_layers``, or a
``--layers-file`` written by ``solvers_gpu.py --save-layers``):

- each measurement runs in a fresh process, with numba and torch at ``--threads`` and numpy's
  BLAS left at its default (one thread per core); ``none`` turns the limit off in that process;
- the modes alternate (limit, none, limit, none, ...) for ``--rounds`` rounds, so both see the
  same machine load; per mode, the min and median over all its solves are reported;
- ``gptq-reference`` (``qround.baselines.gptq_quantize``, unrestricted GPTQ as users run it,
  not a ``Solver``) is timed in the same processes: the time reference of the ``fast`` target;
- ``same``: whether every solve of both modes returned the same result (a digest of the
  choices, or of GPTQ's codes).

    python benchmarks/blas_threads.py --layers-file .gpu/layers.npz --json results/blas_threads.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import int_list, write_results  # noqa: E402 (benchmarks/ is on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--solvers", default="gptq,fast", help="solver specs (default: %(default)s)")
    p.add_argument("--bits", default="3", help="weight bit widths (default: %(default)s)")
    p.add_argument("--layers", default="query,intermediate,conv2,conv3",
                   help="substrings of the layer names to run (default: %(default)s)")
    p.add_argument("--layers-file", help="read (W, H) from this .npz (solvers_gpu.py --save-layers)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="numba and torch threads (default: the number of cores, %(default)s)")
    p.add_argument("--repeats", type=int, default=15, help="timed solves per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per mode, alternating")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--child", choices=["limit", "none"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.bits = int_list(args.bits, "--bits", p, 2, 8)
    args.solvers = [t.strip() for t in args.solvers.split(",") if t.strip()]
    args.layers = [t.strip() for t in args.layers.split(",") if t.strip()]
    if min(args.threads, args.repeats, args.rounds) < 1:
        p.error("--threads, --repeats and --rounds must be >= 1")
    return args


def child(args) -> None:
    """One process: every layer x width x solver, ``--repeats`` timed solves after a warm-up.
    Prints one JSON object per (layer, bits, solver) with its times."""
    import contextlib

    import numba
    import torch

    import qround.solvers.base as base
    from qround.baselines import gptq_quantize
    from qround.grid import GridSpec
    from qround.problems.rounding import RoundingProblem
    from qround.solvers import get_solver
    from solvers_gpu import read_layers

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    if args.child == "none":
        base.single_threaded_blas = contextlib.nullcontext
    for name, w, h in read_layers(args.layers_file):
        if not any(s in name for s in args.layers):
            continue
        for bits in args.bits:
            problem = RoundingProblem.from_weight(w, h, GridSpec(bits=bits), name=name)
            runs = [(spec, lambda s=get_solver(spec): s.solve(problem, seed=0).choices)
                    for spec in args.solvers]
            runs.append(("gptq-reference", lambda: gptq_quantize(w, h, problem.grid)))
            for spec, run in runs:
                run()  # warm-up: numba cache load, torch first call
                times, digests = [], set()
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    out = run()
                    times.append(time.perf_counter() - t0)
                    digests.add(hashlib.sha1(out.tobytes()).hexdigest())
                print(json.dumps({"layer": name, "bits": bits, "solver": spec, "times": times,
                                  "digests": sorted(digests)}), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    from qround.report import format_table

    with tempfile.TemporaryDirectory(prefix="qround_blas_") as tmp:
        if not args.layers_file:
            from solvers_gpu import save_layers
            args.layers_file = os.path.join(tmp, "layers.npz")
            save_layers(args.layers_file, cnn_layers=2, seed=0)
        times: dict[tuple, dict[str, list[float]]] = {}
        digests: dict[tuple, set[str]] = {}
        here = os.path.abspath(__file__)
        for r in range(args.rounds):
            for mode in ("limit", "none"):
                cmd = [sys.executable, here, "--child", mode, "--layers-file", args.layers_file,
                       "--solvers", ",".join(args.solvers), "--bits", ",".join(map(str, args.bits)),
                       "--layers", ",".join(args.layers), "--threads", str(args.threads),
                       "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                for line in out.splitlines():
                    rec = json.loads(line)
                    key = (rec["layer"], rec["bits"], rec["solver"])
                    times.setdefault(key, {"limit": [], "none": []})[mode].extend(rec["times"])
                    digests.setdefault(key, set()).update(rec["digests"])
                print(f"  round {r + 1}/{args.rounds}: {mode} done", file=sys.stderr, flush=True)
    rows = []
    for (layer, bits, solver), t in times.items():
        med = {m: statistics.median(v) for m, v in t.items()}
        rows.append({"layer": layer, "bits": bits, "solver": solver,
                     "limit min": min(t["limit"]), "limit median": med["limit"],
                     "none min": min(t["none"]), "none median": med["none"],
                     "none / limit": med["none"] / med["limit"],
                     "same": len(digests[(layer, bits, solver)]) == 1})
    header = (f"solve wall time, numba and torch at {args.threads} threads, numpy BLAS at its "
              f"default; limit = BLAS held to 1 thread in Solver.solve, none = not; "
              f"{args.rounds} processes per mode x {args.repeats} solves")
    print(header)
    print(format_table(rows, ["layer", "bits", "solver", "limit min", "limit median", "none min",
                              "none median", "none / limit", "same"]))
    if args.json:
        write_results(args.json, "blas_threads", header, args, rows)
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
