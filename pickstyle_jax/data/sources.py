"""Paired-image sources (docs/REFERENCE.md §8): Grain `RandomAccessDataSource`s returning one pair per index.

Every record is {"source": uint8 [h, w, 3], "target": uint8 [h, w, 3] (original sizes, alpha dropped),
"caption": str, "style": str, "id": str}. Resizing and motion happen later, in the pipeline.

- `FolderV1`: `<root>/unity/*.png`, one folder per style (`anime`, `pixar`, `clay`, ...) and `<root>/caption.json`
  (Unity file name or stem -> description); caption "{style} style." + (" " + description if non-empty).
- `FolderV2` (OmniConsistency): `<root>/<Style>/{src,tar,caption}/`; caption = the text file, stripped; style name
  normalised (lower case, "_" -> " ", "clay toy" -> "clay").
- `Concat`: several sources one after the other (mixed styles in one run).

Pairing is by sorted index as in the official code, but validated when the source is built: equal counts, and
(with `strict_names`, the default) equal file stems, so a missing or extra file is an error naming it rather than a
silent shift of every later pair. Unreadable images and images smaller than `min_size` are found from the image
headers at construction; with on_error="skip" they are dropped, counted in `.skipped` and logged. A decode failure
found only at read time raises `DataError` naming the file (the pipeline turns it into a counted skip if asked).
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
from typing import Sequence

import numpy as np
from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
V1_SOURCE_DIR = "unity"
V1_STYLES = ("anime", "pixar", "clay")
V2_STYLES = ("3D_Chibi", "Clay_Toy", "LEGO", "Macaron", "Origami", "Rick_Morty", "Vector")


class DataError(ValueError):
    """Bad training input; the message names the offending file(s)."""


def normalise_style(name: str) -> str:
    """The official v2 style-name normalisation: "Clay_Toy" -> "clay", "3D_Chibi" -> "3d chibi"."""
    s = name.lower().replace("_", " ")
    return "clay" if s == "clay toy" else s


def style_order(name: str) -> tuple[str, str]:
    """Sort key for default style lists: by the normalised name, the order TFDS splits (tfds_pairs) come in."""
    return normalise_style(name).replace(" ", "_"), name


def read_image(path: str) -> np.ndarray:
    """uint8 [h, w, 3]; alpha is dropped (not composited), grey and palette images are expanded to RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode in ("LA", "PA") else "RGB")
            arr = np.asarray(im)
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"cannot read image {path}: {e}") from e
    return np.ascontiguousarray(arr[..., :3])


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the header only; DataError naming the file if it is missing or not an image."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return h, w


def _list(folder: str, exts: Sequence[str]) -> list[str]:
    if not os.path.isdir(folder):
        raise DataError(f"missing folder {folder}")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(tuple(exts)))


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _check_pairing(lists: dict[str, list[str]], strict_names: bool) -> None:
    """Equal counts across the folders, and (strict) the same stems at every index. Names the first mismatch."""
    (name0, files0), *rest = lists.items()
    for name, files in rest:
        if len(files) != len(files0):
            missing = sorted(set(map(_stem, files0)) ^ set(map(_stem, files)))[:5]
            raise DataError(f"{len(files0)} files in {os.path.dirname(files0[0]) if files0 else name0} but "
                            f"{len(files)} in {os.path.dirname(files[0]) if files else name}: pairing by sorted "
                            f"index would be wrong; unmatched names: {missing}")
        if strict_names:
            for a, b in zip(files0, files):
                if _stem(a) != _stem(b):
                    raise DataError(f"pairing mismatch: {a} is paired with {b} (set strict_names=False to pair "
                                    f"by sorted index regardless of names)")


@dataclasses.dataclass
class _Record:
    source: str
    target: str
    caption: str
    style: str
    id: str


class _PairSource:
    """A list of validated (source path, target path, caption, style) records."""

    def __init__(self, records: list[_Record], *, min_size=None, on_error: str = "raise", validate: bool = True):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.skipped: list[tuple[str, str]] = []
        if validate:
            records = [r for r in records if self._check(r, min_size, on_error)]
            if self.skipped:
                logging.warning("%s: skipped %d bad pairs, e.g. %s", type(self).__name__, len(self.skipped),
                                self.skipped[0][1])
        self._records = records

    def _check(self, r: _Record, min_size, on_error: str) -> bool:
        try:
            for path in (r.source, r.target):
                h, w = image_size(path)
                if min_size is not None and (h < min_size[0] or w < min_size[1]):
                    raise DataError(f"image {path} is {h}x{w}, smaller than the {min_size[0]}x{min_size[1]} crop "
                                    f"(set allow_upscale to resize it up as the official code does)")
        except DataError as e:
            if on_error == "raise":
                raise
            self.skipped.append((r.id, str(e)))
            return False
        return True

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        r = self._records[index]
        return {"source": read_image(r.source), "target": read_image(r.target), "caption": r.caption,
                "style": r.style, "id": r.id}

    def records(self) -> list[_Record]:
        return list(self._records)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)})"


class FolderV1(_PairSource):
    """`<root>/unity/*.png` paired with `<root>/<style>/*.png` for each style, captions from `caption.json`."""

    def __init__(self, root: str, styles: Sequence[str] | None = None, *, strict_names: bool = True,
                 min_size=None, on_error: str = "raise", validate: bool = True):
        root = os.fspath(root)
        sources = _list(os.path.join(root, V1_SOURCE_DIR), IMAGE_EXTS)
        if not sources:
            raise DataError(f"no images in {os.path.join(root, V1_SOURCE_DIR)}")
        cap_path = os.path.join(root, "caption.json")
        try:
            with open(cap_path) as f:
                captions = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read captions {cap_path}: {e}") from e
        if styles is None:
            dirs = [d for d in os.listdir(root) if d != V1_SOURCE_DIR and os.path.isdir(os.path.join(root, d))]
            styles = sorted(dirs, key=style_order)
        records = []
        bad = []
        for style in styles:
            targets = _list(os.path.join(root, style), IMAGE_EXTS)
            _check_pairing({V1_SOURCE_DIR: sources, style: targets}, strict_names)
            for src, tgt in zip(sources, targets):
                base = os.path.basename(src)
                desc = captions.get(base, captions.get(_stem(src)))
                if desc is None:
                    bad.append(f"no caption for {src} in {cap_path}")
                    continue
                desc = str(desc).strip()
                caption = f"{style} style." + (f" {desc}" if desc else "")
                records.append(_Record(src, tgt, caption, style, f"v1/{style}/{_stem(tgt)}"))
        if bad and on_error == "raise":
            raise DataError(bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        super().__init__(records, min_size=min_size, on_error=on_error, validate=validate)
        self.skipped[:0] = [("caption", b) for b in bad]
        if bad:
            logging.warning("FolderV1: skipped %d pairs without a caption, e.g. %s", len(bad), bad[0])


class FolderV2(_PairSource):
    """`<root>/<Style>/{src,tar,caption}/` (OmniConsistency); styles default to every sub-folder (style_order)."""

    def __init__(self, root: str, styles: Sequence[str] | None = None, *, strict_names: bool = True,
                 min_size=None, on_error: str = "raise", validate: bool = True):
        root = os.fspath(root)
        if styles is None:
            styles = sorted((d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))), key=style_order)
        records = []
        bad = []
        for style in styles:
            d = os.path.join(root, style)
            lists = {"src": _list(os.path.join(d, "src"), IMAGE_EXTS),
                     "tar": _list(os.path.join(d, "tar"), IMAGE_EXTS),
                     "caption": _list(os.path.join(d, "caption"), (".txt",))}
            if not lists["src"]:
                raise DataError(f"no images in {os.path.join(d, 'src')}")
            _check_pairing(lists, strict_names)
            for src, tgt, cap in zip(lists["src"], lists["tar"], lists["caption"]):
                try:
                    with open(cap, encoding="utf-8") as f:
                        caption = f.read().strip()
                except (OSError, UnicodeDecodeError) as e:
                    bad.append(f"cannot read caption {cap}: {e}")
                    continue
                if not caption:
                    bad.append(f"empty caption {cap}")
                    continue
                records.append(_Record(src, tgt, caption, normalise_style(style), f"v2/{style}/{_stem(tgt)}"))
        if bad and on_error == "raise":
            raise DataError(bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        super().__init__(records, min_size=min_size, on_error=on_error, validate=validate)
        self.skipped[:0] = [("caption", b) for b in bad]
        if bad:
            logging.warning("FolderV2: skipped %d pairs with a bad caption, e.g. %s", len(bad), bad[0])


class Concat:
    """Sources one after the other; index i maps to (source, local index) by cumulative length."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = bisect.bisect_right(self._ends, index)
        return self.sources[k][index - (self._ends[k - 1] if k else 0)]

    @property
    def skipped(self) -> list:
        return [s for src in self.sources for s in getattr(src, "skipped", [])]

    def __repr__(self) -> str:
        return f"Concat({self.sources})"
