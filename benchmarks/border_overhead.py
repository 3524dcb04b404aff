"""Run-time overhead of AQuant borders on a saved MiniLM with quantised activations.

    qround quantize --model minilm --wbits 4 --abits 8 --borders quadratic --iterations 100 \
        --out w4a8.safetensors
    python benchmarks/border_overhead.py w4a8.safetensors --json results/border_overhead.json

The saved model is loaded (``qround.export.load``) and run on a fixed batch of evaluation
sentences in two modes of its quantised layers: ``border`` (the learned borders, as saved) and
``nearest`` (the same steps, rounding at 0.5).  Modes alternate call by call so that load from
other processes hits both alike; two warm-up rounds are not timed.  Reported: the median wall
and thread-CPU milliseconds of the whole forward and, from forward hooks, of the quantised
Linear layers alone (activation quantiser + matmul), and the border / nearest ratios.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from qround import export, zoo
from qround.activations import quantized_layers
from qround.report import environment, format_table, write_json_atomic

MODES = ("border", "nearest")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="a MiniLM saved by `qround quantize --abits A --borders ...`")
    p.add_argument("--sentences", type=int, default=64, help="batch of evaluation sentences")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", help="write the results to this JSON file")
    return p.parse_args(argv)


def time_modes(model, batch, layers, repeats: int) -> dict:
    """Median ms per forward, whole model and summed over the quantised layers, per mode."""
    spent = {"layers": 0.0, "cpu_layers": 0.0}
    starts = {}

    def pre(module, args):
        starts[module] = (time.perf_counter(), time.thread_time())

    def post(module, args, out):
        t0, c0 = starts.pop(module)
        spent["layers"] += time.perf_counter() - t0
        spent["cpu_layers"] += time.thread_time() - c0

    handles = [h for m in layers for h in (m.register_forward_pre_hook(pre),
                                           m.register_forward_hook(post))]
    samples = {f"{kind}_{mode}": [] for mode in MODES
               for kind in ("model", "cpu_model", "layers", "cpu_layers")}
    try:
        with torch.no_grad():
            for r in range(repeats + 2):
                for mode in MODES:
                    for m in layers:
                        m.act_mode = mode
                    spent.update(layers=0.0, cpu_layers=0.0)
                    t0, c0 = time.perf_counter(), time.thread_time()
                    zoo.minilm_forward(model, batch)
                    if r >= 2:
                        samples[f"model_{mode}"].append(time.perf_counter() - t0)
                        samples[f"cpu_model_{mode}"].append(time.thread_time() - c0)
                        samples[f"layers_{mode}"].append(spent["layers"])
                        samples[f"cpu_layers_{mode}"].append(spent["cpu_layers"])
    finally:
        for h in handles:
            h.remove()
        for m in layers:
            m.act_mode = "border"
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = export.load(zoo.load_minilm(), args.file)
    model.eval()
    layers = [m for m in quantized_layers(model).values() if m.act_mode == "border"]
    if not layers:
        print(f"{args.file}: no layer rounds its activations with borders", file=sys.stderr)
        return 2
    batch = zoo.minilm_batches(model, zoo.sentences("evaluation", args.sentences),
                               batch_size=args.sentences)[0]
    ms = time_modes(model, batch, layers, args.repeats)
    rows = []
    for kind in ("model", "layers"):
        for clock in ("", "cpu_"):
            b, n = ms[f"{clock}{kind}_border"], ms[f"{clock}{kind}_nearest"]
            rows.append({"part": f"{'quantised layers' if kind == 'layers' else 'whole model'}",
                         "clock": "cpu" if clock else "wall", "border_ms": b, "nearest_ms": n,
                         "ratio": b / n})
    header = (f"{args.file}: {len(layers)} layers with borders; batch {args.sentences} "
              f"sentences ({tuple(batch['input_ids'].shape)} tokens); torch threads "
              f"{args.threads}; median of {args.repeats}")
    print(header)
    print(format_table(rows, ["part", "clock", "border_ms", "nearest_ms", "ratio"]))
    if args.json:
        write_json_atomic(args.json, {"benchmark": "border_overhead", "header": header,
                                      "settings": vars(args), "rows": rows, "ms": ms,
                                      "torch": torch.__version__,
                                      "python": platform.python_version(),
                                      "environment": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
