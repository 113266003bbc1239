"""The jitted CS-CFG sampler of PickStyle (`Stylizer`, the video-in, video-out pipeline around it, is stylizer.py).

    sampler = sample.make_sampler(cfg, solver="dpm++", steps=20, shift=16.0, skip=4)
    latents = sampler(params, adapters, source_latents, context, text, null_text, key,
                      text_lens=lens, null_text_lens=null_lens)
    latents = sampler(..., text_scale=3.0, context_scale=2.5)       # same compile: the scales are traced

`make_sampler` returns a `Sampler` around ONE jitted pure function, `_sample`: a `lax.scan` of the module-level
step function `_sample_step` over the executed steps k = skip .. steps-1, carrying a `SamplerState` (latents, solver
history, APG momentum, TeaCache). Each step runs every guidance branch as one batched DiT forward (batch
n_branches * B, branch-major), combines them with `guidance`, and takes a solver step. The static settings are one
frozen `_Plan` bound into the jitted function; the run's fixed inputs (weights, text, context, keys) are one
`_Inputs` pytree and the guidance scales two f32[] values, both passed to the step as arguments. Parameters,
adapters and inputs are arguments of the jitted function, never closed-over constants, so one compile serves any
weights, and the function can be called from jitted user code or exported (`jax.export`). The guidance scales are
traced inputs too (make_sampler's values are only the call-time defaults), so one compile serves any scales;
everything else make_sampler takes (solver, steps, skip, mode, apg, cache, ...) is static and compiled in
(`settings.CALL_TIME` names the call-time settings once for the package). The defaults are `SamplerSettings`'.

Branches (mode "cs_cfg"): v_c = v(text, z), v_nt = v(null text, z), v_n = v(null text, z~), where z~ permutes the
context's latent frames, rows and columns with three independent permutations shared by all 96 channels, drawn
fresh every step from fold_in(key, k): a factorised shuffle that keeps the context's statistics but breaks its
alignment with the video, reproducible for a seed. "text": (text, z), (null, z). "text_context": (text, z),
(null, null_context = the context of an all-zero video). "none": (text, z) only.

Start (partial noise): x = (1 - sigma_skip) * source_latents + sigma_skip * eps, eps ~ N(0, 1) in fp32 from the key;
the solver starts at index `skip` with a fresh state, so its first step is first order.

Per video, not per step: the DiT runs in stages (`wan.prepare` -> `wan.embed` -> `wan.run_blocks` ->
`wan.apply_head`). Before the step scan, once per call, `wan.prepare` embeds every branch's text and computes every
block's cross-attention K/V of it (main and VACE blocks), and `wan.embed_context` the fixed branches' VACE context
patch embeddings; each step then embeds only the latents and the time. The permuted branch of CS-CFG is the
exception: its context's patch embedding is recomputed every step. The frame permutation alone keeps patches whole
(p_t = 1), but the row and column ones do not: a patch takes rows (pi(2i), pi(2i+1)), which is a patch of the
unpermuted context, in order, for every i only with probability (h/2)! / h! (3e-5 for h = 10, 3e-50 for h = 60), so
the embedding of the permuted context is not a permutation of the embedding's tokens. Recomputing it costs
2 S (4 * 96) D FLOPs, 0.13 TFLOP at vace-14B, 81 x 480 x 832 (bench/cache.py: under 0.01% of a step).

TeaCache (cache="teacache") follows the reference (PickStyle's and TeaCache4Wan2.1's): on a computed step it caches
every branch's residual of the block stack, R = run_blocks(x0) - x0 (the main and VACE blocks, hints included, before
the head); on a skipped step it adds R to the *current* step's patch-embedded input x0 and runs the *current* head
(modulated by this step's time embedding), so only the blocks are skipped. The decision is the reference's: the
relative L1 change of the timestep modulation e0 (computed here from the time-embedding weights), rescaled by the
model's polynomial (`teacache_polynomial`: TeaCache's Wan2.1 1.3B fit for dim-1536 models, else the 14B fit PickStyle
ships) and accumulated until it reaches the threshold; the guidance (APG's momentum included) and the solver step run
on every step. Unlike the reference it counts executed steps (not calls), keys the cache by branch (the rows of the
batched forward), always computes the first 5 and the last executed step, and starts fresh in every sampler call.
cache_threshold <= 0 never skips (it equals the uncached sampler exactly): the polynomial's constant term is
negative, so a plain `acc >= threshold` test would skip nearly-equal steps even at threshold 0. It is an
approximation; leave it off for parity. The cache holds [n_branches * B, S, dim] fp32 (2.0 GB at vace-14B, 81 x 480
x 832, 3 branches).

A schedule decided ahead of time (cache="static", MagCache-style): cache_steps names the executed steps whose blocks
run, e.g. from `magcache_schedule` on the residual magnitudes of a cache="calibrate" run. Its step loop has no
lax.cond: a lax.scan over the computed steps, each followed by a fixed number of skipped sub-steps (the longest run
of skips in the schedule) that are masked out where a shorter run ends; a skipped sub-step is TeaCache's (this
step's patch tokens + the cached residual, this step's head), so a masked one costs only embeddings, head, guidance
and solver.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pickstyle_jax import guidance, schedulers, sharding
from pickstyle_jax.models import layers, wan
from pickstyle_jax.sample.settings import SamplerSettings

f32 = jnp.float32

__all__ = ["make_sampler", "Sampler", "SamplerState", "TeaCacheState", "permute_context", "null_context_key",
           "time_modulation", "teacache_decide", "teacache_polynomial", "magcache_schedule", "TEACACHE_POLY_14B",
           "TEACACHE_POLY_1_3B", "TEACACHE_WARMUP"]

# TeaCache rescale polynomials with "ret-steps" (modulated input = e0), highest degree first. 14B: the one PickStyle
# ships for 14B (TeaCache4Wan2.1's Wan2.1-I2V-14B-720P fit). 1.3B: TeaCache4Wan2.1's Wan2.1-T2V-1.3B fit, its only
# 1.3B ret-steps polynomial (PickStyle's "1.3B" entry is TeaCache's I2V-14B-480P fit, 2.57151496e5, ...).
TEACACHE_POLY_14B = (8.10705460e3, 2.13393892e3, -3.72934672e2, 1.66203073e1, -4.17769401e-2)
TEACACHE_POLY_1_3B = (-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2)
_TEACACHE_POLYS = {1536: TEACACHE_POLY_1_3B, 5120: TEACACHE_POLY_14B}  # by model width: 1.3B and 14B Wan2.1
TEACACHE_WARMUP = 5  # executed steps always computed at the start

_DEFAULT = SamplerSettings()  # make_sampler's defaults are these


# --------------------------------------------------------------------------------------------- building blocks
def null_context_key(key, step):
    """The key of step `step`'s null-context permutation (one per grid index, not per executed step)."""
    return jax.random.fold_in(key, step)


def permute_context(key, context_BFHWC):
    """z~[:, t, y, x] = z[:, pi_T(t), pi_H(y), pi_W(x)]: independent uniform permutations of the latent frames,
    rows and columns, the same for every channel and every sample of the batch."""
    k_t, k_h, k_w = jax.random.split(key, 3)
    _, f, h, w, _ = context_BFHWC.shape
    z = jnp.take(context_BFHWC, jax.random.permutation(k_t, f), axis=1)
    z = jnp.take(z, jax.random.permutation(k_h, h), axis=2)
    return jnp.take(z, jax.random.permutation(k_w, w), axis=3)


def time_modulation(cfg: wan.WanConfig, params, t):
    """e0 [6 * dim] fp32 of one timestep: the DiT's time path (sinusoid -> MLP -> SiLU -> projection), base
    weights only. TeaCache measures how much the blocks' modulated input changes from step to step with it."""
    sinusoid = layers.timestep_embedding(jnp.reshape(jnp.asarray(t, f32), (1,)), cfg.freq_dim)
    te, tp = params["time_embedding"], params["time_projection"]
    e = layers.dense(jax.nn.silu(layers.dense(sinusoid, te["0"], dtype=f32)), te["2"], dtype=f32)
    return layers.dense(jax.nn.silu(e), tp["1"], dtype=f32).reshape(-1)


def teacache_polynomial(cfg: wan.WanConfig) -> tuple:
    """The TeaCache polynomial of a model, chosen by its width: dim 1536 (Wan2.1 1.3B) -> TEACACHE_POLY_1_3B, dim
    5120 (14B) -> TEACACHE_POLY_14B; any other width (tiny and demo models, uncalibrated) takes the 14B one."""
    return _TEACACHE_POLYS.get(cfg.dim, TEACACHE_POLY_14B)


def magcache_schedule(norms, n_exec: int | None = None, *, threshold: float = 0.06, max_skips: int = 2,
                      warmup: int = TEACACHE_WARMUP) -> tuple:
    """A static schedule (make_sampler's cache_steps) by MagCache's rule from calibrated residual magnitudes.

    norms: [n_exec, ...] the block residual's mean per-token norm of every executed step (and branch), from a
    cache="calibrate" sampler on a representative input; the ratio of step i is mean(norms[i] / norms[i - 1]) over
    the trailing axes. The first `warmup` and the last step are computed; after a computed step the skipped ones
    accumulate r *= ratio[i] and err += |1 - r| and a step is skipped while err < threshold and at most max_skips in
    a row are. Host-side NumPy; the result is static. Returns the executed-step indices that run the blocks."""
    norms = np.asarray(norms, np.float64).reshape(len(norms), -1)
    n_exec = len(norms) if n_exec is None else n_exec
    ratio = np.ones(n_exec)
    ratio[1:] = np.mean(norms[1:n_exec] / np.maximum(norms[:n_exec - 1], 1e-30), axis=1)
    computed, acc_r, acc_err, run = [], 1.0, 0.0, 0
    for i in range(n_exec):
        if i >= warmup and i < n_exec - 1:
            acc_r, run = acc_r * ratio[i], run + 1
            acc_err += abs(1.0 - acc_r)
            if acc_err < threshold and run <= max_skips:
                continue
        computed.append(i)
        acc_r, acc_err, run = 1.0, 0.0, 0
    return tuple(computed)


def teacache_decide(prev_e0, acc, e0, i, n_exec, threshold, poly):
    """(compute?, new accumulator) of executed step i: the reference rule on the relative L1 change of e0 from
    prev_e0, warm-up and last step forced; a threshold <= 0 computes every step (the polynomial can be negative, so
    `acc >= 0` alone would not)."""
    rel = jnp.mean(jnp.abs(e0 - prev_e0)) / jnp.maximum(jnp.mean(jnp.abs(prev_e0)), 1e-12)
    acc = acc + jnp.polyval(jnp.asarray(poly, f32), jnp.where(i > 0, rel, 0.0))
    compute = (i < TEACACHE_WARMUP) | (i == n_exec - 1) | (acc >= threshold) | (threshold <= 0)
    return compute, jnp.where(compute, 0.0, acc)


# ------------------------------------------------------------------------------------------------ the state
@struct.dataclass
class TeaCacheState:
    """What TeaCache carries from step to step: the last e0 [6 dim], the accumulated change [] and every branch's
    last computed residual of the block stack, run_blocks(x0) - x0 [n_branches * B, S, dim], all fp32."""

    e0: jax.Array
    acc: jax.Array
    residual: jax.Array


@struct.dataclass
class SamplerState:
    """The scan carry: latents x [B, f, h, w, 16] fp32, the solver's history (`schedulers.Scheduler.init`), the APG
    momentum buffers (`guidance.init_state`) and, with cache="teacache", a TeaCacheState (else None). Its structure
    and dtypes are the same before and after every step."""

    x: jax.Array
    solver: Any
    guidance: Any
    cache: TeaCacheState | None = None


@struct.dataclass
class _Inputs:
    """A run's inputs that every step reads unchanged: the weights, the per-video constants of every branch
    (`wan.Prepared`: text K/V of every block, and the fixed branches' context embeddings in .context), the real
    context (CS-CFG permutes it per step), the permutation key, and the pinned latents keep [B, m, ...] with their
    noise (m = 0: nothing pinned)."""

    params: Any
    adapters: Any
    prepared: wan.Prepared
    context: jax.Array
    perm_key: jax.Array
    keep: jax.Array | None
    keep_eps: jax.Array | None


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    """make_sampler's static settings, resolved: compiled into the sampler."""

    cfg: wan.WanConfig
    options: wan.Options
    mode: str
    n_branches: int
    apg: Any
    scheduler: schedulers.Scheduler
    skip: int
    steps: int
    cache: str | None
    cache_threshold: float
    teacache_poly: tuple
    cache_steps: tuple
    calibrate: bool
    mesh: Any
    rules: Any
    progress: Callable | None

    @property
    def sigmas(self) -> np.ndarray:
        return np.asarray(self.scheduler.sigmas, np.float32)

    @property
    def n_exec(self) -> int:
        return self.steps - self.skip


# ------------------------------------------------------------------------------------------------ input checks
def _as_key(key):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key.astype(jnp.uint32))  # raw uint32 keys, e.g. from exported callers


def _pad_text(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))


def _lens(lens, b, n):
    if lens is None:
        return jnp.full((b,), n, jnp.int32)
    return jnp.broadcast_to(jnp.asarray(lens, jnp.int32).reshape(-1), (b,))


def _check(cfg, x, context, text, null_text, null_context, keep, mode):
    if x.ndim != 5 or x.shape[-1] != cfg.in_dim:
        raise ValueError(f"source_latents must be [B, f, h, w, {cfg.in_dim}], got {x.shape}")
    if not cfg.has_vace:
        raise ValueError("the sampler needs a VACE DiT (cfg.vace_layers is empty)")
    want = (*x.shape[:4], cfg.vace_in_dim)
    if tuple(context.shape) != want:
        raise ValueError(f"context must be {want} (the latents' B, f, h, w; [E(0) | E(src) | mask]), "
                         f"got {tuple(context.shape)}")
    b = x.shape[0]
    for name, tx in (("text", text), ("null_text", null_text)):
        if tx.ndim != 3 or tx.shape[2] != cfg.text_dim or tx.shape[0] not in (1, b):
            raise ValueError(f"{name} must be [B={b} (or 1), L, {cfg.text_dim}], got {tuple(tx.shape)}")
    if mode == "text_context":
        if null_context is None or tuple(null_context.shape)[1:] != want[1:] or null_context.shape[0] not in (1, b):
            raise ValueError(f"mode 'text_context' needs null_context [B or 1, f, h, w, {cfg.vace_in_dim}] (the "
                             f"context of an all-zero video), got "
                             f"{None if null_context is None else tuple(null_context.shape)}")
    if keep is not None:
        m = keep.shape[1]
        if tuple(keep.shape) != (b, m, *x.shape[2:]) or m >= x.shape[1]:
            raise ValueError(f"keep_latents must be [B, m < {x.shape[1]}, {x.shape[2]}, {x.shape[3]}, "
                             f"{x.shape[4]}], got {tuple(keep.shape)}")


def _scale(name, value):
    """A guidance scale as the compiled sampler's input: a real scalar -> f32[] jax array (a tracer, from user jit
    code, is cast to f32; a jax.ShapeDtypeStruct spec becomes the f32[] spec). Concrete values go through the host,
    so every accepted value, of whatever Python or array type or placement, has the same abstract value and
    placement (f32[], not weakly typed, uncommitted) and reuses the one compile."""
    if isinstance(value, jax.ShapeDtypeStruct):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"{name} spec must be a floating scalar, got {value.dtype}{list(value.shape)}")
        return jax.ShapeDtypeStruct((), f32)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray, np.generic,
                                                                      jax.Array)):
        raise TypeError(f"{name} must be a real scalar (a float or a 0-d array), got {type(value).__name__} "
                        f"{value!r}")
    if np.shape(value) != ():
        raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}")
    dtype = jnp.result_type(value)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real scalar, got dtype {dtype}")
    if isinstance(value, jax.core.Tracer):
        return value.astype(f32)
    host = np.asarray(value, np.float32)
    if not np.isfinite(host):
        raise ValueError(f"{name} must be finite, got {value}")
    return jnp.asarray(host)


# ------------------------------------------------------------------------------------------------ one step
def _constrain_batch(plan: _Plan, a, *, tokens: bool = False):
    """On a mesh: the leading (branch x sample) axis over the longest prefix of the rules' "batch" mesh axes that
    divides it, the other axes replicated; tokens=True: `a` is [batch, tokens, D] (the VACE context's embedding)
    and its tokens are split over the mesh axes the "length" rule names (a context axis), as the blocks split them:
    replicating them would hold every token's [D] row on every device."""
    if plan.mesh is None:
        return a
    used = sharding.batch_mesh_axes(plan.rules, plan.mesh.shape, a.shape[0])
    lead = None if not used else used[0] if len(used) == 1 else tuple(used)
    rest = [None] * (a.ndim - 1)
    if tokens:
        target = sharding.normalize_rules(plan.rules).get("length")
        names, ways = [], 1
        for name in sharding.axes_of(target):
            if name in plan.mesh.shape and name not in used and not a.shape[1] % (ways * plan.mesh.shape[name]):
                names.append(name)
                ways *= plan.mesh.shape[name]
            else:
                break
        rest[0] = None if not names else names[0] if len(names) == 1 else tuple(names)
    spec = jax.sharding.PartitionSpec(lead, *rest)
    return jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(plan.mesh, spec))


def _embed(plan: _Plan, inputs: _Inputs, x, k) -> wan.Embedded:
    """Every branch's patch tokens and time embeddings at (x, grid step k): the batch is [n_branches * B]."""
    n = plan.n_branches
    x_all = _constrain_batch(plan, jnp.concatenate([x] * n, axis=0))
    t_all = jnp.full((n * x.shape[0],), jnp.asarray(plan.scheduler.timesteps, f32)[k], f32)
    return wan.embed(plan.cfg, inputs.params, x_all, t_all, lora=inputs.adapters, options=plan.options)


def _blocks(plan: _Plan, inputs: _Inputs, emb: wan.Embedded, k):
    """Every branch's block stack at grid step k (the residual stream before the head), with the per-video
    constants; CS-CFG's permuted branch embeds its context of step k here (see the module docstring)."""
    c_all = inputs.prepared.context
    if plan.mode == "cs_cfg":
        perm = _constrain_batch(plan, permute_context(null_context_key(inputs.perm_key, k), inputs.context))
        c_perm = wan.embed_context(plan.cfg, inputs.params, perm, lora=inputs.adapters, options=plan.options)
        c_all = jnp.concatenate([c_all, c_perm], axis=0)
    prepared = inputs.prepared.replace(context=_constrain_batch(plan, c_all, tokens=True))
    return wan.run_blocks(plan.cfg, inputs.params, emb, prepared, lora=inputs.adapters, options=plan.options)


def _sample_step(plan: _Plan, inputs: _Inputs, text_scale, context_scale, state: SamplerState, k):
    """Grid step k: the branches' velocities (TeaCache: the blocks skipped or not), guidance, a solver step, the
    pinned frames reset."""
    cache = state.cache
    emb = _embed(plan, inputs, state.x, k)
    if plan.cache == "teacache":
        e0 = time_modulation(plan.cfg, inputs.params, jnp.asarray(plan.scheduler.timesteps, f32)[k])
        compute, acc = teacache_decide(cache.e0, cache.acc, e0, k - plan.skip, plan.n_exec, plan.cache_threshold,
                                       plan.teacache_poly)

        def run():  # the head reads x_out itself (not x0 + (x_out - x0)): never skipping is exact
            x_out = _blocks(plan, inputs, emb, k)
            return x_out, x_out - emb.x0

        x_out, residual = jax.lax.cond(compute, run, lambda: (emb.x0 + cache.residual, cache.residual))
        cache = TeaCacheState(e0=e0, acc=acc, residual=residual)
    else:
        x_out = _blocks(plan, inputs, emb, k)
    return _finish(plan, inputs, text_scale, context_scale, state.replace(cache=cache), k, x_out, emb), None


def _finish(plan: _Plan, inputs: _Inputs, text_scale, context_scale, state: SamplerState, k, x_out, emb,
            active=True) -> SamplerState:
    """The rest of grid step k from the block stack's output x_out: the head (this step's time), guidance, a solver
    step, the pinned frames reset, progress (only if `active`)."""
    v_all = wan.apply_head(plan.cfg, inputs.params, x_out, emb, lora=inputs.adapters,
                           options=plan.options).astype(f32)
    v, g_state = guidance.combine(plan.mode, v_all, text_scale=text_scale, context_scale=context_scale,
                                  apg=plan.apg, state=state.guidance)
    x, solver_state = plan.scheduler.step(state.solver, state.x, v.astype(f32), k)
    if inputs.keep is not None:  # the pinned frames at the new noise level, with the run's own noise
        sigma = jnp.asarray(plan.sigmas)[k + 1]
        m = inputs.keep.shape[1]
        x = jnp.concatenate([(1 - sigma) * inputs.keep + sigma * inputs.keep_eps, x[:, m:]], axis=1)
    if plan.progress is not None:
        jax.debug.callback(lambda k, on: plan.progress(k) if on else None, k, active)
    return SamplerState(x=x, solver=solver_state, guidance=g_state, cache=state.cache)


def _schedule_segments(plan: _Plan):
    """The static schedule as scan inputs: per computed step its grid index and how many skipped steps follow."""
    comp = sorted(plan.cache_steps)
    after = [(comp[i + 1] if i + 1 < len(comp) else plan.n_exec) - c - 1 for i, c in enumerate(comp)]
    return np.asarray([plan.skip + c for c in comp], np.int32), np.asarray(after, np.int32)


def _segment(plan: _Plan, inputs: _Inputs, text_scale, context_scale, max_after: int, state: SamplerState, xs):
    """cache="static": a computed grid step k, then the n (<= max_after, static) skipped steps after it, each this
    step's patch tokens + k's block residual through this step's head. No lax.cond: the max_after sub-steps always
    run (embeddings, head, guidance and solver only: cheap) and those beyond n are masked out. ys: the residual's
    mean per-token L2 norm of every branch (magcache_schedule's calibration)."""
    k, n = xs
    emb = _embed(plan, inputs, state.x, k)
    x_out = _blocks(plan, inputs, emb, k)
    residual = x_out - emb.x0
    state = _finish(plan, inputs, text_scale, context_scale, state, k, x_out, emb)

    def skipped(j, st):
        kj = jnp.minimum(k + 1 + j, plan.steps - 1)  # masked sub-steps past the last step stay in range
        e = _embed(plan, inputs, st.x, kj)
        new = _finish(plan, inputs, text_scale, context_scale, st, kj, e.x0 + residual, e, active=j < n)
        return jax.tree.map(lambda a, b: jnp.where(j < n, a, b), new, st)

    if max_after:
        state = jax.lax.fori_loop(0, max_after, skipped, state)
    return state, jnp.mean(jnp.linalg.norm(residual, axis=-1), axis=1)


# ------------------------------------------------------------------------------------------------ one run
def _inputs(plan: _Plan, params, adapters, context, text, null_text, text_lens, null_text_lens, null_context,
            perm_key, keep, keep_eps) -> _Inputs:
    """Every branch's text padded to one length (the true lengths make the padding exact) and contexts, prepared
    once: the text K/V of every block and the fixed branches' context embeddings (`wan.prepare`)."""
    b, n_br = context.shape[0], plan.n_branches
    n = max(text.shape[1], null_text.shape[1])
    txt = _pad_text(jnp.broadcast_to(text, (b, *text.shape[1:])), n)
    nul = _pad_text(jnp.broadcast_to(null_text, (b, *null_text.shape[1:])), n)
    t_lens, n_lens = _lens(text_lens, b, text.shape[1]), _lens(null_text_lens, b, null_text.shape[1])
    text_all = _constrain_batch(plan, jnp.concatenate([txt, nul, nul][:n_br], axis=0))
    lens_all = jnp.concatenate([t_lens, n_lens, n_lens][:n_br], axis=0)
    context = context.astype(f32)
    if plan.mode == "text_context":
        fixed = jnp.concatenate([context, jnp.broadcast_to(null_context, context.shape).astype(f32)])
    else:
        fixed = jnp.concatenate([context] * min(n_br, 2), axis=0)
    prepared = wan.prepare(plan.cfg, params, text_all, _constrain_batch(plan, fixed), lora=adapters,
                           text_lens=lens_all, options=plan.options)
    prepared = prepared.replace(context=_constrain_batch(plan, prepared.context, tokens=True))
    return _Inputs(params=params, adapters=adapters, prepared=prepared, context=context, perm_key=perm_key, keep=keep,
                   keep_eps=keep_eps)


def _sample(plan: _Plan, params, adapters, source_latents, context, text, null_text, key, text_lens=None,
            null_text_lens=None, null_context=None, keep_latents=None, *, text_scale, context_scale):
    """The jitted sampler (make_sampler documents the arguments): latents [B, f, h, w, 16] fp32 (cache="calibrate":
    (latents, residual norms [n_exec, n_branches * B]))."""
    _check(plan.cfg, source_latents, context, text, null_text, null_context, keep_latents, plan.mode)
    text_scale, context_scale = _scale("text_scale", text_scale), _scale("context_scale", context_scale)
    pins = contextlib.nullcontext() if plan.mesh is None else sharding.rules_context(plan.mesh, plan.rules,
                                                                                      inside_jit=True)
    with pins:
        if plan.mesh is not None:
            stacked = wan.is_stacked(plan.cfg, params)
            params = jax.lax.with_sharding_constraint(params, sharding.tree_shardings(
                wan.param_axes(plan.cfg, stacked=stacked), plan.mesh, plan.rules,
                wan.param_shapes(plan.cfg, stacked=stacked)))
        k_noise, k_perm = jax.random.split(_as_key(key))
        x_src = source_latents.astype(f32)
        eps = jax.random.normal(k_noise, x_src.shape, f32)
        keep = keep_eps = None
        if keep_latents is not None and keep_latents.shape[1]:
            m = keep_latents.shape[1]
            keep, keep_eps = keep_latents.astype(f32), eps[:, :m]
            x_src = jnp.concatenate([keep, x_src[:, m:]], axis=1)
        inputs = _inputs(plan, params, adapters, context, text, null_text, text_lens, null_text_lens,
                         null_context, k_perm, keep, keep_eps)
        sigma0 = plan.sigmas[plan.skip]
        x0 = (1 - sigma0) * x_src + sigma0 * eps
        cache = None
        if plan.cache == "teacache":
            s = np.prod(x0.shape[1:4]) // np.prod(plan.cfg.patch_size)
            cache = TeaCacheState(e0=jnp.zeros((6 * plan.cfg.dim,), f32), acc=jnp.zeros((), f32),
                                  residual=jnp.zeros((plan.n_branches * x0.shape[0], int(s), plan.cfg.dim), f32))
        state = SamplerState(x=x0, solver=plan.scheduler.init(x0), guidance=guidance.init_state(x0), cache=cache)
        if plan.cache == "static":
            ks, after = _schedule_segments(plan)
            step = functools.partial(_segment, plan, inputs, text_scale, context_scale, int(after.max()))
            state, norms = jax.lax.scan(step, state, (jnp.asarray(ks), jnp.asarray(after)))
            return (state.x, norms) if plan.calibrate else state.x
        step = functools.partial(_sample_step, plan, inputs, text_scale, context_scale)
        state, _ = jax.lax.scan(step, state, jnp.arange(plan.skip, plan.steps))
        return state.x


# ------------------------------------------------------------------------------------------------ the sampler
@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """The compiled sampler with call-time guidance scales; returned by `make_sampler`.

    sampler(params, adapters, source_latents, context, text, null_text, key, text_lens=None,
            null_text_lens=None, null_context=None, keep_latents=None, *, text_scale=None, context_scale=None)

    text_scale / context_scale: real scalars (float, int, numpy or jax 0-d array, or a tracer), TRACED: passed to
    the jitted function as f32[] inputs, so one compile serves any values; None takes this sampler's defaults
    (`text_scale`, `context_scale`: f32[] arrays, the make_sampler values or `with_scales`'). Every other input is
    as make_sampler documents.

    `trace` and `lower` are jax's own stages of the jitted function, with the default scales filled in, and
    `jax.export.export(sampler)` works: the exported or `lower(...).compile()`d program takes the two scales as
    keyword inputs, explicitly (e.g. `text_scale=sampler.text_scale`).
    """

    _jit: Any  # jax.jit of `_sample` with the plan bound: one jit cache per make_sampler
    text_scale: jax.Array
    context_scale: jax.Array

    def _scales(self, kw: dict) -> dict:
        """kw with both scales filled in (defaults) and normalised to f32[] inputs."""
        ts, cs = kw.pop("text_scale", None), kw.pop("context_scale", None)
        return {**kw, "text_scale": self.text_scale if ts is None else _scale("text_scale", ts),
                "context_scale": self.context_scale if cs is None else _scale("context_scale", cs)}

    def __call__(self, *args, **kw):
        return self._jit(*args, **self._scales(kw))

    def trace(self, *args, **kw) -> jax.stages.Traced:
        return self._jit.trace(*args, **self._scales(kw))

    def lower(self, *args, **kw) -> jax.stages.Lowered:
        return self._jit.lower(*args, **self._scales(kw))

    def with_scales(self, text_scale=None, context_scale=None) -> "Sampler":
        """The same compiled function with other default scales (None keeps this sampler's): no new compile."""
        return Sampler(self._jit, self.text_scale if text_scale is None else _scale("text_scale", text_scale),
                       self.context_scale if context_scale is None else _scale("context_scale", context_scale))

    def _cache_size(self) -> int:
        """How many programs the jitted function has traced and compiled (one per input shape / static setting)."""
        return self._jit._cache_size()


def make_sampler(cfg: wan.WanConfig, solver: str = _DEFAULT.solver, steps: int = _DEFAULT.steps,
                 shift: float = _DEFAULT.shift, skip: int = _DEFAULT.skip, text_scale: float = _DEFAULT.text_scale,
                 context_scale: float = _DEFAULT.context_scale, apg: bool | str = _DEFAULT.apg, mesh=None,
                 mode: str = _DEFAULT.mode, cache: str | None = _DEFAULT.cache,
                 cache_threshold: float = _DEFAULT.cache_threshold, rules=None,
                 progress: Callable[[np.ndarray], None] | None = None, teacache_poly=None, cache_steps=None,
                 options: wan.Options | None = None) -> Sampler:
    """The compiled sampler (a `Sampler`) `sampler(params, adapters, source_latents, context, text, null_text, key,
    text_lens=None, null_text_lens=None, null_context=None, keep_latents=None, text_scale=None,
    context_scale=None) -> latents [B, f, h, w, 16]` (fp32). Defaults: `SamplerSettings`' (the paper's).

    Static (compiled in; a new value is a new make_sampler and a new compile): cfg, solver, steps, shift, skip,
    apg, mode, cache, cache_threshold, cache_steps, mesh, rules, progress, teacache_poly. Traced (call-time inputs):
    text_scale and context_scale, real scalars passed as f32[]; the values given here are only their defaults,
    so any scales, called in any order, share one compile. The number of guidance branches depends on `mode`
    only (`guidance.MODES`), never on the scale values (a scale of 1 or 0 still runs every branch of the mode).
    apg: True (PickStyle's APG, norm threshold 55 whatever the latent size), "scaled" (the same threshold per
    element, so exactly 55 at 81 x 480 x 832 and proportionally less on smaller latents; `guidance` explains),
    False (plain CS-CFG), or a `guidance.Apg`.

    source_latents: normalised VAE latents of the source [B, f, h, w, 16] (the reactive latent E(src));
    context: [B, f, h, w, 96] = [E(0) | E(src) | mask]; text: [B, L, text_dim] and null_text: [B or 1, L', text_dim]
    embeddings, with their true lengths in text_lens / null_text_lens (the prompt and the long negative prompt are
    padded to one length and folded exactly per sample); key: a PRNG key (typed or raw uint32), split into
    (k_noise, k_perm): eps ~ N(0, 1) from k_noise, and step k's null-context permutation (one for the whole batch)
    from fold_in(k_perm, k), so a seed reproduces the run exactly. adapters: a lora.Lora or None. null_context:
    mode "text_context" only.
    keep_latents: optional [B, m, h, w, 16], pinned as the first m latent frames: after every step they are reset
    to (1 - sigma) * keep + sigma * eps with the run's own noise, so the result holds them exactly and the other
    frames are generated consistently with them (long-video windows).

    mesh: shard the branch batch over the mesh's data axes and constrain the weights to the rules'
    (`sharding.DEFAULT_RULES` if None) layout: several devices then run the CFG branches in parallel.
    progress: a host callback called with the grid index after every step (jax.debug.callback); keep it None for
    jax.export, which cannot serialise host callbacks.
    teacache_poly: TeaCache's rescale polynomial (highest degree first); None: `teacache_polynomial(cfg)` (by model
    size).
    cache="static" with cache_steps: a schedule decided ahead of time (MagCache-style; `magcache_schedule` makes
    one): the executed-step indices (0 = the first executed step, which must be in it) whose blocks run; every other
    step reuses the last computed step's block residual as TeaCache does, with no lax.cond (the module docstring).
    None: every step. cache="calibrate" runs every step and returns (latents, norms [n_exec, n_branches * B]): the
    residuals' mean per-token norms that `magcache_schedule` takes. make_sampler API only (not a SamplerSettings
    choice).
    options: how the DiT runs (`wan.Options`, static; None: the backend default). The params' layout (flat or
    stacked) is read from the params themselves.
    """
    options = wan.Options.default() if options is None else options
    if mode not in guidance.MODES:
        raise ValueError(f"mode must be one of {tuple(guidance.MODES)}, got {mode!r}")
    if cache not in (None, "teacache", "static", "calibrate"):
        raise ValueError(f"cache must be None, 'teacache', 'static' or 'calibrate', got {cache!r}")
    if not 0 <= skip < steps:
        raise ValueError(f"skip must be in [0, steps) = [0, {steps}), got {skip}")
    n_exec = steps - skip
    if cache_steps is not None and cache != "static":
        raise ValueError(f"cache_steps is the schedule of cache='static', got cache={cache!r}")
    if cache == "static" and cache_steps is not None:
        cache_steps = tuple(sorted({int(c) for c in cache_steps}))
        if not cache_steps or cache_steps[0] != 0 or cache_steps[-1] >= n_exec:
            raise ValueError(f"cache_steps must be executed-step indices in [0, {n_exec}) starting with 0 (the "
                             f"first step computes the residual the next ones reuse), got {cache_steps}")
    scales = _scale("text_scale", text_scale), _scale("context_scale", context_scale)  # bad defaults fail here
    plan = _Plan(cfg=cfg, options=options, mode=mode, n_branches=guidance.MODES[mode], apg=guidance.apg_setting(apg),
                 scheduler=schedulers.make(solver, steps=steps, shift=shift), skip=skip, steps=steps,
                 cache="static" if cache == "calibrate" else cache,
                 cache_threshold=cache_threshold, cache_steps=cache_steps or tuple(range(n_exec)),
                 calibrate=cache == "calibrate", mesh=mesh,
                 teacache_poly=tuple(teacache_polynomial(cfg) if teacache_poly is None else teacache_poly),
                 rules=sharding.DEFAULT_RULES if rules is None else rules, progress=progress)
    return Sampler(jax.jit(functools.partial(_sample, plan)), *scales)
