"""The demo's held-out motion world (demo/world.py): exact motion, so the ground truth warps onto itself."""
import numpy as np
import pytest

from pickstyle_jax.demo import world
from pickstyle_jax.eval import metrics


def test_world_motion_is_exact(seed):
    f, h, w = 9, 48, 64
    clip = world.render_clip(seed % 1000, f, h, w, "toon", seed=1)
    assert clip.source.shape == clip.target.shape == (f, h, w, 3) and clip.source.dtype == np.uint8
    assert clip.flow.shape == (f - 1, h, w, 2) and clip.valid.shape == (f - 1, h, w)
    assert clip.caption.startswith("Toon style. ") and clip.style == "toon"
    again = world.render_clip(seed % 1000, f, h, w, "toon", seed=1)  # deterministic
    np.testing.assert_array_equal(clip.source, again.source)
    np.testing.assert_array_equal(clip.flow, again.flow)
    assert clip.valid.mean() > 0.5
    # the ground truth is consistent under the known motion (its style is a pure function of each pixel's region)
    # and the source nearly so (bilinear texture): far below what ignoring the motion costs
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    still = np.broadcast_to(np.stack([yy, xx], -1), clip.flow.shape)
    te_gt = metrics.temporal_error(clip.target, clip.flow, clip.valid)
    te_src = metrics.temporal_error(clip.source, clip.flow, clip.valid)
    te_still = metrics.temporal_error(clip.target, still)
    assert te_gt < 0.002 and te_src < 0.01 and te_still > max(5 * te_gt, 1e-3), (te_gt, te_src, te_still)
    # objects move on their own: their motion differs from the camera's
    n = clip.objects.shape[1]
    assert n >= 1
    cam_motion = world.compose(clip.camera[-1], world.invert(clip.camera[0]))
    obj_track = clip.objects[-1, 0][:, 2] - clip.objects[0, 0][:, 2]
    assert np.linalg.norm(obj_track) > 0.05 * min(h, w)
    assert not np.allclose(cam_motion[:, :2], world.compose(clip.objects[-1, 0], world.invert(clip.objects[0, 0]))
                           [:, :2])
    # the ground truth is the training style function on the source frames: the held-out world keeps its look
    assert metrics.content(clip.target, clip.source) > 0.6
    w8 = world.World(3, 5, 32, 48, styles=("toon", "neon"), seed=2)
    assert len(w8) == 3 and w8[1].style == "neon"
    ref = w8.reference_frames("toon", clips=2)
    assert ref.shape == (10, 32, 48, 3)
    with pytest.raises(ValueError, match="unknown synthetic style"):
        world.render_clip(0, 3, 32, 48, "watercolour")
