"""The demo's plain conv autoencoder (demo/conv_ae.py) and the autoencoder protocol it plugs into
(models/autoencoders.py): production code reaches it only through the "codec" its checkpoints name."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from pickstyle_jax import checkpoints
from pickstyle_jax.demo import conv_ae
from pickstyle_jax.models import autoencoders, vae

CFG = conv_ae.ConvAeConfig.named("tiny")


@pytest.fixture(scope="module")
def params():
    return conv_ae.init(CFG, jax.random.key(0))


def _clip(rng, frames=9, h=16, w=24, b=2):
    return rng.uniform(-1, 1, (b, frames, h, w, 3)).astype(np.float32)


def test_shapes_match_the_wan_vae_geometry(params, seed):
    rng = np.random.default_rng(seed)
    x = _clip(rng)
    z = autoencoders.encode(CFG, params, x)
    assert z.shape == (2, 3, 2, 3, 16) and z.dtype == np.float32
    y = autoencoders.decode(CFG, params, z)
    assert y.shape == x.shape and float(np.abs(y).max()) <= 1.0
    raw = autoencoders.decode(CFG, params, z, clamp=False)
    np.testing.assert_allclose(np.clip(raw, -1, 1), y, atol=1e-6)
    one = autoencoders.encode(CFG, params, x[:, :1])
    np.testing.assert_allclose(one, z[:, :1], atol=1e-5)  # frame 0 is coded on its own


def test_each_latent_frame_reads_only_its_frame_group(params, seed):
    rng = np.random.default_rng(seed)
    x = _clip(rng)
    z = np.asarray(autoencoders.encode(CFG, params, x))
    x2 = x.copy()
    x2[:, 6] = rng.uniform(-1, 1, x2[:, 6].shape)  # frame 6 is in group 2 (frames 5-8)
    z2 = np.asarray(autoencoders.encode(CFG, params, x2))
    np.testing.assert_array_equal(z2[:, :2], z[:, :2])
    assert np.abs(z2[:, 2] - z[:, 2]).max() > 1e-4
    zz = z.copy()
    zz[:, 1] += 1.0  # latent frame 1 decodes to frames 1-4 only
    a, b = (np.asarray(autoencoders.decode(CFG, params, v, clamp=False)) for v in (z, zz))
    np.testing.assert_array_equal(a[:, [0, 5, 6, 7, 8]], b[:, [0, 5, 6, 7, 8]])
    assert np.abs(a[:, 1:5] - b[:, 1:5]).max() > 1e-4


def test_latent_statistics_normalise(params, seed):
    rng = np.random.default_rng(seed)
    x = _clip(rng, frames=5)
    mean, std = tuple(rng.normal(size=16).tolist()), tuple(rng.uniform(0.5, 2, 16).tolist())
    cfg = CFG.replace(latents_mean=mean, latents_std=std)
    raw = np.asarray(autoencoders.encode(CFG, params, x))
    np.testing.assert_allclose(autoencoders.encode(cfg, params, x), (raw - np.array(mean)) / np.array(std),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(autoencoders.decode(cfg, params, (raw - np.array(mean)) / np.array(std)),
                               autoencoders.decode(CFG, params, raw), atol=1e-5)


def test_bad_input_says_what_to_fix(params):
    with pytest.raises(ValueError, match="channels"):
        autoencoders.encode(CFG, params, np.zeros((1, 5, 16, 24, 4), np.float32))
    with pytest.raises(ValueError, match="multiples of 8"):
        autoencoders.encode(CFG, params, np.zeros((1, 5, 12, 24, 3), np.float32))
    with pytest.raises(ValueError, match="z_dim=16"):
        autoencoders.decode(CFG, params, np.zeros((1, 2, 2, 3, 8), np.float32))
    with pytest.raises(ValueError, match="tile_size"):
        autoencoders.decode(CFG, params, np.zeros((1, 2, 2, 3, 16), np.float32), tile_size=(16, 16))
    with pytest.raises(ValueError, match="width"):
        conv_ae.ConvAeConfig(width=0)
    with pytest.raises(TypeError, match="not an autoencoder"):
        autoencoders.encode(object(), params, np.zeros((1, 1, 8, 8, 3), np.float32))


def test_the_protocol_finds_each_codec_by_its_config_class():
    assert autoencoders.module(CFG) is conv_ae and autoencoders.module(vae.VaeConfig.named("tiny")) is vae
    assert autoencoders.config_path(CFG) == "pickstyle_jax.demo.conv_ae:ConvAeConfig"
    assert autoencoders.config_class(autoencoders.config_path(CFG)) is conv_ae.ConvAeConfig
    assert autoencoders.num_params(CFG) == conv_ae.num_params(CFG)
    for bad in ("pickstyle_jax.demo.no_such_module:X", "pickstyle_jax.demo.conv_ae:NoSuchClass",
                "pickstyle_jax.demo.conv_ae", "pickstyle_jax.lora:LoraConfig"):
        with pytest.raises((TypeError, ValueError)):
            autoencoders.config_class(bad)


def test_checkpoint_round_trip_through_load_vae(params, tmp_path):
    path = checkpoints.save(tmp_path / "ae", CFG, params, kind=checkpoints.AUTOENCODER)
    meta = json.loads((path / "config.json").read_text())
    assert meta["kind"] == "vae" and meta["codec"] == "pickstyle_jax.demo.conv_ae:ConvAeConfig"
    cfg, loaded = checkpoints.load_vae(path)
    assert cfg == CFG and checkpoints.read_config(path, checkpoints.AUTOENCODER_KINDS) == CFG
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"kind": "umt5", "format": 1, "config": {}}\n')
    with pytest.raises(checkpoints.CheckpointError, match="expected 'vae'"):
        checkpoints.load_vae(tmp_path / "other")
    meta["codec"] = "pickstyle_jax.demo.gone:ConvAeConfig"
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoints.CheckpointError, match="gone"):
        checkpoints.load_vae(path)


def test_loading_a_demo_checkpoint_imports_the_demo_only_then(params, tmp_path):
    """Production modules import no demo code; loading a checkpoint whose codec is the demo's imports it there."""
    path = checkpoints.save(tmp_path / "ae", CFG, params, kind=checkpoints.AUTOENCODER)
    code = ("import sys; from pickstyle_jax import checkpoints; "
            "before = [m for m in sys.modules if m.startswith('pickstyle_jax.demo')]; "
            f"cfg, _ = checkpoints.load_vae({str(path)!r}); "
            "print(before, type(cfg).__module__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["[]", "pickstyle_jax.demo.conv_ae"], r.stdout
