"""Resumable fitting loops for the demo's pretraining (demo/pretrain.py): one state file per loop, and the record
of where a fit ran."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax import files


class StageState:
    """Resumable progress of one fitting loop (the autoencoder or the backbone): params, optimiser state and the
    loop's own state (step, elapsed seconds, data-iterator state, loss curve) in one file STATE_DIR/NAME.npz,
    replaced atomically every `every` steps, so a kill at any moment leaves the previous save whole. The fingerprint
    of the settings is stored in it: a state made from other settings is ignored (and later overwritten), so a
    changed recipe never resumes from a stale fit."""

    def __init__(self, state_dir, name: str, fingerprint: str, every: int):
        self.path = Path(state_dir) / f"{name}.npz"
        self.fp, self.every = fingerprint, max(1, int(every))

    def load(self, like):
        """(tree shaped like `like`, loop state dict) of the last save for these settings, or None."""
        try:
            with np.load(self.path) as z:
                meta = json.loads(str(z["meta"]))
                leaves, treedef = jax.tree.flatten(like)
                if meta.get("fingerprint") != self.fp or len(z.files) != len(leaves) + 1:
                    return None
                arrays = [z[f"a{i}"] for i in range(len(leaves))]
        except (OSError, ValueError, KeyError):
            return None
        if any(a.shape != np.shape(b) for a, b in zip(arrays, leaves)):
            return None
        return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in arrays]), meta["loop"]

    def save(self, tree, loop: dict) -> None:
        leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]
        meta = np.asarray(json.dumps({"fingerprint": self.fp, "loop": loop}))
        files.atomic_write(self.path, lambda f: np.savez(f, meta=meta, **{f"a{i}": a for i, a in enumerate(leaves)}))

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total


def machine() -> dict:
    """Where a fit ran: recorded with its wall time."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "devices": [d.device_kind for d in jax.devices()]}
