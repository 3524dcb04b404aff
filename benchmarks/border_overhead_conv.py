"""Inference overhead of AQuant borders on a single 3x3 conv, as a function of its width.

The digits CNN's convs have 16-64 output channels; there the border work is a sizeable share
of the conv (BENCHMARKS.md, section 3).  This benchmark times one ``c -> c`` 3x3 conv (padding
1) on a ``batch x c x size x size`` ReLU input, with 4-bit quantised input and quadratic fused
borders, against the same layer with nearest rounding, for several widths ``c``.

Realistic borders: the residual digits CNN (seed 0) is quantised at W4A4 with AQuant borders
and block reconstruction (as ``benchmarks/aquant.py``), and each synthetic layer's border
coefficients ``b0, b1, b2`` are drawn, with replacement, from the learned ones of that model
(``torch.Generator`` seeded; the untrained 0.5 borders would make the border path trivially
cheap).  Modes are interleaved call by call (``aquant.overhead``); reported: the median wall and
thread-CPU milliseconds of the layer, and border / nearest ratios.

The floor: ``map ms`` times the fused border map alone (``ActQuantizer.patch_border``: the
depthwise convs of ``v`` and ``v^2`` that give every patch its border), the least extra work any
exact inference path with fused quadratic borders has to do, on the input as given (NCHW) and on
a channels-last copy (oneDNN's depthwise conv is much faster there; the copy is not timed), the
faster of the two.  ``map / nearest`` is then a lower bound of the border overhead that torch's
kernels allow: where it exceeds 0.1 the issue's 10 % target cannot be met with them.
``--size 8 --batch 64 --channels 16,32`` is the shape of the residual digits CNN's inner convs.

    python benchmarks/border_overhead_conv.py --channels 16,64,256 --json results/border_conv.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from qround import zoo
from qround.activations import insert_act_quantizers, quantized_layers
from qround.reconstruct import ReconstructConfig, reconstruct
from qround.report import format_table

from _common import int_list, write_results  # noqa: E402 (benchmarks/ is on sys.path)
from aquant import build, overhead  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", default="16,64,256", help="conv widths (default: %(default)s)")
    p.add_argument("--size", type=int, default=28, help="input height and width (default 28)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--iterations", type=int, default=300,
                   help="reconstruction steps per block of the digits model the borders come from")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.channels = int_list(args.channels, "--channels", p, 1)
    return args


def learned_borders(iterations: int) -> dict[str, torch.Tensor]:
    """The border coefficients learned on the residual digits CNN at W4A4 (seed 0)."""
    model, data = zoo.train_digits_cnn("residual", seed=0)
    calibration = list(data.calib_images.split(64))
    qmodel = build(model, calibration, 4, 4, "aquant")
    res = reconstruct(model, qmodel, calibration, config=ReconstructConfig(iterations=iterations))
    pools = {"b0": [], "b1": [], "b2": []}
    for layer in quantized_layers(res.model).values():
        q = layer.act
        if q is not None and q.borders == "quadratic":
            for k in pools:
                pools[k].append(getattr(q, k).detach().reshape(-1))
    return {k: torch.cat(v) for k, v in pools.items()}


@torch.no_grad()
def border_map_ms(layer, x: torch.Tensor, repeats: int) -> float:
    """Median ms of the fused border map of every patch (``patch_border``) on x, the faster
    of NCHW and channels-last (layouts interleaved call by call, two warm-up rounds)."""
    conv, act = layer.layer, layer.act
    v = x / act.scale(x[0].numel())
    layouts = {"nchw": v, "channels_last": v.contiguous(memory_format=torch.channels_last)}
    times: dict[str, list[float]] = {k: [] for k in layouts}
    for r in range(repeats + 2):
        for k, vk in layouts.items():
            t0 = time.perf_counter()
            act.patch_border(vk, conv.kernel_size, conv.stride, conv.dilation, conv.padding)
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    return 1e3 * min(statistics.median(t) for t in times.values())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pools = learned_borders(args.iterations)
    gen = torch.Generator().manual_seed(0)
    header = (f"one c->c 3x3 conv, input {args.batch}x c x {args.size}x{args.size} (ReLU), 4-bit "
              f"input, quadratic fused borders drawn from the digits W4A4 model "
              f"({pools['b0'].numel()} learned borders; |b0 - 0.5| mean "
              f"{(pools['b0'] - 0.5).abs().mean():.3f}); torch threads {args.threads}, "
              f"{args.repeats} repeats")
    print(header, flush=True)
    rows = []
    for c in args.channels:
        conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1))
        with torch.no_grad():
            conv[0].weight.normal_(0, (9 * c) ** -0.5, generator=gen)
            conv[0].bias.zero_()
        x = torch.relu(torch.randn(args.batch, c, args.size, args.size, generator=gen))
        qconv = insert_act_quantizers(conv, None, abits=4, borders="quadratic", fusion=True,
                                      calib_batches=[x])
        layer = next(iter(quantized_layers(qconv).values()))
        with torch.no_grad():
            for k, pool in pools.items():
                p = getattr(layer.act, k)
                p.copy_(pool[torch.randint(pool.numel(), p.shape, generator=gen)])
        t = overhead(qconv, x, args.repeats)
        map_ms = border_map_ms(layer, x, args.repeats)
        rows.append({"channels": c, "border ms": t["border"], "nearest ms": t["nearest"],
                     "ratio": t["ratio_border_vs_nearest"],
                     "cpu ratio": t["cpu_ratio_border_vs_nearest"],
                     "im2col border ms": t["border-im2col"], "map ms": map_ms,
                     "map / nearest": map_ms / t["nearest"]})
        print(f"  c={c}: border {t['border']:.2f} ms, nearest {t['nearest']:.2f} ms, ratio "
              f"{t['ratio_border_vs_nearest']:.2f}, border map alone {map_ms:.3f} ms",
              file=sys.stderr, flush=True)
    print(format_table(rows, ["channels", "border ms", "nearest ms", "ratio", "cpu ratio",
                              "im2col border ms", "map ms", "map / nearest"]))
    if args.json:
        write_results(args.json, "border_overhead_conv", header, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
