"""End to end with tiny random models: the CLI (video in, mp4 + json out), long videos in windows, bad input."""
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
FAST = ["--steps", "3", "--skip", "1", "--max-frames", "9"]


def _clip(f, h=32, w=48, seed=0):
    y, x = np.mgrid[0:h, 0:w]
    base = np.random.default_rng(seed).uniform(0, 255, 3)
    return np.asarray([np.stack([(base[c] + 4 * x + 3 * y + 7 * t * (c + 1)) % 256 for c in range(3)], -1)
                       for t in range(f)]).astype(np.uint8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """layout -> the tiny models saved with config.json naming that layout: "flat" or "scanned" (scan_layers=True,
    what `convert.wan_dit` writes for every released variant); built on first use."""
    built = {}

    def get(layout="flat"):
        if layout not in built:
            root = tmp_path_factory.mktemp(f"models_{layout}")
            cfg = CFG.replace(scan_layers=layout == "scanned")
            paths = tiny_models.save_models(root, root / "lora", cfg, SEED)
            other = CFG.replace(dim=64, ffn_dim=96)  # "another variant": same layer names, other widths
            checkpoints.save_lora(root / "lora_other", lora.init(lora.LoraConfig(rank=4, alpha=4),
                                                                 wan.param_shapes(other), jax.random.key(0)))
            built[layout] = {**paths, "tokenizer": "bytes", "root": root}
        return built[layout]

    return get


@pytest.fixture
def models(saved):
    return saved("flat")


LAYOUTS = pytest.mark.parametrize("layout", ["flat", "scanned"])


def _argv(m, video_path, out, *extra):
    return ["--video", str(video_path), "--prompt", "Anime style. A cat.", "--dit", m["dit"], "--vae", m["vae"],
            "--umt5", m["umt5"], "--tokenizer", m["tokenizer"], "--lora", m["lora"], "--out", str(out), *extra]


@LAYOUTS
def test_cli_end_to_end(saved, layout, tmp_path):
    models = saved(layout)
    src = video.write(tmp_path / "in.mp4", _clip(9), fps=12)
    out = tmp_path / "res" / "out.mp4"
    long_prompt = "Anime style. " * 50  # 650 byte tokens: warned about and truncated to 512
    argv = _argv(models, src, out, *FAST, "--side-by-side")
    argv[argv.index("--prompt") + 1] = long_prompt
    with pytest.warns(UserWarning, match="512"):
        assert stylize.main(argv) == 0
    frames, fps = video.read(out)
    assert frames.shape == (9, 32, 48, 3) and fps == pytest.approx(12, rel=1e-3)  # 9 frames kept: source fps
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompt_truncated"] and record["prompt_tokens"] == 512
    for key, want in dict(steps=3, skip=1, shift=16.0, text_scale=5.0, context_scale=4.0, seed=2025,
                          solver="dpm++", mode="cs_cfg", apg=True, size="480p", max_frames=9, frames_out=9, height=32,
                          width=48).items():
        assert record[key] == want, (key, record[key])
    assert {"text_s", "sample_s", "load_s", "total_s"} <= set(record["timing"])
    sbs, _ = video.read(record["side_by_side"])
    assert sbs.shape == (9, 32, 96, 3)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json", "out.mp4", "out_side_by_side.mp4"]


def test_long_video_in_windows(models):
    st = sample.Stylizer.load(**{k: models[k] for k in ("dit", "vae", "umt5", "tokenizer", "lora")})
    clip = _clip(30, seed=1)
    kw = dict(steps=3, skip=1, max_frames=9, seed=7)
    plain = st(clip[:9], "Watercolor style.", **kw)
    chunked, info = st.run(clip, "Watercolor style.", long="chunked", **kw)
    assert chunked.shape == (30, 32, 48, 3)
    assert info["window_starts"] == [0, 8, 16, 24] and info["overlap"] == 1
    # the first window is the plain sampler on the first 9 frames, up to the frame it shares with window 2
    np.testing.assert_array_equal(chunked[:8], plain[:8])
    assert not np.array_equal(chunked[9:17], chunked[1:9])  # later windows are their own samples
    # E(0) is computed for real (normalised latents of zeros are not zero) and cached per shape
    z0 = st.zero_latents(9, 32, 48)
    assert float(jnp.abs(z0).max()) > 1e-3 and st.zero_latents(9, 32, 48) is z0


@LAYOUTS
def test_bad_input(saved, layout, tmp_path, capsys, monkeypatch):
    models = saved(layout)
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


@LAYOUTS
def test_check_lora_reads_adapters_in_either_layout(layout):
    """Adapters carry the official (flat) paths; the DiT config may name either layout. A LoRA that fits passes,
    and a real mismatch (other widths, a layer the DiT lacks) is still named."""
    cfg = CFG.replace(scan_layers=layout == "scanned")
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
