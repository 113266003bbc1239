"""The demo's synthetic benchmark (demo/evaluate.py) end to end: tiny random checkpoints + a tiny LoRA written as a training run, one held-out clip,
two sampler steps, with the ablations (numbers exist, shapes right, files written, one compile per static sampler
setting: the scale grid compiles nothing); the ablation tables, warm timing and the report writers with a stand-in
stylizer (no compiles)."""
import json

import numpy as np
import pytest
from PIL import Image

from pickstyle_jax.demo import evaluate, world
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
                          "--timing", "cold", "--ablations"]) == 0
    printed = capsys.readouterr().out
    assert "| cs_cfg |" in printed and "| per_frame |" in printed
    out = run_dir / "eval"
    result = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["cs_cfg", "text_cfg", "no_guidance", "copy_source",
                                                     "per_frame"]
    for r in result["rows"]:
        for k in ("psnr", "ssim", "temporal_error", "flicker", "content", "style", "s_per_step"):
            assert isinstance(r[k], float) and np.isfinite(r[k]), (r["method"], k, r[k])
        assert 0 < r["psnr"] <= 100 and -1 <= r["ssim"] <= 1 and 0 <= r["content"] <= 1
        assert r["steps"] == (0 if r["method"] == "copy_source" else 2)
        assert (r["s_per_step"] > 0) == (r["method"] != "copy_source")
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["copy_source"]["flicker"] == 0.0 and rows["copy_source"]["content"] == 1.0
    # the rows really ran different samplers (every weight is random here, so the guidance modes differ)
    assert len({rows[m]["psnr"] for m in ("cs_cfg", "text_cfg", "no_guidance", "per_frame")}) == 4
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
    assert [len(ab[k]) for k in ("scales", "skip", "apg", "modes", "cache")] == [9, 1, 3, 3, 2]
    for r in (r for rows_ in ab.values() for r in rows_):
        assert np.isfinite(r["psnr"]) and r["s_per_step"] > 0 and r["steps"] == 2
    assert len({r["psnr"] for r in ab["scales"]}) == 9  # the call-time scales really differ
    # compiles: one sampler per static setting (cs_cfg, text, none, apg scaled, apg off, text_context, teacache),
    # one program per clip shape (cs_cfg also runs one-frame clips for per_frame); the 9 scale pairs reuse cs_cfg's
    # program (with make-time scales they were 8 more)
    (stylizer,) = built
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
    """A stand-in Stylizer: the ground truth blended with the source, a little seeded noise (so per-frame seeds
    matter) and a fixed delay; records its calls."""

    def __init__(self):
        self.calls = []

    def run(self, frames, prompt, *, size, max_frames, seed, **settings):
        self.calls.append({"frames": len(frames), "size": size, "max_frames": max_frames, "seed": seed, **settings})
        noise = np.random.default_rng(seed).normal(0, 3 * settings["text_scale"], frames.shape)
        out = np.clip(frames.astype(float) + noise, 0, 255).astype(np.uint8)
        return out, {"timing": {"sample_s": 0.01 * (1 + (len(self.calls) == 1))}}


def test_ablations_and_reports_with_a_stand_in(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_run_config({}, styles=("toon", "neon"))))
    fake = _Fake()
    res = evaluate.evaluate(tmp_path, clips=2, steps=8, skip=4, ablations=True, stylizer=fake, write_videos=False,
                            out=tmp_path / "ev")
    # main rows: one call per clip per sampled row, per_frame one call per frame; sizes passed through exactly
    assert all(c["size"] == f"{H}x{W}" for c in fake.calls)
    assert {c["max_frames"] for c in fake.calls} == {F, 1}
    per_frame_seeds = [c["seed"] for c in fake.calls if c["frames"] == 1]
    assert len(set(per_frame_seeds)) == len(per_frame_seeds) >= 2 * F  # independent noise per frame
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["per_frame"]["temporal_error"] > rows["copy_source"]["temporal_error"]
    ab = res["ablations"]
    assert set(ab) == {"scales", "skip", "apg", "modes", "cache"}
    assert len(ab["scales"]) == 9 and [r["skip"] for r in ab["skip"]] == [0, 2, 4, 6]
    assert [r["steps"] for r in ab["skip"]] == [8, 6, 4, 2]
    assert [r["mode"] for r in ab["modes"]] == ["cs_cfg", "text", "text_context"]
    assert ab["cache"][1]["cache"] == "teacache"
    assert all(r["s_per_step"] > 0 for rows_ in ab.values() for r in rows_)
    # identical settings are sampled once (the default setting appears in several tables): 2 clips, no rerun, as
    # clip 1's call is warm; a new static setting on the single ablation clip is called twice (cold, then the timed
    # rerun); a new scale pair reuses the default setting's compile, so its one call is warm and timed
    def calls(**want):
        return sum(c["frames"] == F and all(c[k] == v for k, v in want.items()) for c in fake.calls)

    default = dict(mode="cs_cfg", text_scale=5.0, context_scale=4.0, skip=4, apg=True, cache=None)
    assert calls(**default) == 2
    assert calls(**{**default, "text_scale": 1.0, "context_scale": 1.0}) == 1
    assert calls(**{**default, "apg": False}) == 2 and calls(**{**default, "skip": 2}) == 2
    assert calls(**{**default, "apg": "scaled"}) == 2
    # warm timing: the first, compiling call of a compiled sampler (here the fake's 0.02 s first call) is never
    # timed, so every row reads the fake's 0.01 s per call
    for r in [*res["rows"], *(r for rows_ in ab.values() for r in rows_)]:
        if r["steps"]:
            per_call = 0.01 * (F if r.get("method") == "per_frame" else 1)
            assert r["s_per_step"] == pytest.approx(per_call / r["steps"]), r
    assert res["settings"]["s_per_step_excludes_compile"] is True
    # compiled samplers: (cs_cfg, text, none) x clip + cs_cfg x one frame; skip 0, 2, 6, APG scaled, APG off,
    # text_context, TeaCache; none for the 8 new scale pairs
    assert res["sampler_compiles"] == 4 + 7
    md = (tmp_path / "ev" / "results.md").read_text()
    for name in ab:
        assert f"## Ablation: {name}" in md
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
    cfg["data"]["source"] = "folder_v2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--styles"):
        evaluate.evaluate(tmp_path, stylizer=_Fake())
    with pytest.raises(FileNotFoundError, match="LoRA"):
        evaluate.load_stylizer(tmp_path)
    assert world.World(1, 5, 32, 48, "toon")[0].source.shape == (5, 32, 48, 3)
