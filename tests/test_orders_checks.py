"""qround._orders.merge_orders: the tie-break among names free to come next (helper-142)."""
from qround._orders import merge_orders


def test_a_name_only_a_later_order_holds_goes_after_the_first_orders_free_names():
    """Among names free to come next, the one seen first wins (earliest order, then earliest
    place): the first batch's order leads, a name first seen later follows it."""
    assert merge_orders([["a", "b"], ["c"]]) == ["a", "b", "c"]
    # a later order's first name is not preferred to the first order's second one
    assert merge_orders([["a", "b", "c"], ["x", "c"]]) == ["a", "b", "x", "c"]
    # several free names from later orders come in order of their first sight
    assert merge_orders([["a"], ["y"], ["x"]]) == ["a", "y", "x"]
