"""Stylise a video from the command line.

    python -m pickstyle_jax.stylize --video IN.mp4 --prompt "Anime style. A girl walks." \
        --dit DIR --vae DIR --umt5 DIR --tokenizer spiece.model --lora DIR --out OUT.mp4

writes OUT.mp4 (and with --side-by-side OUT_side_by_side.mp4, source left) and OUT.json: every setting used
(`SamplerSettings`, whose fields and defaults the sampler flags are built from), the sizes, the windows and the
timings. Everything that can be checked without compiling (the video decodes and
has frames, the checkpoints exist and fit together, the settings are valid, the prompt fits in 512 tokens: longer
ones are truncated with a warning) is checked first, and the outputs are written through temporary files, so a
failed run leaves nothing at --out.

Devices: --mesh data=2,fsdp=4 (or auto) runs on every device present, the CFG branches over "data", the weights and
the rest over the other axes, the VAE split into spatial tiles (sample/devices.py says what each axis does); the
frames equal the one-device run's. Several hosts: start the same command on each with --distributed.coordinator
host:port --distributed.num_processes N --distributed.process_id I (or --distributed.auto on a TPU pod / SLURM), the
settings of train's --config.distributed.*; only process 0 writes the outputs.

Duration: the output lasts as long as the input and plays at its speed, by default and with --long chunked.
By default (--frame-rule keep) the clip is resampled to the model's 16 fps: one window of the nearest 4k + 1 frames
when that fits --max-frames, else overlapping windows of --max-frames covering the whole clip (a 10 s clip gives 160 frames, never
5 s); it is written at the rate that keeps the duration exact (33 frames at 30 fps -> 17 frames at 15.45 fps).
--long chunked keeps every source frame and the source's rate, in windows. --frame-rule official is the paper's
rule and the one that changes the duration: every clip resampled to --max-frames (81) frames at 16 fps. A source
without a frame rate (a folder of frames) is taken as 16 fps. --fps overrides the written rate (then the
duration changes).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import jax

from pickstyle_jax import errors, files, guidance, sharding, sizing
from pickstyle_jax import video as video_lib
from pickstyle_jax.errors import InputError
from pickstyle_jax.tokenizer import clean_text
from pickstyle_jax.sample import devices
from pickstyle_jax.sample.settings import SamplerSettings, SettingsError, apg_name
from pickstyle_jax.sample.stylizer import Stylizer

__all__ = ["stylize", "build_parser", "main"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def settings_from(settings: SamplerSettings | None = None, **overrides) -> SamplerSettings:
    """`settings` with `overrides`, checked; a setting that cannot work is an InputError naming its flags."""
    try:
        return (SamplerSettings() if settings is None else settings).replace(**overrides)
    except SettingsError as e:
        given = dataclasses.asdict(settings) if settings is not None else {
            f.name: f.default for f in dataclasses.fields(SamplerSettings)}
        s = {**given, **overrides}
        named = " / ".join(f"{_flag(n)} {s[n]}" for n in e.names)
        raise InputError(f"{named}: {e}") from e


def stylize(video, prompt: str, *, dit, vae, umt5, tokenizer, out, lora=None, side_by_side: bool = False,
            fps: float | None = None, dtype=None, progress: bool = True, stylizer=None, mesh=None,
            settings: SamplerSettings | None = None, **overrides) -> dict:
    """Reads `video`, stylises it and writes `out` (+ `out`.json); returns the JSON record.

    settings: a `SamplerSettings` (None: the defaults); overrides: its fields by keyword (steps, shift, skip,
    text_scale, context_scale, seed, solver, size, max_frames, long, cache, cache_threshold, mode, apg, frame_rule).
    `stylizer`: an already loaded `sample.Stylizer` to reuse (then dit/vae/umt5/tokenizer/lora are only recorded).
    fps: the rate to write at (None: the one that keeps the source's duration, `Stylizer.run`'s fps_out).
    mesh: the devices to run on: None (one device), a jax Mesh, or a --mesh spec ("data=2,fsdp=4", "auto";
    sample/devices.py). Only process 0 (`jax.process_index()`) writes files; every process returns the record.
    """
    s = settings_from(settings, **overrides)
    out = Path(out).absolute()
    if out.suffix.lower() not in video_lib.VIDEO_SUFFIXES + (".gif",):
        raise InputError(f"--out {out} must end in .mp4 (or another video suffix)")
    if out.is_dir():
        raise InputError(f"--out {out} is a directory")
    t_start = time.perf_counter()
    frames, src_fps = video_lib.read(video)
    n_in, h_in, w_in, _ = frames.shape
    try:
        plan = sizing.plan(n_in, h_in, w_in, size=s.size, max_frames=s.max_frames, fps=src_fps,
                           frame_rule=s.frame_rule, long=s.long)
    except ValueError as e:  # a clip sizing cannot use (too small)
        raise InputError(f"{video}: {e}") from e

    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        try:
            mesh = devices.make(mesh, n_branches=guidance.MODES[s.mode])
        except sharding.ShardingError as e:
            raise InputError(str(e)) from None

    t0 = time.perf_counter()
    if stylizer is None:
        stylizer = Stylizer.load(dit=dit, vae=vae, umt5=umt5, tokenizer=tokenizer, lora=lora, dtype=dtype, mesh=mesh)
    load_s = time.perf_counter() - t0
    text_len = stylizer.cfg.text_len
    n_tokens = len(stylizer.tokenizer.encode(clean_text(prompt))) + 1  # with </s>
    truncated = n_tokens > text_len
    if truncated:
        warnings.warn(f"the prompt has {n_tokens} tokens, more than the {text_len} the model reads: it is truncated "
                      f"to {text_len}", stacklevel=2)

    styled, info = stylizer.run(frames, prompt, settings=s, progress=progress, fps=src_fps)
    if fps is None:
        fps = info["fps_out"]  # keeps the source's duration (16 under the official rule)
    writer = jax.process_index() == 0  # every process has the frames; one writes them
    t0 = time.perf_counter()
    sbs = out.with_name(f"{out.stem}_side_by_side{out.suffix}") if side_by_side else None
    if writer:
        out.parent.mkdir(parents=True, exist_ok=True)
        video_lib.write(out, styled, fps=fps)
    if writer and side_by_side:
        source = sizing.resize_crop(frames[np.asarray(plan.indices)], plan.height, plan.width)
        video_lib.write(sbs, video_lib.side_by_side(source, styled), fps=fps)
    info["timing"].update(load_s=load_s, write_s=time.perf_counter() - t0, total_s=time.perf_counter() - t_start)
    record = {
        "video": str(video), "out": str(out), "side_by_side": str(sbs) if sbs else None, "prompt": prompt,
        "prompt_tokens": min(n_tokens, text_len), "prompt_truncated": truncated,
        "dit": str(dit), "vae": str(vae), "umt5": str(umt5), "tokenizer": str(tokenizer),
        "lora": str(lora) if lora else None, "dtype": dtype, "fps_in": src_fps, "fps": float(fps),
        "source_size": [int(n_in), int(h_in), int(w_in)],
        "mesh": None if stylizer.mesh is None else {k: int(v) for k, v in stylizer.mesh.shape.items()},
        "processes": jax.process_count(), **info, **dataclasses.asdict(s),
    }
    if writer:
        files.write_json(out.with_suffix(".json"), record)
    return record


def _add_settings(p: argparse.ArgumentParser) -> None:
    """One flag per SamplerSettings field: its name, type, choices, default and help."""
    g = p.add_argument_group("sampler settings (defaults: the paper's)")
    for f in dataclasses.fields(SamplerSettings):
        choices, default = f.metadata["choices"], f.default
        if f.name == "apg":  # named on the command line; SamplerSettings reads the names
            default = apg_name(default)
        kind = {"int": int, "float": float}.get(f.type, str)
        g.add_argument(_flag(f.name), dest=f.name, type=kind, choices=choices, default=default,
                       help=f.metadata["help"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pickstyle_jax.stylize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--video", required=True, help="input video (mp4/webm/gif) or a folder of frames")
    p.add_argument("--prompt", required=True, help='style prompt, e.g. "Anime style. A girl walks."')
    p.add_argument("--dit", required=True, help="converted Wan2.1-VACE DiT checkpoint dir")
    p.add_argument("--vae", required=True, help="converted Wan2.1 VAE checkpoint dir")
    p.add_argument("--umt5", required=True, help="converted umT5 checkpoint dir")
    p.add_argument("--tokenizer", required=True, help='spiece.model path (or "bytes" for tiny random models)')
    p.add_argument("--lora", default=None, help="PickStyle LoRA checkpoint dir (none: the base model)")
    p.add_argument("--out", required=True, help="output .mp4; OUT.json is written next to it")
    p.add_argument("--side-by-side", action="store_true", help="also write OUT_side_by_side.mp4 (source | output)")
    p.add_argument("--fps", type=float, default=None,
                   help="output frame rate (default: the one that keeps the input's duration)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="DiT weights dtype")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_settings(p)
    g = p.add_argument_group("devices and hosts")
    g.add_argument("--mesh", default=None,
                   help="run on many devices: axis=size pairs over every device present, e.g. data=2,fsdp=4 "
                        "(axes: data = CFG branches, fsdp = weights and branches, tensor = heads, context = video "
                        "tokens where the build has it; one size may be -1), or auto (branches over data as far as "
                        "they divide, the rest over context or fsdp). Default: one device")
    g.add_argument("--distributed.coordinator", dest="coordinator", default="",
                   help="multi-host: host:port of process 0 (train's --config.distributed.coordinator)")
    g.add_argument("--distributed.num_processes", dest="num_processes", type=int, default=1,
                   help="multi-host: number of processes")
    g.add_argument("--distributed.process_id", dest="process_id", type=int, default=0,
                   help="multi-host: this process's index (only process 0 writes outputs)")
    g.add_argument("--distributed.auto", dest="auto", action="store_true",
                   help="multi-host: let JAX find the cluster (TPU pod, SLURM, OMPI, Kubernetes)")
    errors.add_verbose_argument(p)
    return p


def main(argv=None) -> int:
    """The command line; returns the exit status: 0, or 2 after one line `error: ...` on stderr for bad input
    (errors.py; --verbose or PICKSTYLE_TRACEBACK=1 shows the traceback)."""
    args = build_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerSettings)}
    try:
        sharding.init_distributed({k: getattr(args, k) for k in ("coordinator", "num_processes", "process_id", "auto")},
                                  where="--distributed")
        record = stylize(args.video, args.prompt, dit=args.dit, vae=args.vae, umt5=args.umt5,
                         tokenizer=args.tokenizer, out=args.out, lora=args.lora, side_by_side=args.side_by_side,
                         fps=args.fps, dtype=args.dtype, progress=args.progress, mesh=args.mesh, **overrides)
    except Exception as e:  # noqa: BLE001 -- report() re-raises all but user errors
        return errors.report(e, args.verbose)
    if jax.process_index() != 0:
        return 0
    t = record["timing"]
    print(f"wrote {record['out']} ({record['frames_out']} frames, {record['height']}x{record['width']}, "
          f"{record['fps']:g} fps) in {t['total_s']:.1f} s; settings in {Path(record['out']).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
