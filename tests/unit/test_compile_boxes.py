"""Disjoint boxes: the kernel refuses overlapping elements in concatenated interval sets."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from seng_fw.compile.boxes import Box, covers, disjoint, merge_intervals

SIZE = 10  # values 0..9 in every field: small enough to check every point


def overlap(a: Box, b: Box) -> bool:
    return all(lo1 <= hi2 and lo2 <= hi1 for (lo1, hi1), (lo2, hi2) in zip(a, b, strict=True))


@st.composite
def box_lists(draw: st.DrawFn) -> list[Box]:
    dims = draw(st.integers(1, 3))
    interval = st.tuples(st.integers(0, SIZE - 1), st.integers(0, SIZE - 1)).map(
        lambda pair: (min(pair), max(pair))
    )
    return draw(st.lists(st.tuples(*[interval] * dims), max_size=8))


@settings(max_examples=200, deadline=None)
@given(box_lists())
def test_disjoint_covers_the_same_points_without_overlap(boxes: list[Box]) -> None:
    out = disjoint(boxes)
    for a, b in itertools.combinations(out, 2):
        assert not overlap(a, b), (a, b)
    if boxes:
        for point in itertools.product(range(SIZE), repeat=len(boxes[0])):
            assert covers(boxes, point) == covers(out, point), point
    assert disjoint(out) == out  # stable: already disjoint and merged


def test_merges_neighbours() -> None:
    assert merge_intervals([(5, 9), (0, 4), (12, 12), (3, 6)]) == [(0, 9), (12, 12)]
    # the same rest on both sides of a split is joined again
    boxes: list[Box] = [((0, 9), (80, 80)), ((5, 14), (80, 80)), ((3, 3), (443, 443))]
    assert disjoint(boxes) == [
        ((0, 2), (80, 80)),
        ((3, 3), (80, 80)),
        ((3, 3), (443, 443)),
        ((4, 14), (80, 80)),
    ]


def test_apps_with_disjoint_subnets_stay_separate() -> None:
    boxes: list[Box] = [((0, 255), (0, 2**32 - 1), (6, 6), (443, 443))]
    boxes += [((256, 511), (10, 10), (6, 6), (80, 80)), ((256, 511), (0, 100), (6, 6), (80, 80))]
    assert disjoint(boxes) == [
        ((0, 255), (0, 2**32 - 1), (6, 6), (443, 443)),
        ((256, 511), (0, 100), (6, 6), (80, 80)),
    ]
