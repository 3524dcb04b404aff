"""Defaults that the command line needs before it imports the solvers."""

DEFAULT_SOLVER = "fast"   # what quantize_model and `qround quantize` use unless told otherwise
