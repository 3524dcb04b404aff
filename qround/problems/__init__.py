"""Rounding problems: construction from layers and statistics, energies, I/O, dimod export."""
from . import energy
from .rounding import RoundingProblem

__all__ = ["RoundingProblem", "energy"]
