"""The data side: surface sampling, voxelisation, corner TSDF, the preprocessing cache and its Dataset."""
