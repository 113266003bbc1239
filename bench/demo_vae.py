"""Why the demo's renders are blurred: the demo autoencoder against two references on the same synthetic world.

    python bench/demo_vae.py                     # 300 steps each (about 4 min on 2 cores)
    python bench/demo_vae.py --steps 400 --seed 1

Rows (held-out clips of the pretraining world, PSNR in dB, higher is better):
  wan_vae      the path `make demo` runs: pretrain.train_autoencoder (the Wan2.1 VAE architecture at configs/demo.py's
               widths, its loss and optimizer), encode -> decode on unseen clips;
  plain_ae     a plain 8-conv autoencoder with the same latent geometry (16 channels per 8 x 8 patch; frame 0 alone,
               then 4 frames per latent frame), the same optimizer, loss L1 + L2, batch and step count;
  pca_bound    a linear code with the same 16 numbers per latent cell: PCA of 8 x 8 patches of frame 0 and of
               8 x 8 x 4 patches of frames 1-4, fitted on training clips (closed form, no steps);
and for each trained encoder its `probe`: the PSNR of the best linear read-out of its latents (3 x 3 latent
neighbourhood -> the cell's pixels, least squares on training clips), i.e. how much of the clip the latent carries
whatever the decoder does. The stream column is the largest RMS of the decoder's residual stream (wan_vae only).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from absl import flags

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pickstyle_jax.data import pipeline  # noqa: E402
from pickstyle_jax.demo import pretrain  # noqa: E402
from pickstyle_jax.models import vae  # noqa: E402

CELL, TF, Z = 8, 4, 16


def clips(config, n: int, seed_offset: int) -> np.ndarray:
    it = pipeline.make_iterator(pretrain.data_config(config, 64, seed_offset=seed_offset), seed=seed_offset)
    out = np.concatenate([pretrain._pick_videos(next(it)) for _ in range(-(-n // 64))])[:n]
    return np.asarray(pretrain._pixels(out), np.float32)


def cells(x):
    """[N, 1 + 4k, H, W, 3] -> (frame-0 cells [N, h, w, 192], frames 1-4 cells [N, h, w, 768]) for k = 1."""
    n, f, h, w, _ = x.shape
    h, w = h // CELL, w // CELL
    c0 = x[:, 0].reshape(n, h, CELL, w, CELL, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, -1)
    c1 = x[:, 1:].reshape(n, TF, h, CELL, w, CELL, 3).transpose(0, 2, 4, 1, 3, 5, 6).reshape(n, h, w, -1)
    return c0, c1


def _psnr_of(err_sum: float, count: int) -> float:
    return 10.0 * math.log10(4.0 / (err_sum / count))


def pca_bound(train, test) -> float:
    err, count = 0.0, 0
    for a, b in zip(cells(train), cells(test)):
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        mean = a.mean(0)
        basis = np.linalg.svd(a - mean, full_matrices=False)[2][:Z]
        r = (b - mean) @ basis.T @ basis + mean
        err, count = err + float(((r - b) ** 2).sum()), count + b.size
    return _psnr_of(err, count)


def probe(encode, train, test) -> float:
    """Best linear read-out of the latents [N, 2, h, w, Z] (3 x 3 neighbourhood) to each latent cell's pixels."""
    def feats(x):
        z = np.concatenate([np.asarray(encode(x[i:i + 32])) for i in range(0, len(x), 32)])
        zp = np.pad(z, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
        h, w = z.shape[2:4]
        nb = np.concatenate([zp[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], -1)
        return np.concatenate([nb, np.ones(nb.shape[:-1] + (1,), nb.dtype)], -1)
    ftr, fte = feats(train), feats(test)
    err, count = 0.0, 0
    for t, (ytr, yte) in enumerate(zip(cells(train), cells(test))):
        a, b = ftr[:, t].reshape(-1, ftr.shape[-1]), fte[:, t].reshape(-1, fte.shape[-1])
        coef = np.linalg.lstsq(a, ytr.reshape(len(a), -1), rcond=None)[0]
        err, count = err + float(((b @ coef - yte.reshape(len(b), -1)) ** 2).sum()), count + yte.size
    return _psnr_of(err, count)


# ------------------------------------------------------------------------------------------------ plain AE
def plain_init(width: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)

    def conv(cin, cout, k=3):
        return {"w": jnp.asarray(rng.standard_normal((k, k, cin, cout)) / math.sqrt(k * k * cin), jnp.float32),
                "b": jnp.zeros((cout,), jnp.float32)}
    w = width
    return {"enc": [conv(3, w), conv(w, w), conv(w, 2 * w), conv(2 * w, 2 * w)],
            "to_z0": conv(2 * w, Z, 1), "to_z": conv(TF * 2 * w, Z, 1),
            "from_z0": conv(Z, 2 * w, 1), "from_z": conv(Z, TF * 2 * w, 1),
            "dec": [conv(2 * w, 2 * w), conv(2 * w, w), conv(w, w), conv(w, 3)]}


def _conv(p, x, stride=1):
    y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["b"]


def plain_encode(p, x):
    b, f, h, w, _ = x.shape
    y = x.reshape(b * f, h, w, 3)
    y = jax.nn.silu(_conv(p["enc"][0], y))
    for layer in p["enc"][1:-1]:
        y = jax.nn.silu(_conv(layer, y, 2))
    y = _conv(p["enc"][-1], y, 2).reshape(b, f, h // CELL, w // CELL, -1)
    z1 = y[:, 1:].transpose(0, 2, 3, 1, 4).reshape(b, h // CELL, w // CELL, -1)
    return jnp.stack([_conv(p["to_z0"], y[:, 0]), _conv(p["to_z"], z1)], axis=1)


def plain_decode(p, z):
    b, _, h, w, _ = z.shape
    y1 = _conv(p["from_z"], z[:, 1]).reshape(b, h, w, TF, -1).transpose(0, 3, 1, 2, 4)
    y = jnp.concatenate([_conv(p["from_z0"], z[:, 0])[:, None], y1], axis=1)
    y = jax.nn.silu(y.reshape(b * (1 + TF), h, w, -1))
    for layer in p["dec"][:-1]:
        y = jax.nn.silu(_conv(layer, jnp.repeat(jnp.repeat(y, 2, 1), 2, 2)))
    y = _conv(p["dec"][-1], y)
    return y.reshape(b, 1 + TF, *y.shape[1:])


def train_plain(config, steps: int, lr: float, width: int, seed: int) -> dict:
    p = plain_init(width, seed)
    opt = pretrain._optimizer(lr, steps, max(1, steps // 10))
    state = opt.init(p)

    @jax.jit
    def step(p, state, video_u8):
        def loss(p):
            x = pretrain._pixels(video_u8)
            d = plain_decode(p, plain_encode(p, x)) - x
            return jnp.mean(jnp.abs(d)) + jnp.mean(d * d)
        g = jax.grad(loss)(p)
        u, state = opt.update(g, state, p)
        return optax.apply_updates(p, u), state

    it = pipeline.make_iterator(pretrain.data_config(config, int(config.pretrain.vae_batch)), seed=seed)
    for _ in range(steps):
        p, state = step(p, state, pretrain._pick_videos(next(it)))
    return p


def decoder_stream_rms(vcfg, params, x) -> float:
    """The largest RMS of any decoder ResBlock output: its residual stream (eager, one batch)."""
    seen = []
    call = vae.ResBlock.__call__

    def spy(self, h, *a, **k):
        y = call(self, h, *a, **k)
        seen.append(float(jnp.sqrt(jnp.mean(jnp.square(y)))))
        return y
    vae.ResBlock.__call__ = spy
    try:
        with jax.disable_jit():
            vae._decode(vcfg, params, vae._encode(vcfg, params, x, False), False, False)
    finally:
        vae.ResBlock.__call__ = call
    return max(seen)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(pretrain.DEFAULT_CONFIG))
    ap.add_argument("--steps", type=int, default=300, help="training steps of both autoencoders")
    ap.add_argument("--plain_width", type=int, default=32, help="plain AE channels at full resolution")
    ap.add_argument("--plain_lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    config = pretrain.load_config(a.config)
    with config.unlocked():
        config.pretrain.vae_steps, config.pretrain.seed = a.steps, a.seed
    print(f"seed {a.seed}, {a.steps} steps, batch {config.pretrain.vae_batch}, clips "
          f"{config.data.frames}x{config.data.height}x{config.data.width}", flush=True)
    train_x, test_x = clips(config, 256, 0), clips(config, 64, 202)

    rows = []
    t = time.perf_counter()
    vcfg, vparams, _ = pretrain.train_autoencoder(config, log=lambda m: None)
    wan_s = time.perf_counter() - t
    enc = jax.jit(lambda x: vae.encode(vcfg, vparams, x, chunked=False))
    rt = jax.jit(lambda x: vae.decode(vcfg, vparams, vae.encode(vcfg, vparams, x, chunked=False), chunked=False))
    rows.append(("wan_vae", pretrain.psnr(rt(test_x), test_x), probe(enc, train_x, test_x), wan_s / a.steps,
                 decoder_stream_rms(vcfg, vparams, test_x[:8])))
    t = time.perf_counter()
    pp = train_plain(config, a.steps, a.plain_lr, a.plain_width, a.seed)
    plain_s = time.perf_counter() - t
    prt = jax.jit(lambda x: jnp.clip(plain_decode(pp, plain_encode(pp, x)), -1, 1))
    rows.append(("plain_ae", pretrain.psnr(prt(test_x), test_x), probe(jax.jit(lambda x: plain_encode(pp, x)),
                                                                       train_x, test_x), plain_s / a.steps, None))
    rows.append(("pca_bound", pca_bound(train_x, test_x), None, None, None))

    print("| model | held-out PSNR dB | linear probe of its latent dB | s/step (incl. compile) | decoder stream RMS |")
    print("|---|---|---|---|---|")
    for name, val, pr, sps, stream in rows:
        f = (lambda v, fmt: "-" if v is None else format(v, fmt))
        print(f"| {name} | {val:.2f} | {f(pr, '.2f')} | {f(sps, '.3f')} | {f(stream, '.0f')} |")


if __name__ == "__main__":
    main()
