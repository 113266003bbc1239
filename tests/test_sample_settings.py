"""SamplerSettings is the one home of the sampler's defaults: the paper's values, checked on construction, and the
sampler, the Stylizer, the stylize CLI, the evaluator and the demo all read them from it (no compiles here)."""
import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pickstyle_jax import guidance, sample, schedulers, stylize
from pickstyle_jax.demo import evaluate
from pickstyle_jax.sample import settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    assert dataclasses.asdict(sample.SamplerSettings()) == dict(
        steps=20, shift=16.0, skip=4, text_scale=5.0, context_scale=4.0, seed=2025, solver="dpm++", mode="cs_cfg",
        apg=True, cache=None, cache_threshold=0.2, size="480p", max_frames=81, long=None, frame_rule="keep")
    assert sample.CALL_TIME == ("text_scale", "context_scale")
    assert settings.SamplerSettings.names("static") == ("steps", "shift", "skip", "solver", "mode", "apg", "cache",
                                                         "cache_threshold")


def test_every_caller_takes_the_defaults_from_it():
    d = sample.SamplerSettings()
    made = inspect.signature(sample.make_sampler).parameters
    assert {k: made[k].default for k in d.sampler_kwargs()} == d.sampler_kwargs()
    assert evaluate.DEFAULTS == d.sampler_kwargs() and evaluate.CALL_TIME == sample.CALL_TIME
    # the CLI's flags are the fields, with the same defaults (apg by name)
    argv = ["--video", "v.mp4", "--prompt", "p", "--dit", "d", "--vae", "v", "--umt5", "u", "--tokenizer", "bytes",
            "--out", "o.mp4"]
    args = stylize.build_parser().parse_args(argv)
    assert args.apg == "on"
    fields = [f.name for f in dataclasses.fields(sample.SamplerSettings)]
    assert sample.SamplerSettings(**{k: getattr(args, k) for k in fields}) == d
    args = stylize.build_parser().parse_args(argv + ["--apg", "scaled", "--mode", "text", "--text-scale", "2"])
    s = sample.SamplerSettings(**{k: getattr(args, k) for k in fields})
    assert (s.apg, s.mode, s.text_scale) == ("scaled", "text", 2.0)
    choices = {a.dest: a.choices for a in stylize.build_parser()._actions}
    assert tuple(choices["mode"]) == tuple(guidance.MODES) and tuple(choices["solver"]) == schedulers.SOLVERS


def test_values_are_checked_and_made_canonical():
    s = sample.SamplerSettings(steps=10.0, shift=8, apg="off", text_scale=3)
    assert (s.steps, s.shift, s.apg, s.text_scale) == (10, 8.0, False, 3.0)
    assert type(s.steps) is int and type(s.shift) is float
    assert s.replace(seed=1).seed == 1 and s.seed == 2025
    with pytest.raises(sample.SettingsError, match=r"skip must be in \[0, steps\)") as e:
        sample.SamplerSettings(steps=3, skip=3)
    assert e.value.names == ("skip", "steps")
    for bad, match in [(dict(mode="cfg"), "mode must be one of"), (dict(solver="ddim"), "solver must be one of"),
                       (dict(cache="fastcache"), "cache must be one of"), (dict(steps=2.5), "steps must be an integer"),
                       (dict(text_scale=float("nan")), "text_scale must be finite"),
                       (dict(seed=True), "seed must be an integer"), (dict(size="100x100"), "multiples of 16")]:
        with pytest.raises(sample.SettingsError, match=match):
            sample.SamplerSettings(**bad)
    with pytest.raises(guidance.ApgSettingError):
        sample.SamplerSettings(apg="sometimes")
    with pytest.raises(TypeError):
        sample.SamplerSettings(stpes=3)


def test_cli_names_the_flags():
    from pickstyle_jax.errors import InputError
    from pickstyle_jax.sample import cli

    with pytest.raises(InputError, match="--skip 3 / --steps 3: skip must be"):
        cli.settings_from(steps=3, skip=3)
    with pytest.raises(InputError, match="--mode cfg"):
        cli.settings_from(sample.SamplerSettings(steps=5), mode="cfg")


def test_old_stylizer_path_warns():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import pickstyle_jax.stylizer\nexcept DeprecationWarning as e:\n    print('warned', e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert "warned" in r.stdout and "pickstyle_jax.sample" in r.stdout, r.stderr[-2000:]
    with pytest.warns(DeprecationWarning):
        sys.modules.pop("pickstyle_jax.stylizer", None)
        import pickstyle_jax.stylizer as old
    assert old.Stylizer is sample.Stylizer and old.CompatibilityError is sample.CompatibilityError
