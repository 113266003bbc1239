"""The jitted CS-CFG sampler of PickStyle and `Stylizer`, the video-in, video-out pipeline around it.

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
rescaled by the 14B polynomial and accumulated until it reaches the threshold. Unlike the reference it counts
executed steps (not calls), keys the cache by branch, always computes the first 5 and the last executed step, and
starts fresh in every sampler call. It is an approximation; leave it off for parity.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.resources
import numbers
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax import guidance, schedulers, sharding, sizing
from pickstyle_jax import lora as lora_lib
from pickstyle_jax import text as text_lib
from pickstyle_jax.models import autoencoders, layers, wan

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
    """(compute?, new accumulator): reference rule on the relative L1 change of e0, warm-up and last step forced."""
    prev, acc = tc["e0"], tc["acc"]
    rel = jnp.mean(jnp.abs(e0 - prev)) / jnp.maximum(jnp.mean(jnp.abs(prev)), 1e-12)
    acc = acc + jnp.polyval(jnp.asarray(poly, f32), jnp.where(i > 0, rel, 0.0))
    compute = (i < TEACACHE_WARMUP) | (i == n_exec - 1) | (acc >= threshold)
    return compute, jnp.where(compute, 0.0, acc)


# -------------------------------------------------------------------------------------------------- the sampler
def make_sampler(cfg: wan.WanConfig, solver: str = "dpm++", steps: int = 20, shift: float = 16.0, skip: int = 4,
                 text_scale: float = 5.0, context_scale: float = 4.0, apg: bool = True, mesh=None,
                 mode: str = "cs_cfg", cache: str | None = None, cache_threshold: float = 0.2, rules=None,
                 progress: Callable[[np.ndarray], None] | None = None, teacache_poly=TEACACHE_POLY_14B):
    """The compiled sampler (a `Sampler`) `sampler(params, adapters, source_latents, context, text, null_text, key,
    text_lens=None, null_text_lens=None, null_context=None, keep_latents=None, text_scale=None,
    context_scale=None) -> latents [B, f, h, w, 16]` (fp32).

    Static (compiled in; a new value is a new make_sampler and a new compile): cfg, solver, steps, shift, skip,
    apg, mode, cache, cache_threshold, mesh, rules, progress, teacache_poly. Traced (call-time inputs):
    text_scale and context_scale, real scalars passed as f32[]; the values given here are only their defaults,
    so any scales, called in any order, share one compile. The number of guidance branches depends on `mode`
    only, never on the scale values (a scale of 1 or 0 still runs every branch of the mode).

    source_latents: normalised VAE latents of the source [B, f, h, w, 16] (the reactive latent E(src));
    context: [B, f, h, w, 96] = [E(0) | E(src) | mask]; text: [B, L, text_dim] and null_text: [B or 1, L', text_dim]
    embeddings, with their true lengths in text_lens / null_text_lens (the prompt and the long negative prompt are
    padded to one length and folded exactly per sample); key: a PRNG key (typed or raw uint32), split into
    (k_noise, k_perm): eps ~ N(0, 1) from k_noise, and step k's null-context permutation (one for the whole batch)
    from fold_in(k_perm, k), so a seed reproduces the run exactly. adapters: a lora.Lora or None. null_context: mode "text_context" only.
    keep_latents: optional [B, m, h, w, 16], pinned as the first m latent frames: after every step they are reset
    to (1 - sigma) * keep + sigma * eps with the run's own noise, so the result holds them exactly and the other
    frames are generated consistently with them (long-video windows).

    mesh: shard the branch batch over the mesh's data axes and constrain the weights to the rules'
    (`sharding.DEFAULT_RULES` if None) layout: several devices then run the CFG branches in parallel.
    progress: a host callback called with the grid index after every step (jax.debug.callback); keep it None for
    jax.export, which cannot serialise host callbacks.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
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
            params = jax.lax.with_sharding_constraint(
                params, sharding.tree_shardings(wan.param_axes(cfg), mesh, rules, wan.param_shapes(cfg)))
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
                            text_lens=lens_all)
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
class CompatibilityError(ValueError):
    """Checkpoints that cannot work together (a LoRA or VAE of another variant than the DiT)."""


def _meta_config(path, kind: str | tuple[str, ...]):
    """The config in `path`'s config.json, whose kind must be `kind` (or one of them)."""
    from pickstyle_jax import checkpoints

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind if isinstance(kind, str) else kind[0]} checkpoint {path} does not exist")
    meta = checkpoints.read_meta(path)
    return checkpoints.config_from_dict(checkpoints.check_kind(path, meta, kind), meta["config"])


def check_lora(cfg: wan.WanConfig, adapters, where="the LoRA") -> None:
    """Raises CompatibilityError unless every adapter sits on a Dense layer of `cfg` with matching shapes."""
    shapes = wan.param_shapes(cfg)
    bad = []
    for path in lora_lib.adapter_paths(adapters):
        node = shapes
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        ad = functools.reduce(lambda t, p: t[p], path.split("."), adapters.params)
        if not isinstance(node, dict) or "kernel" not in node:
            bad.append(f"{path}: no such layer in this DiT")
            continue
        want = tuple(node["kernel"].shape)
        got = (ad["A"].shape[0], ad["B"].shape[1])
        if got != want:
            bad.append(f"{path}: adapter maps {got[0]} -> {got[1]}, the DiT layer {want[0]} -> {want[1]}")
    if bad:
        raise CompatibilityError(f"{where} does not fit this DiT (dim {cfg.dim}, {cfg.num_layers} layers, "
                                 f"{len(cfg.vace_layers)} VACE blocks): it was trained for another variant. "
                                 f"{len(bad)} mismatches, e.g. " + "; ".join(bad[:3]))


def check_compatible(cfg: wan.WanConfig, vae_cfg, text_cfg=None) -> None:
    if not cfg.has_vace:
        raise CompatibilityError("the DiT has no VACE blocks (a text-to-video checkpoint?); stylisation needs a "
                                 "Wan2.1-VACE DiT")
    if vae_cfg.z_dim != cfg.in_dim or 2 * vae_cfg.z_dim + 64 != cfg.vace_in_dim or vae_cfg.spatial_factor != 8:
        raise CompatibilityError(f"the VAE (z_dim {vae_cfg.z_dim}, x{vae_cfg.spatial_factor}) does not fit the DiT "
                                 f"(in_dim {cfg.in_dim}, vace_in_dim {cfg.vace_in_dim}): another model family")
    if text_cfg is not None and text_cfg.d_model != cfg.text_dim:
        raise CompatibilityError(f"the text encoder's width {text_cfg.d_model} is not the DiT's text_dim "
                                 f"{cfg.text_dim}: another variant")


# module-level, config static: every Stylizer with the same VAE config shares the compiles
_vae_encode = jax.jit(autoencoders.encode, static_argnums=0)
_vae_decode = jax.jit(autoencoders.decode, static_argnums=0)


def _to_pixels(frames_u8):
    return jnp.asarray(frames_u8, f32)[None] / 127.5 - 1.0


def _to_uint8(video):
    return np.asarray(jnp.round((jnp.clip(video, -1, 1) + 1) * 127.5)).astype(np.uint8)


class Stylizer:
    """Source frames + style prompt -> stylised frames, with loaded weights and cached compiles.

    stylizer = Stylizer.load(dit=DIR, vae=DIR, umt5=DIR, tokenizer="spiece.model" | "bytes", lora=DIR)
    frames = stylizer(frames_uint8 [F, H, W, 3], "Anime style. ...")        # [F', H', W', 3] uint8
    frames, info = stylizer.run(...)                                        # info: sizes, windows, timings
    """

    def __init__(self, cfg, params, adapters, vae_cfg, vae_params, text_cfg, text_params, tokenizer, *,
                 mesh=None, rules=None):
        check_compatible(cfg, vae_cfg, text_cfg)
        if adapters is not None:
            check_lora(cfg, adapters)
        self.cfg, self.params, self.adapters = cfg, params, adapters
        self.vae_cfg, self.vae_params = vae_cfg, vae_params
        self.text_cfg, self.text_params, self.tokenizer = text_cfg, text_params, tokenizer
        self.mesh, self.rules = mesh, rules
        self._samplers: dict = {}
        self._zero: dict = {}
        self._null = None
        self._bar = None
        self._encode = functools.partial(_vae_encode, vae_cfg)
        self._decode = functools.partial(_vae_decode, vae_cfg)

    @classmethod
    def load(cls, dit, vae, umt5, tokenizer, lora=None, dtype=None, mesh=None, rules=None) -> "Stylizer":
        """Reads converted checkpoints; every compatibility check runs on config.json and the (small) LoRA before
        the big weights are read, and long before anything compiles."""
        from pickstyle_jax import checkpoints
        from pickstyle_jax.models import tokenizer as tokenizer_lib

        cfg = _meta_config(dit, "wan")
        vae_cfg, text_cfg = _meta_config(vae, checkpoints.AUTOENCODER_KINDS), _meta_config(umt5, "umt5")
        check_compatible(cfg, vae_cfg, text_cfg)
        adapters = None
        if lora:
            _meta_config(lora, "lora")
            adapters = checkpoints.load_lora(lora)
            check_lora(cfg, adapters, where=f"the LoRA {lora}")
        tok = tokenizer_lib.load_tokenizer(str(tokenizer))
        if tok.vocab_size > text_cfg.vocab_size:
            raise CompatibilityError(f"tokenizer {tokenizer!r} has {tok.vocab_size} ids, the text encoder only "
                                     f"{text_cfg.vocab_size}")
        shard_fn = None
        if mesh is not None:
            rules_ = sharding.DEFAULT_RULES if rules is None else rules
            tree = sharding.tree_shardings(wan.param_axes(cfg), mesh, rules_, wan.param_shapes(cfg))
            shard_fn = lambda path, _: functools.reduce(lambda t, p: t[p], path, tree)  # noqa: E731
        cfg, params = checkpoints.load_dit(dit, dtype=dtype, sharding=shard_fn)
        vae_cfg, vae_params = checkpoints.load_vae(vae)
        text_cfg, text_params = checkpoints.load_umt5(umt5)
        return cls(cfg, params, adapters, vae_cfg, vae_params, text_cfg, text_params, tok, mesh=mesh, rules=rules)

    # ---------------------------------------------------------------------------------------------- pieces
    def sampler(self, **settings) -> Sampler:
        """The sampler for these settings (make_sampler's keywords; progress: True/False). Samplers are cached by
        the static settings only: text_scale / context_scale (CALL_TIME_SETTINGS) become the returned sampler's
        call-time defaults, so every scale pair of one static setting shares one compile."""
        scales = {k: settings.pop(k) for k in CALL_TIME_SETTINGS if k in settings}
        key = tuple(sorted(settings.items()))
        if key not in self._samplers:
            progress = self._on_step if settings.pop("progress", False) else None
            self._samplers[key] = make_sampler(self.cfg, mesh=self.mesh, rules=self.rules, progress=progress,
                                               **settings)
        return self._samplers[key].with_scales(**scales)

    def _on_step(self, k):
        if self._bar is not None:
            self._bar.update(1)

    def encode_prompt(self, prompt: str):
        """(emb [1, n, text_dim], lens [1]): the umT5 rows, cut to the power-of-two bucket holding the prompt."""
        emb, lens = text_lib.encode_text(self.text_cfg, self.text_params, self.tokenizer, [prompt],
                                         text_len=self.cfg.text_len)
        n = text_lib.bucket_length(int(lens.max()), self.cfg.text_len)
        return emb[:, :n], jnp.asarray(lens)

    def null_text(self):
        if self._null is None:
            self._null = self.encode_prompt(NEGATIVE_PROMPT)
        return self._null

    def zero_latents(self, frames: int, height: int, width: int):
        """E(all-zero video) [1, f, h, w, 16]: a constant, but not zero (the latents are normalised); cached."""
        k = (frames, height, width)
        if k not in self._zero:
            self._zero[k] = self._encode(self.vae_params, jnp.zeros((1, frames, height, width, 3), f32))
        return self._zero[k]

    def _sample_clip(self, clip_u8, text, null, key, sampler, mode, keep=None):
        """One clip [F, H, W, 3] uint8 -> decoded video [F, H, W, 3] in [-1, 1] (jax array)."""
        f, h, w, _ = clip_u8.shape
        z_src = self._encode(self.vae_params, _to_pixels(clip_u8))
        z_zero = self.zero_latents(f, h, w)
        ones = jnp.ones((*z_src.shape[:4], 64), f32)
        context = jnp.concatenate([z_zero, z_src, ones], axis=-1)
        null_ctx = jnp.concatenate([z_zero, z_zero, ones], axis=-1) if mode == "text_context" else None
        z = sampler(self.params, self.adapters, z_src, context, text[0], null[0], key, text_lens=text[1],
                    null_text_lens=null[1], null_context=null_ctx, keep_latents=keep)
        return self._decode(self.vae_params, z)[0]

    # --------------------------------------------------------------------------------------------- public
    def __call__(self, frames, prompt, **kw) -> np.ndarray:
        return self.run(frames, prompt, **kw)[0]

    def run(self, frames, prompt: str, steps: int = 20, shift: float = 16.0, skip: int = 4,
            text_scale: float = 5.0, context_scale: float = 4.0, seed: int = 2025, solver: str = "dpm++",
            size="480p", max_frames: int = 81, long: str | None = None, cache: str | None = None,
            cache_threshold: float = 0.2, mode: str = "cs_cfg", apg: bool = True, progress: bool | None = None):
        """(frames uint8 [F', H', W', 3], info dict). See the module docstring and `sizing` for the rules."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
        if frames.shape[0] == 0:
            raise ValueError("the video has zero frames")
        if long not in (None, "chunked"):
            raise ValueError(f"long must be None or 'chunked', got {long!r}")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        settings = dict(solver=solver, steps=int(steps), shift=float(shift), skip=int(skip),
                        text_scale=float(text_scale), context_scale=float(context_scale), apg=bool(apg), mode=mode,
                        cache=cache, cache_threshold=float(cache_threshold), progress=bool(progress))
        sampler = self.sampler(**settings)  # validates the settings; compiles once per static setting
        n_in, h_in, w_in, _ = frames.shape
        plan = sizing.plan(n_in, h_in, w_in, size=size, max_frames=max_frames, keep_frames=long == "chunked")
        if long == "chunked":
            win = sizing.windows(n_in, max_frames)
        else:
            win = sizing.Windows(plan.frames, plan.frames, 0, (0,))
        timing = {}
        t0 = time.perf_counter()
        text, null = self.encode_prompt(prompt), self.null_text()
        timing["text_s"] = time.perf_counter() - t0

        src = sizing.resize_crop(frames[np.asarray(plan.indices)], plan.height, plan.width)
        src = sizing.mirror_pad(src, win.padded)
        key = jax.random.key(int(seed))
        n_exec = settings["steps"] - settings["skip"]
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=n_exec * len(win.starts), unit="step", desc="stylize")
        t0 = time.perf_counter()
        try:
            out, tail = None, None
            for i, s in enumerate(win.starts):
                keep = None if tail is None else self._encode(self.vae_params, tail[None])
                video = np.asarray(self._sample_clip(src[s: s + win.length], text, null,
                                                     key if i == 0 else jax.random.fold_in(key, i), sampler, mode,
                                                     keep))
                if out is None:
                    out = np.zeros((win.padded, *video.shape[1:]), np.float32)
                    out[: win.length] = video
                else:  # cross-fade the shared frames linearly from the earlier window into this one
                    o = win.overlap
                    r = (np.arange(1, o + 1, dtype=np.float32) / (o + 1))[:, None, None, None]
                    out[s: s + o] = (1 - r) * out[s: s + o] + r * video[:o]
                    out[s + o: s + win.length] = video[o:]
                tail = video[win.length - win.overlap:] if win.overlap else None
            jax.effects_barrier()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        timing["sample_s"] = time.perf_counter() - t0
        result = _to_uint8(out[: win.n] if long == "chunked" else out[: plan.frames])
        info = {**{k: v for k, v in settings.items() if k != "progress"}, "seed": int(seed), "size": str(size),
                "max_frames": int(max_frames), "long": long, "frames_in": int(n_in), "frames_out": int(len(result)),
                "height": int(plan.height), "width": int(plan.width), "window": int(win.length),
                "window_starts": list(win.starts), "overlap": int(win.overlap), "timing": timing}
        return result, info
