"""DiT and LoRA converters: every source layout gives the same parameters, and every bad input is named.

The official key names used here are written out independently of convert/wan_dit.py's table (docs/REFERENCE.md
§6), so a wrong entry in that table fails these tests rather than being mirrored by them.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from convert import common, lora as lora_convert, wan_dit
from pickstyle_jax import checkpoints, lora
from pickstyle_jax.models import wan
from tests import wan_ref
from tests.conftest import SEED  # the run's seed: printed, replayable with PICKSTYLE_TEST_SEED


def _diffusers_to_official(key: str) -> str:
    """§6.2 read right-to-left, written as plain replacements (independent of the converter's table)."""
    top = {
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "proj_out": "head.head",
    }
    if key == "scale_shift_table":
        return "head.modulation"
    for d, o in top.items():
        if key.startswith(d + "."):
            return o + key[len(d):]
    parts = key.split(".")
    if parts[0] in ("blocks", "vace_blocks"):
        head, rest = ".".join(parts[:2]), ".".join(parts[2:])
        for d, o in [("scale_shift_table", "modulation"), ("attn1.to_out.0", "self_attn.o"),
                     ("attn2.to_out.0", "cross_attn.o"), ("attn1.to_", "self_attn."), ("attn2.to_", "cross_attn."),
                     ("attn1.norm_", "self_attn.norm_"), ("attn2.norm_", "cross_attn.norm_"),
                     ("norm2.", "norm3."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
                     ("proj_in", "before_proj"), ("proj_out", "after_proj")]:
            if rest.startswith(d):
                return f"{head}.{o}{rest[len(d):]}"
    return key


@pytest.fixture(scope="module")
def tiny():
    cfg = wan.WanConfig.named("tiny")
    model = wan_ref.make_diffusers_vace(cfg, seed=SEED)
    return cfg, model


def _official_sd(model):
    return {_diffusers_to_official(k): v.detach().clone() for k, v in model.state_dict().items()}


def _assert_trees_equal(a, b):
    fa, fb = common.flatten_shapes(a), common.flatten_shapes(b)
    assert fa == fb
    la, lb = jax.tree_util.tree_leaves_with_path(a), dict(jax.tree_util.tree_leaves_with_path(b))
    for path, x in la:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(lb[path]), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def from_diffusers(tiny, tmp_path_factory):
    cfg, model = tiny
    src = tmp_path_factory.mktemp("diffusers")
    model.save_pretrained(src)
    dst = tmp_path_factory.mktemp("ckpt") / "dit"
    wan_dit.convert(src, dst, verbose=False)
    return checkpoints.load_dit(dst)


def test_diffusers_folder_forward_parity(tiny, from_diffusers):
    """The converted checkpoint reproduces the diffusers model (which also checks the diffusers table)."""
    cfg, model = tiny
    ccfg, params = from_diffusers
    assert ccfg.vace_layers == cfg.vace_layers and ccfg.dim == cfg.dim and ccfg.num_layers == cfg.num_layers
    rng = np.random.default_rng(SEED)
    f, h, w = 2, 4, 6
    x = rng.standard_normal((1, f, h, w, cfg.in_dim), dtype=np.float32)
    ctx = rng.standard_normal((1, f, h, w, cfg.vace_in_dim), dtype=np.float32)
    text = rng.standard_normal((1, 9, cfg.text_dim), dtype=np.float32)
    t = np.array([437.0], np.float32)
    ours = np.asarray(wan.forward(ccfg, params, x, t, text, ctx, context_scale=0.7))
    ref = wan_ref.diffusers_forward(model, x, t, text, ctx, 0.7)
    err = np.abs(ours - ref).max()
    assert err <= 1e-4, f"seed {SEED}: max abs {err}"


def test_official_single_file_sharded_and_comfy_agree(tiny, from_diffusers, tmp_path):
    cfg, model = tiny
    _, want = from_diffusers
    sd = _official_sd(model)
    from safetensors.torch import save_file

    # 1. official folder with config.json (official field names) and one safetensors file
    off = tmp_path / "official"
    off.mkdir()
    save_file(sd, str(off / "diffusion_pytorch_model.safetensors"))
    (off / "config.json").write_text(json.dumps({
        "model_type": "vace", "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim, "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim, "text_len": cfg.text_len, "eps": cfg.eps, "vace_layers": list(cfg.vace_layers),
        "vace_in_dim": cfg.vace_in_dim}))
    wan_dit.convert(off, tmp_path / "a", verbose=False)
    _assert_trees_equal(checkpoints.load_dit(tmp_path / "a")[1], want)

    # 2. sharded official folder: 3 shards + index json
    sh = tmp_path / "sharded"
    sh.mkdir()
    (sh / "config.json").write_text((off / "config.json").read_text())
    keys = sorted(sd)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(keys, dtype=object), 3)):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00003.safetensors"
        save_file({k: sd[k] for k in chunk}, str(sh / name))
        weight_map.update({k: name for k in chunk})
    (sh / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    c2, _ = wan_dit.convert(sh, tmp_path / "b", verbose=False)
    assert c2.vace_layers == cfg.vace_layers
    _assert_trees_equal(checkpoints.load_dit(tmp_path / "b")[1], want)

    # 3. one .pth with ComfyUI's prefix, variant named on the command line
    torch.save({f"model.diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / "comfy.pth")
    wan_dit.main(["--src", str(tmp_path / "comfy.pth"), "--dst", str(tmp_path / "c"), "--config", "tiny"])
    _assert_trees_equal(checkpoints.load_dit(tmp_path / "c")[1], want)


class _ShapesOnly(dict):
    describe = "shapes"

    def shape(self, k):
        return self[k]


@pytest.mark.parametrize("name", ["vace-14B", "vace-1.3B", "t2v-14B", "t2v-1.3B"])
def test_variant_inferred_from_official_shapes(name):
    cfg = wan.WanConfig.named(name)
    d, f = cfg.dim, cfg.ffn_dim
    sd = _ShapesOnly({"patch_embedding.weight": (d, 16, 1, 2, 2), "blocks.0.ffn.0.weight": (f, d),
                      "text_embedding.0.weight": (d, 4096), "time_embedding.0.weight": (d, 256),
                      "head.head.weight": (64, d)})
    sd.update({f"blocks.{i}.modulation": (1, 6, d) for i in range(cfg.num_layers)})
    if cfg.vace_layers:
        sd["vace_patch_embedding.weight"] = (d, 96, 1, 2, 2)
        sd.update({f"vace_blocks.{j}.modulation": (1, 6, d) for j in range(len(cfg.vace_layers))})
    assert wan_dit._config_from_shapes(sd, wan.WanConfig.named("tiny")) == cfg


def test_bf16_source_and_dtype_choice(tiny, tmp_path):
    cfg, model = tiny
    sd = {k: v.to(torch.bfloat16) for k, v in _official_sd(model).items()}
    torch.save(sd, tmp_path / "bf16.pth")
    ccfg, _ = wan_dit.convert(tmp_path / "bf16.pth", tmp_path / "keep", config="tiny", verbose=False)
    ckept, kept = checkpoints.load_dit(tmp_path / "keep")
    assert kept["blocks"]["0"]["self_attn"]["q"]["kernel"].dtype == jax.numpy.bfloat16
    assert ccfg.param_dtype == ckept.param_dtype == "bfloat16"
    wan_dit.convert(tmp_path / "bf16.pth", tmp_path / "f32", config="tiny", dtype="float32", verbose=False)
    c32, f32 = checkpoints.load_dit(tmp_path / "f32")
    assert c32.param_dtype == "float32"
    # the compute dtype is a run-time option (wan.Options.dtype), never saved: the converter refuses to write one
    with pytest.raises(common.ConversionError, match="compute dtype"):
        wan_dit.convert(tmp_path / "bf16.pth", tmp_path / "mixed", config="tiny", compute_dtype="float32",
                        verbose=False)
    assert not (tmp_path / "mixed").exists()
    q = f32["blocks"]["1"]["self_attn"]["q"]["kernel"]
    assert q.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(q), sd["blocks.1.self_attn.q.weight"].float().numpy().T)
    # dtype cast at load time
    cb, pb = checkpoints.load_dit(tmp_path / "f32", dtype=jax.numpy.bfloat16)
    assert cb.param_dtype == "bfloat16" and pb["head"]["head"]["kernel"].dtype == jax.numpy.bfloat16


def test_bad_inputs_name_the_key(tiny, tmp_path):
    cfg, model = tiny
    sd = _official_sd(model)
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "blocks.1.cross_attn.k.weight"},
                    "blocks.1.cross_attn.k.weight"),
        "extra": ({**sd, "blocks.0.self_attn.extra.weight": torch.zeros(3)}, "blocks.0.self_attn.extra.weight"),
        "shape": ({**sd, "blocks.0.ffn.0.weight": torch.zeros(7, cfg.dim)}, "blocks.0.ffn.0.weight"),
    }
    for name, (bad, key) in cases.items():
        torch.save(bad, tmp_path / f"{name}.pth")
        with pytest.raises(common.ConversionError, match=key.replace(".", r"\.")):
            wan_dit.convert(tmp_path / f"{name}.pth", tmp_path / name, config="tiny", verbose=False)
        assert not (tmp_path / name).exists(), "a failed conversion must not leave a checkpoint behind"
    # several problems are all reported at once
    both = {k: v for k, v in cases["extra"][0].items() if k != "head.head.bias"}
    torch.save(both, tmp_path / "both.pth")
    with pytest.raises(common.ConversionError) as e:
        wan_dit.convert(tmp_path / "both.pth", tmp_path / "both", config="tiny", verbose=False)
    assert "head.head.bias" in str(e.value) and "blocks.0.self_attn.extra.weight" in str(e.value)
    with pytest.raises((ValueError, KeyError), match="no-such-variant"):
        wan_dit.convert(tmp_path / "both.pth", tmp_path / "v", config="no-such-variant", verbose=False)
    with pytest.raises(common.ConversionError, match="does not exist"):
        wan_dit.convert(tmp_path / "nope", tmp_path / "v", verbose=False)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    with open(tmp_path / "evil.pth", "wb") as f:
        torch.save({"blocks.0.modulation": torch.zeros(1), "payload": _Evil()}, f)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(common.ConversionError, match="refusing to load"):
        wan_dit.convert(tmp_path / "evil.pth", tmp_path / "out", config="tiny", verbose=False)
    with pytest.raises(common.ConversionError, match="refusing to load"):
        lora_convert.import_lora(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists(), "the pickle's code ran"


def test_cli_reports_errors_without_traceback(tmp_path):
    torch.save({"x": torch.zeros(2)}, tmp_path / "x.pth")
    r = subprocess.run([sys.executable, "-m", "convert.wan_dit", "--src", str(tmp_path / "x.pth"), "--dst",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__))))
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ LoRA
def _pickstyle_lora_sd(cfg, rank, rng, prefix="module."):
    sd = {}
    for j in range(len(cfg.vace_layers)):
        for p in "qkv":
            base = f"{prefix}vace_blocks.{j}.self_attn.{p}"
            sd[f"{base}.lora_A.consistency.weight"] = torch.from_numpy(
                rng.standard_normal((rank, cfg.dim), dtype=np.float32))
            sd[f"{base}.lora_B.consistency.weight"] = torch.from_numpy(
                rng.standard_normal((cfg.dim, rank), dtype=np.float32))
    return sd


def test_lora_formats_round_trip(tiny, tmp_path):
    cfg, _ = tiny
    rng = np.random.default_rng(SEED)
    sd = _pickstyle_lora_sd(cfg, 4, rng)
    torch.save(sd, tmp_path / "with.pth")
    torch.save({k[len("module."):]: v for k, v in sd.items()}, tmp_path / "without.pth")
    a = lora_convert.import_lora(tmp_path / "with.pth", config="tiny")
    b = lora_convert.import_lora(tmp_path / "without.pth")
    assert a.config == b.config == lora.LoraConfig(rank=4, alpha=4.0)
    _assert_trees_equal(a.params, b.params)
    np.testing.assert_array_equal(a.params["vace_blocks"]["1"]["self_attn"]["v"]["A"],
                                  sd["module.vace_blocks.1.self_attn.v.lora_A.consistency.weight"].numpy().T)

    # PEFT/diffusers safetensors, exported by us, read back with its alpha
    a2 = lora.Lora(a.params, lora.LoraConfig(rank=4, alpha=8.0))
    lora_convert.export_lora(a2, tmp_path / "peft.safetensors")
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "peft.safetensors")))
    assert "transformer.vace_blocks.0.attn1.to_q.lora_A.weight" in keys
    c = lora_convert.import_lora(tmp_path / "peft.safetensors")
    assert c.config.alpha == 8.0
    _assert_trees_equal(c.params, a.params)
    assert lora_convert.import_lora(tmp_path / "peft.safetensors", alpha=2.0).config.alpha == 2.0

    # CLI: import -> checkpoint -> export .pth -> import again
    lora_convert.main(["--src", str(tmp_path / "with.pth"), "--dst", str(tmp_path / "ck")])
    loaded = checkpoints.load_lora(tmp_path / "ck")
    assert isinstance(loaded, lora.Lora) and loaded.config == a.config
    lora_convert.main(["--export", str(tmp_path / "ck"), "--dst", str(tmp_path / "back.pth")])
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert sorted(back) == sorted(sd)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0)


def test_lora_bad_inputs(tiny, tmp_path):
    cfg, _ = tiny
    rng = np.random.default_rng(SEED)
    sd = _pickstyle_lora_sd(cfg, 4, rng)
    lonely = {k: v for k, v in sd.items() if k != "module.vace_blocks.1.self_attn.k.lora_B.consistency.weight"}
    torch.save(lonely, tmp_path / "lonely.pth")
    with pytest.raises(common.ConversionError, match=r"vace_blocks\.1\.self_attn\.k: lora_B is missing"):
        lora_convert.import_lora(tmp_path / "lonely.pth")
    torch.save({**sd, "module.vace_blocks.0.self_attn.q.weight": torch.zeros(2)}, tmp_path / "junk.pth")
    with pytest.raises(common.ConversionError, match=r"not a LoRA A/B weight: module\.vace_blocks\.0\.self_attn\.q"):
        lora_convert.import_lora(tmp_path / "junk.pth")
    torch.save({**sd, "module.vace_blocks.0.bogus.lora_A.consistency.weight": torch.zeros(4, cfg.dim),
                "module.vace_blocks.0.bogus.lora_B.consistency.weight": torch.zeros(cfg.dim, 4)},
               tmp_path / "unknown.pth")
    with pytest.raises(common.ConversionError, match="bogus"):
        lora_convert.import_lora(tmp_path / "unknown.pth")
    torch.save(_pickstyle_lora_sd(wan.WanConfig.named("tiny"), 4, rng), tmp_path / "ok.pth")
    with pytest.raises(common.ConversionError, match="does not fit"):
        lora_convert.import_lora(tmp_path / "ok.pth", config="vace-1.3B")


def test_checkpoint_save_is_atomic_and_kind_checked(tmp_path):
    cfg = wan.WanConfig.named("tiny")
    params = wan.init(cfg, jax.random.key(0))
    dst = tmp_path / "ck"
    checkpoints.save(dst, cfg, params, kind="wan")
    before = (dst / "config.json").read_text()

    class Boom:
        shape, dtype = (1,), np.float32

        def __array__(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(Exception):
        checkpoints.save(dst, cfg, {**params, "boom": Boom()}, kind="wan")
    assert (dst / "config.json").read_text() == before, "a failed save damaged the existing checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"], "a failed save left temporary files"
    with pytest.raises(checkpoints.CheckpointError, match="'wan' checkpoint, expected 'vae'"):
        checkpoints.load_vae(dst)
    with pytest.raises(checkpoints.CheckpointError, match="not a pickstyle_jax checkpoint"):
        checkpoints.load_dit(tmp_path)
    meta = json.loads((dst / "config.json").read_text())
    meta["config"]["bogus_field"] = 1
    (dst / "config.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoints.CheckpointError, match="bogus_field"):
        checkpoints.load_dit(dst)
