"""Reconstruction granularity (MRECG) on the residual digits CNNs: layer vs block (BRECQ) vs
modcap vs loss, with the loss along depth (MRECG's Figure 1) and the search time of ``loss``
(MRECG supplement, Table 1).

    python benchmarks/mrecg.py                    # 2 CNNs x W2A4,W3A3,W2A2 x 3 seeds, 300 steps
    python benchmarks/mrecg.py --quick            # 1 seed, W2A4, 30 steps (a check, ~2 min)
    python benchmarks/mrecg.py --json benchmarks/results/mrecg/mrecg.json

Models: ``train_digits_cnn(arch, seed=s)`` for arch ``residual`` (5 blocks / 7 layers along
depth) and ``deep`` (:class:`~qround.zoo.digits.DeepResidualDigitsCNN`: 8 blocks / 12 layers,
with a narrow 1x1 ``squeeze`` after the last block), s = 0, 1, 2; calibration split = 179 images
in batches of 64; test split = 359 images.  Quantisation as ``benchmarks/aquant.py``: weights
per output channel, asymmetric, MSE scale, the stem and the classifier at 8 bits; activations:
every inner layer's input at the A bits (LSQ steps, nearest rounding), the classifier's input
at 8 bits, the image in float.  Reconstruction: :class:`ReconstructConfig` defaults (QDrop
p = 0.5, lr 1e-2 for V, 1e-3 for steps, batch 32, lambda 0.01, beta 20 -> 2) apart from the
iterations per unit and the seed (= the training seed).

Granularities (:mod:`qround.granularity`): ``layer`` (every layer alone), ``block`` (BRECQ's
blocks), ``modcap`` (base units merged with a successor of smaller capacity, params x weight
bits), ``loss`` (quick pass of ``--search-fraction`` of the steps on the base units, then the
``--k`` largest oscillation points merged); ``--base`` is the units modcap and loss start from.

Reported per arch, width and granularity over the seeds: test accuracy (mean, std, per seed),
the relative logit error ``||z_q - z||^2 / ||z||^2`` on the test set, the number of units, the
oscillation points of the loss along depth after reconstruction (unit MSE, and relative MSE
= MSE / mean square of the float output) and seconds (for ``loss``, its search seconds apart).
Plots (first seed, every granularity on one axis, each layer carrying its unit's loss) go to
``--out-dir``: ``{arch}_{width}_mse.png`` and ``{arch}_{width}_relative.png``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from qround import GridSpec, zoo
from qround.activations import insert_act_quantizers
from qround.calibrate import select_layers
from qround.granularity import (GRANULARITIES, LEVELS, METRICS, loss_along_depth, plot_losses,
                                reconstruct_with_granularity)
from qround.reconstruct import ReconstructConfig
from qround.report import environment, format_table, write_json_atomic
from _common import _choices, set_threads  # noqa: E402 (benchmarks/ is on sys.path)

WIDTHS = {"W2A4": (2, 4), "W3A3": (3, 3), "W2A2": (2, 2), "W4A4": (4, 4)}
ARCHS = ("residual", "deep", "deep-narrow", "mobile")
OUTER = ("stem", "fc")  # first and last layer: 8-bit weights, as BRECQ/QDrop/MRECG keep them


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=None,
                   help=f"digits CNNs, of {','.join(ARCHS)} (default: residual,deep)")
    p.add_argument("--seeds", default=None, help="training seeds (default: 0,1,2; --quick: 0)")
    p.add_argument("--bits", default=None,
                   help="widths (default: W2A4,W3A3,W2A2; --quick: W2A4)")
    p.add_argument("--methods", default="layer,block,modcap,loss",
                   help="granularities (default: %(default)s)")
    p.add_argument("--k", type=int, default=2,
                   help="oscillation points merged by loss (default: %(default)s, as MRECG's "
                        "ResNet-18)")
    p.add_argument("--base", default="block", choices=LEVELS,
                   help="units modcap and loss start from (default: %(default)s)")
    p.add_argument("--metric", default="mse", choices=METRICS,
                   help="loss distribution of the loss search (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=None,
                   help="Adam steps per unit (default 300, 30 with --quick)")
    p.add_argument("--search-fraction", type=float, default=0.2,
                   help="steps of the quick loss pass, as a fraction of --iterations "
                        "(default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="one seed, W2A4, 30 steps per unit")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "results", "mrecg"),
                   help="folder for the plots (default: benchmarks/results/mrecg)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.archs = _choices(args.archs or "residual,deep", ARCHS, "--archs", p)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")
                  if s.strip()]
    args.bits = _choices(args.bits or ("W2A4" if args.quick else "W2A4,W3A3,W2A2"), WIDTHS,
                      "--bits", p)
    args.methods = _choices(args.methods, [g for g in GRANULARITIES if g != "scheme"],
                         "--methods", p)
    if args.iterations is None:
        args.iterations = 30 if args.quick else 300
    if args.iterations < 1 or args.k < 1 or not 0 < args.search_fraction <= 1:
        p.error("--iterations and --k must be >= 1, --search-fraction in (0, 1]")
    return args


def build(model, calibration, wbits: int, abits: int):
    """The model with quantisers inserted (steps calibrated, weights at nearest)."""
    inner = [n for n in select_layers(model) if n not in OUTER]
    bits = {n: abits for n in inner} | {"stem": None, "fc": 8}
    weights = {n: GridSpec(bits=wbits, symmetric=False, scale_method="mse") for n in inner}
    weights |= {n: GridSpec(bits=8, symmetric=False, scale_method="mse") for n in OUTER}
    return insert_act_quantizers(model, None, bits, calib_batches=calibration, weights=weights)


@torch.no_grad()
def logit_error(model, qmodel, images) -> float:
    z, zq = model(images), qmodel(images)
    return float(((zq - z) ** 2).sum() / (z ** 2).sum())


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(1)
    header = (f"MRECG granularity on the digits CNNs {args.archs}: seeds {args.seeds}, "
              f"{args.iterations} Adam steps per unit, base {args.base}, k {args.k}, loss "
              f"search {args.search_fraction:g} of the steps ({args.metric}), torch and numba threads 1")
    print(header, flush=True)
    if not args.no_plots:
        os.makedirs(args.out_dir, exist_ok=True)
    start = time.perf_counter()
    results: dict[tuple, dict[str, list]] = {}
    float_acc: dict[str, list[float]] = {}
    profiles: list[dict] = []
    plots: list[str] = []
    search_iterations = max(1, round(args.search_fraction * args.iterations))
    for arch in args.archs:
        for seed in args.seeds:
            model, data = zoo.train_digits_cnn(arch, seed=seed)
            calibration = list(data.calib_images.split(64))
            float_acc.setdefault(arch, []).append(
                zoo.accuracy(model, data.test_images, data.test_labels))
            config = ReconstructConfig(iterations=args.iterations, seed=seed)
            for width in args.bits:
                wbits, abits = WIDTHS[width]
                qmodel = build(model, calibration, wbits, abits)
                curves = {}
                for method in args.methods:
                    t0 = time.perf_counter()
                    res, sel = reconstruct_with_granularity(
                        model, qmodel, calibration, method, k=args.k, base=args.base,
                        config=config, search_iterations=search_iterations, metric=args.metric)
                    seconds = time.perf_counter() - t0
                    acc = zoo.accuracy(res.model, data.test_images, data.test_labels)
                    err = logit_error(model, res.model, data.test_images)
                    mse, rel = loss_along_depth(res, "mse"), loss_along_depth(res, "relative")
                    curves[method] = (mse, rel)
                    e = results.setdefault((arch, width, method), {k: [] for k in (
                        "accuracy", "logit_error", "units", "osc", "osc_rel", "seconds",
                        "search_seconds", "merged")})
                    e["accuracy"].append(acc)
                    e["logit_error"].append(err)
                    e["units"].append(len(res.blocks))
                    e["osc"].append(len(mse["oscillation"]))
                    e["osc_rel"].append(len(rel["oscillation"]))
                    e["seconds"].append(seconds)
                    e["search_seconds"].append(sel.search_seconds)
                    e["merged"].append([u.name for u in sel.units if len(u.modules) > 1])
                    profiles.append({"arch": arch, "seed": seed, "bits": width,
                                     "method": method, "selection": sel.as_dict(),
                                     "accuracy": acc, "logit_error": err,
                                     "loss_along_depth": mse, "relative_along_depth": rel})
                    print(f"  {arch} seed {seed} {width} {method:6s} units {len(res.blocks):2d} "
                          f"accuracy {acc:.4f}  logit err {err:.4f}  osc {e['osc'][-1]} "
                          f"(rel {e['osc_rel'][-1]})  {seconds:6.1f} s  merged "
                          f"{e['merged'][-1]}", file=sys.stderr, flush=True)
                if not args.no_plots and seed == args.seeds[0]:
                    for i, metric in enumerate(METRICS):
                        path = os.path.join(args.out_dir, f"{arch}_{width}_{metric}.png")
                        plot_losses({m: c[i] for m, c in curves.items()}, path,
                                    title=f"{arch} digits CNN {width}, seed {seed}, "
                                          f"{args.iterations} steps/unit ({metric})")
                        plots.append(path)

    rows = []
    for arch, accs in float_acc.items():
        mean, std = summarise(accs)
        rows.append({"arch": arch, "bits": "float", "method": "float", "accuracy": mean,
                     "std": std, "per_seed": accs})
    for (arch, width, method), e in results.items():
        acc, err = summarise(e["accuracy"]), summarise(e["logit_error"])
        rows.append({"arch": arch, "bits": width, "method": method,
                     "units": statistics.fmean(e["units"]), "accuracy": acc[0], "std": acc[1],
                     "per_seed": e["accuracy"], "logit_err": err[0], "logit_err_std": err[1],
                     "osc": statistics.fmean(e["osc"]), "osc_rel": statistics.fmean(e["osc_rel"]),
                     "seconds": statistics.fmean(e["seconds"]),
                     "search_s": statistics.fmean(e["search_seconds"]) if method == "loss"
                     else 0.0, "merged": e["merged"]})
    table_rows = [dict(r, per_seed=" ".join(f"{a:.4f}" for a in r["per_seed"])) for r in rows]
    print(format_table(table_rows, ["arch", "bits", "method", "units", "accuracy", "std",
                                    "per_seed", "logit_err", "logit_err_std", "osc", "osc_rel",
                                    "seconds", "search_s"]))
    for r in rows:
        if r.get("method") in ("modcap", "loss"):
            print(f"  {r['arch']} {r['bits']} {r['method']} merged units per seed: "
                  f"{r['merged']}")
    if plots:
        print("plots: " + ", ".join(plots))
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "mrecg", "header": header,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "search_iterations": search_iterations,
            "config": {k: v for k, v in ReconstructConfig(iterations=args.iterations)
                       .__dict__.items() if k != "seed"},
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "environment": environment(), "rows": rows,
            "profiles": profiles, "plots": plots,
            "seconds": total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
