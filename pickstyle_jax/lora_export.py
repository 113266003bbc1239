"""LoRA adapters -> PyTorch files, written without torch (numpy only); and the official <-> diffusers Wan names.

A `lora.Lora` holds, per adapted module, A [in, r] and B [r, out]. Its two PyTorch layouts store the torch
`nn.Linear` orientation, A [r, in] and B [out, r], float32:
- PickStyle `.pth` (`pickstyle_state_dict`): `module.<official module>.lora_{A,B}.consistency.weight`, the DDP
  `module.` prefix included so that the official loader reads it; a torch.save zip (`write_torch_state_dict`).
- PEFT / diffusers `.safetensors` (`peft_state_dict`): `transformer.<diffusers module>.lora_{A,B}.weight`, with
  string metadata {"lora_alpha": str(alpha), "r": str(rank), "format": "pt"} (`peft_metadata`). `write_safetensors`
  writes any {name: array} with the `safetensors` package's numpy API (a runtime dependency; no torch).

`DIFFUSERS_TOP` / `DIFFUSERS_BLOCK` are the project's only table of official -> diffusers module names
(docs/REFERENCE.md §6): convert/wan_dit.py (whole DiT) and convert/lora.py import them from here; this package
never imports convert.
"""
from __future__ import annotations

import io
import re
import struct
import zipfile
from pathlib import Path

import numpy as np

from pickstyle_jax import files, lora as lora_lib

# ------------------------------------------------------------------------------------------------- names
# Official module name (inside a block or at the top) -> diffusers module name. Block-level entries apply to both
# `blocks.i.` and `vace_blocks.j.`.
DIFFUSERS_TOP = {
    "patch_embedding": "patch_embedding",
    "vace_patch_embedding": "vace_patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
DIFFUSERS_BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # the affine LayerNorm before cross-attention
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "before_proj": "proj_in",
    "after_proj": "proj_out",
}
_BLOCK_RE = re.compile(r"^((?:vace_)?blocks\.\d+)\.(.+)$")
_TOP_INV = {v: k for k, v in DIFFUSERS_TOP.items()}
_BLOCK_INV = {v: k for k, v in DIFFUSERS_BLOCK.items()}


def official_to_diffusers_module(module: str) -> str:
    """`blocks.3.self_attn.q` -> `blocks.3.attn1.to_q`; raises KeyError for names outside the tables."""
    m = _BLOCK_RE.match(module)
    if m:
        return f"{m.group(1)}.{DIFFUSERS_BLOCK[m.group(2)]}"
    return DIFFUSERS_TOP[module]


def diffusers_to_official_module(module: str) -> str:
    """`vace_blocks.0.attn1.to_q` -> `vace_blocks.0.self_attn.q`; raises KeyError for names outside the tables."""
    m = _BLOCK_RE.match(module)
    if m:
        return f"{m.group(1)}.{_BLOCK_INV[m.group(2)]}"
    return _TOP_INV[module]


# ------------------------------------------------------------------------------------------------- state dicts
def _torch_layout(adapters: lora_lib.Lora):
    """(official module path, "A" | "B", float32 [r, in] | [out, r]) per adapter weight, modules in natural order."""
    for path in lora_lib.adapter_paths(adapters):
        node = adapters.params
        for part in path.split("."):
            node = node[part]
        for which in ("A", "B"):
            yield path, which, np.array(np.asarray(node[which], np.float32).T, order="C")  # a writable copy


def pickstyle_state_dict(adapters: lora_lib.Lora) -> dict:
    """PickStyle's .pth layout: module.<path>.lora_{A,B}.consistency.weight, torch [r, in] / [out, r]."""
    return {f"module.{path}.lora_{which}.consistency.weight": w for path, which, w in _torch_layout(adapters)}


def peft_state_dict(adapters: lora_lib.Lora) -> dict:
    """PEFT/diffusers layout: transformer.<diffusers module>.lora_{A,B}.weight, torch [r, in] / [out, r]."""
    return {f"transformer.{official_to_diffusers_module(path)}.lora_{which}.weight": w
            for path, which, w in _torch_layout(adapters)}


def peft_metadata(config: lora_lib.LoraConfig) -> dict[str, str]:
    """The safetensors metadata that carries alpha and rank (convert.lora's importer reads `lora_alpha`)."""
    return {"lora_alpha": str(config.alpha), "r": str(config.rank), "format": "pt"}


# ------------------------------------------------------------------------------------------------- writers
def _pickle_tensor_dict(tensors: dict) -> bytes:
    """The pickle torch.save writes for {name: float32 tensor} (protocol 2; storages as persistent ids "0", "1",
    ...), written opcode by opcode so that no torch is needed. torch.load(weights_only=True) reads it."""
    out = io.BytesIO()
    w = out.write

    def text(s):
        b = s.encode()
        w(b"X" + struct.pack("<I", len(b)) + b)

    def integer(v):
        w(b"J" + struct.pack("<i", int(v)))

    def tup(values):
        w(b"(")
        for v in values:
            integer(v)
        w(b"t")

    w(b"\x80\x02}(")
    for i, (name, a) in enumerate(tensors.items()):
        text(name)
        w(b"ctorch._utils\n_rebuild_tensor_v2\n(")
        w(b"(")
        text("storage")
        w(b"ctorch\nFloatStorage\n")
        text(str(i))
        text("cpu")
        integer(a.size)
        w(b"tQ")  # persistent id tuple -> storage
        integer(0)
        tup(a.shape)
        tup([int(np.prod(a.shape[k + 1:])) for k in range(a.ndim)])
        w(b"\x89ccollections\nOrderedDict\n)R")  # requires_grad=False, backward hooks = OrderedDict()
        w(b"tR")
    w(b"u.")
    return out.getvalue()


def write_torch_state_dict(path, tensors: dict) -> Path:
    """A torch.save-compatible zip file of float32 tensors ({name: np.ndarray}), written without torch."""
    path = Path(path)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    root = path.stem.replace(".", "_") or "archive"

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            z.writestr(f"{root}/data.pkl", _pickle_tensor_dict(tensors))
            z.writestr(f"{root}/byteorder", "little")
            for i, a in enumerate(tensors.values()):
                z.writestr(f"{root}/data/{i}", a.astype("<f4").tobytes())
            z.writestr(f"{root}/version", "3\n")

    return files.atomic_write(path, write)


def write_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """A .safetensors file of {name: np.ndarray} (dtypes kept) with optional str -> str metadata; atomic replace."""
    from safetensors.numpy import save_file  # numpy-only API of a runtime dependency

    path = Path(path)
    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; not: {bad}")
    # safetensors reads each array's raw buffer: a transposed view must be made contiguous first.
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return files.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_pickstyle_pth(path, adapters: lora_lib.Lora) -> Path:
    """`path` (.pth) in PickStyle's layout; torch.load(weights_only=True) and the official loader read it."""
    return write_torch_state_dict(path, pickstyle_state_dict(adapters))


def write_peft_safetensors(path, adapters: lora_lib.Lora) -> Path:
    """`path` (.safetensors) in the PEFT/diffusers layout with alpha/rank metadata (= `convert.lora --export`)."""
    return write_safetensors(path, peft_state_dict(adapters), peft_metadata(adapters.config))
