"""qround._orders.merge_orders: one call order from the orders of several batches."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from qround._orders import merge_orders


def test_a_single_order_comes_back_unchanged():
    assert merge_orders([["b", "a", "c"]]) == ["b", "a", "c"]
    assert merge_orders([]) == []


def test_a_name_first_seen_later_goes_after_what_it_follows_anywhere():
    # c only, d only, then both: d comes after c, not straight after a
    assert merge_orders([["a", "c", "out"], ["a", "d", "out"], ["a", "c", "d", "out"]]) == [
        "a", "c", "d", "out"]
    # a name seen on a later batch only, between two of the first
    assert merge_orders([["a", "b"], ["a", "x", "b"]]) == ["a", "x", "b"]


def test_disagreeing_orders_follow_the_first_batch():
    assert merge_orders([["a", "b", "c"], ["b", "a", "c"]]) == ["a", "b", "c"]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.integers(1, 5), st.integers(0, 2 ** 32 - 1))
def test_every_precedence_of_subsequences_of_one_order_is_kept(n, batches, seed):
    """Batches that each call a subset of one true order: the merge keeps every precedence any
    batch shows, and holds every name once."""
    rng = random.Random(seed)
    truth = [f"m{i}" for i in range(n)]
    orders = [[m for m in truth if rng.random() < 0.6] for _ in range(batches)]
    merged = merge_orders(orders)
    assert sorted(merged) == sorted({m for o in orders for m in o})
    place = {m: i for i, m in enumerate(merged)}
    assert all(place[a] < place[b] for o in orders for a, b in zip(o, o[1:]))
