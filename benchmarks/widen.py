"""Beyond floor and ceil: layer costs of ``qround.lattice.grid_descent`` on real MiniLM layers.

For each chosen Linear layer of the pretrained all-MiniLM-L6-v2 (float inputs, per-channel
symmetric MSE grid), H is captured twice: from the calibration sentences (what the solvers
see) and from held-out evaluation sentences (to check that a lower cost carries over).  Rows:
unrestricted GPTQ (``qround.baselines.gptq_quantize``), ``fast`` (floor/ceil), and both after
``grid_descent``; each with its calibration and held-out cost relative to RTN on the same H,
the number of codes beyond floor/ceil, and the seconds of the descent.

    python benchmarks/widen.py --bits 3 --json benchmarks/results/widen.json
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from qround import zoo
from qround.baselines import gptq_quantize
from qround.calibrate import capture_hessians
from qround.grid import GridSpec
from qround.lattice import grid_descent
from qround.problems.layers import layer_weight
from qround.problems.rounding import RoundingProblem
from qround.report import format_table
from qround.solvers import get_solver

from _common import int_list, write_results  # noqa: E402 (benchmarks/ is on sys.path)

DEFAULT_LAYERS = r"layer\.(0|3)\."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=DEFAULT_LAYERS,
                   help="regex on the encoder Linear layer names (default: %(default)s)")
    p.add_argument("--bits", default="3", help="comma-separated weight bits (default: 3)")
    p.add_argument("--calib-sentences", type=int, default=256)
    p.add_argument("--eval-sentences", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.bits = int_list(args.bits, "--bits", p, 2, 8)
    return args


def main(argv=None) -> int:
    import re

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = zoo.load_minilm()
    names = [n for n in zoo.minilm_linear_layers(model) if re.search(args.layers, n)]
    if not names:
        print(f"--layers {args.layers!r} matches no encoder Linear layer", file=sys.stderr)
        return 2
    calib = zoo.minilm_batches(model, zoo.sentences("calibration", args.calib_sentences))
    held = zoo.minilm_batches(model, zoo.sentences("evaluation", args.eval_sentences))
    h_cal = capture_hessians(model, calib, names, forward=zoo.minilm_forward)
    h_held = capture_hessians(model, held, names, forward=zoo.minilm_forward)
    modules = dict(model.named_modules())
    fast = get_solver("fast")
    header = (f"MiniLM layers {args.layers!r} (float inputs), per-channel symmetric MSE grid; H from "
              f"{args.calib_sentences} calibration / {args.eval_sentences} held-out sentences; "
              f"torch threads {args.threads}")
    print(header, flush=True)
    rows = []
    for name in names:
        w = layer_weight(modules[name])
        for bits in args.bits:
            p = RoundingProblem.from_weight(w, h_cal[name], GridSpec(bits=bits))
            p_held = RoundingProblem.from_weight(w, h_held[name], p.grid)
            rtn, rtn_held = p.rtn_costs().sum(), p_held.rtn_costs().sum()
            starts = {"gptq-reference": gptq_quantize(w, h_cal[name], p.grid),
                      "fast": fast.solve(p, seed=0).codes}
            for label, codes in starts.items():
                t0 = time.perf_counter()
                wide = grid_descent(p, codes)
                seconds = time.perf_counter() - t0
                for suffix, q, beyond, sec in ((label, codes, None, None),
                                               (label + "+widen", wide.codes, wide.beyond,
                                                seconds)):
                    d = np.asarray(q) - p.floor_codes
                    rows.append({
                        "layer": name.split("encoder.")[-1], "bits": bits, "method": suffix,
                        "cost/rtn": float(p.cost_of_codes(q).sum() / rtn),
                        "held-out cost/rtn": float(p_held.cost_of_codes(q).sum() / rtn_held),
                        "beyond": int(np.sum((d != 0) & ~((d == 1) & p.free)))
                        if beyond is None else beyond,
                        "descent s": sec})
                    r = rows[-1]
                    print(f"  {r['layer']:32s} W{bits} {suffix:22s} {r['cost/rtn']:.4f} "
                          f"held-out {r['held-out cost/rtn']:.4f} beyond {r['beyond']}",
                          file=sys.stderr, flush=True)
    print(format_table(rows, ["layer", "bits", "method", "cost/rtn", "held-out cost/rtn",
                              "beyond", "descent s"]))
    if args.json:
        write_results(args.json, "widen", header, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
