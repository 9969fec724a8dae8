"""Disjoint boxes for nftables sets with concatenated interval keys.

An element of such a set is a box: one inclusive interval per field of the key
(`10.0.1.0/24 . 1.2.3.0/24 . tcp . 80-443`). The kernel refuses a set whose boxes
overlap at all ("File exists"), while policy rules overlap all the time (`0.0.0.0/0`
and `10.0.0.0/8`, port 443 and ports 1-1024). `disjoint` turns any list of boxes
into disjoint boxes that cover exactly the same points, merging neighbours where it
can so that the set stays small.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

Interval = tuple[int, int]  # inclusive
Box = tuple[Interval, ...]


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint, non-adjacent intervals covering the same points."""
    merged: list[Interval] = []
    for low, high in sorted(intervals):
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return merged


def disjoint(boxes: Iterable[Box]) -> list[Box]:
    """Disjoint boxes covering exactly the union of `boxes` (all of the same dimension).

    Sweep along the first field: between two consecutive interval ends the set of
    boxes that cover the field does not change, so the rest of the key is solved
    once per such slice (recursively), and neighbouring slices with the same rest
    are joined. Boxes whose first fields are disjoint (one app per subnet) cost
    only their own slice.
    """
    boxes = list(boxes)
    if len(boxes) <= 1:
        return boxes  # the common case deep in the recursion: nothing to split
    if len(boxes[0]) == 1:
        return [(interval,) for interval in merge_intervals(box[0] for box in boxes)]
    starts = sorted(boxes, key=lambda box: box[0][0])
    bounds = sorted({box[0][0] for box in boxes} | {box[0][1] + 1 for box in boxes})
    active: list[Box] = []
    next_start = 0
    # (first field, rest) of the slice being extended, and the finished output
    pending: list[tuple[Interval, tuple[Box, ...]]] = []
    for low, following in itertools.pairwise(bounds):
        while next_start < len(starts) and starts[next_start][0][0] == low:
            active.append(starts[next_start])
            next_start += 1
        active = [box for box in active if box[0][1] >= low]
        if not active:
            continue
        rest = tuple(disjoint(box[1:] for box in active))
        high = following - 1
        if pending and pending[-1][1] == rest and pending[-1][0][1] + 1 == low:
            pending[-1] = ((pending[-1][0][0], high), rest)
        else:
            pending.append(((low, high), rest))
    return [(first, *tail) for first, rest in pending for tail in rest]


def covers(boxes: Iterable[Box], point: tuple[int, ...]) -> bool:
    """Whether any box contains `point` (for tests and debugging)."""
    return any(all(lo <= p <= hi for (lo, hi), p in zip(box, point, strict=True)) for box in boxes)
