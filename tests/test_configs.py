"""Every configs/*.py loads, in every variant, without importing JAX, is locked, and names things that exist."""
import importlib.util
import pathlib
import subprocess
import sys

import jax
import pytest

from pickstyle_jax import base, lora, sharding
from pickstyle_jax.data import synthetic
from pickstyle_jax.models import umt5, vae, wan
from pickstyle_jax.train import config as train_config, setup

ROOT = pathlib.Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


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
    assert set(c.data.keys()) == set(train_config.data_config().keys())
    schema = train_config.default_config()
    assert set(schema.keys()) <= set(c.keys())  # the training schema complete (configs may add sections)
    for section in ("model", "lora", "schedule", "optim", "distributed", "text"):
        assert set(c[section].keys()) == set(schema[section].keys()), section
    assert set(c.mesh.keys()) <= {"data", "fsdp", "tensor", "context"}
    sharding.normalize_rules(c.rules)
    wcfg = wan.WanConfig.named(c.model.variant, param_dtype=c.model.param_dtype)
    opts = base.options_from(c.model)  # the run-time keys become wan.Options (never saved)
    assert (opts.dtype, opts.attention, opts.remat_policy, opts.ffn_chunk, opts.scan_layers) == (
        c.model.dtype, c.model.attention, c.model.remat_policy, c.model.ffn_chunk, c.model.scan_layers)
    vae.VaeConfig.named(c.model.vae_variant)
    umt5.Umt5Config.named(c.model.umt5_variant)
    lcfg = lora.LoraConfig(rank=c.lora.rank, alpha=c.lora.alpha, targets=c.lora.targets)
    shapes = jax.eval_shape(lambda: wan.init(wcfg, jax.random.key(0)))
    assert len(lora.targets(lcfg, shapes)) == 3 * len(wcfg.vace_layers)


def test_unknown_variant_is_an_error():
    for path in CONFIGS:
        with pytest.raises(ValueError, match="nope"):
            _load(path).get_config("nope")


def test_loading_a_config_does_not_import_jax():
    """configs/*.py and pickstyle_jax.train.config are ml_collections only: each variant loads in a fresh
    interpreter without JAX (or anything that imports it) in sys.modules."""
    code = (
        "import importlib.util, sys\n"
        "path, arg = sys.argv[1], sys.argv[2] or None\n"
        "spec = importlib.util.spec_from_file_location('cfg', path)\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "mod.get_config(arg).lock()\n"
        "heavy = sorted(m for m in ('jax', 'jaxlib', 'flax', 'grain', 'orbax', 'optax') if m in sys.modules)\n"
        "assert not heavy, f'{path}:{arg} imported {heavy}'\n")
    cases = [(path, arg) for path in CONFIGS for arg in ("", "tiny")] + [(ROOT / "configs/pickstyle.py", "node")]
    for path, arg in cases:
        r = subprocess.run([sys.executable, "-c", code, str(path), arg], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]


def test_stated_defaults_match_the_library_defaults():
    """train/config.py states the paper's choices literally (it may not import JAX); they are the library's."""
    c = train_config.default_config()
    assert c.lora.targets == lora.LoraConfig().targets
    assert {**c.rules.to_dict(), "allow_replicate": True} == {**sharding.DEFAULT_RULES, "allow_replicate": True}
    assert tuple(c.data.synthetic_styles) == synthetic.SYNTHETIC_STYLES


def test_pickstyle_node_is_the_recipe_on_one_8_device_node():
    """configs/pickstyle.py:node: the full recipe's every value (batch 32, clips, LoRA, optimiser, loss) but the
    gradient accumulation (4 micro-batches of 8: one sample per device), and it passes the 8-device checks."""
    mod = _load(ROOT / "configs/pickstyle.py")
    full, node = mod.get_config(None).to_dict(), mod.get_config("node")
    assert setup.check_config(node, n_devices=8) == {"data": 1, "fsdp": 8, "tensor": 1, "context": 1}
    node = node.to_dict()
    assert (full["optim"].pop("accumulate"), node["optim"].pop("accumulate")) == (1, 4)
    assert node == full
    with pytest.raises(setup.ConfigError, match="batch"):  # 8 micro-batches of 4 cannot feed 8 devices one each
        setup.check_config(mod.get_config("node"), n_devices=16)
