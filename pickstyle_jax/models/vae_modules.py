"""The Wan2.1 VAE's modules and their layer maths (`vae.py` holds the config, parameters and the encode / decode
drivers, and re-exports the public names here: `vae.WanVae`, `vae.encoder_layers`, ...).

Dimension key: B batch, T frames (of a chunk), H/W rows/columns, C channels; channels-last. `cfg` is a
`vae.VaeConfig` (not imported: `vae` imports this module).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from pickstyle_jax.models import layers


# ------------------------------------------------------------------------------------------------ structure
def encoder_layers(cfg) -> list[tuple[str, int, int]]:
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


def decoder_layers(cfg) -> list[tuple[str, int, int, int]]:
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


def dense_1x1(p, x):
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


class History:
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

    def __call__(self, x, hist: History):
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

    def __call__(self, x, hist: History, first: bool):
        h = x if self.shortcut is None else dense_1x1(self.shortcut.p, x)
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

    def __call__(self, x, hist: History, first: bool):
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b, t, h * w, c)
        q, k, v = jnp.split(dense_1x1(self.to_qkv.p, y), 3, axis=-1)
        logits = jnp.einsum("btqc,btkc->btqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        a = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        y = jnp.einsum("btqk,btkc->btqc", a, v)
        return dense_1x1(self.proj.p, y).reshape(b, t, h, w, c) + x


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

    def __call__(self, x, hist: History, first: bool):
        conv = self.resample["1"].p
        if self.kind.startswith("down"):
            # ZeroPad2d((0,1,0,1)) then a valid stride-2 3x3 conv, per frame.
            x = _per_frame(lambda f: _conv2d(conv, f, stride=2, padding=((0, 1), (0, 1))), x)
            return x if self.kind == "down2d" else self._time_down(x, hist, first)
        if self.kind == "up3d":
            x = self._time_up(x, hist, first)
        # nearest-exact x2 (= pixel repeat), then a 3x3 conv halving the channels, per frame.
        return _per_frame(lambda v: _conv2d(conv, jnp.repeat(jnp.repeat(v, 2, axis=1), 2, axis=2)), x)

    def _time_down(self, y, hist: History, first: bool):
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

    def _time_up(self, x, hist: History, first: bool):
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


def _run(seq, x, hist: History, first: bool):
    for k in range(len(seq)):
        x = hist.pin(seq[str(k)](x, hist, first))
    return x


class Encoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        top = cfg.base_dim * cfg.dim_mult[-1]
        self.conv1 = CausalConv((3, 3, 3), 3, cfg.base_dim, "encoder.conv1", rngs=rngs)
        self.downsamples = nnx.Dict({
            str(k): (ResBlock(cin, cout, f"encoder.downsamples.{k}", rngs=rngs) if kind == "res" else
                     Resample(kind, cin, cout, f"encoder.downsamples.{k}", rngs=rngs))
            for k, (kind, cin, cout) in enumerate(encoder_layers(cfg))})
        self.middle = _middle(top, "encoder.middle", rngs)
        self.head = _head(top, 2 * cfg.z_dim, "encoder.head", rngs)

    def __call__(self, x, hist: History, first: bool):
        x = _run(self.downsamples, self.conv1(x, hist), hist, first)
        x = _run(self.middle, x, hist, first)
        return self.head["2"](jax.nn.silu(self.head["0"](x)), hist)


class Decoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        top, out_dim = cfg.base_dim * cfg.dim_mult[-1], cfg.base_dim * cfg.dim_mult[0]
        self.conv1 = CausalConv((3, 3, 3), cfg.z_dim, top, "decoder.conv1", rngs=rngs)
        self.middle = _middle(top, "decoder.middle", rngs)
        self.upsamples = nnx.Dict({
            str(k): (ResBlock(cin, cout, f"decoder.upsamples.{k}", rngs=rngs) if kind == "res" else
                     Resample(kind, cin, cout, f"decoder.upsamples.{k}", rngs=rngs))
            for k, (kind, cin, cout, _) in enumerate(decoder_layers(cfg))})
        self.head = _head(out_dim, 3, "decoder.head", rngs)

    def __call__(self, x, hist: History, first: bool):
        x = _run(self.middle, self.conv1(x, hist), hist, first)
        x = _run(self.upsamples, x, hist, first)
        return self.head["2"](jax.nn.silu(self.head["0"](x)), hist)


class WanVae(nnx.Module):
    """The whole VAE: `encoder`, `conv1` (posterior moments), `conv2` (post-quant), `decoder`."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        z = cfg.z_dim
        self.encoder = Encoder(cfg, rngs=rngs)
        self.conv1 = Conv((1, 1, 1), 2 * z, 2 * z, "conv1", rngs=rngs)
        self.conv2 = Conv((1, 1, 1), z, z, "conv2", rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
