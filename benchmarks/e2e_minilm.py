"""End-to-end MiniLM benchmark: quantise the 36 encoder Linear layers of the pretrained
all-MiniLM-L6-v2 (weights only, per-channel symmetric) and compare the sentence embeddings of
held-out sentences with the float model's.

    python benchmarks/e2e_minilm.py --json results/e2e_minilm.json
    python benchmarks/e2e_minilm.py --bits W3 --eval-sentences 200 --methods rtn-mse,gptq

Methods: ``rtn-minmax`` / ``rtn-mse`` (rounding-to-nearest on min-max / MSE scales), ``gptq``
(the real GPTQ, ``qround.baselines.gptq_model``: MSE scales, act-order, 1% damping, sequential),
``hopfield`` (AdaRound's continuous relaxation through ``quantize_model``), ``solvers``
(``quantize_model`` with each solver spec of ``--solvers``, or a name of
``qround.bench.extra_solvers`` such as ``quality-v1``) and ``reconstruct`` (the same, then
block reconstruction of the six transformer layers from the solver's rounding: weights only,
``--rec-iterations`` Adam steps per layer, ``qround.reconstruct.ReconstructConfig`` defaults
otherwise).  Calibration: the first
``--calib-sentences`` sentences of the calibration pool; evaluation: the first
``--eval-sentences`` of the disjoint evaluation pool.  Metrics (``qround.evaluate``): mean
cosine to the float embedding, Spearman correlation of pairwise similarities, top-10 neighbour
overlap; ``seconds``: wall time of the quantisation call (statistics capture included).
"""
from __future__ import annotations

import argparse
import sys
import time


from qround import zoo
from qround.baselines import gptq_model, rtn_model
from qround.evaluate import embedding_metrics
from qround.report import format_table
from _common import (e2e_finish, e2e_parser, e2e_write, plan, refits_of,  # noqa: E402 (on sys.path)
                     set_threads, warm_up_solvers)

WIDTHS = {"W4": (4, None), "W3": (3, None), "W3g128": (3, 128), "W2": (2, None)}
METHODS = ("rtn-minmax", "rtn-mse", "gptq", "hopfield", "solvers", "reconstruct")
ENCODER_LAYERS = r"encoder\.layer\.\d+\."


def parse_args(argv=None) -> argparse.Namespace:
    p = e2e_parser(__doc__, WIDTHS, METHODS)
    p.add_argument("--calib-sentences", type=int, default=256)
    p.add_argument("--eval-sentences", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--damp", type=float, default=0.0,
                   help="QuantConfig.damp: trust region lambda ||w_hat - w||^2 for qround solvers")
    p.add_argument("--scale-method", default="mse", choices=["mse", "mse-output"],
                   help="weight scales of the qround methods (RTN and GPTQ keep MSE scales): "
                        "'mse-output' searches each channel's scale on the H-weighted error")
    p.add_argument("--bias-correction", action="store_true",
                   help="QuantConfig.bias_correction for the qround methods")
    p.add_argument("--layers", default=ENCODER_LAYERS,
                   help="regex of the Linear layers quantised (default: all 36 encoder layers); "
                        "e.g. 'intermediate' to see one kind's share of the error")
    p.add_argument("--rec-iterations", type=int, default=100,
                   help="Adam steps per transformer layer of the 'reconstruct' method")
    p.add_argument("--weight-start", default="solver", choices=["solver", "float"],
                   help="QuantConfig.weight_start of the 'reconstruct' method: soft rounding "
                        "from the solver's choice or from the float weights (AdaRound)")
    return e2e_finish(p, argv, WIDTHS, METHODS)


def quantise(label: str, spec: str | None, model, calibration, bits: int, group_size, args):
    """Quantised copy of ``model`` and the wall seconds of the call."""
    from qround.pipeline import QuantConfig, quantize_model
    from qround.reconstruct import ReconstructConfig

    ours = label.startswith("qround:") or label == "hopfield"
    scale_method = ("minmax" if label == "rtn-minmax" else
                    args.scale_method if ours else "mse")
    reconstruction = (ReconstructConfig(iterations=args.rec_iterations, seed=args.seed)
                      if label.endswith("+rec") else None)
    from qround.bench import extra_solvers   # named solvers with parameters, e.g. quality-v1

    config = QuantConfig(wbits=bits, symmetric=True, group_size=group_size,
                         scale_method=scale_method,
                         solver=extra_solvers().get(spec, spec) if spec else "nearest",
                         layers=args.layers, device=args.device, seed=args.seed,
                         damp=args.damp, inputs=args.inputs, correction=args.correction,
                         progress=args.progress, reconstruction=reconstruction,
                         refits=refits_of(label) if spec else 0,
                         bias_correction=args.bias_correction and ours,
                         widen=args.widen and bool(spec),
                         weight_start=args.weight_start)
    start = time.perf_counter()
    if label.startswith("rtn"):
        qmodel, _ = rtn_model(model, config, example=calibration[0], forward=zoo.minilm_forward)
    elif label == "gptq":
        qmodel, _ = gptq_model(model, calibration, config, forward=zoo.minilm_forward)
    else:
        qmodel = quantize_model(model, calibration, config, forward=zoo.minilm_forward).model
    return qmodel, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    warm_up_solvers(args.solvers)   # kernel loading stays out of the first row's seconds
    model = zoo.load_minilm()
    layers = zoo.minilm_linear_layers(model)
    calibration = zoo.minilm_batches(model, zoo.sentences("calibration", args.calib_sentences))
    eval_texts = zoo.sentences("evaluation", args.eval_sentences)
    reference = zoo.embed(model, eval_texts)
    runs, notes = plan(args)
    header = (f"MiniLM-L6 e2e: {len(layers)} encoder Linear layers (quantised: "
              f"{args.layers!r}), weights only, per-channel "
              f"symmetric; calibration {args.calib_sentences} sentences, evaluation "
              f"{args.eval_sentences} held-out sentences; torch and numba threads {args.threads}, "
              f"device {args.device}")
    print(header, flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)

    rows: list[dict] = []

    def save() -> None:
        e2e_write(args.json, "e2e_minilm", header, notes, args, rows)

    for width in args.bits:
        bits, group_size = WIDTHS[width]
        for label, spec in runs:
            qmodel, seconds = quantise(label, spec, model, calibration, bits, group_size, args)
            metrics = embedding_metrics(reference, zoo.embed(qmodel, eval_texts))
            rows.append({"weights": width, "method": label, **metrics, "seconds": seconds})
            print(f"  {width:7s} {label:22s} cosine {metrics['cosine']:.4f}  spearman "
                  f"{metrics['spearman']:.4f}  top10 {metrics['top10']:.4f}  {seconds:8.1f} s",
                  file=sys.stderr, flush=True)
            save()
            del qmodel
    print(format_table(rows, ["weights", "method", "cosine", "spearman", "top10", "seconds"]))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
