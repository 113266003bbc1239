"""One optimiser step of PickStyle's LoRA training, pure, and its jit with shardings and donation.

    train_step(cfg, base, state, batch, rng) -> (state, metrics)
  base   {"dit": frozen DiT params, "vae": VAE params, "zero_latent": E(zero clip) [1, f, h, w, 16]}; never donated,
         never differentiated (jax.grad sees only the LoRA leaves, so no weight gradient of a frozen tensor exists).
  state  {"step": int32, "lora": LoRA A/B tree, "opt": optax state}; donated.
  batch  {"source", "target": uint8 [B, F, H, W, 3], "text": fp32 [B, L, D], "text_lens": int32 [B]}.
  rng    the run's key; the step folds its own step number in, so a resumed run draws what the straight run drew.
Inside (docs/METHOD.md, "Training objective"): pixels to [-1, 1], VAE-encode target and source (stop_gradient), the
context [E(0) | E(source) | ones(64)] (conditioning.py), the flow draw of flow.py, loss = mean_b(w_b * mse_b), the
gradient w.r.t. the LoRA, global-norm clip, AdamW.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from pickstyle_jax import conditioning, flow, lora as lora_lib, sharding
from pickstyle_jax.base import options_from
from pickstyle_jax.models import autoencoders, vae, wan

__all__ = ["StepConfig", "step_config", "make_optimizer", "init_state", "encode_pair", "loss_fn", "grads",
           "train_step", "lora_axes", "state_shardings", "batch_shapes", "jit_train_step"]

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step needs besides arrays (hashable, static)."""
    wcfg: wan.WanConfig
    vcfg: vae.VaeConfig  # or conv_ae.ConvAeConfig (models/autoencoders.py)
    lcfg: lora_lib.LoraConfig
    grid: flow.Grid
    accumulate: int = 1
    optim: tuple = ()  # (lr, b1, b2, eps, weight_decay, grad_clip)
    options: wan.Options | None = None  # how the DiT runs (config.model's run-time keys); None: backend default


def step_config(config, wcfg, vcfg, lcfg) -> StepConfig:
    """The StepConfig of a training config (config.schedule, config.optim) and the run's model configs."""
    o = config.optim
    return StepConfig(wcfg, vcfg, lcfg, flow.Grid.make(config.schedule.shift, config.schedule.num_train_timesteps),
                      int(o.accumulate), (float(o.lr), float(o.b1), float(o.b2), float(o.eps),
                                          float(o.weight_decay), float(o.grad_clip)), options_from(config.model))


def make_optimizer(optim) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW (decoupled weight decay, as torch.optim.AdamW); constant learning rate."""
    lr, b1, b2, eps, wd, clip = optim
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd))


def init_state(cfg: StepConfig, lora_params) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "lora": lora_params, "opt": make_optimizer(cfg.optim).init(lora_params)}


def encode_pair(cfg: StepConfig, vae_params, batch):
    """(x0 = E(target), E(source)) fp32 latents, without gradient; one VAE call on the stacked pair."""
    b = batch["target"].shape[0]
    video = conditioning.pixels(jnp.concatenate([batch["target"], batch["source"]], axis=0))
    z = jax.lax.stop_gradient(autoencoders.encode(cfg.vcfg, vae_params, video))
    return z[:b], z[b:]


def loss_fn(cfg: StepConfig, lora_params, base, batch, rng):
    """The weighted flow-matching loss of one (micro-)batch."""
    x0, z_src = encode_pair(cfg, base["vae"], batch)
    b = x0.shape[0]
    k_index, k_eps = jax.random.split(rng)
    sigma, t, w = flow.lookup(cfg.grid, flow.draw_index(k_index, b, cfg.grid.n))
    eps = jax.random.normal(k_eps, x0.shape, f32)
    x_t, target = flow.noise(x0, eps, sigma)
    v = wan.forward(cfg.wcfg, base["dit"], x_t, t, batch["text"],
                    conditioning.vace_context(base["zero_latent"], z_src),
                    lora=lora_lib.Lora(lora_params, cfg.lcfg), text_lens=batch["text_lens"], options=cfg.options)
    return flow.weighted_mse(v, target, w)


def grads(cfg: StepConfig, lora_params, base, batch, rng):
    """(loss, grads) over the batch, in `accumulate` micro-batches when asked (lax.scan: one micro-batch of
    activations alive at a time); micro-batch m holds samples m, m + A, m + 2A, ... and draws from fold_in(rng, m)."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, cfg))
    a = cfg.accumulate
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


def train_step(cfg: StepConfig, base, state, batch, rng):
    """One optimiser step (module docstring). Pure; `jit_train_step` jits it."""
    rng = jax.random.fold_in(rng, state["step"])
    loss, g = grads(cfg, state["lora"], base, batch, rng)
    updates, opt = make_optimizer(cfg.optim).update(g, state["opt"], state["lora"])
    new = {"step": state["step"] + 1, "lora": optax.apply_updates(state["lora"], updates), "opt": opt}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(g)}


# ------------------------------------------------------------------------------------------------- shardings
def lora_axes(lcfg, wcfg, lora_shapes):
    """Logical axes of the LoRA leaves: A [in, r] takes the kernel's input axis, B [r, out] its output axis."""
    axes = wan.param_axes(wcfg)  # the LoRA keeps the flat paths whatever the DiT layout

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


def batch_shapes(config, wcfg, text_rows: int) -> dict:
    """Global abstract batch (dtypes and shapes the step is compiled for)."""
    d = config.data
    b = int(d.batch_size)
    clip = jax.ShapeDtypeStruct((b, d.frames, d.height, d.width, 3), jnp.uint8)
    return {"source": clip, "target": clip, "text": jax.ShapeDtypeStruct((b, text_rows, wcfg.text_dim), f32),
            "text_lens": jax.ShapeDtypeStruct((b,), jnp.int32)}


def jit_train_step(cfg: StepConfig, mesh, base_sh, state_sh, batch_sh):
    """The step jitted with explicit in/out shardings; state donated, base not."""
    rep = sharding.replicated(mesh)
    return jax.jit(functools.partial(train_step, cfg), in_shardings=(base_sh, state_sh, batch_sh, rep),
                   out_shardings=(state_sh, rep), donate_argnums=(1,))
