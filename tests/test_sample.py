"""The jitted sampler: batched branches = separate forwards + guidance + solver, seeds, the null-context
permutation, jax.export, TeaCache, call-time (traced) guidance scales, and the null text."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pickstyle_jax import conditioning, guidance, lora, sample, schedulers
from pickstyle_jax.sample import sampler as sampler_lib
from pickstyle_jax.models import vae, wan
from tests.conftest import SEED  # printed, replayable with PICKSTYLE_TEST_SEED

ROOT = str(Path(__file__).resolve().parents[1])
SHARED_PROMPT = Path(__file__).resolve().parents[2] / "shared" / "wan_negative_prompt.txt"
CFG = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0,))  # few layers: quick compiles
SHAPE = (1, 3, 4, 6)  # B, f, h, w


@pytest.fixture(scope="module")
def world():
    seed = SEED % 65536
    print(f"world seed {seed}")
    rng = np.random.default_rng(seed)
    # every tensor random (zero-initialised heads would hide bugs); numpy keeps the setup free of compiles
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape, dtype=np.float32)),
                          wan.param_shapes(CFG))
    adapters = lora.init(lora.LoraConfig(rank=4, alpha=4), wan.param_shapes(CFG), jax.random.key(seed))
    adapters = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape, dtype=np.float32)), adapters)
    src = rng.standard_normal((*SHAPE, 16), dtype=np.float32)
    ctx = rng.standard_normal((*SHAPE, 96), dtype=np.float32)
    text = rng.standard_normal((1, 7, CFG.text_dim), dtype=np.float32)
    null = rng.standard_normal((1, 11, CFG.text_dim), dtype=np.float32)
    lens = dict(text_lens=np.array([5], np.int32), null_text_lens=np.array([9], np.int32))
    sampler = sample.make_sampler(CFG, steps=3, skip=1)
    return dict(params=params, adapters=adapters, src=src, ctx=ctx, text=text, null=null, lens=lens,
                sampler=sampler, seed=seed)


def _run(w, sampler=None, key=0, **kw):
    s = sampler or w["sampler"]
    return np.asarray(s(w["params"], w["adapters"], w["src"], w["ctx"], w["text"], w["null"], jax.random.key(key),
                        **{**w["lens"], **kw}))


@pytest.mark.parametrize("apg", [True, "scaled"])
def test_batched_branches_equal_separate_forwards(world, apg):
    # "scaled" checks that the sampler's APG sees per-sample latents [f, h, w, 16] (its threshold depends on their
    # size: 55 sqrt(1152 / 2096640) = 1.29 here, which clips, while 55 does not)
    w = world
    got = _run(w, sample.make_sampler(CFG, steps=3, skip=1, apg=apg) if apg == "scaled" else None, key=w["seed"])
    # the reference loop: three separate batch-1 forwards per step, then guidance, then the solver
    k_noise, k_perm = jax.random.split(jax.random.key(w["seed"]))
    sch = schedulers.make("dpm++", steps=3, shift=16.0)
    eps = jax.random.normal(k_noise, w["src"].shape, jnp.float32)
    x = (1 - sch.sigmas[1]) * w["src"] + sch.sigmas[1] * eps
    pad = lambda a: np.pad(a, ((0, 0), (0, 11 - a.shape[1]), (0, 0)))  # noqa: E731
    fwd = jax.jit(lambda x, t, tx, c, n: wan.forward(CFG, w["params"], x, t, tx, c, lora=w["adapters"],
                                                     text_lens=n))
    state, g = sch.init(x), guidance.init_state(x)
    for k in (1, 2):  # the first executed step is first order (fresh state), the last lands on sigma 0
        t = np.full((1,), sch.timesteps[k], np.float32)
        ctx_null = sample.permute_context(sample.null_context_key(k_perm, k), w["ctx"])
        v_c = fwd(x, t, pad(w["text"]), w["ctx"], w["lens"]["text_lens"])
        v_nt = fwd(x, t, pad(w["null"]), w["ctx"], w["lens"]["null_text_lens"])
        v_n = fwd(x, t, pad(w["null"]), ctx_null, w["lens"]["null_text_lens"])
        v, g = guidance.cs_cfg(v_c, v_nt, v_n, text_scale=5.0, context_scale=4.0, apg=apg, state=g)
        x, state = sch.step(state, x, v, k)
    want = np.asarray(x)
    err = np.abs(got - want).max() / np.abs(want).max()
    print("batched vs separate, max rel error", err)
    assert err < 1e-5, err
    assert np.abs(got - w["src"]).max() > 1e-2  # the model did something
    if apg == "scaled":
        assert _rel(got, _run(w, key=w["seed"])) > 1e-5  # not the absolute threshold's result


def test_seeds(world):
    a, b, c = _run(world, key=1), _run(world, key=1), _run(world, key=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_null_context_is_a_factorised_permutation():
    b, f, h, w, c = 2, 5, 6, 7, 4
    idx = np.indices((b, f, h, w, c))
    z = jnp.asarray(idx[1] * 1_000_000 + idx[2] * 10_000 + idx[3] * 100 + idx[4], jnp.int32)  # encodes (t, y, x, c)
    key = sample.null_context_key(jax.random.key(0), 3)
    p = np.asarray(sample.permute_context(key, z))
    t_src, y_src, x_src, c_src = p // 1_000_000, p // 10_000 % 100, p // 100 % 100, p % 100
    np.testing.assert_array_equal(c_src, idx[4])  # channels untouched
    for src, axis, n in ((t_src, 1, f), (y_src, 2, h), (x_src, 3, w)):
        # the source index depends on its own axis only, the same for every sample, and is a permutation
        perm = np.moveaxis(src, axis, 0).reshape(n, -1)
        assert (perm == perm[:, :1]).all()
        assert sorted(perm[:, 0]) == list(range(n))
    np.testing.assert_array_equal(np.sort(p, axis=None), np.sort(np.asarray(z), axis=None))  # same multiset
    other = np.asarray(sample.permute_context(sample.null_context_key(jax.random.key(0), 4), z))
    assert not np.array_equal(p, other)  # fresh every step
    np.testing.assert_array_equal(p, np.asarray(sample.permute_context(key, z)))  # reproducible


def test_export(world):
    w = world
    sds = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), t)  # noqa: E731
    exported = jax.export.export(w["sampler"], platforms=("cpu",))(
        sds(w["params"]), sds(w["adapters"]), sds(w["src"]), sds(w["ctx"]), sds(w["text"]), sds(w["null"]),
        jax.ShapeDtypeStruct((2,), jnp.uint32), **sds(w["lens"]))  # a raw uint32 key is accepted too
    assert exported.out_avals[0].shape == (*SHAPE, 16)
    scalars = [a for a in exported.in_avals if a.shape == () and a.dtype == jnp.float32]
    assert len(scalars) == 2  # text_scale and context_scale: inputs of the exported program, not constants
    assert "stablehlo.while" in exported.mlir_module()  # one scan, not an unrolled loop


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_call_time_scales_equal_make_time_scales(world):
    w = world
    made = sample.make_sampler(CFG, steps=3, skip=1, text_scale=2.0, context_scale=3.5)
    want = _run(w, made, key=4)
    got = _run(w, key=4, text_scale=2.0, context_scale=3.5)  # the default-scale sampler, scales at call time
    print("call-time vs make-time scales, max rel difference", _rel(got, want))
    assert _rel(got, want) <= 1e-6
    default = _run(w, key=4)
    # the same program and key give bit-equal outputs, so any difference above float noise means the scales
    # differ; APG's norm clamp can keep it small for some random worlds (9.9e-4 was seen at seed 1838398583)
    assert _rel(got, default) > 1e-5  # the call-time scales took effect ...
    back = _run(w, made, key=4, text_scale=5.0, context_scale=4.0)
    assert _rel(back, default) <= 1e-6  # ... and override make-time ones the same way


def test_scales_share_one_compile(world, monkeypatch):
    # a Python side effect of tracing the scan body: a retrace for new scale values would run it again
    traces, combine = [], guidance.combine
    monkeypatch.setattr(guidance, "combine", lambda *a, **k: traces.append(k["text_scale"]) or combine(*a, **k))
    s = sample.make_sampler(CFG, steps=3, skip=1)
    pairs = [(1.0, 2.5), (np.float32(3), 4), (jnp.asarray(7.5), np.float64(0.0))]  # any real scalar type
    outs = [_run(world, s, key=5, text_scale=pairs[0][0], context_scale=pairs[0][1])]
    n_traces = len(traces)
    assert n_traces >= 1 and all(isinstance(t, jax.core.Tracer) for t in traces)  # traced, not baked in
    outs += [_run(world, s, key=5, text_scale=ts, context_scale=cs) for ts, cs in pairs[1:]]
    outs.append(_run(world, s, key=5))  # the make-time defaults: the same program too
    assert len(traces) == n_traces, "new scale values retraced the sampler"
    assert s._cache_size() == 1, "new scale values recompiled the sampler"
    for i in range(len(outs)):
        for j in range(i):
            assert _rel(outs[i], outs[j]) > 1e-5, (i, j)  # every pair really ran with its own scales
    # the same for a sampler made with other default scales from it, e.g. the Stylizer's per-call ones
    _run(world, s.with_scales(text_scale=2.0), key=5)
    assert len(traces) == n_traces and s._cache_size() == 1


def test_stylizer_caches_samplers_without_the_scales():
    st = sample.Stylizer(CFG, None, None, vae.VaeConfig.named("tiny"), None, None, None, None)
    a = st.sampler(steps=3, skip=1, text_scale=1.0, context_scale=2.5)
    b = st.sampler(steps=3, skip=1, text_scale=3.0, context_scale=4.0)
    c = st.sampler(steps=3, skip=2, text_scale=3.0, context_scale=4.0)
    assert a._jit is b._jit and a._jit is not c._jit and len(st._samplers) == 2  # one compile per static setting
    assert (float(a.text_scale), float(a.context_scale), float(b.text_scale)) == (1.0, 2.5, 3.0)


def test_used_inside_user_jit(world):
    w = world
    outer = jax.jit(lambda p, a, key: 2.0 * w["sampler"](p, a, w["src"], w["ctx"], w["text"], w["null"], key,
                                                          **w["lens"]))
    lowered = outer.lower(w["params"], w["adapters"], jax.random.key(1))  # traces through; no second compile
    assert lowered.out_info.shape == (*SHAPE, 16)


def _pattern(threshold, e0s):
    """Which executed steps TeaCache's rule computes for a sequence of time modulations e0."""
    tc, out = {"e0": jnp.zeros_like(e0s[0]), "acc": jnp.zeros(())}, []
    for i, e0 in enumerate(e0s):
        compute, acc = sampler_lib.teacache_decide(tc["e0"], tc["acc"], e0, i, len(e0s), threshold,
                                                   sampler_lib.TEACACHE_POLY_14B)
        tc = {"e0": e0, "acc": acc}
        out.append(bool(compute))
    return out


def test_teacache_rule():
    # warm-up of 5 executed steps and the last step always computed; a threshold <= 0 computes every step
    moving = [jnp.full((6,), 1.0 + 0.01 * i) for i in range(9)]
    assert _pattern(1e9, moving) == [True] * 5 + [False] * 3 + [True]
    assert _pattern(0.0, moving) == [True] * 9
    # e0 that does not change: the polynomial's constant term (-0.042) makes the accumulator negative, so
    # `acc >= 0` alone skips; the rule says a threshold <= 0 never skips
    still = [jnp.full((6,), 1.0)] * 9
    assert sampler_lib.TEACACHE_POLY_14B[-1] < 0
    assert _pattern(0.0, still) == _pattern(-1.0, still) == [True] * 9
    assert _pattern(1e-3, still) == [True] * 5 + [False] * 3 + [True]


def _still_time(params):
    """The world's weights with a timestep modulation e0 that is the same at every step (TeaCache sees rel = 0)."""
    tp = params["time_projection"]["1"]
    return {**params, "time_projection": {"1": {**tp, "kernel": jnp.zeros_like(tp["kernel"])}}}


def test_teacache_never_skipping_equals_uncached(world):
    w = {**world, "params": _still_time(world["params"])}  # where threshold 0 skipped steps 5 and 6 before
    never = sample.make_sampler(CFG, steps=8, skip=0, cache="teacache", cache_threshold=0.0)
    full = _run(w, sample.make_sampler(CFG, steps=8, skip=0), key=3)
    np.testing.assert_array_equal(_run(w, never, key=3), full)
    # the static schedule's calibration run computes every step (its segment scan, no skips): the same latents, and
    # every branch's residual norm per step
    s = sample.make_sampler(CFG, steps=8, skip=0, cache="calibrate")
    got, norms = s(w["params"], w["adapters"], w["src"], w["ctx"], w["text"], w["null"], jax.random.key(3),
                   **w["lens"])
    np.testing.assert_array_equal(np.asarray(got), full)
    assert norms.shape == (8, 3) and np.all(np.asarray(norms) > 0)


def test_magcache_schedule_rule():
    # ratio 1 (the residual's norm does not change) skips up to max_skips in a row after the warm-up; the last step
    # is always computed; a drifting norm accumulates error and computes sooner
    flat = np.ones((10, 3))
    assert sampler_lib.magcache_schedule(flat, max_skips=2) == (0, 1, 2, 3, 4, 7, 9)
    assert sampler_lib.magcache_schedule(flat, max_skips=9) == (0, 1, 2, 3, 4, 9)
    drift = np.cumprod(np.full(10, 0.9))[:, None]  # ratio 0.9: err 0.1 after one skip >= 0.06
    assert sampler_lib.magcache_schedule(drift, threshold=0.06) == tuple(range(10))
    assert sampler_lib.magcache_schedule(drift, threshold=0.15, max_skips=5) == (0, 1, 2, 3, 4, 6, 8, 9)
    with pytest.raises(ValueError, match="starting with 0"):
        sample.make_sampler(CFG, steps=8, skip=0, cache="static", cache_steps=(1, 2))
    with pytest.raises(ValueError, match="cache_steps is the schedule"):
        sample.make_sampler(CFG, steps=8, skip=0, cache="teacache", cache_steps=(0,))


def test_teacache_polynomial_by_model_size():
    assert sampler_lib.teacache_polynomial(wan.WanConfig.named("vace-1.3B")) == sampler_lib.TEACACHE_POLY_1_3B
    assert sampler_lib.teacache_polynomial(wan.WanConfig.named("t2v-1.3B")) == sampler_lib.TEACACHE_POLY_1_3B
    assert sampler_lib.teacache_polynomial(wan.WanConfig.named("vace-14B")) == sampler_lib.TEACACHE_POLY_14B
    assert sampler_lib.teacache_polynomial(CFG) == sampler_lib.TEACACHE_POLY_14B  # uncalibrated widths
    # the two fits decide differently on the same e0 sequence
    moving = [jnp.full((6,), 1.0 + 0.004 * i) for i in range(12)]
    by = {poly: [] for poly in (sampler_lib.TEACACHE_POLY_14B, sampler_lib.TEACACHE_POLY_1_3B)}
    for poly, out in by.items():
        tc = {"e0": jnp.zeros((6,)), "acc": jnp.zeros(())}
        for i, e0 in enumerate(moving):
            compute, acc = sampler_lib.teacache_decide(tc["e0"], tc["acc"], e0, i, len(moving), 0.05, poly)
            tc = {"e0": e0, "acc": acc}
            out.append(bool(compute))
    print("compute pattern 14B", by[sampler_lib.TEACACHE_POLY_14B], "1.3B", by[sampler_lib.TEACACHE_POLY_1_3B])
    assert by[sampler_lib.TEACACHE_POLY_14B] != by[sampler_lib.TEACACHE_POLY_1_3B]


def test_teacache_skip_reuses_the_block_residual(world):
    # 8 steps, a huge threshold: executed steps 5 and 6 skip the blocks: every branch adds its step-4 block residual
    # (run_blocks - x0) to its own step's patch tokens and runs its own step's head; APG's momentum and the solver
    # still advance. The hand-written loop does that with separate per-branch stages.
    w = world
    cached = sample.make_sampler(CFG, steps=8, skip=0, solver="euler", cache="teacache", cache_threshold=1e9)
    got = _run(w, cached, key=3)
    want = _reference(w, key=3, steps=8, skip=0, apg=True, text_scale=5.0, context_scale=4.0, reuse=(5, 6))
    full = _reference(w, key=3, steps=8, skip=0, apg=True, text_scale=5.0, context_scale=4.0)
    print("teacache vs its reference, max rel error", _rel(got, want), "; vs computing every step", _rel(got, full))
    assert _rel(got, want) < 1e-5
    assert _rel(got, full) > 1e-3  # the skips happened (and the reference tells them apart)
    # the same skips as a static schedule (segment scan, masked sub-steps: executed step 4 is followed by 2 skips,
    # the others by none)
    static = sample.make_sampler(CFG, steps=8, skip=0, solver="euler", cache="static", cache_steps=(0, 1, 2, 3, 4, 7))
    got_static = _run(w, static, key=3)
    print("static schedule vs the reference, max rel error", _rel(got_static, want))
    assert _rel(got_static, want) < 1e-5


_forward = jax.jit(lambda p, a, x, t, tx, c, n: wan.forward(CFG, p, x, t, tx, c, lora=a, text_lens=n))


@jax.jit
def _block_residual(p, a, x, t, tx, c, n):
    """run_blocks(x0) - x0 of one branch, what TeaCache caches."""
    emb = wan.embed(CFG, p, x, t, lora=a)
    return wan.run_blocks(CFG, p, emb, wan.prepare(CFG, p, tx, c, lora=a, text_lens=n), lora=a) - emb.x0


@jax.jit
def _skipped_step(p, a, x, t, residual):
    """A skipped step of one branch by hand: this step's patch tokens + the cached residual, this step's head."""
    emb = wan.embed(CFG, p, x, t, lora=a)
    return wan.apply_head(CFG, p, emb.x0 + residual, emb, lora=a)


def _reference(w, *, key, mode="cs_cfg", steps=3, skip=1, text_scale=3.0, context_scale=2.0, apg=False,
               keep=None, null_context=None, reuse=(), src=None):
    """The sampler as documented, by hand: separate batch-1 forwards per branch, the guidance formulas of
    guidance.py (with apg=False; APG through guidance.combine), an Euler step x += (sigma' - sigma) v, and
    keep_latents pinned after every step. `reuse`: grid steps that skip the blocks (TeaCache): each branch's last
    computed block residual on this step's patch tokens, through this step's head."""
    src = w["src"] if src is None else src
    k_noise, k_perm = jax.random.split(jax.random.key(key))
    sch = schedulers.make("euler", steps=steps, shift=16.0)
    sig = np.asarray(sch.sigmas, np.float32)
    eps = jax.random.normal(k_noise, src.shape, jnp.float32)
    m = 0 if keep is None else keep.shape[1]
    if m:
        src = jnp.concatenate([keep, src[:, m:]], axis=1)
    x = (1 - sig[skip]) * src + sig[skip] * eps
    pad = lambda a: np.pad(a, ((0, 0), (0, 11 - a.shape[1]), (0, 0)))  # noqa: E731
    fwd = lambda x, t, tx, c, n: _forward(w["params"], w["adapters"], x, t, tx, c, n)  # noqa: E731
    text, null = (pad(w["text"]), w["lens"]["text_lens"]), (pad(w["null"]), w["lens"]["null_text_lens"])
    g, vs = guidance.init_state(x), None
    for k in range(skip, steps):
        t = np.full((1,), sch.timesteps[k], np.float32)
        if k in reuse:
            vs = tuple(_skipped_step(w["params"], w["adapters"], x, t, r) for r in residuals)
        else:
            v_c = fwd(x, t, *text[:1], w["ctx"], text[1])
            if mode == "cs_cfg":
                ctx_null = sample.permute_context(sample.null_context_key(k_perm, k), w["ctx"])
                vs = (v_c, fwd(x, t, null[0], w["ctx"], null[1]), fwd(x, t, null[0], ctx_null, null[1]))
                if reuse:  # reuse is only tested in this mode
                    residuals = [_block_residual(w["params"], w["adapters"], x, t, tx, c, n)
                                 for (tx, n), c in ((text, w["ctx"]), (null, w["ctx"]), (null, ctx_null))]
            elif mode == "text":
                vs = (v_c, fwd(x, t, null[0], w["ctx"], null[1]))
            elif mode == "text_context":
                vs = (v_c, fwd(x, t, null[0], null_context, null[1]))
            else:
                vs = (v_c,)
        if apg:
            v, g = guidance.combine(mode, vs, text_scale=text_scale, context_scale=context_scale, apg=True, state=g)
        elif mode == "cs_cfg":  # v_n + s_c (v_nt - v_n) + s_t (v_c - v_nt)
            v = vs[2] + context_scale * (vs[1] - vs[2]) + text_scale * (vs[0] - vs[1])
        elif mode in ("text", "text_context"):  # v_null + s_t (v_c - v_null)
            v = vs[1] + text_scale * (vs[0] - vs[1])
        else:
            v = vs[0]
        x = x + (sig[k + 1] - sig[k]) * v
        if m:
            x = jnp.concatenate([(1 - sig[k + 1]) * keep + sig[k + 1] * eps[:, :m], x[:, m:]], axis=1)
    return np.asarray(x)


@pytest.mark.parametrize("mode", ["cs_cfg", "text", "text_context", "none"])
def test_mode_equals_separate_forwards(world, mode):
    # every guidance mode against its documented formula over separate forwards (scales 3 / 2: a swap shows)
    w = world
    extra = {"null_context": 0.5 * w["ctx"] + 0.25} if mode == "text_context" else {}
    s = sample.make_sampler(CFG, steps=3, skip=1, mode=mode, solver="euler", apg=False, text_scale=3.0,
                            context_scale=2.0)
    got = _run(w, s, key=w["seed"], **extra)
    want = _reference(w, key=w["seed"], mode=mode, **extra)
    print(mode, "batched vs separate forwards, max rel error", _rel(got, want))
    assert _rel(got, want) < 1e-5
    assert np.abs(got - w["src"]).max() > 1e-2  # the model did something


@pytest.mark.parametrize("m", [1, 2])
def test_keep_latents(world, m):
    # keep_latents [B, m, h, w, 16] replaces the source's first m latent frames and is re-pinned after every step:
    # the result holds it exactly there, and the other frames are sampled consistently with it
    w = world
    rng = np.random.default_rng(w["seed"] + m)
    keep = rng.standard_normal((*SHAPE[:1], m, *SHAPE[2:], 16), dtype=np.float32)
    s = sample.make_sampler(CFG, steps=3, skip=1, solver="euler", apg=False, text_scale=3.0, context_scale=2.0)
    got = _run(w, s, key=6, keep_latents=keep)
    np.testing.assert_array_equal(got[:, :m], keep)  # held exactly
    want = _reference(w, key=6, keep=keep)
    print(f"keep {m}: sampler vs hand-written loop, max rel error", _rel(got, want))
    assert _rel(got, want) < 1e-5
    keep2 = keep + 0.5
    got2 = _run(w, s, key=6, keep_latents=keep2)
    np.testing.assert_array_equal(got2[:, :m], keep2)  # a new keep is held there ...
    assert _rel(got2[:, m:], got[:, m:]) > 1e-3  # ... and the free frames follow it
    # the source's pinned frames are replaced by keep: changing them changes nothing
    src2 = w["src"].copy()
    src2[:, :m] += 1.0
    np.testing.assert_array_equal(_run({**w, "src": src2}, s, key=6, keep_latents=keep), got)


@pytest.mark.parametrize("mode,cache,solver", [("text", None, "unipc"), ("text_context", "teacache", "euler"),
                                               ("none", None, "dpm++")])
def test_other_modes_trace(world, mode, cache, solver):
    # tracing (no compile) checks the branch layout of every mode: 2 or 1 branches, the zero-video null context
    w = world
    s = sample.make_sampler(CFG, steps=4, skip=1, mode=mode, cache=cache, solver=solver)
    extra = {"null_context": w["ctx"] * 0.5} if mode == "text_context" else {}
    lowered = s.lower(w["params"], None, w["src"], w["ctx"], w["text"], w["null"], jax.random.key(0),
                      **w["lens"], **extra)
    assert lowered.out_info.shape == (*SHAPE, 16)
    batch, text = (2 if mode != "none" else 1), lowered.as_text()
    assert f"tensor<{batch}x3x4x6x16xf32>" in text  # the branches batched into one forward ...
    assert not any(f"tensor<{n}x3x4x6x16xf32>" in text for n in range(batch + 1, 4))  # ... and no more


def test_input_errors(world):
    w = world
    with pytest.raises(ValueError, match="context must be"):
        w["sampler"](w["params"], None, w["src"], w["ctx"][..., :32], w["text"], w["null"], jax.random.key(0))
    s = sample.make_sampler(CFG, steps=3, skip=1, mode="text_context")
    with pytest.raises(ValueError, match="null_context"):
        s(w["params"], None, w["src"], w["ctx"], w["text"], w["null"], jax.random.key(0))
    with pytest.raises(ValueError, match="skip"):
        sample.make_sampler(CFG, steps=3, skip=3)
    with pytest.raises(ValueError, match="mode"):
        sample.make_sampler(CFG, mode="cfg")
    call = lambda **kw: w["sampler"](w["params"], None, w["src"], w["ctx"], w["text"], w["null"],  # noqa: E731
                                     jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="text_scale must be a scalar"):
        call(text_scale=np.ones(2))
    with pytest.raises(TypeError, match="context_scale must be a real scalar"):
        call(context_scale="4")
    with pytest.raises(TypeError, match="text_scale must be a real scalar"):
        call(text_scale=True)
    with pytest.raises(ValueError, match="context_scale must be finite"):
        call(context_scale=float("nan"))
    with pytest.raises(ValueError, match="text_scale must be a scalar"):
        sample.make_sampler(CFG, text_scale=np.full((1,), 5.0))


def test_negative_prompt():
    prompt = conditioning.null_prompt()
    assert prompt.startswith("色调艳丽，过曝，静态") and prompt.endswith("倒着走")
    if SHARED_PROMPT.is_file():
        packaged = Path(conditioning.__file__).with_name("wan_negative_prompt.txt").read_bytes()
        assert packaged == SHARED_PROMPT.read_bytes()
        assert prompt == SHARED_PROMPT.read_text(encoding="utf-8").rstrip("\n")


_MESH_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from pickstyle_jax import sample, sharding
    from pickstyle_jax.models import vae, wan
    cfg = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0,))
    rng = np.random.default_rng(int(sys.argv[1]))
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape, dtype=np.float32)),
                          wan.param_shapes(cfg))
    args = [rng.standard_normal(s, dtype=np.float32) for s in
            ((1, 3, 4, 6, 16), (1, 3, 4, 6, 96), (1, 7, cfg.text_dim), (1, 11, cfg.text_dim))]
    want = sample.make_sampler(cfg, steps=3, skip=1)(params, None, *args, jax.random.key(0))
    mesh = sharding.make_mesh({"data": 3}, jax.devices()[:3])  # CFG-parallel: one branch per device
    got = sample.make_sampler(cfg, steps=3, skip=1, mesh=mesh)(params, None, *args, jax.random.key(0))
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    print("mesh vs single device, max rel error", err)
    assert err < 1e-5, err
    # four clips (12 branch rows over data x fsdp) with the weights FSDP x tensor sharded, the layout of a pod
    args2 = [np.concatenate([a, 0.5 * a, -a, 0.25 * a]) if i < 2 else a for i, a in enumerate(args)]
    want = sample.make_sampler(cfg, steps=3, skip=1)(params, None, *args2, jax.random.key(0))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    got = sample.make_sampler(cfg, steps=3, skip=1, mesh=mesh)(params, None, *args2, jax.random.key(0))
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    print("data x fsdp x tensor mesh vs single device, max rel error", err)
    assert err < 1e-5, err
""")


@pytest.mark.slow
def test_cfg_parallel_on_a_mesh():
    seed = SEED % 65536
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _MESH_CHILD, str(seed)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, f"seed {seed}\n{r.stdout}\n{r.stderr[-4000:]}"
