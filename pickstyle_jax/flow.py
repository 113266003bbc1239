"""The flow-matching training objective of PickStyle (DiffSynth FlowMatch, shift 5), as pure functions.

    grid = flow.Grid.make(shift=5.0, n=1000)       # host-side constants, computed once
    i = flow.draw_index(rng, batch, grid.n)         # uniform over grid *indices*, not over sigma
    x_t, target = flow.noise(x0, eps, grid.sigmas[i])
    loss = flow.weighted_mse(v, target, grid.weights[i])

Grid: s_i = 1 - i/n, sigma_i = shift * s_i / (1 + (shift - 1) * s_i), t_i = n * sigma_i (i = 0 .. n-1), all fp32; the
model sees t_i itself, never a bf16-rounded copy (the reference's bf16 timestep moves sigma to the grid point
nearest the rounded t).

Weights: a Gaussian bump over the timesteps, y_i = exp(-2 ((t_i - n/2) / n)^2), shifted to zero at its minimum and
scaled so the n weights sum to n. They are a property of the fixed grid: computing them over the sampled batch (as
a batch-relative normalisation would) gives 0 * inf = NaN at batch 1 and weights that change with the batch. The
minimum sits at i = 0 (sigma = 1), so draws of pure noise contribute nothing.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32


def shift_sigma(sigma, shift: float):
    """The flow shift sigma' = s sigma / (1 + (s - 1) sigma): s > 1 spends more of a grid at high noise. Training's
    grid (`sigmas`) and every sampler's (`schedulers.sigmas`) use it."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigmas(shift: float = 5.0, n: int = 1000) -> np.ndarray:
    """sigma_i = shift s / (1 + (shift - 1) s), s = 1 - i/n, i = 0 .. n-1; float32 [n], decreasing from 1."""
    if n < 2 or shift <= 0:
        raise ValueError(f"need n >= 2 timesteps and shift > 0, got n={n}, shift={shift}")
    s = 1.0 - np.arange(n, dtype=np.float64) / n
    return shift_sigma(s, shift).astype(np.float32)


def timesteps(sig: np.ndarray, n: int = 1000) -> np.ndarray:
    """t_i = n * sigma_i, float32 (the model's timestep input)."""
    return (np.float64(n) * np.asarray(sig, np.float64)).astype(np.float32)


def weights(ts: np.ndarray, n: int = 1000) -> np.ndarray:
    """The Gaussian-bump loss weight of every grid point (module docstring): float32 [n], sum n, 0 at the min."""
    t = np.asarray(ts, np.float64)
    y = np.exp(-2.0 * ((t - n / 2) / n) ** 2)
    y = y - y.min()
    return (y * n / y.sum()).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The n-point training grid: sigmas, timesteps and weights as fp32 numpy constants."""
    n: int
    shift: float
    sigmas: np.ndarray
    timesteps: np.ndarray
    weights: np.ndarray

    @classmethod
    def make(cls, shift: float = 5.0, n: int = 1000) -> "Grid":
        sig = sigmas(shift, n)
        ts = timesteps(sig, n)
        return cls(int(n), float(shift), sig, ts, weights(ts, n))

    def __hash__(self):  # a static argument of jitted code: identified by (n, shift)
        return hash((self.n, self.shift))

    def __eq__(self, other):
        return isinstance(other, Grid) and (self.n, self.shift) == (other.n, other.shift)


def draw_index(rng, batch: int, n: int = 1000):
    """i ~ U{0, ..., n-1} per sample: int32 [batch]."""
    return jax.random.randint(rng, (batch,), 0, n, dtype=jnp.int32)


def lookup(grid: Grid, index):
    """(sigma [B], t [B], weight [B]) fp32 at grid indices."""
    return (jnp.asarray(grid.sigmas)[index], jnp.asarray(grid.timesteps)[index], jnp.asarray(grid.weights)[index])


def noise(x0, eps, sigma_B):
    """(x_sigma = (1 - sigma) x0 + sigma eps, velocity target eps - x0), fp32; sigma broadcast per sample."""
    x0, eps = x0.astype(f32), eps.astype(f32)
    s = jnp.asarray(sigma_B, f32).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1.0 - s) * x0 + s * eps, eps - x0


def per_sample_mse(pred, target):
    """mean over all non-batch elements of (pred - target)^2, fp32 [B]."""
    d = pred.astype(f32) - target.astype(f32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def weighted_mse(pred, target, weight_B):
    """mean over the batch of w_b * mse_b: the PickStyle loss (each sample weighted by its own grid weight)."""
    return jnp.mean(per_sample_mse(pred, target) * jnp.asarray(weight_B, f32))
