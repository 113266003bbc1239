"""Evaluation metrics on hand-made cases with known answers and the feature-extractor interface (the demo's motion
world is tested in test_demo_world.py)."""
import numpy as np
import pytest

from pickstyle_jax.demo import world
from pickstyle_jax.eval import features, metrics


def _scene(rng, f=5, h=32, w=48):
    """A smooth random video (blurred noise), so shifted copies stay similar but not identical."""
    x = rng.uniform(0, 255, (f, h + 8, w + 8, 3))
    k = np.ones(5) / 5
    for ax in (1, 2):
        x = np.apply_along_axis(lambda v: np.convolve(v, k, "same"), ax, x)
    return np.clip(x[:, 4:-4, 4:-4], 0, 255).astype(np.uint8)


def test_psnr_known_values(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert metrics.psnr(a, a) == pytest.approx(metrics.PSNR_CAP)  # identical: the documented cap, not inf
    # a constant error of 0.1 on the unit scale everywhere: MSE 0.01 -> 20 dB exactly
    x = np.full((2, 16, 16, 3), 0.0, np.float32)      # float in [-1, 1]: 0.0 is 0.5 on the unit scale
    y = np.full((2, 16, 16, 3), 0.2, np.float32)      # 0.6 on the unit scale
    assert metrics.psnr(x, y) == pytest.approx(20.0, abs=1e-4)
    # uint8 and the equivalent float video give the same number
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(metrics.psnr(a / 127.5 - 1, b / 127.5 - 1), abs=1e-4)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metrics.psnr(np.full((1, 16, 16, 3), 200.0), np.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(np.zeros((1, 16, 16, 3), np.uint8), np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="frames, height, width, 3"):
        metrics.flicker(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8))


def test_ssim_identical_shifted_noise(seed):
    rng = np.random.default_rng(seed)
    v = _scene(rng)
    assert metrics.ssim(v, v) == pytest.approx(1.0, abs=1e-6)
    shifted = np.roll(v, 3, axis=2)
    noise = rng.integers(0, 256, v.shape, dtype=np.uint8)
    s_shift, s_noise = metrics.ssim(v, shifted), metrics.ssim(v, noise)
    assert s_noise < 0.2, s_noise          # independent noise: no structure in common
    assert s_noise < s_shift < 1.0
    # SSIM is symmetric and a constant brightness offset costs little (luminance term only)
    assert metrics.ssim(v, noise) == pytest.approx(metrics.ssim(noise, v), abs=1e-9)
    brighter = np.clip(v.astype(int) + 10, 0, 255).astype(np.uint8)
    assert metrics.ssim(v, brighter) > 0.95


def test_temporal_error_zero_on_perfectly_warped_clip(seed):
    rng = np.random.default_rng(seed)
    f, h, w = 4, 24, 40
    big = rng.integers(0, 256, (h, w + 3 * f, 3), dtype=np.uint8)
    # the camera pans by 2 px per frame: frame t shows columns [2t, 2t + w) of the big image
    clip = np.stack([big[:, 2 * t: 2 * t + w] for t in range(f)])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    flow = np.broadcast_to(np.stack([yy, xx + 2.0], -1), (f - 1, h, w, 2))  # pixel p of t+1 was at p + 2 in t
    assert metrics.temporal_error(clip, flow) == pytest.approx(0.0, abs=1e-7)
    # the wrong motion (no motion) is penalised; pixels warped from outside the frame never count
    still = np.broadcast_to(np.stack([yy, xx], -1), (f - 1, h, w, 2))
    assert metrics.temporal_error(clip, still) > 0.1
    out_of_frame = flow.copy()
    out_of_frame[..., 1] += w  # everything comes from outside: no valid pixel
    assert np.isnan(metrics.temporal_error(clip, out_of_frame))
    # a half-pixel motion is interpolated bilinearly: a horizontal ramp shifted by 0.5 px warps exactly
    ramp = np.broadcast_to(np.linspace(0, 1, w, dtype=np.float32)[None, :, None], (h, w, 3)) * 1.6 - 0.8
    step = 1.6 / (w - 1) * 0.5
    clip = np.stack([ramp + step * t for t in range(f)])  # brighter = content moved left by 0.5 px
    half = np.broadcast_to(np.stack([yy, xx + 0.5], -1), (f - 1, h, w, 2))
    assert metrics.temporal_error(np.clip(clip, -1, 1), half) == pytest.approx(0.0, abs=1e-5)
    # the valid mask restricts the average
    noisy = np.stack([big[:, 2 * t: 2 * t + w] for t in range(f)])
    noisy[1:, :, :10] = 0
    valid = np.ones((f - 1, h, w), bool)
    valid[:, :, :10] = False
    assert metrics.temporal_error(noisy, flow, valid) == pytest.approx(0.0, abs=1e-7)
    assert metrics.temporal_error(noisy, flow) > 0.01
    with pytest.raises(ValueError, match="flow must be"):
        metrics.temporal_error(clip, flow[:1])


def test_flicker(seed):
    rng = np.random.default_rng(seed)
    src = rng.integers(40, 200, (5, 16, 16, 3)).astype(np.int32)
    # a stylisation that adds a fixed pattern has the source's frame differences exactly: flicker 0
    pattern = rng.integers(-40, 40, (1, 16, 16, 3))
    styl = (src + pattern).astype(np.uint8)
    assert metrics.flicker(styl, src.astype(np.uint8)) == pytest.approx(0.0, abs=1e-6)
    assert metrics.flicker(src.astype(np.uint8), src.astype(np.uint8)) == 0.0
    # a frozen output of a changing source: flicker = the source's mean |frame difference|
    frozen = np.repeat(styl[:1], 5, 0)
    expect = np.mean(np.abs(np.diff(src / 255.0, axis=0)))
    assert metrics.flicker(frozen, src.astype(np.uint8)) == pytest.approx(expect, rel=1e-5)
    # independent per-frame noise flickers more than the stable stylisation
    jitter = np.clip(styl + rng.integers(-30, 31, styl.shape), 0, 255).astype(np.uint8)
    assert metrics.flicker(jitter, src.astype(np.uint8)) > 0.05


def test_content_edges(seed):
    rng = np.random.default_rng(seed)
    f, h, w = 3, 32, 48
    yy, xx = np.mgrid[0:h, 0:w]
    src = np.zeros((f, h, w, 3), np.uint8)
    src[:] = 60
    src[:, (yy - 16) ** 2 + (xx - 20) ** 2 < 64] = (200, 40, 40)
    assert metrics.content(src, src) == pytest.approx(1.0)
    # same layout in other colours (a "style"), and an outline drawn along the boundary: still full agreement
    styl = np.full_like(src, 230)
    inside = (yy - 16) ** 2 + (xx - 20) ** 2 < 64
    styl[:, inside] = (40, 40, 200)
    ring = inside & ~((yy - 16) ** 2 + (xx - 20) ** 2 < 49)
    styl[:, ring] = 10
    assert metrics.content(styl, src) > 0.9
    # no edges at all against a source with edges: 0; two flat videos agree: 1
    flat = np.full_like(src, 128)
    assert metrics.content(flat, src) == 0.0
    assert metrics.content(flat, flat) == 1.0
    # a moved object disagrees
    moved = np.roll(src, 12, axis=2)
    assert metrics.content(moved, src) < 0.5
    noise = rng.integers(0, 256, src.shape, dtype=np.uint8)
    assert metrics.content(noise, src) < 0.5
    e = metrics.edge_map(src)
    assert e.shape == (f, h, w) and e.dtype == bool and 0 < e[0].sum() < 0.2 * h * w


def test_style_distance(seed):
    f, h, w = 3, 32, 48
    styles = ("toon", "sketch", "neon", "pastel")
    base = styles[seed % 4]
    clip = lambda i, style: world.render_clip(i, f, h, w, style, seed)  # noqa: E731
    ref = np.concatenate([clip(i, base).target for i in range(3)])
    assert metrics.style_distance(ref, ref) == pytest.approx(0.0, abs=1e-12)
    # other scenes in the reference's style are closer than the same scenes in other styles or unstylised
    scenes = range(10, 13)
    d = {s: np.mean([metrics.style_distance(clip(i, s).target, ref) for i in scenes]) for s in styles}
    d["source"] = np.mean([metrics.style_distance(clip(i, base).source, ref) for i in scenes])
    assert all(0 <= v <= 1 for v in d.values())
    assert d[base] < min(v for k, v in d.items() if k != base), (base, d)
    stats = metrics.style_stats(ref)
    assert set(stats) == {"channels", "luma", "saturation", "gradient", "laplacian"}
    assert all(v.shape == (16,) and v.sum() == pytest.approx(1.0) for v in stats.values())
    one = clip(10, base).target
    assert metrics.style_distance(one, stats) == pytest.approx(metrics.style_distance(one, ref))


def test_feature_interface(seed):
    rng = np.random.default_rng(seed)
    ex = features.RandomConvFeatures(seed=seed % 1000)
    assert isinstance(ex, features.FeatureExtractor)
    v = _scene(rng, f=4)
    e = ex(v)
    assert e.shape == (4, ex.dim) and np.isfinite(e).all()
    np.testing.assert_array_equal(e, features.RandomConvFeatures(seed=seed % 1000)(v))  # deterministic
    still = np.repeat(v[:1], 4, 0)
    assert features.frame_consistency(ex, still) == pytest.approx(1.0, abs=1e-9)
    noise = rng.integers(0, 256, v.shape, dtype=np.uint8)
    mixed = np.concatenate([v[:1], noise[:1], v[:1], noise[:1]])
    assert features.frame_consistency(ex, mixed) < features.frame_consistency(ex, still)
    # text side: a prompt scores against itself-like embeddings in [-1, 1]; shapes checked
    t = ex.encode_text(["Toon style. A red circle.", "Neon style."])
    assert t.shape == (2, ex.dim)
    s = features.text_video_score(ex, v, "Toon style. A red circle.")
    assert -1.0 <= s <= 1.0
    assert features.embedding_similarity(ex, v, v) == pytest.approx(1.0)
    # any callable with the right shape plugs in; a wrong shape is a clear error
    class Mean:
        def __call__(self, frames):
            return frames.reshape(len(frames), -1, 3).mean(1)

    assert features.frame_consistency(Mean(), still) == pytest.approx(1.0)
    with pytest.raises(TypeError, match="encode_text"):
        features.text_video_score(Mean(), v, "x")

    class Bad:
        def __call__(self, frames):
            return np.zeros((1, 3))

    with pytest.raises(ValueError, match="expected"):
        features.frame_consistency(Bad(), v)


def test_source_motion_is_the_identity_on_a_still_camera(seed):
    rng = np.random.default_rng(seed)
    src = np.repeat(rng.integers(0, 256, (1, 16, 24, 3), np.uint8), 4, axis=0)
    src[2:, :4] = 255 - src[2:, :4]  # the top rows change from frame 2 on: not still between frames 1 and 2
    flow, valid = metrics.source_motion(src)
    assert flow.shape == (3, 16, 24, 2) and valid.shape == (3, 16, 24)
    assert valid[0].all() and valid[2].all() and not valid[1, :4].any() and valid[1, 4:].all()
    np.testing.assert_array_equal(metrics.warp(src[0].astype(np.float32), flow[0])[0], src[0])  # identity
    assert metrics.temporal_error(src, flow, valid) == 0.0  # the source follows its own motion
    out = src.copy()
    out[3, 4:] = np.clip(out[3, 4:].astype(int) + 51, 0, 255)  # a still region that changes in the stylisation
    assert 0 < metrics.temporal_error(out, flow, valid) <= 0.2 + 1e-6
    jitter = np.clip(src[:1].astype(int) + rng.integers(-1, 2, src.shape), 0, 255).astype(np.uint8)
    assert metrics.source_motion(jitter)[1].all()  # codec-sized noise (2 grey levels) is within STILL_TOL
    assert metrics.source_motion(src[:1])[1].shape == (0, 16, 24)


def test_source_motion_follows_a_panning_camera(seed):
    rng = np.random.default_rng(seed)
    world_ = _scene(rng, f=1, h=64, w=96)[0]
    shifts = [(0, 0), (2, -3), (5, -1), (5, 4)]  # camera positions: frame t shows world_[y + dy, x + dx]
    src = np.stack([world_[8 + dy:40 + dy, 16 + dx:64 + dx] for dy, dx in shifts])
    for t in range(len(shifts) - 1):
        (ay, ax), (by, bx) = shifts[t], shifts[t + 1]
        assert metrics.translations(src[t].mean(-1), src[t + 1].mean(-1))[0] == (ay - by, ax - bx)
    flow, valid = metrics.source_motion(src)
    assert valid.mean() > 0.75  # all but the strips that enter the frame
    assert metrics.temporal_error(src, flow, valid) == 0.0
    # a stylisation that follows the pan is consistent; one frozen on the first frame is not
    styled = (255 - src) // 2
    frozen = np.repeat(styled[:1], len(src), axis=0)
    assert metrics.temporal_error(styled, flow, valid) == 0.0
    assert metrics.temporal_error(frozen, flow, valid) > 0.02
