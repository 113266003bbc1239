"""PickStyle LoRA training: frozen Wan2.1-VACE, LoRA on the VACE blocks, flow matching on motion clip pairs.

    python -m pickstyle_jax.train --config=configs/pickstyle.py --workdir=runs/x [--config.total_steps=100 ...]

One pure, jitted `train_step(base, state, batch, rng) -> (state, metrics)`:
  base   {"dit": frozen DiT params, "vae": VAE params, "zero_latent": E(zero clip) [1, f, h, w, 16]}; never donated,
         never differentiated (jax.grad sees only the LoRA leaves, so no weight gradient of a frozen tensor exists).
  state  {"step": int32, "lora": LoRA A/B tree, "opt": optax state}; donated.
  batch  {"source", "target": uint8 [B, F, H, W, 3], "text": fp32 [B, L, D], "text_lens": int32 [B]}.
  rng    the run's key; the step folds its own step number in, so a resumed run draws what the straight run drew.
Inside: pixels to [-1, 1], VAE-encode target and source (stop_gradient), context [E(0) | E(source) | ones(64)],
the flow draw of flow.py, loss = mean_b(w_b * mse_b), gradient w.r.t. the LoRA, global-norm clip, AdamW.

The run (`run`): distributed init, mesh and rules from the config, base models loaded (or randomly initialised)
straight into their shardings, every caption encoded once into the embedding cache before step 1 (umT5 then
leaves device memory), Orbax checkpoints of state + PRNG key + Grain iterator every `checkpoint_every` steps and on
SIGTERM/SIGINT, automatic resume, metrics.jsonl, and the LoRA exported at the end (checkpoint dir, PickStyle .pth
and PEFT safetensors).
Config schema: `default_config()`. Beside this file, importable from here: train_base.py (the frozen base models),
train_text.py (the caption table), train_checkpoints.py (checkpoints, signals, the LoRA export).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import multihost_utils

from pickstyle_jax import flow, lora as lora_lib, sharding
from pickstyle_jax.data import pipeline
from pickstyle_jax.data.sources import DataError
from pickstyle_jax.models import autoencoders, umt5, vae, wan
from pickstyle_jax.base import options_from
from pickstyle_jax.train_base import count, load_dit, load_vae, random_dit, zero_latent
from pickstyle_jax.train_checkpoints import (_checkpoint_manager, _save, _Signals, _trim_metrics, export_lora,
                                             restore_state)
from pickstyle_jax.train_text import TextTable, build_text_table, dataset_captions

__all__ = ["ConfigError", "LossNotFinite", "default_config", "model_configs", "check_config", "Setup", "make_optimizer",
           "setup_from_config", "init_state", "pixels", "vace_context", "encode_pair", "loss_fn", "train_step",
           "lora_axes", "state_shardings", "batch_shapes", "jit_train_step", "init_distributed",
           "dataset_captions", "TextTable", "build_text_table", "load_dit", "random_dit", "load_vae", "zero_latent",
           "count", "tokens_per_sample", "total_steps", "restore_state", "export_lora", "prepare", "device_batch",
           "run", "main"]

f32 = jnp.float32


class ConfigError(ValueError):
    """A training config that cannot run; the message says what to change."""


class LossNotFinite(FloatingPointError):
    """The loss became NaN or inf: the message names the step and the last good checkpoint (a user error: the
    learning rate or the data, not the code)."""


# ------------------------------------------------------------------------------------------------- config
def default_config() -> ml_collections.ConfigDict:
    """The training config schema with the paper's values (configs/*.py start from it, then lock it)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Models: converted checkpoint dirs (python -m convert.*); "" builds random weights of the named variant.
    c.model = ml_collections.ConfigDict(dict(
        variant="vace-14B", dit="", vae_variant="wan2.1", vae="", umt5_variant="umt5-xxl", umt5="",
        tokenizer="", param_dtype="bfloat16", dtype="bfloat16", attention="cudnn", remat_policy="full",
        scan_layers=True))
    c.lora = ml_collections.ConfigDict(dict(rank=128, alpha=128.0, targets=lora_lib.LoraConfig().targets))
    c.schedule = ml_collections.ConfigDict(dict(shift=5.0, num_train_timesteps=1000))
    c.optim = ml_collections.ConfigDict(dict(lr=5.6e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                                             grad_clip=1.0, accumulate=1))
    c.data = pipeline.default_config()
    c.total_steps = -1          # -1: all of data.num_epochs
    c.log_every = 10
    c.checkpoint_every = 10
    c.keep = 3
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = ml_collections.ConfigDict({k: v for k, v in sharding.DEFAULT_RULES.items()})
    c.rules.allow_replicate = False
    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0, auto=False))
    c.text = ml_collections.ConfigDict(dict(cache_dir="", text_len=512))
    return c


def model_configs(config):
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


def check_config(config, n_devices: int | None = None):
    """Everything that can be wrong before anything is built: paths, mesh, batch split, optimiser values."""
    _check_checkpoints(config)
    if config.model.umt5 and not config.model.tokenizer:
        raise ConfigError("config.model.tokenizer is empty: set it to the umT5 spiece.model path")
    n = jax.device_count() if n_devices is None else n_devices
    try:
        mesh_shape = dict(config.mesh)
        sizes = [int(s) for s in mesh_shape.values()]
        known = math.prod(s for s in sizes if s != -1)
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"config.mesh {mesh_shape}: sizes must be positive, with at most one -1")
        if n % known or (-1 not in sizes and known != n):
            raise ConfigError(f"config.mesh {mesh_shape} does not fit {n} devices: its axes multiply to {known}; "
                              f"set the sizes so they multiply to {n} (one of them may be -1)")
        sizes = [n // known if s == -1 else s for s in sizes]
        mesh_shape = dict(zip(mesh_shape, sizes))
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.mesh {config.mesh}: {e}") from e
    rules = sharding.normalize_rules(config.rules)
    batch_axes = [a for a in ((rules.get("batch"),) if isinstance(rules.get("batch"), str)
                              else rules.get("batch") or ()) if a in mesh_shape]
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


# ------------------------------------------------------------------------------------------------- the step
@dataclasses.dataclass(frozen=True)
class Setup:
    """What the step needs besides arrays (hashable, static)."""
    wcfg: wan.WanConfig
    vcfg: vae.VaeConfig  # or conv_ae.ConvAeConfig (models/autoencoders.py)
    lcfg: lora_lib.LoraConfig
    grid: flow.Grid
    accumulate: int = 1
    optim: tuple = ()  # (lr, b1, b2, eps, weight_decay, grad_clip)
    options: wan.Options | None = None  # how the DiT runs (config.model's run-time keys); None: backend default


def make_optimizer(optim) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW (decoupled weight decay, as torch.optim.AdamW); constant learning rate."""
    lr, b1, b2, eps, wd, clip = optim
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd))


def setup_from_config(config, wcfg, vcfg, lcfg) -> Setup:
    o = config.optim
    return Setup(wcfg, vcfg, lcfg, flow.Grid.make(config.schedule.shift, config.schedule.num_train_timesteps),
                 int(o.accumulate), (float(o.lr), float(o.b1), float(o.b2), float(o.eps), float(o.weight_decay),
                                     float(o.grad_clip)), options_from(config.model))


def init_state(setup: Setup, lora_params) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "lora": lora_params, "opt": make_optimizer(setup.optim).init(lora_params)}


def pixels(u8):
    """uint8 pixels -> fp32 in [-1, 1]."""
    return u8.astype(f32) / 127.5 - 1.0


def vace_context(zero_latent, z_source):
    """[E(0) | E(source) | ones(64)]: PickStyle's mask is all ones, so the inactive frames are a zero clip."""
    b = z_source.shape[0]
    inactive = jnp.broadcast_to(zero_latent.astype(f32), (b,) + zero_latent.shape[1:])
    return jnp.concatenate([inactive, z_source.astype(f32), jnp.ones(z_source.shape[:-1] + (64,), f32)], axis=-1)


def encode_pair(setup: Setup, vae_params, batch):
    """(x0 = E(target), E(source)) fp32 latents, without gradient; one VAE call on the stacked pair."""
    b = batch["target"].shape[0]
    video = pixels(jnp.concatenate([batch["target"], batch["source"]], axis=0))
    z = jax.lax.stop_gradient(autoencoders.encode(setup.vcfg, vae_params, video))
    return z[:b], z[b:]


def loss_fn(setup: Setup, lora_params, base, batch, rng):
    """The weighted flow-matching loss of one (micro-)batch and its per-sample parts."""
    x0, z_src = encode_pair(setup, base["vae"], batch)
    b = x0.shape[0]
    k_index, k_eps = jax.random.split(rng)
    sigma, t, w = flow.lookup(setup.grid, flow.draw_index(k_index, b, setup.grid.n))
    eps = jax.random.normal(k_eps, x0.shape, f32)
    x_t, target = flow.noise(x0, eps, sigma)
    v = wan.forward(setup.wcfg, base["dit"], x_t, t, batch["text"], vace_context(base["zero_latent"], z_src),
                    lora=lora_lib.Lora(lora_params, setup.lcfg), text_lens=batch["text_lens"], options=setup.options)
    return flow.weighted_mse(v, target, w)


def _grads(setup: Setup, lora_params, base, batch, rng):
    """(loss, grads) over the batch, in `accumulate` micro-batches when asked (lax.scan: one micro-batch of
    activations alive at a time); micro-batch m holds samples m, m + A, m + 2A, ..."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, setup))
    a = setup.accumulate
    if a == 1:
        return grad_fn(lora_params, base, batch, rng)
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1), batch)

    def body(carry, xs):
        m, mb = xs
        loss, g = grad_fn(lora_params, base, mb, jax.random.fold_in(rng, m))
        return jax.tree.map(jnp.add, carry, (loss, g)), None

    zero = (jnp.zeros((), f32), jax.tree.map(jnp.zeros_like, lora_params))
    (loss, g), _ = jax.lax.scan(body, zero, (jnp.arange(a), micro))
    return loss / a, jax.tree.map(lambda x: x / a, g)


def train_step(setup: Setup, base, state, batch, rng):
    """One optimiser step (module docstring). Pure; jit it with `jit_train_step`."""
    rng = jax.random.fold_in(rng, state["step"])
    loss, grads = _grads(setup, state["lora"], base, batch, rng)
    updates, opt = make_optimizer(setup.optim).update(grads, state["opt"], state["lora"])
    new = {"step": state["step"] + 1, "lora": optax.apply_updates(state["lora"], updates), "opt": opt}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


# ------------------------------------------------------------------------------------------------- shardings
def lora_axes(lcfg, wcfg, lora_shapes):
    """Logical axes of the LoRA leaves: A [in, r] takes the kernel's input axis, B [r, out] its output axis."""
    axes = wan.param_axes(wcfg)

    def walk(tree, kernel_axes):
        if "A" in tree and "B" in tree and not isinstance(tree["A"], dict):
            k = kernel_axes["kernel"]
            return {"A": (k[0], None), "B": (None, k[1])}
        return {key: walk(sub, kernel_axes[key]) for key, sub in tree.items()}

    return walk(lora_shapes, axes)


def state_shardings(state_shapes, lora_sh, mesh):
    """Optimizer moments follow the LoRA leaf they belong to (matched by their dict path); the rest replicated."""
    by_path = {tuple(str(k.key) for k in kp): s
               for kp, s in jax.tree_util.tree_flatten_with_path(lora_sh)[0]}
    rep = sharding.replicated(mesh)

    def pick(kp, leaf):
        keys = tuple(str(k.key) for k in kp if isinstance(k, jax.tree_util.DictKey))
        for n in range(len(keys)):
            if keys[n:] in by_path and by_path[keys[n:]] is not None:
                s = by_path[keys[n:]]
                return s if len(s.spec) <= len(leaf.shape) else rep
        return rep

    return jax.tree_util.tree_map_with_path(pick, state_shapes)


def batch_shapes(config, wcfg, text_rows: int, *, latents: bool = False):
    """Global abstract batch (dtypes and shapes the step is compiled for)."""
    d = config.data
    b = int(d.batch_size)
    out = {"source": jax.ShapeDtypeStruct((b, d.frames, d.height, d.width, 3), jnp.uint8),
           "target": jax.ShapeDtypeStruct((b, d.frames, d.height, d.width, 3), jnp.uint8),
           "text": jax.ShapeDtypeStruct((b, text_rows, wcfg.text_dim), f32),
           "text_lens": jax.ShapeDtypeStruct((b,), jnp.int32)}
    return out


def jit_train_step(setup: Setup, mesh, rules, base_sh, state_sh, batch_sh):
    """The step jitted with explicit in/out shardings; state donated, base not."""
    rep = sharding.replicated(mesh)
    return jax.jit(functools.partial(train_step, setup), in_shardings=(base_sh, state_sh, batch_sh, rep),
                   out_shardings=(state_sh, rep), donate_argnums=(1,))


# ------------------------------------------------------------------------------------------------- the run

def init_distributed(d) -> None:
    """jax.distributed from config.distributed (before any device is touched)."""
    if d.auto:
        jax.distributed.initialize()
    elif d.coordinator:
        if not 0 <= int(d.process_id) < int(d.num_processes):
            raise ConfigError(f"config.distributed: process_id {d.process_id} is not in [0, {d.num_processes})")
        jax.distributed.initialize(d.coordinator, int(d.num_processes), int(d.process_id))
    elif int(d.num_processes) != 1:
        raise ConfigError(f"config.distributed.num_processes={d.num_processes} needs a coordinator host:port "
                          f"(or auto=True on a TPU pod / SLURM / OMPI / Kubernetes)")


def tokens_per_sample(config, wcfg, vcfg) -> int:
    d = config.data
    f = 1 + (int(d.frames) - 1) // vcfg.temporal_factor
    h, w = int(d.height) // vcfg.spatial_factor, int(d.width) // vcfg.spatial_factor
    pt, ph, pw = wcfg.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def total_steps(config, source) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    _, n_proc = pipeline.shard_options(config.data)
    per_host = len(source) // n_proc
    return per_host * int(config.data.num_epochs) // (int(config.data.batch_size) // n_proc)


def prepare(config, workdir, say=lambda msg: None) -> types.SimpleNamespace:
    """Everything before the first step: checks, distributed init, mesh, base models, text table, LoRA + optimizer
    state and the compiled step. Returns a namespace (tests drive `step_fn` with batches of their own)."""
    workdir = Path(workdir).absolute()
    for key in ("dit", "vae", "umt5"):  # cheap checks first: no device is touched yet
        _check_path(config, key)
    init_distributed(config.distributed)
    mesh_shape = check_config(config)
    rules = sharding.normalize_rules(config.rules)
    mesh = sharding.make_mesh(mesh_shape)
    wcfg, vcfg, _, lcfg = model_configs(config)
    setup_grid = setup_from_config(config, wcfg, vcfg, lcfg)
    # Shardings are checked on abstract shapes before any weight exists.
    stacked = setup_grid.options.scan_layers
    sharding.tree_shardings(wan.param_axes(wcfg, stacked=stacked), mesh, rules,
                            wan.param_shapes(wcfg, stacked=stacked))
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

    source = pipeline.make_source(config.data)
    from pickstyle_jax.models import tokenizer as tok_lib
    tokenizer = tok_lib.load_tokenizer(config.model.tokenizer or ("bytes" if not config.model.umt5 else ""))
    table = build_text_table(config, workdir, tokenizer, dataset_captions(source))
    say(f"{len(table.index)} captions encoded ({table.rows} text rows)")
    wcfg, dit = load_dit(config, wcfg, mesh, rules)
    vcfg, vparams = load_vae(config, vcfg, mesh)
    say("base models ready")
    setup = dataclasses.replace(setup_grid, wcfg=wcfg, vcfg=vcfg)
    base = {"dit": dit, "vae": vparams, "zero_latent": zero_latent(config, vcfg, vparams, mesh)}

    key = jax.random.key(config.seed)
    lora_shapes = jax.eval_shape(lambda: lora_lib.init(lcfg, wan.param_shapes(wcfg), key).params)
    lora_sh = sharding.tree_shardings(lora_axes(lcfg, wcfg, lora_shapes), mesh, rules, lora_shapes)
    lora_params = jax.jit(lambda k: lora_lib.init(lcfg, wan.param_shapes(wcfg), k).params,
                          out_shardings=lora_sh)(jax.random.fold_in(key, 1))
    state_shapes = jax.eval_shape(functools.partial(init_state, setup), lora_shapes)
    state_sh = state_shardings(state_shapes, lora_sh, mesh)
    state = jax.jit(functools.partial(init_state, setup), out_shardings=state_sh)(lora_params)
    step_key = jax.device_put(jax.random.key_data(jax.random.fold_in(key, 2)), sharding.replicated(mesh))

    total = total_steps(config, source)
    bshapes = batch_shapes(config, wcfg, table.rows)
    batch_sh = {k: sharding.batch_sharding(mesh, len(v.shape), rules) for k, v in bshapes.items()}
    base_sh = jax.tree.map(lambda x: x.sharding, base)
    tokens = tokens_per_sample(config, wcfg, vcfg) * int(config.data.batch_size)
    if True:
        say(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices ({jax.process_count()} processes); "
              f"base params {count(dit) / 1e6:.2f} M DiT + {count(vparams) / 1e6:.2f} M VAE; "
              f"LoRA {count(lora_params) / 1e6:.3f} M trainable; {tokens} tokens per step; steps to {total}")
    say("state ready; compiling the train step")
    with sharding.rules_context(mesh, rules):
        t0 = time.perf_counter()
        step_fn = jit_train_step(setup, mesh, rules, base_sh, state_sh, batch_sh).lower(
            base, state, bshapes, step_key).compile()
    say(f"compiled the train step in {time.perf_counter() - t0:.1f} s")
    return types.SimpleNamespace(**{k: v for k, v in locals().items() if k != "say"})


def device_batch(tr, host) -> dict:
    """This process's share of a batch (uint8 clips + captions) -> global device arrays; captions become text
    rows here, and "caption"/"id" never reach the device."""
    emb, lens = tr.table(host["caption"])
    local = {"source": host["source"], "target": host["target"], "text": emb, "text_lens": lens}
    want = int(tr.bshapes["source"].shape[0]) // jax.process_count()
    if len(host["source"]) != want:
        raise RuntimeError(f"the data pipeline gave a batch of {len(host['source'])}, expected {want}")
    return {k: jax.make_array_from_process_local_data(tr.batch_sh[k], v, tr.bshapes[k].shape) for k, v in local.items()}


def run(config, workdir) -> int:
    """The training run (module docstring); returns the exit code (0 done, 128 + signal when stopped)."""
    t_start = time.perf_counter()

    def say(msg):
        if jax.process_index() == 0:
            print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    workdir = Path(workdir).absolute()
    tr = prepare(config, workdir, say)
    state, step_key, lcfg, source = tr.state, tr.step_key, tr.lcfg, tr.source
    main_proc = jax.process_index() == 0
    it = pipeline.make_iterator(config.data, seed=config.seed)
    mgr = _checkpoint_manager(workdir, config.keep)
    start = 0
    if mgr.latest_step() is not None:
        start = int(mgr.latest_step())
        abstract = {"train": jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                          tr.state_shapes, tr.state_sh),
                    "key": jax.ShapeDtypeStruct(step_key.shape, step_key.dtype, sharding=step_key.sharding)}
        restored = restore_state(mgr, start, abstract, it)
        state, step_key = restored["train"], restored["key"]
        if main_proc:
            _trim_metrics(workdir / "metrics.jsonl", start)
        say(f"resumed from {mgr.directory} at step {start}")

    total = total_steps(config, source)
    step_fn, base, tokens = tr.step_fn, tr.base, tr.tokens
    lr = float(config.optim.lr)
    metrics_file = open(workdir / "metrics.jsonl", "a") if main_proc else None
    bar = None
    if main_proc and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    step, code, saved = start, 0, start
    window_t, window_n = time.perf_counter(), 0
    with _Signals() as sig:
        while step < total:
            try:
                host = next(it)
            except StopIteration:
                say(f"data exhausted after step {step}")
                break
            except DataError as e:  # raised where an example is read: in this process or a Grain worker
                it.close()
                raise DataError(f"{e} (training stopped after step {step}; {_kept(mgr)})") from e
            batch = device_batch(tr, host)
            state, metrics = step_fn(base, state, batch, step_key)
            step += 1
            window_n += 1
            m = jax.device_get(metrics)
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise LossNotFinite(
                    f"loss is {loss} at step {step}; stopping without saving it. The last good checkpoint is step "
                    f"{mgr.latest_step()} in {mgr.directory} (a rerun resumes there; consider a lower optim.lr)")
            if step % int(config.log_every) == 0 or step == total:
                dt = time.perf_counter() - window_t
                sps = window_n / dt if dt > 0 else 0.0
                row = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]), "lr": lr,
                       "steps_per_s": sps, "tokens_per_s": sps * tokens}
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", gnorm=f"{row['grad_norm']:.3f}")
                elif main_proc:
                    eta = (total - step) / sps if sps else float("nan")
                    print(f"step {step}/{total} loss {loss:.5f} grad_norm {row['grad_norm']:.4f} "
                          f"{sps:.2f} steps/s {row['tokens_per_s']:.0f} tokens/s eta {eta:.0f}s", flush=True)
                window_t, window_n = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            stop = sig.agreed()
            if step % int(config.checkpoint_every) == 0 or stop or step == total:
                _save(mgr, step, state, step_key, it)
                saved = step
            if stop:
                if main_proc:
                    print(f"stopped by {signal.Signals(stop).name} after step {step}; checkpoint saved in "
                          f"{mgr.directory}; run the same command again to resume", flush=True)
                code = 128 + stop
                break
    if bar is not None:
        bar.close()
    if metrics_file:
        metrics_file.close()
    if code == 0 and saved != step:
        _save(mgr, step, state, step_key, it)
    mgr.close()
    if code == 0:  # every process: the LoRA may be split across hosts, and the Orbax save is collective
        out = export_lora(workdir, lora_lib.Lora(multihost_utils.process_allgather(state["lora"], tiled=True), lcfg))
    if code == 0 and main_proc:
        print(f"done: step {step}; LoRA in {out}, {workdir / 'pickstyle_lora.pth'} (PickStyle) and "
              f"{workdir / 'lora.safetensors'} (PEFT / diffusers)", flush=True)
    return code


def _check_path(config, key):
    """config.model.<key> is empty (random weights) or a converted checkpoint of the right kind (reads only its
    config.json)."""
    from pickstyle_jax import checkpoints

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
    from pickstyle_jax.stylizer import CompatibilityError, check_compatible

    found = {key: _check_path(config, key) for key in ("dit", "vae", "umt5")}
    wcfg, vcfg, tcfg, _ = model_configs(config)
    try:
        check_compatible(found["dit"] or wcfg, found["vae"] or vcfg, found["umt5"] or tcfg)
    except CompatibilityError as e:
        variant = {"dit": "variant", "vae": "vae_variant", "umt5": "umt5_variant"}
        used = ", ".join(f"config.model.{k}={config.model[k]!r}" if config.model[k] else
                         f"config.model.{k}='' (random {config.model[variant[k]]!r})" for k in variant)
        raise CompatibilityError(f"{used}: {e}") from e


def _kept(mgr) -> str:
    last = mgr.latest_step()
    if last is None:
        return "no checkpoint was saved yet"
    return (f"checkpoint step {last} in {mgr.directory} is kept: fix the file and run the same command again to "
            f"resume from it")


def main(argv=None):
    """The command line (module docstring). Bad input ends in one line `error: ...` and exit status 2 (errors.py);
    --verbose or PICKSTYLE_TRACEBACK=1 shows the traceback."""
    from absl import app, flags
    from ml_collections import config_flags

    from pickstyle_jax import errors

    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:variant])", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, exports")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(argv):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        return run(errors.config_flag(), flags.FLAGS.workdir)

    errors.absl_run(_main, argv)


if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy of it, so that ConfigError is the one class the rest of
    # the package (errors.USER_ERRORS, plan.py) knows.
    from pickstyle_jax import train as _train

    _train.main()
