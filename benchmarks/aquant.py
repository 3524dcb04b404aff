"""AQuant on the residual digits CNN: nearest activation rounding vs learned rounding borders,
both with LSQ steps and the same block reconstruction of the weight rounding (BRECQ/QDrop
style), at W4A4, W3A3, W2A4 and W2A2; AQuant's Table 3 ablations (linear vs quadratic border,
fusion vs none) at W2A2; and the inference overhead of the borders on the CPU.

    python benchmarks/aquant.py                   # default: 3 seeds, 300 steps per block
    python benchmarks/aquant.py --quick           # 60 steps per block (~2 min)
    python benchmarks/aquant.py --json results/aquant.json

Setup (``train_digits_cnn('residual', seed=s)``, s = 0, 1, 2; calibration split = 179 images in
batches of 64; test split = 359 images).  Weights: per output channel, asymmetric, MSE scale;
the stem and the classifier at 8 bits (as BRECQ/QDrop/AQuant keep the first and last layer).
Activations: the inputs of the four block convs and of ``down`` at the A bits, the classifier's
input at 8 bits, the image (stem input) in float.  Reconstruction blocks: ``stem``, ``block1``,
``down``, ``block2``, ``fc`` (auto-detected), :class:`ReconstructConfig` defaults apart from the
iterations (QDrop p = 0.5, lr 1e-3 for borders, 1e-2 for V, 1e-3 for steps, batch 32).
Methods: ``nearest`` (borders none), ``aquant`` (quadratic + fusion, the paper's full method),
ablations ``linear`` (linear + fusion) and ``no-fusion`` (quadratic, element-wise).

Reported per method and width over the seeds: test accuracy (mean, std, per seed), the relative
logit error ``||z_q - z||^2 / ||z||^2`` on the test set (more sensitive than the accuracy of a
~99% model: one test image is 0.28 points), the summed calibration block MSE after
reconstruction, and seconds.  Overhead: time per forward of one reconstructed W4A4 AQuant model
on a batch of 64 test images with torch threads 1 (no autograd), in "border" mode (the inference
path: F.conv2d of a base rounding plus a sparse correction, the codes of the im2col path) vs
"nearest" mode (quantise + F.conv2d), with the im2col paths (border and nearest through im2col +
matmul, the training path) as references; wall-clock and the thread's CPU time (robust to load
from other processes on a shared machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time

import torch

from qround import GridSpec, zoo
from qround.activations import insert_act_quantizers, quantized_layers
from qround.reconstruct import ReconstructConfig, reconstruct
from qround.report import environment, format_table, write_json_atomic

WIDTHS = {"W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4), "W2A2": (2, 2)}
METHODS = {"nearest": ("none", True), "aquant": ("quadratic", True),
           "linear": ("linear", True), "no-fusion": ("quadratic", False)}
INNER = ("block1.conv1", "block1.conv2", "down", "block2.conv1", "block2.conv2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default: %(default)s)")
    p.add_argument("--bits", default=",".join(WIDTHS), help="widths (default: %(default)s)")
    p.add_argument("--ablation-bits", default="W2A2",
                   help="widths for the Table 3 ablations, '' for none (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=None,
                   help="Adam steps per block (default 300, 60 with --quick)")
    p.add_argument("--lr-border", type=float, default=None,
                   help="Adam learning rate of the borders (default: ReconstructConfig's, 1e-3)")
    p.add_argument("--quick", action="store_true", help="60 steps per block, fewer timings")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.bits = [b for b in args.bits.split(",") if b]
    args.ablation_bits = [b for b in args.ablation_bits.split(",") if b]
    bad = [b for b in args.bits + args.ablation_bits if b not in WIDTHS]
    if bad:
        p.error(f"unknown widths {bad}; choose from {list(WIDTHS)}")
    if args.iterations is None:
        args.iterations = 60 if args.quick else 300
    return args


def build(model, calibration, wbits: int, abits: int, method: str):
    """The model with quantisers inserted (steps calibrated, weights at nearest)."""
    borders, fusion = METHODS[method]
    bits = {n: abits for n in INNER} | {"stem": None, "fc": 8}
    weights = {n: GridSpec(bits=wbits, symmetric=False, scale_method="mse") for n in INNER}
    weights |= {n: GridSpec(bits=8, symmetric=False, scale_method="mse") for n in ("stem", "fc")}
    return insert_act_quantizers(model, None, bits, borders=borders, fusion=fusion,
                                 calib_batches=calibration, weights=weights)


@torch.no_grad()
def logit_error(model, qmodel, images) -> float:
    z, zq = model(images), qmodel(images)
    return float(((zq - z) ** 2).sum() / (z ** 2).sum())


MODES = (("border", "border", False), ("nearest", "nearest", False),
         ("border-im2col", "border", True), ("nearest-im2col", "nearest", True))


@torch.no_grad()
def overhead(qmodel, images, repeats: int) -> dict:
    """Median ms per forward (wall clock, and ``cpu_`` the thread's CPU time) of the same
    reconstructed model in each execution mode: "border" (the inference path: conv of a base
    rounding + sparse correction), "nearest" (quantise + F.conv2d), "border-im2col" (im2col +
    border + matmul, the training path), "nearest-im2col" (nearest through im2col + matmul).
    Modes are interleaved call by call so that load from other processes hits them alike; two
    warm-up rounds are not timed."""
    layers = [m for m in quantized_layers(qmodel).values() if m.act_mode == "border"]
    wall: dict[str, list[float]] = {label: [] for label, _, _ in MODES}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in MODES}
    try:
        for r in range(repeats + 2):
            for label, mode, unfold in MODES:
                for m in layers:
                    m.act_mode, m.force_unfold = mode, unfold
                t0, c0 = time.perf_counter(), time.thread_time()
                qmodel(images)
                if r >= 2:
                    wall[label].append(time.perf_counter() - t0)
                    cpu[label].append(time.thread_time() - c0)
    finally:
        for m in layers:
            m.act_mode, m.force_unfold = "border", False
    out = {label: 1e3 * statistics.median(t) for label, t in wall.items()}
    out |= {f"cpu_{label}": 1e3 * statistics.median(t) for label, t in cpu.items()}
    for prefix in ("", "cpu_"):
        for label in ("border", "border-im2col"):
            out[f"{prefix}ratio_{label}_vs_nearest"] = (out[prefix + label]
                                                        / out[prefix + "nearest"])
    return out


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    config = ReconstructConfig(iterations=args.iterations)
    if args.lr_border is not None:
        config = dataclasses.replace(config, lr_border=args.lr_border)
    plan = [(w, m) for w in args.bits for m in ("nearest", "aquant")]
    plan += [(w, m) for w in args.ablation_bits for m in ("linear", "no-fusion", "aquant")
             if (w, m) not in plan]
    header = (f"AQuant on the residual digits CNN: seeds {args.seeds}, {args.iterations} Adam "
              f"steps per block (border lr {config.lr_border:g}), QDrop p={config.qdrop}, "
              f"torch threads 1")
    print(header, flush=True)
    start = time.perf_counter()
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    timing = None
    float_acc = []
    for seed in args.seeds:
        model, data = zoo.train_digits_cnn("residual", seed=seed)
        calibration = list(data.calib_images.split(64))
        float_acc.append(zoo.accuracy(model, data.test_images, data.test_labels))
        for width, method in plan:
            wbits, abits = WIDTHS[width]
            t0 = time.perf_counter()
            qmodel = build(model, calibration, wbits, abits, method)
            res = reconstruct(model, qmodel, calibration, config=config)
            seconds = time.perf_counter() - t0
            acc = zoo.accuracy(res.model, data.test_images, data.test_labels)
            entry = results.setdefault((width, method), {k: [] for k in (
                "accuracy", "logit_error", "block_mse", "seconds", "reverted")})
            entry["accuracy"].append(acc)
            entry["logit_error"].append(logit_error(model, res.model, data.test_images))
            entry["block_mse"].append(sum(b.loss_after for b in res.blocks))
            entry["seconds"].append(seconds)
            entry["reverted"].append(sum(b.reverted for b in res.blocks))
            print(f"  seed {seed} {width} {method:9s} accuracy {acc:.4f}  logit err "
                  f"{entry['logit_error'][-1]:.4f}  {seconds:6.1f} s", file=sys.stderr,
                  flush=True)
            if timing is None and width == "W4A4" and method == "aquant":
                timing = overhead(res.model, data.test_images[:64], 30 if args.quick else 100)

    rows = [{"bits": "float", "method": "float", "accuracy": statistics.fmean(float_acc),
             "std": statistics.stdev(float_acc) if len(float_acc) > 1 else 0.0,
             "per_seed": float_acc}]
    for (width, method), e in results.items():
        acc, err = summarise(e["accuracy"]), summarise(e["logit_error"])
        rows.append({"bits": width, "method": method, "accuracy": acc["mean"], "std": acc["std"],
                     "logit_err": err["mean"], "logit_err_std": err["std"],
                     "block_mse": statistics.fmean(e["block_mse"]),
                     "seconds": statistics.fmean(e["seconds"]), "per_seed": e["accuracy"],
                     "reverted_blocks": sum(e["reverted"])})
    table_rows = [dict(r, per_seed=" ".join(f"{a:.4f}" for a in r["per_seed"])) for r in rows]
    print(format_table(table_rows, ["bits", "method", "accuracy", "std", "per_seed",
                                    "logit_err", "logit_err_std", "block_mse", "seconds"]))
    if timing:
        print("\nborder overhead (W4A4 AQuant model, batch 64, CPU, 1 thread, no autograd, median "
              "ms per forward, wall / thread CPU time):")
        for label, _, _ in MODES:
            ratio = timing.get(f"ratio_{label}_vs_nearest")
            print(f"  {label:15s} {timing[label]:8.3f} / {timing['cpu_' + label]:8.3f}"
                  + (f"   x{ratio:.2f} / x{timing[f'cpu_ratio_{label}_vs_nearest']:.2f} of nearest"
                     if ratio else ""))
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "aquant", "header": header,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "config": {k: v for k, v in config.__dict__.items()},
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "environment": environment(), "rows": rows,
            "overhead_ms": timing,
            "seconds": total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
