"""`Stylizer`: source frames + a style prompt -> stylised frames, the video-in, video-out pipeline around
sampler.py's sampler, with the weights loaded once and the samplers cached per static setting; and the checks that
refuse checkpoints which cannot work together (`check_compatible`, `check_lora`, raising `CompatibilityError`),
run on config.json and the small LoRA before the big weights are read.

One clip: frames picked and resized as `sizing.plan` says, VAE-encoded to E(src); context [E(0) | E(src) | ones]
with E(0) the latents of an all-zero video (cached per shape); null text the umT5 rows of Wan's negative prompt
(cached); the sampler's latents decoded and rounded to uint8 (pixels, E(0), the context and the null prompt are
`conditioning`'s). The output lasts as long as the source: `sizing.plan` picks its frames (resampled to 16 fps by
default) and the rate to write them at. A clip longer than one window is covered by overlapping windows (`sizing.windows`, the last one ending at the clip's end): window i samples with
fold_in(key, i), its first latent frames pinned to the result so far on the frames it shares (`keep_latents`), the
pinned frames cross-faded linearly.

On a mesh (`Stylizer.load(mesh=...)`, the CLI's --mesh) the DiT's weights are sharded by the rules, the small models
replicated; the sampler splits the CFG branches (and, with a context axis, the tokens), the VAE splits every frame
into spatial tiles (models/vae.py), and on several hosts the decoded frames are gathered to every process.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax import checkpoints, conditioning, sharding, sizing
from pickstyle_jax import lora as lora_lib
from pickstyle_jax import text as text_lib
from pickstyle_jax.base import load_base
from pickstyle_jax.models import autoencoders, wan
from pickstyle_jax import tokenizer as tokenizer_lib
from pickstyle_jax.sample.sampler import Sampler, make_sampler
from pickstyle_jax.sample.settings import CALL_TIME, SamplerSettings


__all__ = ["Stylizer", "CompatibilityError", "check_lora", "check_compatible"]


class CompatibilityError(ValueError):
    """Checkpoints that cannot work together (a LoRA or VAE of another variant than the DiT)."""


def _meta_config(path, kind: str | tuple[str, ...]):
    """The config in `path`'s config.json, whose kind must be `kind` (or one of them)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind if isinstance(kind, str) else kind[0]} checkpoint {path} does not exist")
    return checkpoints.read_config(path, kind)


def check_lora(cfg: wan.WanConfig, adapters, where="the LoRA") -> None:
    """Raises CompatibilityError unless every adapter sits on a Dense layer of `cfg` with matching shapes.

    Adapters always carry the official (flat) paths, whatever layout the params are in (`forward` stacks them for
    scanned layers), so they are looked up in the flat tree."""
    shapes = wan.param_shapes(cfg)
    bad = []
    for path in lora_lib.adapter_paths(adapters):
        node = shapes
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        ad = functools.reduce(lambda t, p: t[p], path.split("."), adapters.params)
        if not isinstance(node, dict) or "kernel" not in node:
            bad.append(f"{path}: no such layer in this DiT")
            continue
        want = tuple(node["kernel"].shape)
        got = (ad["A"].shape[0], ad["B"].shape[1])
        if got != want:
            bad.append(f"{path}: adapter maps {got[0]} -> {got[1]}, the DiT layer {want[0]} -> {want[1]}")
    if bad:
        raise CompatibilityError(f"{where} does not fit this DiT (dim {cfg.dim}, {cfg.num_layers} layers, "
                                 f"{len(cfg.vace_layers)} VACE blocks): it was trained for another variant. "
                                 f"{len(bad)} mismatches, e.g. " + "; ".join(bad[:3]))


def check_compatible(cfg: wan.WanConfig, vae_cfg, text_cfg=None) -> None:
    if not cfg.has_vace:
        raise CompatibilityError("the DiT has no VACE blocks (a text-to-video checkpoint?); stylisation needs a "
                                 "Wan2.1-VACE DiT")
    if vae_cfg.z_dim != cfg.in_dim or 2 * vae_cfg.z_dim + 64 != cfg.vace_in_dim or vae_cfg.spatial_factor != 8:
        raise CompatibilityError(f"the VAE (z_dim {vae_cfg.z_dim}, x{vae_cfg.spatial_factor}) does not fit the DiT "
                                 f"(in_dim {cfg.in_dim}, vace_in_dim {cfg.vace_in_dim}): another model family")
    if text_cfg is not None and text_cfg.d_model != cfg.text_dim:
        raise CompatibilityError(f"the text encoder's width {text_cfg.d_model} is not the DiT's text_dim "
                                 f"{cfg.text_dim}: another variant")


# module-level, config static: every Stylizer with the same VAE config shares the compiles
_vae_encode = jax.jit(autoencoders.encode, static_argnums=0)
_vae_decode = jax.jit(autoencoders.decode, static_argnums=0)


class Stylizer:
    """Source frames + style prompt -> stylised frames, with loaded weights and cached compiles.

    stylizer = Stylizer.load(dit=DIR, vae=DIR, umt5=DIR, tokenizer="spiece.model" | "bytes", lora=DIR)
    frames = stylizer(frames_uint8 [F, H, W, 3], "Anime style. ...")        # [F', H', W', 3] uint8
    frames, info = stylizer.run(...)                                        # info: sizes, windows, timings
    frames = stylizer(frames_uint8, prompt, settings=SamplerSettings(...))  # or keywords overriding them
    """

    def __init__(self, cfg, params, adapters, vae_cfg, vae_params, text_cfg, text_params, tokenizer, *,
                 mesh=None, rules=None, options: wan.Options | None = None):
        check_compatible(cfg, vae_cfg, text_cfg)
        if adapters is not None:
            check_lora(cfg, adapters)
        self.cfg, self.params, self.adapters = cfg, params, adapters
        self.vae_cfg, self.vae_params = vae_cfg, vae_params
        self.text_cfg, self.text_params, self.tokenizer = text_cfg, text_params, tokenizer
        self.mesh, self.rules = mesh, rules
        self.options = wan.Options.default() if options is None else options  # how the DiT runs (never saved)
        self._samplers: dict = {}
        self._zero: dict = {}
        self._null = None
        self._bar = None
        self._encode = functools.partial(_vae_encode, vae_cfg)
        self._decode = functools.partial(_vae_decode, vae_cfg)

    @classmethod
    def load(cls, dit, vae, umt5, tokenizer, lora=None, dtype=None, mesh=None, rules=None,
             options: wan.Options | None = None) -> "Stylizer":
        """Reads converted checkpoints; every compatibility check runs on config.json and the (small) LoRA before
        the big weights are read, and long before anything compiles. options: how the DiT runs and the layout it is
        loaded in (`base.load_base`: None is the backend default, computing in `dtype` when one is given)."""

        cfg = _meta_config(dit, "wan")
        vae_cfg, text_cfg = _meta_config(vae, checkpoints.AUTOENCODER_KINDS), _meta_config(umt5, "umt5")
        try:
            check_compatible(cfg, vae_cfg, text_cfg)
        except CompatibilityError as e:
            raise CompatibilityError(f"dit {dit}, vae {vae}, umt5 {umt5}: {e}") from e
        # on a mesh every array the sampler meets must live on it: the small models and the LoRA replicated
        rep = None if mesh is None else sharding.replicated(mesh)
        adapters = None
        if lora:
            _meta_config(lora, "lora")
            adapters = checkpoints.load_lora(lora, sharding=rep)
            check_lora(cfg, adapters, where=f"the LoRA {lora}")
        tok = tokenizer_lib.load_tokenizer(str(tokenizer))
        if tok.vocab_size > text_cfg.vocab_size:
            raise CompatibilityError(f"tokenizer {tokenizer!r} has {tok.vocab_size} ids, the text encoder only "
                                     f"{text_cfg.vocab_size}")
        b = load_base(dit, vae, umt5, options=options, dtype=dtype, mesh=mesh, rules=rules)
        return cls(b.cfg, b.params, adapters, b.vae_cfg, b.vae_params, b.text_cfg, b.text_params, tok, mesh=mesh,
                   rules=rules, options=b.options)

    # ---------------------------------------------------------------------------------------------- pieces
    def sampler(self, **settings) -> Sampler:
        """The sampler for these settings (make_sampler's keywords; progress: True/False). Samplers are cached by
        the static settings only: text_scale / context_scale (settings.CALL_TIME) become the returned sampler's
        call-time defaults, so every scale pair of one static setting shares one compile."""
        scales = {k: settings.pop(k) for k in CALL_TIME if k in settings}
        key = tuple(sorted(settings.items()))
        if key not in self._samplers:
            progress = self._on_step if settings.pop("progress", False) else None
            self._samplers[key] = make_sampler(self.cfg, mesh=self.mesh, rules=self.rules, progress=progress,
                                               options=self.options, **settings)
        return self._samplers[key].with_scales(**scales)

    def _on_step(self, k):
        if self._bar is not None:
            self._bar.update(1)

    def encode_prompt(self, prompt: str):
        """(emb [1, n, text_dim], lens [1]): the umT5 rows, cut to the power-of-two bucket holding the prompt."""
        emb, lens = text_lib.encode_text(self.text_cfg, self.text_params, self.tokenizer, [prompt],
                                         text_len=self.cfg.text_len)
        n = text_lib.bucket_length(int(lens.max()), self.cfg.text_len)
        return emb[:, :n], jnp.asarray(lens)

    def null_text(self):
        if self._null is None:
            self._null = self.encode_prompt(conditioning.null_prompt())
        return self._null

    def zero_latents(self, frames: int, height: int, width: int):
        """E(all-zero video) [1, f, h, w, 16]: a constant, but not zero (the latents are normalised); cached."""
        k = (frames, height, width)
        if k not in self._zero:
            self._zero[k] = self._encode(self.vae_params, conditioning.zero_clip(frames, height, width))
        return self._zero[k]

    def _sample_clip(self, clip_u8, text, null, key, sampler, mode, keep=None):
        """One clip [F, H, W, 3] uint8 -> decoded video [F, H, W, 3] in [-1, 1] (jax array)."""
        f, h, w, _ = clip_u8.shape
        z_src = self._encode(self.vae_params, conditioning.pixels(clip_u8)[None])
        z_zero = self.zero_latents(f, h, w)
        context = conditioning.vace_context(z_zero, z_src)
        null_ctx = conditioning.null_vace_context(z_zero, z_src) if mode == "text_context" else None
        z = sampler(self.params, self.adapters, z_src, context, text[0], null[0], key, text_lens=text[1],
                    null_text_lens=null[1], null_context=null_ctx, keep_latents=keep)
        return self._decode(self.vae_params, z)[0]

    # --------------------------------------------------------------------------------------------- public
    def __call__(self, frames, prompt, **kw) -> np.ndarray:
        return self.run(frames, prompt, **kw)[0]

    def run(self, frames, prompt: str, *, settings: SamplerSettings | None = None, progress: bool | None = None,
            fps: float | None = None, **overrides):
        """(frames uint8 [F', H', W', 3], info dict): the clip stylised, as long as the source (official rule: 5.06 s).

        settings: a `SamplerSettings` (None: the defaults, the paper's); overrides: its fields by keyword (steps=,
        seed=, text_scale=, ...), which replace those of `settings`.

        fps: the source's frame rate (None: unknown, taken as the model's 16). frame_rule "keep" (default):
        resampled to the model's 16 fps, one window of the nearest 4k + 1 frames when that fits `max_frames`, else
        overlapping windows of `max_frames` over the whole clip; long="chunked": every source frame kept, in
        overlapping windows; frame_rule "official": the paper's rule, `max_frames` (81) frames picked uniformly
        over the whole clip, at 16 fps. info["fps_out"] is the rate that keeps the source's duration
        (F' / fps_out = F / fps), 16 under the official rule; `sizing` has the rules and a table. Windows after the
        first are pinned to the result so far on the frames they share (`keep_latents`) and cross-faded into it
        there; the last window ends at the clip's last frame. info also holds the sizes, windows, settings and timings.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
        if frames.shape[0] == 0:
            raise ValueError("the video has zero frames")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        s = (SamplerSettings() if settings is None else settings).replace(**overrides)  # checks every setting
        n_in, h_in, w_in, _ = frames.shape
        plan = sizing.plan(n_in, h_in, w_in, size=s.size, max_frames=s.max_frames, fps=fps,
                           frame_rule=s.frame_rule, long=s.long)  # checks fps before anything compiles
        sampler = self.sampler(**s.sampler_kwargs(), progress=bool(progress))  # compiles once per static setting
        win = plan.windows
        timing = {}
        t0 = time.perf_counter()
        text, null = self.encode_prompt(prompt), self.null_text()
        timing["text_s"] = time.perf_counter() - t0

        src = sizing.resize_crop(frames[np.asarray(plan.indices)], plan.height, plan.width)
        key = jax.random.key(s.seed)
        n_exec = s.steps - s.skip
        self._bar = None
        if progress:
            from tqdm.auto import tqdm  # only for a progress bar: importing it is slow

            self._bar = tqdm(total=n_exec * len(win.starts), unit="step", desc="stylize")
        t0 = time.perf_counter()
        try:
            out = self._windows(src, win, text, null, key, sampler, s.mode)
            jax.effects_barrier()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        timing["sample_s"] = time.perf_counter() - t0
        result = conditioning.to_uint8(out)
        info = {**dataclasses.asdict(s), "frames_in": int(n_in),
                "fps_in": None if fps is None else float(fps), "frames_out": int(len(result)),
                "fps_out": float(plan.fps), "height": int(plan.height), "width": int(plan.width),
                "window": int(win.length), "window_starts": list(win.starts), "overlap": int(win.overlap),
                "window_keep_latents": [win.keep(i) for i in range(len(win.starts))], "timing": timing}
        return result, info

    def _host(self, x) -> np.ndarray:
        """A result as a host array on every process: on several hosts the mesh's shards are gathered
        (`process_allgather`), since no one process addresses them all."""
        if self.mesh is not None and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    def _windows(self, src, win, text, null, key, sampler, mode) -> np.ndarray:
        """src uint8 [F, H, W, 3] -> [F, H, W, 3] in [-1, 1], window by window (`sizing.Windows`). Window i samples
        with fold_in(key, i) (the first with `key`), its first keep(i) latent frames pinned to E(the result so far
        on them), and is cross-faded linearly into that result over the pinned frames."""
        out = None
        for i, s in enumerate(win.starts):
            p = win.pinned(i)
            keep = self._encode(self.vae_params, jnp.asarray(out[s: s + p])[None]) if p else None
            video = self._host(self._sample_clip(src[s: s + win.length], text, null,
                                                 key if i == 0 else jax.random.fold_in(key, i), sampler, mode, keep))
            if out is None:
                out = np.zeros((win.n, *video.shape[1:]), np.float32)
            r = (np.arange(1, p + 1, dtype=np.float32) / (p + 1))[:, None, None, None]
            out[s: s + p] = (1 - r) * out[s: s + p] + r * video[:p]
            out[s + p: s + win.length] = video[p:]
        return out
