"""The exact choice behind ``omniquant fit``: one format per unit, least summed damage,
exported bytes within the budget.

Policy:
- A multiple-choice knapsack solved exactly as a 0/1 integer program with pulp's
  bundled CBC solver (pulp ships with nvidia-modelopt, whose AutoQuantize uses it the
  same way). omniquant states the program itself rather than calling modelopt's
  ``auto_quantize``: AutoQuantize searches under an *effective bits* constraint with
  gradient/KL scores from its own fake-quant forward (CUDA-only for NVFP4), and knows
  nothing of the exported bytes; here the constraint is the exact byte arithmetic of
  ``omniquant plan`` and the scores are measured with the serving numerics.
- Variables x[u, f] in {0, 1}; sum_f x[u, f] = 1 per unit; sum delta_bytes x <= room;
  minimise sum damage x. Byte deltas are integers (a few times 1e10 at most), exact in
  the solver's doubles; the chosen layout is re-checked in integers by the caller.
- Illegal options (a width that does not divide the NVFP4 block) are simply absent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One format for one unit: bytes it adds to the all-BF16 export (negative: saves),
    and the damage measured with it alone."""

    format: str
    delta_bytes: int
    damage: float


def smallest(options: dict[str, list[Option]]) -> int:
    """Summed delta of the narrowest legal option of every unit (the smallest layout)."""
    return sum(min(o.delta_bytes for o in opts) for opts in options.values())


def solve(options: dict[str, list[Option]], room: int) -> dict[str, Option]:
    """Pick one option per unit with summed ``delta_bytes`` <= ``room``, least damage.

    Args:
        options: Unit name -> its legal options (bf16 with delta 0 included).
        room: Budget minus the all-BF16 export's bytes (negative: bytes to save).

    Returns:
        Unit name -> chosen option.

    Raises:
        ValueError: no layout fits (the caller checks ``smallest`` first and explains).
        RuntimeError: the solver did not prove optimality.
    """
    if smallest(options) > room:
        raise ValueError("no layout fits the budget")
    target = room
    for _ in range(3):
        chosen = _solve_once(options, target)
        excess = sum(o.delta_bytes for o in chosen.values()) - room
        if excess <= 0:
            return chosen
        # CBC accepts binaries within its integrality tolerance, so on a budget met to the
        # byte the rounded answer can overshoot by a few bytes: ask again with less room.
        target -= excess
    raise RuntimeError("solver answer exceeds the budget in integer arithmetic")


def solve_best(options: dict[str, list[Option]], room: int, k: int) -> list[dict[str, Option]]:
    """The ``k`` best distinct layouts by summed damage within ``room`` (fewer when fewer
    exist), best first: each further one is the optimum with the earlier ones excluded by
    a no-good cut (at least one unit takes another option).

    Raises:
        ValueError: no layout fits.
    """
    if smallest(options) > room:
        raise ValueError("no layout fits the budget")
    found: list[dict[str, Option]] = []
    for _ in range(k):
        try:
            layout = _solve_once(options, room, exclude=found)
        except RuntimeError:  # infeasible: every layout that fits is already found
            break
        if sum(o.delta_bytes for o in layout.values()) > room:
            break  # a tolerance artefact; the exact ones found so far stand
        found.append(layout)
    return found


def _solve_once(
    options: dict[str, list[Option]], room: int, exclude: list[dict[str, Option]] = ()
) -> dict[str, Option]:
    import pulp

    prob = pulp.LpProblem("omniquant_fit", pulp.LpMinimize)
    x = {
        (u, i): pulp.LpVariable(f"x_{n}_{i}", cat="Binary")
        for n, (u, opts) in enumerate(options.items())
        for i in range(len(opts))
    }
    prob += pulp.lpSum(options[u][i].damage * v for (u, i), v in x.items())
    prob += pulp.lpSum(options[u][i].delta_bytes * v for (u, i), v in x.items()) <= room
    for u, opts in options.items():
        prob += pulp.lpSum(x[(u, i)] for i in range(len(opts))) == 1
    for layout in exclude:
        picked = [x[(u, options[u].index(o))] for u, o in layout.items()]
        prob += pulp.lpSum(picked) <= len(picked) - 1
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        raise RuntimeError(f"CBC ended with status {pulp.LpStatus[status]}")
    chosen = {}
    for u, opts in options.items():
        picks = [i for i in range(len(opts)) if (x[(u, i)].value() or 0) > 0.5]
        if len(picks) != 1:  # pragma: no cover - the equality constraint forbids it
            raise RuntimeError(f"solver picked {len(picks)} options for {u}")
        chosen[u] = opts[picks[0]]
    return chosen
