"""Solver wall time at the machine's thread counts, two variants in alternating processes:
numpy's BLAS held to one thread during a solve or not (``qround.solvers.base.
single_threaded_blas``, on by default), or this tree against another commit (``--against``).

OpenBLAS's idle workers spin for a while after each call and take cores from a numba kernel
that follows; ``Solver.solve`` therefore holds BLAS to one thread on small layers.  On the
benchmark's layers (``qround.bench.load_layers``, or a ``--layers-file`` written by
``solvers_gpu.py --save-layers``):

- each measurement runs in a fresh process, with numba and torch at ``--threads`` and numpy's
  BLAS left at its default (one thread per core) or at ``--blas-threads``;
- without ``--against``: ``limit`` (as shipped) against ``none`` (the limit switched off in that
  process); with ``--against REV``: ``new`` (this tree) against ``old`` (a temporary git
  worktree of REV, first on ``PYTHONPATH``);
- the variants alternate for ``--rounds`` rounds, so both see the same machine load; per
  variant, the min and median over all its solves are reported;
- ``gptq-reference`` (``qround.baselines.gptq_quantize``, unrestricted GPTQ as users run it,
  not a ``Solver``) is timed in the same processes: the time reference of the ``fast`` target;
- ``same``: whether every solve of both variants returned the same result (a digest of the
  choices, or of GPTQ's codes).  The script exits non-zero otherwise.

    python benchmarks/solve_time.py --layers-file .gpu/layers.npz --json results/blas_threads.json
    python benchmarks/solve_time.py --against HEAD~1 --solvers fast,quality --json results/ab.json
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

from _common import int_list, split_specs, write_results  # noqa: E402 (benchmarks/ is on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--solvers", default="gptq,fast", help="solver specs (default: %(default)s)")
    p.add_argument("--bits", default="3", help="weight bit widths (default: %(default)s)")
    p.add_argument("--layers", default="query,intermediate,conv2,conv3",
                   help="substrings of the layer names to run (default: %(default)s)")
    p.add_argument("--layers-file",
                   help="read (W, H) from this .npz (solvers_gpu.py --save-layers)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="numba and torch threads (default: the number of cores, %(default)s)")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="pin numpy's BLAS to this many threads in every process (default: leave "
                        "it at its default, one per core)")
    p.add_argument("--repeats", type=int, default=15, help="timed solves per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per mode, alternating")
    p.add_argument("--against", help="git revision to compare this tree with (default: compare "
                                     "the BLAS limit on and off)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--child", choices=["limit", "none"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.bits = int_list(args.bits, "--bits", p, 2, 8)
    args.solvers = split_specs(args.solvers)
    args.layers = [t.strip() for t in args.layers.split(",") if t.strip()]
    if min(args.threads, args.repeats, args.rounds, args.blas_threads or 1) < 1:
        p.error("--threads, --blas-threads, --repeats and --rounds must be >= 1")
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
    if args.blas_threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=args.blas_threads, user_api="blas")
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
                    # each timed solve is a first one: a problem caches its RTN energies, which
                    # a user's single solve of a fresh layer pays for (trees before the cache
                    # have no _cache)
                    getattr(problem, "_cache", {}).clear()
                    t0 = time.perf_counter()
                    out = run()
                    times.append(time.perf_counter() - t0)
                    digests.add(hashlib.sha1(out.tobytes()).hexdigest())
                print(json.dumps({"layer": name, "bits": bits, "solver": spec, "times": times,
                                  "digests": sorted(digests)}), flush=True)


def worktree(rev: str, folder: str) -> str:
    """A detached git worktree of ``rev`` in ``folder`` (removed by :func:`drop_worktree`)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "-q", folder, rev],
                       check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"error: cannot check out {rev!r}: {getattr(exc, 'stderr', exc)}")
    return root


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    from qround.report import format_table

    here = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory(prefix="qround_solve_time_") as tmp:
        if not args.layers_file:
            from solvers_gpu import save_layers
            args.layers_file = os.path.join(tmp, "layers.npz")
            save_layers(args.layers_file, cnn_layers=2, seed=0)
        env = dict(os.environ)
        if args.against:
            old_tree = os.path.join(tmp, "old")
            root = worktree(args.against, old_tree)
            old_env = {**env, "PYTHONPATH": os.pathsep.join(
                [old_tree] + [p for p in [env.get("PYTHONPATH")] if p])}
            variants = {"new": ("limit", env), "old": ("limit", old_env)}
        else:
            variants = {"limit": ("limit", env), "none": ("none", env)}
        (a, b) = variants
        times: dict[tuple, dict[str, list[float]]] = {}
        digests: dict[tuple, set[str]] = {}
        try:
            for r in range(args.rounds):
                for label, (mode, child_env) in variants.items():
                    cmd = [sys.executable, here, "--child", mode, "--layers-file",
                           args.layers_file, "--solvers", ",".join(args.solvers),
                           "--bits", ",".join(map(str, args.bits)), "--layers",
                           ",".join(args.layers), "--threads", str(args.threads),
                           "--repeats", str(args.repeats)]
                    if args.blas_threads:
                        cmd += ["--blas-threads", str(args.blas_threads)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                         env=child_env).stdout
                    for line in out.splitlines():
                        rec = json.loads(line)
                        key = (rec["layer"], rec["bits"], rec["solver"])
                        times.setdefault(key, {a: [], b: []})[label].extend(rec["times"])
                        digests.setdefault(key, set()).update(rec["digests"])
                    print(f"  round {r + 1}/{args.rounds}: {label} done", file=sys.stderr,
                          flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "-C", root, "worktree", "remove", "--force", old_tree],
                               capture_output=True)
    rows = []
    for (layer, bits, solver), t in times.items():
        med = {m: statistics.median(v) for m, v in t.items()}
        rows.append({"layer": layer, "bits": bits, "solver": solver,
                     f"{a} min": min(t[a]), f"{a} median": med[a],
                     f"{b} min": min(t[b]), f"{b} median": med[b],
                     f"{b} / {a}": med[b] / med[a],
                     "same": len(digests[(layer, bits, solver)]) == 1})
    what = (f"this tree (new) against {args.against} (old)" if args.against else
            "limit = BLAS held to 1 thread in Solver.solve, none = not")
    blas = f"at {args.blas_threads}" if args.blas_threads else "at its default"
    header = (f"solve wall time, numba and torch at {args.threads} threads, numpy BLAS {blas}; "
              f"{what}; {args.rounds} processes per variant x {args.repeats} solves")
    print(header)
    print(format_table(rows, ["layer", "bits", "solver", f"{a} min", f"{a} median", f"{b} min",
                              f"{b} median", f"{b} / {a}", "same"]))
    if args.json:
        write_results(args.json, "solve_time", header, args, rows)
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
