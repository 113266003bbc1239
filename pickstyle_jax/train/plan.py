"""Memory plan of the training step on N simulated devices, before anyone rents them.

    python -m pickstyle_jax.plan --config=configs/pickstyle.py --devices=32 [--config.key=value ...]

Builds the real train step (step.py) on N host CPU devices with abstract inputs (`setup.abstract_state`, the
jax.ShapeDtypeStructs carrying their shardings that training places its arrays by: no weight is allocated),
AOT-compiles it and prints the mesh, the sharding of the largest arrays, the compile time and XLA's per-device memory
plan. The last stdout line is one JSON object:
{"devices", "mesh", "param_bytes_per_device", "optimizer_bytes_per_device", "temp_bytes_per_device",
 "peak_bytes_per_device", "compile_s"}.
The entry point pickstyle_jax/plan.py makes the N host devices (XLA_FLAGS) before JAX starts, then calls `main`.

The plan is XLA:CPU's, for the same program a GPU or TPU would run, except the attention kernel: cuDNN flash and
splash do not lower on CPU, so those configs are planned with the "chunked" path (query blocks with an online
softmax over key blocks), whose memory is of the same order as a flash kernel's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax import errors, planning, sharding
from pickstyle_jax.models import autoencoders, wan
from pickstyle_jax.train import setup as setup_lib, step as step_lib

__all__ = ["plan", "main"]

def plan(config, n_devices: int) -> dict:
    """Compiles the step for `config` on the current (simulated) devices; returns the JSON fields."""
    mesh_shape = setup_lib.check_config(config, n_devices=n_devices)
    rules = sharding.normalize_rules(config.rules)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n_devices])
    wcfg, vcfg, _, lcfg = setup_lib.model_configs(config)
    cfg = step_lib.step_config(config, wcfg, vcfg, lcfg)
    opts, note = planning.host_options(cfg.options)
    if note:
        print(note, flush=True)
        cfg = dataclasses.replace(cfg, options=opts)
    rep = sharding.replicated(mesh)

    # the base as training's load_base places it, abstract: no weight is allocated
    dit_shapes = wan.param_shapes(wcfg, stacked=opts.scan_layers)
    dit_sh = sharding.tree_shardings(wan.param_axes(wcfg, stacked=opts.scan_layers), mesh, rules, dit_shapes)
    dit = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), dit_shapes, dit_sh)
    vshapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=rep),
                           autoencoders.param_shapes(vcfg), is_leaf=lambda x: isinstance(x, tuple))
    d = config.data
    zshape = (1, 1 + (d.frames - 1) // vcfg.temporal_factor, d.height // vcfg.spatial_factor,
              d.width // vcfg.spatial_factor, vcfg.z_dim)
    base = {"dit": dit, "vae": vshapes, "zero_latent": jax.ShapeDtypeStruct(zshape, jnp.float32, sharding=rep)}
    abstract = setup_lib.abstract_state(config, cfg, mesh, rules, int(config.text.text_len))
    state, batch = abstract.state, abstract.batch

    print(f"mesh {dict(mesh.shape)} on {n_devices} simulated devices; model {config.model.variant} "
          f"({wcfg.param_dtype} weights, {opts.dtype} compute, attention {opts.attention}, remat "
          f"{opts.remat_policy}, scan_layers {opts.scan_layers}); batch "
          f"{d.batch_size} x {d.frames}x{d.height}x{d.width}", flush=True)
    leaves = jax.tree_util.tree_flatten_with_path({"base": base, "state": state})[0]
    leaves.sort(key=lambda kv: -math.prod(kv[1].shape) * np.dtype(kv[1].dtype).itemsize)
    print("largest arrays (global shape, dtype, spec, per-device shape):")
    for kp, x in leaves[:8]:
        print(f"  {sharding.path_name(kp):60s} {str(tuple(x.shape)):22s} {str(x.dtype):9s} "
              f"{str(x.sharding.spec):30s} {x.sharding.shard_shape(x.shape)}")

    t0 = time.perf_counter()
    with sharding.rules_context(mesh, rules):
        compiled = step_lib.jit_train_step(cfg, mesh, abstract.shardings(base), abstract.shardings(state),
                                           abstract.shardings(batch)).lower(base, state, batch, abstract.key).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes)
    peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp)
    out = {"devices": n_devices, "mesh": dict(mesh.shape),
           "param_bytes_per_device": planning.bytes_per_device(base),
           "optimizer_bytes_per_device": planning.bytes_per_device(state),
           "temp_bytes_per_device": temp, "peak_bytes_per_device": peak, "compile_s": round(compile_s, 2)}
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"compiled in {compile_s:.1f} s; per device: params {gb(out['param_bytes_per_device'])}, LoRA + "
          f"optimizer {gb(out['optimizer_bytes_per_device'])}, batch {gb(planning.bytes_per_device(batch))}, "
          f"temporaries {gb(temp)}, peak {gb(peak)}", flush=True)
    return out


def main(argv=None):
    """The command line (module docstring). Bad input ends in one line `error: ...` and exit status 2 (errors.py);
    --verbose or PICKSTYLE_TRACEBACK=1 shows the traceback."""
    from absl import app, flags  # the command line's own dependencies, not the library's
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:variant])", lock_config=True)
    flags.DEFINE_integer("devices", 8, "number of simulated devices")
    flags.mark_flags_as_required(["config"])

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        config = errors.config_flag()
        n = flags.FLAGS.devices
        if jax.device_count() < n:
            raise errors.InputError(
                f"--devices={n}: only {jax.device_count()} devices; run as `python -m pickstyle_jax.plan "
                f"--devices={n}` so it can simulate them (XLA_FLAGS is set before JAX starts)")
        print(json.dumps(plan(config, n)), flush=True)

    errors.absl_run(_main, argv)
