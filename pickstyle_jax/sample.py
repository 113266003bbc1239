"""The jitted CS-CFG sampler of PickStyle. `Stylizer`, the video-in, video-out pipeline around it, and its
compatibility checks live in stylizer.py; `sample.Stylizer`, `sample.CompatibilityError`, `sample.check_lora`
and `sample.check_compatible` still work, resolved from there on first use (the end of this file).

    sampler = sample.make_sampler(cfg, solver="dpm++", steps=20, shift=16.0, skip=4)
    latents = sampler(params, adapters, source_latents, context, text, null_text, key,
                      text_lens=lens, null_text_lens=null_lens)
    latents = sampler(..., text_scale=3.0, context_scale=2.5)       # same compile: the scales are traced

`make_sampler` returns a `Sampler` around ONE jitted pure function: a `lax.scan` over the executed steps
k = skip .. steps-1 whose body runs every guidance branch as one batched DiT forward (batch n_branches * B,
branch-major), combines them with `guidance`, and takes a solver step. Parameters, adapters and inputs are
arguments, never closed-over constants, so one compile serves any weights, and the function can be called from
jitted user code or exported (`jax.export`). The guidance scales are traced inputs too (f32[] scalars;
make_sampler's values are only the call-time defaults), so one compile serves any scales; everything else
make_sampler takes (solver, steps, skip, mode, apg, cache, ...) is static and compiled in.

Branches (mode "cs_cfg"): v_c = v(text, z), v_nt = v(null text, z), v_n = v(null text, z~), where z~ permutes the
context's latent frames, rows and columns with three independent permutations shared by all 96 channels, drawn
fresh every step from fold_in(key, k): a factorised shuffle that keeps the context's statistics but breaks its
alignment with the video, reproducible for a seed. "text": (text, z), (null, z). "text_context": (text, z),
(null, null_context = the context of an all-zero video). "none": (text, z) only.

Start (partial noise): x = (1 - sigma_skip) * source_latents + sigma_skip * eps, eps ~ N(0, 1) in fp32 from the key;
the solver starts at index `skip` with a fresh state, so its first step is first order.

TeaCache (cache="teacache") is the *output-level* variant: `wan.forward` is one fused function with no residual
hook, so instead of the reference's block residual (x_out - x_in across all blocks, re-added to the new patch
embedding) the cache holds every branch's last velocity and returns it when skipping. The decision is the
reference's: the relative L1 change of the timestep modulation e0 (computed here from the time-embedding weights),
rescaled by the 14B polynomial and accumulated until it reaches the threshold; a skipped step reuses every branch's
cached velocity exactly (the guidance, APG's momentum included, and the solver step still run). Unlike the reference
it counts executed steps (not calls), keys the cache by branch, always computes the first 5 and the last executed
step, and starts fresh in every sampler call. cache_threshold <= 0 never skips (it equals the uncached sampler
exactly): the polynomial's constant term is negative (-0.042), so a plain `acc >= threshold` test would skip
nearly-equal steps even at threshold 0. It is an approximation; leave it off for parity.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax import guidance, schedulers, sharding
from pickstyle_jax.models import layers, wan

f32 = jnp.float32

__all__ = ["NEGATIVE_PROMPT", "make_sampler", "Sampler", "CALL_TIME_SETTINGS", "permute_context",
           "null_context_key", "time_modulation", "TEACACHE_POLY_14B", "Stylizer", "CompatibilityError", "check_lora",
           "check_compatible"]

# Wan's default negative prompt (`sample_neg_prompt` of the official shared config), the CS-CFG null text.
NEGATIVE_PROMPT = (importlib.resources.files("pickstyle_jax") / "wan_negative_prompt.txt").read_bytes() \
    .decode("utf-8").rstrip("\n")

# TeaCache rescale polynomial of Wan2.1-14B with "ret-steps" (modulated input = e0), highest degree first.
TEACACHE_POLY_14B = (8.10705460e3, 2.13393892e3, -3.72934672e2, 1.66203073e1, -4.17769401e-2)
TEACACHE_WARMUP = 5  # executed steps always computed at the start

MODES = ("cs_cfg", "text", "text_context", "none")
# make_sampler settings that are traced call-time inputs of the compiled sampler (not part of a compile's key)
CALL_TIME_SETTINGS = ("text_scale", "context_scale")


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


def _check(cfg, x, context, text, null_text, null_context, mode):
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


def _batch_spec(mesh, rules, a):
    """The leading (branch x sample) axis over the longest prefix of the rules' "batch" mesh axes that divides it
    (3 branches of one sample on 2 devices stay replicated rather than fail), the other axes replicated."""
    target = rules.get("batch")
    names = [t for t in ((target,) if isinstance(target, str) else tuple(target or ())) if t in mesh.shape]
    used, size = [], 1
    for name in names:
        if a.shape[0] % (size * mesh.shape[name]):
            break
        used.append(name)
        size *= mesh.shape[name]
    lead = None if not used else used[0] if len(used) == 1 else tuple(used)
    return jax.sharding.PartitionSpec(lead, *([None] * (a.ndim - 1)))


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


class Sampler:
    """The compiled sampler with call-time guidance scales; returned by `make_sampler`.

    sampler(params, adapters, source_latents, context, text, null_text, key, text_lens=None,
            null_text_lens=None, null_context=None, keep_latents=None, *, text_scale=None, context_scale=None)

    text_scale / context_scale: real scalars (float, int, numpy or jax 0-d array, or a tracer), TRACED: passed to
    the jitted function as f32[] inputs, so one compile serves any values; None takes this sampler's default (the
    make_sampler values, or `with_scales`'). Every other input is as make_sampler documents.

    It is a `jax.stages.Wrapped` (as jax.jit returns): `trace` and `lower` take the same arguments, and
    `jax.export.export(sampler)` works; an exported or `lower(...).compile()`d sampler has the two scales as
    inputs too (`lower(...).compile()` here fills in the defaults like the sampler does; an `Exported`'s `call`
    needs them explicitly, as keywords).
    """

    def __init__(self, jitted, text_scale=5.0, context_scale=4.0):
        self._jit = jitted
        self.text_scale = _scale("text_scale", text_scale)
        self.context_scale = _scale("context_scale", context_scale)

    def _kwargs(self, kw: dict) -> dict:
        """kw with both scales filled in (defaults) and normalised to f32[] inputs."""
        ts, cs = kw.pop("text_scale", None), kw.pop("context_scale", None)
        return {**kw, "text_scale": self.text_scale if ts is None else _scale("text_scale", ts),
                "context_scale": self.context_scale if cs is None else _scale("context_scale", cs)}

    def __call__(self, *args, **kw):
        return self._jit(*args, **self._kwargs(kw))

    def trace(self, *args, **kw):
        return self._jit.trace(*args, **self._kwargs(kw))

    def lower(self, *args, **kw):
        return _Lowered(self._jit.lower(*args, **self._kwargs(kw)), self._kwargs)

    def with_scales(self, text_scale=None, context_scale=None) -> "Sampler":
        """The same compiled function with other default scales (None keeps this sampler's): no new compile."""
        return Sampler(self._jit, self.text_scale if text_scale is None else text_scale,
                       self.context_scale if context_scale is None else context_scale)

    def _cache_size(self) -> int:
        """How many programs the jitted function has traced and compiled (one per input shape / static setting)."""
        return self._jit._cache_size()


class _Lowered:
    """jax's Lowered, whose compile() gives a compiled sampler that fills in the default scales as `Sampler` does."""

    def __init__(self, lowered, fill):
        self._lowered, self._fill = lowered, fill

    def __getattr__(self, name):
        return getattr(self._lowered, name)

    def compile(self, *args, **kw):
        return _Compiled(self._lowered.compile(*args, **kw), self._fill)


class _Compiled:
    """jax's Compiled, called like `Sampler` (default scales filled in); other attributes are the Compiled's."""

    def __init__(self, compiled, fill):
        self._compiled, self._fill = compiled, fill

    def __getattr__(self, name):
        return getattr(self._compiled, name)

    def __call__(self, *args, **kw):
        return self._compiled(*args, **self._fill(kw))


def _teacache_decide(tc, e0, i, n_exec, threshold, poly):
    """(compute?, new accumulator): reference rule on the relative L1 change of e0, warm-up and last step forced;
    a threshold <= 0 computes every step (the polynomial can be negative, so `acc >= 0` alone would not)."""
    prev, acc = tc["e0"], tc["acc"]
    rel = jnp.mean(jnp.abs(e0 - prev)) / jnp.maximum(jnp.mean(jnp.abs(prev)), 1e-12)
    acc = acc + jnp.polyval(jnp.asarray(poly, f32), jnp.where(i > 0, rel, 0.0))
    compute = (i < TEACACHE_WARMUP) | (i == n_exec - 1) | (acc >= threshold) | (threshold <= 0)
    return compute, jnp.where(compute, 0.0, acc)


# -------------------------------------------------------------------------------------------------- the sampler
def make_sampler(cfg: wan.WanConfig, solver: str = "dpm++", steps: int = 20, shift: float = 16.0, skip: int = 4,
                 text_scale: float = 5.0, context_scale: float = 4.0, apg: bool | str = True, mesh=None,
                 mode: str = "cs_cfg", cache: str | None = None, cache_threshold: float = 0.2, rules=None,
                 progress: Callable[[np.ndarray], None] | None = None, teacache_poly=TEACACHE_POLY_14B,
                 options: wan.Options | None = None):
    """The compiled sampler (a `Sampler`) `sampler(params, adapters, source_latents, context, text, null_text, key,
    text_lens=None, null_text_lens=None, null_context=None, keep_latents=None, text_scale=None,
    context_scale=None) -> latents [B, f, h, w, 16]` (fp32).

    Static (compiled in; a new value is a new make_sampler and a new compile): cfg, solver, steps, shift, skip,
    apg, mode, cache, cache_threshold, mesh, rules, progress, teacache_poly. Traced (call-time inputs):
    text_scale and context_scale, real scalars passed as f32[]; the values given here are only their defaults,
    so any scales, called in any order, share one compile. The number of guidance branches depends on `mode`
    only, never on the scale values (a scale of 1 or 0 still runs every branch of the mode). apg: True
    (PickStyle's APG, norm threshold 55 whatever the latent size), "scaled" (the same threshold per element, so
    exactly 55 at 81 x 480 x 832 and proportionally less on smaller latents; `guidance` explains), False (plain
    CS-CFG), or a `guidance.Apg`.

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
    options: how the DiT runs (`wan.Options`, static; None: the backend default). The params' layout (flat or
    stacked) is read from the params themselves.
    """
    options = wan.Options.default() if options is None else options
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    apg = guidance.apg_setting(apg)
    if cache not in (None, "teacache"):
        raise ValueError(f"cache must be None or 'teacache', got {cache!r}")
    if not 0 <= skip < steps:
        raise ValueError(f"skip must be in [0, steps) = [0, {steps}), got {skip}")
    _scale("text_scale", text_scale), _scale("context_scale", context_scale)  # bad defaults fail here, not later
    sch = schedulers.make(solver, steps=steps, shift=shift)
    sigmas = np.asarray(sch.sigmas, np.float32)
    ts = np.asarray(sch.timesteps, np.float32)
    n_branches = guidance.MODES[mode]
    n_exec = steps - skip
    rules = sharding.DEFAULT_RULES if rules is None else rules

    def constrain_batch(a):
        if mesh is None:
            return a
        return jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(mesh, _batch_spec(mesh, rules, a)))

    def run(params, adapters, source_latents, context, text, null_text, key, text_lens=None, null_text_lens=None,
            null_context=None, keep_latents=None, *, text_scale, context_scale):
        _check(cfg, source_latents, context, text, null_text, null_context, mode)
        scales = (_scale("text_scale", text_scale), _scale("context_scale", context_scale))  # traced f32[]
        pins = contextlib.nullcontext() if mesh is None else sharding.rules_context(mesh, rules, inside_jit=True)
        with pins:
            return _run(params, adapters, source_latents, context, text, null_text, key, text_lens, null_text_lens,
                        null_context, keep_latents, scales)

    def _run(params, adapters, source_latents, context, text, null_text, key, text_lens, null_text_lens,
             null_context, keep_latents, scales):
        s_text, s_ctx = scales
        if mesh is not None:
            stacked = wan.is_stacked(cfg, params)
            params = jax.lax.with_sharding_constraint(params, sharding.tree_shardings(
                wan.param_axes(cfg, stacked=stacked), mesh, rules, wan.param_shapes(cfg, stacked=stacked)))
        key = _as_key(key)
        k_noise, k_perm = jax.random.split(key)
        x_src = source_latents.astype(f32)
        b = x_src.shape[0]
        eps = jax.random.normal(k_noise, x_src.shape, f32)

        m = 0 if keep_latents is None else keep_latents.shape[1]
        if m:
            if tuple(keep_latents.shape) != (b, m, *x_src.shape[2:]) or m >= x_src.shape[1]:
                raise ValueError(f"keep_latents must be [B, m < {x_src.shape[1]}, {x_src.shape[2]}, "
                                 f"{x_src.shape[3]}, {x_src.shape[4]}], got {tuple(keep_latents.shape)}")
            keep = keep_latents.astype(f32)
            x_src = jnp.concatenate([keep, x_src[:, m:]], axis=1)

        def pin(x, sigma):
            if not m:
                return x
            return jnp.concatenate([(1 - sigma) * keep + sigma * eps[:, :m], x[:, m:]], axis=1)

        # text of every branch, padded to one length; the true lengths make the padding exact
        n = max(text.shape[1], null_text.shape[1])
        txt = _pad_text(jnp.broadcast_to(text, (b, *text.shape[1:])), n)
        nul = _pad_text(jnp.broadcast_to(null_text, (b, *null_text.shape[1:])), n)
        t_lens, n_lens = _lens(text_lens, b, text.shape[1]), _lens(null_text_lens, b, null_text.shape[1])
        text_all = jnp.concatenate([txt, nul, nul][:n_branches], axis=0)
        lens_all = jnp.concatenate([t_lens, n_lens, n_lens][:n_branches], axis=0)
        text_all = constrain_batch(text_all)
        context = context.astype(f32)
        if mode == "text_context":
            fixed_ctx = jnp.concatenate([context, jnp.broadcast_to(null_context, context.shape).astype(f32)])
        else:
            fixed_ctx = jnp.concatenate([context] * min(n_branches, 2), axis=0)

        sig_j, ts_j = jnp.asarray(sigmas), jnp.asarray(ts)

        def velocities(x, k):
            ctx = fixed_ctx
            if mode == "cs_cfg":
                ctx = jnp.concatenate([ctx, permute_context(null_context_key(k_perm, k), context)], axis=0)
            x_all = constrain_batch(jnp.concatenate([x] * n_branches, axis=0))
            t_all = jnp.full((n_branches * b,), ts_j[k], f32)
            v = wan.forward(cfg, params, x_all, t_all, text_all, constrain_batch(ctx), lora=adapters,
                            text_lens=lens_all, options=options)
            return v.astype(f32)

        def body(carry, k):
            x, sch_state, g_state, tc = carry
            if cache == "teacache":
                i = k - skip
                e0 = time_modulation(cfg, params, ts_j[k])
                compute, acc = _teacache_decide(tc, e0, i, n_exec, cache_threshold, teacache_poly)
                v_all = jax.lax.cond(compute, lambda: velocities(x, k), lambda: tc["v"])
                tc = {"e0": e0, "acc": acc, "v": v_all}
            else:
                v_all = velocities(x, k)
            v, g_state = guidance.combine(mode, v_all, text_scale=s_text, context_scale=s_ctx, apg=apg,
                                          state=g_state)
            x, sch_state = sch.step(sch_state, x, v.astype(f32), k)
            x = pin(x, sig_j[k + 1])
            if progress is not None:
                jax.debug.callback(progress, k)
            return (x, sch_state, g_state, tc), None

        x0 = (1 - sigmas[skip]) * x_src + sigmas[skip] * eps
        g_state = guidance.init_state(x0)
        tc = {}
        if cache == "teacache":
            tc = {"e0": jnp.zeros((6 * cfg.dim,), f32), "acc": jnp.zeros((), f32),
                  "v": jnp.zeros((n_branches * b, *x0.shape[1:]), f32)}
        carry = (x0, sch.init(x0), g_state, tc)
        (x, *_), _ = jax.lax.scan(body, carry, jnp.arange(skip, steps))
        return x

    return Sampler(jax.jit(run), text_scale, context_scale)


# ------------------------------------------------------------------------------------------------- Stylizer
# stylizer.py imports this module at load time; this one imports stylizer.py only here, when one of its names is
# first asked for (PEP 562), so the dependency is one-way and no import order can meet a half-loaded module.
_STYLIZER_NAMES = ("Stylizer", "CompatibilityError", "check_lora", "check_compatible")


def __getattr__(name):
    if name in _STYLIZER_NAMES:
        from pickstyle_jax import stylizer

        return getattr(stylizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_STYLIZER_NAMES})
