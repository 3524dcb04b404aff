"""Speed of the numba local-search kernels (``tabu``, ``anneal``), against another commit's
kernels in the same run, with a check that the choices are identical.

On the benchmark's layers (``qround.bench.load_layers``: MiniLM layer 0 query and intermediate,
the digits CNN's conv2 and conv3; or a ``--layers-file`` written by ``solvers_gpu.py``), per bit
width, from the ``gptq`` solution, three kernel calls as the solvers make them:
- ``tabu (quality-v1)``: ``Tabu(stall=4000)``, the tabu stage of ``quality-v1`` (the seventh
  session's ``quality``: 5 rounds of 10 n; today's ``quality`` runs 3 per branch);
- ``tabu (fast)``: the one n-step round without descent of ``fast``;
- ``anneal (quality)``: ``Anneal(order="sequential")``, 1000 sweeps.

``--against REV`` loads ``qround/solvers/_kernels.py`` of git revision ``REV`` as a separate
module and calls its kernel and this tree's alternately on the same inputs (``--repeats`` times
each, best time kept), so both see the same machine load.  The current kernel gets the
``compact`` choice its solver makes (``_kernels.compact_pays``); ``other`` times the opposite
choice.  ``same`` is True when both kernels return bit-identical choices and energies.

    python benchmarks/kernels.py --against 2c3f1d6 --json results/kernels.json
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from _common import int_list, write_results  # noqa: E402 (benchmarks/ is on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", required=True,
                   help="git revision whose qround/solvers/_kernels.py to compare with")
    p.add_argument("--bits", default="2,3,4", help="weight bit widths (default: %(default)s)")
    p.add_argument("--layers", default="query,intermediate,conv2,conv3",
                   help="substrings of the layer names to run (default: %(default)s)")
    p.add_argument("--layers-file", help="read (W, H) from this .npz (solvers_gpu.py --save-layers)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.bits = int_list(args.bits, "--bits", p, 2, 8)
    args.layers = [t for t in args.layers.split(",") if t.strip()]
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def load_kernels_at(rev: str):
    """``qround/solvers/_kernels.py`` at git revision ``rev``, imported as its own module."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        text = subprocess.run(["git", "-C", root, "show", f"{rev}:qround/solvers/_kernels.py"],
                              check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"error: cannot read the kernels at {rev!r}: {exc}")
    text = text.replace("from ..errors import", "from qround.errors import")
    text = text.replace("from .._parallel import", "from qround._parallel import")
    folder = tempfile.mkdtemp(prefix="qround_kernels_")
    path = os.path.join(folder, "kernels_old.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("kernels_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def takes_compact(kernel) -> bool:
    return "compact" in inspect.signature(kernel.py_func).parameters


def csr_tail(module, kernel) -> tuple:
    """The ``no_csr`` argument where the kernel takes it (anneal_kernel since the twelfth
    session), or ``time_limit_ns`` (tabu_kernel since the thirteenth), else nothing."""
    params = inspect.signature(kernel.py_func).parameters
    if "no_csr" in params:
        return (module.NO_CSR,)
    return (module.NO_TIME_LIMIT,) if "time_limit_ns" in params else ()


def main(argv=None) -> int:
    args = parse_args(argv)
    import numba
    from threadpoolctl import threadpool_limits

    from qround.grid import GridSpec
    from qround.problems.rounding import RoundingProblem
    from qround.report import format_table
    from qround.solvers import _kernels as new
    from qround.solvers import get_solver
    from qround.solvers.anneal import beta_schedule
    from qround.solvers.tabu import _round_off

    old = load_kernels_at(args.against)
    numba.set_num_threads(1)
    if args.layers_file:
        from solvers_gpu import read_layers
        layers = read_layers(args.layers_file)
    else:
        from qround.bench import BenchConfig, load_layers
        layers = load_layers(BenchConfig())
    layers = [x for x in layers if any(s in x[0] for s in args.layers)]
    header = (f"numba kernels of this tree against {args.against}, interleaved on the same "
              f"inputs, from the gptq start; 1 thread, best of {args.repeats}")
    print(header, flush=True)
    rows = []
    with threadpool_limits(limits=1):
        for name, w, h in layers:
            for bits in args.bits:
                p = RoundingProblem.from_weight(w, h, GridSpec(bits=bits), name=name)
                start = get_solver("gptq").solve(p, seed=0).choices
                a = new.kernel_inputs(p, start, np.random.default_rng(0))
                nfree, n = a["nfree"], p.num_inputs
                tenure = np.minimum(np.minimum(10, nfree // 2), np.maximum(nfree - 1, 0))
                perturb = np.maximum(2, nfree // 20).astype(np.int64)
                common = (a["hess"], a["step"], a["grad"], a["start"], a["fields"], a["energy"],
                          a["free_idx"], nfree)
                long_, short = 10 * int(nfree.max()), int(nfree.max())
                cases = [
                    ("tabu (quality-v1)", "tabu_kernel",
                     common + (tenure.astype(np.int64), long_, 4000, 5, perturb, 2, True,
                               _round_off(p), a["seeds"]), 2.0 * 5 * long_),
                    ("tabu (fast)", "tabu_kernel",
                     common + (tenure.astype(np.int64), short, short, 1, perturb, 2, False,
                               _round_off(p), a["seeds"]), 2.0 * short),
                    ("anneal (quality)", "anneal_kernel",
                     common + (beta_schedule(p, start, 1000), 1, False, a["seeds"]),
                     0.05 * 1000 * float(nfree.mean())),
                ]
                for label, fn, call, passes in cases:
                    k_old, k_new = getattr(old, fn), getattr(new, fn)
                    compact = new.compact_pays(n, nfree, passes)
                    extra_old = (compact,) if takes_compact(k_old) else ()
                    extra_old += csr_tail(old, k_old)
                    tail = csr_tail(new, k_new)
                    calls = {"old": lambda: k_old(*call, *extra_old),
                             "new": lambda: k_new(*call, compact, *tail),
                             "other": lambda: k_new(*call, not compact, *tail)}
                    out, times = {}, {key: [] for key in calls}
                    for key, f in calls.items():    # compile or load, not timed
                        out[key] = f()
                    for _ in range(args.repeats):
                        for key, f in calls.items():
                            t0 = time.perf_counter()
                            f()
                            times[key].append(time.perf_counter() - t0)
                    best = {key: min(t) for key, t in times.items()}
                    same = all(np.array_equal(out["old"][i], out[key][i])
                               for key in ("new", "other") for i in (0, 1))
                    rows.append({"layer": name, "bits": bits, "kernel": label,
                                 "compact": compact, "old s": best["old"],
                                 "new s": best["new"], "speed-up": best["old"] / best["new"],
                                 "other s": best["other"], "same": same})
                    print(f"  {name} W{bits} {label}: {best['old'] / best['new']:.2f}x, "
                          f"same {same}", file=sys.stderr, flush=True)
    print(format_table(rows, ["layer", "bits", "kernel", "compact", "old s", "new s",
                              "speed-up", "other s", "same"]))
    if args.json:
        write_results(args.json, "kernels", header, args, rows)
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
