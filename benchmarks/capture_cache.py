"""Whole-model MiniLM quantisation with and without the capture cache (qround.prefix_cache).

Each round quantises the 36 encoder layers of all-MiniLM-L6-v2 twice in this process, once with
``capture_cache_mb=0`` (every capture pass runs the model from its first module) and once with
the cache (default budget), in alternating order, and reports the wall time, the summed capture
and solve times of the report, and whether the two runs wrote identical codes.

    python benchmarks/capture_cache.py --inputs quantized,asymmetric --rounds 2 --threads 2 \
        --json benchmarks/results/e2e/capture_cache.json

With ``--iterations N`` the runs add 8-bit inputs (``--abits``) and block reconstruction of N
Adam steps per unit (``--granularity``), whose capture passes use the cache too
(``ReconstructConfig.capture_cache_mb``); ``reconstruct_s`` is that stage's time.
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
    p.add_argument("--iterations", type=int, default=0,
                   help="block reconstruction steps per unit (0: weights only)")
    p.add_argument("--abits", type=int, default=8, help="input bits with --iterations")
    p.add_argument("--granularity", default="block", help="reconstruction units")
    p.add_argument("--json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from qround import zoo
    from qround.pipeline import QuantConfig, quantize_model
    from qround.activations import QuantizedLayer
    from qround.reconstruct import ReconstructConfig
    from qround.report import format_table

    torch.set_num_threads(args.threads)
    model = zoo.load_minilm()
    batches = zoo.minilm_batches(model, zoo.sentences("calibration", n=args.sentences))
    rows = []
    for inputs in [x for x in args.inputs.split(",") if x]:
        for r in range(args.rounds):
            codes, steps = {}, {}
            order = (0.0, None) if r % 2 == 0 else (None, 0.0)
            for mb in order:
                extra = {} if mb is None else {"capture_cache_mb": mb}
                if args.iterations:
                    extra.update(abits=args.abits, granularity=args.granularity,
                                 reconstruction=ReconstructConfig(iterations=args.iterations,
                                                                  **extra))
                cfg = QuantConfig(wbits=args.wbits, solver=args.solver, inputs=inputs,
                                  layers=r"\.encoder\.", progress=False, **extra)
                t0 = time.perf_counter()
                q = quantize_model(model, batches, cfg, forward=zoo.minilm_forward)
                wall = time.perf_counter() - t0
                cache = "off" if mb == 0.0 else "on"
                codes[cache] = {n: w.codes for n, w in q.layers.items()}
                steps[cache] = [m.act.step.detach().clone() for m in q.model.modules()
                                if isinstance(m, QuantizedLayer) and m.act is not None]
                rows.append({"inputs": inputs, "round": r, "cache": cache,
                             "wall_s": round(wall, 2),
                             "capture_s": round(sum(x.capture_seconds for x in q.report), 2),
                             "solve_s": round(sum(x.seconds for x in q.report), 2),
                             "reconstruct_s": round(q.reconstruction.seconds, 2)
                             if q.reconstruction is not None else None,
                             "layers": len(q.layers)})
                print(format_table([rows[-1]]), flush=True)
            same = all(np.array_equal(codes["off"][n], codes["on"][n]) for n in codes["off"])
            if args.iterations:  # the activation steps learned by reconstruction too
                same = same and all(torch.equal(a, b) for a, b in zip(*steps.values()))
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
