"""PickStyle's recipe on Wan2.1-VACE-1.3B: the same LoRA and objective on the small model, sized for 8 devices.

    python -m pickstyle_jax.train --config=configs/vace_1_3b.py --workdir=runs/vace13 --config.model.dit=...
    python -m pickstyle_jax.plan --config=configs/vace_1_3b.py --devices=8

81 x 480 x 832 clips, batch 8 (one sample per device), rank 128 on the 15 VACE blocks' self-attention q, k, v,
bf16 backbone, every block rematerialised. Mesh: data 2 x fsdp 4 (the 1536-wide weights split four ways, each
group of four devices holds one copy).
"""
import ml_collections

from pickstyle_jax.train import config as train_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "full"
    if variant not in ("full", "tiny"):
        raise ValueError(f"configs/vace_1_3b.py takes ':tiny' or nothing, got {arg!r}")
    c = train_config.default_config()
    c.model.update(dict(variant="vace-1.3B", param_dtype="bfloat16", dtype="bfloat16", attention="cudnn",
                        remat_policy="full", scan_layers=True))
    c.data.batch_size = 8
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=4, tensor=1, context=1))
    if variant == "tiny":
        c.model.update(dict(variant="tiny", vae_variant="tiny", umt5_variant="tiny", tokenizer="bytes",
                            param_dtype="float32", dtype="float32", attention="xla", remat_policy="full",
                            scan_layers=False))
        c.lora.update(dict(rank=4, alpha=4.0))
        c.data.update(dict(frames=5, height=32, width=48, batch_size=4, num_epochs=None, synthetic_examples=8,
                           shift_range=(7, 14), num_workers=0, prefetch=0))
        c.text.text_len = 128
        c.total_steps, c.log_every, c.checkpoint_every, c.keep = 4, 1, 2, 2
        c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
        c.rules.allow_replicate = True
    c.lock()
    return c
