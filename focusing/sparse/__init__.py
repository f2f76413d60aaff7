"""Sparse voxel backbone in pure PyTorch: SparseTensor, submanifold convolution, shifted-window attention,
subdivision. Fast paths (PyTorch's varlen flash attention, optional spconv) are picked automatically on CUDA."""

from focusing.sparse.attention import WindowPartition, packed_window_attention, window_attention, window_partition
from focusing.sparse.conv import SubMConv3d, neighbor_map, submanifold_conv3d
from focusing.sparse.lookup import find_voxels, occupancy
from focusing.sparse.subdivide import subdivide
from focusing.sparse.tensor import SparseTensor, SpatialCache, sort_coords, sparse_batch_cat, sparse_cat

__all__ = [
    "SparseTensor",
    "SpatialCache",
    "SubMConv3d",
    "WindowPartition",
    "find_voxels",
    "neighbor_map",
    "occupancy",
    "packed_window_attention",
    "sort_coords",
    "sparse_batch_cat",
    "sparse_cat",
    "subdivide",
    "submanifold_conv3d",
    "window_attention",
    "window_partition",
]
