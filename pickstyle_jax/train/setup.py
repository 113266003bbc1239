"""Everything a training run builds before its first step, once: `prepare(config, workdir) -> TrainSetup`.

In order: the checks that need no device (`check_config`: paths, checkpoint compatibility, mesh, batch split,
optimiser values), distributed init, the mesh and rules, the data source, the caption table (every caption encoded
once before step 1, after which umT5 leaves device memory), the frozen base (base.py), the abstract train state with
its shardings (`abstract_state`, which plan.py compiles the same step from), the LoRA + optimizer state placed in
those shardings, and the compiled step (step.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
from jax.sharding import Mesh

from pickstyle_jax import checkpoints, conditioning, files, lora as lora_lib, sharding, text
from pickstyle_jax.base import count, options_from
from pickstyle_jax.data import pipeline
from pickstyle_jax import tokenizer as tokenizer_lib
from pickstyle_jax.models import umt5, vae, wan
from pickstyle_jax.sample import CompatibilityError, check_compatible
from pickstyle_jax.train import base as base_lib, step as step_lib

__all__ = ["ConfigError", "model_configs", "check_config", "tokens_per_sample", "total_steps",
           "text_table", "AbstractState", "abstract_state", "TrainSetup", "prepare", "device_batch"]


class ConfigError(ValueError):
    """A training config that cannot run; the message says what to change."""


# ------------------------------------------------------------------------------------------------- checks
def model_configs(config) -> tuple[wan.WanConfig, vae.VaeConfig, umt5.Umt5Config, lora_lib.LoraConfig]:
    """(WanConfig, VaeConfig, Umt5Config, LoraConfig) named by config.model / config.lora (random-init variants;
    checkpoints bring their own configs)."""
    m = config.model
    try:
        tcfg = umt5.Umt5Config.named(m.umt5_variant)
        wcfg = wan.WanConfig.named(m.variant, param_dtype=m.param_dtype)
        options_from(m)  # the run-time keys (dtype, attention, remat_policy, scan_layers) are checked here too
        vcfg = vae.VaeConfig.named(m.vae_variant)  # fp32: encodes the targets the loss is measured against
        lcfg = lora_lib.LoraConfig(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
                                   targets=config.lora.targets)
    except ValueError as e:
        raise ConfigError(f"config.model / config.lora: {e}") from e
    if not m.dit and wcfg.text_dim != tcfg.d_model:
        wcfg = wcfg.replace(text_dim=tcfg.d_model)  # random DiT: take the text width the encoder produces
    if not wcfg.has_vace:
        raise ConfigError(f"model.variant {m.variant!r} has no VACE blocks; PickStyle trains a VACE model")
    return wcfg, vcfg, tcfg, lcfg


def check_config(config, n_devices: int | None = None) -> dict:
    """Everything that can be wrong before anything is built: paths, mesh, batch split, optimiser values. Returns
    the mesh shape for `n_devices` (default: every device)."""
    _check_checkpoints(config)
    if config.model.umt5 and not config.model.tokenizer:
        raise ConfigError("config.model.tokenizer is empty: set it to the umT5 spiece.model path")
    n = jax.device_count() if n_devices is None else n_devices
    try:
        mesh_shape = sharding.resolve_mesh_shape(dict(config.mesh), n)
    except sharding.ShardingError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    batch_axes = sharding.batch_mesh_axes(config.rules, mesh_shape)
    ways = math.prod(mesh_shape[a] for a in batch_axes)
    bs, acc = int(config.data.batch_size), int(config.optim.accumulate)
    if acc < 1 or bs % acc:
        raise ConfigError(f"config.optim.accumulate={acc} must be >= 1 and divide data.batch_size={bs}")
    if (bs // acc) % ways:
        raise ConfigError(f"data.batch_size={bs} (micro-batch {bs // acc} with accumulate={acc}) is not divisible "
                          f"by the {ways} ways of the batch mesh axes {batch_axes} of mesh {mesh_shape}; make the "
                          f"batch a multiple of {ways * acc} or change config.mesh")
    if config.total_steps == 0 or config.total_steps < -1:
        raise ConfigError(f"total_steps={config.total_steps}: give a positive step count or -1 (all epochs)")
    if config.total_steps == -1 and not config.data.num_epochs:
        raise ConfigError("total_steps=-1 means 'all epochs' but data.num_epochs is None: set one of them")
    for k in ("log_every", "checkpoint_every", "keep"):
        if int(config[k]) < 1:
            raise ConfigError(f"config.{k}={config[k]} must be >= 1")
    if config.schedule.num_train_timesteps < 2 or config.schedule.shift <= 0:
        raise ConfigError(f"config.schedule {dict(config.schedule)}: need num_train_timesteps >= 2 and shift > 0")
    return mesh_shape


def _check_path(config, key):
    """config.model.<key> is empty (random weights) or a converted checkpoint of the right kind (reads only its
    config.json)."""
    path = config.model[key]
    if path and not (Path(path) / "config.json").is_file():
        tool = {"dit": "wan_dit", "vae": "wan_vae"}.get(key, key)
        raise ConfigError(f"config.model.{key}={path!r} is not a converted checkpoint directory (no config.json); "
                          f"convert it with `python -m convert.{tool} --src ... --dst {path}`, or set "
                          f"--config.model.{key}='' for random weights")
    if path:
        return checkpoints.read_config(path, {"dit": "wan", "vae": checkpoints.AUTOENCODER_KINDS, "umt5": "umt5"}[key])
    return None


def _check_checkpoints(config):
    """The DiT, VAE and text encoder the run would use (checkpoints or the named random variants) fit together;
    from config.json files only, before any weight is read."""
    found = {key: _check_path(config, key) for key in ("dit", "vae", "umt5")}
    wcfg, vcfg, tcfg, _ = model_configs(config)
    try:
        check_compatible(found["dit"] or wcfg, found["vae"] or vcfg, found["umt5"] or tcfg)
    except CompatibilityError as e:
        variant = {"dit": "variant", "vae": "vae_variant", "umt5": "umt5_variant"}
        used = ", ".join(f"config.model.{k}={config.model[k]!r}" if config.model[k] else
                         f"config.model.{k}='' (random {config.model[variant[k]]!r})" for k in variant)
        raise CompatibilityError(f"{used}: {e}") from e


def tokens_per_sample(config, wcfg, vcfg) -> int:
    """DiT tokens of one clip of config.data."""
    d = config.data
    f = 1 + (int(d.frames) - 1) // vcfg.temporal_factor
    h, w = int(d.height) // vcfg.spatial_factor, int(d.width) // vcfg.spatial_factor
    pt, ph, pw = wcfg.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def total_steps(config, source) -> int:
    """config.total_steps, or (-1) the steps of data.num_epochs over `source`."""
    if config.total_steps > 0:
        return int(config.total_steps)
    _, n_proc = pipeline.shard_options(config.data)
    per_host = len(source) // n_proc
    return per_host * int(config.data.num_epochs) // (int(config.data.batch_size) // n_proc)


# ------------------------------------------------------------------------------------------------- captions
def text_table(config, workdir, captions) -> conditioning.TextTable:
    """Every distinct caption encoded once (through the embedding cache under config.text.cache_dir, default
    WORKDIR/text_cache) by the run's umT5 (config.model.umt5, or the named variant drawn from fold_in(seed, 4));
    the encoder's weights are dropped when this returns."""
    m, text_len = config.model, int(config.text.text_len)
    tokenizer = tokenizer_lib.load_tokenizer(m.tokenizer or ("bytes" if not m.umt5 else ""))
    if m.umt5:
        tcfg, tparams = checkpoints.load_umt5(m.umt5)
        encoder_id = text.checkpoint_identity(m.umt5, tcfg)
    else:
        tcfg = umt5.Umt5Config.named(m.umt5_variant)
        tparams = umt5.init(tcfg, jax.random.fold_in(jax.random.key(config.seed), 4))
        encoder_id = f"random:{m.umt5_variant}:seed{config.seed}"
    cache = text.EmbeddingCache(config.text.cache_dir or Path(workdir) / "text_cache", encoder_id,
                                tokenizer_id=getattr(tokenizer, "identity", repr(tokenizer)), text_len=text_len)
    encode = functools.partial(text.encode_text, tcfg, tparams, tokenizer, text_len=text_len)
    return conditioning.encode_table(captions, cache, encode, text_len)


# ------------------------------------------------------------------------------------------------- abstract state
@dataclasses.dataclass(frozen=True)
class AbstractState:
    """The step's non-base inputs as jax.ShapeDtypeStruct trees carrying their shardings: nothing allocated."""
    lora: Any    # the LoRA A/B tree
    state: Any   # {"step", "lora", "opt"}: the train state, donated to the step
    batch: dict  # {"source", "target", "text", "text_lens"}: the global batch
    key: jax.ShapeDtypeStruct  # the step key (raw uint32 key data), replicated

    def shardings(self, tree):
        return jax.tree.map(lambda x: x.sharding, tree)


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_state(config, cfg: step_lib.StepConfig, mesh: Mesh, rules, text_rows: int) -> AbstractState:
    """The abstract LoRA, train state, batch and key of `cfg` on `mesh` under `rules`: what training places its
    arrays by and what plan.py compiles the step for. `text_rows` is the padded caption length of the batch."""
    lcfg, wcfg = cfg.lcfg, cfg.wcfg
    lora_shapes = jax.eval_shape(
        lambda: lora_lib.init(lcfg, wan.param_shapes(wcfg), jax.random.key(0)).params)
    lora_sh = sharding.tree_shardings(step_lib.lora_axes(lcfg, wcfg, lora_shapes), mesh, rules, lora_shapes)
    state_shapes = jax.eval_shape(functools.partial(step_lib.init_state, cfg), lora_shapes)
    state_sh = step_lib.state_shardings(state_shapes, lora_sh, mesh)
    bshapes = step_lib.batch_shapes(config, wcfg, text_rows)
    batch_sh = {k: sharding.batch_sharding(mesh, len(v.shape), rules) for k, v in bshapes.items()}
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    key = jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=sharding.replicated(mesh))
    return AbstractState(_with_shardings(lora_shapes, lora_sh), _with_shardings(state_shapes, state_sh),
                         _with_shardings(bshapes, batch_sh), key)


# ------------------------------------------------------------------------------------------------- prepare
@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What `prepare` built for a run: the loop drives `step_fn`; tests drive it with batches of their own."""
    config: ml_collections.ConfigDict
    workdir: Path
    mesh: Mesh
    rules: dict
    cfg: step_lib.StepConfig     # the step's static configs (the loaded checkpoints' architectures)
    source: Any                  # the data source, built once (the loop's iterator reads it)
    table: conditioning.TextTable
    base: dict                   # {"dit", "vae", "zero_latent"}, frozen, placed in their shardings
    abstract: AbstractState
    state: dict                  # the initial train state (step 0), in abstract.state's shardings
    step_key: jax.Array          # raw key data the step folds its step number into
    step_fn: Callable            # the compiled step: (base, state, batch, step_key) -> (state, metrics)
    total: int                   # the step the run stops after
    tokens_per_step: int         # DiT tokens of one global batch


def prepare(config, workdir, say: Callable[[str], None] = lambda msg: None) -> TrainSetup:
    """Everything before the first step (module docstring), in that order; cheap checks first, no device touched
    before they pass."""
    workdir = Path(workdir).absolute()
    for key in ("dit", "vae", "umt5"):
        _check_path(config, key)
    sharding.init_distributed(config.distributed, where="config.distributed")
    mesh_shape = check_config(config)
    rules = sharding.normalize_rules(config.rules)
    mesh = sharding.make_mesh(mesh_shape)
    wcfg, vcfg, _, lcfg = model_configs(config)
    # Shardings are checked on abstract shapes before any weight exists.
    stacked = options_from(config.model).scan_layers
    sharding.tree_shardings(wan.param_axes(wcfg, stacked=stacked), mesh, rules,
                            wan.param_shapes(wcfg, stacked=stacked))
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        files.write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

    source = pipeline.make_source(config.data)
    table = text_table(config, workdir, conditioning.dataset_captions(source))
    say(f"{len(table.index)} captions encoded ({table.rows} text rows)")
    wcfg, dit = base_lib.load_dit(config, wcfg, mesh, rules)
    vcfg, vparams = base_lib.load_vae(config, vcfg, mesh)
    say("base models ready")
    cfg = step_lib.step_config(config, wcfg, vcfg, lcfg)
    base = {"dit": dit, "vae": vparams, "zero_latent": base_lib.zero_latent(config, vcfg, vparams, mesh)}

    abstract = abstract_state(config, cfg, mesh, rules, table.rows)
    key = jax.random.key(config.seed)
    lora_params = jax.jit(lambda k: lora_lib.init(lcfg, wan.param_shapes(wcfg), k).params,
                          out_shardings=abstract.shardings(abstract.lora))(jax.random.fold_in(key, 1))
    state = jax.jit(functools.partial(step_lib.init_state, cfg),
                    out_shardings=abstract.shardings(abstract.state))(lora_params)
    step_key = jax.device_put(jax.random.key_data(jax.random.fold_in(key, 2)), abstract.key.sharding)

    total = total_steps(config, source)
    tokens = tokens_per_sample(config, wcfg, vcfg) * int(config.data.batch_size)
    say(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices ({jax.process_count()} processes); "
        f"base params {count(dit) / 1e6:.2f} M DiT + {count(vparams) / 1e6:.2f} M VAE; "
        f"LoRA {count(lora_params) / 1e6:.3f} M trainable; {tokens} tokens per step; steps to {total}")
    say("state ready; compiling the train step")
    with sharding.rules_context(mesh, rules):
        t0 = time.perf_counter()
        step_fn = step_lib.jit_train_step(cfg, mesh, jax.tree.map(lambda x: x.sharding, base),
                                          abstract.shardings(abstract.state), abstract.shardings(abstract.batch)
                                          ).lower(base, state, abstract.batch, step_key).compile()
    say(f"compiled the train step in {time.perf_counter() - t0:.1f} s")
    return TrainSetup(config=config, workdir=workdir, mesh=mesh, rules=rules, cfg=cfg, source=source, table=table,
                      base=base, abstract=abstract, state=state, step_key=step_key, step_fn=step_fn, total=total,
                      tokens_per_step=tokens)


def device_batch(tr: TrainSetup, host) -> dict:
    """This process's share of a batch (uint8 clips + captions) -> global device arrays; captions become text
    rows here, and "caption"/"id" never reach the device."""
    emb, lens = tr.table(host["caption"])
    local = {"source": host["source"], "target": host["target"], "text": emb, "text_lens": lens}
    shapes = tr.abstract.batch
    want = int(shapes["source"].shape[0]) // jax.process_count()
    if len(host["source"]) != want:
        raise RuntimeError(f"the data pipeline gave a batch of {len(host['source'])}, expected {want}")
    return {k: jax.make_array_from_process_local_data(shapes[k].sharding, v, shapes[k].shape)
            for k, v in local.items()}
