"""Transposed convolutions rounded end to end: qround.zoo's conv autoencoder of the digits
(two Conv2d, then two ConvTranspose2d), made explicit with
``qround.conv_transpose.explicit_conv_transpose``, every weight rounded, then fused back.

    python benchmarks/e2e_autoencoder.py --threads 1 --json benchmarks/results/e2e_autoencoder.json

Per width and method (``nearest``, ``gptq`` (the solver: GPTQ restricted to floor or ceil),
``fast``, ``quality``), over the training seeds: the test reconstruction error (mean squared
error of the fused quantised model on the test digits; float's for reference), its ratio to
nearest's of the same seed, the summed layer cost of the two transposed layers relative to
nearest's, and the seconds of ``quantize_model``.  Weights per channel, symmetric, MSE scales;
calibration is the calibration split in batches of 60.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from qround import zoo
from qround.conv_transpose import explicit_conv_transpose, fuse_conv_transpose
from qround.pipeline import QuantConfig, quantize_model
from qround.report import format_table

from _common import int_list, warm_up_solvers, write_results  # noqa: E402 (on sys.path)

METHODS = ("nearest", "gptq", "fast", "quality")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="2,3,4", help="weight widths (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated solver specs (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", help="write the table to this JSON file")
    args = p.parse_args(argv)
    args.bits = int_list(args.bits, "--bits", p, 2, 8)
    args.seeds = int_list(args.seeds, "--seeds", p, 0)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or "nearest" not in args.methods:
        p.error("--methods must include nearest (the ratios are to it)")
    if args.threads < 1:
        p.error("--threads must be a positive integer")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warm_up_solvers(args.methods)   # kernel loading stays out of the first row's seconds
    runs: dict[tuple[int, str], dict[str, list[float]]] = {}
    floats = []
    for seed in args.seeds:
        model, data = zoo.train_digits_autoencoder(seed=seed)
        floats.append(zoo.reconstruction_error(model, data.test_images))
        explicit = explicit_conv_transpose(model)
        calibration = list(data.calib_images.split(60))
        for bits in args.bits:
            base = None
            for method in ["nearest"] + [m for m in args.methods if m != "nearest"]:
                start = time.perf_counter()
                qm = quantize_model(explicit, calibration, QuantConfig(
                    wbits=bits, solver=method, seed=seed, progress=False))
                seconds = time.perf_counter() - start
                error = zoo.reconstruction_error(fuse_conv_transpose(qm.model),
                                                 data.test_images)
                cost = sum(r.cost for r in qm.report if r.layer.endswith(".conv"))
                if base is None:
                    base = (error, cost)
                entry = runs.setdefault((bits, method), {k: [] for k in (
                    "error", "error_ratio", "transposed_cost_ratio", "seconds")})
                entry["error"].append(error)
                entry["error_ratio"].append(error / base[0])
                entry["transposed_cost_ratio"].append(cost / base[1])
                entry["seconds"].append(seconds)
                print(f"  seed {seed} W{bits} {method:8s} error {error:.5f} "
                      f"({error / base[0]:.3f} of nearest)  {seconds:.2f} s", file=sys.stderr,
                      flush=True)
    rows = [{"weights": "float", "method": "float", "error": statistics.fmean(floats),
             "error_std": statistics.pstdev(floats), "error_ratio": None,
             "transposed_cost_ratio": None, "seconds": 0.0, "per_seed": floats}]
    for (bits, method), entry in runs.items():
        rows.append({"weights": f"W{bits}", "method": method,
                     "error": statistics.fmean(entry["error"]),
                     "error_std": statistics.pstdev(entry["error"]),
                     "error_ratio": statistics.fmean(entry["error_ratio"]),
                     "transposed_cost_ratio": statistics.fmean(entry["transposed_cost_ratio"]),
                     "seconds": statistics.fmean(entry["seconds"]),
                     "per_seed": entry["error"]})
    header = (f"digits conv autoencoder (ConvTranspose2d decoder), explicit -> quantize_model "
              f"-> fused; test reconstruction MSE; means over seeds {args.seeds} (std: "
              f"population); torch threads {args.threads}")
    print(header)
    print(format_table(rows, ["weights", "method", "error", "error_std", "error_ratio",
                              "transposed_cost_ratio", "seconds"]))
    if args.json:
        write_results(args.json, "e2e_autoencoder", header, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
