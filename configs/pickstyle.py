"""PickStyle: context-style LoRA on Wan2.1-VACE-14B (PICKSTYLE.md §8), and a tiny variant that runs on a CPU.

    python -m pickstyle_jax.train --config=configs/pickstyle.py --workdir=runs/pickstyle
    python -m pickstyle_jax.train --config=configs/pickstyle.py:tiny --workdir=/tmp/tiny   # CPU smoke run

The values are the official ones: LoRA rank 128 / alpha 128 on the q, k, v of the VACE blocks' self-attention,
AdamW lr 5.6e-4 constant, weight decay 0.01, clip 1.0, batch 32, 57 epochs, 81 x 480 x 832 clips.
"""
import ml_collections

from pickstyle_jax.data import pipeline


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "full"
    if variant not in ("full", "tiny"):
        raise ValueError(f"configs/pickstyle.py takes ':tiny' or nothing, got {arg!r}")
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Models: converted checkpoints (python -m convert.*); empty paths build random weights of `variant`.
    c.model = ml_collections.ConfigDict(dict(
        variant="tiny" if tiny else "vace-14B", dit="", vae_variant="tiny" if tiny else "wan2.1", vae="",
        umt5_variant="tiny" if tiny else "umt5-xxl", umt5="", tokenizer="",
        param_dtype="float32" if tiny else "bfloat16", dtype="float32" if tiny else "bfloat16",
        attention="xla" if tiny else "cudnn", remat_policy="none" if tiny else "nothing_saveable"))
    c.lora = ml_collections.ConfigDict(dict(
        rank=4 if tiny else 128, alpha=4.0 if tiny else 128.0,
        targets=r"vace_blocks\.\d+\.self_attn\.(q|k|v)"))

    # Flow matching (§8.3): DiffSynth grid, shift 5, 1000 points, Gaussian-bump weights.
    c.schedule = ml_collections.ConfigDict(dict(shift=5.0, num_train_timesteps=1000))
    c.optim = ml_collections.ConfigDict(dict(
        lr=5.6e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0))

    c.data = pipeline.default_config()
    if tiny:
        c.data.update(dict(frames=5, height=32, width=48, batch_size=2, num_epochs=None, synthetic_examples=8,
                           shift_range=(7, 14),  # the official 100..200 px scaled from 832 to 48 px wide
                           num_workers=0, prefetch=0))
    c.total_steps = 4 if tiny else -1  # -1: all epochs (the official YAML lacks end_step; quirk #4)
    c.log_every = 1 if tiny else 10
    c.checkpoint_every = 2 if tiny else 10

    # Mesh and logical-axis rules (sharding.py): FSDP over "fsdp", heads/FFN over "tensor".
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.lock()
    return c
