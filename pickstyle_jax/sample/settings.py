"""`SamplerSettings`: every setting of one stylisation, with the paper's defaults, in one place.

The sampler (`make_sampler`), the `Stylizer`, the stylize CLI (its flags are built from these fields), the
evaluator and the demo all take their defaults from here. Each field says what it is for (`KINDS`):

- "static":  a `make_sampler` keyword compiled into the sampler; a new value is a new compile.
- "traced":  a `make_sampler` keyword that is a call-time input of the compiled sampler (an f32[] argument), so one
             compile serves every value; `CALL_TIME` lists them (the guidance scales).
- "clip":    how the Stylizer picks the clip's frames, size and noise (seed); it never reaches `make_sampler`.

Building one checks every value (`SettingsError` names the field) and makes it canonical: numbers get their
field's type and `apg` one of True / "scaled" / False (or a `guidance.Apg`), so `dataclasses.asdict` of it is the
record of a run.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from pickstyle_jax import guidance, schedulers, sizing

__all__ = ["SamplerSettings", "SettingsError", "KINDS", "CALL_TIME", "APG_NAMES", "apg_name"]

KINDS = ("static", "traced", "clip")
APG_NAMES = guidance.APG_NAMES  # apg on the command line: name -> setting


def apg_name(apg) -> str:
    """The command-line name of a named APG setting: True -> "on", "scaled", False -> "off"."""
    apg = guidance.apg_setting(apg)
    return next(name for name, value in APG_NAMES.items() if type(value) is type(apg) and value == apg)


class SettingsError(ValueError):
    """A setting that cannot work; `names` are the fields it is about."""

    def __init__(self, names, message: str):
        super().__init__(message)
        self.names = (names,) if isinstance(names, str) else tuple(names)


def _field(default, kind: str, help: str, choices=None):  # noqa: A002 -- argparse's word
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """One stylisation's settings; the defaults are the paper's (PickStyle's released inference script)."""

    steps: int = _field(20, "static", "solver grid steps")
    shift: float = _field(16.0, "static", "timestep shift of the sigma grid")
    skip: int = _field(4, "static", "grid steps skipped (partial-noise start)")
    text_scale: float = _field(5.0, "traced", "guidance scale of the text (style) direction")
    context_scale: float = _field(4.0, "traced", "guidance scale of the context direction")
    seed: int = _field(2025, "clip", "noise seed (window i of a long clip uses fold_in(seed, i))")
    solver: str = _field("dpm++", "static", "ODE solver", schedulers.SOLVERS)
    mode: str = _field("cs_cfg", "static", "guidance: cs_cfg (3 branches), text / text_context (2), none (1)",
                       tuple(guidance.MODES))
    apg: bool | str | guidance.Apg = _field(
        True, "static", "adaptive projected guidance: on (PickStyle's, norm threshold 55 at any size), scaled "
                        "(threshold kept per latent element: 55 at 81 x 480 x 832, less on smaller clips), off",
        tuple(APG_NAMES))
    cache: str | None = _field(None, "static", "step caching (approximate)", ("teacache",))
    cache_threshold: float = _field(0.2, "static", "TeaCache: skip steps until the accumulated change reaches it; "
                                                   "<= 0 never skips")
    size: str = _field("480p", "clip", "480p | 720p (area rules, aspect kept) | HxW")
    max_frames: int = _field(81, "clip", "frames per window (4k+1); longer clips are covered by overlapping windows")
    long: str | None = _field(None, "clip", "chunked: keep every source frame and the source's fps, in overlapping "
                                            "windows", ("chunked",))
    frame_rule: str = _field("keep", "clip", "keep: resample to the model's 16 fps, keeping the duration; official: "
                                             "the paper's rule, every clip resampled to max_frames frames, written at "
                                             "16 fps (changes the duration)", sizing.FRAME_RULES)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float"):
                value = _number(f.name, value, int if f.type == "int" else float)
            choices = f.metadata["choices"]
            if f.name == "apg":
                value = guidance.apg_setting(value)  # ApgSettingError names the accepted forms
            elif choices is not None and value not in choices and not (value is None and f.default is None):
                raise SettingsError(f.name, f"{f.name} must be one of {choices}"
                                            f"{' (or None)' if f.default is None else ''}, got {value!r}")
            object.__setattr__(self, f.name, value)
        if not 0 <= self.skip < self.steps:
            raise SettingsError(("skip", "steps"), f"skip must be in [0, steps) = [0, {self.steps}), got {self.skip}")
        try:  # the frame count, size and frame rule together (a tiny clip stands for any)
            sizing.plan(1, 16, 16, size=self.size, max_frames=self.max_frames, frame_rule=self.frame_rule,
                        long=self.long)
        except ValueError as e:
            raise SettingsError(("size", "max_frames", "frame_rule", "long"), str(e)) from e

    @classmethod
    def names(cls, kind: str) -> tuple[str, ...]:
        """The fields of one kind ("static", "traced" or "clip"), in field order."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["kind"] == kind)

    def sampler_kwargs(self) -> dict:
        """make_sampler's keywords: the static settings and the call-time scales."""
        return {k: getattr(self, k) for k in self.names("static") + self.names("traced")}

    def replace(self, **changes) -> "SamplerSettings":
        return dataclasses.replace(self, **changes)


def _number(name: str, value, kind: type):
    """value as `kind` (int or float): any real scalar (Python, numpy or a 0-d array), never a bool or a string."""
    what = "an integer" if kind is int else "a real number"
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise SettingsError(name, f"{name} must be {what}, got {value!r}")
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 -- e.g. a tracer: settings are host values
        raise SettingsError(name, f"{name} must be {what} on the host, got {type(value).__name__}") from e
    if arr.shape != () or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise SettingsError(name, f"{name} must be {what}, got {value!r}")
    if not math.isfinite(float(arr)):
        raise SettingsError(name, f"{name} must be finite, got {value!r}")
    if kind is int and arr != int(arr):
        raise SettingsError(name, f"{name} must be an integer, got {value!r}")
    return kind(arr)


# the settings that are call-time (traced) inputs of a compiled sampler: any values share one compile
CALL_TIME = SamplerSettings.names("traced")
