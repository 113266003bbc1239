"""Deprecated import path, kept for one release: `Stylizer`, `CompatibilityError`, `check_lora` and
`check_compatible` live in `pickstyle_jax.sample` (pickstyle_jax/sample/stylizer.py)."""
import warnings

from pickstyle_jax.sample import CompatibilityError, Stylizer, check_compatible, check_lora

__all__ = ["Stylizer", "CompatibilityError", "check_lora", "check_compatible"]

warnings.warn("pickstyle_jax.stylizer is deprecated: import Stylizer, CompatibilityError, check_lora and "
              "check_compatible from pickstyle_jax.sample", DeprecationWarning, stacklevel=2)
