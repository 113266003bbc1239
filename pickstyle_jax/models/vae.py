"""Wan2.1 causal 3D VAE (PICKSTYLE.md §4): video [B,F,H,W,3] in [-1,1] <-> normalised latents [B,T,h,w,z].

Dimension key: B batch, F pixel frames, T latent (or chunk) frames, H/W pixel rows/columns, h/w latent rows/columns
(H/8, W/8), C channels. Everything is channels-last.

The model is a Flax NNX module (`WanVae`) whose attribute paths mirror the official `Wan2.1_VAE.pth` key names
(`encoder.downsamples.3.residual.2.kernel`, `decoder.upsamples.3.time_conv.bias`, ...): conv kernels are
`[kT,kH,kW,I,O]` / `[kH,kW,I,O]`, RMS-norm gammas are `scale` of shape (C,). Outside jit the parameters are a plain
nested dict (`init`, checkpoints, converters); `encode`/`decode` merge them into the module inside the jitted
function (`layers.bind`). Every parameter's logical axes are None (replicated): the VAE is small (127 M parameters,
0.5 GB in fp32) and its convolutions are activation-bound, so splitting kernels would only add gathers. On a mesh
(params or input placed on several devices) the activations are split instead: the batch over the rules' "batch"
axes, the other mesh axes over the frames' width and height (`_spatial_layout`), so every device convolves its own
tile of every frame and XLA exchanges the halo rows; the causal cache runs along time, so chunking is unchanged and
the result equals one device's (fp32: ~1e-6, tests/test_stylize_multidevice.py).

Two executions that agree to ~1e-6 relative (§4.2, §4.3):
  chunked=True (default): the official scheme. Encode runs frames [0], [1-4], [5-8], ...; decode one latent frame at a
    time. Each causal conv carries its last 2 input frames to the next chunk. Chunk 0 runs on its own (its shapes
    differ), the rest in one `lax.scan`, so live activations are those of one chunk, whatever the clip length.
  chunked=False: the whole clip in one pass; memory grows with F (81x480x832 fp32: XLA plans ~81 GiB of temporaries,
    against ~7 GiB chunked). On 2 CPU cores it is also ~10-20% slower at 17x128x128 (bench/vae.py); on accelerators
    the single pass may win for short clips.
Both are one call, `Encoder`/`Decoder(x, history, first)`: a zero history is the causal zero padding, and the
resamplers' first-chunk rules (§4.3: frame 0 passes the time down/up-sampler untouched) hold for any first-chunk
length, so the non-chunked pass is just "the whole clip as chunk 0".
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from pickstyle_jax import sharding
from pickstyle_jax.models import layers

# Per-channel statistics of Wan2.1 latents (official `WanVAE.mean/std`; diffusers' `latents_mean/std` defaults).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # sic: the official spelling
    dropout: float = 0.0  # inference only: kept for config fidelity, never applied
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: str = "float32"  # compute dtype of convs and attention; norms and softmax always run in fp32

    def __post_init__(self):
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per down stage), "
                             f"got {self.temperal_downsample}")
        if self.attn_scales:
            # The official decoder would insert attention blocks that diffusers' decoder omits; no release uses them.
            raise NotImplementedError(f"attn_scales={self.attn_scales}: attention inside the down/up stages is not "
                                      f"supported (every Wan2.1 VAE has attn_scales=())")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @classmethod
    def named(cls, name: str) -> "VaeConfig":
        variants = {
            "wan2.1": cls(),
            # Every layer kind and shortcut of wan2.1, 12x narrower, one residual block less per stage (as in
            # diffusers' own tests).
            "tiny": cls(base_dim=8, num_res_blocks=1),
        }
        if name not in variants:
            raise ValueError(f"unknown VAE config {name!r}; expected one of {sorted(variants)}")
        return variants[name]

    def replace(self, **kw) -> "VaeConfig":
        return dataclasses.replace(self, **kw)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


# ------------------------------------------------------------------------------------------------ structure
def encoder_layers(cfg: VaeConfig) -> list[tuple[str, int, int]]:
    """`encoder.downsamples.{k}` in order: (kind, in, out), kind in {res, down2d, down3d}."""
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    layers_ = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            layers_.append(("res", cin, cout))
            cin = cout
        if i != len(cfg.dim_mult) - 1:
            layers_.append(("down3d" if cfg.temperal_downsample[i] else "down2d", cout, cout))
    return layers_


def decoder_layers(cfg: VaeConfig) -> list[tuple[str, int, int, int]]:
    """`decoder.upsamples.{k}` in order: (kind, in, out, stage), kind in {res, up2d, up3d}."""
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    up_t = cfg.temperal_downsample[::-1]
    layers_ = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:  # the previous stage's upsampler halved the channels
            cin //= 2
        for _ in range(cfg.num_res_blocks + 1):
            layers_.append(("res", cin, cout, i))
            cin = cout
        if i != len(cfg.dim_mult) - 1:
            layers_.append(("up3d" if up_t[i] else "up2d", cout, cout // 2, i))
    return layers_


# ----------------------------------------------------------------------------------------- pure layer maths
def _fold_time() -> bool:
    # XLA:CPU's 3D convolution is ~4x slower than a 2D convolution over frames with the kT taps stacked on channels
    # (measured, 2 cores); GPUs run the native 3D convolution (cuDNN) without the 3x input copy.
    return jax.default_backend() == "cpu"


def _dense(p, x):
    """A 1x1(x1) convolution: a matmul over channels (in x's dtype, fp32 accumulation)."""
    k = p["kernel"]
    return layers.dense(x, {"kernel": k.reshape(k.shape[-2:]), "bias": p["bias"]}, dtype=x.dtype)


def _conv2d(p, x_NHWC, stride=1, padding=((1, 1), (1, 1))):
    y = lax.conv_general_dilated(x_NHWC, p["kernel"], (stride, stride), padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"]


def _per_frame(fn, x_BTHWC):
    b, t = x_BTHWC.shape[:2]
    y = fn(x_BTHWC.reshape(b * t, *x_BTHWC.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


def _time_taps(x, n_out: int, stride: int = 1):
    """The 3 temporal taps of a kernel-3 conv stacked on channels: [B, n_out, H, W, 3C]."""
    return jnp.concatenate([x[:, i: i + stride * (n_out - 1) + 1: stride] for i in range(3)], axis=-1)


def _conv3d_valid_t(p, x_BTHWC):
    """A kT=3 conv, valid in time (the caller has prepended 2 frames), spatially 'same' (pad kH//2)."""
    k = p["kernel"]
    kt, kh, kw, ci, co = k.shape
    t = x_BTHWC.shape[1] - 2
    if kh == kw == 1:  # time_conv: (3,1,1)
        return jnp.einsum("...i,io->...o", _time_taps(x_BTHWC, t), k.reshape(kt * ci, co)) + p["bias"]
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    if _fold_time():
        k2 = k.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * ci, co)  # taps ordered (t, c) like _time_taps
        return _per_frame(lambda f: _conv2d({"kernel": k2, "bias": p["bias"]}, f, padding=pad),
                          _time_taps(x_BTHWC, t))
    y = lax.conv_general_dilated(x_BTHWC, k, (1, 1, 1), ((0, 0), *pad),
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + p["bias"]


def _rms_norm(x, scale):
    """x / max(||x||, 1e-12) * sqrt(C) * gamma over channels, in fp32, returned in x's dtype.

    Not `layers.rms_norm`: this is F.normalize (an L2 norm with a floor) times sqrt(C), which differs from
    rsqrt(mean(x^2) + eps) near zero; the official VAE uses it.
    """
    xf = x.astype(jnp.float32)
    n = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
    y = xf / jnp.maximum(n, 1e-12) * (math.sqrt(x.shape[-1]) * scale.astype(jnp.float32))
    return y.astype(x.dtype)


class _History:
    """Causal state across chunks, keyed by layer name: `old` from the previous chunk (None at the clip start, i.e.
    zeros), `new` collected for the next. The pytree `new` is the `lax.scan` carry. `layout`: the clip's sharding
    on a mesh (`_spatial_layout`, None on one device), which every layer's output is pinned to."""

    def __init__(self, old: dict | None, layout=None):
        self.old, self.new, self.layout = old, {}, layout

    def pin(self, x_BTHWC):
        return x_BTHWC if self.layout is None else lax.with_sharding_constraint(x_BTHWC, self.layout)

    def causal_conv(self, p, x, name):
        """CausalConv3d with kT=3: history (or zero padding) in front, then remember the last 2 input frames."""
        if self.old is None:  # a pad (which XLA folds into the conv) rather than a concat with zeros
            xx = jnp.pad(x, ((0, 0), (2, 0)) + ((0, 0),) * (x.ndim - 2))
        else:
            xx = jnp.concatenate([self.old[name], x], axis=1)
        self.new[name] = xx[:, -2:]
        return self.pin(_conv3d_valid_t(p, xx))


# ------------------------------------------------------------------------------------------------- modules
# Every module is built with its official dotted name (`key`), which names its entry in the causal history.
# Random init: fan-in normal kernels, zero biases, unit gammas, float32 (tests and converters overwrite them).
_REPLICATED = (None,)


class Conv(nnx.Module):
    """Kernel [*k, I, O] and bias [O]; called through the pure functions above with `.p`."""

    def __init__(self, k: tuple, cin: int, cout: int, key: str, *, rngs: nnx.Rngs):
        shape = (*k, cin, cout)
        draw = jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(math.prod(k) * cin)
        self.kernel = layers.param(draw, _REPLICATED * len(shape))
        self.bias = layers.param(jnp.zeros((cout,), jnp.float32), _REPLICATED)
        self.key = key

    @property
    def p(self) -> dict:
        return {"kernel": self.kernel[...], "bias": self.bias[...]}


class CausalConv(Conv):
    """CausalConv3d with kT = 3: its last 2 input frames go to the next chunk."""

    def __call__(self, x, hist: _History):
        return hist.causal_conv(self.p, x, self.key)


class RmsNorm(nnx.Module):
    def __init__(self, c: int):
        self.scale = layers.param(jnp.ones((c,), jnp.float32), _REPLICATED)

    def __call__(self, x):
        return _rms_norm(x, self.scale[...])


class ResBlock(nnx.Module):
    """residual = (RMS, SiLU, CausalConv3d, RMS, SiLU, dropout, CausalConv3d); 1x1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, key: str, *, rngs: nnx.Rngs):
        self.residual = nnx.Dict({
            "0": RmsNorm(cin), "2": CausalConv((3, 3, 3), cin, cout, f"{key}.residual.2", rngs=rngs),
            "3": RmsNorm(cout), "6": CausalConv((3, 3, 3), cout, cout, f"{key}.residual.6", rngs=rngs)})
        self.shortcut = Conv((1, 1, 1), cin, cout, f"{key}.shortcut", rngs=rngs) if cin != cout else None

    def __call__(self, x, hist: _History, first: bool):
        h = x if self.shortcut is None else _dense(self.shortcut.p, x)
        r = self.residual
        x = r["2"](jax.nn.silu(r["0"](x)), hist)
        x = r["6"](jax.nn.silu(r["3"](x)), hist)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the h*w positions of each frame, scale 1/sqrt(C)."""

    def __init__(self, c: int, key: str, *, rngs: nnx.Rngs):
        self.norm = RmsNorm(c)
        self.to_qkv = Conv((1, 1), c, 3 * c, f"{key}.to_qkv", rngs=rngs)
        self.proj = Conv((1, 1), c, c, f"{key}.proj", rngs=rngs)

    def __call__(self, x, hist: _History, first: bool):
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b, t, h * w, c)
        q, k, v = jnp.split(_dense(self.to_qkv.p, y), 3, axis=-1)
        logits = jnp.einsum("btqc,btkc->btqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        a = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        y = jnp.einsum("btqk,btkc->btqc", a, v)
        return _dense(self.proj.p, y).reshape(b, t, h, w, c) + x


class Resample(nnx.Module):
    """down2d / down3d / up2d / up3d: a per-frame 3x3 conv (`resample.1`), plus a time conv for the 3d kinds."""

    def __init__(self, kind: str, cin: int, cout: int, key: str, *, rngs: nnx.Rngs):
        self.kind, self.key = kind, key
        self.resample = nnx.Dict({"1": Conv((3, 3), cin, cout, f"{key}.resample.1", rngs=rngs)})
        if kind == "down3d":
            self.time_conv = Conv((3, 1, 1), cout, cout, f"{key}.time_conv", rngs=rngs)
        elif kind == "up3d":
            self.time_conv = Conv((3, 1, 1), cin, 2 * cin, f"{key}.time_conv", rngs=rngs)
        else:
            self.time_conv = None

    def __call__(self, x, hist: _History, first: bool):
        conv = self.resample["1"].p
        if self.kind.startswith("down"):
            # ZeroPad2d((0,1,0,1)) then a valid stride-2 3x3 conv, per frame.
            x = _per_frame(lambda f: _conv2d(conv, f, stride=2, padding=((0, 1), (0, 1))), x)
            return x if self.kind == "down2d" else self._time_down(x, hist, first)
        if self.kind == "up3d":
            x = self._time_up(x, hist, first)
        # nearest-exact x2 (= pixel repeat), then a 3x3 conv halving the channels, per frame.
        return _per_frame(lambda v: _conv2d(conv, jnp.repeat(jnp.repeat(v, 2, axis=1), 2, axis=2)), x)

    def _time_down(self, y, hist: _History, first: bool):
        """§4.3: frame 0 of the clip passes through and is also the first tap of the first stride-2 window."""
        tc = self.time_conv.p
        k = tc["kernel"].reshape(-1, tc["kernel"].shape[-1])
        if first:
            n = (y.shape[1] - 1) // 2
            out = y[:, :1]
            if n > 0:
                out = jnp.concatenate([out, jnp.einsum("...i,io->...o", _time_taps(y, n, 2), k) + tc["bias"]], axis=1)
        else:
            yy = jnp.concatenate([hist.old[self.key], y], axis=1)
            out = jnp.einsum("...i,io->...o", _time_taps(yy, (yy.shape[1] - 1) // 2, 2), k) + tc["bias"]
        hist.new[self.key] = y[:, -1:]
        return out

    def _time_up(self, x, hist: _History, first: bool):
        """§4.3: frame 0 of the clip is not doubled; later frames go through the time conv with zero history before
        frame 1 (frame 0 is never seen), channels [0:C) -> frame 2t, [C:2C) -> frame 2t+1."""
        name = self.time_conv.key
        if first:
            head, x = x[:, :1], x[:, 1:]
            xx = jnp.pad(x, ((0, 0), (2, 0)) + ((0, 0),) * (x.ndim - 2))
        else:
            head, xx = None, jnp.concatenate([hist.old[name], x], axis=1)
        hist.new[name] = xx[:, -2:]
        if not x.shape[1]:
            return head
        y = _conv3d_valid_t(self.time_conv.p, xx)
        b, t, h, w, c2 = y.shape
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
        return y if head is None else jnp.concatenate([head, y], axis=1)


def _middle(c: int, key: str, rngs: nnx.Rngs) -> nnx.Dict:
    return nnx.Dict({"0": ResBlock(c, c, f"{key}.0", rngs=rngs), "1": AttentionBlock(c, f"{key}.1", rngs=rngs),
                     "2": ResBlock(c, c, f"{key}.2", rngs=rngs)})


def _head(cin: int, cout: int, key: str, rngs: nnx.Rngs) -> nnx.Dict:
    return nnx.Dict({"0": RmsNorm(cin), "2": CausalConv((3, 3, 3), cin, cout, f"{key}.2", rngs=rngs)})


def _run(seq, x, hist: _History, first: bool):
    for k in range(len(seq)):
        x = hist.pin(seq[str(k)](x, hist, first))
    return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VaeConfig, *, rngs: nnx.Rngs):
        top = cfg.base_dim * cfg.dim_mult[-1]
        self.conv1 = CausalConv((3, 3, 3), 3, cfg.base_dim, "encoder.conv1", rngs=rngs)
        self.downsamples = nnx.Dict({
            str(k): (ResBlock(cin, cout, f"encoder.downsamples.{k}", rngs=rngs) if kind == "res" else
                     Resample(kind, cin, cout, f"encoder.downsamples.{k}", rngs=rngs))
            for k, (kind, cin, cout) in enumerate(encoder_layers(cfg))})
        self.middle = _middle(top, "encoder.middle", rngs)
        self.head = _head(top, 2 * cfg.z_dim, "encoder.head", rngs)

    def __call__(self, x, hist: _History, first: bool):
        x = _run(self.downsamples, self.conv1(x, hist), hist, first)
        x = _run(self.middle, x, hist, first)
        return self.head["2"](jax.nn.silu(self.head["0"](x)), hist)


class Decoder(nnx.Module):
    def __init__(self, cfg: VaeConfig, *, rngs: nnx.Rngs):
        top, out_dim = cfg.base_dim * cfg.dim_mult[-1], cfg.base_dim * cfg.dim_mult[0]
        self.conv1 = CausalConv((3, 3, 3), cfg.z_dim, top, "decoder.conv1", rngs=rngs)
        self.middle = _middle(top, "decoder.middle", rngs)
        self.upsamples = nnx.Dict({
            str(k): (ResBlock(cin, cout, f"decoder.upsamples.{k}", rngs=rngs) if kind == "res" else
                     Resample(kind, cin, cout, f"decoder.upsamples.{k}", rngs=rngs))
            for k, (kind, cin, cout, _) in enumerate(decoder_layers(cfg))})
        self.head = _head(out_dim, 3, "decoder.head", rngs)

    def __call__(self, x, hist: _History, first: bool):
        x = _run(self.middle, self.conv1(x, hist), hist, first)
        x = _run(self.upsamples, x, hist, first)
        return self.head["2"](jax.nn.silu(self.head["0"](x)), hist)


class WanVae(nnx.Module):
    """The whole VAE: `encoder`, `conv1` (posterior moments), `conv2` (post-quant), `decoder`."""

    def __init__(self, cfg: VaeConfig, *, rngs: nnx.Rngs):
        z = cfg.z_dim
        self.encoder = Encoder(cfg, rngs=rngs)
        self.conv1 = Conv((1, 1, 1), 2 * z, 2 * z, "conv1", rngs=rngs)
        self.conv2 = Conv((1, 1, 1), z, z, "conv2", rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)


# ---------------------------------------------------------------------------------------------------- params
def init(cfg: VaeConfig, rng) -> dict:
    """Random parameters (fan-in normal kernels, zero biases, unit gammas), float32, as a plain nested dict."""
    return layers.init_params(WanVae, cfg, rng)


def param_shapes(cfg: VaeConfig) -> dict:
    """The parameter tree as nested dicts of shape tuples (official key names, our layouts); nothing allocated."""
    return jax.tree.map(lambda s: tuple(s.shape), layers.abstract_params(WanVae, cfg))


def param_axes(cfg: VaeConfig) -> dict:
    """Same tree as `init`, leaves the logical axis names: all None (replicated, see the module docstring)."""
    return layers.logical_axes(WanVae, cfg)


# ----------------------------------------------------------------------------------------------- execution
def _spatial_layout(arrays, b: int, h: int, w: int):
    """The layout of the clip's activations [B, T, H, W, C] on the mesh that `arrays` (params and input) live on:
    the batch over the rules' "batch" mesh axes that divide `b`, then every other mesh axis over the latent width
    `w` while it divides, then the latent height `h` (the causal cache is along time, so a spatial split keeps the
    chunked scheme; XLA's partitioner exchanges the 3x3 convolutions' halo rows). Every level of the VAE is a
    multiple of the latent grid, so one spec holds at all of them. None on one device. Rules: those of an enclosing
    `sharding.axis_rules`, else DEFAULT_RULES (only "batch" is read)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        mesh = layers.mesh_of(arrays)
    if mesh is None or math.prod(mesh.shape.values()) <= 1:
        return None
    batch = sharding.batch_mesh_axes(sharding.active_rules() or sharding.DEFAULT_RULES, mesh.shape, b)
    split = {"w": [], "h": []}
    for name in mesh.axis_names:
        if name in batch or mesh.shape[name] == 1:
            continue
        for dim, size in (("w", w), ("h", h)):
            if size % (math.prod(mesh.shape[a] for a in split[dim]) * mesh.shape[name]) == 0:
                split[dim].append(name)
                break
    spec = [tuple(batch) or None, None, tuple(split["h"]) or None, tuple(split["w"]) or None, None]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _run_chunked(fn, x0, rest, layout=None):
    """fn(x, hist, first) -> y on chunk 0, then lax.scan over `rest` [n, B, t, ...] carrying the history."""
    hist = _History(None, layout)
    y0 = fn(x0, hist, True)
    if rest.shape[0] == 0:
        return y0

    def step(carry, xc):
        h = _History(carry, layout)
        y = fn(xc, h, False)
        return h.new, y

    _, ys = lax.scan(step, hist.new, rest)  # [n, B, t', ...]
    ys = jnp.moveaxis(ys, 0, 1)
    ys = ys.reshape(ys.shape[0], -1, *ys.shape[3:])
    return jnp.concatenate([y0, ys], axis=1)


def _cast(params, dtype):
    """Kernels and biases to the compute dtype; norm gammas stay fp32."""
    def f(path, a):
        return a.astype(jnp.float32) if getattr(path[-1], "key", None) == "scale" else a.astype(dtype)
    return jax.tree_util.tree_map_with_path(f, params)


def _bound(cfg: VaeConfig, params) -> WanVae:
    return layers.bind(WanVae, cfg, _cast(params, jnp.dtype(cfg.dtype)))


@partial(jax.jit, static_argnames=("cfg", "chunked"))
def _encode(cfg: VaeConfig, params, video, chunked: bool):
    model = _bound(cfg, params)
    s = cfg.spatial_factor
    layout = _spatial_layout((params, video), video.shape[0], video.shape[2] // s, video.shape[3] // s)
    x = _History(None, layout).pin(video.astype(jnp.dtype(cfg.dtype)))
    if chunked:
        b, f, tf = *x.shape[:2], cfg.temporal_factor  # chunks: frame 0, then 4 frames (one latent frame) each
        rest = x[:, 1:].reshape(b, (f - 1) // tf, tf, *x.shape[2:])
        h = _run_chunked(model.encoder, x[:, :1], jnp.moveaxis(rest, 1, 0), layout)
    else:
        h = model.encoder(x, _History(None, layout), True)
    mu = _dense(model.conv1.p, h)[..., : cfg.z_dim].astype(jnp.float32)
    mean = jnp.asarray(cfg.latents_mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(cfg.latents_std, jnp.float32)  # the official (mu - mean) * (1/std)
    return (mu - mean) * inv_std


@partial(jax.jit, static_argnames=("cfg", "chunked", "clamp"))
def _decode(cfg: VaeConfig, params, z, chunked: bool, clamp: bool = True):
    """Decoder output, float32, clamped to [-1, 1] if `clamp`."""
    model = _bound(cfg, params)
    dt = jnp.dtype(cfg.dtype)
    layout = _spatial_layout((params, z), z.shape[0], z.shape[2], z.shape[3])
    z = z.astype(jnp.float32) * jnp.asarray(cfg.latents_std, jnp.float32) + jnp.asarray(cfg.latents_mean,
                                                                                         jnp.float32)
    x = _History(None, layout).pin(_dense(model.conv2.p, z.astype(dt)))
    if chunked:
        out = _run_chunked(model.decoder, x[:, :1], jnp.moveaxis(x[:, 1:, None], 1, 0), layout)
    else:
        out = model.decoder(x, _History(None, layout), True)
    out = out.astype(jnp.float32)
    return jnp.clip(out, -1.0, 1.0) if clamp else out


# ---------------------------------------------------------------------------------------------- public API
def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_video(cfg: VaeConfig, video):
    """Validates a pixel clip and drops trailing frames beyond the last 4k+1 (with a warning). Returns the clip."""
    if video.ndim != 5:
        raise ValueError(f"video must be [B, F, H, W, 3] (channels-last), got shape {tuple(video.shape)}")
    b, f, h, w, c = video.shape
    if c != 3:
        raise ValueError(f"video must have 3 channels last ([B, F, H, W, 3]), got shape {tuple(video.shape)}"
                         + (" (channels-first input? transpose to [B, F, H, W, 3])" if video.shape[1] == 3 else ""))
    s = cfg.spatial_factor
    if h % s or w % s:
        raise ValueError(f"video height and width must be multiples of {s}, got {h}x{w} (the Wan DiT further needs "
                         f"multiples of {2 * s})")
    if f < 1:
        raise ValueError("video has no frames")
    tf = cfg.temporal_factor
    keep = 1 + (f - 1) // tf * tf
    if keep != f:
        warnings.warn(f"the VAE encodes 1 + {tf}k frames: dropping the last {f - keep} of {f} frames "
                      f"(encoding {keep}, as the official code does silently)", stacklevel=3)
        video = video[:, :keep]
    if _is_concrete(video) and video.size:
        with jax.ensure_compile_time_eval():  # a concrete clip closed over by a traced function: still eager
            lo, hi = (float(v) for v in jax.device_get((jnp.min(video), jnp.max(video))))
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            warnings.warn(f"video values span [{lo:.3g}, {hi:.3g}], outside [-1, 1]: pixels are expected in [-1, 1] "
                          f"(uint8 / 127.5 - 1)", stacklevel=3)
    return video


def check_latents(cfg: VaeConfig, z):
    if z.ndim != 5:
        raise ValueError(f"latents must be [B, T, h, w, {cfg.z_dim}] (channels-last), got shape {tuple(z.shape)}")
    if z.shape[-1] != cfg.z_dim:
        raise ValueError(f"latents must have z_dim={cfg.z_dim} channels last, got shape {tuple(z.shape)}")
    if z.shape[1] < 1:
        raise ValueError("latents have no frames")
    return z


def encode(cfg: VaeConfig, params, video, *, chunked: bool = True):
    """Pixels [B, F, H, W, 3] in [-1, 1] -> normalised posterior mean [B, 1+(F-1)//4, H/8, W/8, z_dim], float32.

    chunked: the official 1,4,4,... frame chunks in a lax.scan (memory of one chunk); False runs the clip at once.
    """
    video = check_video(cfg, video)
    return _encode(cfg, params, video, bool(chunked) and video.shape[1] > 1)  # one frame: the same program


def decode(cfg: VaeConfig, params, z, *, chunked: bool = True, tile_size: tuple[int, int] | None = None,
           tile_stride: tuple[int, int] = (192, 192), clamp: bool = True):
    """Normalised latents [B, T, h, w, z_dim] -> pixels [B, 1+4(T-1), 8h, 8w, 3] clamped to [-1, 1], float32.

    chunked: one latent frame at a time in a lax.scan (official); False decodes the clip at once.
    tile_size: (H, W) in pixels to decode in overlapping spatial tiles blended linearly (diffusers' `tiled_decode`,
      defaults 256/192 there). An approximation: seams are blended, not exact, since each tile sees only its own
      receptive field. None (default) decodes exactly.
    clamp: False returns the raw decoder output (training: a clamp would leave overshooting pixels without a
      gradient); untiled decoding only.
    """
    z = check_latents(cfg, z)
    chunked = bool(chunked) and z.shape[1] > 1
    if tile_size is None:
        return _decode(cfg, params, z, chunked, bool(clamp))
    if not clamp:
        raise ValueError("clamp=False is for untiled decoding (training); tiled decoding always clamps")
    return _decode_tiled(cfg, params, z, chunked, tile_size, tile_stride)


def _decode_tiled(cfg, params, z, chunked, tile_size, tile_stride):
    s = cfg.spatial_factor
    if any(v % s for v in (*tile_size, *tile_stride)) or any(st > ts for st, ts in zip(tile_stride, tile_size)):
        raise ValueError(f"tile_size {tile_size} and tile_stride {tile_stride} must be multiples of {s} with "
                         f"stride <= size")
    (th, tw), (sh, sw) = [(a // s, b // s) for a, b in (tile_size, tile_stride)]
    _, _, h, w, _ = z.shape
    if h <= th and w <= tw:
        return _decode(cfg, params, z, chunked)
    blend_h, blend_w = (tile_size[0] - tile_stride[0], tile_size[1] - tile_stride[1])
    rows = []
    for i in range(0, h, sh):
        row = []
        for j in range(0, w, sw):
            tile = _decode(cfg, params, z[:, :, i: i + th, j: j + tw], chunked, clamp=False)
            if rows:
                tile = _blend(rows[-1][len(row)], tile, blend_h, axis=2)
            if row:
                tile = _blend(row[-1], tile, blend_w, axis=3)
            row.append(tile)
        rows.append(row)
    out = jnp.concatenate([jnp.concatenate([t[:, :, : tile_stride[0], : tile_stride[1]] for t in row], axis=3)
                           for row in rows], axis=2)
    return jnp.clip(out[:, :, : h * s, : w * s], -1.0, 1.0)


def _blend(a, b, extent, axis):
    """Linear cross-fade of `a`'s trailing `extent` rows/columns into `b`'s leading ones (diffusers blend_v/h)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    r = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape)
    a_tail = lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    b_head = lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = a_tail * (1 - r) + b_head * r
    return jnp.concatenate([mixed, lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def num_params(cfg: VaeConfig) -> int:
    return int(sum(np.prod(s) for s in jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))))
