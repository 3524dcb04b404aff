"""How much accuracy a method could gain over a baseline at most, against the seed spread that
the issues' margin targets ask it to exceed.  Reads a results JSON of ``aquant.py`` or
``mrecg.py`` (rows with ``bits``, ``method``, ``accuracy``, ``std``, ``per_seed``, and ``arch``
for ``mrecg.py``; the ``float`` row is the unquantised model on the same seeds).

Per architecture and width: the float model's mean accuracy; the baseline's mean, its std and
its range (max - min) over the seeds; the headroom ``float - baseline``; the mean accuracy a
method needs to beat the baseline by more than the std and by more than the range; and the best
other method's mean.  ``verdict``: "beyond float (std)" when even the std margin needs a mean
accuracy above the float model's, "beyond float (range)" when only the range margin does, else
"room".  Beyond float, no quantised model can show the margin except by beating the float model
itself.

    python benchmarks/headroom.py benchmarks/results/aquant/default.json --baseline nearest
    python benchmarks/headroom.py benchmarks/results/mrecg/mrecg.json --baseline block
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results JSON files of aquant.py or mrecg.py")
    p.add_argument("--baseline", required=True, help="the method to beat (nearest, block, ...)")
    p.add_argument("--json", help="write the table to this JSON file")
    return p.parse_args(argv)


def headroom_rows(rows: list[dict], baseline: str, source: str) -> list[dict]:
    out = []
    floats = {r.get("arch"): r for r in rows if r["method"] == "float"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] != "float":
            groups.setdefault((r.get("arch"), r["bits"]), []).append(r)
    for (arch, bits), group in groups.items():
        base = next((r for r in group if r["method"] == baseline), None)
        ref = floats.get(arch)
        if base is None or ref is None:
            continue
        spread = max(base["per_seed"]) - min(base["per_seed"])
        others = [r for r in group if r["method"] != baseline]
        best = max(others, key=lambda r: r["accuracy"]) if others else None
        row = {"source": source, "arch": arch or "", "bits": bits, "float": ref["accuracy"],
               "baseline": base["accuracy"], "std": base["std"], "range": spread,
               "headroom": ref["accuracy"] - base["accuracy"],
               "need (std)": base["accuracy"] + base["std"],
               "need (range)": base["accuracy"] + spread,
               "best other": f"{best['method']} {best['accuracy']:.4f}" if best else ""}
        # "beyond float": the margin needs a mean accuracy above the float model's
        row["verdict"] = ("beyond float (std)" if row["need (std)"] > ref["accuracy"]
                          else "beyond float (range)" if row["need (range)"] > ref["accuracy"]
                          else "room")
        out.append(row)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from qround.report import format_table, write_json_atomic

    rows = []
    for path in args.results:
        with open(path) as f:
            data = json.load(f)
        rows += headroom_rows(data["rows"], args.baseline, path)
    if not rows:
        print(f"error: no rows with a float model and a {args.baseline!r} baseline",
              file=sys.stderr)
        return 2
    for r in rows:
        r["run"] = os.path.splitext(os.path.basename(r["source"]))[0]
    print(format_table(rows, ["run", "arch", "bits", "float", "baseline", "std", "range", "headroom",
                              "need (std)", "need (range)", "best other", "verdict"]))
    if args.json:
        write_json_atomic(args.json, {"benchmark": "headroom", "baseline": args.baseline,
                                      "results": args.results, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
