"""Tiny diffusers Wan reference models for parity tests (torch is test-only).

`make_diffusers_vace(cfg, seed)` / `make_diffusers_t2v(cfg, seed)` build a diffusers transformer matching a
`wan.WanConfig`, with every tensor randomised (zero-init layers hide bugs) and the timestep sinusoid evaluated in
float64 like the official Wan code (diffusers evaluates it in fp32, ~3e-5 off near t = 1000; PICKSTYLE.md §2.3).
`diffusers_forward` runs it on channels-last numpy inputs, padding the text to text_len like the pipelines do.
`flax_params_from_diffusers` is a small test-only mapping (diffusers -> official names -> flax layout); the real,
strict converter lives in convert/.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import torch


class _Float64Sinusoid(torch.nn.Module):
    """Official `sinusoidal_embedding_1d`: [cos | sin] of t * 10000^(-i/half), in float64, cast to fp32."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        t = t.to(torch.float64)
        arg = torch.outer(t, torch.pow(10000, -torch.arange(half, dtype=torch.float64).div(half)))
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()


def _diffusers_kwargs(cfg):
    return dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=1024)


@torch.no_grad()
def randomize_(model, seed, std=0.1):
    """Every tensor ~ N(0, std^2); norm weights ~ 1 + N(0, std^2)."""
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
        is_norm_weight = name.endswith("weight") and "norm" in (name.split(".")[-2:-1] or [""])[0]
        p.copy_(noise + 1.0 if is_norm_weight else noise)
    return model


def _finish(model, seed, official_sinusoid):
    randomize_(model.float().eval(), seed)
    if official_sinusoid:
        model.condition_embedder.timesteps_proj = _Float64Sinusoid(model.config.freq_dim)
    return model


def make_diffusers_vace(cfg, seed, official_sinusoid=True):
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(**_diffusers_kwargs(cfg), vace_layers=list(cfg.vace_layers),
                                      vace_in_channels=cfg.vace_in_dim)
    return _finish(model, seed, official_sinusoid)


def make_diffusers_t2v(cfg, seed, official_sinusoid=True):
    from diffusers import WanTransformer3DModel

    return _finish(WanTransformer3DModel(**_diffusers_kwargs(cfg)), seed, official_sinusoid)


@torch.no_grad()
def diffusers_forward(model, x_BFHWC, t, text, ctx=None, context_scale=1.0, text_len=512):
    """Run a diffusers Wan (VACE) transformer on channels-last numpy inputs; returns channels-last numpy fp32."""
    to_torch = lambda a: torch.from_numpy(np.array(a, np.float32))
    text = np.asarray(text, np.float32)
    text = np.pad(text, ((0, 0), (0, text_len - text.shape[1]), (0, 0)))  # the pipelines pad to 512
    kwargs = dict(hidden_states=to_torch(x_BFHWC).permute(0, 4, 1, 2, 3), timestep=to_torch(t),
                  encoder_hidden_states=to_torch(text), return_dict=False)
    if ctx is not None:
        n_vace = len(model.config.vace_layers)
        kwargs["control_hidden_states"] = to_torch(ctx).permute(0, 4, 1, 2, 3)
        kwargs["control_hidden_states_scale"] = to_torch(np.broadcast_to(np.asarray(context_scale), (n_vace,)))
    out = model(**kwargs)[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


_RENAMES = [  # diffusers -> official (PICKSTYLE.md §6.2), applied to the full dotted module path
    (r"^condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"^condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"^condition_embedder\.time_proj", "time_projection.1"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out", "head.head"),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.ffn\.net\.0\.proj", ".ffn.0"),
    (r"\.ffn\.net\.2", ".ffn.2"),
    (r"\.norm2\.", ".norm3."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"_attn\.to_out\.0", "_attn.o"),
    (r"_attn\.to_(q|k|v)", r"_attn.\1"),
    (r"^vace_blocks\.0\.proj_in", "vace_blocks.0.before_proj"),
    (r"^(vace_blocks\.\d+)\.proj_out", r"\1.after_proj"),
]


def flax_params_from_diffusers(model):
    """diffusers state dict -> official names -> nested flax dict (kernel [in,out], scale, patch kernel [4C, D])."""
    params = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:  # a PEFT-injected model: base weights only
            continue
        name = name.replace(".base_layer.", ".")
        value = tensor.detach().float().numpy()
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        *module, leaf = name.split(".")
        if leaf == "weight" and value.ndim == 5:  # Conv3d patch embedding [D, C, pt, ph, pw] -> [(pt,ph,pw,c), D]
            leaf, value = "kernel", value.transpose(2, 3, 4, 1, 0).reshape(-1, value.shape[0])
        elif leaf == "weight" and value.ndim == 2:
            leaf, value = "kernel", value.T
        elif leaf == "weight":
            leaf = "scale"
        node = params
        for key in module:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value)
    return params


def errors(ours, ref):
    """(max abs, relative L2) of ours against the reference, in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max(), np.linalg.norm(ours - ref) / np.linalg.norm(ref)
