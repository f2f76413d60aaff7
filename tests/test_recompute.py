"""The hand-written checkpoints of `focusing.models.recompute`: numerical gradients (gradcheck, float64) for the
input and the parameters, the plain function's values, and the no-gradient path."""

import pytest
import torch
import torch.nn.functional as F

from focusing.models.recompute import checkpoint_row_chunks, host_checkpoint


def params(seed=0):
    """Weights of a 5 -> 7 -> 3 MLP, float64 leaves."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (7,), (3, 7), (3,)]
    return [torch.randn(s, dtype=torch.float64, generator=g).requires_grad_() for s in shapes]


def mlp(h, w1, b1, w2, b2):
    return F.linear(torch.tanh(F.linear(h, w1, b1)), w2, b2)


def test_host_checkpoint_gradients_match_finite_differences():
    ps = params()
    feats = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)

    def f(x, *p):
        return host_checkpoint(lambda h: mlp(h, *p).square(), x, list(p))

    assert torch.autograd.gradcheck(f, (feats, *ps))
    torch.testing.assert_close(f(feats, *ps), mlp(feats, *ps).square(), rtol=0, atol=0)
    with torch.no_grad():
        assert f(feats, *ps).grad_fn is None


def test_row_chunks_equal_the_plain_function_and_match_finite_differences():
    ps = params(1)
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(13, generator=g)  # chunks of scattered rows, as windows are in voxel order
    chunks = [(perm[:4], 2.0), (perm[4:5], -1.0), (perm[5:], 0.5)]  # each with its own argument (a scale)
    feats = torch.randn(13, 5, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, *p):
        return checkpoint_row_chunks(lambda rows, scale: mlp(rows, *p) * scale, x, chunks, list(p)).sin()

    expected = mlp(feats, *ps).detach().clone()
    for rows, scale in chunks:
        expected[rows] *= scale
    torch.testing.assert_close(f(feats, *ps), expected.sin(), rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(f, (feats, *ps))


def test_row_chunks_without_an_input_gradient_still_give_the_parameters_theirs():
    ps = params(3)
    feats = torch.randn(9, 5, dtype=torch.float64)  # no requires_grad: a frozen input
    chunks = [(torch.arange(0, 4), None), (torch.arange(4, 9), None)]
    got = torch.autograd.grad(checkpoint_row_chunks(lambda r, _: mlp(r, *ps), feats, chunks, ps).sum(), ps)
    want = torch.autograd.grad(mlp(feats, *ps).sum(), ps)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_host_memory_exhaustion_is_an_out_of_memory_error(monkeypatch):
    """A failed (pinned) host allocation surfaces as torch.OutOfMemoryError naming the host, so the trainer and
    the benchmark treat it like the device's out-of-memory (B at 2048 offloading every block: 12 x 10.9 GB)."""
    from focusing.models import recompute

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(recompute.torch, "empty", fail)
    with pytest.raises(torch.OutOfMemoryError, match="pinned host memory"):
        recompute.to_host(torch.ones(4, 2))
