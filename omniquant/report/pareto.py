"""The Pareto front of the report's candidates: fewer exported bytes and lower loss.

Policy: one pure function over ``(name, cost, loss)`` points, both minimised (pass
``-accuracy`` to maximise accuracy). A point is on the front when no other point is at
least as good on both and strictly better on one. Equal points do not dominate each
other, so ties are all on the front. A point missing either number (a served model
that reports no size, a baseline without KL) is never on it: the front is drawn from
measured numbers only.
"""

from __future__ import annotations


def pareto_front(points: list[tuple[str, float | None, float | None]]) -> list[str]:
    """Names of the non-dominated points, in order of increasing cost (then loss, name).

    Args:
        points: ``(name, cost, loss)``; lower is better for both.
    """
    known = [(n, c, l) for n, c, l in points if c is not None and l is not None]
    front = [
        (c, l, n)
        for n, c, l in known
        if not any(c2 <= c and l2 <= l and (c2 < c or l2 < l) for _, c2, l2 in known)
    ]
    return [n for _, _, n in sorted(front)]
