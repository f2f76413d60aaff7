"""The grid convention: keys sort like coordinates, shared corners are shared."""

import torch

from focusing.data.grid import CORNER_OFFSETS, delinearize, linearize, voxel_centers, voxel_corners


def test_linearize_roundtrip_and_order():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 9, (500, 4), generator=g, dtype=torch.int32)
    keys = linearize(c, 9)
    assert torch.equal(delinearize(keys, 9), c)
    order = torch.argsort(keys)
    lex = sorted(range(len(c)), key=lambda i: tuple(c[i].tolist()))
    assert torch.equal(c[order], c[torch.tensor(lex)])


def test_voxel_corners_shared():
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.int32)
    corners, idx = voxel_corners(coords)
    assert len(corners) == 12 + 8  # two voxels of batch 0 share a face (4 corners); batch 1 is separate
    for v in range(3):
        for k in range(8):
            expect = coords[v].clone()
            expect[1:] += CORNER_OFFSETS[k]
            assert torch.equal(corners[idx[v, k]], expect)


def test_centers():
    c = torch.tensor([[0, 0, 0, 0], [0, 3, 3, 3]], dtype=torch.int32)
    assert torch.allclose(voxel_centers(c, 4), torch.tensor([[-0.375] * 3, [0.375] * 3]))
