"""What the demo's backbone learns in its budget: one-step x0 error per noise level, by pair kind, per backbone variant.

    python bench/demo_backbone.py                  # patch 1x2x2 vs 1x1x1, 800 steps each (~8 min on 2 cores)
    python bench/demo_backbone.py --vae out/demo/models/vae \
        --variant "dit.patch_size=(1,1,1)" --variant "dit.patch_size=(1,1,1) clips=3072 examples=2048"

The path measured is `make demo`'s pretraining (pretrain.train_autoencoder unless --vae names a fitted one,
pretrain.encode_clips, pretrain.fit_backbone with configs/demo.py's recipe); a variant overrides `pretrain` settings
(`key=python_value`, dotted below pretrain; clips/examples re-encode the pairs). On held-out scenes of the
pretraining world, for each kind of pair (reconstruction, and each pretraining style with its caption), the table
gives

    rel_err(sigma) = mean |x_sigma - sigma v(x_sigma) - x0|^2 / var(x0)

the one-step x0 prediction's error at a fixed noise level (x_sigma = (1 - sigma) x0 + sigma eps) over the targets'
variance about their per-position mean: 1.0 is a model that predicts the style's average image and ignores the
source, 0.0 a perfect one. At sigma near 1 the noisy latent carries nothing, so only the context (the source) can
lower it; the sampler starts there (shift 16, skip 4: sigma 0.985). `probe` is the reference of learnability: a
2-hidden-layer MLP from each latent cell's 3 x 3 source neighbourhood to the target cell, trained by plain
regression on 768 fresh pairs of that style alone (2000 steps of batch 16), scored the same way on held-out pairs.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pickstyle_jax import checkpoints, conditioning  # noqa: E402
from pickstyle_jax.data import pipeline  # noqa: E402
from pickstyle_jax.demo import pretrain  # noqa: E402
from pickstyle_jax.models import autoencoders, umt5, wan  # noqa: E402
from pickstyle_jax import tokenizer as tokenizer_lib  # noqa: E402

SIGMAS = (0.98, 0.9, 0.7, 0.4)


def encoder(vcfg, vparams):
    """batch of pixel pairs (uint8) -> (source latents, target latents), normalised; one jitted encode."""
    enc = jax.jit(lambda p, x: autoencoders.encode(vcfg, p, x, chunked=False))
    return lambda b: tuple(np.asarray(enc(vparams, pretrain._pixels(b[k]))) for k in ("source", "target"))


def held_out(config, encode, n: int, seed_offset: int = 202) -> dict:
    """{kind: {"src", "tgt" latents, "caps"}} on scenes the backbone never sees; every style shares the scenes."""
    out = {}
    for style in config.pretrain.styles:
        b = next(pipeline.make_iterator(pretrain.data_config(config, n, seed_offset, (style,)), seed=seed_offset))
        src, tgt = encode(b)
        caps = [str(c) for c in b["caption"]]
        if not out:
            out["recon"] = {"src": src, "tgt": src, "caps": [f"{pretrain.RECON_PREFIX} {pretrain._scene(c)}"
                                                              for c in caps]}
        out[style] = {"src": src, "tgt": tgt, "caps": caps}
    return out


def rel_err(pred, tgt) -> float:
    return float(np.mean((pred - tgt) ** 2) / np.mean((tgt - tgt.mean(0)) ** 2))


def x0_table(wcfg, params, rows, hold, zero, options=None) -> dict:
    fwd = jax.jit(lambda p, x, t, e, c, n: wan.forward(wcfg, p, x, t, e, c, text_lens=n, options=options))
    table = {}
    for kind, h in hold.items():
        emb, lens = rows(h["caps"])
        ctx = conditioning.vace_context(zero, jnp.asarray(h["src"]))
        eps = np.asarray(jax.random.normal(jax.random.key(1), h["tgt"].shape))
        errs = []
        for s in SIGMAS:
            x = (1 - s) * h["tgt"] + s * eps
            v = np.asarray(fwd(params, x, jnp.full((len(x),), 1000.0 * s), emb, ctx, lens))
            errs.append(rel_err(x - s * v, h["tgt"]))
        table[kind] = errs
    return table


def _neighbourhood(z):
    p = jnp.pad(z, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = z.shape[2:4]
    return jnp.concatenate([p[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)


def probe_pairs(config, encode, style: str, n: int = 768, seed_offset: int = 5):
    """n fresh (source, target) latent pairs of one style from a 2048-scene world: with the backbone's 128 pairs per
    style the probe only memorises them (held-out rel_err above 1)."""
    d = pretrain.data_config(config, 32, seed_offset, (style,))
    with d.unlocked():
        d.synthetic_examples = 2048
    it = pipeline.make_iterator(d, seed=seed_offset)
    src, tgt = zip(*(encode(next(it)) for _ in range(-(-n // 32))))
    return np.concatenate(src)[:n], np.concatenate(tgt)[:n]


def mlp_probe(train_pairs, hold, style: str, steps: int = 2000, seed: int = 0) -> float:
    src, tgt = train_pairs
    z = src.shape[-1]
    k = jax.random.split(jax.random.key(seed), 2)
    params = {"w0": jax.random.normal(k[0], (9 * z, 256)) / np.sqrt(9 * z), "b0": jnp.zeros(256),
              "w1": jax.random.normal(k[1], (256, 256)) / 16.0, "b1": jnp.zeros(256),
              "w2": jnp.zeros((256, z)), "b2": jnp.zeros(z)}

    def mlp(p, s):
        h = jax.nn.gelu(_neighbourhood(s) @ p["w0"] + p["b0"])
        return jax.nn.gelu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, st, s, t):
        g = jax.grad(lambda q: jnp.mean((mlp(q, s) - t) ** 2))(p)
        u, st = opt.update(g, st)
        return optax.apply_updates(p, u), st

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        b = rng.integers(len(src), size=16)
        params, state = step(params, state, src[b], tgt[b])
    return rel_err(np.asarray(mlp(params, hold[style]["src"])), hold[style]["tgt"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.py")
    ap.add_argument("--vae", default="", help="a fitted demo autoencoder (else fitted here with the config's recipe)")
    ap.add_argument("--variant", action="append", default=None,
                    help='pretrain overrides, space-separated key=value, e.g. "dit.patch_size=(1,1,1) clips=3072"; '
                         'repeat to compare (default: patch 1x2x2 and 1x1x1)')
    ap.add_argument("--steps", type=int, default=0, help="backbone steps (default: the config's dit_steps)")
    ap.add_argument("--held-out", type=int, default=16, help="held-out pairs per kind")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args(argv)

    config = pretrain.load_config(a.config)
    tmp = Path(tempfile.mkdtemp(prefix="demo_backbone_"))
    config = pretrain.point_at(config, tmp)
    p = config.pretrain
    with config.unlocked():
        if a.steps:
            p.dit_steps = a.steps
    results = {"config": a.config, "steps": int(p.dit_steps), "sigmas": list(SIGMAS)}
    t0 = time.perf_counter()
    if a.vae:
        vcfg, vparams = checkpoints.load_vae(a.vae)
        pairs = pretrain.encode_clips(config, vcfg, vparams, log=lambda m: None)
    else:
        vcfg, vparams, _ = pretrain.train_autoencoder(config, log=lambda m: None)
        vcfg, pairs = pretrain.normalise(vcfg, pretrain.encode_clips(config, vcfg, vparams, log=lambda m: None))
    print(f"autoencoder: {pretrain.describe(vcfg)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    encode = encoder(vcfg, vparams)
    hold = held_out(config, encode, a.held_out)
    tcfg = umt5.Umt5Config.named(config.model.umt5_variant)
    tparams = umt5.init(tcfg, jax.random.key(int(p.seed) + 3))  # as pretrain.run; saved for the text cache's key
    checkpoints.save(config.model.umt5, tcfg, tparams, kind="umt5")
    caps = pretrain.pair_captions(pairs) + [c for h in hold.values() for c in h["caps"]]
    rows = pretrain._TextRows(config, tcfg, tparams, tokenizer_lib.load_tokenizer("bytes"), tmp / "text_cache", caps,
                              conditioning.null_prompt())

    results["probe"] = {s: mlp_probe(probe_pairs(config, encode, s), hold, s) for s in p.styles}
    print("MLP probe rel_err: " + ", ".join(f"{s} {v:.3f}" for s, v in results["probe"].items()), flush=True)
    results["variants"] = {}
    for spec in a.variant or ["dit.patch_size=(1,2,2)", "dit.patch_size=(1,1,1)"]:
        vconf = pretrain.point_at(pretrain.load_config(a.config), tmp)
        with vconf.unlocked():
            vconf.pretrain.dit_steps = p.dit_steps
            for item in spec.split():
                key, value = item.split("=", 1)
                *path, last = key.split(".")
                node = vconf.pretrain
                for part in path:
                    node = node[part]
                node[last] = ast.literal_eval(value)
        vpairs = pairs
        if (vconf.pretrain.clips, vconf.pretrain.examples) != (p.clips, p.examples):
            vpairs = pretrain.encode_clips(vconf, vcfg, vparams, log=lambda m: None)
            rows = pretrain._TextRows(vconf, tcfg, tparams, tokenizer_lib.load_tokenizer("bytes"), tmp / "text_cache",
                                      caps + pretrain.pair_captions(vpairs), conditioning.null_prompt())
        t = time.perf_counter()
        wcfg, params, m = pretrain.fit_backbone(vconf, vpairs, rows, log=lambda msg: None)
        secs = time.perf_counter() - t
        steps = int(vconf.pretrain.dit_steps)
        table = x0_table(wcfg, params, rows, hold, pairs["zero"], pretrain.dit_options(vconf))
        results["variants"][spec] = {"train_s": secs, "final_loss": m["curve"][-1]["loss"], "rel_err": table}
        print(f"\n{spec}: {steps} steps in {secs:.0f} s ({secs / steps:.3f} s/step), "
              f"final loss {m['curve'][-1]['loss']:.3f}", flush=True)
        print("| kind | " + " | ".join(f"sigma {s}" for s in SIGMAS) + " | MLP probe |")
        print("|---" * (len(SIGMAS) + 2) + "|")
        for kind, errs in table.items():
            probe = results["probe"].get(kind)
            cell = "-" if probe is None else f"{probe:.3f}"
            print(f"| {kind} | " + " | ".join(f"{e:.3f}" for e in errs) + f" | {cell} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
