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


class SourceError(ConversionError):
    """A source file that cannot be read as what it claims to be (corrupt, truncated, wrong kind, unreadable).

    `str()` is one line, `<file>: <what is wrong>`, which the command line prints after `error: `.
    """

    def __init__(self, file, what: str):
        self.file, self.what = str(file), " ".join(str(what).split())  # one line, whatever the library said
        super().__init__(f"{self.file}: {self.what}")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


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
    """Patchifying Conv3d [D, C, pt, ph, pw] (kernel = stride) -> Dense kernel [pt*ph*pw*C, D].

    Input features are ordered (pt, ph, pw, c)."""
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
        self._where: dict[str, tuple[str, object, Path]] = {}  # key -> (kind, handle, file)

    def __getitem__(self, key):
        kind, handle, file = self._where[key]
        try:
            return _torch_to_numpy(handle.get_tensor(key) if kind == "st" else handle[key])
        except Exception as e:  # noqa: BLE001  (a tensor whose bytes cannot be read: the file is damaged)
            raise SourceError(file, f"cannot read tensor {key!r}: {_first_line(e)} (truncated or corrupt file?)") \
                from None

    def shape(self, key) -> tuple:
        kind, handle, _ = self._where[key]
        if kind == "st":
            return tuple(handle.get_slice(key).get_shape())
        return tuple(handle[key].shape)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def _add_safetensors(self, file: Path):
        from safetensors import safe_open

        _check_readable(file)
        try:
            handle = safe_open(str(file), framework="pt")
            keys = list(handle.keys())
        except Exception as e:  # noqa: BLE001  (safetensors raises its own SafetensorError and others)
            raise SourceError(file, _safetensors_problem(e)) from None
        for k in keys:
            if k in self._where:
                raise ConversionError(f"key {k!r} appears in more than one file of {self.describe}")
            self._where[k] = ("st", handle, file)

    def _add_pickle(self, file: Path):
        sd = load_torch_file(file)
        for k in sd:
            if k in self._where:
                raise ConversionError(f"key {k!r} appears in more than one file of {self.describe}")
            self._where[k] = ("pt", sd, file)


def _check_readable(file: Path) -> bytes:
    """The first bytes of `file`; a SourceError naming it if it cannot be opened or read."""
    try:
        with open(file, "rb") as f:
            return f.read(8)
    except OSError as e:
        raise SourceError(file, f"cannot read the file: {e.strerror or _first_line(e)}") from None


def _safetensors_problem(e: Exception) -> str:
    msg = _first_line(e)
    if "IncompleteBuffer" in msg or "incomplete" in msg.lower():
        return f"truncated or incomplete safetensors file: the header promises more bytes than the file holds ({msg})"
    if "Header" in msg or "header" in msg:
        return f"not a valid safetensors file (unreadable header: {msg})"
    return f"not a valid safetensors file ({msg})"


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80  # first byte of a protocol-2+ pickle (torch's legacy, non-zip format)


def _torch_load(file: Path, head: bytes):
    """torch.load(weights_only=True) with every failure turned into one SourceError line."""
    is_zip = head.startswith(_ZIP_MAGIC)
    if not is_zip and not (head and head[0] == _PICKLE_PROTOCOL):
        raise SourceError(file, "not a PyTorch checkpoint: neither a zip archive (torch.save) nor a pickle "
                                f"(first bytes {head!r}); is it a safetensors file with the wrong suffix?")
    if is_zip:
        import zipfile

        try:
            with zipfile.ZipFile(file) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise SourceError(file, f"truncated or corrupt zip archive ({_first_line(e)})") from None
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise SourceError(file, f"a zip archive but not a PyTorch checkpoint (no data.pkl; holds "
                                    f"{names[:3]}{' ...' if len(names) > 3 else ''})")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        msg = _first_line(e)
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise SourceError(
                file, f"refusing to load: the pickle needs code beyond plain tensors to unpickle (weights_only=True "
                      f"rejected it: {msg}). Re-save it as a plain state dict or as safetensors.") from None
        raise SourceError(file, f"corrupt or truncated pickle ({msg})") from None
    except Exception as e:  # noqa: BLE001  (torch raises RuntimeError, EOFError, ValueError ... on damaged files)
        raise SourceError(file, f"corrupt or truncated PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") \
            from None


def load_torch_file(file) -> dict:
    """A `.pth`/`.pt`/`.bin` state dict, unpickled with weights only; refuses files that need code to load."""
    file = Path(file)
    obj = _torch_load(file, _check_readable(file))
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict) and not torch.is_tensor(obj[key]):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise SourceError(file, f"expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise SourceError(file, f"entries that are not tensors: {bad[:10]}")
    return obj


def read_json(file) -> dict:
    """A JSON object from `file`, or a SourceError naming the file."""
    file = Path(file)
    _check_readable(file)
    try:
        obj = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(file, f"not valid JSON ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise SourceError(file, f"expected a JSON object, found {type(obj).__name__}")
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
        raise SourceError(src, "does not exist")
    sd = StateDict(str(src))
    if not src.is_dir():
        files = [src]
    else:
        indices = sorted(src.glob("*.safetensors.index.json")) + sorted(src.glob("*.bin.index.json"))
        if len(indices) > 1:
            raise SourceError(src, f"several index files {[i.name for i in indices]}; point --src at one")
        if indices:
            files = _shards(indices[0])
        else:
            files = [src / p for p in prefer if (src / p).is_file()][:1]
            if not files:
                files = sorted(f for f in src.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file())
            if len(files) != 1:
                found = [f.name for f in files] or sorted(f.name for f in src.iterdir())[:8] or "nothing"
                raise SourceError(src, f"expected one weight file ({', '.join(_WEIGHT_SUFFIXES)}) or an index json, "
                                       f"found {found}")
    for f in files:
        if f.suffix == ".safetensors":
            sd._add_safetensors(f)
        elif f.suffix in _WEIGHT_SUFFIXES:
            sd._add_pickle(f)
        else:
            raise SourceError(f, f"unknown weight file type {f.suffix!r} (expected .safetensors or .pth)")
    return sd


def _shards(index: Path) -> list[Path]:
    """The shard files an index json names, each checked to exist."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(index, "no \"weight_map\" object naming the shards")
    files = [index.parent / f for f in sorted(set(map(str, weight_map.values())))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise SourceError(index, f"names shards that are not there: {missing}")
    return files


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


DTYPE_HELP = ("dtype the parameters are stored in (default: the source's: bfloat16 if every stored floating tensor "
              "is bfloat16, else float32; float16/float8 sources become float32)")
COMPUTE_DTYPE_HELP = ("compute dtype written to config.json (VAE, umT5; default: the same as the stored parameter "
                      "dtype; cfg.replace(dtype=...) can still change it at load time). The DiT refuses it: its "
                      "compute dtype is a run-time option (wan.Options.dtype)")


def fail(e: BaseException):
    """Print `error: <message>` to stderr and exit with status 1 (no traceback)."""
    import sys

    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1)


def converter_main(argv, *, prog: str, doc: str, convert: Callable, src_help: str, config_help: str,
                   config_choices=None):
    """The shared command line of the model converters: --src --dst [--dtype] [--compute-dtype] [--config].

    Errors end in `error: <file>: <what is wrong>` on stderr and exit status 1, without a traceback; a failed
    conversion writes nothing at --dst (an existing checkpoint there is left as it was).
    """
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help=src_help)
    ap.add_argument("--dst", required=True, help="output checkpoint directory")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help=DTYPE_HELP)
    ap.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16"), help=COMPUTE_DTYPE_HELP)
    ap.add_argument("--config", default=None, choices=config_choices, help=config_help)
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.dst, dtype=args.dtype, compute_dtype=args.compute_dtype, config=args.config)
    except (ValueError, OSError, KeyError) as e:  # ConversionError is a ValueError; OSError: unreadable, disk full
        fail(e)
    return Path(args.dst)


def dtype_name(dt) -> str:
    return "bfloat16" if np.dtype(dt) == np.dtype(ml_dtypes.bfloat16) else np.dtype(dt).name


def _is_float(x) -> bool:
    return np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16


def resolve_dtypes(params: dict, dtype=None, compute_dtype=None) -> tuple[dict, str, str]:
    """(params cast to the stored dtype, stored dtype name, compute dtype name): the one `--dtype` rule.

    stored: `dtype` if given, else "bfloat16" when every floating leaf already is bfloat16, else "float32".
    compute: `compute_dtype` if given, else the stored dtype.
    """
    leaves = [x for x in _leaves(params) if _is_float(x)]
    if dtype is not None:
        stored = dtype_name(parse_dtype(dtype))
    else:
        stored = "bfloat16" if leaves and all(x.dtype == ml_dtypes.bfloat16 for x in leaves) else "float32"
    if stored not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {stored}")
    compute = dtype_name(parse_dtype(compute_dtype)) if compute_dtype is not None else stored
    if compute not in ("float32", "bfloat16"):
        raise ValueError(f"--compute-dtype must be float32 or bfloat16, got {compute}")
    target = np.dtype(ml_dtypes.bfloat16) if stored == "bfloat16" else np.dtype(np.float32)

    def cast(tree):
        return {k: cast(v) if isinstance(v, Mapping) else (v.astype(target) if _is_float(v) and v.dtype != target
                                                           else v) for k, v in tree.items()}

    return cast(params), stored, compute


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, Mapping):
            yield from _leaves(v)
        else:
            yield v


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
