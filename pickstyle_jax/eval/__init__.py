"""Evaluation on any clips: video metrics (`metrics`), embedding metrics behind a pluggable extractor (`features`),
cheap baselines to beat (`baselines`: colour transfer) and the command line that scores a stylisation without
ground truth (`cli`, run as `python -m pickstyle_jax.evaluate`). The demo's synthetic world with exact ground truth
lives in pickstyle_jax/demo/. numpy only: importing this package loads no model code."""
from pickstyle_jax.eval import baselines, features, metrics
from pickstyle_jax.eval.features import FeatureExtractor, RandomConvFeatures, frame_consistency, text_video_score
from pickstyle_jax.eval.metrics import content, flicker, psnr, ssim, style_distance, temporal_error

__all__ = ["baselines", "features", "metrics", "FeatureExtractor", "RandomConvFeatures", "frame_consistency",
           "text_video_score", "content", "flicker", "psnr", "ssim", "style_distance", "temporal_error"]
