"""``qround demo``: real MiniLM layers, real text, every registered solver against RTN.

Captures ``H = E[x x^T]`` of a few layers of the pretrained all-MiniLM-L6-v2 on the packaged
calibration sentences, builds the 4-bit per-channel problems (MSE scales) and solves the same
output channels of each layer with every registered solver.  All solvers see the same channel
subset so their ratios are comparable; the dimod references are slow on dense problems, which is
why the subset is small by default.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from .errors import QroundError
from .grid import GridSpec
from .problems.rounding import RoundingProblem
from .report import SolveRecord, format_table
from .solvers import available_solvers, get_solver, warm_up
from .solvers.base import prepare
from .solvers.registry import split_specs

log = logging.getLogger(__name__)

DEMO_LAYERS = (
    "0.model.encoder.layer.0.attention.self.query",      # 384 x 384
    "0.model.encoder.layer.3.intermediate.dense",        # 1536 x 384
)
# aliases of other entries, or not meant for dense real layers
SKIP = {"dimod": "generic dimod wrapper (neal, dwave-tabu, dwave-steepest run by name)"}


def demo_solvers() -> list[str]:
    return [n for n in available_solvers() if n not in SKIP]


def _channels_text(channels: int, widths: list[int]) -> str:
    if channels >= max(widths):
        return "every output channel"
    if channels >= min(widths):
        return f"first {channels} output channels per layer (all of a narrower one)"
    return f"first {channels} output channels per layer"


def run_journey(model_name: str = "digits-cnn", wbits: int = 3, solver: str = "fast",
                seed: int = 0, progress: bool = True, eval_sentences: int = 200) -> dict:
    """Quantise a whole packaged model with ``solver`` and with RTN, report per layer, evaluate."""
    from . import zoo
    from .evaluate import digits_accuracy, minilm_metrics
    from .pipeline import QuantConfig, quantize_model

    if model_name == "digits-cnn":
        model, data = zoo.train_digits_cnn("plain", seed=seed)
        calib = [data.calib_images[i:i + 64] for i in range(0, len(data.calib_images), 64)]
        forward, layers = None, None
    elif model_name == "minilm":
        model = zoo.load_minilm()
        calib = zoo.minilm_batches(model, zoo.sentences("calibration", n=256))
        forward, layers = zoo.minilm_forward, r"\.encoder\."
    else:
        raise QroundError(f"unknown journey model {model_name!r}")
    runs, metrics = {}, {}
    for name in ("nearest", solver):
        cfg = QuantConfig(wbits=wbits, solver=name, layers=layers, seed=seed, progress=progress)
        runs[name] = quantize_model(model, calib, cfg, forward=forward)
        if model_name == "digits-cnn":
            metrics[name] = {"test_accuracy": digits_accuracy(runs[name].model, data),
                             "test_accuracy_a8": digits_accuracy(runs[name].model, data, abits=8)}
        else:
            metrics[name] = minilm_metrics(model, runs[name].model,
                                           zoo.sentences("evaluation", n=eval_sentences))
    if model_name == "digits-cnn":
        metrics["float"] = {"test_accuracy": digits_accuracy(model, data),
                            "test_accuracy_a8": digits_accuracy(model, data, abits=8)}
    rows = [{"weights": k if k == "float" else f"W{wbits} {k}", **v,
             "seconds": runs[k].seconds if k in runs else 0.0} for k, v in metrics.items()]
    text = (f"\n\n{model_name}: whole model at W{wbits}, per-layer report of `{solver}`:\n"
            f"{runs[solver].table()}\n\nevaluation:\n{format_table(rows)}")
    return {"table": text, "metrics": metrics, "report": [r.as_dict() for r in runs[solver].report]}


def run_demo(channels: int = 32, solvers: str | None = None, layers=DEMO_LAYERS, bits: int = 4,
             sentences: int = 256, threads: int = 2, seed: int = 0, progress: bool = True,
             journey: str | None = "digits-cnn") -> dict:
    """Run the demo; returns ``{"table": str, "records": [...], "skipped": [...], ...}``.

    journey: after the solver table, quantise a whole model ("digits-cnn", "minilm", or
    None/"none" to stop after the table)."""
    from tqdm.auto import tqdm

    from . import zoo
    from ._parallel import cpu_threads
    from .calibrate import capture_hessians

    if channels < 1:
        raise QroundError("channels must be >= 1")
    names = demo_solvers() if solvers is None else split_specs(solvers)
    built = {n: get_solver(n) for n in names}  # fail on a bad name before any work starts
    warm_up(*built.values())  # kernel loading stays out of the first layer's seconds
    with cpu_threads(threads):
        t0 = time.perf_counter()
        model = zoo.load_minilm()
        batches = zoo.minilm_batches(model, zoo.sentences("calibration", n=sentences))
        hessians = capture_hessians(model, batches, layers=list(layers), forward=zoo.minilm_forward)
        capture_s = time.perf_counter() - t0
        modules = dict(model.named_modules())
        records, skipped = [], []
        work = [(layer, n) for layer in layers for n in names]
        bar = tqdm(work, desc="qround demo", disable=not progress, leave=False)
        problems = {}
        for layer, name in bar:
            bar.set_postfix_str(f"{layer.split('encoder.')[-1]} {name}")
            if layer not in problems:
                w = modules[layer].weight.detach().double().numpy()
                full = RoundingProblem.from_weight(w, hessians[layer], GridSpec(bits=bits),
                                                   name=layer)
                # the setup solvers cache on a problem, out of every solver's time
                problems[layer] = prepare(
                    full.subproblem(slice(0, min(channels, full.num_channels))))
            t_solve = time.perf_counter()
            try:
                sol = built[name].solve(problems[layer], seed=seed)
            except QroundError as exc:
                skipped.append({"layer": layer, "solver": name, "reason": str(exc)})
                continue
            # the whole call's wall time, as qround bench takes it: Solution.seconds leaves a
            # bare solver's start setup and final check out, and a composite's inner ones in
            sol = dataclasses.replace(sol, seconds=time.perf_counter() - t_solve)
            records.append(SolveRecord.from_solution(layer.split("encoder.")[-1], sol))
        rows = [r.as_dict() for r in records]
        table = format_table(rows, ["layer", "shape", "solver", "cost", "rtn_cost", "ratio",
                                    "seconds"])
        if skipped:
            table += "\n\nskipped:\n" + "\n".join(f"  {s['solver']} on {s['layer']}: {s['reason']}"
                                                 for s in skipped)
        header = (f"all-MiniLM-L6-v2, {bits}-bit per-channel symmetric grid, MSE scales; "
                  f"H from {sentences} calibration sentences; "
                  + _channels_text(channels, [modules[n].weight.shape[0] for n in layers]) +
                  f"; threads {threads} (torch, numba); cost = sum_c (w_hat-w)^T H (w_hat-w)\n")
        result = {"table": header + table, "records": rows, "skipped": skipped,
                  "capture_seconds": capture_s, "channels": channels, "bits": bits,
                  "threads": threads, "sentences": sentences}
        if journey and journey != "none":
            j = run_journey(journey, seed=seed, progress=progress)
            result["table"] += j.pop("table")
            result["journey"] = {"model": journey, **j}
        return result
