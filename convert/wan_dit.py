"""Wan2.1 DiT (T2V or VACE) PyTorch checkpoint -> pickstyle_jax checkpoint.

    python -m convert.wan_dit --src SRC --dst DST [--dtype float32|bfloat16] [--compute-dtype ...] [--config NAME]

SRC is a diffusers transformer folder (`config.json` + safetensors, possibly sharded), an official Wan folder
(official key names, e.g. `Wan-AI/Wan2.1-VACE-14B` with its index json), or one `.safetensors`/`.pth` file (official,
diffusers or ComfyUI `model.diffusion_model.` names). Without a `config.json`, `--config` names the variant; if it is
absent too, the variant is inferred from the tensor shapes and printed.

--dtype is the dtype the parameters are stored in (default: the source's: bfloat16 if every stored tensor is bf16,
else float32); the compute dtype written to config.json follows it unless --compute-dtype names another. Errors
(a corrupt, truncated or wrong-kind file, a missing shard, a key mismatch) end in one `error: ...` line naming the
file, and nothing is written at DST.

Our parameter paths are the official key names (see models/wan.py), so the official table is a naming rule checked
against the model's own parameter tree; the diffusers names are one explicit module table,
`pickstyle_jax.lora_export.DIFFUSERS_TOP`/`DIFFUSERS_BLOCK` (re-exported here).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import numpy as np

from convert import common
from pickstyle_jax import checkpoints
# The official -> diffusers module table lives in the package (one copy; convert/lora.py uses it too); these
# names stay importable from here.
from pickstyle_jax.lora_export import (DIFFUSERS_BLOCK, DIFFUSERS_TOP, diffusers_to_official_module,  # noqa: F401
                                       official_to_diffusers_module)
from pickstyle_jax.models import wan

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


def _official_key(path: str) -> tuple[str, common.Transform]:
    """Our dotted parameter path -> (official torch key, transform to our layout)."""
    module, leaf = path.rsplit(".", 1)
    if leaf == "modulation":  # blocks.i.modulation / head.modulation: a raw [1, k, D] tensor
        return path, common.identity
    if leaf == "kernel":
        fn = common.patch_dense if module.endswith("patch_embedding") else common.linear
        return f"{module}.weight", fn
    if leaf == "scale":
        return f"{module}.weight", common.identity
    if leaf == "bias":
        return path, common.identity
    raise KeyError(f"no conversion rule for parameter {path}")


def key_table(cfg: wan.WanConfig, *, diffusers: bool) -> tuple[dict, dict]:
    """(table: our path -> (source key, transform), expected: our path -> shape) for this config."""
    shapes = jax.eval_shape(lambda: wan.init(cfg, jax.random.key(0)))
    expected = common.flatten_shapes(shapes)
    table = {}
    for path in expected:
        key, fn = _official_key(path)
        if diffusers:
            if key.endswith("modulation"):
                module, leaf = key, None
            else:
                module, leaf = key.rsplit(".", 1)
            dmod = official_to_diffusers_module(module)
            key = dmod if leaf is None else f"{dmod}.{leaf}"
        table[path] = (key, fn)
    return table, expected


# ------------------------------------------------------------------------------------------ configs
_ARCHITECTURE = ("patch_size", "in_dim", "out_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "text_len",
                 "num_heads", "num_layers", "eps", "vace_layers", "vace_in_dim")
RELEASED = ("vace-14B", "vace-1.3B", "t2v-14B", "t2v-1.3B")


def _as_variant(cfg: wan.WanConfig) -> wan.WanConfig:
    """The released variant with cfg's architecture (its param_dtype kept); cfg itself when no release has that
    architecture."""
    arch = lambda c: tuple(getattr(c, f) for f in _ARCHITECTURE)  # noqa: E731
    named = (wan.WanConfig.named(v, param_dtype=cfg.param_dtype) for v in RELEASED)
    return next((v for v in named if arch(v) == arch(cfg)), cfg)


def _config_from_official(c: dict, base: wan.WanConfig) -> wan.WanConfig:
    n_layers = c["num_layers"]
    vace = c.get("model_type") == "vace" or "vace_layers" in c or "vace_in_dim" in c
    fields = dict(dim=c["dim"], ffn_dim=c["ffn_dim"], num_heads=c["num_heads"], num_layers=n_layers,
                  in_dim=c.get("in_dim", 16), out_dim=c.get("out_dim", 16), text_dim=c.get("text_dim", 4096),
                  freq_dim=c.get("freq_dim", 256), text_len=c.get("text_len", 512), eps=c.get("eps", 1e-6),
                  patch_size=tuple(c.get("patch_size", (1, 2, 2))))
    if c.get("model_type", "t2v") not in ("t2v", "vace"):
        raise common.ConversionError(f"model_type {c['model_type']!r} is not supported (t2v and vace are)")
    if vace:
        fields.update(vace_layers=tuple(c.get("vace_layers", range(0, n_layers, 2))),
                      vace_in_dim=c.get("vace_in_dim", 96))
    else:
        fields.update(vace_layers=())
    return _as_variant(dataclasses.replace(base, **fields))


def _config_from_diffusers(c: dict, base: wan.WanConfig) -> wan.WanConfig:
    for key, want in (("image_dim", None), ("added_kv_proj_dim", None)):
        if c.get(key) != want:
            raise common.ConversionError(f"diffusers config has {key}={c.get(key)!r}: image-conditioned (I2V/FLF2V) "
                                         f"Wan models are not supported")
    if c.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads" or not c.get("cross_attn_norm", True):
        raise common.ConversionError("diffusers config: expected qk_norm='rms_norm_across_heads' and "
                                     "cross_attn_norm=True (every Wan2.1 release)")
    fields = dict(dim=c["num_attention_heads"] * c["attention_head_dim"], num_heads=c["num_attention_heads"],
                  ffn_dim=c["ffn_dim"], num_layers=c["num_layers"], in_dim=c["in_channels"],
                  out_dim=c["out_channels"], text_dim=c["text_dim"], freq_dim=c["freq_dim"],
                  eps=c.get("eps", 1e-6), patch_size=tuple(c.get("patch_size", (1, 2, 2))))
    if "vace_layers" in c:
        fields.update(vace_layers=tuple(c["vace_layers"]), vace_in_dim=c.get("vace_in_channels", 96))
    else:
        fields.update(vace_layers=())
    return _as_variant(dataclasses.replace(base, **fields))


def _config_from_shapes(sd, base: wan.WanConfig) -> wan.WanConfig:
    """Infers the architecture of an official-named state dict (used when no config.json or --config is given)."""
    dim, in_dim = sd.shape("patch_embedding.weight")[:2]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    vace = {int(m.group(1)) for k in sd if (m := re.match(r"vace_blocks\.(\d+)\.", k))}
    n = max(layers) + 1
    if dim % 128:  # every Wan2.1 release uses 128-wide heads; the q/k norms span all heads, so weights can't tell
        raise common.ConversionError(f"width {dim} is not a multiple of Wan's head dim 128: cannot infer num_heads; "
                                     f"pass --config or put a config.json beside the weights")
    fields = dict(dim=dim, in_dim=in_dim, num_heads=dim // 128, num_layers=n,
                  ffn_dim=sd.shape("blocks.0.ffn.0.weight")[0], text_dim=sd.shape("text_embedding.0.weight")[1],
                  freq_dim=sd.shape("time_embedding.0.weight")[1], out_dim=sd.shape("head.head.weight")[0] // 4)
    if vace:
        j = max(vace) + 1
        if n % j:
            raise common.ConversionError(f"{j} VACE blocks over {n} layers: cannot infer vace_layers; pass --config")
        fields.update(vace_layers=tuple(range(0, n, n // j)),
                      vace_in_dim=sd.shape("vace_patch_embedding.weight")[1])
    else:
        fields.update(vace_layers=())
    return _as_variant(dataclasses.replace(base, **fields))


def _detect(sd) -> str:
    if any(k.startswith("condition_embedder.") for k in sd):
        return "diffusers"
    if any(k.startswith("time_embedding.") for k in sd):
        return "official"
    raise common.ConversionError(f"{sd.describe}: neither official Wan nor diffusers key names "
                                 f"(first keys: {sorted(sd)[:5]})")


def read_source(src, config: str | None = None):
    """(cfg, state dict with prefixes removed, "official" | "diffusers") for a source path."""
    src = Path(src)
    sd = common.open_state_dict(src, prefer=("diffusion_pytorch_model.safetensors",))
    sd = common.strip_prefix(sd, COMFY_PREFIXES)
    layout = _detect(sd)
    base = wan.WanConfig.named(config) if config else wan.WanConfig()  # architecture fields come from the source
    cfg_file = (src if src.is_dir() else src.parent) / "config.json"
    if config:
        cfg = base
    elif cfg_file.is_file():
        c = common.read_json(cfg_file)
        cfg = _config_from_diffusers(c, base) if "num_attention_heads" in c else _config_from_official(c, base)
    elif layout == "official":
        cfg = _config_from_shapes(sd, base)
    else:
        raise common.ConversionError(f"{src}: diffusers weights without a config.json; pass --config NAME")
    return cfg, sd, layout


def convert(src, dst, *, dtype=None, compute_dtype=None, config: str | None = None, verbose: bool = True):
    """Converts `src` and writes the checkpoint `dst`; returns (cfg, params).

    dtype: stored parameter dtype (None: the source's, see `common.resolve_dtypes`). compute_dtype: refused; the
    DiT's compute dtype is a run-time option (`wan.Options.dtype`), never saved with the weights.
    """
    if compute_dtype is not None:
        raise common.ConversionError("--compute-dtype: a DiT checkpoint saves no compute dtype; it is a run-time "
                                     "option (wan.Options(dtype=...), config.model.dtype for training)")
    cfg, sd, layout = read_source(src, config)
    table, expected = key_table(cfg, diffusers=layout == "diffusers")
    params = common.convert_strict(sd, table, expected, dtype=common.parse_dtype(dtype))
    params, stored, _ = common.resolve_dtypes(params, dtype)
    cfg = dataclasses.replace(cfg, param_dtype=stored)
    checkpoints.save(dst, cfg, params, kind="wan", extra={"source": str(src), "source_layout": layout})
    if verbose:
        n = sum(int(np.prod(s)) for s in expected.values())
        print(f"converted {layout} checkpoint {src} -> {dst}: {len(table)} tensors, {n / 1e6:.2f} M parameters, "
              f"config {cfg}")
    return cfg, params


def main(argv=None):
    return common.converter_main(
        argv, prog="python -m convert.wan_dit", doc=__doc__, convert=convert,
        src_help="diffusers folder, official Wan folder, or one .safetensors/.pth file",
        config_help="variant name, e.g. vace-14B (overrides config.json)")


if __name__ == "__main__":
    main()
