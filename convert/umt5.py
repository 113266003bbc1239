"""umT5 encoder weights -> a pickstyle_jax checkpoint.

  python -m convert.umt5 --src models_t5_umt5-xxl-enc-bf16.pth --dst DST [--dtype float32|bfloat16]
                         [--compute-dtype float32|bfloat16] [--config NAME]
  python -m convert.umt5 --src a_transformers_UMT5EncoderModel_folder --dst DST

Sources:
  * the official Wan file `models_t5_umt5-xxl-enc-bf16.pth` (Wan key names; also a Wan folder holding it). The
    config comes from --config, else from the tensor shapes (max distance 128 and eps 1e-6, the Wan umT5 values).
  * a transformers `UMT5EncoderModel` folder (`config.json` + safetensors/bin weights). The config comes from
    config.json unless --config is given. `shared.weight` and `encoder.embed_tokens.weight` are the same tied tensor:
    either is accepted; when both are present they must be equal.
Every other key must be consumed; anything missing, unexpected or mis-shaped is one error naming all of it.
--dtype is the dtype the parameters are stored in (default: the source's: bfloat16 if every stored tensor is bf16,
else float32); the compute dtype written to config.json follows it unless --compute-dtype names another. Errors
(corrupt, truncated or wrong-kind files, a missing shard, key mismatches) end in one `error: ...` line naming the
file; nothing is written at DST. The content hash of the converted params is written to config.json
(`params_sha256`) so text-embedding caches can key on it (`pickstyle_jax.text.checkpoint_identity`).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from convert import common
from convert.common import (ConversionError, convert_strict, flatten_shapes, identity, linear, open_state_dict,
                            parse_dtype)
from pickstyle_jax import checkpoints
from pickstyle_jax.models import umt5

OFFICIAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"

# ours (dotted) <- official Wan key, transform. `{i}` is the layer index.
_OURS_FROM_OFFICIAL_LAYER = [
    ("norm1.scale", "norm1.weight", identity),
    ("attn.q.kernel", "attn.q.weight", linear),
    ("attn.k.kernel", "attn.k.weight", linear),
    ("attn.v.kernel", "attn.v.weight", linear),
    ("attn.o.kernel", "attn.o.weight", linear),
    ("pos_embedding.embedding.embedding", "pos_embedding.embedding.weight", identity),
    ("norm2.scale", "norm2.weight", identity),
    ("ffn.gate.0.kernel", "ffn.gate.0.weight", linear),
    ("ffn.fc1.kernel", "ffn.fc1.weight", linear),
    ("ffn.fc2.kernel", "ffn.fc2.weight", linear),
]
_OURS_FROM_OFFICIAL_GLOBAL = [
    ("token_embedding.embedding", "token_embedding.weight", identity),
    ("norm.scale", "norm.weight", identity),
]

# official Wan key -> transformers UMT5EncoderModel key (docs/REFERENCE.md §5). The only copy of this mapping.
_TRANSFORMERS_LAYER = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",     # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TRANSFORMERS_GLOBAL = {
    "token_embedding.weight": "shared.weight",  # tied with encoder.embed_tokens.weight
    "norm.weight": "encoder.final_layer_norm.weight",
}
_TIED_ALIAS = "encoder.embed_tokens.weight"


def transformers_keys(num_layers: int) -> dict[str, str]:
    """official Wan key -> transformers key, for every weight of an encoder with `num_layers` layers."""
    out = dict(_TRANSFORMERS_GLOBAL)
    for i in range(num_layers):
        out.update({f"blocks.{i}.{o}": f"encoder.block.{i}.{t}" for o, t in _TRANSFORMERS_LAYER.items()})
    return out


def table(cfg: umt5.Umt5Config, source_format: str = "official", *, embedding_key: str | None = None) -> dict:
    """our dotted path -> (source key, transform), for `source_format` in {"official", "transformers"}."""
    rows = [(ours, off, fn) for ours, off, fn in _OURS_FROM_OFFICIAL_GLOBAL]
    for i in range(cfg.num_layers):
        rows += [(f"blocks.{i}.{ours}", f"blocks.{i}.{off}", fn) for ours, off, fn in _OURS_FROM_OFFICIAL_LAYER]
    if source_format == "official":
        return {ours: (off, fn) for ours, off, fn in rows}
    if source_format != "transformers":
        raise ValueError(f"unknown source format {source_format!r}")
    names = transformers_keys(cfg.num_layers)
    if embedding_key is not None:
        names["token_embedding.weight"] = embedding_key
    return {ours: (names[off], fn) for ours, off, fn in rows}


def expected_shapes(cfg: umt5.Umt5Config) -> dict[str, tuple]:
    return flatten_shapes(jax.eval_shape(lambda: umt5.init(cfg, jax.random.key(0))))


def detect_format(sd) -> str:
    keys = list(sd)
    if any(k.startswith(("encoder.", "shared.")) for k in keys):
        return "transformers"
    if any(k.startswith(("blocks.", "token_embedding.")) for k in keys):
        return "official"
    raise ConversionError(f"{getattr(sd, 'describe', 'source')}: neither Wan umT5 keys (blocks.*, token_embedding.*) "
                          f"nor transformers UMT5 keys (encoder.*, shared.*); first keys: {keys[:8]}")


def _shape(sd, k):
    return tuple(sd.shape(k)) if hasattr(sd, "shape") else tuple(sd[k].shape)


def config_from_transformers(hf: dict) -> umt5.Umt5Config:
    """Umt5Config from a transformers config.json dict (dtype fields left at float32; the converter sets them)."""
    if hf.get("model_type") not in (None, "umt5"):
        raise ConversionError(f"config.json has model_type {hf.get('model_type')!r}; this converter reads umT5 "
                              f"(per-layer relative position tables)")
    act = hf.get("feed_forward_proj", "gated-gelu")
    if act != "gated-gelu":
        raise ConversionError(f"config.json has feed_forward_proj {act!r}; umT5 uses 'gated-gelu'")
    return umt5.Umt5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        num_layers=hf["num_layers"], num_heads=hf["num_heads"],
        num_buckets=hf.get("relative_attention_num_buckets", 32),
        max_distance=hf.get("relative_attention_max_distance", 128),
        eps=float(hf.get("layer_norm_epsilon", 1e-6)), param_dtype="float32", dtype="float32")


def config_from_shapes(sd, source_format: str) -> umt5.Umt5Config:
    """Shape fields from the tensors; max distance 128 and eps 1e-6 (not stored in the weights)."""
    key = (lambda off: off) if source_format == "official" else (lambda off: transformers_keys(1)[off])
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"(?:encoder\.block|blocks)\.(\d+)\.", k)] if m}
    try:
        emb = "shared.weight" if source_format == "transformers" and "shared.weight" in sd else (
            _TIED_ALIAS if source_format == "transformers" else "token_embedding.weight")
        V, D = _shape(sd, emb)
        N, H = _shape(sd, key("blocks.0.pos_embedding.embedding.weight"))
        inner = _shape(sd, key("blocks.0.attn.q.weight"))[0]
        F = _shape(sd, key("blocks.0.ffn.fc1.weight"))[0]
    except KeyError as e:
        raise ConversionError(f"cannot infer the umT5 config from {getattr(sd, 'describe', 'source')}: no {e}; "
                              f"pass --config") from None
    return umt5.Umt5Config(vocab_size=V, d_model=D, d_kv=inner // H, d_ff=F,
                           num_layers=max(layers) + 1 if layers else 0, num_heads=H, num_buckets=N,
                           param_dtype="float32", dtype="float32")


def _dtype_name(dt) -> str:
    return "bfloat16" if dt == ml_dtypes.bfloat16 else np.dtype(dt).name


def convert_state_dict(sd, cfg: umt5.Umt5Config | None = None, *, dtype=None,
                       compute_dtype=None) -> tuple[umt5.Umt5Config, dict]:
    """(config, params) from a state dict (official or transformers names). `cfg` None: inferred from shapes.

    dtype: stored parameter dtype (None: the source's, see `common.resolve_dtypes`), the returned config's
    param_dtype; compute_dtype: its `dtype` (None: the stored dtype).
    """
    fmt = detect_format(sd)
    if cfg is None:
        cfg = config_from_shapes(sd, fmt)
    ignore = lambda k: False  # noqa: E731
    embedding_key = None
    if fmt == "transformers":
        have = [k for k in ("shared.weight", _TIED_ALIAS) if k in sd]
        embedding_key = have[0] if have else "shared.weight"
        if len(have) == 2:
            if _shape(sd, have[0]) != _shape(sd, have[1]) or not np.array_equal(
                    np.asarray(sd[have[0]], np.float32), np.asarray(sd[have[1]], np.float32)):
                raise ConversionError(f"{getattr(sd, 'describe', 'source')}: shared.weight and {_TIED_ALIAS} are tied "
                                      f"in UMT5 but differ here")
            ignore = lambda k: k == _TIED_ALIAS  # noqa: E731  (checked equal above)
    params = convert_strict(sd, table(cfg, fmt, embedding_key=embedding_key), expected_shapes(cfg),
                            dtype=parse_dtype(dtype), ignore=ignore)
    params, stored, compute = common.resolve_dtypes(params, dtype, compute_dtype)
    return cfg.replace(param_dtype=stored, dtype=compute), params


def params_sha256(params) -> str:
    """Content hash of a params tree: dotted path, dtype, shape and bytes of every leaf, in sorted path order."""
    h = hashlib.sha256()
    flat = {".".join(str(getattr(k, "key", k)) for k in kp): v
            for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in sorted(flat):
        x = np.ascontiguousarray(np.asarray(flat[name]))
        h.update(f"{name}|{_dtype_name(x.dtype)}|{x.shape}\0".encode())
        h.update(memoryview(x.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def _open(src: Path):
    """(state dict, transformers config dict or None)."""
    if src.is_dir():
        cfg_file = src / "config.json"
        hf = common.read_json(cfg_file) if cfg_file.is_file() else None
        is_t5_config = hf is not None and ("d_kv" in hf or hf.get("model_type") in ("umt5", "mt5", "t5"))
        if not is_t5_config and (src / OFFICIAL_FILE).is_file():  # a Wan folder (its config.json is the DiT's)
            return open_state_dict(src / OFFICIAL_FILE), None
        if hf is not None:
            return open_state_dict(src, prefer=("model.safetensors", "pytorch_model.bin")), hf
    return open_state_dict(src), None


def convert(src, dst, dtype=None, config: str | None = None, *, compute_dtype=None) -> Path:
    """Converts `src` (see the module docstring) and writes a checkpoint to `dst`; returns `dst`."""
    src = Path(src)
    sd, hf = _open(src)
    if config is not None:
        cfg = umt5.Umt5Config.named(config)
    elif hf is not None:
        cfg = config_from_transformers(hf)
    else:
        cfg = None
    cfg, params = convert_state_dict(sd, cfg, dtype=dtype, compute_dtype=compute_dtype)
    extra = {"source": str(src.absolute()), "params_sha256": params_sha256(params)}
    return checkpoints.save(dst, cfg, params, kind="umt5", extra=extra)


def main(argv=None):
    out = common.converter_main(
        argv, prog="python -m convert.umt5", doc=__doc__, convert=convert,
        src_help=f"{OFFICIAL_FILE} (Wan names) or a transformers UMT5 folder",
        config_choices=("umt5-xxl", "tiny"),
        config_help="named config (default: config.json of a transformers folder, else the tensor shapes)")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
