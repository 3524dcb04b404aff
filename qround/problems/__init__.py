"""Rounding problems: construction from layers and statistics, energies, I/O, dimod export."""
from . import energy
from .io import LayerStats, load_layer_stats, save_layer_stats, save_layer_stats_from_module
from . import qubo_files
from .layers import layer_weight, problems_from_layer
from .rounding import RoundingProblem

__all__ = ["RoundingProblem", "energy", "qubo_files"]
__all__ += ["LayerStats", "load_layer_stats", "save_layer_stats", "save_layer_stats_from_module",
            "layer_weight", "problems_from_layer"]
