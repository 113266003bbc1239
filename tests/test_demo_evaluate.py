"""The demo's synthetic benchmark (demo/evaluate.py) end to end: tiny random checkpoints + a tiny LoRA written as a training run, one held-out clip,
two sampler steps, two world seeds, with the ablations (numbers exist, shapes right, files and pictures written, one
compile per static sampler setting: neither the scale grid nor a second world seed compiles anything); the ablation
tables, seeds summary, baselines, warm timing and the report writers with a stand-in stylizer (no sampler compiles);
the colour-transfer baseline and the guidance summary on hand-made cases."""
import json

import numpy as np
import pytest
from PIL import Image

from pickstyle_jax import text
from pickstyle_jax.data.synthetic import Synthetic
from pickstyle_jax.demo import evaluate, report, world
from pickstyle_jax.eval import baselines, metrics
from pickstyle_jax.models import wan
from tests import tiny_models
from tests.conftest import SEED  # printed, replayable with PICKSTYLE_TEST_SEED

CFG = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0,), text_dim=64)  # umT5 tiny is 64 wide
F, H, W = 5, 32, 48


def _run_config(models: dict, styles=("toon",)) -> dict:
    """config.json as training writes it (ConfigDict.to_json of the training schema), the fields evaluate reads."""
    return {"seed": 0,
            "model": {"variant": "tiny", "dit": models.get("dit", ""), "vae_variant": "tiny",
                      "vae": models.get("vae", ""),
                      "umt5_variant": "tiny", "umt5": models.get("umt5", ""), "tokenizer": "bytes",
                      "param_dtype": "float32", "dtype": "float32", "attention": "xla", "remat_policy": "none",
                      "scan_layers": False},
            "lora": {"rank": 4, "alpha": 4.0, "targets": ""},
            "schedule": {"shift": 5.0, "num_train_timesteps": 1000},
            "data": {"source": "synthetic", "frames": F, "height": H, "width": W, "batch_size": 1,
                     "synthetic_styles": list(styles), "synthetic_seed": 0, "synthetic_examples": 8},
            "text": {"cache_dir": "", "text_len": 512}, "total_steps": 2}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    models = tiny_models.save_models(root / "models", root / "lora", CFG, SEED)
    (root / "config.json").write_text(json.dumps(_run_config(models), indent=2))
    return root


def test_end_to_end_tiny_run(run_dir, capsys, monkeypatch):
    built = []
    load = evaluate.load_stylizer
    monkeypatch.setattr(evaluate, "load_stylizer", lambda *a, **k: built.append(load(*a, **k)) or built[-1])
    assert evaluate.main(["--workdir", str(run_dir), "--clips", "1", "--steps", "2", "--skip", "0",
                          "--timing", "cold", "--ablations", "--seeds", "0,1"]) == 0
    printed = capsys.readouterr().out
    assert "| cs_cfg |" in printed and "| per_frame |" in printed
    out = run_dir / "eval"
    result = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["cs_cfg", "text_cfg", "no_guidance", "copy_source",
                                                     "per_frame", "color_transfer", "ae_ceiling"]
    baseline = ("copy_source", "color_transfer", "ae_ceiling")
    for r in result["rows"]:
        for k in ("psnr", "ssim", "temporal_error", "flicker", "content", "style", "s_per_step"):
            assert isinstance(r[k], float) and np.isfinite(r[k]), (r["method"], k, r[k])
        assert 0 < r["psnr"] <= 100 and -1 <= r["ssim"] <= 1 and 0 <= r["content"] <= 1
        assert r["steps"] == (0 if r["method"] in baseline else 2)
        assert (r["s_per_step"] > 0) == (r["method"] not in baseline)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["copy_source"]["flicker"] == 0.0 and rows["copy_source"]["content"] == 1.0
    # the rows really ran different samplers (every weight is random here, so the guidance modes differ)
    assert len({rows[m]["psnr"] for m in ("cs_cfg", "text_cfg", "no_guidance", "per_frame")}) == 4
    # a random autoencoder's reconstruction is no ground truth and no source
    assert rows["ae_ceiling"]["psnr"] < 100 and rows["ae_ceiling"]["content"] < 1
    # two world seeds: the main rows are seed 0's; every seed method on both
    sd = result["seeds"]
    assert sd["seeds"] == [0, 1] and set(sd["methods"]) == set(evaluate.SEED_METHODS)
    for m, v in sd["methods"].items():
        assert [p["seed"] for p in v["per_seed"]] == [0, 1] and v["per_seed"][0]["psnr"] == rows[m]["psnr"]
        assert v["mean"]["psnr"] == pytest.approx(np.mean([p["psnr"] for p in v["per_seed"]]))
    assert sd["methods"]["cs_cfg"]["per_seed"][1]["psnr"] != rows["cs_cfg"]["psnr"]  # another clip set
    assert "## Over world seeds 0, 1: mean ± spread" in (out / "results.md").read_text()
    assert set(result["reference"]) == {"temporal_error", "flicker", "content", "style"}
    assert result["settings"]["steps"] == 2 and result["clips"][0]["style"] == "toon"
    md = (out / "results.md").read_text()
    assert "| method |" in md and "cs_cfg" in md
    strip = np.asarray(Image.open(out / "strip_0.png"))
    assert strip.shape[0] == 3 * (H + 2) and strip.shape[1] == F * (W + 2)  # source / ours / ground truth
    assert np.asarray(Image.open(out / "plot.png")).ndim == 3
    from pickstyle_jax import video

    ours, _ = video.read(out / "stylized.mp4")
    sbs, _ = video.read(out / "side_by_side.mp4")
    assert ours.shape == (F, H, W, 3) and sbs.shape == (F, H, 3 * W, 3)
    # ablations (steps 2: the skip table is skip 0 only), every row measured
    ab = result["ablations"]
    assert [len(ab[k]) for k in ("scales", "skip", "apg", "modes", "cache")] == [12, 1, 3, 3, 2]
    for r in (r for rows_ in ab.values() for r in rows_):
        assert np.isfinite(r["psnr"]) and r["s_per_step"] > 0 and r["steps"] == 2
    assert len({r["psnr"] for r in ab["scales"]}) == 12  # the call-time scales really differ
    g = result["guidance_summary"]
    assert [r["text_scale"] for r in g["context_direction"]] == [1.0, 3.0, 5.0]
    assert g["branch_cost"]["cs_cfg"] > 0 and g["branch_cost"]["seeds"] == [0, 1]
    k = report.upscale_factor(H)
    assert k == 4 and np.asarray(Image.open(out / "overview.png")).shape == (
        report.LABEL_H + (k * H + report.GAP), 3 * (k * W + report.GAP), 3)  # one clip: source | ours | truth
    assert np.asarray(Image.open(out / "guidance_grid.png")).shape == (
        3 * (k * H + report.CAPTION_H + report.GAP), 4 * (k * W + report.GAP), 3)  # text x context scales
    # compiles: one sampler per static setting (cs_cfg, text, none, apg scaled, apg off, text_context, teacache),
    # one program per clip shape (cs_cfg also runs one-frame clips for per_frame); the 12 scale pairs reuse cs_cfg's
    # program (with make-time scales they were 11 more) and so does world seed 1, whose caption is in the same text
    # bucket (the sampler compiles per prompt bucket: `text.bucket_length`)
    (stylizer,) = built
    lens = [int(stylizer.tokenizer([world.World(1, F, H, W, "toon", seed=s_)[0].caption], max_len=512)[1].sum())
            for s_ in (0, 1)]
    assert len({text.bucket_length(n, 512) for n in lens}) == 1, lens
    programs = sum(s._cache_size() for s in stylizer._samplers.values())
    assert len(stylizer._samplers) == 7 and programs == 8 == result["sampler_compiles"], (
        len(stylizer._samplers), programs, result["sampler_compiles"])
    assert result["settings"]["s_per_step_excludes_compile"] is False  # --timing cold
    assert "All scale pairs run one compiled sampler" in md


def test_cli_on_the_released_layout(tmp_path, monkeypatch):
    """A run that trained scanned (config.model.scan_layers=True, as the released variants' configs do) evaluates
    in that layout, the flat checkpoint stacked on load, with its LoRA."""
    models = tiny_models.save_models(tmp_path / "models", tmp_path / "lora", CFG, SEED)
    run = _run_config(models)
    run["model"]["scan_layers"] = True
    (tmp_path / "config.json").write_text(json.dumps(run))
    built = []
    load = evaluate.load_stylizer
    monkeypatch.setattr(evaluate, "load_stylizer", lambda *a, **k: built.append(load(*a, **k)) or built[-1])
    assert evaluate.main(["--workdir", str(tmp_path), "--clips", "1", "--steps", "2", "--skip", "0",
                          "--timing", "cold", "--no-videos"]) == 0
    (stylizer,) = built
    assert stylizer.options.scan_layers and "0" not in stylizer.params["blocks"]  # stacked, as the run trained
    assert stylizer.adapters is not None
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert all(np.isfinite(r["psnr"]) for r in rows) and len({r["psnr"] for r in rows}) == len(rows)


def test_reinitialised_dit_is_the_trained_base(tmp_path):
    """A run trained without model.dit is evaluated on the base the training run drew (random_dit from fold_in(seed, 3)),
    not on another init of the variant."""
    import importlib.util
    import pathlib

    import jax

    from pickstyle_jax import checkpoints, lora, sharding
    from pickstyle_jax.train import base as train_base, setup

    spec = importlib.util.spec_from_file_location(
        "pickstyle_cfg", pathlib.Path(__file__).resolve().parents[1] / "configs" / "pickstyle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    wcfg = setup.model_configs(c)[0]
    _, trained = train_base.load_dit(c, wcfg, sharding.make_mesh({"data": 1}, jax.devices()[:1]), c.rules)
    checkpoints.save_lora(tmp_path / "lora", lora.init(lora.LoraConfig(rank=4, alpha=4), wan.param_shapes(wcfg),
                                                       jax.random.key(0)))
    saved = tiny_models.save_models(tmp_path / "models", tmp_path / "unused", CFG, SEED)  # cheap VAE and umT5
    run = _run_config({"vae": saved["vae"], "umt5": saved["umt5"]})
    assert (run["seed"], run["model"]["variant"]) == (c.seed, c.model.variant)
    st = evaluate.load_stylizer(tmp_path, run)
    jax.tree.map(np.testing.assert_array_equal, st.params, trained)


class _Fake:
    """A stand-in Stylizer: the source plus a little seeded noise (so per-frame seeds matter); records its calls.
    It "compiles" as the Stylizer does, once per static setting, clip shape and prompt bucket (its tokenizer counts
    words, so the captions fall in buckets of 16 and 32): such a call takes 0.02 s, any other 0.01 s. Its codec (for
    ae_ceiling) is a random tiny conv autoencoder, cheap to compile."""

    def __init__(self):
        from types import SimpleNamespace

        from pickstyle_jax.demo import conv_ae
        from pickstyle_jax.models import autoencoders

        self.calls, self.compiled = [], set()
        self.cfg = SimpleNamespace(text_len=512)
        self.vae_cfg = conv_ae.ConvAeConfig.named("tiny")
        self.vae_params = autoencoders.random_params(self.vae_cfg, SEED)

    @staticmethod
    def tokenizer(texts, max_len):
        n = min(len(texts[0].split()), max_len)
        return np.zeros((1, n), np.int32), np.ones((1, n), np.int32)

    def run(self, frames, prompt, *, size, max_frames, seed, **settings):
        from pickstyle_jax import text
        from pickstyle_jax.sample.settings import CALL_TIME

        self.calls.append({"frames": len(frames), "size": size, "max_frames": max_frames, "seed": seed, **settings})
        key = (tuple(sorted((k, v) for k, v in settings.items() if k not in CALL_TIME)), frames.shape,
               text.bucket_length(len(prompt.split()), self.cfg.text_len))
        new = key not in self.compiled
        self.compiled.add(key)
        noise = np.random.default_rng(seed).normal(0, 3 * settings["text_scale"], frames.shape)
        out = np.clip(frames.astype(float) + noise, 0, 255).astype(np.uint8)
        return out, {"timing": {"sample_s": 0.01 * (1 + new)}}


def test_ablations_and_reports_with_a_stand_in(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_run_config({}, styles=("toon", "neon"))))
    fake = _Fake()
    res = evaluate.evaluate(tmp_path, clips=2, steps=8, skip=4, ablations=True, stylizer=fake, write_videos=False,
                            out=tmp_path / "ev", seeds="0,1")
    # main rows: one call per clip per sampled row, per_frame one call per frame; sizes passed through exactly
    assert all(c["size"] == f"{H}x{W}" for c in fake.calls)
    assert {c["max_frames"] for c in fake.calls} == {F, 1}
    per_frame_seeds = [c["seed"] for c in fake.calls if c["frames"] == 1]
    assert len(set(per_frame_seeds)) == len(per_frame_seeds) >= 2 * F  # independent noise per frame
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["per_frame"]["temporal_error"] > rows["copy_source"]["temporal_error"]
    ab = res["ablations"]
    assert set(ab) == {"scales", "skip", "apg", "modes", "cache"}
    assert len(ab["scales"]) == 12 and [r["skip"] for r in ab["skip"]] == [0, 2, 4, 6]
    assert [r["steps"] for r in ab["skip"]] == [8, 6, 4, 2]
    assert [r["mode"] for r in ab["modes"]] == ["cs_cfg", "text", "text_context"]
    assert ab["cache"][1]["cache"] == "teacache"
    assert all(r["s_per_step"] > 0 for rows_ in ab.values() for r in rows_)
    # identical settings are sampled once (the default setting appears in several tables): 2 clips per world seed,
    # no rerun, as clip 1's call is warm; a new static setting on the single ablation clip is called twice (cold,
    # then the timed rerun); a new scale pair reuses the default setting's compile, so its one call is warm and timed
    def calls(**want):
        return sum(c["frames"] == F and all(c[k] == v for k, v in want.items()) for c in fake.calls)

    default = dict(mode="cs_cfg", text_scale=5.0, context_scale=4.0, skip=4, apg=True, cache=None)
    assert calls(**default) == 2 * 2
    assert calls(**{**default, "text_scale": 1.0, "context_scale": 1.0}) == 1
    assert calls(**{**default, "apg": False}) == 2 and calls(**{**default, "skip": 2}) == 2
    assert calls(**{**default, "apg": "scaled"}) == 2
    # warm timing: the first, compiling call of a compiled sampler (here the fake's 0.02 s calls: a new static
    # setting, clip shape or prompt bucket) is never timed, so every row of every seed reads 0.01 s per call
    per_seed = [dict(p, method=m) for m in ("cs_cfg", "text_cfg", "no_guidance")
                for p in res["seeds"]["methods"][m]["per_seed"]]
    for r in [*res["rows"], *(r for rows_ in ab.values() for r in rows_), *per_seed]:
        if r.get("steps", 4):
            per_call = 0.01 * (F if r.get("method") == "per_frame" else 1)
            assert r["s_per_step"] == pytest.approx(per_call / r.get("steps", 4)), r
    assert res["settings"]["s_per_step_excludes_compile"] is True
    # compiled samplers: (cs_cfg, text, none) x clip + cs_cfg x one frame; skip 0, 2, 6, APG scaled, APG off,
    # text_context, TeaCache; none for the 11 new scale pairs; world seed 1 only for its caption in a new bucket
    # (16 words: cs_cfg, text, none)
    buckets = [[len(c.caption.split()) > 16 for c in world.World(2, F, H, W, styles=("toon", "neon"), seed=s_)]
               for s_ in (0, 1)]
    assert buckets == [[True, True], [True, False]]
    assert res["sampler_compiles"] == len(fake.compiled) == 4 + 7 + 3
    # the baselines: color_transfer is the source moved to the per-channel mean/std (population) of the training
    # targets of its clip's style (8 synthetic pairs, seed 0, alternating toon / neon), computed here by hand
    train = Synthetic(8, H, W, ("toon", "neon"), seed=0)
    for seed_, clip_set in ((0, world.World(2, F, H, W, styles=("toon", "neon"), seed=0)),
                            (1, world.World(2, F, H, W, styles=("toon", "neon"), seed=1))):
        want = []
        for c in (clip_set[0], clip_set[1]):
            tgt = np.stack([train[i]["target"] for i in range(8) if train[i]["style"] == c.style]).astype(float)
            x = c.source.astype(float)
            mu_s, sd_s = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
            mu_t, sd_t = tgt.reshape(-1, 3).mean(0), tgt.reshape(-1, 3).std(0)
            hand = np.clip(np.round((x - mu_s) / sd_s * sd_t + mu_t), 0, 255).astype(np.uint8)
            want.append(metrics.psnr(hand, c.target))
        got = res["seeds"]["methods"]["color_transfer"]["per_seed"][seed_]["psnr"]
        assert got == pytest.approx(np.mean(want), rel=1e-12), (seed_, got, want)
    assert res["style_stats"]["neon"]["images"] == 4 and res["style_stats"]["toon"]["from"] == "training targets"
    assert np.isfinite(rows["ae_ceiling"]["psnr"]) and rows["ae_ceiling"]["s_per_step"] == 0.0
    # seeds: per method each seed's metrics, mean and spread = half the range; per_frame on the first seed only
    sd = res["seeds"]["methods"]
    assert set(sd) == set(evaluate.SEED_METHODS) and "per_frame" in rows
    p0, p1 = (p["psnr"] for p in sd["text_cfg"]["per_seed"])
    assert p0 == rows["text_cfg"]["psnr"] and p0 != p1
    assert sd["text_cfg"]["mean"]["psnr"] == pytest.approx((p0 + p1) / 2)
    assert sd["text_cfg"]["spread"]["psnr"] == pytest.approx(abs(p0 - p1) / 2)
    k = report.upscale_factor(H)
    assert np.asarray(Image.open(tmp_path / "ev" / "overview.png")).shape == (
        report.LABEL_H + 2 * (k * H + report.GAP), 3 * (k * W + report.GAP), 3)  # two clips
    assert (tmp_path / "ev" / "guidance_grid.png").is_file()
    md = (tmp_path / "ev" / "results.md").read_text()
    for name in ab:
        assert f"## Ablation: {name}" in md
    assert "| color_transfer |" in md and "| ae_ceiling |" in md and "## Guidance" in md
    cs = sd["cs_cfg"]
    assert f"| cs_cfg | {report.pm(cs['mean']['psnr'], cs['spread']['psnr'])} |" in md
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["ablations"]["skip"][0]["skip"] == 0
    assert (tmp_path / "ev" / "strip_1.png").is_file() and (tmp_path / "ev" / "plot.png").is_file()
    assert res["clips"][1]["style"] == "neon"


def test_bad_runs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate.evaluate(tmp_path)
    cfg = _run_config({})
    cfg["data"]["frames"] = 6
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="4k \\+ 1"):
        evaluate.evaluate(tmp_path, stylizer=_Fake())
    cfg["data"]["frames"] = 5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--seeds '0,x'"):
        evaluate.evaluate(tmp_path, stylizer=_Fake(), seeds="0,x")
    with pytest.raises(ValueError, match="each once"):
        evaluate.evaluate(tmp_path, stylizer=_Fake(), seeds=[1, 1])
    cfg["data"]["source"] = "folder_v2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--styles"):
        evaluate.evaluate(tmp_path, stylizer=_Fake())
    with pytest.raises(FileNotFoundError, match="LoRA"):
        evaluate.load_stylizer(tmp_path)
    assert world.World(1, 5, 32, 48, "toon")[0].source.shape == (5, 32, 48, 3)


def test_color_transfer_by_hand():
    """A 2-frame 1 x 2 clip: R 10/30 (mean 20, std 10) -> mean 100.6, std 20; G constant -> the style's mean; B 0/255
    (mean 127.5, std 127.5) -> mean 250, std 40, clipped at 255."""
    clip = np.zeros((2, 1, 2, 3), np.uint8)
    clip[..., 0] = [[[10, 30]], [[10, 30]]]
    clip[..., 1] = 50
    clip[..., 2] = [[[0, 255]], [[0, 255]]]
    out = baselines.color_transfer(clip, [100.6, 7.0, 250.0], [20.0, 5.0, 40.0])
    np.testing.assert_array_equal(out[..., 0], [[[81, 121]], [[81, 121]]])
    np.testing.assert_array_equal(out[..., 1], 7)
    np.testing.assert_array_equal(out[..., 2], [[[210, 255]], [[210, 255]]])
    assert out.dtype == np.uint8
    mean, std = baselines.channel_stats(clip)
    np.testing.assert_allclose(mean, [20, 50, 127.5])
    np.testing.assert_allclose(std, [10, 0, 127.5])
    with pytest.raises(ValueError, match="uint8"):
        baselines.color_transfer(clip.astype(np.float32), [0, 0, 0], [1, 1, 1])


def test_guidance_summary_by_hand():
    rows = [{"method": "cs_cfg", "s_per_step": 0.3}, {"method": "text_cfg", "s_per_step": 0.2},
            {"method": "no_guidance", "s_per_step": 0.1}]
    grid = [{"text_scale": 5.0, "context_scale": c, "content": v, "psnr": p}
            for c, v, p in ((0.0, 0.2, 10.0), (1.0, 0.3, 12.0), (4.0, 0.5, 11.0))]
    g = report.guidance_summary(rows, {"scales": grid}, seeds=[0, 1, 2])
    cost = g["branch_cost"]
    assert cost["third_branch_s_per_step"] == pytest.approx(0.1) and cost["cs_over_text"] == pytest.approx(1.5)
    (r,) = g["context_direction"]
    assert r["content"] == {"0": 0.2, "1": 0.3, "max": 0.5} and r["context_max"] == 4.0
    assert r["style"] == {"0": None, "1": None, "max": None}  # not in these hand-made rows
    assert r["verdict_from_0"] == "raises content (+0.300), raises PSNR (+1.000 dB)"
    assert r["verdict_from_1"] == "raises content (+0.200), lowers PSNR (-1.000 dB)"
    assert "| 5 | 0.2000 | 0.3000 | 0.5000 | 10.00 | 12.00 | 11.00 |" in "\n".join(report.guidance_md(g))
