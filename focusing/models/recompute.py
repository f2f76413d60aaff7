"""Hand-written recomputation for the backward pass: two checkpoints that hold less than `torch.utils.checkpoint`.

- `host_checkpoint(run, feats, params)`: the input waits in (pinned) host memory instead of on the device. Over
  a long run of transformer blocks on millions of voxels those inputs are what fills the device (B at 2048^3 on a
  many-part mesh: 3.5M voxels x 768 fp32 channels = 10.9 GB per checkpointed input).
- `checkpoint_row_chunks(fn, feats, chunks, params)`: a row-wise function applied to disjoint sets of rows (a
  transformer block on runs of whole windows), recomputed and back-propagated one chunk at a time. The backward
  holds the input, the output's gradient and the input's gradient, `[N, C]` each, plus one chunk's
  intermediates; the chunks' rows are gathered and scattered in place, with no window-order copy of the input.

Both compute exactly what the plain forward computes: the backward recomputes under the forward's autocast state.
"""

from __future__ import annotations

import torch
from torch import nn


def _autocast_of(t: torch.Tensor):
    """A callable that re-enters, in the backward pass, the autocast state the forward ran under on t's device."""
    device_type = t.device.type
    enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    return lambda: torch.autocast(device_type, dtype=dtype, enabled=enabled)


def to_host(feats: torch.Tensor) -> torch.Tensor:
    """A host copy of feats (pinned when feats is on CUDA; the copy is ordered on the stream before any later
    reuse of feats' memory, so feats may be freed at once)."""
    try:
        host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=feats.is_cuda)
    except RuntimeError as exc:  # the host's (pinned) memory is full: an out-of-memory like the device's
        gib = feats.numel() * feats.element_size() / 2**30
        raise torch.OutOfMemoryError(f"out of pinned host memory for a {gib:.1f} GiB block input: {exc}") from exc
    return host.copy_(feats, non_blocking=True)


def _grads(out, inputs: list, params: tuple, grad) -> list:
    """Gradients of `out` (weighted by grad) for inputs + params; None for a parameter that needs none."""
    wanted = [p for p in params if p.requires_grad]
    got = iter(torch.autograd.grad(out, [*inputs, *wanted], grad, allow_unused=True))
    return [next(got) for _ in inputs] + [next(got) if p.requires_grad else None for p in params]


class _HostCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, feats: torch.Tensor, *params: nn.Parameter) -> torch.Tensor:
        ctx.run, ctx.device, ctx.params, ctx.autocast = run, feats.device, params, _autocast_of(feats)
        ctx.host = to_host(feats)
        with torch.no_grad():
            return run(feats)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        feats = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        with torch.enable_grad(), ctx.autocast():
            out = ctx.run(feats)
        return (None, *_grads(out, [feats], ctx.params, grad))


def host_checkpoint(run, feats: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """`run(feats)` (feats `[N, C]` -> `[N, C']`) checkpointed with its input kept in host memory until the backward.

    params: the parameters `run` uses (their gradients flow through the checkpoint). Without gradients this is
    `run(feats)`.
    """
    if not torch.is_grad_enabled():
        return run(feats)
    return _HostCheckpoint.apply(run, feats, *params)


def _run_row_chunks(fn, feats: torch.Tensor, chunks: list) -> torch.Tensor:
    out = None
    for rows, arg in chunks:
        y = fn(feats.index_select(0, rows), arg)
        if out is None:
            out = y.new_empty((len(feats), *y.shape[1:]))
        out.index_copy_(0, rows, y)
    return out


class _RowChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, chunks, feats: torch.Tensor, *params: nn.Parameter) -> torch.Tensor:
        ctx.fn, ctx.chunks, ctx.params, ctx.autocast = fn, chunks, params, _autocast_of(feats)
        ctx.save_for_backward(feats)
        with torch.no_grad():
            return _run_row_chunks(fn, feats, chunks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (feats,) = ctx.saved_tensors
        feats_grad = torch.empty_like(feats) if ctx.needs_input_grad[2] else None
        param_grads: list = [None] * len(ctx.params)
        for rows, arg in ctx.chunks:
            x = feats.index_select(0, rows).requires_grad_(feats_grad is not None)
            with torch.enable_grad(), ctx.autocast():
                y = ctx.fn(x, arg)
            inputs = [x] if feats_grad is not None else []
            got = _grads(y, inputs, ctx.params, grad.index_select(0, rows))
            if feats_grad is not None:
                feats_grad.index_copy_(0, rows, got.pop(0))
            param_grads = [g if a is None else a if g is None else a.add_(g) for a, g in zip(param_grads, got)]
        return (None, None, feats_grad, *param_grads)


def checkpoint_row_chunks(fn, feats: torch.Tensor, chunks: list, params: list[nn.Parameter]) -> torch.Tensor:
    """Rows of `fn` over disjoint chunks: out[rows] = fn(feats[rows], arg) for each (rows, arg) in chunks.

    feats `[N, C]`; chunks: (rows `[n_i]` int64, arg) pairs whose rows together are 0..N-1, each once; fn maps
    `[n_i, C]` -> `[n_i, C']` and must treat each chunk independently of the others. params: the parameters fn
    uses. With gradients, only feats is kept for the backward, which recomputes and back-propagates one chunk at
    a time. Returns `[N, C']`.
    """
    if not torch.is_grad_enabled():
        return _run_row_chunks(fn, feats, chunks)
    return _RowChunks.apply(fn, chunks, feats, *params)
