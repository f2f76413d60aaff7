"""Submanifold sparse 3D convolution: outputs live on the input voxels, inputs are read from the k^3 neighbours.

out[i] = bias + sum_k W_k^T feats[nbr(i, k)], where nbr(i, k) is the voxel at coords[i] + offset_k in the same
batch item (skipped when absent) and offset_k = (ix, iy, iz) * dilation - (k // 2) * dilation with
k = (ix * K + iy) * K + iz (z fastest). With the weight stored as `[C_out, K, K, K, C_in]` (spconv's layout),
this is exactly `torch.nn.functional.conv3d` on the dense grid (weight permuted to `[C_out, C_in, K, K, K]`,
padding K // 2) read back at the active voxels.

Backends (argument `backend`, else the env var FOCUSING_CONV_BACKEND, else "auto": "triton" on CUDA (falling back to
"gemm" without triton), "scatter" on CPU, where FLOPs dominate and "gemm" pays for the absent neighbours: about half of the 27 on a surface):
- "gemm": implicit GEMM. Gather the K^3 neighbours of a chunk of voxels into `[n, K^3 C_in]` (missing ones read
  a zero row) and do one matmul. The backward is the same kind of product: the input gradient gathers the
  output gradient through the same neighbour map with the kernel flipped (a submanifold map is symmetric), so no
  scatter-add is needed anywhere. Chunks bound the memory of the gathered block (`FOCUSING_CONV_CHUNK_MB`).
- "triton": the same implicit GEMM as fused Triton kernels (`focusing.sparse.triton_conv`): the neighbours are
  gathered tile by tile inside the kernel, nothing is materialised; fp16 / bf16 / fp32 on CUDA.
- "scatter": the reference: per kernel offset, gather the inputs that have that neighbour, matmul, scatter-add
  (`index_add_`) into the outputs; plain autograd.
- "spconv": spconv's `SubMConv3d` with our weights, when spconv is installed (a test reference on CPU; the
  `spconv-cu*` wheels on GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from focusing.data.grid import linearize
from focusing.sparse.tensor import SparseTensor

BACKENDS = ("gemm", "triton", "scatter", "spconv")


def kernel_offsets(kernel_size: int, dilation: int = 1, device=None) -> torch.Tensor:
    """`[K^3, 3]` int32 offsets (dx, dy, dz) of kernel index k = (ix * K + iy) * K + iz."""
    r = torch.arange(kernel_size, dtype=torch.int32, device=device) - kernel_size // 2
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
    return grid * dilation


def neighbor_map(x: SparseTensor, kernel_size: int = 3, dilation: int = 1) -> torch.Tensor:
    """`[N, K^3]` int64: row of the voxel at coords[i] + offset_k (same batch item), or N where there is none.

    Built once per structure with a sort and `searchsorted` on linearised keys, and cached on `x.cache`.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"submanifold convolution needs an odd kernel size, got {kernel_size}")

    def compute() -> torch.Tensor:
        n = len(x)
        if n == 0:
            return torch.zeros(0, kernel_size**3, dtype=torch.int64, device=x.device)
        pad = (kernel_size // 2) * dilation
        extent = x.spatial_extent + 2 * pad  # padded coords and their neighbours stay inside [0, extent)
        coords = x.coords.clone()
        coords[:, 1:] += pad
        keys = linearize(coords, extent)
        sorted_keys, order = torch.sort(keys)
        off = kernel_offsets(kernel_size, dilation, x.device).to(torch.int64)
        off_keys = (off[:, 0] * extent + off[:, 1]) * extent + off[:, 2]
        query = keys[:, None] + off_keys[None, :]  # [N, K^3]
        pos = torch.searchsorted(sorted_keys, query).clamp_(max=n - 1)
        found = sorted_keys[pos] == query
        return torch.where(found, order[pos], torch.full_like(pos, n))

    return x.cache.get_or_compute(("neighbor_map", kernel_size, dilation), compute)


def _chunk_rows(n: int, row_bytes: int) -> int:
    budget = float(os.environ.get("FOCUSING_CONV_CHUNK_MB", "512")) * 2**20
    return max(1, min(n, int(budget // max(row_bytes, 1))))


def _gather_gemm(feats: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """`[N, C_out]` = sum_k feats[nbr[:, k]] @ weight[k]; feats `[N, C_in]`, weight `[K^3 C_in, C_out]`, missing = N."""
    n, c = feats.shape
    k3 = nbr.shape[1]
    padded = torch.cat([feats, feats.new_zeros(1, c)])
    out = feats.new_empty(n, weight.shape[1])
    step = _chunk_rows(n, k3 * c * feats.element_size())
    for s in range(0, n, step):
        rows = nbr[s : s + step]
        torch.mm(padded.index_select(0, rows.reshape(-1)).view(len(rows), k3 * c), weight, out=out[s : s + step])
    return out


def _gather_wgrad(feats: torch.Tensor, grad_out: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """`[K^3 C_in, C_out]` float32 = sum over voxels of gather(feats)^T grad_out (the weight gradient)."""
    n, c = feats.shape
    k3 = nbr.shape[1]
    padded = torch.cat([feats, feats.new_zeros(1, c)])
    grad_w = torch.zeros(k3 * c, grad_out.shape[1], dtype=torch.float32, device=feats.device)
    step = _chunk_rows(n, k3 * c * feats.element_size())
    for s in range(0, n, step):
        rows = nbr[s : s + step]
        gathered = padded.index_select(0, rows.reshape(-1)).view(len(rows), k3 * c)
        grad_w += (gathered.t() @ grad_out[s : s + step]).float()
    return grad_w


def _implicit_gemm_ops(backend: str):
    """(gather_gemm, gather_wgrad) of the PyTorch ("gemm") or the Triton ("triton") implementation."""
    if backend == "triton":
        from focusing.sparse import triton_conv

        return triton_conv.gather_gemm, triton_conv.gather_wgrad
    return _gather_gemm, _gather_wgrad


class _ImplicitGemmConv(torch.autograd.Function):
    """feats `[N, C_in]`, weight `[K^3, C_in, C_out]`, nbr `[N, K^3]` (symmetric submanifold map) -> `[N, C_out]`."""

    @staticmethod
    def forward(ctx, feats, weight, nbr, backend):
        k3, c_in, c_out = weight.shape
        ctx.save_for_backward(feats, weight, nbr)
        ctx.backend = backend
        return _implicit_gemm_ops(backend)[0](feats, weight.reshape(k3 * c_in, c_out), nbr)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        feats, weight, nbr = ctx.saved_tensors
        gemm, wgrad = _implicit_gemm_ops(ctx.backend)
        k3, c_in, c_out = weight.shape
        grad_out = grad_out.contiguous()
        grad_feats = grad_weight = None
        if ctx.needs_input_grad[0]:
            # voxel j gets grad_out[i] W_k^T from each i with nbr[i, k] = j; the map is symmetric
            # (nbr[i, k] = j <=> nbr[j, K^3 - 1 - k] = i), so this is a gather through nbr with the kernel flipped
            flipped = weight.flip(0).transpose(1, 2).reshape(k3 * c_out, c_in)
            grad_feats = gemm(grad_out, flipped, nbr)
        if ctx.needs_input_grad[1]:
            grad_weight = wgrad(feats, grad_out, nbr).view(k3, c_in, c_out).to(weight.dtype)
        return grad_feats, grad_weight, None, None


def _conv_implicit_gemm(x: SparseTensor, weight: torch.Tensor, dilation: int, backend: str) -> torch.Tensor:
    k = weight.shape[1]
    w = weight.permute(1, 2, 3, 4, 0).reshape(k**3, weight.shape[4], weight.shape[0])
    return _ImplicitGemmConv.apply(x.feats, w, neighbor_map(x, k, dilation), backend)


def _conv_scatter(x: SparseTensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    k = weight.shape[1]
    nbr = neighbor_map(x, k, dilation)

    def pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for j in range(k**3):
            rows = torch.nonzero(nbr[:, j] < len(x)).squeeze(1)
            out.append((rows, nbr[rows, j]))
        return out

    w = weight.permute(1, 2, 3, 4, 0).reshape(k**3, weight.shape[4], weight.shape[0])
    out = None
    for j, (rows, src) in enumerate(x.cache.get_or_compute(("conv_pairs", k, dilation), pairs)):
        y = x.feats.index_select(0, src) @ w[j]
        out = y.new_zeros(len(x), w.shape[2]) if out is None else out
        out.index_add_(0, rows, y)
    return out


def spconv_available() -> bool:
    try:
        import spconv.pytorch  # noqa: F401
    except Exception:  # a wheel built for another torch/CUDA may fail with any error at import
        return False
    return True


def _conv_spconv(x: SparseTensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    import spconv.pytorch as spconv

    c_out, k, _, _, c_in = weight.shape
    key = ("spconv_indices", k, dilation)
    sp_x = spconv.SparseConvTensor(x.feats.contiguous(), x.coords.contiguous(), [x.spatial_extent] * 3, x.batch_size)
    if key in x.cache:
        sp_x.indice_dict = x.cache[key]
    layer = _stateless_spconv_layer(c_in, c_out, k, dilation)
    layer.weight = weight
    try:
        y = layer(sp_x)
    finally:
        del layer.weight
    x.cache[key] = y.indice_dict
    return y.features


@functools.cache
def _stateless_spconv_layer(c_in: int, c_out: int, k: int, dilation: int):
    """An spconv SubMConv3d without its own weight: ours is set on it for each call."""
    import spconv.pytorch as spconv

    layer = spconv.SubMConv3d(c_in, c_out, k, dilation=dilation, bias=False, indice_key=f"subm{k}d{dilation}")
    del layer.weight
    return layer


def resolve_backend(backend: str | None, device: torch.device | str = "cpu") -> str:
    """The conv backend for tensors on `device`: `backend`, else FOCUSING_CONV_BACKEND, else automatic."""
    name = (backend or os.environ.get("FOCUSING_CONV_BACKEND") or "auto").lower()
    if name == "auto":
        if torch.device(device).type != "cuda":
            return "scatter"
        # H100, 1M voxels x 192 ch, bf16 fwd+bwd: triton 26 ms (= spconv-cu126 fp16), gemm 70 ms (BENCHMARKS.md)
        return "triton" if importlib.util.find_spec("triton") is not None else "gemm"
    if name not in BACKENDS:
        raise ValueError(f"unknown sparse conv backend {name!r}; choose from {', '.join(BACKENDS)} or auto")
    if name == "spconv" and not spconv_available():
        raise RuntimeError("sparse conv backend 'spconv' requested but spconv cannot be imported")
    if name == "triton" and importlib.util.find_spec("triton") is None:
        raise RuntimeError("sparse conv backend 'triton' requested but triton is not installed")
    return name


def submanifold_conv3d(
    x: SparseTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    dilation: int = 1,
    backend: str | None = None,
) -> SparseTensor:
    """Submanifold convolution of `x` (feats `[N, C_in]`) with weight `[C_out, K, K, K, C_in]` -> feats `[N, C_out]`.

    Under autocast the product runs in the autocast dtype (fp32 weight gradients are accumulated in fp32).
    """
    if x.feats.dim() != 2 or x.feats.shape[1] != weight.shape[4]:
        raise ValueError(f"feats {tuple(x.feats.shape)} do not match weight {tuple(weight.shape)}")
    feats, device_type = x.feats, x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        feats, weight = feats.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    else:
        weight = weight.to(feats.dtype)
    name = resolve_backend(backend, x.device)
    with torch.autocast(device_type, enabled=False):
        x_in = x.replace(feats)
        if name in ("gemm", "triton"):
            out = _conv_implicit_gemm(x_in, weight, dilation, name)
        elif name == "scatter":
            out = _conv_scatter(x_in, weight, dilation)
        else:
            out = _conv_spconv(x_in, weight, dilation)
        if bias is not None:
            out = out + bias
    return x.replace(out)


class SubMConv3d(nn.Module):
    """Submanifold sparse convolution layer; weight `[C_out, K, K, K, C_in]`, bias `[C_out]`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        dilation: int = 1,
        bias: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation, self.backend = kernel_size, dilation, backend
        self.weight = nn.Parameter(torch.empty(out_channels, kernel_size, kernel_size, kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the same scheme as nn.Conv3d (kaiming-uniform with a = sqrt(5)); fan_in = C_in K^3
        fan_in = self.in_channels * self.kernel_size**3
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return submanifold_conv3d(x, self.weight, self.bias, dilation=self.dilation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, dilation={self.dilation}"
