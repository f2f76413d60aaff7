"""Triton kernels of the submanifold convolution: a fused implicit GEMM (the neighbours are gathered tile by tile
inside the kernel, never written out) and the weight gradient. Optional: used by the "triton" conv backend.

Same contracts as the PyTorch "gemm" backend (`focusing.sparse.conv`): feats `[N, C_in]`, weight `[K^3 C_in,
C_out]` (row k C_in + c), neighbour map `[N, K^3]` int64 with N for "absent". fp32 inputs use IEEE fp32 products
(no TF32); fp16 / bf16 accumulate in fp32.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch wheels
    triton = None

_WGRAD_ROWS = 16384  # rows per weight-gradient program; partial sums are added in PyTorch (deterministic)


def triton_available() -> bool:
    return triton is not None


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16 / bf16 operands


if triton is not None:

    @triton.jit(do_not_specialize=["n"])
    def _gather_gemm_kernel(
        x_ptr, nbr_ptr, w_ptr, out_ptr, n, c_in, c_out, k3,
        BLOCK_N: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """out[rows, cos] = sum_k sum_c x[nbr[rows, k], c] w[k c_in + c, cos]; one (row tile, out-channel tile)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cos = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        row_ok = rows < n
        co_ok = cos < c_out
        acc = tl.zeros((BLOCK_N, BLOCK_CO), dtype=tl.float32)
        for k in range(k3):
            src = tl.load(nbr_ptr + rows.to(tl.int64) * k3 + k, mask=row_ok, other=n)
            src_ok = src < n
            for c0 in range(0, c_in, BLOCK_CI):
                cis = c0 + tl.arange(0, BLOCK_CI)
                ci_ok = cis < c_in
                a_mask = src_ok[:, None] & ci_ok[None, :]
                a = tl.load(x_ptr + src[:, None] * c_in + cis[None, :], mask=a_mask, other=0.0)
                b = tl.load(
                    w_ptr + (k * c_in + cis[:, None]).to(tl.int64) * c_out + cos[None, :],
                    mask=ci_ok[:, None] & co_ok[None, :],
                    other=0.0,
                )
                acc += tl.dot(a, b, input_precision=PRECISION)
        out = out_ptr + rows[:, None].to(tl.int64) * c_out + cos[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & co_ok[None, :])

    @triton.jit(do_not_specialize=["n", "rows_per_prog"])
    def _wgrad_kernel(
        x_ptr, nbr_ptr, g_ptr, part_ptr, n, c_in, c_out, k3, rows_per_prog,
        BLOCK_N: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """part[split, k, cis, cos] = sum over the split's rows r of x[nbr[r, k], cis]^T g[r, cos]."""
        n_ci = tl.cdiv(c_in, BLOCK_CI)
        n_co = tl.cdiv(c_out, BLOCK_CO)
        pid = tl.program_id(0)  # (k, ci tile, co tile), co fastest: neighbouring programs share their rows
        k = pid // (n_ci * n_co)
        ci_t = (pid // n_co) % n_ci
        co_t = pid % n_co
        split = tl.program_id(1)
        cis = ci_t * BLOCK_CI + tl.arange(0, BLOCK_CI)
        cos = co_t * BLOCK_CO + tl.arange(0, BLOCK_CO)
        ci_ok = cis < c_in
        co_ok = cos < c_out
        acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
        start = split * rows_per_prog
        for r0 in range(start, start + rows_per_prog, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            row_ok = rows < n
            src = tl.load(nbr_ptr + rows.to(tl.int64) * k3 + k, mask=row_ok, other=n)
            src_ok = src < n
            a = tl.load(x_ptr + src[:, None] * c_in + cis[None, :], mask=src_ok[:, None] & ci_ok[None, :], other=0.0)
            g = tl.load(
                g_ptr + rows[:, None].to(tl.int64) * c_out + cos[None, :],
                mask=src_ok[:, None] & co_ok[None, :],
                other=0.0,
            )
            acc += tl.dot(tl.trans(a), g, input_precision=PRECISION)
        base = (split * k3 + k).to(tl.int64) * c_in * c_out
        out = part_ptr + base + cis[:, None].to(tl.int64) * c_out + cos[None, :]
        tl.store(out, acc, mask=ci_ok[:, None] & co_ok[None, :])


def gather_gemm(feats: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """`[N, C_out]` = sum_k feats[nbr[:, k]] @ weight[k C_in : (k + 1) C_in] (absent neighbours read zeros)."""
    n, c_in = feats.shape
    c_out = weight.shape[1]
    feats, weight, nbr = feats.contiguous(), weight.contiguous(), nbr.contiguous()
    out = feats.new_empty(n, c_out)
    if n == 0:
        return out
    block_ci, block_co = _pow2(c_in, 16, 32), _pow2(c_out, 16, 128)
    grid = (triton.cdiv(n, 64), triton.cdiv(c_out, block_co))
    _gather_gemm_kernel[grid](
        feats, nbr, weight, out, n, c_in, c_out, nbr.shape[1],
        BLOCK_N=64, BLOCK_CI=block_ci, BLOCK_CO=block_co, PRECISION=_precision(feats.dtype), num_warps=4,
    )  # fmt: skip
    return out


def gather_wgrad(feats: torch.Tensor, grad_out: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """`[K^3 C_in, C_out]` float32 weight gradient = sum over voxels of gather(feats)^T grad_out."""
    n, c_in = feats.shape
    c_out, k3 = grad_out.shape[1], nbr.shape[1]
    feats, grad_out, nbr = feats.contiguous(), grad_out.contiguous(), nbr.contiguous()
    splits = max(1, triton.cdiv(n, _WGRAD_ROWS))
    parts = torch.empty(splits, k3, c_in, c_out, dtype=torch.float32, device=feats.device)
    if n == 0:
        return parts.new_zeros(k3 * c_in, c_out)
    block_ci, block_co = _pow2(c_in, 16, 64), _pow2(c_out, 16, 64)
    rows_per_prog = min(_WGRAD_ROWS, triton.cdiv(n, 64) * 64)
    grid = (k3 * triton.cdiv(c_in, block_ci) * triton.cdiv(c_out, block_co), splits)
    _wgrad_kernel[grid](
        feats, nbr, grad_out, parts, n, c_in, c_out, k3, rows_per_prog,
        BLOCK_N=64, BLOCK_CI=block_ci, BLOCK_CO=block_co, PRECISION=_precision(feats.dtype), num_warps=4,
    )  # fmt: skip
    return parts.sum(0).view(k3 * c_in, c_out)
