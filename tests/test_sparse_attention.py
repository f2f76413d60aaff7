"""Shifted-window attention: equals dense attention masked to same-window pairs (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F
from sparse_helpers import random_coords, rel_err, single_thread  # noqa: F401 (autouse fixture)

import focusing.sparse.attention as attention
from focusing.sparse import SparseTensor, window_attention, window_partition
from focusing.sparse.attention import resolve_backend


def window_ids(coords: torch.Tensor, window_size: int, shift: int) -> torch.Tensor:
    cells = torch.div(coords[:, 1:].long() + shift, window_size, rounding_mode="floor")
    return torch.cat([coords[:, :1].long(), cells], dim=1)


def dense_reference(q, k, v, coords, window_size, shift):
    """Full attention over all voxels of all batch items, masked to pairs in the same (batch, window)."""
    ids = window_ids(coords, window_size, shift)
    mask = (ids[:, None, :] == ids[None, :, :]).all(-1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def structure(seed=0):
    # two batch items with very different densities: windows of 1 to ~100 voxels, cut by the grid border
    dense = random_coords(1, 13, 0.35, seed=seed)
    sparse = random_coords(1, 19, 0.04, seed=seed + 1)
    sparse[:, 0] = 1
    return SparseTensor(torch.cat([dense, sparse]), torch.zeros(len(dense) + len(sparse), 0), batch_size=2)


def test_partition_groups_by_batch_and_window():
    x = structure()
    part = window_partition(x, 8, 4)
    assert window_partition(x, 8, 4) is part  # cached on the structure
    ids = window_ids(x.coords, 8, 4)[part.order]
    starts = part.cu_seqlens[:-1].long()
    for w, (s, n) in enumerate(zip(starts.tolist(), part.lengths.tolist())):
        assert (ids[s : s + n] == ids[s]).all()  # one window, one batch item
        if w:
            assert not torch.equal(ids[s - 1], ids[s])
    assert part.cu_seqlens[-1] == len(x) and part.max_len == part.lengths.max()
    assert torch.equal(part.order[part.inverse], torch.arange(len(x)))
    assert part.lengths.min() == 1 and part.max_len > 50  # irregular windows


@pytest.mark.parametrize("shift", [0, 4])
def test_window_attention_equals_dense_masked_attention(shift, monkeypatch):
    monkeypatch.setattr(attention, "_SCORES_BUDGET", 2**16)  # several SDPA calls per bucket too
    x = structure(seed=shift)
    g = torch.Generator().manual_seed(shift)
    q, k, v = (torch.randn(len(x), 3, 16, generator=g, requires_grad=True) for _ in range(3))
    part = window_partition(x, 8, shift)
    out = window_attention(q, k, v, part, backend="sdpa")
    ref = dense_reference(q, k, v, x.coords, 8, shift)
    assert rel_err(out, ref) < 1e-5
    grad = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert rel_err(a, b) < 1e-5


def test_window_attention_gradcheck_float64():
    coords = random_coords(2, 6, 0.2, seed=3)
    x = SparseTensor(coords, torch.zeros(len(coords), 0))
    part = window_partition(x, 4, 2)
    q, k, v = (torch.randn(len(x), 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: window_attention(a, b, c, part, backend="sdpa"), (q, k, v), fast_mode=True
    )


def test_backend_selection(monkeypatch):
    q = torch.randn(4, 2, 8)
    assert resolve_backend(None, q) == "sdpa"
    monkeypatch.setenv("FOCUSING_ATTN_BACKEND", "varlen")
    with pytest.raises(RuntimeError):
        resolve_backend(None, q)
    assert resolve_backend("sdpa", q) == "sdpa"
    with pytest.raises(ValueError):
        resolve_backend("flash", q)


@pytest.mark.gpu
@pytest.mark.parametrize("shift", [0, 4])
def test_cuda_backends_match_cpu_reference(shift):
    x = structure(seed=shift)
    g = torch.Generator().manual_seed(shift)
    q, k, v = (torch.randn(len(x), 4, 64, generator=g) for _ in range(3))
    grad = torch.randn(q.shape, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = window_attention(*leaves, window_partition(x, 8, shift), backend="sdpa")
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    x_cuda = SparseTensor(x.coords.cuda(), x.feats.cuda(), batch_size=2)
    part = window_partition(x_cuda, 8, shift)
    for backend, dtype, tol in [("sdpa", torch.float32, 1e-5), ("varlen", torch.bfloat16, 2e-2)]:
        leaves = [t.cuda().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = window_attention(*leaves, part, backend=backend)
        assert out.dtype == dtype and rel_err(out.float().cpu(), ref) < tol, backend
        grads = torch.autograd.grad(out, leaves, grad.cuda().to(dtype))
        for a, b in zip(grads, ref_grads):
            assert rel_err(a.float().cpu(), b) < tol * 2, backend
    assert resolve_backend(None, leaves[0]) == "varlen"


def test_qk_norm_is_the_rmsnorm_and_takes_the_fused_kernel_under_bf16():
    import warnings

    from focusing.models.transformer import qk_norm

    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(7, 4, 16)
    assert torch.equal(qk_norm(norm, x), norm(x))
    # gradients to the input and the weight, float64
    norm64 = torch.nn.RMSNorm(16, eps=1e-6).double()
    x64 = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: qk_norm(norm64, a) * w.sum(), (x64, norm64.weight))
    # a bf16 input with the fp32 weight: the fused path (no dtype-mismatch fallback), bf16 out, the same values
    xb = x.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = qk_norm(norm, xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), norm(xb.float()), atol=2e-2, rtol=2e-2)
