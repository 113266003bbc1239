"""Sampling: the jitted CS-CFG sampler (sampler.py), its settings and their defaults (settings.py), the video-in,
video-out `Stylizer` with its compatibility checks (stylizer.py) and the stylize command line (cli.py; run it as
`python -m pickstyle_jax.stylize` or `python -m pickstyle_jax.sample`).

    from pickstyle_jax import sample
    sampler = sample.make_sampler(cfg, solver="dpm++", steps=20, shift=16.0, skip=4, text_scale=5.0,
                                  context_scale=4.0, apg=True, mesh=None)
    latents = sampler(params, adapters, source_latents, context, text, null_text, key)
    stylizer = sample.Stylizer.load(dit=..., vae=..., umt5=..., tokenizer=..., lora=...)
    frames = stylizer(frames_uint8, prompt, steps=20, seed=2025)      # or settings=sample.SamplerSettings(...)
"""
from pickstyle_jax.sample.sampler import (Sampler, SamplerState, make_sampler, null_context_key, permute_context,
                                          time_modulation)
from pickstyle_jax.sample.settings import CALL_TIME, SamplerSettings, SettingsError
from pickstyle_jax.sample.stylizer import CompatibilityError, Stylizer, check_compatible, check_lora

__all__ = ["make_sampler", "Sampler", "SamplerState", "permute_context", "null_context_key", "time_modulation",
           "SamplerSettings", "SettingsError", "CALL_TIME", "Stylizer", "CompatibilityError", "check_lora",
           "check_compatible"]
