"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, both execution paths, the converter, and input checks.

The reference is a tiny randomised diffusers model (every tensor drawn; zero inits would hide bugs). Our parameters
come from it through the real converter and an Orbax round trip. The official key names used here are written out
independently of convert/wan_vae.py's table (from docs/REFERENCE.md §6), so a wrong table entry fails these tests
rather than being mirrored by them.
"""
import concurrent.futures
import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import common, wan_vae
from pickstyle_jax import checkpoints
from pickstyle_jax.models import vae, vae_modules
from tests.conftest import SEED  # the run's seed: printed, replayable with PICKSTYLE_TEST_SEED
B, H, W = 2, 24, 40  # non-square, multiples of 8
PARITY_RTOL = 1e-5
BF16_RTOL = 4e-2  # measured on the tiny random model: encode ~7e-3, decode 1.2e-2 to 1.6e-2 relative L2


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _diffusers_to_official(key: str, num_res_blocks: int) -> str:
    """§6.3 read right-to-left as plain rewrites (independent of the converter's table)."""
    res = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    first, rest = key.split(".", 1)
    if first in top:
        return f"{top[first]}.{rest}"
    coder, rest = first, rest
    for d, o in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(d):
            return f"{coder}.{o}{rest[len(d):]}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", rest)
    if m:
        kind, i, tail = m.groups()
        idx = {"attentions": "1"}.get(kind, "0" if i == "0" else "2")
        sub, leaf = tail.split(".", 1)
        return f"{coder}.middle.{idx}.{res.get(sub, sub) if kind == 'resnets' else sub}.{leaf}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
    if m:
        k, tail = m.groups()
        sub, leaf = tail.split(".", 1)
        return f"encoder.downsamples.{k}.{res.get(sub, sub)}.{leaf}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", rest)
    if m:  # each decoder stage holds num_res_blocks + 1 resnets and one upsampler
        s, r, sub, leaf = m.groups()
        return f"decoder.upsamples.{int(s) * (num_res_blocks + 2) + int(r)}.{res[sub]}.{leaf}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest)
    if m:
        s, tail = m.groups()
        return f"decoder.upsamples.{int(s) * (num_res_blocks + 2) + num_res_blocks + 1}.{tail}"
    raise KeyError(key)


def _diffusers_kwargs(cfg):
    return dict(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
                attn_scales=[], temperal_downsample=list(cfg.temperal_downsample),
                latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std))


@pytest.fixture(scope="module")
def torch_vae():
    from diffusers import AutoencoderKLWan

    print(f"seed {SEED}")
    cfg = vae.VaeConfig.named("tiny")
    model = AutoencoderKLWan(**_diffusers_kwargs(cfg)).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("gamma"):
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
            elif name.endswith("bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
    return cfg, model


@pytest.fixture(scope="module")
def converted(torch_vae, tmp_path_factory):
    """(cfg, params) through the diffusers-folder converter and an Orbax round trip; plus the official .pth path."""
    cfg, model = torch_vae
    root = tmp_path_factory.mktemp("vae")
    model.save_pretrained(root / "diffusers")
    wan_vae.convert(root / "diffusers", root / "ours_d", verbose=False)
    official = {_diffusers_to_official(k, cfg.num_res_blocks): v.detach().clone()
                for k, v in model.state_dict().items()}
    torch.save(official, root / "official.pth")
    return checkpoints.load_vae(root / "ours_d"), root


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(SEED)


def _torch_encode(cfg, model, x):
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        mu = model.encode(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).latent_dist.mode()
    return ((mu - mean) / std).permute(0, 2, 3, 4, 1).numpy()


def _torch_decode(cfg, model, z_norm):
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        out = model.decode(torch.from_numpy(z_norm).permute(0, 4, 1, 2, 3) * std + mean).sample
    return out.permute(0, 2, 3, 4, 1).numpy()


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("frames", [1, 5, 9, 17])
def test_parity_with_diffusers(torch_vae, converted, rng, frames):
    _, model = torch_vae
    (cfg, params), _ = converted
    x = rng.uniform(-1, 1, (B, frames, H, W, 3)).astype(np.float32)
    t = 1 + (frames - 1) // 4
    z = rng.standard_normal((B, t, H // 8, W // 8, cfg.z_dim)).astype(np.float32)
    ref_z, ref_x = _torch_encode(cfg, model, x), _torch_decode(cfg, model, z)
    assert ref_z.shape == (B, t, H // 8, W // 8, cfg.z_dim) and ref_x.shape == (B, 1 + 4 * (t - 1), H, W, 3)
    assert np.mean(np.abs(ref_x) < 1) > 0.5, "decoder output mostly clamped: the comparison would be vacuous"
    # Four programs to compile: XLA compiles outside the GIL, so two threads halve the wait on a 2-core machine.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {(op, chunked): pool.submit(getattr(vae, op), cfg, params, x if op == "encode" else z, chunked=chunked)
                for chunked in (True, False) for op in ("encode", "decode")}
        out = {k: np.asarray(f.result()) for k, f in runs.items()}
    errs = {c: (_rel(out["encode", c], ref_z), _rel(out["decode", c], ref_x)) for c in (True, False)}
    paths = (_rel(out["encode", True], out["encode", False]), _rel(out["decode", True], out["decode", False]))
    print(f"seed {SEED} F={frames}: (encode, decode) rel L2 vs diffusers: chunked {errs[True]}, non-chunked "
          f"{errs[False]}; chunked vs non-chunked {paths}")
    assert max(max(e) for e in errs.values()) <= PARITY_RTOL, errs
    assert max(paths) <= PARITY_RTOL, paths


def test_tiled_decode_matches_diffusers(torch_vae, converted, rng):
    """Tiles along W only (two tile shapes, two compiles); both blend directions are checked in test_blend."""
    _, model = torch_vae
    (cfg, params), _ = converted
    z = rng.standard_normal((1, 1, 2, 5, cfg.z_dim)).astype(np.float32)  # 16x40 px, tiles 24 px every 16 px
    model.enable_tiling(tile_sample_min_height=24, tile_sample_min_width=24, tile_sample_stride_height=16,
                        tile_sample_stride_width=16)
    try:
        ref = _torch_decode(cfg, model, z)
    finally:
        model.use_tiling = False
    ours = vae.decode(cfg, params, z, tile_size=(24, 24), tile_stride=(16, 16))
    err = _rel(ours, ref)
    print(f"seed {SEED} tiled decode vs diffusers tiled: {err:.2e}; vs exact decode (the approximation, random "
          f"weights, tiny tiles): {_rel(ours, _torch_decode(cfg, model, z)):.2e}")
    assert ours.shape == ref.shape == (1, 1, 16, 40, 3)
    assert err <= PARITY_RTOL


def test_blend(torch_vae, rng):
    _, model = torch_vae
    a, b = (rng.standard_normal((1, 2, 6, 7, 3)).astype(np.float32) for _ in range(2))
    ta, tb = (torch.from_numpy(v).permute(0, 4, 1, 2, 3) for v in (a, b))  # [B, C, T, H, W]
    for axis, fn in ((2, model.blend_v), (3, model.blend_h)):
        ref = fn(ta, tb.clone(), 4).permute(0, 2, 3, 4, 1).numpy()
        np.testing.assert_allclose(np.asarray(vae._blend(a, b, 4, axis)), ref, rtol=1e-6, atol=1e-6)


def test_bf16_close_to_fp32(converted, rng):
    (cfg, params), _ = converted
    bf = cfg.replace(dtype="bfloat16")
    x = rng.uniform(-1, 1, (B, 5, H, W, 3)).astype(np.float32)
    z = rng.standard_normal((B, 2, H // 8, W // 8, cfg.z_dim)).astype(np.float32)
    # Precision does not depend on the path; the non-chunked one compiles faster.
    ez = _rel(vae.encode(bf, params, x, chunked=False), vae.encode(cfg, params, x))
    ex = _rel(vae.decode(bf, params, z, chunked=False), vae.decode(cfg, params, z))
    print(f"seed {SEED} bf16 vs fp32 rel L2: encode {ez:.2e}, decode {ex:.2e}")
    assert ez <= BF16_RTOL and ex <= BF16_RTOL


def test_native_conv3d_equals_cpu_time_folding(rng, monkeypatch):
    """Accelerators run the native 3D convolution, CPUs the time-folded one (all the parity tests above)."""
    x = rng.standard_normal((2, 6, 8, 10, 4)).astype(np.float32)
    p = {"kernel": rng.standard_normal((3, 3, 3, 4, 5)).astype(np.float32), "bias": rng.standard_normal(5)}
    outs = []
    for fold in (True, False):
        monkeypatch.setattr(vae_modules, "_fold_time", lambda fold=fold: fold)
        outs.append(np.asarray(vae_modules._conv3d_valid_t(p, x)))
    assert outs[0].shape == (2, 4, 8, 10, 5)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ converter
def _assert_trees_equal(a, b):
    assert common.flatten_shapes(a) == common.flatten_shapes(b)
    lb = dict(jax.tree_util.tree_leaves_with_path(b))
    for path, x in jax.tree_util.tree_leaves_with_path(a):
        assert np.asarray(x).dtype == np.asarray(lb[path]).dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(lb[path]), err_msg=jax.tree_util.keystr(path))


def test_official_and_diffusers_conversions_identical(converted):
    (cfg_d, params_d), root = converted
    cfg_o, params_o = wan_vae.convert(root / "official.pth", root / "ours_o", config="tiny", verbose=False)
    assert cfg_o == cfg_d == vae.VaeConfig.named("tiny")
    _assert_trees_equal(params_o, params_d)
    _assert_trees_equal(checkpoints.load_vae(root / "ours_o")[1], params_d)
    assert common.flatten_shapes(params_d) == common.flatten_shapes(
        jax.eval_shape(lambda: vae.init(cfg_d, jax.random.key(0))))


def test_param_tree_and_axes():
    """init, param_shapes and param_axes describe one tree; VAE parameters are all replicated (axes None)."""
    cfg = vae.VaeConfig.named("tiny")
    shapes = jax.eval_shape(lambda: vae.init(cfg, jax.random.key(SEED)))
    is_tuple = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.map(lambda s: s.shape, shapes) == vae.param_shapes(cfg)
    axes = vae.param_axes(cfg)
    flat = jax.tree.leaves(axes, is_leaf=is_tuple)
    assert len(flat) == len(jax.tree.leaves(shapes)) and all(set(a) == {None} for a in flat)
    assert axes["decoder"]["upsamples"]["2"]["time_conv"]["kernel"] == (None,) * 5


def test_wan21_tables_cover_full_size_diffusers_and_official_names():
    """The full-size key sets and shapes, from a meta-device diffusers model (no memory, no weights)."""
    from diffusers import AutoencoderKLWan

    cfg = vae.VaeConfig.named("wan2.1")
    with torch.device("meta"):
        sd = AutoencoderKLWan().state_dict()
    assert vae.num_params(cfg) == sum(t.numel() for t in sd.values())
    print(f"wan2.1 VAE: {vae.num_params(cfg) / 1e6:.2f} M parameters")
    for diffusers in (True, False):
        names = {k: (k if diffusers else _diffusers_to_official(k, cfg.num_res_blocks)) for k in sd}
        shapes = {names[k]: tuple(t.shape) for k, t in sd.items()}
        table, expected = wan_vae.key_table(cfg, diffusers=diffusers)
        assert sorted(src for src, _ in table.values()) == sorted(shapes)
        for dst, (src, fn) in table.items():
            assert fn(np.empty(shapes[src], np.uint8)).shape == expected[dst], (src, dst)
    assert wan_vae.official_to_diffusers(cfg, "decoder.upsamples.4.shortcut") == \
        "decoder.up_blocks.1.resnets.0.conv_shortcut"
    assert wan_vae.official_to_diffusers(cfg, "decoder.upsamples.11.resample.1") == \
        "decoder.up_blocks.2.upsamplers.0.resample.1"


def test_cli_bf16_and_config_from_diffusers(converted, tmp_path):
    (cfg, params), root = converted
    wan_vae.main(["--src", str(root / "diffusers"), "--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    cfg_b, params_b = checkpoints.load_vae(tmp_path / "bf16")
    assert cfg_b == cfg.replace(dtype="bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves(params_b)} == {"bfloat16"}


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_converter_is_strict(converted, tmp_path, fault):
    _, root = converted
    sd = torch.load(root / "official.pth", weights_only=True)
    name = {"missing": "decoder.upsamples.3.shortcut.weight", "unexpected": "encoder.extra.weight",
            "shape": "encoder.middle.1.to_qkv.weight"}[fault]
    if fault == "missing":
        del sd[name]
    elif fault == "unexpected":
        sd[name] = torch.zeros(3)
    else:
        sd[name] = torch.zeros(5, 4, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(common.ConversionError, match=re.escape(name)):
        wan_vae.convert(tmp_path / "bad.pth", tmp_path / "out", config="tiny", verbose=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ inputs
def test_frames_not_4k_plus_1_warn_once_and_drop(converted, rng):
    (cfg, params), _ = converted
    x = rng.uniform(-1, 1, (B, 7, H, W, 3)).astype(np.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        z = vae.encode(cfg, params, x)
    msgs = [str(r.message) for r in rec if "frames" in str(r.message)]
    assert len(msgs) == 1 and "dropping the last 2 of 7" in msgs[0], msgs
    np.testing.assert_array_equal(np.asarray(z), np.asarray(vae.encode(cfg, params, x[:, :5])))


def test_bad_inputs(converted):
    (cfg, params), _ = converted
    ok = np.zeros((B, 1, H, W, 3), np.float32)  # the F=1 parity shape: already compiled
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(cfg, params, np.zeros((1, 1, 20, 8, 3), np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        vae.encode(cfg, params, np.zeros((1, 1, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match="channels-first"):
        vae.encode(cfg, params, np.zeros((1, 3, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\[B, F, H, W, 3\]"):
        vae.encode(cfg, params, ok[0])
    with pytest.raises(ValueError, match="z_dim=16"):
        vae.decode(cfg, params, np.zeros((1, 1, 1, 1, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[B, T, h, w, 16\]"):
        vae.decode(cfg, params, np.zeros((1, 1, 1, 16), np.float32))
    with pytest.warns(UserWarning, match=r"outside \[-1, 1\]"):
        vae.encode(cfg, params, ok + 255.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vae.encode(cfg, params, ok)


def test_config():
    cfg = vae.VaeConfig.named("wan2.1")
    assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks, cfg.temperal_downsample) == \
        (96, 16, (1, 2, 4, 4), 2, (False, True, True))
    assert cfg.latents_mean[7] == 1.5508 and cfg.latents_std[8] == 3.2687
    assert checkpoints.config_from_dict("vae", checkpoints.config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="z_dim"):
        cfg.replace(z_dim=4)
    with pytest.raises(NotImplementedError):
        dataclasses.replace(cfg, attn_scales=(1.0,))


def test_encode_a_clip_closed_over_by_a_traced_function(converted, rng):
    """The range check on a concrete clip runs eagerly even while a caller traces (jit / grad over the params)."""
    (cfg, params), _ = converted
    x = rng.uniform(-1, 1, (B, 1, H, W, 3)).astype(np.float32)
    loss = lambda p: jnp.mean(vae.encode(cfg, p, x) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(float(jax.jit(loss)(params)), float(loss(params)), rtol=1e-5)
