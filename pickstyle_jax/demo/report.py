"""The demo benchmark's report: the summaries over seeds and of guidance, results.md's tables and the pictures
(demo/evaluate.py runs the methods and scores them; this summarises and writes).

- `seed_summary`: results.json "seeds" (per method the metrics per world seed, mean, min, max, spread);
- `guidance_summary`: results.json "guidance_summary" (the branches' cost; the context direction per text scale);
- `markdown`: results.md.

Pictures (PIL only, no plotting library):
- `plot_rows`: plot.png, one bar panel per metric, one bar per method;
- `strip`: strip_<i>.png, evenly spaced frames of source / ours / ground truth, one row each;
- `overview`: overview.png, the middle frame of up to 4 clips, one row per clip, columns source | ours (cs_cfg) |
  ground truth under a label band, every frame upscaled by nearest neighbour (`upscale_factor`: x4 at 32 px high);
- `guidance_grid`: guidance_grid.png, the first ablation clip's middle frame at every (text scale, context scale)
  of the scale grid, rows = text scales, columns = context scales, each cell captioned with its scales and that
  clip's PSNR and content.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pickstyle_jax import video

METRICS = ("psnr", "ssim", "temporal_error", "flicker", "content", "style")
BETTER = {"psnr": "higher", "ssim": "higher", "temporal_error": "lower", "flicker": "lower", "content": "higher",
          "style": "lower"}
GAP = 2          # white pixels right of and below every tile
LABEL_H = 16     # overview's column-label band
CAPTION_H = 26   # guidance grid: two caption lines under each cell


# ------------------------------------------------------------------------------------------- summaries
def seed_summary(per_seed: dict) -> dict:
    """{seed: rows} -> results.json "seeds": per method its metrics per seed, and their mean, min, max and spread
    ((max - min) / 2) over the seeds. Methods: those every seed has, in the first seed's order."""
    seeds = list(per_seed)
    common = [r["method"] for r in per_seed[seeds[0]]
              if all(any(q["method"] == r["method"] for q in per_seed[s]) for s in seeds)]
    out = {"seeds": seeds, "spread": "(max - min) / 2 over the seeds (min and max are given too)", "methods": {}}
    for m in common:
        per = [{"seed": s, **{k: v for k, v in next(q for q in per_seed[s] if q["method"] == m).items()
                              if k in (*METRICS, "s_per_step")}} for s in seeds]
        keys = [k for k in per[0] if k != "seed"]
        vals = {k: np.array([p[k] for p in per], np.float64) for k in keys}
        out["methods"][m] = {"per_seed": per, "mean": {k: float(np.nanmean(v)) for k, v in vals.items()},
                             "min": {k: float(np.nanmin(v)) for k, v in vals.items()},
                             "max": {k: float(np.nanmax(v)) for k, v in vals.items()},
                             "spread": {k: float(np.nanmax(v) - np.nanmin(v)) / 2 for k, v in vals.items()}}
    return out


def _direction(name: str, d: float, unit: str = "") -> str:
    word = "raises" if d > 0 else "lowers" if d < 0 else "keeps"
    return f"{word} {name} ({d:+.3f}{unit})"


def guidance_summary(rows: list[dict], ablations: dict | None = None, seeds=None, timing: str = "warm") -> dict:
    """The evidence on guidance: the cost of each branch (s_per_step of cs_cfg, text_cfg and no_guidance in `rows`,
    e.g. the seed means) and, from the scale table of `ablations`, content, PSNR and style distance at context scale
    0, 1 and the largest per text scale, with the change of content and PSNR from 0 and from 1 to the largest in
    words."""
    by = {r["method"]: r for r in rows}
    cs, tx, no = (float(by[m]["s_per_step"]) for m in ("cs_cfg", "text_cfg", "no_guidance"))
    out = {"branch_cost": {"timing": timing, "seeds": list(seeds or []), "cs_cfg": cs, "text_cfg": tx,
                           "no_guidance": no, "third_branch_s_per_step": cs - tx,
                           "cs_over_text": cs / tx if tx > 0 else float("nan"),
                           "cs_over_none": cs / no if no > 0 else float("nan")}}
    grid = (ablations or {}).get("scales")
    if grid:
        top = max(r["context_scale"] for r in grid)
        summary = []
        for ts in sorted({r["text_scale"] for r in grid}):
            at = {r["context_scale"]: r for r in grid if r["text_scale"] == ts}
            pick = {"0": at.get(0.0), "1": at.get(1.0), "max": at[top]}
            row = {"text_scale": ts, "context_max": top}
            for k in ("content", "psnr", "style"):  # style: at equal style? (the paper's claim is more content)
                row[k] = {c: (None if r is None or k not in r else float(r[k])) for c, r in pick.items()}
            for frm in ("0", "1"):
                if pick[frm] is None:
                    row[f"verdict_from_{frm}"] = "not in the grid"
                    continue
                dc, dp = row["content"]["max"] - row["content"][frm], row["psnr"]["max"] - row["psnr"][frm]
                row[f"verdict_from_{frm}"] = f"{_direction('content', dc)}, {_direction('PSNR', dp, ' dB')}"
            summary.append(row)
        out["context_direction"] = summary
    return out


# --------------------------------------------------------------------------------------------- markdown
def fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        if np.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def markdown_table(rows: list[dict], first: list[str]) -> str:
    cols = first + [c for c in (*METRICS, "s_per_step", "steps") if c in rows[0]]
    cols += [c for c in rows[0] if c not in cols]
    head = [c + (" ↑" if BETTER.get(c) == "higher" else " ↓" if BETTER.get(c) == "lower" else "") for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]

    def cell(c, v):  # settings read as written (5, 2.5), measurements with fixed precision
        return f"{v:g}" if c in first and isinstance(v, float) else fmt(v)

    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def seeds_table(seeds: dict) -> str:
    """Per method "mean ± spread" over the world seeds (results.json "seeds")."""
    cols = [c for c in (*METRICS, "s_per_step") if c in next(iter(seeds["methods"].values()))["mean"]]
    head = [c + (" ↑" if BETTER.get(c) == "higher" else " ↓" if BETTER.get(c) == "lower" else "") for c in cols]
    lines = ["| method | " + " | ".join(head) + " |", "|" + "---|" * (len(cols) + 1)]
    for m, s in seeds["methods"].items():
        lines.append(f"| {m} | " + " | ".join(pm(s["mean"][c], s["spread"][c]) for c in cols) + " |")
    return "\n".join(lines)


def pm(mean: float, spread: float) -> str:
    """"mean ± spread", both at the mean's precision (`fmt`)."""
    if mean is None or spread is None or not (np.isfinite(mean) and np.isfinite(spread)):
        return f"{fmt(mean)} ± {fmt(spread)}"
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def guidance_md(g: dict) -> list[str]:
    cost = g["branch_cost"]
    parts = ["", "## Guidance", "",
             f"Cost of the branches ({cost['timing']} timing, seconds per executed step, mean over world seeds "
             f"{', '.join(map(str, cost['seeds']))}): cs_cfg (3 branches) {fmt(cost['cs_cfg'])}, text_cfg (2) "
             f"{fmt(cost['text_cfg'])}, no_guidance (1) {fmt(cost['no_guidance'])}; the third branch adds "
             f"{fmt(cost['third_branch_s_per_step'])} s/step (cs_cfg / text_cfg = {fmt(cost['cs_over_text'])}x)."]
    rows = g.get("context_direction")
    if rows:
        top = rows[0]["context_max"]
        parts += ["", f"Context direction, from the scale grid (the ablation clips): context scale 0 takes the "
                      f"context out of the prediction (without APG it is v_null + text_scale (v_cond - v_null_text)), "
                      f"1 is the conditional branch with text guidance only, {top:g} the largest in the grid. "
                      f"Content and PSNR at each, and what going from 0 or 1 to {top:g} does:",
                  "", "| text scale | content c0 | content c1 | content c" + f"{top:g}" + " | psnr c0 | psnr c1 | "
                  f"psnr c{top:g} | 0 → {top:g} | 1 → {top:g} |", "|" + "---|" * 9]
        for r in rows:
            parts.append(f"| {r['text_scale']:g} | " + " | ".join(
                fmt(r[k].get(c)) for k in ("content", "psnr") for c in ("0", "1", "max")) +
                f" | {r['verdict_from_0']} | {r['verdict_from_1']} |")
    return parts


def markdown(result: dict) -> str:
    s = result["settings"]
    parts = [f"# Evaluation of {result['run']}", "",
             f"{len(result['clips'])} held-out clips ({s['frames']} x {s['height']} x {s['width']}, styles "
             f"{', '.join(s['styles'])}, world seed {s['seed']}); sampler {s['solver']}, {s['steps']} steps, "
             f"shift {s['shift']}, skip {s['skip']}, text scale {s['text_scale']}, context scale "
             f"{s['context_scale']}, APG {fmt(s['apg'])}. psnr/ssim against the ground truth; temporal_error "
             f"under the known motion; flicker and content against the source; style = distance to reference "
             f"frames of the style; s_per_step = wall seconds per executed step ({s['timing']} timing: "
             f"{TIMING[s['timing']]}). Baselines: copy_source is the source itself; per_frame stylises each frame "
             f"alone; color_transfer moves the source's per-channel mean/std to those of the style's training "
             f"targets; ae_ceiling is the ground truth encoded and decoded by the autoencoder (the best the sampler "
             f"can reach).", "",
             markdown_table(result["rows"], ["method"]), "",
             "Ground truth (a perfect stylisation) scores: " +
             ", ".join(f"{k} {fmt(v)}" for k, v in result["reference"].items()) + "."]
    if "seeds" in result:
        sd = result["seeds"]
        parts += ["", f"## Over world seeds {', '.join(map(str, sd['seeds']))}: mean ± spread", "",
                  f"{s['clips']} clips per seed; spread = {sd['spread']}.", "", seeds_table(sd)]
    if "guidance_summary" in result:
        parts += guidance_md(result["guidance_summary"])
    for name, rows in result.get("ablations", {}).items():
        first = [k for k in rows[0] if k not in (*METRICS, "s_per_step", "steps")]
        note = [ABLATION_NOTES[name], ""] if name in ABLATION_NOTES else []
        parts += ["", f"## Ablation: {name}", "", *note, markdown_table(rows, first)]
    return "\n".join(parts) + "\n"


TIMING = {"warm": "each compiled sampler's first, compiling call is not timed",
          "cold": "plain wall time, including the compile of a compiled sampler's first call"}
ABLATION_NOTES = {"scales": "All scale pairs run one compiled sampler (the scales are call-time inputs)."}

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (214, 39, 40), (140, 86, 75),
            (227, 119, 194), (127, 127, 127)]


def plot_rows(path, rows: list[dict]) -> Path:
    """A PNG bar chart: one panel per metric, one bar per method."""
    pw, ph, pad = max(220, 44 * len(rows)), 180, 28  # bars wide enough for their labels
    img = Image.new("RGB", (pad + len(METRICS) * (pw + pad), ph + 3 * pad + 14 * len(rows)), "white")
    d = ImageDraw.Draw(img)
    for j, m in enumerate(METRICS):
        x0 = pad + j * (pw + pad)
        vals = np.array([r.get(m, np.nan) for r in rows], np.float64)
        top = np.nanmax(np.abs(vals)) if np.isfinite(vals).any() else 1.0
        top = top if top > 0 else 1.0
        d.text((x0, 6), f"{m} ({BETTER[m]} better)", fill="black")
        d.rectangle([x0, pad, x0 + pw, pad + ph], outline=(180, 180, 180))
        bw = pw / max(len(rows), 1)
        for i, v in enumerate(vals):
            if not np.isfinite(v):
                continue
            hgt = (ph - 16) * abs(v) / top
            bx = x0 + i * bw
            d.rectangle([bx + 4, pad + ph - hgt, bx + bw - 4, pad + ph], fill=_COLOURS[i % len(_COLOURS)])
            d.text((bx + 4, pad + ph - hgt - 12), fmt(float(v)), fill="black")
    for i, r in enumerate(rows):
        y = ph + 2 * pad + 14 * i
        d.rectangle([pad, y + 2, pad + 10, y + 12], fill=_COLOURS[i % len(_COLOURS)])
        d.text((pad + 16, y), r["method"], fill="black")
    path = Path(path)
    img.save(path)
    return path


def strip(path, rows: list[np.ndarray], n: int = 8) -> Path:
    """PNG: one row of n evenly spaced frames per video (source / ours / ground truth), GAP px white gaps."""
    f = len(rows[0])
    idx = np.unique(np.round(np.linspace(0, f - 1, max(1, min(n, f)))).astype(int))
    lines = []
    for v in rows:
        frames = [np.pad(fr, ((0, GAP), (0, GAP), (0, 0)), constant_values=255) for fr in v[idx]]
        lines.append(np.concatenate(frames, axis=1))
    Image.fromarray(np.concatenate(lines, axis=0)).save(path)
    return Path(path)


def upscale_factor(height: int) -> int:
    """Nearest-neighbour zoom that makes a frame at least ~128 px high (x4 for the demo's 32 px), 1 for large ones."""
    return max(1, 128 // max(int(height), 1))


def _tile(frame: np.ndarray, k: int) -> np.ndarray:
    big = np.repeat(np.repeat(frame, k, axis=0), k, axis=1)
    return np.pad(big, ((0, GAP), (0, GAP), (0, 0)), constant_values=255)


def overview(path, clips, ours: list[np.ndarray], n: int = 4) -> Path:
    """overview.png (module docstring): size (LABEL_H + rows (k H + GAP)) x 3 (k W + GAP), rows = min(n, clips)."""
    rows = []
    for c, o in list(zip(clips, ours))[:n]:
        mid = len(c.source) // 2
        k = upscale_factor(c.source.shape[1])
        rows.append(np.concatenate([_tile(v[mid], k) for v in (c.source, o, c.target)], axis=1))
    body = np.concatenate(rows, axis=0)
    img = Image.new("RGB", (body.shape[1], LABEL_H + body.shape[0]), "white")
    img.paste(Image.fromarray(body), (0, LABEL_H))
    d = ImageDraw.Draw(img)
    col = body.shape[1] // 3
    for j, name in enumerate(("source", "ours (cs_cfg)", "ground truth")):
        d.text((j * col + 2, 2), name, fill="black")
    img.save(path)
    return Path(path)


def guidance_grid(path, cells: list[dict]) -> Path:
    """guidance_grid.png (module docstring). cells: {"text_scale", "context_scale", "frame" uint8 [H, W, 3], "psnr",
    "content"}; size rows (k H + CAPTION_H + GAP) x columns (k W + GAP)."""
    ts = sorted({c["text_scale"] for c in cells})
    cs = sorted({c["context_scale"] for c in cells})
    h, w = cells[0]["frame"].shape[:2]
    k = upscale_factor(h)
    ch, cw = k * h + CAPTION_H + GAP, k * w + GAP
    img = Image.new("RGB", (len(cs) * cw, len(ts) * ch), "white")
    d = ImageDraw.Draw(img)
    for c in cells:
        y, x = ts.index(c["text_scale"]) * ch, cs.index(c["context_scale"]) * cw
        img.paste(Image.fromarray(_tile(c["frame"], k)[:k * h, :k * w]), (x, y))
        d.text((x + 2, y + k * h + 1), f"text {c['text_scale']:g}  context {c['context_scale']:g}", fill="black")
        d.text((x + 2, y + k * h + 13), f"psnr {c['psnr']:.2f}  content {c['content']:.2f}", fill="black")
    img.save(path)
    return Path(path)


def write_videos(out_dir: Path, clip, ours: np.ndarray, fps: float = 16.0):
    sbs = np.concatenate([clip.source, ours, clip.target], axis=2)
    return [video.write(out_dir / "stylized.mp4", ours, fps), video.write(out_dir / "side_by_side.mp4", sbs, fps)]
