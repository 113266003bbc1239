"""TFDS builder `pickstyle_pairs`: packs a v1 or v2 folder layout into ArrayRecord files (no TensorFlow needed).

Build (the layout root is the manual dir; the builder config names the layout):

    from pickstyle_jax.data import tfds_pairs
    tfds_pairs.build(root="/data/pickstyle_v2", layout="v2", data_dir="/data/tfds")

Read back (random access, TF-free, what the pipeline's source="tfds" does):

    src = tfds_pairs.TfdsPairs(data_dir="/data/tfds", layout="v2", styles=["clay", "lego"])

One split per style (the style name with spaces as underscores, e.g. "3d_chibi"), examples in the folder source's
order (`disable_shuffling`), so a TFDS source and the folder source it was built from give the same examples.
Images are stored as PNG: 8-bit RGB PNG files byte for byte, anything else decoded like the folder source (alpha
dropped) and re-encoded losslessly. Bad inputs fail the build with the file named.
"""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from pickstyle_jax.data import sources

NAME = "pickstyle_pairs"


def split_name(style: str) -> str:
    return style.replace(" ", "_").lower()


def _png_bytes(path: str) -> bytes:
    """The file itself when it is an 8-bit RGB PNG (IHDR bit depth 8, colour type 2), else a lossless PNG of what
    the folder source decodes (alpha dropped), so every decoder (PIL or OpenCV) sees plain 8-bit RGB."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR" and raw[24:26] == b"\x08\x02":
        return raw
    buf = io.BytesIO()
    Image.fromarray(sources.read_image(path)).save(buf, format="PNG")  # DataError naming the file if unreadable
    return buf.getvalue()


class PickstylePairsConfig(tfds.core.BuilderConfig):
    def __init__(self, *, layout: str, **kw):
        super().__init__(name=layout, **kw)
        self.layout = layout


class PickstylePairs(tfds.core.GeneratorBasedBuilder):
    """Paired (source render, stylised image, caption) examples from a PickStyle folder layout."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        PickstylePairsConfig(layout="v1", description="<root>/{unity,<style>...}/*.png + caption.json"),
        PickstylePairsConfig(layout="v2", description="<root>/<Style>/{src,tar,caption}/ (OmniConsistency)"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the layout root as the manual dir (DownloadConfig(manual_dir=root))."
    # tfds looks for a checksums file next to the builder's source through `importlib_resources`, which is not a
    # dependency here; this builder downloads nothing, so there are no checksums to find.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "source": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "target": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "style": tfds.features.Text(),
                "id": tfds.features.Text(),
            }),
            disable_shuffling=True,  # keep the folder order: same examples, same indices as the folder source
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        cls = {"v1": sources.FolderV1, "v2": sources.FolderV2}[self.builder_config.layout]
        records = cls(root).records()  # validates pairing, captions and image headers; raises naming the file
        by_style: dict[str, list] = {}
        for r in records:
            by_style.setdefault(split_name(r.style), []).append(r)
        return {name: self._generate_examples(rs) for name, rs in by_style.items()}

    def _generate_examples(self, records):
        for r in records:
            yield r.id, {"source": _png_bytes(r.source), "target": _png_bytes(r.target), "caption": r.caption,
                         "style": r.style, "id": r.id}


def build(root: str, layout: str, data_dir: str) -> str:
    """Builds (or reuses) `pickstyle_pairs/<layout>` under data_dir from the layout at root; returns its path."""
    builder = PickstylePairs(config=layout, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(root)))
    return os.fspath(builder.data_dir)


class TfdsPairs:
    """Random-access source over a built `pickstyle_pairs` dataset, reading the per-style splits in the given order
    (default: all splits, sorted). Opened lazily so it pickles into Grain worker processes."""

    def __init__(self, data_dir: str, layout: str, styles: Sequence[str] | None = None):
        self.data_dir, self.layout = os.fspath(data_dir), layout
        builder = PickstylePairs(config=layout, data_dir=self.data_dir, file_format="array_record")
        if not builder.is_prepared():
            raise sources.DataError(f"no prepared {NAME}/{layout} dataset in {self.data_dir}; build it with "
                                    f"tfds_pairs.build(root, {layout!r}, data_dir)")
        available = sorted(builder.info.splits.keys())
        self.splits = [split_name(sources.normalise_style(s)) for s in styles] if styles else available
        missing = [s for s in self.splits if s not in available]
        if missing:
            raise sources.DataError(f"styles {missing} not in {builder.data_dir} (has {available})")
        self._len = sum(builder.info.splits[s].num_examples for s in self.splits)
        self._ds = None
        self.skipped: list = []

    def _open(self):
        if self._ds is None:
            self._ds = tfds.data_source(f"{NAME}/{self.layout}", split="+".join(self.splits), data_dir=self.data_dir,
                                        builder_kwargs={"file_format": "array_record"})
        return self._ds

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_ds"} | {"_ds": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        ex = self._open()[int(index)]
        text = {k: ex[k].decode("utf-8") if isinstance(ex[k], bytes) else str(ex[k])
                for k in ("caption", "style", "id")}
        return {"source": np.asarray(ex["source"], np.uint8), "target": np.asarray(ex["target"], np.uint8), **text}

    def __repr__(self) -> str:
        return f"TfdsPairs({self.data_dir}, {self.layout}, splits={self.splits}, len={self._len})"
