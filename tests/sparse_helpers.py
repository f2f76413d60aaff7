"""Random sparse structures for the sparse-backbone tests."""

from __future__ import annotations

import pytest
import torch

from focusing.sparse import SparseTensor


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: one thread. (On a loaded 2-core box each multi-threaded tiny matmul can wait ~30 ms.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_coords(batch: int, extent: int, density: float, seed: int = 0) -> torch.Tensor:
    """`[N, 4]` int32 sorted coords: each cell of `batch` grids of extent^3 occupied with probability `density`."""
    g = torch.Generator().manual_seed(seed)
    occupied = torch.rand(batch, extent, extent, extent, generator=g) < density
    return occupied.nonzero().to(torch.int32).contiguous()


def random_sparse(batch: int, extent: int, density: float, channels: int, seed: int = 0, dtype=torch.float32):
    coords = random_coords(batch, extent, density, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return SparseTensor(coords, torch.randn(len(coords), channels, generator=g, dtype=dtype), batch_size=batch)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
