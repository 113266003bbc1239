"""Which devices a stylisation runs on: the `--mesh` of the stylize command line and the inference planner
(`python -m pickstyle_jax.plan --job=stylize`), read one way for both.

    mesh_shape("data=2,fsdp=4", 8)            -> {"data": 2, "fsdp": 4}
    mesh_shape("auto", 8, n_branches=3)       -> a layout for 8 devices (`auto_shape`)
    mesh = make("auto", n_branches=3)         -> a jax Mesh over every device (every process's), or None for ""

A layout names mesh axes the inference rules use (`sharding.DEFAULT_RULES`): "data" and "fsdp" split the branch
batch, "fsdp" and "context" the weights' model width (gathered one layer at a time), "context" also the video
tokens (context parallelism inside self-attention), "tensor" the heads and FFN. "auto" puts the CFG branches over
"data" (as many ways as divide the branch batch: 3 for CS-CFG, so on 8 devices the data axis is 1) and every other
device on "context" when the rules split the tokens over it, else on "fsdp" (weights split; the branch batch it
cannot divide stays replicated there, and so does its compute: the planner's FLOPs say so).
"""
from __future__ import annotations

from typing import Mapping

import jax

from pickstyle_jax import sharding

__all__ = ["AXES", "auto_shape", "mesh_shape", "make"]

AXES = ("data", "fsdp", "context", "tensor")  # the mesh axes a stylize layout may name


def _rule_axes(rules: Mapping) -> set:
    out = set()
    for name, target in sharding.normalize_rules(rules).items():
        if name not in sharding.OPTIONS:
            out.update(sharding.axes_of(target))
    return out


def auto_shape(n_devices: int, n_branches: int = 3, rules: Mapping | None = None) -> dict[str, int]:
    """The "auto" layout of `n_devices` (module docstring): data = the largest divisor of n_devices that divides
    the branch batch `n_branches`, the rest over "context" if the rules use it, else "fsdp"."""
    rules = sharding.DEFAULT_RULES if rules is None else rules
    data = max(d for d in range(1, n_branches + 1) if n_branches % d == 0 and n_devices % d == 0)
    rest = "context" if "context" in _rule_axes(rules) else "fsdp"
    return {"data": data, rest: n_devices // data}


def mesh_shape(spec, n_devices: int, n_branches: int = 3, rules: Mapping | None = None,
               flag: str = "--mesh") -> dict[str, int]:
    """{axis: size} for `spec` on `n_devices`: "auto", "axis=size,..." (one size may be -1) or a mapping. Bad
    input is a sharding.ShardingError naming `flag` and what to write instead."""
    rules = sharding.DEFAULT_RULES if rules is None else rules
    try:
        if isinstance(spec, str) and spec.strip() == "auto":
            return auto_shape(n_devices, n_branches, rules)
        shape = sharding.parse_mesh(spec) if isinstance(spec, str) else dict(spec)
        unknown = sorted(set(shape) - set(AXES))
        if unknown:
            raise sharding.ShardingError(f"unknown mesh axes {unknown}; name some of {list(AXES)}")
        unused = sorted(a for a in shape if shape[a] != 1 and a not in _rule_axes(rules))
        if unused:
            raise sharding.ShardingError(f"the sharding rules map nothing to mesh axes {unused} (this build has no "
                                         f"{unused[0]!r} parallelism), so those devices would only repeat the work; "
                                         f"use {sorted(_rule_axes(rules) & set(AXES))}")
        return sharding.resolve_mesh_shape(shape, n_devices)
    except sharding.ShardingError as e:
        raise sharding.ShardingError(f"{flag} {spec}: {e}") from None


def make(spec, n_branches: int = 3, rules: Mapping | None = None, devices=None, flag: str = "--mesh"):
    """The jax Mesh of `spec` over `devices` (None: every device of every process), or None for an empty spec
    (one device, no mesh)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    devices = list(jax.devices() if devices is None else devices)
    return sharding.make_mesh(mesh_shape(spec, len(devices), n_branches, rules, flag), devices)
