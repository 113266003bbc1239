"""Training data: paired-image sources (folder layouts, TFDS, the synthetic world), the camera-motion clip synthesis
and the Grain pipeline (docs/REFERENCE.md §8).

Imports only numpy, PIL, grain, tensorflow_datasets (TF-free array_record mode, and only for source="tfds"),
ml_collections and jax; never models or torch.
"""
from pickstyle_jax.data import motion, sources, synthetic
from pickstyle_jax.data.pipeline import fit, make_dataset, make_iterator, make_source
from pickstyle_jax.data.sources import DataError

__all__ = ["DataError", "fit", "make_dataset", "make_iterator", "make_source", "motion", "sources", "synthetic"]
