"""Forward time of qround.attention.LinearMultiheadAttention against nn.MultiheadAttention.

    python benchmarks/attention_overhead.py --threads 1 \
        --json benchmarks/results/attention_overhead.json

The explicit module (from ``qround.attention.explicit_attention``) runs torch's attention code on
inputs its Linear layers projected, with identity projections: four extra products with an
``E x E`` identity per call.  This measures what that costs in eval mode without gradients
(where nn.MultiheadAttention may take torch's fused path), self-attention on random inputs of
ViT-B sizes by default, for batch-first and sequence-first layouts.  The two modules alternate
call by call; two warm-up rounds are not timed; reported: the median wall milliseconds and
their ratio (explicit / nn.MultiheadAttention), measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from qround.attention import LinearMultiheadAttention

from _common import report  # noqa: E402 (benchmarks/ is on sys.path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embed", type=int, default=768, help="embedding width (default 768)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--tokens", type=int, default=197, help="sequence length (default 197)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per module")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", help="write the table to this JSON file")
    args = p.parse_args(argv)
    for name in ("embed", "heads", "tokens", "batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer")
    if args.embed % args.heads:
        p.error(f"--embed {args.embed} is not a multiple of --heads {args.heads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(args.embed, args.heads, batch_first=batch_first).eval()
        explicit = LinearMultiheadAttention(mha).eval()
        shape = ((args.batch, args.tokens, args.embed) if batch_first
                 else (args.tokens, args.batch, args.embed))
        x = torch.randn(shape, generator=gen)
        times = {"mha": [], "explicit": []}
        with torch.no_grad():
            for r in range(args.repeats + 2):
                for key, module in (("mha", mha), ("explicit", explicit)):
                    t0 = time.perf_counter()
                    module(x, x, x, need_weights=False)
                    if r >= 2:
                        times[key].append(time.perf_counter() - t0)
        a, b = (1e3 * statistics.median(times[k]) for k in ("mha", "explicit"))
        rows.append({"layout": "batch-first" if batch_first else "sequence-first",
                     "mha_ms": a, "explicit_ms": b, "ratio": b / a})
    header = (f"self-attention, embed {args.embed}, {args.heads} heads, {args.batch} x "
              f"{args.tokens} tokens, eval, no grad, need_weights=False; torch threads "
              f"{args.threads}; median of {args.repeats}")
    report(args, "attention_overhead", header, rows, ["layout", "mha_ms", "explicit_ms", "ratio"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
