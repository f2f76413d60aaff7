"""Transformer blocks in checkpointed chunks of whole windows (`chunk_tokens`, VAEConfig.block_chunk) and runs of
blocks checkpointed as one (`block_group`): the same values and gradients as the plain blocks, and less memory
held for and during the backward pass."""

import weakref

import pytest
import torch
from sparse_helpers import random_coords, single_thread  # noqa: F401 (autouse fixture)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from focusing.models.transformer import SparseTransformer, SparseTransformerBlock
from focusing.models.vae import FocusingVAE, VAEConfig
from focusing.sparse import SparseTensor, window_partition
from focusing.sparse.attention import window_chunks

CHUNK = 50  # voxels per chunk: full windows of 4^3 hold up to 64, so some windows are a chunk alone


def structure(seed=0, dtype=torch.float64, extent=13):
    """Two batch items, one dense (windows of up to 64 voxels, several larger than CHUNK) and one sparse."""
    dense = random_coords(1, extent, 0.85, seed=seed)
    sparse = random_coords(1, 19, 0.05, seed=seed + 1)
    sparse[:, 0] = 1
    coords = torch.cat([dense, sparse])
    g = torch.Generator().manual_seed(seed + 2)
    return SparseTensor(coords, torch.randn(len(coords), 16, generator=g, dtype=dtype), batch_size=2)


def blocks(shift, chunk=CHUNK, use_checkpoint=False):
    torch.manual_seed(0)
    whole = SparseTransformerBlock(16, 2, window_size=4, shift=shift, qk_rms_norm=True).double()
    for p in whole.parameters():  # LayerNorm / RMSNorm start at 1 and 0: give every weight a value
        torch.nn.init.normal_(p, mean=0.1, std=0.3)
    chunked = SparseTransformerBlock(16, 2, window_size=4, shift=shift, qk_rms_norm=True, chunk_tokens=chunk,
                                     use_checkpoint=use_checkpoint).double()
    chunked.load_state_dict(whole.state_dict())
    return whole, chunked


def forward_backward(model, x: SparseTensor, autocast: bool = False):
    """(output, input gradient, parameter gradients) of `model` on x with the loss sum(out^2); bf16 CPU autocast
    if asked."""
    feats = x.feats.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x.replace(feats)).feats
    (out.float() if autocast else out).square().sum().backward()
    return out.detach(), feats.grad, [p.grad for p in model.parameters()]


def assert_same_results(a, b, out_tol=1e-12, rtol=1e-10, atol=1e-12):
    """Two `forward_backward` results agree: outputs to out_tol, gradients to (rtol, atol)."""
    torch.testing.assert_close(b[0], a[0], rtol=out_tol, atol=out_tol)
    torch.testing.assert_close(b[1], a[1], rtol=rtol, atol=atol)
    for pa, pb in zip(a[2], b[2]):
        torch.testing.assert_close(pb, pa, rtol=rtol, atol=atol)

def test_chunks_are_runs_of_whole_windows_of_at_most_the_limit():
    x = structure()
    part = window_partition(x, 4, 2)
    chunks = window_chunks(part, CHUNK)
    assert window_chunks(part, CHUNK) is chunks  # planned once, cached on the partition
    lengths = torch.cat([c.lengths for c in chunks])
    assert torch.equal(lengths, part.lengths)  # every window once, in order
    assert any(len(c.lengths) == 1 and c.max_len > CHUNK for c in chunks)  # a longer window is a chunk alone
    assert sum(len(c.lengths) > 1 for c in chunks) > 3
    for c in chunks:
        assert len(c.order) <= CHUNK or len(c.lengths) == 1
        assert c.cu_seqlens.dtype == torch.int32 and c.cu_seqlens[0] == 0 and c.cu_seqlens[-1] == len(c.order)
        assert torch.equal(c.cu_seqlens[1:].long(), c.lengths.cumsum(0)) and c.max_len == int(c.lengths.max())
        assert torch.equal(c.order, torch.arange(len(c.order))) and torch.equal(c.inverse, c.order)
    for a, b in zip(chunks, chunks[1:]):  # greedy: the next window would not have fit
        assert len(a.order) + int(b.lengths[0]) > CHUNK


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_chunked_block_equals_the_whole_block(shift, use_checkpoint):
    x = structure()
    whole, chunked = blocks(shift, use_checkpoint=use_checkpoint)
    assert len(window_chunks(window_partition(x, 4, shift), CHUNK)) > 10
    fa, fb = x.feats.clone().requires_grad_(), x.feats.clone().requires_grad_()
    out_a, out_b = whole(x.replace(fa)).feats, chunked(x.replace(fb)).feats
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out_a)
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    torch.testing.assert_close(fb.grad, fa.grad, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(whole.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():  # without gradients: chunk by chunk, not checkpointed, same result
        torch.testing.assert_close(chunked(x).feats, out_a.detach(), rtol=1e-12, atol=1e-12)


def test_a_block_of_at_most_chunk_tokens_runs_whole():
    x = structure()
    whole, chunked = blocks(0, chunk=len(x))
    torch.testing.assert_close(chunked(x).feats, whole(x).feats, rtol=0, atol=0)


def test_chunked_transformer_equals_the_whole_one():
    x = structure()
    results = []
    for block_chunk in (0, CHUNK):
        torch.manual_seed(3)
        model = SparseTransformer(16, 32, 8, num_blocks=3, num_heads=4, window_size=4, block_chunk=block_chunk)
        model.double()
        assert all(b.chunk_tokens == block_chunk for b in model.blocks)
        results.append(forward_backward(model, x))
    assert_same_results(*results)


@pytest.mark.parametrize("block_chunk", [0, CHUNK])
def test_grouped_blocks_equal_the_plain_transformer(block_chunk):
    """Runs of 2 of 5 blocks (2, 2, 1) checkpointed as one, over checkpointed or chunked blocks."""
    x = structure()
    results = []
    for group in (0, 2):
        torch.manual_seed(3)
        model = SparseTransformer(16, 32, 8, num_blocks=5, num_heads=4, window_size=4, use_checkpoint=True,
                                  block_chunk=block_chunk, block_group=group).double()
        results.append(forward_backward(model, x))
        with torch.no_grad():  # without gradients the runs are not checkpointed: same values
            torch.testing.assert_close(model(x).feats, results[-1][0], rtol=1e-12, atol=1e-12)
    assert_same_results(*results)


@pytest.mark.parametrize("use_checkpoint,block_chunk", [(True, 0), (False, CHUNK), (True, CHUNK)])
def test_stored_blocks_equal_the_recomputed_ones_and_run_once(use_checkpoint, block_chunk):
    """`store_rows`: the first store_rows // N blocks keep their activations (one forward each), the others are
    recomputed in the backward (two), with the same values and gradients. It would fail if the budget picked
    other blocks, if a stored block were still checkpointed or chunked, or if storing changed the result."""
    x = structure()
    results, calls = [], []
    for store_rows in (0, 2 * len(x) + 1, 10 * len(x)):  # none, the first 2 of 4, all
        torch.manual_seed(3)
        model = SparseTransformer(16, 32, 8, num_blocks=4, num_heads=4, window_size=4, use_checkpoint=use_checkpoint,
                                  block_chunk=block_chunk, store_rows=store_rows).double()
        count = [0] * 4
        for i, block in enumerate(model.blocks):  # a block runs `_chunk` once per chunk, or once whole
            block._chunk = lambda *a, i=i, f=block._chunk: count.__setitem__(i, count[i] + 1) or f(*a)
        results.append(forward_backward(model, x))
        calls.append(count)
    chunks = [len(window_chunks(window_partition(x, 4, b.attn.shift), block_chunk)) if block_chunk else 1
              for b in model.blocks]
    assert calls[0] == [2 * c for c in chunks] and max(chunks) > 1 if block_chunk else calls[0] == [2] * 4, calls
    assert calls[1][:2] == [1, 1] and calls[1][2:] == calls[0][2:], calls
    assert calls[2] == [1] * 4, calls
    assert_same_results(results[0], results[1])
    assert_same_results(results[0], results[2])
    with pytest.raises(ValueError, match="store_rows"):
        SparseTransformer(16, 32, 8, num_blocks=4, num_heads=4, store_rows=100, block_group=2)


def test_vae_config_passes_the_chunking_to_encoder_and_decoder():
    tiny = dict(pointnet_channels=16, pointnet_hidden=8, pointnet_blocks=2, encoder_channels=16, encoder_blocks=2,
                decoder_channels=16, decoder_blocks=2, head_channels=8, window_size=4, pos_embedding="absolute",
                upsample_channels=(8, 8), resolution=64)
    x = structure(dtype=torch.float32)
    coords = x.coords[x.coords[:, 0] == 0]  # one batch item at R / 4 = 16
    g = torch.Generator().manual_seed(5)
    pts = (coords[:, 1:] + torch.rand(len(coords), 3, generator=g)) / 16 - 0.5
    nrm = torch.nn.functional.normalize(torch.randn(len(coords), 3, generator=g), dim=1)
    torch.manual_seed(1)
    a = FocusingVAE(VAEConfig(**tiny))
    b = FocusingVAE(VAEConfig(**tiny, block_chunk=CHUNK, block_group=2, block_offload=True))
    b.load_state_dict(a.state_dict())
    assert all(blk.chunk_tokens == CHUNK for blk in [*b.encoder.blocks, *b.decoder.blocks])
    assert b.encoder.block_group == b.decoder.block_group == 2
    assert b.encoder.block_offload and b.decoder.block_offload
    with pytest.raises(ValueError, match="block_offload needs block_group"):
        VAEConfig(**tiny, block_offload=True)
    pa, pb = (m.encode(pts, nrm, None, coords, 16, batch_size=1) for m in (a, b))
    torch.testing.assert_close(pb.mean.feats, pa.mean.feats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pb.logvar, pa.logvar, rtol=1e-5, atol=1e-6)
    z = pa.mean.replace(pa.mean.feats.detach())
    torch.testing.assert_close(b.decode_features(z).feats, a.decode_features(z).feats, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_chunked_block_on_cuda_bf16_varlen_matches_the_whole_block():
    """The varlen route (CUDA, bf16 autocast) on the chunks' own cu_seqlens / max_len: the whole block's values
    and gradients, up to bf16 rounding."""
    torch.manual_seed(0)
    coords = random_coords(2, 24, 0.3, seed=9).cuda()
    x = SparseTensor(coords, torch.randn(len(coords), 128, device="cuda"), batch_size=2)
    whole = SparseTransformerBlock(128, 2, window_size=8, shift=4, use_checkpoint=True).cuda()
    chunked = SparseTransformerBlock(128, 2, window_size=8, shift=4, chunk_tokens=1000).cuda()
    chunked.load_state_dict(whole.state_dict())
    assert len(window_chunks(window_partition(x, 8, 4), 1000)) > 5
    results = []
    for block in (whole, chunked):
        feats = x.feats.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x.replace(feats)).feats
        out.float().square().mean().backward()
        results.append((out.float(), feats.grad, block.attn.to_qkv.weight.grad))
    for a, b in zip(*results):
        assert ((a - b).norm() / b.norm()).item() < 1e-2



@pytest.mark.gpu
def test_offloaded_runs_on_cuda_bf16_match_checkpointed_runs():
    """Runs whose inputs wait in pinned host memory (non-blocking copies on the stream) against the same runs
    checkpointed on the device, on CUDA under bf16 autocast: the same values and gradients (the same kernels),
    and the device holds less at the peak of the backward (`torch.cuda.max_memory_allocated`)."""
    torch.manual_seed(0)
    coords = random_coords(2, 40, 0.3, seed=9).cuda()
    x = SparseTensor(coords, torch.randn(len(coords), 64, device="cuda"), batch_size=2)
    results, peaks = [], []
    for offload in (False, True):
        torch.manual_seed(1)
        model = SparseTransformer(64, 128, 64, num_blocks=6, num_heads=2, window_size=8, block_chunk=4000,
                                  block_group=2, block_offload=offload).cuda()
        feats = x.feats.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x.replace(feats)).feats
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        results.append((out.float(), feats.grad, [p.grad for p in model.parameters()]))
    (out_a, ga, pa), (out_b, gb, pb) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    rows = len(x) * 128 * 4
    assert peaks[1] < peaks[0] - rows, (peaks, rows)  # the other runs' inputs (2 of 3) are not on the device

class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated by ops run under the mode that are still alive, and their peak.

    An op's output counts when its storage is new (not one of the op's inputs': views and in-place ops allocate
    nothing) and stops counting when the storage is freed (a weakref finalizer; PyTorch keeps one Python object
    per storage, so the finalizer runs when the memory is released, not when a Python reference goes away)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in inputs or storage.nbytes() == 0 or getattr(storage, "_live_bytes", False):
                continue
            storage._live_bytes = True
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, storage.nbytes())
        return out


def peak_bytes(block: SparseTransformerBlock, x: SparseTensor) -> int:
    """Peak bytes held at once by the tensors allocated during the forward and backward passes of `block`."""
    feats = x.feats.clone().requires_grad_()
    grad = torch.randn_like(feats)
    window_partition(x, block.attn.window_size, block.attn.shift)  # the partition is not counted
    with LiveBytes() as live:
        block(x.replace(feats)).feats.backward(grad)
    return live.peak


def test_chunks_bound_what_the_recomputation_holds():
    """A checkpointed block holds, for its backward pass, only its input; the backward recomputes the forward and
    holds the intermediates it saves (normed input, qkv, attention output, MLP hidden before and after the GELU,
    ...: ~20 C floats per voxel) until their backward runs. In chunks, only one chunk's are held at a time.
    Measured: the peak of live bytes of the tensors allocated during forward + backward (LiveBytes), against the
    size of one `[N, C]` tensor. It would fail if the chunks were not checkpointed (the forward would keep every
    chunk's intermediates) or too large, or the unchunked block not measured (its peak is the whole block's)."""
    x = structure(dtype=torch.float32, extent=20)
    x = SparseTensor(x.coords, torch.randn(len(x), 32), batch_size=2)
    torch.manual_seed(0)
    whole = SparseTransformerBlock(32, 4, window_size=4, shift=2, use_checkpoint=True)
    chunked = SparseTransformerBlock(32, 4, window_size=4, shift=2, chunk_tokens=200)
    chunked.load_state_dict(whole.state_dict())
    rows = len(x) * 32 * 4  # bytes of one [N, C] fp32 tensor
    assert len(x) > 10 * 200
    peak_whole, peak_chunked = peak_bytes(whole, x), peak_bytes(chunked, x)
    assert peak_whole > 15 * rows, (peak_whole, rows)  # the whole block's intermediates at once (measured: 22)
    # ~3 [N, C] tensors (the input, the output's and the input's gradients) + one chunk's intermediates (~0.6
    # here; measured in all: 3.3; 4.8 when the chunks were checkpointed on a window-order copy of the input)
    assert peak_chunked < 4 * rows, (peak_chunked, rows)


def test_grouped_blocks_hold_one_input_per_run():
    """Checkpointed blocks keep one `[N, C]` input each for the backward pass (8 blocks: 8, plus what the output layers
    and a block's backward hold: measured 13.6 `[N, C]` tensors at the peak). In runs of 3 checkpointed as one, the
    backward keeps the 3 runs' inputs and, while it recomputes a run, that run's 3 block inputs (measured 9.1). It
    would fail if the runs were not checkpointed (the peak would not fall) or the blocks inside a run were not (their
    intermediates would add ~20 tensors per block)."""
    x = structure(dtype=torch.float32, extent=20)
    x = SparseTensor(x.coords, torch.randn(len(x), 32), batch_size=2)
    rows = len(x) * 32 * 4
    peaks = []
    for group in (0, 3):
        torch.manual_seed(0)
        model = SparseTransformer(32, 32, 32, num_blocks=8, num_heads=4, window_size=4, use_checkpoint=True,
                                  block_chunk=200, block_group=group)
        for shift in (0, 2):  # the partitions are cached, not counted
            window_partition(x, 4, shift)
        feats = x.feats.clone().requires_grad_()
        with LiveBytes() as live:
            model(x.replace(feats)).feats.backward(torch.randn_like(feats))
        peaks.append(live.peak / rows)
    plain, grouped = peaks
    assert plain > 12.5, peaks
    assert grouped < plain - 2 and grouped > 8, peaks


@pytest.mark.parametrize("group,block_chunk", [(1, 0), (2, CHUNK), (5, 0)])
def test_offloaded_runs_equal_the_plain_transformer(group, block_chunk):
    """Runs of blocks whose inputs wait in host memory (`block_offload`): the plain transformer's values and
    gradients (5 blocks in runs of 1, of 2 (2, 2, 1) over chunked blocks, and one run of all 5)."""
    x = structure()
    results = []
    for offload in (False, True):
        torch.manual_seed(3)
        model = SparseTransformer(16, 32, 8, num_blocks=5, num_heads=4, window_size=4, block_chunk=block_chunk,
                                  block_group=group if offload else 0, block_offload=offload).double()
        results.append(forward_backward(model, x))
    assert_same_results(*results)


def test_offloaded_runs_recompute_under_the_forwards_autocast():
    """The backward recomputes a run in the forward's autocast dtype (bf16 here, on the CPU): the same values and
    gradients as torch's checkpoint of the same runs. It would fail if the recomputation ran in fp32."""
    x = structure(dtype=torch.float32)
    results = []
    for offload in (False, True):
        torch.manual_seed(3)
        model = SparseTransformer(16, 32, 8, num_blocks=4, num_heads=4, window_size=4, block_chunk=CHUNK,
                                  block_group=2, block_offload=offload)
        results.append(forward_backward(model, x, autocast=True))
    assert results[0][0].dtype == torch.bfloat16
    assert_same_results(*results, out_tol=0, rtol=1e-6, atol=1e-7)


def test_offloaded_runs_hold_no_run_inputs_on_the_device(monkeypatch):
    """With the runs' inputs in host memory, the backward holds on the device only the run it recomputes (its
    reloaded input and its blocks' inputs) and a block's backward: 8 blocks in runs of 3 hold 8.3 `[N, C]`
    tensors at the peak against 9.6 for the same runs checkpointed on the device (they keep the other runs'
    inputs), in runs of 1: 6.3. The host copies are not counted (allocated outside the measurement, as pinned host
    memory is outside the GPU's). It would fail if the runs' inputs stayed referenced on the device."""
    from torch.utils._python_dispatch import _disable_current_modes

    import focusing.models.recompute as hc

    original = hc.to_host

    def uncounted(feats):
        with _disable_current_modes():
            return original(feats)

    monkeypatch.setattr(hc, "to_host", uncounted)
    x = structure(dtype=torch.float32, extent=20)
    x = SparseTensor(x.coords, torch.randn(len(x), 32), batch_size=2)
    rows = len(x) * 32 * 4
    peaks = []
    for group, offload in ((3, False), (3, True), (1, True)):
        torch.manual_seed(0)
        model = SparseTransformer(32, 32, 32, num_blocks=8, num_heads=4, window_size=4, use_checkpoint=True,
                                  block_chunk=200, block_group=group, block_offload=offload)
        for shift in (0, 2):
            window_partition(x, 4, shift)
        feats = x.feats.clone().requires_grad_()
        with LiveBytes() as live:
            model(x.replace(feats)).feats.backward(torch.randn_like(feats))
        peaks.append(live.peak / rows)
    grouped, offloaded, offloaded_each = peaks
    assert offloaded < grouped - 1, peaks
    assert offloaded_each < offloaded - 1.5, peaks


def test_autocast_stream_runs_the_blocks_in_bf16_and_stays_near_the_fp32_stream():
    """`stream_dtype="autocast"`: under bf16 autocast the blocks receive (and the checkpoints keep) bf16 rows; the
    output and every gradient are within 2x the fp32 stream's own distance from the float64 result (the
    LayerNorms compute in fp32: in bf16 their weight gradients were 15-50% off), chunked equals whole, and
    without autocast it is the fp32 stream exactly."""
    x = structure(dtype=torch.float32)
    seen = {}

    def run(stream, block_chunk=0, autocast=True, dtype=torch.float32):
        torch.manual_seed(3)
        model = SparseTransformer(16, 32, 8, num_blocks=3, num_heads=4, window_size=4, use_checkpoint=True,
                                  block_chunk=block_chunk, stream_dtype=stream).to(dtype)
        dtypes = seen.setdefault((stream, block_chunk, autocast), set())
        for block in model.blocks:
            block.register_forward_pre_hook(lambda m, args: dtypes.add(args[0].feats.dtype))
        return forward_backward(model, x.replace(x.feats.to(dtype)), autocast=autocast)

    ref = run("float32", autocast=False, dtype=torch.float64)
    fp32, bf16 = run("float32"), run("autocast")
    assert seen[("float32", 0, True)] == {torch.float32} and seen[("autocast", 0, True)] == {torch.bfloat16}
    for r, a, b in zip([ref[0], ref[1]] + ref[2], [fp32[0], fp32[1]] + fp32[2], [bf16[0], bf16[1]] + bf16[2]):
        err_a, err_b = ((t.double() - r).norm() / r.norm() for t in (a, b))
        assert err_b <= 2 * err_a + 2e-3, (err_a, err_b)
    assert not torch.equal(bf16[0], fp32[0])  # it did round differently
    chunked = run("autocast", block_chunk=CHUNK)
    for a, b in zip([bf16[0], bf16[1]] + bf16[2], [chunked[0], chunked[1]] + chunked[2]):
        assert (b.double() - a.double()).norm() <= 1e-2 * a.double().norm()
    assert_same_results(run("float32", autocast=False), run("autocast", autocast=False), out_tol=0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="stream_dtype"):
        SparseTransformer(16, 32, 8, num_blocks=1, num_heads=4, stream_dtype="float16")
