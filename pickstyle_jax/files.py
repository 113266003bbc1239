"""Atomic file writes: a reader (or a job killed mid-write, even by kill -9) sees the old file or the new one, never
half of one. Every file the package writes outside Orbax goes through `atomic_write`.

The temporary name is hidden (leading dot) and unique per process and call, so concurrent writers of one path never
share a temporary; the last rename wins.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "write_text", "write_json"]


def atomic_write(path, write_fn: Callable[[Path], object]) -> Path:
    """write_fn(tmp_path) writes a complete file; it replaces `path` only if write_fn returns without error.

    The temporary keeps `path`'s suffix, for writers that pick a format from it (imageio, PIL)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def replace_dir(tmp, path) -> Path:
    """Moves the finished directory `tmp` to `path`, replacing any directory there: the old one is renamed aside
    first and removed last, so `path` is never a half-written mix (at worst briefly absent)."""
    tmp, path = Path(tmp), Path(path)
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    return path


def write_text(path, content: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(content, encoding="utf-8"))


def write_json(path, obj, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")
