"""Solver benchmark on real layers (MiniLM and the digits CNN): cost/RTN, gaps, time.

    python benchmarks/solvers.py --json results/solvers.json --plot results/solvers.png

Same as ``qround bench``; see ``qround/bench.py`` for what is measured.
"""
import sys

from qround.bench import main

if __name__ == "__main__":
    sys.exit(main())
