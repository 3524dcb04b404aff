"""BatchNorm folded before rounding, or left in float, on the digits MobileNet.

    python benchmarks/fold_bn.py --threads 1 --json benchmarks/results/fold_bn.json

For each seed the MobileNetV2-style digits CNN (``qround.zoo``, arch "mobile", 14 BatchNorms)
is quantised twice with the same solver, bits and calibration split: as it is (the BatchNorms
stay in float, the convs before them are rounded) and after ``qround.fold.fold_batchnorm``
(the rounded weights are the folded ones an integer accelerator runs).  Reported per width:
the test accuracy of both with the inputs of every conv and Linear fake-quantised to
``--abits`` bits (per-tensor min-max ranges from the calibration split, as
``qround.evaluate.digits_accuracy``), the summed layer cost over RTN's, and the share of the
folded model's codes that equal the unfolded model's (per-channel rounding costs only scale
with the folded factor, so it is the same problem; `nearest` and `gptq` choose the same codes,
while the round-off of folding, down to later layers' statistics, moves tabu's paths).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from qround.evaluate import digits_accuracy
from qround.fold import fold_batchnorm
from qround.pipeline import QuantConfig, quantize_model
from qround.zoo.digits import train_digits_cnn

from _common import report, set_threads, warm_up_solvers  # noqa: E402 (on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--solver", default="fast", help="solver spec (default: %(default)s)")
    p.add_argument("--bits", default="2,3,4", help="weight widths (default: %(default)s)")
    p.add_argument("--abits", type=int, default=8, help="activation bits at evaluation "
                   "(default 8)")
    p.add_argument("--seeds", default="0,1,2", help="model seeds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch and numba threads (default 1)")
    p.add_argument("--json", help="write the table to this JSON file")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be a positive integer")
    try:
        args.bits = [int(b) for b in args.bits.split(",") if b.strip()]
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error("--bits and --seeds take comma-separated integers")
    if not args.bits or not args.seeds:
        p.error("--bits and --seeds need at least one value each")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    warm_up_solvers([args.solver])
    runs: dict[tuple[int, str], list[dict]] = {}
    for seed in args.seeds:
        model, data = train_digits_cnn("mobile", seed=seed)
        calibration = [data.calib_images[i:i + 64]
                       for i in range(0, len(data.calib_images), 64)]
        folded = fold_batchnorm(model)
        for bits in args.bits:
            config = QuantConfig(wbits=bits, solver=args.solver, seed=seed, progress=False)
            plain = quantize_model(model, calibration, config)
            fold = quantize_model(folded, calibration, config)
            same = sum(int(np.sum(plain.layers[n].codes == fold.layers[n].codes))
                       for n in plain.layers)
            total = sum(plain.layers[n].codes.size for n in plain.layers)
            for label, qm in (("BN in float", plain), ("BN folded", fold)):
                runs.setdefault((bits, label), []).append({
                    "seed": seed,
                    "accuracy": digits_accuracy(qm.model, data, args.abits),
                    "ratio": qm.totals()["ratio"],
                    "same_codes": same / total})
    rows = []
    for (bits, label), per_seed in runs.items():
        acc = [r["accuracy"] for r in per_seed]
        rows.append({"weights": f"W{bits}", "model": label,
                     "accuracy": statistics.fmean(acc),
                     "std": statistics.pstdev(acc),
                     "ratio": statistics.fmean(r["ratio"] for r in per_seed),
                     "same_codes": statistics.fmean(r["same_codes"] for r in per_seed),
                     "per_seed": acc})
    header = (f"digits MobileNet (arch mobile), {args.solver}, A{args.abits} at evaluation, "
              f"seeds {args.seeds}; mean over seeds (std: population); torch and numba "
              f"threads {args.threads}")
    report(args, "fold_bn", header, rows,
           ["weights", "model", "accuracy", "std", "ratio", "same_codes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
