"""Wan2.1 VAE PyTorch checkpoint -> pickstyle_jax checkpoint.

    python -m convert.wan_vae --src SRC --dst DST [--dtype float32|bfloat16] [--compute-dtype ...] [--config NAME]

SRC is the official `Wan2.1_VAE.pth` (official key names; the variant is `--config`, default wan2.1), or a diffusers
`AutoencoderKLWan` folder (`config.json` + `diffusion_pytorch_model.safetensors`; the variant comes from its
config.json unless `--config` is given), or a diffusers pipeline folder holding one in `vae/`.

Our parameter paths are the official key names (models/vae.py), so the official table is a naming rule checked
against the model's own parameter tree; the diffusers names (docs/REFERENCE.md §6) are `official_to_diffusers`, the
only copy of that mapping.

--dtype is the dtype the parameters are stored in (default: the source's: bfloat16 if every stored tensor is bf16,
else float32); the compute dtype written to config.json follows it unless --compute-dtype names another (the VAE's
norms and softmax run in fp32 either way). Errors end in one `error: ...` line naming the file; nothing is written at
DST.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import numpy as np

from convert import common
from pickstyle_jax import checkpoints
from pickstyle_jax.models import vae

# Inside a residual block, official submodule -> diffusers submodule.
DIFFUSERS_RES = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                 "shortcut": "conv_shortcut"}
# Middle block (encoder and decoder), official index -> diffusers module.
DIFFUSERS_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
# Top-level and per-coder modules that are renamed as a whole.
DIFFUSERS_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv",
                 "encoder.conv1": "encoder.conv_in", "encoder.head.0": "encoder.norm_out",
                 "encoder.head.2": "encoder.conv_out",
                 "decoder.conv1": "decoder.conv_in", "decoder.head.0": "decoder.norm_out",
                 "decoder.head.2": "decoder.conv_out"}
_LEAF = {"kernel": "weight", "scale": "gamma", "bias": "bias"}  # ours -> official


def official_to_diffusers(cfg: vae.VaeConfig, module: str) -> str:
    """Official module name -> diffusers module name (§6.3), e.g. `decoder.upsamples.7.time_conv` ->
    `decoder.up_blocks.1.upsamplers.0.time_conv`. Raises KeyError for names outside the table."""
    if module in DIFFUSERS_TOP:
        return DIFFUSERS_TOP[module]
    m = re.fullmatch(r"(encoder|decoder)\.middle\.(\d)(?:\.(.+))?", module)
    if m:
        coder, idx, rest = m.groups()
        head = f"{coder}.{DIFFUSERS_MIDDLE[idx]}"
        if rest is None:
            return head
        if idx == "1":  # attention: norm / to_qkv / proj keep their names
            if rest not in ("norm", "to_qkv", "proj"):
                raise KeyError(module)
            return f"{head}.{rest}"
        return f"{head}.{DIFFUSERS_RES[rest]}"
    m = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", module)
    if m:  # same flat index; resamplers keep `resample.1` / `time_conv`
        k, rest = m.groups()
        return f"encoder.down_blocks.{k}.{DIFFUSERS_RES.get(rest, rest)}"
    m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", module)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        layers = vae.decoder_layers(cfg)
        kind, _, _, stage = layers[k]
        if kind == "res":
            j = sum(1 for kd, _, _, st in layers[:k] if st == stage and kd == "res")
            return f"decoder.up_blocks.{stage}.resnets.{j}.{DIFFUSERS_RES[rest]}"
        return f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
    raise KeyError(module)


def _official_key(path: str, shape: tuple) -> tuple[str, common.Transform]:
    """Our dotted parameter path -> (official torch key, transform to our layout)."""
    module, leaf = path.rsplit(".", 1)
    if leaf == "kernel":
        return f"{module}.weight", {5: common.conv3d, 4: common.conv2d}[len(shape)]
    if leaf == "scale":
        return f"{module}.gamma", common.flatten
    if leaf == "bias":
        return path, common.identity
    raise KeyError(f"no conversion rule for parameter {path}")


def key_table(cfg: vae.VaeConfig, *, diffusers: bool) -> tuple[dict, dict]:
    """(table: our path -> (source key, transform), expected: our path -> shape) for this config."""
    expected = common.flatten_shapes(jax.eval_shape(lambda: vae.init(cfg, jax.random.key(0))))
    table = {}
    for path, shape in expected.items():
        key, fn = _official_key(path, shape)
        if diffusers:
            module, leaf = key.rsplit(".", 1)
            key = f"{official_to_diffusers(cfg, module)}.{leaf}"
        table[path] = (key, fn)
    return table, expected


# ------------------------------------------------------------------------------------------ configs
def config_from_diffusers(c: dict, base: vae.VaeConfig) -> vae.VaeConfig:
    """A VaeConfig from a diffusers `AutoencoderKLWan` config.json (absent fields take diffusers' defaults)."""
    for key, ok, why in (("is_residual", lambda v: not v, "Wan2.2 residual VAE"),
                         ("patch_size", lambda v: v in (None, 1), "patchified (Wan2.2) VAE"),
                         ("decoder_base_dim", lambda v: v in (None, c.get("base_dim", 96)), "decoder_base_dim"),
                         ("in_channels", lambda v: v == 3, "in_channels"), ("out_channels", lambda v: v == 3,
                                                                            "out_channels")):
        if key in c and not ok(c[key]):
            raise common.ConversionError(f"diffusers VAE config has {key}={c[key]!r} ({why}): only the Wan2.1 VAE "
                                         f"is supported")
    fields = {f.name: c[f.name] for f in dataclasses.fields(vae.VaeConfig) if f.name in c and f.name != "dtype"}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return dataclasses.replace(base, **fields)
    except (ValueError, NotImplementedError) as e:
        raise common.ConversionError(f"diffusers VAE config: {e}") from None


def _detect(sd) -> str:
    if "encoder.conv_in.weight" in sd:
        return "diffusers"
    if "encoder.conv1.weight" in sd:
        return "official"
    raise common.ConversionError(f"{sd.describe}: neither official Wan VAE nor diffusers AutoencoderKLWan key names "
                                 f"(first keys: {sorted(sd)[:5]})")


def read_source(src, config: str | None = None):
    """(cfg, state dict, "official" | "diffusers") for a source path."""
    src = Path(src)
    if src.is_dir() and not (src / "config.json").is_file() and (src / "vae" / "config.json").is_file():
        src = src / "vae"  # a diffusers pipeline folder
    sd = common.open_state_dict(src, prefer=("diffusion_pytorch_model.safetensors",))
    layout = _detect(sd)
    cfg_file = src / "config.json" if src.is_dir() else None
    if config:
        cfg = vae.VaeConfig.named(config)
    elif layout == "diffusers" and cfg_file is not None and cfg_file.is_file():
        cfg = config_from_diffusers(common.read_json(cfg_file), vae.VaeConfig.named("wan2.1"))
    else:
        cfg = vae.VaeConfig.named("wan2.1")
        width = sd.shape("encoder.conv1.weight" if layout == "official" else "encoder.conv_in.weight")[0]
        if width != cfg.base_dim:
            raise common.ConversionError(f"{src}: encoder.conv1 has {width} channels, the wan2.1 VAE has "
                                         f"{cfg.base_dim}: pass --config (one of wan2.1, tiny)")
    return cfg, sd, layout


def convert(src, dst, dtype=None, config: str | None = None, *, compute_dtype=None, verbose: bool = True):
    """Converts `src` and writes the checkpoint `dst`; returns (cfg, params).

    dtype: stored parameter dtype (None: the source's, see `common.resolve_dtypes`); compute_dtype: the config's
    `dtype` (None: the stored dtype).
    """
    cfg, sd, layout = read_source(src, config)
    table, expected = key_table(cfg, diffusers=layout == "diffusers")
    params = common.convert_strict(sd, table, expected, dtype=common.parse_dtype(dtype))
    params, _, compute = common.resolve_dtypes(params, dtype, compute_dtype)
    cfg = dataclasses.replace(cfg, dtype=compute)
    checkpoints.save(dst, cfg, params, kind="vae", extra={"source": str(src), "source_layout": layout})
    if verbose:
        n = sum(int(np.prod(s)) for s in expected.values())
        print(f"converted {layout} VAE {src} -> {dst}: {len(table)} tensors, {n / 1e6:.2f} M parameters, "
              f"config {cfg}")
    return cfg, params


def main(argv=None):
    return common.converter_main(
        argv, prog="python -m convert.wan_vae", doc=__doc__, convert=convert,
        src_help="Wan2.1_VAE.pth or a diffusers AutoencoderKLWan folder",
        config_choices=("wan2.1", "tiny"),
        config_help="variant (default: wan2.1 for .pth files, config.json for diffusers folders)")


if __name__ == "__main__":
    main()
