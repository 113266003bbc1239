"""What every converter shares: lazy reading of PyTorch checkpoints and the strict table-driven merge.

A converter is a *table*: for every target parameter path (dotted, e.g. `blocks.3.self_attn.q.kernel`) the source key
it comes from and a transform from the torch layout to ours. `convert_strict` consumes a source state dict through
that table and raises one `ConversionError` naming every missing, unexpected and mis-shaped key at once.

Reading is lazy: safetensors tensors are read one at a time (`safe_open`), sharded checkpoints shard by shard, and
`.pth` files are memory-mapped with `torch.load(weights_only=True)`, which refuses pickles that need code to load.
Peak host memory is therefore the converted output plus about one tensor, never the source model on top of it.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
import torch

Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(ValueError):
    """The source checkpoint does not match the target model; the message lists every offending key."""


# ----------------------------------------------------------------------------------------------- transforms
def identity(x):
    return x


def linear(x):
    """torch Linear weight [out, in] -> Dense kernel [in, out]."""
    return x.T


def conv3d(x):
    """torch Conv3d [O, I, kT, kH, kW] -> [kT, kH, kW, I, O]."""
    return x.transpose(2, 3, 4, 1, 0)


def conv2d(x):
    """torch Conv2d [O, I, kH, kW] -> [kH, kW, I, O]."""
    return x.transpose(2, 3, 1, 0)


def patch_dense(x):
    """Patchifying Conv3d [D, C, pt, ph, pw] (kernel = stride) -> Dense kernel [pt*ph*pw*C, D], features (pt,ph,pw,c)."""
    d = x.shape[0]
    return x.transpose(2, 3, 4, 1, 0).reshape(-1, d)


def flatten(x):
    """VAE gammas (C,1,1,1) / (C,1,1) -> (C,)."""
    return x.reshape(-1)


# -------------------------------------------------------------------------------------------- reading sources
def _torch_to_numpy(t: "torch.Tensor") -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


class StateDict(Mapping):
    """A read-only, lazy name -> numpy array mapping over one or more checkpoint files.

    Values keep their stored dtype (bf16 comes back as `ml_dtypes.bfloat16`). `shape(k)` needs no tensor read for
    safetensors files. `describe` is used in error messages.
    """

    def __init__(self, describe: str):
        self.describe = describe
        self._where: dict[str, tuple[str, object]] = {}  # key -> (kind, handle)

    def __getitem__(self, key):
        kind, handle = self._where[key]
        if kind == "st":
            return _torch_to_numpy(handle.get_tensor(key))
        return _torch_to_numpy(handle[key])

    def shape(self, key) -> tuple:
        kind, handle = self._where[key]
        if kind == "st":
            return tuple(handle.get_slice(key).get_shape())
        return tuple(handle[key].shape)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def _add_safetensors(self, file: Path):
        from safetensors import safe_open

        handle = safe_open(str(file), framework="pt")
        for k in handle.keys():
            if k in self._where:
                raise ConversionError(f"key {k!r} appears in more than one file of {self.describe}")
            self._where[k] = ("st", handle)

    def _add_pickle(self, file: Path):
        sd = load_torch_file(file)
        for k in sd:
            if k in self._where:
                raise ConversionError(f"key {k!r} appears in more than one file of {self.describe}")
            self._where[k] = ("pt", sd)


def load_torch_file(file) -> dict:
    """A `.pth`/`.pt`/`.bin` state dict, unpickled with weights only; refuses files that need code to load."""
    file = Path(file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{file}: refusing to load: the pickle needs code beyond plain tensors to unpickle "
            f"(weights_only=True rejected it: {str(e).splitlines()[0]}). Re-save it as a plain state dict or "
            f"as safetensors.") from None
    except RuntimeError as e:
        if "mmap" in str(e) or "zip" in str(e):  # legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(file, map_location="cpu", weights_only=True)
        else:
            raise
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict) and not torch.is_tensor(obj[key]):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConversionError(f"{file}: expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ConversionError(f"{file}: entries that are not tensors: {bad[:10]}")
    return obj


_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def open_state_dict(src, *, prefer: Iterable[str] = ()) -> StateDict:
    """Opens a checkpoint lazily.

    `src`: a `.safetensors`/`.pth` file; a folder with a `*.safetensors.index.json` (sharded; read shard by shard);
    or a folder with exactly one weight file. `prefer`: file names to pick inside a folder before guessing
    (e.g. `diffusion_pytorch_model.safetensors`).
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    sd = StateDict(str(src))
    if src.is_file():
        files = [src]
    else:
        indices = sorted(src.glob("*.safetensors.index.json")) + sorted(src.glob("*.bin.index.json"))
        if len(indices) > 1:
            raise ConversionError(f"{src} has several index files {[i.name for i in indices]}; point --src at one")
        if indices:
            weight_map = json.loads(indices[0].read_text())["weight_map"]
            files = [src / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ConversionError(f"{indices[0]} names shards that are not there: {missing}")
        else:
            files = [src / p for p in prefer if (src / p).is_file()][:1]
            if not files:
                files = sorted(f for f in src.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file())
            if len(files) != 1:
                raise ConversionError(
                    f"{src}: expected one weight file or an index json, found {[f.name for f in files] or 'none'}")
    for f in files:
        if f.suffix == ".safetensors":
            sd._add_safetensors(f)
        elif f.suffix in _WEIGHT_SUFFIXES:
            sd._add_pickle(f)
        else:
            raise ConversionError(f"{f}: unknown weight file type {f.suffix!r} (expected .safetensors or .pth)")
    return sd


# ----------------------------------------------------------------------------------------------- the merge
def _set(tree: dict, dotted: str, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def flatten_shapes(tree, prefix="") -> dict[str, tuple]:
    """Dotted path -> shape of a nested dict of arrays (or ShapeDtypeStructs)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_shapes(v, name + "."))
        else:
            out[name] = tuple(v.shape)
    return out


def convert_strict(sd: Mapping, table: Mapping[str, tuple[str, Transform]], expected: Mapping[str, tuple],
                   *, dtype=None, ignore: Callable[[str], bool] = lambda k: False) -> dict:
    """Builds our nested params from `sd` through `table`, checking everything before reading any tensor.

    table:    target dotted path -> (source key, transform to our layout)
    expected: target dotted path -> shape (from `jax.eval_shape` of the model's init)
    dtype:    output dtype for floating tensors (None keeps the stored dtype)
    ignore:   source keys to skip silently (e.g. buffers that the target recomputes)
    """
    problems = []
    no_rule = sorted(set(expected) - set(table))
    if no_rule:
        problems.append(f"target parameters with no conversion rule (converter bug): {no_rule}")
    stray = sorted(set(table) - set(expected))
    if stray:
        problems.append(f"rules for parameters the target model does not have: {stray}")
    used = {src for src, _ in table.values()}
    missing = sorted(src for src in used if src not in sd)
    if missing:
        problems.append(f"missing from {getattr(sd, 'describe', 'the source')} ({len(missing)}): {missing}")
    unexpected = sorted(k for k in sd if k not in used and not ignore(k))
    if unexpected:
        problems.append(f"unexpected keys in {getattr(sd, 'describe', 'the source')} ({len(unexpected)}): "
                        f"{unexpected}")
    shape_of = getattr(sd, "shape", None) or (lambda k: tuple(sd[k].shape))
    mis = []
    for dst, (src, fn) in sorted(table.items()):
        if dst in expected and src in sd:
            got = tuple(fn(np.empty(shape_of(src), dtype=np.uint8)).shape)
            if got != tuple(expected[dst]):
                mis.append(f"{src} {shape_of(src)} -> {dst}: becomes {got}, the model needs {tuple(expected[dst])}")
    if mis:
        problems.append(f"mis-shaped ({len(mis)}): " + "; ".join(mis))
    if problems:
        raise ConversionError("checkpoint does not match the model:\n  - " + "\n  - ".join(problems))

    out: dict = {}
    for dst, (src, fn) in table.items():
        x = np.ascontiguousarray(fn(sd[src]))
        if dtype is not None and (np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16):
            x = x.astype(dtype)
        _set(out, dst, x)
    return out


def strip_prefix(sd: StateDict, prefixes: Iterable[str]) -> StateDict:
    """A view of `sd` whose keys lose the first matching prefix (e.g. ComfyUI's `model.diffusion_model.`)."""
    prefixes = tuple(prefixes)
    new_to_old = {}
    for k in sd:
        nk = next((k[len(p):] for p in prefixes if k.startswith(p)), k)
        if nk in new_to_old:
            raise ConversionError(f"{sd.describe}: {k!r} collides with {new_to_old[nk]!r} once prefixes are removed")
        new_to_old[nk] = k
    return _Renamed(sd, new_to_old)


class _Renamed(StateDict):
    def __init__(self, base: StateDict, new_to_old: dict[str, str]):
        super().__init__(base.describe)
        self._base, self._map = base, new_to_old
        self._where = {k: base._where[o] for k, o in new_to_old.items()}

    def __getitem__(self, key):
        return self._base[self._map[key]]

    def shape(self, key):
        return self._base.shape(self._map[key])


def converter_main(argv, *, prog: str, doc: str, convert: Callable, src_help: str, dtype_help: str,
                   config_help: str, config_choices=None):
    """The shared command line of the model converters: --src --dst [--dtype] [--config]; errors without traceback."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help=src_help)
    ap.add_argument("--dst", required=True, help="output checkpoint directory")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help=dtype_help)
    ap.add_argument("--config", default=None, choices=config_choices, help=config_help)
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.dst, dtype=args.dtype, config=args.config)
    except (ValueError, FileNotFoundError, KeyError) as e:  # ConversionError is a ValueError
        raise SystemExit(f"{prog}: error: {e}") from None
    return Path(args.dst)


def parse_dtype(name):
    """A `--dtype` name ("float32", "bf16", ...), a numpy/ml_dtypes dtype, or None (keep the stored dtype)."""
    if name in (None, "", "keep"):
        return None
    if not isinstance(name, str):
        return np.dtype(name).type
    table = {"float32": np.float32, "fp32": np.float32, "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
             "float16": np.float16, "fp16": np.float16}
    if name not in table:
        raise ValueError(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]
