"""End to end with tiny random models: the CLI (video in, mp4 + json out), the output's duration in every frame rule,
long videos in windows (taken from the clip's end, each conditioned on the one before), bad input."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pickstyle_jax import checkpoints, lora, sample, stylize, video
from pickstyle_jax.models import wan
from tests import tiny_models
from tests.conftest import SEED  # printed, replayable with PICKSTYLE_TEST_SEED

CFG = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0,), text_dim=64)  # umT5 tiny is 64 wide
STEPS = ["--steps", "3", "--skip", "1"]
FAST = [*STEPS, "--max-frames", "9"]


def _clip(f, h=32, w=48, seed=0):
    y, x = np.mgrid[0:h, 0:w]
    base = np.random.default_rng(seed).uniform(0, 255, 3)
    return np.asarray([np.stack([(base[c] + 4 * x + 3 * y + 7 * t * (c + 1)) % 256 for c in range(3)], -1)
                       for t in range(f)]).astype(np.uint8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> a set of the tiny models saved as checkpoints (always the flat tree and an architecture-only
    config.json, as `convert.wan_dit` writes them); built on first use."""
    built = {}

    def get(layout="flat"):
        if layout not in built:
            root = tmp_path_factory.mktemp(f"models_{layout}")
            paths = tiny_models.save_models(root, root / "lora", CFG, SEED)
            other = CFG.replace(dim=64, ffn_dim=96)  # "another variant": same layer names, other widths
            checkpoints.save_lora(root / "lora_other", lora.init(lora.LoraConfig(rank=4, alpha=4),
                                                                 wan.param_shapes(other), jax.random.key(0)))
            built[layout] = {**paths, "tokenizer": "bytes", "root": root}
        return built[layout]

    return get


@pytest.fixture(scope="module")
def models(saved):
    return saved("flat")


LAYOUTS = pytest.mark.parametrize("layout", ["flat", "scanned"])


def _default_layout(monkeypatch, layout):
    """The stylizer loads in the layout of the backend's default options: flat on CPU, stacked on an accelerator
    (simulated here by the defaults with scan_layers=True)."""
    default = wan.Options.default.__func__
    monkeypatch.setattr(wan.Options, "default", classmethod(
        lambda cls, backend=None, **kw: default(cls, backend, **{"scan_layers": layout == "scanned", **kw})))


def _argv(m, video_path, out, *extra):
    return ["--video", str(video_path), "--prompt", "Anime style. A cat.", "--dit", m["dit"], "--vae", m["vae"],
            "--umt5", m["umt5"], "--tokenizer", m["tokenizer"], "--lora", m["lora"], "--out", str(out), *extra]


@pytest.fixture(scope="module")
def stylizer(models):
    """One loaded Stylizer for the tests below: its samplers and VAE compiles are shared between them."""
    return sample.Stylizer.load(**{k: models[k] for k in ("dit", "vae", "umt5", "tokenizer", "lora")})


@LAYOUTS
def test_cli_end_to_end(saved, layout, tmp_path, monkeypatch):
    models = saved()
    _default_layout(monkeypatch, layout)
    # the clip: 1.1 s at 30 fps came out as 81 frames at 16 fps (5.1 s); now 17 frames at 15.45 fps
    src = video.write(tmp_path / "in.mp4", _clip(33), fps=30)
    out = tmp_path / "res" / "out.mp4"
    long_prompt = "Anime style. " * 50  # 650 byte tokens: warned about and truncated to 512
    argv = _argv(models, src, out, *STEPS, "--side-by-side")
    argv[argv.index("--prompt") + 1] = long_prompt
    with pytest.warns(UserWarning, match="512"):
        assert stylize.main(argv) == 0
    frames, fps = video.read(out)
    print(f"33 frames at 30 fps ({33 / 30:.3f} s) -> {len(frames)} frames at {fps} fps ({len(frames) / fps:.3f} s)")
    assert frames.shape == (17, 32, 48, 3) and fps == pytest.approx(17 * 30 / 33, abs=0.01)  # file: 2 decimals
    assert abs(len(frames) / fps - 33 / 30) <= 1 / fps  # as long as the input, within one output frame
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompt_truncated"] and record["prompt_tokens"] == 512
    for key, want in dict(steps=3, skip=1, shift=16.0, text_scale=5.0, context_scale=4.0, seed=2025,
                          solver="dpm++", mode="cs_cfg", apg=True, size="480p", max_frames=81, frame_rule="keep",
                          frames_in=33, fps_in=30, frames_out=17, height=32, width=48).items():
        assert record[key] == want, (key, record[key])
    assert record["fps"] == record["fps_out"] == pytest.approx(17 * 30 / 33)
    assert {"text_s", "sample_s", "load_s", "total_s"} <= set(record["timing"])
    sbs, _ = video.read(record["side_by_side"])
    assert sbs.shape == (17, 32, 96, 3)  # the source beside it, resampled the same way
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json", "out.mp4", "out_side_by_side.mp4"]


def test_long_video_in_windows(stylizer):
    st = stylizer
    clip = _clip(30, seed=1)
    kw = dict(steps=3, skip=1, max_frames=9, seed=7)
    plain = st(clip[:9], "Watercolor style.", **kw)
    chunked, info = st.run(clip, "Watercolor style.", long="chunked", **kw)
    assert chunked.shape == (30, 32, 48, 3)
    assert info["window_starts"] == [0, 8, 16, 21] and info["overlap"] == 1  # the last one ends at frame 29
    # the first window is the plain sampler on the first 9 frames, up to the frame it shares with window 2
    np.testing.assert_array_equal(chunked[:8], plain[:8])
    assert not np.array_equal(chunked[9:17], chunked[1:9])  # later windows are their own samples
    # E(0) is computed for real (normalised latents of zeros are not zero) and cached per shape
    z0 = st.zero_latents(9, 32, 48)
    assert float(jnp.abs(z0).max()) > 1e-3 and st.zero_latents(9, 32, 48) is z0


# (frames, fps, extra settings) -> (frames, fps) written; 10 s clips in windows of 9 frames (quick on CPU); the
# Stylizer's settings match test_long_video_in_windows' so the compiles are shared
DURATIONS = {
    "keep-82@16": ((82, 16.0, {}), (81, 16 * 81 / 82)),  # one window: the 4k + 1 nearest to 82
    "keep-10s@30": ((300, 30.0, {"max_frames": 9}), (160, 16.0)),  # 20 windows at 16 fps, not squeezed
    "chunked-82@16": ((82, 16.0, {"long": "chunked"}), (82, 16.0)),  # windows at 0 and 1 (the 2nd was mirrored)
    "chunked-10s@30": ((300, 30.0, {"long": "chunked", "max_frames": 9}), (300, 30.0)),
    "official-33@30": ((33, 30.0, {"frame_rule": "official"}), (81, 16.0)),  # the paper's 81 frames at 16 fps
    "official-10s@30": ((300, 30.0, {"frame_rule": "official"}), (81, 16.0)),
}


@pytest.mark.parametrize("case", list(DURATIONS))
def test_duration_in_every_frame_rule(case, models, stylizer, tmp_path):
    (n, fps_in, settings), (n_out, fps_out) = DURATIONS[case]
    src = video.write(tmp_path / "in.mp4", _clip(n, seed=n), fps=fps_in)
    out = tmp_path / "out.mp4"
    record = stylize.stylize(src, "Anime style. A cat.", dit=models["dit"], vae=models["vae"], umt5=models["umt5"],
                             tokenizer="bytes", out=out, stylizer=stylizer, progress=False, steps=3, skip=1,
                             **settings)
    frames, fps = video.read(out)  # read back from the file
    print(f"{case}: {n} frames at {fps_in} fps ({n / fps_in:.3f} s) -> {len(frames)} frames at {fps} fps "
          f"({len(frames) / fps:.3f} s), windows {record['window_starts']} of {record['window']}")
    assert len(frames) == n_out and fps == pytest.approx(fps_out, abs=0.01)
    if settings.get("frame_rule") != "official":  # lasts as long as the input, within one output frame
        assert abs(len(frames) / fps - n / fps_in) <= 1 / fps
    assert record["window_starts"][-1] + record["window"] == n_out  # the windows end at the clip's end
    assert record["frames_out"] == n_out and record["fps_out"] == pytest.approx(fps_out)


def test_last_window_is_the_clips_end(stylizer, monkeypatch):
    # 18 frames in windows of 9: at 0, 8 and 9 (was 0, 8, 16 with 7 of the last window's frames mirrored); every
    # window samples consecutive source frames, and the last one is pinned on the 2 latents (5 frames) it shares
    st, clip, calls = stylizer, _clip(18, seed=3), []
    sample_clip = st._sample_clip
    monkeypatch.setattr(st, "_sample_clip", lambda c, *a, **k: calls.append((c, a[-1])) or sample_clip(c, *a, **k))
    out, info = st.run(clip, "Watercolor style.", steps=3, skip=1, max_frames=9, long="chunked")
    assert out.shape == clip.shape and info["window_starts"] == [0, 8, 9]
    for (frames, keep), s in zip(calls, info["window_starts"]):
        np.testing.assert_array_equal(frames, clip[s: s + 9])  # no invented frame
    assert [None if k is None else k.shape[1] for _, k in calls] == [None, 1, 2] == [None, *info[
        "window_keep_latents"][1:]]


def test_window_depends_on_the_previous_windows_overlap(stylizer):
    # 17 frames in windows of 9 at 0 and 8, sharing frame 8. Changing frames 0-7 (window 1 does not see them)
    # changes window 1's own frames 9-16 only through the pinned latent of frame 8 (keep_latents): its source
    # frames, text and noise are the same, so without the pin they would be bit-equal.
    clip = _clip(17, seed=4)
    other = clip.copy()
    other[:8] = _clip(8, seed=5)
    kw = dict(steps=3, skip=1, max_frames=9, long="chunked", seed=11)
    a, info = stylizer.run(clip, "Watercolor style.", **kw)
    b, _ = stylizer.run(other, "Watercolor style.", **kw)
    assert info["window_starts"] == [0, 8] and info["window_keep_latents"] == [0, 1]
    np.testing.assert_array_equal(a, stylizer.run(clip, "Watercolor style.", **kw)[0])  # deterministic
    diff = np.abs(a[9:].astype(int) - b[9:].astype(int))
    print("window 1 frames 9-16, mean |difference| when window 0's frames change:", diff.mean())
    assert diff.max() > 0


def test_bad_input(saved, tmp_path, capsys, monkeypatch):
    models = saved()
    src = video.write(tmp_path / "in.mp4", _clip(9), fps=12)
    out = tmp_path / "out.mp4"

    def fails(argv, match):
        assert stylize.main(argv) == 2
        err = capsys.readouterr().err
        assert match in err, err
        assert not out.exists() and not out.with_suffix(".json").exists()

    # nothing here may read the DiT weights (let alone compile): the checks run on config.json and the LoRA
    monkeypatch.setattr(checkpoints, "load_dit", lambda *a, **k: pytest.fail("load_dit called"))
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 50)
    fails(_argv(models, tmp_path / "junk.mp4", out, *FAST), "junk.mp4")
    (tmp_path / "empty").mkdir()
    fails(_argv(models, tmp_path / "empty", out, *FAST), "zero frames")
    argv = _argv(models, src, out, *FAST)
    argv[argv.index("--lora") + 1] = str(models["root"] / "lora_other")
    fails(argv, "another variant")
    argv = _argv(models, src, out, *FAST)
    argv[argv.index("--dit") + 1] = str(tmp_path / "missing")
    fails(argv, "does not exist")
    bad_vae = tmp_path / "vae8"
    shutil.copytree(models["vae"], bad_vae)
    meta = json.loads((bad_vae / "config.json").read_text())
    meta["config"].update(z_dim=8, latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
    (bad_vae / "config.json").write_text(json.dumps(meta))
    argv = _argv(models, src, out, *FAST)
    argv[argv.index("--vae") + 1] = str(bad_vae)
    fails(argv, "does not fit the DiT")
    fails(_argv(models, src, out, "--steps", "3", "--skip", "3"), "--skip")
    fails(_argv(models, src, out, "--size", "100x100"), "multiples of 16")
    # devices and hosts: a mesh that does not fit the devices or names an unknown axis, a multi-host run without a
    # coordinator; the multi-host flags reach jax.distributed.initialize (mocked) before anything else runs
    fails(_argv(models, src, out, *FAST, "--mesh", f"data={jax.device_count() + 1}"), "--mesh data=")
    fails(_argv(models, src, out, *FAST, "--mesh", "pipeline=1"), "unknown mesh axes ['pipeline']")
    fails(_argv(models, src, out, *FAST, "--distributed.num_processes", "2"), "--distributed.coordinator")
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a: calls.append(a))
    fails(_argv(models, src, out, *FAST, "--distributed.coordinator", "10.0.0.1:1234", "--distributed.num_processes",
                "2", "--distributed.process_id", "1", "--mesh", "data=0"), "--mesh data=0")
    assert calls == [("10.0.0.1:1234", 2, 1)], calls


def test_check_lora_reads_adapters_in_either_layout():
    """Adapters carry the official (flat) paths, whatever layout the DiT runs in. A LoRA that fits passes, and a
    real mismatch (other widths, a layer the DiT lacks) is still named."""
    cfg = CFG
    flat = wan.param_shapes(CFG)
    lcfg = lora.LoraConfig(rank=4, alpha=4)
    sample.check_lora(cfg, lora.init(lcfg, flat, jax.random.key(0)))  # PickStyle's targets: no error
    sample.check_lora(cfg, lora.init(lora.LoraConfig(rank=4, alpha=4, targets=r"blocks\.1\.ffn\.0"), flat,
                                     jax.random.key(0)))
    other = lora.init(lcfg, wan.param_shapes(CFG.replace(dim=64, ffn_dim=96)), jax.random.key(0))
    with pytest.raises(sample.CompatibilityError, match=r"vace_blocks\.0\.self_attn\.q: adapter maps 64 -> 64, "
                                                        r"the DiT layer 48 -> 48"):
        sample.check_lora(cfg, other)
    deeper = lora.init(lcfg, wan.param_shapes(CFG.replace(num_layers=4, vace_layers=(0, 2))), jax.random.key(0))
    with pytest.raises(sample.CompatibilityError, match=r"vace_blocks\.1\.self_attn\.q: no such layer"):
        sample.check_lora(cfg, deeper)
