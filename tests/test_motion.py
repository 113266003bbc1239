"""Camera-motion augmentation vs references written here: torch (F.interpolate bilinear, align_corners=False, on the
crop windows of docs/REFERENCE.md §8; torchvision's tensor `rotate` algorithm re-typed with torch ops since
torchvision is not installed) and an independent float64 numpy nearest-neighbour rotation. Fresh random inputs every run; the seed
is printed."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pickstyle_jax.data import motion

SEED = int(np.random.SeedSequence().entropy % 2**31)
print(f"test_motion seed: {SEED}")


@pytest.fixture
def rng(request):
    print(f"seed {SEED} (test {request.node.name})")  # shown with a failure's captured output
    return np.random.default_rng([SEED, sum(map(ord, request.node.name))])


def official_windows(kind, T, H, W, z, max_shift, max_angle):
    """The §8.2 table, written out independently of motion.windows: (top, left, h_c, w_c, angle) per frame."""
    wins = []
    for t in range(T):
        p = t / (T - 1)
        scale = {"static": 1.0, "zoom_in": z ** p, "zoom_out": z ** (1 - p), "rotate": 1.5}.get(kind, z)
        h_c, w_c = int(H / scale), int(W / scale)
        top, left = (H - h_c) // 2, (W - w_c) // 2
        s = int(max_shift * p * p)
        if kind == "slide_right":
            left = min(s, W - w_c)
        if kind == "slide_left":
            left = max(W - w_c - s, 0)
        if kind == "slide_up":
            top, left = max(H - h_c - s, 0), W - w_c
        if kind == "slide_down":
            top, left = min(s, H - h_c), W - w_c
        wins.append((top, left, h_c, w_c, max_angle * p if kind == "rotate" else 0.0))
    return wins


def torchvision_rotate(img, angle):
    """torchvision.transforms.functional.rotate(img [C,H,W] float, angle, NEAREST, expand=False, center=None, fill=0),
    tensor path: _get_inverse_affine_matrix(center=[0,0], -angle) -> _gen_affine_grid -> grid_sample -> fill mask."""
    C, H, W = img.shape
    rot = math.radians(-angle)
    a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
    theta = torch.tensor([d, -b, 0.0, -c, a, 0.0], dtype=img.dtype).reshape(1, 2, 3)
    base = torch.empty(1, H, W, 3, dtype=img.dtype)
    base[..., 0].copy_(torch.linspace(-W * 0.5 + 0.5, W * 0.5 + 0.5 - 1, steps=W))
    base[..., 1].copy_(torch.linspace(-H * 0.5 + 0.5, H * 0.5 + 0.5 - 1, steps=H).unsqueeze_(-1))
    base[..., 2].fill_(1)
    grid = base.view(1, H * W, 3).bmm(theta.transpose(1, 2) / torch.tensor([0.5 * W, 0.5 * H])).view(1, H, W, 2)
    x = torch.cat([img[None], torch.ones(1, 1, H, W, dtype=img.dtype)], 1)
    out = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    mask = out[:, -1:].expand_as(out[:, :-1]) < 0.5
    out = out[:, :-1]
    out[mask] = 0.0
    return out[0]


def torch_reference(image, kind, T, z, max_shift, max_angle):
    H, W, _ = image.shape
    x = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    frames = []
    for top, left, h_c, w_c, angle in official_windows(kind, T, H, W, z, max_shift, max_angle):
        y = torchvision_rotate(x, angle) if kind == "rotate" else x
        crop = y[:, top:top + h_c, left:left + w_c]
        frames.append(F.interpolate(crop[None], size=(H, W), mode="bilinear", align_corners=False)[0])
    return torch.stack(frames).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kind", motion.KINDS)
@pytest.mark.parametrize("size", [(64, 96), (45, 77)])
@pytest.mark.parametrize("path", ["all_frames_at_once", "frame_by_frame"])
def test_render_matches_torch(kind, size, path, rng, monkeypatch):
    if path == "frame_by_frame":  # the path large clips take
        monkeypatch.setattr(motion, "VECTORISE_FLOATS", 0)
    H, W = size
    image = rng.uniform(-1, 1, (H, W, 3)).astype(np.float32)
    z, shift, angle = rng.uniform(1.2, 2.0), int(rng.integers(10, 60)), rng.uniform(-20, 20)
    got = motion.render(image, kind, 9, z, shift, angle)
    ref = torch_reference(image, kind, 9, z, shift, angle)
    assert got.shape == (9, H, W, 3) and got.dtype == np.float32
    # Rotation: the nearest index is computed in float32 op by op like torch, so only a source coordinate landing
    # exactly on a .5 tie after float32 rounding could pick the other neighbour (not seen in practice); the bound
    # holds at every pixel.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4, err_msg=f"{kind} z={z} shift={shift} angle={angle}")


def numpy_nearest_rotation(H, W, angle, top, left, h_c, w_c):
    """Independent float64 model of torchvision's rotation: output pixel centre (i + .5, j + .5) relative to the image
    centre, rotated by -angle (so the content turns counter-clockwise on screen, y pointing down), sampled at the
    nearest pixel centre; outside -> -1. Also returns each sample's distance from a rounding tie."""
    a = math.radians(angle)
    i, j = np.mgrid[top:top + h_c, left:left + w_c].astype(np.float64)
    x, y = j + 0.5 - W / 2, i + 0.5 - H / 2
    sx = math.cos(a) * x - math.sin(a) * y + W / 2 - 0.5
    sy = math.sin(a) * x + math.cos(a) * y + H / 2 - 0.5
    ix, iy = np.rint(sx), np.rint(sy)
    inside = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
    flat = np.where(inside, iy * W + ix, -1).astype(np.int64)
    tie = np.minimum(np.abs(np.abs(sx - np.floor(sx)) - 0.5), np.abs(np.abs(sy - np.floor(sy)) - 0.5))
    return flat, tie


@pytest.mark.parametrize("size", [(64, 96), (480, 832), (51, 73)])
def test_rotation_nearest_matches_numpy(size, rng):
    H, W = size
    for angle in list(rng.uniform(-20, 20, 4)) + [45.0, -90.0 + rng.uniform(-1, 1)]:
        h_c, w_c = int(H / 1.5), int(W / 1.5)
        top, left = (H - h_c) // 2, (W - w_c) // 2
        got = motion._rotation_index(H, W, float(angle), top, left, h_c, w_c).astype(np.int64)
        got = np.where(got == H * W, -1, got)
        ref, tie = numpy_nearest_rotation(H, W, float(angle), top, left, h_c, w_c)
        # Exact, except where the exact source coordinate is within float32 rounding (1e-3 px is generous) of a
        # .5 tie: there the two implementations may legitimately pick different neighbours.
        bad = (got != ref) & (tie > 1e-3)
        assert not bad.any(), f"angle {angle}: {bad.sum()} pixels differ away from ties"
        assert (got != ref).mean() < 1e-3


def test_rotation_is_counter_clockwise_with_fill(rng):
    H, W = 64, 96
    image = np.full((H, W, 3), -1.0, np.float32)
    image[30:34, 70:74] = 1.0  # marker right of the centre (row 31.5)
    clip = motion.render(image, "rotate", 2, max_angle=15.0)
    rows = np.nonzero(clip[-1, ..., 0] > 0)[0]
    assert rows.size and rows.mean() < (H - 1) / 2 - 3  # moved up on screen: counter-clockwise
    big = motion.render(image, "rotate", 2, max_angle=60.0)[-1]
    assert np.all(big[0, 0] == 0.0) and np.all(big[-1, -1] == 0.0)  # corners rotated in from outside: fill 0


def test_trajectory_endpoints(rng):
    H, W, T = 48, 80, 7
    image = rng.uniform(-1, 1, (H, W, 3)).astype(np.float32)
    np.testing.assert_array_equal(motion.render(image, "static", T), np.broadcast_to(image, (T, H, W, 3)))
    np.testing.assert_array_equal(motion.render(image, "zoom_in", T, 1.7)[0], image)
    np.testing.assert_array_equal(motion.render(image, "zoom_out", T, 1.7)[-1], image)
    # Linear ramps survive bilinear resampling, so each frame's ramp range reads back its crop window.
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ramp = np.stack([xx, yy, np.zeros_like(xx)], -1)
    z, shift = 1.6, 30
    h_c, w_c = int(H / z), int(W / z)
    for kind, first, last in [
        ("slide_right", (0, (H - h_c) // 2), (min(shift, W - w_c), (H - h_c) // 2)),
        ("slide_left", (W - w_c, (H - h_c) // 2), (max(W - w_c - shift, 0), (H - h_c) // 2)),
        ("slide_up", (W - w_c, H - h_c), (W - w_c, max(H - h_c - shift, 0))),      # right-aligned
        ("slide_down", (W - w_c, 0), (W - w_c, min(shift, H - h_c))),               # right-aligned
    ]:
        clip = motion.render(ramp, kind, T, z, shift)
        for frame, (left, top) in [(clip[0], first), (clip[-1], last)]:
            # the top-left output pixel samples the crop at (0.5 * w_c/W - 0.5) (clamped to 0) from its origin
            assert abs(frame[0, 0, 0] - (left + max(0.5 * w_c / W - 0.5, 0))) < 1e-4, kind
            assert abs(frame[0, 0, 1] - (top + max(0.5 * h_c / H - 0.5, 0))) < 1e-4, kind


@pytest.mark.parametrize("path", ["all_frames_at_once", "frame_by_frame"])
def test_identical_pair_gives_identical_clips(path, rng, monkeypatch):
    if path == "frame_by_frame":
        monkeypatch.setattr(motion, "VECTORISE_FLOATS", 0)
    img = rng.uniform(0, 255, (40, 56, 3)).astype(np.float32)
    for kind in motion.KINDS:
        p = motion.MotionParams(kind, 1.5, 20, 12.0)
        a, b = motion.render_uint8(np.concatenate([img, img], -1), p, 5, splits=(3, 3))
        np.testing.assert_array_equal(a, b)
        assert a.flags.c_contiguous and b.flags.c_contiguous


@pytest.mark.parametrize("path", ["all_frames_at_once", "frame_by_frame"])
def test_render_uint8_is_the_quantised_render(path, rng, monkeypatch):
    if path == "frame_by_frame":
        monkeypatch.setattr(motion, "VECTORISE_FLOATS", 0)
    img = rng.uniform(0, 255, (40, 56, 3)).astype(np.float32)
    for kind in motion.KINDS:
        p = motion.MotionParams(kind, 1.4, 25, -18.0)
        u8 = motion.render_uint8(img, p, 5)
        ref = motion.render(img / 127.5 - 1, kind, 5, p.zoom_factor, p.max_shift, p.max_angle)
        ref = np.clip(np.floor((ref + 1) * 127.5 + 0.5), 0, 255)
        diff = np.abs(u8.astype(np.int16) - ref)
        assert diff.max() <= 1 and diff.mean() < 1e-3, kind  # +-1 only at float rounding of exact .5 boundaries


def test_sample_params_distribution():
    rng = np.random.default_rng(SEED)
    n = 20000
    draws = [motion.sample_params(rng) for _ in range(n)]
    kinds = np.array([d.kind for d in draws])
    expected = {"static": 0.2, "rotate": 0.2, **{k: 0.1 for k in motion.MOVES[:6]}}
    for kind, p in expected.items():
        freq = (kinds == kind).mean()
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n), (kind, freq)
    z = np.array([d.zoom_factor for d in draws])
    s = np.array([d.max_shift for d in draws])
    a = np.array([d.max_angle for d in draws])
    assert z.min() >= 1.2 and z.max() < 2.0 and abs(z.mean() - 1.6) < 0.01
    assert s.dtype.kind == "i" and s.min() == 100 and s.max() == 200 and abs(s.mean() - 150) < 1.0
    assert a.min() >= -20 and a.max() < 20 and abs(a.mean()) < 0.3
