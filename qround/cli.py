"""The qround command line.

    qround solve FILE.npz [FILE.npz ...] --solver NAME [--bits B] [--json] [--out SOL.npz]
    qround export-layer --model minilm|digits-cnn|digits-resnet|digits-mobilenet|FOLDER --layer NAME
                        --out FILE.npz
    qround export-qubo FILE.npz --out DIR [--channels 0:16] [--solver quality]
    qround sample FILE.qubo|FILE.bqm [...] [--method "tabu(restarts=8)"] [--reads 4] [--out S.json]
    qround quantize --model minilm|digits-cnn|digits-resnet|digits-mobilenet --wbits B --solver NAME
                    --out FILE.safetensors
    qround quantize --model MODEL.pt --calibration INPUTS.pt ...   (your own torch.save(model))
    qround quantize --model FOLDER [--calibration TEXTS.txt] ...   (a transformers checkpoint)
    qround sensitivity --model minilm|digits-*|FOLDER|MODEL.pt [--bits 2,3,4,8] [--mean-bits 3.5]
    qround evaluate --model minilm|digits-cnn|digits-resnet|digits-mobilenet|FOLDER
                    --quantized FILE.safetensors
    qround evaluate --model MODEL.pt --inputs INPUTS.pt --quantized FILE.safetensors
    qround demo [--json FILE] [--channels N] [--solvers a,b,...] [--journey digits-cnn|minilm|none]
    qround bench ...            (the solver benchmark on real layers; qround bench -h)
    qround solvers              (the registry)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from typing import Mapping, Sequence

import numpy as np

from . import __version__
from .cliargs import (PLOT_SUFFIXES, check_format, check_paths, finite_at_least, group_size_arg,
                      int_at_least)
from .errors import MAX_SEED, QroundError, check_bits, check_int, first_line
from ._defaults import DEFAULT_SOLVER

# The report and solver modules (torch, numba, dimod) are imported by the commands that use
# them, so that `qround --help` and `qround --version` answer at once.

log = logging.getLogger("qround")

COLUMNS = ["layer", "shape", "solver", "cost", "rtn_cost", "ratio", "seconds"]


# ---------------------------------------------------------------------------------- solve
def _file_problem(stats, path: str, args):
    """A statistics file's problem at --bits / --scale-method, named as flags: a file with
    stored scales (every export-layer file) takes neither."""
    if stats.scale is not None and ((args.bits is not None and args.bits != stats.bits)
                                    or args.scale_method is not None):
        flag = (f"--bits {args.bits}" if args.bits is not None and args.bits != stats.bits
                else f"--scale-method {args.scale_method}")
        raise QroundError(f"{flag}: {path} stores the scales of its {stats.bits}-bit grid "
                          "(export-layer files do), so no grid is fitted; leave the option out, "
                          "or export the layer again with other --bits/--scale-method")
    return stats.problem(bits=args.bits, scale_method=args.scale_method)


def cmd_solve(args) -> int:
    from .problems.io import load_layer_stats
    from .report import SolveRecord, format_table, json_text, totals, write_npz_atomic
    from .solvers import get_solver, warm_up
    from .solvers.base import cost_ratio

    if args.out and len(args.files) != 1:
        raise QroundError("--out writes the codes of one layer: give exactly one FILE.npz")
    if args.lower_bound and args.refits:
        raise QroundError("--lower-bound bounds the roundings on one grid, and --refits changes "
                          "the grid (its ratio is against the first grid's RTN): give one of "
                          "them")
    if args.bits is not None:
        check_bits(args.bits, "--bits")
    check_paths({"--out": args.out}, {f"FILE {f}": f for f in args.files})
    check_format("--out", args.out, "an .npz archive", (".npz",))
    solver = get_solver(args.solver, device=args.device)
    warm_up(solver)  # kernel loading stays out of the reported seconds
    records, solutions, bounds = [], [], []
    for path in args.files:
        stats = load_layer_stats(path)
        problem = _file_problem(stats, path, args)
        if args.refits:
            from .scales import solve_refitting

            problem, sol = solve_refitting(problem, solver, rounds=args.refits, seed=args.seed)
        else:
            sol = solver.solve(problem, seed=args.seed)
        records.append(SolveRecord.from_solution(stats.name or str(path), sol))
        solutions.append((problem, sol))
        if args.lower_bound:
            bound = problem.lower_bound()
            bounds.append({"bound": bound.total_cost, "bound_ratio": bound.ratio,
                           "certified_gap": bound.certified_gap(sol.cost),
                           "bound_seconds": bound.seconds})
    tot = totals(records)
    if bounds:
        b_total = sum(b["bound"] for b in bounds)
        span = tot["rtn_cost"] - b_total
        noise = sum(r.cost_noise for r in records)
        excess = tot["cost"] - b_total
        tot.update(bound=b_total, bound_ratio=cost_ratio(b_total, tot["rtn_cost"], noise),
                   certified_gap=max(excess, 0.0) / span if span > noise
                   else (0.0 if excess <= noise else float("inf")))
    label = f"{solver.label} ({args.refits} refits)" if args.refits else solver.label
    if args.out:
        problem, sol = solutions[0]
        write_npz_atomic(args.out, codes=sol.codes, choices=sol.choices,
                         scale=problem.grid.scale, zero_point=problem.grid.zero_point,
                         bits=np.int64(problem.grid.bits), cost=sol.cost, rtn_cost=sol.rtn_cost,
                         solver=np.str_(sol.solver))
    layers = [{**r.as_dict(), **b} for r, b in zip(records, bounds or [{}] * len(records))]
    if args.json:
        print(json_text({**tot, "solver": label, "layers": layers}))
    else:
        rows = layers
        if len(rows) > 1:
            rows.append({"layer": "total", "shape": "", "solver": label, **tot})
        cols = COLUMNS + (["bound_ratio", "certified_gap"] if bounds else [])
        print(format_table(rows, cols))
    return 0


# ---------------------------------------------------------------------------------- export-qubo
EXPORT_CHANNELS_DEFAULT = slice(0, 16)


def channel_selection(text: str):
    """``--channels``: ``all``, a range ``a:b`` (Python slice, ``:16`` the first 16) or indices
    ``3,5,9``; an argparse type."""
    text = text.strip()
    try:
        if text == "all":
            return slice(None)
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3 or (len(parts) == 3 and parts[2] is not None and parts[2] < 1):
                raise ValueError
            return slice(*parts)
        indices = [int(p) for p in text.split(",")]
        if any(i < 0 for i in indices):
            raise argparse.ArgumentTypeError(f"{text!r}: channel indices count from 0 "
                                             "(no negative ones)")
        return indices
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'all', a range like 0:16 or indices like 3,5,9") from None


def cmd_export_qubo(args) -> int:
    from .problems.io import load_layer_stats
    from .problems.qubo_files import export_qubos, plan_export
    from .solvers import get_solver

    if args.bits is not None:
        check_bits(args.bits, "--bits")
    stats = load_layer_stats(args.file)
    problem = _file_problem(stats, args.file, args)
    idx, names = plan_export(args.out, problem, args.channels)  # before any solve
    ch = args.channels
    if isinstance(ch, slice) and ch.stop is not None and ch.stop > problem.num_channels and \
            ch is not EXPORT_CHANNELS_DEFAULT:
        log.warning("--channels %s:%s: the layer has %d channels, so %d files are written",
                    "" if ch.start is None else ch.start, ch.stop, problem.num_channels,
                    len(idx))
    known = {}
    if args.solver:
        solver = get_solver(args.solver, device=args.device)
        sol = solver.solve(problem.subproblem(idx), seed=args.seed)
        choices = problem.rtn_choices()
        choices[idx] = sol.choices
        known[solver.label] = choices
    export_qubos(args.out, problem, idx, known, source=str(args.file),
                 lower_bound=not args.no_lower_bound)
    if not args.solver:
        best = ""
    elif np.isfinite(sol.ratio):
        best = f"; {solver.label} reaches {sol.ratio:.4f} of RTN's cost on them"
    else:  # relative costs (no float_hessian in the file): their difference means something
        best = (f"; {solver.label} lowers the (relative) cost by "
                f"{sol.total_rtn_cost - sol.total_cost:.4g} from RTN's on them")
    print(f"wrote {len(names)} QUBO files ({names[0]}...) and manifest.json to "
          f"{args.out}{best}")
    return 0


# ---------------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    """qround's tabu search or annealing (QroundSampler), or to compare a dwave-samplers
    sampler, on qbsolv ``.qubo`` files or dimod BQM files; where a ``manifest.json`` of
    ``qround export-qubo`` lists the file, its cost against RTN's too.  Seconds are the wall
    time of each ``sample`` call, whatever the sampler."""
    from .problems.qubo_files import MANIFEST, _read_bqm_file
    from .report import format_table, json_text, write_json_atomic
    from .solvers import QroundSampler, warm_up
    from .solvers.base import cost_ratio
    from .solvers.registry import normalize_spec, parse_part
    from .solvers.sampler import MAX_READS, check_search_parameters

    check_int(args.reads, "--reads", 1, maximum=MAX_READS)   # dwave's samplers have no bound
    method, options = parse_part(args.method)
    taken = sorted({"seed", "num_reads", "initial_states", "initial_states_generator"}
                   & set(options))
    if taken:
        raise QroundError(f"--method {args.method!r}: {taken} are not solver options here; "
                          "give --seed and --reads (the searches start from random states)")
    if method in REFERENCE_SAMPLERS:   # dwave-samplers' own, to compare with in the shell
        sampler = _reference_sampler(method, options)
    elif method in ("tabu", "anneal"):
        check_search_parameters(method, options, f"--method {args.method!r}")
        sampler = QroundSampler(method)
    else:
        raise QroundError(f"--method {args.method!r}: method must be tabu or anneal (qround's) "
                          f"or {', '.join(REFERENCE_SAMPLERS)} (dwave-samplers', to compare)")
    manifests = {os.path.join(os.path.dirname(os.path.abspath(f)), MANIFEST) for f in args.files}
    check_paths({"--out": args.out}, {**{f"FILE {f}": f for f in args.files},
                                      **{f"manifest {m}": m for m in sorted(manifests)}})
    check_format("--out", args.out, "JSON", (".json",))
    real = [os.path.realpath(f) for f in args.files]   # ./q/a.qubo is q/a.qubo
    twice = next((r for r in real if real.count(r) > 1), None)
    if twice is not None:
        spellings = list(dict.fromkeys(f for f, r in zip(args.files, real) if r == twice))
        raise QroundError(f"FILE {spellings[0]!r} is given more than once"
                          + (f" (as {spellings[1:]})" if len(spellings) > 1 else ""))
    missing = [f for f in args.files if not os.path.exists(f)]
    if missing:
        raise QroundError(f"FILE {missing[0]!r} does not exist")
    rows, samples, warm = [], {}, False
    for path in args.files:
        bqm, dimod_file = _read_bqm_file(path)   # read once: a pipe works too
        if not warm:   # kernel loading stays out of the first file's seconds
            warm_up(sampler, **options)
            warm = True
        if bqm.num_variables == 0:   # nothing to search (dwave's tabu returns no sample)
            row = {"file": str(path), "variables": 0, "energy": 0.0, "cost": bqm.offset,
                   "reads": args.reads, "seconds": 0.0}
            if dimod_file:   # as for any dimod file: dimod's energy holds the offset
                row["energy"] = bqm.offset
                samples[str(path)] = {**row, "vartype": bqm.vartype.name, "sample": []}
            else:
                samples[str(path)] = {**row, "x": ""}
            rows.append(row)
            continue
        t0 = time.perf_counter()
        try:
            ss = sampler.sample(bqm, num_reads=args.reads, seed=args.seed, **options)
        except (ValueError, TypeError, OverflowError) as exc:   # a dwave sampler's refusal
            if isinstance(exc, QroundError):
                raise
            raise QroundError(f"--method {args.method!r} refused: {exc}") from None
        seconds = time.perf_counter() - t0
        best = ss.first
        row = {"file": str(path), "variables": int(bqm.num_variables),
               "energy": best.energy - bqm.offset, "cost": best.energy, "reads": args.reads,
               "seconds": seconds}
        if dimod_file:   # any labels and vartype: the sample as label / value pairs
            row["energy"] = best.energy   # the offset is the model's own: dimod's energy
            samples[str(path)] = {**row, "vartype": bqm.vartype.name,
                                  "sample": [[_json_label(v), int(best.sample[v])]
                                             for v in bqm.variables]}
            rows.append(row)
            continue
        x = np.array([best.sample[i] for i in range(bqm.num_variables)], dtype=np.int8)
        known = _manifest_energies(os.path.join(os.path.dirname(os.path.abspath(path)),
                                                MANIFEST), os.path.basename(path), bqm)
        if LOWER_BOUND in known:   # the manifest's certified bound: no x costs less
            row["bound_cost"] = known.pop(LOWER_BOUND) + bqm.offset
        if "rtn" in known:
            row["rtn_cost"] = known["rtn"] + bqm.offset
            row["ratio"] = cost_ratio(row["cost"], row["rtn_cost"])   # NaN for relative costs
            others = {k: v for k, v in known.items() if k != "rtn"}
            if others:  # the best solution the manifest knows (export-qubo's --solver)
                label = min(others, key=others.get)
                row["known"] = label
                row["known_cost"] = others[label] + bqm.offset
        rows.append(row)
        samples[str(path)] = {**row, "x": "".join(map(str, x.tolist()))}
    label = normalize_spec(args.method)
    if args.json:
        for row in rows:
            print(json_text({**row, "method": label}))
    else:
        columns = ["file", "variables", "energy", "cost", *(
            ["rtn_cost", "ratio"] if any("ratio" in r for r in rows) else []), *(
            ["known", "known_cost"] if any("known" in r for r in rows) else []), *(
            ["bound_cost"] if any("bound_cost" in r for r in rows) else []), "seconds"]
        # costs of single channels are small: significant digits, not decimals
        print(format_table(rows, columns, significant=("energy", "cost", "rtn_cost",
                                                       "known_cost", "bound_cost")))
    if args.out:
        write_json_atomic(args.out, {"method": label, "seed": args.seed, "reads": args.reads,
                                     "samples": samples})
    return 0


REFERENCE_SAMPLERS = ("neal", "dwave-tabu", "dwave-steepest")


def _reference_sampler(name: str, options: dict):
    """dwave-samplers' sampler ``name``, its options checked against the ones it declares
    (dwave's samplers take ``**kwargs`` and ignore a misspelt name)."""
    from .solvers.dimod_backend import DimodSolver, _make_sampler

    sampler = _make_sampler(name)
    DimodSolver(name, **options)   # refuses options the sampler does not declare
    if name == "dwave-tabu" and "timeout" in options:
        timeout = options["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise QroundError(f"dwave-tabu(timeout={timeout!r}): give a positive number of "
                              "milliseconds (without one dwave's tabu search runs its 10^6 "
                              "restarts, minutes on a small model)")
    return sampler


def _json_label(label):
    """A BQM variable label as JSON can hold it: numbers and strings as they are, tuples as
    lists, anything else as its repr."""
    if isinstance(label, (bool, np.bool_)):
        return repr(label)
    if isinstance(label, (int, np.integer)):
        return int(label)
    if isinstance(label, (float, np.floating)):
        return float(label)
    if isinstance(label, str):
        return label
    if isinstance(label, tuple):
        return [_json_label(v) for v in label]
    return repr(label)


LOWER_BOUND = " lower bound"   # the key of a manifest's bound (no solver label has a space)


def _manifest_energies(manifest: str, name: str, bqm=None) -> dict[str, float]:
    """The energies an export-qubo manifest beside ``name`` records for it, by label (``rtn``
    and export-qubo's ``--solver``, and :data:`LOWER_BOUND` for its certified bound); empty
    when there is no manifest, it does not list the file, it is not readable as one, or (given
    the file's ``bqm``) its entry's offset is not the file's or it counts more free variables
    than the file holds (a file copied beside another layer's manifest)."""
    import math
    import os

    if not os.path.isfile(manifest):
        return {}
    try:
        with open(manifest, encoding="utf-8") as f:
            channels = json.load(f)["channels"]
        for entry in channels:
            if entry["file"] != name:
                continue
            if bqm is not None and (   # (a file holds every input, fixed ones as zeros)
                    ("variables" in entry and int(entry["variables"]) > bqm.num_variables)
                    or ("offset" in entry and not math.isclose(
                        float(entry["offset"]), float(bqm.offset), rel_tol=1e-9,
                        abs_tol=1e-12))):
                log.warning("%s lists %s with another offset or more variables than the file "
                            "has (another layer's manifest?): RTN's cost is not shown",
                            manifest, name)
                return {}
            known = {str(k): float(v["energy"]) for k, v in entry["solutions"].items()}
            if entry.get("lower_bound") is not None:
                known[LOWER_BOUND] = float(entry["lower_bound"])
            return known
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s is not an export-qubo manifest: RTN's cost is not shown", manifest)
    return {}


# ---------------------------------------------------------------------------------- export
INPUTS_DEFAULT = "quantized"  # QuantConfig's default
DIGITS_MODELS = {"digits-cnn": "plain", "digits-resnet": "residual",
                 "digits-mobilenet": "mobile"}
MAX_THREADS = 1024   # --threads: torch's thread pools fail (or crash) far above the cores
THREADS_HELP = ("CPU threads of torch and of the compiled solvers (numba; at most its "
                "NUMBA_NUM_THREADS) (default: %(default)s)")


def _load_named_model(name: str, seed: int = 0, sentences: int = 256,
                      batch_size: int | None = None, images: int | None = None):
    """(model, calibration batches, forward) for a packaged model name or a transformers
    checkpoint folder (the packaged calibration sentences, in batches of ``batch_size``,
    default 32); a digits model's calibration split (its first ``images``, default all, in
    batches of ``batch_size``, default 64)."""
    from . import zoo
    from .zoo.hf import is_hf_folder, load_hf

    if is_hf_folder(name):
        hf = load_hf(name)
        return hf.model, hf.batches(zoo.sentences("calibration", n=sentences),
                                    batch_size or 32), hf.forward
    if name == "minilm":
        model = zoo.load_minilm()
        batches = zoo.minilm_batches(model, zoo.sentences("calibration", n=sentences),
                                     batch_size or 32)
        return model, batches, zoo.minilm_forward
    if name in DIGITS_MODELS:
        model, data = zoo.train_digits_cnn(DIGITS_MODELS[name], seed=seed)
        calib = data.calib_images
        if images is not None:
            if images > len(calib):
                raise QroundError(f"--calibration-size {images}: the {name} calibration split "
                                  f"holds {len(calib)} images")
            calib = calib[:images]
        size = batch_size or 64
        batches = [calib[i:i + size] for i in range(0, len(calib), size)]
        return model, batches, None
    raise QroundError(f"unknown model {name!r}: use minilm, {', '.join(DIGITS_MODELS)} or a "
                      "transformers checkpoint folder (with config.json)")


def cmd_export_layer(args) -> int:
    import torch

    from .calibrate import capture_hessians
    from .grid import GridSpec
    from .problems.io import save_layer_stats_from_module
    from .problems.layers import is_hf_conv1d, layer_weight

    check_bits(args.bits, "--bits")
    check_paths({"--out": args.out}, {"--model": args.model})
    check_format("--out", args.out, "an .npz archive", (".npz",))
    if not args.list and not args.out:
        raise QroundError("--out FILE.npz is required")
    spec = GridSpec(bits=args.bits, symmetric=not args.asymmetric, group_size=args.group_size,
                    scale_method=args.scale_method)  # bad grid options fail before any work
    torch.set_num_threads(args.threads)
    model, batches, forward = _load_named_model(args.model)
    names = [n for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d))
             or is_hf_conv1d(m)]
    if args.list or not args.layer:
        print("\n".join(names))
        if args.list:
            return 0
        raise QroundError(f"give --layer NAME, one of the {len(names)} layers listed above")
    if args.layer not in names:
        raise QroundError(f"layer {args.layer!r} not found; `qround export-layer --model "
                          f"{args.model} --list` lists the {len(names)} layers that can be "
                          "rounded")
    module = dict(model.named_modules())[args.layer]
    n = layer_weight(module).shape[1]
    if args.group_size is not None and args.group_size < n and n % args.group_size:
        raise QroundError(f"--group-size {args.group_size} does not divide the {n} inputs of "
                          f"layer {args.layer!r}")   # before the model runs
    hessians = capture_hessians(model, batches, layers=[args.layer], forward=forward)
    save_layer_stats_from_module(args.out, module, hessians[args.layer], spec, name=args.layer)
    print(f"wrote {args.out}: {args.layer} {tuple(module.weight.shape)}, {args.bits}-bit, "
          f"scale {args.scale_method}")
    return 0


# ---------------------------------------------------------------------------------- quantize
MINILM_ENCODER = r"\.encoder\."  # the 36 encoder Linear layers (the pooler stays in float)


def _model_and_calibration(args):
    """(float model, calibration batches, forward, default layer regex) for --model."""
    import torch

    from .zoo.hf import is_hf_folder

    if args.max_length is not None and not is_hf_folder(args.model):
        raise QroundError("--max-length sets the tokens per text of a checkpoint folder's "
                          f"calibration; --model {args.model} is not a checkpoint folder")
    if args.model == "minilm":
        model, batches, forward = _load_named_model(args.model, seed=args.seed,
                                                    sentences=_calibration_size(args),
                                                    batch_size=args.batch_size)
        return model, batches, forward, MINILM_ENCODER
    if args.model in DIGITS_MODELS:
        model, batches, forward = _load_named_model(args.model, seed=args.seed,
                                                    batch_size=args.batch_size,
                                                    images=args.calibration_size)
        return model, batches, forward, None
    _check_model_file(args)
    if is_hf_folder(args.model):
        return _checkpoint_and_calibration(args)
    model = _torch_load(args.model, "--model", weights_only=False)
    inputs = _calibration_inputs(args.calibration, model)
    _check_module(model, args.model)
    if args.calibration_size is not None:
        raise QroundError("--calibration-size counts packaged sentences or images; with a model "
                          f"file every input in {args.calibration} is used: leave it out, or "
                          "save fewer inputs")
    tensors = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    if any(isinstance(t, torch.Tensor) and t.layout != torch.strided for t in tensors):
        raise QroundError(f"{args.calibration} holds a sparse tensor: save dense inputs "
                          "(tensor.to_dense())")
    if isinstance(inputs, (list, tuple)):  # batches as they are
        if args.batch_size is not None:
            raise QroundError(f"--batch-size splits a tensor of inputs; {args.calibration} holds "
                              "a list of batches, used as they are: leave it out, or save one "
                              "tensor")
        if any(isinstance(b, Mapping) for b in inputs):
            raise QroundError(f"{args.calibration} holds dict batches; a model file is called "
                              "as model(batch) on tensors. For tokenised batches (input_ids, "
                              "attention_mask), pass a save_pretrained folder as --model with "
                              "a text file as --calibration, or use qround.quantize_model from "
                              "Python")
        if not inputs or not all(isinstance(b, torch.Tensor) and b.ndim >= 1 and len(b)
                                 for b in inputs):
            raise QroundError(f"{args.calibration} must hold a non-empty tensor (N, ...) of "
                              "inputs or a non-empty list of such batches")
        batches = list(inputs)
        # the model runs on the first batch below: the others must be like it
        odd = next((i for i, b in enumerate(batches)
                    if b.shape[1:] != batches[0].shape[1:] or b.dtype != batches[0].dtype), None)
        if odd is not None:
            raise QroundError(
                f"batch {odd} of {args.calibration} is {batches[odd].dtype} "
                f"{tuple(batches[odd].shape)}, batch 0 {batches[0].dtype} "
                f"{tuple(batches[0].shape)}: every batch needs the same dtype and shape but "
                "for its first dimension")
    elif isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 and len(inputs):
        size = args.batch_size or 32
        batches = [inputs[i:i + size] for i in range(0, len(inputs), size)]
    else:
        raise QroundError(f"{args.calibration} must hold a non-empty tensor (N, ...) of inputs "
                          "or a non-empty list of such batches")
    from .calibrate import eval_mode, kept_buffers

    try:  # one small batch first: inputs that do not fit the model are named here (buffers
        # the forward writes get their values back: the saved file records the model as given)
        with torch.no_grad(), eval_mode(model), kept_buffers(model):
            model(batches[0][:2])
    except Exception as exc:  # noqa: BLE001 (any error of the user's forward)
        first = first_line(exc)
        raise QroundError(f"the model in {args.model} cannot run on the inputs in "
                          f"{args.calibration} ({type(exc).__name__}: {first})") from None
    return model, batches, None, None


def _checkpoint_and_calibration(args):
    """(model, batches, forward, None) for a transformers checkpoint folder: texts from
    --calibration (a text file, one text per line) or the packaged calibration sentences."""
    from . import zoo
    from .zoo.hf import load_hf

    if args.calibration and args.calibration_size is not None:
        raise QroundError("--calibration-size counts packaged sentences; with --calibration every "
                          "line of the file is used: leave one of them out")
    if args.calibration:
        texts = _read_texts(args.calibration, "--calibration")
    else:
        texts = zoo.sentences("calibration", n=_calibration_size(args))
    hf = load_hf(args.model, max_length=args.max_length)
    # an encoder's pooler is not on the path of the last hidden state that evaluate scores
    pooler = not hf.causal and any(n.split(".")[0] == "pooler"
                                   for n, _ in hf.model.named_modules())
    batches = hf.batches(texts, args.batch_size or 32)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    cut = sum(int(b["attention_mask"][:, -1].sum()) for b in batches
              if b["attention_mask"].shape[1] == hf.max_length)
    print(f"calibration: {len(texts)} texts, {tokens} tokens (at most {hf.max_length} per "
          f"text; {cut} texts reach that length and may be cut)", flush=True)
    return (hf.model, batches, hf.forward, r"^(?!pooler\.|pooler$)" if pooler else None)


def _read_texts(path: str, flag: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file (a byte-order mark is not text)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            texts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise QroundError(f"{flag} {path!r} could not be read as UTF-8 text "
                          f"({type(exc).__name__}: {exc})") from None
    if not texts:
        raise QroundError(f"{flag} {path!r} holds no text (one text per line)")
    return texts


def _calibration_size(args) -> int:
    """--calibration-size (default 256), checked against the packaged calibration pool."""
    from . import zoo

    n = 256 if args.calibration_size is None else args.calibration_size
    available = len(zoo.sentences("calibration"))
    if n > available:
        raise QroundError(f"--calibration-size {n}: the packaged calibration pool holds "
                          f"{available} sentences")
    return n


def _unknown_model(name: str) -> QroundError:
    """The error for a --model that names nothing qround can load."""
    return QroundError(f"--model {name!r} is neither a packaged model (minilm, "
                       f"{', '.join(DIGITS_MODELS)}), a transformers checkpoint folder (with "
                       "config.json) nor an existing file")


def _check_model_file(args) -> None:
    """--model names a packaged model, a transformers checkpoint folder (--calibration: an
    optional text file) or an existing file that comes with --calibration."""
    import os

    from .zoo.hf import is_hf_folder

    if is_hf_folder(args.model):
        if args.calibration and not os.path.isfile(args.calibration):
            raise QroundError(f"--calibration {args.calibration!r}: no such file")
        if args.calibration and args.calibration.endswith((".pt", ".pth")):
            raise QroundError(f"--calibration {args.calibration!r}: a checkpoint folder takes "
                              "calibration text (a text file, one text per line)")
        return
    if args.model == "minilm" or args.model in DIGITS_MODELS:
        if args.calibration:
            raise QroundError(f"--calibration is for a model file; {args.model} comes with its "
                              "own calibration data (--calibration-size sets how much)")
        return
    if not os.path.isfile(args.model):
        raise _unknown_model(args.model)
    if not args.calibration:
        raise QroundError("a model file needs --calibration INPUTS.pt (a tensor of inputs, "
                          "batched along dim 0, or a list of batches)")
    if not os.path.isfile(args.calibration):
        raise QroundError(f"--calibration {args.calibration!r}: no such file")


def _check_module(model, path: str) -> None:
    """What torch.load read from a model file is an nn.Module, not TorchScript."""
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        raise QroundError(f"{path} is a TorchScript archive (torch.jit.save); qround needs "
                          "the nn.Module itself: torch.save(model, path)")
    if not isinstance(model, torch.nn.Module):
        raise QroundError(f"{path} does not hold a torch nn.Module (torch.save(model, path))")


def _calibration_inputs(path: str, model, flag: str = "--calibration"):
    """--calibration for a model file (or evaluate's --inputs, ``flag``): torch.save's tensor
    or list of batches, or a numpy ``.npy`` array (np.save).  A floating-point array takes the
    dtype of the model's first floating-point parameter (numpy's default float64 would not run
    on a float32 model)."""
    import numpy as np
    import torch

    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise QroundError(f"{flag} {path!r} could not be read ({first_line(exc)})") \
            from None
    if magic != b"\x93NUMPY":
        if magic[:2] == b"PK" and str(path).endswith(".npz"):
            raise QroundError(f"{flag} {path!r} is a numpy .npz archive: save one array "
                              "with np.save (.npy) or a tensor with torch.save")
        return _torch_load(path, flag, weights_only=True)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 (a damaged file or an object array)
        first = first_line(exc)
        raise QroundError(f"{flag} {path!r} could not be read by numpy.load "
                          f"({type(exc).__name__}: {first})") from None
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or \
            np.iscomplexobj(array):
        raise QroundError(f"{flag} {path!r} holds a {array.dtype} array; give numbers")
    if not array.dtype.isnative:   # saved on a machine of the other byte order
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    except (TypeError, ValueError) as exc:   # e.g. long double, which torch has no type for
        raise QroundError(f"{flag} {path!r} holds a {array.dtype} array, which torch "
                          f"cannot take ({first_line(exc)}); save float32/float64 or integers") \
            from None
    if tensor.is_floating_point() and isinstance(model, torch.nn.Module):
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            tensor = tensor.to(dtype)
    return tensor


def _torch_load(path: str, flag: str, weights_only: bool):
    """torch.load, any failure (not a torch file, a damaged one) as a QroundError."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # unpickling raises many types; none should surface as a traceback
        first = first_line(exc)
        hint = ("; the model's class must be importable here: put its folder on PYTHONPATH, "
                "or run python -m qround from that folder"
                if isinstance(exc, (ModuleNotFoundError, AttributeError)) else "")
        raise QroundError(f"{flag} {path!r} could not be read by torch.load "
                          f"({type(exc).__name__}: {first[:200]}){hint}") from exc


def _reconstruction_options(args) -> int:
    """Adam steps per unit of block reconstruction: --iterations, or 300 when an option that
    acts only through reconstruction is given; such an option with --iterations 0 is an error."""
    needs = [flag for flag, given in (
        ("--borders", args.borders != "none"), ("--qdrop", args.qdrop is not None),
        ("--granularity", args.granularity is not None), ("--k", args.k is not None),
        ("--scheme", args.scheme is not None), ("--loss-plot", args.loss_plot is not None))
        if given]
    if args.iterations is None:
        return 300 if needs else 0
    if args.iterations == 0 and needs:
        verb = "acts" if len(needs) == 1 else "act"
        raise QroundError(f"{', '.join(needs)} {verb} only through block reconstruction, which "
                          "--iterations 0 turns off: give --iterations N > 0 or leave it out")
    return args.iterations


def _check_compressed_options(args, iterations: int) -> None:
    """--save-compressed: what the compressed-tensors format cannot hold, before any work."""
    from .zoo.hf import is_hf_folder

    if not is_hf_folder(args.model):
        raise QroundError("--save-compressed writes a transformers checkpoint folder: --model "
                          "must be one")
    if args.asymmetric_grid:
        raise QroundError("--save-compressed writes symmetric grids only (asymmetric ones did "
                          "not load in transformers with compressed-tensors): leave out "
                          "--asymmetric-grid")
    if args.abits is not None:
        raise QroundError("--save-compressed holds weights only: leave out --abits")
    if iterations > 0:
        raise QroundError("--save-compressed holds plain Linear weights: block reconstruction "
                          "(--iterations, --granularity, --qdrop, --scheme, --k, --loss-plot) "
                          "wraps the layers; leave it out, or write qround's file with --out")
    from .interop import _require_compressed_tensors
    _require_compressed_tensors()
    if os.path.exists(args.save_compressed):
        raise QroundError(f"--save-compressed {args.save_compressed!r} exists: give a new folder")


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _override_value(pattern: str, key: str, text: str):
    """One ``KEY=VALUE`` of ``--override`` as the Python value QuantConfig checks."""
    where = f"--override {pattern!r} {key}={text}"
    try:
        if key in ("wbits", "group_size"):
            if key == "group_size" and text.lower() in ("none", "-1"):
                return None  # per channel
            return int(text)
        if key == "damp":
            return float(text)
    except ValueError:
        kind = "an integer (or none: per channel)" if key == "group_size" else (
            "an integer" if key == "wbits" else "a number")
        raise QroundError(f"{where}: {key} must be {kind}") from None
    if key == "symmetric":
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise QroundError(f"{where}: symmetric must be true or false")
    return text  # scale_method, solver: QuantConfig checks them


def _parse_overrides(items) -> dict | None:
    """``--override PATTERN KEY=VALUE ...`` (repeatable) as QuantConfig's ``overrides``: the
    keys are QuantConfig's names (dashes taken for underscores)."""
    from .pipeline import OVERRIDE_KEYS

    if not items:
        return None
    out: dict[str, dict] = {}
    for pattern, *pairs in items:
        if not pairs:
            raise QroundError(f"--override {pattern!r} needs settings after the pattern, e.g. "
                              f"--override {pattern!r} wbits=8 group_size=128")
        if pattern in out:
            raise QroundError(f"--override {pattern!r} is given twice")
        options = {}
        for pair in pairs:
            key, sep, text = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not text.strip():
                raise QroundError(f"--override {pattern!r}: {pair!r} is not KEY=VALUE (keys: "
                                  f"{', '.join(OVERRIDE_KEYS)})")
            if key not in OVERRIDE_KEYS:
                raise QroundError(f"--override {pattern!r}: unknown setting {key!r}; the "
                                  f"settings are {', '.join(OVERRIDE_KEYS)}")
            if key in options:
                raise QroundError(f"--override {pattern!r}: {key} is given twice")
            options[key] = _override_value(pattern, key, text.strip())
        out[pattern] = options
    return out


def _note_other_settings(path: str, source: dict | None, config) -> None:
    """--overrides-from takes a `qround quantize --json` run's or a `qround sensitivity
    --json` allocation's overrides only: say which of that run's other layer settings
    (``source``, its config) this run does not repeat (they used to drop silently)."""
    if not source:
        return
    keys = ("wbits", "first_last_bits", "group_size", "symmetric", "scale_method", "damp",
            "fold_batchnorm", "solver")
    differ = [f"{k}={source[k]!r} (here {getattr(config, k)!r})" for k in keys
              if k in source and source[k] != getattr(config, k)]
    if differ:
        print(f"qround: note: --overrides-from takes {path!r}'s overrides only; its run also "
              f"had {', '.join(differ)}: repeat those options to get them", file=sys.stderr)


def _overrides_from(path: str) -> tuple[list, dict | None, bool | None]:
    """--overrides-from FILE: the overrides of `qround sensitivity --json`'s allocation, of
    `qround quantize --json`'s config, or a JSON list of [pattern, {settings}] pairs; the
    quantize run's whole config when the file is one; and whether the file's run had
    --explicit (None where it does not say)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise QroundError(f"--overrides-from {path!r} could not be read as JSON "
                          f"({type(exc).__name__}: {exc})") from None
    source, explicit = None, None
    if isinstance(data, dict):
        explicit = data.get("explicit")
        if "sensitivity" in data and not isinstance(data.get("allocation"), dict):
            raise QroundError(f"--overrides-from {path!r} holds a sensitivity measurement "
                              "without an allocation: run qround sensitivity with --mean-bits")
        if isinstance(data.get("allocation"), dict):
            if isinstance(data.get("config"), dict):   # the measurement's settings (its
                # wbits is the default of layers the allocation does not cover: none; its
                # solver is QuantConfig's default, unused: rounding to nearest measures)
                source = {k: v for k, v in data["config"].items()
                          if k not in ("wbits", "solver")}
            data = data["allocation"].get("overrides")
        elif isinstance(data.get("config"), dict):
            source = data["config"]
            data = data["config"].get("overrides")
        else:
            data = data.get("overrides")
    if not isinstance(data, list) or not data or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
            and isinstance(p[1], dict) for p in data):
        if source is not None and not data:
            raise QroundError(f"--overrides-from {path!r} is a report of a run without "
                              "per-layer overrides: there are none to take from it")
        raise QroundError(f"--overrides-from {path!r} holds no overrides: expected `qround "
                          "sensitivity --mean-bits ... --json`'s file, `qround quantize "
                          "--json`'s, or a list of [pattern, {settings}] pairs")
    return [(p, o) for p, o in data], source, explicit  # QuantConfig checks the settings


_FLAG_NAMES = ("wbits", "first_last_bits", "abits", "device", "layers", "exclude", "damp",
               "capture_cache_mb", "correction", "refits", "group_size", "seed", "inputs",
               "granularity", "scheme", "k", "borders", "qdrop", "iterations")
_QUOTED = re.compile(r"""((?<!\w)'(?:[^'\\]|\\.)*'(?!\w)|(?<!\w)"(?:[^"\\]|\\.)*"(?!\w))""")


def _as_flags(text: str) -> str:
    """``wbits=9`` -> ``--wbits 9`` (and ``ReconstructConfig.qdrop`` -> ``--qdrop``) outside
    quoted values: what the user typed (a regex, a solver spec) is left as it is."""
    parts = _QUOTED.split(text)
    for i in range(0, len(parts), 2):   # the even parts lie outside quotes
        part = re.sub(r"\bReconstructConfig\.(\w+)",
                      lambda m: "--" + m.group(1).replace("_", "-"), parts[i])
        parts[i] = re.sub(r"(?<![\w.-])(" + "|".join(_FLAG_NAMES) + r")(=|(?= only | must ))",
                          lambda m: "--" + m.group(1).replace("_", "-")
                          + (" " if m.group(2) == "=" else ""), part)
    return "".join(parts)


@contextlib.contextmanager
def _settings_as_flags():
    """QuantConfig's and ReconstructConfig's errors name their Python settings (``wbits=9``);
    the shell user gave flags (``--wbits 9``).  --override values keep their key=value form,
    and a solver's own refusals (its spec's options) are not about flags: the caller checks
    the solver spec before this."""
    try:
        yield
    except QroundError as exc:
        text = str(exc)
        if text.startswith("overrides"):
            raise
        raise QroundError(_as_flags(text)) from None


def cmd_quantize(args) -> int:
    import torch

    from .pipeline import QuantConfig, quantize_model
    from .report import write_json_atomic
    from .solvers import get_solver, warm_up

    from .reconstruct import ReconstructConfig

    if args.scheme is not None and not any(u.strip() for u in args.scheme.split(",")):
        raise QroundError(f"--scheme {args.scheme!r} names no unit: give units separated by "
                          "commas, each one module or modules joined by '+' (e.g. "
                          "'stem,block1+block2,head')")
    if args.scheme is not None and args.granularity not in (None, "scheme"):
        raise QroundError(f"--scheme gives the units itself: leave out --granularity "
                          f"{args.granularity}")
    if args.borders != "none" and args.abits is None:
        raise QroundError(f"--borders {args.borders} needs quantised inputs: give --abits")
    if not args.fusion and args.borders == "none":
        raise QroundError("--no-fusion turns off the fusion of AQuant borders in convs: it "
                          "needs --borders linear or quadratic")
    if args.qdrop is not None and args.abits is None:
        raise QroundError("--qdrop drops the quantisation of a layer's input at random: it "
                          "needs quantised inputs: give --abits")
    if args.loss_plot:
        from .report import require_pyplot
        require_pyplot()   # before the work, not after it
    if args.overrides_from and args.override:
        raise QroundError("--overrides-from and --override both give the per-layer settings: "
                          "use one of them")
    iterations = _reconstruction_options(args)
    if args.k is not None and args.granularity != "loss":
        raise QroundError("--k (the number of merges) applies to --granularity loss: give "
                          "--granularity loss too")
    if args.widen and iterations > 0:
        raise QroundError("--widen cannot be combined with block reconstruction (--iterations "
                          "or an option that implies it): its soft rounding chooses floor or "
                          "ceil only, so the widened codes would be lost; leave out one of them")
    if args.save_compressed and args.explicit:
        raise QroundError("--save-compressed writes the checkpoint's own layers for "
                          "transformers to load; --explicit renames them (the explicit forms' "
                          "Linear/conv layers): use --out")
    if args.save_compressed:
        _check_compressed_options(args, iterations)
    check_paths({"--out": args.out, "--json": args.json, "--loss-plot": args.loss_plot,
                 "--save-compressed": args.save_compressed},
                {"--model": args.model, "--calibration": args.calibration,
                 "--overrides-from": args.overrides_from})
    check_format("--out", args.out, "a safetensors file", (".safetensors",))
    check_format("--json", args.json, "JSON", (".json",))
    check_format("--loss-plot", args.loss_plot, "a PNG image", PLOT_SUFFIXES)
    torch.set_num_threads(args.threads)
    reconstruction = None
    if iterations > 0:
        with _settings_as_flags():
            reconstruction = ReconstructConfig(iterations=iterations, seed=args.seed,
                                               qdrop=0.5 if args.qdrop is None else args.qdrop,
                                               capture_cache_mb=args.capture_cache_mb)
    overrides, source, made_explicit = (_overrides_from(args.overrides_from)
                                        if args.overrides_from
                                        else (_parse_overrides(args.override), None, None))
    _check_explicit_source(args, made_explicit)
    try:   # a spec's own refusals name its options, not flags: say which flag holds them
        get_solver(args.solver)
    except QroundError as exc:
        # where the refusal names the whole spec, the flag says it once
        said = str(exc).replace(f"solver {args.solver!r}", "solver", 1)
        raise QroundError(f"--solver {args.solver!r}: {said}") from None
    with _settings_as_flags():
        config = QuantConfig(wbits=args.wbits, symmetric=not args.asymmetric_grid,
                             group_size=args.group_size, scale_method=args.scale_method,
                             solver=args.solver, inputs=args.inputs,
                             bias_correction=args.bias_correction, refits=args.refits,
                             widen=args.widen, correction=args.correction,
                             fold_batchnorm=args.fold_bn,
                             first_last_bits=args.first_last_bits,
                             overrides=overrides, seed=args.seed,
                             capture_cache_mb=args.capture_cache_mb,
                             device=args.device, progress=not args.no_progress,
                             layers=args.layers, exclude=args.exclude, damp=args.damp,
                             abits=args.abits,
                             borders=args.borders, fusion=args.fusion,
                             reconstruction=reconstruction,
                             granularity="scheme" if args.scheme else (args.granularity or "block"),
                             k=args.k,
                             scheme=None if args.scheme is None else tuple(
                                 u.strip() for u in args.scheme.split(",") if u.strip()))
    if args.overrides_from:
        _note_other_settings(args.overrides_from, source, config)
    # kernel loading (compilation after an install) stays out of the layers' reported seconds
    specs = {args.solver} | {o["solver"] for _, o in config.overrides or ()
                             if isinstance(o.get("solver"), str)}
    warm_up(*(get_solver(spec) for spec in sorted(specs)))
    if args.save_compressed:
        asym = [p for p, o in config.overrides or () if o.get("symmetric") is False]
        if asym:
            raise QroundError(f"--save-compressed writes symmetric grids only: --override "
                              f"{asym[0]!r} symmetric=false cannot be written; write qround's "
                              "file with --out")
    _check_model_file(args)
    model, batches, forward, default_layers = _model_and_calibration(args)
    model = _explicit_if_asked(model, args)
    if args.save_compressed:
        from .problems.layers import is_hf_conv1d
        if any(is_hf_conv1d(m) for m in model.modules()):
            raise QroundError("--save-compressed: compressed-tensors packs nn.Linear weights; "
                              "this model's layers are transformers' Conv1D (GPT-2): use --out")
    if args.layers is None and default_layers:
        from dataclasses import replace
        config = replace(config, layers=default_layers)
    if args.save_compressed and args.bias_correction:
        from .pipeline import _select

        modules = dict(model.named_modules())
        bare = [n for n in _select(model, config)[0]   # the layers to round (tied ones not)
                if isinstance(modules[n], torch.nn.Linear) and modules[n].bias is None]
        if bare:
            raise QroundError(f"--save-compressed with --bias-correction: bias correction gives "
                              f"this model's bias-free Linear layers ({bare[0]!r}"
                              + (f" and {len(bare) - 1} more" if len(bare) > 1 else "")
                              + ") a bias, which its config has no place for (transformers "
                              "would drop it on loading); leave out --bias-correction")
    qmodel = quantize_model(model, batches, config, forward=forward)
    print(qmodel.table())
    if not args.explicit:
        _explicit_note(model, qmodel, config)
    if qmodel.units is not None and qmodel.units.granularity in ("modcap", "loss"):
        print(qmodel.units.table())
    if args.out:
        qmodel.save(args.out)
        print(f"wrote {args.out}" + (
            " (the explicit model's layers: load with qround.export.load(qround.explicit."
            "explicit_layers(model), path)" + (")" if args.abits is not None else
                                               ", then qround.explicit.fuse_layers") + ")"
            if args.explicit else ""))
    if args.save_compressed:
        import transformers

        from .interop import save_compressed_tensors
        # the folder's own tokenizer, as it was saved (not the padding qround set up)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        save_compressed_tensors(qmodel, args.save_compressed, tokenizer=tokenizer)
        print(f"wrote {args.save_compressed} (compressed-tensors, pack-quantized)")
    if args.json:
        write_json_atomic(args.json, {"totals": qmodel.totals(), "config": config.as_dict(),
                                      "explicit": args.explicit,
                                      "layers": [r.as_dict() for r in qmodel.report],
                                      "skipped": qmodel.skipped,
                                      "reconstruction": None if qmodel.reconstruction is None
                                      else [b.as_dict() for b in qmodel.reconstruction.blocks],
                                      "units": None if qmodel.units is None
                                      else qmodel.units.as_dict()})
        print(f"wrote {args.json}")
    if args.loss_plot:   # last: the model and report are written whatever the plot does
        from .granularity import plot_losses
        plot_losses({config.granularity: qmodel.reconstruction}, args.loss_plot)
        print(f"wrote {args.loss_plot}")
    return 0


def _explicit_note(model, qmodel, config) -> None:
    """Print which of the layers left in float here --explicit would round (those its forms
    hold that --layers / --exclude choose), unless it would refuse the model."""
    if not any("qround." in why and "explicit_" in why for why in qmodel.skipped.values()):
        return
    from .explicit import _explicit_children

    children, refusal = _explicit_children(model)
    chosen = [c for name, cs in children.items() if name in qmodel.skipped for c in cs
              if (config.layers is None or re.search(config.layers, c))
              and not (config.exclude and re.search(config.exclude, c))]
    if refusal is None and chosen:
        print(f"--explicit would round {len(chosen)} more layer(s) ({chosen[0]!r}"
              + (f" and {len(chosen) - 1} more" if len(chosen) > 1 else "") + ")")


def _check_explicit_source(args, made: bool | None) -> None:
    """An --overrides-from file records whether its run had --explicit (``made``): its layer
    names are the explicit forms' with it.  Refuse the mismatch that would match no layer;
    note the one that leaves the newly rounded layers at --wbits."""
    if made is True and not args.explicit:
        raise QroundError(f"--overrides-from {args.overrides_from!r} was made with --explicit: "
                          "its layers are the explicit forms' (e.g. 'attn.q_proj', 'up.conv'); "
                          "add --explicit")
    if made is False and args.explicit:
        print(f"qround: note: --overrides-from {args.overrides_from!r} was made without "
              "--explicit: the layers --explicit adds get no override (--wbits, or "
              "--first-last-bits)", file=sys.stderr)


def _explicit_if_asked(model, args):
    """``model`` with its nn.MultiheadAttention, nn.ConvTranspose1d/2d and nn.Conv3d made
    explicit (a copy) when --explicit was given."""
    if not args.explicit:
        return model
    from .explicit import explicit_layers
    try:
        return explicit_layers(model)
    except QroundError as exc:
        raise QroundError(f"--explicit: {exc}") from None


def _bits_list(text: str) -> tuple[int, ...]:
    """--bits 2,3,4,8 as checked widths."""
    try:
        widths = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise QroundError(f"--bits {text!r} must be comma-separated integers, e.g. 2,3,4,8") \
            from None
    if not widths:
        raise QroundError(f"--bits {text!r} names no width")
    return tuple(sorted({check_bits(b, "--bits") for b in widths}))


SUGGESTED_OUT = "quantized.safetensors"   # the file the printed `qround quantize` writes


def _measured_args(args) -> list[str]:
    """The `qround quantize` options that repeat what `qround sensitivity` measured: the model
    and its calibration, the grid settings, first/last bits and the layer selection (the
    per-layer widths come from the allocation's overrides)."""
    out = [] if args.model == "minilm" else ["--model", args.model]
    out += ["--explicit"] if args.explicit else []
    out += ["--fold-bn"] if args.fold_bn else []
    for flag, value in (("--seed", args.seed or None),   # it trains the digits models too
                        ("--calibration", args.calibration),
                        ("--calibration-size", args.calibration_size),
                        ("--max-length", args.max_length),
                        ("--batch-size", args.batch_size),
                        ("--group-size", args.group_size),
                        ("--scale-method", None if args.scale_method == "mse"
                         else args.scale_method),
                        ("--first-last-bits", args.first_last_bits),
                        ("--layers", args.layers), ("--exclude", args.exclude)):
        if value is not None:
            out += [flag, str(value)]
    return out + (["--asymmetric-grid"] if args.asymmetric_grid else [])


def cmd_sensitivity(args) -> int:
    import shlex

    import torch

    from .pipeline import QuantConfig
    from .report import write_json_atomic
    from .sensitivity import layer_sensitivity

    check_paths({"--json": args.json}, {"--model": args.model, "--calibration": args.calibration})
    check_format("--json", args.json, "JSON", (".json",))
    widths = _bits_list(args.bits)
    if args.tie_inputs and args.mean_bits is None:
        raise QroundError("--tie-inputs ties the widths of an allocation: give --mean-bits too")
    overrides = _parse_overrides(args.override)
    # every layer is at one of --bits or held (at --first-last-bits, or an override's wbits)
    held = [o["wbits"] for o in (overrides or {}).values() if "wbits" in o]
    held += [] if args.first_last_bits is None else [args.first_last_bits]
    narrowest = min([widths[0], *held])
    if args.mean_bits is not None and not narrowest <= args.mean_bits:
        raise QroundError(f"--mean-bits {args.mean_bits} is below the narrowest of --bits "
                          f"({widths[0]})" + (f" and of the held layers' widths ({narrowest})"
                                              if narrowest < widths[0] else ""))
    torch.set_num_threads(args.threads)
    with _settings_as_flags():
        config = QuantConfig(symmetric=not args.asymmetric_grid, group_size=args.group_size,
                             scale_method=args.scale_method, first_last_bits=args.first_last_bits,
                             overrides=overrides, seed=args.seed, fold_batchnorm=args.fold_bn,
                             layers=args.layers, exclude=args.exclude, progress=False,
                             capture_cache_mb=args.capture_cache_mb)
    _check_model_file(args)
    model, batches, forward, default_layers = _model_and_calibration(args)
    model = _explicit_if_asked(model, args)
    if args.layers is None and default_layers:
        from dataclasses import replace
        config = replace(config, layers=default_layers)
    sens = layer_sensitivity(model, batches, config, bits=widths, forward=forward)
    print(sens.table())
    print(f"{len(sens.layers)} layers, {len(widths)} widths: {sens.seconds:.1f} s")
    allocation = None
    if args.mean_bits is not None:
        try:
            allocation = sens.allocate(args.mean_bits, tie_inputs=args.tie_inputs)
        except QroundError:
            if args.json:   # the measurement took the time: keep it
                write_json_atomic(args.json, {"config": config.as_dict(),
                                              "explicit": args.explicit,
                                              "sensitivity": sens.as_dict(), "allocation": None})
                print(f"wrote {args.json} (the measurement; no allocation)")
            raise
        counts = {}
        for b in allocation.bits.values():
            counts[b] = counts.get(b, 0) + 1
        print(f"allocation for at most {args.mean_bits:g} bits per weight: "
              f"{allocation.mean_bits:.4g} bits per weight ("
              + ", ".join(f"{n} layers at W{b}" for b, n in sorted(counts.items()))
              + f"), predicted output error {allocation.predicted_error:.3e}")
        if args.tie_inputs:
            print(f"tied (one width each): {len(allocation.tied)} groups of layers that read "
                  "the same input" + "".join(f"\n  W{allocation.bits[t[0]]}: " + ", ".join(t)
                                             for t in allocation.tied))
        print("quantise with: qround quantize " + shlex.join(
            _measured_args(args) + allocation.cli_args() + ["--out", SUGGESTED_OUT]))
    if args.json:
        write_json_atomic(args.json, {"config": config.as_dict(), "explicit": args.explicit,
                                      "sensitivity": sens.as_dict(),
                                      "allocation": None if allocation is None
                                      else allocation.as_dict()})
        print(f"wrote {args.json}")
        if allocation is not None:
            print("or: qround quantize " + shlex.join(
                _measured_args(args) + ["--overrides-from", args.json, "--out", SUGGESTED_OUT]))
    return 0


def _enough_texts(texts: list[str], args) -> None:
    """An encoder's metrics (Spearman, top-10 agreement) need more than ten texts."""
    if len(texts) < 11:
        raise QroundError(f"--texts {args.texts!r} holds {len(texts)} texts; an encoder's "
                          "metrics (Spearman, top-10 agreement) need at least 11")


def cmd_evaluate(args) -> int:
    import torch

    from . import export, zoo
    from .evaluate import digits_accuracy, minilm_metrics
    from .report import format_table, json_text
    from .zoo.hf import hf_metrics, is_hf_folder, load_hf

    folder = is_hf_folder(args.model)
    own = not (folder or args.model == "minilm" or args.model in DIGITS_MODELS)
    if not own and (args.inputs or args.explicit):
        raise QroundError(f"--inputs and --explicit are for a model file (torch.save(model)); "
                          f"--model {args.model} is scored on its own data and layers")
    if own and (args.abits is not None or args.texts or args.sentences is not None
                or args.seed is not None or args.max_length is not None):
        raise QroundError("a model file is scored on --inputs with the activation quantisers "
                          "its file carries, if any: --abits, --texts, --sentences, --seed and "
                          "--max-length are for the packaged models and checkpoint folders")
    if (args.model == "minilm" or folder) and args.abits is not None:
        raise QroundError("--abits applies to the digits models; MiniLM and checkpoint folders "
                          "are evaluated with the activation quantisers their file carries, if "
                          "any")
    if args.model in DIGITS_MODELS and (args.texts or args.sentences is not None):
        raise QroundError("--texts and --sentences choose the text of MiniLM or a checkpoint "
                          "folder; the digits models are scored on the digits' test images")
    if args.seed is not None and args.model not in DIGITS_MODELS:
        raise QroundError("--seed chooses the float digits model that qround trains; MiniLM and "
                          "checkpoint folders are fixed: leave it out")
    if args.max_length is not None and not folder:
        raise QroundError("--max-length sets the tokens per text of a checkpoint folder; "
                          f"--model {args.model} is not a checkpoint folder")
    if args.texts and args.sentences is not None:
        raise QroundError("--sentences counts packaged evaluation sentences; with --texts every "
                          "line of the file is used: leave one of them out")
    texts = None
    if args.model == "minilm" or folder:
        texts = (_read_texts(args.texts, "--texts") if args.texts else
                 zoo.sentences("evaluation", n=1000 if args.sentences is None
                               else args.sentences))
    torch.set_num_threads(args.threads)
    check = not args.no_source_check
    if folder:
        hf = load_hf(args.model, max_length=args.max_length)
        if not hf.causal:
            _enough_texts(texts, args)
        quant = export.load(hf.model, args.quantized, check_source=check)
        metrics = hf_metrics(hf, quant, texts)
        metrics["sentences"] = len(texts)
    elif args.model == "minilm":
        _enough_texts(texts, args)
        model = zoo.load_minilm()
        quant = export.load(model, args.quantized, check_source=check)
        metrics = minilm_metrics(model, quant, texts)
        metrics["sentences"] = len(texts)
    elif args.model in DIGITS_MODELS:
        # `qround quantize` trains the float model with its --seed, which the file records
        seed = args.seed if args.seed is not None else \
            export.read_metadata(args.quantized)["config"].get("seed", 0)
        model, data = zoo.train_digits_cnn(DIGITS_MODELS[args.model], seed=seed)
        quant = _load_onto_digits(export, model, args, check)
        saved_abits = export.read_metadata(args.quantized)["config"].get("abits")
        if saved_abits is not None and args.abits is not None:
            raise QroundError(f"{args.quantized} carries its own {saved_abits}-bit activation "
                              "quantisers: leave out --abits")
        metrics = {"float_accuracy": digits_accuracy(model, data)}
        if args.abits is not None:
            # the same activation rounding on the float weights: what the weights alone cost
            metrics["float_weights_abits_accuracy"] = digits_accuracy(model, data,
                                                                      abits=args.abits)
        metrics.update(quantized_accuracy=digits_accuracy(quant, data, abits=args.abits),
                       abits=saved_abits if saved_abits is not None else args.abits,
                       model_seed=seed)
    else:
        metrics = _own_model_metrics(args, check)
    meta = export.read_metadata(args.quantized)
    sizes = {name: (int(info["bits"]), int(np.prod(info["weight_shape"])))
             for name, info in meta["layers"].items()}
    weights = sum(count for _, count in sizes.values())
    # the mean over the quantised weights: differs from wbits with overrides or first_last_bits
    mean_bits = sum(b * count for b, count in sizes.values()) / weights if weights else 0.0
    metrics.update(file=str(args.quantized), wbits=int(meta["config"]["wbits"]),
                   mean_wbits=round(mean_bits, 3), solver=meta["solver"])
    metrics.setdefault("abits", meta["config"].get("abits"))
    if args.json:
        from .report import environment

        print(json_text({**metrics, "environment": environment()}))
    else:
        print(format_table([metrics]))
    return 0


def _own_model_metrics(args, check: bool) -> dict:
    """evaluate on a model file: the quantised file loaded onto the float model (its explicit
    form with --explicit), both run on --inputs, their outputs compared
    (:func:`qround.evaluate.output_metrics`)."""
    import os

    import torch

    from . import export
    from .evaluate import output_metrics

    if not os.path.isfile(args.model):
        raise _unknown_model(args.model)
    if not args.inputs:
        raise QroundError("a model file is scored on inputs: give --inputs INPUTS.pt (a tensor "
                          "batched along dim 0, a list of batches, or a .npy array), e.g. "
                          "held-out inputs of the kind --calibration had")
    model = _torch_load(args.model, "--model", weights_only=False)
    _check_module(model, args.model)
    inputs = _calibration_inputs(args.inputs, model, flag="--inputs")
    if isinstance(inputs, torch.Tensor) and inputs.ndim >= 1 and len(inputs):
        batches = list(torch.split(inputs, 256))
    elif isinstance(inputs, (list, tuple)) and inputs and all(
            isinstance(b, torch.Tensor) and b.ndim >= 1 and len(b) for b in inputs):
        batches = list(inputs)
    else:
        raise QroundError(f"--inputs {args.inputs!r} must hold a non-empty tensor (N, ...) or "
                          "a non-empty list of such batches")
    float_model = _explicit_if_asked(model, args)
    quant = export.load(float_model, args.quantized, check_source=check)
    try:
        return output_metrics(float_model, quant, batches)
    except (RuntimeError, TypeError, ValueError) as exc:   # inputs the model cannot take
        raise QroundError(f"the model in {args.model} cannot run on the inputs in "
                          f"{args.inputs} ({type(exc).__name__}: {first_line(exc)})") from None


def _load_onto_digits(export, model, args, check: bool):
    """``export.load`` onto the digits model qround trains today: a file quantised from one
    that an older qround's training recipe made cannot be scored here, and the refusal (or,
    for a file without the float model's fingerprint, the warning) says so."""
    from .zoo.digits import RECIPE_VERSION

    why = (f"qround trains --model {args.model} with its training recipe v{RECIPE_VERSION}; a "
           "file quantised from a model that an older qround trained (another recipe) is "
           "scored correctly only by that qround, or after quantising again")
    meta = export.read_metadata(args.quantized)
    file_seed = meta.get("config", {}).get("seed", 0)
    if args.seed is not None and args.seed != file_seed:
        why = (f"{args.quantized} was quantised from the model trained with seed {file_seed}, "
               f"and --seed {args.seed} trains another: leave --seed out (it defaults to the "
               "file's seed)")
    if check and meta.get("source") is None and not meta.get("source_damaged"):
        log.warning("%s holds no fingerprint of the float model it was made from (written by "
                    "an older qround): %s", args.quantized, why)
        check = False   # nothing to check: export.load would warn again
    try:
        return export.load(model, args.quantized, check_source=check)
    except QroundError as exc:
        if "was made from another float model" not in str(exc):
            raise
        raise QroundError(f"{exc}\n  {why}") from None


# ---------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run_demo
    from .report import environment, write_json_atomic
    from .solvers.registry import split_specs

    check_paths({"--json": args.json})
    check_format("--json", args.json, "JSON", (".json",))
    if args.solvers is not None and not split_specs(args.solvers):
        raise QroundError(f"--solvers {args.solvers!r} names no solver")
    result = run_demo(channels=args.channels, solvers=args.solvers, threads=args.threads,
                      seed=args.seed, progress=not args.no_progress, journey=args.journey)
    print(result["table"])
    if args.json:
        write_json_atomic(args.json, {**{k: v for k, v in result.items() if k != "table"},
                                      "environment": environment()})
        print(f"\nwrote {args.json}")
    return 0


def cmd_solvers(args) -> int:
    from .report import format_table
    from .solvers import available_solvers
    rows = [{"name": k, "description": v} for k, v in available_solvers().items()]
    print(format_table(rows))
    return 0


# ---------------------------------------------------------------------------------- parser
def _add_model_arguments(q) -> None:
    """--model and its calibration options, as quantize and sensitivity take them."""
    q.add_argument("--model", default="minilm",
                   help="minilm | digits-cnn | digits-resnet | digits-mobilenet | a transformers "
                        "checkpoint folder (save_pretrained's, with its tokenizer) | a file "
                        "from torch.save(model) (with --calibration) (default: %(default)s)")
    q.add_argument("--fold-bn", action="store_true",
                   help="fold every BatchNorm that follows a conv or Linear into it first "
                        "(qround.fold.fold_batchnorm): the rounded weights are the deployed "
                        "ones; quantize's saved file records it, and evaluate folds the float "
                        "model the same way")
    q.add_argument("--calibration",
                   help="for a model file: a file of calibration inputs (torch.save of a "
                        "tensor or a list of batches, or np.save's .npy); for a "
                        "checkpoint folder: a text file, one text per line (default: the "
                        "packaged sentences)")
    q.add_argument("--calibration-size", type=int_at_least(1), default=None,
                   help="packaged calibration sentences for MiniLM or a checkpoint folder "
                        "(default: 256); for the digits models, the first images of their "
                        "calibration split (default: all 179)")
    q.add_argument("--max-length", type=int_at_least(1), default=None, metavar="TOKENS",
                   help="a checkpoint folder: tokens per calibration text, at most (default: "
                        "128, or the model's positions if fewer)")
    q.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="calibration samples per batch: texts for MiniLM and a checkpoint "
                        "folder, images for the digits models, rows of --calibration's tensor "
                        "for a model file (default: 32; 64 for the digits models)")
    q.add_argument("--explicit", action="store_true",
                   help="round the model's nn.MultiheadAttention, nn.ConvTranspose1d/2d and "
                        "nn.Conv3d layers (otherwise left in float) through their explicit "
                        "forms (qround.explicit.explicit_layers): layer names and saved "
                        "weights are the explicit model's, e.g. 'attn.q_proj', 'up.conv'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qround", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"qround {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log progress details (-v: each layer's result; -vv: debug details "
                        "such as solver steps and cache sizes)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="log errors only (no warnings, no progress bars; results are still "
                        "printed)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("solve", help="solve the rounding problems of layer statistics files")
    s.add_argument("files", nargs="+", help="layer statistics .npz files (see qround.problems.io)")
    s.add_argument("--solver", default=DEFAULT_SOLVER,
                   help="solver name or spec (a+b chains, a|b best-of, options as in "
                        "'tabu(restarts=8)'; default: %(default)s, as for quantize)")
    s.add_argument("--bits", type=int, default=None,
                   help="grid bits when the file has no scale (export-layer files store theirs: "
                        "export again with --bits instead) (default: the file's bits)")
    s.add_argument("--scale-method", default=None, choices=["minmax", "mse", "mse-output"],
                   help="scale search when the file has no scale (default: mse; refused for a "
                        "file with stored scales)")
    s.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0,
                   help="of the solver (default: %(default)s)")
    s.add_argument("--device", default=None,
                   help="cpu or cuda: where the torch solvers (cem, hopfield, meanfield, gptq) "
                        "run")
    s.add_argument("--refits", type=int_at_least(0), default=0, metavar="N",
                   help="rounds of refitting the scales to the rounding, each followed by another "
                        "solve (qround.scales; --out then holds the refitted scale)")
    s.add_argument("--lower-bound", action="store_true",
                   help="also compute each layer's certified lower bound (qround.problems.bounds: "
                        "no rounding costs less) and show bound/RTN and the solution's "
                        "certified gap, the share of RTN's excess over the bound it may still "
                        "leave (0: proven optimal); costs about as much as a solve")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    s.add_argument("--out", help="write codes (out x in), choices, scale, zero_point to this .npz")
    s.add_argument("--threads", type=int_at_least(1, MAX_THREADS), default=2,
                   help=THREADS_HELP)
    s.set_defaults(func=cmd_solve)

    xq = sub.add_parser("export-qubo", help="write a layer's channel QUBOs as .qubo text files "
                                             "(qbsolv format) with a manifest of known solutions")
    xq.add_argument("file", help="a layer statistics .npz (qround export-layer)")
    xq.add_argument("--out", required=True, help="folder for the .qubo files (c0003.qubo for "
                                                 "channel 3) and manifest.json (created; "
                                                 "nothing in it is overwritten)")
    xq.add_argument("--channels", type=channel_selection, default=EXPORT_CHANNELS_DEFAULT,
                    help="all, a range a:b or indices i,j,k (default: 0:16, the first 16)")
    xq.add_argument("--solver", default="quality",
                    help="its solution goes into the manifest beside RTN's; '' for none "
                         "(default: %(default)s)")
    xq.add_argument("--bits", type=int, default=None,
                    help="grid bits when the file has no scale (export-layer files store theirs: "
                        "export again with --bits instead) (default: the file's bits)")
    xq.add_argument("--scale-method", default=None, choices=["minmax", "mse", "mse-output"],
                    help="scale search when the file has no scale (default: mse; refused for a "
                         "file with stored scales)")
    xq.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0,
                    help="of the solver (default: %(default)s)")
    xq.add_argument("--no-lower-bound", action="store_true",
                    help="leave out each channel's certified lower bound on the energy (the "
                         "manifest's lower_bound: no x has a lower energy)")
    xq.add_argument("--device", default=None, help="cpu or cuda, for the torch solvers")
    xq.add_argument("--threads", type=int_at_least(1, MAX_THREADS), default=2,
                    help=THREADS_HELP)
    xq.set_defaults(func=cmd_export_qubo)

    sm = sub.add_parser("sample", help="qround's tabu search or annealing on qbsolv .qubo files "
                                       "or dimod BQM files (cost against RTN's where an "
                                       "export-qubo manifest lists the file)")
    sm.add_argument("files", nargs="+", help=".qubo files (qbsolv format; every variable "
                                             "0..maxNodes-1 is searched, those without "
                                             "entries too), or files of dimod's "
                                             "BinaryQuadraticModel.to_file()")
    sm.add_argument("--method", default="tabu",
                    help="tabu or anneal, with options as in 'tabu(restarts=8)' or "
                         "'anneal(num_sweeps=5000)'; or, to compare, dwave-samplers' neal, "
                         "dwave-tabu or dwave-steepest, as in 'dwave-tabu(timeout=20)' "
                         "(default: %(default)s)")
    sm.add_argument("--reads", type=int_at_least(1), default=4,
                    help="independent searches per file from random starts; the best is "
                         "reported (default: %(default)s)")
    sm.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0,
                    help="seeds the random starts and the search: equal seeds, equal results, "
                         "except under a time budget (a timeout; dwave-tabu always has one), "
                         "where the result depends on the machine's speed "
                         "(default: %(default)s)")
    sm.add_argument("--json", action="store_true", help="one JSON line per file")
    sm.add_argument("--out", help="write every file's best bit string and energy to this JSON")
    sm.add_argument("--threads", type=int_at_least(1, MAX_THREADS), default=2,
                    help=THREADS_HELP)
    sm.set_defaults(func=cmd_sample)

    e = sub.add_parser("export-layer", help="write a layer statistics file from a real model layer")
    e.add_argument("--model", default="minilm",
                   help="minilm | digits-cnn | digits-resnet | digits-mobilenet | a transformers "
                        "checkpoint folder (default: %(default)s)")
    e.add_argument("--layer", help="module name (see --list)")
    e.add_argument("--list", action="store_true",
                   help="list the layers that can be rounded (Linear, Conv2d, Conv1d, "
                        "transformers' "
                        "Conv1D) and exit")
    e.add_argument("--out", help="output .npz")
    e.add_argument("--bits", type=int, default=4, help="(default: %(default)s)")
    e.add_argument("--asymmetric", action="store_true",
                   help="unsigned grid with a zero point (default: symmetric)")
    e.add_argument("--group-size", type=group_size_arg, default=None,
                    help="inputs per scale (default: none, one scale per output channel; "
                         "-1 also means none)")
    e.add_argument("--scale-method", default="mse", choices=["minmax", "mse", "mse-output"],
                   help="scale search per output channel (default: %(default)s)")
    e.add_argument("--threads", type=int_at_least(1, MAX_THREADS), default=2,
                   help=THREADS_HELP)
    e.set_defaults(func=cmd_export_layer)

    q = sub.add_parser("quantize", help="quantise a whole model's weights with a chosen solver")
    _add_model_arguments(q)
    q.add_argument("--wbits", type=int, default=4, help="weight bits (default: %(default)s)")
    q.add_argument("--solver", default=DEFAULT_SOLVER,
                   help="solver spec for every layer (default: %(default)s)")
    q.add_argument("--group-size", type=group_size_arg, default=None,
                    help="inputs per scale (default: none, one scale per output channel; "
                         "-1 also means none)")
    q.add_argument("--scale-method", default="mse", choices=["minmax", "mse", "mse-output"],
                   help="scale search per output channel or group (default: %(default)s)")
    q.add_argument("--asymmetric-grid", action="store_true", help="unsigned grid with zero point")
    q.add_argument("--inputs", default=INPUTS_DEFAULT, choices=["float", "quantized", "asymmetric"],
                   help="statistics source: the float model's layer inputs, the partly quantised "
                        "model's (GPTQ's sequential), or both paired (AdaRound eq. 25) "
                        "(default: %(default)s)")
    q.add_argument("--bias-correction", action="store_true",
                   help="add the mean of each layer's solved error to its bias (Nagel et al. "
                        "2019): the layer's own rounding error with --inputs quantized or float, "
                        "plus the corrected share of the earlier layers' error with asymmetric; "
                        "the solver then minimises the error left after the correction")
    q.add_argument("--correction", type=float, default=1.0, metavar="A",
                   help="with --inputs asymmetric: share of the earlier layers' error that each "
                        "layer's target corrects (1 = AdaRound eq. 25, 0 = as 'quantized')")
    q.add_argument("--refits", type=int_at_least(0), default=0, metavar="N",
                   help="rounds of refitting the scales to the chosen rounding, each followed by "
                        "another solve (0 = off)")
    q.add_argument("--widen", action="store_true",
                   help="after the solver (and refits), move codes by +-1 on the whole grid "
                        "while that lowers a channel's cost: codes may leave floor/ceil")
    q.add_argument("--first-last-bits", type=int, default=None,
                   help="weight bits of the first and last quantised layers (default: "
                        "--wbits)")
    q.add_argument("--override", nargs="+", action="append", default=None,
                   metavar=("PATTERN", "KEY=VALUE"),
                   help="per-layer settings for the layers whose names match the regex PATTERN "
                        "(re.search), e.g. --override 'mlp\\.down_proj' wbits=8 group_size=128; "
                        "keys: wbits, group_size (none: per channel), symmetric (true/false), "
                        "scale_method, damp, solver; repeatable, the first matching pattern "
                        "wins, and wins over --first-last-bits")
    q.add_argument("--overrides-from", metavar="FILE",
                   help="the per-layer settings of a JSON file: `qround sensitivity --mean-bits "
                        "B --json FILE`'s allocation, or `qround quantize --json`'s config")
    q.add_argument("--layers", default=None,
                   help="regex of layer names to quantise (re.search) (default: all; MiniLM: "
                        "'\\.encoder\\.', and a checkpoint encoder's pooler stays in float)")
    q.add_argument("--exclude", default=None,
                   help="regex of layer names to leave in float, e.g. 'lm_head' (AutoGPTQ "
                        "keeps an untied LM head in float; qround rounds it unless excluded)")
    q.add_argument("--damp", type=finite_at_least(0.0), default=0.0, metavar="D",
                   help="add D x mean(diag H) x ||w_hat - w||^2 to every channel's cost: pulls "
                        "the rounding towards the float weight where H is ill-conditioned "
                        "(default: %(default)s)")
    q.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0,
                   help="of the solvers, reconstruction and the model's own random draws; "
                        "trains the digits models too (default: %(default)s)")
    q.add_argument("--device", default="cpu",
                   help="cpu or cuda: where layer statistics are accumulated and the torch "
                        "solvers (cem, hopfield, meanfield, gptq) run; the model's forward "
                        "stays on the CPU (default: %(default)s)")
    q.add_argument("--threads", type=int_at_least(1, MAX_THREADS), default=2,
                   help=THREADS_HELP)
    q.add_argument("--capture-cache-mb", type=float, default=1024.0, metavar="MB",
                   help="outputs of finished modules kept per model and replayed in later "
                        "capture passes, instead of rerunning them (qround.prefix_cache); 0 = "
                        "rerun every pass whole (default: %(default)s)")
    a = q.add_argument_group("activations and reconstruction (after the solver)")
    a.add_argument("--abits", type=int, default=None,
                   help="quantise the inputs of the quantised layers to this many bits")
    a.add_argument("--borders", default="none", choices=["none", "linear", "quadratic"],
                   help="AQuant rounding borders of the activations (learned by reconstruction)")
    a.add_argument("--fusion", action=argparse.BooleanOptionalAction, default=True,
                   help="AQuant border fusion in convs (default: on)")
    a.add_argument("--qdrop", type=float, default=None,
                   help="QDrop probability of keeping a float activation while reconstructing "
                        "(default 0.5 when reconstructing)")
    a.add_argument("--iterations", type=int_at_least(0), default=None,
                   help="Adam steps of block reconstruction per unit; 0 = none (default: 300 "
                        "with --borders, --qdrop, --granularity, --k, --scheme or --loss-plot, "
                        "else 0)")
    a.add_argument("--granularity", default=None,
                   choices=["layer", "block", "modcap", "loss", "scheme"],
                   help="reconstruction units: every layer, residual/transformer blocks, MRECG's "
                        "capacity or loss-based merges, or --scheme (default: block)")
    a.add_argument("--k", type=int, default=None,
                   help="--granularity loss: oscillation points merged (default 1)")
    a.add_argument("--scheme", default=None,
                   help="reconstruction units in forward order, e.g. 'stem,block1+down,block2,fc' "
                        "(implies --granularity scheme)")
    a.add_argument("--loss-plot", default=None,
                   help="PNG of the reconstruction loss along depth, oscillation points marked")
    q.add_argument("--out", help="safetensors file: dequantised weights, codes, scales, metadata")
    q.add_argument("--save-compressed", metavar="FOLDER",
                   help="a checkpoint folder: also write the result there as a compressed-"
                        "tensors pack-quantized checkpoint (llm-compressor's format; "
                        "transformers loads it with compressed-tensors installed), tokenizer "
                        "included; symmetric grids, weights only, nn.Linear layers")
    q.add_argument("--json", help="also write the report as JSON")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_quantize)

    se = sub.add_parser("sensitivity",
                        help="per-layer sensitivity to rounding, and a bit allocation for a mean "
                             "width (mixed precision)")
    _add_model_arguments(se)
    se.add_argument("--bits", default="2,3,4,8",
                    help="widths to measure and allocate from (default: %(default)s)")
    se.add_argument("--mean-bits", type=finite_at_least(1.0), default=None, metavar="B",
                    help="choose a width per layer for at most B bits per weight on average "
                         "(the widths of least summed output error), and print the "
                         "`qround quantize` command that quantises with it (the measured "
                         "model, calibration, grid and layer options, and the widths as "
                         "--override arguments)")
    se.add_argument("--tie-inputs", action="store_true",
                    help="with --mean-bits: one width for the layers that read the same input "
                         "(q/k/v, gate/up), as serving engines that fuse them (vLLM) need")
    se.add_argument("--group-size", type=group_size_arg, default=None,
                     help="inputs per scale (default: none, one scale per output channel; "
                          "-1 also means none)")
    se.add_argument("--scale-method", default="mse", choices=["minmax", "mse"],
                    help="scale search per output channel or group (default: %(default)s)")
    se.add_argument("--asymmetric-grid", action="store_true", help="unsigned grid with zero point")
    se.add_argument("--first-last-bits", type=int, default=None,
                    help="hold the first and last layers at this width (not allocated)")
    se.add_argument("--override", nargs="+", action="append", default=None,
                    metavar=("PATTERN", "KEY=VALUE"),
                    help="per-layer settings as for quantize; a layer given a wbits is held at "
                         "it (not allocated), other settings apply to its measured grids")
    se.add_argument("--layers", default=None, help="regex of layer names to measure")
    se.add_argument("--exclude", default=None, help="regex of layer names to leave in float")
    se.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0,
                    help="of the model's own random draws; trains the digits models too "
                         "(default: %(default)s)")
    se.add_argument("--threads", type=int_at_least(1, MAX_THREADS), default=2,
                    help=THREADS_HELP)
    se.add_argument("--capture-cache-mb", type=float, default=1024.0, metavar="MB",
                    help="outputs of the modules before the rounded layer kept and replayed "
                         "instead of rerun (qround.prefix_cache); 0 = rerun every pass whole "
                         "(default: %(default)s)")
    se.add_argument("--json", help="also write the measurements and the allocation as JSON")
    se.set_defaults(func=cmd_sensitivity)

    ev = sub.add_parser("evaluate", help="metrics of a saved quantised model against the float one")
    ev.add_argument("--model", default="minilm",
                    help="minilm | digits-cnn | digits-resnet | digits-mobilenet | a transformers "
                         "checkpoint folder: perplexity for a causal language model, else the "
                         "mean-pooled last hidden state's cosine, Spearman and top-10 | a file "
                         "from torch.save(model), with --inputs (default: %(default)s)")
    ev.add_argument("--quantized", required=True, help="file written by qround quantize --out")
    ev.add_argument("--inputs", default=None,
                    help="a model file (torch.save(model)): the inputs to compare the float "
                         "and quantised outputs on (a tensor batched along dim 0, a list of "
                         "batches, or a .npy array); reports relative_error, cosine, "
                         "max_abs_error and, for (N, classes) outputs, top1_agreement")
    ev.add_argument("--explicit", action="store_true",
                    help="a model file quantised with `qround quantize --explicit`: load the "
                         "file into the model's explicit form")
    ev.add_argument("--sentences", type=int_at_least(11), default=None,
                    help="packaged evaluation sentences for MiniLM or a checkpoint folder, at "
                         "least 11 (default: 1000)")
    ev.add_argument("--texts", default=None,
                    help="MiniLM or a checkpoint folder: score your own text file instead, one "
                         "text per line (an encoder's metrics need at least 11)")
    ev.add_argument("--max-length", type=int_at_least(1), default=None, metavar="TOKENS",
                    help="a checkpoint folder: tokens per text, at most (default: 128, or the "
                         "model's positions if fewer)")
    ev.add_argument("--abits", type=int, default=None,
                    help="digits: fake-quantise every layer's input to this many bits "
                    "(min-max ranges on the calibration images) for the quantised model; "
                    "float_accuracy stays the float model's, and "
                    "float_weights_abits_accuracy is the float weights with these activations")
    ev.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=None,
                    help="digits: the float model's seed (default: the seed the file records, "
                         "which `qround quantize` also trained its float model with)")
    ev.add_argument("--threads", type=int_at_least(1, MAX_THREADS), default=2,
                    help=THREADS_HELP)
    ev.add_argument("--no-source-check", action="store_true",
                    help="evaluate even when --model is not the float model the file was made "
                         "from (its header's fingerprint); the comparison is then against "
                         "another model")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="solve real MiniLM layers with every solver vs RTN")
    d.add_argument("--channels", type=int_at_least(1), default=32,
                   help="first output channels per layer (default: %(default)s)")
    d.add_argument("--solvers", default=None,
                   help="comma-separated solver specs (default: every registered solver but "
                        "dimod, which needs a sampler)")
    d.add_argument("--threads", type=int_at_least(1, MAX_THREADS), default=2,
                   help=THREADS_HELP)
    d.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0,
                   help="(default: %(default)s)")
    d.add_argument("--json", help="also write the results as JSON to this file")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--journey", default="digits-cnn", choices=["digits-cnn", "minilm", "none"],
                   help="then quantise a whole model at W3 with `fast`, report per layer, "
                        "evaluate (default: %(default)s)")
    d.set_defaults(func=cmd_demo)

    sub.add_parser("bench", help="solver benchmark on real layers; `qround bench -h` for options")

    ls = sub.add_parser("solvers", help="list the registered solvers")
    ls.set_defaults(func=cmd_solvers)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if argv[first:first + 1] == ["bench"]:  # the benchmark owns its own options
        from .bench import parse_args, run_args

        prefix = argparse.ArgumentParser(prog="qround", add_help=False)
        prefix.add_argument("-v", "--verbose", action="count", default=0)
        prefix.add_argument("-q", "--quiet", action="store_true")
        try:
            given = prefix.parse_args(argv[:first])
            if given.quiet and given.verbose:
                prefix.error("-q/--quiet and -v/--verbose contradict each other")
        except SystemExit as exc:  # an unknown option before `bench` (already printed)
            return exc.code if isinstance(exc.code, int) else 2
        try:   # before _run, which loads torch: --help and usage errors stay fast
            args = parse_args(argv[first + 1:])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2
        args.no_progress = args.no_progress or given.quiet   # -q: no progress bar either
        return _run(lambda: run_args(args), _verbosity(given))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.quiet and args.verbose:
            parser.error("-q/--quiet and -v/--verbose contradict each other")
    except SystemExit as exc:  # a usage error (already printed) or --help: its exit status
        return exc.code if isinstance(exc.code, int) else 2
    if args.quiet and hasattr(args, "no_progress"):   # -q: no progress bar either
        args.no_progress = True
    return _run(lambda: args.func(args), _verbosity(args), getattr(args, "threads", None))


def _verbosity(args) -> int:
    """-1 with --quiet (errors only), else the count of -v (0: warnings)."""
    return -1 if args.quiet else args.verbose


class _BarSafeHandler(logging.StreamHandler):
    """stderr, through ``tqdm.write``: a log line printed while a progress bar is open comes
    on a line of its own, not glued to the bar's."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 (logging's own policy: report, do not raise)
            self.handleError(record)


def _logging(verbosity: int):
    """The shell's logging: qround's loggers at WARNING (the default), ERROR (-q), INFO (-v) or
    DEBUG (-vv); other libraries' at WARNING (ERROR with -q), whatever -v says.  In a shell
    process (no root handlers yet) the records go to stderr through :class:`_BarSafeHandler`,
    and Python warnings go through logging too (one line each, past any progress bar, and
    dropped by -q).  A Python caller's own root handlers, root level and warnings display are
    kept (``main`` from a program with its logging set up): only qround's logger level
    changes, so -v reaches their handlers.  Returns a function that undoes all of it."""
    level = (logging.ERROR if verbosity < 0 else logging.WARNING if verbosity == 0
             else logging.INFO if verbosity == 1 else logging.DEBUG)
    ours, root = logging.getLogger("qround"), logging.getLogger()
    ours_level, root_level = ours.level, root.level
    show = warnings.showwarning
    ours.setLevel(level)
    handler = None
    if not root.handlers:
        handler = _BarSafeHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(max(level, logging.WARNING))
        warnings.showwarning = _warning_to_log

    def undo():
        ours.setLevel(ours_level)
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(root_level)
            warnings.showwarning = show
            # a command's logging.captureWarnings(True) kept ours as the display it restores
            if getattr(logging, "_warnings_showwarning", None) is _warning_to_log:
                logging._warnings_showwarning = show
    return undo


def _warning_to_log(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` in a shell process: the warning as one log record of logger
    ``py.warnings`` (logging.captureWarnings' name), without the source location (in the
    shell, the console script's line)."""
    if file is not None:   # warnings.warn_explicit(..., file=...): where the caller said
        file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


def _run(command, verbose: int = 0, threads: int | None = None) -> int:
    """Run a command: a QroundError is one line on stderr and exit 2; Ctrl-C is exit 130.  A
    command's ``--threads`` sets torch's and numba's thread counts.  A caller's process
    (``main`` called from Python) gets its thread counts, its loggers (handlers, levels) and
    its warnings display back afterwards."""
    import torch

    from ._parallel import cpu_threads

    threads_before = torch.get_num_threads()
    undo = _logging(verbose)
    try:
        with cpu_threads(threads):
            return _command(command)
    finally:
        undo()
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _command(command) -> int:
    try:
        return int(command() or 0)
    except SystemExit as exc:  # argparse inside `qround bench`: usage error or --help
        return exc.code if isinstance(exc.code, int) else 2
    except QroundError as exc:
        print(f"qround: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qround: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_left():
            raise   # another pipe of the command's (or of an in-process caller's)
        # `qround solvers | head -3`: the reader left; say nothing more.  Flushing at exit
        # would raise again: point stdout at nowhere
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _stdout_reader_left() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on it)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):   # not a real file (captured output)
        return False
    if not hasattr(select, "poll"):   # Windows: stdout a pipe is the usual case
        import stat

        try:
            return stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    # a pipe reports POLLERR, a socket whose peer closed POLLHUP
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
