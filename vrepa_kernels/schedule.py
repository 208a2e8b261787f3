"""Which row strips of the relation a backend visits, and how strips are shared between ranks.

A strip is ``(r0, r1, c0, c1)``: rows ``[r0, r1)`` against columns ``[c0, c1)``. The symmetric schedule
visits columns ``>= r0`` only; the row-owned schedule visits every column a row pairs with. For sequence
parallelism the strips are shared between ranks so that each rank's pair count is balanced.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from .relation import RelationSpec

Strip = Tuple[int, int, int, int]


def column_range(spec: RelationSpec, r0: int, r1: int, symmetric: bool) -> Tuple[int, int]:
    """Columns that rows ``[r0, r1)`` pair with; spatial keeps only the frames the rows touch."""
    c0, c1 = (r0 if symmetric else 0), spec.num_tokens
    if spec.relation == "spatial":
        tpf = spec.tokens_per_frame
        c1 = -(-r1 // tpf) * tpf
        if not symmetric:
            c0 = (r0 // tpf) * tpf
    return c0, c1


def strips(spec: RelationSpec, height: int, symmetric: bool = True) -> List[Strip]:
    out = []
    for r0 in range(0, spec.num_tokens, height):
        r1 = min(spec.num_tokens, r0 + height)
        out.append((r0, r1, *column_range(spec, r0, r1, symmetric)))
    return out


def balance(costs: Sequence[int], parts: int) -> List[List[int]]:
    """Deterministic longest-first greedy split of ``costs`` into ``parts`` lists of indices."""
    loads = [0] * parts
    owners: List[List[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        part = min(range(parts), key=lambda p: (loads[p], p))
        loads[part] += costs[i]
        owners[part].append(i)
    return [sorted(o) for o in owners]


def strips_for(spec: RelationSpec, height: int, part: Optional[Tuple[int, int]] = None,
               symmetric: bool = True) -> List[Tuple[int, Strip]]:
    """``(index, strip)`` pairs that ``part = (rank, world)`` visits; every strip when ``part`` is None."""
    all_strips = strips(spec, height, symmetric)
    if part is None:
        return list(enumerate(all_strips))
    rank, world = part
    mine = balance([(r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in all_strips], world)[rank]
    return [(i, all_strips[i]) for i in mine]
