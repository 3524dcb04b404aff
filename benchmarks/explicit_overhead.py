"""Forward time of the explicit forms of qround.conv_transpose and qround.conv3d against the
layers they are made from.

    python benchmarks/explicit_overhead.py --threads 1 \
        --json benchmarks/results/explicit_overhead.json

``ConvTransposeAsConv`` (from ``qround.conv_transpose.explicit_conv_transpose``) inserts
``stride - 1`` zeros between the input's samples and runs an ordinary convolution on the result:
about ``stride ** dims`` times the multiplications of torch's transposed convolution.
``Conv3dAsConv2d`` (from ``qround.conv3d.explicit_conv3d``) does the 3-d convolution's own
products as one Conv2d over depth-stacked channels, after copying the input ``kernel_depth /
depth_stride`` times over.  This measures what each costs in eval mode without gradients, on
random inputs, for layers of common shapes (U-Net up-convolutions, a DCGAN/autoencoder
up-sampling, a HiFi-GAN-like 1-d up-sampling, a stride-1 transposed layer, where no zeros are
inserted; video and volumetric 3-d convolutions).  The two modules alternate call by call; two
warm-up rounds are not timed; reported: the median wall milliseconds and their ratio (explicit
/ native), measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from qround.conv3d import Conv3dAsConv2d
from qround.conv_transpose import ConvTransposeAsConv

from _common import report  # noqa: E402 (benchmarks/ is on sys.path)

# name, layer, input shape (batch first)
CASES = [
    ("unet-up 256->128 k2 s2", lambda: nn.ConvTranspose2d(256, 128, 2, stride=2),
     (4, 256, 32, 32)),
    ("unet-up 128->64 k2 s2", lambda: nn.ConvTranspose2d(128, 64, 2, stride=2),
     (4, 128, 64, 64)),
    ("dcgan 128->64 k4 s2 p1", lambda: nn.ConvTranspose2d(128, 64, 4, 2, 1), (4, 128, 32, 32)),
    ("hifigan 512->256 k16 s8 p4 (1-d)",
     lambda: nn.ConvTranspose1d(512, 256, 16, stride=8, padding=4), (4, 512, 256)),
    ("stride 1, 64->64 k3 p1", lambda: nn.ConvTranspose2d(64, 64, 3, padding=1), (4, 64, 64, 64)),
    ("3-d video 64->64 k3 p1", lambda: nn.Conv3d(64, 64, 3, padding=1), (2, 64, 8, 28, 28)),
    ("3-d video 64->128 k3 s2 p1", lambda: nn.Conv3d(64, 128, 3, stride=2, padding=1),
     (2, 64, 8, 28, 28)),
    ("3-d volume 32->32 k3 p1", lambda: nn.Conv3d(32, 32, 3, padding=1), (1, 32, 32, 32, 32)),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed calls per module")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", help="write the table to this JSON file")
    args = p.parse_args(argv)
    for name in ("repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows = []
    for name, make, shape in CASES:
        layer = make().eval()
        explicit = (Conv3dAsConv2d if isinstance(layer, nn.Conv3d)
                    else ConvTransposeAsConv)(layer).eval()
        x = torch.randn(shape, generator=gen)
        times = {"native": [], "explicit": []}
        with torch.no_grad():
            diff = float((explicit(x) - layer(x)).abs().max())
            for r in range(args.repeats + 2):
                for key, module in (("native", layer), ("explicit", explicit)):
                    t0 = time.perf_counter()
                    module(x)
                    if r >= 2:
                        times[key].append(time.perf_counter() - t0)
        a, b = (1e3 * statistics.median(times[k]) for k in ("native", "explicit"))
        rows.append({"layer": name, "input": "x".join(map(str, shape)), "native_ms": a,
                     "explicit_ms": b, "ratio": b / a, "max_abs_diff": diff})
    header = (f"eval, no grad, float32; torch threads {args.threads}; median of "
              f"{args.repeats}")
    report(args, "explicit_overhead", header, rows,
           ["layer", "input", "native_ms", "explicit_ms", "ratio", "max_abs_diff"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
