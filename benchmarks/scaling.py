"""Time and memory against layer size, up to the layers of a 7B-parameter LLM.

The solver benchmark (``qround bench``) runs on MiniLM's 384- and 1536-wide layers and the
digits CNN.  Users of GPTQ and llm-compressor ask what a 4096 x 4096 attention projection or a
4096 -> 11008 MLP projection costs.  No such pretrained layer installs offline here, so the
layers are **synthetic**: Gaussian weights (std 0.02) and ``H = X^T X / rows`` of heavy-tailed
(Student t, 4 degrees of freedom) correlated features with a few outlier dimensions, the same
recipe as the tests' ``correlated_hessian`` (rows = 2 n; generated in float32, then float64).
Times of ``gptq`` and of the problem build depend on the shape only; the local searches
(``greedy``, ``tabu-fast``, ``fast``) also on how many flips the data needs, so read their times
as indicative for real layers.

Per layer size and solver, one child process (so that its peak memory is its own):
- ``build s``: ``RoundingProblem.from_weight(W, H, GridSpec(bits))``: the PSD check, the grid's
  mse scale search, the QUBO's linear terms;
- ``solve s``: the solver on the whole layer (untimed calls on a small problem first: numba
  kernels load); ``gptq-reference`` is unrestricted GPTQ as its users run it
  (``qround.baselines.gptq_quantize``), ``--subset-solvers`` run on the first
  ``--subset-channels`` channels only and report seconds per channel;
- ``mse-search`` / ``mse-search-numpy``: the grid's mse scale search alone, compiled (what
  ``fit_grid`` runs) and the numpy search it replaced (checked to choose the same scales);
  ``greedy-numpy``: ``greedy``'s descent as the batched numpy loop its compiled kernel replaced
  (checked to make the same flips);
- ``cost/RTN`` on the channels solved;
- ``peak MiB``: the child's peak resident size during the build or the solve (the larger);
  ``build MiB``: the build's peak above what the child held before it (the problem's arrays
  and temporaries); ``solve MiB``: the solve's peak above what the child held after the build
  (the solver's own work, beyond memory the build freed to the allocator).  The kernel's peak
  counter (``VmHWM``, which ``ru_maxrss`` also reads) is reset before each.

torch, numba and numpy's BLAS run at ``--threads``.

    python benchmarks/scaling.py --json results/scaling/scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from _common import int_list, write_results  # noqa: E402 (benchmarks/ is on sys.path)

DEFAULT_SIZES = "384x384,1024x1024,2048x2048,4096x4096"


def _sizes(text: str, parser) -> list[tuple[int, int]]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            n, m = (int(v) for v in item.lower().split("x"))
        except ValueError:
            parser.error(f"--sizes: expected INxOUT items such as 4096x11008, got {item!r}")
        if n < 8 or m < 1:
            parser.error(f"--sizes: {item!r} is too small (at least 8 inputs and 1 output)")
        out.append((n, m))
    if not out:
        parser.error("--sizes is empty")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help="layer sizes as INxOUT (default: %(default)s)")
    p.add_argument("--bits", type=int, default=4, help="weight bits (default: %(default)s)")
    p.add_argument("--solvers", default="nearest,gptq,gptq-reference,greedy,tabu-fast,fast",
                   help="solvers run on whole layers (default: %(default)s)")
    p.add_argument("--subset-solvers", default="quality",
                   help="solvers run on the first --subset-channels channels (default: %(default)s)")
    p.add_argument("--subset-channels", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch, numba and BLAS threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this JSON file")
    # internal: one measurement in a child process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--solver", help=argparse.SUPPRESS)
    p.add_argument("--channels", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.child:
        args.sizes = _sizes(args.sizes, p)
        args.solvers = [s for s in args.solvers.split(",") if s.strip()]
        args.subset_solvers = [s for s in args.subset_solvers.split(",") if s.strip()]
        int_list(str(args.bits), "--bits", p, 2, 8)
        if args.subset_channels < 1 or args.threads < 1:
            p.error("--subset-channels and --threads must be >= 1")
    return args


def make_layer(n: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (W (m, n), H (n, n)): see the module docstring."""
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((n, n), dtype=np.float32) / np.float32(np.sqrt(n))
           + np.eye(n, dtype=np.float32))
    x = rng.standard_t(4, size=(2 * n, n)).astype(np.float32) @ mix
    x[:, : max(1, n // 256)] *= 8.0  # outlier dimensions, as in transformer activations
    h = (x.T @ x).astype(np.float64) / x.shape[0]
    h = 0.5 * (h + h.T)
    w = rng.standard_normal((m, n)) * 0.02
    return w, h


def _status_mib(key: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak since the last :func:`_reset_peak`)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> None:
    """Reset the kernel's resident peak (``VmHWM``) to the current size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args) -> dict:
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    import qround
    from qround.bench import direct_cost
    from qround.solvers import warm_up

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    with threadpool_limits(limits=args.threads):
        data = np.load(args.data)
        w, h = np.array(data["w"]), np.array(data["h"])
        # untimed first calls (numba kernels load, torch sets up) before anything is measured
        qround.fit_grid(w[:2, :16], qround.GridSpec(bits=args.bits))
        if args.solver == "gptq-reference":
            from qround.baselines import gptq_quantize

            gptq_quantize(w[:2, :16], h[:16, :16], qround.fit_grid(w[:2, :16]))
        elif args.solver in ("mse-search", "mse-search-numpy", "greedy-numpy"):
            warm_up(qround.get_solver("greedy"))
        else:
            solver = qround.get_solver(args.solver)
            warm_up(solver)
        held0 = _status_mib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        problem = qround.RoundingProblem.from_weight(w, h, qround.GridSpec(bits=args.bits))
        build = time.perf_counter() - t0
        sub = problem.subproblem(np.arange(args.channels)) if args.channels else problem
        rtn = float(sub.rtn_costs().sum())
        build_peak = _status_mib("VmHWM")
        held1 = _status_mib("VmRSS")
        _reset_peak()
        if args.solver == "gptq-reference":
            t0 = time.perf_counter()
            codes = gptq_quantize(w, h, problem.grid)
            seconds = time.perf_counter() - t0
            cost = direct_cost(problem, w, h, codes)
        elif args.solver in ("mse-search", "mse-search-numpy"):
            # the grid's scale search alone, compiled or the numpy reference (same choice)
            from qround.grid import _mse_search, _mse_search_numpy, qrange

            search = _mse_search if args.solver == "mse-search" else _mse_search_numpy
            spec = qround.GridSpec(bits=args.bits)
            wg = w[:, None, :]
            lo, hi = wg.min(axis=2), wg.max(axis=2)
            t0 = time.perf_counter()
            scale, _ = search(wg, lo, hi, np.linspace(1.0, spec.min_shrink, spec.shrink_steps),
                              *qrange(spec.bits, True), True)
            seconds = time.perf_counter() - t0
            if not np.array_equal(scale, problem.grid.scale):
                raise SystemExit("the scale search chose other scales than fit_grid")
            cost = rtn
        elif args.solver == "greedy-numpy":
            # greedy's descent as the batched numpy loop the compiled kernel replaced
            from qround.solvers.local import steepest_descent, steepest_descent_numpy

            start = sub.rtn_choices()
            t0 = time.perf_counter()
            b, _ = steepest_descent_numpy(sub, start)
            seconds = time.perf_counter() - t0
            if not np.array_equal(b, steepest_descent(sub, start)[0]):
                raise SystemExit("the numpy descent and the kernel made different flips")
            cost = float(sub.costs(b).sum())
        else:
            t0 = time.perf_counter()
            sol = solver.solve(sub, seed=args.seed)
            seconds = time.perf_counter() - t0
            cost = float(sol.total_cost)
        solve_peak = _status_mib("VmHWM")
    return {"build_s": build, "solve_s": seconds, "channels": sub.num_channels,
            "ratio": cost / rtn if rtn > 0 else float("nan"),
            "build_peak_mib": build_peak, "solve_peak_mib": solve_peak,
            "build_mib": build_peak - held0, "solve_mib": solve_peak - held1}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    rows = []
    header = (f"{'layer (in x out)':>17} {'solver':>15} {'channels':>8} {'build s':>8} "
              f"{'solve s':>9} {'s/channel':>10} {'cost/RTN':>9} {'peak MiB':>9} "
              f"{'build MiB':>9} {'solve MiB':>9}")   # peak: the larger of build's and solve's
    print(f"synthetic layers, {args.bits}-bit per-channel mse grid, {args.threads} threads")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for n, m in args.sizes:
            path = os.path.join(tmp, f"layer_{n}x{m}.npz")
            w, h = make_layer(n, m, args.seed)
            np.savez(path, w=w, h=h)
            del w, h
            runs = [(s, 0) for s in args.solvers] + [(s, min(args.subset_channels, m))
                                                       for s in args.subset_solvers]
            for solver, channels in runs:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--data", path,
                       "--solver", solver, "--channels", str(channels), "--bits", str(args.bits),
                       "--threads", str(args.threads), "--seed", str(args.seed)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    print(f"{n:>7} x {m:<7} {solver:>15} failed: {' | '.join(tail)}")
                    rows.append({"inputs": n, "outputs": m, "solver": solver,
                                 "error": "\n".join(tail)})
                    continue
                r = json.loads(lines[-1][len("RESULT "):])
                row = {"inputs": n, "outputs": m, "solver": solver, **r,
                       "seconds_per_channel": r["solve_s"] / r["channels"]}
                rows.append(row)
                print(f"{n:>7} x {m:<7} {solver:>15} {r['channels']:>8} {r['build_s']:>8.2f} "
                      f"{r['solve_s']:>9.3f} {row['seconds_per_channel']:>10.5f} "
                      f"{r['ratio']:>9.4f} "
                      f"{max(r['build_peak_mib'], r['solve_peak_mib']):>9.0f} {r['build_mib']:>9.0f} "
                      f"{r['solve_mib']:>9.0f}",
                      flush=True)
                if args.json:
                    write_results(args.json, "scaling", header, args, rows)


if __name__ == "__main__":
    main()
