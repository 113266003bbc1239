"""Converted checkpoints: a directory holding Orbax params and a `config.json`.

Layout of a checkpoint directory `DIR`:
  DIR/config.json   {"kind": "wan" | "vae" | "umt5" | "lora", "format": 1, "config": {...dataclass fields...}, ...}
                    An autoencoder ("vae") checkpoint also names its config class, "codec": "module:Class"
                    (models/autoencoders.py); without it, the Wan2.1 VAE's `VaeConfig`.
  DIR/params/       Orbax (OCDBT) pytree of arrays, paths mirroring the official PyTorch key names.
A config holds the architecture only; run-time choices (a DiT's `wan.Options`: attention, chunks, remat, compute
dtype, scan) are never saved, and a DiT is always stored flat (`save` unstacks a stacked tree). config.json files
written before that split carry those run-time fields: they are ignored on load.

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place only when complete,
so an interrupted conversion never leaves a half-written checkpoint where a good one was.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from pickstyle_jax import files, lora
from pickstyle_jax.models import autoencoders, umt5, vae, wan

FORMAT = 1

AUTOENCODER = "vae"  # the kind of every autoencoder checkpoint; config.json's "codec" names which one

# kind -> config class
_KINDS = {
    "wan": wan.WanConfig,
    AUTOENCODER: vae.VaeConfig,  # the built-in autoencoder (no "codec")
    "umt5": umt5.Umt5Config,
    "lora": lora.LoraConfig,
}
# kind -> the options class whose fields older config.json files saved with the architecture; ignored on load
_LEGACY_RUNTIME = {"wan": wan.Options}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or of the wrong kind."""


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(kind: str, d: dict, codec: str | None = None):
    """Rebuilds a config dataclass; JSON lists become tuples, unknown fields are an error (run-time fields that
    older versions saved with the architecture are dropped). codec: an autoencoder's
    config class as "module:Class" (config.json's "codec"), imported here; None: the kind's built-in class."""
    if codec is not None and kind != AUTOENCODER:
        raise CheckpointError(f"a {kind!r} checkpoint names a codec ({codec!r}); only autoencoder checkpoints do")
    if codec is not None:
        try:
            cls = autoencoders.config_class(codec)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: {e}") from e
        name = cls.__name__
    else:
        cls = _KINDS[kind]
        name = cls.__name__
    fields = {f.name for f in dataclasses.fields(cls)}
    if kind in _LEGACY_RUNTIME:
        legacy = {f.name for f in dataclasses.fields(_LEGACY_RUNTIME[kind])}
        d = {k: v for k, v in d.items() if k in fields or k not in legacy}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise CheckpointError(f"config.json has fields {unknown} that {name} does not know; "
                              f"it was written by a different version of pickstyle_jax")

    def fix(v):
        return tuple(fix(x) for x in v) if isinstance(v, list) else v

    return cls(**{k: fix(v) for k, v in d.items()})


def _to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _tmp_token() -> str:
    """A random suffix every process agrees on (Orbax saves collectively into one directory)."""
    token = uuid.uuid4().int % (1 << 31)
    if jax.process_count() > 1:
        token = int(multihost_utils.broadcast_one_to_all(np.int32(token)))
    return f"{token:08x}"


def save(path, cfg, params, *, kind: str, extra: dict | None = None, overwrite: bool = True) -> Path:
    """Writes `params` and `cfg` to `path` atomically and returns the path.

    Multi-process: every process calls it (the Orbax write is collective); process 0 writes config.json and
    renames the finished directory into place, and the others return once it has."""
    if kind not in _KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {sorted(_KINDS)}")
    codec = {"codec": autoencoders.config_path(cfg)} if kind == AUTOENCODER else {}
    path = Path(path).absolute()
    if kind == "wan":  # one layout on disk: the flat tree with the official key names
        params = wan.unstack_layers(cfg, params) if wan.is_stacked(cfg, params) else params
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another --dst")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{_tmp_token()}"
    primary = jax.process_index() == 0
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", _to_numpy(params))
        ckptr.wait_until_finished()
        if primary:
            meta = {"kind": kind, "format": FORMAT, "config": config_to_dict(cfg), **codec, **(extra or {})}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            files.replace_dir(tmp, path)
    finally:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"pickstyle_jax checkpoint {path}")
    return path


def read_meta(path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        hint = ""
        if path.is_file() or any(path.glob("*.safetensors")) or any(path.glob("*.pth")):
            hint = " It looks like a PyTorch checkpoint: convert it first with `python -m convert.<model> --src ... --dst ...`."
        raise CheckpointError(f"{path} is not a pickstyle_jax checkpoint (no config.json).{hint}")
    try:
        meta = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read it as JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or not isinstance(meta.get("kind"), str):
        raise CheckpointError(f"{cfg_file}: not a pickstyle_jax checkpoint description (needs \"kind\", \"format\" "
                              f"and a \"config\" object)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: format {meta.get('format')!r}, this version reads format {FORMAT}")
    return meta


def _is_sharding(x):
    return isinstance(x, jax.sharding.Sharding)


def _leaf_sharding(sharding, path, sds, default):
    """The sharding of one leaf: `sharding` is None, one Sharding, a callable (path, sds) -> Sharding, or a tree
    of Shardings with the checkpoint's structure (what `sharding.tree_shardings` returns)."""
    if sharding is None:
        return default
    if _is_sharding(sharding):
        return sharding
    if callable(sharding):
        return sharding(path, sds)
    node = sharding
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise CheckpointError(f"the sharding tree has no entry for parameter {'.'.join(map(str, path))}")
        node = node[key]
    if not _is_sharding(node):
        raise CheckpointError(f"sharding for {'.'.join(map(str, path))} is {type(node).__name__}, not a Sharding")
    return node


def check_kind(path, meta: dict, kind: str | tuple[str, ...]) -> str:
    """meta["kind"] if it is `kind` (or one of them); else a CheckpointError naming what was found and expected."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if meta["kind"] not in kinds:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint, expected {' or '.join(map(repr, kinds))}")
    return meta["kind"]


def meta_config(path, meta: dict, kind: str | tuple[str, ...]):
    """The config that `path`'s config.json (read as `meta`) describes, whose kind must be `kind` (or one of them)."""
    return config_from_dict(check_kind(path, meta, kind), meta["config"], meta.get("codec"))


def read_config(path, kind: str | tuple[str, ...]):
    """The config in `path`'s config.json, whose kind must be `kind` (or one of them); no weight is read."""
    return meta_config(path, read_meta(path), kind)


def load(path, kind: str | tuple[str, ...], *, dtype=None, sharding: Callable[[tuple, Any], Any] | Any = None):
    """Returns (config, params) of a checkpoint of `kind` (or of one of a tuple of kinds).

    dtype: cast floating parameters to this dtype while reading; the config's param_dtype (and a compute dtype
      field, for the configs that still have one) follows.
    sharding: a `jax.sharding.Sharding` for every leaf, a function (path_tuple, ShapeDtypeStruct) -> Sharding, or
      a tree of Shardings shaped like the params (e.g. `sharding.tree_shardings(...)`); default: the first local
      device.
    """
    path = Path(path).absolute()
    cfg = meta_config(path, read_meta(path), kind)
    ckptr = ocp.StandardCheckpointer()
    try:
        tree_meta = ckptr.metadata(path / "params").item_metadata
    except (OSError, ValueError):
        tree_meta = None
    if tree_meta is None:  # Orbax gives no metadata for a missing, truncated or foreign params/ folder
        raise CheckpointError(f"{path / 'params'}: missing or unreadable parameters (an interrupted copy or "
                              f"conversion?); convert or copy the checkpoint again")
    tree_meta = tree_meta.tree
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(kp, m):
        dt = np.dtype(m.dtype)
        if dtype is not None and (np.issubdtype(dt, np.floating) or dt.name == "bfloat16"):
            dt = np.dtype(dtype)
        sds = jax.ShapeDtypeStruct(tuple(m.shape), dt)
        sh = _leaf_sharding(sharding, tuple(getattr(k, "key", k) for k in kp), sds, default)
        return jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sh)

    target = jax.tree_util.tree_map_with_path(abstract, tree_meta)
    params = ckptr.restore(path / "params", target)
    if dtype is not None:  # weights read in `dtype` (VAE, umT5: also compute in it unless the caller says otherwise)
        name = np.dtype(dtype).name
        cfg = dataclasses.replace(cfg, **{f: name for f in ("param_dtype", "dtype") if hasattr(cfg, f)})
    return cfg, params


def _unstacked_sharding(sh):
    """Sharding of one layer of a stacked leaf: the stacked spec without its leading (layers) entry."""
    if isinstance(sh, jax.sharding.NamedSharding):
        spec = tuple(sh.spec)[1:]
        return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*spec), memory_kind=sh.memory_kind)
    return sh


def load_dit(path, dtype=None, sharding=None, scan_layers: bool | None = False):
    """(WanConfig, params) of a converted Wan DiT (T2V or VACE), params in the layout asked for.

    Checkpoints hold the flat tree. scan_layers=True returns the stacked tree (`wan.stack_layers`), False the flat
    one, None the layout of `wan.Options.default()` on this backend. dtype: cast the floating weights while
    reading (the config's param_dtype follows). With scan_layers, `sharding` describes the stacked tree (a tree
    from `sharding.tree_shardings(wan.param_axes(cfg, stacked=True), ...)`, one Sharding, or a callable on stacked
    paths): each layer is read with that sharding minus its leading axis, then stacked one leaf at a time, freeing
    the layers as it goes.
    """
    if scan_layers is None:
        scan_layers = wan.Options.default().scan_layers
    if not scan_layers:
        return load(path, "wan", dtype=dtype, sharding=sharding)
    cfg = read_config(path, "wan")
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    stacked_sh = jax.tree_util.tree_map_with_path(
        lambda kp, sds: _leaf_sharding(sharding, tuple(getattr(k, "key", k) for k in kp), sds, default),
        wan.param_shapes(cfg, stacked=True))  # raises for irregular vace_layers
    # only the scanned blocks carry a leading layer axis (head, embeddings and vace_before_proj do not)
    flat_sh = wan.unstack_layers(cfg, {k: jax.tree.map(_unstacked_sharding, v, is_leaf=_is_sharding)
                                       if k in ("blocks", "vace_blocks") else v for k, v in stacked_sh.items()})
    cfg_read, flat = load(path, "wan", dtype=dtype, sharding=flat_sh)
    fns = {}

    def stack(leaves, sh):
        if sh not in fns:
            fns[sh] = jax.jit(lambda *xs: jax.numpy.stack(xs), out_shardings=sh)
        out = fns[sh](*leaves)
        for leaf in leaves:
            leaf.delete()
        return out

    is_list = lambda x: isinstance(x, list)
    lists, treedef = jax.tree.flatten(wan.stack_layers(cfg, flat, stack=list), is_leaf=is_list)
    leaves = [stack(ls, sh) if is_list(ls) else ls for ls, sh in zip(lists, treedef.flatten_up_to(stacked_sh))]
    return cfg_read, treedef.unflatten(leaves)


AUTOENCODER_KINDS = (AUTOENCODER,)  # for callers that check a kind tuple: one kind for every autoencoder


def load_vae(path, **kw):
    """(config, params) of an autoencoder: a converted Wan2.1 VAE (VaeConfig), or the one config.json's "codec"
    names (models/autoencoders.py)."""
    return load(path, AUTOENCODER, **kw)


def load_umt5(path, **kw):
    """(Umt5Config, params) of a converted umT5 encoder."""
    return load(path, "umt5", **kw)


def load_lora(path, **kw):
    """A `lora.Lora` (config + A/B arrays) from a converted or trained adapter checkpoint."""
    cfg, params = load(path, "lora", **kw)
    return lora.Lora(params=params, config=cfg)


def save_lora(path, adapters, **kw) -> Path:
    return save(path, adapters.config, adapters.params, kind="lora", **kw)
