"""Cases of qround.writeback the first tests left open (found by mutation testing, helper-121)."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from qround import GridSpec, QroundError, RoundingProblem
from qround.problems import problems_from_layer
from qround.writeback import apply_to_layer, quantized_weight, weight_from_codes

torch.set_num_threads(1)


def _problem(out=3, n=8, spec=None, seed=0):
    rng = np.random.default_rng(seed)
    w, x = rng.normal(size=(out, n)), rng.normal(size=(50, n))
    return RoundingProblem.from_weight(w, x.T @ x / 50, spec or GridSpec(bits=4))


@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_one_past_either_end_of_the_grid_are_refused(symmetric):
    p = _problem(spec=GridSpec(bits=3, symmetric=symmetric))
    ok = p.codes(p.rtn_choices())
    g = p.grid
    edge = ok.copy()
    edge[0, 0], edge[1, 1] = g.qmin, g.qmax
    weight_from_codes(p, edge)                         # the ends themselves are fine
    for value in (g.qmin - 1, g.qmax + 1):
        bad = ok.copy()
        bad[0, 0] = value
        with pytest.raises(QroundError, match="codes must be integers in"):
            weight_from_codes(p, bad)


def test_codes_of_another_shape_are_refused_without_a_module():
    p = _problem()
    codes = p.codes(p.rtn_choices())
    with pytest.raises(QroundError, match="shape"):
        weight_from_codes(p, codes[:, :7])
    with pytest.raises(QroundError, match="shape"):
        weight_from_codes(p, codes[:2])


def test_problems_of_one_layer_must_share_symmetry_and_group_size():
    p = _problem(spec=GridSpec(bits=4, symmetric=True))
    for other in (GridSpec(bits=4, symmetric=False), GridSpec(bits=4, group_size=4)):
        q = _problem(spec=other, seed=1)
        with pytest.raises(QroundError, match="must share"):
            weight_from_codes([p, q], [p.codes(p.rtn_choices()), q.codes(q.rtn_choices())])
        with pytest.raises(QroundError, match="must share"):
            quantized_weight([p, q], [p.rtn_choices(), q.rtn_choices()])


def test_module_with_the_same_size_but_other_output_count_is_refused():
    # codes (2, 6) and a (4, 3) weight have the same 12 values, but another row count
    lin = nn.Linear(6, 2)
    p = problems_from_layer(lin, np.eye(6), GridSpec(bits=4))[0]
    with pytest.raises(QroundError, match="does not match"):
        quantized_weight(p, p.rtn_choices(), module=nn.Linear(3, 4))
    with pytest.raises(QroundError, match="does not match"):
        weight_from_codes(p, p.codes(p.rtn_choices()), module=nn.Linear(3, 4))


def test_apply_to_layer_refuses_a_transposed_shape_with_a_qround_error():
    lin = nn.Linear(4, 2)                       # weight (2, 4)
    p = problems_from_layer(lin, np.eye(4), GridSpec(bits=4))[0]
    qw = quantized_weight(p, p.rtn_choices(), module=lin)
    with pytest.raises(QroundError, match="shape"):
        apply_to_layer(nn.Linear(2, 4), qw)     # weight (4, 2): same size, other shape


def test_apply_to_layer_refuses_a_parametrized_weight():
    lin = nn.Linear(4, 2)
    p = problems_from_layer(lin, np.eye(4), GridSpec(bits=4))[0]
    qw = quantized_weight(p, p.rtn_choices(), module=lin)
    wn = parametrizations.weight_norm(nn.Linear(4, 2))
    with pytest.raises(QroundError, match="parametrized"):
        apply_to_layer(wn, qw)
    with pytest.raises(QroundError, match="parametrized"):
        apply_to_layer(wn, qw, inplace=True)


def test_quantized_weight_arrays_are_read_only_and_codes_int64():
    p = _problem()
    for qw in (quantized_weight(p, p.rtn_choices()),
               weight_from_codes(p, p.codes(p.rtn_choices()).astype(np.int32)),
               weight_from_codes(p, p.codes(p.rtn_choices()).astype(np.int8))):
        assert qw.codes.dtype == np.int64
        for a in (qw.codes, qw.scale, qw.zero_point):
            assert not a.flags.writeable
            with pytest.raises(ValueError):
                a[0, 0] = 1


def test_apply_to_layer_names_a_qweight_of_the_wrong_type():
    with pytest.raises(QroundError, match="qweight must be a QuantizedWeight.*got str"):
        apply_to_layer(nn.Linear(4, 2), "x")   # was an AttributeError on 'weight_shape'

