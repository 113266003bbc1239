"""Evaluation: video metrics (`metrics`), embedding metrics behind a pluggable extractor (`features`) and the
held-out synthetic world with real object motion and exact ground truth (`world`). The command line lives in
`pickstyle_jax.evaluate`. numpy only: importing this package loads no model code."""
from pickstyle_jax.eval import features, metrics, world
from pickstyle_jax.eval.features import FeatureExtractor, RandomConvFeatures, frame_consistency, text_video_score
from pickstyle_jax.eval.metrics import content, flicker, psnr, ssim, style_distance, temporal_error
from pickstyle_jax.eval.world import Clip, World, render_clip

__all__ = ["features", "metrics", "world", "FeatureExtractor", "RandomConvFeatures", "frame_consistency",
           "text_video_score", "content", "flicker", "psnr", "ssim", "style_distance", "temporal_error", "Clip",
           "World", "render_clip"]
