"""Video files and frame folders <-> uint8 frames [F, H, W, 3] (imageio + imageio-ffmpeg).

`read` takes an mp4/webm/mov/mkv/avi (ffmpeg), a gif (pillow) or a folder of images (sorted by name, numbers
compared as numbers); `write` encodes H.264 mp4 (or gif) through a temporary file in the target's folder that is
renamed into place only when complete, so an interrupted or failed write never leaves a half-written file at the
target. Errors say what is wrong with the file, not which library failed.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pickstyle_jax import files

__all__ = ["read", "write", "side_by_side", "png_strip", "VideoError", "VIDEO_SUFFIXES", "IMAGE_SUFFIXES"]

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class VideoError(ValueError):
    """A video file or frame folder cannot be read or written."""


def _natural(name: str):
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def _as_rgb(frame) -> np.ndarray:
    a = np.asarray(frame)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise VideoError(f"frame of shape {a.shape} is not an RGB image")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer) and a.max(initial=0) > 255:  # 16-bit images
            a = (a.astype(np.float64) / 257.0).round()
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a[..., :3]


def _stack(frames, where) -> np.ndarray:
    if not frames:
        raise VideoError(f"{where} has zero frames")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise VideoError(f"{where}: frames differ in size {sorted(shapes)}; all frames must have one size")
    return np.stack(frames)


def _read_folder(path: Path):
    from PIL import Image

    files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: _natural(p.name))
    if not files:
        raise VideoError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}): zero frames")
    frames = []
    for f in files:
        try:
            with Image.open(f) as im:
                frames.append(_as_rgb(im.convert("RGB")))
        except Exception as e:  # PIL raises many types
            raise VideoError(f"cannot read image {f}: {e}") from e
    return _stack(frames, str(path)), None


def _read_gif(path: Path):
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            durations, frames = [], []
            for fr in ImageSequence.Iterator(im):
                durations.append(fr.info.get("duration", 0))
                frames.append(_as_rgb(fr.convert("RGB")))
    except Exception as e:
        raise VideoError(f"cannot read {path} as a gif: {e}") from e
    ms = float(np.median(durations)) if durations else 0.0
    return _stack(frames, str(path)), (1000.0 / ms if ms > 0 else None)


def _read_ffmpeg(path: Path):
    import imageio.v2 as imageio

    try:
        reader = imageio.get_reader(str(path), format="FFMPEG")
    except Exception as e:
        raise VideoError(f"cannot open {path} as a video (is it a valid {path.suffix} file?): {e}") from e
    try:
        fps = reader.get_meta_data().get("fps")
        frames = []
        try:
            for fr in reader:
                frames.append(_as_rgb(fr))
        except Exception as e:  # a truncated file: keep what decoded, fail only if nothing did
            if not frames:
                raise VideoError(f"cannot decode frames of {path}: {e}") from e
    finally:
        reader.close()
    fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else None
    return _stack(frames, str(path)), fps


def read(path) -> tuple[np.ndarray, float | None]:
    """(frames uint8 [F, H, W, 3], fps or None when the source has none, e.g. a folder of images)."""
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path} does not exist")
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return _read_gif(path)
    if suffix in IMAGE_SUFFIXES:
        raise VideoError(f"{path} is a single image; give a video or a folder of frames")
    if path.stat().st_size == 0:
        raise VideoError(f"{path} is empty (0 bytes): zero frames")
    return _read_ffmpeg(path)


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"frames must be [F, H, W, 3], got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise VideoError("zero frames to write")
    if frames.dtype != np.uint8:
        raise VideoError(f"frames must be uint8, got {frames.dtype} (convert with (x + 1) * 127.5 for [-1, 1])")
    return frames


def write(path, frames, fps: float = 16.0) -> Path:
    """Writes frames uint8 [F, H, W, 3] as an H.264 mp4 (yuv420p, so H and W must be even) or a gif, atomically."""
    frames = _check_frames(frames)
    path = Path(path)
    suffix = path.suffix.lower()
    if not fps or fps <= 0:
        raise VideoError(f"fps must be positive, got {fps}")
    if suffix == ".gif":
        from PIL import Image

        def gif(tmp):
            ims = [Image.fromarray(f) for f in frames]
            ims[0].save(tmp, save_all=True, append_images=ims[1:], duration=round(1000 / fps), loop=0)

        return files.atomic_write(path, gif)
    if suffix not in VIDEO_SUFFIXES:
        raise VideoError(f"cannot write {path}: use one of {VIDEO_SUFFIXES + ('.gif',)}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise VideoError(f"H.264 (yuv420p) needs an even frame size, got {h}x{w}")

    def mp4(tmp):
        import imageio.v2 as imageio

        # macro_block_size=1: never let ffmpeg silently resize; quality 8 of 10 keeps tests' frames recognisable
        writer = imageio.get_writer(str(tmp), format="FFMPEG", fps=float(fps), codec="libx264", quality=8,
                                    pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error")
        try:
            for f in frames:
                writer.append_data(f)
        finally:
            writer.close()

    return files.atomic_write(path, mp4)


def _resize_height(frames, height):
    from PIL import Image

    if frames.shape[1] == height:
        return frames
    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


def side_by_side(a, b) -> np.ndarray:
    """[F, H, Wa + Wb', 3]: `a` left, `b` right (resized to `a`'s height, aspect kept); same frame count."""
    a, b = _check_frames(a), _check_frames(b)
    if len(a) != len(b):
        raise VideoError(f"side_by_side needs equal frame counts, got {len(a)} and {len(b)}")
    b = _resize_height(b, a.shape[1])
    if b.shape[2] % 2:  # keep the combined width encodable
        b = b[:, :, :-1]
    return np.concatenate([a, b], axis=2)


def png_strip(path, frames, n: int = 8) -> Path:
    """A PNG of `n` evenly spaced frames side by side (all frames if there are fewer), written atomically."""
    from PIL import Image

    frames = _check_frames(frames)
    idx = np.unique(np.round(np.linspace(0, len(frames) - 1, max(1, min(n, len(frames))))).astype(int))
    strip = np.concatenate(list(frames[idx]), axis=1)
    return files.atomic_write(path, lambda tmp: Image.fromarray(strip).save(tmp, format="PNG"))
