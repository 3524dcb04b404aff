"""qround's tabu search and annealing as dimod samplers (``QroundSampler``) against
dwave-samplers' ``TabuSampler`` and ``SimulatedAnnealingSampler`` on general dense QUBOs.

Instances (generated here with fixed seeds, nothing downloaded):

- ``bqp{n}.{k}``: random QUBOs in the style of Beasley's OR-Library ``bqp`` set: n variables,
  density 10 %, integer linear and quadratic biases uniform in [-100, 100];
- with ``--layers-file`` (``solvers_gpu.py --save-layers``), the first ``--channels`` channels'
  BQMs of each layer whose name holds ``--layers``, at ``--bits`` (``RoundingProblem.to_bqm``).

Per instance and seed, in one run (one read each, from a random start):

- ``qround-tabu``: ``QroundSampler("tabu")`` with its defaults (5 rounds of 10 n steps);
- ``dwave-tabu =t``: dwave's tabu with its timeout set to qround-tabu's wall time on the same
  instance (rounded up to whole ms): equal time;
- ``dwave-tabu 20ms``: dwave's tabu with its default timeout;
- ``qround-tabu 20ms``: ``QroundSampler("tabu")`` with dwave's ``timeout=20`` (rounds until
  20 ms have passed): the same budget per read;
- ``qround-anneal``: ``QroundSampler("anneal")``, 1000 sweeps (the default);
- ``neal``: dwave's simulated annealing, 1000 sweeps (its default).

Times are wall times of the whole ``sample`` call (the dense matrix built from the BQM is in
qround's).  The gap is ``(E - E_best) / |E_best|``, E_best the lowest energy any run found on
that instance.  Each sampler gets untimed calls first, on a dense and a sparse BQM (numba and
dwave load; QroundSampler anneals BQMs below 25 % density on a sparse matrix, another kernel).

    python benchmarks/qubo_sampler.py --sizes 250,500,1000 --json results/qubo_sampler.json
"""
from __future__ import annotations

import argparse
import math
import time

from _common import int_list, write_results  # noqa: E402 (benchmarks/ is on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="250,500,1000", help="bqp sizes (default: %(default)s)")
    p.add_argument("--instances", type=int, default=3, help="bqp instances per size")
    p.add_argument("--seeds", default="0,1", help="sampler seeds (default: %(default)s)")
    p.add_argument("--layers-file", help="also the BQMs of layer channels from this .npz")
    p.add_argument("--layers", default="query,conv3", help="substrings of the layer names")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--first-instance", type=int, default=0,
                   help="index of the first bqp instance of each size (another index range "
                        "is another set of instances; default: %(default)s)")
    p.add_argument("--variants", "--tabu-variants", dest="variants", default="",
                   help="';'-separated QroundSampler settings to run as well, each as "
                        "'tabu(tenure=20)' or 'anneal(order=\'sequential\')' (default: none)")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.first_instance < 0:
        p.error("--first-instance must be >= 0")
    args.sizes = int_list(args.sizes, "--sizes", p, 2)
    args.seeds = int_list(args.seeds, "--seeds", p, 0)
    if args.instances < 1 or args.channels < 1:
        p.error("--instances and --channels must be >= 1")
    return args


def bqp(n: int, index: int, density: float = 0.1):
    """A Beasley-style random QUBO: integer biases uniform in [-100, 100], this density."""
    import dimod
    import numpy as np

    rng = np.random.default_rng([n, index])
    linear = rng.integers(-100, 101, size=n)
    rows, cols = np.triu_indices(n, 1)
    keep = rng.random(rows.size) < density
    quad = rng.integers(-100, 101, size=int(keep.sum()))
    return dimod.BinaryQuadraticModel.from_numpy_vectors(
        linear.astype(float), (rows[keep], cols[keep], quad.astype(float)), 0.0, dimod.BINARY)


def instances(args):
    for n in args.sizes:
        for k in range(args.first_instance, args.first_instance + args.instances):
            yield f"bqp{n}.{k}", bqp(n, k)
    if args.layers_file:
        from solvers_gpu import read_layers

        from qround.grid import GridSpec
        from qround.problems import RoundingProblem

        wanted = [s.strip() for s in args.layers.split(",") if s.strip()]
        for name, w, h in read_layers(args.layers_file):
            if not any(s in name for s in wanted):
                continue
            problem = RoundingProblem.from_weight(w, h, GridSpec(bits=args.bits), name=name)
            for c in range(min(args.channels, problem.num_channels)):
                yield f"{name.split(':')[-1]} W{args.bits} ch{c}", problem.to_bqm(c)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numba
    import numpy as np
    import torch
    from dwave.samplers import SimulatedAnnealingSampler, TabuSampler
    from threadpoolctl import threadpool_limits

    import dimod
    from qround.report import format_table
    from qround.solvers import QroundSampler

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    from qround.solvers.registry import normalize_spec, parse_part

    ours_tabu, ours_anneal = QroundSampler("tabu"), QroundSampler("anneal")
    ours = {"tabu": ours_tabu, "anneal": ours_anneal}
    variants = []
    for spec in (v.strip() for v in args.variants.split(";") if v.strip()):
        method, options = parse_part(spec)
        if method not in ours:
            raise SystemExit(f"--variants: {spec!r} is not a tabu or anneal spec")
        variants.append((f"qround-{normalize_spec(spec)}", ours[method], options))
    dw_tabu, neal = TabuSampler(), SimulatedAnnealingSampler()

    def timed(sampler, bqm, **kw):
        t0 = time.perf_counter()
        ss = sampler.sample(bqm, num_reads=1, **kw)
        return float(ss.first.energy), time.perf_counter() - t0

    rows = []
    with threadpool_limits(limits=args.threads):
        # one dense and one sparse BQM: QroundSampler anneals sparse ones with another kernel
        for density in (0.5, 0.05):
            warm = dimod.generators.gnp_random_bqm(60, density, "BINARY", random_state=0)
            for s in (ours_tabu, ours_anneal, dw_tabu, neal):
                s.sample(warm, num_reads=1, seed=0)
            ours_tabu.sample(warm, num_reads=1, seed=0, timeout=1)   # the clock's code path
        for name, bqm in instances(args):
            runs = []
            for seed in args.seeds:
                e, t = timed(ours_tabu, bqm, seed=seed)
                runs.append(("qround-tabu", seed, e, t))
                ms = max(1, math.ceil(t * 1000))
                runs.append(("dwave-tabu =t", seed, *timed(dw_tabu, bqm, seed=seed, timeout=ms)))
                runs.append(("dwave-tabu 20ms", seed, *timed(dw_tabu, bqm, seed=seed,
                                                               timeout=20)))
                runs.append(("qround-tabu 20ms", seed, *timed(ours_tabu, bqm, seed=seed,
                                                                timeout=20)))
                for label, sampler, options in variants:
                    runs.append((label, seed, *timed(sampler, bqm, seed=seed, **options)))
                runs.append(("qround-anneal", seed, *timed(ours_anneal, bqm, seed=seed)))
                runs.append(("neal", seed, *timed(neal, bqm, seed=seed, num_sweeps=1000)))
            best = min(r[2] for r in runs)
            for label, seed, e, t in runs:
                gap = (e - best) / abs(best) if best != 0 else float(e != best)
                rows.append({"instance": name, "n": bqm.num_variables, "sampler": label,
                             "seed": seed, "energy": e, "gap": gap, "seconds": t})
                print(f"{name} seed {seed} {label}: E {e:.6g} gap {gap:.5f} {t:.4g} s",
                      flush=True)
    summary = []
    groups = sorted({(r["instance"].split(".")[0] if r["instance"].startswith("bqp")
                      else r["instance"].rsplit(" ch", 1)[0]) for r in rows})
    for g in groups:
        for label in dict.fromkeys(r["sampler"] for r in rows):
            sel = [r for r in rows if r["sampler"] == label and
                   (r["instance"].startswith(g + ".") or r["instance"].startswith(g + " ch"))]
            summary.append({"group": g, "sampler": label, "runs": len(sel),
                            "best_found": sum(r["gap"] == 0 for r in sel),
                            "mean_gap": float(np.mean([r["gap"] for r in sel])),
                            "mean_s": float(np.mean([r["seconds"] for r in sel]))})
    table = format_table(summary, ["group", "sampler", "runs", "best_found", "mean_gap",
                                   "mean_s"])
    print(table)
    if args.json:
        write_results(args.json, "qubo_sampler", table.splitlines()[0], args,
                      rows + [{"summary": s} for s in summary])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
