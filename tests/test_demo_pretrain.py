"""The demo's pretraining stage (pickstyle_jax/demo/pretrain.py) and configs/demo.py."""
import importlib.util
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from pickstyle_jax import checkpoints
from pickstyle_jax.demo import conv_ae, pretrain
from pickstyle_jax.models import vae, wan
from pickstyle_jax.train import config as train_config
from tests.conftest import SEED  # the run's seed: printed, replayable with PICKSTYLE_TEST_SEED

CONFIG = pathlib.Path(__file__).parents[1] / "configs" / "demo.py"


def _config(arg=None):
    spec = importlib.util.spec_from_file_location("demo_config", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize("arg", [None, "tiny"])
def test_demo_config_loads_locked_and_holds_a_style_out(arg):
    c = _config(arg)
    with pytest.raises(AttributeError):
        c.no_such_key = 1
    with pytest.raises(AttributeError):
        c.pretrain.no_such_key = 1
    assert set(c.data.keys()) == set(train_config.data_config().keys())
    assert set(train_config.default_config().keys()) <= set(c.keys())
    assert not set(c.pretrain.styles) & set(c.data.synthetic_styles)
    assert c.model.tokenizer == "bytes"
    wcfg = pretrain.dit_config(c, text_dim=64)
    assert wcfg.has_vace and wcfg.text_dim == 64
    assert wcfg.patch_size == tuple(c.pretrain.dit.patch_size)
    vcfg = pretrain.vae_config(c)
    assert vcfg.spatial_factor == 8 and vcfg.latents_std == (1.0,) * vcfg.z_dim
    assert isinstance(vcfg, conv_ae.ConvAeConfig) and vcfg.width == c.pretrain.vae_width
    assert vcfg.latents_mean == (0.0,) * vcfg.z_dim
    pretrain.check_config(c)
    with c.unlocked():
        c.pretrain.autoencoder = "wan"
    vcfg = pretrain.vae_config(c)
    assert isinstance(vcfg, vae.VaeConfig) and vcfg.base_dim == c.pretrain.vae_base_dim
    assert vcfg.latents_mean == (0.0,) * vcfg.z_dim


def test_config_errors_say_what_to_fix():
    c = _config("tiny")
    with c.unlocked():
        c.pretrain.styles = (*c.data.synthetic_styles, "neon")  # the held-out style among the pretraining ones
    with pytest.raises(ValueError, match="held-out"):
        pretrain.check_config(c)
    c = _config("tiny")
    with c.unlocked():
        c.pretrain.null_per_batch = c.pretrain.dit_batch
    with pytest.raises(ValueError, match="null_per_batch"):
        pretrain.check_config(c)
    c = _config("tiny")
    with c.unlocked():
        c.pretrain.autoencoder = "vqgan"
    with pytest.raises(ValueError, match="pretrain.autoencoder"):
        pretrain.check_config(c)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny pretraining run (module-wide: the compiles dominate)."""
    root = tmp_path_factory.mktemp("pretrain")
    c = _config("tiny")
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"pretrain seed {seed}")
    with c.unlocked():
        for k in ("dit", "vae", "umt5"):
            c.model[k] = str(root / "models" / k)
        c.pretrain.seed = seed
        c.pretrain.vae_steps = 20  # the tiny conv autoencoder at lr 1e-2: loss ratio 0.25-0.4 over 20 steps, 4 seeds
        c.pretrain.examples = 1  # one static scene: every batch is the same, so the curve measures fitting
        c.data.move_prob = 0.0
    logs = []
    summary = pretrain.run(c, log=logs.append, cache_dir=root / "text_cache")
    return c, root, summary, logs


def test_autoencoder_loss_is_finite_and_falls(fitted):
    _, root, _, _ = fitted
    curve = json.loads((root / "models" / "pretrain.json").read_text())["vae_curve"]
    losses = np.array([row["loss"] for row in curve])
    assert np.all(np.isfinite(losses)), losses
    assert losses[-3:].mean() < 0.85 * losses[:2].mean(), losses
    dit = json.loads((root / "models" / "pretrain.json").read_text())["dit_curve"]
    assert all(np.isfinite(row["loss"]) for row in dit)


def test_checkpoints_load_back_and_run(fitted):
    c, root, summary, _ = fitted
    vcfg, _ = checkpoints.load_vae(c.model.vae)
    wcfg, dparams = checkpoints.load_dit(c.model.dit)
    tcfg, _ = checkpoints.load_umt5(c.model.umt5)
    assert wcfg.text_dim == tcfg.d_model and wcfg.has_vace
    # the measured latent statistics replaced Wan's constants
    assert vcfg.latents_mean != vae.WAN21_LATENTS_MEAN and len(vcfg.latents_std) == vcfg.z_dim
    assert vcfg.latents_std == tuple(summary["vae"]["latent_std"])
    d = c.data
    shape = (1, 1 + (d.frames - 1) // vcfg.temporal_factor, d.height // vcfg.spatial_factor,
             d.width // vcfg.spatial_factor, vcfg.z_dim)
    z = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ctx = np.concatenate([z, z, np.ones(z.shape[:-1] + (64,), np.float32)], axis=-1)
    v = wan.forward(wcfg, dparams, z, np.array([500.0]), np.zeros((1, 8, wcfg.text_dim), np.float32), ctx)
    assert v.shape == z.shape and bool(np.isfinite(np.asarray(v)).all())
    meta = checkpoints.read_meta(c.model.dit)
    assert meta["pretrain"]["fingerprint"] == pretrain.fingerprint(c)


def test_autoencoder_names_its_codec_and_old_checkpoints_are_upgraded(fitted, tmp_path):
    c, _, _, _ = fitted
    meta = checkpoints.read_meta(c.model.vae)
    assert meta["kind"] == "vae" and meta["codec"] == "pickstyle_jax.demo.conv_ae:ConvAeConfig"
    old = tmp_path / "vae"
    shutil.copytree(c.model.vae, old)
    legacy = {**{k: v for k, v in meta.items() if k != "codec"}, "kind": "conv_ae"}  # as written before the codec
    (old / "config.json").write_text(json.dumps(legacy))
    with pytest.raises(checkpoints.CheckpointError, match="'conv_ae' checkpoint, expected 'vae'"):
        checkpoints.load_vae(old)
    assert pretrain.upgrade_checkpoint(old) and not pretrain.upgrade_checkpoint(old)
    assert checkpoints.read_meta(old) == meta  # fingerprint and all: the run stays valid
    (cfg, params), (cfg0, params0) = checkpoints.load_vae(old), checkpoints.load_vae(c.model.vae)
    assert cfg == cfg0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
        np.testing.assert_array_equal(a, b)
    assert not pretrain.upgrade_checkpoint(tmp_path / "nowhere")


def test_rerun_skips_and_changed_settings_refit(fitted):
    c, _, _, _ = fitted
    logs = []
    assert pretrain.run(c, log=logs.append)["skipped"]
    assert pretrain.is_done(c)
    c = c.copy_and_resolve_references()  # the module's fitted config stays as it was fitted
    with c.unlocked():
        c.pretrain.dit_steps = c.pretrain.dit_steps + 1
    assert not pretrain.is_done(c)


class _Kill(Exception):
    pass


def test_a_run_killed_in_each_stage_resumes_to_the_straight_run(fitted, tmp_path):
    """Killed after autoencoder step 13 (last save: 12) and again after backbone step 3 (last save: 2), the run
    resumes from its own state files and ends with the straight run's weights, bit for bit."""
    straight = fitted[0]
    c = straight.copy_and_resolve_references()
    with c.unlocked():
        for k in ("dit", "vae", "umt5"):
            c.model[k] = str(tmp_path / "models" / k)
    assert c.pretrain.checkpoint_every == 2
    seen = []

    def killer(at):
        def log(msg):
            seen.append(msg)
            if msg.startswith(at):
                raise _Kill(msg)
        return log

    for at in ("autoencoder 13/", "backbone 3/", "pretraining done"):
        with pytest.raises(_Kill):
            pretrain.run(c, log=killer(at), cache_dir=tmp_path / "text_cache")
    assert any(m.startswith("autoencoder: resuming at step 12") for m in seen), seen
    assert any(m.startswith("backbone: resuming at step 2") for m in seen), seen
    for load, k in ((checkpoints.load_vae, "vae"), (checkpoints.load_dit, "dit")):
        (_, got), (_, want) = load(c.model[k]), load(straight.model[k])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)


def test_shipping_writes_a_manifest_that_verifies_and_records_the_one_step_error(fitted, tmp_path):
    from pickstyle_jax.demo import shipped

    c, root, _, _ = fitted
    manifest = shipped.ship(c, root / "models", root=tmp_path / "weights", log=lambda m: None)
    assert shipped.verify(tmp_path / "weights") == manifest
    assert set(manifest["files"]) >= {"pretrain.json", "dit/config.json", "vae/config.json", "umt5/config.json"}
    assert shipped.available(c, tmp_path / "weights")
    used = c.copy_and_resolve_references()
    shipped.use(used, tmp_path / "weights")
    assert used.model.dit == str(tmp_path / "weights" / "dit")
    assert shipped.one_step_error(c, tmp_path / "weights") == manifest["one_step_error"]["value"]
    other = c.copy_and_resolve_references()
    with other.unlocked():
        other.pretrain.dit_steps += 1
    assert not shipped.available(other, tmp_path / "weights")


def test_temporal_term_sees_a_first_frame_seam_not_a_steady_error():
    rng = np.random.default_rng(SEED)
    steady = np.broadcast_to(rng.normal(size=(2, 1, 4, 6, 3)), (2, 5, 4, 6, 3)).astype(np.float32)
    assert float(pretrain.temporal_l1(steady)) == 0.0
    seam = np.zeros((2, 5, 4, 6, 3), np.float32)
    seam[:, 0] = 0.4  # only frame 0 is off: one of the 4 frame differences sees it
    np.testing.assert_allclose(float(pretrain.temporal_l1(seam)), 0.4 / 4, rtol=1e-5)
    assert float(pretrain.temporal_l1(seam[:, :1])) == 0.0


def test_the_wan_autoencoder_trains_through_the_same_step():
    c = _config("tiny")
    with c.unlocked():
        c.pretrain.autoencoder, c.pretrain.vae_steps, c.pretrain.vae_lr = "wan", 6, 3e-3
        c.pretrain.examples = 1
        c.data.move_prob = 0.0
    vcfg, params, metrics = pretrain.train_autoencoder(c, log=lambda m: None)
    assert isinstance(vcfg, vae.VaeConfig)
    losses = np.array([row["loss"] for row in metrics["curve"]])
    assert np.all(np.isfinite(losses)) and losses[-2:].mean() < losses[:2].mean(), losses
