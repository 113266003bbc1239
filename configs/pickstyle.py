"""PickStyle: context-style LoRA on Wan2.1-VACE-14B (the paper's recipe), and a tiny variant that runs on a CPU.

    python -m pickstyle_jax.train --config=configs/pickstyle.py --workdir=runs/pickstyle \
        --config.model.dit=ckpt/vace14b --config.model.vae=ckpt/vae --config.model.umt5=ckpt/umt5 \
        --config.model.tokenizer=ckpt/spiece.model --config.data.source=folder_v1+folder_v2 --config.data.root=V1:V2
    python -m pickstyle_jax.train --config=configs/pickstyle.py:tiny --workdir=/tmp/tiny   # CPU smoke run
    python -m pickstyle_jax.plan --config=configs/pickstyle.py --devices=32              # memory plan
    python -m pickstyle_jax.plan --config=configs/pickstyle.py:node --devices=8          # one 8-GPU node

The values are the official ones: LoRA rank 128 / alpha 128 on the q, k, v of the VACE blocks' self-attention,
AdamW lr 5.6e-4 constant, betas (0.9, 0.999), eps 1e-8, weight decay 0.01, clip 1.0, batch 32 (1 per GPU on 32
GPUs), 57 epochs, 81 x 480 x 832 clips, bf16 backbone with fp32 LoRA, every block rematerialised.

Memory levers (run-time options; the math is unchanged, tests/test_scan.py): remat "nested" (each VACE super-block
of 5 main blocks and one VACE block rematerialised as a whole, inside it every block, inside that the self-attention
projections, self-attention, cross-attention and FFN each: the forward keeps 16 fp32 [32760, 5120] streams instead
of 48, for one more forward of every block in the backward) and ffn_chunk 4096 (the FFN over groups of at most 4096
tokens: the [32760, 13824] hidden activations never live at once). Planned per device (python -m
pickstyle_jax.plan; README "Before renting devices" has the table):
    32 devices (fsdp 32, batch 32)                         49.99 GiB  (remat "full", no FFN groups: 76.30 GiB)
    16 devices, --config.optim.accumulate=2 (2 x 16)       51.50 GiB  (2 samples per device, no accumulation:
                                                                      97.71 GiB)
    8 devices, :node (fsdp 8, 4 x 8 accumulated)           53.75 GiB

`:node` is the same recipe on one 8-device node: batch 32 as 4 accumulated micro-batches of 8 (one sample per
device, as on 32 devices; gradient accumulation equals the one-step batch, tests/test_train.py), FSDP over 8.

Sharding for 32 devices: pure FSDP over all of them (fsdp = -1 takes every device): each device holds 1/32 of the
bf16 weights (about 1.1 GB of 34.7 GB) and one sample, and gathers one block's weights at a time. Every sharded
dimension of the 14B model (5120, 13824, 4096, 30720) divides by 32, so the rules are strict.
"""
import ml_collections

from pickstyle_jax.train import config as train_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "full"
    if variant not in ("full", "node", "tiny"):
        raise ValueError(f"configs/pickstyle.py takes ':node', ':tiny' or nothing, got {arg!r}")
    c = train_config.default_config()
    c.model.update(dict(variant="vace-14B", vae_variant="wan2.1", umt5_variant="umt5-xxl",
                        param_dtype="bfloat16", dtype="bfloat16", attention="cudnn", remat_policy="nested",
                        ffn_chunk=4096, scan_layers=True))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, context=1))
    if variant == "node":
        c.optim.accumulate = 4  # 32 = 4 x (8 devices x 1 sample)
    if variant == "tiny":
        tiny(c)
    c.lock()
    return c


def tiny(c: ml_collections.ConfigDict) -> None:
    """Random tiny models, 5-frame 32 x 48 synthetic clips, batch 2: about a second a step on a laptop CPU."""
    c.model.update(dict(variant="tiny", vae_variant="tiny", umt5_variant="tiny", tokenizer="bytes",
                        param_dtype="float32", dtype="float32", attention="xla", remat_policy="none",
                        ffn_chunk=0, scan_layers=False))
    c.lora.update(dict(rank=4, alpha=4.0))
    c.data.update(dict(frames=5, height=32, width=48, batch_size=2, num_epochs=None, synthetic_examples=8,
                       shift_range=(7, 14),  # the official 100..200 px scaled from 832 to 48 px wide
                       num_workers=0, prefetch=0))
    c.text.text_len = 128
    c.total_steps, c.log_every, c.checkpoint_every, c.keep = 4, 1, 2, 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    c.rules.allow_replicate = True  # 48-wide layers do not split over every mesh
