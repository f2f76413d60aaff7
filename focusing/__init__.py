"""Focusing: a 3D shape VAE on sparse voxels trained with view-consistent voxel carving.

Space convention (see docs/CONVENTIONS.md): meshes are normalised into [-0.5, 0.5]^3; a grid of resolution R
covers that cube, voxel (i, j, k) has centre ((i, j, k) + 0.5) / R - 0.5 and corners at (i, j, k) / R - 0.5.
"""

__version__ = "0.1.0"
