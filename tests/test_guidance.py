"""Guidance: CS-CFG with APG against an independent float64 NumPy rendering over threaded state, the APG limit
properties, the plain two-condition form, the two-branch modes, the by-name entry point, and traced scales."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pickstyle_jax import guidance

SHAPE = (2, 3, 4, 5, 16)  # [B, F, H, W, C]
SCALES = (0.1, 3.0)       # per-sample magnitudes: sample 0 never reaches the norm threshold, sample 1 always does


def branches(r, n=3):
    """n random velocities [B, ...] whose samples differ in scale, fp32."""
    scale = np.asarray(SCALES, np.float32).reshape(-1, *[1] * (len(SHAPE) - 1))
    return [(r.standard_normal(SHAPE) * scale).astype(np.float32) for _ in range(n)]


def np_apg_direction(delta, buf, v_cond, momentum=0.75, threshold=55.0):
    """One sample, float64, flattened: returns (guidance term, new buffer, ‖buffer‖)."""
    buf = delta + momentum * buf
    norm = np.sqrt(np.sum(buf * buf))
    g = buf * min(1.0, threshold / norm)
    u = v_cond / max(np.sqrt(np.sum(v_cond * v_cond)), 1e-12)
    return g - np.dot(g, u) * u, buf, norm


def np_cs_cfg(v_c, v_nt, v_n, s_t, s_c, state):
    """Reference CS-CFG with APG, sample by sample in float64 (no broadcasting shared with the code under test)."""
    out = np.empty(v_c.shape)
    r_t, r_c = state["text"].copy(), state["context"].copy()
    norms = []
    for b in range(v_c.shape[0]):
        c, nt, n = (a[b].astype(np.float64).ravel() for a in (v_c, v_nt, v_n))
        g_t, bt, nrm_t = np_apg_direction(c - nt, r_t[b].ravel(), c)
        g_c, bc, nrm_c = np_apg_direction(nt - n, r_c[b].ravel(), c)
        out[b] = (c + (s_t - 1) * g_t + (s_c - 1) * g_c).reshape(v_c.shape[1:])
        r_t[b], r_c[b] = bt.reshape(v_c.shape[1:]), bc.reshape(v_c.shape[1:])
        norms.append((nrm_t, nrm_c))
    return out, {"text": r_t, "context": r_c}, np.asarray(norms)


def test_cs_cfg_apg_matches_numpy_over_steps(seed):
    r = np.random.default_rng(seed)
    s_t, s_c = 5.0, 4.0
    step = jax.jit(functools.partial(guidance.cs_cfg, text_scale=s_t, context_scale=s_c, apg=True))
    ref_state = {"text": np.zeros(SHAPE), "context": np.zeros(SHAPE)}
    all_norms = []
    for i in range(5):
        v_c, v_nt, v_n = branches(r)
        if i == 0:  # eager, state=None meaning fresh buffers; then jitted with the state threaded through
            v, state = guidance.cs_cfg(v_c, v_nt, v_n, text_scale=s_t, context_scale=s_c)
        else:
            v, state = step(v_c, v_nt, v_n, state=state)
        want, ref_state, norms = np_cs_cfg(v_c, v_nt, v_n, s_t, s_c, ref_state)
        all_norms.append(norms)
        assert v.dtype == jnp.float32
        for b in range(len(SCALES)):
            np.testing.assert_allclose(v[b], want[b], rtol=1e-5, atol=2e-6 * np.abs(want[b]).max())
            for key in ("text", "context"):  # the buffers hold the unclipped running sums
                np.testing.assert_allclose(state[key][b], ref_state[key][b], rtol=1e-5,
                                           atol=2e-6 * np.abs(ref_state[key][b]).max())
    all_norms = np.stack(all_norms)
    assert np.all(all_norms[:, 0] < 55) and np.all(all_norms[:, 1] > 55), all_norms  # both regimes exercised


def test_scaled_threshold(seed):
    # "scaled" keeps PickStyle's 55 per element: exactly 55 on its [16, 21, 60, 104] latent, 55 sqrt(n / 2096640)
    # on n elements; here 960 elements give 1.18, so both samples clip (the absolute 55 clips only sample 1)
    apg = guidance.Apg.scaled()
    assert apg.threshold((1, 21, 60, 104, 16)) == 55.0 == guidance.Apg().threshold(SHAPE)
    tau = 55.0 * math.sqrt(math.prod(SHAPE[1:]) / (16 * 21 * 60 * 104))
    assert apg.threshold(SHAPE) == pytest.approx(tau, rel=1e-12)
    r = np.random.default_rng(seed)
    ref_state = {"text": np.zeros(SHAPE), "context": np.zeros(SHAPE)}
    state = None
    for _ in range(3):
        v_c, v_nt, v_n = branches(r)
        prev = state
        v, state = guidance.cs_cfg(v_c, v_nt, v_n, text_scale=5.0, context_scale=4.0, apg="scaled", state=prev)
        want = np.empty(SHAPE)
        for b in range(SHAPE[0]):
            c, nt, n = (a[b].astype(np.float64).ravel() for a in (v_c, v_nt, v_n))
            g_t, bt, nrm_t = np_apg_direction(c - nt, ref_state["text"][b].ravel(), c, threshold=tau)
            g_c, bc, nrm_c = np_apg_direction(nt - n, ref_state["context"][b].ravel(), c, threshold=tau)
            assert min(nrm_t, nrm_c) > tau  # the clip is active in every sample
            want[b] = (c + 4 * g_t + 3 * g_c).reshape(SHAPE[1:])
            ref_state["text"][b], ref_state["context"][b] = bt.reshape(SHAPE[1:]), bc.reshape(SHAPE[1:])
        np.testing.assert_allclose(v, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
        absolute, _ = guidance.cs_cfg(v_c, v_nt, v_n, text_scale=5.0, context_scale=4.0, apg=True, state=prev)
        assert np.abs(np.asarray(absolute) - want).max() > 1e-2  # a different rule on these inputs
    assert [guidance.apg_setting(a) for a in (True, "on", np.bool_(False), "off", "scaled")] == [
        True, True, False, False, "scaled"]
    with pytest.raises(ValueError, match="scaled"):
        guidance.apg_setting("maybe")
    with pytest.raises(ValueError, match="reference_numel"):
        guidance.Apg(reference_numel=0)


def test_infinite_threshold_zero_momentum_is_projected_cfg(seed):
    r = np.random.default_rng(seed)
    v_c, v_nt, v_n = branches(r)
    apg = guidance.Apg(momentum=0.0, norm_threshold=math.inf)
    stale = {"text": jnp.full(SHAPE, 7.0), "context": jnp.full(SHAPE, -3.0)}  # zero momentum forgets it
    v, state = guidance.cs_cfg(v_c, v_nt, v_n, text_scale=5.0, context_scale=4.0, apg=apg, state=stale)

    def perp(d):  # Δ minus its projection on v_c, per sample
        axes = tuple(range(1, d.ndim))
        u = v_c / np.sqrt(np.sum(v_c.astype(np.float64) ** 2, axis=axes, keepdims=True))
        return d - np.sum(d * u, axis=axes, keepdims=True) * u

    want = v_c + 4.0 * perp(v_c - v_nt) + 3.0 * perp(v_nt - v_n)
    tol = 2e-6 * np.abs(v_c + 4.0 * np.abs(v_c - v_nt) + 3.0 * np.abs(v_nt - v_n)).max()  # fp32 rounding scale
    np.testing.assert_allclose(v, want, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(state["text"], v_c - v_nt, rtol=1e-6)
    # η = 0: the guidance is orthogonal to v_c in every sample.
    dots = np.sum(np.asarray(v - v_c, np.float64) * v_c, axis=tuple(range(1, v_c.ndim)))
    norms = np.linalg.norm(np.asarray(v - v_c).reshape(2, -1), axis=1) * np.linalg.norm(v_c.reshape(2, -1), axis=1)
    assert np.all(np.abs(dots) <= 1e-5 * norms)
    # Single branch: the same limit.
    v2, _ = guidance.text_cfg(v_c, v_nt, scale=5.0, apg=apg)
    np.testing.assert_allclose(v2, v_c + 4.0 * perp(v_c - v_nt), rtol=1e-5, atol=tol)


def test_plain_form(seed):
    r = np.random.default_rng(seed)
    v_c, v_nt, v_n = branches(r)
    s_t, s_c = 5.0, 4.0
    state = guidance.init_state(v_c)
    v, new_state = guidance.cs_cfg(v_c, v_nt, v_n, text_scale=s_t, context_scale=s_c, apg=False, state=state)
    factorised = v_n + s_c * (v_nt - v_n) + s_t * (v_c - v_nt)
    np.testing.assert_allclose(v, factorised, rtol=1e-5, atol=1e-5)
    released = v_nt + s_t * (v_c - v_nt) + s_c * (v_nt - v_n)  # one extra Δ_c: not what we compute
    assert np.abs(np.asarray(v) - released).max() > 0.1 * SCALES[1]
    assert new_state is state
    one, _ = guidance.cs_cfg(v_c, v_nt, v_n, text_scale=1.0, context_scale=1.0, apg=False)
    np.testing.assert_allclose(one, v_c, atol=1e-6)
    for apg in (True, False):  # no context direction: CS-CFG reduces to text CFG
        a, _ = guidance.cs_cfg(v_c, v_nt, v_nt, text_scale=s_t, context_scale=s_c, apg=apg)
        b, _ = guidance.text_cfg(v_c, v_nt, scale=s_t, apg=apg)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_text_cfg(seed):
    r = np.random.default_rng(seed)
    s = 5.0
    v_c, v_n = branches(r, 2)
    plain, _ = guidance.text_cfg(v_c, v_n, scale=s, apg=False)
    np.testing.assert_allclose(plain, v_n + s * (v_c - v_n), rtol=1e-5, atol=1e-5)
    state, buf = None, np.zeros(SHAPE)
    for _ in range(3):
        v_c, v_n = branches(r, 2)
        v, state = guidance.text_cfg(v_c, v_n, scale=s, apg=True, state=state)
        for b in range(len(SCALES)):
            c = v_c[b].astype(np.float64).ravel()
            g, nb, _ = np_apg_direction(c - v_n[b].ravel(), buf[b].ravel(), c)
            buf[b] = nb.reshape(SHAPE[1:])
            want = c + (s - 1) * g
            np.testing.assert_allclose(np.asarray(v[b]).ravel(), want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
        np.testing.assert_array_equal(state["context"], 0)  # untouched by the two-branch modes
    tc, tc_state = guidance.text_context(v_c, v_n, scale=s, apg=True, state=None)
    ref, ref_state = guidance.text_cfg(v_c, v_n, scale=s, apg=True, state=None)
    np.testing.assert_array_equal(tc, ref)
    np.testing.assert_array_equal(tc_state["text"], ref_state["text"])


def test_combine_by_name(seed):
    r = np.random.default_rng(seed)
    vs = branches(r)
    kw = dict(text_scale=5.0, context_scale=4.0, apg=True)
    state = guidance.init_state(vs[0])
    assert guidance.MODES == {"cs_cfg": 3, "text": 2, "text_context": 2, "none": 1}
    direct = {
        "cs_cfg": guidance.cs_cfg(*vs, **kw, state=state),
        "text": guidance.text_cfg(vs[0], vs[1], scale=5.0, apg=True, state=state),
        "text_context": guidance.text_context(vs[0], vs[2], scale=5.0, apg=True, state=state),
        "none": (jnp.asarray(vs[0]), state),
    }
    picks = {"cs_cfg": vs, "text": vs[:2], "text_context": [vs[0], vs[2]], "none": vs[:1]}
    combine = jax.jit(guidance.combine, static_argnames=("mode", "apg"))
    for mode, n in guidance.MODES.items():
        want_v, want_state = direct[mode]
        for arg in (picks[mode], jnp.concatenate(picks[mode], axis=0)):  # a list, or one branch-major batch
            v, new_state = combine(mode, arg, **kw, state=state)
            assert v.shape == SHAPE
            # jit vs eager: XLA may order the per-sample sums differently, so allow fp32 rounding.
            np.testing.assert_allclose(v, want_v, rtol=1e-5, atol=1e-6 * np.abs(want_v).max())
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), new_state, want_state)
    v, _ = guidance.combine("none", vs[0])
    np.testing.assert_array_equal(v, vs[0])


def test_traced_scales_one_trace_same_values(seed):
    # scales as jit arguments: one trace serves every value (0 and 1 included: no branch is skipped), and each
    # result equals the eager Python-float one; mode and apg stay static
    r = np.random.default_rng(seed)
    vs = jnp.concatenate(branches(r), axis=0)
    state = {"text": jnp.asarray(branches(r, 1)[0]), "context": jnp.asarray(branches(r, 1)[0])}
    traces = []

    def guided(mode, apg, s_t, s_c):
        traces.append((mode, apg))
        return guidance.combine(mode, vs[: guidance.MODES[mode] * SHAPE[0]], text_scale=s_t, context_scale=s_c,
                                apg=apg, state=state)

    step = jax.jit(guided, static_argnums=(0, 1))
    for mode in ("cs_cfg", "text"):
        for apg in (True, False):
            n = len(traces)
            for s_t, s_c in ((5.0, 4.0), (1.0, 0.0), (0.0, 1.0), (2.5, -1.0)):
                v, new_state = step(mode, apg, jnp.float32(s_t), jnp.float32(s_c))
                want_v, want_state = guided(mode, apg, s_t, s_c)  # eager, Python floats
                np.testing.assert_allclose(v, want_v, rtol=1e-5, atol=1e-6 * np.abs(want_v).max())
                jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), new_state,
                             want_state)
            assert len(traces) == n + 1 + 4, (mode, apg)  # one trace, plus the 4 eager calls


def test_bad_input():
    v = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="unknown guidance mode"):
        guidance.combine("cfg++", [v, v])
    with pytest.raises(ValueError, match="takes 3"):
        guidance.combine("cs_cfg", [v, v])
    with pytest.raises(ValueError, match="leading axis"):
        guidance.combine("cs_cfg", jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        guidance.cs_cfg(v, v, jnp.zeros((1,) + SHAPE[1:]))
    with pytest.raises(ValueError, match="batched"):
        guidance.text_cfg(jnp.zeros(5), jnp.zeros(5))
    with pytest.raises(TypeError, match="apg"):
        guidance.text_cfg(v, v, apg="yes")
    with pytest.raises(ValueError, match="threshold"):
        guidance.Apg(norm_threshold=0.0)
