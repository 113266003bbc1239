"""Base models for the CPU demo, fitted from scratch on the synthetic world: the stage before the LoRA training.

PickStyle adapts a pretrained Wan2.1-VACE that already renders its context and follows text; the LoRA only teaches
it a style. Tiny random weights do neither, so the demo (configs/demo.py, `pretrain` section) first makes its own
small base models, then trains the LoRA on them exactly as on real weights:

  umT5        a tiny random encoder with the byte tokenizer, frozen: a fixed text featuriser.
  autoencoder pretrain.autoencoder: "conv" (configs/demo.py), the plain conv autoencoder of demo/conv_ae.py with
              the Wan VAE's latent geometry, or "wan", the Wan2.1 VAE architecture at small widths, which learns
              slowly at the demo's sizes (bench/demo_vae.py, 300 steps: 16.9 dB on held-out clips against 20.5 for
              the conv model). Either is trained for reconstruction (L1 + L2, fp32, Adam) on source and stylised
              clips of `vae_styles` (all four: like the released VAE, a general image codec that has seen every
              look; it learns no source-to-style mapping), plus an L1 term on the frame differences of the
              reconstruction error (`vae_temporal`; for the causal Wan VAE, whose frame 0 takes another path,
              that seam dominated the temporal error). The decoder reads the latent plus N(0, 0.1^2) noise, as a
              VAE with a fixed posterior variance, and an L2 term keeps the encoder near unit scale against it; so
              the decoder tolerates the imperfect latents a sampler produces. After training the latent mean/std
              per channel are measured and written into the saved config (`latents_mean/std`, Wan's values for
              the real VAE), so `autoencoders.encode` returns normalised latents.
  backbone    a small Wan-VACE DiT, all parameters trained with the flow-matching objective of the LoRA stage
              (shift-5 grid, uniform index, target eps - x0, Gaussian-bump weight; flow.py) on latent pairs with
              context [E(0) | E(source) | ones(64)]: reconstruction pairs (target = source, caption
              "Reconstruct. <scene>") and the stylised pairs of the pretraining styles with their captions. A few
              samples per batch get the null text instead (text dropout, as base models are trained for
              classifier-free guidance), so the CS-CFG null branches are in distribution.

The held-out style's mapping (config.data.synthetic_styles) is unseen before the LoRA stage: the backbone trains on
pretrain.styles only; the autoencoder, a codec, compresses every style's images. Outputs: converted-format checkpoint
dirs at config.model.{dit,vae,umt5}, each config.json with the fingerprint of the settings that made it (`run`
skips the work when all three exist with the current fingerprint).

    python -m pickstyle_jax.demo.pretrain --config=configs/demo.py [--workdir=DIR] [--config.pretrain.X=...]

Resumable: each fitting loop saves its state to MODELS/pretrain_state/ every pretrain.checkpoint_every steps, and a
rerun (after a kill, SIGTERM or Ctrl-C) continues from there to the same weights. `make demo-pretrain` runs it,
then `python -m pickstyle_jax.demo.shipped`, which copies the result to pickstyle_jax/demo/weights with a checksum
manifest.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pickstyle_jax import checkpoints, conditioning, files, flow, text
from pickstyle_jax.data import pipeline
from pickstyle_jax.data.synthetic import SYNTHETIC_STYLES
from pickstyle_jax.demo import conv_ae, resume
from pickstyle_jax.eval import metrics as eval_metrics
from pickstyle_jax import tokenizer as tokenizer_lib
from pickstyle_jax.models import autoencoders, umt5, vae, wan

f32 = jnp.float32
FORMAT = 4  # bump when the recipe changes, so old checkpoints are refitted
RECON_PREFIX = "Reconstruct."


# ------------------------------------------------------------------------------------------------ configs
AUTOENCODERS = ("conv", "wan")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.py"


def load_config(spec: str):
    """configs/X.py[:variant] -> its get_config(variant), unlocked so the demo can point it at the workdir."""
    path, _, arg = str(spec).partition(":")
    if not Path(path).is_file():
        raise SystemExit(f"config file {path} not found (run from the repository root, or pass --config)")
    mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg or None)


def point_at(config, workdir: Path):
    """The run's model paths and text cache under WORKDIR (the config's defaults assume out/demo)."""
    models = workdir / "models"
    with config.unlocked():
        for k in ("dit", "vae", "umt5"):
            config.model[k] = str(models / k)
        config.text.cache_dir = str(workdir / "text_cache")
    return config


def vae_config(config):
    """The autoencoder being trained, with identity normalisation (the measured statistics are set after training):
    pretrain.autoencoder "conv" (demo/conv_ae.py, width vae_width) or "wan" (the Wan VAE architecture,
    VaeConfig.named(model.vae_variant) with vae_base_dim / vae_res_blocks)."""
    p = config.pretrain
    if p.autoencoder == "conv":
        base = conv_ae.ConvAeConfig(width=int(p.vae_width))
    else:
        base = vae.VaeConfig.named(config.model.vae_variant).replace(
            base_dim=int(p.vae_base_dim), num_res_blocks=int(p.vae_res_blocks))
    return base.replace(latents_mean=(0.0,) * base.z_dim, latents_std=(1.0,) * base.z_dim)


def dit_config(config, text_dim: int) -> wan.WanConfig:
    """The backbone: WanConfig.named(model.variant) with pretrain.dit's fields, fp32, text_dim = umT5 width."""
    over = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.pretrain.dit.items()}
    return wan.WanConfig.named(config.model.variant).replace(**over, text_dim=int(text_dim), param_dtype="float32")


def dit_options(config) -> wan.Options:
    """How the backbone runs while it is fitted: fp32, config.model.attention, the flat tree."""
    return wan.Options(dtype="float32", attention=config.model.attention)


def data_config(config, batch: int, seed_offset: int = 0, styles=None) -> ml_collections.ConfigDict:
    """config.data's clip geometry and motion, with the pretraining world (styles, seed, size) and `batch`."""
    d = ml_collections.ConfigDict(config.data.to_dict())
    p = config.pretrain
    d.update(dict(source="synthetic", synthetic_styles=tuple(styles or p.styles),
                  synthetic_seed=int(p.data_seed) + seed_offset, synthetic_examples=int(p.examples),
                  batch_size=int(batch), num_epochs=None, shuffle=True, num_workers=0))
    return d


def check_config(config) -> None:
    """Errors that should stop the run before anything is built."""
    p, d = config.pretrain, config.data
    held_out = set(d.synthetic_styles)
    if held_out & set(p.styles):
        raise ValueError(f"pretrain.styles {tuple(p.styles)} include the held-out style(s) {sorted(held_out)} of "
                         f"data.synthetic_styles: the LoRA stage would have nothing new to learn")
    for k in ("dit", "vae", "umt5"):
        if not config.model[k]:
            raise ValueError(f"config.model.{k} is empty: pretrain writes its checkpoint there; set a directory")
    if p.autoencoder not in AUTOENCODERS:
        raise ValueError(f"pretrain.autoencoder must be one of {AUTOENCODERS}, got {p.autoencoder!r}")
    if config.model.tokenizer != "bytes":
        raise ValueError(f"the demo's random umT5 reads bytes: set config.model.tokenizer='bytes', got "
                         f"{config.model.tokenizer!r}")
    if not 0 <= int(p.null_per_batch) < int(p.dit_batch):
        raise ValueError(f"pretrain.null_per_batch={p.null_per_batch} must be in [0, dit_batch={p.dit_batch})")
    unknown = set(p.vae_styles) - set(SYNTHETIC_STYLES)
    if unknown or not p.vae_styles:
        raise ValueError(f"pretrain.vae_styles must name styles of {SYNTHETIC_STYLES}, got {tuple(p.vae_styles)}")
    if int(p.vae_steps) < 1 or int(p.dit_steps) < 1 or int(p.clips) < 1:
        raise ValueError("pretrain.vae_steps, dit_steps and clips must be >= 1")


def _digest(config, **spec) -> str:
    """sha256 of `spec` with what every stage depends on: the recipe format, clip geometry and motion, the held-out
    style(s) and the model names."""
    d = config.data
    keys = ("frames", "height", "width", "move_prob", "zoom_range", "shift_range", "angle_range", "allow_upscale")
    spec.update(format=FORMAT, data={k: d[k] for k in keys}, held_out=list(d.synthetic_styles),
                model={k: config.model[k] for k in ("variant", "vae_variant", "umt5_variant", "attention")})
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()


def fingerprint(config) -> str:
    """sha256 of everything that changes the pretrained models."""
    return _digest(config, pretrain=config.pretrain.to_dict())


_BOOKKEEPING = ("log_every", "checkpoint_every", "report_psnr")  # change no weight
_BACKBONE_ONLY = ("dit", "dit_steps", "dit_batch", "dit_lr", "warmup", "clips", "recon_prob", "null_per_batch")


def stage_fingerprint(config, stage: str) -> str:
    """sha256 of what changes one stage's weights: the autoencoder's ignores the backbone's settings (so a new
    backbone recipe resumes on the fitted autoencoder), the backbone's covers everything; neither covers logging."""
    skip = _BOOKKEEPING + (_BACKBONE_ONLY if stage == "autoencoder" else ())
    return _digest(config, stage=stage,
                   pretrain={k: v for k, v in config.pretrain.to_dict().items() if k not in skip})


def is_done(config) -> bool:
    """All three checkpoints exist and were made from the current settings."""
    want = fingerprint(config)
    for k in ("dit", "vae", "umt5"):
        try:
            meta = checkpoints.read_meta(config.model[k])
        except (checkpoints.CheckpointError, OSError, ValueError):
            return False
        if meta.get("pretrain", {}).get("fingerprint") != want:
            return False
    return True


# ------------------------------------------------------------------------------------------------ helpers
def psnr(a, b) -> float:
    """PSNR in dB of two batches of videos [B, F, H, W, 3] in [-1, 1]: `eval.metrics.psnr` per video, averaged."""
    return float(np.mean([eval_metrics.psnr(x, y) for x, y in zip(np.asarray(a), np.asarray(b))]))


def _schedule(lr: float, steps: int, warmup: int):
    warmup = max(1, min(int(warmup), steps - 1)) if steps > 1 else 0
    if steps <= 1:
        return optax.constant_schedule(lr)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.1 * lr)


def _optimizer(lr: float, steps: int, warmup: int, weight_decay: float = 0.0) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(_schedule(lr, steps, warmup), b1=0.9, b2=0.99, weight_decay=weight_decay))


class _Progress:
    """One line per `every` steps: step, metrics, seconds per step and ETA."""

    def __init__(self, log, name: str, total: int, every: int):
        self.log, self.name, self.total, self.every = log, name, total, max(1, int(every))
        self.t0 = self.t_first = None

    def __call__(self, step: int, metrics: dict):
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        if step == 1:
            self.t_first = now  # the first step includes the compile
        if step % self.every and step != self.total and step != 1:
            return
        done = step - 1
        rate = (now - self.t_first) / done if done > 0 and self.t_first else float("nan")
        eta = rate * (self.total - step) if done > 0 else float("nan")
        parts = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.log(f"{self.name} {step}/{self.total} {parts}  ({rate:.2f} s/step, eta {eta:.0f} s)")


# ------------------------------------------------------------------------------------------------ autoencoder
def temporal_l1(err_BFHWC):
    """Mean |e[t+1] - e[t]| of a reconstruction error e = rec - clip (0 for one frame): zero for a steady blur or
    colour shift, large when frame 0 (the causal VAE's separate first-frame path) differs from the rest."""
    if err_BFHWC.shape[1] < 2:
        return jnp.zeros((), f32)
    return jnp.mean(jnp.abs(jnp.diff(err_BFHWC, axis=1)))


def make_vae_step(vcfg, optimizer, latent_noise: float, latent_l2: float, temporal_weight: float = 0.0):
    """A pure jitted step (params, opt_state, video uint8 [B, F, H, W, 3], key) -> (params, opt_state, metrics)."""

    def loss_fn(params, video, key):
        mu = autoencoders.encode(vcfg, params, video, chunked=False)
        z = mu + latent_noise * jax.random.normal(key, mu.shape, f32)
        # Unclamped decoder output: a clamp would leave overshooting pixels without a gradient.
        rec = autoencoders.decode(vcfg, params, z, chunked=False, clamp=False)
        d = rec - video
        l1, mse = jnp.mean(jnp.abs(d)), jnp.mean(jnp.square(d))
        reg = jnp.mean(jnp.square(mu))
        dt = temporal_l1(d)
        loss = l1 + mse + latent_l2 * reg + temporal_weight * dt
        return loss, {"loss": loss, "l1": l1, "mse": mse, "latent_rms": jnp.sqrt(reg), "temporal": dt}

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, video_u8, key):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, conditioning.pixels(video_u8), key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def _pick_videos(batch) -> np.ndarray:
    """One clip per pair: the sources of the first half, the stylised side of the rest (other scenes)."""
    h = (len(batch["source"]) + 1) // 2
    return np.concatenate([batch["source"][:h], batch["target"][h:]])


def train_autoencoder(config, log=print, state: resume.StageState | None = None):
    """(VaeConfig with identity normalisation, trained params, metrics dict); `normalise` sets the statistics.
    With `state`, resumes from its last save and saves every `state.every` steps (same result as one straight run:
    the data iterator's position is saved with the weights, and every step's noise key is folded from the step)."""
    p = config.pretrain
    vcfg = vae_config(config)
    steps = int(p.vae_steps)
    params = jax.tree.map(jnp.asarray, autoencoders.random_params(vcfg, int(p.seed)))
    opt = _optimizer(float(p.vae_lr), steps, max(1, steps // 10))
    opt_state = opt.init(params)
    step_fn = make_vae_step(vcfg, opt, float(p.latent_noise), float(p.latent_l2), float(p.vae_temporal))
    it = pipeline.make_iterator(data_config(config, int(p.vae_batch), styles=p.vae_styles), seed=int(p.seed))
    key = jax.random.key(int(p.seed))
    loop = {"step": 0, "seconds": 0.0, "curve": []}
    restored = state.load((params, opt_state)) if state else None
    if restored:
        (params, opt_state), loop = restored
        it.set_state(loop["data"])
        log(f"autoencoder: resuming at step {loop['step']} ({loop['seconds']:.0f} s done)")
    progress = _Progress(log, "autoencoder", steps, int(p.log_every))
    t0 = time.perf_counter() - loop["seconds"]
    for s in range(loop["step"] + 1, steps + 1):
        video = _pick_videos(next(it))
        params, opt_state, m = step_fn(params, opt_state, video, jax.random.fold_in(key, s))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not all(map(math.isfinite, m.values())):
            raise FloatingPointError(f"autoencoder loss is not finite at step {s}: {m}; lower pretrain.vae_lr")
        m["psnr"] = 10 * math.log10(4.0 / max(m["mse"], 1e-12))  # with the latent noise: a lower bound
        if s % int(p.log_every) == 0 or s == steps:
            loop["curve"].append({"step": s, **m})
        progress(s, {k: m[k] for k in ("loss", "psnr", "latent_rms")})
        if state and state.due(s, steps):
            loop.update(step=s, seconds=time.perf_counter() - t0, data=it.get_state())
            state.save((params, opt_state), loop)
    metrics = {"steps": steps, "train_s": time.perf_counter() - t0, "curve": loop["curve"]}
    return vcfg, params, metrics


def normalise(vcfg, raw: dict) -> tuple[object, dict]:
    """Per-channel latent mean/std measured on the encoded clips (both sides) into the VaeConfig, and the clips
    normalised with them: `autoencoders.encode` of the saved model returns exactly these normalised latents."""
    mu = np.concatenate([raw["source"], raw["target"]]).reshape(-1, vcfg.z_dim)
    mean, std = mu.mean(0), np.maximum(mu.std(0), 1e-3)
    norm = {k: ((raw[k] - mean) / std).astype(np.float32) for k in ("source", "target", "zero")}
    vcfg = vcfg.replace(latents_mean=tuple(float(v) for v in mean), latents_std=tuple(float(v) for v in std))
    return vcfg, {**raw, **norm}


def reconstruction_psnr(config, vcfg, params, styles, n: int = 16, seed_offset: int = 202) -> dict:
    """PSNR (dB) of encode -> decode on unseen clips: sources and the stylised side of each style in `styles`."""
    roundtrip = jax.jit(lambda p, x: autoencoders.decode(vcfg, p, autoencoders.encode(vcfg, p, x, chunked=False),
                                                         chunked=False))
    out = {}
    for style in styles:
        d = data_config(config, n, seed_offset=seed_offset, styles=(style,))
        batch = next(pipeline.make_iterator(d, seed=seed_offset))
        for side in ("source", "target") if not out else ("target",):  # every style shares the scenes
            x = conditioning.host_pixels(batch[side])
            out["source" if side == "source" else style] = psnr(roundtrip(params, x), x)
    return out


# ------------------------------------------------------------------------------------------------ latent pairs
def _scene(caption: str) -> str:
    """'Toon style. A red circle on ...' -> 'A red circle on ...'."""
    return caption.split(". ", 1)[1] if ". " in caption else caption


def encode_clips(config, vcfg, vparams, log=print) -> dict:
    """The backbone's training set, encoded once: {"source", "target": latents [N, f, h, w, z], "caption": [N],
    "zero": E(zero clip) [1, f, h, w, z]}, in `vcfg`'s normalisation. One compiled shape serves every call."""
    p = config.pretrain
    n, bs = int(p.clips), 16
    enc = jax.jit(lambda prm, video: autoencoders.encode(vcfg, prm, video, chunked=False))
    it = pipeline.make_iterator(data_config(config, bs, seed_offset=1), seed=int(p.seed) + 2)
    src, tgt, caps = [], [], []
    t0 = time.perf_counter()
    while sum(map(len, src)) < n:
        batch = next(it)
        video = conditioning.host_pixels(np.concatenate([batch["source"], batch["target"]]))
        z = np.asarray(enc(vparams, video))
        src.append(z[:bs])
        tgt.append(z[bs:])
        caps.extend(str(c) for c in batch["caption"])
    zero = np.asarray(enc(vparams, np.zeros_like(video)))[:1]  # the inactive context: an exact zero clip
    log(f"encoded {n} clip pairs into latents in {time.perf_counter() - t0:.1f} s")
    return {"source": np.concatenate(src)[:n], "target": np.concatenate(tgt)[:n], "caption": caps[:n],
            "zero": zero}


class _TextRows:
    """Caption embeddings encoded once (through the shared embedding cache), padded to one row count."""

    def __init__(self, config, tcfg, tparams, tokenizer, cache_dir, captions: list[str], null_text: str):
        text_len = int(config.text.text_len)
        cache = text.EmbeddingCache.for_checkpoint(cache_dir, config.model.umt5, tokenizer, cfg=tcfg,
                                                   text_len=text_len)
        encode = functools.partial(text.encode_text, tcfg, tparams, tokenizer, text_len=text_len)
        distinct = list(dict.fromkeys(captions))
        embs, lens = [], []
        for i in range(0, len(distinct), 64):
            e, k = cache.get_or_compute(distinct[i:i + 64], encode)
            embs.append(e)
            lens.append(k)
        lens = np.concatenate(lens)
        self.rows = text.bucket_length(int(lens.max()), text_len)
        self.emb = np.concatenate([e[:, :self.rows] for e in embs])
        self.lens, self.index = lens, {c: i for i, c in enumerate(distinct)}
        e, k = cache.get_or_compute([null_text], encode)
        self.null_rows = int(k[0])  # one fixed prompt: its exact length, no bucket padding
        self.null_emb, self.null_lens = e[:, :self.null_rows], k

    def __call__(self, captions):
        ids = [self.index[c] for c in captions]
        return self.emb[ids], self.lens[ids]


# ------------------------------------------------------------------------------------------------ backbone
def make_dit_step(wcfg: wan.WanConfig, optimizer, grid: flow.Grid, options: wan.Options | None = None):
    """A pure jitted full-parameter flow-matching step (params, opt_state, batch, key) -> (params, opt_state,
    metrics). batch: "target", "source" latents [B, f, h, w, z], "zero" [1, f, h, w, z], "text" [B - n, L, D] and
    "text_lens" [B - n] for the captioned samples, "null_text" [1, L', D], "null_lens" [1] for the last n samples
    (two forwards, so the long null text does not pad every caption to its length)."""

    def loss_fn(params, batch, key):
        x0 = batch["target"]
        b, n_text = x0.shape[0], batch["text"].shape[0]
        k_index, k_eps = jax.random.split(key)
        sigma, t, w = flow.lookup(grid, flow.draw_index(k_index, b, grid.n))
        eps = jax.random.normal(k_eps, x0.shape, f32)
        x_t, target = flow.noise(x0, eps, sigma)
        ctx = conditioning.vace_context(batch["zero"], batch["source"])  # as the LoRA stage and the sampler
        v = wan.forward(wcfg, params, x_t[:n_text], t[:n_text], batch["text"], ctx[:n_text],
                        text_lens=batch["text_lens"], options=options)
        if n_text < b:
            m = b - n_text
            null = jnp.broadcast_to(batch["null_text"], (m,) + batch["null_text"].shape[1:])
            v_null = wan.forward(wcfg, params, x_t[n_text:], t[n_text:], null, ctx[n_text:],
                                 text_lens=jnp.broadcast_to(batch["null_lens"], (m,)), options=options)
            v = jnp.concatenate([v, v_null])
        per = flow.per_sample_mse(v, target)
        loss = jnp.mean(per * w)
        return loss, {"loss": loss, "mse": jnp.mean(per)}

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch, key):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def _dit_batch(pairs, rows: _TextRows, rng, b: int, n_null: int, recon_prob: float) -> dict:
    """Random pairs: reconstruction (target = source, 'Reconstruct. <scene>') or stylised (with its caption);
    the last n_null samples take the null text."""
    idx = rng.integers(len(pairs["caption"]), size=b)
    recon = rng.random(b) < recon_prob
    src = pairs["source"][idx]
    tgt = np.where(recon[:, None, None, None, None], src, pairs["target"][idx])
    caps = [f"{RECON_PREFIX} {_scene(pairs['caption'][i])}" if r else pairs["caption"][i] for i, r in zip(idx, recon)]
    emb, lens = rows(caps[:b - n_null])
    return {"target": tgt, "source": src, "zero": pairs["zero"], "text": emb, "text_lens": lens,
            "null_text": rows.null_emb, "null_lens": rows.null_lens}


def pair_captions(pairs) -> list[str]:
    return list(pairs["caption"]) + [f"{RECON_PREFIX} {_scene(c)}" for c in pairs["caption"]]


def fit_backbone(config, pairs, rows: _TextRows, log=print, state: resume.StageState | None = None):
    """(WanConfig, params, metrics) of the full-parameter flow-matching fit. Step s draws its batch from
    rng((seed, 13, s)) and its noise from fold_in(key, s), so a run resumed from `state` equals a straight one."""
    p = config.pretrain
    wcfg = dit_config(config, rows.emb.shape[-1])
    steps, b = int(p.dit_steps), int(p.dit_batch)
    params = wan.init(wcfg, jax.random.key(int(p.seed) + 7))
    opt = _optimizer(float(p.dit_lr), steps, int(p.warmup), weight_decay=0.01)
    opt_state = opt.init(params)
    grid = flow.Grid.make(float(config.schedule.shift), int(config.schedule.num_train_timesteps))
    step_fn = make_dit_step(wcfg, opt, grid, dit_options(config))
    key = jax.random.key(int(p.seed) + 8)
    loop = {"step": 0, "seconds": 0.0, "curve": [], "window": []}
    restored = state.load((params, opt_state)) if state else None
    if restored:
        (params, opt_state), loop = restored
        log(f"backbone: resuming at step {loop['step']} ({loop['seconds']:.0f} s done)")
    progress = _Progress(log, "backbone", steps, int(p.log_every))
    t0 = time.perf_counter() - loop["seconds"]
    for s in range(loop["step"] + 1, steps + 1):
        rng = np.random.default_rng((int(p.seed), 13, s))
        batch = _dit_batch(pairs, rows, rng, b, int(p.null_per_batch), float(p.recon_prob))
        params, opt_state, m = step_fn(params, opt_state, batch, jax.random.fold_in(key, s))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"backbone loss is not finite at step {s}; lower pretrain.dit_lr")
        loop["window"].append(m["loss"])
        if s % int(p.log_every) == 0 or s == steps:
            loop["curve"].append({"step": s, "loss": float(np.mean(loop["window"])), "grad_norm": m["grad_norm"]})
            loop["window"] = []
        progress(s, {"loss": m["loss"], "grad_norm": m["grad_norm"]})
        if state and state.due(s, steps):
            loop.update(step=s, seconds=time.perf_counter() - t0)
            state.save((params, opt_state), loop)
    n_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    return wcfg, params, {"steps": steps, "train_s": time.perf_counter() - t0, "curve": loop["curve"],
                          "params": n_params}


# ------------------------------------------------------------------------------------------------ driver
def describe(vcfg) -> str:
    if isinstance(vcfg, vae.VaeConfig):
        return f"Wan VAE architecture, base_dim {vcfg.base_dim}"
    return f"plain conv autoencoder, width {vcfg.width}"


LEGACY_KIND = "conv_ae"  # the conv autoencoder's checkpoint kind before checkpoints recorded a "codec"


def upgrade_checkpoint(path) -> bool:
    """A conv autoencoder saved with the old kind "conv_ae" -> kind "vae" naming its codec, rewritten in place (the
    weights are untouched), so a demo run pretrained before the change loads and keeps its results. True if
    rewritten."""
    cfg_file = Path(path) / "config.json"
    try:
        meta = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("kind") != LEGACY_KIND:
        return False
    meta.update(kind=checkpoints.AUTOENCODER, codec=autoencoders.config_path(conv_ae.ConvAeConfig()))
    files.write_json(cfg_file, meta, sort_keys=True)
    return True


def run(config, *, log: Callable[[str], None] = print, cache_dir=None, force: bool = False) -> dict:
    """Fits and saves the three base models unless they exist for these settings; returns a summary dict."""
    check_config(config)
    if upgrade_checkpoint(config.model.vae):
        log(f"{config.model.vae}: config.json now names its codec (kind 'vae'; the weights are unchanged)")
    if not force and is_done(config):
        log(f"pretrained models found at {Path(config.model.dit).parent} (same settings): skipping pretraining")
        meta = checkpoints.read_meta(config.model.dit)
        return {"skipped": True, **meta.get("pretrain", {})}
    t_start = time.perf_counter()
    fp = fingerprint(config)
    p = config.pretrain
    extra = {"pretrain": {"fingerprint": fp}}
    cache_dir = Path(cache_dir or config.text.cache_dir or Path(config.model.dit).parent / "text_cache")

    # 1. umT5: random and frozen; saved first, since the text cache is keyed by the checkpoint's identity.
    tcfg = umt5.Umt5Config.named(config.model.umt5_variant)
    tparams = umt5.init(tcfg, jax.random.key(int(p.seed) + 3))
    checkpoints.save(config.model.umt5, tcfg, tparams, kind="umt5", extra=extra)
    tokenizer = tokenizer_lib.load_tokenizer(config.model.tokenizer)
    log(f"umT5 ({tcfg.num_layers} layers, width {tcfg.d_model}, random, frozen) -> {config.model.umt5}")

    # 2. autoencoder, then its latent statistics from the clips the backbone trains on
    vcfg = vae_config(config)
    log(f"autoencoder: {describe(vcfg)}, {autoencoders.num_params(vcfg) / 1e6:.2f} M params, "
        f"{p.vae_steps} steps of batch {p.vae_batch} on {config.data.frames}x{config.data.height}x"
        f"{config.data.width} clips of {', '.join(p.vae_styles)}")
    state_dir = Path(config.model.dit).parent / "pretrain_state"  # the fitting loops' resumable progress
    state = lambda name: resume.StageState(state_dir, name, stage_fingerprint(config, name), p.checkpoint_every)
    vcfg, vparams, vae_metrics = train_autoencoder(config, log, state("autoencoder"))
    vcfg, pairs = normalise(vcfg, encode_clips(config, vcfg, vparams, log))
    vae_metrics.update(latent_mean=list(vcfg.latents_mean), latent_std=list(vcfg.latents_std))
    if p.report_psnr:
        recon = reconstruction_psnr(config, vcfg, vparams, (*p.styles, *config.data.synthetic_styles), n=8)
        vae_metrics["psnr"] = recon
        log("autoencoder reconstruction PSNR on unseen clips: "
            + ", ".join(f"{k} {v:.1f} dB" for k, v in recon.items()))

    # 3. backbone on the cached latent pairs
    rows = _TextRows(config, tcfg, tparams, tokenizer, cache_dir, pair_captions(pairs), conditioning.null_prompt())
    log(f"{len(rows.index)} captions + the null text encoded ({rows.rows} / {rows.null_rows} text rows)")
    wcfg = dit_config(config, tcfg.d_model)
    log(f"backbone: Wan-VACE dim {wcfg.dim}, {wcfg.num_layers} blocks, VACE after {wcfg.vace_layers}; "
        f"{p.dit_steps} flow-matching steps of batch {p.dit_batch} (recon share {p.recon_prob}, "
        f"{p.null_per_batch} null-text samples per batch)")
    wcfg, dparams, dit_metrics = fit_backbone(config, pairs, rows, log, state("backbone"))

    summary = {"fingerprint": fp, "seconds": time.perf_counter() - t_start,
               "fit_seconds": vae_metrics["train_s"] + dit_metrics["train_s"],  # over every resumed session
               "recipe": {"pretrain": config.pretrain.to_dict(), "held_out": list(config.data.synthetic_styles),
                          "clip": [int(config.data[k]) for k in ("frames", "height", "width")]},
               "machine": resume.machine(),
               "vae": {k: v for k, v in vae_metrics.items() if k != "curve"},
               "dit": {k: v for k, v in dit_metrics.items() if k != "curve"}}
    checkpoints.save(config.model.vae, vcfg, vparams, kind=checkpoints.AUTOENCODER, extra={"pretrain": summary})
    checkpoints.save(config.model.dit, wcfg, dparams, kind="wan", extra={"pretrain": summary})
    report = {**summary, "vae_curve": vae_metrics["curve"], "dit_curve": dit_metrics["curve"]}
    out = Path(config.model.dit).parent / "pretrain.json"
    files.write_json(out, report, indent=1)
    log(f"pretraining done in {summary['seconds']:.0f} s: {config.model.vae}, {config.model.dit} ({out})")
    return summary


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/demo.py", "demo config (configs/demo.py[:tiny])",
                                    lock_config=True)
    flags.DEFINE_bool("force", False, "refit even if matching checkpoints exist")
    flags.DEFINE_string("workdir", None, "put the models in WORKDIR/models (default: the config's model paths)")

    def _main(argv):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        config, log = flags.FLAGS.config, lambda m: print(f"[pretrain] {m}", flush=True)
        if flags.FLAGS.workdir:
            config = point_at(config, Path(flags.FLAGS.workdir).absolute())
        try:
            run(config, force=flags.FLAGS.force, log=log)
        except ValueError as e:
            sys.exit(f"config error: {e}")

    app.run(_main, argv)


if __name__ == "__main__":
    main()
