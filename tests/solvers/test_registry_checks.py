"""The registry: spec parsing limits, registration, placement and the named defaults' make-up
(tests from mutation testing, helper-127)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from qround import QroundError, available_solvers, get_solver
from qround.solvers import (GPTQ, Anneal, BestOf, Chain, MeanField, Relaxation,
                            Tabu, place, registry)
from qround.solvers.registry import (MAX_SPEC_CHARS, normalize_spec, parse_part, spec_names,
                                     split_specs)

from ..conftest import make_problem


@pytest.fixture
def own_registry(monkeypatch):
    """A copy of the registry that the test may change."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_DESCRIPTIONS", dict(registry._DESCRIPTIONS))


def _torch_parts(solver):
    out, stack = [], [solver]
    while stack:
        s = stack.pop()
        stack.extend(getattr(s, "solvers", []))
        if "device" in vars(s):
            out.append(s)
    return out


def test_a_device_reaches_the_torch_parts_of_nested_compositions():
    # "cpu:0", not the default "cpu": a part left unplaced would still say "cpu"
    solver = get_solver("gptq+hopfield|tabu+cem", device="cpu:0")
    parts = _torch_parts(solver)
    assert sorted(type(s).__name__ for s in parts) == ["CrossEntropy", "GPTQ", "Relaxation"]
    assert [s.device for s in parts] == ["cpu:0"] * 3
    chain = Chain(GPTQ(), BestOf(Tabu(), Chain(MeanField(), Relaxation())))
    assert place(chain, "cpu:0") is chain
    assert [s.device for s in _torch_parts(chain)] == ["cpu:0"] * 3


def test_keyword_arguments_are_refused_for_a_best_of_too():
    with pytest.raises(QroundError, match="not to a composition"):
        get_solver("greedy|nearest", max_iter=3)


def test_a_spec_or_list_longer_than_the_limit_is_refused_before_parsing():
    long = "tabu(note='" + "x" * MAX_SPEC_CHARS + "')"
    with pytest.raises(QroundError, match=f"at most {MAX_SPEC_CHARS}"):
        get_solver(long)
    with pytest.raises(QroundError, match=f"solver list of .* at most {MAX_SPEC_CHARS}"):
        split_specs("gptq," * (MAX_SPEC_CHARS // 5 + 1))
    assert split_specs("gptq," * 10) == ["gptq"]


def test_parse_part_takes_one_name_only():
    assert parse_part("tabu( restarts=8 )") == ("tabu", {"restarts": 8})
    assert parse_part("gptq") == ("gptq", {})
    for spec in ("gptq+tabu", "tabu|anneal(num_sweeps=5)"):
        with pytest.raises(QroundError, match="not a composition"):
            parse_part(spec)


def test_register_refuses_a_taken_name_unless_told_to_overwrite(own_registry):
    registry.register("mine", Tabu, "first")
    with pytest.raises(QroundError, match="already registered"):
        registry.register("mine", GPTQ)
    assert isinstance(get_solver("mine"), Tabu)
    registry.register("mine", GPTQ, "second", overwrite=True)
    assert isinstance(get_solver("mine"), GPTQ) and available_solvers()["mine"] == "second"
    with pytest.raises(QroundError, match="already registered"):
        registry.register("tabu", GPTQ)


def test_register_refuses_a_factory_that_is_not_callable(own_registry):
    with pytest.raises(QroundError, match="must be callable, got Tabu"):
        registry.register("inst", Tabu())
    assert "inst" not in available_solvers()


def test_available_solvers_are_sorted_by_name(own_registry):
    registry.register("aaa-first", Tabu)
    names = list(available_solvers())
    assert names == sorted(names) and names[0] == "aaa-first"


def test_fast_is_gptq_then_one_short_tabu_round_without_descent():
    fast = get_solver("fast")
    assert isinstance(fast, Chain) and fast.label == "fast"
    gptq, tabu = fast.solvers
    assert isinstance(gptq, GPTQ) and gptq.parameters == GPTQ().parameters
    assert isinstance(tabu, Tabu)
    assert (tabu.restarts, tabu.iters_per_var, tabu.descent) == (0, 1.0, False)


def test_quality_is_gptq_then_the_best_of_three_branches():
    quality = get_solver("quality")
    assert isinstance(quality, Chain) and quality.label == "quality"
    gptq, best = quality.solvers
    assert isinstance(gptq, GPTQ) and isinstance(best, BestOf)
    tabu, annealed, meanfield = best.solvers
    assert isinstance(annealed, Chain) and isinstance(meanfield, Chain)
    anneal, tabu2 = annealed.solvers
    mf, tabu3 = meanfield.solvers
    assert isinstance(anneal, Anneal) and anneal.order == "sequential"
    assert isinstance(mf, MeanField) and mf.parameters == MeanField().parameters
    for t in (tabu, tabu2, tabu3):
        assert isinstance(t, Tabu) and (t.stall, t.restarts) == (4000, 2)
        assert t.parameters == Tabu(stall=4000, restarts=2).parameters


def test_tabu_fast_is_one_round_of_about_n_flips():
    t = get_solver("tabu-fast")
    assert t.label == "tabu-fast"
    assert t.parameters == Tabu(restarts=0, iters_per_var=1.0).parameters


def test_an_unclosed_quote_is_refused_where_it_is_found():
    with pytest.raises(QroundError, match="unclosed quote"):
        split_specs("gptq,'tabu")
    with pytest.raises(QroundError, match="unclosed quote"):
        get_solver("anneal(order='sequential)")


def test_parentheses_group_a_choice_inside_a_chain():
    s = get_solver("gptq+(tabu|anneal(num_sweeps=50))")
    assert isinstance(s, Chain) and [type(x) for x in s.solvers] == [GPTQ, BestOf]
    assert [type(x) for x in s.solvers[1].solvers] == [Tabu, Anneal]
    assert s.solvers[1].solvers[1].num_sweeps == 50
    assert s.label == "gptq+(tabu|anneal(num_sweeps=50))"
    assert spec_names("(gptq)+((tabu|anneal))") == ["gptq", "tabu", "anneal"]


def test_a_chain_holding_a_choice_is_labelled_so_that_it_reads_back_the_same():
    chain = Chain(GPTQ(), BestOf(Tabu(), Anneal()))
    other = BestOf(Chain(GPTQ(), Tabu()), Anneal())
    assert chain.label != other.label
    for solver in (chain, other):
        again = get_solver(solver.label)
        assert type(again) is type(solver)
        assert [type(x) for x in again.solvers] == [type(x) for x in solver.solvers]
        assert again.label == solver.label
    problem = make_problem(m=3, n=8, seed=4)
    assert np.array_equal(get_solver(chain.label).solve(problem, seed=1).choices,
                          chain.solve(problem, seed=1).choices)


@pytest.mark.parametrize("spec, match", [
    ("()", "empty"), ("gptq+()", "empty"), ("(gptq+)", "empty part"),
    ("(gptq", "unclosed parenthesis"), ("gptq)", "never opened"),
    ("(gptq)(tabu)", "is not NAME"),
])
def test_malformed_groups_are_refused(spec, match):
    with pytest.raises(QroundError, match=re.escape(match)):
        get_solver(spec)


# ------------------------------------------------------------------ spaces and nesting
@pytest.mark.parametrize("spec, after", [
    ("tabu(restarts=1 6)", "tabu(restarts=1"),            # used to build restarts=16
    ("anneal(num_sweeps=10 000)", "anneal(num_sweeps=10"),
    ("tabu(time_limit=0. 5,restarts=None)", "tabu(time_limit=0."),
    ("gp tq+tabu", "gp"),
    ("tabu(restarts=16 tenure=20)", "tabu(restarts=16"),
    ("tabu -fast", "tabu"),                                # used to pick tabu-fast
    ("tabu(restarts=1 -2)", "tabu(restarts=1"),
])
def test_a_space_inside_a_name_or_value_is_refused_not_glued(spec, after):
    with pytest.raises(QroundError, match="space inside a name or value, after "
                                          + re.escape(repr(after))):
        get_solver(spec)


def test_spaces_between_tokens_and_inside_quotes_are_kept_apart():
    assert normalize_spec(" gptq + tabu ( restarts = 8 , tenure = 20 ) | anneal ") \
        == "gptq+tabu(restarts=8,tenure=20)|anneal"
    assert normalize_spec("x(a='b c', d=[1, 2])") == "x(a='b c',d=[1,2])"


@pytest.mark.parametrize("parse", [get_solver, spec_names, normalize_spec])
def test_nesting_is_bounded_before_any_recursion(parse):
    deep = "tabu+(" * 500 + "tabu" + ")" * 500        # 3504 characters: within the length
    with pytest.raises(QroundError, match="nests parentheses more than 32 deep"):
        parse(deep)
    ok = "tabu+(" * 32 + "tabu" + ")" * 32
    assert normalize_spec(ok) == ok
