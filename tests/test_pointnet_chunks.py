"""LocalPointNet in checkpointed chunks of whole voxels (`chunk_points`, VAEConfig.pointnet_chunk): the same
features and gradients as one pass, far less memory kept for the backward pass."""

import pytest
import torch
from sparse_helpers import single_thread  # noqa: F401 (autouse fixture)

from focusing.models import pointnet
from focusing.models.pointnet import LocalPointNet
from focusing.models.vae import FocusingVAE, VAEConfig

R = 8


def problem(n=3000, seed=0):
    """Points (a dense cluster in one voxel, so one voxel holds more points than a chunk), their normals, and the
    latent voxels: every other occupied voxel (points outside them are ignored) plus two empty ones."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5
    pts[:400] = 0.01 * torch.rand(400, 3, generator=g, dtype=torch.float64)  # all in voxel (4, 4, 4)
    nrm = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=1)
    ijk = torch.floor((pts + 0.5) * R).long()
    occupied = torch.unique(torch.cat([torch.zeros(n, 1, dtype=torch.long), ijk], 1), dim=0)
    keep = occupied[::2]
    if not ((keep[:, 1:] == 4).all(1)).any():
        keep = torch.cat([keep, torch.tensor([[0, 4, 4, 4]])])
    all_cells = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    empty = all_cells[~(all_cells[:, None] == occupied[:, 1:]).all(-1).any(1)][:2]
    coords = torch.cat([keep, torch.cat([torch.zeros(len(empty), 1, dtype=torch.long), empty], 1)])
    coords = torch.unique(coords, dim=0).int()
    return pts, nrm, coords


def nets(chunk):
    torch.manual_seed(0)
    whole = LocalPointNet(48, 24, 3).double()
    for p in whole.parameters():  # fc_1 starts at zero: give every weight a value so all paths matter
        torch.nn.init.normal_(p, std=0.3)
    chunked = LocalPointNet(48, 24, 3, chunk_points=chunk).double()
    chunked.load_state_dict(whole.state_dict())
    return whole, chunked


@pytest.mark.parametrize("chunk", [150, 1000])
def test_chunks_compute_the_same_features_and_gradients(chunk):
    pts, nrm, coords = problem()
    whole, chunked = nets(chunk)
    pa, pb = pts.clone().requires_grad_(), pts.clone().requires_grad_()
    fa, fb = whole(pa, nrm, coords, R), chunked(pb, nrm, coords, R)
    torch.testing.assert_close(fb, fa, rtol=1e-12, atol=1e-12)
    empty = ~torch.isin(torch.arange(len(coords)), torch.unique(
        torch.nonzero((torch.floor((pts + 0.5) * R).long()[:, None] == coords[None, :, 1:].long()).all(-1))[:, 1]))
    assert empty.sum() == 2 and bool((fb[empty] == 0).all())
    w = torch.randn_like(fa)
    (fa * w).sum().backward()
    (fb * w).sum().backward()
    for (name, p), q in zip(whole.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():  # without gradients: chunked, not checkpointed, same result
        torch.testing.assert_close(chunked(pts, nrm, coords, R), fa.detach(), rtol=1e-12, atol=1e-12)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of fn()."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_chunks_keep_far_less_for_backward():
    pts, nrm, coords = problem(6000)
    whole, chunked = nets(500)
    kept_whole = saved_bytes(lambda: whole(pts, nrm, coords, R))
    kept_chunked = saved_bytes(lambda: chunked(pts, nrm, coords, R))
    assert kept_chunked * 20 < kept_whole, (kept_chunked, kept_whole)


def test_vae_config_passes_the_chunk_size_to_the_encoder():
    tiny = dict(pointnet_channels=16, pointnet_hidden=8, pointnet_blocks=2, encoder_channels=16, encoder_blocks=1,
                decoder_channels=16, decoder_blocks=1, head_channels=8, window_size=4, pos_embedding="window",
                upsample_channels=(8, 8), resolution=32)
    pts, nrm, coords = problem()
    torch.manual_seed(1)
    a = FocusingVAE(VAEConfig(**tiny))
    b = FocusingVAE(VAEConfig(**tiny, pointnet_chunk=200))
    b.load_state_dict(a.state_dict())
    assert b.pointnet.chunk_points == 200 and a.pointnet.chunk_points == 0
    pa, pb = (m.encode(pts.float(), nrm.float(), None, coords, R, batch_size=1) for m in (a, b))
    torch.testing.assert_close(pb.mean.feats, pa.mean.feats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 150])
def test_mean_pooling_before_the_output_layer_is_the_per_point_result(monkeypatch, chunk):
    """With pool = "mean" fc_c runs on the pooled hidden features of each voxel; the reference pools fc_c's
    per-point output (the generic path, reached through an alias of "mean"). Same values and gradients, and
    voxels without points stay 0 (fc_c's bias would otherwise fill them)."""
    pts, nrm, coords = problem()
    net, _ = nets(chunk)
    net.chunk_points = chunk
    torch.nn.init.normal_(net.fc_c.bias, std=0.3)
    results = []
    for pool in ("mean", "per-point mean"):
        monkeypatch.setitem(pointnet._REDUCE, "per-point mean", "mean")
        net.pool = pool
        net.zero_grad()
        p = pts.clone().requires_grad_()
        feats = net(p, nrm, coords, R)
        (feats * torch.linspace(-1, 1, feats.numel(), dtype=feats.dtype).view_as(feats)).sum().backward()
        results.append((feats.detach(), [q.grad.clone() for q in net.parameters()]))
    (fa, ga), (fb, gb) = results
    torch.testing.assert_close(fa, fb, rtol=1e-12, atol=1e-12)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert int((fa.abs().sum(1) == 0).sum()) == 2 and bool((fa.abs().sum(1) > 0).sum() == len(coords) - 2)
