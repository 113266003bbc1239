"""`make test-slow` (not part of `make test`): the released vace-1.3B architecture end to end through the CLIs, on CPU.

1. A random bf16 Wan2.1-VACE-1.3B (dim 1536, 30 layers, 15 VACE blocks, 2.15 B parameters, 4.3 GB) written in the
   official release's folder layout: `config.json` (the official field names) and
   `diffusion_pytorch_model-0000i-of-0000n.safetensors` shards with `diffusion_pytorch_model.safetensors.index.json`,
   sharded as the 14B release is. Names and shapes come from the converter's official key table, checked against
   diffusers' `WanVACETransformer3DModel` built on the `meta` device (no weights, nothing downloaded); the tensors
   are drawn and written one shard at a time, so the builder never holds more than one shard.
2. A rank-128 PickStyle LoRA `.pth` in the official key layout (`module.vace_blocks.{j}.self_attn.{q,k,v}.lora_{A,B}
   .default.weight`, as PickStyle's training saves it).
3. `python -m convert.wan_dit` and `python -m convert.lora --config vace-1.3B` convert them (the LoRA checked
   against the variant): the DiT's config.json holds the architecture only (the layout is a run-time option).
4. `python -m pickstyle_jax.train` (configs/vace_1_3b.py on one CPU device) trains 2 steps on that checkpoint.
5. `python -m pickstyle_jax.stylize` stylises a 5-frame 64 x 112 clip with the converted LoRA.

The VAE and umT5 are small stand-ins saved directly as checkpoints (as the other CLI tests do): the VAE is the tiny
config (z_dim 16 and 8x spatial, what the DiT's in_dim 16 / vace_in_dim 96 need; the real one adds minutes of CPU
convolutions and tests nothing about the DiT's layout); the umT5 is 4096 wide, which the DiT's text_dim requires,
with one layer, a 512-row vocabulary (the byte tokenizer's 259 ids fit) and a 256-wide FFN, 10 M parameters instead
of 5.7 B. Each CLI runs under `/usr/bin/time -v`; its wall time and peak memory are printed. XLA_FLAGS below says
why the CLIs run with one XLA:CPU pass disabled.
"""
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARD_BYTES = 1_600_000_000  # three shards for 4.3 GB
RANK = 128
# XLA:CPU computes bf16 matmuls in fp32 and, by default, hoists the bf16 -> fp32 convert of every stacked weight
# out of the layer scan (while-loop-invariant code motion): an fp32 copy of the whole 2.15 B-parameter model. The
# 2-step train plans 11.1 GiB of temporaries with it (15.5 GiB peak; 21.8 GB resident when we stopped it) and 3.4
# GiB without (7.8 GiB peak), so the CLIs here run without that one pass. GPUs and TPUs multiply bf16 natively.
XLA_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def _official_tensors(cfg):
    """[(official key, torch shape)] of the DiT, from the converter's own key table, in its order."""
    from convert import common, wan_dit

    table, expected = wan_dit.key_table(cfg, diffusers=False)
    out = []
    for path, shape in expected.items():
        key, fn = table[path]
        if fn is common.linear:
            shape = tuple(reversed(shape))
        elif fn is common.patch_dense:  # Conv3d [D, C, pt, ph, pw] with kernel = stride
            pt, ph, pw = cfg.patch_size
            shape = (shape[1], shape[0] // (pt * ph * pw), pt, ph, pw)
        out.append((key, tuple(shape)))
    return out


def _check_against_diffusers(cfg, tensors):
    """The tensors are diffusers' WanVACETransformer3DModel of this size, built on the meta device (shapes only)."""
    import collections

    import torch
    from diffusers import WanVACETransformer3DModel

    with torch.device("meta"):
        model = WanVACETransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=cfg.eps, vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_dim)
    theirs = collections.Counter(tuple(t.shape) for t in model.state_dict().values())
    ours = collections.Counter(shape for _, shape in tensors)
    assert ours == theirs, (ours - theirs, theirs - ours)


def _std(key, shape):
    if key.endswith("modulation"):
        return shape[-1] ** -0.5
    if len(shape) >= 2:  # Linear / Conv3d: unit-variance outputs
        return math.prod(shape[1:]) ** -0.5
    return 0.0 if key.endswith("bias") else None  # norm weights: 1


def write_official_release(dst: pathlib.Path, cfg, seed: int) -> int:
    """Writes the random release folder; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    tensors = _official_tensors(cfg)
    _check_against_diffusers(cfg, tensors)
    shards, size = [[]], 0
    for key, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    dst.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        out = {}
        for key, shape in shard:
            std = _std(key, shape)
            t = torch.ones(shape) if std is None else torch.randn(shape, generator=gen) * std
            out[key] = t.to(torch.bfloat16)
            weight_map[key] = name
            total += 2 * math.prod(shape)
        save_file(out, str(dst / name), metadata={"format": "pt"})
        del out
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (dst / "config.json").write_text(json.dumps({  # the official Wan2.1-VACE-1.3B config.json fields
        "_class_name": "VaceWanModel", "_diffusers_version": "0.30.0", "model_type": "vace",
        "patch_size": list(cfg.patch_size), "text_len": cfg.text_len, "in_dim": cfg.in_dim, "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim, "out_dim": cfg.out_dim,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "window_size": [-1, -1], "qk_norm": True,
        "cross_attn_norm": True, "eps": cfg.eps, "vace_layers": list(cfg.vace_layers),
        "vace_in_dim": cfg.vace_in_dim}, indent=2))
    return total


def write_pickstyle_pth(path: pathlib.Path, cfg, seed: int):
    """PickStyle's LoRA file: rank 128 on q, k, v of every VACE block's self-attention, DDP `module.` prefix."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for j in range(len(cfg.vace_layers)):
        for proj in "qkv":
            stem = f"module.vace_blocks.{j}.self_attn.{proj}"
            sd[f"{stem}.lora_A.default.weight"] = torch.randn(RANK, cfg.dim, generator=gen) * cfg.dim ** -0.5
            sd[f"{stem}.lora_B.default.weight"] = torch.randn(cfg.dim, RANK, generator=gen) * 0.02 * RANK ** -0.5
    torch.save(sd, path)


def write_stand_ins(root: pathlib.Path, seed: int) -> dict:
    from pickstyle_jax import checkpoints
    from pickstyle_jax.models import umt5, vae
    from tests import tiny_models

    vcfg = vae.VaeConfig.named("tiny")
    checkpoints.save(root / "vae", vcfg, tiny_models.vae_params(vcfg, np.random.default_rng(seed)), kind="vae")
    tcfg = umt5.Umt5Config(vocab_size=512, d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=4,
                           param_dtype="float32", dtype="float32")
    checkpoints.save(root / "umt5", tcfg, jax.jit(lambda k: umt5.init(tcfg, k))(jax.random.key(seed)), kind="umt5")
    return {"vae": str(root / "vae"), "umt5": str(root / "umt5")}


def _timed(name, argv, log):
    """Runs one CLI under /usr/bin/time -v; returns (wall s, peak RSS GiB) and records them in `log`."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()})
    wall = time.perf_counter() - t0
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 2**20
    log[name] = (wall, rss)
    print(f"{name}: {wall:.0f} s, peak {rss:.1f} GiB\n  {' '.join(argv)}\n  {r.stdout.strip()[-600:]}", flush=True)
    return r


def test_vace_1_3b_release_through_the_clis(tmp_path):
    from pickstyle_jax import checkpoints, video
    from pickstyle_jax.models import wan

    t_all = time.perf_counter()
    cfg = wan.WanConfig.named("vace-1.3B")
    assert (cfg.dim, cfg.num_layers, len(cfg.vace_layers)) == (1536, 30, 15)
    log = {}
    t0 = time.perf_counter()
    size = write_official_release(tmp_path / "Wan2.1-VACE-1.3B", cfg, seed=0)
    write_pickstyle_pth(tmp_path / "pickstyle_lora.pth", cfg, seed=0)
    models = write_stand_ins(tmp_path / "stand_ins", seed=0)
    log["build"] = (time.perf_counter() - t0, float("nan"))
    print(f"built the release folder ({size / 1e9:.2f} GB, "
          f"{len(list((tmp_path / 'Wan2.1-VACE-1.3B').glob('*.safetensors')))} shards) in {log['build'][0]:.0f} s")

    dit, lora = tmp_path / "ckpt" / "dit", tmp_path / "ckpt" / "lora"
    _timed("convert.wan_dit", ["convert.wan_dit", "--src", str(tmp_path / "Wan2.1-VACE-1.3B"), "--dst", str(dit)],
           log)
    meta = checkpoints.read_meta(dit)
    assert "scan_layers" not in meta["config"] and meta["config"]["param_dtype"] == "bfloat16"
    assert meta["config"]["dim"] == 1536 and meta["source_layout"] == "official"
    _timed("convert.lora", ["convert.lora", "--src", str(tmp_path / "pickstyle_lora.pth"), "--dst", str(lora),
                           "--config", "vace-1.3B"], log)
    assert checkpoints.read_meta(lora)["config"]["rank"] == RANK

    work = tmp_path / "run"
    _timed("pickstyle_jax.train", [
        "pickstyle_jax.train", "--config=configs/vace_1_3b.py", f"--workdir={work}", f"--config.model.dit={dit}",
        f"--config.model.vae={models['vae']}", f"--config.model.umt5={models['umt5']}",
        "--config.model.tokenizer=bytes", "--config.model.attention=xla", "--config.mesh.fsdp=1",
        "--config.data.batch_size=1", "--config.data.frames=5", "--config.data.height=64",
        "--config.data.width=112", "--config.data.shift_range=(13,27)", "--config.data.synthetic_examples=2",
        "--config.data.prefetch=0", "--config.total_steps=2", "--config.log_every=1",
        "--config.checkpoint_every=2"], log)
    losses = [json.loads(ln)["loss"] for ln in (work / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    assert checkpoints.read_meta(work / "lora")["config"]["rank"] == RANK

    y, x = np.mgrid[0:64, 0:112]
    clip = np.asarray([np.stack([(60 * c + 2 * x + 3 * y + 11 * t) % 256 for c in range(3)], -1)
                       for t in range(5)]).astype(np.uint8)
    src = video.write(tmp_path / "clip.mp4", clip, fps=16)
    out = tmp_path / "styled.mp4"
    _timed("pickstyle_jax.stylize", [
        "pickstyle_jax.stylize", "--video", str(src), "--prompt", "Anime style. A colourful gradient.",
        "--dit", str(dit), "--vae", models["vae"], "--umt5", models["umt5"], "--tokenizer", "bytes",
        "--lora", str(lora), "--out", str(out), "--size", "64x112", "--max-frames", "5", "--steps", "3",
        "--skip", "1"], log)
    frames, _ = video.read(out)
    assert frames.shape == (5, 64, 112, 3), frames.shape
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["frames_out"] == 5

    total = time.perf_counter() - t_all
    print(f"\ntest-slow: {total / 60:.1f} min in all; " + "; ".join(
        f"{k} {w:.0f} s" + ("" if np.isnan(m) else f" / {m:.1f} GiB") for k, (w, m) in log.items()))
