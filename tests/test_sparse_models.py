"""Transformer block, subdivision, self-pruning upsampling, local PointNet."""

import pytest
import torch
from sparse_helpers import random_sparse, rel_err, single_thread  # noqa: F401 (autouse fixture)

from focusing.data.grid import CORNER_OFFSETS
from focusing.models import (
    LocalPointNet,
    SelfPruningUpsample,
    SparseResBlock,
    SparseTransformer,
    SparseTransformerBlock,
)
from focusing.models.pointnet import pool_to_voxels
from focusing.models.transformer import AbsolutePositionEmbedder
from focusing.sparse import SparseTensor, subdivide


def assert_sorted_layout(x: SparseTensor):
    c = x.coords.long()
    keys = ((c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]) * 4096 + c[:, 3]
    assert (keys[1:] > keys[:-1]).all()  # sorted, unique, so every batch item is contiguous


def test_position_embedding():
    emb = AbsolutePositionEmbedder(32)(torch.tensor([[0, 0, 0], [3, 1, 2]]))
    assert emb.shape == (2, 32)
    assert torch.allclose(emb[0, :30].view(3, 10)[:, 5:], torch.ones(3, 5))  # cos(0)
    assert (emb[:, 30:] == 0).all()
    assert torch.allclose(emb[1, 0], torch.sin(torch.tensor(3.0)))


def test_block_is_local_to_windows_and_batch_items():
    """Changing one voxel changes, after one block, only the voxels of its own window (same batch item)."""
    torch.manual_seed(0)
    x = random_sparse(2, 12, 0.2, 16, seed=1)
    for shift in (0, 2):
        block = SparseTransformerBlock(16, 4, window_size=4, shift=shift).eval()
        out = block(x).feats
        feats = x.feats.clone()
        feats[0] += torch.randn(16)  # (a constant shift would vanish in the LayerNorm)
        changed = (block(x.replace(feats)).feats - out).abs().amax(1) > 1e-6
        cell = torch.cat([x.coords[:, :1], torch.div(x.coords[:, 1:] + shift, 4, rounding_mode="floor")], 1)
        same_window = (cell == cell[0]).all(1)
        assert torch.equal(changed, same_window)


def test_checkpointing_gives_same_values_and_gradients():
    torch.manual_seed(0)
    x = random_sparse(1, 10, 0.3, 8, seed=2)
    model = SparseTransformer(8, 32, 4, num_blocks=2, num_heads=4, window_size=4)
    results = []
    for flag in (False, True):
        for block in model.blocks:
            block.use_checkpoint = flag
        model.zero_grad()
        out = model(x).feats
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-5)
    assert model.blocks[1].attn.shift == 2


def test_subdivide_copy_and_learned():
    x = random_sparse(2, 5, 0.3, 3, seed=3)
    x.resolution = 5
    children, parent = subdivide(x)
    assert len(children) == 8 * len(x) and children.resolution == 10 and children.batch_size == 2
    assert_sorted_layout(children)
    expect = (x.coords[parent, 1:] * 2)[:, None, :] + CORNER_OFFSETS  # one of the 8 corners of 2 * parent
    assert ((children.coords[:, None, 1:] == expect).all(-1)).any(1).all()
    assert torch.equal(children.coords[:, 0], x.coords[parent, 0])
    assert torch.equal(children.feats, x.feats[parent])
    child_feats = torch.randn(len(x), 8, 2, requires_grad=True)
    learned, parent2 = subdivide(x, child_feats)
    assert torch.equal(parent2, parent)
    k = ((learned.coords[:, 1:] - 2 * x.coords[parent, 1:]) * torch.tensor([1, 2, 4])).sum(1)
    assert torch.equal(learned.feats, child_feats[parent, k])  # child k gets child_feats[:, k]
    learned.feats.sum().backward()
    assert torch.equal(child_feats.grad, torch.ones_like(child_feats))


def test_res_block_starts_as_identity():
    x = random_sparse(1, 6, 0.3, 4, seed=4)
    assert torch.allclose(SparseResBlock(4)(x).feats, x.feats)


def test_self_pruning_upsample_prunes_by_target_then_logits():
    torch.manual_seed(0)
    x = random_sparse(2, 6, 0.3, 8, seed=5)
    up = SelfPruningUpsample(8, 6)
    children, _ = subdivide(x)
    target = children.coords[torch.rand(len(children)) < 0.3]
    out = up(x, target)
    assert out.logits.shape == (8 * len(x),) and out.target.sum() == len(target)
    assert torch.equal(out.x.coords, target) and out.x.batch_size == 2 and out.x.shape[1] == 6
    assert_sorted_layout(out.x)
    out.logits.sum().backward()  # the occupancy head is trained through the logits
    assert up.occupancy_head[1].weight.grad.abs().sum() > 0
    up.eval()
    with torch.no_grad():
        inferred = up(x)
        validated = up(x, target)  # eval mode: prune by the logits, still report the target for the loss
    assert inferred.target is None and torch.equal(inferred.keep, inferred.logits > 0)
    assert torch.equal(inferred.x.coords, inferred.children.coords[inferred.keep])
    assert torch.equal(validated.keep, inferred.keep) and torch.equal(validated.target, out.target)
    copied = SelfPruningUpsample(8, 8, learned=False)(x, target)
    assert torch.equal(copied.x.coords, target)


def oriented_points(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(n, 3, generator=g) - 0.5
    normals = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1)
    return points, normals


@pytest.mark.parametrize("pool,local_pool", [("mean", "max"), ("max", "mean")])
def test_pointnet_is_invariant_to_point_order(pool, local_pool):
    torch.manual_seed(0)
    points, normals = oriented_points(2000, 0)
    batch = (torch.arange(2000) % 2).long()
    ijk = torch.floor((points + 0.5) * 6).int()
    coords = torch.unique(torch.cat([batch[:, None].int(), ijk], 1), dim=0)
    keep = torch.rand(len(coords)) < 0.8  # some points' voxels are missing: those points are ignored
    coords = coords[keep]
    coords = torch.cat([coords, torch.tensor([[1, 5, 5, 5]], dtype=torch.int32)])  # maybe a voxel without points
    coords = torch.unique(coords, dim=0)
    net = LocalPointNet(16, 8, 3, pool=pool, local_pool=local_pool)
    for block in net.blocks:  # break the zero init so every block matters
        torch.nn.init.normal_(block.fc_1.weight, std=0.3)
    feats = net(points, normals, coords, 6, batch)
    perm = torch.randperm(2000)
    feats_perm = net(points[perm], normals[perm], coords, 6, batch[perm])
    assert rel_err(feats_perm, feats) < 1e-6
    has_points = torch.zeros(len(coords), dtype=torch.bool)
    voxel_of_points = torch.cat([batch[:, None].int(), ijk], 1)
    table = {tuple(c) for c in voxel_of_points.tolist()}
    has_points = torch.tensor([tuple(c) in table for c in coords.tolist()])
    assert (feats[~has_points] == 0).all() and (feats[has_points].abs().sum(1) > 0).all()
    moved = net(points + torch.tensor([1.0 / 6, 0, 0]), normals, coords, 6, batch)  # one voxel over: changes
    assert rel_err(moved, feats) > 1e-3


def test_pool_to_voxels():
    feats = torch.tensor([[1.0, -2.0], [3.0, 4.0], [5.0, 6.0]])  # sorted by voxel: 0, 0, 2
    lengths = torch.tensor([2, 0, 1])
    assert torch.equal(pool_to_voxels(feats, lengths, "mean"), torch.tensor([[2.0, 1.0], [0, 0], [5.0, 6.0]]))
    assert torch.equal(pool_to_voxels(feats, lengths, "max"), torch.tensor([[3.0, 4.0], [0, 0], [5.0, 6.0]]))


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_pool_to_voxels_matches_a_scatter_and_its_gradient_is_exact(reduce):
    g = torch.Generator().manual_seed(0)
    voxel = torch.sort(torch.randint(0, 9, (40,), generator=g)).values  # some of the 9 voxels stay empty
    lengths = torch.bincount(voxel, minlength=9)
    feats = torch.randn(40, 3, generator=g, dtype=torch.float64, requires_grad=True)
    scatter = feats.new_zeros(9, 3).scatter_reduce(0, voxel[:, None].expand(-1, 3), feats,
                                                   {"mean": "mean", "max": "amax"}[reduce], include_self=False)
    torch.testing.assert_close(pool_to_voxels(feats, lengths, reduce), scatter, rtol=1e-14, atol=0)
    assert (lengths == 0).any()
    assert torch.autograd.gradcheck(lambda f: pool_to_voxels(f, lengths, reduce), (feats,))


def test_pointnet_input_is_offset_to_voxel_centre_and_normal():
    net = LocalPointNet(4, 4, 2)
    seen = []
    net.fc_pos.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    coords = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]], dtype=torch.int32)
    points = torch.tensor([[-0.2, 0.1, 0.4], [0.3, 0.3, 0.3], [-0.45, -0.4, -0.3]])  # R = 4; the 2nd is outside
    normals = torch.eye(3)
    net(points, normals, coords, 4, torch.tensor([0, 0, 1]))
    ijk = torch.tensor([[1.0, 2, 3], [0, 0, 0]])
    offset = 2 * ((points[[0, 2]] + 0.5) * 4 - (ijk + 0.5))
    assert torch.allclose(seen[0], torch.cat([offset, normals[[0, 2]]], 1))
    assert seen[0][:, :3].abs().max() <= 1


@pytest.mark.gpu
def test_block_on_cuda_bf16_varlen_matches_cpu_fp32():
    """The block's CUDA path (autocast bf16, varlen on strided q/k/v views, checkpointing) against CPU fp32."""
    torch.manual_seed(0)
    x = random_sparse(2, 24, 0.08, 128, seed=9)
    block = SparseTransformerBlock(128, 2, window_size=8, shift=4)
    ref = block(x).feats
    ref.square().mean().backward()
    ref_grad = block.attn.to_qkv.weight.grad.clone()
    block_cuda = SparseTransformerBlock(128, 2, window_size=8, shift=4, use_checkpoint=True).cuda()
    block_cuda.load_state_dict(block.state_dict())
    x_cuda = SparseTensor(x.coords.cuda(), x.feats.cuda(), batch_size=2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = block_cuda(x_cuda).feats
    out.float().square().mean().backward()
    assert rel_err(out.float().cpu(), ref) < 2e-2
    assert rel_err(block_cuda.attn.to_qkv.weight.grad.cpu(), ref_grad) < 5e-2


def test_empty_input_passes_through():
    x = SparseTensor(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 8), batch_size=2)
    assert SparseTransformer(8, 16, 4, num_blocks=2, num_heads=2)(x).shape == (0, 4)
    assert SparseResBlock(8)(x).shape == (0, 8)
    out = SelfPruningUpsample(8, 4)(x, torch.zeros(0, 4, dtype=torch.int32))
    assert out.x.shape == (0, 4) and out.x.batch_size == 2
