"""Behaviours of qround.errors no other test protected (found by mutation testing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qround.errors import (QroundError, as_float_array, check_bool, check_int,
                           check_positive_pair, check_psd, check_real, first_line, to_numpy)


# ----------------------------------------------------------------------------- scalars


def test_check_int_maximum_is_inclusive():
    assert check_int(5, "n", 0, maximum=5) == 5
    with pytest.raises(QroundError, match="n=6 is too large"):
        check_int(6, "n", 0, maximum=5)
    assert check_int(None, "n", 0, allow_none=True) is None
    with pytest.raises(QroundError, match="n must be an integer >= 0"):
        check_int(None, "n", 0)


def test_check_real_ends_are_closed_unless_asked_open():
    assert check_real(1.0, "x", 0, 1) == 1.0 and check_real(0, "x", 0, 1) == 0.0
    with pytest.raises(QroundError, match=r"x must lie in \[0, 1\)"):
        check_real(1.0, "x", 0, 1, hi_open=True)
    with pytest.raises(QroundError, match=r"x must lie in \(0, 1\]"):
        check_real(0.0, "x", 0, 1, lo_open=True)
    assert check_real(0.999, "x", 0, 1, hi_open=True) == 0.999


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 10 ** 400, -(10 ** 400),
                                   "1.0", None, float("nan"), np.float32("inf")])
def test_check_real_refuses_what_is_not_a_finite_number(value):
    with pytest.raises(QroundError, match="x must be a finite number"):
        check_real(value, "x")


def test_check_real_returns_a_python_float():
    for value in (np.float32(0.5), np.int64(3), 2):
        out = check_real(value, "x")
        assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value, want", [(True, True), (0, False), (1, True),
                                         (np.bool_(False), False), (np.int64(1), True)])
def test_check_bool_takes_flags(value, want):
    assert check_bool(value, "flag") is want


@pytest.mark.parametrize("value", [2, -1, np.int64(2), "False", None, 1.0])
def test_check_bool_refuses_other_values(value):
    with pytest.raises(QroundError, match="flag must be True or False"):
        check_bool(value, "flag")


@pytest.mark.parametrize("value", [(1, 0), (0, 1), (1, -2), (1, 2, 3), (1,), 5, "ab"])
def test_check_positive_pair_refuses_non_positive_or_malformed_pairs(value):
    with pytest.raises(QroundError, match="beta"):
        check_positive_pair(value, "beta")


def test_check_positive_pair_returns_floats():
    assert check_positive_pair((1, np.float32(2.5)), "beta") == (1.0, 2.5)


# ----------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_to_numpy_takes_floating_tensors_as_float64(dtype):
    t = torch.tensor([0.5, -1.25], dtype=dtype, requires_grad=True)
    out = to_numpy(t)
    assert out.dtype == np.float64 and np.array_equal(out, [0.5, -1.25])


def test_to_numpy_keeps_integer_and_bool_tensors():
    assert to_numpy(torch.tensor([1, 2])).dtype == np.int64
    assert to_numpy(torch.tensor([True])).dtype == np.bool_


def test_as_float_array_converts_to_the_asked_dtype():
    out = as_float_array(np.array([1, 2, 3]), "w")
    assert out.dtype == np.float64 and np.array_equal(out, [1.0, 2.0, 3.0])
    assert as_float_array([True, False], "w").dtype == np.float64
    assert as_float_array(np.ones(3), "w", dtype=np.float32).dtype == np.float32


def test_as_float_array_refuses_complex_values():
    with pytest.raises(QroundError, match="w must be real"):
        as_float_array(np.array([1 + 2j, 3 + 0j]), "w")


# ----------------------------------------------------------------------------- check_psd


def test_check_psd_judges_each_channel_against_its_own_scale():
    """A small negative-definite channel beside a large PSD one is refused."""
    big = 1e6 * np.eye(4)
    small = -np.eye(4)
    with pytest.raises(QroundError, match=r"not positive semi-definite \(channel 1\)"):
        check_psd(np.stack([big, small]))
    check_psd(np.stack([big, np.eye(4)]))    # two PSD channels pass


def test_check_psd_finds_an_asymmetric_channel_in_a_stack():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5, 5))
    stack = a @ np.swapaxes(a, -1, -2)          # three PSD channels, 3 != 5
    check_psd(stack)
    stack[2, 0, 1] += 1.0
    with pytest.raises(QroundError, match=r"not symmetric \(channel 2\)"):
        check_psd(stack)


# ----------------------------------------------------------------------------- first_line


def test_first_line_is_the_first_line_cut_to_the_limit():
    assert first_line(ValueError("first\nsecond\nthird")) == "first"
    assert first_line(ValueError("  x" * 100), limit=10) == "x  x  x  x"
    assert first_line(ValueError()) == "no message"   # never raised: no traceback


def test_first_line_of_a_bare_exception_names_where_it_was_raised():
    def innermost():
        raise AttributeError

    def outer():
        innermost()

    try:
        outer()
    except AttributeError as exc:
        text = first_line(exc)
    assert text.startswith("no message; raised in innermost at ")
    assert __file__ in text
