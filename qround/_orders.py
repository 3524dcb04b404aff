"""One call order from the call orders of several calibration batches (a module a batch skips,
as a mixture's expert no row was routed to, is missing from that batch's order)."""
from __future__ import annotations

import heapq
from typing import Sequence


def merge_orders(orders: Sequence[Sequence[str]]) -> list[str]:
    """Every name of ``orders`` once, each after the names it follows in any of them.

    Each order (one batch's first calls, no name twice) says that a name comes after the one
    before it there; the result keeps every such precedence (a topological order).  Among the
    names that are free to come next, the one seen first wins (earliest order, then earliest
    place), so a single order comes back unchanged and the first batch's order leads.  Where
    the batches disagree (a cycle: a before b in one, b before a in another), the name seen
    first is taken next."""
    key: dict[str, tuple[int, int]] = {}
    after: dict[str, set[str]] = {}
    before: dict[str, int] = {}
    for i, order in enumerate(orders):
        for j, name in enumerate(order):
            key.setdefault(name, (i, j))
            after.setdefault(name, set())
            before.setdefault(name, 0)
        for a, b in zip(order, order[1:]):
            if b not in after[a]:
                after[a].add(b)
                before[b] += 1
    free = [(key[n], n) for n in key if before[n] == 0]
    heapq.heapify(free)
    merged: list[str] = []
    done: set[str] = set()
    while len(merged) < len(key):
        if not free:    # a cycle: the name seen first of those left
            name = min((n for n in key if n not in done), key=key.__getitem__)
        else:
            name = heapq.heappop(free)[1]
            if name in done:
                continue
        merged.append(name)
        done.add(name)
        for b in after[name]:
            before[b] -= 1
            if before[b] == 0 and b not in done:
                heapq.heappush(free, (key[b], b))
    return merged
