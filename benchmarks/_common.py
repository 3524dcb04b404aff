"""Helpers shared by the end-to-end benchmark scripts (run from this folder's parent)."""
from __future__ import annotations

import argparse
import platform

from qround.solvers import available_solvers


def write_results(path: str, benchmark: str, header: str, args: argparse.Namespace,
                  rows: list[dict]) -> None:
    """Write a benchmark's rows as JSON (atomically), with its header, its settings (``args``
    without ``json``) and the torch / Python / machine it ran on."""
    import torch

    from qround.report import environment, write_json_atomic

    write_json_atomic(path, {"benchmark": benchmark, "header": header,
                             "settings": {k: v for k, v in vars(args).items() if k != "json"},
                             "torch": torch.__version__, "python": platform.python_version(),
                             "machine": platform.machine(), "environment": environment(),
                             "rows": rows})


def report(args: argparse.Namespace, benchmark: str, header: str, rows: list[dict],
           columns: list[str]) -> None:
    """Print the header and the table, and write them as JSON where ``args.json`` says
    (:func:`write_results`)."""
    from qround.report import format_table

    print(header)
    print(format_table(rows, columns))
    if args.json:
        write_results(args.json, benchmark, header, args, rows)


def e2e_write(path: str | None, benchmark: str, header: str, notes: list[str], args,
              rows: list[dict], **extra) -> None:
    """An end-to-end benchmark's rows so far as JSON (atomically; nothing when ``path`` is
    None), with its header, notes, settings (``args`` without ``json`` and ``progress``), any
    ``extra`` fields and the torch / Python / machine it ran on.  Called after every row, so
    that a long run interrupted keeps what it has."""
    if not path:
        return
    import torch

    from qround.report import environment, write_json_atomic

    write_json_atomic(path, {"benchmark": benchmark, "header": header, "notes": notes, **extra,
                             "settings": {k: v for k, v in vars(args).items()
                                          if k not in ("json", "progress")},
                             "torch": torch.__version__, "python": platform.python_version(),
                             "machine": platform.machine(), "environment": environment(),
                             "rows": rows})


def set_threads(n: int) -> None:
    """torch's intra-op threads and numba's (the solver kernels', at most NUMBA_NUM_THREADS)
    to ``n`` for the rest of the run; a benchmark's header says "torch and numba threads n"."""
    import numba
    import torch

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def int_list(text: str, flag: str, parser, lo: int, hi: int | None = None) -> list[int]:
    """Comma-separated integers in [lo, hi] (hi None: no upper bound), or a parser error."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated integers, got {text!r}")
    if not values or min(values) < lo or (hi is not None and max(values) > hi):
        parser.error(f"{flag}: expected integers in [{lo}, {'...' if hi is None else hi}], "
                     f"got {text!r}")
    return values


def _choices(text: str, allowed, flag: str, parser) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        parser.error(f"{flag}: unknown {bad or 'empty list'}; choose from {list(allowed)}")
    return items


def known_solver(spec: str) -> bool:
    """Whether every solver name in a spec (``a+b``, ``a|b``) is registered, or the spec is a
    name of ``qround.bench.extra_solvers`` (``quality-v1``, ``neal-10x``...)."""
    from qround.bench import extra_solvers
    from qround.solvers.registry import spec_names

    return spec in extra_solvers() or all(name in available_solvers()
                                          for name in spec_names(spec))


def plan(args) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(method label, solver spec or None) in run order, and notes on skipped solver specs.

    A qround solver runs once per value of ``--refits``; a label ``qround:SPEC+refitN`` asks for
    N rounds of scale refitting (read back with :func:`refits_of`).
    """
    out, notes = [], []
    for method in args.methods:
        if method in ("solvers", "reconstruct"):
            rec = "+rec" if method == "reconstruct" else ""
            for spec in args.solvers:
                if known_solver(spec):
                    for r in args.refits:
                        out.append((f"qround:{spec}{f'+refit{r}' if r else ''}{rec}", spec))
                elif not rec:
                    notes.append(f"skipped solver {spec!r}: not in the registry")
        else:
            out.append((method, "hopfield" if method == "hopfield" else None))
    return out, notes


def refits_of(label: str) -> int:
    """Rounds of scale refitting that a method label from :func:`plan` asks for."""
    for part in label.split("+"):
        if part.startswith("refit") and part[5:].isdigit():
            return int(part[5:])
    return 0


def e2e_parser(doc: str, widths, methods) -> argparse.ArgumentParser:
    """The options both end-to-end benchmarks share; each script adds its own, then calls
    :func:`e2e_finish`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default=",".join(widths),
                   help=f"weight formats, comma-separated from {list(widths)} (default: all)")
    p.add_argument("--methods", default=",".join(methods),
                   help=f"comma-separated from {list(methods)} (default: all)")
    p.add_argument("--solvers", default="greedy,fast,quality",
                   help="qround solver specs run by the 'solvers' method (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--device", default="cpu", help="QuantConfig.device for quantize_model")
    p.add_argument("--inputs", default="quantized",
                   choices=["float", "quantized", "asymmetric"],
                   help="QuantConfig.inputs, the statistics source of quantize_model (default: "
                        "%(default)s)")
    p.add_argument("--correction", type=float, default=1.0,
                   help="QuantConfig.correction with --inputs asymmetric: the share of the "
                        "earlier layers' error the target corrects (default: %(default)s)")
    p.add_argument("--refits", default="0",
                   help="comma-separated rounds of scale refitting (QuantConfig.refits); each "
                        "qround solver runs once per value (default: %(default)s)")
    p.add_argument("--widen", action="store_true",
                   help="QuantConfig.widen for the qround solvers: after the solver, descend on "
                        "the whole grid (codes may leave floor/ceil)")
    p.add_argument("--progress", action="store_true",
                   help="show quantize_model's per-layer progress bar (stderr)")
    p.add_argument("--json", help="write the results to this JSON file")
    return p


def e2e_finish(p: argparse.ArgumentParser, argv, widths, methods) -> argparse.Namespace:
    """Parse and check the shared options: lists of widths, methods and solver specs."""
    args = p.parse_args(argv)
    args.bits = _choices(args.bits, widths, "--bits", p)
    args.methods = _choices(args.methods, methods, "--methods", p)
    from qround.bench import extra_solvers
    from qround.errors import QroundError
    from qround.solvers import get_solver

    try:
        args.solvers = split_specs(args.solvers)
        for spec in args.solvers:  # a bad option stops here, not after the first methods ran
            if spec not in extra_solvers() and known_solver(spec):
                get_solver(spec)
    except QroundError as exc:
        p.error(f"--solvers: {exc}")
    args.refits = int_list(args.refits, "--refits", p, 0)
    if args.widen and "reconstruct" in args.methods:
        # refused by QuantConfig, but only when the reconstruct rows start
        p.error("--widen cannot be combined with the 'reconstruct' method (its soft rounding "
                "chooses floor or ceil only): leave it out with --methods")
    return args


def warm_up_solvers(specs) -> None:
    """Load the compiled kernels of the run's solvers (and of the gptq and hopfield methods)
    before any row is timed: the first call in a process pays it, and the first process after
    an install compiles them (half a minute on 2 cores)."""
    from qround.bench import extra_solvers
    from qround.solvers import get_solver, warm_up

    extra = extra_solvers()
    warm_up(*(extra[s] if s in extra else get_solver(s)
              for s in [*specs, "gptq", "hopfield"] if known_solver(s)))


def split_specs(text: str) -> list[str]:
    """A comma-separated list of solver specs (``qround.solvers.registry.split_specs``: commas
    inside a solver's options stay with it).  ``solve_time.py --against REV`` runs this file
    over an older qround without that function; there a plain split is what it understood."""
    try:
        from qround.solvers.registry import split_specs as split
    except ImportError:
        return [t.strip() for t in text.split(",") if t.strip()]
    return split(text)


def first_channels_runs(layers, bits_list, channels: int, solvers: dict, seed: int, log=None):
    """Each solver on the first ``channels`` channels of every layer (name, W, H) at every
    width (per-channel symmetric MSE grid): rows of layer, bits, solver label, channels, cost
    / RTN and seconds of the solve.  ``log(row)`` is called after each solve."""
    import time

    from qround.grid import GridSpec
    from qround.problems import RoundingProblem

    rows = []
    for name, w, h in layers:
        for bits in bits_list:
            problem = RoundingProblem.from_weight(w, h, GridSpec(bits=bits), name=name)
            sub = problem.subproblem(slice(0, min(channels, problem.num_channels)))
            for label, solver in solvers.items():
                t0 = time.perf_counter()
                sol = solver.solve(sub, seed=seed)
                rows.append({"layer": name, "bits": bits, "solver": label,
                             "channels": sub.num_channels, "ratio": sol.ratio,
                             "seconds": time.perf_counter() - t0})
                if log is not None:
                    log(rows[-1])
    return rows
