"""Whole-model MiniLM quantisation with and without the capture cache (qround.prefix_cache).

Each round quantises the 36 encoder layers of all-MiniLM-L6-v2 twice in this process, once with
``capture_cache_mb=0`` (every capture pass runs the model from its first module) and once with
the cache (default budget), in alternating order, and reports the wall time, the summed capture
and solve times of the report, and whether the two runs wrote identical codes.

    python benchmarks/capture_cache.py --inputs quantized,asymmetric --rounds 2 --threads 2 \
        --json benchmarks/results/e2e/capture_cache.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", default="quantized,asymmetric",
                   help="statistics sources to time (QuantConfig.inputs), comma-separated")
    p.add_argument("--solver", default="fast")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--sentences", type=int, default=256, help="calibration sentences")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs per inputs setting")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from qround import zoo
    from qround.pipeline import QuantConfig, quantize_model
    from qround.report import format_table

    torch.set_num_threads(args.threads)
    model = zoo.load_minilm()
    batches = zoo.minilm_batches(model, zoo.sentences("calibration", n=args.sentences))
    rows = []
    for inputs in [x for x in args.inputs.split(",") if x]:
        for r in range(args.rounds):
            codes = {}
            order = (0.0, None) if r % 2 == 0 else (None, 0.0)
            for mb in order:
                extra = {} if mb is None else {"capture_cache_mb": mb}
                cfg = QuantConfig(wbits=args.wbits, solver=args.solver, inputs=inputs,
                                  layers=r"\.encoder\.", progress=False, **extra)
                t0 = time.perf_counter()
                q = quantize_model(model, batches, cfg, forward=zoo.minilm_forward)
                wall = time.perf_counter() - t0
                cache = "off" if mb == 0.0 else "on"
                codes[cache] = {n: w.codes for n, w in q.layers.items()}
                rows.append({"inputs": inputs, "round": r, "cache": cache,
                             "wall_s": round(wall, 2),
                             "capture_s": round(sum(x.capture_seconds for x in q.report), 2),
                             "solve_s": round(sum(x.seconds for x in q.report), 2),
                             "layers": len(q.layers)})
                print(format_table([rows[-1]]), flush=True)
            same = all(np.array_equal(codes["off"][n], codes["on"][n]) for n in codes["off"])
            for row in rows[-2:]:
                row["identical_codes"] = same
    print()
    print(format_table(rows))
    if args.json:
        write_results(args.json, "capture_cache", "MiniLM whole-model quantisation, capture "
                      "cache off and on (same process, alternating order)", args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
