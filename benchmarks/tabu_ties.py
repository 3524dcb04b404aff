"""Tabu search's tie-breaking on QUBOs with integer biases, in one run: ``QroundSampler("tabu")``
with ``ties="first"`` (the lowest index, the layer solver's rule) and ``ties="random"`` (the
sampler's default), and dwave-samplers' TabuSampler, at the same ``timeout`` per read.

Instances (dimod generators, fixed seeds): ``ran_r(1, ...)`` on a random 3-regular graph
(+-1 couplings), ``frustrated_loop`` on a 2-d grid, ``chimera_anticluster(8)``, ``ran_r(1,
...)`` on a dense G(n, 0.5) graph, and a ``gnp_random_bqm`` with real-valued biases (where ties
are rare and both rules should agree).  Best energy over the reads (lower is better) and the
call's wall seconds; warm-up calls are untimed.

    python benchmarks/tabu_ties.py --threads 1 --json benchmarks/results/tabu_ties.json
"""
from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeouts", default="250,1000",
                   help="milliseconds per read, comma-separated (default: %(default)s)")
    p.add_argument("--reads", default="8,2",
                   help="reads for each timeout, comma-separated (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and numba threads (default: %(default)s)")
    p.add_argument("--no-dwave", action="store_true", help="leave out dwave's TabuSampler")
    p.add_argument("--json", help="write the table to this JSON file")
    args = p.parse_args(argv)
    args.timeouts = [int(t) for t in args.timeouts.split(",")]
    args.reads = [int(r) for r in args.reads.split(",")]
    if len(args.timeouts) != len(args.reads):
        p.error("--timeouts and --reads need as many entries each")
    return args


def instances() -> dict:
    import dimod
    import networkx as nx

    g = dimod.generators
    return {
        "ran1 3-regular n=2000": g.ran_r(1, nx.random_regular_graph(3, 2000, seed=3), seed=3),
        "frustrated loop 40x40": g.frustrated_loop(nx.grid_2d_graph(40, 40), 1600, seed=4),
        "chimera anticluster 8": g.chimera_anticluster(8, seed=2),
        "ran1 G(500, 0.5)": g.ran_r(1, nx.gnp_random_graph(500, 0.5, seed=1), seed=1),
        "gnp 1000 p=0.1 real": g.gnp_random_bqm(1000, 0.1, "BINARY", random_state=5),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from _common import report, set_threads

    from qround.solvers import QroundSampler, warm_up

    set_threads(args.threads)
    ours = QroundSampler("tabu")
    samplers = {"qround ties=first": lambda b, r, t: ours.sample(
                    b, num_reads=r, seed=args.seed, timeout=t, ties="first"),
                "qround ties=random": lambda b, r, t: ours.sample(
                    b, num_reads=r, seed=args.seed, timeout=t, ties="random")}
    if not args.no_dwave:
        from dwave.samplers import TabuSampler

        dwave = TabuSampler()
        samplers["dwave tabu"] = lambda b, r, t: dwave.sample(b, num_reads=r, seed=args.seed,
                                                              timeout=t)
    warm_up(ours, timeout=10)
    rows = []
    for name, bqm in instances().items():
        for sampler, run in samplers.items():
            run(bqm, 1, 5)   # untimed: first call on this size
            for reads, timeout in zip(args.reads, args.timeouts):
                t0 = time.perf_counter()
                energy = float(run(bqm, reads, timeout).first.energy)
                rows.append({"instance": name, "variables": bqm.num_variables,
                             "sampler": sampler, "reads": reads, "timeout_ms": timeout,
                             "energy": energy, "seconds": time.perf_counter() - t0})
                print(f"{name} {sampler} {reads}x{timeout} ms: {energy:g}", file=sys.stderr,
                      flush=True)
    report(args, "tabu_ties", f"tabu tie-breaking at equal timeout per read; threads "
           f"{args.threads}; seed {args.seed}", rows,
           ["instance", "variables", "sampler", "reads", "timeout_ms", "energy", "seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
