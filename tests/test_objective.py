"""The VAE training objective: one step end to end (encode, carve + zoom, decode, render, Eq. 7) on CPU."""

import pytest
import torch
from sparse_helpers import single_thread  # noqa: F401 (autouse fixture)

from focusing.data.grid import voxel_corners
from focusing.data.sampling import sample_surface
from focusing.data.tsdf import corner_tsdf
from focusing.data.voxelize import voxel_pyramid, with_batch
from focusing.io import load_mesh, normalize
from focusing.losses import LossConfig
from focusing.models.vae import FocusingVAE, VAEConfig
from focusing.train.objective import ViewConfig, VAEObjective

TINY = dict(pointnet_channels=32, pointnet_hidden=16, pointnet_blocks=2, encoder_channels=32, encoder_blocks=2,
            decoder_channels=32, decoder_blocks=2, head_channels=16, window_size=4, pos_embedding="window",
            upsample_channels=(16, 16), resolution=32)


def make_batch(meshes, R, points=8000):
    """The `focusing.data.online` batch dict for normalised meshes (CPU, no augmentation), with the corner TSDF
    of the R-level voxels (the warm-up target, looked up by the objective)."""
    batch = {"ids": [str(i) for i in range(len(meshes))], "resolution": R, "vertices": [], "faces": []}
    pts, nrm, pb, levels = [], [], [], {R // 4: [], R // 2: [], R: []}
    for b, mesh in enumerate(meshes):
        s = sample_surface(mesh, points, seed=b)
        pts.append(torch.from_numpy(s.points))
        nrm.append(torch.from_numpy(s.normals))
        pb.append(torch.full((points,), b, dtype=torch.int64))
        for r, v in voxel_pyramid(mesh, R).items():
            levels[r].append(with_batch(v, b))
        batch["vertices"].append(torch.from_numpy(mesh.vertices).float())
        batch["faces"].append(torch.from_numpy(mesh.faces))
    batch.update(points=torch.cat(pts), normals=torch.cat(nrm), point_batch=torch.cat(pb),
                 voxels_latent=torch.cat(levels[R // 4]), voxels_mid=torch.cat(levels[R // 2]),
                 voxels=torch.cat(levels[R]))
    corners, _ = voxel_corners(batch["voxels"])
    batch["corners"] = corners
    batch["tsdf"] = torch.cat([corner_tsdf(mesh, corners[corners[:, 0] == b, 1:], R) for b, mesh in enumerate(meshes)])
    return batch


@pytest.fixture(scope="module")
def meshes(data_dir):
    return [normalize(load_mesh(data_dir / name))[0] for name in ("fandisk.ply", "gear_ring.ply")]


def test_one_step_logs_every_term_and_trains_every_part(meshes):
    torch.manual_seed(0)
    model = FocusingVAE(VAEConfig(**TINY)).train()
    views = ViewConfig(image_size=64, zoom_voxels=(20, 40))
    objective = VAEObjective(LossConfig(tsdf_steps=10), views)
    batch = make_batch(meshes, 32)
    out = objective(model, batch, step=0, generator=torch.Generator().manual_seed(0), want_images=True)
    assert torch.isfinite(out.loss)
    for term in ("mask", "depth", "normal", "ssim", "kl", "occupancy", "consistency", "dev", "flex_weights", "tv",
                 "tsdf"):
        assert f"loss/{term}" in out.logs, term
    n_latent = len(batch["voxels_latent"])
    assert out.logs["voxels/decoded_latent"] < n_latent  # carving + zoom decoded a subset
    assert out.logs["voxels/full"] > 0 and out.logs["mesh/faces"] > 0
    assert set(out.images) == {"gt_normal", "pred_normal"} and out.images["gt_normal"].shape == (64, 64, 3)
    out.loss.backward()
    for name in ("pointnet", "encoder", "decoder", "upsample", "head"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()), name
    # after the warm-up the TSDF term is gone
    later = objective(model, batch, step=10, generator=torch.Generator().manual_seed(0))
    assert "loss/tsdf" not in later.logs


@pytest.mark.parametrize("selection,zoom", [("none", False), ("frustum", True), ("carve", False)])
def test_selection_modes_run(meshes, selection, zoom):
    torch.manual_seed(0)
    model = FocusingVAE(VAEConfig(**TINY)).train()
    objective = VAEObjective(LossConfig(), ViewConfig(image_size=48, selection=selection, zoom=zoom,
                                                      zoom_voxels=(20, 40)))
    batch = make_batch(meshes[:1], 32, points=4000)
    out = objective(model, batch, step=0, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.loss)
    if selection == "none":
        assert out.logs["voxels/decoded_latent"] == len(batch["voxels_latent"])


def test_loss_falls_on_one_real_mesh(meshes):
    """A few dozen Adam steps on one mesh (same views every step) lower the Eq. 7 loss clearly."""
    torch.manual_seed(0)
    model = FocusingVAE(VAEConfig(**TINY)).train()
    objective = VAEObjective(LossConfig(), ViewConfig(image_size=48, zoom=False))
    batch = make_batch(meshes[:1], 32, points=4000)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        out = objective(model, batch, step=step, generator=torch.Generator().manual_seed(step % 3))
        optim.zero_grad()
        out.loss.backward()
        optim.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)
