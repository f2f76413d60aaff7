"""The generated Dual Marching Cubes tables: counts, edge groups, the C16/C19 ambiguity check, quad cycles."""

from collections import Counter

from focusing.data.grid import CORNER_OFFSETS
from focusing.sparseflex.tables import (
    AMBIGUOUS_DIR,
    AMBIGUOUS_FLAG,
    EDGE_CORNERS,
    EDGE_TO_DUAL,
    NUM_DUAL,
    QUAD_CYCLE,
    edge_groups,
)


def _crossed(case: int) -> set[int]:
    inside = [(case >> k) & 1 for k in range(8)]
    return {e for e in range(12) if inside[EDGE_CORNERS[e, 0]] != inside[EDGE_CORNERS[e, 1]]}


def _ambiguous_faces(case: int) -> list[tuple[int, int]]:
    """(axis, side) of faces whose diagonal corners agree and adjacent corners differ."""
    faces = []
    for axis in range(3):
        for side in (0, 1):
            ks = [k for k in range(8) if (k >> axis) & 1 == side]
            signs = [(case >> k) & 1 for k in ks]  # ks in increasing order: 0-3 and 1-2 are the diagonals
            if signs[0] == signs[3] and signs[1] == signs[2] and signs[0] != signs[1]:
                faces.append((axis, side))
    return faces


def test_edges_follow_the_corner_convention():
    for e in range(12):
        lo, hi = EDGE_CORNERS[e]
        diff = CORNER_OFFSETS[hi] - CORNER_OFFSETS[lo]
        assert diff.tolist() == [int(a == e // 4) for a in range(3)]
    assert len({tuple(p) for p in EDGE_CORNERS.tolist()}) == 12


def test_dual_vertex_count_distribution():
    assert dict(Counter(NUM_DUAL.tolist())) == {0: 2, 1: 162, 2: 82, 3: 8, 4: 2}
    assert NUM_DUAL[0] == 0 and NUM_DUAL[255] == 0


def test_every_crossed_edge_in_exactly_one_group():
    for case in range(256):
        groups = edge_groups(case)
        flat = [e for g in groups for e in g]
        assert sorted(flat) == sorted(_crossed(case))
        assert all(len(g) >= 3 for g in groups)  # a dual vertex joins at least 3 crossed edges
        assert ((EDGE_TO_DUAL[case] >= 0).sum()) == len(_crossed(case))


def test_hand_checked_cases():
    assert edge_groups(1) == [[0, 4, 8]]  # corner 0 inside: its x, y, z edges
    assert edge_groups(3) == [[4, 5, 8, 9]]  # corners 0, 1 inside: their y and z edges, one patch
    # corners 1 and 2 inside share the ambiguous face z = 0: kept separated -> 2 dual vertices
    assert edge_groups(6) == [[0, 5, 9], [1, 4, 10]]
    # complement: corners 1 and 2 outside, the inside corners 0 and 3 are joined through the cube -> 1 vertex
    assert edge_groups(255 - 6) == [[0, 1, 4, 5, 9, 10]]
    # corners 0 and 7 (opposite) inside: two separate corner triangles
    assert edge_groups(1 | 128) == [[0, 4, 8], [3, 7, 11]]


def test_unambiguous_cases_match_their_complement():
    for case in range(256):
        if not _ambiguous_faces(case):
            assert edge_groups(case) == edge_groups(255 - case)


def test_ambiguity_flags():
    flagged = [c for c in range(256) if AMBIGUOUS_FLAG[c]]
    assert len(flagged) == 36
    for c in range(256):
        faces = _ambiguous_faces(c)
        expect = len(faces) == 1 and NUM_DUAL[c] == 1
        assert bool(AMBIGUOUS_FLAG[c]) == expect
        if expect:
            axis, side = faces[0]
            assert AMBIGUOUS_DIR[c].tolist() == [(2 * side - 1) * (a == axis) for a in range(3)]
            # the complement has the same crossed edges but separates the pairs: 2 dual vertices
            assert _crossed(255 - c) == _crossed(c)
            assert NUM_DUAL[255 - c] == 2
        else:
            assert AMBIGUOUS_DIR[c].abs().sum() == 0


def test_quad_cycle_walks_around_the_edge():
    for axis in range(3):
        cycle = QUAD_CYCLE[axis].tolist()
        assert sorted(cycle) == [0, 1, 2, 3]
        lower = [CORNER_OFFSETS[EDGE_CORNERS[4 * axis + j, 0]] for j in cycle]
        u, v = (axis + 1) % 3, (axis + 2) % 3
        # the voxel holding slot j sits at -(offset) from the edge; consecutive voxels share a face and the
        # loop turns counter-clockwise around +axis (positive signed area in the (u, v) plane)
        pts = [(-float(p[u]) + 0.5, -float(p[v]) + 0.5) for p in lower]
        area = sum(pts[i][0] * pts[(i + 1) % 4][1] - pts[(i + 1) % 4][0] * pts[i][1] for i in range(4))
        assert area > 0
        for i in range(4):
            assert int((lower[i] - lower[(i + 1) % 4]).abs().sum()) == 1
