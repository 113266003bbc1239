"""The training input pipeline: paired images -> synthetic camera-motion clips, batched per host (docs/REFERENCE.md §8).

    it = make_iterator(config.data, seed=0)
    batch = next(it)  # {"source", "target": uint8 [B, T, H, W, 3], "caption": str [B], "id": str [B]}

`config.data` is the data section of the training config; its schema and defaults are
`pickstyle_jax.train.config.data_config()`. B is the per-host batch (config.data.batch_size // process_count). Pixels stay uint8 until the device
(x / 127.5 - 1 there). The returned object is a Grain `DatasetIterator`: `get_state()` / `set_state()` give exact
resume (a restored iterator yields exactly the next batch) and `grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)` work with Orbax.

Why the Grain Dataset API (`MapDataset` ... `mp_prefetch`) rather than `grain.DataLoader`: the per-example work is a
pure function of (seed, epoch, example id) expressed as `map_with_index`; batches are formed by stream position
(`MapDataset.batch`) before the work is split across processes, so they are identical whatever `num_workers` is
(0 included) and cross the process boundary whole; and the iterator state is a small JSON-able dict for any
composition. Both APIs give checkpointable multiprocess loading; this one composes. Restoring a state needs the
same num_workers as the run that saved it (Grain's multiprocess state is per worker).

Per example, in the workers:
1. read the pair from the source (sources.py / tfds_pairs.py);
2. fit each image to height x width exactly as the official clip synthesis: s = max(W/w, H/h), bicubic resize with
   antialias to (round(s h), round(s w)), centre crop at ((h' - H)//2, (w' - W)//2); images already at the size are
   not resampled. The resize is PIL's bicubic on float32 ("F") planes, which is the same separable a = -0.5 kernel
   (support scaled by the reduction factor) that torch's `interpolate(..., antialias=True)` was built to match;
   its output is not clamped, as in the official code. Images smaller than the crop are an error (or a counted
   skip) unless `allow_upscale`;
3. draw motion params from rng((seed, epoch, example id)) and render the pair (stacked as one 6-channel image, so
   both sides get identical windows) with motion.render_uint8.

Sharding: each host takes every process_count-th example id of the first floor(N / process_count) * process_count
(equal example counts, hence equal batch counts, on every host), shuffles its share per epoch and only ever reads
those examples.
"""
from __future__ import annotations

import logging
import os

import grain
import numpy as np
from PIL import Image

from pickstyle_jax.data import motion, sources, synthetic

SOURCES = ("synthetic", "folder_v1", "folder_v2", "tfds")


def make_source(config) -> object:
    """The random-access source named by config.source (a Grain RandomAccessDataSource).

    Several layouts mix into one run (the official training concatenates v1 and v2): source "folder_v1+folder_v2"
    with root "V1_ROOT:V2_ROOT" (os.pathsep-separated, one root per source), or source "tfds" with tfds_layout
    "v1+v2". With several sources, `styles` selects among what each one has; a style none has is an error."""
    kinds = config.source.split("+")
    if config.source == "tfds":
        kinds = [f"tfds_{layout}" for layout in config.tfds_layout.split("+")]
    roots = config.root.split(os.pathsep) if "folder" in config.source else [config.root] * len(kinds)
    if len(roots) != len(kinds):
        raise ValueError(f"{len(kinds)} sources {config.source!r} need as many roots, got {config.root!r}")
    styles = tuple(config.styles)
    if len(kinds) == 1:
        return _one_source(config, kinds[0], roots[0], styles or None)
    picked = [[s for s in styles if _has_style(k, r, s)] if styles else None for k, r in zip(kinds, roots)]
    missing = sorted(set(styles) - {s for p in picked for s in p}) if styles else []
    if missing:
        raise sources.DataError(f"styles {missing} are in none of {config.source!r} at {config.root!r}")
    return sources.Concat([_one_source(config, k, r, p) for k, r, p in zip(kinds, roots, picked)
                           if p is None or p])


def _has_style(kind: str, root: str, style: str) -> bool:
    if kind.startswith("tfds_"):
        from pickstyle_jax.data import tfds_pairs  # tensorflow_datasets is heavy: imported only for tfds sources
        return tfds_pairs.split_name(sources.normalise_style(style)) in tfds_pairs.TfdsPairs(root, kind[5:]).splits
    return style != sources.V1_SOURCE_DIR and os.path.isdir(os.path.join(root, style))


def _one_source(config, kind: str, root: str, styles):
    min_size = None if config.allow_upscale else (config.height, config.width)
    kw = dict(strict_names=config.strict_names, min_size=min_size, on_error=config.on_error)
    if kind == "synthetic":
        return synthetic.Synthetic(config.synthetic_examples, config.height, config.width,
                                   tuple(config.synthetic_styles), seed=config.synthetic_seed)
    if kind == "folder_v1":
        return sources.FolderV1(root, styles, **kw)
    if kind == "folder_v2":
        return sources.FolderV2(root, styles, **kw)
    if kind in ("tfds_v1", "tfds_v2"):
        from pickstyle_jax.data import tfds_pairs  # keeps tfds off the import path of the other sources
        return tfds_pairs.TfdsPairs(root, kind[5:], styles)
    raise ValueError(f"unknown data source {kind!r}; expected one of {SOURCES} (or several joined by '+')")


def fit(image: np.ndarray, height: int, width: int, *, allow_upscale: bool = False, name: str = "image") -> np.ndarray:
    """uint8 [h, w, 3] -> float32 [height, width, 3] in [0, 255] units (unclamped): the official resize + centre
    crop (module docstring, step 2)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image.astype(np.float32)
    if not allow_upscale and (h < height or w < width):
        raise sources.DataError(f"{name} is {h}x{w}, smaller than the {height}x{width} crop "
                                f"(set allow_upscale to resize it up as the official code does)")
    s = max(width / w, height / h)
    nh, nw = round(s * h), round(s * w)
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32))
                         .resize((nw, nh), Image.Resampling.BICUBIC)) for c in range(3)]
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.stack([p[top:top + height, left:left + width] for p in planes], axis=-1)


class MakeClip:
    """(position in this host's stream, example id) -> one clip pair; a pure function of (seed, epoch, id)."""

    def __init__(self, source, config, seed: int, epoch_length: int):
        self.source, self.seed, self.epoch_length = source, int(seed), int(epoch_length)
        self.frames, self.height, self.width = int(config.frames), int(config.height), int(config.width)
        self.allow_upscale, self.on_error = bool(config.allow_upscale), config.on_error
        self.motion_kw = dict(move_prob=float(config.move_prob), zoom_range=tuple(config.zoom_range),
                              shift_range=tuple(config.shift_range), angle_range=tuple(config.angle_range))
        self.skipped = 0

    def params(self, position: int, example: int) -> motion.MotionParams:
        rng = np.random.default_rng((self.seed, position // self.epoch_length, int(example)))
        return motion.sample_params(rng, **self.motion_kw)

    def __call__(self, position: int, example: int):
        try:
            ex = self.source[int(example)]
            pair = [fit(ex[k], self.height, self.width, allow_upscale=self.allow_upscale, name=f"{ex['id']} {k}")
                    for k in ("source", "target")]
        except sources.DataError as e:
            if self.on_error != "skip":
                raise
            self.skipped += 1
            logging.warning("skipping example %d (%d skipped in this process): %s", example, self.skipped, e)
            return None
        src, tgt = motion.render_uint8(np.concatenate(pair, axis=-1), self.params(position, example), self.frames,
                                       splits=(3, 3))
        return {"source": src, "target": tgt, "caption": np.asarray(ex["caption"]), "id": np.asarray(ex["id"])}


def shard_options(config) -> tuple[int, int]:
    """(process_index, process_count): from the config when set, else from JAX (grain's ShardByJaxProcess)."""
    if config.process_index >= 0 or config.process_count >= 0:
        if not 0 <= config.process_index < config.process_count:
            raise ValueError(f"process_index {config.process_index} / process_count {config.process_count}")
        return int(config.process_index), int(config.process_count)
    opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return opts.shard_index, opts.shard_count


def make_dataset(config, seed: int, source=None) -> grain.IterDataset:
    """The Grain pipeline behind make_iterator (for composition); `source` overrides config.source."""
    if config.on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {config.on_error!r}")
    source = make_source(config) if source is None else source
    index, count = shard_options(config)
    if config.batch_size % count:
        raise ValueError(f"global batch_size {config.batch_size} is not divisible by {count} processes")
    per_host = len(source) // count
    if per_host == 0:
        raise ValueError(f"{len(source)} examples cannot be shared by {count} processes")
    ds = grain.MapDataset.range(per_host * count)[index::count]  # this host's example ids
    if config.shuffle:
        ds = ds.shuffle(seed=seed)  # reshuffled every epoch by repeat()
    ds = ds.repeat(config.num_epochs)
    ds = ds.map_with_index(MakeClip(source, config, seed, per_host))
    batch = config.batch_size // count
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.worker_buffer)
    if config.on_error == "raise":
        # Batches are consecutive stream positions whatever the worker count, and each crosses the process
        # boundary whole (per-example transfers cost more than rendering a small clip).
        ds = ds.batch(batch, drop_remainder=True).to_iter_dataset(read)
        ds = _maybe_mp_prefetch(ds, config)
    else:
        # Skipped examples (None) are dropped by to_iter_dataset, so batches are formed after it, in this process.
        ds = _maybe_mp_prefetch(ds.to_iter_dataset(read), config)
        ds = ds.batch(batch, drop_remainder=True)
    if config.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.prefetch)
    return ds


def _maybe_mp_prefetch(ds: grain.IterDataset, config) -> grain.IterDataset:
    if config.num_workers <= 0:
        return ds
    _mark_flags_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                       per_worker_buffer_size=config.worker_buffer))


def make_iterator(config, seed: int = 0, source=None) -> grain.DatasetIterator:
    """A checkpointable iterator over per-host batches (module docstring)."""
    return iter(make_dataset(config, seed, source))


def _mark_flags_parsed() -> None:
    # Grain's worker processes read absl flags; outside an absl app nobody has parsed them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
