"""What the memory plans (`python -m pickstyle_jax.plan`: the training step in train/plan.py, stylisation in
sample/plan.py) share: abstract arrays with shardings, per-device bytes, the CPU stand-in for attention kernels that
only lower on accelerators, and XLA's per-device memory and FLOPs of a compiled program.

XLA's cost analysis counts a loop body once (a `lax.scan` of 40 layers reports one layer's FLOPs), so FLOPs are read
from programs without loops where the plans say so.
"""
from __future__ import annotations

import math

import jax
import numpy as np

from pickstyle_jax.models import wan

__all__ = ["HOST_KERNELS", "bytes_per_device", "abstract", "host_options", "memory", "flops", "gib"]

HOST_KERNELS = {"cudnn": "chunked", "splash": "chunked", "auto": "chunked"}  # attention kernels CPU cannot lower


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs (their shardings' shard shapes)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return int(total)


def abstract(shapes, dtype=None, sharding=None):
    """ShapeDtypeStructs (nothing allocated) for a tree of shapes: ShapeDtypeStructs or shape tuples (then `dtype`),
    with `sharding` (one sharding for every leaf, or a tree of them)."""
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
    one = sharding is None or isinstance(sharding, jax.sharding.Sharding)
    shards = [sharding] * len(leaves) if one else treedef.flatten_up_to(sharding)
    out = [jax.ShapeDtypeStruct(tuple(s) if is_shape(s) else s.shape, dtype if is_shape(s) else s.dtype, sharding=sh)
           for s, sh in zip(leaves, shards)]
    return jax.tree.unflatten(treedef, out)


def host_options(opts: wan.Options) -> tuple[wan.Options, str | None]:
    """(options XLA:CPU can compile, a note or None): cuDNN flash and splash do not lower on CPU, so they are planned
    with the chunked path over query and key blocks of 1024 (an online softmax; [B, N, 1024, 1024] logits at a time,
    the working set of a flash kernel)."""
    if opts.attention not in HOST_KERNELS or jax.default_backend() != "cpu":
        return opts, None
    note = f"attention {opts.attention!r} does not lower on CPU: planning with {HOST_KERNELS[opts.attention]!r}"
    return opts.replace(attention=HOST_KERNELS[opts.attention], attention_chunk=1024, attention_kv_chunk=1024), note


def memory(compiled) -> dict:
    """XLA's per-device plan of a compiled program: arguments, outputs, temporaries and the peak (arguments + outputs
    - aliased + temporaries), in bytes."""
    m = compiled.memory_analysis()
    temp = int(m.temp_size_in_bytes)
    args, outs = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    return {"argument_bytes": args, "output_bytes": outs, "temp_bytes": temp,
            "peak_bytes": int(args + outs - m.alias_size_in_bytes + temp)}


def flops(compiled) -> float:
    """Per-device FLOPs of a compiled (SPMD-partitioned) program, XLA's cost analysis (loop bodies counted once)."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))


def gib(b) -> str:
    return f"{b / 2**30:.2f} GiB"
