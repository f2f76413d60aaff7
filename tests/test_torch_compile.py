"""`focusing.device.use_torch_compile` (train.compile): the compiled per-element math of the transformer blocks
(around the attention kernel) and of the PointNet gives the plain values and gradients, with one graph per
function for every size."""

import pytest
import torch
from sparse_helpers import random_coords, single_thread  # noqa: F401 (autouse fixture)

from focusing.device import use_torch_compile
from focusing.models.pointnet import LocalPointNet
from focusing.models.transformer import SparseTransformer
from focusing.sparse import SparseTensor


def structure(seed: int, extent: int) -> SparseTensor:
    """Two batch items of random voxels (dense and sparse) with float64 features `[N, 16]`."""
    sparse = random_coords(1, 19, 0.05, seed=seed + 1)
    sparse[:, 0] = 1
    coords = torch.cat([random_coords(1, extent, 0.85, seed=seed), sparse])
    g = torch.Generator().manual_seed(seed + 2)
    return SparseTensor(coords, torch.randn(len(coords), 16, generator=g, dtype=torch.float64), batch_size=2)


def model(block_chunk: int, dtype=torch.float64, device="cpu") -> SparseTransformer:
    torch.manual_seed(0)
    net = SparseTransformer(16, 16, 8, num_blocks=2, num_heads=2, window_size=4, qk_rms_norm=True,
                            use_checkpoint=True, block_chunk=block_chunk).to(device, dtype)
    for p in net.parameters():  # LayerNorm / RMSNorm start at 1 and 0: give every weight a value
        torch.nn.init.normal_(p, mean=0.1, std=0.3)
    return net


def forward_backward(net, x: SparseTensor, autocast: bool = False):
    feats = x.feats.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = net(x.replace(feats)).feats.float()
    out.square().mean().backward()
    return [out.detach(), feats.grad] + [p.grad.clone() for p in net.parameters()]


@pytest.fixture
def plain_afterwards():
    yield
    use_torch_compile(False)


@pytest.mark.parametrize("block_chunk", [0, 50])
def test_compiled_block_math_equals_the_plain_math_for_any_voxel_count(block_chunk, plain_afterwards):
    """Dynamo captures each per-voxel function whole (fullgraph) and, as shapes are dynamic, once per grad mode
    (the chunks' forward runs without gradients, their recomputation with): a second structure of another size
    adds no graph. The results are the plain blocks' (float64; the graphs run eagerly here, as the CPU test of
    what Inductor fuses on CUDA below). It would fail if the compiled functions computed anything else, broke
    into several graphs or were recompiled per voxel count."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for seed, extent in ((0, 13), (3, 11)):
        x = structure(seed=seed, extent=extent)
        use_torch_compile(False)
        plain = forward_backward(model(block_chunk), x)
        use_torch_compile(backend=counting, fullgraph=True)
        fused = forward_backward(model(block_chunk), x)
        for a, b in zip(plain, fused):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        if seed == 0:
            first = len(graphs)
    assert 2 <= first <= 4, first  # 2 functions x (with, without gradients where the chunks ask for both)
    assert len(graphs) == first, len(graphs)


def test_blocks_under_min_rows_run_uncompiled(plain_afterwards):
    """`use_torch_compile(min_rows=N)`: the block functions called on fewer than N rows run plain (no graph is
    captured for them), on N or more compiled; the values are the same either way."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = structure(seed=0, extent=13)
    use_torch_compile(False)
    plain = forward_backward(model(0), x)
    use_torch_compile(backend=counting, fullgraph=True, min_rows=len(x) + 1)
    small = forward_backward(model(0), x)
    assert graphs == []
    use_torch_compile(backend=counting, fullgraph=True, min_rows=len(x))
    big = forward_backward(model(0), x)
    assert len(graphs) >= 2
    for a, b, c in zip(plain, small, big):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


def pointnet_features(net: LocalPointNet, seed: int, count: int):
    """(features, point and parameter gradients) of the PointNet on `count` random oriented points at R = 6."""
    g = torch.Generator().manual_seed(seed)
    points = (torch.rand(count, 3, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    normals = torch.nn.functional.normalize(torch.randn(count, 3, generator=g, dtype=torch.float64), dim=1)
    ijk = torch.unique(torch.floor((points.detach() + 0.5) * 6).long(), dim=0)
    coords = torch.cat([torch.zeros(len(ijk), 1, dtype=torch.long), ijk], 1).int()
    out = net(points, normals, coords, 6)
    out.square().sum().backward()
    result = [out.detach(), points.grad] + [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    return result


@pytest.mark.parametrize("chunk_points", [0, 40])
def test_compiled_pointnet_equals_the_plain_pointnet_for_any_point_count(chunk_points, plain_afterwards):
    """The PointNet's per-point blocks and poolings compiled whole (fullgraph), in checkpointed chunks of whole
    voxels or not: the plain features and gradients, and a second point set of another size adds no graph."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    net = LocalPointNet(16, 8, 3, chunk_points=chunk_points).double()
    for p in net.parameters():  # fc_1 starts at zero: give every weight a value
        torch.nn.init.normal_(p, std=0.3)
    for seed, count in ((0, 300), (1, 217)):
        use_torch_compile(False)
        plain = pointnet_features(net, seed, count)
        use_torch_compile(backend=counting, fullgraph=True)
        fused = pointnet_features(net, seed, count)
        for a, b in zip(plain, fused):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        if seed == 0:
            first = len(graphs)
    assert 1 <= first <= 3, first
    assert len(graphs) == first, len(graphs)


@pytest.mark.gpu
def test_inductor_fused_blocks_on_cuda_bf16_match_the_plain_blocks(plain_afterwards):
    """Inductor's fused kernels (CUDA, bf16 autocast, chunked and whole blocks): the plain values and gradients up
    to bf16 rounding."""
    coords = random_coords(2, 24, 0.3, seed=9).cuda()
    x = SparseTensor(coords, torch.randn(len(coords), 16, device="cuda"), batch_size=2)
    for block_chunk in (0, 1000):
        use_torch_compile(False)
        plain = forward_backward(model(block_chunk, torch.float32, "cuda"), x, autocast=True)
        use_torch_compile()
        fused = forward_backward(model(block_chunk, torch.float32, "cuda"), x, autocast=True)
        for a, b in zip(plain, fused):
            assert ((a - b).norm() / a.norm()).item() < 1e-2
