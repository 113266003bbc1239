"""Training: the flow-matching grid, the step (loss falls), bad configs, plan, kill-and-resume, the .pth and
.safetensors exports.

Runs of `python -m pickstyle_jax.train` are subprocesses on the tiny config; they share one persistent compilation
cache so that only the first pays for compiling.
"""
import dataclasses
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pickstyle_jax import flops, flow, lora as lora_lib, sharding
from pickstyle_jax.data import pipeline
from pickstyle_jax.train import loop, setup, step
from tests import tb_reader

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name="pickstyle.py", arg="tiny"):
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / "configs" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


# ------------------------------------------------------------------------------------------------- flow
def test_grid_and_weights_match_the_spec():
    g = flow.Grid.make(5.0, 1000)
    i = np.arange(1000)
    s = 1 - i / 1000
    np.testing.assert_allclose(g.sigmas, 5 * s / (1 + 4 * s), rtol=1e-6)
    assert g.sigmas.dtype == np.float32 and g.timesteps.dtype == np.float32 and g.sigmas[0] == 1.0
    np.testing.assert_allclose(g.timesteps, 1000 * g.sigmas.astype(np.float64), rtol=1e-6)
    assert abs(g.weights.sum() - 1000) < 1e-2
    assert g.weights[0] == 0.0 and g.weights.min() == 0.0
    peak = int(np.argmax(g.weights))
    assert abs(g.weights[peak] - 2.076) < 2e-3 and abs(g.timesteps[peak] - 500) < 3
    assert abs(float(np.mean(g.sigmas > 0.5)) - 0.834) < 1e-3  # uniform over indices, not over sigma
    idx = np.asarray(flow.draw_index(jax.random.key(0), 20000, 1000))
    assert idx.min() == 0 and idx.max() == 999 and abs(idx.mean() - 499.5) < 10
    # batch 1 is fine: the weight is a grid constant, never batch-relative
    sig, t, w = flow.lookup(g, jnp.array([0]))
    assert float(w[0]) == 0.0 and float(t[0]) == 1000.0
    x0, eps = jnp.full((1, 3), 2.0), jnp.full((1, 3), -1.0)
    x_t, target = flow.noise(x0, eps, jnp.array([0.25]))
    np.testing.assert_allclose(x_t, 0.75 * 2 - 0.25, rtol=1e-6)
    np.testing.assert_allclose(target, -3.0)
    np.testing.assert_allclose(flow.weighted_mse(jnp.zeros((2, 3)), jnp.array([[1.0] * 3, [2.0] * 3]),
                                                 jnp.array([1.0, 0.5])), (1 + 0.5 * 4) / 2, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- the step
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One prepared tiny run (batch 4, lr 1e-2) for the tests that only step it or take its gradients: preparing
    compiles the models' init, the captions, the zero latent and the step."""
    from tests.conftest import SEED

    c = _config()
    c.seed, c.optim.lr, c.data.batch_size = SEED % 1000, 1e-2, 4
    tr = setup.prepare(c, tmp_path_factory.mktemp("tiny_run"))
    return tr, setup.device_batch(tr, next(pipeline.make_iterator(c.data, seed=c.seed)))


def test_tiny_model_loss_falls_on_a_fixed_batch(tiny, seed):
    tr, batch = tiny
    keys = jax.random.split(jax.random.key(seed), 4)
    evaluate = jax.jit(lambda lp, b: jnp.mean(jax.vmap(lambda k: step.loss_fn(tr.cfg, lp, tr.base, b, k))(keys)))
    before = float(evaluate(tr.state["lora"], batch))
    base_before = jax.tree.map(np.asarray, tr.base)
    state, losses = jax.tree.map(jnp.copy, tr.state), []  # the step donates its state: tr.state stays for the next
    for _ in range(30):
        state, m = tr.step_fn(tr.base, state, batch, tr.step_key)
        losses.append(float(m["loss"]))
    after = float(evaluate(state["lora"], batch))
    print(f"fixed-draw loss {before:.5f} -> {after:.5f}; step losses {losses[:3]} ... {losses[-3:]}")
    assert int(state["step"]) == 30 and all(np.isfinite(losses))
    assert after < 0.9 * before, (before, after)
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, tr.base))


def test_gradient_accumulation_matches_the_full_batch(tiny):
    """accumulate=2 over micro-batches {0, 2}, {1, 3} equals the mean of the two half-batch gradients."""
    tr, batch = tiny
    batch = jax.device_get(batch)
    rng = jax.random.key(3)
    acc = dataclasses.replace(tr.cfg, accumulate=2)
    loss, g = jax.jit(lambda lp: step.grads(acc, lp, tr.base, batch, rng))(tr.state["lora"])
    halves = [jax.tree.map(lambda x, m=m: x[m::2], batch) for m in range(2)]
    parts = [jax.jit(lambda lp, b, m=m: step.grads(tr.cfg, lp, tr.base, b, jax.random.fold_in(rng, m)))(
        tr.state["lora"], h) for m, h in enumerate(halves)]
    np.testing.assert_allclose(loss, (parts[0][0] + parts[1][0]) / 2, rtol=1e-5)
    jax.tree.map(lambda a, b0, b1: np.testing.assert_allclose(a, b0 / 2 + b1 / 2, rtol=1e-4, atol=1e-9),
                 g, parts[0][1], parts[1][1])


# ------------------------------------------------------------------------------------------------- configs
def test_bad_configs_fail_before_compiling(tmp_path):
    c = _config()
    with pytest.raises(AttributeError):
        c.optim.learning_rate = 1.0  # locked: a typo is an error
    c = _config()
    c.mesh.data = 3
    with pytest.raises(setup.ConfigError, match="does not fit 8 devices"):
        setup.check_config(c, n_devices=8)
    c = _config()
    c.mesh.update(dict(data=2, fsdp=2))
    c.data.batch_size = 6
    with pytest.raises(setup.ConfigError, match="batch_size=6 .* not divisible by the 4 ways"):
        setup.check_config(c, n_devices=4)
    c = _config()
    c.model.dit = str(tmp_path / "nowhere")
    with pytest.raises(setup.ConfigError, match="model.dit=.*nowhere.*convert.wan_dit"):
        loop.run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    c = _config()
    c.optim.accumulate = 3
    with pytest.raises(setup.ConfigError, match="accumulate=3"):
        setup.check_config(c, n_devices=1)
    c = _config()
    c.rules.allow_replicate = False  # strict rules: nothing may stay replicated that the rules split
    c.mesh.update(dict(data=1, fsdp=1, tensor=3))
    mesh = sharding.make_mesh(dict(setup.check_config(c, n_devices=3)), [jax.devices()[0]] * 3)
    wcfg = setup.model_configs(c)[0]
    from pickstyle_jax.models import wan
    # the 2 heads are refused first: a head must stay whole on one device (the widths would not split 3 ways either)
    with pytest.raises(sharding.ShardingError, match=r"blocks\.0\..*num_heads=2 does not split over mesh axes"):
        sharding.tree_shardings(wan.param_axes(wcfg), mesh, c.rules, wan.param_shapes(wcfg))


def test_cli_rejects_an_unknown_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pickstyle_jax.train", "--config=configs/pickstyle.py:tiny",
                        f"--workdir={tmp_path}", "--config.optim.learning_rate=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "learning_rate" in r.stderr, r.stderr[-2000:]


def test_plan_prints_the_json_fields():
    r = subprocess.run([sys.executable, "-m", "pickstyle_jax.plan", "--config=configs/pickstyle.py:tiny",
                        "--devices=2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == {"devices", "mesh", "param_bytes_per_device", "optimizer_bytes_per_device",
                        "temp_bytes_per_device", "peak_bytes_per_device", "compile_s"}
    assert out["devices"] == 2 and out["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1, "context": 1}
    assert out["peak_bytes_per_device"] >= out["param_bytes_per_device"] > 0


# ------------------------------------------------------------------------------------------------- resume
def _train(workdir, *overrides, env):  # a made-up device peak, so that the CPU run logs an MFU
    return subprocess.Popen([sys.executable, "-m", "pickstyle_jax.train", "--config=configs/pickstyle.py:tiny",
                             f"--workdir={workdir}", "--config.total_steps=6", "--config.peak_flops=1e9",
                             *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)


def _wait_for_line(proc, text, timeout=300):
    t0, seen = time.time(), []
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{''.join(seen)[-3000:]}")
        seen.append(line)
        if text in line:
            return
    raise AssertionError("timed out")


def _wait_for_step(proc, workdir, step, timeout=300):
    """Blocks until metrics.jsonl has `step`, then returns (the process keeps running)."""
    path, t0 = pathlib.Path(workdir) / "metrics.jsonl", time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and any(json.loads(ln)["step"] >= step for ln in path.read_text().splitlines() if ln):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _losses(workdir):
    rows = [json.loads(ln) for ln in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines() if ln]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _lora(workdir):
    from pickstyle_jax import checkpoints

    return jax.tree.map(np.asarray, checkpoints.load_lora(pathlib.Path(workdir) / "lora").params)


def test_kill_and_resume_match_the_straight_run(tmp_path):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    straight = tmp_path / "straight"
    p = _train(straight, env=env)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    want = _losses(straight)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    # kill -9 after step 3 (periodic checkpoint at 2): the rerun resumes at 2 and recomputes 3 ...
    run = tmp_path / "interrupted"
    p = _train(run, "--config.checkpoint_every=2", env=env)
    _wait_for_step(p, run, 3)
    p.kill()
    p.wait()
    # ... and is stopped by SIGTERM after step 4: it saves where it is and exits 143 ...
    p = _train(run, "--config.checkpoint_every=2", env=env)
    _wait_for_line(p, "step 4/6")
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM" in out
    # ... and the third run finishes.
    p = _train(run, "--config.checkpoint_every=2", env=env)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0 and "resumed from" in out, out[-3000:]
    got = _losses(run)
    print("straight", want, "\ninterrupted", got)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), _lora(run), _lora(straight))

    # TensorBoard event files beside metrics.jsonl, one per run start; read back independently (tests/tb_reader.py)
    # with TensorBoard's restart rule, they hold exactly what metrics.jsonl holds. MFU = the step's analytic FLOPs x
    # steps/s / peak. loss.png is drawn at the end.
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert len(tb_reader.event_files(run)) == 3
    tb = tb_reader.scalars(run)
    assert set(tb) == {"loss", "grad_norm", "lr", "steps_per_s", "tokens_per_s", "mfu"}
    for tag, series in tb.items():
        assert series == {s: float(np.float32(r[tag])) for s, r in rows.items()}, tag
    cfg = _config()
    wcfg, vcfg, _, _ = setup.model_configs(cfg)
    step_flops = flops.train_step_flops(wcfg, setup.tokens_per_sample(cfg, wcfg, vcfg), cfg.data.batch_size)
    for r in rows.values():
        np.testing.assert_allclose(r["mfu"], step_flops * r["steps_per_s"] / 1e9, rtol=1e-12)
    import imageio.v3 as iio

    assert iio.imread(run / "loss.png").shape == (400, 800, 3)

    # The .pth export (written without torch) reads back with torch, identical to convert.lora's export.
    torch = pytest.importorskip("torch")
    from convert import lora as convert_lora
    from pickstyle_jax import checkpoints

    ours = torch.load(straight / "pickstyle_lora.pth", weights_only=True)
    convert_lora.export_lora(checkpoints.load_lora(straight / "lora"), tmp_path / "ref.pth")
    ref = torch.load(tmp_path / "ref.pth", weights_only=True)
    assert sorted(ours) == sorted(ref) and len(ours) == 2 * 3 * 2
    for k in ref:
        assert ours[k].dtype == torch.float32 and ours[k].shape == ref[k].shape
        np.testing.assert_array_equal(ours[k].numpy(), ref[k].numpy())
    back = convert_lora.import_lora(straight / "pickstyle_lora.pth")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back.params), _lora(straight))

    # So does the PEFT/diffusers lora.safetensors (also torch-free): the keys and fp32 arrays of
    # `python -m convert.lora --export`, and it imports back bit-exact with the run's rank and alpha.
    from safetensors.numpy import load_file

    trained = checkpoints.load_lora(straight / "lora")
    convert_lora.export_lora(trained, tmp_path / "ref.safetensors")
    ours, ref = load_file(str(straight / "lora.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert sorted(ours) == sorted(ref) and len(ours) == 2 * 3 * 2
    for k in ref:
        assert ours[k].dtype == np.float32 and ours[k].shape == ref[k].shape
        np.testing.assert_array_equal(ours[k], ref[k])
    back = convert_lora.import_lora(straight / "lora.safetensors")
    assert (back.config.rank, back.config.alpha) == (trained.config.rank, trained.config.alpha)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back.params), _lora(straight))
    assert (straight / "config.json").is_file() and json.loads((straight / "config.json").read_text())["model"]


def test_nan_loss_names_the_step(tmp_path, monkeypatch):
    c = _config()
    c.total_steps = 3
    real = setup.prepare

    def poisoned(*a, **k):
        tr = real(*a, **k)
        step_fn = tr.step_fn
        calls = []

        def bad(base, state, batch, key):
            calls.append(1)
            state, m = step_fn(base, state, batch, key)
            return state, {**m, "loss": m["loss"] * (np.nan if len(calls) == 2 else 1.0)}

        return dataclasses.replace(tr, step_fn=bad)

    monkeypatch.setattr(setup, "prepare", poisoned)
    with pytest.raises(FloatingPointError, match="loss is nan at step 2"):
        loop.run(c, tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == []  # checkpoint_every=2: step 2 was never saved


# ------------------------------------------------------------------------------------------------- checkpoints
def test_cli_trains_on_saved_checkpoints_in_either_layout(tmp_path):
    """`python -m pickstyle_jax.train` on converted tiny checkpoints (stored flat, config.json the architecture
    only), unrolled and scanned (config.model.scan_layers, what the released variants' configs set; a checkpoint
    converted before the run-time fields left config.json naming scan_layers=True): the same weights give the
    same losses whatever the run's layout."""
    from pickstyle_jax.models import wan
    from tests import tiny_models
    from tests.conftest import SEED

    cfg = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0,), text_dim=64)  # umT5 tiny: 64 wide
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    models = {saved: tiny_models.save_models(tmp_path / saved, tmp_path / saved / "lora", cfg, SEED)
              for saved in ("flat", "scanned")}
    old = pathlib.Path(models["scanned"]["dit"]) / "config.json"  # as converted before Options left WanConfig
    meta = json.loads(old.read_text())
    meta["config"].update(dtype="float32", attention="auto", remat_policy="none", scan_layers=True)
    old.write_text(json.dumps(meta))
    losses = {}
    for saved, run_scanned in (("flat", False), ("scanned", False), ("scanned", True)):
        m = models[saved]
        workdir = tmp_path / f"run_{saved}_{run_scanned}"
        r = subprocess.run([sys.executable, "-m", "pickstyle_jax.train", "--config=configs/pickstyle.py:tiny",
                            f"--workdir={workdir}", "--config.total_steps=2", f"--config.model.dit={m['dit']}",
                            f"--config.model.vae={m['vae']}", f"--config.model.umt5={m['umt5']}",
                            f"--config.model.scan_layers={run_scanned}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (saved, run_scanned, r.stderr[-3000:])
        losses[saved, run_scanned] = _losses(workdir)
        assert sorted(losses[saved, run_scanned]) == [1, 2] and (workdir / "lora" / "config.json").is_file()
    print(losses)
    want = losses["flat", False]
    for got in losses.values():
        np.testing.assert_allclose([got[s] for s in (1, 2)], [want[s] for s in (1, 2)], rtol=1e-5)
