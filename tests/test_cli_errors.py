"""Bad input to every command line (train, plan, the demo's evaluate, stylize; the production evaluate CLI is in
test_evaluate.py) ends in one stderr line `error: ...` naming the file and what is wrong, exit status 2 and no
traceback; --verbose or PICKSTYLE_TRACEBACK=1 shows the traceback; a bug still shows its traceback. Training that
dies of bad data keeps its earlier checkpoints and resumes from them once the file is fixed.

train and plan run as subprocesses (absl defines their flags once per process; plan sets XLA_FLAGS before JAX
starts), sharing one persistent compilation cache; evaluate and stylize run `main([...])` in-process.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from pickstyle_jax import checkpoints, lora, sample, stylize, video
from pickstyle_jax.demo import evaluate
from pickstyle_jax.data import pipeline
from pickstyle_jax.models import wan
from tests import tiny_models
from tests.conftest import SEED  # printed, replayable with PICKSTYLE_TEST_SEED
from tests.test_demo_evaluate import _run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRACEBACK_ENV = "PICKSTYLE_TRACEBACK"  # TRACEBACK_ENV, spelled out: users type it
CFG = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0,), text_dim=64)  # umT5 tiny is 64 wide


def _one_line(code, err, *names):
    """The contract: status 2, exactly one stderr line `error: ...` naming each of `names`, no traceback."""
    err = err.strip()
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err[-3000:]
    for name in names:
        assert str(name) in err, (name, err)
    return err


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _cli(module, *args, cache, env=None, timeout=600):
    e = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
    e.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = tiny_models.save_models(root, root / "lora", CFG, SEED)
    other = CFG.replace(dim=64, ffn_dim=96)  # "another variant": same layer names, other widths
    checkpoints.save_lora(root / "lora_other", lora.init(lora.LoraConfig(rank=4, alpha=4), wan.param_shapes(other),
                                                         jax.random.key(0)))
    vae8 = root / "vae8"  # a VAE of another family: 8 latent channels
    shutil.copytree(paths["vae"], vae8)
    meta = json.loads((vae8 / "config.json").read_text())
    meta["config"].update(z_dim=8, latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
    (vae8 / "config.json").write_text(json.dumps(meta))
    broken = root / "broken_json"  # a checkpoint dir whose config.json is cut short
    shutil.copytree(paths["dit"], broken)
    (broken / "config.json").write_text((broken / "config.json").read_text()[:40])
    no_params = root / "lora_no_params"  # an interrupted copy: config.json without the arrays
    shutil.copytree(paths["lora"], no_params)
    shutil.rmtree(no_params / "params")
    return {**paths, "root": root, "lora_other": root / "lora_other", "vae8": vae8, "broken_json": broken,
            "lora_no_params": no_params}


# ------------------------------------------------------------------------------------------------- the mechanism
def test_user_errors_are_named_in_one_place():
    import importlib

    from pickstyle_jax import errors

    for name in errors.USER_ERRORS:
        module, cls = name.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), cls), type), name
    from pickstyle_jax.data import DataError

    assert errors.is_user_error(DataError("x")) and errors.is_user_error(FileNotFoundError("x"))
    assert errors.is_user_error(sample.CompatibilityError("x")) and errors.is_user_error(errors.InputError("x"))
    for bug in (KeyError("x"), ValueError("x"), TypeError("x"), RuntimeError("x"), OSError("x")):
        assert not errors.is_user_error(bug), bug
    assert errors.one_line(ValueError("a\n  b\n")) == "a b"
    assert (errors.one_line("flag --config=c.py: Error whilst parsing config file:\n\nTraceback (most recent call "
                            "last):\n  File ...\nValueError: no such variant") ==
            "flag --config=c.py: Error whilst parsing config file: ValueError: no such variant")


# ------------------------------------------------------------------------------------------------- train
def _folder_v2(root, rng):
    """ROOT/Origami/{src,tar,caption}/ with 8 pairs (the OmniConsistency layout)."""
    for sub in ("src", "tar", "caption"):
        (root / "Origami" / sub).mkdir(parents=True)
    for i in range(8):
        for sub in ("src", "tar"):
            pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "Origami" / sub / f"{i:03d}.png")
        (root / "Origami" / "caption" / f"{i:03d}.txt").write_text(f"Origami style. A paper crane, number {i}.")


def _train_args(workdir, data):
    return ["--config=configs/pickstyle.py:tiny", f"--workdir={workdir}", "--config.data.source=folder_v2",
            f"--config.data.root={data}", "--config.total_steps=6", "--config.checkpoint_every=2"]


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_train_data_error_mid_run(tmp_path, cache, seed):
    """A target PNG whose header reads but whose pixels are cut short passes the source's checks and fails when
    step 4 reads it: one line naming it and the kept checkpoint; after the fix the run resumes from step 2 and ends
    where a run on good data ends."""
    data = tmp_path / "data"
    _folder_v2(data, np.random.default_rng(seed))
    import importlib.util

    spec = importlib.util.spec_from_file_location("pickstyle_cfg", ROOT / "configs" / "pickstyle.py")
    cfg_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg_mod)
    c = cfg_mod.get_config("tiny")
    c.data.source, c.data.root = "folder_v2", str(data)
    it = pipeline.make_iterator(c.data, seed=c.seed)
    batches = [[str(i).split("/")[-1] for i in next(it)["id"]] for _ in range(4)]
    bad = data / "Origami" / "tar" / f"{batches[3][0]}.png"  # first read by step 4 (one epoch is 4 steps)
    good_bytes = bad.read_bytes()

    straight = tmp_path / "straight"
    r = _cli("pickstyle_jax.train", *_train_args(straight, data), cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]

    bad.write_bytes(good_bytes[:len(good_bytes) // 2])
    run = tmp_path / "run"
    r = _cli("pickstyle_jax.train", *_train_args(run, data), cache=cache)
    print(_one_line(r.returncode, r.stderr, bad, "truncated", "checkpoint step 2"))
    assert "step 3/6" in r.stdout and "step 4/6" not in r.stdout and _steps(run) == [2]

    bad.write_bytes(good_bytes)
    r = _cli("pickstyle_jax.train", *_train_args(run, data), cache=cache)
    assert r.returncode == 0 and "at step 2" in r.stdout, r.stderr[-3000:]
    got, want = (checkpoints.load_lora(d / "lora").params for d in (run, straight))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), got, want)


def test_train_bad_checkpoints(tmp_path, models, cache):
    base = ["--config=configs/pickstyle.py:tiny", f"--workdir={tmp_path / 'run'}"]
    cases = [  # (override, what the line must name)
        (f"--config.model.vae={models['lora']}", [models["lora"], "'lora' checkpoint, expected 'vae'"]),
        (f"--config.model.vae={models['vae8']}", [models["vae8"], "z_dim 8", "does not fit the DiT"]),
        (f"--config.model.dit={models['broken_json']}", [models["broken_json"] / "config.json", "JSON"]),
        (f"--config.model.dit={tmp_path / 'nowhere'}", [tmp_path / "nowhere", "not a converted checkpoint"]),
    ]
    for override, names in cases:
        r = _cli("pickstyle_jax.train", *base, override, cache=cache)
        print(_one_line(r.returncode, r.stderr, *names))
    assert not (tmp_path / "run" / "checkpoints").exists()
    r = _cli("pickstyle_jax.train", *base, cases[0][0], "--verbose", cache=cache)
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr and "CheckpointError" in r.stderr


# ------------------------------------------------------------------------------------------------- plan
def test_plan_bad_config(cache):
    r = _cli("pickstyle_jax.plan", "--config=configs/nothere.py", "--devices=2", cache=cache)
    print(_one_line(r.returncode, r.stderr, "configs/nothere.py", "no such file"))
    r = _cli("pickstyle_jax.plan", "--config=configs/pickstyle.py:huge", "--devices=2", cache=cache)
    print(_one_line(r.returncode, r.stderr, "configs/pickstyle.py", "takes ':node', ':tiny' or nothing, got 'huge'"))
    r = _cli("pickstyle_jax.plan", "--config=configs/pickstyle.py:tiny", "--config.optim.learning_rate=1", cache=cache)
    print(_one_line(r.returncode, r.stderr, "--config.optim.learning_rate", "no field 'learning_rate'"))
    bad_mesh = ["--config=configs/pickstyle.py:tiny", "--config.mesh.data=3", "--devices=2"]
    r = _cli("pickstyle_jax.plan", *bad_mesh, cache=cache)
    print(_one_line(r.returncode, r.stderr, "config.mesh", "does not fit 2 devices"))
    for traced in (["--verbose"], []):
        r = _cli("pickstyle_jax.plan", *bad_mesh, *traced, cache=cache, env={} if traced else {TRACEBACK_ENV: "1"})
        assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr and "ConfigError" in r.stderr


# ------------------------------------------------------------------------------------------------- evaluate
def _run_dir(root, models, lora_dir=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(_run_config({k: models[k] for k in ("dit", "vae", "umt5")})))
    if lora_dir is not None:
        shutil.copytree(lora_dir, root / "lora")
    return root


def _evaluate(argv, capsys):
    code = evaluate.main(["--clips", "1", "--steps", "2", "--skip", "0", "--no-videos", *argv])
    return code, capsys.readouterr().err


def test_evaluate_bad_input(tmp_path, models, capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    nowhere = tmp_path / "nowhere"
    print(_one_line(*_evaluate(["--workdir", str(nowhere)], capsys), nowhere / "config.json", "not found"))
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "config.json").write_bytes(b"\x89PNG not json")
    print(_one_line(*_evaluate(["--workdir", str(garbled)], capsys), garbled / "config.json", "JSON"))
    other = _run_dir(tmp_path / "other", models, models["lora_other"])
    print(_one_line(*_evaluate(["--workdir", str(other)], capsys), other / "lora", "another variant"))
    cut = _run_dir(tmp_path / "cut", models, models["lora_no_params"])
    print(_one_line(*_evaluate(["--workdir", str(cut)], capsys), cut / "lora" / "params", "unreadable"))
    # a traceback on request
    with pytest.raises(sample.CompatibilityError, match="another variant"):
        evaluate.main(["--workdir", str(other), "--verbose"])
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(FileNotFoundError):
        evaluate.main(["--workdir", str(nowhere)])


# ------------------------------------------------------------------------------------------------- stylize
def _stylize_argv(m, video_path, out, **repl):
    argv = {"--video": video_path, "--prompt": "Anime style. A cat.", "--dit": m["dit"], "--vae": m["vae"],
            "--umt5": m["umt5"], "--tokenizer": "bytes", "--lora": m["lora"], "--out": out, "--steps": 2,
            "--skip": 0, "--max-frames": 5}
    argv.update(repl)
    return [str(x) for kv in argv.items() for x in kv]


def test_stylize_bad_input_and_bugs(tmp_path, models, capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    src = video.write(tmp_path / "in.mp4", np.full((5, 32, 48, 3), 128, np.uint8), fps=8)
    out = tmp_path / "out.mp4"

    def fails(*names, **repl):
        return print(_one_line(stylize.main(_stylize_argv(models, src, out, **repl)), capsys.readouterr().err,
                               *names))

    fails(models["broken_json"] / "config.json", "JSON", **{"--dit": models["broken_json"]})
    spm = tmp_path / "spiece.model"
    spm.write_bytes(b"\x00garbage" * 40)
    fails(spm, "not a sentencepiece model", **{"--tokenizer": spm})
    fails(models["vae8"], "does not fit the DiT", **{"--vae": models["vae8"]})
    assert not out.exists()
    with pytest.raises(sample.CompatibilityError):
        stylize.main(_stylize_argv(models, src, out, **{"--vae": models["vae8"]}) + ["--verbose"])

    # a bug is not bad input: its traceback is shown, whatever its type
    def bug(*a, **k):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(sample.Stylizer, "load", bug)
    with pytest.raises(ValueError, match="broadcast"):
        stylize.main(_stylize_argv(models, src, out))
