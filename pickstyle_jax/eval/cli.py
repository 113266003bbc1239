"""Scores a stylisation of any clip without ground truth: `python -m pickstyle_jax.evaluate`.

    python -m pickstyle_jax.evaluate --source IN.mp4 --stylized OUT.mp4 [--out SCORES.json]

Both clips are read with pickstyle_jax.video (mp4/webm/mov/..., gif, or a folder of frames) and must have the same
frame count and frame size: score the clip that was stylised, at the stylisation's size (stylize resizes to its
--size and keeps a 4k+1 frame count; `--size HxW --max-frames N` with the source's values keeps them). Metrics,
defined in pickstyle_jax/eval/metrics.py, in [0, 1] pixel units:

| metric | better | what it is |
|---|---|---|
| temporal_error | lower | mean abs error of the stylisation's frame t+1 against its frame t moved by the source's motion, on the pixels where that motion explains the source (`metrics.source_motion`: one global translation per frame pair, a still or panning camera); null if it explains no pixel |
| flicker | lower | mean abs difference between the stylisation's frame differences and the source's |
| content | higher | edge-map F1 agreement with the source (2-pixel tolerance) |

Prints the table and writes the scores as JSON to --out (atomically). Bad input (a missing or unreadable file,
mismatched clips) is one `error:` line on stderr and exit status 2. The demo's synthetic ground-truth benchmark is
`python -m pickstyle_jax.demo.evaluate --workdir DIR`.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from pickstyle_jax import errors, files, video
from pickstyle_jax.errors import InputError
from pickstyle_jax.eval import metrics

__all__ = ["METRICS", "read_pair", "score", "main"]

METRICS = {"temporal_error": "lower", "flicker": "lower", "content": "higher"}  # name -> better
BENCHMARK = "python -m pickstyle_jax.demo.evaluate --workdir"


def _read(flag: str, path) -> np.ndarray:
    try:
        frames, _ = video.read(path)
    except video.VideoError as e:
        raise InputError(f"{flag}: {e}") from e
    return frames


def read_pair(source, stylized) -> tuple[np.ndarray, np.ndarray]:
    """(source, stylized) uint8 [F, H, W, 3] each, checked to match in frame count and size."""
    src, out = _read("--source", source), _read("--stylized", stylized)
    (fs, hs, ws), (fo, ho, wo) = src.shape[:3], out.shape[:3]
    if (hs, ws) != (ho, wo):
        raise InputError(f"--stylized {stylized} is {ho}x{wo} but --source {source} is {hs}x{ws}: give the source at "
                         f"the stylisation's size (resize it to {ho}x{wo}), or stylise with --size {hs}x{ws}")
    if fs != fo:
        raise InputError(f"--stylized {stylized} has {fo} frames but --source {source} has {fs}: give the clip that "
                         f"was stylised (its first {fo} frames), or stylise with --max-frames {fs} (4k+1 frames)")
    return src, out


def score(source: np.ndarray, stylized: np.ndarray) -> dict:
    """{"temporal_error", "flicker", "content", "valid_fraction"} of a stylised clip against its source (uint8 or
    [-1, 1] float [F, H, W, 3]); valid_fraction: the share of pixels temporal_error is measured on (NaN if none)."""
    flow, valid = metrics.source_motion(source)
    return {"temporal_error": metrics.temporal_error(stylized, flow, valid),
            "flicker": metrics.flicker(stylized, source), "content": metrics.content(stylized, source),
            "valid_fraction": float(valid.mean()) if valid.size else 0.0}


def _fmt(v: float) -> str:
    return "null" if not math.isfinite(v) else f"{v:.4f}"


def table(scores: dict) -> str:
    lines = ["| metric | value | better |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(scores[k])} | {better} |" for k, better in METRICS.items()]
    return "\n".join(lines)


def _finite_or_none(v: float):
    return v if math.isfinite(v) else None  # strict JSON has no NaN


def evaluate(source, stylized, out=None) -> dict:
    """Reads, checks and scores the pair; writes `out` (JSON) if given; returns the record written."""
    src, sty = read_pair(source, stylized)
    s = score(src, sty)
    f, h, w = src.shape[:3]
    record = {"source": str(source), "stylized": str(stylized), "frames": f, "height": h, "width": w,
              "metrics": {k: _finite_or_none(s[k]) for k in METRICS}, "valid_fraction": s["valid_fraction"]}
    if out is not None:
        files.write_json(out, record)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pickstyle_jax.evaluate",
                                description="Scores a stylisation of any clip without ground truth: temporal error, "
                                            "flicker and content preservation (pickstyle_jax/eval/cli.py).")
    p.add_argument("--source", help="the input clip (a video file or a folder of frames)")
    p.add_argument("--stylized", help="its stylisation, same frame count and size")
    p.add_argument("--out", default=None, help="write the scores here as JSON (FILE.json)")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)  # the old benchmark form: a pointer to it
    errors.add_verbose_argument(p)
    a = p.parse_args(argv)
    try:
        if a.workdir is not None:
            raise InputError(f"--workdir: the synthetic ground-truth benchmark moved to the demo; run "
                             f"`{BENCHMARK} {a.workdir}`")
        if not a.source or not a.stylized:
            raise InputError("give both --source IN.mp4 and --stylized OUT.mp4 (the clip and its stylisation)")
        if a.out is not None and Path(a.out).suffix.lower() != ".json":
            raise InputError(f"--out {a.out}: the scores are JSON; name a FILE.json")
        record = evaluate(a.source, a.stylized, a.out)
    except Exception as e:  # noqa: BLE001 -- report() re-raises all but user errors
        return errors.report(e, a.verbose)
    print(table({k: (np.nan if v is None else v) for k, v in record["metrics"].items()}))
    print(f"{record['frames']} frames of {record['height']}x{record['width']}; temporal_error on the "
          f"{100 * record['valid_fraction']:.1f}% of pixels the source's estimated motion explains")
    if a.out:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
