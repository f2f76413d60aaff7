"""Evaluation: Chamfer distance and F-score (the paper's protocol), baselines and benchmark tables."""

from focusing.eval.metrics import SurfaceMetrics, surface_metrics

__all__ = ["SurfaceMetrics", "surface_metrics"]
