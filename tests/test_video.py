"""video.py: read/write round trips (mp4, gif, frame folders), atomic writes, clear errors; sizing rules."""
import numpy as np
import pytest
from PIL import Image

from pickstyle_jax import sizing, video


def _clip(seed, f=9, h=32, w=48):
    """Smooth moving gradients: survive H.264 with small error, and every frame differs."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, 3)
    frames = [np.stack([(base[c] + 3 * x + 2 * y + 10 * t * (c + 1)) % 256 for c in range(3)], -1) for t in range(f)]
    return np.asarray(frames, np.float64).clip(0, 255).astype(np.uint8)


def test_mp4_round_trip_and_atomic(tmp_path, seed):
    frames = np.repeat(np.repeat(_clip(seed, h=8, w=12), 4, axis=1), 4, axis=2)  # blocky: codec-friendly
    path = video.write(tmp_path / "a.mp4", frames, fps=12)
    got, fps = video.read(path)
    assert got.shape == frames.shape and got.dtype == np.uint8
    assert fps == pytest.approx(12, rel=1e-3)
    assert np.abs(got.astype(float) - frames).mean() < 12, np.abs(got.astype(float) - frames).mean()
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]  # no temporary left behind
    with pytest.raises(video.VideoError, match="even"):
        video.write(tmp_path / "odd.mp4", frames[:, :31], fps=12)
    assert not (tmp_path / "odd.mp4").exists() and len(list(tmp_path.iterdir())) == 1


def test_gif_and_folder(tmp_path, seed):
    frames = _clip(seed, f=5)
    video.write(tmp_path / "a.gif", frames, fps=10)
    got, fps = video.read(tmp_path / "a.gif")
    assert got.shape == frames.shape and fps == pytest.approx(10)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (0, 1, 2, 10, 11):  # numeric order, not lexicographic (10 after 2)
        Image.fromarray(frames[[0, 1, 2, 10, 11].index(i)]).save(folder / f"f{i}.png")
    got, fps = video.read(folder)
    np.testing.assert_array_equal(got, frames)
    assert fps is None


def test_errors(tmp_path):
    with pytest.raises(video.VideoError, match="does not exist"):
        video.read(tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(video.VideoError, match="zero frames"):
        video.read(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 100)
    with pytest.raises(video.VideoError, match="junk.mp4"):
        video.read(tmp_path / "junk.mp4")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(video.VideoError, match="zero frames"):
        video.read(tmp_path / "nothing")
    with pytest.raises(video.VideoError, match="zero frames"):
        video.write(tmp_path / "z.mp4", np.zeros((0, 16, 16, 3), np.uint8))
    with pytest.raises(video.VideoError, match="uint8"):
        video.write(tmp_path / "z.mp4", np.zeros((2, 16, 16, 3), np.float32))
    assert not (tmp_path / "z.mp4").exists()


def test_side_by_side_and_strip(tmp_path, seed):
    a, b = _clip(seed, f=4, h=32, w=48), _clip(seed + 1, f=4, h=64, w=64)
    sbs = video.side_by_side(a, b)
    assert sbs.shape == (4, 32, 48 + 32, 3)
    np.testing.assert_array_equal(sbs[:, :, :48], a)
    with pytest.raises(video.VideoError, match="frame counts"):
        video.side_by_side(a, b[:3])
    strip = np.asarray(Image.open(video.png_strip(tmp_path / "s.png", a, n=3)))
    np.testing.assert_array_equal(strip, np.concatenate([a[0], a[2], a[3]], axis=1))  # round(linspace(0, 3, 3))


def test_sizing_rules():
    # the official results: 16:9 -> 480x832, 9:16 -> 848x464, square -> 624x640, windows of 81 frames each
    for (h, w), want in {(1080, 1920): (480, 832), (1920, 1080): (848, 464), (1000, 1000): (624, 640),
                         (720, 1280): (480, 832)}.items():
        p = sizing.plan(200, h, w, frame_rule="official")
        assert (p.height, p.width, p.frames) == (*want, 81), (h, w, p)
        assert sizing.plan(200, h, w).windows.length == 81
    assert (sizing.plan(81, 720, 1280, size="720p").height, sizing.plan(81, 720, 1280, size="720p").width) == \
        (720, 1280)
    small = sizing.plan(9, 40, 56, max_frames=9)  # under the cap: kept, cropped to 16-multiples
    assert (small.height, small.width, small.frames) == (32, 48, 9) and small.indices == tuple(range(9))
    short = sizing.plan(20, 480, 832, frame_rule="official")  # the paper's rule: stretched with round(linspace)
    np.testing.assert_array_equal(short.indices, np.round(np.linspace(0, 19, 81)).astype(int))
    assert sizing.plan(100, 480, 832, max_frames=30, frame_rule="official").frames == 29
    assert (sizing.plan(5, 480, 832, size="256x320").height, sizing.plan(5, 480, 832, size="256x320").width) == \
        (256, 320)
    with pytest.raises(ValueError, match="multiples of 16"):
        sizing.plan(5, 480, 832, size="250x320")
    with pytest.raises(ValueError, match="480p"):
        sizing.plan(5, 480, 832, size="big")
    with pytest.raises(ValueError, match="frame_rule"):
        sizing.plan(5, 480, 832, frame_rule="stretch")
    with pytest.raises(ValueError, match="--long chunked"):
        sizing.plan(5, 480, 832, frame_rule="official", long="chunked")
    out = sizing.resize_crop(np.zeros((2, 90, 160, 3), np.uint8), 48, 64)
    assert out.shape == (2, 48, 64, 3)


# (frames, fps) of the sources: 1.1 s at 30 fps, one frame past a window at 16 fps, 10 s at 30 and 16 fps, NTSC,
# slow (8 fps: frames repeat), one frame, frames without a rate (taken as 16 fps)
SOURCES = [(33, 30.0), (82, 16.0), (300, 30.0), (160, 16.0), (300, 29.97), (12, 8.0), (1, 30.0), (45, None)]


@pytest.mark.parametrize("rule", ["keep", "chunked", "official"])
@pytest.mark.parametrize("n,fps", SOURCES)
def test_duration_is_kept(n, fps, rule):
    p = sizing.plan(n, 480, 832, fps=fps, frame_rule="official" if rule == "official" else "keep",
                    long="chunked" if rule == "chunked" else None)
    fps_in = fps or 16.0
    if rule != "official":  # the written rate makes the duration exact
        assert abs(p.frames / p.fps - n / fps_in) <= 1e-9 * n
    assert len(p.indices) == p.frames and min(p.indices) == 0 and max(p.indices) >= n - 1 - n // (2 * p.frames)
    assert all(0 <= i <= n - 1 for i in p.indices) and list(p.indices) == sorted(p.indices)  # plays forwards
    w = p.windows
    assert w.n == p.frames and w.starts[0] == 0 and w.starts[-1] + w.length == p.frames  # covered, nothing padded
    assert (w.length - 1) % 4 == 0 and w.length <= 81
    if rule == "keep":  # resampled to the model's 16 fps: at most 2 frames off (4k + 1) in one window
        x = n * 16.0 / fps_in
        assert abs(p.frames - x) <= 2 if len(w.starts) == 1 else p.frames == round(x)
    elif rule == "chunked":  # every source frame at the source's rate
        assert p.indices == tuple(range(n)) and p.fps == fps_in
    else:  # the paper's 81 frames at 16 fps, whatever the clip's length (the one rule that changes it)
        assert p.frames == 81 and len(w.starts) == 1 and p.fps == 16.0


def test_duration_worked_examples():
    # README's table: input frames @ fps -> output frames @ fps, lasting as long as the input but for the official rule
    p = sizing.plan(33, 480, 832, fps=30)  # 1.1 s: 17 frames, not 81 at 16 fps (5 s)
    assert (p.frames, round(p.fps, 3)) == (17, 15.455)
    assert p.indices == (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32)  # frame centres
    p = sizing.plan(300, 480, 832, fps=30)  # 10 s: 160 frames at 16 fps in three windows, not squeezed to 5 s
    assert (p.frames, p.fps, p.windows.starts) == (160, 16.0, (0, 68, 79))
    p = sizing.plan(82, 480, 832, fps=16)
    assert (p.frames, round(p.fps, 3)) == (81, 15.805)
    p = sizing.plan(82, 480, 832, fps=16, long="chunked")
    assert (p.frames, p.fps, p.windows.starts) == (82, 16.0, (0, 1))
    p = sizing.plan(33, 480, 832, fps=30, frame_rule="official")
    assert (p.frames, p.fps) == (81, 16.0)  # the paper's: 5.06 s whatever the source's length
    assert sizing.plan(81, 480, 832, fps=16).indices == tuple(range(81))  # already at the model's rate: untouched


def test_windows():
    w = sizing.windows(30, 9)
    assert (w.length, w.overlap, w.starts, w.keep_latents) == (9, 1, (0, 8, 16, 21), 1)
    w = sizing.windows(200, 81)
    assert (w.overlap, w.keep_latents, w.starts) == (13, 4, (0, 68, 119))
    assert sizing.windows(9, 81).starts == (0,) and sizing.windows(9, 81).length == 9
    assert sizing.windows(7, 81).starts == (0, 2) and sizing.windows(7, 81).length == 5  # not padded to 9
    assert sizing.windows(10, 81).starts == (0, 1) and sizing.windows(10, 81).length == 9  # no padding to 13
    with pytest.raises(ValueError, match=">= 5 frames"):
        sizing.windows(3, 81)


@pytest.mark.parametrize("n,max_frames", [(82, 81), (30, 9), (200, 81), (1000, 81), (86, 81), (18, 9), (150, 21)])
def test_last_window_ends_at_the_clip(n, max_frames):
    # the case: 82 frames gave windows at 0 and 68, and 67 of the second window's 81 frames were mirrored
    w = sizing.windows(n, max_frames)
    assert w.starts[-1] == n - w.length and len(set(w.starts)) == len(w.starts)  # from the end, nothing padded
    stride = w.length - w.overlap
    assert all(b - a == stride for a, b in zip(w.starts[:-2], w.starts[1:-1]))  # regular until the last
    assert 0 < w.starts[-1] - w.starts[-2] <= stride  # the last overlaps its predecessor more
    for i in range(1, len(w.starts)):
        assert w.shared(i) >= w.overlap and w.keep(i) >= w.keep_latents
        assert w.pinned(i) <= w.shared(i) and w.keep(i) < (w.length - 1) // 4 + 1  # inside the shared frames
        assert w.pinned(i) + 4 > w.shared(i) or w.keep(i) == (w.length - 1) // 4  # every whole shared latent
    if n == 82:
        assert (w.starts, w.keep(1), w.pinned(1)) == ((0, 1), 20, 77)
