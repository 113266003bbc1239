"""Every configs/*.py loads, in every variant, is locked, and names things that exist."""
import importlib.util
import pathlib

import jax
import pytest

from pickstyle_jax import base, lora, sharding, train
from pickstyle_jax.data import pipeline
from pickstyle_jax.models import umt5, vae, wan

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_config_is_complete_and_locked(path, arg):
    c = _load(path).get_config(arg)
    with pytest.raises(AttributeError):
        c.no_such_key = 1  # a typo in --config.x=... must fail
    with pytest.raises(AttributeError):
        c.data.no_such_key = 1
    assert set(c.data.keys()) == set(pipeline.default_config().keys())
    schema = train.default_config()
    assert set(schema.keys()) <= set(c.keys())  # the training schema complete (configs may add sections)
    for section in ("model", "lora", "schedule", "optim", "distributed", "text"):
        assert set(c[section].keys()) == set(schema[section].keys()), section
    assert set(c.mesh.keys()) <= {"data", "fsdp", "tensor", "context"}
    sharding.normalize_rules(c.rules)
    wcfg = wan.WanConfig.named(c.model.variant, param_dtype=c.model.param_dtype)
    opts = base.options_from(c.model)  # the run-time keys become wan.Options (never saved)
    assert (opts.dtype, opts.attention, opts.remat_policy, opts.scan_layers) == (
        c.model.dtype, c.model.attention, c.model.remat_policy, c.model.scan_layers)
    vae.VaeConfig.named(c.model.vae_variant)
    umt5.Umt5Config.named(c.model.umt5_variant)
    lcfg = lora.LoraConfig(rank=c.lora.rank, alpha=c.lora.alpha, targets=c.lora.targets)
    shapes = jax.eval_shape(lambda: wan.init(wcfg, jax.random.key(0)))
    assert len(lora.targets(lcfg, shapes)) == 3 * len(wcfg.vace_layers)


def test_unknown_variant_is_an_error():
    for path in CONFIGS:
        with pytest.raises(ValueError, match="nope"):
            _load(path).get_config("nope")
