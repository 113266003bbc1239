"""`make demo`: the PyTorch -> JAX path end to end on a tiny random Wan2.1-VACE, with the parity it reaches.

    python -m convert.demo [--out demo_out]

1. builds a tiny diffusers `WanVACETransformer3DModel` with every tensor random and saves it as a diffusers folder;
2. converts it with `python -m convert.wan_dit` (the same code path as real weights) and loads it back;
3. runs our jitted forward and the diffusers forward on the same random latents, context and text, and prints the
   errors, for fp32 and for bf16 compute.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from convert import wan_dit
from pickstyle_jax import checkpoints
from pickstyle_jax.models import wan


def _diffusers_model(cfg: wan.WanConfig, seed: int):
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_dim).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everything: zero-initialised layers would hide conversion bugs
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(2)
    jax.config.update("jax_default_matmul_precision", "highest")

    cfg = wan.WanConfig.named("tiny").replace(dim=128, num_heads=2, ffn_dim=256, num_layers=6,
                                              vace_layers=(0, 2, 4), text_dim=64)
    model = _diffusers_model(cfg, args.seed)
    src = out / "diffusers_vace_tiny"
    model.save_pretrained(src)
    n = sum(p.numel() for p in model.parameters())
    print(f"[1/3] random diffusers WanVACETransformer3DModel ({n / 1e6:.2f} M parameters) saved to {src}")

    dst = out / "pickstyle_jax_dit"
    wan_dit.main(["--src", str(src), "--dst", str(dst)])
    lcfg, params = checkpoints.load_dit(dst)
    print(f"[2/3] converted and loaded back: {lcfg.num_layers} blocks, VACE layers {lcfg.vace_layers}")

    rng = np.random.default_rng(args.seed)
    b, f, h, w, n_text = 2, 3, 8, 12, 17
    x = rng.standard_normal((b, f, h, w, cfg.in_dim), dtype=np.float32)
    ctx = rng.standard_normal((b, f, h, w, cfg.vace_in_dim), dtype=np.float32)
    text = rng.standard_normal((b, n_text, cfg.text_dim), dtype=np.float32)
    t = np.array([500.0, 250.0], np.float32)

    with torch.no_grad():
        pad = np.pad(text, ((0, 0), (0, cfg.text_len - n_text), (0, 0)))
        t0 = time.perf_counter()
        ref = model(hidden_states=torch.from_numpy(x).permute(0, 4, 1, 2, 3), timestep=torch.from_numpy(t),
                    encoder_hidden_states=torch.from_numpy(pad),
                    control_hidden_states=torch.from_numpy(ctx).permute(0, 4, 1, 2, 3),
                    return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
        t_ref = time.perf_counter() - t0

    print(f"[3/3] forward on latents {x.shape[1:4]} x batch {b}, text {n_text} tokens (padded to {cfg.text_len}):")
    print(f"      diffusers fp32 forward: {t_ref * 1e3:.1f} ms")
    for dtype in ("float32", "bfloat16"):
        c = lcfg.replace(param_dtype=dtype, dtype=dtype)
        p = jax.tree.map(lambda a: a.astype(jnp.dtype(dtype)), params)
        fwd = jax.jit(lambda p, x, t, y, z: wan.forward(c, p, x, t, y, z))
        ours = np.asarray(fwd(p, x, t, text, ctx))
        t0 = time.perf_counter()
        ours = np.asarray(jax.block_until_ready(fwd(p, x, t, text, ctx)))
        dt = time.perf_counter() - t0
        err = np.abs(ours - ref).max()
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        print(f"      ours {dtype:8s}: max abs error {err:.2e}, relative L2 {rel:.2e}  ({dt * 1e3:.1f} ms jitted)")
    print("      (diffusers evaluates the timestep sinusoid in fp32; the official Wan code uses fp64, as we do, "
          "which accounts for part of the fp32 difference)")


if __name__ == "__main__":
    main()
