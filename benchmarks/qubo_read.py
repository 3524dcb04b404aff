"""Reading qbsolv ``.qubo`` files: ``read_qubo_bqm`` and ``read_qubo`` of this tree against the
``qround/problems/qubo_files.py`` of a git revision (``--ref``; default 18617f9, the reader
before the thirty-eighth session), in one process, on generated dense QUBOs (random values
written with ``repr``, as qround writes them), and whether both give bit-identical results.
Times are the best of ``--repeats`` calls.

    python benchmarks/qubo_read.py --sizes 384,2000 --repeats 3 --json results/qubo_read.json
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

from _common import int_list, report, set_threads  # noqa: E402 (benchmarks/ is on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="384,2000", help="variables (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref", default="18617f9", help="git revision of the reference reader")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    args.sizes = int_list(args.sizes, "--sizes", p, 1)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def write_dense(path: str, n: int, seed: int) -> int:
    """A dense QUBO of ``n`` variables in qbsolv format (``c offset`` line, comment, header,
    n linear lines, n(n-1)/2 couplers); returns the number of couplers."""
    import numpy as np

    rng = np.random.default_rng(seed)
    iu, ju = np.triu_indices(n, k=1)
    lin, quad = rng.normal(size=n), rng.normal(size=len(iu)) * 1e-3
    with open(path, "w") as f:
        f.write(f"c offset {float(rng.normal())!r}\nc a benchmark QUBO\n"
                f"p qubo 0 {n} {n} {len(iu)}\n")
        f.writelines(f"{i} {i} {v!r}\n" for i, v in enumerate(lin.tolist()))
        f.writelines(f"{a} {b} {v!r}\n" for a, b, v in zip(iu.tolist(), ju.tolist(),
                                                           quad.tolist()))
    return len(iu)


def load_reference(ref: str, tmp: str):
    """The module ``qround/problems/qubo_files.py`` at git revision ``ref``, loaded as a module
    of the qround.problems package (so its relative imports resolve)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "-C", root, "show", f"{ref}:qround/problems/qubo_files.py"],
                         check=True, capture_output=True, text=True).stdout
    path = os.path.join(tmp, "qubo_files_ref.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("qround.problems._qubo_files_ref", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def best(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def identical(name: str, a, b) -> bool:
    import numpy as np

    if name == "read_qubo":
        return (a.Q.tobytes() == b.Q.tobytes() and float(a.offset).hex() == float(b.offset).hex()
                and a.nodes.dtype == b.nodes.dtype and np.array_equal(a.nodes, b.nodes))
    x, y = a.to_numpy_vectors(), b.to_numpy_vectors()
    return (x[0].tobytes() == y[0].tobytes() and a.vartype == b.vartype and x[2] == y[2]
            and all(u.tobytes() == v.tobytes() for u, v in zip(x[1], y[1])))


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    from qround.problems import qubo_files as new

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = load_reference(args.ref, tmp)
        for n in args.sizes:
            path = os.path.join(tmp, f"d{n}.qubo")
            couplers = write_dense(path, n, seed=n)
            mb = os.path.getsize(path) / 2 ** 20
            for name in ("read_qubo_bqm", "read_qubo"):
                t_old, r_old = best(lambda: getattr(old, name)(path), args.repeats)
                t_new, r_new = best(lambda: getattr(new, name)(path), args.repeats)
                rows.append({"n": n, "couplers": couplers, "MiB": round(mb, 1), "reader": name,
                             "before_s": t_old, "after_s": t_new, "speedup": t_old / t_new,
                             "identical": identical(name, r_old, r_new)})
                print(f"n={n} {name}: {t_old:.3f} s -> {t_new:.3f} s", file=sys.stderr,
                      flush=True)
    header = (f"reading .qubo files: this tree against {args.ref} (best of {args.repeats}, "
              f"{args.threads} thread(s))")
    report(args, "qubo_read", header, rows,
           ["n", "couplers", "MiB", "reader", "before_s", "after_s", "speedup", "identical"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
