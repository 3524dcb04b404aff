"""The benchmark scripts' command lines: every script's parser builds (a script that no longer
imports against the library fails here, not in a long run), and option pairs that a run would
refuse only halfway are refused at once."""
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))   # the scripts import _common from their folder
    yield
    for name in [n for n in sys.modules if n == "_common" or n in SCRIPTS]:
        del sys.modules[name]


@pytest.mark.parametrize("script", [s for s in SCRIPTS
                                    if "def parse_args" in (BENCH / f"{s}.py").read_text()])
def test_every_script_parses_its_help(script, bench_path, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["e2e_minilm", "e2e_gpt2"])
def test_widen_with_the_reconstruct_method_is_refused_before_any_row(script, bench_path,
                                                                      capsys):
    # QuantConfig refuses widen with a reconstruction that trains the weights, but the
    # script only built that config after the other methods' rows had run
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--widen", "--bits", "W3"])
    assert exit_.value.code == 2
    assert "--widen cannot be combined with the 'reconstruct' method" in capsys.readouterr().err
    args = module.parse_args(["--widen", "--bits", "W3", "--methods", "rtn-mse,solvers"])
    assert args.widen and "reconstruct" not in args.methods


def test_e2e_digits_trains_the_arch_it_is_given(monkeypatch):
    """benchmarks/e2e_digits.py --arch mobile measures the MobileNet, not the plain CNN."""
    monkeypatch.syspath_prepend(str(BENCH))
    try:
        module = importlib.import_module("e2e_digits")
        asked = []

        class _Stop(Exception):
            pass

        def train(arch, seed=0, **kw):
            asked.append((arch, seed))
            raise _Stop

        monkeypatch.setattr(module.zoo, "train_digits_cnn", train)
        monkeypatch.setattr(module, "warm_up_solvers", lambda *a, **k: None)
        with pytest.raises(_Stop):
            module.main(["--arch", "mobile", "--seeds", "3", "--methods", "rtn-minmax",
                         "--bits", "W4", "--threads", "1"])
        assert asked == [("mobile", 3)]
    finally:
        for name in ("e2e_digits", "_common"):
            sys.modules.pop(name, None)
