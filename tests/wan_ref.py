"""Tiny diffusers Wan reference models for parity tests (torch is test-only).

`make_diffusers_vace(cfg, seed)` / `make_diffusers_t2v(cfg, seed)` build a diffusers transformer matching a
`wan.WanConfig`, with every tensor randomised (zero-init layers hide bugs) and the timestep sinusoid evaluated in
float64 like the official Wan code (diffusers evaluates it in fp32, ~3e-5 off near t = 1000; docs/REFERENCE.md §1).
`diffusers_forward` runs it on channels-last numpy inputs, padding the text to text_len like the pipelines do.
`flax_params_from_diffusers` maps the diffusers weights to our tree with convert/wan_dit.py's strict key table (no
second copy of the names here).
"""
from __future__ import annotations

import jax
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


def flax_params_from_diffusers(model, cfg=None):
    """diffusers model -> our nested params (kernel [in,out], scale, patch kernel [4C, D]), through the converter's
    own key table (convert/wan_dit.py), so the tests exercise the one mapping the project ships.

    cfg: the matching `wan.WanConfig` (only its architecture matters); default: read from the model's config.
    A PEFT-injected model contributes its base weights only.
    """
    from convert import common, wan_dit
    from pickstyle_jax.models import wan

    if cfg is None:
        cfg = wan_dit._config_from_diffusers(dict(model.config), wan.WanConfig.named("tiny"))
    sd = {name.replace(".base_layer.", "."): tensor.detach().float().numpy()
          for name, tensor in model.state_dict().items() if ".lora_" not in name}
    table, expected = wan_dit.key_table(cfg, diffusers=True)
    params = common.convert_strict(sd, table, expected)
    return jax.tree.map(jnp.asarray, params)


def errors(ours, ref):
    """(max abs, relative L2) of ours against the reference, in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max(), np.linalg.norm(ours - ref) / np.linalg.norm(ref)
