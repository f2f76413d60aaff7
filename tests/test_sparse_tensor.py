"""SparseTensor: batch layout, shared spatial cache, helpers; voxel lookups."""

import torch
from sparse_helpers import random_coords, single_thread  # noqa: F401 (autouse fixture)

from focusing.sparse import (
    SparseTensor,
    find_voxels,
    occupancy,
    sort_coords,
    sparse_batch_cat,
    sparse_cat,
)
from focusing.sparse.gather import select_rows


def test_layout_with_empty_batch_item():
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 0], [2, 0, 0, 5]], dtype=torch.int32)
    x = SparseTensor(coords, torch.randn(3, 2), batch_size=3)
    assert x.batch_counts.tolist() == [2, 0, 1]
    assert x.batch_offsets.tolist() == [0, 2, 2, 3]
    assert x.layout == [slice(0, 2), slice(2, 2), slice(2, 3)]
    assert x.spatial_extent == 6
    assert SparseTensor(coords, torch.randn(3, 2)).batch_size == 3


def test_replace_shares_cache_select_and_unbind():
    coords = random_coords(2, 6, 0.3)
    x = SparseTensor(coords, torch.arange(len(coords), dtype=torch.float32)[:, None], resolution=6)
    _ = x.layout
    y = x.replace(x.feats * 2)
    assert y.cache is x.cache and y.coords is x.coords and y.resolution == 6
    z = x.replace(x.feats, coords=coords.clone())
    assert z.cache is not x.cache
    mask = x.feats[:, 0] % 3 == 0
    s = x.select(mask)
    assert s.batch_size == 2 and torch.equal(s.coords, coords[mask]) and torch.equal(s.feats, x.feats[mask])
    parts = x.unbind()
    assert [len(p) for p in parts] == x.batch_counts.tolist()
    assert torch.equal(parts[1].coords[:, 1:], coords[coords[:, 0] == 1][:, 1:])
    assert (parts[1].coords[:, 0] == 0).all()


def test_select_rows_is_boolean_indexing_with_the_same_gradient():
    """`select_rows` (gather backward) against `x[mask]` (accumulating index_put backward): same values and, in
    float64, bitwise the same gradients (each row is read at most once: no sums), also for an empty / full mask
    and 3-D rows; through SparseTensor.select as well."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, 3, generator=g, dtype=torch.float64)
    masks = (torch.rand(50, generator=g) < 0.4, torch.zeros(50, dtype=torch.bool), torch.ones(50, dtype=torch.bool))
    for mask in masks:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a[mask], select_rows(b, mask)
        assert torch.equal(ya, yb)
        w = torch.randn(ya.shape, generator=g, dtype=torch.float64)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        assert torch.equal(a.grad, b.grad)
        assert bool((b.grad[~mask] == 0).all())
    coords = random_coords(2, 6, 0.3)
    feats = torch.randn(len(coords), 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(len(coords), generator=g) < 0.5
    out = SparseTensor(coords, feats).select(mask)
    out.feats.sum().backward()
    assert torch.equal(feats.grad, mask[:, None].double().expand(-1, 5))
    with torch.no_grad():
        assert torch.equal(select_rows(feats, mask), feats[mask])


def test_cat_helpers():
    coords = random_coords(2, 5, 0.4, seed=2)
    x = SparseTensor(coords, torch.randn(len(coords), 3))
    both = sparse_cat([x, x.replace(torch.ones(len(x), 2))])
    assert both.shape == (len(x), 5) and both.cache is x.cache
    coords_b = random_coords(2, 4, 0.5, seed=4)
    b = SparseTensor(coords_b, torch.randn(len(coords_b), 3), batch_size=2)
    joined = sparse_batch_cat([x, b])
    assert joined.batch_size == 4
    assert torch.equal(joined.coords[len(x) :, 0], b.coords[:, 0] + 2)
    assert torch.equal(joined.feats, torch.cat([x.feats, b.feats]))
    assert joined.layout[2].start == len(x)


def test_sort_coords_and_find_voxels():
    coords = random_coords(2, 7, 0.3, seed=5)
    shuffled = coords[torch.randperm(len(coords), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(shuffled[sort_coords(shuffled)], coords)
    query = random_coords(2, 7, 0.3, seed=6)
    found = find_voxels(query, shuffled)
    table = {tuple(c): i for i, c in enumerate(shuffled.tolist())}
    assert found.tolist() == [table.get(tuple(c), -1) for c in query.tolist()]
    assert torch.equal(occupancy(query, shuffled), found >= 0)
    assert find_voxels(query, shuffled[:0]).eq(-1).all()
