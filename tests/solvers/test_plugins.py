"""Solvers from installed packages: the ``qround.solvers`` entry-point group reaches every
lookup, the shell included; a broken or clashing plugin is skipped with a warning."""
from __future__ import annotations

import importlib.metadata as metadata
import logging

import numpy as np
import pytest

from qround.cli import main
from qround.errors import QroundError
from qround.problems.io import save_layer_stats
from qround.solvers import Solver, get_solver, registry

from ..conftest import correlated_hessian


class PluginSolver(Solver):
    """Rounds every weight down: a solver nobody would ship, easy to recognise."""

    name = "all-down"

    def _solve(self, problem, start, rng):
        return np.zeros_like(start)


def _broken():
    raise AssertionError("never called: loading the entry point fails first")


def _fake_entry_points(monkeypatch, eps):
    """metadata.entry_points gives ``eps`` for qround's group; other callers (numba's first
    compilation looks for its extensions) get the real answer."""
    real = metadata.entry_points

    def entry_points(**select):
        if select.get("group") == registry.PLUGIN_GROUP:
            return list(eps)
        return real(**select)

    monkeypatch.setattr(metadata, "entry_points", entry_points)


def _fresh_registry(monkeypatch, eps):
    """The declared plugins are ``eps``; the registry starts as the built-ins' and comes back
    after the test."""
    _fake_entry_points(monkeypatch, eps)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_DESCRIPTIONS", dict(registry._DESCRIPTIONS))
    monkeypatch.setattr(registry, "_PLUGINS", {"loaded": False})


@pytest.fixture
def plugins(monkeypatch):
    """Three declared plugins: a good one, one whose module does not exist, one that takes a
    built-in name; the registry is restored afterwards."""
    eps = [metadata.EntryPoint("all-down", f"{__name__}:PluginSolver", registry.PLUGIN_GROUP),
           metadata.EntryPoint("missing", "no_such_module_xyz:Solver", registry.PLUGIN_GROUP),
           metadata.EntryPoint("fast", f"{__name__}:PluginSolver", registry.PLUGIN_GROUP),
           metadata.EntryPoint("self-registered", "tests.solvers._plugin_that_registers:Factory",
                               registry.PLUGIN_GROUP)]
    _fresh_registry(monkeypatch, eps)


def test_plugins_are_found_by_name_and_broken_ones_skipped(plugins, caplog):
    with caplog.at_level(logging.WARNING, logger="qround.solvers.registry"):
        solver = get_solver("gptq+all-down")
    assert solver.label == "gptq+all-down"
    assert "plugin" in registry.available_solvers()["all-down"]
    assert "missing" not in registry.available_solvers()
    assert registry.available_solvers()["fast"] != registry.available_solvers()["all-down"]
    text = caplog.text
    assert "'missing'" in text and "could not be loaded" in text and "name is taken" in text
    # a module that registers its own solver on import loads without a false warning
    assert "self-registered" in registry.available_solvers()
    assert "'self-registered'" not in text


def test_a_plugin_reaches_the_shell(plugins, tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "l.npz"
    save_layer_stats(path, rng.normal(size=(4, 8)), correlated_hessian(8, rng), bits=3)
    assert main(["solve", str(path), "--solver", "all-down", "--json"]) == 0
    assert '"solver": "all-down"' in capsys.readouterr().out


@pytest.mark.parametrize("name", ["a b", "a\tb", "a+b", "", "x|y"])
def test_solver_names_are_checked(name):
    with pytest.raises(QroundError, match="may hold letters"):
        registry.register(name, PluginSolver)


def test_a_plugin_loading_in_one_thread_is_waited_for_by_another(monkeypatch):
    """Two threads' first lookups: the second waits for the first one's loading (a slow
    plugin import) instead of finding a half-filled registry."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    started = threading.Event()

    class SlowEntryPoint:
        name, value, group = "slow-down", "slow:PluginSolver", registry.PLUGIN_GROUP

        def load(self):
            started.set()
            time.sleep(0.5)
            return PluginSolver

    _fresh_registry(monkeypatch, [SlowEntryPoint()])

    def first():
        return type(get_solver("slow-down")).__name__

    def second():
        started.wait(5)
        return type(get_solver("slow-down")).__name__

    with ThreadPoolExecutor(2) as pool:
        results = [f.result() for f in (pool.submit(first), pool.submit(second))]
    assert results == ["PluginSolver", "PluginSolver"]


def test_parsing_specs_in_threads_leaves_the_warning_filters_alone():
    """Spec parsing silences SyntaxWarnings of odd literals with catch_warnings, which swaps
    the process's filter list: two threads at once must not leave "ignore" behind."""
    import sys
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    before = list(warnings.filters)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: [get_solver("gptq+tabu(restarts=4,tenure=8)|anneal("
                                                "num_sweeps=50)") for _ in range(1500)],
                          range(2)))
    finally:
        sys.setswitchinterval(interval)
    assert warnings.filters == before


def test_a_plugin_module_that_looks_up_solvers_while_another_thread_imports_it(
        monkeypatch, tmp_path, caplog):
    """Thread B imports a plugin module whose import lists the solvers (three times); thread A's
    first lookup loads that entry point and waits for B's import.  B waits a bounded time for
    A's loading (it used to wait for good: both threads hung), then both finish."""
    import importlib
    import threading
    import time

    (tmp_path / "qround_test_slowplug.py").write_text(
        "import time\ntime.sleep(0.5)\n"
        "from qround.solvers import available_solvers\n"
        "for _ in range(3):\n    available_solvers()\n"
        "from tests.solvers.test_plugins import PluginSolver as Factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _fresh_registry(monkeypatch, [metadata.EntryPoint(
        "slow-import", "qround_test_slowplug:Factory", registry.PLUGIN_GROUP)])
    monkeypatch.setattr(registry, "PLUGIN_WAIT_S", 4.0)
    monkeypatch.delitem(__import__("sys").modules, "qround_test_slowplug", raising=False)
    results = {}
    b = threading.Thread(target=lambda: results.setdefault(
        "b", importlib.import_module("qround_test_slowplug")), daemon=True)
    b.start()
    time.sleep(0.2)   # B holds the module's import lock, sleeping
    a = threading.Thread(target=lambda: results.setdefault("a", get_solver("slow-import")),
                         daemon=True)
    with caplog.at_level(logging.WARNING, logger="qround.solvers.registry"):
        start = time.monotonic()
        a.start()
        a.join(30)
        b.join(30)
        seconds = time.monotonic() - start
    assert not a.is_alive() and not b.is_alive()
    assert seconds < 10   # one deadline for the loading, not 4 s for each of B's 3 lookups
    assert type(results["a"]).__name__ == "PluginSolver"
    assert "still loading in another thread" in caplog.text


class _InterruptedOnce:
    """An entry point whose first load is interrupted by Ctrl-C; later loads give the plugin."""

    group = registry.PLUGIN_GROUP

    def __init__(self, name: str):
        self.name, self.value, self.calls = name, f"x:{name}", 0

    def load(self):
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt
        return PluginSolver


def test_plugin_loading_interrupted_by_ctrl_c_is_tried_again(monkeypatch):
    _fresh_registry(monkeypatch, [_InterruptedOnce("all-down-later")])
    with pytest.raises(KeyboardInterrupt):
        get_solver("all-down-later")
    assert type(get_solver("all-down-later")).__name__ == "PluginSolver"   # loaded this time


def test_a_solver_that_needs_arguments_is_named_by_the_shell(monkeypatch, capsys):
    from qround.solvers.local import Greedy

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_DESCRIPTIONS", dict(registry._DESCRIPTIONS))
    registry.register("needs-arg", lambda budget: Greedy())
    assert main(["quantize", "--model", "no-such-model", "--solver", "needs-arg"]) == 2
    err = capsys.readouterr().err
    assert "--solver 'needs-arg': solver cannot be built from its name alone" in err  # once
    assert "Traceback" not in err


def test_a_thread_waiting_on_an_interrupted_loading_loads_the_plugins_itself(monkeypatch):
    """It woke up and went on without the plugins ("unknown solver")."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    started, go = threading.Event(), threading.Event()

    class InterruptedFirst:
        name, value, group = "late", "x:PluginSolver", registry.PLUGIN_GROUP
        calls = 0

        def load(self):
            InterruptedFirst.calls += 1
            if InterruptedFirst.calls == 1:
                started.set()
                go.wait(10)
                raise KeyboardInterrupt
            return PluginSolver

    _fresh_registry(monkeypatch, [InterruptedFirst()])

    def first():
        try:
            get_solver("late")
        except KeyboardInterrupt:
            return "interrupted"

    def waiter():
        started.wait(10)
        return type(get_solver("late")).__name__

    with ThreadPoolExecutor(2) as pool:
        a, w = pool.submit(first), pool.submit(waiter)
        started.wait(10)
        time.sleep(0.2)   # the waiter is waiting (or, if not yet, claims after the reset)
        go.set()
        assert a.result(30) == "interrupted" and w.result(30) == "PluginSolver"


def test_a_plugin_that_exits_on_import_is_skipped_with_a_warning(monkeypatch, caplog):
    class Exits:
        name, value, group = "exits", "x:y", registry.PLUGIN_GROUP

        def load(self):
            raise SystemExit("this plugin needs CUDA")

    good = metadata.EntryPoint("all-down", f"{__name__}:PluginSolver", registry.PLUGIN_GROUP)
    _fresh_registry(monkeypatch, [Exits(), good])
    with caplog.at_level(logging.WARNING, logger="qround.solvers.registry"):
        assert type(get_solver("all-down")).__name__ == "PluginSolver"
    assert "'exits'" in caplog.text and "this plugin needs CUDA" in caplog.text
    assert "exits" not in registry.available_solvers()


def test_an_interrupted_loading_retried_does_not_warn_about_what_it_loaded(monkeypatch, caplog):
    selfreg = metadata.EntryPoint("self-registered", "tests.solvers._plugin_that_registers:"
                                  "Factory", registry.PLUGIN_GROUP)
    _fresh_registry(monkeypatch, [selfreg, _InterruptedOnce("second")])
    with pytest.raises(KeyboardInterrupt):
        get_solver("second")
    with caplog.at_level(logging.WARNING, logger="qround.solvers.registry"):
        assert type(get_solver("second")).__name__ == "PluginSolver"
    assert "name is taken" not in caplog.text
