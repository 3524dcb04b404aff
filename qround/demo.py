"""``qround demo``: real MiniLM layers, real text, every registered solver against RTN.

Captures ``H = E[x x^T]`` of a few layers of the pretrained all-MiniLM-L6-v2 on the packaged
calibration sentences, builds the 4-bit per-channel problems (MSE scales) and solves the same
output channels of each layer with every registered solver.  All solvers see the same channel
subset so their ratios are comparable; the dimod references are slow on dense problems, which is
why the subset is small by default.
"""
from __future__ import annotations

import logging
import time

from .errors import QroundError
from .grid import GridSpec
from .problems.rounding import RoundingProblem
from .report import SolveRecord, format_table
from .solvers import available_solvers, get_solver

log = logging.getLogger(__name__)

DEMO_LAYERS = (
    "0.model.encoder.layer.0.attention.self.query",      # 384 x 384
    "0.model.encoder.layer.3.intermediate.dense",        # 1536 x 384
)
# aliases of other entries, or not meant for dense real layers
SKIP = {"dimod": "generic dimod wrapper (neal, dwave-tabu, dwave-steepest run by name)"}


def demo_solvers() -> list[str]:
    return [n for n in available_solvers() if n not in SKIP]


def run_demo(channels: int = 32, solvers: str | None = None, layers=DEMO_LAYERS, bits: int = 4,
             sentences: int = 256, threads: int = 2, seed: int = 0, progress: bool = True) -> dict:
    """Run the demo; returns ``{"table": str, "records": [...], "skipped": [...], ...}``."""
    import torch
    from tqdm.auto import tqdm

    from . import zoo
    from .calibrate import capture_hessians

    if channels < 1:
        raise QroundError("channels must be >= 1")
    names = demo_solvers() if solvers is None else [s.strip() for s in solvers.split(",") if s.strip()]
    built = {n: get_solver(n) for n in names}  # fail on a bad name before any work starts
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
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
                problems[layer] = full.subproblem(slice(0, min(channels, full.num_channels)))
            try:
                sol = built[name].solve(problems[layer], seed=seed)
            except QroundError as exc:
                skipped.append({"layer": layer, "solver": name, "reason": str(exc)})
                continue
            records.append(SolveRecord.from_solution(layer.split("encoder.")[-1], sol))
        rows = [r.as_dict() for r in records]
        table = format_table(rows, ["layer", "shape", "solver", "cost", "rtn_cost", "ratio",
                                    "seconds"])
        if skipped:
            table += "\n\nskipped:\n" + "\n".join(f"  {s['solver']} on {s['layer']}: {s['reason']}"
                                                 for s in skipped)
        header = (f"all-MiniLM-L6-v2, {bits}-bit per-channel symmetric grid, MSE scales; "
                  f"H from {sentences} calibration sentences; first {channels} output channels "
                  f"per layer; torch threads {threads}; cost = sum_c (w_hat-w)^T H (w_hat-w)\n")
        return {"table": header + table, "records": rows, "skipped": skipped,
                "capture_seconds": capture_s, "channels": channels, "bits": bits,
                "threads": threads, "sentences": sentences}
    finally:
        torch.set_num_threads(prev_threads)
