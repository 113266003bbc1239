"""The demo's pretrained base models, shipped in the repository like a small released checkpoint.

`make demo` starts from these, as a user of the real model starts from the released Wan2.1-VACE: the hours of
pretraining (demo/pretrain.py, `make demo-pretrain`) are done once and their result is committed under
pickstyle_jax/demo/weights/:

    weights/umt5/ vae/ dit/     converted-format checkpoint dirs (checkpoints.load_*), each config.json carrying the
                                pretraining record (recipe, seed, steps, seconds, machine)
    weights/pretrain.json       the full record with the loss curves
    weights/MANIFEST.json       sha256 of every file above, the fingerprint of the configs/demo.py settings that made
                                them, and a recorded one-step prediction error (`one_step_error`)

`verify` recomputes every checksum before anything loads (a corrupted or half-copied file stops the demo with the
file's name, not a strange loss), and `available` says whether the shipped models were made from the config's
pretraining settings: a changed `pretrain` section no longer matches them, and the demo then fits its own.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import uuid
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax import checkpoints, conditioning, files, flow, text
from pickstyle_jax import tokenizer as tokenizer_lib
from pickstyle_jax.demo import pretrain, world
from pickstyle_jax.models import autoencoders, wan

WEIGHTS = Path(__file__).resolve().parent / "weights"
MANIFEST = "MANIFEST.json"
PARTS = ("umt5", "vae", "dit")
MAX_BYTES = 40 * 2**20  # the repository's budget for them


class WeightsError(ValueError):
    """The shipped weights are missing, changed or incomplete: says which files and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> dict[str, Path]:
    """Every file of the shipped set, by path relative to root (POSIX separators)."""
    out = {}
    for part in PARTS:
        for p in sorted((root / part).rglob("*")):
            if p.is_file():
                out[p.relative_to(root).as_posix()] = p
    if (root / "pretrain.json").is_file():
        out["pretrain.json"] = root / "pretrain.json"
    return out


def read_manifest(root=WEIGHTS) -> dict | None:
    try:
        return json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify(root=WEIGHTS) -> dict:
    """The manifest, after checking every file against it; WeightsError naming each missing, changed or unlisted
    file otherwise."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise WeightsError(f"{root / MANIFEST} is missing or unreadable: restore pickstyle_jax/demo/weights from the "
                           f"repository (git checkout -- pickstyle_jax/demo/weights) or refit with make demo-pretrain")
    want, have = manifest["files"], _files(root)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    changed = sorted(k for k in set(want) & set(have) if _sha256(have[k]) != want[k])
    if missing or extra or changed:
        parts = [f"{name}: {', '.join(v)}" for name, v in (("missing", missing), ("changed", changed),
                                                            ("not in the manifest", extra)) if v]
        raise WeightsError(f"the demo's shipped weights in {root} do not match {MANIFEST} ({'; '.join(parts)}): "
                           f"restore them with git checkout -- pickstyle_jax/demo/weights, or refit with "
                           f"make demo-pretrain")
    return manifest


def available(config, root=WEIGHTS) -> bool:
    """Shipped weights exist and were made from this config's pretraining settings (checksums not yet checked)."""
    manifest = read_manifest(root)
    return bool(manifest) and manifest.get("fingerprint") == pretrain.fingerprint(config)


def use(config, root=WEIGHTS) -> dict:
    """Verifies the shipped weights and points config.model.{umt5,vae,dit} at them; returns the manifest."""
    manifest = verify(root)
    with config.unlocked():
        for k in PARTS:
            config.model[k] = str(Path(root) / k)
    return manifest


def one_step_error(config, models, seed: int = 0) -> float:
    """A fixed, deterministic probe of the base models: the flow-matching error (mean squared, velocity units) of
    the backbone's prediction for clip 0 of the held-out motion world (world seed `seed`) in the first pretraining
    style, target latents noised to the middle of the training grid (index n/2) with noise from key(seed), the
    context from its source and its caption as text. Recorded in the manifest when the weights are shipped; a
    test recomputes it from the shipped files."""
    models = Path(models)
    vcfg, vparams = checkpoints.load_vae(models / "vae")
    wcfg, dparams = checkpoints.load_dit(models / "dit")
    tcfg, tparams = checkpoints.load_umt5(models / "umt5")
    d = config.data
    clip = world.render_clip(0, int(d.frames), int(d.height), int(d.width), config.pretrain.styles[0], seed)
    video = conditioning.host_pixels(np.stack([clip.source, clip.target, np.zeros_like(clip.source)]))
    z = autoencoders.encode(vcfg, vparams, video, chunked=False)
    z_src, x0, zero = z[:1], z[1:2], z[2:3]
    tok = tokenizer_lib.load_tokenizer(config.model.tokenizer)
    emb, lens = text.encode_text(tcfg, tparams, tok, [clip.caption], text_len=int(config.text.text_len), trim=True)
    grid = flow.Grid.make(float(config.schedule.shift), int(config.schedule.num_train_timesteps))
    sigma, t, _ = flow.lookup(grid, jnp.array([grid.n // 2]))
    x_t, target = flow.noise(x0, jax.random.normal(jax.random.key(seed), x0.shape), sigma)
    v = wan.forward(wcfg, dparams, x_t, t, emb, conditioning.vace_context(zero, z_src), text_lens=lens,
                    options=pretrain.dit_options(config))
    return float(jnp.mean(jnp.square(v - target)))


def ship(config, models, root=WEIGHTS, log=print) -> dict:
    """Copies finished pretraining output (MODELS/{umt5,vae,dit}, MODELS/pretrain.json) to `root` with a fresh
    manifest, replacing what was there only once the copy is complete."""
    models, root = Path(models), Path(root)
    if not pretrain.is_done(config):
        raise WeightsError(f"{models} holds no finished pretraining for these settings: run the pretraining first")
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for k in PARTS:
            shutil.copytree(models / k, tmp / k)
        shutil.copy2(models / "pretrain.json", tmp / "pretrain.json")
        listed = _files(tmp)
        size = sum(p.stat().st_size for p in listed.values())
        if size > MAX_BYTES:
            raise WeightsError(f"the pretrained models take {size / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} "
                               f"MiB the repository ships: shrink pretrain.dit or pretrain.vae_width")
        manifest = {"fingerprint": pretrain.fingerprint(config), "bytes": size,
                    "one_step_error": {"seed": 0, "value": one_step_error(config, tmp)},
                    "files": {k: _sha256(p) for k, p in listed.items()}}
        files.write_json(tmp / MANIFEST, manifest, indent=1, sort_keys=True)
        files.replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"shipped {len(manifest['files'])} files ({size / 2**20:.1f} MiB) to {root}; one-step error "
        f"{manifest['one_step_error']['value']:.6g}")
    return manifest


def main(argv=None) -> int:
    """python -m pickstyle_jax.demo.shipped --workdir DIR [--config configs/demo.py]: ship DIR/models (a finished
    `python -m pickstyle_jax.demo.pretrain --workdir DIR`) to pickstyle_jax/demo/weights."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pickstyle_jax.demo.shipped", description=main.__doc__.split(":")[0])
    ap.add_argument("--workdir", required=True, help="the pretraining's workdir (its models/ are shipped)")
    ap.add_argument("--config", default=str(pretrain.DEFAULT_CONFIG), help="the config they were fitted with")
    a = ap.parse_args(argv)
    config = pretrain.point_at(pretrain.load_config(a.config), Path(a.workdir).absolute())
    try:
        ship(config, Path(config.model.dit).parent)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
