"""Submanifold sparse convolution: equals dense conv3d at the active voxels (values and gradients)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sparse_helpers import random_sparse, rel_err, single_thread  # noqa: F401 (autouse fixture)

from focusing.sparse import SparseTensor, SubMConv3d, neighbor_map, submanifold_conv3d
from focusing.sparse.conv import kernel_offsets, resolve_backend, spconv_available


def dense_reference(x: SparseTensor, weight: torch.Tensor, bias, dilation: int) -> torch.Tensor:
    """Scatter x into a dense grid, F.conv3d (weight [Co, K, K, K, Ci] -> [Co, Ci, K, K, K]), read the voxels."""
    b, xx, yy, zz = x.coords.long().unbind(1)
    e = x.spatial_extent
    dense = x.feats.new_zeros(x.batch_size, e, e, e, x.feats.shape[1])
    dense = dense.index_put((b, xx, yy, zz), x.feats)
    k = weight.shape[1]
    out = F.conv3d(dense.permute(0, 4, 1, 2, 3), weight.permute(0, 4, 1, 2, 3), bias, padding=dilation * (k // 2),
                   dilation=dilation)
    return out.permute(0, 2, 3, 4, 1)[b, xx, yy, zz]


def test_neighbor_map_brute_force():
    x = random_sparse(2, 6, 0.3, 1, seed=3)
    nbr = neighbor_map(x, 3, 1)
    assert neighbor_map(x, 3, 1) is nbr  # cached per structure
    table = {tuple(c): i for i, c in enumerate(x.coords.tolist())}
    off = kernel_offsets(3).tolist()
    for i, c in enumerate(x.coords.tolist()):
        for k, o in enumerate(off):
            j = table.get((c[0], c[1] + o[0], c[2] + o[1], c[3] + o[2]), len(x))
            assert nbr[i, k].item() == j


@pytest.mark.parametrize("backend", ["gemm", "scatter"])
@pytest.mark.parametrize("kernel_size,dilation", [(3, 1), (3, 2), (5, 1)])
def test_conv_equals_dense_conv3d(backend, kernel_size, dilation):
    x = random_sparse(2, 9, 0.25, 5, seed=kernel_size + dilation)
    feats = x.feats.clone().requires_grad_(True)
    weight = torch.randn(6, kernel_size, kernel_size, kernel_size, 5, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    out = submanifold_conv3d(x.replace(feats), weight, bias, dilation=dilation, backend=backend).feats
    ref = dense_reference(x.replace(feats), weight, bias, dilation)
    assert rel_err(out, ref) < 1e-5
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (feats, weight, bias), grad)
    want = torch.autograd.grad(ref, (feats, weight, bias), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_gemm_gradcheck_float64():
    x = random_sparse(1, 4, 0.4, 2, seed=7, dtype=torch.float64)
    weight = torch.randn(3, 3, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    feats = x.feats.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f, w: submanifold_conv3d(x.replace(f), w, backend="gemm").feats, (feats, weight), fast_mode=True
    )


def test_gemm_chunked_equals_unchunked(monkeypatch):
    x = random_sparse(2, 8, 0.3, 4, seed=11)
    layer = SubMConv3d(4, 3, backend="gemm")
    feats = x.feats.clone().requires_grad_(True)
    whole = layer(x.replace(feats)).feats
    g_whole = torch.autograd.grad(whole.square().sum(), (feats, layer.weight))
    monkeypatch.setenv("FOCUSING_CONV_CHUNK_MB", str(4 * 27 * 4 * 7 / 2**20))  # 7 voxels per chunk
    chunked = layer(x.replace(feats)).feats
    g_chunked = torch.autograd.grad(chunked.square().sum(), (feats, layer.weight))
    assert rel_err(chunked, whole) < 1e-6
    for a, b in zip(g_chunked, g_whole):
        assert rel_err(a, b) < 1e-6


def test_backend_selection(monkeypatch):
    fast = "triton" if importlib.util.find_spec("triton") is not None else "gemm"
    assert resolve_backend(None, "cpu") == "scatter" and resolve_backend(None, "cuda") == fast
    monkeypatch.setenv("FOCUSING_CONV_BACKEND", "gemm")
    assert resolve_backend(None, "cpu") == "gemm"
    assert resolve_backend("scatter", "cuda") == "scatter"
    with pytest.raises(ValueError):
        resolve_backend("nope")


@pytest.mark.parametrize("backend", ["gemm", "scatter"])
def test_autocast_bfloat16_runs_in_bfloat16(backend):
    x = random_sparse(1, 8, 0.3, 8, seed=2)
    layer = SubMConv3d(8, 8, backend=backend)
    ref = layer(x).feats
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x).feats
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


@pytest.mark.skipif(not spconv_available(), reason="spconv not installed")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_spconv_backend_matches(device):
    x = random_sparse(2, 9, 0.25, 4, seed=13)
    x = SparseTensor(x.coords.to(device), x.feats.to(device), batch_size=2)
    layer = SubMConv3d(4, 5).to(device)
    feats = x.feats.clone().requires_grad_(True)
    ours = layer(x.replace(feats)).feats
    layer.backend = "spconv"
    assert torch.get_num_threads() == 1  # spconv 2.3 CPU kernels race with >1 thread (wrong in ~1 of 20 calls)
    theirs = layer(x.replace(feats)).feats
    assert rel_err(theirs, ours) < 1e-5
    if device == "cpu":
        return  # spconv's CPU build has no backward without CUDA torch (it asks for a CUDA stream)
    g = torch.randn_like(ours)
    got = torch.autograd.grad(theirs, (feats, layer.weight), g)
    for a, b in zip(got, torch.autograd.grad(ours, (feats, layer.weight), g)):
        assert rel_err(a, b) < 1e-5


TRITON_PARITY = """
import sys, torch
sys.path.insert(0, "tests")
from sparse_helpers import random_sparse, rel_err
from focusing.sparse import submanifold_conv3d
for c_in, c_out, k in [(5, 7, 3), (20, 40, 3), (3, 2, 5)]:
    x = random_sparse(2, 6, 0.3, c_in, seed=c_in)
    w = torch.randn(c_out, k, k, k, c_in)
    leaves = [(x.feats.clone().requires_grad_(True), w.clone().requires_grad_(True)) for _ in range(2)]
    outs = [submanifold_conv3d(x.replace(f), w_, backend=b).feats for (f, w_), b in zip(leaves, ["triton", "gemm"])]
    assert rel_err(outs[0], outs[1]) < 1e-5
    g = torch.randn_like(outs[0])
    for a, b in zip(torch.autograd.grad(outs[0], leaves[0], g), torch.autograd.grad(outs[1], leaves[1], g)):
        assert rel_err(a, b) < 1e-5
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                    reason="triton not installed, or CUDA runs the kernels for real (gpu tests)")
def test_triton_kernels_in_interpreter_match_gemm():
    """The Triton kernels, run by Triton's CPU interpreter (fp32), equal the PyTorch implicit GEMM."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", TRITON_PARITY], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["gemm", "triton", "scatter"])
def test_cuda_matches_cpu(backend, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x = random_sparse(2, 16, 0.2, 32, seed=17)
    layer = SubMConv3d(32, 48)
    feats = x.feats.clone().requires_grad_(True)
    ref = layer(x.replace(feats)).feats
    ref_grads = torch.autograd.grad(ref.square().sum(), (feats, layer.weight))
    layer_cuda = SubMConv3d(32, 48, backend=backend).cuda()
    layer_cuda.load_state_dict(layer.state_dict())
    feats_cuda = feats.detach().cuda().requires_grad_(True)
    x_cuda = SparseTensor(x.coords.cuda(), feats_cuda, batch_size=2)
    out = layer_cuda(x_cuda).feats
    grads = torch.autograd.grad(out.square().sum(), (feats_cuda, layer_cuda.weight))
    assert rel_err(out.cpu(), ref) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert rel_err(a.cpu(), b) < 1e-5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_bf16 = layer_cuda(x_cuda).feats
    assert out_bf16.dtype == torch.bfloat16 and rel_err(out_bf16.float().cpu(), ref) < 2e-2
