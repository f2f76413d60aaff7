"""Differentiable row gathers whose backward is a gather too (no scatter-add: no atomics, deterministic).

`x.index_select(0, index)` back-propagates with a zero fill plus a scatter-add over all rows of x, and `x[mask]`
with an accumulating index_put (on CUDA a sort of the indices). When every row of x is read at most once (a
permutation, a permutation plus padding rows whose gradient is zero, or a boolean selection), the gradient of
row r is simply the gradient at the one position that read it, or zero: another gather.
"""

from __future__ import annotations

import torch


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, back_index, zero_pad):
        ctx.save_for_backward(back_index)
        ctx.zero_pad = zero_pad
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back_index,) = ctx.saved_tensors
        if ctx.zero_pad:
            grad = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        return grad.index_select(0, back_index), None, None, None


def gather_rows(
    x: torch.Tensor, index: torch.Tensor, back_index: torch.Tensor, zero_pad: bool = False
) -> torch.Tensor:
    """`x[index]` `[P, ...]` for x `[T, ...]`, where row r of x is read exactly once, at position back_index[r].

    Positions of `index` that read no row of their own (padding) must receive zero gradient: it is dropped.
    With `zero_pad`, back_index[r] may be P: row r then gets a zero gradient (rows that are not read at all).
    """
    return _GatherRows.apply(x, index, back_index, zero_pad)


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`x[perm]` (rows) for a permutation `perm` whose inverse is `inverse` (inverse[perm[i]] = i)."""
    return _GatherRows.apply(x, perm, inverse, False)


def select_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x[mask]` `[K, ...]` for x `[T, ...]` and a bool mask `[T]`; the backward gathers instead of index_put."""
    index = mask.nonzero().squeeze(1)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.index_select(0, index)
    back = torch.where(mask, torch.cumsum(mask, 0) - 1, len(index))  # kept position, or K: zero gradient
    return gather_rows(x, index, back, zero_pad=True)
