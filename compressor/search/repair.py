"""Back to the exact average: change as few level steps as possible until budget(k) is the space's budget.

Layers of one parameter count form a size class; p / g (g = gcd of all sizes) is the class's *unit*. A
deficit of u units (u * g weights-times-steps) is closed by net level steps d_c per class with
sum_c unit_c * d_c = u, each d_c within the class's room (how many steps its layers can still go up, or
down). Since moving one layer two ways never helps, the fewest level changes are the fewest sum_c |d_c|,
found exactly by dynamic programming over the classes (e.g. units 1, 3, 8 for SmolLM2's k/v, q/o and MLP
layers: a deficit of 5 units is one MLP step up and one q/o step down). Repair therefore fails only when
no candidate of the level set has the budget, and then ``RepairError`` gives the deficit and the room.

Which layers of a class take the steps is set by a per-layer *pull* (how far each layer would like to
move up, in level steps): a step up goes to the layer pulling up hardest, and lowers its pull by one, so
steps spread out rather than piling onto one layer. A random pull gives random repairs; the fractional
parts of a rounded allocation give the largest-remainder rounding of it (``snap``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from compressor.search.levels import Candidate, SearchSpace
from compressor.sparsity.plan import PlanError


class RepairError(PlanError):
    """No change of levels within the level set reaches the exact budget."""


def repair(c: Candidate, space: SearchSpace, rng: Optional[np.random.Generator] = None,
           pull: Optional[np.ndarray] = None) -> Candidate:
    """A copy of ``c`` (indices clipped into the level set) whose budget is exactly ``space.budget``,
    changed by as few level steps as possible. ``pull`` (per layer) picks which layers move;
    without it, ``rng`` draws a random one."""
    k = np.clip(np.asarray(c, dtype=np.int64), 0, len(space.levels) - 1)
    if pull is None:
        pull = (rng or np.random.default_rng(0)).random(len(space))
    pull = np.array(pull, dtype=np.float64)
    g, top = space.unit, len(space.levels) - 1
    classes = {p // g: idx for p, idx in space.size_classes().items()}
    room = {w: (int((top - k[idx]).sum()), int(k[idx].sum())) for w, idx in classes.items()}
    deficit, rest = divmod(space.budget - space.budget_of(k), g)
    assert rest == 0, "sizes and budget are multiples of their gcd"
    for w, steps in _fewest_class_steps(deficit, room).items():
        _spread(k, pull, classes[w], steps, top)
    assert space.budget_of(k) == space.budget
    return k


def snap(positions: np.ndarray, space: SearchSpace) -> Candidate:
    """The exact-budget candidate nearest to continuous level positions (one per layer, see
    ``SearchSpace.level_positions``): round, then repair along the rounding remainders."""
    x = np.clip(np.asarray(positions, dtype=np.float64), 0, len(space.levels) - 1)
    k = np.rint(x).astype(np.int64)
    return repair(k, space, pull=x - k)


def _fewest_class_steps(deficit: int, room: dict[int, tuple[int, int]]) -> dict[int, int]:
    """``_class_steps``, first with every class capped at |deficit| + the largest unit steps, which keeps the
    work small on fine level sets: a capped minimum that costs no more than the cap is the minimum overall
    (anything beyond the cap costs more); otherwise solve over the whole room."""
    cap = abs(deficit) + max(room)
    capped = {w: (min(up, cap), min(down, cap)) for w, (up, down) in room.items()}
    if capped != room:
        try:
            steps = _class_steps(deficit, capped)
            if sum(abs(d) for d in steps.values()) <= cap:
                return steps
        except RepairError:
            pass
    return _class_steps(deficit, room)


def _class_steps(deficit: int, room: dict[int, tuple[int, int]]) -> dict[int, int]:
    """Net steps per class unit (positive = sparser) with sum(unit * steps) == deficit, each class within
    its room (up, down), fewest steps in total: exact dynamic programming over the classes, the state
    being the units closed so far (numpy work ~ (sum of unit x room) x (sum of room): ms for SmolLM2)."""
    # the class with the most room goes last, where only the one final state (the deficit) is solved for
    units = sorted(room, key=lambda w: (sum(room[w]), w))
    lo, hi = -sum(w * room[w][1] for w in units), sum(w * room[w][0] for w in units)
    if not lo <= deficit <= hi:
        raise RepairError(_why(deficit, room))
    never = np.iinfo(np.int64).max // 4
    cost = np.full(hi - lo + 1, never, dtype=np.int64)  # cost[s - lo]: fewest steps that close s units
    cost[-lo] = 0
    choices = []
    for w in units[:-1]:
        cost, choice = _add_class(cost, w, *room[w], never)
        choices.append(choice)
    last, (up, down) = units[-1], room[units[-1]]
    d = np.arange(-down, up + 1)
    at = deficit - last * d - lo  # where the other classes must have got to
    inside = (at >= 0) & (at < len(cost))
    before = np.where(inside, cost[np.clip(at, 0, len(cost) - 1)], never)
    if not (before < never).any():
        raise RepairError(_why(deficit, room))
    total = np.where(before < never, before + np.abs(d), never)
    steps = {last: int(d[np.lexsort((d, np.abs(d), total))[0]])}  # fewest steps, then the smaller move
    s = deficit - last * steps[last] - lo
    for w, choice in zip(reversed(units[:-1]), reversed(choices)):
        steps[w] = int(choice[s])
        s -= w * steps[w]
    return {w: d for w, d in steps.items() if d}


def _add_class(cost: np.ndarray, w: int, up: int, down: int, never: int) -> tuple[np.ndarray, np.ndarray]:
    """new[s] = min over d in [-down, up] of cost[s - w * d] + |d|, and the d that attains it; smaller |d|
    first, so ties keep the class still."""
    new, choice, n = cost.copy(), np.zeros(len(cost), dtype=np.int64), len(cost)
    for d in sorted(range(-down, up + 1), key=lambda d: (abs(d), d)):
        shift = w * d
        if d == 0 or abs(shift) >= n:
            continue
        src = cost[max(0, -shift): n - max(0, shift)]  # cost[s - shift] for s in the slice below
        dst, picked = new[max(0, shift): n - max(0, -shift)], choice[max(0, shift): n - max(0, -shift)]
        better = (src < never) & (src + abs(d) < dst)
        dst[better] = src[better] + abs(d)
        picked[better] = d
    return new, choice


def _spread(k: np.ndarray, pull: np.ndarray, idx: np.ndarray, steps: int, top: int) -> None:
    """Move the class ``idx`` by ``steps`` level steps in total, one at a time, each to the layer that
    pulls hardest that way and has room (in place)."""
    sign = 1 if steps > 0 else -1
    for _ in range(abs(steps)):
        room = (k[idx] < top) if sign > 0 else (k[idx] > 0)
        want = np.where(room, sign * pull[idx], -np.inf)
        layer = idx[int(np.argmax(want))]
        k[layer] += sign
        pull[layer] -= sign


def _why(deficit: int, room: dict[int, tuple[int, int]]) -> str:
    left = ", ".join(f"unit {w}: {up} up / {down} down" for w, (up, down) in sorted(room.items()))
    return (f"cannot reach the exact average: {deficit} size units of level steps remain (sparser if positive) "
            f"and the layers' room is {left}; the target is too close to the ends of the level set")
