"""Classifier-free guidance for the stylisation sampler: CS-CFG, two-branch CFG and APG, as pure functions.

Branches (velocities of one batch of latents, each [B, ...]; B is the leading axis):
- v_cond      = v(style prompt, real context)
- v_null_text = v(null text, real context)
- v_null      = v(null text, null context); CS-CFG's null context is the permuted real context, the
  "text_context" mode's is the context of an all-zero video. The caller builds the branch; the math here is the
  same for both.

Directions: Δ_t = v_cond − v_null_text (text/style) and Δ_c = v_null_text − v_null (context).

Plain form (apg off), the standard two-condition factorisation:
    v̂ = v_null + s_c·(v_null_text − v_null) + s_t·(v_cond − v_null_text) = v_cond + (s_t − 1)·Δ_t + (s_c − 1)·Δ_c
(PickStyle's released non-APG branch adds s_c·Δ_c on top of v_null_text, i.e. (1 + s_c) on the context direction;
we do not copy that.)

APG (adaptive projected guidance; on by default, as PickStyle ships). Each direction Δ keeps its own momentum
buffer r, threaded through the caller as explicit state:
    r  ← Δ + momentum·r                 the buffer keeps the unclipped running sum
    g  ← r·min(1, threshold / ‖r‖)      norm clipping (threshold: see below)
    û  = v_cond / max(‖v_cond‖, 1e-12)
    g′ = (g − ⟨g, û⟩û) + eta·⟨g, û⟩û    the part parallel to v_cond is dropped (eta = 0)
    v̂  = v_cond + (s_t − 1)·g′_t + (s_c − 1)·g′_c
Norms and dot products are per sample, over all non-batch axes, summed in fp32.
The clipping threshold is a norm over the whole latent of one sample, so what it allows depends on the latent's
size: PickStyle's 55 was set for its [16, 21, 60, 104] latent (81 frames at 480 x 832), a per-element RMS of
55 / sqrt(2,096,640) = 0.038. `apg=True` (and `Apg()`) uses 55 at every size, as the official code does;
`apg="scaled"` (`Apg.scaled()`) keeps that per-element meaning at any size: threshold = 55·sqrt(n / 2,096,640) for
a latent of n elements per sample, exactly 55 at the official geometry. On a small latent the absolute 55 never
clips (the demo's [2, 4, 6, 16] latent would need an RMS of 2.0), and the momentum buffer (up to 4x Δ) then drives
the guided velocity far off: measured on the CPU demo at scales 5/4 (4 held-out clips), 12.9 dB to the ground
truth with the absolute threshold, 13.1 dB without APG, 20.0 dB scaled (README, "What `make demo` does").

Modes, each selected by name through `combine(mode, vs, ...)`; `MODES[mode]` is the number of branches, and `vs`
lists them in this order (either a sequence of [B, ...] arrays or one [n·B, ...] array stacked branch-major, as a
batched forward over the concatenated branches returns it):
- "cs_cfg":        (v_cond, v_null_text, v_null)     text_scale on Δ_t, context_scale on Δ_c
- "text":          (v_cond, v_null_text)             v̂ = v_null_text + s_t·(v_cond − v_null_text)
- "text_context":  (v_cond, v_null)                  same formula; null branch = null text + zero-video context
- "none":          (v_cond,)                         v̂ = v_cond
Every mode takes and returns the same state pytree (`init_state`), so a sampler's scan carry does not depend on
the mode; the two-branch modes use the "text" buffer only.

Scales (text_scale, context_scale, scale) may be Python numbers or traced scalars (f32[] inside jit): nothing
here branches on their values (a scale of 1 multiplies its direction by 0; it is not skipped), so one trace serves
any scales. `apg` (on/off and its constants) and `mode` are static: they choose the formula.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

MODES = {"cs_cfg": 3, "text": 2, "text_context": 2, "none": 1}
# elements per sample of the latent PickStyle's APG threshold was set for: [16 channels, 21, 60, 104]
REFERENCE_NUMEL = 16 * 21 * 60 * 104


@dataclasses.dataclass(frozen=True)
class Apg:
    """APG constants; PickStyle's are momentum 0.75, norm threshold 55, eta 0. threshold=inf disables clipping.
    reference_numel: None = the threshold is absolute (the official behaviour); n = it was set for a latent of n
    elements per sample and scales by sqrt(size / n) on others (`Apg.scaled()`: PickStyle's 55 at its geometry)."""

    momentum: float = 0.75
    norm_threshold: float = 55.0
    eta: float = 0.0
    reference_numel: int | None = None

    def __post_init__(self):
        if not self.norm_threshold > 0:
            raise ValueError(f"APG norm_threshold must be > 0 (inf disables clipping), got {self.norm_threshold}")
        if self.reference_numel is not None and not self.reference_numel > 0:
            raise ValueError(f"APG reference_numel must be a positive element count or None, got "
                             f"{self.reference_numel}")

    @classmethod
    def scaled(cls, **kw) -> "Apg":
        """PickStyle's constants with the threshold's per-element meaning kept at every latent size."""
        return cls(reference_numel=REFERENCE_NUMEL, **kw)

    def threshold(self, shape) -> float:
        """The clipping norm for per-sample latents of this [B, ...] shape (static: shapes are known at trace)."""
        if self.reference_numel is None or math.isinf(self.norm_threshold):
            return self.norm_threshold
        return self.norm_threshold * math.sqrt(math.prod(shape[1:]) / self.reference_numel)


class ApgSettingError(TypeError, ValueError):
    """An `apg` value that names no setting (a TypeError for the guidance functions, a ValueError for the CLIs)."""


APG_NAMES = {"on": True, "scaled": "scaled", "off": False}  # the named APG settings (command lines use these)


def apg_setting(apg):
    """A named APG setting checked and made canonical: True (PickStyle's absolute threshold), "scaled" or False
    (numpy bools and "on"/"off" too); an `Apg` passes through. A clear error names the accepted forms."""
    if isinstance(apg, Apg):
        return apg
    if isinstance(apg, (bool, np.bool_)):
        return bool(apg)
    if isinstance(apg, str) and apg.lower() in APG_NAMES:
        return APG_NAMES[apg.lower()]
    raise ApgSettingError(f"apg must be True/'on' (PickStyle's absolute norm threshold), 'scaled' (the threshold "
                          f"kept per element at every latent size), False/'off' or a guidance.Apg, got {apg!r}")


def _apg_config(apg) -> Apg | None:
    """The Apg constants of a setting (None: APG off)."""
    if apg is None:
        return None
    apg = apg_setting(apg)
    if isinstance(apg, Apg):
        return apg
    return Apg.scaled() if apg == "scaled" else Apg() if apg else None


def init_state(v_cond) -> dict[str, Any]:
    """Zero APG momentum buffers shaped like v_cond: {"text": r_t, "context": r_c}, fp32."""
    zeros = jnp.zeros(jnp.shape(v_cond), jnp.float32)
    return {"text": zeros, "context": zeros}


def _f32(*vs):
    shape = jnp.shape(vs[0])
    if len(shape) < 2:
        raise ValueError(f"guidance expects batched velocities [B, ...] (norms are per sample), got shape {shape}")
    for v in vs[1:]:
        if jnp.shape(v) != shape:
            raise ValueError(f"guidance branches differ in shape: {shape} vs {jnp.shape(v)}")
    return [jnp.asarray(v, jnp.float32) for v in vs]


def _sum(x):
    """Per-sample sum over all non-batch axes, kept for broadcasting: [B, 1, ..., 1]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), keepdims=True, dtype=jnp.float32)


def _project(g, u_hat, eta: float):
    """g without its component along the unit direction u_hat (plus eta times it)."""
    par = _sum(g * u_hat) * u_hat
    return g - par + eta * par if eta else g - par


def _apg_direction(delta, buffer, u_hat, cfg: Apg):
    """One APG direction: (guidance term g′, new unclipped buffer)."""
    r = delta + cfg.momentum * buffer
    tau = cfg.threshold(jnp.shape(r))
    if math.isinf(tau):
        g = r
    else:
        # min(1, τ/‖r‖) written as τ / max(‖r‖, τ): the same value, and finite (also in gradients) at r = 0.
        norm = jnp.sqrt(_sum(r * r))
        g = r * (tau / jnp.maximum(norm, tau))
    return _project(g, u_hat, cfg.eta), r


def _unit(v):
    return v / jnp.maximum(jnp.sqrt(_sum(v * v)), 1e-12)


def cs_cfg(v_cond, v_null_text, v_null, text_scale: float = 5.0, context_scale: float = 4.0,
           apg: bool | str | Apg = True, state=None):
    """Context-style CFG over three branches: returns (guided velocity fp32, new state). state=None = fresh.

    v_cond, v_null_text, v_null: [B, ...]; text_scale, context_scale: scalars, static or traced; apg: static."""
    v_c, v_nt, v_n = _f32(v_cond, v_null_text, v_null)
    state = init_state(v_c) if state is None else state
    d_text, d_ctx = v_c - v_nt, v_nt - v_n
    cfg = _apg_config(apg)
    if cfg is None:
        return v_c + (text_scale - 1.0) * d_text + (context_scale - 1.0) * d_ctx, state
    u_hat = _unit(v_c)
    g_text, r_text = _apg_direction(d_text, state["text"], u_hat, cfg)
    g_ctx, r_ctx = _apg_direction(d_ctx, state["context"], u_hat, cfg)
    v = v_c + (text_scale - 1.0) * g_text + (context_scale - 1.0) * g_ctx
    return v, {"text": r_text, "context": r_ctx}


def text_cfg(v_cond, v_null, scale: float = 5.0, apg: bool | str | Apg = True, state=None):
    """Two-branch CFG v̂ = v_null + s·(v_cond − v_null) (APG: v_cond + (s − 1)·g′): returns (v fp32, state).

    Uses and updates only state["text"]; state["context"] passes through. scale: a scalar, static or traced.
    """
    v_c, v_n = _f32(v_cond, v_null)
    state = init_state(v_c) if state is None else state
    delta = v_c - v_n
    cfg = _apg_config(apg)
    if cfg is None:
        return v_c + (scale - 1.0) * delta, state
    g, r = _apg_direction(delta, state["text"], _unit(v_c), cfg)
    return v_c + (scale - 1.0) * g, {"text": r, "context": state["context"]}


def text_context(v_cond, v_null, scale: float = 5.0, apg: bool | str | Apg = True, state=None):
    """The "text_context" mode: `text_cfg`'s math, where the caller's v_null is the branch with the null text AND
    the context of an all-zero video (so the guidance pushes away from both conditions at once)."""
    return text_cfg(v_cond, v_null, scale=scale, apg=apg, state=state)


def _branches(mode: str, vs) -> list:
    if mode not in MODES:
        raise ValueError(f"unknown guidance mode {mode!r}; choose one of {', '.join(MODES)}")
    n = MODES[mode]
    if isinstance(vs, (list, tuple)):
        if len(vs) != n:
            raise ValueError(f"mode {mode!r} takes {n} branch velocities, got {len(vs)}")
        return list(vs)
    shape = jnp.shape(vs)
    if not shape or shape[0] % n:
        raise ValueError(f"mode {mode!r} needs a leading axis of n·B = {n}·B (branch-major), got shape {shape}")
    return jnp.split(vs, n, axis=0)


def combine(mode: str, vs: Sequence | Any, *, text_scale: float = 5.0, context_scale: float = 4.0,
            apg: bool | str | Apg = True, state=None):
    """Guided velocity of `mode` (see the module docstring): returns (v fp32 [B, ...], new state).

    mode, apg: static; text_scale, context_scale: scalars, static or traced (mode "none" ignores them)."""
    branches = _branches(mode, vs)
    if mode == "cs_cfg":
        return cs_cfg(*branches, text_scale=text_scale, context_scale=context_scale, apg=apg, state=state)
    if mode == "text":
        return text_cfg(*branches, scale=text_scale, apg=apg, state=state)
    if mode == "text_context":
        return text_context(*branches, scale=text_scale, apg=apg, state=state)
    (v_c,) = _f32(*branches)
    return v_c, init_state(v_c) if state is None else state
