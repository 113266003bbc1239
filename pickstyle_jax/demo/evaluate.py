"""The demo's benchmark: measured style transfer on held-out synthetic clips with exact ground truth.

    python -m pickstyle_jax.demo.evaluate --workdir DIR [--clips N] [--seeds 0,1,2 | --seed S] [--ablations]

DIR is a finished training run: DIR/config.json (the resolved training config: `model.*` checkpoints, tokenizer,
clip geometry `data.frames/height/width`, the synthetic styles it trained on) and DIR/lora/ (the trained LoRA).
For the run's style(s) the held-out motion world (`demo.world`: objects translating and rotating on their own under
a moving camera) renders N source clips per world seed with their ground-truth stylisation and exact motion; every
row below is scored on them:

| row | what it is |
|---|---|
| cs_cfg | the PickStyle sampler: three branches, context-style CFG with APG |
| text_cfg | two branches, text guidance only (mode "text") |
| no_guidance | one branch, no guidance (mode "none") |
| copy_source | the output is the source clip itself (a model that does nothing) |
| per_frame | every frame stylised on its own as a one-frame video with its own noise (the flickering baseline) |
| color_transfer | the source, its per-channel mean/std moved to the style's training targets' (a palette, no model) |
| ae_ceiling | the ground truth encoded and decoded by the run's autoencoder: the most the sampler can reach |

Per row, averaged over clips: psnr and ssim against the ground truth, temporal_error (under the known motion),
flicker and content against the source, style (distance to reference frames of other scenes in the style), and
s_per_step: the stylisation's wall time (VAE encode, sampler, decode) per executed sampler step (0 for the
baselines); with `--timing warm` (default) compile time is excluded (the first call of every compiled sampler is not
timed; with a single clip it is rerun once for the timing; results.json says which in
settings.s_per_step_excludes_compile). A compiled sampler serves one static setting (solver, steps, shift, skip,
mode, apg, cache, cache_threshold), clip shape and prompt bucket (the Stylizer cuts the umT5 rows to the
power-of-two length holding the caption, `text.bucket_length`): the guidance scales are call-time inputs of
`sample.Sampler` (`CALL_TIME`), so all scale pairs share it, and so do all world seeds (a caption in a length bucket
not seen before compiles, and that call is not timed). Definitions: `pickstyle_jax.eval.metrics`.
The ground truth's own temporal error, flicker, content and style are reported as `reference` (what a perfect
stylisation scores).

World seeds (`--seeds`, default the one `--seed`): the main rows, the pictures and the ablations are the first
seed's; every later seed runs SEED_METHODS (all rows but per_frame). results.json "seeds" holds per method the
metrics per seed and their mean, min, max and spread = (max - min) / 2; results.md shows mean ± spread.
"guidance_summary" gives the measured cost of the branches (s_per_step of cs_cfg, text_cfg, no_guidance, means over
the seeds, `--timing`'s kind) and, with `--ablations`, per text scale the content and PSNR at context scale 0 (no
context in the prediction), 1 (the plain conditional) and the largest, with the direction of each change.

Writes OUT (default DIR/eval): results.json ({"rows": [...], "reference", "seeds", "guidance_summary", "ablations",
"settings", "clips", "style_stats", "sampler_compiles"}), results.md (the tables), strip_<i>.png per clip (rows:
source, cs_cfg, ground truth), overview.png (the middle frame of up to 4 clips: source | ours | ground truth,
upscaled), plot.png (a bar chart per metric), and for the first clip stylised.mp4 (cs_cfg) and side_by_side.mp4
(source | cs_cfg | ground truth); pictures: `demo.report`.

`--ablations` adds, on the first `--ablation-clips` clips: the text x context scale grid (SCALE_GRID, also drawn as
guidance_grid.png: the first clip's middle frame per scale pair with its PSNR and content), skip, APG (on:
PickStyle's absolute norm threshold; scaled: the same threshold per latent element; off), the 3-branch CS-CFG against
the 2-branch "text" and "text_context" modes, and TeaCache against uncached sampling; every row with its wall time
per step. The scale pairs run the main cs_cfg row's compiled sampler (no compile of their own); the other tables
compile once per new static setting (skip 0, 2, 6; the other APG settings; text_context; TeaCache).
results.json's `sampler_compiles` counts the compiled samplers (static setting x clip shape x prompt bucket) used.

Base models: a `model.*` path is loaded; an empty one is rebuilt as the training run built it (a random init of
the named variant from `config.seed`, with the training script's keys), so runs on random backbones evaluate too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from pickstyle_jax import base as base_lib
from pickstyle_jax import checkpoints, conditioning, errors, files, sample, schedulers
from pickstyle_jax.data import pipeline, synthetic
from pickstyle_jax.data.synthetic import SYNTHETIC_STYLES
from pickstyle_jax.demo import report, world
from pickstyle_jax.demo.report import METRICS
from pickstyle_jax.errors import InputError
from pickstyle_jax.eval import baselines, features, metrics
from pickstyle_jax.guidance import apg_setting
from pickstyle_jax import text as text_lib
from pickstyle_jax import tokenizer as tokenizer_lib
from pickstyle_jax.models import autoencoders, umt5, vae, wan
from pickstyle_jax.sample.settings import APG_NAMES, CALL_TIME, SamplerSettings
from pickstyle_jax.train import config as train_config

__all__ = ["ROWS", "SEED_METHODS", "METRICS", "SCALE_GRID", "evaluate", "load_stylizer", "read_run_config",
           "style_stats", "autoencode", "main"]

# method -> sampler settings over the defaults (None: a baseline without the sampler, `_baseline`)
ROWS = {"cs_cfg": {"mode": "cs_cfg"}, "text_cfg": {"mode": "text"}, "no_guidance": {"mode": "none"},
        "copy_source": None, "per_frame": {"mode": "cs_cfg"}, "color_transfer": None, "ae_ceiling": None}
# the rows run on every world seed after the first (per_frame, the costliest, only on the first)
SEED_METHODS = ("cs_cfg", "text_cfg", "no_guidance", "color_transfer", "ae_ceiling", "copy_source")
DEFAULTS = SamplerSettings().sampler_kwargs()  # make_sampler's settings, the paper's defaults


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- the run
def read_run_config(workdir) -> dict:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --workdir must be a training run directory (training writes "
                                f"config.json there when it starts)")
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise InputError(f"{path}: cannot read it as JSON ({e})") from e
    if not isinstance(run, dict):
        raise InputError(f"{path}: not a training run's config (a JSON object)")
    return run


def _get(cfg: dict, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _resolve(path: str, workdir: Path) -> str:
    """A checkpoint path from config.json: as written (relative to the working directory), else under the run."""
    if not path or Path(path).exists() or not (workdir / path).exists():
        return path
    return str(workdir / path)


def load_stylizer(workdir, run: dict | None = None, lora=None):
    """A `sample.Stylizer` for the run: its base models (loaded or re-initialised as trained) and its LoRA."""
    workdir = Path(workdir)
    run = read_run_config(workdir) if run is None else run
    m = lambda k, d="": _get(run, f"model.{k}", d)  # noqa: E731
    seed = int(run.get("seed", 0))
    lora_dir = Path(lora) if lora else workdir / "lora"
    if not (lora_dir / "config.json").is_file():
        raise FileNotFoundError(f"no trained LoRA at {lora_dir} (training writes DIR/lora/ when it finishes); pass "
                                f"--lora to evaluate another one")
    adapters = checkpoints.load_lora(lora_dir)
    dit, vae_dir, umt5_dir = (_resolve(m(k), workdir) for k in ("dit", "vae", "umt5"))
    try:  # the run's model.* run-time keys (layout, compute dtype, attention), as training ran them
        options = base_lib.options_from(run.get("model") or {})
    except ValueError as e:
        _log(f"keeping the default run-time options ({e})")
        options = wan.Options.default()
    # an empty path: the named variant, text width from the encoder, the same random draw as training
    b = base_lib.load_base(
        dit, vae_dir, umt5_dir, options=options, dtype=m("param_dtype") or None, seed=seed,
        dit_config=None if dit else wan.WanConfig.named(m("variant"), param_dtype=m("param_dtype") or "float32",
                                                        text_dim=umt5.Umt5Config.named(m("umt5_variant")).d_model),
        vae_config=None if vae_dir else vae.VaeConfig.named(m("vae_variant")),
        umt5_config=None if umt5_dir else umt5.Umt5Config.named(m("umt5_variant")))
    if not dit:
        _log(f"model.dit is empty: re-initialised {m('variant')!r} from seed {seed} as the training run did")
    tok = tokenizer_lib.load_tokenizer(m("tokenizer") or ("bytes" if not umt5_dir else ""))
    try:
        return sample.Stylizer(b.cfg, b.params, adapters, b.vae_cfg, b.vae_params, b.text_cfg, b.text_params, tok,
                               options=b.options)
    except sample.CompatibilityError as e:
        used = ", ".join(f"{k} {v or 'random'}" for k, v in (("lora", lora_dir), ("dit", dit), ("vae", vae_dir),
                                                              ("umt5", umt5_dir)))
        raise sample.CompatibilityError(f"{workdir / 'config.json'} ({used}): {e}") from e


# --------------------------------------------------------------------------------------------- sampling
def _compile_key(settings: dict) -> tuple:
    """The settings that select a compiled sampler (all but the call-time CALL_TIME), sorted: (name, value)."""
    return tuple(sorted((k, v) for k, v in settings.items() if k not in CALL_TIME))


class _Runner:
    """Stylises clips with the Stylizer, memoising results per (settings, clip) and timing warm calls only.

    A call is cold (it compiles) when its _compile_key, clip shape and prompt bucket are new: scale pairs of one
    static setting share one compile, so only the first call of the first of them is cold. The prompt bucket is
    there because the Stylizer cuts a prompt's umT5 rows to the power-of-two bucket holding it
    (`text.bucket_length`), and the sampler compiles once per text shape: a caption of a new length class compiles
    again, whatever the world seed."""

    def __init__(self, stylizer, base: dict, timing: str):
        self.stylizer, self.base, self.timing = stylizer, base, timing
        self._seen: set = set()
        self._memo: dict = {}
        self._warm: dict = {}  # (settings, per_frame) -> warm seconds per clip measured so far

    @property
    def compiles(self) -> int:
        """Compiled samplers used so far: distinct (_compile_key, clip shape, prompt bucket) of the calls made."""
        return len(self._seen)

    def _bucket(self, prompt: str):
        """The prompt's text bucket as the Stylizer cuts it (None for a stand-in without a tokenizer)."""
        tok, cfg = getattr(self.stylizer, "tokenizer", None), getattr(self.stylizer, "cfg", None)
        if tok is None or cfg is None:
            return None
        _, mask = tok([prompt], max_len=cfg.text_len)
        return text_lib.bucket_length(int(np.asarray(mask).sum()), cfg.text_len)

    def _call(self, frames, prompt, settings, seed):
        key = _compile_key(settings) + (frames.shape, self._bucket(prompt))
        first = key not in self._seen
        self._seen.add(key)
        f, h, w, _ = frames.shape
        out, info = self.stylizer.run(frames, prompt, size=f"{h}x{w}", max_frames=f, seed=seed, **settings)
        if out.shape != frames.shape:
            raise RuntimeError(f"the stylizer returned {out.shape} for a {frames.shape} clip")
        return out, info["timing"]["sample_s"], first

    def _calls(self, clip, seed: int, per_frame: bool):
        # per_frame: every frame alone, as a one-frame video with its own noise (its own seed)
        if per_frame:
            return [(clip.source[t:t + 1], seed + 7919 * (t + 1)) for t in range(len(clip.source))]
        return [(clip.source, seed)]

    def stylize(self, clip_index: int, clip, settings: dict, seed: int, per_frame: bool = False):
        """(frames uint8 [F, H, W, 3], seconds to stylise the clip). Warm timing (the default) leaves out every
        compiled sampler's first, compiling call: the seconds are None when only such calls were made (see
        `timed`); cold timing is the plain total."""
        settings = {**self.base, **settings}
        memo_key = (tuple(sorted(settings.items())), per_frame, clip_index)
        if memo_key in self._memo:
            return self._memo[memo_key]
        calls = self._calls(clip, seed, per_frame)
        outs, times, warm = [], [], []
        for frames, s in calls:
            o, secs, first = self._call(frames, clip.caption, settings, s)
            outs.append(o)
            times.append(secs)
            if not first:
                warm.append(secs)
        if self.timing == "cold":
            total = float(sum(times))
        else:
            total = float(np.mean(warm)) * len(calls) if warm else None
        if total is not None:
            self._warm.setdefault(memo_key[:2], []).append(total)
        self._memo[memo_key] = (np.concatenate(outs), total)
        return self._memo[memo_key]

    def timed(self, clip, settings: dict, seed: int, per_frame: bool = False) -> float:
        """Warm seconds to stylise a clip like `clip` with these settings: the mean of those measured so far (on any
        clip of the same size), else one more call, timed."""
        settings = {**self.base, **settings}
        key = (tuple(sorted(settings.items())), per_frame)
        if not self._warm.get(key):
            calls = self._calls(clip, seed, per_frame)
            frames, s = calls[0]
            self._warm[key] = [self._call(frames, clip.caption, settings, s)[1] * len(calls)]
        return float(np.mean(self._warm[key]))


def _scores(video, clip, reference) -> dict:
    return {"psnr": metrics.psnr(video, clip.target), "ssim": metrics.ssim(video, clip.target),
            "temporal_error": metrics.temporal_error(video, clip.flow, clip.valid),
            "flicker": metrics.flicker(video, clip.source), "content": metrics.content(video, clip.source),
            "style": metrics.style_distance(video, reference)}


def _mean_rows(per_clip: list[dict]) -> dict:
    keys = [k for k in per_clip[0] if isinstance(per_clip[0][k], (int, float))]
    return {k: float(np.nanmean([r[k] for r in per_clip])) for k in keys}


def _evaluate_setting(runner, clips, refs, settings, seed, per_frame=False, extractor=None, world_seed=0):
    """(mean row, outputs) of one sampler setting on clips of one world seed (memo keys (world_seed, clip index))."""
    rows, outputs, secs = [], [], []
    n_exec = int(runner.base["steps"]) - int(settings.get("skip", runner.base["skip"]))
    for i, clip in enumerate(clips):
        out, s = runner.stylize((world_seed, i), clip, settings, seed + i, per_frame=per_frame)
        r = _scores(out, clip, refs[clip.style])
        if extractor is not None:
            r["frame_consistency"] = features.frame_consistency(extractor, out)
            if hasattr(extractor, "encode_text"):
                r["text_video"] = features.text_video_score(extractor, out, clip.caption)
        rows.append(r)
        outputs.append(out)
        secs.append(s)
    warm = [s for s in secs if s is not None]
    per_clip = float(np.mean(warm)) if warm else runner.timed(clips[0], settings, seed, per_frame)
    return {**_mean_rows(rows), "s_per_step": per_clip / n_exec, "steps": n_exec}, outputs


SCALE_GRID = {"text_scale": (1.0, 3.0, 5.0), "context_scale": (0.0, 1.0, 2.5, 4.0)}


def _ablations(runner, clips, refs, seed, steps: int, world_seed: int = 0) -> tuple[dict, list[dict]]:
    """(tables, guidance grid cells: the first clip's middle frame and scores at every scale pair)."""
    base = runner.base
    grids = {
        "scales": [{"text_scale": ts, "context_scale": cs} for ts in SCALE_GRID["text_scale"]
                   for cs in SCALE_GRID["context_scale"]],
        "skip": [{"skip": s} for s in sorted({0, 2, 4, 6}) if s < steps],
        "apg": [{"apg": True}, {"apg": "scaled"}, {"apg": False}],
        "modes": [{"mode": "cs_cfg"}, {"mode": "text"}, {"mode": "text_context"}],
        "cache": [{"cache": None}, {"cache": "teacache", "cache_threshold": float(base["cache_threshold"])}],
    }
    out, cells = {}, []
    for name, settings_list in grids.items():
        rows = []
        for s in settings_list:
            t0 = time.perf_counter()
            r, outs = _evaluate_setting(runner, clips, refs, s, seed, world_seed=world_seed)
            rows.append({**{k: v for k, v in s.items()}, **r})
            if name == "scales":
                c = clips[0]
                cells.append({**s, "frame": outs[0][len(outs[0]) // 2], "psnr": metrics.psnr(outs[0], c.target),
                              "content": metrics.content(outs[0], c.source)})
            _log(f"ablation {name} {s}: psnr {r['psnr']:.2f} temporal {r['temporal_error']:.4f} "
                 f"({time.perf_counter() - t0:.1f} s)")
        out[name] = rows
    return out, cells


# ---------------------------------------------------------------------------------------------- baselines
_ae_encode = jax.jit(autoencoders.encode, static_argnums=0)
_ae_decode = jax.jit(autoencoders.decode, static_argnums=0)


def autoencode(vae_cfg, vae_params, frames) -> np.ndarray:
    """uint8 [F, H, W, 3] through the autoencoder and back, as the Stylizer encodes its source and decodes its
    latents (`autoencoders.encode/decode` with their defaults, `conditioning.pixels` / `to_uint8`)."""
    z = _ae_encode(vae_cfg, vae_params, conditioning.pixels(frames)[None])
    return conditioning.to_uint8(_ae_decode(vae_cfg, vae_params, z)[0])


def style_stats(run: dict, styles) -> dict:
    """style -> {"mean", "std" (per RGB channel, [0, 255] units, population std), "images", "from"}: the statistics
    of the style's training targets, i.e. the target images of the LoRA's training source (`pipeline.make_source`
    on the run's config.json data section: data.synthetic_examples pairs of data.synthetic_styles from
    data.synthetic_seed at data.height x data.width), before the camera motion. A style the run did not train on
    (or a non-synthetic run) gets pairs of that style drawn the same way (same count, seed and size)."""
    cfg = ml_collections.ConfigDict({**train_config.data_config().to_dict(), **(_get(run, "data") or {})})
    images = {s: [] for s in styles}
    if cfg.source == "synthetic":
        for rec in pipeline.make_source(cfg):
            if rec["style"] in images:
                images[rec["style"]].append(rec["target"])
    out = {}
    for s, imgs in images.items():
        where = "training targets"
        if not imgs:
            where = "synthetic pairs of the style drawn like the training set (not in it)"
            imgs = [r["target"] for r in synthetic.Synthetic(cfg.synthetic_examples, cfg.height, cfg.width, (s,),
                                                             seed=cfg.synthetic_seed)]
        mean, std = baselines.channel_stats(np.stack(imgs))
        out[s] = {"mean": mean.tolist(), "std": std.tolist(), "images": len(imgs), "from": where}
    return out


def _baseline(method: str, clip, stats: dict, stylizer) -> np.ndarray:
    if method == "copy_source":
        return clip.source
    if method == "color_transfer":
        st = stats[clip.style]
        return baselines.color_transfer(clip.source, st["mean"], st["std"])
    if method == "ae_ceiling":
        return autoencode(stylizer.vae_cfg, stylizer.vae_params, clip.target)
    raise ValueError(f"unknown baseline {method!r}")


# ------------------------------------------------------------------------------------------------ driver
def _world_rows(runner, world_seed: int, n: int, f: int, h: int, w: int, styles, stats: dict, methods,
                extractor=None):
    """Every method's row on the n clips of one world seed: (rows, clips, references, cs_cfg outputs)."""
    t0 = time.perf_counter()
    held_out = world.World(n, f, h, w, styles=styles, seed=world_seed)
    items = [held_out[i] for i in range(n)]
    refs = {s: metrics.style_stats(held_out.reference_frames(s, clips=4)) for s in set(c.style for c in items)}
    _log(f"world seed {world_seed}: {n} held-out clips of {f} x {h} x {w} ({', '.join(styles)}) rendered in "
         f"{time.perf_counter() - t0:.1f} s")
    rows, ours = [], None
    for method in methods:
        settings = ROWS[method]
        t0 = time.perf_counter()
        if settings is None:
            per = [_scores(_baseline(method, c, stats, runner.stylizer), c, refs[c.style]) for c in items]
            row = {"method": method, **_mean_rows(per), "s_per_step": 0.0, "steps": 0}
        else:
            row, outs = _evaluate_setting(runner, items, refs, settings, world_seed * 1000,
                                          per_frame=method == "per_frame", extractor=extractor, world_seed=world_seed)
            row = {"method": method, **row}
            if method == "cs_cfg":
                ours = outs
        rows.append(row)
        _log(f"seed {world_seed} {method}: psnr {row['psnr']:.2f} ssim {row['ssim']:.3f} temporal "
             f"{row['temporal_error']:.4f} flicker {row['flicker']:.4f} content {row['content']:.3f} "
             f"({time.perf_counter() - t0:.1f} s)")
    return rows, items, refs, ours


def _parse_seeds(seed: int, seeds) -> tuple[int, ...]:
    if seeds is None:
        return (int(seed),)
    if isinstance(seeds, str):
        try:
            seeds = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--seeds {seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
    seeds = tuple(int(x) for x in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"seeds {list(seeds)}: give at least one world seed, each once (e.g. 0,1,2)")
    return seeds


def evaluate(workdir, *, clips: int = 2, seed: int = 0, ablations: bool = False, ablation_clips: int = 1,
             out=None, styles=None, frames=None, height=None, width=None, timing: str = "warm", stylizer=None,
             extractor=None, lora=None, write_videos: bool = True, seeds=None, **sampler) -> dict:
    """Runs the evaluation (module docstring) and writes its files; returns the results dict.

    seeds: world seeds (a sequence or "0,1,2"; None: just `seed`); the main rows, pictures and ablations are the
    first seed's. sampler: overrides of DEFAULTS (solver, steps, shift, skip, text_scale, context_scale, apg, cache,
    cache_threshold). extractor: an optional `eval.features.FeatureExtractor`; its frame consistency (and text-video
    score if it encodes text) are added to every sampled row. stylizer: a ready `sample.Stylizer` (else built from
    the run; a stand-in needs `run(...)` and the `vae_cfg` / `vae_params` of an autoencoder for ae_ceiling).
    """
    workdir = Path(workdir)
    run = read_run_config(workdir)
    if timing not in ("warm", "cold"):
        raise InputError(f"timing must be 'warm' or 'cold', got {timing!r}")
    unknown = set(sampler) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown sampler settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    seeds = _parse_seeds(seed, seeds)
    base = {**DEFAULTS, **{k: v for k, v in sampler.items() if v is not None}}
    base["mode"] = "cs_cfg"
    base["apg"] = apg_setting(base["apg"])  # "on"/"off" -> True/False: one compile per APG setting
    f = int(frames or _get(run, "data.frames", 0))
    h, w = int(height or _get(run, "data.height", 0)), int(width or _get(run, "data.width", 0))
    if f < 1 or (f - 1) % 4:
        raise InputError(f"clips need 4k + 1 frames (the VAE's rule), got {f}; set --frames")
    if h < 16 or w < 16 or h % 16 or w % 16:
        raise InputError(f"clips need height and width that are multiples of 16, got {h}x{w}; set --height/--width")
    if styles is None:
        if _get(run, "data.source", "synthetic") != "synthetic":
            raise InputError(f"the run trained on data.source={_get(run, 'data.source')!r}, which has no synthetic "
                             f"ground truth; pass --styles with synthetic styles {SYNTHETIC_STYLES}")
        styles = _get(run, "data.synthetic_styles") or SYNTHETIC_STYLES
    styles = (styles,) if isinstance(styles, str) else tuple(styles)
    unknown_styles = [x for x in styles if x not in SYNTHETIC_STYLES]
    if unknown_styles or not styles:
        raise InputError(f"--styles {','.join(styles)}: need synthetic styles from {SYNTHETIC_STYLES}")
    if clips < 1:
        raise InputError(f"--clips must be >= 1, got {clips}")
    out_dir = Path(out) if out else workdir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    stats = style_stats(run, styles)
    if stylizer is None:
        t0 = time.perf_counter()
        stylizer = load_stylizer(workdir, run, lora=lora)
        _log(f"models loaded in {time.perf_counter() - t0:.1f} s")
    runner = _Runner(stylizer, base, timing)

    per_seed = {}
    for k, ws in enumerate(seeds):
        rows_k, items_k, refs_k, ours_k = _world_rows(runner, ws, clips, f, h, w, styles, stats,
                                                      list(ROWS) if k == 0 else SEED_METHODS, extractor)
        per_seed[ws] = rows_k
        if k == 0:
            rows, items, refs, ours = rows_k, items_k, refs_k, ours_k
    reference = _mean_rows([{k: v for k, v in _scores(c.target, c, refs[c.style]).items()
                             if k in ("temporal_error", "flicker", "content", "style")} for c in items])

    result = {"rows": rows, "reference": reference, "run": str(workdir),
              "settings": {**base, "frames": f, "height": h, "width": w, "styles": list(styles), "seed": seeds[0],
                           "seeds": list(seeds), "clips": clips, "timing": timing,
                           "s_per_step_excludes_compile": timing == "warm"},
              "clips": [{"id": c.id, "style": c.style, "caption": c.caption} for c in items],
              "style_stats": stats, "seeds": report.seed_summary(per_seed)}
    cells = []
    if ablations:
        result["ablations"], cells = _ablations(runner, items[:max(1, ablation_clips)], refs, seeds[0] * 1000,
                                                int(base["steps"]), world_seed=seeds[0])
    means = [{"method": m, **v["mean"]} for m, v in result["seeds"]["methods"].items()]
    result["guidance_summary"] = report.guidance_summary(means, result.get("ablations"), seeds, timing)
    result["sampler_compiles"] = runner.compiles

    for i, (c, o) in enumerate(zip(items, ours)):
        report.strip(out_dir / f"strip_{i}.png", [c.source, o, c.target])
    report.overview(out_dir / "overview.png", items, ours)
    if cells:
        report.guidance_grid(out_dir / "guidance_grid.png", cells)
    report.plot_rows(out_dir / "plot.png", rows)
    if write_videos:
        report.write_videos(out_dir, items[0], ours[0])
    files.write_json(out_dir / "results.json", _json_safe(result))
    files.write_text(out_dir / "results.md", report.markdown(result))
    _log(f"wrote {out_dir} in {time.perf_counter() - t_start:.1f} s")
    return result


def _json_safe(x):
    """NaN (no valid pixel) becomes null: strict JSON has no NaN."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pickstyle_jax.demo.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a finished training run (config.json, lora/)")
    p.add_argument("--clips", type=int, default=2, help="held-out clips (default 2)")
    p.add_argument("--seed", type=int, default=0, help="held-out world seed; sampler seeds derive from it")
    p.add_argument("--seeds", default=None, help="comma-separated world seeds, e.g. 0,1,2 (overrides --seed): every "
                   "row on each, mean ± spread in results; the main rows, pictures and ablations are the first's")
    p.add_argument("--ablations", action="store_true", help="also run the ablation tables")
    p.add_argument("--ablation-clips", type=int, default=1)
    p.add_argument("--out", default=None, help="output folder (default WORKDIR/eval)")
    p.add_argument("--lora", default=None, help="LoRA checkpoint dir (default WORKDIR/lora)")
    p.add_argument("--styles", default=None, help="comma-separated synthetic styles (default: the run's)")
    p.add_argument("--frames", type=int, default=None, help="clip frames, 4k + 1 (default: the run's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--timing", choices=("warm", "cold"), default="warm",
                   help="warm: exclude compile time from s_per_step (reruns one call per setting if needed)")
    p.add_argument("--solver", default=None, choices=schedulers.SOLVERS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--skip", type=int, default=None)
    p.add_argument("--text-scale", type=float, default=None)
    p.add_argument("--context-scale", type=float, default=None)
    p.add_argument("--apg", choices=tuple(APG_NAMES), default=None,
                   help="APG: on (norm threshold 55 at any size, as PickStyle), scaled (the threshold per latent "
                        "element: 55 at 81 x 480 x 832), off (default: on)")
    p.add_argument("--no-apg", action="store_true", help="the same as --apg off")
    p.add_argument("--no-videos", action="store_true", help="skip the mp4 files")
    errors.add_verbose_argument(p)
    a = p.parse_args(argv)
    try:
        result = evaluate(a.workdir, clips=a.clips, seed=a.seed, seeds=a.seeds, ablations=a.ablations,
                          ablation_clips=a.ablation_clips, out=a.out, lora=a.lora,
                          styles=a.styles.split(",") if a.styles else None, frames=a.frames,
                          height=a.height, width=a.width, timing=a.timing,
                          write_videos=not a.no_videos, solver=a.solver, steps=a.steps, shift=a.shift, skip=a.skip,
                          text_scale=a.text_scale, context_scale=a.context_scale, apg="off" if a.no_apg else a.apg)
    except Exception as e:  # noqa: BLE001 -- report() re-raises all but user errors
        return errors.report(e, a.verbose)
    print(report.markdown_table(result["rows"], ["method"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
