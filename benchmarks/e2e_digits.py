"""End-to-end digits CNN benchmark: quantise every Conv2d/Linear weight of a digits CNN
(``qround.zoo.train_digits_cnn(arch, seed=s)``, ``--arch``: plain by default; ``mobile`` is the
MobileNetV2-style one with depthwise convs) and measure test accuracy with activations
fake-quantised at ``--abits`` bits (per-tensor min-max ranges from the calibration split).

    python benchmarks/e2e_digits.py --json results/e2e_digits.json
    python benchmarks/e2e_digits.py --bits W3 --seeds 0 --methods rtn-mse,gptq
    python benchmarks/e2e_digits.py --arch mobile --json results/e2e_digits_mobile.json

Methods as in ``e2e_minilm.py``: ``rtn-minmax``, ``rtn-mse``, ``gptq`` (the real GPTQ, MSE
scales, act-order, 1% damping, sequential), ``hopfield`` (AdaRound relaxation through
``quantize_model``) and ``solvers`` (``quantize_model`` with each spec of ``--solvers``).
Weights are per-channel symmetric; calibration uses the calibration split.  Reported per method
and width: mean accuracy over the seeds, its standard deviation and range, and mean seconds.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from qround import zoo
from qround.baselines import gptq_model, rtn_model
from qround.evaluate import digits_accuracy
from qround.report import environment, format_table, write_json_atomic
from qround.zoo.digits import ARCHS
from _common import (e2e_finish, e2e_parser, plan, refits_of, set_threads,  # noqa: E402
                     warm_up_solvers)

WIDTHS = {"W4": 4, "W3": 3, "W2": 2}
METHODS = ("rtn-minmax", "rtn-mse", "gptq", "hopfield", "solvers")


def parse_args(argv=None) -> argparse.Namespace:
    p = e2e_parser(__doc__, WIDTHS, METHODS)
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default: %(default)s)")
    p.add_argument("--arch", default="plain", choices=ARCHS,
                   help="which digits CNN (default: %(default)s)")
    p.add_argument("--abits", type=int, default=8,
                   help="activation bits at evaluation (0 = float activations; default 8)")
    p.add_argument("--first-last-bits", type=int, default=None,
                   help="keep the first and last layer at this width (default: same as weights)")
    p.add_argument("--batch-size", type=int, default=64, help="calibration batch size")
    args = e2e_finish(p, argv, WIDTHS, METHODS)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    return args


def quantise(label: str, spec: str | None, model, calibration, bits: int, args):
    """Quantised copy of ``model`` and the wall seconds of the call."""
    from qround.bench import extra_solvers   # named solvers with parameters, e.g. quality-v1
    from qround.pipeline import QuantConfig, quantize_model

    config = QuantConfig(wbits=bits, symmetric=True, group_size=None,
                         scale_method="minmax" if label == "rtn-minmax" else "mse",
                         solver=extra_solvers().get(spec, spec) if spec else "nearest", first_last_bits=args.first_last_bits,
                         device=args.device, inputs=args.inputs, correction=args.correction,
                         progress=args.progress, refits=refits_of(label) if spec else 0,
                         widen=args.widen and bool(spec))
    start = time.perf_counter()
    if label.startswith("rtn"):
        qmodel, _ = rtn_model(model, config, example=calibration[0])
    elif label == "gptq":
        qmodel, _ = gptq_model(model, calibration, config)
    else:
        qmodel = quantize_model(model, calibration, config).model
    return qmodel, time.perf_counter() - start


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    warm_up_solvers(args.solvers)   # kernel loading stays out of the first row's seconds
    abits = args.abits or None
    runs, notes = plan(args)
    header = (f"digits CNN ({args.arch}) e2e: all Conv2d/Linear weights, per-channel symmetric, "
              f"activations {'float' if abits is None else f'{abits}-bit'} at evaluation; "
              f"seeds {args.seeds}; torch and numba threads {args.threads}, device {args.device}")
    print(header, flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)

    results: dict[tuple[str, str], dict[str, list[float]]] = {}

    def record(width, label, acc, seconds):
        entry = results.setdefault((width, label), {"accuracy": [], "seconds": []})
        entry["accuracy"].append(acc)
        entry["seconds"].append(seconds)

    for seed in args.seeds:
        model, data = zoo.train_digits_cnn(args.arch, seed=seed)
        calibration = [data.calib_images[i:i + args.batch_size]
                       for i in range(0, len(data.calib_images), args.batch_size)]
        record("float", "float (W32A32)", digits_accuracy(model, data), 0.0)
        if abits is not None:
            record("float", f"float (W32A{abits})", digits_accuracy(model, data, abits), 0.0)
        for width in args.bits:
            for label, spec in runs:
                qmodel, seconds = quantise(label, spec, model, calibration, WIDTHS[width], args)
                acc = digits_accuracy(qmodel, data, abits)
                record(width, label, acc, seconds)
                print(f"  seed {seed} {width} {label:22s} accuracy {acc:.4f}  {seconds:7.2f} s",
                      file=sys.stderr, flush=True)

    rows = []
    for (width, label), entry in results.items():
        acc = summarise(entry["accuracy"])
        rows.append({"weights": width, "method": label, "accuracy": acc["mean"],
                     "std": acc["std"], "min": acc["min"], "max": acc["max"],
                     "seconds": statistics.fmean(entry["seconds"]),
                     "per_seed": entry["accuracy"]})
    print(format_table(rows, ["weights", "method", "accuracy", "std", "min", "max", "seconds"]))
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "e2e_digits", "header": header, "notes": notes,
            "settings": {k: v for k, v in vars(args).items()
                         if k not in ("json", "progress")},
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
