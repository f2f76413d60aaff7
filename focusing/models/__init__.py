"""Networks on sparse voxels: the local PointNet, the sparse Swin transformer, the self-pruning upsampler.

    feats = LocalPointNet(1024)(points, normals, coords, R)                 # [N, 1024] from oriented points
    x = SparseTensor(coords, feats, resolution=R)                           # coords [N, 4] int32, sorted
    z = SparseTransformer(1024, 768, 16, num_blocks=12, num_heads=12)(x)    # Swin encoder -> [N, 16]
    up = SelfPruningUpsample(768, 192)(h, target_coords=gt_coords_2R)       # up.x at 2R, up.logits for BCE
"""

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
