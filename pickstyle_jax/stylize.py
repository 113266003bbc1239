"""Stylise a video from the command line.

    python -m pickstyle_jax.stylize --video IN.mp4 --prompt "Anime style. A girl walks." \
        --dit DIR --vae DIR --umt5 DIR --tokenizer spiece.model --lora DIR --out OUT.mp4

writes OUT.mp4 (and with --side-by-side OUT_side_by_side.mp4, source left) and OUT.json: every setting used,
the sizes, the windows and the timings. Everything that can be checked without compiling (the video decodes and
has frames, the checkpoints exist and fit together, the settings are valid, the prompt fits in 512 tokens: longer
ones are truncated with a warning) is checked first, and the outputs are written through temporary files, so a
failed run leaves nothing at --out.

Duration: the output lasts as long as the input and plays at its speed, by default and with --long chunked.
By default (--frame-rule keep) the clip is resampled to the model's 16 fps: one window of the nearest 4k + 1 frames when that fits
--max-frames, else overlapping windows of --max-frames covering the whole clip (a 10 s clip gives 160 frames, never
5 s); it is written at the rate that keeps the duration exact (33 frames at 30 fps -> 17 frames at 15.45 fps).
--long chunked keeps every source frame and the source's rate, in windows. --frame-rule official is the paper's
rule and the one that changes the duration: every clip resampled to --max-frames (81) frames at 16 fps. A source
without a frame rate (a folder of frames) is taken as 16 fps. --fps overrides the written rate (then the
duration changes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

from pickstyle_jax import errors
from pickstyle_jax.errors import InputError

__all__ = ["stylize", "build_parser", "main"]

DEFAULTS = dict(steps=20, shift=16.0, skip=4, text_scale=5.0, context_scale=4.0, seed=2025, solver="dpm++",
                size="480p", max_frames=81, long=None, cache=None, cache_threshold=0.2, mode="cs_cfg", apg="on",
                frame_rule="keep")


def _write_json(path: Path, record: dict) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_settings(s: dict) -> None:
    from pickstyle_jax import guidance, sample, schedulers, sizing

    if s["solver"] not in schedulers.SOLVERS:
        raise InputError(f"--solver must be one of {schedulers.SOLVERS}, got {s['solver']!r}")
    if s["mode"] not in sample.MODES:
        raise InputError(f"--mode must be one of {sample.MODES}, got {s['mode']!r}")
    guidance.apg_setting(s["apg"])
    if not 0 <= s["skip"] < s["steps"]:
        raise InputError(f"--skip must be in [0, --steps) = [0, {s['steps']}), got {s['skip']}")
    if s["long"] not in (None, "chunked"):
        raise InputError(f"--long must be 'chunked', got {s['long']!r}")
    if s["frame_rule"] not in sizing.FRAME_RULES:
        raise InputError(f"--frame-rule must be one of {sizing.FRAME_RULES}, got {s['frame_rule']!r}")
    if s["cache"] not in (None, "teacache"):
        raise InputError(f"--cache must be 'teacache', got {s['cache']!r}")
    try:  # validates --size, --max-frames and their combination with --long
        sizing.plan(1, 16, 16, size=s["size"], max_frames=s["max_frames"], frame_rule=s["frame_rule"],
                    long=s["long"])
    except ValueError as e:
        raise InputError(f"--size {s['size']} / --max-frames {s['max_frames']} / --frame-rule {s['frame_rule']} / "
                         f"--long {s['long']}: {e}") from e


def stylize(video, prompt: str, *, dit, vae, umt5, tokenizer, out, lora=None, side_by_side: bool = False,
            fps: float | None = None, dtype=None, progress: bool = True, stylizer=None, **settings) -> dict:
    """Reads `video`, stylises it and writes `out` (+ `out`.json); returns the JSON record.

    settings: the Stylizer's keywords (steps, shift, skip, text_scale, context_scale, seed, solver, size,
    max_frames, long, cache, cache_threshold, mode, apg, frame_rule); missing ones take the defaults. `stylizer`: an
    already loaded `sample.Stylizer` to reuse (then dit/vae/umt5/tokenizer/lora are only recorded). fps: the rate
    to write at (None: the one that keeps the source's duration, `Stylizer.run`'s fps_out).
    """
    from pickstyle_jax import sample, sizing
    from pickstyle_jax import video as video_lib
    from pickstyle_jax.models.tokenizer import clean_text

    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown settings {unknown}")
    s = {**DEFAULTS, **settings}
    _check_settings(s)
    out = Path(out).absolute()
    if out.suffix.lower() not in video_lib.VIDEO_SUFFIXES + (".gif",):
        raise InputError(f"--out {out} must end in .mp4 (or another video suffix)")
    if out.is_dir():
        raise InputError(f"--out {out} is a directory")
    t_start = time.perf_counter()
    frames, src_fps = video_lib.read(video)
    n_in, h_in, w_in, _ = frames.shape
    try:
        plan = sizing.plan(n_in, h_in, w_in, size=s["size"], max_frames=s["max_frames"], fps=src_fps,
                           frame_rule=s["frame_rule"], long=s["long"])
    except ValueError as e:  # a clip sizing cannot use (too small)
        raise InputError(f"{video}: {e}") from e

    t0 = time.perf_counter()
    if stylizer is None:
        stylizer = sample.Stylizer.load(dit=dit, vae=vae, umt5=umt5, tokenizer=tokenizer, lora=lora, dtype=dtype)
    load_s = time.perf_counter() - t0
    text_len = stylizer.cfg.text_len
    n_tokens = len(stylizer.tokenizer.encode(clean_text(prompt))) + 1  # with </s>
    truncated = n_tokens > text_len
    if truncated:
        warnings.warn(f"the prompt has {n_tokens} tokens, more than the {text_len} the model reads: it is truncated "
                      f"to {text_len}", stacklevel=2)

    styled, info = stylizer.run(frames, prompt, progress=progress, fps=src_fps, **s)
    if fps is None:
        fps = info["fps_out"]  # keeps the source's duration (16 under the official rule)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    video_lib.write(out, styled, fps=fps)
    sbs = None
    if side_by_side:
        source = sizing.resize_crop(frames[np.asarray(plan.indices)], plan.height, plan.width)
        sbs = out.with_name(f"{out.stem}_side_by_side{out.suffix}")
        video_lib.write(sbs, video_lib.side_by_side(source, styled), fps=fps)
    info["timing"].update(load_s=load_s, write_s=time.perf_counter() - t0, total_s=time.perf_counter() - t_start)
    record = {
        "video": str(video), "out": str(out), "side_by_side": str(sbs) if sbs else None, "prompt": prompt,
        "prompt_tokens": min(n_tokens, text_len), "prompt_truncated": truncated,
        "dit": str(dit), "vae": str(vae), "umt5": str(umt5), "tokenizer": str(tokenizer),
        "lora": str(lora) if lora else None, "dtype": dtype, "fps_in": src_fps, "fps": float(fps),
        "source_size": [int(n_in), int(h_in), int(w_in)], **info,
    }
    _write_json(out.with_suffix(".json"), record)
    return record


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
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--shift", type=float, default=DEFAULTS["shift"])
    p.add_argument("--skip", type=int, default=DEFAULTS["skip"], help="grid steps skipped (partial-noise start)")
    p.add_argument("--text-scale", type=float, default=DEFAULTS["text_scale"])
    p.add_argument("--context-scale", type=float, default=DEFAULTS["context_scale"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--solver", choices=("dpm++", "unipc", "euler"), default=DEFAULTS["solver"])
    p.add_argument("--mode", choices=("cs_cfg", "text", "text_context", "none"), default=DEFAULTS["mode"],
                   help="guidance: cs_cfg (3 branches), text / text_context (2), none (1)")
    p.add_argument("--apg", choices=("on", "scaled", "off"), default=DEFAULTS["apg"],
                   help="adaptive projected guidance: on (PickStyle's, norm threshold 55 at any size), scaled "
                        "(threshold kept per latent element: 55 at 81 x 480 x 832, less on smaller clips), off")
    p.add_argument("--size", default=DEFAULTS["size"], help="480p | 720p (area rules, aspect kept) | HxW")
    p.add_argument("--max-frames", type=int, default=DEFAULTS["max_frames"],
                   help="frames per window (4k+1); longer clips are covered by overlapping windows")
    p.add_argument("--frame-rule", choices=("keep", "official"), default=DEFAULTS["frame_rule"],
                   help="keep: resample to the model's 16 fps, keeping the duration; official: the paper's rule, "
                        "every clip resampled to --max-frames frames, written at 16 fps (changes the duration)")
    p.add_argument("--long", choices=("chunked",), default=None,
                   help="chunked: keep every source frame and the source's fps, in overlapping windows")
    p.add_argument("--cache", choices=("teacache",), default=None, help="step caching (approximate)")
    p.add_argument("--cache-threshold", type=float, default=DEFAULTS["cache_threshold"],
                   help="TeaCache: skip steps until the accumulated change reaches it; <= 0 never skips")
    p.add_argument("--side-by-side", action="store_true", help="also write OUT_side_by_side.mp4 (source | output)")
    p.add_argument("--fps", type=float, default=None,
                   help="output frame rate (default: the one that keeps the input's duration)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="DiT weights dtype")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    errors.add_verbose_argument(p)
    return p


def main(argv=None) -> int:
    """The command line; returns the exit status: 0, or 2 after one line `error: ...` on stderr for bad input
    (errors.py; --verbose or PICKSTYLE_TRACEBACK=1 shows the traceback)."""
    args = build_parser().parse_args(argv)
    settings = {k: getattr(args, k) for k in DEFAULTS}
    try:
        record = stylize(args.video, args.prompt, dit=args.dit, vae=args.vae, umt5=args.umt5,
                         tokenizer=args.tokenizer, out=args.out, lora=args.lora, side_by_side=args.side_by_side,
                         fps=args.fps, dtype=args.dtype, progress=args.progress, **settings)
    except Exception as e:  # noqa: BLE001 -- report() re-raises all but user errors
        return errors.report(e, args.verbose)
    t = record["timing"]
    print(f"wrote {record['out']} ({record['frames_out']} frames, {record['height']}x{record['width']}, "
          f"{record['fps']:g} fps) in {t['total_s']:.1f} s; settings in {Path(record['out']).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
