"""Rounding problems: construction from layers and statistics, energies, I/O, dimod export.

The names load on first use (see ``qround/_lazy.py``)."""
import typing as _typing

from .._lazy import lazy_names as _lazy_names

# name -> the submodule that defines it
_LAZY = {"RoundingProblem": "rounding", "LayerStats": "io", "load_layer_stats": "io",
         "save_layer_stats": "io", "save_layer_stats_from_module": "io",
         "layer_weight": "layers", "problems_from_layer": "layers", "LowerBound": "bounds",
         "lower_bound": "bounds"}

__all__ = ["RoundingProblem", "energy", "qubo_files"]
__all__ += ["LayerStats", "load_layer_stats", "save_layer_stats", "save_layer_stats_from_module",
            "layer_weight", "problems_from_layer", "LowerBound", "lower_bound"]

if _typing.TYPE_CHECKING:   # for type checkers and IDEs: the names as if imported here
    from . import energy, qubo_files
    from .bounds import LowerBound, lower_bound
    from .io import (LayerStats, load_layer_stats, save_layer_stats,
                     save_layer_stats_from_module)
    from .layers import layer_weight, problems_from_layer
    from .rounding import RoundingProblem

__getattr__, __dir__ = _lazy_names(__name__, _LAZY, __all__)
