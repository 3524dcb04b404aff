"""``import qround`` and the command line's --help/--version load no heavy library; the
public names still resolve as if imported eagerly."""
import subprocess
import sys

import pytest

import qround

HEAVY = ("torch", "numba", "dimod", "scipy")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["quantize", "--help"],
                                  ["sample", "--help"], ["bench", "--help"],
                                  ["-v", "bench", "-h"]])
def test_cli_help_and_version_import_no_heavy_library(argv):
    code = ("import contextlib, io\nfrom qround.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main({argv!r}) == 0")
    loaded = _modules_after(code)
    assert "qround.cli" in loaded
    assert not [m for m in HEAVY if m in loaded], sorted(m for m in HEAVY if m in loaded)


def test_import_qround_is_light_and_names_resolve_on_use():
    loaded = _modules_after("import qround")
    assert not [m for m in HEAVY if m in loaded]
    loaded = _modules_after("import qround\nqround.get_solver('greedy')")
    assert {"torch", "qround.solvers"} <= loaded


def test_public_names_are_the_defining_modules_objects():
    from qround.grid import Grid, GridSpec, fit_grid, qrange
    from qround.problems import RoundingProblem
    from qround.solvers import Solution, Solver, available_solvers, get_solver

    expected = dict(Grid=Grid, GridSpec=GridSpec, fit_grid=fit_grid, qrange=qrange,
                    RoundingProblem=RoundingProblem, Solution=Solution, Solver=Solver,
                    available_solvers=available_solvers, get_solver=get_solver)
    for name, obj in expected.items():
        assert getattr(qround, name) is obj, name
    assert set(qround.__all__) <= set(dir(qround))
    namespace: dict = {}
    exec("from qround import *", namespace)
    assert set(qround.__all__) <= set(namespace)


def test_submodules_load_on_attribute_access_and_unknown_names_fail():
    assert qround.pipeline.quantize_model is not None     # not imported by `import qround`
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        qround.no_such_thing
    assert not hasattr(qround, "no_such_thing")
    assert not hasattr(qround, "") and not hasattr(qround, "solvers.tabu")   # not module names
    assert not {"annotations", "importlib", "TYPE_CHECKING"} & set(dir(qround))
    # submodules not loaded yet are listed (tab completion), as when the inits imported them
    assert {"pipeline", "calibrate"} <= set(dir(qround))
    assert {"tabu", "registry"} <= set(dir(qround.solvers))
    assert {"io", "layers", "rounding"} <= set(dir(qround.problems))


def test_a_missing_dependency_inside_a_submodule_is_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "qround_missing_dep_probe.py").write_text("import qround_no_such_package\n")
    monkeypatch.setattr(qround, "__path__", [*qround.__path__, str(tmp_path)])
    # a module found under qround's path whose own import fails: ModuleNotFoundError stays
    with pytest.raises(ModuleNotFoundError, match="qround_no_such_package"):
        qround.__getattr__("qround_missing_dep_probe")


_RACE = """
import importlib, threading
import qround
first_uses = {first_uses}
barrier = threading.Barrier(len(first_uses))
errors = []
def use(code):
    barrier.wait()
    try:
        exec(code, {{"qround": qround, "importlib": importlib}})
    except BaseException as exc:
        errors.append(f"{{code}}: {{exc!r}}")
threads = [threading.Thread(target=use, args=(code,)) for code in first_uses]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors or "ok")
"""


@pytest.mark.parametrize("first_uses", [
    ["qround.RoundingProblem", "qround.get_solver('fast')", "qround.pipeline.quantize_model",
     "qround.writeback"],
    ["importlib.import_module('qround.problems')", "importlib.import_module('qround.solvers')",
     "importlib.import_module('qround.pipeline')", "importlib.import_module('qround.calibrate')"],
    # a package's submodule imported directly while another thread's first use loads it
    ["importlib.import_module('qround.solvers.tabu')", "qround.get_solver('fast')",
     "importlib.import_module('qround.problems.rounding')", "qround.RoundingProblem"],
], ids=["attributes", "imports", "submodules"])
def test_first_use_from_several_threads_at_once(first_uses):
    # the packages load on first use, and Python's import locks hand a thread a half-initialised
    # module when one thread runs a package's __init__ while another imports its submodule
    # ("cannot import name 'RoundingProblem' from partially initialized module" in most runs
    # while the package inits imported their submodules)
    out = subprocess.run([sys.executable, "-c", _RACE.format(first_uses=first_uses)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok", out.stdout


def test_package_inits_import_no_submodule():
    # what keeps the test above passing for direct submodule imports too (see qround/_lazy.py):
    # no package __init__ holds its import lock while it imports a submodule
    for package in ("qround", "qround.problems", "qround.solvers", "qround.zoo"):
        loaded = {m for m in _modules_after(f"import {package}") if m.startswith("qround.")}
        assert loaded <= {"qround._forkstate", "qround._lazy", "qround.errors", package}, \
            (package, sorted(loaded))


def test_the_version_is_the_installed_metadatas():
    """The version is written in pyproject.toml and qround/__init__.py: they must agree
    (helper-163). Checked against the installed metadata, which pyproject.toml made."""
    from importlib import metadata

    import qround

    try:
        installed = metadata.version("qround")
    except metadata.PackageNotFoundError:
        pytest.skip("qround is not installed (run from a source tree)")
    assert installed == qround.__version__
