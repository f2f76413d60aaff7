"""Networks on sparse voxels: the local PointNet, the sparse Swin transformer, the self-pruning upsampler."""

from focusing.models.pointnet import LocalPointNet
from focusing.models.transformer import SparseTransformer, SparseTransformerBlock
from focusing.models.upsample import SelfPruningUpsample, SparseResBlock, UpsampleOutput

__all__ = [
    "LocalPointNet",
    "SelfPruningUpsample",
    "SparseResBlock",
    "SparseTransformer",
    "SparseTransformerBlock",
    "UpsampleOutput",
]
