"""Memory and FLOPs plan of stylisation on N simulated devices, before anyone rents them.

    python -m pickstyle_jax.plan --config=configs/pickstyle.py --job=stylize --devices=8 [--size 480p|720p|HxW]
        [--frames 81] [--mesh auto|data=2,fsdp=4]

AOT-compiles, on N host CPU devices with abstract weights (jax.ShapeDtypeStructs carrying the shardings
`Stylizer.load(mesh=...)` places them in: nothing is allocated), what one video costs:
- "dit_step": ONE CS-CFG denoising step, the real sampler (`make_sampler` with one executed step: 3 branches as one
  batched forward, guidance, the solver step) on the clip's latents, text padded to text_len (the worst case;
  --text_len sets it);
- "vae_encode" / "vae_decode": the VAE on the clip (split over the devices, models/vae.py), once each per window
  (the encode also runs on the all-zero clip, once per shape);
- "text": the umT5 encoder on one prompt of text_len tokens, placed replicated as the Stylizer places it.
It prints the mesh, each stage's per-device memory (weights, temporaries, peak) and FLOPs. The last stdout line is
one JSON object: {"job", "devices", "mesh", "size": [F, H, W], "tokens", "peak_bytes_per_device",
"flops_per_device" (of the DiT step), "weight_bytes_per_device", "stages": {stage: {"peak_bytes", "temp_bytes",
"argument_bytes", "output_bytes", "flops", "compile_s"}}, "assumes"}.

peak_bytes_per_device is the largest of: the DiT step with the VAE's weights resident, and each VAE stage with the
DiT's weights (and LoRA) resident. The umT5 is assumed to run once per video before sampling and then to leave the
devices (its stage is reported, not added): `Stylizer` today keeps it resident, which adds its weights
("text" argument bytes) to every stage.

FLOPs: XLA's cost analysis counts a loop body once, so they come from loop-free programs compiled for that purpose:
the DiT step with unrolled layers (when the plan's layout is scanned) and the VAE without frame chunks (the same
convolutions, all frames at once). The attention's own loops (query and key blocks, the ring's steps) stay loops,
so the DiT step's FLOPs undercount the attention (`pickstyle_jax.flops` has the analytic count). Memory comes from
the programs that run. Attention kernels that only lower on accelerators are planned with the chunked path
(planning.host_options).
"""
from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp

from pickstyle_jax import base, errors, lora as lora_lib, planning, sharding, sizing
from pickstyle_jax.models import autoencoders, umt5, wan
from pickstyle_jax.sample import devices
from pickstyle_jax.sample.sampler import make_sampler
from pickstyle_jax.sample.settings import SamplerSettings
from pickstyle_jax.train.setup import model_configs

__all__ = ["plan", "clip_size", "main", "STAGES"]

f32 = jnp.float32


def clip_size(size: str, frames: int) -> tuple[int, int, int]:
    """(F, H, W) the stylize command line runs a 16:9 landscape clip of `frames` frames at `size` in (`sizing`)."""
    try:
        p = sizing.plan(frames, 1080, 1920, size=size, max_frames=frames)
    except ValueError as e:
        raise errors.InputError(f"--size {size} / --frames {frames}: {e}") from None
    return p.windows.length, p.height, p.width


def _compile(fn, *args, what: str = "", **kw):
    t0 = time.perf_counter()
    compiled = fn.lower(*args, **kw).compile()
    secs = time.perf_counter() - t0
    if what:
        print(f"  ({what}: compiled in {secs:.1f} s)", flush=True)
    return compiled, secs


def _dit_step(wcfg, lcfg, options, mesh, rules, f, h, w, text_len):
    """(compiled one-step sampler, its abstract weights + LoRA)."""
    stacked = options.scan_layers
    shapes = wan.param_shapes(wcfg, stacked=stacked)
    params = planning.abstract(shapes, sharding=sharding.tree_shardings(
        wan.param_axes(wcfg, stacked=stacked), mesh, rules, shapes))
    rep = sharding.replicated(mesh)
    adapters = jax.eval_shape(lambda: lora_lib.init(lcfg, wan.param_shapes(wcfg), jax.random.key(0)))
    adapters = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), adapters)
    s = SamplerSettings()
    sampler = make_sampler(wcfg, solver=s.solver, steps=s.steps, shift=s.shift, skip=s.steps - 1, mode=s.mode,
                           apg=s.apg, mesh=mesh, rules=rules, options=options)
    z = jax.ShapeDtypeStruct((1, f, h, w, wcfg.in_dim), f32, sharding=rep)
    ctx = jax.ShapeDtypeStruct((1, f, h, w, wcfg.vace_in_dim), f32, sharding=rep)
    text = jax.ShapeDtypeStruct((1, text_len, wcfg.text_dim), f32, sharding=rep)
    lens = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=rep)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)  # raw key data (the sampler wraps it)
    what = f"DiT step on {dict(mesh.shape)}, {'scanned' if stacked else 'unrolled'} layers"
    compiled, secs = _compile(sampler, params, adapters, z, ctx, text, text, key, text_lens=lens,
                              null_text_lens=lens, what=what)
    return compiled, secs, (params, adapters)


STAGES = ("dit_step", "vae_encode", "vae_decode", "text")


def _measure(wcfg, vcfg, tcfg, lcfg, options, mesh, rules, clip, text_len, wanted, memory: bool = True):
    """({stage: memory fields + flops + compile_s}, {model: weight bytes per device}) on `mesh`; memory=False
    compiles only the loop-free programs the FLOPs are read from."""
    F, H, W = clip
    f, h, w = 1 + (F - 1) // vcfg.temporal_factor, H // vcfg.spatial_factor, W // vcfg.spatial_factor
    rep = sharding.replicated(mesh)
    stages, weights = {}, {}
    unrolled = options.replace(scan_layers=False)
    if memory:
        compiled, secs, (params, adapters) = _dit_step(wcfg, lcfg, options, mesh, rules, f, h, w, text_len)
        weights["dit"], weights["lora"] = planning.bytes_per_device(params), planning.bytes_per_device(adapters)
        stages["dit_step"] = {**planning.memory(compiled), "flops": planning.flops(compiled), "compile_s": secs}
    if options.scan_layers or not memory:  # the cost analysis counts a scanned layer once: the unrolled step's
        loop_free, secs, _ = _dit_step(wcfg, lcfg, unrolled, mesh, rules, f, h, w, text_len)
        stages.setdefault("dit_step", {}).update(flops=planning.flops(loop_free), flops_compile_s=secs)

    vparams = planning.abstract(autoencoders.param_shapes(vcfg), jnp.float32, rep)
    weights["vae"] = planning.bytes_per_device(vparams)
    video = jax.ShapeDtypeStruct((1, F, H, W, 3), f32, sharding=rep)
    z = jax.ShapeDtypeStruct((1, f, h, w, vcfg.z_dim), f32, sharding=rep)
    for name, fn, x in (("vae_encode", autoencoders.encode, video), ("vae_decode", autoencoders.decode, z)):
        if name not in wanted:
            continue
        stages[name] = {}
        if memory:
            compiled, secs = _compile(jax.jit(fn, static_argnums=0), vcfg, vparams, x, what=name)
            stages[name] = {**planning.memory(compiled), "flops": planning.flops(compiled), "compile_s": secs}
        if x.shape[1] > 1 or not memory:  # one frame runs unchunked already
            loop_free, _ = _compile(jax.jit(functools.partial(fn, chunked=False), static_argnums=0), vcfg, vparams, x,
                                    what=f"{name} unchunked, for FLOPs")
            stages[name]["flops"] = planning.flops(loop_free)

    tparams = planning.abstract(umt5.param_shapes(tcfg), sharding=rep)  # stored dtype (bf16 for umt5-xxl)
    weights["umt5"] = planning.bytes_per_device(tparams)
    if "text" in wanted:
        ids = jax.ShapeDtypeStruct((1, text_len), jnp.int32, sharding=rep)
        compiled, secs = _compile(jax.jit(umt5.encode, static_argnums=0), tcfg, tparams, ids, ids, what="text")
        stages["text"] = {**planning.memory(compiled), "flops": planning.flops(compiled), "compile_s": secs}
    return stages, weights


def plan(config, n_devices: int, *, size: str = "480p", frames: int = 81, mesh: str = "auto",
         stages: tuple[str, ...] = STAGES, baseline: bool = False, text_len: int | None = None) -> dict:
    """Compiles `stages` (module docstring; "dit_step" always) on the first `n_devices` devices; returns the JSON
    fields (a peak over the stages compiled). baseline: also the stages' FLOPs on one device, and each stage's
    per-device FLOPs over 1/n_devices of them ("flops_ratio": 1.0 when no compute is repeated). text_len: the
    prompts' padded length (None: the DiT's text_len, the worst case; a prompt's power-of-two bucket otherwise)."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise errors.InputError(f"--stages: unknown {unknown}; choose from {list(STAGES)}")
    wcfg, vcfg, tcfg, lcfg = model_configs(config)
    options, note = planning.host_options(base.options_from(config.model))
    if note:
        print(note, flush=True)
    rules = sharding.DEFAULT_RULES  # the Stylizer's
    try:
        mesh = devices.make(mesh, n_branches=3, devices=jax.devices()[:n_devices])
    except sharding.ShardingError as e:
        raise errors.InputError(str(e)) from None
    F, H, W = clip_size(size, frames)
    sf, tf = vcfg.spatial_factor, vcfg.temporal_factor
    f, h, w = 1 + (F - 1) // tf, H // sf, W // sf
    pt, ph, pw = wcfg.patch_size
    tokens = (f // pt) * (h // ph) * (w // pw)
    text_len = wcfg.text_len if text_len is None else int(text_len)
    print(f"stylize plan: mesh {dict(mesh.shape)} on {n_devices} simulated devices; {config.model.variant} "
          f"({wcfg.param_dtype} weights, {options.dtype} compute, attention {options.attention}, scan_layers "
          f"{options.scan_layers}); clip {F}x{H}x{W} -> latents {f}x{h}x{w}, {tokens} tokens x 3 CS-CFG branches, "
          f"text {text_len} tokens", flush=True)

    stages, weights = _measure(wcfg, vcfg, tcfg, lcfg, options, mesh, rules, (F, H, W), text_len, set(stages))
    base_flops = ratio = None
    if baseline:  # the same stages' FLOPs on one device (loop-free programs only)
        one = sharding.make_mesh({"data": 1}, jax.devices()[:1])
        base_flops = {k: v["flops"] for k, v in _measure(wcfg, vcfg, tcfg, lcfg, options, one, rules, (F, H, W),
                                                         text_len, set(stages), memory=False)[0].items()}
        ratio = {k: round(stages[k]["flops"] / (base_flops[k] / n_devices), 3) for k in base_flops if base_flops[k]}
        print(f"FLOPs per device / (one device's / {n_devices}): {ratio} (1.0: no compute repeated)", flush=True)

    resident = {"dit_step": weights["vae"], "vae_encode": weights["dit"] + weights["lora"],
                "vae_decode": weights["dit"] + weights["lora"]}
    peak = max(stages[k]["peak_bytes"] + extra for k, extra in resident.items() if k in stages)
    gb = planning.gib
    for name, st in stages.items():
        print(f"  {name:10s} compiled in {st['compile_s']:6.1f} s; per device: arguments {gb(st['argument_bytes'])}, "
              f"temporaries {gb(st['temp_bytes'])}, peak {gb(st['peak_bytes'])}, {st['flops'] / 1e12:.3f} TFLOP",
              flush=True)
    print(f"weights per device: DiT {gb(weights['dit'])}, LoRA {gb(weights['lora'])}, VAE {gb(weights['vae'])}, "
          f"umT5 {gb(weights['umt5'])} (encodes the prompt once per video, before sampling; assumed freed after, "
          f"not counted in the peak)", flush=True)
    print(f"peak per device {gb(peak)}; DiT step {stages['dit_step']['flops'] / 1e12:.3f} TFLOP per device",
          flush=True)
    return {"job": "stylize", "devices": n_devices, "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "size": [F, H, W], "tokens": tokens, "peak_bytes_per_device": int(peak),
            "flops_per_device": stages["dit_step"]["flops"], "weight_bytes_per_device": weights,
            "stages": {k: {kk: (round(vv, 2) if kk.endswith("_s") else vv) for kk, vv in v.items()}
                       for k, v in stages.items()},
            "baseline_flops": base_flops, "flops_ratio": ratio,
            "assumes": "umT5 encodes once per video before sampling and is freed; text padded to text_len"}


def main(argv=None):
    """The command line (module docstring). Bad input ends in one line `error: ...` and exit status 2 (errors.py)."""
    from absl import app, flags  # the command line's own dependencies, not the library's
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (configs/*.py[:variant]): its model section",
                                    lock_config=True)
    flags.DEFINE_integer("devices", 8, "number of simulated devices")
    flags.DEFINE_string("size", "480p", "480p, 720p or HxW (a 16:9 clip under the stylize command line's rule)")
    flags.DEFINE_integer("frames", 81, "frames of the clip (one window)")
    flags.DEFINE_string("mesh", "auto", "auto or axis=size pairs, as stylize's --mesh")
    flags.DEFINE_list("stages", list(STAGES), "what to compile (dit_step always)")
    flags.DEFINE_boolean("baseline", False, "also each stage's FLOPs on one device, and the ratio")
    flags.DEFINE_integer("text_len", None, "padded prompt length (default: the DiT's text_len, the worst case)")
    flags.mark_flags_as_required(["config"])

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        config = errors.config_flag()
        n, fl = flags.FLAGS.devices, flags.FLAGS
        if jax.device_count() < n:
            raise errors.InputError(
                f"--devices={n}: only {jax.device_count()} devices; run as `python -m pickstyle_jax.plan "
                f"--job=stylize --devices={n}` so it can simulate them (XLA_FLAGS is set before JAX starts)")
        print(json.dumps(plan(config, n, size=fl.size, frames=fl.frames, mesh=fl.mesh,
                                     stages=tuple(fl.stages) + ("dit_step",), baseline=fl.baseline,
                                     text_len=fl.text_len)), flush=True)

    errors.absl_run(_main, argv)
