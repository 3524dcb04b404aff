"""Import order that keeps first use of qround safe from several threads at once.

``import qround`` loads the packages ``qround.problems`` and ``qround.solvers`` on first use
(see ``qround/__init__``).  Python's per-module import locks deadlock when one thread runs a
package's ``__init__`` (which imports the package's submodules) while another thread imports
one of those submodules by itself; Python then breaks the deadlock by handing one thread a
half-initialised module ("cannot import name ... from partially initialized module").  So every
qround module that imports a submodule of these packages at module level imports this module
first: the packages then load whole, problems before solvers, in one thread while the others
wait for them.
"""
from . import problems, solvers  # noqa: F401
